//! Real applications' save sequences (shared/OFFICE-SAVES.md), replayed on peer A with their
//! real names while the other peers watch: every saved version reaches them while A's
//! application still has the document open; they never list a temp or owner file and never
//! lose the document from their listing, not even for a moment; they can read only whole
//! versions; their write-opens fail with ETXTBSY while A's application session holds the
//! document and succeed once it closed everything.
//!
//! Each watching peer runs a background thread that lists the document's folder (and reads the
//! document) every few milliseconds for the whole sequence and records anything it must never
//! see, with the step of the sequence it was seen in. Waits are bounded polls; nothing sleeps a
//! fixed time to let replication happen.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use peerfs_tests::peers::{Peers, PeersOptions, poll_until};
use peerfs_tests::sys::{self, Time};
use peerfs_tests::{first_difference, pattern};

const A: usize = 0;
const B: usize = 1;

/// Bound for a change to reach a connected peer, and for a lock's release to be seen.
const SYNC: Duration = Duration::from_secs(20);

/// How often a watcher lists the folder.
const WATCH_EVERY: Duration = Duration::from_millis(3);
/// Fewer looks than this and a watcher did not really watch.
const MIN_LISTINGS: u64 = 10;

/// Peers with the product's default linger (1 s): the checks between the steps of a save take
/// a few lock round trips, which a loaded machine can stretch past a test-short linger.
fn options() -> PeersOptions {
    PeersOptions {
        linger: Duration::from_secs(1),
        ..PeersOptions::default()
    }
}

fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    File::open(path)?.read_to_end(&mut v)?;
    Ok(v)
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// `open(O_CREAT|O_EXCL|O_RDWR, mode)`, as every application creates its temps.
#[track_caller]
fn create_excl(path: &Path, mode: u32) -> File {
    sys::open(path, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, mode)
        .unwrap_or_else(|e| panic!("create {} O_EXCL: {e}", path.display()))
}

/// Creates `path` O_EXCL with `content`, fsyncs and closes it.
#[track_caller]
fn write_new(path: &Path, content: &[u8], mode: u32) {
    let mut f = create_excl(path, mode);
    f.write_all(content)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    sys::fsync(&f, false).unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    sys::close(f).unwrap_or_else(|e| panic!("close {}: {e}", path.display()));
}

#[track_caller]
fn ok<T>(r: io::Result<T>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Asserts `r` failed with `errno`.
#[track_caller]
fn fails_with<T: std::fmt::Debug>(r: io::Result<T>, errno: i32, what: &str) {
    match r {
        Err(e) if e.raw_os_error() == Some(errno) => {}
        other => panic!("{what}: expected errno {errno}, got {other:?}"),
    }
}

fn describe_difference(got: &[u8], want: &[u8]) -> String {
    match first_difference(got, want) {
        None => "identical".into(),
        Some(at) => format!(
            "{} bytes, expected {}, first difference at offset {at}",
            got.len(),
            want.len()
        ),
    }
}

/// Waits until `rel` on peer `i` (read through its drive) is exactly `want`.
#[track_caller]
fn wait_content(p: &Peers, i: usize, rel: &str, want: &[u8], ctx: &str) {
    let path = p.file(i, rel);
    p.wait_until(
        &format!("{ctx}: {} has this version of {rel:?}", p.name(i)),
        SYNC,
        || match read(&path) {
            Ok(v) if v == want => Ok(()),
            Ok(v) => Err(describe_difference(&v, want)),
            Err(e) => Err(e.to_string()),
        },
    );
}

/// Three versions of a document: the original and two saves (the first rewrites a stretch and
/// inserts, the second appends and changes the start), `len` bytes or so.
fn versions(seed: u64, len: usize) -> [Vec<u8>; 3] {
    let v0 = pattern(seed, len);
    let mut v1 = v0.clone();
    let mid = len / 2;
    v1[mid..mid + 100].copy_from_slice(&pattern(seed + 1, 100));
    let insert = pattern(seed + 2, 57);
    v1.splice(mid / 2..mid / 2, insert);
    let mut v2 = v1.clone();
    v2.extend_from_slice(b"\nsecond save\n");
    v2[..16].copy_from_slice(b"SAVED TWICE ....");
    [v0, v1, v2]
}

// ---- the watcher --------------------------------------------------------------------------------

/// Something a watcher saw that it must never see.
struct Bad {
    count: u64,
    first: Duration,
    during: String,
}

#[derive(Default)]
struct Seen {
    /// Looks taken (a listing and, with a document, a read of it).
    listings: u64,
    bad: BTreeMap<String, Bad>,
}

impl Seen {
    fn note(&mut self, what: String, at: Duration, phase: &Mutex<String>) {
        let e = self.bad.entry(what).or_insert_with(|| Bad {
            count: 0,
            first: at,
            during: phase.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        });
        e.count += 1;
    }
}

/// A background thread on one peer that lists a folder of its drive every few milliseconds and
/// records every name not in `allowed`, every listing that lacks the document, and every read
/// of the document that is not one of the known versions.
struct Watch {
    peer: String,
    folder: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Seen>>,
}

/// One look at `dir`: every name not in `allowed`, a listing without `doc`, a read of `doc`
/// that is none of `versions` or fails, goes to `bad`.
fn look(
    dir: &Path,
    doc: Option<&str>,
    allowed: &[String],
    versions: &[Vec<u8>],
    bad: &mut dyn FnMut(String),
) {
    match fs::read_dir(dir) {
        Ok(rd) => {
            let mut names = Vec::new();
            for e in rd {
                match e {
                    Ok(e) => names.push(e.file_name().to_string_lossy().into_owned()),
                    Err(e) => bad(format!("the listing failed part-way: {e}")),
                }
            }
            for n in &names {
                if !allowed.contains(n) {
                    bad(format!("listed {n:?}"));
                }
            }
            if let Some(doc) = doc {
                if !names.iter().any(|n| n == doc) {
                    bad(format!("the listing lacked the document {doc:?}"));
                }
            }
        }
        Err(e) => bad(format!("listing the folder failed: {e}")),
    }
    if let Some(doc) = doc {
        match read(&dir.join(doc)) {
            Ok(v) if versions.contains(&v) => {}
            Ok(v) => bad(format!(
                "read {} bytes of {doc:?} that are none of its versions",
                v.len()
            )),
            Err(e) => bad(format!("reading {doc:?} failed: {e}")),
        }
    }
}

impl Watch {
    fn start(
        p: &Peers,
        i: usize,
        folder: &str,
        doc: Option<&str>,
        allowed: &[&str],
        versions: &[Vec<u8>],
        phase: Arc<Mutex<String>>,
    ) -> Watch {
        let dir = if folder.is_empty() {
            p.path(i).to_path_buf()
        } else {
            p.file(i, folder)
        };
        let doc = doc.map(str::to_owned);
        let allowed: Vec<String> = allowed.iter().map(|s| (*s).to_owned()).collect();
        let versions = versions.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let folder = dir.clone();
        let thread = std::thread::Builder::new()
            .name(format!("watch-{}", p.name(i)))
            .spawn(move || {
                let start = Instant::now();
                let mut seen = Seen::default();
                // A sequence may end before the watcher looked often: it then keeps watching
                // the final state until it has looked MIN_LISTINGS times.
                while !(stop2.load(Ordering::SeqCst) && seen.listings >= MIN_LISTINGS) {
                    let at = start.elapsed();
                    look(&dir, doc.as_deref(), &allowed, &versions, &mut |what| {
                        seen.note(what, at, &phase)
                    });
                    seen.listings += 1;
                    std::thread::sleep(WATCH_EVERY);
                }
                seen
            })
            .expect("spawn a watcher thread");
        Watch {
            peer: p.name(i).to_owned(),
            folder,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the watcher; returns what it saw that it must not have, as report lines.
    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        let seen = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(seen)) => seen,
            _ => return vec![format!("{}: the watcher thread panicked", self.peer)],
        };
        let mut out: Vec<String> = seen
            .bad
            .iter()
            .map(|(what, b)| {
                format!(
                    "{} {what}: {} time(s), first after {:?}, during: {}",
                    self.peer, b.count, b.first, b.during
                )
            })
            .collect();
        if seen.listings < MIN_LISTINGS {
            out.push(format!(
                "{}: the watcher listed {} only {} times: it did not really watch",
                self.peer,
                self.folder.display(),
                seen.listings
            ));
        }
        eprintln!(
            "{} watcher: {} looks at {}, {} kinds of problem",
            self.peer,
            seen.listings,
            self.folder.display(),
            seen.bad.len()
        );
        out
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Stops every watcher and panics (with the peers' logs) if any saw something.
#[track_caller]
fn assert_watchers_clean(p: &Peers, watches: Vec<Watch>, ctx: &str) {
    let bad: Vec<String> = watches.into_iter().flat_map(Watch::finish).collect();
    assert!(
        bad.is_empty(),
        "{ctx}: the other peers saw what they must never see:\n  {}\n{}",
        bad.join("\n  "),
        p.logs()
    );
}

// ---- a replayed save sequence -------------------------------------------------------------------

/// One application's session on A's copy of a document, watched from every other peer.
struct Replay<'a> {
    p: &'a Peers,
    app: &'static str,
    /// Folder of the document, relative to the drive's root ("" for the root).
    folder: &'static str,
    doc: &'static str,
    /// The application keeps the document open read-write for the whole session (then the
    /// other peers are kept out between saves too).
    holds_open: bool,
    versions: [Vec<u8>; 3],
    phase: Arc<Mutex<String>>,
    watches: Vec<Watch>,
    save: usize,
    step: usize,
}

impl<'a> Replay<'a> {
    /// The document exists on every peer (created on A, waited for everywhere else); then the
    /// watchers start.
    fn start(
        p: &'a Peers,
        app: &'static str,
        folder: &'static str,
        doc: &'static str,
        holds_open: bool,
        versions: [Vec<u8>; 3],
    ) -> Replay<'a> {
        Replay::start_allowing(p, app, folder, doc, holds_open, versions, &[])
    }

    /// [`Replay::start`], where the other peers may also list `also` (names that replicate).
    fn start_allowing(
        p: &'a Peers,
        app: &'static str,
        folder: &'static str,
        doc: &'static str,
        holds_open: bool,
        versions: [Vec<u8>; 3],
        also: &[&str],
    ) -> Replay<'a> {
        let phase = Arc::new(Mutex::new(format!("{app}: before the session")));
        let mut r = Replay {
            p,
            app,
            folder,
            doc,
            holds_open,
            versions,
            phase,
            watches: Vec::new(),
            save: 0,
            step: 0,
        };
        if !folder.is_empty() {
            ok(sys::mkdir(p.file(A, folder), 0o755), "A creates the folder");
        }
        let rel = r.rel(doc);
        write_new(&p.file(A, &rel), &r.versions[0], 0o644);
        for i in r.others() {
            wait_content(p, i, &rel, &r.versions[0], "the document A created");
        }
        let mut allowed = vec![doc];
        allowed.extend_from_slice(also);
        for i in r.others() {
            let w = Watch::start(
                p,
                i,
                folder,
                Some(doc),
                &allowed,
                &r.versions,
                Arc::clone(&r.phase),
            );
            r.watches.push(w);
        }
        r
    }

    fn others(&self) -> Vec<usize> {
        (1..self.p.len()).collect()
    }

    fn rel(&self, name: &str) -> String {
        if self.folder.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.folder)
        }
    }

    /// `name` in the document's folder on A's drive.
    fn a(&self, name: &str) -> PathBuf {
        self.p.file(A, &self.rel(name))
    }

    fn version(&self, k: usize) -> Vec<u8> {
        self.versions[k].clone()
    }

    fn set_phase(&self, s: String) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = s;
    }

    /// Starts save number `k` (1 or 2).
    fn begin_save(&mut self, k: usize) {
        self.save = k;
        self.step = 0;
        self.set_phase(format!("{} save {k}", self.app));
    }

    /// Runs one call of the application on A, then checks every other peer is kept out.
    #[track_caller]
    fn step(&mut self, what: &str, f: impl FnOnce()) {
        self.step += 1;
        let ctx = if self.save == 0 {
            format!("{}: {what}", self.app)
        } else {
            format!(
                "{} save {}, step {} ({what})",
                self.app, self.save, self.step
            )
        };
        self.set_phase(ctx.clone());
        f();
        self.kept_out(&ctx);
    }

    /// Every other peer's write-open of the document fails with ETXTBSY (os error 26).
    #[track_caller]
    fn kept_out(&self, ctx: &str) {
        let rel = self.rel(self.doc);
        for i in self.others() {
            match open_rw(&self.p.file(i, &rel)) {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {}
                Ok(f) => {
                    // What every peer lists while the other peer's handle is open.
                    let locks: Vec<String> = (0..self.p.len())
                        .map(|j| format!("{}: {:?}", self.p.name(j), self.p.try_locks(j)))
                        .collect();
                    // Which file the handle is on, and which one the name leads to now.
                    let handle = f.metadata().map(|m| (m.ino(), m.nlink(), m.len()));
                    let name = fs::metadata(self.p.file(i, &rel)).map(|m| (m.ino(), m.nlink()));
                    drop(f);
                    panic!(
                        "{ctx}: {}'s write-open of {rel:?} succeeded while A's {} session holds \
                         it; expected ETXTBSY (os error 26)\nthe handle's file (inode, nlink, \
                         size): {handle:?}; the name's file now (inode, nlink): {name:?}\nlocks \
                         then:\n  {}\n{}",
                        self.p.name(i),
                        self.app,
                        locks.join("\n  "),
                        self.p.logs()
                    );
                }
                Err(e) => panic!(
                    "{ctx}: {}'s write-open of {rel:?} failed with {e}; expected ETXTBSY (os \
                     error 26)\n{}",
                    self.p.name(i),
                    self.p.logs()
                ),
            }
        }
    }

    /// Save `k` is complete on A: every other peer gets exactly that version (while A's
    /// application still has the document open, when it keeps it open).
    #[track_caller]
    fn delivered(&mut self, k: usize) {
        let ctx = format!("{} save {k}", self.app);
        self.set_phase(format!("{ctx}: done on A, waiting for the other peers"));
        let rel = self.rel(self.doc);
        assert_eq!(
            read(&self.a(self.doc))
                .map_err(|e| e.to_string())
                .map(|v| v == self.versions[k]),
            Ok(true),
            "{ctx}: A's own copy after the save"
        );
        for i in self.others() {
            let path = self.p.file(i, &rel);
            let want = &self.versions[k];
            let got = poll_until(
                &format!("{ctx}: {} has this version of {rel:?}", self.p.name(i)),
                SYNC,
                || match read(&path) {
                    Ok(v) if v == *want => Ok(()),
                    Ok(v) => Err(describe_difference(&v, want)),
                    Err(e) => Err(e.to_string()),
                },
            );
            if let Err(e) = got {
                let seen: Vec<String> = std::mem::take(&mut self.watches)
                    .into_iter()
                    .flat_map(Watch::finish)
                    .collect();
                panic!(
                    "{e}\nmeanwhile the watchers saw:\n  {}\n{}",
                    seen.join("\n  "),
                    self.p.logs()
                );
            }
        }
        if self.holds_open {
            self.kept_out(&format!(
                "{ctx}: the other peers have it, A's {} still has the document open",
                self.app
            ));
        }
        self.set_phase(format!("{ctx}: delivered"));
    }

    /// A's application closed everything: once no peer lists the lock any more, every other
    /// peer's write-open succeeds; the watchers saw nothing wrong; every copy is the last
    /// version and no temp or owner file is in any other peer's backing folder either.
    #[track_caller]
    fn finish(mut self) {
        let rel = self.rel(self.doc);
        self.set_phase(format!("{}: A closed everything", self.app));
        for i in self.others() {
            // One peer at a time: each one's write-open takes the lock (and its linger).
            self.p.wait_unlocked(&rel, SYNC);
            match open_rw(&self.p.file(i, &rel)) {
                Ok(f) => drop(f),
                Err(e) => panic!(
                    "{}: {}'s write-open of {rel:?} after A closed everything and no peer lists \
                     a lock on it: {e}\n{}",
                    self.app,
                    self.p.name(i),
                    self.p.logs()
                ),
            }
        }
        let watches = std::mem::take(&mut self.watches);
        assert_watchers_clean(self.p, watches, self.app);
        let last = &self.versions[2];
        for i in 0..self.p.len() {
            let got = ok(read(&self.p.file(i, &rel)), "read the document at the end");
            assert!(
                got == *last,
                "{}: {}'s copy at the end: {}",
                self.app,
                self.p.name(i),
                describe_difference(&got, last)
            );
        }
        for i in self.others() {
            let dir = if self.folder.is_empty() {
                self.p.mount(i).backing().to_path_buf()
            } else {
                self.p.backing_file(i, self.folder)
            };
            let mut names: Vec<String> = ok(fs::read_dir(&dir), "list the backing folder")
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            assert_eq!(
                names,
                vec![self.doc.to_string()],
                "{}: {}'s backing folder must hold the document and nothing else",
                self.app,
                self.p.name(i)
            );
        }
    }
}

// ---- Word ---------------------------------------------------------------------------------------

/// Word (docx): the document open read-write all session and the owner file `~$` + the name
/// minus its first two characters. A save writes an 8-hex-digit `.tmp` (O_EXCL, fsync),
/// renames the open document to `~WRL0001.tmp`, renames the temp onto the document's name, sets
/// `user.DOSATTRIB` and the times, closes the old handle, unlinks `~WRL0001.tmp` and opens the
/// document read-write again.
///
/// `quick`: the second save follows the first at once, while the first may still be on its way
/// to the other peers (only the last version is waited for).
fn word_docx(n: usize, len: usize, quick: bool) {
    const FOLDER: &str = "Finance Q3";
    const DOCX: &str = "Quarterly report.docx";
    const OWNER: &str = "~$arterly report.docx";
    const WRL: &str = "~WRL0001.tmp";
    const TEMPS: [&str; 2] = ["A1B2C3D4.tmp", "E5F60718.tmp"];
    let p = Peers::start_with(n, options());
    let mut r = Replay::start(&p, "Word", FOLDER, DOCX, true, versions(7, len));
    let (doc_a, owner_a, wrl_a) = (r.a(DOCX), r.a(OWNER), r.a(WRL));
    let mut doc: Option<File> = None;
    let mut owner: Option<File> = None;
    r.step("Word opens the document read-write", || {
        doc = Some(ok(open_rw(&doc_a), "open the document O_RDWR"));
    });
    r.step("Word creates its owner file", || {
        let mut f = create_excl(&owner_a, 0o644);
        ok(f.write_all(&[b'A'; 162]), "write the owner file");
        ok(
            sys::setxattr(
                &owner_a,
                "user.DOSATTRIB",
                b"\x00\x00\x04\x00\x04\x00\x00\x00",
                0,
            ),
            "set user.DOSATTRIB on the owner file",
        );
        owner = Some(f);
    });
    for k in 1..=2 {
        r.begin_save(k);
        let temp_a = r.a(TEMPS[k - 1]);
        let new = r.version(k);
        r.step(
            "Word writes the new version to an 8-hex .tmp (O_EXCL, fsync)",
            || {
                write_new(&temp_a, &new, 0o644);
                ok(
                    sys::setxattr(
                        &temp_a,
                        "user.DOSATTRIB",
                        b"\x00\x00\x04\x00\x04\x00\x20\x00",
                        0,
                    ),
                    "set user.DOSATTRIB on the temp",
                );
            },
        );
        r.step("Word renames the open document to ~WRL0001.tmp", || {
            ok(
                fs::rename(&doc_a, &wrl_a),
                "rename doc -> ~WRL0001.tmp while open",
            );
        });
        r.step("Word renames the temp onto the document's name", || {
            ok(fs::rename(&temp_a, &doc_a), "rename temp -> doc");
        });
        r.step("Word sets user.DOSATTRIB and the times", || {
            ok(
                sys::setxattr(
                    &doc_a,
                    "user.DOSATTRIB",
                    b"\x00\x00\x04\x00\x04\x00\x20\x00",
                    0,
                ),
                "set user.DOSATTRIB on the document",
            );
            ok(
                sys::utimensat(
                    &doc_a,
                    Time::Now,
                    Time::At(1_700_000_000 + k as i64, 0),
                    false,
                ),
                "set the document's times",
            );
        });
        r.step("Word closes the old handle", || {
            ok(
                sys::close(doc.take().expect("old handle")),
                "close the old handle",
            );
        });
        r.step("Word unlinks ~WRL0001.tmp", || {
            ok(fs::remove_file(&wrl_a), "unlink ~WRL0001.tmp");
        });
        r.step("Word opens the document read-write again", || {
            doc = Some(ok(open_rw(&doc_a), "reopen the document O_RDWR"));
        });
        if !quick || k == 2 {
            r.delivered(k);
        }
    }
    r.set_phase("Word closes the document".into());
    drop(doc.take());
    drop(owner.take());
    ok(fs::remove_file(&owner_a), "unlink the owner file");
    r.finish();
}

#[test]
fn word_docx_save_twice_two_peers() {
    word_docx(2, 48_000, false);
}

#[test]
fn word_docx_save_twice_three_peers() {
    word_docx(3, 48_000, false);
}

/// A big document saved twice in a row: the second save happens while the first one is still
/// being sent, and the other peer must end up with the second.
#[test]
fn word_docx_second_save_while_the_first_is_still_on_its_way() {
    word_docx(2, 16 << 20, true);
}

/// Word 2003 (doc): `~WRD0001.TMP` gets the new version; unlink `~WRL0001.TMP` (ENOENT);
/// rename the document to `~WRL0001.TMP`; unlink the document (ENOENT); rename `~WRD0001.TMP`
/// onto the document; unlink `~WRL0001.TMP`. Word keeps the document open read-write (with its
/// owner file) between saves, closing the old handle and reopening around each one.
#[test]
fn word_2003_doc_save_twice() {
    const DOC: &str = "Board minutes.doc";
    const OWNER: &str = "~$ard minutes.doc";
    const WRD: &str = "~WRD0001.TMP";
    const WRL: &str = "~WRL0001.TMP";
    let p = Peers::start_with(2, options());
    let mut r = Replay::start(&p, "Word 2003", "", DOC, true, versions(13, 30_000));
    let (doc_a, owner_a, wrd_a, wrl_a) = (r.a(DOC), r.a(OWNER), r.a(WRD), r.a(WRL));
    let mut doc: Option<File> = None;
    let mut owner: Option<File> = None;
    r.step("Word opens the document read-write", || {
        doc = Some(ok(open_rw(&doc_a), "open the document O_RDWR"));
    });
    r.step("Word creates its owner file", || {
        let mut f = create_excl(&owner_a, 0o644);
        ok(f.write_all(&[b'W'; 162]), "write the owner file");
        owner = Some(f);
    });
    for k in 1..=2 {
        r.begin_save(k);
        let new = r.version(k);
        r.step("Word writes the new version to ~WRD0001.TMP", || {
            write_new(&wrd_a, &new, 0o644);
        });
        r.step("Word unlinks ~WRL0001.TMP (ENOENT)", || {
            fails_with(fs::remove_file(&wrl_a), libc::ENOENT, "unlink ~WRL0001.TMP");
        });
        r.step("Word renames the open document to ~WRL0001.TMP", || {
            ok(fs::rename(&doc_a, &wrl_a), "rename doc -> ~WRL0001.TMP");
        });
        r.step("Word unlinks the document (ENOENT)", || {
            fails_with(
                fs::remove_file(&doc_a),
                libc::ENOENT,
                "unlink the renamed document",
            );
        });
        r.step("Word renames ~WRD0001.TMP onto the document", || {
            ok(fs::rename(&wrd_a, &doc_a), "rename ~WRD0001.TMP -> doc");
        });
        r.step("Word closes the old handle", || {
            ok(
                sys::close(doc.take().expect("old handle")),
                "close the old handle",
            );
        });
        r.step("Word unlinks ~WRL0001.TMP", || {
            ok(fs::remove_file(&wrl_a), "unlink ~WRL0001.TMP");
        });
        r.step("Word opens the document read-write again", || {
            doc = Some(ok(open_rw(&doc_a), "reopen the document O_RDWR"));
        });
        r.delivered(k);
    }
    r.set_phase("Word closes the document".into());
    drop(doc.take());
    drop(owner.take());
    ok(fs::remove_file(&owner_a), "unlink the owner file");
    r.finish();
}

// ---- Excel and PowerPoint -----------------------------------------------------------------------

/// Excel (xlsx): the document open read-write and the owner file `~$Budget.xlsx`. A save writes
/// the new version to an 8-hex name without extension (`5EE27100`), creates and unlinks the
/// probe `Budget.xlsx~RF172f241.TMP`, renames the document to that name, unlinks it, renames the
/// 8-hex file onto the document and opens it again.
#[test]
fn excel_xlsx_save_twice() {
    const DOC: &str = "Budget.xlsx";
    const OWNER: &str = "~$Budget.xlsx";
    const TEMPS: [&str; 2] = ["5EE27100", "0C9A3F12"];
    const PROBES: [&str; 2] = ["Budget.xlsx~RF172f241.TMP", "Budget.xlsx~RF1a3c5e7.TMP"];
    let p = Peers::start_with(2, options());
    let mut r = Replay::start(&p, "Excel", "", DOC, true, versions(21, 300_000));
    let (doc_a, owner_a) = (r.a(DOC), r.a(OWNER));
    let mut doc: Option<File> = None;
    let mut owner: Option<File> = None;
    r.step("Excel opens the document read-write", || {
        doc = Some(ok(open_rw(&doc_a), "open the document O_RDWR"));
    });
    r.step("Excel creates its owner file", || {
        let mut f = create_excl(&owner_a, 0o644);
        ok(f.write_all(&[b'E'; 165]), "write the owner file");
        owner = Some(f);
    });
    for k in 1..=2 {
        r.begin_save(k);
        let (temp_a, probe_a) = (r.a(TEMPS[k - 1]), r.a(PROBES[k - 1]));
        let new = r.version(k);
        r.step(
            "Excel writes the new version to an 8-hex name without extension",
            || {
                write_new(&temp_a, &new, 0o644);
            },
        );
        r.step("Excel creates and unlinks the ~RF probe", || {
            let f = create_excl(&probe_a, 0o644);
            ok(sys::close(f), "close the probe");
            ok(fs::remove_file(&probe_a), "unlink the probe");
        });
        r.step(
            "Excel renames the open document to the probe's name",
            || {
                ok(fs::rename(&doc_a, &probe_a), "rename doc -> ~RF....TMP");
            },
        );
        r.step("Excel unlinks the renamed document", || {
            ok(fs::remove_file(&probe_a), "unlink ~RF....TMP");
        });
        r.step("Excel renames the 8-hex file onto the document", || {
            ok(fs::rename(&temp_a, &doc_a), "rename 8-hex temp -> doc");
        });
        r.step("Excel closes the old handle", || {
            ok(
                sys::close(doc.take().expect("old handle")),
                "close the old handle",
            );
        });
        r.step("Excel opens the document read-write again", || {
            doc = Some(ok(open_rw(&doc_a), "reopen the document O_RDWR"));
        });
        r.delivered(k);
    }
    r.set_phase("Excel closes the document".into());
    drop(doc.take());
    drop(owner.take());
    ok(fs::remove_file(&owner_a), "unlink the owner file");
    r.finish();
}

/// PowerPoint (pptx): the document open and the owner file `~$Sales deck.pptx`. A save writes
/// the new version to `ppt5C4F.tmp`, closes and unlinks the original, renames the temp onto the
/// document and opens it again.
#[test]
fn powerpoint_pptx_save_twice() {
    const DOC: &str = "Sales deck.pptx";
    const OWNER: &str = "~$Sales deck.pptx";
    const TEMPS: [&str; 2] = ["ppt5C4F.tmp", "ppt7A21.tmp"];
    let p = Peers::start_with(2, options());
    let mut r = Replay::start(&p, "PowerPoint", "", DOC, true, versions(29, 600_000));
    let (doc_a, owner_a) = (r.a(DOC), r.a(OWNER));
    let mut doc: Option<File> = None;
    let mut owner: Option<File> = None;
    r.step("PowerPoint opens the document read-write", || {
        doc = Some(ok(open_rw(&doc_a), "open the document O_RDWR"));
    });
    r.step("PowerPoint creates its owner file", || {
        let mut f = create_excl(&owner_a, 0o644);
        ok(f.write_all(&[b'P'; 165]), "write the owner file");
        owner = Some(f);
    });
    for k in 1..=2 {
        r.begin_save(k);
        let temp_a = r.a(TEMPS[k - 1]);
        let new = r.version(k);
        r.step("PowerPoint writes the new version to ppt....tmp", || {
            write_new(&temp_a, &new, 0o644);
        });
        r.step("PowerPoint closes the original", || {
            ok(
                sys::close(doc.take().expect("old handle")),
                "close the original",
            );
        });
        r.step("PowerPoint unlinks the original", || {
            ok(fs::remove_file(&doc_a), "unlink the original");
        });
        r.step("PowerPoint renames the temp onto the document", || {
            ok(fs::rename(&temp_a, &doc_a), "rename temp -> doc");
        });
        r.step("PowerPoint opens the document again", || {
            doc = Some(ok(open_rw(&doc_a), "reopen the document O_RDWR"));
        });
        r.delivered(k);
    }
    r.set_phase("PowerPoint closes the document".into());
    drop(doc.take());
    drop(owner.take());
    ok(fs::remove_file(&owner_a), "unlink the owner file");
    r.finish();
}

/// PowerPoint's save as the drive sees it when the kernel's RELEASE of the closed temp comes
/// late (FUSE sends RELEASE asynchronously, after close() returned): the temp's write handle is
/// still open when the temp is renamed onto the document and when PowerPoint reopens the
/// document (the same file now) read-write. The save must ship when that handle goes, even
/// though the reopened document stays open, and the document must never vanish meanwhile.
#[test]
fn powerpoint_save_whose_temp_is_released_after_the_reopen() {
    const DOC: &str = "Board deck.pptx";
    const OWNER: &str = "~$Board deck.pptx";
    const TEMPS: [&str; 2] = ["ppt1D2E.tmp", "ppt3F40.tmp"];
    let p = Peers::start_with(2, options());
    let mut r = Replay::start(
        &p,
        "PowerPoint (late release)",
        "",
        DOC,
        true,
        versions(67, 200_000),
    );
    let (doc_a, owner_a) = (r.a(DOC), r.a(OWNER));
    let mut doc: Option<File> = None;
    let mut owner: Option<File> = None;
    r.step("PowerPoint opens the document read-write", || {
        doc = Some(ok(open_rw(&doc_a), "open the document O_RDWR"));
    });
    r.step("PowerPoint creates its owner file", || {
        let mut f = create_excl(&owner_a, 0o644);
        ok(f.write_all(&[b'P'; 165]), "write the owner file");
        owner = Some(f);
    });
    for k in 1..=2 {
        r.begin_save(k);
        let temp_a = r.a(TEMPS[k - 1]);
        let new = r.version(k);
        let mut temp: Option<File> = None;
        r.step(
            "PowerPoint writes the new version to ppt....tmp (handle not released yet)",
            || {
                let mut f = create_excl(&temp_a, 0o644);
                ok(f.write_all(&new), "write the temp");
                ok(sys::fsync(&f, false), "fsync the temp");
                temp = Some(f);
            },
        );
        r.step("PowerPoint closes the original", || {
            ok(
                sys::close(doc.take().expect("old handle")),
                "close the original",
            );
        });
        r.step("PowerPoint unlinks the original", || {
            ok(fs::remove_file(&doc_a), "unlink the original");
        });
        r.step("PowerPoint renames the temp onto the document", || {
            ok(fs::rename(&temp_a, &doc_a), "rename temp -> doc");
        });
        r.step("PowerPoint opens the document again", || {
            doc = Some(ok(open_rw(&doc_a), "reopen the document O_RDWR"));
        });
        r.step("the temp's handle is released at last", || {
            ok(sys::close(temp.take().expect("the temp")), "close the temp");
        });
        r.delivered(k);
    }
    r.set_phase("PowerPoint closes the document".into());
    drop(doc.take());
    drop(owner.take());
    ok(fs::remove_file(&owner_a), "unlink the owner file");
    r.finish();
}

// ---- LibreOffice --------------------------------------------------------------------------------

const LO_LOCK_LINE: &[u8] = b"A User,alice,office-a,21.11.2026 10:32,file:///home/alice;\n";

/// Waits until the document's mode on every other peer is `mode`.
#[track_caller]
fn wait_mode(r: &Replay<'_>, mode: u32, ctx: &str) {
    let rel = r.rel(r.doc);
    for i in r.others() {
        let path = r.p.file(i, &rel);
        r.p.wait_until(
            &format!("{ctx}: {}'s {rel:?} has mode {mode:o}", r.p.name(i)),
            SYNC,
            || {
                let m = fs::metadata(&path).map_err(|e| e.to_string())?;
                if m.mode() & 0o7777 == mode {
                    Ok(())
                } else {
                    Err(format!("mode {:o}", m.mode() & 0o7777))
                }
            },
        );
    }
}

/// LibreOffice (odt): lock file `.~lock.NAME#` (O_EXCL) beside the document, which stays open
/// read-write with an fcntl lock all session. A save writes `lu<pid><token>.tmp` (mode 0600),
/// renames it over the document, restores the mode, closes the old handle, reopens + fsyncs +
/// closes the document and opens it read-write again.
#[test]
fn libreoffice_odt_save_twice() {
    const DOC: &str = "Budget plan.odt";
    const LOCK: &str = ".~lock.Budget plan.odt#";
    let temps = [
        format!("lu{}g7k2.tmp", std::process::id()),
        format!("lu{}q0c9.tmp", std::process::id()),
    ];
    let p = Peers::start_with(2, options());
    let mut r = Replay::start(&p, "LibreOffice", "", DOC, true, versions(31, 30_000));
    let (doc_a, lock_a) = (r.a(DOC), r.a(LOCK));
    let mut doc: Option<File> = None;
    r.step("LibreOffice creates its lock file (O_EXCL)", || {
        let mut f = create_excl(&lock_a, 0o644);
        ok(f.write_all(LO_LOCK_LINE), "write the lock file");
        ok(sys::close(f), "close the lock file");
    });
    r.step(
        "LibreOffice opens the document read-write (fcntl lock)",
        || {
            let f = ok(open_rw(&doc_a), "open the document O_RDWR");
            ok(
                sys::setlk(&f, libc::F_WRLCK, 0, 0),
                "fcntl(F_SETLK, F_WRLCK)",
            );
            doc = Some(f);
        },
    );
    for k in 1..=2 {
        r.begin_save(k);
        let temp_a = r.a(&temps[k - 1]);
        let new = r.version(k);
        r.step("LibreOffice writes lu<pid><token>.tmp (mode 0600)", || {
            write_new(&temp_a, &new, 0o600);
        });
        r.step("LibreOffice renames the temp over the document", || {
            ok(fs::rename(&temp_a, &doc_a), "rename temp -> doc");
        });
        r.step("LibreOffice restores the document's mode", || {
            ok(sys::chmod(&doc_a, 0o644), "chmod the document");
        });
        r.step("LibreOffice closes the old handle", || {
            ok(
                sys::close(doc.take().expect("old handle")),
                "close the old handle",
            );
        });
        r.step(
            "LibreOffice reopens, fsyncs and closes the document",
            || {
                let f = ok(open_rw(&doc_a), "reopen for fsync");
                ok(sys::fsync(&f, false), "fsync the document");
                ok(sys::close(f), "close after fsync");
            },
        );
        r.step("LibreOffice opens the document read-write again", || {
            let f = ok(open_rw(&doc_a), "reopen the document O_RDWR");
            ok(
                sys::setlk(&f, libc::F_WRLCK, 0, 0),
                "fcntl(F_SETLK, F_WRLCK)",
            );
            doc = Some(f);
        });
        r.delivered(k);
        wait_mode(&r, 0o644, &format!("LibreOffice save {k}"));
    }
    r.set_phase("LibreOffice closes the document".into());
    drop(doc.take());
    ok(fs::remove_file(&lock_a), "unlink the lock file");
    r.finish();
}

/// LibreOffice in place (the document is a hard link or a symlink, or on some mounts): the
/// document stays open read-write (fcntl lock) all session; a save writes the temp, truncates
/// and rewrites the document in place through its open stream, unlinks the temp and fsyncs.
#[test]
fn libreoffice_in_place_save_twice() {
    const DOC: &str = "Linked budget.odt";
    const LOCK: &str = ".~lock.Linked budget.odt#";
    let temps = [
        format!("lu{}h2m4.tmp", std::process::id()),
        format!("lu{}x8p1.tmp", std::process::id()),
    ];
    let p = Peers::start_with(2, options());
    let mut r = Replay::start(
        &p,
        "LibreOffice in place",
        "",
        DOC,
        true,
        versions(37, 40_000),
    );
    let (doc_a, lock_a) = (r.a(DOC), r.a(LOCK));
    let mut doc: Option<File> = None;
    r.step("LibreOffice creates its lock file (O_EXCL)", || {
        let mut f = create_excl(&lock_a, 0o644);
        ok(f.write_all(LO_LOCK_LINE), "write the lock file");
        ok(sys::close(f), "close the lock file");
    });
    r.step(
        "LibreOffice opens the document read-write (fcntl lock)",
        || {
            let f = ok(open_rw(&doc_a), "open the document O_RDWR");
            ok(
                sys::setlk(&f, libc::F_WRLCK, 0, 0),
                "fcntl(F_SETLK, F_WRLCK)",
            );
            doc = Some(f);
        },
    );
    for k in 1..=2 {
        r.begin_save(k);
        let temp_a = r.a(&temps[k - 1]);
        let new = r.version(k);
        r.step("LibreOffice writes lu<pid><token>.tmp (mode 0600)", || {
            write_new(&temp_a, &new, 0o600);
        });
        r.step(
            "LibreOffice truncates and rewrites the document in place",
            || {
                let f = doc.as_ref().expect("the session's handle");
                ok(f.set_len(0), "truncate the document");
                ok(f.write_all_at(&new, 0), "rewrite the document");
            },
        );
        r.step("LibreOffice unlinks the temp", || {
            ok(fs::remove_file(&temp_a), "unlink the temp");
        });
        r.step("LibreOffice fsyncs the document", || {
            ok(
                sys::fsync(doc.as_ref().expect("the session's handle"), false),
                "fsync the document",
            );
        });
        r.delivered(k);
    }
    r.set_phase("LibreOffice closes the document".into());
    drop(doc.take());
    ok(fs::remove_file(&lock_a), "unlink the lock file");
    r.finish();
}

// ---- editors ------------------------------------------------------------------------------------

/// vim (defaults): swap file `.NAME.swp` while editing. A save creates the probe `4913` (O_EXCL,
/// fchown, unlink), renames the document to `NAME~`, creates the document O_TRUNC, writes,
/// fsyncs, closes, restores the mode and unlinks `NAME~`. vim keeps no handle on the document
/// between saves.
#[test]
fn vim_save_twice() {
    const DOC: &str = "notes.txt";
    const SWP: &str = ".notes.txt.swp";
    const PROBE: &str = "4913";
    const BACKUP: &str = "notes.txt~";
    let p = Peers::start_with(2, options());
    let mut r = Replay::start(&p, "vim", "", DOC, false, versions(41, 3_000));
    let (doc_a, swp_a, probe_a, backup_a) = (r.a(DOC), r.a(SWP), r.a(PROBE), r.a(BACKUP));
    let mut swap = create_excl(&swp_a, 0o600);
    ok(swap.write_all(&[b'b'; 4096]), "write the swap file");
    ok(sys::fsync(&swap, false), "fsync the swap file");
    for k in 1..=2 {
        r.begin_save(k);
        let new = r.version(k);
        ok(
            swap.write_all_at(&[b'0' + k as u8; 4096], 4096),
            "vim updates its swap file",
        );
        r.step(
            "vim creates the probe 4913 (O_EXCL), fchowns and unlinks it",
            || {
                let f = ok(
                    sys::open(
                        &probe_a,
                        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                        0o644,
                    ),
                    "create 4913",
                );
                // SAFETY: plain getters.
                let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
                ok(sys::fchown(&f, Some(uid), Some(gid)), "fchown 4913");
                ok(sys::close(f), "close 4913");
                ok(fs::remove_file(&probe_a), "unlink 4913");
            },
        );
        r.step("vim renames the document to NAME~", || {
            ok(fs::rename(&doc_a, &backup_a), "rename doc -> NAME~");
        });
        let mut written: Option<File> = None;
        r.step("vim creates the document O_TRUNC", || {
            written = Some(ok(
                sys::open(
                    &doc_a,
                    libc::O_CREAT | libc::O_TRUNC | libc::O_WRONLY,
                    0o644,
                ),
                "create the document O_TRUNC",
            ));
        });
        r.step("vim writes and fsyncs the document", || {
            let f = written.as_mut().expect("the new document");
            ok(f.write_all(&new), "write the document");
            ok(sys::fsync(f, false), "fsync the document");
        });
        r.step("vim closes the document", || {
            ok(
                sys::close(written.take().expect("the new document")),
                "close",
            );
        });
        r.step("vim restores the mode", || {
            ok(sys::chmod(&doc_a, 0o644), "chmod the document");
        });
        r.step("vim unlinks NAME~", || {
            ok(fs::remove_file(&backup_a), "unlink NAME~");
        });
        r.delivered(k);
    }
    r.set_phase("vim quits".into());
    drop(swap);
    ok(fs::remove_file(&swp_a), "unlink the swap file");
    r.finish();
}

/// gedit / GNOME (GIO): create the document O_EXCL (EEXIST), open it O_WRONLY without
/// truncating only to stat it, write `.goutputstream-XXXXXX` (O_EXCL), fsync, rename it over the
/// document *before* closing it, then close.
#[test]
fn gedit_gio_save_twice() {
    const DOC: &str = "letter.txt";
    const STREAMS: [&str; 2] = [".goutputstream-K3X9QZ", ".goutputstream-7PW2LD"];
    let p = Peers::start_with(2, options());
    let mut r = Replay::start(&p, "gedit", "", DOC, false, versions(43, 2_500));
    let doc_a = r.a(DOC);
    for k in 1..=2 {
        r.begin_save(k);
        let stream_a = r.a(STREAMS[k - 1]);
        let new = r.version(k);
        r.step("GIO creates the document O_EXCL (EEXIST)", || {
            fails_with(
                sys::open(&doc_a, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o666),
                libc::EEXIST,
                "create the document O_EXCL",
            );
        });
        r.step("GIO opens the document O_WRONLY only to stat it", || {
            let f = ok(
                sys::open(&doc_a, libc::O_WRONLY, 0),
                "open the document O_WRONLY",
            );
            ok(f.metadata(), "fstat the document");
            ok(sys::close(f), "close the stat-only handle");
        });
        let mut stream: Option<File> = None;
        r.step(
            "GIO creates .goutputstream-XXXXXX (O_EXCL), writes, fsyncs",
            || {
                let mut f = create_excl(&stream_a, 0o644);
                ok(f.write_all(&new), "write the stream");
                ok(sys::fsync(&f, false), "fsync the stream");
                stream = Some(f);
            },
        );
        r.step(
            "GIO renames the still-open stream over the document",
            || {
                ok(
                    fs::rename(&stream_a, &doc_a),
                    "rename .goutputstream -> doc",
                );
            },
        );
        r.step("GIO closes the stream", || {
            ok(
                sys::close(stream.take().expect("the stream")),
                "close the stream",
            );
        });
        r.delivered(k);
    }
    r.finish();
}

/// GIO renames its temp over the document before closing it: as long as that handle is open it
/// can still change the document, so the document stays locked (well past the linger) and
/// ships once, at the close, with what the handle wrote last.
#[test]
fn gio_stream_renamed_over_the_document_keeps_it_locked_until_closed() {
    const DOC: &str = "slow letter.txt";
    const STREAM: &str = ".goutputstream-Q1W2E3";
    let opts = options();
    let linger = opts.linger;
    let p = Peers::start_with(2, opts);
    // The first part (v1) must never reach the other peer: it ships once, at the close.
    let [v0, v1, v2] = versions(47, 5_000);
    let mut r = Replay::start(
        &p,
        "gedit (slow)",
        "",
        DOC,
        false,
        [v0, v2.clone(), v2.clone()],
    );
    let (doc_a, stream_a) = (r.a(DOC), r.a(STREAM));
    r.begin_save(1);
    let mut stream: Option<File> = None;
    r.step(
        "GIO creates .goutputstream-XXXXXX and writes a first part",
        || {
            let mut f = create_excl(&stream_a, 0o644);
            ok(f.write_all(&v1), "write the stream");
            stream = Some(f);
        },
    );
    r.step(
        "GIO renames the still-open stream over the document",
        || {
            ok(
                fs::rename(&stream_a, &doc_a),
                "rename .goutputstream -> doc",
            );
        },
    );
    // The handle stays open for three lingers: the other peer is kept out all along (polled,
    // bounded), and gets nothing yet.
    let until = Instant::now() + linger * 3;
    while Instant::now() < until {
        r.kept_out("the renamed stream is still open on A (well past the linger)");
        std::thread::sleep(Duration::from_millis(100));
    }
    r.step("the still-open stream writes the rest", || {
        let f = stream.as_ref().expect("the stream");
        ok(f.write_all_at(&v2, 0), "write the final version");
    });
    r.step("GIO closes the stream", || {
        ok(
            sys::close(stream.take().expect("the stream")),
            "close the stream",
        );
    });
    r.delivered(2);
    r.finish();
}

/// VS Code: open the document O_WRONLY | O_TRUNC, write, close: in place, no temp.
#[test]
fn vscode_in_place_save_twice() {
    const DOC: &str = "README.md";
    let p = Peers::start_with(2, options());
    let mut r = Replay::start(&p, "VS Code", "", DOC, false, versions(53, 6_000));
    let doc_a = r.a(DOC);
    for k in 1..=2 {
        r.begin_save(k);
        let new = r.version(k);
        let mut f: Option<File> = None;
        r.step("VS Code opens the document O_WRONLY|O_TRUNC", || {
            f = Some(ok(
                sys::open(&doc_a, libc::O_WRONLY | libc::O_TRUNC, 0),
                "open O_WRONLY|O_TRUNC",
            ));
        });
        r.step("VS Code writes the document", || {
            ok(f.as_mut().expect("handle").write_all(&new), "write");
        });
        r.step("VS Code closes the document", || {
            ok(sys::close(f.take().expect("handle")), "close");
        });
        r.delivered(k);
    }
    r.finish();
}

/// A generic atomic save: a temp in the same folder, write, fsync, rename over the document,
/// fsync the folder.
#[test]
fn generic_atomic_save_twice() {
    const FOLDER: &str = "exports";
    const DOC: &str = "sales.csv";
    const TEMPS: [&str; 2] = ["sales.csv.8f3k2q.tmp", "sales.csv.z1x0c5.tmp"];
    let p = Peers::start_with(2, options());
    let mut r = Replay::start(&p, "atomic save", FOLDER, DOC, false, versions(59, 200_000));
    let doc_a = r.a(DOC);
    let folder_a = p.file(A, FOLDER);
    for k in 1..=2 {
        r.begin_save(k);
        let temp_a = r.a(TEMPS[k - 1]);
        let new = r.version(k);
        r.step("write and fsync a temp in the same folder", || {
            write_new(&temp_a, &new, 0o644);
        });
        r.step("rename the temp over the document", || {
            ok(fs::rename(&temp_a, &doc_a), "rename temp -> doc");
        });
        r.step("fsync the folder", || {
            let d = ok(
                sys::open(&folder_a, libc::O_RDONLY | libc::O_DIRECTORY, 0),
                "open the folder",
            );
            ok(sys::fsync(&d, false), "fsync the folder");
        });
        r.delivered(k);
    }
    r.finish();
}

/// The same atomic save with a temp whose name is not a temp pattern (`.tmpXXXXXX`, as Rust's
/// `tempfile` names them): the temp replicates like any file, and the rename over the document
/// must still leave the other peers with the new version under the document's name (no
/// conflict copy, never without the document).
#[test]
fn generic_atomic_save_with_a_temp_name_that_replicates() {
    const FOLDER: &str = "exports";
    const DOC: &str = "orders.csv";
    const TEMPS: [&str; 2] = [".tmpAb12Cd", ".tmpQ7zR2w"];
    let p = Peers::start_with(2, options());
    let mut r = Replay::start_allowing(
        &p,
        "atomic save (replicated temp name)",
        FOLDER,
        DOC,
        false,
        versions(61, 50_000),
        &TEMPS,
    );
    let doc_a = r.a(DOC);
    let folder_a = p.file(A, FOLDER);
    for k in 1..=2 {
        r.begin_save(k);
        let temp_a = r.a(TEMPS[k - 1]);
        let new = r.version(k);
        r.step("write and fsync a temp in the same folder", || {
            write_new(&temp_a, &new, 0o644);
        });
        r.step("rename the temp over the document", || {
            ok(fs::rename(&temp_a, &doc_a), "rename temp -> doc");
        });
        r.step("fsync the folder", || {
            let d = ok(
                sys::open(&folder_a, libc::O_RDONLY | libc::O_DIRECTORY, 0),
                "open the folder",
            );
            ok(sys::fsync(&d, false), "fsync the folder");
        });
        r.delivered(k);
    }
    r.finish();
}

// ---- exclusions ---------------------------------------------------------------------------------

/// Creates each of `names` on A (a file with content; a name ending in `/` is a folder with a
/// file inside; a name starting with `.#` is an Emacs lock symlink).
fn create_all(p: &Peers, names: &[&str]) {
    for n in names {
        if let Some(dir) = n.strip_suffix('/') {
            ok(
                sys::mkdir(p.file(A, dir), 0o755),
                "mkdir an excluded folder",
            );
            write_new(&p.file(A, &format!("{dir}/inside.xml")), b"inside", 0o644);
        } else if n.starts_with(".#") {
            ok(
                std::os::unix::fs::symlink("alice@office-a.4242:1700000000", p.file(A, n)),
                "create an Emacs lock link",
            );
        } else {
            write_new(&p.file(A, n), format!("temp {n}\n").as_bytes(), 0o644);
        }
    }
}

/// The names in peer `i`'s drive root and backing folder, sorted.
fn names_on(p: &Peers, i: usize) -> (Vec<String>, Vec<String>) {
    let list = |dir: &Path| {
        let mut v: Vec<String> = ok(fs::read_dir(dir), "list a folder")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    (list(p.path(i)), list(p.mount(i).backing()))
}

#[test]
fn temp_and_owner_files_created_on_one_peer_never_appear_on_another() {
    let names = [
        "~$doc.docx",
        "foo.tmp",
        ".~lock.x#",
        "5EE27100",
        "5ee27101",
        "~WRL0001.tmp",
        "~WRD0001.TMP",
        "A1B2C3D4.tmp",
        "Budget.xlsx~RF172f241.TMP",
        "ppt5C4F.tmp",
        "lu4242g7k2.tmp",
        "4913",
        "notes.txt~",
        ".notes.txt.swp",
        ".goutputstream-K3X9QZ",
        "Word Work File D_1234.tmp",
        "._doc.docx",
        ".#notes.txt",
        "#notes.txt#",
        "main.rs___jb_tmp___",
        "main.rs___jb_old___",
        "doc.docx.sb-1a2b3c4d-AbCdEf/",
    ];
    let p = Peers::start_with(2, options());
    let phase = Arc::new(Mutex::new("A creates temp and owner files".to_string()));
    let watch = Watch::start(&p, B, "", None, &["after.txt"], &[], Arc::clone(&phase));
    create_all(&p, &names);
    // Replication keeps each peer's order: once a file created after them arrives, anything
    // that was going to travel has.
    write_new(&p.file(A, "after.txt"), b"created after the temps\n", 0o644);
    wait_content(
        &p,
        B,
        "after.txt",
        b"created after the temps\n",
        "the file created last",
    );
    *phase.lock().unwrap_or_else(PoisonError::into_inner) = "after.txt arrived".into();
    assert_watchers_clean(&p, vec![watch], "temp and owner files");
    let (drive, backing) = names_on(&p, B);
    assert_eq!(
        drive,
        vec!["after.txt".to_string()],
        "B's drive must list only after.txt"
    );
    assert_eq!(
        backing,
        vec!["after.txt".to_string()],
        "B's backing folder must hold only after.txt"
    );
}

/// `[files] include` makes a name that matches an exclusion replicate, `[files] exclude` adds
/// exclusions. The harness has no config-extra knob: the peers are stopped, the table is
/// appended to each one's config and they are started again.
#[test]
fn files_include_overrides_the_default_exclusions() {
    let mut p = Peers::start_with(2, options());
    for i in 0..p.len() {
        p.stop(i);
    }
    for i in 0..p.len() {
        let config = p.mount(i).config().to_path_buf();
        let mut f = ok(
            OpenOptions::new().append(true).open(&config),
            "open the config",
        );
        ok(
            f.write_all(
                b"\n[files]\nexclude = [\"*.bak\"]\ninclude = [\"keep.tmp\", \"reports/*.tmp\"]\n",
            ),
            "append [files] to the config",
        );
    }
    for i in 0..p.len() {
        p.restart(i);
    }
    ok(sys::mkdir(p.file(A, "reports"), 0o755), "mkdir reports");
    write_new(&p.file(A, "keep.tmp"), b"kept\n", 0o644);
    write_new(&p.file(A, "reports/q3.TMP"), b"q3\n", 0o644);
    write_new(&p.file(A, "other.tmp"), b"never\n", 0o644);
    write_new(&p.file(A, "plan.bak"), b"never\n", 0o644);
    write_new(&p.file(A, "reports/~$q3.docx"), b"never\n", 0o644);
    write_new(&p.file(A, "after.txt"), b"last\n", 0o644);
    wait_content(&p, B, "keep.tmp", b"kept\n", "an included name");
    wait_content(&p, B, "reports/q3.TMP", b"q3\n", "an included path");
    wait_content(&p, B, "after.txt", b"last\n", "the file created last");
    let (drive, backing) = names_on(&p, B);
    let want: Vec<String> = ["after.txt", "keep.tmp", "reports"]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    assert_eq!(drive, want, "B's drive root");
    assert_eq!(backing, want, "B's backing folder");
    let mut reports: Vec<String> = ok(fs::read_dir(p.file(B, "reports")), "list reports")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    reports.sort();
    assert_eq!(reports, vec!["q3.TMP".to_string()], "B's reports folder");
}
