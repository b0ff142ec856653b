//! Distributed write locks between real peers on loopback (issue 7): a write-open on one peer
//! takes the name's lock from the others; every write-like operation on that name elsewhere
//! fails at once with ETXTBSY; read-only opens always work; office save sequences keep the
//! document locked from start to end; temp and owner files never lock; concurrent write-opens
//! never both win; a killed holder's locks expire after the grace period; peers with a wrong
//! certificate never connect; the strict policy refuses write-opens while a peer is down.
//!
//! There is no replication yet, so every peer gets the same documents in its backing folder
//! before the drives start ([`PeersOptions::file`]). Releases are asynchronous (last close,
//! then the linger): the tests wait for them, bounded, and never assume `close()` freed a lock.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use peerfs_tests::peers::{Outsider, Peers, PeersOptions};
use peerfs_tests::sys::{self, Time};
use peerfs_tests::{Outcome, fails, outcome};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// Bound for a lock's release to be seen everywhere after the last close.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(15);

fn etxtbsy() -> Outcome<()> {
    fails(libc::ETXTBSY)
}

/// A write-open (O_RDWR) of an existing file.
fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// `open(2)` with raw flags; the outcome without the file.
fn try_open(path: &Path, flags: i32) -> Outcome<()> {
    outcome(sys::open(path, flags, 0o644).map(drop))
}

fn read_all(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

/// Creates (or truncates) `path` with `content` and closes it, asserting success.
#[track_caller]
fn put(path: &Path, content: &[u8]) {
    let mut f = sys::open(path, libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC, 0o644)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(content)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Retries a write-open (O_RDWR) of `name` on peer `i` until it succeeds (bounded).
#[track_caller]
fn wait_write_open(peers: &Peers, i: usize, name: &str) -> File {
    let path = peers.file(i, name);
    peers.wait_until(
        &format!("{} can open {name:?} for writing", peers.name(i)),
        RELEASE_TIMEOUT,
        || open_rw(&path).map_err(|e| format!("open(O_RDWR): {e}")),
    )
}

/// Every write-like operation on `name` from peer `i` must fail with ETXTBSY and leave the
/// name as it was; a read-only open must work. `ctx` says when (for the failure message).
/// The rename onto `name` starts from peer `i`'s own temp file `B1B2C3D4.tmp` (created here
/// when missing; temp names never lock), as another office's Word saving would.
#[track_caller]
fn assert_kept_out(peers: &Peers, i: usize, name: &str, ctx: &str) {
    let p = peers.file(i, name);
    let who = peers.name(i);
    let src = peers.file(i, "B1B2C3D4.tmp");
    if !src.exists() {
        put(&src, b"a save on the other side\n");
    }
    let before = read_all(&p).ok();
    let mut bad = Vec::new();
    let mut check = |what: &str, got: Outcome<()>| {
        if got != etxtbsy() {
            bad.push(format!("{what}: got {got:?}, expected ETXTBSY"));
        }
    };
    check("open(O_RDWR)", try_open(&p, libc::O_RDWR));
    check(
        "rename of its own temp onto the name",
        outcome(fs::rename(&src, &p)),
    );
    check("unlink", outcome(fs::remove_file(&p)));
    let read = outcome(read_all(&p));
    // The holder's save may replicate here meanwhile (that is the point of the lock): the name
    // must then hold the holder's version, never something this peer's refused calls made.
    let replicated = |got: &Vec<u8>| {
        (0..peers.len())
            .filter(|&j| j != i && peers.is_running(j))
            .any(|j| read_all(&peers.file(j, name)).ok().as_ref() == Some(got))
    };
    if let Some(before) = &before {
        if read.as_ref() != Ok(before) && !read.as_ref().is_ok_and(replicated) {
            bad.push(format!(
                "the name's content changed or cannot be read: {read:?} (was {} bytes)",
                before.len()
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{ctx}: {who} must be kept out of {name:?}:\n  {}\n{}",
        bad.join("\n  "),
        peers.logs()
    );
}

/// The lock peer `i` lists on `name`; panics (with what it lists) when there is none.
#[track_caller]
fn lock_listed(peers: &Peers, i: usize, name: &str, ctx: &str) -> peerfs_tests::peers::LockInfo {
    let locks = peers.locks(i);
    locks
        .iter()
        .find(|l| l.path == name)
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{ctx}: `peerfs locks` on {} does not list {name:?}; it lists {locks:?}",
                peers.name(i)
            )
        })
}

/// Waits (bounded) until peer `i` lists a lock on `name` held by peer `holder`. A peer learns
/// of another's lock just after granting it, so right after the holder's open returned the
/// listing may lag for a moment (what it refuses does not: that is asked of the holder).
#[track_caller]
fn wait_lock_listed(
    peers: &Peers,
    i: usize,
    name: &str,
    holder: usize,
    ctx: &str,
) -> peerfs_tests::peers::LockInfo {
    peers.wait_until(
        &format!(
            "{ctx}: {} lists {}'s lock on {name:?}",
            peers.name(i),
            peers.name(holder)
        ),
        Duration::from_secs(5),
        || {
            let locks = peers.try_locks(i)?;
            locks
                .iter()
                .find(|l| l.path == name && l.holder == peers.name(holder))
                .cloned()
                .ok_or_else(|| format!("{locks:?}"))
        },
    )
}

const DOC: &str = "report.docx";
const ORIGINAL: &[u8] = b"the original report\n";

#[test]
fn a_write_open_keeps_every_write_on_the_other_peer_out() {
    let opts = PeersOptions::default().file(DOC, ORIGINAL);
    let timeout = opts.timeout;
    let peers = Peers::start_with(2, opts);
    put(&peers.file(B, "from-b.docx"), b"a document only B has\n");

    let mut held = open_rw(&peers.file(A, DOC)).expect("A opens the document read-write");
    held.write_all(b"edited on A").expect("write on A");

    // What operators see on both sides.
    let on_a = lock_listed(&peers, A, DOC, "A holds the document");
    assert!(on_a.local, "A's own lock must be listed as local: {on_a:?}");
    assert_eq!(on_a.holder, peers.name(A), "holder on A: {on_a:?}");
    assert_eq!(on_a.holder_id, peers.id(A), "holder id on A: {on_a:?}");
    let on_b = wait_lock_listed(&peers, B, DOC, A, "A holds the document");
    assert!(!on_b.local, "A's lock must not be local on B: {on_b:?}");
    assert_eq!(on_b.holder, peers.name(A), "holder on B: {on_b:?}");
    assert_eq!(on_b.holder_id, peers.id(A), "holder id on B: {on_b:?}");

    let doc_b = peers.file(B, DOC);
    let t = Instant::now();
    assert_eq!(
        try_open(&doc_b, libc::O_RDWR),
        etxtbsy(),
        "B's O_RDWR open while A holds the document"
    );
    let took = t.elapsed();
    assert!(
        took < timeout,
        "a held lock must be refused at once, but B's open took {took:?} (the lock round-trip \
         timeout is {timeout:?})"
    );
    let writes: &[(&str, i32)] = &[
        ("O_WRONLY", libc::O_WRONLY),
        ("O_WRONLY|O_TRUNC", libc::O_WRONLY | libc::O_TRUNC),
        ("O_RDWR|O_APPEND", libc::O_RDWR | libc::O_APPEND),
        (
            "O_WRONLY|O_CREAT (existing name)",
            libc::O_WRONLY | libc::O_CREAT,
        ),
        ("O_RDONLY|O_TRUNC", libc::O_RDONLY | libc::O_TRUNC),
    ];
    for (what, flags) in writes {
        assert_eq!(
            try_open(&doc_b, *flags),
            etxtbsy(),
            "B's open({what}) while A holds the document"
        );
    }
    assert_eq!(
        outcome(fs::remove_file(&doc_b)),
        etxtbsy(),
        "B's unlink while A holds the document"
    );
    assert_eq!(
        outcome(fs::rename(&doc_b, peers.file(B, "moved.docx"))),
        etxtbsy(),
        "B's rename of the document away while A holds it"
    );
    assert_eq!(
        outcome(fs::rename(peers.file(B, "from-b.docx"), &doc_b)),
        etxtbsy(),
        "B's rename of another document onto the locked name"
    );
    put(&peers.file(B, "B1B2C3D4.tmp"), b"B's temp\n");
    assert_eq!(
        outcome(fs::rename(peers.file(B, "B1B2C3D4.tmp"), &doc_b)),
        etxtbsy(),
        "B's rename of an (excluded) temp file onto the locked name"
    );
    assert_eq!(
        outcome(sys::truncate(&doc_b, 0)),
        etxtbsy(),
        "B's truncate(2) by path while A holds the document"
    );

    // Read-only opens always work, and nothing above changed B's copy.
    assert_eq!(
        outcome(read_all(&doc_b)),
        Ok(ORIGINAL.to_vec()),
        "B's read-only open and read of the locked document"
    );
    assert_eq!(
        outcome(fs::read(peers.backing_file(B, DOC))),
        Ok(ORIGINAL.to_vec()),
        "B's backing copy must be untouched"
    );
    assert!(
        !peers.backing_file(B, "moved.docx").exists(),
        "the refused rename must not have happened"
    );
    assert!(
        peers.backing_file(B, "from-b.docx").exists(),
        "the refused rename onto the name must have left its source"
    );

    // A name that only A has, created and held by A: B's create of it is refused.
    let created = sys::open(
        peers.file(A, "new.docx"),
        libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
        0o644,
    )
    .expect("A creates new.docx");
    let new_b = peers.file(B, "new.docx");
    assert_eq!(
        try_open(&new_b, libc::O_CREAT | libc::O_RDWR),
        etxtbsy(),
        "B's open(O_CREAT) of a name A created and holds"
    );
    assert_eq!(
        try_open(&new_b, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY),
        etxtbsy(),
        "B's open(O_CREAT|O_EXCL) of a name A created and holds"
    );
    assert!(
        !peers.backing_file(B, "new.docx").exists(),
        "B's refused create must not leave a file"
    );

    // A closes: the locks go (after the linger) and B gets in.
    drop(held);
    drop(created);
    peers.wait_until(
        "A lists no lock after closing everything",
        RELEASE_TIMEOUT,
        || {
            let l = peers.try_locks(A)?;
            if l.is_empty() {
                Ok(())
            } else {
                Err(format!("{l:?}"))
            }
        },
    );
    let b_holds = wait_write_open(&peers, B, DOC);
    let new_b_file = wait_write_open_create(&peers, B, "new.docx");
    let on_a = wait_lock_listed(&peers, A, DOC, B, "B holds the document");
    assert!(!on_a.local, "B's lock must not be local on A: {on_a:?}");
    assert_eq!(
        try_open(&peers.file(A, DOC), libc::O_RDWR),
        etxtbsy(),
        "A's O_RDWR open while B holds the document"
    );
    drop(b_holds);
    drop(new_b_file);
    peers.wait_unlocked(DOC, RELEASE_TIMEOUT);
    peers.wait_unlocked("new.docx", RELEASE_TIMEOUT);
}

/// Retries an `open(O_CREAT|O_RDWR)` of `name` on peer `i` until it succeeds (bounded).
#[track_caller]
fn wait_write_open_create(peers: &Peers, i: usize, name: &str) -> File {
    let path = peers.file(i, name);
    peers.wait_until(
        &format!("{} can create {name:?}", peers.name(i)),
        RELEASE_TIMEOUT,
        || {
            sys::open(&path, libc::O_CREAT | libc::O_RDWR, 0o644)
                .map_err(|e| format!("open(O_CREAT|O_RDWR): {e}"))
        },
    )
}

#[test]
fn three_peers_one_holder_keeps_both_others_out() {
    let peers = Peers::start_with(3, PeersOptions::default().file(DOC, ORIGINAL));
    let held = open_rw(&peers.file(A, DOC)).expect("A opens the document read-write");
    for i in [B, C] {
        assert_kept_out(&peers, i, DOC, "A holds the document (3 peers)");
        let l = wait_lock_listed(&peers, i, DOC, A, "A holds the document (3 peers)");
        assert!(
            !l.local,
            "A's lock is not local on {}: {l:?}",
            peers.name(i)
        );
    }
    drop(held);
    let c_holds = wait_write_open(&peers, C, DOC);
    for i in [A, B] {
        assert_kept_out(&peers, i, DOC, "C took the document over (3 peers)");
    }
    drop(c_holds);
    peers.wait_unlocked(DOC, RELEASE_TIMEOUT);
    let b_holds = wait_write_open(&peers, B, DOC);
    drop(b_holds);
    peers.wait_unlocked(DOC, RELEASE_TIMEOUT);
}

#[test]
fn two_write_handles_on_one_peer_share_the_lock() {
    let opts = PeersOptions::default().file(DOC, ORIGINAL);
    let linger = opts.linger;
    let peers = Peers::start_with(2, opts);
    let h1 = open_rw(&peers.file(A, DOC)).expect("A's first write handle");
    let h2 = sys::open(peers.file(A, DOC), libc::O_WRONLY, 0)
        .expect("A's second write handle (same peer: shares the lock)");
    assert_kept_out(&peers, B, DOC, "A has two write handles");
    drop(h1);
    // A wrong implementation would release at the first close: give it the time to (linger
    // and well beyond) before checking that B is still out.
    std::thread::sleep(linger * 5 + Duration::from_millis(500));
    assert_kept_out(
        &peers,
        B,
        DOC,
        "A closed one of its two write handles (the other still holds the lock)",
    );
    lock_listed(&peers, A, DOC, "A closed one of its two write handles");
    drop(h2);
    let b = wait_write_open(&peers, B, DOC);
    drop(b);
    peers.wait_unlocked(DOC, RELEASE_TIMEOUT);
}

#[test]
fn a_folder_with_a_locked_document_cannot_be_renamed_elsewhere() {
    let opts = PeersOptions::default().file("projects/plan.docx", ORIGINAL);
    let peers = Peers::start_with(2, opts);
    let held = open_rw(&peers.file(A, "projects/plan.docx")).expect("A opens projects/plan.docx");
    assert_eq!(
        outcome(fs::rename(
            peers.file(B, "projects"),
            peers.file(B, "archive")
        )),
        etxtbsy(),
        "B's rename of a folder holding a document A has locked"
    );
    assert!(peers.backing_file(B, "projects/plan.docx").exists());
    assert_kept_out(
        &peers,
        B,
        "projects/plan.docx",
        "A holds projects/plan.docx",
    );
    drop(held);
    peers.wait_unlocked("projects/plan.docx", RELEASE_TIMEOUT);
    assert_eq!(
        outcome(fs::rename(
            peers.file(B, "projects"),
            peers.file(B, "archive")
        )),
        Ok(()),
        "B's rename of the folder once A released the document"
    );
}

/// Runs one step of an application's save on peer A, then checks the document is still A's:
/// B is kept out of it and A still lists the lock as its own.
struct SaveReplay<'a> {
    peers: &'a Peers,
    doc: &'a str,
    app: &'a str,
    step: usize,
}

impl SaveReplay<'_> {
    #[track_caller]
    fn step(&mut self, what: &str, f: impl FnOnce()) {
        self.step += 1;
        f();
        let ctx = format!("{} save, after step {} ({what})", self.app, self.step);
        assert_kept_out(self.peers, B, self.doc, &ctx);
        let locks = self.peers.locks(A);
        let doc = locks.iter().find(|l| l.path == self.doc);
        assert!(
            doc.is_some_and(|l| l.local),
            "{ctx}: A must list its own (local) lock on {:?}; it lists {locks:?}",
            self.doc
        );
        let others: Vec<&str> = locks
            .iter()
            .map(|l| l.path.as_str())
            .filter(|p| *p != self.doc)
            .collect();
        assert!(
            others.is_empty(),
            "{ctx}: temp and owner files must never lock, but A lists locks on {others:?}"
        );
    }
}

#[test]
fn word_save_sequence_keeps_the_document_locked_at_every_step() {
    const DOCX: &str = "Quarterly report.docx";
    const OWNER: &str = "~$arterly report.docx";
    const TEMP: &str = "A1B2C3D4.tmp";
    const WRL: &str = "~WRL0001.tmp";
    let new_version = peerfs_tests::pattern(7, 40_000);
    // The product's default linger (1 s): the checks in the close/reopen gap take a few lock
    // round trips, which a loaded machine can stretch past a test-short linger.
    let opts = PeersOptions {
        linger: Duration::from_secs(1),
        ..PeersOptions::default()
    }
    .file(DOCX, ORIGINAL);
    let peers = Peers::start_with(2, opts);
    let a = |n: &str| peers.file(A, n);
    let mut doc: Option<File> = None;
    let mut owner: Option<File> = None;
    let mut r = SaveReplay {
        peers: &peers,
        doc: DOCX,
        app: "Word",
        step: 0,
    };
    r.step("Word opens the document read-write", || {
        doc = Some(open_rw(&a(DOCX)).expect("open the document O_RDWR"));
    });
    r.step("Word creates the owner file ~$arterly report.docx", || {
        let mut f = sys::open(a(OWNER), libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o644)
            .expect("create the owner file O_EXCL");
        f.write_all(&[b'A'; 162]).expect("write the owner file");
        sys::setxattr(
            a(OWNER),
            "user.DOSATTRIB",
            b"\x00\x00\x04\x00\x04\x00\x00\x00",
            0,
        )
        .expect("set user.DOSATTRIB on the owner file");
        owner = Some(f);
    });
    // B's Word opens the same document: its own owner file is local and never locks.
    let b_owner = sys::open(
        peers.file(B, OWNER),
        libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
        0o644,
    );
    assert!(
        b_owner.is_ok(),
        "B must be able to create its own owner file while A's Word has the document: {:?}",
        b_owner.err()
    );
    r.step(
        "Word writes the new version to A1B2C3D4.tmp (O_EXCL, fsync)",
        || {
            let mut f = sys::open(a(TEMP), libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o644)
                .expect("create the temp O_EXCL");
            f.write_all(&new_version).expect("write the new version");
            sys::fsync(&f, false).expect("fsync the temp");
            sys::close(f).expect("close the temp");
        },
    );
    r.step("Word renames the open document to ~WRL0001.tmp", || {
        fs::rename(a(DOCX), a(WRL)).expect("rename doc -> ~WRL0001.tmp while open");
    });
    r.step("Word renames A1B2C3D4.tmp onto the document's name", || {
        fs::rename(a(TEMP), a(DOCX)).expect("rename temp -> doc");
    });
    r.step("Word sets user.DOSATTRIB and the times", || {
        sys::setxattr(
            a(DOCX),
            "user.DOSATTRIB",
            b"\x00\x00\x04\x00\x04\x00\x20\x00",
            0,
        )
        .expect("set user.DOSATTRIB on the document");
        sys::utimensat(a(DOCX), Time::Now, Time::At(1_700_000_000, 0), false)
            .expect("set the document's times");
    });
    r.step(
        "Word closes the old handle (the gap: no handle open)",
        || {
            sys::close(doc.take().expect("old handle")).expect("close the old handle");
        },
    );
    r.step("Word unlinks ~WRL0001.tmp", || {
        fs::remove_file(a(WRL)).expect("unlink ~WRL0001.tmp");
    });
    r.step("Word opens the document read-write again", || {
        doc = Some(open_rw(&a(DOCX)).expect("reopen the document O_RDWR"));
    });
    assert_eq!(
        outcome(fs::read(a(DOCX))),
        Ok(new_version.clone()),
        "A's document after Word's save"
    );
    // Word closes the document: handle, then owner file.
    drop(doc.take());
    drop(owner.take());
    fs::remove_file(a(OWNER)).expect("unlink the owner file");
    drop(b_owner);
    let b = wait_write_open(&peers, B, DOCX);
    drop(b);
    peers.wait_unlocked(DOCX, RELEASE_TIMEOUT);
}

#[test]
fn libreoffice_save_sequence_keeps_the_document_locked_at_every_step() {
    const ODT: &str = "Budget plan.odt";
    const LOCK: &str = ".~lock.Budget plan.odt#";
    let temp = format!("lu{}g7k2.tmp", std::process::id());
    let new_version = peerfs_tests::pattern(11, 30_000);
    let opts = PeersOptions {
        linger: Duration::from_secs(1),
        ..PeersOptions::default()
    }
    .file(ODT, ORIGINAL);
    let peers = Peers::start_with(2, opts);
    let a = |n: &str| peers.file(A, n);
    let mut doc: Option<File> = None;
    let mut r = SaveReplay {
        peers: &peers,
        doc: ODT,
        app: "LibreOffice",
        step: 0,
    };
    // The lock file comes first; the document is not open yet, so there is no lock to check.
    let mut lock_file = sys::open(
        a(LOCK),
        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
        0o644,
    )
    .expect("create the lock file O_EXCL");
    lock_file
        .write_all(b"A User,alice,office-a,21.11.2026 10:32,file:///home/alice;\n")
        .expect("write the lock file");
    drop(lock_file);
    r.step(
        "LibreOffice opens the document read-write (fcntl lock)",
        || {
            let f = open_rw(&a(ODT)).expect("open the document O_RDWR");
            sys::setlk(&f, libc::F_WRLCK, 0, 0).expect("fcntl(F_SETLK, F_WRLCK) on the document");
            doc = Some(f);
        },
    );
    // B's LibreOffice: its own lock file is local and never locks across peers.
    let b_lock = sys::open(
        peers.file(B, LOCK),
        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
        0o644,
    );
    assert!(
        b_lock.is_ok(),
        "B must be able to create its own .~lock file while A's LibreOffice has the document: \
         {:?}",
        b_lock.err()
    );
    r.step("LibreOffice writes lu<pid><token>.tmp (mode 0600)", || {
        let mut f = sys::open(a(&temp), libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600)
            .expect("create the temp 0600");
        f.write_all(&new_version).expect("write the new version");
        sys::fsync(&f, false).expect("fsync the temp");
        sys::close(f).expect("close the temp");
    });
    r.step("LibreOffice renames the temp over the document", || {
        fs::rename(a(&temp), a(ODT)).expect("rename temp -> doc");
    });
    r.step("LibreOffice restores the document's mode", || {
        sys::chmod(a(ODT), 0o644).expect("chmod the document");
    });
    r.step(
        "LibreOffice closes the old handle (the gap: no handle open)",
        || {
            sys::close(doc.take().expect("old handle")).expect("close the old handle");
        },
    );
    r.step(
        "LibreOffice reopens, fsyncs and closes the document",
        || {
            let f = open_rw(&a(ODT)).expect("reopen for fsync");
            sys::fsync(&f, false).expect("fsync the document");
            sys::close(f).expect("close after fsync");
        },
    );
    r.step("LibreOffice opens the document read-write again", || {
        doc = Some(open_rw(&a(ODT)).expect("reopen the document O_RDWR"));
    });
    assert_eq!(
        outcome(fs::read(a(ODT))),
        Ok(new_version.clone()),
        "A's document after LibreOffice's save"
    );
    drop(doc.take());
    fs::remove_file(a(LOCK)).expect("unlink the lock file");
    drop(b_lock);
    let b = wait_write_open(&peers, B, ODT);
    drop(b);
    peers.wait_unlocked(ODT, RELEASE_TIMEOUT);
}

#[test]
fn temp_and_owner_files_never_lock() {
    const REAL: &str = "real.docx";
    let temps = [
        "~$arterly report.docx",
        "A1B2C3D4.tmp",
        "~WRL0001.tmp",
        ".~lock.Budget plan.odt#",
        "lu4242g7k2.tmp",
        "5EE27100",
        "Budget.xlsx~RF172f241.TMP",
        "~WRD0001.TMP",
    ];
    let peers = Peers::start_with(2, PeersOptions::default().file(REAL, ORIGINAL));
    // A real document too, so an empty lock list proves something.
    let real = open_rw(&peers.file(A, REAL)).expect("A opens a real document");
    let mut held = Vec::new();
    for t in temps {
        let mut f = sys::open(
            peers.file(A, t),
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
            0o644,
        )
        .unwrap_or_else(|e| panic!("A creates {t:?}: {e}"));
        f.write_all(b"A's temp").expect("write A's temp");
        held.push(f);
    }
    for t in temps {
        let got = outcome(
            sys::open(
                peers.file(B, t),
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
                0o644,
            )
            .and_then(|mut f| {
                f.write_all(b"B's temp")?;
                Ok(f)
            }),
        );
        match got {
            Ok(f) => held.push(f),
            Err(e) => panic!(
                "B must create and write its own {t:?} while A holds one of that name (temp \
                 and owner files never lock): {e:?}\n{}",
                peers.logs()
            ),
        }
    }
    // B renames one of its temps onto another temp name that A holds, as a save would.
    put(&peers.file(B, "B1B2C3D4.tmp"), b"B's save");
    assert_eq!(
        outcome(fs::rename(
            peers.file(B, "B1B2C3D4.tmp"),
            peers.file(B, "A1B2C3D4.tmp")
        )),
        Ok(()),
        "B's rename of a temp onto a temp name A holds"
    );
    for i in [A, B] {
        let paths: Vec<String> = peers.locks(i).into_iter().map(|l| l.path).collect();
        assert_eq!(
            paths,
            vec![REAL.to_string()],
            "{} must list the real document's lock and nothing for temp or owner files",
            peers.name(i)
        );
    }
    drop(held);
    drop(real);
    peers.wait_unlocked(REAL, RELEASE_TIMEOUT);
}

/// `rounds` rounds of simultaneous write-opens of one path, one thread per peer in
/// `contenders`, released together by a barrier. Each thread keeps its handle until every
/// thread has tried, so two successes in one round mean two peers held the write lock at the
/// same time. Between rounds, waits until no peer lists the lock any more.
fn race(peers: &Peers, contenders: &[usize], rounds: usize, name: &str) {
    let n = contenders.len();
    let mut winners = vec![0usize; n];
    let mut no_winner = 0usize;
    for round in 0..rounds {
        let start = Arc::new(Barrier::new(n));
        let tried = Arc::new(Barrier::new(n));
        let results: Vec<Outcome<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = contenders
                .iter()
                .map(|&i| {
                    let path = peers.file(i, name);
                    let (start, tried) = (start.clone(), tried.clone());
                    s.spawn(move || {
                        start.wait();
                        let r = open_rw(&path);
                        tried.wait();
                        // The handle (if any) is closed only now, after every thread tried.
                        outcome(r.map(drop))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("racing thread"))
                .collect()
        });
        for (k, r) in results.iter().enumerate() {
            assert!(
                *r == Ok(()) || *r == etxtbsy(),
                "round {round}: {}'s write-open failed with {r:?}, expected success or \
                 ETXTBSY\n{}",
                peers.name(contenders[k]),
                peers.logs()
            );
        }
        let won: Vec<&str> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_ok())
            .map(|(k, _)| peers.name(contenders[k]))
            .collect();
        assert!(
            won.len() <= 1,
            "round {round}: {won:?} all opened {name:?} for writing at the same time\n{}",
            peers.logs()
        );
        match results.iter().position(Result::is_ok) {
            Some(k) => winners[k] += 1,
            None => no_winner += 1,
        }
        peers.wait_unlocked(name, RELEASE_TIMEOUT);
    }
    let summary: Vec<String> = contenders
        .iter()
        .zip(&winners)
        .map(|(&i, w)| format!("{} won {w}", peers.name(i)))
        .collect();
    eprintln!(
        "{rounds} rounds: {}, no winner {no_winner}",
        summary.join(", ")
    );
    assert!(
        winners.iter().sum::<usize>() > 0,
        "no round had a winner in {rounds} rounds of simultaneous write-opens"
    );
}

#[test]
fn simultaneous_write_opens_on_two_peers_never_both_win() {
    const NAME: &str = "contended.docx";
    let opts = PeersOptions {
        linger: Duration::from_millis(50),
        ..PeersOptions::default()
    }
    .file(NAME, ORIGINAL);
    let peers = Peers::start_with(2, opts);
    race(&peers, &[A, B], 200, NAME);
}

#[test]
fn simultaneous_write_opens_on_three_peers_have_at_most_one_winner() {
    const NAME: &str = "contended.xlsx";
    let opts = PeersOptions {
        linger: Duration::from_millis(50),
        ..PeersOptions::default()
    }
    .file(NAME, ORIGINAL);
    let peers = Peers::start_with(3, opts);
    race(&peers, &[A, B, C], 50, NAME);
}

#[test]
fn a_killed_holders_locks_expire_after_the_grace_period() {
    let opts = PeersOptions::default().file(DOC, ORIGINAL);
    let grace = opts.grace;
    let mut peers = Peers::start_with(2, opts);
    let held = open_rw(&peers.file(A, DOC)).expect("A opens the document read-write");
    assert_kept_out(&peers, B, DOC, "A holds the document");

    let killed = Instant::now();
    peers.kill9(A);
    assert_eq!(
        try_open(&peers.file(B, DOC), libc::O_RDWR),
        etxtbsy(),
        "B's write-open right after A's daemon was killed (A's lock lasts the grace period, \
         {grace:?})"
    );
    let b = peers.wait_until(
        "B's write-open succeeds once the killed holder's grace period ran out",
        Duration::from_secs(20),
        || open_rw(&peers.file(B, DOC)).map_err(|e| format!("open(O_RDWR): {e}")),
    );
    let after = killed.elapsed();
    assert!(
        after >= grace / 2,
        "B got the lock {after:?} after the holder was killed, before half the grace period \
         ({grace:?})"
    );
    eprintln!("B got the killed holder's document after {after:?} (grace {grace:?})");
    // A's handle is on a dead mount now.
    drop(held);

    peers.restart(A);
    assert_eq!(
        try_open(&peers.file(A, DOC), libc::O_RDWR),
        etxtbsy(),
        "the restarted A's write-open while B holds the document"
    );
    assert_eq!(
        outcome(read_all(&peers.file(A, DOC))),
        Ok(ORIGINAL.to_vec()),
        "the restarted A's read-only open"
    );
    drop(b);
    let a = wait_write_open(&peers, A, DOC);
    drop(a);
    peers.wait_unlocked(DOC, RELEASE_TIMEOUT);
}

/// Peer C has a certificate the others do not accept (`how`): it must never connect, and
/// locks do not reach across (policy available: neither side blocks the other).
fn outsider_never_connects(how: Outsider) {
    const A_DOC: &str = "held-by-a.docx";
    const C_DOC: &str = "held-by-c.docx";
    let opts = PeersOptions {
        outsiders: vec![(C, how)],
        ..PeersOptions::default()
    }
    .file(A_DOC, ORIGINAL)
    .file(C_DOC, ORIGINAL);
    let watch = (opts.dead_after * 3).max(Duration::from_secs(4));
    let peers = Peers::start_with(3, opts);

    // Watch for a while: C must never show as connected, from either side.
    let until = Instant::now() + watch;
    let mut c_view = Vec::new();
    while Instant::now() < until {
        c_view = peers
            .peer_states(C)
            .unwrap_or_else(|e| panic!("{e}\n{}", peers.logs()));
        assert_eq!(
            c_view.len(),
            2,
            "C's status must list its two configured peers: {c_view:?}"
        );
        assert!(
            c_view.iter().all(|s| !s.connected),
            "C (identity {how:?}) connected: {c_view:?}\n{}",
            peers.logs()
        );
        for i in [A, B] {
            let states = peers
                .peer_states(i)
                .unwrap_or_else(|e| panic!("{e}\n{}", peers.logs()));
            let c = states.iter().find(|s| s.name == peers.name(C));
            match how {
                Outsider::Unlisted => assert!(
                    c.is_none_or(|s| !s.connected),
                    "{} does not list C but shows it: {c:?}",
                    peers.name(i)
                ),
                Outsider::WrongId => assert!(
                    c.is_some_and(|s| !s.connected),
                    "{} lists C with a wrong id and must show it not connected: {c:?}",
                    peers.name(i)
                ),
            }
            let other = if i == A { B } else { A };
            let o = states.iter().find(|s| s.name == peers.name(other));
            assert!(
                o.is_some_and(|s| s.connected),
                "{} must stay connected to {}: {o:?}",
                peers.name(i),
                peers.name(other)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("C's view of its peers ({how:?}): {c_view:?}");

    // A's lock keeps B out but does not reach C; C's lock does not reach A.
    let a_held = open_rw(&peers.file(A, A_DOC)).expect("A opens its document");
    assert_kept_out(&peers, B, A_DOC, "A holds a document");
    let c_held = peers.wait_until(
        "C (not connected, policy available) can open A's locked document for writing",
        Duration::from_secs(10),
        || open_rw(&peers.file(C, A_DOC)).map_err(|e| format!("open(O_RDWR): {e}")),
    );
    let c_own = open_rw(&peers.file(C, C_DOC)).expect("C opens its document");
    assert_eq!(
        outcome(open_rw(&peers.file(A, C_DOC)).map(drop)),
        Ok(()),
        "A's write-open of a document C holds (C is no peer of A's)"
    );
    assert!(
        peers.locks(A).iter().all(|l| l.holder != peers.name(C)),
        "A must not know of C's locks: {:?}",
        peers.locks(A)
    );
    assert!(
        peers.locks(C).iter().all(|l| l.local),
        "C must know of no other peer's locks: {:?}",
        peers.locks(C)
    );
    drop(a_held);
    drop(c_held);
    drop(c_own);
    peers.wait_unlocked(A_DOC, RELEASE_TIMEOUT);
}

#[test]
fn a_peer_whose_identity_is_not_listed_never_connects() {
    outsider_never_connects(Outsider::Unlisted);
}

#[test]
fn a_peer_listed_with_the_wrong_id_never_connects() {
    outsider_never_connects(Outsider::WrongId);
}

#[test]
fn strict_policy_refuses_write_opens_while_a_peer_is_down() {
    const NAME: &str = "strict.docx";
    let opts = PeersOptions {
        policy: Some("strict".into()),
        ..PeersOptions::default()
    }
    .file(NAME, ORIGINAL);
    let mut peers = Peers::start_with(2, opts);
    let a = open_rw(&peers.file(A, NAME)).expect("A's write-open with every peer up");
    drop(a);
    peers.wait_unlocked(NAME, RELEASE_TIMEOUT);

    peers.stop(B);
    peers.wait_until(
        "A shows B as not connected",
        Duration::from_secs(15),
        || match peers.connected(A, B)? {
            false => Ok(()),
            true => Err("connected".into()),
        },
    );
    let doc = peers.file(A, NAME);
    assert_eq!(
        try_open(&doc, libc::O_RDWR),
        etxtbsy(),
        "A's O_RDWR open under the strict policy while B is down"
    );
    assert_eq!(
        try_open(&doc, libc::O_WRONLY | libc::O_TRUNC),
        etxtbsy(),
        "A's O_WRONLY|O_TRUNC open under the strict policy while B is down"
    );
    assert_eq!(
        try_open(&peers.file(A, "new.docx"), libc::O_CREAT | libc::O_RDWR),
        etxtbsy(),
        "A's create under the strict policy while B is down"
    );
    assert_eq!(
        outcome(read_all(&doc)),
        Ok(ORIGINAL.to_vec()),
        "A's read-only open under the strict policy while B is down"
    );
    assert_eq!(
        try_open(
            &peers.file(A, "~$rict.docx"),
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR
        ),
        Ok(()),
        "an owner file never locks, so the strict policy does not apply to it"
    );
    assert_eq!(
        outcome(fs::read(peers.backing_file(A, NAME))),
        Ok(ORIGINAL.to_vec()),
        "the refused O_TRUNC open must not have truncated the document"
    );

    peers.restart(B);
    let a = wait_write_open(&peers, A, NAME);
    drop(a);
    peers.wait_unlocked(NAME, RELEASE_TIMEOUT);
}

#[test]
fn available_policy_allows_write_opens_while_a_peer_is_down() {
    const NAME: &str = "available.docx";
    let mut peers = Peers::start_with(2, PeersOptions::default().file(NAME, ORIGINAL));
    peers.stop(B);
    peers.wait_until(
        "A shows B as not connected",
        Duration::from_secs(15),
        || match peers.connected(A, B)? {
            false => Ok(()),
            true => Err("connected".into()),
        },
    );
    let a = open_rw(&peers.file(A, NAME));
    assert!(
        a.is_ok(),
        "A's write-open under the available policy while B is down: {:?}\n{}",
        a.err(),
        peers.logs()
    );
    let l = lock_listed(&peers, A, NAME, "A holds a document while B is down");
    assert!(l.local, "{l:?}");
}
