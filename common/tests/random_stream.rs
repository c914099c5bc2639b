//! Acceptance: a 100 MiB random stream with valid frames interleaved decodes to exactly the
//! valid frames, in order, whatever the chunking.

use vport_common::{Decoder, Frame};

/// xorshift64*: a small deterministic generator, so a failure is reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, out: &mut Vec<u8>, n: usize) {
        let start = out.len();
        out.resize(start + n, 0);
        for chunk in out[start..].chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[test]
fn hundred_mib_of_garbage_with_frames_yields_exactly_the_frames() {
    const TOTAL: usize = 100 * 1024 * 1024;
    let seed = 0x5EED_F00D_D00D;
    let mut rng = Rng(seed);
    let mut wire = Vec::with_capacity(TOTAL + 4 * 1024 * 1024);
    let mut expected = Vec::new();
    while wire.len() < TOTAL {
        // Garbage runs of 0..64 KiB, sometimes with a real magic and a torn header inside.
        let n = rng.below(64 * 1024) as usize;
        rng.fill(&mut wire, n);
        if rng.below(4) == 0 {
            wire.extend_from_slice(&vport_common::frame::MAGIC);
            let torn = rng.below(40) as usize;
            rng.fill(&mut wire, torn);
        }
        let mut payload = Vec::new();
        let len = match rng.below(10) {
            0 => 0,
            1..=7 => rng.below(512) as usize,
            _ => rng.below(64 * 1024) as usize,
        };
        rng.fill(&mut payload, len);
        let f = Frame::new(rng.next() as u8, rng.next() as u32, expected.len() as u32, payload);
        f.encode_into(&mut wire).unwrap();
        expected.push(f);
    }

    let mut d = Decoder::default();
    let mut got = Vec::with_capacity(expected.len());
    let mut errors = 0u64;
    let mut pos = 0;
    while pos < wire.len() {
        // Chunks from 1 byte to 128 KiB, as reads from a port would come.
        let n = match rng.below(4) {
            0 => 1 + rng.below(16) as usize,
            _ => 1 + rng.below(128 * 1024) as usize,
        };
        let end = (pos + n).min(wire.len());
        d.push(&wire[pos..end]);
        pos = end;
        for r in d.by_ref() {
            match r {
                Ok(f) => got.push(f),
                Err(_) => errors += 1,
            }
        }
    }
    assert_eq!(got.len(), expected.len(), "seed {seed:#x}: frame count");
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!(g == e, "seed {seed:#x}: frame {i} differs");
    }
    let stats = d.stats();
    assert_eq!(stats.frames, expected.len() as u64);
    assert_eq!(stats.bytes_in, wire.len() as u64);
    eprintln!(
        "{} MiB, {} frames, {} decode errors, {} garbage bytes skipped",
        wire.len() >> 20,
        expected.len(),
        errors,
        stats.skipped_bytes
    );
}
