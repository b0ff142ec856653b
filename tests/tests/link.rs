//! Hard links and symlinks on the drive: link counts up and down (fresh, not cached), shared
//! content, refused links, symlink/readlink with dangling, odd and maximal-length targets.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, symlink};
use std::path::PathBuf;

use peerfs_tests::{Kind, Pair, fails, lstat, stat};

#[test]
fn hard_link_counts_and_shared_content() {
    let t = Pair::new();
    let got = t.both_ok("link f twice, watch nlink through every name", |r| {
        fs::write(r.join("f"), b"shared")?;
        fs::create_dir(r.join("d"))?;
        let n0 = lstat(r.join("f"))?.nlink; // primes the cache of f's attributes
        fs::hard_link(r.join("f"), r.join("g"))?;
        let n1 = (lstat(r.join("f"))?.nlink, lstat(r.join("g"))?.nlink);
        fs::hard_link(r.join("g"), r.join("d/h"))?;
        let n2 = (
            lstat(r.join("f"))?.nlink,
            lstat(r.join("g"))?.nlink,
            lstat(r.join("d/h"))?.nlink,
        );
        fs::remove_file(r.join("g"))?;
        let n3 = (lstat(r.join("f"))?.nlink, lstat(r.join("d/h"))?.nlink);
        fs::remove_file(r.join("f"))?;
        let n4 = lstat(r.join("d/h"))?.nlink;
        Ok((n0, n1, n2, n3, n4))
    });
    assert_eq!(got, (1, (2, 2), (3, 3, 3), (2, 2), 1));

    let got = t.both_ok("writes through one name are read through the other", |r| {
        fs::hard_link(r.join("d/h"), r.join("k"))?;
        let mut w = OpenOptions::new().append(true).open(r.join("k"))?;
        w.write_all(b" and appended")?;
        let f = OpenOptions::new().write(true).open(r.join("d/h"))?;
        f.write_all_at(b"S", 0)?;
        drop((w, f));
        Ok((
            fs::read(r.join("d/h"))?,
            fs::read(r.join("k"))?,
            lstat(r.join("k"))?.size,
            fs::symlink_metadata(r.join("k"))?.ino() == fs::symlink_metadata(r.join("d/h"))?.ino(),
        ))
    });
    assert_eq!(
        got,
        (
            b"Shared and appended".to_vec(),
            b"Shared and appended".to_vec(),
            19,
            true
        )
    );
    let got = t.both_ok("chmod through one name shows on the other", |r| {
        peerfs_tests::sys::chmod(r.join("k"), 0o600)?;
        Ok(lstat(r.join("d/h"))?.perm())
    });
    assert_eq!(got, 0o600);
    t.assert_same_tree();
}

#[test]
fn refused_hard_links() {
    let t = Pair::new();
    t.both_ok("setup", |r| {
        fs::write(r.join("f"), b"")?;
        fs::write(r.join("g"), b"")?;
        fs::create_dir(r.join("d"))
    });
    let cases: &[peerfs_tests::ErrCase] = &[
        (
            "link to an existing name",
            |r| fs::hard_link(r.join("f"), r.join("g")),
            libc::EEXIST,
        ),
        (
            "link of a directory",
            |r| fs::hard_link(r.join("d"), r.join("d2")),
            libc::EPERM,
        ),
        (
            "link of a missing file",
            |r| fs::hard_link(r.join("no"), r.join("x")),
            libc::ENOENT,
        ),
        (
            "link into a missing directory",
            |r| fs::hard_link(r.join("f"), r.join("no/x")),
            libc::ENOENT,
        ),
        (
            "link with a 256-byte name",
            |r| fs::hard_link(r.join("f"), r.join("n".repeat(256))),
            libc::ENAMETOOLONG,
        ),
    ];
    for (what, op, errno) in cases {
        assert_eq!(t.both(what, op), fails(*errno), "{what}");
    }
    t.assert_same_tree();
}

#[test]
fn hard_link_to_symlink_links_the_symlink() {
    let t = Pair::new();
    let got = t.both_ok("link() does not follow a symlink", |r| {
        fs::write(r.join("f"), b"x")?;
        symlink("f", r.join("s"))?;
        fs::hard_link(r.join("s"), r.join("s2"))?;
        Ok((
            lstat(r.join("s2"))?.kind,
            lstat(r.join("s"))?.nlink,
            lstat(r.join("f"))?.nlink,
            fs::read_link(r.join("s2"))?,
        ))
    });
    assert_eq!(got, (Kind::Symlink, 2, 1, PathBuf::from("f")));
    t.assert_same_tree();
}

#[test]
fn symlinks_and_readlink() {
    let t = Pair::new();
    let long_target = "t/".repeat(2047) + "x"; // 4095 bytes: the longest allowed
    let too_long = "y".repeat(4096);
    let targets: Vec<String> = vec![
        "f".into(),
        "../outside/of/the/drive".into(),
        "/absolute/path".into(),
        "nowhere".into(),
        "with space and ünïcode 日本".into(),
        ".".into(),
        "d/".into(),
        "a".repeat(255),
        "b/".repeat(200),
        long_target,
    ];
    t.both_ok("setup", |r| {
        fs::write(r.join("f"), b"through the link")?;
        fs::create_dir(r.join("d"))
    });
    for (i, target) in targets.iter().enumerate() {
        let got = t.both_ok(&format!("symlink -> {} bytes", target.len()), |r| {
            let link = r.join(format!("link{i}"));
            symlink(target, &link)?;
            let md = fs::symlink_metadata(&link)?;
            Ok((
                fs::read_link(&link)?.as_os_str().as_bytes().to_vec(),
                md.len(),
                Kind::of(md.file_type()),
                md.mode() & 0o777,
            ))
        });
        assert_eq!(
            got,
            (
                target.as_bytes().to_vec(),
                target.len() as u64,
                Kind::Symlink,
                0o777
            )
        );
    }
    assert_eq!(
        t.both("symlink with a 4096-byte target", |r| symlink(
            &too_long,
            r.join("toolong")
        )),
        fails(libc::ENAMETOOLONG)
    );
    assert_eq!(
        t.both("symlink with an empty target", |r| symlink(
            "",
            r.join("empty")
        )),
        fails(libc::ENOENT)
    );
    assert_eq!(
        t.both("symlink over an existing name", |r| symlink(
            "x",
            r.join("f")
        )),
        fails(libc::EEXIST)
    );
    assert_eq!(
        t.both("readlink of a regular file", |r| fs::read_link(r.join("f"))),
        fails(libc::EINVAL)
    );
    assert_eq!(
        t.both("readlink of a missing name", |r| fs::read_link(
            r.join("missing")
        )),
        fails(libc::ENOENT)
    );
    let got = t.both_ok("reading through a symlink reads the target", |r| {
        fs::read(r.join("link0"))
    });
    assert_eq!(got, b"through the link");
    assert_eq!(
        t.both("following a dangling symlink", |r| fs::read(
            r.join("link3")
        )),
        fails(libc::ENOENT)
    );
    let got = t.both_ok("following a symlink to a dir", |r| {
        fs::write(r.join("link6/inside"), b"i")?;
        Ok((stat(r.join("link6"))?.kind, fs::read(r.join("d/inside"))?))
    });
    assert_eq!(got, (Kind::Dir, b"i".to_vec()));
    assert_eq!(
        t.both("a symlink loop", |r| {
            symlink("loop-b", r.join("loop-a"))?;
            symlink("loop-a", r.join("loop-b"))?;
            fs::read(r.join("loop-a"))
        }),
        fails(libc::ELOOP)
    );
    let got = t.both_ok("unlinking a symlink leaves its target", |r| {
        fs::remove_file(r.join("link0"))?;
        Ok((lstat(r.join("link0")).is_err(), fs::read(r.join("f"))?))
    });
    assert_eq!(got, (true, b"through the link".to_vec()));
    t.assert_same_tree();
}
