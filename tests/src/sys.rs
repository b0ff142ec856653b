//! Thin, safe wrappers over the libc calls std lacks (mknod, renameat2, fallocate, xattrs,
//! utimensat, statfs, access, raw readdir with telldir/seekdir, mmap), each returning
//! `io::Result` so its errno can be compared.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;

pub use libc::{RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT};

/// A path as a C string. Test paths never contain NUL; one that does is a test bug.
pub fn cstr(path: impl AsRef<Path>) -> CString {
    CString::new(path.as_ref().as_os_str().as_bytes()).expect("test path contains a NUL byte")
}

fn name_cstr(name: &str) -> CString {
    CString::new(name).expect("xattr name contains a NUL byte")
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn check_len(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `mknod(2)`: `mode` carries the file type (`S_IFCHR`, `S_IFIFO`, ...) and permissions.
pub fn mknod(path: impl AsRef<Path>, mode: u32, dev: u64) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: `p` is a valid NUL-terminated string for the duration of the call.
    check(unsafe { libc::mknod(p.as_ptr(), mode as libc::mode_t, dev as libc::dev_t) })
}

/// `mkfifo(3)`.
pub fn mkfifo(path: impl AsRef<Path>, mode: u32) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: `p` is a valid NUL-terminated string for the duration of the call.
    check(unsafe { libc::mkfifo(p.as_ptr(), mode as libc::mode_t) })
}

/// A device number from major and minor.
pub fn makedev(major: u32, minor: u32) -> u64 {
    libc::makedev(major, minor)
}

/// `renameat2(2)` with `RENAME_NOREPLACE`, `RENAME_EXCHANGE` or 0.
pub fn renameat2(from: impl AsRef<Path>, to: impl AsRef<Path>, flags: u32) -> io::Result<()> {
    let (f, t) = (cstr(from), cstr(to));
    // SAFETY: both strings are valid NUL-terminated strings for the duration of the call.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags as libc::c_uint,
        )
    })
}

/// `fallocate(2)` on an open file.
pub fn fallocate(file: &File, mode: i32, offset: i64, len: i64) -> io::Result<()> {
    // SAFETY: the fd is owned by `file` and open for the duration of the call.
    check(unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) })
}

/// `lseek(2)`, for `SEEK_DATA` / `SEEK_HOLE` which std's `Seek` cannot express.
pub fn lseek(file: &File, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: the fd is owned by `file` and open for the duration of the call.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `truncate(2)` by path.
pub fn truncate(path: impl AsRef<Path>, len: i64) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: `p` is a valid NUL-terminated string for the duration of the call.
    check(unsafe { libc::truncate(p.as_ptr(), len) })
}

/// `access(2)` (checks with the real uid/gid, like the kernel's `access`).
pub fn access(path: impl AsRef<Path>, mode: i32) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: `p` is a valid NUL-terminated string for the duration of the call.
    check(unsafe { libc::access(p.as_ptr(), mode) })
}

/// `link(2)`.
pub fn link(old: impl AsRef<Path>, new: impl AsRef<Path>) -> io::Result<()> {
    let (o, n) = (cstr(old), cstr(new));
    // SAFETY: both strings are valid NUL-terminated strings for the duration of the call.
    check(unsafe { libc::link(o.as_ptr(), n.as_ptr()) })
}

/// `chown(2)`; `None` leaves that id unchanged (passes -1).
pub fn chown(path: impl AsRef<Path>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    std::os::unix::fs::chown(path, uid, gid)
}

/// `lchown(2)`: changes a symlink itself.
pub fn lchown(path: impl AsRef<Path>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    std::os::unix::fs::lchown(path, uid, gid)
}

/// `fchown(2)`.
pub fn fchown(file: &File, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    std::os::unix::fs::fchown(file, uid, gid)
}

/// `chmod(2)` with the full mode (setuid/setgid/sticky bits included).
pub fn chmod(path: impl AsRef<Path>, mode: u32) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: `p` is a valid NUL-terminated string for the duration of the call.
    check(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) })
}

/// `fchmod(2)`.
pub fn fchmod(file: &File, mode: u32) -> io::Result<()> {
    // SAFETY: the fd is owned by `file` and open for the duration of the call.
    check(unsafe { libc::fchmod(file.as_raw_fd(), mode as libc::mode_t) })
}

/// `mkdir(2)` with an explicit mode.
pub fn mkdir(path: impl AsRef<Path>, mode: u32) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: `p` is a valid NUL-terminated string for the duration of the call.
    check(unsafe { libc::mkdir(p.as_ptr(), mode as libc::mode_t) })
}

/// `open(2)` with raw flags and mode, returning an owned `File`.
pub fn open(path: impl AsRef<Path>, flags: i32, mode: u32) -> io::Result<File> {
    let p = cstr(path);
    // SAFETY: `p` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `openat(2)` relative to an open directory.
pub fn openat(dir: &File, name: impl AsRef<Path>, flags: i32, mode: u32) -> io::Result<File> {
    let p = cstr(name);
    // SAFETY: `p` is valid for the call and `dir` owns an open fd.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            p.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `mkdirat(2)` relative to an open directory.
pub fn mkdirat(dir: &File, name: impl AsRef<Path>, mode: u32) -> io::Result<()> {
    let p = cstr(name);
    // SAFETY: `p` is valid for the call and `dir` owns an open fd.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), p.as_ptr(), mode as libc::mode_t) })
}

/// `unlinkat(2)` relative to an open directory.
pub fn unlinkat(dir: &File, name: impl AsRef<Path>, flags: i32) -> io::Result<()> {
    let p = cstr(name);
    // SAFETY: `p` is valid for the call and `dir` owns an open fd.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), p.as_ptr(), flags) })
}

/// `close(2)` with its result: std's `File` drop ignores close errors, and FUSE reports
/// deferred write errors at FLUSH, i.e. from `close`.
pub fn close(file: File) -> io::Result<()> {
    let fd = file.into_raw_fd();
    // SAFETY: `fd` is owned here (taken out of the `File`) and closed exactly once.
    check(unsafe { libc::close(fd) })
}

/// `fsync(2)` / `fdatasync(2)`.
pub fn fsync(file: &File, data_only: bool) -> io::Result<()> {
    // SAFETY: the fd is owned by `file` and open for the duration of the call.
    check(unsafe {
        if data_only {
            libc::fdatasync(file.as_raw_fd())
        } else {
            libc::fsync(file.as_raw_fd())
        }
    })
}

// ---- extended attributes ----

/// Which object an xattr call addresses.
#[derive(Clone, Copy)]
pub enum On<'a> {
    /// A path, following a final symlink (`setxattr`, `getxattr`, ...).
    Path(&'a Path),
    /// A path, not following a final symlink (`lsetxattr`, `lgetxattr`, ...).
    Link(&'a Path),
    /// An open file (`fsetxattr`, ...).
    Fd(RawFd),
}

/// `setxattr(2)` family; `flags` is 0, `XATTR_CREATE` or `XATTR_REPLACE`.
pub fn setxattr_on(on: On<'_>, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let n = name_cstr(name);
    let v = value.as_ptr().cast::<libc::c_void>();
    // SAFETY: all pointers are valid for the stated lengths for the duration of the call.
    check(unsafe {
        match on {
            On::Path(p) => libc::setxattr(cstr(p).as_ptr(), n.as_ptr(), v, value.len(), flags),
            On::Link(p) => libc::lsetxattr(cstr(p).as_ptr(), n.as_ptr(), v, value.len(), flags),
            On::Fd(fd) => libc::fsetxattr(fd, n.as_ptr(), v, value.len(), flags),
        }
    })
}

/// `getxattr(2)` family into `buf`; an empty `buf` is the size query (NULL buffer, size 0).
pub fn getxattr_into(on: On<'_>, name: &str, buf: &mut [u8]) -> io::Result<usize> {
    let n = name_cstr(name);
    let b = if buf.is_empty() {
        ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast::<libc::c_void>()
    };
    // SAFETY: `b` is NULL with size 0 or valid for `buf.len()` bytes; strings are valid.
    check_len(unsafe {
        match on {
            On::Path(p) => libc::getxattr(cstr(p).as_ptr(), n.as_ptr(), b, buf.len()),
            On::Link(p) => libc::lgetxattr(cstr(p).as_ptr(), n.as_ptr(), b, buf.len()),
            On::Fd(fd) => libc::fgetxattr(fd, n.as_ptr(), b, buf.len()),
        }
    })
}

/// Reads a whole xattr value (size query, then read; retries if it grew in between).
pub fn getxattr_on(on: On<'_>, name: &str) -> io::Result<Vec<u8>> {
    loop {
        let size = getxattr_into(on, name, &mut [])?;
        let mut buf = vec![0u8; size.max(1)];
        match getxattr_into(on, name, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `listxattr(2)` family into `buf`; an empty `buf` is the size query.
pub fn listxattr_into(on: On<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let b = if buf.is_empty() {
        ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast::<libc::c_char>()
    };
    // SAFETY: `b` is NULL with size 0 or valid for `buf.len()` bytes; strings are valid.
    check_len(unsafe {
        match on {
            On::Path(p) => libc::listxattr(cstr(p).as_ptr(), b, buf.len()),
            On::Link(p) => libc::llistxattr(cstr(p).as_ptr(), b, buf.len()),
            On::Fd(fd) => libc::flistxattr(fd, b, buf.len()),
        }
    })
}

/// All xattr names of an object, sorted.
pub fn listxattr_on(on: On<'_>) -> io::Result<Vec<String>> {
    loop {
        let size = listxattr_into(on, &mut [])?;
        let mut buf = vec![0u8; size.max(1)];
        match listxattr_into(on, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                let mut names: Vec<String> = buf
                    .split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect();
                names.sort();
                return Ok(names);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `removexattr(2)` family.
pub fn removexattr_on(on: On<'_>, name: &str) -> io::Result<()> {
    let n = name_cstr(name);
    // SAFETY: strings are valid NUL-terminated strings for the duration of the call.
    check(unsafe {
        match on {
            On::Path(p) => libc::removexattr(cstr(p).as_ptr(), n.as_ptr()),
            On::Link(p) => libc::lremovexattr(cstr(p).as_ptr(), n.as_ptr()),
            On::Fd(fd) => libc::fremovexattr(fd, n.as_ptr()),
        }
    })
}

/// `setxattr(2)` on a path (following symlinks).
pub fn setxattr(path: impl AsRef<Path>, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    setxattr_on(On::Path(path.as_ref()), name, value, flags)
}

/// `getxattr(2)` on a path (following symlinks), whole value.
pub fn getxattr(path: impl AsRef<Path>, name: &str) -> io::Result<Vec<u8>> {
    getxattr_on(On::Path(path.as_ref()), name)
}

/// `listxattr(2)` on a path (following symlinks), sorted names.
pub fn listxattr(path: impl AsRef<Path>) -> io::Result<Vec<String>> {
    listxattr_on(On::Path(path.as_ref()))
}

/// `removexattr(2)` on a path (following symlinks).
pub fn removexattr(path: impl AsRef<Path>, name: &str) -> io::Result<()> {
    removexattr_on(On::Path(path.as_ref()), name)
}

// ---- times ----

/// One timestamp argument of `utimensat(2)`.
#[derive(Clone, Copy, Debug)]
pub enum Time {
    Now,
    Omit,
    At(i64, i64),
}

impl Time {
    fn timespec(self) -> libc::timespec {
        match self {
            Time::Now => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            Time::Omit => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            Time::At(s, ns) => libc::timespec {
                tv_sec: s,
                tv_nsec: ns,
            },
        }
    }
}

/// `utimensat(2)`; `nofollow` sets `AT_SYMLINK_NOFOLLOW`.
pub fn utimensat(
    path: impl AsRef<Path>,
    atime: Time,
    mtime: Time,
    nofollow: bool,
) -> io::Result<()> {
    let p = cstr(path);
    let ts = [atime.timespec(), mtime.timespec()];
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: `p` is valid and `ts` holds exactly the two timespecs utimensat reads.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), flags) })
}

/// `futimens(3)` on an open file.
pub fn futimens(file: &File, atime: Time, mtime: Time) -> io::Result<()> {
    let ts = [atime.timespec(), mtime.timespec()];
    // SAFETY: the fd is open and `ts` holds exactly the two timespecs futimens reads.
    check(unsafe { libc::futimens(file.as_raw_fd(), ts.as_ptr()) })
}

// ---- statfs ----

/// The fields of `statfs(2)` the tests compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub fs_type: i64,
    pub bsize: u64,
    pub frsize: u64,
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub namelen: u64,
}

/// `statfs(2)`.
pub fn statfs(path: impl AsRef<Path>) -> io::Result<StatFs> {
    let p = cstr(path);
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `p` is valid and `s` is a writable statfs.
    check(unsafe { libc::statfs(p.as_ptr(), &mut s) })?;
    Ok(StatFs {
        fs_type: s.f_type as i64,
        bsize: s.f_bsize as u64,
        frsize: s.f_frsize as u64,
        blocks: s.f_blocks,
        bfree: s.f_bfree,
        bavail: s.f_bavail,
        files: s.f_files,
        ffree: s.f_ffree,
        namelen: s.f_namelen as u64,
    })
}

/// `FUSE_SUPER_MAGIC`, the `f_type` of every FUSE mount.
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

// ---- raw directory streams ----

/// One raw directory entry: name and `d_type` (`DT_REG`, `DT_DIR`, ...).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RawEntry {
    pub name: Vec<u8>,
    pub d_type: u8,
}

/// An `opendir(3)` stream, for `telldir`/`seekdir`/`rewinddir` and the `.`/`..` entries that
/// std's `read_dir` hides.
pub struct DirStream {
    dir: *mut libc::DIR,
}

impl DirStream {
    pub fn open(path: impl AsRef<Path>) -> io::Result<DirStream> {
        let p = cstr(path);
        // SAFETY: `p` is a valid NUL-terminated string for the duration of the call.
        let dir = unsafe { libc::opendir(p.as_ptr()) };
        if dir.is_null() {
            Err(io::Error::last_os_error())
        } else {
            Ok(DirStream { dir })
        }
    }

    /// The next entry, `Ok(None)` at the end.
    pub fn next_entry(&mut self) -> io::Result<Option<RawEntry>> {
        // SAFETY: errno is thread-local; resetting it lets us tell end-of-stream from error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `self.dir` is a live stream owned by this value.
        let ent = unsafe { libc::readdir64(self.dir) };
        if ent.is_null() {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(0) | None => Ok(None),
                Some(_) => Err(err),
            };
        }
        // SAFETY: readdir returned a valid entry that lives until the next call on this stream.
        let (name, d_type) = unsafe {
            let e = &*ent;
            (
                CStr::from_ptr(e.d_name.as_ptr()).to_bytes().to_vec(),
                e.d_type,
            )
        };
        Ok(Some(RawEntry { name, d_type }))
    }

    /// Reads up to `n` entries (fewer at the end of the stream).
    pub fn take(&mut self, n: usize) -> io::Result<Vec<RawEntry>> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next_entry()? {
                Some(e) => out.push(e),
                None => break,
            }
        }
        Ok(out)
    }

    /// Reads all remaining entries.
    pub fn rest(&mut self) -> io::Result<Vec<RawEntry>> {
        self.take(usize::MAX)
    }

    /// `telldir(3)`.
    pub fn tell(&mut self) -> i64 {
        // SAFETY: `self.dir` is a live stream owned by this value.
        unsafe { libc::telldir(self.dir) as i64 }
    }

    /// `seekdir(3)` to a position from [`DirStream::tell`].
    pub fn seek(&mut self, pos: i64) {
        // SAFETY: `self.dir` is a live stream; `pos` came from telldir on it.
        unsafe { libc::seekdir(self.dir, pos as libc::c_long) }
    }

    /// `rewinddir(3)`.
    pub fn rewind(&mut self) {
        // SAFETY: `self.dir` is a live stream owned by this value.
        unsafe { libc::rewinddir(self.dir) }
    }
}

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: `self.dir` is a live stream, closed exactly once here.
        unsafe { libc::closedir(self.dir) };
    }
}

/// All entries of a directory as raw (name, d_type) pairs, `.` and `..` included, sorted.
pub fn read_dir_raw(path: impl AsRef<Path>) -> io::Result<Vec<RawEntry>> {
    let mut d = DirStream::open(path)?;
    let mut v = d.rest()?;
    v.sort();
    Ok(v)
}

// ---- mmap ----

/// A shared file mapping, unmapped on drop.
pub struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    /// `mmap(MAP_SHARED)` of `len` bytes from offset 0; `writable` adds `PROT_WRITE`.
    /// Refuses a range past the file's end (touching it would SIGBUS the whole test binary).
    pub fn shared(file: &File, len: usize, writable: bool) -> io::Result<Mapping> {
        let size = file.metadata()?.len();
        if size < len as u64 {
            return Err(io::Error::other(format!(
                "file is {size} bytes, shorter than the {len}-byte mapping"
            )));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel; the fd is open for the call.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else {
            Ok(Mapping { ptr, len })
        }
    }

    /// Copies the mapped bytes out (touching every page: a fault here is a SIGBUS, which
    /// would kill the test binary, so tests only map ranges inside the file).
    pub fn read_all(&self) -> Vec<u8> {
        // SAFETY: the mapping is `len` readable bytes and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len).to_vec() }
    }

    /// Writes `data` at `offset` into the mapping (needs a writable mapping).
    pub fn write_at(&mut self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len, "write past the mapping");
        // SAFETY: bounds checked above; the mapping is writable and owned by `self`.
        unsafe {
            ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.cast::<u8>().add(offset), data.len())
        }
    }

    /// `msync(MS_SYNC)`.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: the range is exactly this live mapping.
        check(unsafe { libc::msync(self.ptr, self.len, libc::MS_SYNC) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range mapped in `shared`, once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// `umount2(2)`.
pub fn umount2(path: impl AsRef<Path>, flags: i32) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: `p` is a valid NUL-terminated string for the duration of the call.
    check(unsafe { libc::umount2(p.as_ptr(), flags) })
}

/// `mount -t tmpfs -o size=BYTES,mode=0755 tmpfs PATH`.
pub fn mount_tmpfs(path: impl AsRef<Path>, size: u64) -> io::Result<()> {
    tmpfs(path, &format!("size={size},mode=0755"), 0)
}

/// `mount -o remount,size=BYTES PATH` of a tmpfs: a full disk made, or made roomy again, under
/// a running drive.
pub fn resize_tmpfs(path: impl AsRef<Path>, size: u64) -> io::Result<()> {
    tmpfs(path, &format!("size={size}"), libc::MS_REMOUNT)
}

fn tmpfs(path: impl AsRef<Path>, opts: &str, flags: libc::c_ulong) -> io::Result<()> {
    let p = cstr(path);
    let src = name_cstr("tmpfs");
    let opts = name_cstr(opts);
    // SAFETY: all strings are valid NUL-terminated strings for the duration of the call.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            p.as_ptr(),
            src.as_ptr(),
            flags,
            opts.as_ptr().cast::<libc::c_void>(),
        )
    })
}

/// A name as raw bytes (for comparing directory entries).
pub fn bytes(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

/// A heap buffer aligned for `O_DIRECT` I/O.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    /// `len` zeroed bytes aligned to 4096.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation of {len} aligned bytes failed");
        AlignedBuf { ptr, layout }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` holds `layout.size()` initialised (zeroed) bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// `flock(2)`.
pub fn flock(file: &File, op: i32) -> io::Result<()> {
    // SAFETY: the fd is owned by `file` and open for the duration of the call.
    check(unsafe { libc::flock(file.as_raw_fd(), op) })
}

/// `fcntl(F_SETLK)`: a non-blocking POSIX record lock (`F_RDLCK`, `F_WRLCK` or `F_UNLCK`).
pub fn setlk(file: &File, kind: i32, start: i64, len: i64) -> io::Result<()> {
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: the fd is open and `fl` is a valid flock for F_SETLK.
    check(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) })
}
