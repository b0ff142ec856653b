//! Extended attributes on the drive: set/get/list/remove of `user.*` on files, directories and
//! open handles, create/replace flags, size queries, ERANGE, and the namespace rules.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;

use peerfs_tests::sys::{
    self, On, getxattr, getxattr_into, listxattr, listxattr_into, removexattr, setxattr,
};
use peerfs_tests::{Pair, fails, pattern};

const CREATE: i32 = libc::XATTR_CREATE;
const REPLACE: i32 = libc::XATTR_REPLACE;

#[test]
fn set_get_list_remove_on_file_and_dir() {
    let t = Pair::new();
    t.both_ok("setup", |r| {
        fs::write(r.join("f"), b"x")?;
        fs::create_dir(r.join("d"))
    });
    for name in ["f", "d"] {
        let got = t.both_ok(&format!("set three xattrs on {name}"), |r| {
            let p = r.join(name);
            setxattr(&p, "user.plain", b"value", 0)?;
            setxattr(&p, "user.empty", b"", 0)?;
            setxattr(&p, "user.binary", &[0, 1, 2, 255, 0], 0)?;
            Ok((
                getxattr(&p, "user.plain")?,
                getxattr(&p, "user.empty")?,
                getxattr(&p, "user.binary")?,
                listxattr(&p)?,
            ))
        });
        assert_eq!(
            got,
            (
                b"value".to_vec(),
                Vec::new(),
                vec![0, 1, 2, 255, 0],
                vec![
                    "user.binary".to_owned(),
                    "user.empty".to_owned(),
                    "user.plain".to_owned()
                ]
            )
        );
        let got = t.both_ok(&format!("overwrite and remove on {name}"), |r| {
            let p = r.join(name);
            setxattr(&p, "user.plain", b"a longer replacement value", 0)?;
            let v = getxattr(&p, "user.plain")?;
            removexattr(&p, "user.binary")?;
            Ok((v, listxattr(&p)?))
        });
        assert_eq!(
            got,
            (
                b"a longer replacement value".to_vec(),
                vec!["user.empty".to_owned(), "user.plain".to_owned()]
            )
        );
        assert_eq!(
            t.both(&format!("get an absent xattr on {name}"), |r| {
                getxattr(r.join(name), "user.binary")
            }),
            fails(libc::ENODATA)
        );
        assert_eq!(
            t.both(&format!("remove an absent xattr on {name}"), |r| {
                removexattr(r.join(name), "user.binary")
            }),
            fails(libc::ENODATA)
        );
    }
    let got = t.both_ok("a large value (3000 bytes)", |r| {
        let v = pattern(5, 3000);
        setxattr(r.join("f"), "user.large", &v, 0)?;
        Ok(getxattr(r.join("f"), "user.large")? == v)
    });
    assert!(got);
    t.assert_same_tree();
}

#[test]
fn create_and_replace_flags() {
    let t = Pair::new();
    t.both_ok("setup", |r| fs::write(r.join("f"), b""));
    t.both_ok("XATTR_CREATE on an absent name", |r| {
        setxattr(r.join("f"), "user.a", b"1", CREATE)
    });
    assert_eq!(
        t.both("XATTR_CREATE on an existing name", |r| {
            setxattr(r.join("f"), "user.a", b"2", CREATE)
        }),
        fails(libc::EEXIST)
    );
    assert_eq!(
        t.both("XATTR_REPLACE on an absent name", |r| {
            setxattr(r.join("f"), "user.b", b"2", REPLACE)
        }),
        fails(libc::ENODATA)
    );
    let got = t.both_ok("XATTR_REPLACE on an existing name", |r| {
        setxattr(r.join("f"), "user.a", b"replaced", REPLACE)?;
        Ok((getxattr(r.join("f"), "user.a")?, listxattr(r.join("f"))?))
    });
    assert_eq!(got, (b"replaced".to_vec(), vec!["user.a".to_owned()]));
    // The kernel leaves the combination to the filesystem (ext4 checks CREATE first).
    let r = t.both("XATTR_CREATE|XATTR_REPLACE", |r| {
        setxattr(r.join("f"), "user.a", b"3", CREATE | REPLACE)
    });
    assert!(
        r.is_err(),
        "XATTR_CREATE|XATTR_REPLACE on an existing name succeeded"
    );
    t.assert_same_tree();
}

#[test]
fn size_queries_and_erange() {
    let t = Pair::new();
    t.both_ok("setup", |r| {
        fs::write(r.join("f"), b"")?;
        setxattr(r.join("f"), "user.twelve", b"twelve bytes", 0)?;
        setxattr(r.join("f"), "user.z", b"", 0)
    });
    let on = |r: &std::path::Path| r.join("f");
    assert_eq!(
        t.both("getxattr size query (NULL, 0)", |r| {
            getxattr_into(On::Path(&on(r)), "user.twelve", &mut [])
        }),
        Ok(12)
    );
    assert_eq!(
        t.both("getxattr size query of an empty value", |r| {
            getxattr_into(On::Path(&on(r)), "user.z", &mut [])
        }),
        Ok(0)
    );
    assert_eq!(
        t.both("getxattr with a short buffer", |r| {
            getxattr_into(On::Path(&on(r)), "user.twelve", &mut [0u8; 5])
        }),
        fails(libc::ERANGE)
    );
    let got = t.both_ok("getxattr with an exact buffer", |r| {
        let mut buf = [0u8; 12];
        let n = getxattr_into(On::Path(&on(r)), "user.twelve", &mut buf)?;
        Ok(buf[..n].to_vec())
    });
    assert_eq!(got, b"twelve bytes");
    let expected_list_len = "user.twelve\0user.z\0".len();
    assert_eq!(
        t.both("listxattr size query", |r| listxattr_into(
            On::Path(&on(r)),
            &mut []
        )),
        Ok(expected_list_len)
    );
    assert_eq!(
        t.both("listxattr with a short buffer", |r| {
            listxattr_into(On::Path(&on(r)), &mut [0u8; 4])
        }),
        fails(libc::ERANGE)
    );
    assert_eq!(
        t.both("size query of an absent xattr", |r| {
            getxattr_into(On::Path(&on(r)), "user.absent", &mut [])
        }),
        fails(libc::ENODATA)
    );
    assert_eq!(
        t.both("listxattr size query with no xattrs", |r| {
            fs::write(r.join("bare"), b"")?;
            listxattr_into(On::Path(&r.join("bare")), &mut [])
        }),
        Ok(0)
    );
}

#[test]
fn names_and_namespaces() {
    let t = Pair::new();
    t.both_ok("setup", |r| fs::write(r.join("f"), b""));
    assert_eq!(
        t.both("an unknown namespace", |r| setxattr(
            r.join("f"),
            "bogus.x",
            b"1",
            0
        )),
        fails(libc::EOPNOTSUPP)
    );
    assert_eq!(
        t.both("a name without a namespace", |r| setxattr(
            r.join("f"),
            "plain",
            b"1",
            0
        )),
        fails(libc::EOPNOTSUPP)
    );
    assert_eq!(
        t.both("a name of 256 bytes", |r| {
            setxattr(r.join("f"), &format!("user.{}", "n".repeat(251)), b"1", 0)
        }),
        fails(libc::ERANGE)
    );
    let got = t.both_ok("a name of 255 bytes", |r| {
        let name = format!("user.{}", "n".repeat(250));
        setxattr(r.join("f"), &name, b"1", 0)?;
        getxattr(r.join("f"), &name)
    });
    assert_eq!(got, b"1");
    assert_eq!(
        t.both("user.* on a missing file", |r| setxattr(
            r.join("missing"),
            "user.a",
            b"",
            0
        )),
        fails(libc::ENOENT)
    );
    let got = t.both_ok("trusted.* as root", |r| {
        setxattr(r.join("f"), "trusted.peerfs-test", b"t", 0)?;
        getxattr(r.join("f"), "trusted.peerfs-test")
    });
    assert_eq!(got, b"t");
    t.assert_same_tree();
}

#[test]
fn symlinks_and_open_handles() {
    let t = Pair::new();
    t.both_ok("setup", |r| {
        fs::write(r.join("f"), b"")?;
        symlink("f", r.join("s"))
    });
    let got = t.both_ok("setxattr through a symlink sets the target's", |r| {
        setxattr(r.join("s"), "user.via", b"link", 0)?;
        Ok((getxattr(r.join("f"), "user.via")?, listxattr(r.join("s"))?))
    });
    assert_eq!(got, (b"link".to_vec(), vec!["user.via".to_owned()]));
    // `cp -a`, `rsync -X` and `tar --xattrs` list the xattrs of every symlink they copy.
    let got = t.both_ok("llistxattr on a symlink itself", |r| {
        sys::listxattr_on(On::Link(&r.join("s")))
    });
    assert_eq!(got, Vec::<String>::new());
    assert_eq!(
        t.both("llistxattr size query on a symlink itself", |r| {
            listxattr_into(On::Link(&r.join("s")), &mut [])
        }),
        Ok(0)
    );
    assert_eq!(
        t.both("lsetxattr user.* on a symlink itself", |r| {
            sys::setxattr_on(On::Link(&r.join("s")), "user.x", b"1", 0)
        }),
        fails(libc::EPERM)
    );
    assert_eq!(
        t.both("lgetxattr on a symlink itself", |r| {
            sys::getxattr_on(On::Link(&r.join("s")), "user.via")
        }),
        fails(libc::ENODATA)
    );
    let got = t.both_ok("fsetxattr/fgetxattr/flistxattr/fremovexattr", |r| {
        let f = File::open(r.join("f"))?;
        let on = On::Fd(f.as_raw_fd());
        sys::setxattr_on(on, "user.fd", b"by fd", 0)?;
        let v = sys::getxattr_on(on, "user.fd")?;
        let l = sys::listxattr_on(on)?;
        sys::removexattr_on(on, "user.via")?;
        Ok((v, l, listxattr(r.join("f"))?))
    });
    assert_eq!(
        got,
        (
            b"by fd".to_vec(),
            vec!["user.fd".to_owned(), "user.via".to_owned()],
            vec!["user.fd".to_owned()]
        )
    );
    let got = t.both_ok("xattrs on an open, unlinked file", |r| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(r.join("f"))?;
        fs::remove_file(r.join("f"))?;
        let on = On::Fd(f.as_raw_fd());
        sys::setxattr_on(on, "user.orphan", b"still here", 0)?;
        Ok((sys::getxattr_on(on, "user.orphan")?, sys::listxattr_on(on)?))
    });
    assert_eq!(
        got,
        (
            b"still here".to_vec(),
            vec!["user.fd".to_owned(), "user.orphan".to_owned()]
        )
    );
    t.assert_same_tree();
}

#[test]
fn xattrs_follow_renames_and_hard_links() {
    let t = Pair::new();
    let got = t.both_ok("xattrs move with rename and are shared by links", |r| {
        fs::write(r.join("a"), b"")?;
        setxattr(r.join("a"), "user.k", b"v", 0)?;
        fs::rename(r.join("a"), r.join("b"))?;
        fs::hard_link(r.join("b"), r.join("c"))?;
        setxattr(r.join("c"), "user.k2", b"v2", 0)?;
        Ok((listxattr(r.join("b"))?, getxattr(r.join("b"), "user.k2")?))
    });
    assert_eq!(
        got,
        (
            vec!["user.k".to_owned(), "user.k2".to_owned()],
            b"v2".to_vec()
        )
    );
    t.assert_same_tree();
}
