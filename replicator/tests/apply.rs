//! The receiver: apply(delta(old, new)) == new byte for byte; any failure leaves the target and
//! the directory as they were.

mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::process::Command;

use peerfs_replicator::apply::{ApplyError, ChunkSource, TMP_PREFIX, VerifiedChunk, apply};
use peerfs_replicator::chunk::Hash;
use peerfs_replicator::delta::Delta;
use peerfs_replicator::manifest::Manifest;
use proptest::prelude::*;

/// Serves chunks of the new version, as the sender would, counting requests.
struct Sender {
    chunks: HashMap<Hash, Vec<u8>>,
    fetches: Vec<Hash>,
    corrupt: bool,
}

impl Sender {
    fn new(bytes: &[u8], m: &Manifest) -> Self {
        let chunks = m
            .chunks()
            .iter()
            .map(|c| (c.hash, bytes[c.offset as usize..c.end() as usize].to_vec()))
            .collect();
        Sender {
            chunks,
            fetches: Vec::new(),
            corrupt: false,
        }
    }
}

impl ChunkSource for Sender {
    fn fetch(&mut self, hash: &Hash, _len: u32) -> io::Result<Vec<u8>> {
        self.fetches.push(*hash);
        let mut data = self
            .chunks
            .get(hash)
            .cloned()
            .ok_or_else(|| io::Error::other("unknown chunk"))?;
        if self.corrupt {
            data[0] ^= 1;
        }
        Ok(data)
    }
}

fn manifest(bytes: &[u8]) -> Manifest {
    Manifest::from_reader(bytes).expect("chunking a slice cannot fail")
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Writes `old` as dir/doc, applies the delta to `new`, returns the outcome and the sender.
fn run(
    dir: &Path,
    old: &[u8],
    new: &[u8],
    corrupt: bool,
) -> (Result<peerfs_replicator::ApplyOutcome, ApplyError>, Sender) {
    let target = dir.join("doc");
    fs::write(&target, old).expect("write old");
    let (old_m, new_m) = (manifest(old), manifest(new));
    let delta = Delta::decode(&Delta::compute(&old_m, &new_m).encode()).expect("delta round trip");
    let mut sender = Sender::new(new, &new_m);
    sender.corrupt = corrupt;
    let base = File::open(&target).expect("open base");
    let r = apply(
        dir,
        OsStr::new("doc"),
        Some(&base),
        &old_m,
        &delta,
        &mut sender,
    );
    (r, sender)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(48), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn apply_of_delta_rebuilds_new_exactly(
        seed in any::<u64>(),
        size in 0usize..300_000,
        at in any::<usize>(),
        cut in 0usize..30_000,
        ins in 0usize..30_000,
    ) {
        let old = common::mixed_bytes(seed, size);
        let at = at % (size + 1);
        let end = (at + cut).min(size);
        let mut new = old[..at].to_vec();
        new.extend_from_slice(&common::xorshift_bytes(seed ^ 3, ins));
        new.extend_from_slice(&old[end..]);
        let dir = tempfile::tempdir().expect("tempdir");
        let (r, sender) = run(dir.path(), &old, &new, false);
        let out = r.expect("apply");
        prop_assert_eq!(fs::read(dir.path().join("doc")).expect("read"), new.clone());
        prop_assert_eq!(&out.manifest, &manifest(&new));
        prop_assert_eq!(names(dir.path()), vec!["doc".to_string()]);
        // Each missing chunk was asked for once.
        let missing = Delta::compute(&manifest(&old), &manifest(&new)).missing();
        prop_assert_eq!(sender.fetches, missing);
        prop_assert_eq!(out.bytes_copied + out.bytes_received <= new.len() as u64, true);
    }
}

#[test]
fn new_file_from_an_empty_base() {
    let dir = tempfile::tempdir().expect("tempdir");
    let new = common::xorshift_bytes(11, 50_000);
    let new_m = manifest(&new);
    let delta = Delta::compute(&Manifest::empty(), &new_m);
    let mut sender = Sender::new(&new, &new_m);
    let out = apply(
        dir.path(),
        OsStr::new("fresh"),
        None,
        &Manifest::empty(),
        &delta,
        &mut sender,
    )
    .expect("apply");
    assert_eq!(fs::read(dir.path().join("fresh")).expect("read"), new);
    assert_eq!(out.bytes_received, 50_000);
}

#[test]
fn corrupted_chunk_is_refused_and_target_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = common::xorshift_bytes(1, 200_000);
    let mut new = old.clone();
    new[100_000..100_010].fill(0);
    let (r, _) = run(dir.path(), &old, &new, true);
    assert!(matches!(r, Err(ApplyError::ChunkMismatch)), "{r:?}");
    assert_eq!(fs::read(dir.path().join("doc")).expect("read"), old);
    assert_eq!(names(dir.path()), vec!["doc".to_string()]);
}

#[test]
fn verified_chunk_only_from_matching_bytes() {
    let data = b"hello".to_vec();
    let hash = *blake3::hash(&data).as_bytes();
    assert_eq!(
        VerifiedChunk::verify(&hash, data.clone())
            .expect("verify")
            .data(),
        &data[..]
    );
    assert!(VerifiedChunk::verify(&[0; 32], data).is_err());
    assert!(VerifiedChunk::verify(&hash, Vec::new()).is_err());
}

#[test]
fn base_that_differs_from_its_manifest_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = common::xorshift_bytes(2, 100_000);
    let mut new = old.clone();
    new.extend_from_slice(b"appended");
    let target = dir.path().join("doc");
    let (old_m, new_m) = (manifest(&old), manifest(&new));
    let mut changed = old.clone();
    changed[10] ^= 1; // written behind the replicator's back
    fs::write(&target, &changed).expect("write");
    let delta = Delta::compute(&old_m, &new_m);
    let base = File::open(&target).expect("open");
    let r = apply(
        dir.path(),
        OsStr::new("doc"),
        Some(&base),
        &old_m,
        &delta,
        &mut Sender::new(&new, &new_m),
    );
    assert!(matches!(r, Err(ApplyError::BaseMismatch(0))), "{r:?}");
    assert_eq!(fs::read(&target).expect("read"), changed);
    assert_eq!(names(dir.path()), vec!["doc".to_string()]);
}

#[test]
fn reserved_and_invalid_names_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Delta::compute(&Manifest::empty(), &Manifest::empty());
    let mut s = Sender::new(&[], &Manifest::empty());
    for name in ["", ".", "..", "a/b", &format!("{TMP_PREFIX}x")] {
        let r = apply(
            dir.path(),
            OsStr::new(name),
            None,
            &Manifest::empty(),
            &d,
            &mut s,
        );
        assert!(matches!(r, Err(ApplyError::BadName)), "{name:?}: {r:?}");
    }
    assert!(names(dir.path()).is_empty());
}

/// Unmounts the tmpfs even when the test fails.
struct Mount<'a>(&'a Path);

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn enospc_leaves_target_intact_and_no_temp_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    }
    let _mount = Mount(dir.path());
    let old = common::xorshift_bytes(3, 100_000);
    let new = common::xorshift_bytes(4, 400_000); // does not fit beside the old version
    let (r, _) = run(dir.path(), &old, &new, false);
    match r {
        Err(ApplyError::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc_enospc()), "{e}"),
        other => panic!("expected ENOSPC, got {other:?}"),
    }
    assert_eq!(fs::read(dir.path().join("doc")).expect("read"), old);
    assert_eq!(names(dir.path()), vec!["doc".to_string()]);
}

fn libc_enospc() -> i32 {
    28 // ENOSPC on Linux
}
