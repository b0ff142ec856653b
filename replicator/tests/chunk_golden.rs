//! Golden cut points: a fastcdc upgrade (or a change of sizes) that moves cut points fails here,
//! because every peer must cut identically and stored manifests would stop matching.

mod common;

use peerfs_replicator::chunk::{self, AVG_SIZE, MAX_SIZE, MIN_SIZE};

fn hex(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn golden_cut_points_of_seeded_mebibyte() {
    assert_eq!((MIN_SIZE, AVG_SIZE, MAX_SIZE), (2048, 8192, 65536));
    let data = common::xorshift_bytes(0x5eed_0001, 1 << 20);
    let chunks = chunk::chunk_reader(&data[..]).expect("chunking a slice cannot fail");
    let cuts: Vec<u64> = chunks.iter().map(|c| c.end()).collect();
    assert_eq!(cuts, GOLDEN_CUTS);
    assert_eq!(hex(&chunks[0].hash), GOLDEN_FIRST);
    assert_eq!(hex(&chunks[chunks.len() - 1].hash), GOLDEN_LAST);
}

/// Receivers cut inline content in memory (`chunk_slice`) and senders cut files as streams
/// (`chunk_reader`): the two must agree on every input, or an inline transfer would never
/// match its content hash.
#[test]
fn slices_and_streams_are_cut_alike() {
    let golden = common::xorshift_bytes(0x5eed_0001, 1 << 20);
    let cuts: Vec<u64> = chunk::chunk_slice(&golden)
        .iter()
        .map(|c| c.end())
        .collect();
    assert_eq!(cuts, GOLDEN_CUTS);
    for seed in 0..200u64 {
        // Sizes around the chunk bounds and beyond, random and repetitive content.
        let len = match seed % 4 {
            0 => (seed * 37) as usize % (MIN_SIZE as usize * 2),
            1 => (seed * 7919) as usize % (MAX_SIZE as usize * 2),
            2 => (seed * 104_729) as usize % (1 << 20),
            _ => MAX_SIZE as usize + (seed as usize % 3) - 1,
        };
        let data = if seed % 5 == 0 {
            vec![seed as u8; len]
        } else {
            common::mixed_bytes(seed, len)
        };
        let stream = chunk::chunk_reader(&data[..]).expect("chunking a slice cannot fail");
        assert_eq!(
            chunk::chunk_slice(&data),
            stream,
            "seed {seed}, {len} bytes"
        );
    }
}

#[test]
fn chunk_sizes_stay_in_bounds_and_hashes_are_blake3() {
    let data = common::mixed_bytes(7, 3 << 20);
    let chunks = chunk::chunk_reader(&data[..]).expect("chunking a slice cannot fail");
    let mut at = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.offset, at);
        assert!(c.len <= MAX_SIZE);
        if i + 1 < chunks.len() {
            assert!(c.len >= MIN_SIZE);
        }
        let s = &data[c.offset as usize..c.end() as usize];
        assert_eq!(c.hash, *blake3::hash(s).as_bytes());
        at = c.end();
    }
    assert_eq!(at, data.len() as u64);
}

// Generated once from fastcdc =5.0.0 (v2020, Normalization::Level1, seed 0).
const GOLDEN_CUTS: &[u64] = &[
    8992, 20958, 41430, 54217, 57612, 63911, 81325, 99731, 109056, 119833, 129863, 138085, 149543,
    155139, 163596, 169152, 180623, 194018, 204312, 215317, 228639, 237654, 241345, 253336, 261016,
    284628, 296213, 306423, 311024, 316077, 321568, 324658, 334293, 356213, 372703, 381539, 386588,
    399296, 406612, 416607, 425025, 427400, 439158, 442754, 453038, 462994, 472776, 483441, 499162,
    501214, 514072, 530549, 539136, 554380, 564994, 576462, 586319, 591914, 594231, 602690, 613679,
    624381, 636348, 655542, 664325, 675138, 677688, 688950, 702136, 706997, 715571, 717796, 730673,
    733117, 740656, 749218, 764119, 776844, 785638, 790395, 798842, 827084, 829937, 832004, 843910,
    853162, 856705, 879949, 892428, 904540, 912122, 922289, 930739, 942933, 952221, 957644, 965945,
    968925, 972594, 995102, 1004903, 1013111, 1024518, 1027715, 1043103, 1048576,
];
const GOLDEN_FIRST: &str = "d2153d27a2db9275341753a1ca32f98631d00ec117df0acdab7c5ec78c009f8f";
const GOLDEN_LAST: &str = "1d549991feec17452f9a6dc87fba2a6f193c5c4ffa3f59490ac438fb5cfc2b9e";
