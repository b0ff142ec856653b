//! The reconciliation index's rules, free of I/O: version vectors, the digest of an entry,
//! and the decision what to do when a peer's version of a path meets this server's.
//!
//! Every path of the tree has an [`EntryState`] (kind, content hash, mode, [`Version`]);
//! deleted paths keep a tombstone (`Kind::Gone`) with the version that deleted them. The
//! decision is a pure function of the two versions, so every peer that sees the same versions
//! ends with the same tree, whatever order they arrive in:
//!
//! - identical content is never a conflict (the version vectors merge);
//! - a version that descends from the other wins (its vector dominates, or, where the two
//!   vectors share no history, the other's content hash is in its history: ancestry by hash
//!   for trees that met and peers that lost their index);
//! - concurrent versions both survive: the one with the later (time, origin id, hash) keeps the
//!   path, the other becomes `NAME (conflict ORIGIN DATE).EXT`, named from *its* version's
//!   origin and time (never a local clock), so every peer picks the same name;
//! - a deletion wins only over versions it knew (it dominates them); against a concurrent
//!   edit the edit survives.

use std::cmp::Ordering;

use peerfs_proto::PeerId;
use peerfs_proto::msg::{Digest, EntryState, Hash, Kind, MAX_HISTORY, Version};

/// How two version vectors relate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    Equal,
    /// The first is older: the second knows everything it knows and more.
    Before,
    /// The first is newer.
    After,
    Concurrent,
}

/// Compares two sorted version vectors.
pub fn relate(a: &[(PeerId, u64)], b: &[(PeerId, u64)]) -> Relation {
    let (mut less, mut more) = (false, false);
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let (x, y) = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => match x.0.cmp(&y.0) {
                Ordering::Equal => {
                    i += 1;
                    j += 1;
                    (x.1, y.1)
                }
                Ordering::Less => {
                    i += 1;
                    (x.1, 0)
                }
                Ordering::Greater => {
                    j += 1;
                    (0, y.1)
                }
            },
            (Some(x), None) => {
                i += 1;
                (x.1, 0)
            }
            (None, Some(y)) => {
                j += 1;
                (0, y.1)
            }
            (None, None) => break,
        };
        match x.cmp(&y) {
            Ordering::Less => less = true,
            Ordering::Greater => more = true,
            Ordering::Equal => {}
        }
    }
    match (less, more) {
        (false, false) => Relation::Equal,
        (true, false) => Relation::Before,
        (false, true) => Relation::After,
        (true, true) => Relation::Concurrent,
    }
}

/// `a ≤ b`: every change `a` knows, `b` knows too.
pub fn dominated(a: &[(PeerId, u64)], b: &[(PeerId, u64)]) -> bool {
    matches!(relate(a, b), Relation::Equal | Relation::Before)
}

/// The element-wise maximum of two sorted vectors.
pub fn merge(a: &[(PeerId, u64)], b: &[(PeerId, u64)]) -> Vec<(PeerId, u64)> {
    let mut out: Vec<(PeerId, u64)> = Vec::with_capacity(a.len().max(b.len()));
    let (mut i, mut j) = (0, 0);
    loop {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => match x.0.cmp(&y.0) {
                Ordering::Equal => {
                    out.push((x.0, x.1.max(y.1)));
                    i += 1;
                    j += 1;
                }
                Ordering::Less => {
                    out.push(*x);
                    i += 1;
                }
                Ordering::Greater => {
                    out.push(*y);
                    j += 1;
                }
            },
            (Some(x), None) => {
                out.push(*x);
                i += 1;
            }
            (None, Some(y)) => {
                out.push(*y);
                j += 1;
            }
            (None, None) => return out,
        }
    }
}

/// `vv` with `peer`'s counter set to `clock`.
pub fn bump(vv: &[(PeerId, u64)], peer: PeerId, clock: u64) -> Vec<(PeerId, u64)> {
    merge(vv, &[(peer, clock)])
}

/// The largest counter in a version (a Lamport clock never goes below it).
pub fn max_clock(v: &Version) -> u64 {
    v.vv.iter()
        .map(|(_, c)| *c)
        .max()
        .unwrap_or(0)
        .max(v.mclock)
}

/// `history` after a new version replaced content `old`: newest first, bounded.
pub fn push_history(history: &[Hash], old: Hash) -> Vec<Hash> {
    let mut h = Vec::with_capacity(MAX_HISTORY);
    h.push(old);
    h.extend(history.iter().copied().filter(|x| *x != old));
    h.truncate(MAX_HISTORY);
    h
}

/// Whether two states hold the same object (kind and content; versions aside).
pub fn same_content(a: &EntryState, b: &EntryState) -> bool {
    a.kind == b.kind && (a.kind == Kind::Dir || a.kind == Kind::Gone || a.hash == b.hash)
}

/// The digest of a live entry at `path` (tombstones count as nothing). Modes count by their
/// permission bits only: receivers never set setuid/setgid.
pub fn leaf_digest(path: &[u8], e: &EntryState) -> Digest {
    if e.kind == Kind::Gone {
        return [0; 16];
    }
    let mut h = blake3::Hasher::new();
    h.update(&(path.len() as u64).to_le_bytes());
    h.update(path);
    h.update(&[e.kind as u8]);
    if e.kind != Kind::Dir {
        h.update(&e.hash);
    }
    h.update(&(e.mode & 0o777).to_le_bytes());
    let mut d = [0u8; 16];
    d.copy_from_slice(&h.finalize().as_bytes()[..16]);
    d
}

/// The hash that puts a child in a listing bucket ([`peerfs_proto::msg::Bucket`]): the first
/// 8 bytes of blake3 of its name, big-endian. Both peers compute it from the name alone, so
/// they partition a folder's children identically.
pub fn bucket_hash(name: &[u8]) -> u64 {
    let h = blake3::hash(name);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_be_bytes(b)
}

/// XOR of two digests (a folder's digest is the XOR of every entry below it: O(depth) updates).
pub fn xor(a: &Digest, b: &Digest) -> Digest {
    let mut o = [0u8; 16];
    for i in 0..16 {
        o[i] = a[i] ^ b[i];
    }
    o
}

/// Whether live state `e` has changes that version `v` (a removal or a rename made
/// elsewhere) did not know: neither its vector nor its history covers them.
pub fn unknown_to(e: &EntryState, v: &Version) -> bool {
    e.kind != Kind::Gone
        && !dominated(&e.ver.vv, &v.vv)
        && !(matches!(e.kind, Kind::File | Kind::Symlink) && v.history.contains(&e.hash))
}

/// What a receiver does with a peer's version of a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Take the incoming version.
    Apply,
    /// This server already has it (same content): merge the version vectors only.
    Same,
    /// This server's version is newer (the incoming one is an ancestor): keep ours.
    Stale,
    /// Concurrent, and the incoming version wins: ours becomes the conflict copy.
    OursLoses,
    /// Concurrent, and ours wins: the incoming version becomes the conflict copy.
    TheirsLoses,
}

/// Which of two concurrent versions keeps the path: the later (time, origin, hash).
pub fn theirs_wins(ours: &EntryState, theirs: &EntryState) -> bool {
    (theirs.ver.time, theirs.ver.origin, theirs.hash) > (ours.ver.time, ours.ver.origin, ours.hash)
}

/// Whether two version vectors have a peer's change in common (some peer counted in both).
fn share_history(a: &[(PeerId, u64)], b: &[(PeerId, u64)]) -> bool {
    a.iter()
        .filter(|(_, c)| *c > 0)
        .any(|(p, _)| b.iter().any(|(q, d)| q == p && *d > 0))
}

/// Whether `new`'s history bears out what its vector says: that it replaced content `old`.
/// A vector counts a lineage's changes with each server's one clock, so it is only comparable
/// with versions of the same lineage. A rename carries the moved file's vector to a name where
/// another file's versions lived: a file written at that name before the rename's counters, but
/// never seen by the renamer, would look like its ancestor. A real ancestor's content is in the
/// history (every new version of content pushes the content it replaced); a full history may
/// have lost it, and then the vector is trusted. Only contents are checked (folders and
/// tombstones have no content to name).
fn vouched(old: &EntryState, new: &EntryState) -> bool {
    let content = |e: &EntryState| matches!(e.kind, Kind::File | Kind::Symlink);
    !(content(old) && content(new))
        || new.ver.history.contains(&old.hash)
        || new.ver.history.len() >= MAX_HISTORY
}

/// Whether a rename (of version `v`) onto a name knew what this server holds there (`e`):
/// the renamer replaced that content (it is in the rename's history: second, after the
/// content moved, so never cut from a full one), or, for a folder, its vector covers it. The
/// rename's vector belongs to the file it moved (see [`vouched`]), so it says nothing about a
/// file at the target.
pub fn replaced_knowingly(e: &EntryState, v: &Version) -> bool {
    match e.kind {
        Kind::Gone => true,
        Kind::File | Kind::Symlink => v.history.contains(&e.hash),
        Kind::Dir => dominated(&e.ver.vv, &v.vv),
    }
}

/// Whether a rename (of version `v`) moved away what this server holds at its source (`e`):
/// only if its vector covers it. The same content with a vector it does not cover is another
/// lineage that came to the name its own way (e.g. the same file renamed onto that name
/// elsewhere, concurrently): moving it too would leave, on every peer, a tombstone covering
/// both, and the two crossing renames would delete the file from both names. It stays (at
/// worst a duplicate under the other name).
pub fn moved_knowingly(e: &EntryState, v: &Version) -> bool {
    e.kind == Kind::Gone || dominated(&e.ver.vv, &v.vv)
}

/// Decides between this server's state of a path (`None`: never heard of it) and a peer's.
pub fn decide(ours: Option<&EntryState>, theirs: &EntryState) -> Decision {
    let Some(ours) = ours else {
        return if theirs.kind == Kind::Gone {
            Decision::Same
        } else {
            Decision::Apply
        };
    };
    if same_content(ours, theirs) {
        return Decision::Same;
    }
    match relate(&ours.ver.vv, &theirs.ver.vv) {
        Relation::Before if vouched(ours, theirs) => return Decision::Apply,
        Relation::After if vouched(theirs, ours) => return Decision::Stale,
        _ => {}
    }
    // Vectors say concurrent. Where they share no history (two trees that met, whose equal
    // files never merged their vectors), ancestry is judged by content hash: one's content is
    // in the other's history (a deletion's history holds what it deleted). Where they do share
    // history they are right: the same content can come back to a name (renamed away, then
    // back on another peer) concurrently with a version made after it left, and that version
    // does not descend from its return. The delta base of a transfer says nothing about
    // ancestry: a sender may know our content as a conflict copy.
    let known = |e: &EntryState| matches!(e.kind, Kind::File | Kind::Symlink);
    if !share_history(&ours.ver.vv, &theirs.ver.vv) {
        if known(ours) && theirs.ver.history.contains(&ours.hash) {
            return Decision::Apply;
        }
        if known(theirs) && ours.ver.history.contains(&theirs.hash) {
            return Decision::Stale;
        }
    }
    // Deletion against an edit: the edit survives, on both sides.
    match (ours.kind == Kind::Gone, theirs.kind == Kind::Gone) {
        (true, false) => Decision::Apply,
        (false, true) => Decision::Stale,
        _ if ours.kind == Kind::Dir && theirs.kind == Kind::Dir => Decision::Same,
        _ if theirs_wins(ours, theirs) => Decision::OursLoses,
        _ => Decision::TheirsLoses,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u8) -> PeerId {
        PeerId([n; 32])
    }

    fn st(kind: Kind, hash: u8, vv: &[(u8, u64)], time: i64, origin: u8) -> EntryState {
        EntryState {
            kind,
            hash: [hash; 32],
            size: 1,
            mode: 0o644,
            ver: Version {
                vv: vv.iter().map(|(q, c)| (p(*q), *c)).collect(),
                origin: p(origin),
                origin_name: format!("peer-{origin}"),
                time,
                history: Vec::new(),
                mclock: 0,
                mpeer: p(origin),
            },
        }
    }

    #[test]
    fn relations() {
        let a = [(p(1), 2), (p(2), 1)];
        assert_eq!(relate(&a, &a), Relation::Equal);
        assert_eq!(relate(&[(p(1), 1)], &a), Relation::Before);
        assert_eq!(relate(&a, &[(p(1), 1)]), Relation::After);
        assert_eq!(relate(&[(p(1), 3)], &a), Relation::Concurrent);
        assert_eq!(relate(&[], &a), Relation::Before);
        assert_eq!(merge(&[(p(1), 3)], &a), vec![(p(1), 3), (p(2), 1)]);
    }

    #[test]
    fn decisions_are_symmetric() {
        let a = st(Kind::File, 1, &[(1, 2)], 100, 1);
        let b = st(Kind::File, 2, &[(2, 2)], 200, 2);
        // Concurrent: the later one keeps the path on both sides.
        assert_eq!(decide(Some(&a), &b), Decision::OursLoses);
        assert_eq!(decide(Some(&b), &a), Decision::TheirsLoses);
        // Descends.
        let mut a2 = st(Kind::File, 3, &[(1, 3)], 50, 1);
        a2.ver.history = vec![[1; 32]];
        assert_eq!(decide(Some(&a), &a2), Decision::Apply);
        assert_eq!(decide(Some(&a2), &a), Decision::Stale);
        // Same content.
        let a3 = st(Kind::File, 1, &[(2, 9)], 50, 2);
        assert_eq!(decide(Some(&a), &a3), Decision::Same);
    }

    #[test]
    fn delete_versus_edit_keeps_the_edit() {
        let gone = st(Kind::Gone, 0, &[(1, 2), (2, 1)], 100, 1);
        let edit = st(Kind::File, 5, &[(2, 2)], 90, 2);
        assert_eq!(decide(Some(&gone), &edit), Decision::Apply);
        assert_eq!(decide(Some(&edit), &gone), Decision::Stale);
        // A deletion that knew the version wins.
        let old = st(Kind::File, 5, &[(2, 1)], 90, 2);
        assert_eq!(decide(Some(&old), &gone), Decision::Apply);
        assert_eq!(decide(Some(&gone), &old), Decision::Stale);
    }

    #[test]
    fn ancestry_by_hash() {
        let mut newer = st(Kind::File, 2, &[(1, 1)], 10, 1);
        newer.ver.history = vec![[7; 32]];
        let older = st(Kind::File, 7, &[(2, 1)], 5, 2);
        assert_eq!(decide(Some(&older), &newer), Decision::Apply);
        assert_eq!(decide(Some(&newer), &older), Decision::Stale);
    }

    /// Content that comes back to a name (renamed away, then back on another peer) is not an
    /// ancestor of a version made at that name after it left, though that version's history
    /// names it: the vectors share history and say concurrent, so both are kept.
    #[test]
    fn ancestry_by_hash_only_where_vectors_share_no_history() {
        let mut made_after_it_left = st(Kind::File, 2, &[(1, 3), (2, 4)], 10, 2);
        made_after_it_left.ver.history = vec![[7; 32]];
        let came_back = st(Kind::File, 7, &[(1, 3), (3, 4)], 5, 3);
        assert!(matches!(
            decide(Some(&came_back), &made_after_it_left),
            Decision::OursLoses | Decision::TheirsLoses
        ));
        assert!(matches!(
            decide(Some(&made_after_it_left), &came_back),
            Decision::OursLoses | Decision::TheirsLoses
        ));
    }

    /// A rename carries the moved file's vector to the new name. A file written at that name
    /// by a peer the renamer never heard from has lower counters of that peer's one clock, but
    /// is no ancestor: its content is not in the rename's history, so both are kept.
    #[test]
    fn a_vector_whose_history_does_not_bear_it_out_is_concurrent() {
        // p1 wrote e.txt at its clock 1, then b.txt at 2; p2 renamed b.txt onto e.txt unaware.
        let written = st(Kind::File, 42, &[(1, 1)], 10, 1);
        let mut renamed = st(Kind::File, 24, &[(1, 2), (2, 3)], 20, 2);
        renamed.ver.history = vec![[24; 32], [11; 32]];
        assert_eq!(decide(Some(&written), &renamed), Decision::OursLoses);
        assert_eq!(decide(Some(&renamed), &written), Decision::TheirsLoses);
        assert!(!replaced_knowingly(&written, &renamed.ver));
        // The renamer replaced that content: it names it, and the rename wins.
        renamed.ver.history.push([42; 32]);
        assert_eq!(decide(Some(&written), &renamed), Decision::Apply);
        assert_eq!(decide(Some(&renamed), &written), Decision::Stale);
        assert!(replaced_knowingly(&written, &renamed.ver));
        // A full history may have dropped an ancestor: the vector is trusted then.
        let mut long = st(Kind::File, 9, &[(1, 9)], 30, 1);
        long.ver.history = (100..100 + MAX_HISTORY as u8).map(|h| [h; 32]).collect();
        assert_eq!(decide(Some(&written), &long), Decision::Apply);
        assert_eq!(decide(Some(&long), &written), Decision::Stale);
        // ... but not by a rename onto the name: what it replaced is always in its history.
        assert!(!replaced_knowingly(&written, &long.ver));
        // Folders and tombstones have no content: their vectors decide.
        let dir = st(Kind::Dir, 0, &[(1, 1)], 10, 1);
        assert!(replaced_knowingly(&dir, &renamed.ver));
        let gone = st(Kind::Gone, 0, &[(1, 2), (2, 3)], 20, 2);
        assert_eq!(decide(Some(&written), &gone), Decision::Apply);
    }

    #[test]
    fn digests_ignore_versions_and_tombstones() {
        let a = st(Kind::File, 1, &[(1, 2)], 100, 1);
        let b = st(Kind::File, 1, &[(2, 7)], 5, 2);
        assert_eq!(leaf_digest(b"x", &a), leaf_digest(b"x", &b));
        assert_ne!(leaf_digest(b"x", &a), leaf_digest(b"y", &a));
        assert_eq!(leaf_digest(b"x", &st(Kind::Gone, 0, &[], 0, 1)), [0u8; 16]);
    }
}
