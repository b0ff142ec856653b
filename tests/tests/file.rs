//! File data on the drive: create/open flags, read/write/append/pwrite, O_TRUNC, sparse files,
//! fsync, errors reported at write and close, open-but-unlinked files, mmap. Every test runs
//! twice: with kernel passthrough (`passthrough::*`) and with the daemon serving data
//! (`no_passthrough::*`).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, symlink};
use std::path::Path;

use peerfs_tests::sys::{self, Mapping};
use peerfs_tests::{DriveOptions, Pair, assert_bytes_eq, both_data_paths, fails, pattern};

both_data_paths!(
    create_and_open_flags,
    read_write_sizes,
    pwrite_at_offsets_and_holes,
    append_mode,
    o_trunc,
    sparse_file,
    seek_data_and_hole,
    fsync_and_fdatasync,
    unlinked_open_file_still_usable,
    mmap_read,
    mmap_shared_write_visible_through_read,
    two_handles_see_each_other,
    readonly_mode_file_writable_through_its_creating_fd,
    copy_between_files,
    large_file_roundtrip,
    read_past_end_and_on_wrong_handles,
    o_direct_io,
    running_program_is_neither_opened_for_writing_nor_truncated,
);

fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    fs::read(path)
}

fn create_and_open_flags(t: &Pair) {
    t.both_ok("create f", |r| fs::write(r.join("f"), b"abc"));
    let cases: &[peerfs_tests::ErrCase<File>] = &[
        (
            "O_CREAT|O_EXCL on an existing file",
            |r| {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(r.join("f"))
            },
            libc::EEXIST,
        ),
        (
            "O_CREAT|O_EXCL on a dangling symlink",
            |r| {
                symlink("nowhere", r.join("dangling"))?;
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(r.join("dangling"))
            },
            libc::EEXIST,
        ),
        (
            "open a missing file",
            |r| File::open(r.join("missing")),
            libc::ENOENT,
        ),
        (
            "open a dir for writing",
            |r| {
                fs::create_dir(r.join("d"))?;
                OpenOptions::new().write(true).open(r.join("d"))
            },
            libc::EISDIR,
        ),
        (
            "O_DIRECTORY on a file",
            |r| sys::open(r.join("f"), libc::O_RDONLY | libc::O_DIRECTORY, 0),
            libc::ENOTDIR,
        ),
        (
            "O_NOFOLLOW on a symlink",
            |r| {
                symlink("f", r.join("s"))?;
                sys::open(r.join("s"), libc::O_RDONLY | libc::O_NOFOLLOW, 0)
            },
            libc::ELOOP,
        ),
        (
            "create below a file",
            |r| File::create(r.join("f/x")),
            libc::ENOTDIR,
        ),
    ];
    for (what, op, errno) in cases {
        assert_eq!(t.both(what, |r| op(r).map(|_| ())), fails(*errno), "{what}");
    }
    let got = t.both_ok("O_CREAT without O_EXCL on an existing file keeps it", |r| {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(r.join("f"))?;
        read_all(&r.join("f"))
    });
    assert_eq!(got, b"abc");
    let got = t.both_ok(
        "O_CREAT through a dangling symlink creates its target",
        |r| {
            symlink("target", r.join("to-target"))?;
            fs::write(r.join("to-target"), b"via link")?;
            read_all(&r.join("target"))
        },
    );
    assert_eq!(got, b"via link");
    let m = t.both_ok("O_CREAT|O_EXCL with mode 0600", |r| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(r.join("new"))?;
        Ok(fs::symlink_metadata(r.join("new"))?.mode())
    });
    assert_eq!(m, libc::S_IFREG | 0o600);
    t.assert_same_tree();
}

fn read_write_sizes(t: &Pair) {
    for (i, size) in [0usize, 1, 4095, 4096, 4097, 131_072, (1 << 20) + 7]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u64, size);
        let got = t.both_ok(&format!("write and read back {size} bytes"), |r| {
            let p = r.join(format!("f{i}"));
            let mut f = File::create(&p)?;
            f.write_all(&data)?;
            drop(f);
            let mut back = Vec::new();
            File::open(&p)?.read_to_end(&mut back)?;
            Ok(back)
        });
        assert_bytes_eq(&got, &data, &format!("{size} bytes"));
    }
    t.assert_same_tree();
}

fn pwrite_at_offsets_and_holes(t: &Pair) {
    let got = t.both_ok("pwrite at scattered offsets", |r| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(r.join("f"))?;
        f.write_all_at(b"middle", 5000)?;
        f.write_all_at(b"start", 0)?;
        f.write_all_at(&pattern(9, 10_000), 70_000)?;
        f.write_all_at(b"OVER", 5002)?;
        f.write_all_at(b"x", 4095)?;
        let mut buf = vec![0u8; 12];
        let n = f.read_at(&mut buf, 4094)?;
        buf.truncate(n);
        Ok((f.metadata()?.len(), buf))
    });
    assert_eq!(got.0, 80_000);
    assert_eq!(got.1, b"\0x\0\0\0\0\0\0\0\0\0\0");
    let got = t.both_ok("read it back", |r| read_all(&r.join("f")));
    let mut expected = vec![0u8; 80_000];
    expected[..5].copy_from_slice(b"start");
    expected[4095] = b'x';
    expected[5000..5006].copy_from_slice(b"miOVER");
    expected[70_000..].copy_from_slice(&pattern(9, 10_000));
    assert_bytes_eq(&got, &expected, "scattered pwrites");
    let got = t.both_ok("seek then write", |r| {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(r.join("f"))?;
        f.seek(SeekFrom::Start(79_998))?;
        f.write_all(b"tail!")?;
        f.seek(SeekFrom::End(-3))?;
        let mut s = String::new();
        f.read_to_string(&mut s)?;
        Ok((s, f.metadata()?.len()))
    });
    assert_eq!(got, ("il!".to_owned(), 80_003));
    t.assert_same_tree();
}

fn append_mode(t: &Pair) {
    let got = t.both_ok("O_APPEND writes at the end, whatever the offset", |r| {
        fs::write(r.join("f"), b"0123")?;
        let mut a = OpenOptions::new().append(true).open(r.join("f"))?;
        let mut b = OpenOptions::new().append(true).open(r.join("f"))?;
        a.write_all(b"A")?;
        b.write_all(b"BB")?;
        a.seek(SeekFrom::Start(0))?;
        a.write_all(b"C")?;
        // pwrite on an O_APPEND fd appends too on Linux.
        b.write_at(b"D", 1)?;
        let other = OpenOptions::new().write(true).open(r.join("f"))?;
        other.set_len(2)?;
        a.write_all(b"E")?;
        drop((a, b, other));
        read_all(&r.join("f"))
    });
    assert_eq!(got, b"01E");
    t.assert_same_tree();
}

fn o_trunc(t: &Pair) {
    let got = t.both_ok("open with O_TRUNC", |r| {
        fs::write(r.join("f"), pattern(3, 50_000))?;
        let mut f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(r.join("f"))?;
        let len_after_open = fs::symlink_metadata(r.join("f"))?.len();
        f.write_all(b"new")?;
        drop(f);
        Ok((len_after_open, read_all(&r.join("f"))?))
    });
    assert_eq!(got, (0, b"new".to_vec()));
    let got = t.both_ok(
        "an O_TRUNC open by another handle is seen by a reader",
        |r| {
            let reader = File::open(r.join("f"))?;
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(r.join("f"))?;
            let mut buf = Vec::new();
            (&reader).read_to_end(&mut buf)?;
            Ok((buf, reader.metadata()?.len()))
        },
    );
    assert_eq!(got, (Vec::new(), 0));
    let got = t.both_ok("O_RDONLY|O_TRUNC truncates too", |r| {
        fs::write(r.join("g"), b"content")?;
        sys::open(r.join("g"), libc::O_RDONLY | libc::O_TRUNC, 0)?;
        Ok(fs::symlink_metadata(r.join("g"))?.len())
    });
    assert_eq!(got, 0);
    t.assert_same_tree();
}

/// Starts a program just written by `fs::copy`. Its exec can fail with ETXTBSY for a moment,
/// on any filesystem: a process another test thread forks at that time inherits the copy's
/// write descriptor until it execs (close-on-exec does not close it before then).
fn spawn_fresh(prog: &std::path::Path) -> std::io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match std::process::Command::new(prog).arg("30").spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// A program that runs from the drive: opening it for writing, or truncating it by an
/// O_RDONLY|O_TRUNC open, fails with ETXTBSY and leaves it whole (the drive used to truncate
/// it in the open, before the kernel's check, and the program died of SIGBUS).
fn running_program_is_neither_opened_for_writing_nor_truncated(t: &Pair) {
    let got = t.both_ok("write opens of a running program", |r| {
        let prog = r.join("prog");
        fs::copy("/bin/sleep", &prog)?;
        fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let size = fs::metadata(&prog)?.len();
        let mut child = spawn_fresh(&prog)?;
        let mut results = Vec::new();
        for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
            results.push(
                sys::open(&prog, flags, 0)
                    .err()
                    .and_then(|e| e.raw_os_error()),
            );
        }
        let whole = fs::metadata(&prog)?.len() == size;
        let alive = child.try_wait()?.is_none();
        child.kill()?;
        child.wait()?;
        fs::remove_file(&prog)?;
        Ok((results, whole, alive))
    });
    assert_eq!(got, (vec![Some(libc::ETXTBSY); 3], true, true));
}

fn sparse_file(t: &Pair) {
    const BIG: u64 = 1 << 30;
    let got = t.both_ok("1 GiB sparse file with data at 512 MiB", |r| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(r.join("sparse"))?;
        f.set_len(BIG)?;
        f.write_all_at(b"island", BIG / 2)?;
        let mut head = vec![1u8; 4096];
        f.read_exact_at(&mut head, 0)?;
        let mut island = vec![0u8; 10];
        f.read_exact_at(&mut island, BIG / 2 - 2)?;
        let md = f.metadata()?;
        Ok((
            md.len(),
            head.iter().all(|b| *b == 0),
            island,
            md.blocks() < 1024,
        ))
    });
    assert_eq!(
        got,
        (BIG, true, b"\0\0island\0\0".to_vec(), true),
        "(size, zeros before, data, stays sparse)"
    );
    let blocks_mount = fs::metadata(t.mount.path().join("sparse")).map(|m| m.blocks());
    let blocks_backing = fs::metadata(t.mount.backing().join("sparse")).map(|m| m.blocks());
    assert_eq!(
        blocks_mount.expect("stat on the drive"),
        blocks_backing.expect("stat in backing"),
        "st_blocks of a sparse file differs from the backing file's"
    );
}

fn seek_data_and_hole(t: &Pair) {
    let got = t.both_ok("SEEK_DATA / SEEK_HOLE on a sparse file", |r| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(r.join("sparse"))?;
        f.set_len(16 << 20)?;
        f.write_all_at(&[1u8; 4096], 8 << 20)?;
        f.sync_all()?;
        let data = sys::lseek(&f, 0, libc::SEEK_DATA)?;
        let hole = sys::lseek(&f, data, libc::SEEK_HOLE)?;
        let end = sys::lseek(&f, (16 << 20) - 1, libc::SEEK_HOLE)?;
        Ok((data, hole, end))
    });
    assert_eq!(got, (8 << 20, (8 << 20) + 4096, (16 << 20) - 1));
    assert_eq!(
        t.both("SEEK_DATA past the end", |r| {
            let f = File::open(r.join("sparse"))?;
            sys::lseek(&f, 17 << 20, libc::SEEK_DATA)
        }),
        fails(libc::ENXIO)
    );
}

fn fsync_and_fdatasync(t: &Pair) {
    let got = t.both_ok("fsync, fdatasync, fsync on a dir", |r| {
        let mut f = File::create(r.join("f"))?;
        f.write_all(b"durable")?;
        sys::fsync(&f, false)?;
        f.write_all(b" more")?;
        sys::fsync(&f, true)?;
        let ro = File::open(r.join("f"))?;
        sys::fsync(&ro, false)?;
        let dir = sys::open(r, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        sys::fsync(&dir, false)?;
        read_all(&r.join("f"))
    });
    assert_eq!(got, b"durable more");
}

fn unlinked_open_file_still_usable(t: &Pair) {
    let got = t.both_ok("write, unlink, keep using the handle", |r| {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(r.join("f"))?;
        f.write_all(b"before unlink;")?;
        let reader = File::open(r.join("f"))?;
        fs::remove_file(r.join("f"))?;
        let gone = fs::symlink_metadata(r.join("f")).is_err();
        f.write_all(b" after unlink")?;
        f.set_len(20)?;
        sys::fchmod(&f, 0o600)?;
        let md = f.metadata()?;
        let mut back = Vec::new();
        f.seek(SeekFrom::Start(0))?;
        f.read_to_end(&mut back)?;
        let mut via_reader = Vec::new();
        (&reader).read_to_end(&mut via_reader)?;
        // A new file under the old name is a different file.
        fs::write(r.join("f"), b"new")?;
        f.write_all_at(b"!", 0)?;
        Ok((
            gone,
            back,
            via_reader,
            md.nlink(),
            md.len(),
            md.mode() & 0o777,
            read_all(&r.join("f"))?,
        ))
    });
    assert_eq!(
        got,
        (
            true,
            b"before unlink; after".to_vec(),
            b"before unlink; after".to_vec(),
            0,
            20,
            0o600,
            b"new".to_vec()
        )
    );
    t.assert_same_tree();
}

fn mmap_read(t: &Pair) {
    let data = pattern(11, 3 * 4096 + 100);
    let got = t.both_ok("mmap PROT_READ", |r| {
        fs::write(r.join("f"), &data)?;
        let f = File::open(r.join("f"))?;
        let m = Mapping::shared(&f, data.len(), false)?;
        Ok(m.read_all())
    });
    assert_bytes_eq(&got, &data, "mmap read");
}

fn mmap_shared_write_visible_through_read(t: &Pair) {
    let base = pattern(12, 2 * 4096);
    let got = t.both_ok("write through MAP_SHARED, read with read()", |r| {
        fs::write(r.join("f"), &base)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(r.join("f"))?;
        let mut m = Mapping::shared(&f, base.len(), true)?;
        m.write_at(10, b"mapped write");
        m.write_at(4096 + 7, b"second page");
        // Visible to read() through another handle before msync: one page cache.
        let early = fs::read(r.join("f"))?;
        m.sync()?;
        drop(m);
        let late = fs::read(r.join("f"))?;
        Ok((early, late))
    });
    let mut expected = base.clone();
    expected[10..22].copy_from_slice(b"mapped write");
    expected[4103..4114].copy_from_slice(b"second page");
    assert_bytes_eq(&got.0, &expected, "read() before msync");
    assert_bytes_eq(&got.1, &expected, "read() after msync");
    let backing = fs::read(t.mount.backing().join("f")).expect("read backing file");
    assert_bytes_eq(&backing, &expected, "backing file after msync");
}

fn two_handles_see_each_other(t: &Pair) {
    let got = t.both_ok("write on one handle, read on another", |r| {
        let w = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(r.join("f"))?;
        let rd = File::open(r.join("f"))?;
        let mut seen = Vec::new();
        for i in 0..5u8 {
            w.write_all_at(&[i; 1000], u64::from(i) * 1000)?;
            let mut buf = vec![0u8; 1000];
            rd.read_exact_at(&mut buf, u64::from(i) * 1000)?;
            seen.push((buf.iter().all(|b| *b == i), rd.metadata()?.len()));
        }
        Ok(seen)
    });
    assert_eq!(
        got,
        (1..=5u64).map(|i| (true, i * 1000)).collect::<Vec<_>>()
    );
}

fn readonly_mode_file_writable_through_its_creating_fd(t: &Pair) {
    let got = t.both_ok("O_CREAT|O_WRONLY mode 0444, write through that fd", |r| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(r.join("ro"))?;
        f.write_all(b"written anyway")?;
        f.sync_all()?;
        drop(f);
        Ok((
            read_all(&r.join("ro"))?,
            fs::symlink_metadata(r.join("ro"))?.mode() & 0o777,
        ))
    });
    assert_eq!(got, (b"written anyway".to_vec(), 0o444));
    t.assert_same_tree();
}

fn copy_between_files(t: &Pair) {
    let data = pattern(13, 300_000);
    let got = t.both_ok("std::io::copy (copy_file_range) and fs::copy", |r| {
        fs::write(r.join("src"), &data)?;
        let mut from = File::open(r.join("src"))?;
        let mut to = File::create(r.join("dst"))?;
        let n = std::io::copy(&mut from, &mut to)?;
        drop(to);
        let m = fs::copy(r.join("src"), r.join("dst2"))?;
        Ok((
            n,
            m,
            read_all(&r.join("dst"))? == data,
            read_all(&r.join("dst2"))? == data,
        ))
    });
    assert_eq!(got, (300_000, 300_000, true, true));
    t.assert_same_tree();
}

fn large_file_roundtrip(t: &Pair) {
    let data = pattern(14, 8 << 20);
    let got = t.both_ok("write 8 MiB in odd-sized chunks, read back", |r| {
        let mut f = File::create(r.join("big"))?;
        for chunk in data.chunks(123_457) {
            f.write_all(chunk)?;
        }
        f.sync_all()?;
        drop(f);
        read_all(&r.join("big"))
    });
    assert_bytes_eq(&got, &data, "8 MiB file");
}

fn read_past_end_and_on_wrong_handles(t: &Pair) {
    let got = t.both_ok("read at and past EOF", |r| {
        fs::write(r.join("f"), b"12345")?;
        let f = File::open(r.join("f"))?;
        let mut buf = [0u8; 10];
        let a = f.read_at(&mut buf, 5)?;
        let b = f.read_at(&mut buf, 1000)?;
        let c = f.read_at(&mut buf, 3)?;
        Ok((a, b, c, buf[..c].to_vec()))
    });
    assert_eq!(got, (0, 0, 2, b"45".to_vec()));
    assert_eq!(
        t.both("write on a read-only fd", |r| {
            let mut f = File::open(r.join("f"))?;
            f.write(b"x")
        }),
        fails(libc::EBADF)
    );
    assert_eq!(
        t.both("read on a write-only fd", |r| {
            let mut f = OpenOptions::new().write(true).open(r.join("f"))?;
            let mut buf = [0u8; 4];
            f.read(&mut buf)
        }),
        fails(libc::EBADF)
    );
    assert_eq!(
        t.both("read on a directory fd", |r| {
            let mut f = File::open(r)?;
            let mut buf = [0u8; 4];
            f.read(&mut buf)
        }),
        fails(libc::EISDIR)
    );
}

/// A full backing filesystem: the write that does not fit fails with ENOSPC (or is short),
/// and close reports the same as on a plain directory. Writes that the kernel accepted but
/// the drive could not store must never be reported as successful at close.
fn out_of_space_reported(passthrough: bool) {
    let opts = DriveOptions {
        passthrough: Some(passthrough),
        backing_tmpfs: Some(1 << 20),
        ..DriveOptions::default()
    };
    let t = Pair::with(opts);
    let got = t.both_ok("write 4 MiB into a 1 MiB filesystem", |r| {
        let mut f = File::create(r.join("big"))?;
        let chunk = pattern(15, 64 * 1024);
        let mut written = 0usize;
        let mut error = None;
        for _ in 0..64 {
            match f.write(&chunk) {
                Ok(n) => written += n,
                Err(e) => {
                    error = e.raw_os_error();
                    break;
                }
            }
        }
        let sync = f.sync_all().err().and_then(|e| e.raw_os_error());
        let close = sys::close(f).err().and_then(|e| e.raw_os_error());
        Ok((written, error, sync, close))
    });
    assert_eq!(got.1, Some(libc::ENOSPC), "write past the space limit");
    assert!(
        got.0 <= (1 << 20),
        "accepted {} bytes into a 1 MiB fs",
        got.0
    );
    let size = t.both_ok("size of the partial file", |r| {
        Ok(fs::metadata(r.join("big"))?.len())
    });
    assert_eq!(size as usize, got.0, "the file holds what write() reported");
    t.both_ok("space comes back after unlink", |r| {
        fs::remove_file(r.join("big"))?;
        fs::write(r.join("small"), pattern(16, 100_000))
    });
    t.assert_same_tree();
}

#[test]
fn out_of_space_reported_passthrough() {
    out_of_space_reported(true);
}

#[test]
fn out_of_space_reported_no_passthrough() {
    out_of_space_reported(false);
}

fn o_direct_io(t: &Pair) {
    let data = pattern(17, 3 * 4096);
    let got = t.both_ok("O_DIRECT aligned writes and reads", |r| {
        let f = sys::open(
            r.join("direct"),
            libc::O_RDWR | libc::O_CREAT | libc::O_DIRECT,
            0o644,
        )?;
        let mut buf = sys::AlignedBuf::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(&data);
        f.write_all_at(buf.as_slice(), 4096)?;
        let mut back = sys::AlignedBuf::zeroed(4 * 4096);
        let n = f.read_at(back.as_mut_slice(), 0)?;
        Ok((n, back.as_slice()[..n].to_vec(), f.metadata()?.len()))
    });
    let mut expected = vec![0u8; 4096];
    expected.extend_from_slice(&data);
    assert_eq!((got.0, got.2), (4 * 4096, 4 * 4096));
    assert_bytes_eq(&got.1, &expected, "O_DIRECT read back");
    let got = t.both_ok("buffered read sees the O_DIRECT writes", |r| {
        fs::read(r.join("direct"))
    });
    assert_bytes_eq(&got, &expected, "buffered read after O_DIRECT");
}
