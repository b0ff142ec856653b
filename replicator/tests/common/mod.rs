// Shared helpers for the replicator tests (included with `mod common;`).
#![allow(dead_code)]

/// Deterministic pseudo-random bytes (xorshift64), so golden values never depend on a crate.
pub fn xorshift_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Random data with runs of zeros (which hit the max-size cut) and repeated blocks (which
/// make duplicate chunks), to exercise every way a cut can be decided.
pub fn mixed_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = xorshift_bytes(seed, len);
    let ctl = xorshift_bytes(seed ^ 0x9e37_79b9_7f4a_7c15, 64);
    if len > 200_000 {
        let z = (ctl[0] as usize * 997) % (len - 150_000);
        out[z..z + 140_000].fill(0);
        let a = (ctl[1] as usize * 1013) % (len / 2);
        let n = 20_000.min(len - a).min(len / 4);
        let src = out[a..a + n].to_vec();
        let b = len - n;
        out[b..].copy_from_slice(&src);
    }
    out
}

/// Property-test case count: `default` unless PROPTEST_CASES asks for a longer run.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
