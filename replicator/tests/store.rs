//! The replicator's durable state against a real sled database in temporary folders.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use peerfs_replicator::store::{
    CACHE_BYTES, ContentVersion, FileId, NewRecord, QueueRecord, RecordKind, ScanStamp, Store,
    StoreError,
};

const PEER_B: [u8; 32] = [0xb; 32];
const PEER_C: [u8; 32] = [0xc; 32];
const ME: [u8; 32] = [0xa; 32];

fn version(n: u64) -> ContentVersion {
    ContentVersion {
        vv: BTreeMap::from([(ME, n)]),
        hash: [n as u8; 32],
        size: n * 100,
    }
}

/// Everything is unsent: the sender has not taken any record yet.
fn stamp(inode: u64) -> ScanStamp {
    ScanStamp {
        size: 200,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
        inode,
    }
}

const ALL_UNSENT: u64 = 0;

fn content_at(file: FileId, path: &str, bytes: u64) -> NewRecord {
    NewRecord {
        file,
        kind: RecordKind::Content,
        path: path.as_bytes().to_vec(),
        fence: Some(bytes),
        bytes,
    }
}

/// Content of `file` at the path `f<id>` (distinct files, distinct paths).
fn content(file: FileId, bytes: u64) -> NewRecord {
    content_at(file, &format!("f{}", file.0), bytes)
}

fn meta_at(file: FileId, path: &str, bytes: u64) -> NewRecord {
    NewRecord {
        kind: RecordKind::Meta,
        fence: None,
        ..content_at(file, path, bytes)
    }
}

fn op_at(file: FileId, path: &str, op: &[u8], bytes: u64) -> NewRecord {
    NewRecord {
        file,
        kind: RecordKind::Op(op.to_vec()),
        path: path.as_bytes().to_vec(),
        fence: None,
        bytes,
    }
}

fn seqs(recs: &[QueueRecord]) -> Vec<u64> {
    recs.iter().map(|r| r.seq).collect()
}

/// Opens the store; a reopen right after a drop retries briefly: sled's background flusher
/// can hold the database's file lock for a moment after the last handle is gone.
fn open(dir: &Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Ok(s) => return s,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open store: {e}"),
        }
    }
}

const CHILD_ENV: &str = "PEERFS_STORE_CRASH_DIR";

/// Runs only when spawned by `enqueued_records_survive_a_crash`: writes, then dies without any
/// clean shutdown (no destructors, no final flush).
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = open(Path::new(&dir));
    for i in 0..5u64 {
        let path = format!("doc{i}.docx");
        let id = store.ensure_file_id(Path::new(&path)).expect("id");
        store
            .enqueue(&PEER_B, content_at(id, &path, 1000 + i), ALL_UNSENT)
            .expect("enqueue");
    }
    std::process::abort();
}

#[test]
fn enqueued_records_survive_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current exe");
    let status = Command::new(exe)
        .args(["--exact", "crash_child", "--test-threads=1"])
        .stdout(std::process::Stdio::null())
        .env(CHILD_ENV, dir.path())
        .status()
        .expect("spawn crash child");
    assert!(!status.success(), "the child should have aborted: {status}");

    let store = open(dir.path());
    let recs = store.peek(&PEER_B, 100).expect("peek");
    let seen: Vec<(u64, u64, u64)> = recs.iter().map(|r| (r.seq, r.file.0, r.bytes)).collect();
    assert_eq!(
        seen,
        (0..5).map(|i| (i, i + 1, 1000 + i)).collect::<Vec<_>>(),
        "records after the crash"
    );
    assert_eq!(recs[4].kind, RecordKind::Content);
    assert_eq!(recs[4].path, b"doc4.docx".to_vec());
    assert_eq!(recs[4].fence, Some(1004));
    assert_eq!(store.len(&PEER_B).expect("len"), 5);
    assert_eq!(store.bytes_pending(&PEER_B).expect("bytes"), 5010);
    // The ids the queue refers to are still allocated, and never handed out again.
    assert_eq!(
        store.file_id(Path::new("doc4.docx")).expect("lookup"),
        Some(FileId(5))
    );
    assert_eq!(
        store.ensure_file_id(Path::new("new.txt")).expect("id"),
        FileId(6)
    );
    // The coalescing index survived too: the pending record still absorbs a repeat.
    assert_eq!(
        store
            .enqueue(&PEER_B, content_at(FileId(1), "doc0.docx", 7), ALL_UNSENT)
            .expect("repeat"),
        0
    );
    // Sequence numbers continue after the crash.
    assert_eq!(
        store
            .enqueue(&PEER_B, op_at(FileId(1), "b", b"mv a b", 10), ALL_UNSENT)
            .expect("enqueue"),
        5
    );
}

#[test]
fn file_ids_are_monotonic_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        let a = store.ensure_file_id(Path::new("a")).expect("a");
        let b = store.ensure_file_id(Path::new("dir/b")).expect("b");
        assert!(b > a);
        assert_eq!(store.ensure_file_id(Path::new("a")).expect("again"), a);
        assert_eq!(store.remove_path(Path::new("a")).expect("rm"), Some(a));
        assert_eq!(store.file_id(Path::new("a")).expect("lookup"), None);
    }
    let store = open(dir.path());
    // "a" was removed; its id is not reused.
    assert_eq!(store.ensure_file_id(Path::new("a")).expect("a"), FileId(3));
    assert_eq!(
        store.path_of(FileId(2)).expect("path"),
        Some("dir/b".into())
    );
    let all: Vec<_> = store.paths().collect::<Result<_, _>>().expect("paths");
    assert_eq!(
        all,
        vec![("a".into(), FileId(3)), ("dir/b".into(), FileId(2))]
    );
}

#[test]
fn rename_moves_descendants_and_displaces_the_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let d = store.ensure_file_id(Path::new("d")).expect("d");
    let x = store.ensure_file_id(Path::new("d/x")).expect("x");
    let dd = store.ensure_file_id(Path::new("dd")).expect("dd"); // not under d/
    let doc = store.ensure_file_id(Path::new("e/doc")).expect("doc");
    assert_eq!(
        store
            .rename_path(Path::new("d"), Path::new("e/f"))
            .expect("mv"),
        None
    );
    assert_eq!(store.file_id(Path::new("e/f")).expect("f"), Some(d));
    assert_eq!(store.file_id(Path::new("e/f/x")).expect("x"), Some(x));
    assert_eq!(store.file_id(Path::new("d/x")).expect("old"), None);
    assert_eq!(store.path_of(dd).expect("dd"), Some("dd".into()));

    // A temp renamed over the document: the document's id loses its name.
    let tmp = store.ensure_file_id(Path::new("e/tmp")).expect("tmp");
    assert_eq!(
        store
            .rename_path(Path::new("e/tmp"), Path::new("e/doc"))
            .expect("over"),
        Some(doc)
    );
    assert_eq!(store.file_id(Path::new("e/doc")).expect("doc"), Some(tmp));
    assert_eq!(store.path_of(doc).expect("doc path"), None);
}

#[test]
fn file_state_manifests_and_acked_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id;
    {
        let store = open(dir.path());
        id = store.ensure_file_id(Path::new("f")).expect("id");
        assert_eq!(store.file_state(id).expect("state"), None);
        store
            .set_content(id, &version(2), b"manifest-v2", stamp(41), true)
            .expect("content");
        assert_eq!(
            store.file_state(id).expect("state").and_then(|s| s.stamp),
            Some(stamp(41))
        );
        // A later look at the file (the start scan) records its stamp alone.
        store.set_stamp(id, stamp(42)).expect("stamp");
        store
            .set_acked_manifest(&PEER_B, id, b"manifest-v1")
            .expect("acked");
        store.flush().expect("flush");
    }
    let store = open(dir.path());
    let state = store.file_state(id).expect("state").expect("present");
    assert_eq!(state.version, Some(version(2)));
    assert_eq!(state.stamp.map(|s| s.inode), Some(42));
    assert_eq!(
        store.manifest(id).expect("m"),
        Some(b"manifest-v2".to_vec())
    );
    assert_eq!(
        store.acked_manifest(&PEER_B, id).expect("acked"),
        Some(b"manifest-v1".to_vec())
    );
    assert_eq!(store.acked_manifest(&PEER_C, id).expect("other peer"), None);

    store.forget_file(id).expect("forget");
    assert_eq!(store.file_state(id).expect("state"), None);
    assert_eq!(store.manifest(id).expect("m"), None);
    assert_eq!(store.acked_manifest(&PEER_B, id).expect("acked"), None);
    assert_eq!(store.file_id(Path::new("f")).expect("path"), None);
}

#[test]
fn content_is_found_by_hash_only_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let (a, b) = (
        store.ensure_file_id(Path::new("a")).expect("a"),
        store.ensure_file_id(Path::new("b")).expect("b"),
    );
    let (mut va, mut vb) = (version(1), version(1));
    va.hash = [1; 32];
    vb.hash = [2; 32];
    store.set_content(a, &va, b"ma", stamp(1), true).expect("a");
    store
        .set_content(b, &vb, b"mb", stamp(2), false)
        .expect("b");
    assert_eq!(
        store.manifests_for_hash(&[1; 32]).expect("by hash"),
        vec![b"ma".to_vec()]
    );
    assert!(
        store
            .manifests_for_hash(&[2; 32])
            .expect("by hash")
            .is_empty()
    );
    // Not indexed by hash, still the file's current version.
    assert_eq!(store.manifest(b).expect("m"), Some(b"mb".to_vec()));
}

#[test]
fn prev_manifest_keeps_the_version_before_the_current_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (id, other);
    {
        let store = open(dir.path());
        id = store.ensure_file_id(Path::new("f")).expect("id");
        other = store.ensure_file_id(Path::new("g")).expect("other");
        assert_eq!(store.prev_manifest(id).expect("prev"), None);

        // The first version has nothing before it.
        store
            .set_content(id, &version(1), b"m1", stamp(1), true)
            .expect("v1");
        assert_eq!(store.prev_manifest(id).expect("prev"), None);
        assert_eq!(store.manifest(id).expect("m"), Some(b"m1".to_vec()));

        store
            .set_content(id, &version(2), b"m2", stamp(2), true)
            .expect("v2");
        assert_eq!(store.prev_manifest(id).expect("prev"), Some(b"m1".to_vec()));
        assert_eq!(store.manifest(id).expect("m"), Some(b"m2".to_vec()));

        // Recording the same manifest again (a rescan, a replayed update) keeps the real
        // predecessor instead of making the current manifest its own predecessor.
        store
            .set_content(id, &version(2), b"m2", stamp(2), true)
            .expect("v2 again");
        assert_eq!(store.prev_manifest(id).expect("prev"), Some(b"m1".to_vec()));
        assert_eq!(store.manifest(id).expect("m"), Some(b"m2".to_vec()));

        store
            .set_content(id, &version(3), b"m3", stamp(3), true)
            .expect("v3");
        assert_eq!(store.prev_manifest(id).expect("prev"), Some(b"m2".to_vec()));

        // Another file's manifests are its own.
        store
            .set_content(other, &version(1), b"o1", stamp(1), true)
            .expect("other");
        assert_eq!(store.prev_manifest(other).expect("prev other"), None);
        store.flush().expect("flush");
    }
    let store = open(dir.path());
    assert_eq!(store.prev_manifest(id).expect("prev"), Some(b"m2".to_vec()));
    assert_eq!(store.manifest(id).expect("m"), Some(b"m3".to_vec()));
    assert_eq!(
        store.file_state(id).expect("state").and_then(|s| s.version),
        Some(version(3))
    );

    store.forget_file(id).expect("forget");
    assert_eq!(store.prev_manifest(id).expect("prev"), None);
    assert_eq!(store.manifest(other).expect("other"), Some(b"o1".to_vec()));
}

#[test]
fn ack_removes_exactly_up_to_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for i in 0..6u64 {
        store
            .enqueue(&PEER_B, content(FileId(i + 1), 10), ALL_UNSENT)
            .expect("enqueue");
    }
    store
        .enqueue(&PEER_C, content(FileId(1), 10), ALL_UNSENT)
        .expect("enqueue C");
    assert_eq!(store.ack(&PEER_B, 2).expect("ack"), 3);
    assert_eq!(seqs(&store.peek(&PEER_B, 10).expect("peek")), vec![3, 4, 5]);
    // Re-acking, or acking below the head, changes nothing.
    assert_eq!(store.ack(&PEER_B, 2).expect("re-ack"), 0);
    assert_eq!(store.ack(&PEER_B, 0).expect("old ack"), 0);
    assert_eq!(store.len(&PEER_B).expect("len"), 3);
    // Other peers' queues are untouched.
    assert_eq!(store.len(&PEER_C).expect("len C"), 1);
    // An acked record no longer absorbs new changes to its file.
    assert_eq!(
        store
            .enqueue(&PEER_B, content(FileId(3), 10), ALL_UNSENT)
            .expect("after ack"),
        6
    );
    assert_eq!(store.ack(&PEER_B, u64::MAX).expect("ack all"), 4);
    assert!(store.peek(&PEER_B, 10).expect("peek").is_empty());
    assert_eq!(store.len(&PEER_B).expect("len"), 0);
    // A coalescing index left behind by ack must not swallow this as a repeat.
    assert_eq!(
        store
            .enqueue(&PEER_B, content(FileId(1), 10), ALL_UNSENT)
            .expect("again"),
        7
    );
    assert_eq!(store.len(&PEER_B).expect("len"), 1);
}

#[test]
fn unsent_content_and_meta_coalesce_by_file_and_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let (f, g) = (FileId(7), FileId(8));
    let enq = |rec, unsent_from| store.enqueue(&PEER_B, rec, unsent_from).expect("enqueue");

    let s0 = enq(content_at(f, "a", 100), ALL_UNSENT);
    assert_eq!(s0, 0);
    // Same file, same path, still unsent: a no-op returning the pending seq. Content is read
    // at send time, so the pending record already carries the newer change; it is kept as is.
    assert_eq!(enq(content_at(f, "a", 999), ALL_UNSENT), s0);
    let recs = store.peek(&PEER_B, 10).expect("peek");
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!((recs[0].bytes, recs[0].fence), (100, Some(100)));

    // Another file at the same path is a different record.
    let s1 = enq(content_at(g, "a", 10), ALL_UNSENT);
    assert_eq!(s1, 1);
    // Meta does not merge into the same file's pending Content, but it coalesces with itself.
    let s2 = enq(meta_at(f, "a", 1), ALL_UNSENT);
    assert_eq!(s2, 2);
    assert_eq!(enq(meta_at(f, "a", 1), ALL_UNSENT), s2);
    // Content for f still lands on s0 after the unrelated records.
    assert_eq!(enq(content_at(f, "a", 100), ALL_UNSENT), s0);

    // Operations never coalesce, not even identical ones.
    let s3 = enq(op_at(f, "b", b"mv a b", 5), ALL_UNSENT);
    let s4 = enq(op_at(f, "b", b"mv a b", 5), ALL_UNSENT);
    assert_eq!((s3, s4), (3, 4));

    // After the rename the peer knows the file as "b": content at "b" must be a new record
    // after the rename, not folded into s0 (which the peer applies to "a", before it).
    let s5 = enq(content_at(f, "b", 100), ALL_UNSENT);
    assert_eq!(s5, 5);
    assert_eq!(enq(content_at(f, "b", 100), ALL_UNSENT), s5);
    let s6 = enq(meta_at(f, "b", 1), ALL_UNSENT);
    assert_eq!(s6, 6);

    // The sender has taken everything up to s5: a sent record absorbs nothing.
    let s7 = enq(content_at(f, "b", 100), s5 + 1);
    assert_eq!(s7, 7);
    // ...while a record exactly at the unsent mark still does (the bound is inclusive).
    assert_eq!(enq(content_at(f, "b", 100), s7), s7);
    // Meta at s6 is still unsent for a mark of s6, sent for a mark of s6 + 1.
    assert_eq!(enq(meta_at(f, "b", 1), s6), s6);
    let s8 = enq(meta_at(f, "b", 1), s6 + 1);
    assert_eq!(s8, 8);

    let recs = store.peek(&PEER_B, 100).expect("peek");
    assert_eq!(seqs(&recs), (0..=8).collect::<Vec<_>>());
    let shape: Vec<(u64, RecordKind, &[u8])> = recs
        .iter()
        .map(|r| (r.file.0, r.kind.clone(), r.path.as_slice()))
        .collect();
    assert_eq!(
        shape,
        vec![
            (7, RecordKind::Content, &b"a"[..]),
            (8, RecordKind::Content, b"a"),
            (7, RecordKind::Meta, b"a"),
            (7, RecordKind::Op(b"mv a b".to_vec()), b"b"),
            (7, RecordKind::Op(b"mv a b".to_vec()), b"b"),
            (7, RecordKind::Content, b"b"),
            (7, RecordKind::Meta, b"b"),
            (7, RecordKind::Content, b"b"),
            (7, RecordKind::Meta, b"b"),
        ]
    );

    // The peer acks the sent s5: the newer s7 stays pending and keeps absorbing changes.
    assert_eq!(store.ack(&PEER_B, s5).expect("ack"), 6);
    assert_eq!(enq(content_at(f, "b", 100), s5 + 1), s7);
    assert_eq!(seqs(&store.peek(&PEER_B, 10).expect("peek")), vec![6, 7, 8]);

    // Queues are per peer: PEER_C has nothing pending for f, so it gets its own first record.
    assert_eq!(
        store
            .enqueue(&PEER_C, content_at(f, "b", 100), ALL_UNSENT)
            .expect("C"),
        0
    );
    assert_eq!(store.len(&PEER_C).expect("len C"), 1);
    assert_eq!(store.len(&PEER_B).expect("len B"), 3);
}

/// The coalescing index is rebuilt from the queues when the store opens again: pending
/// records keep absorbing changes of their file, acknowledged ones no longer do.
#[test]
fn coalescing_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = FileId(7);
    let enq = |store: &Store, rec| store.enqueue(&PEER_B, rec, ALL_UNSENT).expect("enqueue");
    {
        let store = open(dir.path());
        assert_eq!(enq(&store, content_at(f, "a", 10)), 0);
        assert_eq!(enq(&store, meta_at(f, "a", 1)), 1);
        assert_eq!(enq(&store, content_at(f, "a", 10)), 0);
        store.flush().expect("flush");
    }
    let store = open(dir.path());
    assert_eq!(enq(&store, content_at(f, "a", 10)), 0);
    assert_eq!(enq(&store, meta_at(f, "a", 1)), 1);
    assert_eq!(store.len(&PEER_B).expect("len"), 2);
    assert_eq!(store.ack(&PEER_B, 0).expect("ack"), 1);
    assert_eq!(enq(&store, content_at(f, "a", 10)), 2);
    assert_eq!(enq(&store, meta_at(f, "a", 1)), 1);
}

#[test]
fn bytes_pending_tracks_enqueue_coalesce_and_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        assert_eq!(store.bytes_pending(&PEER_B).expect("empty"), 0);
        let enq = |rec, unsent_from| store.enqueue(&PEER_B, rec, unsent_from).expect("enqueue");
        assert_eq!(enq(content(FileId(1), 1000), ALL_UNSENT), 0);
        assert_eq!(enq(content(FileId(2), 2000), ALL_UNSENT), 1);
        store
            .enqueue(&PEER_C, content(FileId(2), 2000), ALL_UNSENT)
            .expect("C");
        assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 3000);

        // Coalesced: nothing is added, and the pending record's estimate stands.
        assert_eq!(enq(content(FileId(1), 500), ALL_UNSENT), 0);
        assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 3000);
        assert_eq!(store.len(&PEER_B).expect("len"), 2);

        // A different path is a new record and counts.
        assert_eq!(enq(content_at(FileId(1), "renamed", 500), ALL_UNSENT), 2);
        assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 3500);
        // So is content whose pending record was already sent.
        assert_eq!(enq(content(FileId(2), 700), 2), 3);
        assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 4200);
        // Operations always count.
        enq(op_at(FileId(1), "x", b"op", 50), ALL_UNSENT);
        enq(op_at(FileId(1), "x", b"op", 50), ALL_UNSENT);
        assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 4300);
        assert_eq!(store.len(&PEER_B).expect("len"), 6);
    }
    let store = open(dir.path());
    assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 4300);
    assert_eq!(store.len(&PEER_B).expect("len"), 6);
    assert_eq!(store.bytes_pending(&PEER_C).expect("c"), 2000);
    assert_eq!(store.ack(&PEER_B, 1).expect("ack first two"), 2);
    assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 1300);
    assert_eq!(store.ack(&PEER_B, 3).expect("ack two more"), 2);
    assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 100);
    store.ack(&PEER_B, u64::MAX).expect("ack all");
    assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 0);
    assert_eq!(store.bytes_pending(&PEER_C).expect("c"), 2000);
}

#[test]
fn peek_from_starts_at_the_given_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for i in 0..10u64 {
        store
            .enqueue(&PEER_B, op_at(FileId(i), "x", &[i as u8], 1), ALL_UNSENT)
            .expect("enqueue B");
    }
    // PEER_C's keys sort right after PEER_B's: peek_from must not run into them.
    for i in 0..3u64 {
        store
            .enqueue(&PEER_C, op_at(FileId(100 + i), "y", b"c", 1), ALL_UNSENT)
            .expect("enqueue C");
    }
    let peek_from = |peer, from, n| store.peek_from(peer, from, n).expect("peek_from");

    assert_eq!(
        seqs(&peek_from(&PEER_B, 0, 100)),
        (0..10).collect::<Vec<_>>()
    );
    assert_eq!(seqs(&peek_from(&PEER_B, 4, 3)), vec![4, 5, 6]);
    assert_eq!(seqs(&peek_from(&PEER_B, 8, 100)), vec![8, 9]);
    assert!(peek_from(&PEER_B, 10, 100).is_empty());
    assert!(peek_from(&PEER_B, u64::MAX, 100).is_empty());
    assert!(peek_from(&PEER_B, 4, 0).is_empty());
    let rec = &peek_from(&PEER_B, 7, 1)[0];
    assert_eq!(
        (rec.file, &rec.kind, rec.path.as_slice()),
        (FileId(7), &RecordKind::Op(vec![7]), &b"x"[..])
    );
    let c = peek_from(&PEER_C, 0, 100);
    assert_eq!(seqs(&c), vec![0, 1, 2]);
    assert!(c.iter().all(|r| r.file.0 >= 100), "{c:?}");
    assert!(peek_from(&[0xd; 32], 0, 100).is_empty());

    // It does not consume anything, and after an ack a mark below the head starts at the head.
    assert_eq!(store.len(&PEER_B).expect("len"), 10);
    assert_eq!(store.ack(&PEER_B, 5).expect("ack"), 6);
    assert_eq!(seqs(&peek_from(&PEER_B, 0, 2)), vec![6, 7]);
    assert_eq!(
        peek_from(&PEER_B, 3, 100),
        store.peek(&PEER_B, 100).expect("peek")
    );
}

#[test]
fn damaged_or_unknown_records_are_errors_not_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for i in 1..=3 {
        store
            .enqueue(&PEER_B, content(FileId(i), 10), ALL_UNSENT)
            .expect("enqueue");
    }

    // A record from a future build: format version 9.
    store
        .put_raw_queue_record(&PEER_B, 0, &[9, 1, 2, 3])
        .expect("raw");
    match store.peek(&PEER_B, 10) {
        Err(StoreError::QueueRecord { seq: 0, source }) => assert!(
            matches!(*source, StoreError::UnknownVersion { found: 9, .. }),
            "{source}"
        ),
        other => panic!("expected an unknown-version error, got {other:?}"),
    }
    // Garbage with the right version byte, and an empty value.
    for raw in [&[1u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..], &[]] {
        store.put_raw_queue_record(&PEER_B, 0, raw).expect("raw");
        let err = store.peek(&PEER_B, 10).expect_err("corrupt record");
        assert!(
            matches!(&err, StoreError::QueueRecord { seq: 0, source } if matches!(**source, StoreError::Corrupt { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains("queue record 0"), "{err}");
        let err = store.peek_from(&PEER_B, 0, 10).expect_err("peek_from");
        assert!(
            matches!(&err, StoreError::QueueRecord { seq: 0, .. }),
            "{err:?}"
        );
    }
    // Reading past the damaged record works.
    assert_eq!(
        seqs(&store.peek_from(&PEER_B, 1, 10).expect("past it")),
        vec![1, 2]
    );
    // The damaged record was file 1's pending content: it cannot absorb a new change, which
    // must be queued afresh rather than lost.
    assert_eq!(
        store
            .enqueue(&PEER_B, content(FileId(1), 10), ALL_UNSENT)
            .expect("re-enqueue"),
        3
    );
    // Acking the damaged seq skips it; the rest is intact.
    assert_eq!(store.ack(&PEER_B, 0).expect("skip"), 1);
    let files: Vec<u64> = store
        .peek(&PEER_B, 10)
        .expect("peek")
        .iter()
        .map(|r| r.file.0)
        .collect();
    assert_eq!(files, vec![2, 3, 1]);
    assert_eq!(store.len(&PEER_B).expect("len"), 3);
}

// sled's default cache (1 GiB) is resident memory; the peer's budget is 256 MiB.
const _: () = assert!(CACHE_BYTES <= 64 * 1024 * 1024);

#[test]
fn peek_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for i in 0..300u64 {
        store
            .enqueue(&PEER_B, op_at(FileId(i), "y", b"mv x y", 10), ALL_UNSENT)
            .expect("enqueue");
    }
    let recs = store.peek(&PEER_B, 16).expect("peek");
    assert_eq!(recs.len(), 16);
    assert_eq!(recs.last().map(|r| r.seq), Some(15));
    assert_eq!(store.len(&PEER_B).expect("len"), 300);
}

#[test]
fn sent_versions_are_kept_until_acked_then_promoted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let f = FileId(3);
    let (h1, h2, h3) = ([1u8; 32], [2u8; 32], [3u8; 32]);
    store
        .set_sent_manifest(&PEER_B, f, 10, &h1, b"m1")
        .expect("sent 1");
    store
        .set_sent_manifest(&PEER_B, f, 11, &h2, b"m2")
        .expect("sent 2");
    store
        .set_sent_manifest(&PEER_C, f, 4, &h3, b"c3")
        .expect("sent to c");
    // Both versions in flight to B are found by hash; C's are separate.
    assert_eq!(
        store.sent_manifest(&PEER_B, f, &h1).expect("get"),
        Some(b"m1".to_vec())
    );
    assert_eq!(
        store.sent_manifest(&PEER_B, f, &h2).expect("get"),
        Some(b"m2".to_vec())
    );
    assert_eq!(store.sent_manifest(&PEER_B, f, &h3).expect("get"), None);
    // The ack of the first makes it the acked manifest and drops it; the second stays.
    assert!(store.promote_sent(&PEER_B, f, &h1).expect("promote"));
    assert_eq!(
        store.acked_manifest(&PEER_B, f).expect("acked"),
        Some(b"m1".to_vec())
    );
    assert_eq!(store.sent_manifest(&PEER_B, f, &h1).expect("get"), None);
    assert_eq!(
        store.sent_manifest(&PEER_B, f, &h2).expect("get"),
        Some(b"m2".to_vec())
    );
    // The ack of the second wins; an unknown hash promotes nothing.
    assert!(store.promote_sent(&PEER_B, f, &h2).expect("promote"));
    assert_eq!(
        store.acked_manifest(&PEER_B, f).expect("acked"),
        Some(b"m2".to_vec())
    );
    assert!(
        !store
            .promote_sent(&PEER_B, f, &[9; 32])
            .expect("promote unknown")
    );
    assert_eq!(store.acked_manifest(&PEER_C, f).expect("c acked"), None);
    // At most SENT_KEEP versions are kept per file and peer (the oldest go).
    for seq in 0..(peerfs_replicator::store::SENT_KEEP as u64 + 5) {
        let h = [seq as u8 + 100; 32];
        store
            .set_sent_manifest(&PEER_B, f, 100 + seq, &h, b"x")
            .expect("sent");
    }
    assert_eq!(
        store.sent_manifest(&PEER_B, f, &[100; 32]).expect("get"),
        None
    );
    let last = [peerfs_replicator::store::SENT_KEEP as u8 + 104; 32];
    assert!(
        store
            .sent_manifest(&PEER_B, f, &last)
            .expect("get")
            .is_some()
    );
}
