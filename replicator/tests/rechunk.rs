//! O(edit) re-chunking equals a full chunking of the new file, and reads only around the edit.

mod common;

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::ops::Range;

use peerfs_replicator::manifest::{Manifest, Splice, dirty_to_splices, rechunk, rechunk_splices};
use proptest::prelude::*;

fn file_with(bytes: &[u8]) -> File {
    let mut f = tempfile::tempfile().expect("tempfile");
    f.write_all(bytes).expect("write");
    f.seek(SeekFrom::Start(0)).expect("seek");
    f
}

fn full(bytes: &[u8]) -> Manifest {
    Manifest::from_reader(bytes).expect("chunking a slice cannot fail")
}

/// A one-range dirty list.
fn one(r: Range<u64>) -> Vec<Range<u64>> {
    std::iter::once(r).collect()
}

#[derive(Clone, Debug)]
enum Edit {
    Overwrite(usize, usize),
    Insert(usize, usize),
    Delete(usize, usize),
    Append(usize),
    Truncate(usize),
}

/// Applies `edit` to `old`: the new bytes, the exact splice, and the written ranges the drive
/// would have tracked (an insert or delete rewrites the tail through `write`).
fn edit(old: &[u8], e: &Edit, seed: u64) -> (Vec<u8>, Splice, Vec<Range<u64>>) {
    let n = old.len();
    let fresh = |len: usize| common::xorshift_bytes(seed ^ 0xabcd, len);
    match *e {
        Edit::Overwrite(at, len) => {
            let at = at % (n + 1);
            let mut new = old.to_vec();
            let end = (at + len).min(n);
            new[at..end].copy_from_slice(&fresh(end - at));
            let sp = Splice {
                old: at as u64..end as u64,
                new_len: (end - at) as u64,
            };
            (new, sp, one(at as u64..end as u64))
        }
        Edit::Insert(at, len) => {
            let at = at % (n + 1);
            let mut new = old[..at].to_vec();
            new.extend_from_slice(&fresh(len));
            new.extend_from_slice(&old[at..]);
            let dirty = one(at as u64..new.len() as u64);
            let sp = Splice {
                old: at as u64..at as u64,
                new_len: len as u64,
            };
            (new, sp, dirty)
        }
        Edit::Delete(at, len) => {
            let at = at % (n + 1);
            let end = (at + len).min(n);
            let mut new = old[..at].to_vec();
            new.extend_from_slice(&old[end..]);
            let dirty = one(at as u64..new.len() as u64);
            let sp = Splice {
                old: at as u64..end as u64,
                new_len: 0,
            };
            (new, sp, dirty)
        }
        Edit::Append(len) => {
            let mut new = old.to_vec();
            new.extend_from_slice(&fresh(len));
            let sp = Splice {
                old: n as u64..n as u64,
                new_len: len as u64,
            };
            let dirty = one(n as u64..new.len() as u64);
            (new, sp, dirty)
        }
        Edit::Truncate(to) => {
            let to = to % (n + 1);
            let sp = Splice {
                old: to as u64..n as u64,
                new_len: 0,
            };
            (old[..to].to_vec(), sp, vec![])
        }
    }
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1usize..20_000).prop_map(|(a, l)| Edit::Overwrite(a, l)),
        (any::<usize>(), 1usize..20_000).prop_map(|(a, l)| Edit::Insert(a, l)),
        (any::<usize>(), 1usize..20_000).prop_map(|(a, l)| Edit::Delete(a, l)),
        (1usize..100_000).prop_map(Edit::Append),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(96), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn rechunk_equals_full_chunking(
        seed in any::<u64>(),
        size in 0usize..400_000,
        mixed in any::<bool>(),
        e in edit_strategy(),
    ) {
        let old = if mixed { common::mixed_bytes(seed, size) } else { common::xorshift_bytes(seed, size) };
        let old_m = full(&old);
        let (new, splice, dirty) = edit(&old, &e, seed);
        let f = file_with(&new);
        let want = full(&new);
        let by_dirty = rechunk(&old_m, &f, &dirty).expect("rechunk by dirty ranges");
        prop_assert_eq!(&by_dirty, &want);
        let (by_splice, _) = rechunk_splices(&old_m, &f, &[splice]).expect("rechunk by splice");
        prop_assert_eq!(&by_splice, &want);
    }

    #[test]
    fn rechunk_after_several_overwrites(
        seed in any::<u64>(),
        size in 1usize..400_000,
        writes in prop::collection::vec((any::<usize>(), 1usize..9_000), 1..6),
    ) {
        let old = common::mixed_bytes(seed, size);
        let old_m = full(&old);
        let mut new = old.clone();
        let mut dirty = Vec::new();
        for (i, (at, len)) in writes.iter().enumerate() {
            let at = at % size;
            let end = (at + len).min(size);
            new[at..end].copy_from_slice(&common::xorshift_bytes(seed ^ i as u64, end - at));
            dirty.push(at as u64..end as u64);
        }
        let f = file_with(&new);
        prop_assert_eq!(rechunk(&old_m, &f, &dirty).expect("rechunk"), full(&new));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(96), failure_persistence: None, ..ProptestConfig::default() })]

    /// Several splices at once (a delete, an overwrite, an insert, in file order).
    #[test]
    fn rechunk_after_several_splices(
        seed in any::<u64>(),
        size in 3usize..400_000,
        cuts in prop::collection::vec(any::<usize>(), 6),
        ins in 0usize..20_000,
    ) {
        let old = common::mixed_bytes(seed, size);
        let mut pts: Vec<usize> = cuts.iter().map(|c| c % (size + 1)).collect();
        pts.sort_unstable();
        let fresh = |i: u64, n: usize| common::xorshift_bytes(seed ^ i, n);
        // Splice k replaces old[pts[2k]..pts[2k+1]] with: nothing, as many new bytes, `ins` bytes.
        let news = [Vec::new(), fresh(1, pts[3] - pts[2]), fresh(2, ins)];
        let mut new = Vec::new();
        let mut splices = Vec::new();
        let mut at = 0;
        for (k, bytes) in news.iter().enumerate() {
            let (a, b) = (pts[2 * k], pts[2 * k + 1]);
            new.extend_from_slice(&old[at..a]);
            new.extend_from_slice(bytes);
            splices.push(Splice { old: a as u64..b as u64, new_len: bytes.len() as u64 });
            at = b;
        }
        new.extend_from_slice(&old[at..]);
        let f = file_with(&new);
        let (m, _) = rechunk_splices(&full(&old), &f, &splices).expect("rechunk");
        prop_assert_eq!(m, full(&new));
    }
}

#[test]
fn dirty_ranges_become_sorted_merged_splices() {
    let s = dirty_to_splices(100, 120, &[50..60, 10..20, 15..30, 90..110]);
    assert_eq!(
        s,
        vec![
            Splice {
                old: 10..30,
                new_len: 20
            },
            Splice {
                old: 50..60,
                new_len: 10
            },
            Splice {
                old: 90..100,
                new_len: 10
            },
            Splice {
                old: 100..100,
                new_len: 20
            },
        ]
    );
}

#[test]
fn splices_that_do_not_explain_the_size_are_refused() {
    let old = common::xorshift_bytes(1, 10_000);
    let m = full(&old);
    let f = file_with(&old[..5_000]);
    let bad = [Splice {
        old: 0..10,
        new_len: 10,
    }];
    assert!(rechunk_splices(&m, &f, &bad).is_err());
}

/// The cost is O(edit): edits of a 64 MiB file read well under 1 MiB.
#[test]
fn edits_of_a_64_mib_file_read_little() {
    const SIZE: usize = 64 << 20;
    let old = common::xorshift_bytes(42, SIZE);
    let old_m = full(&old);
    let cases: Vec<(Vec<u8>, Splice)> = {
        let mut one = old.clone();
        one[SIZE / 2] ^= 0xff;
        let mut ins = old[..1000].to_vec();
        ins.extend_from_slice(&[7u8; 100]);
        ins.extend_from_slice(&old[1000..]);
        let mut app = old.clone();
        app.extend_from_slice(&common::xorshift_bytes(9, 100_000));
        vec![
            (
                one,
                Splice {
                    old: SIZE as u64 / 2..SIZE as u64 / 2 + 1,
                    new_len: 1,
                },
            ),
            (
                ins,
                Splice {
                    old: 1000..1000,
                    new_len: 100,
                },
            ),
            (
                app,
                Splice {
                    old: SIZE as u64..SIZE as u64,
                    new_len: 100_000,
                },
            ),
            (
                old[..SIZE - (16 << 20)].to_vec(),
                Splice {
                    old: SIZE as u64 - (16 << 20)..SIZE as u64,
                    new_len: 0,
                },
            ),
        ]
    };
    for (new, splice) in cases {
        let f = file_with(&new);
        let (m, stats) =
            rechunk_splices(&old_m, &f, std::slice::from_ref(&splice)).expect("rechunk");
        assert_eq!(m, full(&new), "{splice:?}");
        assert!(
            stats.bytes_read < (1 << 20) - 100_000,
            "{splice:?}: read {} bytes",
            stats.bytes_read
        );
        eprintln!(
            "{splice:?}: read {} bytes, reused {} chunks",
            stats.bytes_read, stats.chunks_reused
        );
    }
}

/// A whole file chunked in memory (small) or streamed (large), whatever the size hint says
/// and even when the hint is stale: the same manifest as a stream chunking of its bytes.
#[test]
fn from_file_equals_a_stream_chunking_at_every_size() {
    for (len, hint) in [
        (0usize, 0u64),
        (1, 1),
        (5_000, 5_000),
        (70_000, 0),
        ((1 << 20) - 1, 1 << 20),
        (1 << 20, 1 << 20),
        ((1 << 20) + 1, 1 << 20),
        (3 << 20, 100),
        (100, 3 << 20),
    ] {
        let bytes = common::mixed_bytes(len as u64, len);
        let f = file_with(&bytes);
        let m = Manifest::from_file(&f, hint).expect("from_file");
        assert_eq!(m, full(&bytes), "{len} bytes, hint {hint}");
    }
}
