//! Abuse is bounded, on a real VM: a burst of 1,000 HELLO_REQUESTs, a flood of 5,000 ECHO
//! requests written without reading, a SOURCE over the stream limit, and a 256 MiB SOURCE on
//! one port while another port is used. The agent stays responsive; figures are reported: the time
//! from the HELLO_REQUEST burst to an ECHO answered on a fresh session, the agent's RSS before
//! and after, and the other port's echo round trip during the stream as a ratio to its idle
//! round trip measured in the same run.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vport_common::message::error_code;
use vport_common::pattern::StreamDigest;
use vport_common::Message;
use vport_host::client::AgentClient;
use vport_host::link::{stat, LinkError};
use vport_tests::{TestVm, REPLY_TIMEOUT};

const A: &str = "org.vport.0";
const B: &str = "org.vport.1";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn storms_floods_and_streams_leave_the_agent_responsive_and_small() {
    let mut vm = TestVm::launch(&[A, B]);
    let mut a = vm.connect(A);
    let mut b = vm.connect(B);
    vm.resume();
    vm.handshake(&mut a);
    vm.handshake(&mut b);
    let rss_before = stat(&a.agent_stats(REPLY_TIMEOUT).unwrap(), "rss_kib").unwrap();

    // 1,000 HELLO_REQUESTs in one write, then a fresh session and an ECHO on it.
    let storm: Vec<u8> =
        (0..1000).flat_map(|i| Message::HelloRequest.to_frame(0, i).unwrap().encode().unwrap()).collect();
    let t0 = Instant::now();
    a.stream_mut().write_all(&storm).unwrap();
    let hs = vm.handshake(&mut a);
    assert_eq!(a.echo(b"after the storm", REPLY_TIMEOUT).unwrap(), b"after the storm");
    let storm_to_echo = t0.elapsed();
    let stats = a.agent_stats(REPLY_TIMEOUT).unwrap();
    let rss_storm = stat(&stats, "rss_kib").unwrap();
    eprintln!(
        "e2e: 1000 HELLO_REQUESTs: ECHO answered on a fresh session (0x{:x}) {storm_to_echo:?} after the burst was \
         written; agent rss {rss_before} -> {rss_storm} KiB; sessions {:?}, hello_repeats {:?}",
        hs.session,
        stat(&stats, "sessions"),
        stat(&stats, "hello_repeats")
    );

    // 5,000 ECHO requests of 1 KiB written without reading (the agent's replies back up to
    // its output bound, its reading pauses, QEMU holds the rest): then one marker.
    // Written from a second thread (one write of 5 MB would wait for the replies this thread
    // must read), the marker last.
    let mut flood: Vec<u8> = (0..5000u32)
        .flat_map(|i| Message::Echo(vec![i as u8; 1024]).to_frame(a.session(), 10 + i).unwrap().encode().unwrap())
        .collect();
    flood.extend(Message::Echo(b"after the flood".to_vec()).to_frame(a.session(), 9999).unwrap().encode().unwrap());
    let mut writer = a.stream_mut().try_clone().unwrap();
    let t0 = Instant::now();
    let flooder = std::thread::spawn(move || writer.write_all(&flood));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut replies = 0;
    loop {
        let r =
            a.recv(deadline, "the marker's ECHO_REPLY").unwrap_or_else(|e| panic!("{e}\n{}", vm.rig.failure_context()));
        match r.message {
            Ok(Message::EchoReply(b)) if b == b"after the flood" => break,
            Ok(Message::EchoReply(_)) => replies += 1,
            other => panic!("unexpected {other:?} during the flood"),
        }
    }
    let flood_to_echo = t0.elapsed();
    flooder.join().unwrap().unwrap();
    assert_eq!(replies, 5000, "every flooded ECHO was answered, in order, before the marker");

    // A stream over the limit is refused at once.
    match a.source(1, 1 << 40, 0, REPLY_TIMEOUT) {
        Err(LinkError::Agent { code: error_code::LIMIT, text, .. }) => eprintln!("e2e: 1 TiB SOURCE refused: {text}"),
        other => panic!("a 1 TiB SOURCE must be refused with ERROR limit: {other:?}"),
    }

    // Port B's echo round trip idle, then while port A streams 256 MiB: B's samples are taken
    // from A's first DATA frame until A's stream ends.
    let echo_rtt = |b: &mut vport_host::link::Link<std::os::unix::net::UnixStream>| -> Duration {
        let t = Instant::now();
        b.echo(b"rtt", REPLY_TIMEOUT).unwrap();
        t.elapsed()
    };
    let idle = median((0..20).map(|_| echo_rtt(&mut b)).collect());
    let phase = Arc::new(AtomicU8::new(0)); // 0 before the first DATA, 1 streaming, 2 done
    let flag = phase.clone();
    let mut a_stream = a;
    let streamer = std::thread::spawn(move || {
        a_stream.send(&Message::Source { seed: 3, bytes: 256 << 20, chunk: 0 }).unwrap();
        let (mut bytes, mut digest) = (0u64, StreamDigest::new());
        loop {
            match a_stream.recv(Instant::now() + REPLY_TIMEOUT, "DATA or SOURCE_DONE").unwrap().message {
                Ok(Message::Data { offset, bytes: data }) => {
                    assert_eq!(offset, bytes);
                    flag.store(1, Ordering::SeqCst);
                    bytes += data.len() as u64;
                    digest.update(&data);
                }
                Ok(Message::SourceDone { bytes: total, digest: d }) => {
                    flag.store(2, Ordering::SeqCst);
                    return (a_stream, total == bytes && d == digest.digest(), bytes);
                }
                other => panic!("unexpected {other:?} in the stream"),
            }
        }
    });
    let t0 = Instant::now();
    let mut busy_samples = Vec::new();
    while phase.load(Ordering::SeqCst) < 2 {
        let sample = echo_rtt(&mut b);
        if phase.load(Ordering::SeqCst) == 1 {
            busy_samples.push(sample);
        }
    }
    let stream_time = t0.elapsed();
    let (mut a, verified, streamed) = streamer.join().unwrap();
    assert!(verified, "the stream arrived intact");
    assert!(busy_samples.len() >= 5, "only {} echoes during the stream", busy_samples.len());
    let samples = busy_samples.len();
    let busy = median(busy_samples);
    let stats = a.agent_stats(REPLY_TIMEOUT).unwrap();
    let rss_after = stat(&stats, "rss_kib").unwrap();
    eprintln!(
        "e2e: 5000 ECHOs flooded: all answered and the marker after {flood_to_echo:?}; port B echo rtt median idle {idle:?}, \
         during a 256 MiB SOURCE on port A {busy:?} over {samples} echoes (ratio {:.1}); SOURCE {:.0} MB/s; agent rss \
         {rss_before} -> {rss_after} KiB",
        busy.as_secs_f64() / idle.as_secs_f64(),
        streamed as f64 / stream_time.as_secs_f64() / 1e6
    );
    // Bounded memory: the output queue is bounded (8 MiB) and a stream is generated lazily.
    assert!(rss_after < rss_before + 16 * 1024, "rss grew from {rss_before} to {rss_after} KiB");
}
