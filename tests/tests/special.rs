//! Special files on the drive: FIFOs, device nodes made as root, unix sockets bound in it.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};

use peerfs_tests::sys;
use peerfs_tests::{Kind, Pair, fails, lstat};

#[test]
fn mkfifo_and_use_it() {
    let t = Pair::new();
    let a = t.both_ok("mkfifo 0640", |r| {
        sys::mkfifo(r.join("fifo"), 0o640)?;
        lstat(r.join("fifo"))
    });
    assert_eq!(a.kind, Kind::Fifo);
    assert_eq!(a.mode, libc::S_IFIFO | 0o640);
    assert_eq!(a.size, 0);
    assert_eq!(
        t.both("mkfifo over an existing name", |r| sys::mkfifo(
            r.join("fifo"),
            0o644
        )),
        fails(libc::EEXIST)
    );
    let got = t.both_ok("write and read through the fifo", |r| {
        // O_RDWR on a FIFO never blocks on Linux: one fd is both ends.
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(r.join("fifo"))?;
        f.write_all(b"through the pipe")?;
        let mut buf = [0u8; 64];
        let n = f.read(&mut buf)?;
        Ok(buf[..n].to_vec())
    });
    assert_eq!(got, b"through the pipe");
    let got = t.both_ok("rename and unlink a fifo", |r| {
        fs::rename(r.join("fifo"), r.join("fifo2"))?;
        let k = lstat(r.join("fifo2"))?.kind;
        fs::remove_file(r.join("fifo2"))?;
        Ok((k, lstat(r.join("fifo2")).is_err()))
    });
    assert_eq!(got, (Kind::Fifo, true));
    t.assert_same_tree();
}

#[test]
fn mknod_devices_and_other_types() {
    let t = Pair::new();
    let null = sys::makedev(1, 3);
    let loop7 = sys::makedev(7, 7);
    let a = t.both_ok("mknod char device 1:3", |r| {
        sys::mknod(r.join("null"), libc::S_IFCHR | 0o600, null)?;
        lstat(r.join("null"))
    });
    assert_eq!(
        (a.kind, a.mode, a.rdev),
        (Kind::CharDev, libc::S_IFCHR | 0o600, null)
    );
    let a = t.both_ok("mknod block device 7:7", |r| {
        sys::mknod(r.join("blk"), libc::S_IFBLK | 0o640, loop7)?;
        lstat(r.join("blk"))
    });
    assert_eq!(
        (a.kind, a.mode, a.rdev),
        (Kind::BlockDev, libc::S_IFBLK | 0o640, loop7)
    );
    let a = t.both_ok("mknod S_IFREG makes an empty regular file", |r| {
        sys::mknod(r.join("reg"), libc::S_IFREG | 0o644, 0)?;
        lstat(r.join("reg"))
    });
    assert_eq!((a.kind, a.size, a.nlink), (Kind::File, 0, 1));
    let a = t.both_ok("mknod S_IFIFO", |r| {
        sys::mknod(r.join("fifo"), libc::S_IFIFO | 0o600, 0)?;
        lstat(r.join("fifo"))
    });
    assert_eq!(a.kind, Kind::Fifo);
    let a = t.both_ok("mknod S_IFSOCK", |r| {
        sys::mknod(r.join("sock"), libc::S_IFSOCK | 0o600, 0)?;
        lstat(r.join("sock"))
    });
    assert_eq!(a.kind, Kind::Socket);
    assert_eq!(
        t.both("mknod over an existing name", |r| {
            sys::mknod(r.join("null"), libc::S_IFCHR | 0o600, null)
        }),
        fails(libc::EEXIST)
    );
    assert_eq!(
        t.both("mknod S_IFDIR is refused", |r| {
            sys::mknod(r.join("dir"), libc::S_IFDIR | 0o755, 0)
        }),
        fails(libc::EPERM)
    );
    let got = t.both_ok("a device node keeps its rdev across rename and link", |r| {
        fs::rename(r.join("null"), r.join("null2"))?;
        fs::hard_link(r.join("null2"), r.join("null3"))?;
        Ok((
            fs::symlink_metadata(r.join("null3"))?.rdev(),
            lstat(r.join("null2"))?.nlink,
        ))
    });
    assert_eq!(got, (null, 2));
    t.assert_same_tree();
}

#[test]
fn unix_socket_bind_connect() {
    let t = Pair::new();
    for r in t.roots() {
        let path = r.join("sock");
        let listener =
            UnixListener::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        let mut client = UnixStream::connect(&path)
            .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(b"ping").expect("send");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).expect("receive");
        assert_eq!(&buf, b"ping", "{}: data through the socket", r.display());
    }
    let a = t.both_ok("lstat the socket", |r| lstat(r.join("sock")));
    assert_eq!(a.kind, Kind::Socket);
    assert_eq!(
        t.both("bind to an existing name", |r| {
            UnixListener::bind(r.join("sock")).map(|_| ())
        }),
        fails(libc::EADDRINUSE)
    );
    assert_eq!(
        t.both("connect to a socket nobody listens on", |r| {
            sys::mknod(r.join("dead"), libc::S_IFSOCK | 0o600, 0)?;
            UnixStream::connect(r.join("dead")).map(|_| ())
        }),
        fails(libc::ECONNREFUSED)
    );
    t.assert_same_tree();
}
