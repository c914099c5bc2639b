//! Tests of [`crate::slot`]: every input in every state, and the paths a port takes.

use super::*;
use std::time::{Duration, Instant};
use CloseCause as C;
use OpenOutcome as O;
use Slot as S;
use SlotAction as A;
use SlotInput as In;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// What a step should give: the state it was in and an action, another state and an action,
/// or an error.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Stay(SlotAction),
    Go(Slot, SlotAction),
    Fail(SlotError),
}
use Expect::{Fail, Go, Stay};

const W: Expect = Stay(A::Wait);
const OPEN: Expect = Stay(A::Open);

#[test]
fn every_input_in_every_state_has_a_defined_result() {
    let t = Instant::now();
    let bye = |ms, written| Some(ByeFlush { reopen_after_ms: ms, written });
    let inputs = [
        In::Wanted { retry: false },
        In::Wanted { retry: true },
        In::Unlisted { fd_unplugged: false },
        In::Unlisted { fd_unplugged: true },
        In::PermissionsChanged,
        In::OpenEnded(O::Opened),
        In::OpenEnded(O::Busy),
        In::OpenEnded(O::Denied { watched: true }),
        In::OpenEnded(O::Denied { watched: false }),
        In::OpenEnded(O::Failed),
        In::Served { more_work: false, close: None },
        In::Served { more_work: true, close: None },
        In::Served { more_work: false, close: bye(500, false) },
        In::Served { more_work: false, close: bye(500, true) },
        In::Served { more_work: false, close: bye(700, false) },
        In::Unplugged,
        In::IoFailed,
        In::WorkQueued,
        In::ServeTurn,
        In::Tick,
        In::Shutdown,
    ];
    let later = t + Duration::from_secs(1);
    let closing = |deadline, serve_again| S::Closing { reopen_after_ms: 500, flush_deadline: deadline, serve_again };
    let states = [
        S::Absent,
        S::Open { serve_again: false },
        S::Open { serve_again: true },
        closing(later, false),
        closing(t, true),
        S::Busy { delay: ms(200), retry_at: later },
        S::Busy { delay: ms(200), retry_at: t },
        S::Failed,
        S::Denied,
        S::Reopen { at: later },
        S::Reopen { at: t },
    ];

    let serve = Go(S::Open { serve_again: false }, A::Serve);
    let busy_first = Go(S::Busy { delay: ms(100), retry_at: t + ms(100) }, A::Wait);
    let busy_doubled = Go(S::Busy { delay: ms(400), retry_at: t + ms(400) }, A::Wait);
    let denied = Go(S::Denied, A::Wait);
    let failed = Go(S::Failed, A::Wait);
    let forget = Go(S::Absent, A::Forget);
    let unplug = Go(S::Absent, A::Close(C::Unplugged));
    let io_error = Go(S::Busy { delay: ms(100), retry_at: t + ms(100) }, A::Close(C::IoError));
    let exit = Go(S::Absent, A::Close(C::AgentExit));
    let reopen = |bye_written| Go(S::Reopen { at: t + ms(500) }, A::Close(C::Commanded { bye_written }));
    let more = Go(S::Open { serve_again: true }, A::Wait);
    let to_closing = |ms, serve_again| {
        Go(S::Closing { reopen_after_ms: ms, flush_deadline: t + BYE_FLUSH_BOUND, serve_again }, A::Wait)
    };
    let open_twice = |slot| {
        [O::Opened, O::Busy, O::Denied { watched: true }, O::Denied { watched: false }, O::Failed]
            .map(|outcome| Fail(SlotError::AlreadyOpen { slot, outcome }))
    };
    let not_open = |slot, input| Fail(SlotError::NotOpen { slot, input });
    let changed = |reported_ms| Fail(SlotError::CloseChanged { closing_ms: 500, reported_ms });
    let not_open_row = |slot| {
        [
            not_open(slot, "served"),
            not_open(slot, "served"),
            not_open(slot, "served"),
            not_open(slot, "served"),
            not_open(slot, "served"),
            not_open(slot, "unplugged"),
            not_open(slot, "i/o failed"),
            not_open(slot, "work queued"),
        ]
    };
    let cat = |a: &[Expect], b: &[Expect], c: &[Expect]| -> Vec<Expect> { [a, b, c].concat() };

    #[rustfmt::skip]
    let expected: Vec<Vec<Expect>> = vec![
        // Absent
        cat(&[OPEN, OPEN, W, W, W, serve, busy_first, denied, failed, failed],
            &not_open_row("absent"),
            &[W, W, W]),
        // Open
        cat(&[W, W, W, unplug, W],
            &open_twice("open"),
            &[W, more, to_closing(500, false), reopen(true), to_closing(700, false), unplug, io_error, more,
              W, W, exit]),
        // Open, serve again
        cat(&[W, W, W, unplug, W],
            &open_twice("open"),
            &[W, W, to_closing(500, true), reopen(true), to_closing(700, true), unplug, io_error, W,
              serve, W, exit]),
        // Closing, flush bound ahead
        cat(&[W, W, W, unplug, W],
            &open_twice("closing"),
            &[changed(None), changed(None), W, reopen(true), changed(Some(700)), unplug, io_error,
              Go(closing(later, true), A::Wait), W, W, exit]),
        // Closing, flush bound passed, serve again
        cat(&[W, W, W, unplug, W],
            &open_twice("closing"),
            &[changed(None), changed(None), reopen(false), reopen(true), changed(Some(700)), unplug, io_error,
              W, Go(closing(t, false), A::Serve), reopen(false), exit]),
        // Busy, retry ahead
        cat(&[W, W, forget, forget, W, serve, busy_doubled, denied, failed, failed],
            &not_open_row("busy"),
            &[W, W, W]),
        // Busy, retry due
        cat(&[W, W, forget, forget, W, serve, busy_doubled, denied, failed, failed],
            &not_open_row("busy"),
            &[W, OPEN, W]),
        // Failed
        cat(&[W, OPEN, forget, forget, W, serve, busy_first, denied, failed, failed],
            &not_open_row("failed"),
            &[W, W, W]),
        // Denied
        cat(&[W, OPEN, forget, forget, OPEN, serve, busy_first, denied, failed, failed],
            &not_open_row("denied"),
            &[W, W, W]),
        // Reopen, ahead
        cat(&[W, W, forget, forget, W, serve, busy_first, denied, failed, failed],
            &not_open_row("reopen"),
            &[W, W, W]),
        // Reopen, due
        cat(&[W, W, forget, forget, W, serve, busy_first, denied, failed, failed],
            &not_open_row("reopen"),
            &[W, OPEN, W]),
    ];

    assert_eq!(expected.len(), states.len());
    for (state, row) in states.iter().zip(&expected) {
        assert_eq!(row.len(), inputs.len(), "row of {state:?}");
        for (input, want) in inputs.iter().zip(row) {
            let want = match *want {
                Stay(action) => Ok(SlotStep { next: *state, action }),
                Go(next, action) => Ok(SlotStep { next, action }),
                Fail(e) => Err(e),
            };
            assert_eq!(state.step(*input, t), want, "state {state:?} input {input:?}");
        }
    }
}

#[test]
fn backoff_doubles_from_100ms_to_5s() {
    let mut d = None;
    let mut seen = vec![];
    for _ in 0..9 {
        let n = next_backoff(d);
        seen.push(n.as_millis());
        d = Some(n);
    }
    assert_eq!(seen, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
}

/// Steps `slot` through `inputs` at `now`, expecting each to be legal; returns the actions.
fn run(slot: &mut Slot, now: Instant, inputs: &[SlotInput]) -> Vec<SlotAction> {
    inputs
        .iter()
        .map(|input| {
            let step = slot.step(*input, now).unwrap_or_else(|e| panic!("{input:?} in {slot:?}: {e}"));
            *slot = step.next;
            step.action
        })
        .collect()
}

#[test]
fn a_busy_port_backs_off_doubling_until_it_opens() {
    let t0 = Instant::now();
    let mut slot = S::Absent;
    assert_eq!(run(&mut slot, t0, &[In::Wanted { retry: false }, In::OpenEnded(O::Busy)]), [A::Open, A::Wait]);
    let mut now = t0;
    for want in [100, 200, 400, 800, 1600, 3200, 5000, 5000] {
        let S::Busy { delay, retry_at } = slot else { panic!("{slot:?}") };
        assert_eq!((delay, retry_at), (ms(want), now + ms(want)));
        assert_eq!(run(&mut slot, retry_at - ms(1), &[In::Tick]), [A::Wait], "not before its deadline");
        now = retry_at;
        assert_eq!(run(&mut slot, now, &[In::Tick, In::OpenEnded(O::Busy)]), [A::Open, A::Wait]);
    }
    assert_eq!(run(&mut slot, now + ms(5000), &[In::Tick, In::OpenEnded(O::Opened)]), [A::Open, A::Serve]);
    assert_eq!(slot, S::Open { serve_again: false });
}

#[test]
fn a_commanded_close_flushes_its_bye_then_reopens_after_the_delay() {
    let t0 = Instant::now();
    let mut slot = S::Open { serve_again: false };
    let pending = In::Served { more_work: true, close: Some(ByeFlush { reopen_after_ms: 1500, written: false }) };
    assert_eq!(run(&mut slot, t0, &[pending, In::Tick, In::ServeTurn]), [A::Wait, A::Wait, A::Serve]);
    assert_eq!(slot.deadline(), Some(t0 + BYE_FLUSH_BOUND), "the flush bound is a timer");
    let written = In::Served { more_work: false, close: Some(ByeFlush { reopen_after_ms: 1500, written: true }) };
    let t1 = t0 + ms(10);
    assert_eq!(run(&mut slot, t1, &[written]), [A::Close(C::Commanded { bye_written: true })]);
    assert_eq!(slot, S::Reopen { at: t1 + ms(1500) });
    assert!(!slot.serve_again(), "a closed port has no work left");
    assert_eq!(run(&mut slot, t1 + ms(1500), &[In::Tick]), [A::Open]);

    // A BYE the host never reads: closed at the flush bound, the timeout said.
    let mut slot = S::Open { serve_again: false };
    run(&mut slot, t0, &[pending]);
    assert_eq!(run(&mut slot, t0 + BYE_FLUSH_BOUND, &[In::Tick]), [A::Close(C::Commanded { bye_written: false })]);
    assert_eq!(slot, S::Reopen { at: t0 + BYE_FLUSH_BOUND + ms(1500) });
}

#[test]
fn a_port_with_work_left_is_served_once_per_turn() {
    let t0 = Instant::now();
    let mut slot = S::Open { serve_again: false };
    assert!(!slot.serve_again());
    run(&mut slot, t0, &[In::Served { more_work: true, close: None }]);
    assert!(slot.serve_again());
    // An event served it in the meantime: its work is still left for the turn.
    run(&mut slot, t0, &[In::Served { more_work: false, close: None }]);
    assert_eq!(run(&mut slot, t0, &[In::ServeTurn, In::ServeTurn]), [A::Serve, A::Wait]);
    run(&mut slot, t0, &[In::WorkQueued]);
    assert_eq!(run(&mut slot, t0, &[In::ServeTurn]), [A::Serve]);
}
