//! getattr/setattr on the drive: stat fields, utimens (explicit, UTIME_NOW, UTIME_OMIT),
//! chmod, chown, truncate, and inode numbers — each compared with a plain directory.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirEntryExt, MetadataExt, OpenOptionsExt, symlink};
use std::path::Path;

use peerfs_tests::sys::{self, Time};
use peerfs_tests::{
    Kind, OTHER_GID, OTHER_UID, Pair, Stamp, as_user, lstat, now, pattern, stat, times,
};

fn create(path: &Path, mode: u32, data: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(data)
}

#[test]
fn new_file_and_dir_attributes() {
    let t = Pair::new();
    t.both_ok("create 0640 file with 1234 bytes", |r| {
        create(&r.join("f"), 0o640, &pattern(1, 1234))
    });
    let a = t.both_ok("lstat f", |r| lstat(r.join("f")));
    assert_eq!(a.kind, Kind::File);
    assert_eq!(a.mode, libc::S_IFREG | 0o640);
    assert_eq!((a.size, a.nlink, a.uid, a.gid), (1234, 1, 0, 0));

    t.both_ok("mkdir d 0750 with two subdirs and a file", |r| {
        sys::mkdir(r.join("d"), 0o750)?;
        fs::create_dir(r.join("d/a"))?;
        fs::create_dir(r.join("d/b"))?;
        fs::write(r.join("d/f"), b"x")
    });
    let d = t.both_ok("lstat d", |r| lstat(r.join("d")));
    assert_eq!(d.mode, libc::S_IFDIR | 0o750);
    assert_eq!(d.nlink, 4, "a directory's nlink is 2 + its subdirectories");

    let root = t.both_ok("lstat root", |r| lstat(r));
    assert_eq!(root.kind, Kind::Dir);
    assert_eq!(root.nlink, 3);

    t.both_ok("symlink s -> f", |r| symlink("f", r.join("s")));
    let s = t.both_ok("lstat s", |r| lstat(r.join("s")));
    assert_eq!((s.kind, s.size), (Kind::Symlink, 1));
    let through = t.both_ok("stat s (follows)", |r| stat(r.join("s")));
    assert_eq!(through, a);
    t.assert_same_tree();
}

#[test]
fn block_counts_match_backing() {
    let t = Pair::new();
    t.both_ok("write 1 MiB", |r| {
        fs::write(r.join("f"), pattern(2, 1 << 20))
    });
    let m = fs::symlink_metadata(t.mount.path().join("f")).expect("lstat on the drive");
    let b = fs::symlink_metadata(t.mount.backing().join("f")).expect("lstat in backing");
    assert!(
        m.blocks() >= 2048,
        "st_blocks {} too small for 1 MiB",
        m.blocks()
    );
    assert_eq!(
        m.blocks(),
        b.blocks(),
        "st_blocks differs from the backing file's"
    );
    assert!(m.blksize() > 0, "st_blksize is 0");
}

#[test]
fn utimens_explicit_times() {
    let t = Pair::new();
    t.both_ok("create f", |r| fs::write(r.join("f"), b"data"));
    t.both_ok("utimensat f explicit", |r| {
        sys::utimensat(
            r.join("f"),
            Time::At(1_000_000_000, 123_456_789),
            Time::At(1_500_000_000, 987_654_321),
            false,
        )
    });
    let tm = t.both_ok("times of f", |r| {
        times(r.join("f")).map(|t| (t.atime, t.mtime))
    });
    assert_eq!(
        tm,
        ((1_000_000_000, 123_456_789), (1_500_000_000, 987_654_321))
    );

    // Before 1970 and far future: both must round-trip.
    t.both_ok("utimensat f negative and far-future", |r| {
        sys::utimensat(
            r.join("f"),
            Time::At(-1_000, 5),
            Time::At(4_000_000_000, 0),
            false,
        )
    });
    let tm = t.both_ok("times of f", |r| {
        times(r.join("f")).map(|t| (t.atime, t.mtime))
    });
    assert_eq!(tm, ((-1_000, 5), (4_000_000_000, 0)));

    t.both_ok("mkdir d and set its times", |r| {
        fs::create_dir(r.join("d"))?;
        sys::utimensat(r.join("d"), Time::At(7, 7), Time::At(8, 8), false)
    });
    let tm = t.both_ok("times of d", |r| {
        times(r.join("d")).map(|t| (t.atime, t.mtime))
    });
    assert_eq!(tm, ((7, 7), (8, 8)));
}

fn within(stamp: Stamp, lo: Stamp, hi: Stamp) -> bool {
    // Filesystem timestamps come from the coarse clock: allow a second either way.
    stamp.0 >= lo.0 - 1 && stamp.0 <= hi.0 + 1
}

#[test]
fn utimens_now_and_omit() {
    let t = Pair::new();
    for r in t.roots() {
        fs::write(r.join("f"), b"data").expect("create f");
        sys::utimensat(r.join("f"), Time::At(100, 1), Time::At(200, 2), false).expect("set");

        let before = now();
        sys::utimensat(r.join("f"), Time::Now, Time::Now, false).expect("UTIME_NOW both");
        let after = now();
        let tm = times(r.join("f")).expect("times");
        assert!(
            within(tm.atime, before, after) && within(tm.mtime, before, after),
            "{}: UTIME_NOW gave atime {:?} mtime {:?}, expected within {before:?}..{after:?}",
            r.display(),
            tm.atime,
            tm.mtime
        );
        assert!(within(tm.ctime, before, after), "ctime {:?}", tm.ctime);
    }

    t.both_ok("set explicit, then omit atime", |r| {
        sys::utimensat(r.join("f"), Time::At(300, 3), Time::At(400, 4), false)?;
        sys::utimensat(r.join("f"), Time::Omit, Time::At(500, 5), false)?;
        Ok(())
    });
    let tm = t.both_ok("times after omitting atime", |r| {
        times(r.join("f")).map(|t| (t.atime, t.mtime))
    });
    assert_eq!(tm, ((300, 3), (500, 5)), "UTIME_OMIT changed atime");

    t.both_ok("omit mtime", |r| {
        sys::utimensat(r.join("f"), Time::At(600, 6), Time::Omit, false)
    });
    let tm = t.both_ok("times after omitting mtime", |r| {
        times(r.join("f")).map(|t| (t.atime, t.mtime))
    });
    assert_eq!(tm, ((600, 6), (500, 5)), "UTIME_OMIT changed mtime");

    t.both_ok("omit both (no-op)", |r| {
        sys::utimensat(r.join("f"), Time::Omit, Time::Omit, false)
    });
    let tm = t.both_ok("times after omitting both", |r| {
        times(r.join("f")).map(|t| (t.atime, t.mtime))
    });
    assert_eq!(tm, ((600, 6), (500, 5)));

    for r in t.roots() {
        let before = now();
        sys::utimensat(r.join("f"), Time::Omit, Time::Now, false).expect("mtime now");
        let after = now();
        let tm = times(r.join("f")).expect("times");
        assert_eq!(tm.atime, (600, 6), "{}: atime changed", r.display());
        assert!(
            within(tm.mtime, before, after),
            "{}: mtime {:?} not now",
            r.display(),
            tm.mtime
        );
    }
}

#[test]
fn futimens_on_open_file() {
    let t = Pair::new();
    let tm = t.both_ok("futimens through an open handle", |r| {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(r.join("f"))?;
        sys::futimens(&f, Time::At(11, 12), Time::At(13, 14))?;
        let a = times(r.join("f"))?;
        Ok((a.atime, a.mtime))
    });
    assert_eq!(tm, ((11, 12), (13, 14)));
}

#[test]
fn utimens_symlink_nofollow() {
    let t = Pair::new();
    t.both_ok("create f, symlink s -> f, set f's times", |r| {
        fs::write(r.join("f"), b"x")?;
        symlink("f", r.join("s"))?;
        sys::utimensat(r.join("f"), Time::At(1, 1), Time::At(2, 2), false)
    });
    let got = t.both_ok("utimensat(AT_SYMLINK_NOFOLLOW) on s", |r| {
        sys::utimensat(r.join("s"), Time::At(30, 0), Time::At(40, 0), true)?;
        let link = times(r.join("s"))?;
        let target = times(r.join("f"))?;
        Ok((link.atime, link.mtime, target.atime, target.mtime))
    });
    assert_eq!(got, ((30, 0), (40, 0), (1, 1), (2, 2)));
    let got = t.both_ok("utimensat following s changes f", |r| {
        sys::utimensat(r.join("s"), Time::At(50, 0), Time::At(60, 0), false)?;
        let target = times(r.join("f"))?;
        Ok((target.atime, target.mtime))
    });
    assert_eq!(got, ((50, 0), (60, 0)));
}

#[test]
fn write_and_truncate_update_mtime() {
    let t = Pair::new();
    for r in t.roots() {
        fs::write(r.join("f"), b"0123456789").expect("create");
        sys::utimensat(r.join("f"), Time::At(1000, 0), Time::At(1000, 0), false).expect("set");
        let mut f = OpenOptions::new()
            .write(true)
            .open(r.join("f"))
            .expect("open");
        f.write_all(b"abc").expect("write");
        let tm = times(r.join("f")).expect("times");
        assert_ne!(
            tm.mtime,
            (1000, 0),
            "{}: write did not update mtime",
            r.display()
        );
        drop(f);

        sys::utimensat(r.join("f"), Time::At(1000, 0), Time::At(1000, 0), false).expect("set");
        sys::truncate(r.join("f"), 4).expect("truncate");
        let tm = times(r.join("f")).expect("times");
        assert_ne!(
            tm.mtime,
            (1000, 0),
            "{}: truncate did not update mtime",
            r.display()
        );

        sys::utimensat(r.join("f"), Time::At(1000, 0), Time::At(1000, 0), false).expect("set");
        let before = now();
        sys::chmod(r.join("f"), 0o600).expect("chmod");
        let tm = times(r.join("f")).expect("times");
        assert_eq!(tm.mtime, (1000, 0), "{}: chmod changed mtime", r.display());
        assert!(
            tm.ctime.0 >= before.0 - 1,
            "{}: chmod did not update ctime ({:?} < {before:?})",
            r.display(),
            tm.ctime
        );
    }
}

#[test]
fn size_visible_while_file_is_open() {
    let t = Pair::new();
    let got = t.both_ok("write 100 bytes, lstat the path before close", |r| {
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(r.join("f"))?;
        f.write_all(&[7u8; 100])?;
        let by_path = lstat(r.join("f"))?.size;
        let by_fd = f.metadata()?.len();
        f.set_len(40)?;
        let after_ftruncate = lstat(r.join("f"))?.size;
        let other = OpenOptions::new().write(true).open(r.join("f"))?;
        other.set_len(5000)?;
        let by_first_fd = f.metadata()?.len();
        Ok((by_path, by_fd, after_ftruncate, by_first_fd))
    });
    assert_eq!(got, (100, 100, 40, 5000));
}

#[test]
fn chmod_modes() {
    let t = Pair::new();
    t.both_ok("create f and d", |r| {
        fs::write(r.join("f"), b"x")?;
        fs::create_dir(r.join("d"))
    });
    for mode in [
        0o600, 0o4755, 0o2755, 0o1777, 0o000, 0o7777, 0o6711, 0o444, 0o644,
    ] {
        let m = t.both_ok(&format!("chmod f {mode:o}"), |r| {
            sys::chmod(r.join("f"), mode)?;
            lstat(r.join("f"))
        });
        assert_eq!(m.perm(), mode, "chmod f {mode:o}");
        let m = t.both_ok(&format!("chmod d {mode:o}"), |r| {
            sys::chmod(r.join("d"), mode)?;
            lstat(r.join("d"))
        });
        assert_eq!(m.perm(), mode, "chmod d {mode:o}");
    }
    let m = t.both_ok("fchmod through an open handle", |r| {
        let f = fs::File::open(r.join("f"))?;
        sys::fchmod(&f, 0o751)?;
        lstat(r.join("f"))
    });
    assert_eq!(m.perm(), 0o751);
    t.assert_same_tree();
}

#[test]
fn chown_to_other_ids() {
    let t = Pair::new();
    t.both_ok("create f, d, s -> f", |r| {
        fs::write(r.join("f"), b"x")?;
        fs::create_dir(r.join("d"))?;
        symlink("f", r.join("s"))
    });
    let a = t.both_ok("chown f other:other", |r| {
        sys::chown(r.join("f"), Some(OTHER_UID), Some(OTHER_GID))?;
        lstat(r.join("f"))
    });
    assert_eq!((a.uid, a.gid), (OTHER_UID, OTHER_GID));
    let a = t.both_ok("chown f -1:0 (group only)", |r| {
        sys::chown(r.join("f"), None, Some(0))?;
        lstat(r.join("f"))
    });
    assert_eq!((a.uid, a.gid), (OTHER_UID, 0));
    let a = t.both_ok("chown f 0:-1 (owner only)", |r| {
        sys::chown(r.join("f"), Some(0), None)?;
        lstat(r.join("f"))
    });
    assert_eq!((a.uid, a.gid), (0, 0));
    let a = t.both_ok("chown d 1234:5678", |r| {
        sys::chown(r.join("d"), Some(1234), Some(5678))?;
        lstat(r.join("d"))
    });
    assert_eq!((a.uid, a.gid), (1234, 5678));
    let (link, target) = t.both_ok("lchown s changes the link, not f", |r| {
        sys::lchown(r.join("s"), Some(OTHER_UID), Some(OTHER_GID))?;
        Ok((lstat(r.join("s"))?, lstat(r.join("f"))?))
    });
    assert_eq!((link.uid, link.gid), (OTHER_UID, OTHER_GID));
    assert_eq!((target.uid, target.gid), (0, 0));
    let a = t.both_ok("fchown through an open handle", |r| {
        let f = fs::File::open(r.join("f"))?;
        sys::fchown(&f, Some(42), Some(43))?;
        lstat(r.join("f"))
    });
    assert_eq!((a.uid, a.gid), (42, 43));
    t.assert_same_tree();
}

#[test]
fn chown_clears_setuid_and_setgid() {
    let t = Pair::new();
    let a = t.both_ok("chmod 6755 then chown", |r| {
        fs::write(r.join("f"), b"x")?;
        sys::chmod(r.join("f"), 0o6755)?;
        sys::chown(r.join("f"), Some(OTHER_UID), None)?;
        lstat(r.join("f"))
    });
    assert_eq!(
        a.perm(),
        0o755,
        "chown of an executable must clear setuid/setgid"
    );
}

#[test]
fn write_by_other_user_clears_setuid() {
    let t = Pair::new();
    let m = t.both_ok("other user writes a 4777 file", |r| {
        let p = r.join("f");
        fs::write(&p, b"x")?;
        sys::chmod(&p, 0o4777)?;
        as_user(OTHER_UID, OTHER_GID, || {
            let mut f = OpenOptions::new().write(true).open(&p)?;
            f.write_all(b"y")?;
            Ok(0)
        })?;
        lstat(&p)
    });
    assert_eq!(m.perm(), 0o777, "a write by a non-owner must clear setuid");
}

#[test]
fn truncate_up_and_down() {
    let t = Pair::new();
    t.both_ok("create f", |r| fs::write(r.join("f"), b"hello world"));
    let got = t.both_ok("truncate(f, 5)", |r| {
        sys::truncate(r.join("f"), 5)?;
        Ok((lstat(r.join("f"))?.size, fs::read(r.join("f"))?))
    });
    assert_eq!(got, (5, b"hello".to_vec()));
    let got = t.both_ok("truncate(f, 100000)", |r| {
        sys::truncate(r.join("f"), 100_000)?;
        Ok((lstat(r.join("f"))?.size, fs::read(r.join("f"))?))
    });
    let mut expected = b"hello".to_vec();
    expected.resize(100_000, 0);
    assert_eq!(got, (100_000, expected));
    let got = t.both_ok("ftruncate(f, 3) then write at 10", |r| {
        let f = OpenOptions::new().write(true).open(r.join("f"))?;
        f.set_len(3)?;
        std::os::unix::fs::FileExt::write_all_at(&f, b"Z", 10)?;
        drop(f);
        fs::read(r.join("f"))
    });
    assert_eq!(got, b"hel\0\0\0\0\0\0\0Z".to_vec());
    let got = t.both_ok("truncate to 0", |r| {
        sys::truncate(r.join("f"), 0)?;
        fs::read(r.join("f"))
    });
    assert!(got.is_empty());
    assert_eq!(
        t.both("truncate a directory", |r| {
            fs::create_dir(r.join("d"))?;
            sys::truncate(r.join("d"), 0)
        }),
        peerfs_tests::fails(libc::EISDIR)
    );
    assert_eq!(
        t.both("truncate to a negative size", |r| sys::truncate(
            r.join("f"),
            -1
        )),
        peerfs_tests::fails(libc::EINVAL)
    );
    assert_eq!(
        t.both("truncate a missing file", |r| sys::truncate(
            r.join("nope"),
            1
        )),
        peerfs_tests::fails(libc::ENOENT)
    );
    t.assert_same_tree();
}

fn ino(path: &Path) -> u64 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()))
        .ino()
}

/// Evicts unused dentries and inodes, so the kernel forgets the drive's nodes and must look
/// them up again (FORGET, then LOOKUP).
fn drop_dentry_caches() {
    fs::write("/proc/sys/vm/drop_caches", "2").expect("write /proc/sys/vm/drop_caches");
}

#[test]
fn inode_numbers_stable_and_shared_by_hard_links() {
    let t = Pair::new();
    for r in t.roots() {
        fs::write(r.join("f"), b"x").expect("create f");
        fs::write(r.join("other"), b"y").expect("create other");
        fs::create_dir(r.join("d")).expect("mkdir d");
        let f1 = ino(&r.join("f"));
        let d1 = ino(&r.join("d"));
        assert_eq!(
            f1,
            ino(&r.join("f")),
            "{}: ino changed between lookups",
            r.display()
        );
        assert_ne!(
            f1,
            ino(&r.join("other")),
            "{}: two files share an ino",
            r.display()
        );
        assert_ne!(f1, d1, "{}: file and dir share an ino", r.display());

        fs::hard_link(r.join("f"), r.join("d/h")).expect("link");
        assert_eq!(
            ino(&r.join("d/h")),
            f1,
            "{}: hard link has another ino",
            r.display()
        );

        fs::rename(r.join("f"), r.join("g")).expect("rename");
        assert_eq!(
            ino(&r.join("g")),
            f1,
            "{}: rename changed the ino",
            r.display()
        );
        fs::rename(r.join("d"), r.join("e")).expect("rename dir");
        assert_eq!(
            ino(&r.join("e")),
            d1,
            "{}: dir rename changed the ino",
            r.display()
        );
        assert_eq!(ino(&r.join("e/h")), f1);

        drop_dentry_caches();
        assert_eq!(
            ino(&r.join("g")),
            f1,
            "{}: ino changed after the kernel forgot the node",
            r.display()
        );
        assert_eq!(ino(&r.join("e")), d1);
        assert_eq!(ino(&r.join("e/h")), f1);
        assert_eq!(
            ino(&r.join("e/..")),
            ino(r),
            "{}: e/.. is not the root",
            r.display()
        );

        let from_readdir = fs::read_dir(r.join("e"))
            .expect("read_dir")
            .map(|e| e.expect("entry"))
            .find(|e| e.file_name() == "h")
            .expect("h listed")
            .ino();
        assert_eq!(
            from_readdir,
            f1,
            "{}: readdir's d_ino differs from stat's",
            r.display()
        );
    }
}

#[test]
fn stat_errors() {
    let t = Pair::new();
    t.both_ok("create f", |r| fs::write(r.join("f"), b"x"));
    assert_eq!(
        t.both("lstat missing", |r| lstat(r.join("missing"))),
        peerfs_tests::fails(libc::ENOENT)
    );
    assert_eq!(
        t.both("lstat through a file", |r| lstat(r.join("f/x"))),
        peerfs_tests::fails(libc::ENOTDIR)
    );
    assert_eq!(
        t.both("stat a dangling symlink", |r| {
            symlink("nowhere", r.join("s"))?;
            stat(r.join("s"))
        }),
        peerfs_tests::fails(libc::ENOENT)
    );
    assert_eq!(
        t.both("lstat a 256-byte name", |r| lstat(r.join("n".repeat(256)))),
        peerfs_tests::fails(libc::ENAMETOOLONG)
    );
}
