//! rename on the drive: overwriting, directories onto directories, the errno of every refused
//! case, RENAME_NOREPLACE and RENAME_EXCHANGE, and open handles that must survive a rename of
//! their file or of an ancestor directory.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, symlink};
use std::path::Path;

use peerfs_tests::sys::{self, RENAME_EXCHANGE, RENAME_NOREPLACE};
use peerfs_tests::{Kind, Pair, fails, lstat};

fn ino(p: &Path) -> std::io::Result<u64> {
    Ok(fs::symlink_metadata(p)?.ino())
}

#[test]
fn rename_file_over_file() {
    let t = Pair::new();
    for r in t.roots() {
        fs::write(r.join("a"), b"from a").expect("create a");
        fs::write(r.join("b"), b"old b").expect("create b");
        let a_ino = ino(&r.join("a")).expect("ino a");
        fs::rename(r.join("a"), r.join("b")).expect("rename a b");
        assert_eq!(
            ino(&r.join("b")).expect("ino b"),
            a_ino,
            "{}: b is not a's inode after rename",
            r.display()
        );
    }
    let got = t.both_ok("state after rename a -> b", |r| {
        Ok((lstat(r.join("a")).is_err(), fs::read(r.join("b"))?))
    });
    assert_eq!(got, (true, b"from a".to_vec()));
    let got = t.both_ok("rename to the same name is a no-op", |r| {
        fs::rename(r.join("b"), r.join("b"))?;
        fs::read(r.join("b"))
    });
    assert_eq!(got, b"from a");
    let got = t.both_ok(
        "rename between two hard links of one inode is a no-op",
        |r| {
            fs::hard_link(r.join("b"), r.join("h"))?;
            fs::rename(r.join("b"), r.join("h"))?;
            Ok((lstat(r.join("b"))?.nlink, lstat(r.join("h"))?.nlink))
        },
    );
    assert_eq!(got, (2, 2));
    let got = t.both_ok("rename across directories", |r| {
        fs::create_dir(r.join("d1"))?;
        fs::create_dir(r.join("d2"))?;
        fs::write(r.join("d1/x"), b"x")?;
        fs::rename(r.join("d1/x"), r.join("d2/y"))?;
        let l1 = fs::read_dir(r.join("d1"))?.count();
        let l2 = fs::read_dir(r.join("d2"))?.count();
        Ok((l1, l2, fs::read(r.join("d2/y"))?))
    });
    assert_eq!(got, (0, 1, b"x".to_vec()));
    let got = t.both_ok("rename over a symlink replaces the link", |r| {
        fs::write(r.join("target"), b"t")?;
        symlink("target", r.join("link"))?;
        fs::write(r.join("src"), b"s")?;
        fs::rename(r.join("src"), r.join("link"))?;
        Ok((lstat(r.join("link"))?.kind, fs::read(r.join("target"))?))
    });
    assert_eq!(got, (Kind::File, b"t".to_vec()));
    let got = t.both_ok("renaming a symlink moves the link, not its target", |r| {
        symlink("target", r.join("l2"))?;
        fs::rename(r.join("l2"), r.join("d1/l2"))?;
        Ok((
            lstat(r.join("d1/l2"))?.kind,
            fs::read_link(r.join("d1/l2"))?,
        ))
    });
    assert_eq!(got, (Kind::Symlink, "target".into()));
    t.assert_same_tree();
}

#[test]
fn rename_directories() {
    let t = Pair::new();
    t.both_ok("setup", |r| {
        fs::create_dir_all(r.join("src/inner"))?;
        fs::write(r.join("src/inner/f"), b"deep")?;
        fs::create_dir(r.join("empty"))?;
        fs::create_dir(r.join("full"))?;
        fs::write(r.join("full/x"), b"")?;
        fs::write(r.join("file"), b"")
    });
    let got = t.both_ok("dir onto an empty dir", |r| {
        fs::rename(r.join("src"), r.join("empty"))?;
        Ok((
            lstat(r.join("src")).is_err(),
            fs::read(r.join("empty/inner/f"))?,
        ))
    });
    assert_eq!(got, (true, b"deep".to_vec()));
    let cases: &[peerfs_tests::ErrCase] = &[
        (
            "dir onto a non-empty dir",
            |r| fs::rename(r.join("empty"), r.join("full")),
            libc::ENOTEMPTY,
        ),
        (
            "file onto a dir",
            |r| fs::rename(r.join("file"), r.join("full")),
            libc::EISDIR,
        ),
        (
            "dir onto a file",
            |r| fs::rename(r.join("full"), r.join("file")),
            libc::ENOTDIR,
        ),
        (
            "dir into its own subdirectory",
            |r| fs::rename(r.join("empty"), r.join("empty/inner/moved")),
            libc::EINVAL,
        ),
        (
            "missing source",
            |r| fs::rename(r.join("missing"), r.join("x")),
            libc::ENOENT,
        ),
        (
            "into a missing directory",
            |r| fs::rename(r.join("file"), r.join("missing/x")),
            libc::ENOENT,
        ),
        (
            "to a 256-byte name",
            |r| fs::rename(r.join("file"), r.join("n".repeat(256))),
            libc::ENAMETOOLONG,
        ),
        (
            "rename of .",
            |r| fs::rename(r.join("full/."), r.join("dot")),
            libc::EBUSY,
        ),
        (
            "onto ..",
            |r| fs::rename(r.join("file"), r.join("full/..")),
            libc::EBUSY,
        ),
    ];
    for (what, op, errno) in cases {
        assert_eq!(t.both(what, op), fails(*errno), "{what}");
    }
    let got = t.both_ok("nlink of parents after moving a dir between them", |r| {
        fs::create_dir(r.join("p1"))?;
        fs::create_dir(r.join("p2"))?;
        fs::create_dir(r.join("p1/child"))?;
        let before = (lstat(r.join("p1"))?.nlink, lstat(r.join("p2"))?.nlink);
        fs::rename(r.join("p1/child"), r.join("p2/child"))?;
        let after = (lstat(r.join("p1"))?.nlink, lstat(r.join("p2"))?.nlink);
        let parent_ino_ok = ino(&r.join("p2/child/.."))? == ino(&r.join("p2"))?;
        Ok((before, after, parent_ino_ok))
    });
    assert_eq!(got, ((3, 2), (2, 3), true));
    t.assert_same_tree();
}

#[test]
fn rename_noreplace() {
    let t = Pair::new();
    t.both_ok("setup", |r| {
        fs::write(r.join("a"), b"a")?;
        fs::write(r.join("b"), b"b")
    });
    assert_eq!(
        t.both("RENAME_NOREPLACE onto an existing file", |r| {
            sys::renameat2(r.join("a"), r.join("b"), RENAME_NOREPLACE)
        }),
        fails(libc::EEXIST)
    );
    assert_eq!(
        t.both("RENAME_NOREPLACE onto a dangling symlink", |r| {
            symlink("nowhere", r.join("s"))?;
            sys::renameat2(r.join("a"), r.join("s"), RENAME_NOREPLACE)
        }),
        fails(libc::EEXIST)
    );
    let got = t.both_ok("RENAME_NOREPLACE onto a free name", |r| {
        sys::renameat2(r.join("a"), r.join("c"), RENAME_NOREPLACE)?;
        Ok((lstat(r.join("a")).is_err(), fs::read(r.join("c"))?))
    });
    assert_eq!(got, (true, b"a".to_vec()));
    assert_eq!(
        t.both("RENAME_NOREPLACE|RENAME_EXCHANGE", |r| {
            sys::renameat2(r.join("b"), r.join("c"), RENAME_NOREPLACE | RENAME_EXCHANGE)
        }),
        fails(libc::EINVAL)
    );
    t.assert_same_tree();
}

#[test]
fn rename_exchange() {
    let t = Pair::new();
    t.both_ok("setup", |r| {
        fs::write(r.join("f"), b"file")?;
        fs::create_dir(r.join("d"))?;
        fs::write(r.join("d/inside"), b"in d")?;
        fs::write(r.join("g"), b"other file")
    });
    let got = t.both_ok("RENAME_EXCHANGE file <-> dir", |r| {
        let (fi, di) = (ino(&r.join("f"))?, ino(&r.join("d"))?);
        sys::renameat2(r.join("f"), r.join("d"), RENAME_EXCHANGE)?;
        Ok((
            lstat(r.join("f"))?.kind,
            fs::read(r.join("f/inside"))?,
            fs::read(r.join("d"))?,
            ino(&r.join("f"))? == di && ino(&r.join("d"))? == fi,
        ))
    });
    assert_eq!(got, (Kind::Dir, b"in d".to_vec(), b"file".to_vec(), true));
    let got = t.both_ok("RENAME_EXCHANGE file <-> file across dirs", |r| {
        sys::renameat2(r.join("g"), r.join("f/inside"), RENAME_EXCHANGE)?;
        Ok((fs::read(r.join("g"))?, fs::read(r.join("f/inside"))?))
    });
    assert_eq!(got, (b"in d".to_vec(), b"other file".to_vec()));
    assert_eq!(
        t.both("RENAME_EXCHANGE with a missing target", |r| {
            sys::renameat2(r.join("g"), r.join("missing"), RENAME_EXCHANGE)
        }),
        fails(libc::ENOENT)
    );
    assert_eq!(
        t.both("RENAME_EXCHANGE a dir with its own child", |r| {
            sys::renameat2(r.join("f"), r.join("f/inside"), RENAME_EXCHANGE)
        }),
        fails(libc::EINVAL)
    );
    t.assert_same_tree();
}

#[test]
fn rename_of_open_file_keeps_handle_working() {
    let t = Pair::new();
    let got = t.both_ok("write through a handle after its file was renamed", |r| {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(r.join("old"))?;
        f.write_all(b"one ")?;
        fs::create_dir(r.join("elsewhere"))?;
        fs::rename(r.join("old"), r.join("elsewhere/new"))?;
        f.write_all(b"two ")?;
        f.set_len(8)?;
        f.write_all_at(b"three", 8)?;
        f.sync_all()?;
        let md = f.metadata()?;
        f.seek(SeekFrom::Start(0))?;
        let mut back = String::new();
        f.read_to_string(&mut back)?;
        Ok((
            back,
            fs::read(r.join("elsewhere/new"))?,
            md.nlink(),
            lstat(r.join("old")).is_err(),
        ))
    });
    assert_eq!(
        got,
        (
            "one two three".to_owned(),
            b"one two three".to_vec(),
            1,
            true
        )
    );
    let got = t.both_ok(
        "an overwritten target's open handle keeps the old data",
        |r| {
            fs::write(r.join("victim"), b"old content")?;
            let old = File::open(r.join("victim"))?;
            fs::write(r.join("replacement"), b"new content")?;
            fs::rename(r.join("replacement"), r.join("victim"))?;
            let mut s = String::new();
            (&old).read_to_string(&mut s)?;
            Ok((s, old.metadata()?.nlink(), fs::read(r.join("victim"))?))
        },
    );
    assert_eq!(got, ("old content".to_owned(), 0, b"new content".to_vec()));
    t.assert_same_tree();
}

#[test]
fn rename_of_ancestor_of_open_handles() {
    let t = Pair::new();
    let got = t.both_ok("rename a/ while a/b/c/f and a/b are open", |r| {
        fs::create_dir_all(r.join("a/b/c"))?;
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(r.join("a/b/c/f"))?;
        f.write_all(b"before ")?;
        let dir = sys::open(r.join("a/b"), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        fs::rename(r.join("a"), r.join("z"))?;
        fs::create_dir(r.join("a"))?; // a new, unrelated a/
        f.write_all(b"after")?;
        f.set_len(12)?;
        // Creating through the open directory lands in the renamed tree, not in the new a/.
        let mut g = sys::openat(
            &dir,
            "c/g",
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o644,
        )?;
        g.write_all(b"via dirfd")?;
        sys::mkdirat(&dir, "sub", 0o755)?;
        sys::unlinkat(&dir, "c/f", 0)?;
        let mut rest = String::new();
        f.seek(SeekFrom::Start(0))?;
        f.read_to_string(&mut rest)?;
        Ok((
            rest,
            fs::read(r.join("z/b/c/g"))?,
            lstat(r.join("z/b/sub"))?.kind,
            lstat(r.join("z/b/c/f")).is_err(),
            fs::read_dir(r.join("a"))?.count(),
        ))
    });
    assert_eq!(
        got,
        (
            "before after".to_owned(),
            b"via dirfd".to_vec(),
            Kind::Dir,
            true,
            0
        )
    );
    t.assert_same_tree();
}

#[test]
fn rename_updates_attributes_of_both_names() {
    // Cached attributes must not go stale: after a rename-over, stat of the new name is the
    // moved file, and the replaced file's other hard link shows its nlink dropped.
    let t = Pair::new();
    let got = t.both_ok("rename over a file that has another link", |r| {
        fs::write(r.join("victim"), b"v")?;
        fs::hard_link(r.join("victim"), r.join("victim-link"))?;
        fs::write(r.join("src"), b"source!")?;
        let _ = lstat(r.join("victim"))?; // prime the attribute cache
        let _ = lstat(r.join("victim-link"))?;
        fs::rename(r.join("src"), r.join("victim"))?;
        Ok((
            lstat(r.join("victim"))?.size,
            lstat(r.join("victim"))?.nlink,
            lstat(r.join("victim-link"))?.nlink,
        ))
    });
    assert_eq!(got, (7, 1, 1));
}
