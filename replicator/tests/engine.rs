//! The replicator's receiving side fed directly (no network): hostile or inconsistent streams
//! get a refusal and leave the backing folder as it was; a well-formed stream applies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use peerfs_proto::msg::{AckOutcome, ByteBuf, Meta, NsOp, ReplMsg};
use peerfs_proto::{PeerId, RelPath};
use peerfs_replicator::chunk::hash_bytes;
use peerfs_replicator::engine::{Config, Replicator, Transport, TrashFn};
use peerfs_replicator::store::Store;

#[derive(Default)]
struct Recorder(Mutex<Vec<ReplMsg>>);

impl Transport for Recorder {
    fn send(&self, _peer: PeerId, msg: ReplMsg, _bulk: bool) -> bool {
        self.0.lock().push(msg);
        true
    }
}

const PEER: PeerId = PeerId([9; 32]);

struct Fixture {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    backing: std::path::PathBuf,
    repl: Replicator,
    sent: Arc<Recorder>,
}

fn fixture() -> Fixture {
    let f = fixture_with(0);
    f.repl.peer_connected(PEER);
    f
}

/// A replicator over a backing folder holding `files` small files, not connected yet.
fn fixture_with(files: usize) -> Fixture {
    fixture_of(files, false)
}

/// [`fixture_with`]; `owners`: the receiver applies the sender's uid and gid.
fn fixture_of(files: usize, owners: bool) -> Fixture {
    let backing = tempfile::tempdir().expect("tmp");
    for i in 0..files {
        let dir = backing.path().join(format!("pre/{}", i % 50));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(format!("f{i}")), format!("file {i}")).expect("write");
    }
    let state = tempfile::tempdir().expect("tmp");
    let store = Arc::new(Store::open(state.path()).expect("store"));
    let sent = Arc::new(Recorder::default());
    let trash_dir = state.path().join("trash-test");
    let trash: TrashFn = Arc::new(move |root, at, rel, _origin| {
        // A minimal trash for the test: move the object aside by name.
        std::fs::create_dir_all(&trash_dir)?;
        let dest = trash_dir.join(rel.to_string().replace('/', "_"));
        let src = format!(
            "/proc/self/fd/{}/{}",
            std::os::fd::AsRawFd::as_raw_fd(&root),
            at
        );
        std::fs::rename(src, dest)
    });
    let cfg = Config {
        me_name: "b".into(),
        filter: None,
        backing: backing.path().to_path_buf(),
        state: state.path().to_path_buf(),
        me: PeerId([1; 32]),
        peers: vec![(PEER, "peer".into())],
        owners,
        window: 1 << 20,
        hold_removes: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        recon_rounds: peerfs_replicator::engine::RECON_ROUNDS,
        recon_pause: peerfs_replicator::engine::RECON_PAUSE,
    };
    let repl = Replicator::start(cfg, store, sent.clone(), trash).expect("start");
    Fixture {
        backing: backing.path().to_path_buf(),
        _dirs: (backing, state),
        repl,
        sent,
    }
}

impl Fixture {
    /// The rest of transfer `seq`: `content` as one chunk, then its end.
    fn send_whole(&self, seq: u64, content: &[u8]) {
        self.repl.on_message(
            PEER,
            ReplMsg::Data {
                seq,
                hash: Some(hash_bytes(content)),
                bytes: ByteBuf(content.to_vec()),
            },
        );
        self.repl.on_message(PEER, ReplMsg::End { seq });
    }

    /// Waits for the ack of `seq` (bounded).
    fn ack(&self, seq: u64) -> AckOutcome {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(o) = self.sent.0.lock().iter().find_map(|m| match m {
                ReplMsg::Ack {
                    seq: s, outcome, ..
                } if *s == seq => Some(outcome.clone()),
                _ => None,
            }) {
                return o;
            }
            assert!(Instant::now() < deadline, "no ack for {seq}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn path(s: &str) -> RelPath {
    RelPath::new(s.as_bytes()).expect("path")
}

fn meta() -> Meta {
    Meta {
        mode: 0o644,
        mtime_sec: 1_700_000_000,
        ..Meta::default()
    }
}

fn begin(epoch: u64, seq: u64, p: &str, content: &[u8]) -> ReplMsg {
    let m = peerfs_replicator::Manifest::from_reader(content).expect("manifest");
    ReplMsg::Begin {
        epoch,
        seq,
        path: path(p),
        base: None,
        size: content.len() as u64,
        content_hash: *m.content_hash(),
        meta: meta(),
        aligned: false,
        checked: false,
        side: false,
        ver: None,
        inline: None,
    }
}

/// A Begin carrying `content` whole (no pieces, no End follow).
fn begin_inline(epoch: u64, seq: u64, p: &str, content: &[u8]) -> ReplMsg {
    let mut m = begin(epoch, seq, p, content);
    if let ReplMsg::Begin { inline, .. } = &mut m {
        *inline = Some(ByteBuf(content.to_vec()));
    }
    m
}

/// The sender's metadata reaches every built file, also where it equals what a new file gets
/// anyway (the receiver leaves out the changes that already hold).
#[test]
fn a_received_file_gets_the_senders_owner_mode_and_attributes() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: giving files to other owners needs root");
        return;
    }
    let f = fixture_of(0, true);
    f.repl.peer_connected(PEER);
    let attr = (ByteBuf(b"user.office".to_vec()), ByteBuf(b"tokyo".to_vec()));
    // (name, uid, gid, mode, attributes): the receiver creates its files 0600, as root.
    let cases = [
        ("given.txt", 1234, 5678, 0o640, vec![attr.clone()]),
        ("as-new.txt", 0, 0, 0o600, vec![]),
        ("readable.txt", 0, 0, 0o644, vec![]),
        ("group.txt", 0, 4321, 0o600, vec![]),
        ("attr.txt", 0, 0, 0o600, vec![attr.clone()]),
    ];
    for (i, (name, uid, gid, mode, xattrs)) in cases.iter().enumerate() {
        let seq = i as u64 + 1;
        let mut m = begin_inline(1, seq, name, name.as_bytes());
        if let ReplMsg::Begin { meta, .. } = &mut m {
            *meta = Meta {
                mode: *mode,
                uid: *uid,
                gid: *gid,
                mtime_sec: 1_700_000_000 + i as i64,
                mtime_nsec: 0,
                xattrs: xattrs.clone(),
            };
        }
        f.repl.on_message(PEER, m);
        assert_eq!(f.ack(seq), AckOutcome::Applied, "{name}");
    }
    for (i, (name, uid, gid, mode, xattrs)) in cases.iter().enumerate() {
        let p = f.backing.join(name);
        let md = std::fs::symlink_metadata(&p).expect("received");
        assert_eq!(std::fs::read(&p).expect("read"), name.as_bytes(), "{name}");
        assert_eq!((md.uid(), md.gid()), (*uid, *gid), "{name}: owner");
        assert_eq!(md.mode() & 0o7777, *mode, "{name}: mode");
        assert_eq!(md.mtime(), 1_700_000_000 + i as i64, "{name}: mtime");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
        let mut buf = [0u8; 64];
        // SAFETY: valid path and name, buffer of its length.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                c"user.office".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let got = (n >= 0).then(|| buf[..n as usize].to_vec());
        let want = xattrs.first().map(|(_, v)| v.0.clone());
        assert_eq!(got, want, "{name}: attribute");
    }
}

/// A version for a name that had nothing is built without a name and linked into place: a
/// file that appears at the name during the transfer is kept (the transfer is refused for a
/// retry), and neither case leaves an intermediate file behind.
#[test]
fn a_new_name_taken_during_the_transfer_keeps_what_took_it() {
    let f = fixture();
    let theirs = b"the peer's new file".to_vec();
    f.repl.on_message(PEER, begin(1, 0, "d/new.txt", &theirs));
    // A local writer creates the name after the decision saw nothing there: once the
    // receiver holds its unnamed file in `d` (the process's descriptors show it as deleted).
    let building = f.backing.join("d/#");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_dir("/proc/self/fd").expect("fds").any(|e| {
        std::fs::read_link(e.expect("fd").path()).is_ok_and(|l| {
            l.as_os_str()
                .as_encoded_bytes()
                .starts_with(building.as_os_str().as_encoded_bytes())
        })
    }) {
        assert!(Instant::now() < deadline, "the receiver built nothing in d");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::fs::write(f.backing.join("d/new.txt"), b"written here").expect("write");
    f.send_whole(0, &theirs);
    assert!(
        matches!(f.ack(0), AckOutcome::Failed { retry: true, .. }),
        "{:?}",
        f.ack(0)
    );
    assert_eq!(
        std::fs::read(f.backing.join("d/new.txt")).expect("read"),
        b"written here"
    );
    // Another new name goes through, also in a folder that had to be made.
    let other = b"another new file".to_vec();
    f.repl
        .on_message(PEER, begin_inline(1, 1, "d/e/other.txt", &other));
    assert_eq!(f.ack(1), AckOutcome::Applied);
    assert_eq!(
        std::fs::read(f.backing.join("d/e/other.txt")).expect("read"),
        other
    );
    let mut names = Vec::new();
    for dir in ["d", "d/e"] {
        for e in std::fs::read_dir(f.backing.join(dir)).expect("dir") {
            names.push(e.expect("entry").file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    assert_eq!(names, ["e", "new.txt", "other.txt"]);
}

#[test]
fn a_well_formed_stream_applies_and_a_corrupt_chunk_changes_nothing() {
    let f = fixture();
    let content = b"hello, replicated world".to_vec();
    f.repl
        .on_message(PEER, begin(1, 0, "dir/new.txt", &content));
    f.send_whole(0, &content);
    assert_eq!(f.ack(0), AckOutcome::Applied);
    assert_eq!(
        std::fs::read(f.backing.join("dir/new.txt")).expect("read"),
        content
    );

    // A chunk whose bytes do not match its hash: refused, the file stays as it was.
    let other = b"a different version".to_vec();
    f.repl.on_message(PEER, begin(2, 1, "dir/new.txt", &other));
    f.repl.on_message(
        PEER,
        ReplMsg::Data {
            seq: 1,
            hash: Some(hash_bytes(&other)),
            bytes: ByteBuf(b"tampered bytes here".to_vec()),
        },
    );
    f.repl.on_message(PEER, ReplMsg::End { seq: 1 });
    assert!(
        matches!(
            f.ack(1),
            AckOutcome::BaseMismatch { .. } | AckOutcome::Failed { .. }
        ),
        "{:?}",
        f.ack(1)
    );
    assert_eq!(
        std::fs::read(f.backing.join("dir/new.txt")).expect("read"),
        content
    );
    // No intermediate file is left behind.
    let names: Vec<String> = std::fs::read_dir(f.backing.join("dir"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["new.txt".to_string()]);
}

/// A peer that connects during the start scan may send at once: what it sends is applied
/// once the scan is over, even when the scan ends halfway through a transfer (the deferred
/// connection used to reset the receiving side then and drop the transfer's rest: no answer,
/// and a stalled stream).
#[test]
fn a_transfer_begun_during_the_start_scan_is_applied() {
    let f = fixture_with(5000);
    f.repl.peer_connected(PEER);
    let content = b"sent while the scan ran".to_vec();
    f.repl
        .on_message(PEER, begin(1, 0, "during-scan.txt", &content));
    assert!(
        !f.repl.scan_report().done,
        "the scan of 5,000 files ended before the first message: nothing was tested"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f
        .repl
        .stream_states()
        .iter()
        .all(|s| s.contains("connected true"))
    {
        assert!(Instant::now() < deadline, "the scan never ended");
        std::thread::sleep(Duration::from_millis(5));
    }
    f.send_whole(0, &content);
    assert_eq!(f.ack(0), AckOutcome::Applied);
    assert_eq!(
        std::fs::read(f.backing.join("during-scan.txt")).expect("read"),
        content
    );
}

/// A small version travels whole in its Begin: one message is the whole transfer, applied
/// and answered; inline content that is not what the Begin announces, or larger than the
/// maximum, is refused and changes nothing.
#[test]
fn inline_content_applies_alone_and_a_mismatch_changes_nothing() {
    let f = fixture();
    // Several chunks' worth (the receiver cuts them as the sender did), and an empty file.
    let content: Vec<u8> = (0..30_000u32).map(|i| (i * 7 % 251) as u8).collect();
    f.repl
        .on_message(PEER, begin_inline(1, 0, "dir/small.bin", &content));
    f.repl.on_message(PEER, begin_inline(1, 1, "empty", b""));
    assert_eq!(f.ack(0), AckOutcome::Applied);
    assert_eq!(f.ack(1), AckOutcome::Applied);
    assert_eq!(
        std::fs::read(f.backing.join("dir/small.bin")).expect("read"),
        content
    );
    assert_eq!(std::fs::read(f.backing.join("empty")).expect("read"), b"");

    // Inline bytes other than the announced content: refused, nothing appears.
    let mut forged = begin_inline(1, 2, "dir/forged.bin", b"announced");
    if let ReplMsg::Begin { inline, .. } = &mut forged {
        *inline = Some(ByteBuf(b"something else".to_vec()));
    }
    f.repl.on_message(PEER, forged);
    assert!(
        matches!(f.ack(2), AckOutcome::Failed { .. }),
        "{:?}",
        f.ack(2)
    );
    // More than the inline maximum.
    let big = vec![3u8; peerfs_proto::msg::MAX_INLINE + 1];
    // (The refusal halted the stream: the sender restarts it with a new epoch.)
    f.repl.on_message(PEER, begin_inline(2, 3, "big.bin", &big));
    assert!(
        matches!(f.ack(3), AckOutcome::Failed { .. }),
        "{:?}",
        f.ack(3)
    );
    assert_eq!(
        std::fs::read(f.backing.join("dir/small.bin")).expect("read"),
        content
    );
    assert!(!f.backing.join("big.bin").exists());
    let leftovers: Vec<_> = std::fs::read_dir(f.backing.join("dir"))
        .expect("list")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n != "small.bin")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn hostile_copies_and_oversized_data_are_refused() {
    let f = fixture();
    std::fs::write(f.backing.join("base.bin"), vec![7u8; 100_000]).expect("write");
    let base = peerfs_replicator::Manifest::from_reader(&vec![7u8; 100_000][..]).expect("m");
    // A copy far outside the base, with an overflowing length.
    f.repl.on_message(
        PEER,
        ReplMsg::Begin {
            epoch: 1,
            seq: 0,
            path: path("base.bin"),
            base: Some(*base.content_hash()),
            size: 10,
            content_hash: [0; 32],
            meta: meta(),
            aligned: false,
            checked: false,
            side: false,
            ver: None,
            inline: None,
        },
    );
    f.repl.on_message(
        PEER,
        ReplMsg::Copy {
            seq: 0,
            from_offset: u64::MAX - 3,
            len: 100,
        },
    );
    f.repl.on_message(PEER, ReplMsg::End { seq: 0 });
    assert!(
        matches!(f.ack(0), AckOutcome::Failed { .. }),
        "{:?}",
        f.ack(0)
    );
    // A chunk part beyond the 64 KiB maximum.
    f.repl.on_message(PEER, begin(2, 1, "big.bin", &[1u8; 10]));
    f.repl.on_message(
        PEER,
        ReplMsg::Data {
            seq: 1,
            hash: None,
            bytes: ByteBuf(vec![0u8; 70 * 1024]),
        },
    );
    f.repl.on_message(PEER, ReplMsg::End { seq: 1 });
    assert!(
        matches!(f.ack(1), AckOutcome::Failed { .. }),
        "{:?}",
        f.ack(1)
    );
    assert_eq!(
        std::fs::read(f.backing.join("base.bin")).expect("read"),
        vec![7u8; 100_000]
    );
    assert!(!f.backing.join("big.bin").exists());
}

#[test]
fn operations_apply_in_order_and_a_missing_rename_source_asks_for_content() {
    let f = fixture();
    let op = |epoch, seq, op| ReplMsg::Op {
        epoch,
        seq,
        op,
        ver: None,
    };
    f.repl.on_message(
        PEER,
        op(
            1,
            0,
            NsOp::Mkdir {
                path: path("a"),
                meta: Meta {
                    mode: 0o755,
                    ..meta()
                },
            },
        ),
    );
    f.repl.on_message(
        PEER,
        op(
            1,
            1,
            NsOp::Symlink {
                path: path("a/link"),
                target: ByteBuf(b"../../etc/passwd".to_vec()),
                meta: meta(),
            },
        ),
    );
    f.repl.on_message(
        PEER,
        op(
            1,
            2,
            NsOp::Rename {
                from: path("a"),
                to: path("b"),
            },
        ),
    );
    assert_eq!(f.ack(2), AckOutcome::Applied);
    assert!(f.backing.join("b").is_dir());
    // The symlink is stored as data; nothing follows it.
    assert_eq!(
        std::fs::read_link(f.backing.join("b/link")).expect("link"),
        std::path::Path::new("../../etc/passwd")
    );
    // Creating below the symlink must not escape the backing folder.
    f.repl.on_message(PEER, begin(1, 3, "b/link/evil", b"x"));
    f.repl.on_message(PEER, ReplMsg::End { seq: 3 });
    assert!(
        matches!(f.ack(3), AckOutcome::Failed { .. }),
        "{:?}",
        f.ack(3)
    );
    // A rename whose source this server never had asks for the content of the target.
    f.repl.on_message(
        PEER,
        op(
            2,
            4,
            NsOp::Rename {
                from: path("nowhere"),
                to: path("b/x"),
            },
        ),
    );
    assert_eq!(f.ack(4), AckOutcome::NeedContent { path: path("b/x") });
    f.repl.stop();
}
