//! Deltas: compact, coalesced, each missing chunk listed once, and refused when inconsistent.

mod common;

use peerfs_replicator::chunk::{ChunkRef, MAX_SIZE};
use peerfs_replicator::delta::{Delta, Op};
use peerfs_replicator::manifest::Manifest;

/// A synthetic manifest of `size` bytes in 8 KiB chunks with distinct hashes.
fn synthetic(size: u64, salt: u8) -> Vec<ChunkRef> {
    let mut chunks = Vec::new();
    let mut at = 0u64;
    let mut i = 0u64;
    while at < size {
        let len = (size - at).min(8192) as u32;
        let mut hash = [salt; 32];
        hash[..8].copy_from_slice(&i.to_le_bytes());
        chunks.push(ChunkRef {
            offset: at,
            len,
            hash,
        });
        at += u64::from(len);
        i += 1;
    }
    chunks
}

#[test]
fn one_changed_chunk_in_256_mib_is_a_few_hundred_bytes() {
    let base_chunks = synthetic(256 << 20, 0);
    let base = Manifest::from_chunks(base_chunks.clone());
    let mut new_chunks = base_chunks;
    let mid = new_chunks.len() / 2;
    new_chunks[mid].hash = [0xee; 32];
    let new = Manifest::from_chunks(new_chunks);
    let delta = Delta::compute(&base, &new);
    assert_eq!(delta.ops.len(), 3, "{:?}", delta.ops);
    let bytes = delta.encode();
    assert!(bytes.len() < 300, "delta is {} bytes", bytes.len());
    assert!(base.encode().len() > 100 * bytes.len());
    assert_eq!(delta.missing(), vec![[0xee; 32]]);
    let decoded = Delta::decode(&bytes).expect("decode");
    assert_eq!(decoded, delta);
    assert_eq!(decoded.resolve(&base).expect("resolve").manifest, new);
}

#[test]
fn repeated_missing_chunks_are_listed_once_and_copies_coalesce() {
    let base = Manifest::from_chunks(synthetic(80_000, 1));
    let mut chunks: Vec<ChunkRef> = Vec::new();
    let extra = ChunkRef {
        offset: 0,
        len: 100,
        hash: [9; 32],
    };
    for c in base
        .chunks()
        .iter()
        .take(3)
        .chain([&extra, &extra])
        .chain(base.chunks()[5..].iter())
    {
        let offset = chunks.last().map_or(0, ChunkRef::end);
        chunks.push(ChunkRef { offset, ..*c });
    }
    let new = Manifest::from_chunks(chunks);
    let d = Delta::compute(&base, &new);
    assert_eq!(
        d.ops,
        vec![
            Op::Copy {
                from_offset: 0,
                len: 3 * 8192
            },
            Op::Data {
                hash: [9; 32],
                len: 100
            },
            Op::Data {
                hash: [9; 32],
                len: 100
            },
            Op::Copy {
                from_offset: 5 * 8192,
                len: 80_000 - 5 * 8192
            },
        ]
    );
    assert_eq!(d.missing(), vec![[9; 32]]);
    assert_eq!(d.resolve(&base).expect("resolve").manifest, new);
}

#[test]
fn inconsistent_deltas_are_refused() {
    let base = Manifest::from_chunks(synthetic(50_000, 2));
    let new = Manifest::from_chunks(synthetic(60_000, 3));
    let good = Delta::compute(&base, &new);
    assert!(good.resolve(&base).is_ok());

    let mut bad = good.clone();
    bad.content_hash[0] ^= 1;
    assert!(bad.resolve(&base).is_err(), "wrong content hash");

    let mut bad = good.clone();
    bad.size += 1;
    assert!(bad.resolve(&base).is_err(), "wrong size");

    let over = Delta {
        size: 1 << 40,
        content_hash: [0; 32],
        ops: vec![Op::Data {
            hash: [1; 32],
            len: MAX_SIZE + 1,
        }],
    };
    assert!(over.resolve(&base).is_err(), "oversized chunk");

    let misaligned = Delta {
        size: 10,
        content_hash: [0; 32],
        ops: vec![Op::Copy {
            from_offset: 1,
            len: 10,
        }],
    };
    assert!(
        misaligned.resolve(&base).is_err(),
        "copy not on a chunk boundary"
    );

    let past = Delta {
        size: 1 << 20,
        content_hash: [0; 32],
        ops: vec![Op::Copy {
            from_offset: 0,
            len: 1 << 20,
        }],
    };
    assert!(past.resolve(&base).is_err(), "copy past the base");

    assert!(Delta::decode(&[0xff, 0xff, 0xff]).is_err());
}

#[test]
fn manifest_decode_validates() {
    let m = Manifest::from_reader(&common::xorshift_bytes(5, 100_000)[..]).expect("chunk");
    let bytes = m.encode();
    assert_eq!(Manifest::decode(&bytes).expect("decode"), m);
    // Flip every byte in turn: decoding never panics, and anything accepted is the original
    // (or an equivalent re-encoding, which the content hash makes impossible here).
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x41;
        if let Ok(d) = Manifest::decode(&b) {
            assert_eq!(d, m, "corruption at byte {i} accepted");
        }
    }
    assert!(Manifest::decode(&bytes[..bytes.len() - 1]).is_err());
}
