//! The bench's figures as SVG pictures, pure: each function takes a [`BenchReport`] and returns
//! the SVG text (no file is written here; [`write_all`] names the files). Drawn by `plotters`'
//! SVG backend alone: text is left to the viewer's sans-serif font, so nothing here reads a font
//! or a system library, and label sizes are estimated.
//!
//! Figures without data are left out (`None`), never drawn empty. A measurement without a
//! figure (no samples, a zero median) is skipped, and a zero-length round trip is drawn at the
//! left edge of a log axis: odd reports give odd pictures, never a panic.

use super::figures::{size_name, BenchReport, Carrier, Direction};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::ops::Range;
use thiserror::Error;

/// Why a figure could not be drawn.
#[derive(Debug, Error)]
pub enum PlotError {
    /// `plotters` refused to draw (its message). The SVG backend writes into memory, so this
    /// is not expected.
    #[error("drawing a bench figure: {0}")]
    Draw(String),
}

/// Width and height of every figure, pixels.
const SIZE: (u32, u32) = (800, 500);
/// Series colours (Tableau 10's first four), in turn; the carriers take them in their order.
const PALETTE: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];
/// The carriers in drawing order, each with its colour.
const CARRIERS: [(Carrier, RGBColor); 4] = [
    (Carrier::Raw, PALETTE[0]),
    (Carrier::Plain, PALETTE[1]),
    (Carrier::Acked, PALETTE[2]),
    (Carrier::Vsock, PALETTE[3]),
];
/// At most this many labelled ticks on the write-size axis.
const MAX_SIZE_TICKS: usize = 12;
/// At most this many steps in one empirical CDF (finer is below a pixel).
const MAX_CDF_STEPS: usize = 1000;

/// Median MB/s against write size, one line with points per carrier (a lone point where only
/// one write size was measured), the write size on a log2 axis labelled `64 B`, `4 KiB`, ...
/// `None` when no throughput of `direction` has a figure (samples with a non-zero median).
pub fn throughput_svg(report: &BenchReport, direction: Direction) -> Result<Option<String>, PlotError> {
    let mut series = Vec::new();
    for (carrier, color) in CARRIERS {
        let mut points: Vec<(f64, f64)> = report
            .throughput
            .iter()
            .filter(|t| t.direction == direction && t.carrier == carrier && t.write_size > 0)
            .filter_map(|t| Some((f64::from(t.write_size).log2(), t.mb_per_s()?)))
            .filter(|(_, y)| y.is_finite())
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        if !points.is_empty() {
            series.push(Series { label: carrier.name().to_string(), color, points, markers: true });
        }
    }
    let mut xs: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let (Some(&lo), Some(&hi)) = (xs.first(), xs.last()) else { return Ok(None) };
    let top =
        max(series.iter().flat_map(|s| s.points.iter().map(|p| p.1))).filter(|m| *m > 0.0).map_or(1.0, |m| m * 1.15);
    let pad = if hi > lo { 0.5 } else { 1.0 };
    let chart = Chart {
        title: format!("{} throughput (median MB/s)", direction.arrow()),
        x_desc: "write size",
        y_desc: "MB/s",
        x: (lo - pad)..(hi + pad),
        x_ticks: xs.iter().copied().step_by(xs.len().div_ceil(MAX_SIZE_TICKS)).collect(),
        x_label: &|x| size_name(x.exp2().round() as u64),
        y: 0.0..top,
        legend: SeriesLabelPosition::UpperLeft,
        series,
    };
    chart.render().map(Some)
}

/// The round trips' distributions: for each (size, carrier), in size order, raw first, the
/// empirical CDF of its samples (y: the fraction of round trips at most x microseconds), on a
/// log x axis when the samples span more than a decade, else a linear one. Legend entries read
/// `64 B raw`, `64 B echo` ([`Carrier::Plain`] is ECHO here). `None` without samples.
pub fn round_trip_svg(report: &BenchReport) -> Result<Option<String>, PlotError> {
    let mut trips: Vec<_> = report.round_trips.iter().filter(|t| !t.samples.is_empty()).collect();
    trips.sort_by_key(|t| (t.size, t.carrier != Carrier::Raw));
    let all_us = || trips.iter().flat_map(|t| t.samples.iter().map(|d| d.as_secs_f64() * 1e6));
    let Some(hi) = max(all_us()) else { return Ok(None) };
    let lo = min(all_us()).unwrap_or(0.0);
    let lo_positive = min(all_us().filter(|v| *v > 0.0));
    // Log when the positive samples span more than a decade; zeros then sit at the left edge.
    let log_floor = lo_positive.filter(|p| hi / p > 10.0);
    let to_axis = |v: f64| log_floor.map_or(v, |floor| v.max(floor).log10());
    let x = match log_floor {
        Some(floor) => (floor / 1.25).log10()..(hi * 1.25).log10(),
        None => {
            let pad = if hi > lo { (hi - lo) * 0.05 } else { (hi * 0.1).max(1.0) };
            (lo - pad).max(0.0)..hi + pad
        }
    };
    let x_ticks = if log_floor.is_some() { log_ticks(&x) } else { linear_ticks(&x) };
    let series = trips
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut us: Vec<f64> = t.samples.iter().map(|d| to_axis(d.as_secs_f64() * 1e6)).collect();
            us.sort_by(f64::total_cmp);
            let carrier = if t.carrier == Carrier::Raw { "raw" } else { "echo" };
            let label = format!("{} {carrier}", size_name(u64::from(t.size)));
            Series { label, color: PALETTE[i % PALETTE.len()], points: cdf_steps(&us), markers: false }
        })
        .collect();
    let x_label: &dyn Fn(f64) -> String =
        if log_floor.is_some() { &|x| fmt_num(10f64.powf(x)) } else { &|x| fmt_num(x) };
    let chart = Chart {
        title: "round trips (empirical CDF)".to_string(),
        x_desc: "round trip (µs)",
        y_desc: "fraction of round trips",
        x,
        x_ticks,
        x_label,
        y: 0.0..1.02,
        legend: SeriesLabelPosition::LowerRight,
        series,
    };
    chart.render().map(Some)
}

/// Every figure that has data, as (file name, SVG text): `throughput-guest-to-host.svg`,
/// `throughput-host-to-guest.svg`, `round-trips.svg`, in that order.
pub fn write_all(report: &BenchReport) -> Result<Vec<(String, String)>, PlotError> {
    let figures = [
        ("throughput-guest-to-host.svg", throughput_svg(report, Direction::GuestToHost)?),
        ("throughput-host-to-guest.svg", throughput_svg(report, Direction::HostToGuest)?),
        ("round-trips.svg", round_trip_svg(report)?),
    ];
    Ok(figures.into_iter().filter_map(|(name, svg)| Some((name.to_string(), svg?))).collect())
}

/// One line (or lone points) of a chart, in axis coordinates.
struct Series {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    markers: bool,
}

/// A chart on linear axes; log scales are applied by the caller (`x` is then a logarithm and
/// `x_label` names the value it stands for).
struct Chart<'a> {
    title: String,
    x_desc: &'a str,
    y_desc: &'a str,
    x: Range<f64>,
    x_ticks: Vec<f64>,
    x_label: &'a dyn Fn(f64) -> String,
    y: Range<f64>,
    legend: SeriesLabelPosition,
    series: Vec<Series>,
}

impl Chart<'_> {
    /// The SVG text: one polyline per series of two or more points, its points as circles when
    /// `markers`, a legend with a filled square per series.
    fn render(self) -> Result<String, PlotError> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
            root.fill(&WHITE).map_err(draw)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(&self.title, ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(45)
                .y_label_area_size(65)
                .build_cartesian_2d(
                    Ticked { inner: self.x.clone().into(), ticks: self.x_ticks.clone() },
                    self.y.clone(),
                )
                .map_err(draw)?;
            chart
                .configure_mesh()
                .x_desc(self.x_desc)
                .y_desc(self.y_desc)
                .x_label_formatter(&|x| (self.x_label)(*x))
                .y_label_formatter(&|y| fmt_num(*y))
                .label_style(("sans-serif", 15))
                .axis_desc_style(("sans-serif", 16))
                .light_line_style(TRANSPARENT)
                .draw()
                .map_err(draw)?;
            for s in &self.series {
                let color = s.color;
                if s.points.len() >= 2 {
                    let line = PathElement::new(s.points.clone(), color.stroke_width(2));
                    chart.draw_series(std::iter::once(line)).map_err(draw)?;
                }
                let markers = s.points.iter().filter(|_| s.markers).map(|p| Circle::new(*p, 4, color.filled()));
                chart
                    .draw_series(markers)
                    .map_err(draw)?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
            }
            chart
                .configure_series_labels()
                .position(self.legend)
                .label_font(("sans-serif", 16))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .draw()
                .map_err(draw)?;
            root.present().map_err(draw)?;
        }
        Ok(svg)
    }
}

/// A linear f64 axis with labels at the given ticks only (plotters' `WithKeyPoints` over f64
/// cannot take a label formatter).
struct Ticked {
    inner: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.inner.range()
    }
}

/// A plotters error as a [`PlotError`].
fn draw(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

fn min(values: impl Iterator<Item = f64>) -> Option<f64> {
    values.reduce(f64::min)
}

fn max(values: impl Iterator<Item = f64>) -> Option<f64> {
    values.reduce(f64::max)
}

/// The empirical CDF of `sorted` as a step line: for each of at most [`MAX_CDF_STEPS`] evenly
/// spaced ranks r (every rank when there are fewer samples), a riser at the r-th sample up to
/// r / n. Exact when every rank is drawn.
fn cdf_steps(sorted: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted.len();
    let steps = n.min(MAX_CDF_STEPS);
    let mut points = Vec::with_capacity(2 * steps);
    let mut below = 0.0;
    for j in 1..=steps {
        let rank = (j * n).div_ceil(steps);
        let (x, y) = (sorted[rank - 1], rank as f64 / n as f64);
        points.extend([(x, below), (x, y)]);
        below = y;
    }
    points
}

/// Ticks at 1, 2 and 5 times each power of ten inside `range` (a range of log10 values).
fn log_ticks(range: &Range<f64>) -> Vec<f64> {
    let (first, last) = (range.start.floor() as i32, range.end.ceil() as i32);
    (first..=last)
        .flat_map(|d| [1.0, 2.0, 5.0].map(|m: f64| (m * 10f64.powi(d)).log10()))
        .filter(|t| (range.start - 1e-9..=range.end + 1e-9).contains(t))
        .collect()
}

/// Round ticks (1, 2 or 5 times a power of ten apart), about six over `range`.
fn linear_ticks(range: &Range<f64>) -> Vec<f64> {
    let span = range.end - range.start;
    if !(span > 0.0 && span.is_finite()) {
        return vec![range.start];
    }
    let raw = span / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let first = (range.start / step).ceil() as i64;
    (first..).map(|k| k as f64 * step).take_while(|t| *t <= range.end).collect()
}

/// A number with at most three decimals, without trailing zeros (`20`, `0.25`, `1.5`).
fn fmt_num(v: f64) -> String {
    format!("{v:.3}").trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::super::figures::{RoundTrip, Throughput};
    use super::*;
    use std::time::Duration;

    fn tp(direction: Direction, carrier: Carrier, write_size: u32, ms: u64) -> Throughput {
        let samples = vec![Duration::from_millis(ms); 3];
        Throughput {
            direction,
            carrier,
            bytes: 10_000_000,
            write_size,
            agent_cpu: samples.clone(),
            samples,
            guest_insns: Vec::new(),
        }
    }

    fn rt(carrier: Carrier, size: u32, us: impl IntoIterator<Item = u64>) -> RoundTrip {
        RoundTrip { carrier, size, samples: us.into_iter().map(Duration::from_micros).collect() }
    }

    /// The SVG's texts, after checking that it is one balanced `<svg>` element.
    fn texts(svg: &str) -> Vec<&str> {
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        svg.split("<text").skip(1).filter_map(|t| Some(t.split_once(">\n")?.1.split_once("\n</text>")?.0)).collect()
    }

    /// The polylines drawn in `color` (the axes and ticks are black).
    fn lines(svg: &str, color: RGBColor) -> usize {
        let stroke = format!("stroke=\"#{:02X}{:02X}{:02X}\"", color.0, color.1, color.2);
        svg.lines().filter(|l| l.starts_with("<polyline") && l.contains(&stroke)).count()
    }

    #[test]
    fn throughput_draws_one_line_per_carrier_over_the_write_sizes() {
        let mut report = BenchReport::default();
        for (i, size) in [64u32, 4096, 65536, 1 << 20].into_iter().enumerate() {
            for (carrier, _) in CARRIERS {
                report.throughput.push(tp(Direction::GuestToHost, carrier, size, 400 - 90 * i as u64));
            }
        }
        let svg = throughput_svg(&report, Direction::GuestToHost).unwrap().unwrap();
        let found = texts(&svg);
        for label in
            ["guest-&gt;host throughput (median MB/s)", "raw", "plain", "acked", "vsock", "64 B", "4 KiB", "1 MiB"]
        {
            assert!(found.contains(&label), "{label}: {found:?}");
        }
        assert!(CARRIERS.iter().all(|(_, color)| lines(&svg, *color) == 1), "one line per carrier: {svg}");
        assert_eq!(svg.matches("<circle").count(), 4 * CARRIERS.len(), "a point per figure");
        assert_eq!(throughput_svg(&report, Direction::HostToGuest).unwrap(), None, "no figure that way");
    }

    #[test]
    fn a_single_write_size_gives_lone_points() {
        let (raw, plain) = (
            tp(Direction::HostToGuest, Carrier::Raw, 65536, 100),
            tp(Direction::HostToGuest, Carrier::Plain, 65536, 110),
        );
        let report = BenchReport { throughput: vec![raw, plain], ..Default::default() };
        let svg = throughput_svg(&report, Direction::HostToGuest).unwrap().unwrap();
        let found = texts(&svg);
        assert!(found.contains(&"64 KiB") && found.contains(&"plain") && !found.contains(&"acked"), "{found:?}");
        assert_eq!((lines(&svg, PALETTE[0]), svg.matches("<circle").count()), (0, 2), "points, no line");
    }

    #[test]
    fn round_trips_draw_one_cdf_per_size_and_carrier() {
        let spread = (0..5000).map(|v| 200 + v % 4000);
        let round_trips =
            vec![rt(Carrier::Plain, 64, 100..300), rt(Carrier::Raw, 64, 90..250), rt(Carrier::Raw, 4096, spread)];
        let svg = round_trip_svg(&BenchReport { round_trips, ..Default::default() }).unwrap().unwrap();
        let found = texts(&svg);
        for label in ["round trips (empirical CDF)", "64 B raw", "64 B echo", "4 KiB raw", "100", "1000"] {
            assert!(found.contains(&label), "{label}: {found:?}");
        }
        // Raw first within a size: 64 B raw, 64 B echo, 4 KiB raw take the palette in order.
        assert!((0..3).all(|i| lines(&svg, PALETTE[i]) == 1), "{svg}");
        assert!(svg.len() < 100_000, "5,000 samples are drawn in at most 1,000 steps: {}", svg.len());
        let narrow = BenchReport { round_trips: vec![rt(Carrier::Raw, 64, [100, 120, 150])], ..Default::default() };
        let narrow = round_trip_svg(&narrow).unwrap().unwrap();
        assert!(texts(&narrow).contains(&"120"), "a linear axis within a decade");
    }

    #[test]
    fn only_figures_with_data_are_drawn() {
        let empty = BenchReport { round_trips: vec![rt(Carrier::Raw, 64, [])], ..Default::default() };
        assert_eq!(throughput_svg(&empty, Direction::GuestToHost).unwrap(), None);
        assert_eq!(round_trip_svg(&empty).unwrap(), None);
        assert!(write_all(&empty).unwrap().is_empty());
        let report = BenchReport {
            throughput: vec![tp(Direction::HostToGuest, Carrier::Acked, 4096, 50)],
            round_trips: vec![rt(Carrier::Raw, 64, 10..20)],
            ..Default::default()
        };
        let names: Vec<_> = write_all(&report).unwrap().into_iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["throughput-host-to-guest.svg", "round-trips.svg"]);
    }

    #[test]
    fn zero_durations_do_not_panic() {
        let throughput =
            vec![tp(Direction::GuestToHost, Carrier::Raw, 64, 0), tp(Direction::GuestToHost, Carrier::Plain, 0, 5)];
        let round_trips = vec![rt(Carrier::Raw, 64, [0, 0, 5, 900]), rt(Carrier::Plain, 64, [0])];
        let report = BenchReport { throughput, round_trips, ..Default::default() };
        assert_eq!(throughput_svg(&report, Direction::GuestToHost).unwrap(), None, "no MB/s to draw");
        texts(&round_trip_svg(&report).unwrap().unwrap());
        let zeros = BenchReport { round_trips: vec![rt(Carrier::Raw, 64, [0, 0])], ..Default::default() };
        texts(&round_trip_svg(&zeros).unwrap().unwrap());
    }

    #[test]
    fn ticks_are_round_and_the_cdf_exact() {
        assert_eq!(linear_ticks(&(0.0..10.0)), [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let labels: Vec<_> = log_ticks(&(1.0..3.0)).into_iter().map(|t| fmt_num(10f64.powf(t))).collect();
        assert_eq!(labels, ["10", "20", "50", "100", "200", "500", "1000"]);
        assert_eq!(cdf_steps(&[1.0, 2.0]), [(1.0, 0.0), (1.0, 0.5), (2.0, 0.5), (2.0, 1.0)]);
    }
}
