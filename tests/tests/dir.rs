//! Directories on the drive: mkdir/rmdir and their errors, readdir completeness (odd names,
//! every file kind, 5,000 entries), d_type, `.`/`..`, and partial or interleaved reads
//! (telldir/seekdir/rewinddir, unlink-while-reading as `rm -rf` does).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::Path;

use peerfs_tests::sys::{self, DirStream, RawEntry};
use peerfs_tests::{Kind, Pair, fails, lstat};

/// Names and kinds of a directory through std's `read_dir`, sorted.
fn listing(dir: &Path) -> std::io::Result<Vec<(Vec<u8>, Kind)>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        v.push((e.file_name().as_bytes().to_vec(), Kind::of(e.file_type()?)));
    }
    v.sort();
    Ok(v)
}

fn names(entries: &[RawEntry]) -> Vec<Vec<u8>> {
    entries.iter().map(|e| e.name.clone()).collect()
}

fn is_dot(e: &RawEntry) -> bool {
    e.name == b"." || e.name == b".."
}

#[test]
fn mkdir_and_rmdir_errors() {
    let t = Pair::new();
    t.both_ok("mkdir d, create f", |r| {
        fs::create_dir(r.join("d"))?;
        fs::write(r.join("f"), b"x")
    });
    let cases: &[peerfs_tests::ErrCase] = &[
        (
            "mkdir existing dir",
            |r| fs::create_dir(r.join("d")),
            libc::EEXIST,
        ),
        (
            "mkdir over a file",
            |r| fs::create_dir(r.join("f")),
            libc::EEXIST,
        ),
        (
            "mkdir over a dangling symlink",
            |r| {
                symlink("nowhere", r.join("dangling"))?;
                fs::create_dir(r.join("dangling"))
            },
            libc::EEXIST,
        ),
        (
            "mkdir in a missing parent",
            |r| fs::create_dir(r.join("no/sub")),
            libc::ENOENT,
        ),
        (
            "mkdir below a file",
            |r| fs::create_dir(r.join("f/sub")),
            libc::ENOTDIR,
        ),
        (
            "mkdir a 256-byte name",
            |r| fs::create_dir(r.join("n".repeat(256))),
            libc::ENAMETOOLONG,
        ),
        (
            "rmdir a non-empty dir",
            |r| {
                fs::create_dir(r.join("d/e"))?;
                fs::remove_dir(r.join("d"))
            },
            libc::ENOTEMPTY,
        ),
        (
            "rmdir missing",
            |r| fs::remove_dir(r.join("missing")),
            libc::ENOENT,
        ),
        (
            "rmdir a file",
            |r| fs::remove_dir(r.join("f")),
            libc::ENOTDIR,
        ),
        (
            "rmdir a symlink",
            |r| fs::remove_dir(r.join("dangling")),
            libc::ENOTDIR,
        ),
        (
            "rmdir d/e/.",
            |r| fs::remove_dir(r.join("d/e/.")),
            libc::EINVAL,
        ),
        (
            "rmdir d/e/..",
            |r| fs::remove_dir(r.join("d/e/..")),
            libc::ENOTEMPTY,
        ),
        (
            "unlink a dir",
            |r| fs::remove_file(r.join("d")),
            libc::EISDIR,
        ),
    ];
    for (what, op, errno) in cases {
        assert_eq!(t.both(what, op), fails(*errno), "{what}");
    }
    t.both_ok("rmdir d/e then d", |r| {
        fs::remove_dir(r.join("d/e"))?;
        fs::remove_dir(r.join("d"))
    });
    assert_eq!(
        t.both("lstat removed d", |r| lstat(r.join("d"))),
        fails(libc::ENOENT)
    );
    t.assert_same_tree();
}

#[test]
fn mkdir_modes_and_link_counts() {
    let t = Pair::new();
    for mode in [0o700, 0o1777, 0o2755, 0o777, 0o000] {
        let a = t.both_ok(&format!("mkdir mode {mode:o}"), |r| {
            let p = r.join(format!("m{mode:o}"));
            sys::mkdir(&p, mode)?;
            lstat(&p)
        });
        assert_eq!(a.kind, Kind::Dir);
        // mkdir ignores S_ISGID in its mode (it comes from a setgid parent only).
        assert_eq!(
            a.perm(),
            mode & 0o1777 & !0o022,
            "mkdir {mode:o} under umask 022"
        );
        assert_eq!(a.nlink, 2);
    }
    let n = t.both_ok("root nlink after 5 mkdirs", |r| lstat(r).map(|a| a.nlink));
    assert_eq!(n, 7);
    let n = t.both_ok("root nlink after one rmdir", |r| {
        fs::remove_dir(r.join("m700"))?;
        lstat(r).map(|a| a.nlink)
    });
    assert_eq!(n, 6);
    t.assert_same_tree();
}

fn odd_names() -> Vec<String> {
    let mut v: Vec<String> = [
        "plain",
        "with space",
        " leading space",
        "trailing space ",
        "é",
        "e\u{301}",
        "日本語のファイル名",
        "emoji 🎉 party",
        ".hidden",
        "..dots",
        "...",
        "-dash",
        "back\\slash",
        "tab\there",
        "new\nline",
        "quote\"s'",
        "star*?[x]",
        "UPPER",
        "upper",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.push("x".repeat(255));
    v.push("日".repeat(85)); // 255 bytes of UTF-8
    v
}

#[test]
fn readdir_lists_every_kind_and_odd_names() {
    let t = Pair::new();
    let names = odd_names();
    t.both_ok("create files with odd names", |r| {
        fs::create_dir(r.join("d"))?;
        for n in &names {
            fs::write(r.join("d").join(n), n.as_bytes())?;
        }
        fs::create_dir(r.join("d/subdir"))?;
        symlink("plain", r.join("d/link"))?;
        symlink("nowhere", r.join("d/dangling"))?;
        sys::mkfifo(r.join("d/fifo"), 0o644)
    });
    let list = t.both_ok("read_dir d", |r| listing(&r.join("d")));
    assert_eq!(list.len(), names.len() + 4);
    let raw = t.both_ok("raw readdir d (with . and .. and d_type)", |r| {
        sys::read_dir_raw(r.join("d"))
    });
    assert_eq!(raw.len(), names.len() + 6);
    for e in &raw {
        let expected = match e.name.as_slice() {
            b"." | b".." | b"subdir" => libc::DT_DIR,
            b"link" | b"dangling" => libc::DT_LNK,
            b"fifo" => libc::DT_FIFO,
            _ => libc::DT_REG,
        };
        assert_eq!(
            e.d_type,
            expected,
            "d_type of {:?}",
            String::from_utf8_lossy(&e.name)
        );
    }
    for n in &names {
        let content = t.both_ok(&format!("read {n:?}"), |r| fs::read(r.join("d").join(n)));
        assert_eq!(content, n.as_bytes());
    }
    assert_eq!(
        t.both("create a 256-byte name", |r| {
            fs::write(r.join("d").join("y".repeat(256)), b"")
        }),
        fails(libc::ENAMETOOLONG)
    );
    t.assert_same_tree();
}

#[test]
fn readdir_5000_entries() {
    let t = Pair::new();
    // Names of varying length so entries straddle the kernel's readdir buffer boundaries.
    let names: Vec<String> = (0..5000)
        .map(|i| format!("{i:05}-{}", "x".repeat(i % 120)))
        .collect();
    t.both_ok("create 5000 files", |r| {
        fs::create_dir(r.join("big"))?;
        for n in &names {
            fs::File::create(r.join("big").join(n))?;
        }
        Ok(())
    });
    for r in t.roots() {
        let mut d = DirStream::open(r.join("big")).expect("opendir");
        let all = d.rest().expect("readdir");
        let unique: BTreeSet<Vec<u8>> = all.iter().map(|e| e.name.clone()).collect();
        assert_eq!(
            all.len(),
            unique.len(),
            "{}: readdir returned duplicates",
            r.display()
        );
        assert_eq!(
            all.len(),
            5002,
            "{}: readdir returned {} entries",
            r.display(),
            all.len()
        );
    }
    let list = t.both_ok("read_dir big", |r| listing(&r.join("big")));
    let expected: BTreeSet<Vec<u8>> = names.iter().map(|n| n.as_bytes().to_vec()).collect();
    let got: BTreeSet<Vec<u8>> = list.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(got, expected);

    let list = t.both_ok("remove every other entry, list again", |r| {
        for n in names.iter().step_by(2) {
            fs::remove_file(r.join("big").join(n))?;
        }
        listing(&r.join("big"))
    });
    assert_eq!(list.len(), 2500);
    t.both_ok("remove_dir_all big", |r| fs::remove_dir_all(r.join("big")));
    t.assert_same_tree();
}

#[test]
fn unlink_while_reading_removes_everything() {
    // `rm -rf` reads a batch of entries, unlinks them, reads on. A drive that resumes a
    // listing by entry index skips entries and leaves the directory non-empty.
    let t = Pair::new();
    let left = t.both_ok("read 50, unlink them, read on", |r| {
        let d = r.join("d");
        fs::create_dir(&d)?;
        for i in 0..600 {
            fs::write(d.join(format!("file-{i:04}")), b"")?;
        }
        let mut stream = DirStream::open(&d)?;
        loop {
            let batch = stream.take(50)?;
            if batch.is_empty() {
                break;
            }
            for e in batch.iter().filter(|e| !is_dot(e)) {
                fs::remove_file(d.join(std::ffi::OsStr::from_bytes(&e.name)))?;
            }
        }
        drop(stream);
        Ok(fs::read_dir(&d)?.count())
    });
    assert_eq!(
        left, 0,
        "entries were skipped while unlinking during readdir"
    );
    t.both_ok("rmdir the emptied dir", |r| fs::remove_dir(r.join("d")));
}

#[test]
fn telldir_seekdir_rewinddir() {
    let t = Pair::new();
    t.both_ok("create 300 entries", |r| {
        fs::create_dir(r.join("d"))?;
        for i in 0..300 {
            fs::write(r.join(format!("d/e{i}")), b"")?;
        }
        Ok(())
    });
    for r in t.roots() {
        let mut d = DirStream::open(r.join("d")).expect("opendir");
        let mut seen = Vec::new();
        let mut marks = Vec::new();
        loop {
            marks.push((d.tell(), seen.len()));
            let batch = d.take(37).expect("readdir");
            if batch.is_empty() {
                break;
            }
            seen.extend(batch);
        }
        assert_eq!(
            seen.len(),
            302,
            "{}: first pass saw {}",
            r.display(),
            seen.len()
        );
        // Seek back to each mark (last first) and check the stream resumes exactly there.
        for (pos, index) in marks.iter().rev() {
            d.seek(*pos);
            let again = d.rest().expect("readdir after seekdir");
            assert_eq!(
                names(&again),
                names(&seen[*index..]),
                "{}: seekdir to the position of entry {index} resumed elsewhere",
                r.display()
            );
        }
        d.rewind();
        let all = d.rest().expect("readdir after rewinddir");
        assert_eq!(names(&all), names(&seen), "{}: rewinddir", r.display());
    }
}

#[test]
fn interleaved_and_abandoned_streams() {
    let t = Pair::new();
    t.both_ok("create 1000 entries", |r| {
        fs::create_dir(r.join("d"))?;
        for i in 0..1000 {
            fs::write(r.join(format!("d/name-{i}")), b"")?;
        }
        Ok(())
    });
    let got = t.both_ok("two std read_dir streams advanced alternately", |r| {
        let mut a = fs::read_dir(r.join("d"))?;
        let mut b = fs::read_dir(r.join("d"))?;
        let (mut sa, mut sb) = (BTreeSet::new(), BTreeSet::new());
        let (mut na, mut nb) = (0, 0);
        loop {
            let ea = a.next().transpose()?;
            let eb = b.next().transpose()?;
            if let Some(e) = &ea {
                sa.insert(e.file_name());
                na += 1;
            }
            if let Some(e) = &eb {
                sb.insert(e.file_name());
                nb += 1;
            }
            if ea.is_none() && eb.is_none() {
                break;
            }
        }
        Ok((na, nb, sa == sb, sa.len()))
    });
    assert_eq!(got, (1000, 1000, true, 1000));
    let got = t.both_ok("abandon a partial read, list again", |r| {
        let partial: Vec<_> = fs::read_dir(r.join("d"))?.take(10).collect();
        drop(partial);
        listing(&r.join("d")).map(|l| l.len())
    });
    assert_eq!(got, 1000);
    let got = t.both_ok("listing sees changes made after a previous listing", |r| {
        let before = listing(&r.join("d"))?.len();
        fs::write(r.join("d/new"), b"")?;
        fs::rename(r.join("d/name-0"), r.join("d/renamed"))?;
        fs::remove_file(r.join("d/name-1"))?;
        let after = listing(&r.join("d"))?;
        Ok((before, after))
    });
    assert_eq!(got.1.len(), 1000);
    assert!(got.1.iter().any(|(n, _)| n == b"renamed"));
    assert!(!got.1.iter().any(|(n, _)| n == b"name-0"));
    t.assert_same_tree();
}

#[test]
fn nested_directories_and_remove_dir_all() {
    let t = Pair::new();
    t.both_ok("build a 6-level tree", |r| {
        let mut p = r.to_path_buf();
        for level in 0..6 {
            p.push(format!("level{level}"));
            fs::create_dir(&p)?;
            for i in 0..5 {
                fs::write(p.join(format!("f{i}")), format!("{level}/{i}"))?;
            }
        }
        Ok(())
    });
    t.assert_same_tree();
    t.both_ok("remove_dir_all", |r| fs::remove_dir_all(r.join("level0")));
    let list = t.both_ok("root listing", listing);
    assert!(list.is_empty());
}

#[test]
fn paths_longer_than_path_max() {
    // 20 levels of 250-byte names: over 5,000 bytes, beyond PATH_MAX, reachable only through
    // *at calls. A drive that keeps path strings fails here (the pjdfstest probe).
    let t = Pair::new();
    let name = "d".repeat(250);
    let got = t.both_ok(
        "build and use a tree deeper than PATH_MAX with *at calls",
        |r| {
            let mut dir = sys::open(r, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            for _ in 0..20 {
                sys::mkdirat(&dir, &name, 0o755)?;
                dir = sys::openat(&dir, &name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            }
            let mut f = sys::openat(
                &dir,
                "leaf",
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                0o644,
            )?;
            std::io::Write::write_all(&mut f, b"deep")?;
            sys::mkdirat(&dir, "sub", 0o700)?;
            let sub = sys::openat(&dir, "sub", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            let g = sys::openat(&sub, "g", libc::O_WRONLY | libc::O_CREAT, 0o600)?;
            drop(g);
            sys::unlinkat(&sub, "g", 0)?;
            sys::unlinkat(&dir, "sub", libc::AT_REMOVEDIR)?;
            let md = f.metadata()?;
            Ok((md.len(), md.nlink()))
        },
    );
    assert_eq!(got, (4, 1));
    let deep = |r: &Path| {
        let mut p = r.to_path_buf();
        for _ in 0..20 {
            p.push(&name);
        }
        p.join("leaf")
    };
    assert_eq!(
        t.both("lstat the leaf by its full path", |r| lstat(deep(r))),
        fails(libc::ENAMETOOLONG)
    );
    t.both_ok("remove_dir_all of the deep tree", |r| {
        fs::remove_dir_all(r.join(&name))
    });
    t.assert_same_tree();
}

#[test]
fn removed_directory_still_open() {
    let t = Pair::new();
    let got = t.both_ok("rmdir a directory that is open", |r| {
        fs::create_dir(r.join("d"))?;
        let dir = sys::open(r.join("d"), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        fs::remove_dir(r.join("d"))?;
        let create = sys::openat(&dir, "x", libc::O_WRONLY | libc::O_CREAT, 0o644)
            .err()
            .and_then(|e| e.raw_os_error());
        let mkdir = sys::mkdirat(&dir, "y", 0o755)
            .err()
            .and_then(|e| e.raw_os_error());
        let nlink = dir.metadata()?.nlink();
        let fd_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir));
        let listing = sys::read_dir_raw(&fd_path)
            .map(|v| v.len())
            .map_err(|e| e.raw_os_error());
        let recreated = fs::create_dir(r.join("d")).is_ok();
        Ok((create, mkdir, nlink, listing, recreated))
    });
    assert_eq!(got.0, Some(libc::ENOENT), "create in a removed directory");
    assert_eq!(got.1, Some(libc::ENOENT), "mkdir in a removed directory");
    assert_eq!(got.2, 0, "nlink of a removed directory");
    assert!(got.4, "the name is free again after rmdir");
    t.assert_same_tree();
}
