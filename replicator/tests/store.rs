//! The replicator's durable state against a real sled database in temporary folders.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use peerfs_replicator::store::{
    CACHE_BYTES, ContentVersion, FileId, NewRecord, RecordKind, ScanStamp, Store, StoreError,
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

fn content(file: FileId, n: u64, bytes: u64) -> NewRecord {
    NewRecord {
        file,
        kind: RecordKind::Content,
        base_version: (n > 1).then(|| version(n - 1)),
        version: Some(version(n)),
        fence: Some(n),
        bytes,
    }
}

fn rename(file: FileId, from: &str, to: &str) -> NewRecord {
    NewRecord {
        file,
        kind: RecordKind::Rename {
            from: from.into(),
            to: to.into(),
        },
        base_version: None,
        version: None,
        fence: None,
        bytes: 10,
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir).expect("open store")
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
        let id = store
            .ensure_file_id(Path::new(&format!("doc{i}.docx")))
            .expect("id");
        store
            .enqueue(&PEER_B, content(id, i + 1, 1000 + i))
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
    assert_eq!(recs[4].version, Some(version(5)));
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
    // Sequence numbers continue after the crash too.
    assert_eq!(
        store
            .enqueue(&PEER_B, rename(FileId(1), "a", "b"))
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
            .set_content(id, &version(2), b"manifest-v2")
            .expect("content");
        let stamp = ScanStamp {
            size: 200,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 5,
            inode: 42,
        };
        store.set_stamp(id, stamp).expect("stamp");
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
fn ack_removes_exactly_up_to_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for i in 0..6u64 {
        store
            .enqueue(&PEER_B, content(FileId(i + 1), 1, 10))
            .expect("enqueue");
    }
    store
        .enqueue(&PEER_C, content(FileId(1), 1, 10))
        .expect("enqueue C");
    assert_eq!(store.ack(&PEER_B, 2).expect("ack"), 3);
    let seqs: Vec<u64> = store
        .peek(&PEER_B, 10)
        .expect("peek")
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    // Re-acking, or acking below the head, changes nothing.
    assert_eq!(store.ack(&PEER_B, 2).expect("re-ack"), 0);
    assert_eq!(store.ack(&PEER_B, 0).expect("old ack"), 0);
    assert_eq!(store.len(&PEER_B).expect("len"), 3);
    // Other peers' queues are untouched.
    assert_eq!(store.len(&PEER_C).expect("len C"), 1);
    assert_eq!(store.ack(&PEER_B, u64::MAX).expect("ack all"), 3);
    assert!(store.peek(&PEER_B, 10).expect("peek").is_empty());
    assert_eq!(store.len(&PEER_B).expect("len"), 0);
    // A coalescing index left behind by ack would wrongly swallow this as a replay.
    assert_eq!(
        store
            .enqueue(&PEER_B, content(FileId(1), 1, 10))
            .expect("again"),
        6
    );
}

#[test]
fn newer_content_supersedes_unsent_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let f = FileId(7);
    let s1 = store.enqueue(&PEER_B, content(f, 2, 100)).expect("v2");
    let s2 = store.enqueue(&PEER_B, rename(f, "a", "b")).expect("rename");
    // Replaying the same (file, version) is a no-op.
    assert_eq!(
        store.enqueue(&PEER_B, content(f, 2, 100)).expect("replay"),
        s1
    );
    let s3 = store.enqueue(&PEER_B, content(f, 3, 300)).expect("v3");
    assert!(s3 > s2);
    let recs = store.peek(&PEER_B, 10).expect("peek");
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[0].seq, s2);
    assert!(matches!(recs[0].kind, RecordKind::Rename { .. }));
    assert_eq!(recs[1].seq, s3);
    assert_eq!(recs[1].version, Some(version(3)));
    // The peer still holds v1 (the superseded record's base), not v2.
    assert_eq!(recs[1].base_version, Some(version(1)));
    assert_eq!(store.len(&PEER_B).expect("len"), 2);
    assert_eq!(store.bytes_pending(&PEER_B).expect("bytes"), 310);

    // An ack of the superseded (in-flight) seq must not drop the newer version.
    assert_eq!(store.ack(&PEER_B, s1).expect("ack old"), 0);
    assert_eq!(store.len(&PEER_B).expect("len"), 2);

    // Meta records coalesce by lamport; renames never coalesce.
    let meta = |lamport| NewRecord {
        file: f,
        kind: RecordKind::Meta { lamport },
        base_version: None,
        version: None,
        fence: None,
        bytes: 1,
    };
    store.enqueue(&PEER_B, meta(1)).expect("meta 1");
    store.enqueue(&PEER_B, meta(2)).expect("meta 2");
    store
        .enqueue(&PEER_B, rename(f, "b", "c"))
        .expect("rename 2");
    let kinds: Vec<RecordKind> = store
        .peek(&PEER_B, 10)
        .expect("peek")
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            RecordKind::Rename {
                from: b"a".to_vec(),
                to: b"b".to_vec()
            },
            RecordKind::Content,
            RecordKind::Meta { lamport: 2 },
            RecordKind::Rename {
                from: b"b".to_vec(),
                to: b"c".to_vec()
            },
        ]
    );
}

#[test]
fn bytes_pending_tracks_enqueue_coalesce_and_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        assert_eq!(store.bytes_pending(&PEER_B).expect("empty"), 0);
        store
            .enqueue(&PEER_B, content(FileId(1), 1, 1000))
            .expect("1");
        store
            .enqueue(&PEER_B, content(FileId(2), 1, 2000))
            .expect("2");
        store
            .enqueue(&PEER_C, content(FileId(2), 1, 2000))
            .expect("C");
        assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 3000);
        store
            .enqueue(&PEER_B, content(FileId(1), 2, 500))
            .expect("coalesce");
        assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 2500);
    }
    let store = open(dir.path());
    assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 2500);
    assert_eq!(store.bytes_pending(&PEER_C).expect("c"), 2000);
    store.ack(&PEER_B, 1).expect("ack file 2");
    assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 500);
    store.ack(&PEER_B, u64::MAX).expect("ack all");
    assert_eq!(store.bytes_pending(&PEER_B).expect("b"), 0);
}

#[test]
fn damaged_or_unknown_records_are_errors_not_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store
        .enqueue(&PEER_B, content(FileId(1), 1, 10))
        .expect("1");
    store
        .enqueue(&PEER_B, content(FileId(2), 1, 10))
        .expect("2");
    store
        .enqueue(&PEER_B, content(FileId(3), 1, 10))
        .expect("3");

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
    }
    // Acking the damaged seq skips it; the rest is intact.
    assert_eq!(store.ack(&PEER_B, 0).expect("skip"), 1);
    let files: Vec<u64> = store
        .peek(&PEER_B, 10)
        .expect("peek")
        .iter()
        .map(|r| r.file.0)
        .collect();
    assert_eq!(files, vec![2, 3]);
    assert_eq!(store.len(&PEER_B).expect("len"), 2);
}

// sled's default cache (1 GiB) is resident memory; the peer's budget is 256 MiB.
const _: () = assert!(CACHE_BYTES <= 64 * 1024 * 1024);

#[test]
fn peek_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for i in 0..300u64 {
        store
            .enqueue(&PEER_B, rename(FileId(i), "x", "y"))
            .expect("enqueue");
    }
    let recs = store.peek(&PEER_B, 16).expect("peek");
    assert_eq!(recs.len(), 16);
    assert_eq!(recs.last().map(|r| r.seq), Some(15));
    assert_eq!(store.len(&PEER_B).expect("len"), 300);
}
