//! statfs, access(), fallocate, permission checks for a non-root user, setgid directories,
//! and the drive's shutdown on SIGTERM.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, symlink};
use std::path::Path;

use peerfs_tests::sys::{self, Time};
use peerfs_tests::{
    Kind, Mount, OTHER_GID, OTHER_UID, Pair, as_user, fails, is_mounted, lstat, pattern,
};

#[test]
fn statfs_is_the_backing_filesystems() {
    let m = Mount::new();
    let drive = sys::statfs(m.path()).expect("statfs on the drive");
    let backing = sys::statfs(m.backing()).expect("statfs of the backing");
    assert_eq!(
        drive.fs_type,
        sys::FUSE_SUPER_MAGIC,
        "f_type {:#x}",
        drive.fs_type
    );
    let total = |s: &sys::StatFs| s.blocks * s.frsize;
    assert_eq!(
        total(&drive),
        total(&backing),
        "total size: {drive:?} vs {backing:?}"
    );
    let free = |s: &sys::StatFs| (s.bfree * s.frsize) as i128;
    let slack = 256i128 << 20; // other tests write concurrently
    assert!(
        (free(&drive) - free(&backing)).abs() < slack,
        "free space differs: {drive:?} vs {backing:?}"
    );
    assert!(drive.bavail <= drive.bfree, "{drive:?}");
    assert_eq!(drive.files, backing.files, "{drive:?} vs {backing:?}");
    assert!(drive.ffree > 0 && drive.ffree <= drive.files, "{drive:?}");
    assert_eq!(drive.namelen, 255, "{drive:?}");
    assert!(drive.bsize > 0 && drive.frsize > 0, "{drive:?}");
    let in_subdir = {
        fs::create_dir(m.path().join("d")).expect("mkdir");
        sys::statfs(m.path().join("d")).expect("statfs of a subdir")
    };
    assert_eq!(in_subdir.blocks, drive.blocks);
}

fn setup_modes(r: &Path) -> std::io::Result<()> {
    for (name, mode) in [
        ("m0000", 0o000),
        ("m0644", 0o644),
        ("m0600", 0o600),
        ("m0100", 0o100),
        ("m0755", 0o755),
        ("m0666", 0o666),
        ("m0004", 0o004),
    ] {
        fs::write(r.join(name), b"#!/bin/sh\n")?;
        sys::chmod(r.join(name), mode)?;
    }
    sys::mkdir(r.join("closed"), 0o755)?;
    fs::write(r.join("closed/inner"), b"")?;
    sys::chmod(r.join("closed/inner"), 0o666)?;
    sys::chmod(r.join("closed"), 0o700)?;
    sys::mkdir(r.join("dir0000"), 0o755)?;
    sys::chmod(r.join("dir0000"), 0o000)
}

/// (name, access mode, errno expected for a non-root user; 0 = allowed).
const ACCESS_CASES: &[(&str, i32, i32)] = &[
    ("m0000", libc::R_OK | libc::W_OK, libc::EACCES),
    ("m0000", libc::X_OK, libc::EACCES),
    ("m0644", libc::R_OK, 0),
    ("m0644", libc::W_OK, libc::EACCES),
    ("m0644", libc::X_OK, libc::EACCES),
    ("m0600", libc::R_OK, libc::EACCES),
    ("m0100", libc::X_OK, libc::EACCES),
    ("m0755", libc::R_OK | libc::X_OK, 0),
    ("m0755", libc::W_OK, libc::EACCES),
    ("m0666", libc::W_OK, 0),
    ("m0004", libc::R_OK, 0),
    ("closed", libc::X_OK, libc::EACCES),
    ("closed/inner", libc::W_OK, libc::EACCES),
    ("closed/inner", libc::F_OK, libc::EACCES),
    ("dir0000", libc::X_OK, libc::EACCES),
    ("dir0000", libc::R_OK | libc::W_OK, libc::EACCES),
    ("missing", libc::F_OK, libc::ENOENT),
];

fn mode_name(m: i32) -> String {
    if m == libc::F_OK {
        return "F_OK".into();
    }
    let mut v = Vec::new();
    for (bit, n) in [
        (libc::R_OK, "R_OK"),
        (libc::W_OK, "W_OK"),
        (libc::X_OK, "X_OK"),
    ] {
        if m & bit != 0 {
            v.push(n);
        }
    }
    v.join("|")
}

#[test]
fn access_as_root() {
    let t = Pair::new();
    t.both_ok("setup", setup_modes);
    let mut results = Vec::new();
    for (name, mode, _) in ACCESS_CASES {
        let r = t.both(
            &format!("access({name}, {}) as root", mode_name(*mode)),
            |r| sys::access(r.join(name), *mode),
        );
        results.push(((*name, mode_name(*mode)), r));
    }
    // The plain directory is the reference; spot-check that it behaves as expected too.
    let get = |n: &str, m: i32| {
        results
            .iter()
            .find(|((name, mode), _)| *name == n && *mode == mode_name(m))
            .map(|(_, r)| *r)
            .expect("case present")
    };
    assert_eq!(get("m0000", libc::R_OK | libc::W_OK), Ok(()));
    assert_eq!(get("m0644", libc::X_OK), fails(libc::EACCES));
    assert_eq!(get("m0100", libc::X_OK), Ok(()));
    assert_eq!(get("missing", libc::F_OK), fails(libc::ENOENT));
}

#[test]
fn access_as_other_user() {
    let t = Pair::new();
    t.both_ok("setup", setup_modes);
    for (name, mode, errno) in ACCESS_CASES {
        let what = format!("access({name}, {}) as uid {OTHER_UID}", mode_name(*mode));
        let r = t.both(&what, |r| {
            let p = r.join(name);
            as_user(OTHER_UID, OTHER_GID, || sys::access(&p, *mode).map(|()| 0))
        });
        let expected = if *errno == 0 { Ok(0) } else { fails(*errno) };
        assert_eq!(r, expected, "{what}");
    }
}

#[test]
fn fallocate_modes() {
    let t = Pair::new();
    let got = t.both_ok("fallocate(0) extends the file with zeros", |r| {
        let f = File::create(r.join("f"))?;
        sys::fallocate(&f, 0, 0, 1 << 20)?;
        let md = f.metadata()?;
        Ok((
            md.len(),
            md.blocks() >= 2048,
            fs::read(r.join("f"))?.iter().all(|b| *b == 0),
        ))
    });
    assert_eq!(got, (1 << 20, true, true));
    let got = t.both_ok(
        "FALLOC_FL_KEEP_SIZE allocates past EOF without growing",
        |r| {
            let f = OpenOptions::new().write(true).open(r.join("f"))?;
            let before = f.metadata()?.blocks();
            sys::fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20)?;
            let md = f.metadata()?;
            Ok((md.len(), md.blocks() > before))
        },
    );
    assert_eq!(got, (1 << 20, true));
    let data = pattern(21, 256 * 1024);
    let got = t.both_ok("FALLOC_FL_PUNCH_HOLE zeroes a range and frees it", |r| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(r.join("g"))?;
        f.write_all_at(&data, 0)?;
        f.sync_all()?;
        let before = f.metadata()?.blocks();
        sys::fallocate(
            &f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            64 * 1024,
            64 * 1024,
        )?;
        let md = f.metadata()?;
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 0)?;
        Ok((md.len(), md.blocks() < before, back))
    });
    let mut expected = data.clone();
    expected[64 * 1024..128 * 1024].fill(0);
    assert_eq!((got.0, got.1), (data.len() as u64, true));
    peerfs_tests::assert_bytes_eq(&got.2, &expected, "after punching a hole");
    assert_eq!(
        t.both("FALLOC_FL_PUNCH_HOLE without KEEP_SIZE", |r| {
            let f = OpenOptions::new().write(true).open(r.join("g"))?;
            sys::fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096)
        }),
        fails(libc::EOPNOTSUPP)
    );
    let got = t.both_ok("FALLOC_FL_ZERO_RANGE", |r| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(r.join("g"))?;
        sys::fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 200_000, 100_000)?;
        let mut back = Vec::new();
        File::open(r.join("g"))?.read_to_end(&mut back)?;
        Ok((f.metadata()?.len(), back))
    });
    expected[200_000..].fill(0);
    expected.resize(300_000, 0);
    assert_eq!(got.0, 300_000);
    peerfs_tests::assert_bytes_eq(&got.1, &expected, "after zeroing a range");
    assert_eq!(
        t.both("fallocate on a read-only fd", |r| {
            let f = File::open(r.join("g"))?;
            sys::fallocate(&f, 0, 0, 10)
        }),
        fails(libc::EBADF)
    );
    assert_eq!(
        t.both("fallocate with a zero length", |r| {
            let f = OpenOptions::new().write(true).open(r.join("g"))?;
            sys::fallocate(&f, 0, 0, 0)
        }),
        fails(libc::EINVAL)
    );
    t.assert_same_tree();
}

/// Runs `f` as the other user and returns its outcome as `io::Result<()>`.
fn other(f: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
    as_user(OTHER_UID, OTHER_GID, || f().map(|()| 0)).map(|_| ())
}

#[test]
fn non_root_user_is_held_to_permissions() {
    let t = Pair::new();
    t.both_ok(
        "root creates a 0644 file, a 0777 dir and a sticky dir",
        |r| {
            fs::write(r.join("rootfile"), b"root's")?;
            sys::mkdir(r.join("pub"), 0o755)?;
            sys::chmod(r.join("pub"), 0o777)?;
            sys::mkdir(r.join("sticky"), 0o755)?;
            sys::chmod(r.join("sticky"), 0o1777)?;
            fs::write(r.join("sticky/rootfile"), b"")?;
            sys::chmod(r.join("sticky/rootfile"), 0o666)
        },
    );
    let denied: &[peerfs_tests::ErrCase] = &[
        (
            "open a root 0644 file for writing",
            |r| {
                OpenOptions::new()
                    .write(true)
                    .open(r.join("rootfile"))
                    .map(|_| ())
            },
            libc::EACCES,
        ),
        (
            "truncate a root 0644 file",
            |r| sys::truncate(r.join("rootfile"), 0),
            libc::EACCES,
        ),
        (
            "create in a root 0755 dir",
            |r| fs::write(r.join("mine"), b""),
            libc::EACCES,
        ),
        (
            "unlink in a root 0755 dir",
            |r| fs::remove_file(r.join("rootfile")),
            libc::EACCES,
        ),
        (
            "mkdir in a root 0755 dir",
            |r| fs::create_dir(r.join("mydir")),
            libc::EACCES,
        ),
        (
            "chmod root's file",
            |r| sys::chmod(r.join("rootfile"), 0o666),
            libc::EPERM,
        ),
        (
            "chown root's file to self",
            |r| sys::chown(r.join("rootfile"), Some(OTHER_UID), None),
            libc::EPERM,
        ),
        (
            "set explicit times on root's file",
            |r| sys::utimensat(r.join("rootfile"), Time::At(1, 0), Time::At(1, 0), false),
            libc::EPERM,
        ),
        (
            "UTIME_NOW on root's unwritable file",
            |r| sys::utimensat(r.join("rootfile"), Time::Now, Time::Now, false),
            libc::EACCES,
        ),
        (
            "setxattr user.* on root's file",
            |r| sys::setxattr(r.join("rootfile"), "user.x", b"1", 0),
            libc::EACCES,
        ),
        (
            "unlink root's file in a sticky dir",
            |r| fs::remove_file(r.join("sticky/rootfile")),
            libc::EPERM,
        ),
        (
            "rename root's file in a sticky dir",
            |r| fs::rename(r.join("sticky/rootfile"), r.join("sticky/stolen")),
            libc::EPERM,
        ),
    ];
    for (what, op, errno) in denied {
        let what = format!("as uid {OTHER_UID}: {what}");
        assert_eq!(t.both(&what, |r| other(|| op(r))), fails(*errno), "{what}");
    }
    let got = t.both_ok("as another uid: read root's 0644 file", |r| {
        let p = r.join("rootfile");
        as_user(OTHER_UID, OTHER_GID, || {
            let mut s = Vec::new();
            File::open(&p)?.read_to_end(&mut s)?;
            Ok(s.len() as u64)
        })
    });
    assert_eq!(got, 6);
    t.both_ok(
        "as another uid: create a file, dir, symlink, fifo in a 0777 dir",
        |r| {
            let p = r.join("pub");
            other(|| {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o640)
                    .open(p.join("mine"))?;
                f.write_all(b"mine")?;
                sys::mkdir(p.join("mydir"), 0o750)?;
                symlink("mine", p.join("mylink"))?;
                sys::mkfifo(p.join("myfifo"), 0o600)?;
                fs::hard_link(p.join("mine"), p.join("mine2"))?;
                fs::rename(p.join("mine2"), p.join("mydir/mine3"))?;
                sys::chmod(p.join("mine"), 0o600)?;
                sys::setxattr(p.join("mine"), "user.owner", b"other", 0)?;
                Ok(())
            })
        },
    );
    for name in ["mine", "mydir", "mylink", "myfifo", "mydir/mine3"] {
        let a = t.both_ok(&format!("owner of pub/{name}"), |r| {
            lstat(r.join("pub").join(name))
        });
        assert_eq!(
            (a.uid, a.gid),
            (OTHER_UID, OTHER_GID),
            "pub/{name} must belong to its creator"
        );
    }
    t.both_ok("as another uid: unlink own file in the sticky dir", |r| {
        let p = r.join("sticky");
        other(|| {
            fs::write(p.join("own"), b"")?;
            fs::remove_file(p.join("own"))
        })
    });
    t.assert_same_tree();
}

#[test]
fn setgid_directory_inheritance() {
    const GROUP: u32 = 4242;
    let t = Pair::new();
    t.both_ok("mkdir sg, chown :4242, chmod 2777", |r| {
        sys::mkdir(r.join("sg"), 0o755)?;
        sys::chown(r.join("sg"), None, Some(GROUP))?;
        sys::chmod(r.join("sg"), 0o2777)?;
        sys::mkdir(r.join("nosg"), 0o755)?;
        sys::chmod(r.join("nosg"), 0o777)
    });
    let got = t.both_ok("root creates a file and a dir in sg", |r| {
        fs::write(r.join("sg/f"), b"")?;
        fs::create_dir(r.join("sg/sub"))?;
        Ok((lstat(r.join("sg/f"))?, lstat(r.join("sg/sub"))?))
    });
    assert_eq!((got.0.uid, got.0.gid), (0, GROUP));
    assert_eq!(
        (got.1.gid, got.1.perm() & 0o2000),
        (GROUP, 0o2000),
        "subdir inherits setgid"
    );
    let got = t.both_ok("another user (not in 4242) creates in sg and nosg", |r| {
        let (sg, nosg) = (r.join("sg"), r.join("nosg"));
        other(|| {
            fs::write(sg.join("o"), b"")?;
            fs::create_dir(sg.join("osub"))?;
            sys::mknod(sg.join("ofifo"), libc::S_IFIFO | 0o644, 0)?;
            symlink("o", sg.join("olink"))?;
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o2775)
                .open(sg.join("o-setgid"))?;
            fs::write(nosg.join("o"), b"")
        })?;
        Ok((
            lstat(r.join("sg/o"))?,
            lstat(r.join("sg/osub"))?,
            lstat(r.join("sg/ofifo"))?,
            lstat(r.join("sg/olink"))?,
            lstat(r.join("sg/o-setgid"))?,
            lstat(r.join("nosg/o"))?,
        ))
    });
    assert_eq!((got.0.uid, got.0.gid), (OTHER_UID, GROUP));
    assert_eq!((got.1.gid, got.1.perm() & 0o2000), (GROUP, 0o2000));
    assert_eq!(got.2.gid, GROUP);
    assert_eq!((got.3.kind, got.3.gid), (Kind::Symlink, GROUP));
    assert_eq!(
        (got.4.gid, got.4.perm()),
        (GROUP, 0o755),
        "a non-member's new file in a setgid dir loses S_ISGID (and umask applies)"
    );
    assert_eq!(got.5.gid, OTHER_GID);
    t.assert_same_tree();
}

#[test]
fn sigterm_unmounts_cleanly() {
    let mut m = Mount::new();
    fs::write(m.path().join("f"), b"kept").expect("write through the drive");
    let status = m.stop();
    assert!(
        status.success(),
        "peerfs mount exited with {status} on SIGTERM:\n{}",
        m.output()
    );
    assert!(
        !is_mounted(m.path()),
        "{} is still mounted after SIGTERM",
        m.path().display()
    );
    assert_eq!(
        fs::read(m.backing().join("f")).expect("backing file"),
        b"kept"
    );
}

/// One worker's share of [`concurrent_operations_from_threads`]: its own directory, so the
/// result does not depend on the interleaving.
fn worker(root: &Path, id: usize) -> std::io::Result<()> {
    let d = root.join(format!("worker{id}"));
    fs::create_dir(&d)?;
    for i in 0..150usize {
        let p = d.join(format!("f{i}"));
        fs::write(&p, pattern((id * 1000 + i) as u64, 1000 + i * 37))?;
        if i % 3 == 0 {
            fs::rename(&p, d.join(format!("renamed{i}")))?;
        } else if i % 5 == 0 {
            fs::hard_link(&p, d.join(format!("link{i}")))?;
        } else if i % 7 == 0 {
            fs::remove_file(&p)?;
        } else if i % 11 == 0 {
            sys::setxattr(&p, "user.i", i.to_string().as_bytes(), 0)?;
            sys::chmod(&p, 0o600)?;
        }
    }
    Ok(())
}

#[test]
fn concurrent_operations_from_threads() {
    const WORKERS: usize = 4;
    let t = Pair::new();
    for id in 0..WORKERS {
        worker(t.plain.path(), id).expect("reference run on the plain folder");
    }
    let mnt = t.mount.path();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|id| s.spawn(move || worker(mnt, id)))
            .collect();
        // A reader walking the tree meanwhile must never see an error other than a name
        // vanishing between readdir and lstat.
        let reader = s.spawn(move || -> std::io::Result<usize> {
            let mut seen = 0;
            for _ in 0..20 {
                for e in fs::read_dir(mnt)? {
                    let dir = e?.path();
                    for f in fs::read_dir(&dir)? {
                        match fs::symlink_metadata(f?.path()) {
                            Ok(_) => seen += 1,
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            Ok(seen)
        });
        for (id, w) in workers.into_iter().enumerate() {
            let r = w.join().expect("worker thread panicked");
            assert!(r.is_ok(), "worker {id} on the drive failed: {r:?}");
        }
        let r = reader.join().expect("reader thread panicked");
        assert!(r.is_ok(), "the concurrent reader failed: {r:?}");
    });
    t.assert_same_tree();
}

#[test]
fn advisory_locks() {
    let t = Pair::new();
    let got = t.both_ok("flock and fcntl record locks", |r| {
        fs::write(r.join("f"), b"lock me")?;
        let a = File::open(r.join("f"))?;
        let b = File::open(r.join("f"))?;
        sys::flock(&a, libc::LOCK_EX | libc::LOCK_NB)?;
        let second = sys::flock(&b, libc::LOCK_EX | libc::LOCK_NB)
            .err()
            .and_then(|e| e.raw_os_error());
        sys::flock(&a, libc::LOCK_UN)?;
        sys::flock(&b, libc::LOCK_EX | libc::LOCK_NB)?;
        let c = OpenOptions::new()
            .read(true)
            .write(true)
            .open(r.join("f"))?;
        sys::setlk(&c, libc::F_WRLCK, 0, 4)?;
        let p = r.join("f");
        // Another process (a forked child, still root) conflicts on the locked range only.
        let try_lock = |start: i64| {
            as_user(0, 0, || {
                let f = OpenOptions::new().read(true).write(true).open(&p)?;
                sys::setlk(&f, libc::F_WRLCK, start, 1).map(|()| 0)
            })
            .err()
            .and_then(|e| e.raw_os_error())
        };
        let locked = try_lock(2);
        let free = try_lock(10);
        sys::setlk(&c, libc::F_UNLCK, 0, 4)?;
        let after_unlock = try_lock(2);
        Ok((second, locked, free, after_unlock))
    });
    assert_eq!(
        got,
        (Some(libc::EWOULDBLOCK), Some(libc::EAGAIN), None, None)
    );
}
