//! Differential test: random sequences of file operations over a small name pool (two
//! directory levels), applied to a plain directory and to the drive. Every operation's
//! outcome (Ok value or errno) must match, and afterwards the trees must be identical (names,
//! kinds, sizes, contents, modes, owners, symlink targets, link counts, hard-link groups,
//! xattrs) — on the drive and in its backing folder.
//!
//! Cases: `PEERFS_DIFF_CASES` (default 64, or `PROPTEST_CASES`); operations per case:
//! `PEERFS_DIFF_OPS` (default 50). proptest shrinks a failure to a minimal sequence; keep each
//! one as a named regression test at the end of this file.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, symlink};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use peerfs_tests::sys::{self, RENAME_EXCHANGE, RENAME_NOREPLACE};
use peerfs_tests::{DriveOptions, Kind, Outcome, Pair, outcome, pattern, snapshot, tree};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

/// One level: three names; two levels: every pair of them. Small on purpose, so operations
/// collide (rename over, link onto, rmdir of non-empty, ...).
const TOP: &[&str] = &["a", "b", "c"];
const NESTED: &[&str] = &[
    "a/a", "a/b", "a/c", "b/a", "b/b", "b/c", "c/a", "c/b", "c/c",
];
/// Symlink targets: relative only, never `..` (a top-level link to `../x` would point
/// outside the roots, where the plain folder and the drive legitimately differ).
const TARGETS: &[&str] = &["a", "b", "a/b", "c/a", "missing", ".", "b/"];
const XATTR_NAMES: &[&str] = &["user.one", "user.two"];
const MODES: &[u32] = &[
    0o644, 0o600, 0o755, 0o400, 0o000, 0o777, 0o4755, 0o2755, 0o1777,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flags {
    Plain,
    NoReplace,
    Exchange,
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        path: &'static str,
        mode: u32,
    },
    /// `open(O_WRONLY|O_CREAT)` then `pwrite`.
    Write {
        path: &'static str,
        offset: u32,
        len: u32,
        seed: u8,
    },
    Truncate {
        path: &'static str,
        len: u32,
    },
    Rename {
        from: &'static str,
        to: &'static str,
        flags: Flags,
    },
    Unlink {
        path: &'static str,
    },
    Mkdir {
        path: &'static str,
    },
    Rmdir {
        path: &'static str,
    },
    Link {
        from: &'static str,
        to: &'static str,
    },
    Symlink {
        target: &'static str,
        path: &'static str,
    },
    Chmod {
        path: &'static str,
        mode: u32,
    },
    Setxattr {
        path: &'static str,
        name: &'static str,
        len: u8,
        seed: u8,
    },
    Removexattr {
        path: &'static str,
        name: &'static str,
    },
    Read {
        path: &'static str,
    },
    Stat {
        path: &'static str,
    },
    Readdir {
        path: &'static str,
    },
    /// `open(O_RDWR)` into handle slot `slot` (replacing, and closing, what was there).
    Open {
        slot: u8,
        path: &'static str,
    },
    /// `pwrite` through an open handle.
    HWrite {
        slot: u8,
        offset: u32,
        len: u32,
        seed: u8,
    },
    /// Reads the whole file through an open handle (`pread` from 0 to `fstat` size).
    HRead {
        slot: u8,
    },
    /// `ftruncate` through an open handle.
    HTruncate {
        slot: u8,
        len: u32,
    },
    /// `fstat` of an open handle.
    HStat {
        slot: u8,
    },
    /// `close` of a handle slot.
    Close {
        slot: u8,
    },
}

/// Handle slots of one root, kept across the operations of a sequence.
#[derive(Default)]
struct Handles([Option<fs::File>; SLOTS]);

const SLOTS: usize = 2;

/// What an operation returned, compared between the plain folder and the drive.
#[derive(PartialEq)]
enum Out {
    Unit,
    Size(usize),
    Bytes(Vec<u8>),
    Stat {
        kind: Kind,
        mode: u32,
        size: Option<u64>,
        nlink: u64,
    },
    Names(Vec<Vec<u8>>),
    /// A handle operation on an empty slot (not an error of the filesystem's).
    NoHandle,
}

impl fmt::Debug for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Out::Unit => write!(f, "()"),
            Out::Size(n) => write!(f, "{n}"),
            Out::Bytes(b) => write!(f, "{} bytes (hash {:016x})", b.len(), fnv(b)),
            Out::Stat {
                kind,
                mode,
                size,
                nlink,
            } => write!(f, "{kind:?} mode {mode:o} size {size:?} nlink {nlink}"),
            Out::Names(n) => {
                let v: Vec<_> = n.iter().map(|b| String::from_utf8_lossy(b)).collect();
                write!(f, "{v:?}")
            }
            Out::NoHandle => write!(f, "no handle in that slot"),
        }
    }
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn stat_out(md: &fs::Metadata) -> Out {
    let kind = Kind::of(md.file_type());
    Out::Stat {
        kind,
        mode: md.mode() & 0o7777,
        size: (kind != Kind::Dir).then_some(md.size()),
        nlink: md.nlink(),
    }
}

fn apply(root: &Path, handles: &mut Handles, op: &Op) -> std::io::Result<Out> {
    let p = |s: &str| root.join(s);
    if let Op::Open { slot, path } = *op {
        let slot = &mut handles.0[usize::from(slot)];
        *slot = None;
        *slot = Some(OpenOptions::new().read(true).write(true).open(p(path))?);
        return Ok(Out::Unit);
    }
    let handle = |slot: u8| handles.0[usize::from(slot)].as_ref();
    Ok(match *op {
        Op::Create { path, mode } => {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(mode)
                .open(p(path))?;
            Out::Unit
        }
        Op::Write {
            path,
            offset,
            len,
            seed,
        } => {
            // O_CREAT (without O_EXCL): most sequences need files to exist to get anywhere.
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(p(path))?;
            let data = pattern(u64::from(seed), len as usize);
            Out::Size(f.write_at(&data, u64::from(offset))?)
        }
        Op::Truncate { path, len } => {
            sys::truncate(p(path), i64::from(len))?;
            Out::Unit
        }
        Op::Rename { from, to, flags } => {
            let flags = match flags {
                Flags::Plain => 0,
                Flags::NoReplace => RENAME_NOREPLACE,
                Flags::Exchange => RENAME_EXCHANGE,
            };
            sys::renameat2(p(from), p(to), flags)?;
            Out::Unit
        }
        Op::Unlink { path } => {
            fs::remove_file(p(path))?;
            Out::Unit
        }
        Op::Mkdir { path } => {
            sys::mkdir(p(path), 0o755)?;
            Out::Unit
        }
        Op::Rmdir { path } => {
            fs::remove_dir(p(path))?;
            Out::Unit
        }
        Op::Link { from, to } => {
            fs::hard_link(p(from), p(to))?;
            Out::Unit
        }
        Op::Symlink { target, path } => {
            symlink(target, p(path))?;
            Out::Unit
        }
        Op::Chmod { path, mode } => {
            sys::chmod(p(path), mode)?;
            Out::Unit
        }
        Op::Setxattr {
            path,
            name,
            len,
            seed,
        } => {
            sys::setxattr(p(path), name, &pattern(u64::from(seed), len.into()), 0)?;
            Out::Unit
        }
        Op::Removexattr { path, name } => {
            sys::removexattr(p(path), name)?;
            Out::Unit
        }
        Op::Read { path } => Out::Bytes(fs::read(p(path))?),
        Op::Stat { path } => stat_out(&fs::symlink_metadata(p(path))?),
        Op::Readdir { path } => {
            let mut names = Vec::new();
            for e in fs::read_dir(p(path))? {
                names.push(e?.file_name().as_bytes().to_vec());
            }
            names.sort();
            Out::Names(names)
        }
        Op::Open { .. } => unreachable!("handled above"),
        Op::HWrite {
            slot,
            offset,
            len,
            seed,
        } => match handle(slot) {
            None => Out::NoHandle,
            Some(f) => {
                let data = pattern(u64::from(seed), len as usize);
                Out::Size(f.write_at(&data, u64::from(offset))?)
            }
        },
        Op::HRead { slot } => match handle(slot) {
            None => Out::NoHandle,
            Some(f) => {
                let mut buf = vec![0u8; f.metadata()?.len() as usize];
                let mut at = 0;
                while at < buf.len() {
                    match f.read_at(&mut buf[at..], at as u64)? {
                        0 => break,
                        n => at += n,
                    }
                }
                buf.truncate(at);
                Out::Bytes(buf)
            }
        },
        Op::HTruncate { slot, len } => match handle(slot) {
            None => Out::NoHandle,
            Some(f) => {
                f.set_len(u64::from(len))?;
                Out::Unit
            }
        },
        Op::HStat { slot } => match handle(slot) {
            None => Out::NoHandle,
            Some(f) => stat_out(&f.metadata()?),
        },
        Op::Close { slot } => match handles.0[usize::from(slot)].take() {
            None => Out::NoHandle,
            Some(f) => {
                sys::close(f)?;
                Out::Unit
            }
        },
    })
}

/// Empties a root between cases and restores its own mode and xattrs (ops can reach the root
/// through a symlink to `.`).
fn reset(root: &Path) {
    sys::chmod(root, 0o755).expect("chmod root");
    for x in sys::listxattr(root).expect("listxattr root") {
        sys::removexattr(root, &x).expect("removexattr root");
    }
    for e in fs::read_dir(root).expect("read_dir root") {
        let path = e.expect("entry").path();
        let md = fs::symlink_metadata(&path).expect("lstat");
        if md.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        }
        .unwrap_or_else(|e| panic!("reset: remove {}: {e}", path.display()));
    }
}

/// Counts over a run, printed at its end so `--nocapture` shows how much was exercised.
#[derive(Default)]
struct Tally {
    cases: AtomicUsize,
    ops: AtomicUsize,
    ok: AtomicUsize,
}

/// Runs one sequence on both roots of `t`; the first divergence is the error.
fn check(t: &Pair, ops: &[Op], tally: &Tally) -> Result<(), String> {
    tally.cases.fetch_add(1, Ordering::Relaxed);
    for r in t.roots() {
        reset(r);
    }
    let (mut plain, mut drive) = (Handles::default(), Handles::default());
    for (i, op) in ops.iter().enumerate() {
        let expected: Outcome<Out> = outcome(apply(t.plain.path(), &mut plain, op));
        let got: Outcome<Out> = outcome(apply(t.mount.path(), &mut drive, op));
        tally.ops.fetch_add(1, Ordering::Relaxed);
        if expected.is_ok() {
            tally.ok.fetch_add(1, Ordering::Relaxed);
        }
        if got != expected {
            return Err(format!(
                "op #{i} {op:?}: the drive gave {got:?}, a plain directory gave {expected:?}"
            ));
        }
    }
    let expected = snapshot(t.plain.path()).map_err(|e| format!("snapshot plain: {e}"))?;
    for (what, root) in [
        ("drive", t.mount.path()),
        ("backing folder", t.mount.backing()),
    ] {
        let got = snapshot(root).map_err(|e| format!("snapshot of the {what}: {e}"))?;
        let d = tree::diff(&got, &expected);
        if !d.is_empty() {
            return Err(format!(
                "after {} ops the {what}'s tree differs from the plain folder's:\n{}",
                ops.len(),
                d.join("\n")
            ));
        }
    }
    Ok(())
}

fn path() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        3 => prop::sample::select(TOP),
        2 => prop::sample::select(NESTED),
    ]
}

fn dir_path() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        1 => Just("."),
        2 => prop::sample::select(TOP),
        1 => prop::sample::select(NESTED),
    ]
}

fn offset() -> impl Strategy<Value = u32> {
    prop_oneof![
        prop::sample::select(&[0u32, 1, 4095, 4096, 65_536, 131_072][..]),
        0u32..300_000,
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..20_000,
        1 => prop::sample::select(&[0u32, 1, 4096, 131_072, 150_000][..]),
    ]
}

fn slot() -> impl Strategy<Value = u8> {
    0..SLOTS as u8
}

fn flags() -> impl Strategy<Value = Flags> {
    prop_oneof![
        3 => Just(Flags::Plain),
        1 => Just(Flags::NoReplace),
        1 => Just(Flags::Exchange),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let mode = || prop::sample::select(MODES);
    prop_oneof![
        3 => (path(), mode()).prop_map(|(path, mode)| Op::Create { path, mode }),
        4 => (path(), offset(), len(), any::<u8>())
            .prop_map(|(path, offset, len, seed)| Op::Write { path, offset, len, seed }),
        2 => (path(), prop::sample::select(&[0u32, 1, 100, 4096, 70_000, 300_000][..]))
            .prop_map(|(path, len)| Op::Truncate { path, len }),
        3 => (path(), path(), flags()).prop_map(|(from, to, flags)| Op::Rename { from, to, flags }),
        2 => path().prop_map(|path| Op::Unlink { path }),
        3 => path().prop_map(|path| Op::Mkdir { path }),
        2 => path().prop_map(|path| Op::Rmdir { path }),
        2 => (path(), path()).prop_map(|(from, to)| Op::Link { from, to }),
        2 => (prop::sample::select(TARGETS), path())
            .prop_map(|(target, path)| Op::Symlink { target, path }),
        1 => (path(), mode()).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        1 => (path(), prop::sample::select(XATTR_NAMES), any::<u8>(), any::<u8>())
            .prop_map(|(path, name, len, seed)| Op::Setxattr { path, name, len, seed }),
        1 => (path(), prop::sample::select(XATTR_NAMES))
            .prop_map(|(path, name)| Op::Removexattr { path, name }),
        2 => path().prop_map(|path| Op::Read { path }),
        1 => path().prop_map(|path| Op::Stat { path }),
        1 => dir_path().prop_map(|path| Op::Readdir { path }),
        2 => (slot(), path()).prop_map(|(slot, path)| Op::Open { slot, path }),
        3 => (slot(), offset(), len(), any::<u8>())
            .prop_map(|(slot, offset, len, seed)| Op::HWrite { slot, offset, len, seed }),
        2 => slot().prop_map(|slot| Op::HRead { slot }),
        1 => (slot(), prop::sample::select(&[0u32, 10, 5000, 200_000][..]))
            .prop_map(|(slot, len)| Op::HTruncate { slot, len }),
        1 => slot().prop_map(|slot| Op::HStat { slot }),
        1 => slot().prop_map(|slot| Op::Close { slot }),
    ]
}

fn env_u32(name: &str) -> Option<u32> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn run_random_sequences(passthrough: bool) {
    let t = Pair::with(DriveOptions::passthrough(passthrough));
    let mut config = Config::default();
    if let Some(n) = env_u32("PEERFS_DIFF_CASES") {
        config.cases = n;
    } else if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 64;
    }
    // One shared drive, no regression files: shrunk failures become named tests below.
    config.failure_persistence = None;
    let max_ops = env_u32("PEERFS_DIFF_OPS").unwrap_or(50) as usize;
    let mut runner = TestRunner::new(config);
    let tally = Tally::default();
    let result = runner.run(&prop::collection::vec(op(), 1..=max_ops.max(1)), |ops| {
        check(&t, &ops, &tally).map_err(TestCaseError::fail)
    });
    eprintln!(
        "differential (passthrough = {passthrough}): {} sequences, {} ops, {} of them succeeded",
        tally.cases.load(Ordering::Relaxed),
        tally.ops.load(Ordering::Relaxed),
        tally.ok.load(Ordering::Relaxed)
    );
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, ops)) => panic!(
            "differential failure (passthrough = {passthrough}), minimal sequence of {} ops:\n\
             {ops:#?}\n{reason}",
            ops.len()
        ),
        Err(e) => panic!("differential run aborted: {e}"),
    }
}

#[test]
fn random_sequences_passthrough() {
    run_random_sequences(true);
}

#[test]
fn random_sequences_no_passthrough() {
    run_random_sequences(false);
}

/// Replays a fixed sequence on a fresh drive (both data paths); for regression tests.
fn replay(ops: &[Op]) {
    for passthrough in [true, false] {
        let t = Pair::with(DriveOptions::passthrough(passthrough));
        if let Err(e) = check(&t, ops, &Tally::default()) {
            panic!("passthrough = {passthrough}: {e}");
        }
    }
}

// ---- regression tests: hand-picked sequences and shrunk failures, kept by name ----

/// A file renamed over, linked, truncated and rewritten through its other name.
#[test]
fn regression_link_rename_truncate_write() {
    replay(&[
        Op::Create {
            path: "a",
            mode: 0o644,
        },
        Op::Write {
            path: "a",
            offset: 4095,
            len: 4097,
            seed: 1,
        },
        Op::Link { from: "a", to: "b" },
        Op::Mkdir { path: "c" },
        Op::Rename {
            from: "b",
            to: "c/d",
            flags: Flags::Plain,
        },
        Op::Truncate {
            path: "c/d",
            len: 100,
        },
        Op::Write {
            path: "a",
            offset: 50,
            len: 10,
            seed: 2,
        },
        Op::Stat { path: "a" },
        Op::Read { path: "c/d" },
    ]);
}

/// Exchanging a directory and a symlink to `.`, then writing through the moved link.
#[test]
fn regression_exchange_dir_and_dot_symlink() {
    replay(&[
        Op::Mkdir { path: "a" },
        Op::Symlink {
            target: ".",
            path: "b",
        },
        Op::Rename {
            from: "a",
            to: "b",
            flags: Flags::Exchange,
        },
        Op::Create {
            path: "a/c",
            mode: 0o600,
        },
        Op::Readdir { path: "." },
        Op::Chmod {
            path: "a",
            mode: 0o1777,
        },
        Op::Setxattr {
            path: "a",
            name: "user.one",
            len: 3,
            seed: 4,
        },
        Op::Rmdir { path: "b" },
    ]);
}

/// Shrunk from the first random run: the drive's `llistxattr` on any symlink failed with
/// EOPNOTSUPP where a plain directory lists no xattrs.
#[test]
fn regression_symlink_xattrs_listable() {
    replay(&[Op::Symlink {
        target: "a",
        path: "a",
    }]);
}
