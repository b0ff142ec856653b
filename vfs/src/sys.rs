//! Thin safe wrappers over the `*at` system calls the drive is built from. Every call is
//! fd-relative with `O_NOFOLLOW` semantics so that renamed ancestors, unlinked-but-open files and
//! PATH_MAX-long paths all work (the node table holds an `O_PATH` fd per known inode).

use std::ffi::{CStr, CString, OsStr};
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use crate::error::{Result, VfsError};

/// Converts a libc return value into a result, taking errno on `-1`.
pub(crate) fn cvt(ret: libc::c_int) -> Result<libc::c_int> {
    if ret == -1 {
        Err(VfsError::last_os())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> Result<usize> {
    if ret < 0 {
        Err(VfsError::last_os())
    } else {
        Ok(ret as usize)
    }
}

/// A name from the kernel or a caller, as a C string. Interior NULs cannot name a file.
pub(crate) fn cname(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| VfsError::InvalidName)
}

/// `/proc/self/fd/N`: the way to reach an inode held only by an `O_PATH` fd with calls that have
/// no fd-relative, empty-path form (open, xattrs, truncate). Formatted on the stack.
pub(crate) struct ProcPath {
    buf: [u8; 32],
}

impl ProcPath {
    pub(crate) fn new(fd: BorrowedFd<'_>) -> Self {
        let mut buf = [0u8; 32];
        let mut cursor = &mut buf[..31];
        // 14 bytes of prefix plus at most 10 digits: always fits, so the write cannot fail.
        let _ = write!(cursor, "/proc/self/fd/{}", fd.as_raw_fd());
        ProcPath { buf }
    }

    pub(crate) fn as_cstr(&self) -> &CStr {
        // The buffer was zeroed and at most 31 bytes written, so a NUL always terminates it.
        CStr::from_bytes_until_nul(&self.buf).unwrap_or(c"/proc/self/fd/")
    }
}

pub(crate) fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string and `dir` a live fd for the call.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: `fd` was just returned by openat and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a path (absolute) — used for `/proc/self/fd/N` re-opens and the backing root.
pub(crate) fn open_path(path: &CStr, flags: i32, mode: u32) -> Result<OwnedFd> {
    // SAFETY: `path` is a valid NUL-terminated string.
    let fd =
        cvt(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    // SAFETY: `fd` was just returned by open and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: the empty path with AT_EMPTY_PATH stats `fd` itself; `st` is written on success.
    cvt(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() })
}

pub(crate) fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid fd and NUL-terminated name; `st` is written on success.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() })
}

pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub(crate) fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, rdev) })
        .map(drop)
}

pub(crate) fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    // SAFETY: valid fd and NUL-terminated strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub(crate) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub(crate) fn renameat2(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
    flags: u32,
) -> Result<()> {
    // SAFETY: valid fds and NUL-terminated names.
    cvt(unsafe {
        libc::renameat2(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// Hard-links the inode behind `fd` (an `O_PATH` fd) as `dir/name`, through `/proc/self/fd`
/// (works without CAP_DAC_READ_SEARCH, unlike `AT_EMPTY_PATH`).
pub(crate) fn link_fd(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    let proc = ProcPath::new(fd);
    // SAFETY: valid fd and NUL-terminated strings.
    cvt(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc.as_cstr().as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub(crate) fn readlink_fd(fd: BorrowedFd<'_>) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: the empty path reads the symlink `fd` refers to; `buf` is writable for its length.
    let n = cvt_size(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub(crate) fn fchownat_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> Result<()> {
    // SAFETY: empty path with AT_EMPTY_PATH changes the inode behind `fd`; -1 keeps a field.
    cvt(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod of the inode behind an `O_PATH` fd. Symlinks have no mode of their own on Linux.
pub(crate) fn fchmod_fd(fd: BorrowedFd<'_>, mode: u32) -> Result<()> {
    let proc = ProcPath::new(fd);
    // SAFETY: NUL-terminated path; the magic link resolves to the inode behind `fd`.
    cvt(unsafe { libc::chmod(proc.as_cstr().as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub(crate) fn truncate_fd_path(fd: BorrowedFd<'_>, size: u64) -> Result<()> {
    let proc = ProcPath::new(fd);
    let size = i64::try_from(size).map_err(|_| VfsError::os(libc::EFBIG))?;
    // SAFETY: NUL-terminated path.
    cvt(unsafe { libc::truncate(proc.as_cstr().as_ptr(), size) }).map(drop)
}

/// Whether `fd` was opened for writing (ftruncate works through it).
pub(crate) fn opened_for_writing(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: F_GETFL on a valid fd.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    fl >= 0 && fl & libc::O_ACCMODE != libc::O_RDONLY
}

pub(crate) fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> Result<()> {
    let size = i64::try_from(size).map_err(|_| VfsError::os(libc::EFBIG))?;
    // SAFETY: valid fd.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }).map(drop)
}

pub(crate) fn utimens_fd(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> Result<()> {
    // SAFETY: empty path with AT_EMPTY_PATH (Linux ≥ 5.8) changes the inode behind `fd`, also for
    // symlinks; `times` points to two timespecs.
    cvt(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub(crate) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<usize> {
    let offset = i64::try_from(offset).map_err(|_| VfsError::os(libc::EINVAL))?;
    // SAFETY: `buf` is writable for its length.
    cvt_size(unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) })
}

pub(crate) fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> Result<usize> {
    let offset = i64::try_from(offset).map_err(|_| VfsError::os(libc::EINVAL))?;
    // SAFETY: `buf` is readable for its length.
    cvt_size(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) })
}

pub(crate) fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

pub(crate) fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> Result<()> {
    let offset = i64::try_from(offset).map_err(|_| VfsError::os(libc::EFBIG))?;
    let len = i64::try_from(len).map_err(|_| VfsError::os(libc::EFBIG))?;
    // SAFETY: valid fd.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) }).map(drop)
}

pub(crate) fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> Result<i64> {
    // SAFETY: valid fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(VfsError::last_os())
    } else {
        Ok(r)
    }
}

pub(crate) fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: u64,
    fd_out: BorrowedFd<'_>,
    off_out: u64,
    len: u64,
) -> Result<usize> {
    let mut off_in = i64::try_from(off_in).map_err(|_| VfsError::os(libc::EINVAL))?;
    let mut off_out = i64::try_from(off_out).map_err(|_| VfsError::os(libc::EINVAL))?;
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    // SAFETY: valid fds; the offsets are local variables the call may update.
    cvt_size(unsafe {
        libc::copy_file_range(
            fd_in.as_raw_fd(),
            &mut off_in,
            fd_out.as_raw_fd(),
            &mut off_out,
            len,
            0,
        )
    } as libc::ssize_t)
}

pub(crate) fn fstatvfs(fd: BorrowedFd<'_>) -> Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: valid fd; `st` is written on success.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() })
}

/// Extended attributes, reached through `/proc/self/fd/N` for an inode held by an `O_PATH` fd,
/// or as `/proc/self/fd/DIR/NAME` with the `l*` calls for a symlink.
pub(crate) mod xattr {
    use std::os::fd::AsFd;
    use std::sync::Arc;

    use super::*;

    pub(crate) enum Target {
        Fd(Arc<OwnedFd>),
        Link(Arc<OwnedFd>, CString),
    }

    /// The path to hand to the xattr call, and whether it must not follow a final symlink.
    fn path(t: &Target) -> Result<(CString, bool)> {
        match t {
            Target::Fd(fd) => Ok((ProcPath::new(fd.as_fd()).as_cstr().to_owned(), false)),
            Target::Link(dir, name) => {
                let mut p = ProcPath::new(dir.as_fd()).as_cstr().to_bytes().to_vec();
                p.push(b'/');
                p.extend_from_slice(name.to_bytes());
                Ok((CString::new(p).map_err(|_| VfsError::InvalidName)?, true))
            }
        }
    }

    pub(crate) fn get(t: &Target, name: &CStr, buf: &mut [u8]) -> Result<usize> {
        let (p, nofollow) = path(t)?;
        let f = if nofollow {
            libc::lgetxattr
        } else {
            libc::getxattr
        };
        // SAFETY: NUL-terminated strings; `buf` writable for its length (size 0 asks for the
        // size).
        cvt_size(unsafe {
            f(
                p.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        })
    }

    pub(crate) fn set(t: &Target, name: &CStr, value: &[u8], flags: i32) -> Result<()> {
        let (p, nofollow) = path(t)?;
        let f = if nofollow {
            libc::lsetxattr
        } else {
            libc::setxattr
        };
        // SAFETY: NUL-terminated strings; `value` readable for its length.
        cvt(unsafe {
            f(
                p.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })
        .map(drop)
    }

    pub(crate) fn list(t: &Target, buf: &mut [u8]) -> Result<usize> {
        let (p, nofollow) = path(t)?;
        let f = if nofollow {
            libc::llistxattr
        } else {
            libc::listxattr
        };
        // SAFETY: NUL-terminated path; `buf` writable for its length.
        cvt_size(unsafe { f(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
    }

    pub(crate) fn remove(t: &Target, name: &CStr) -> Result<()> {
        let (p, nofollow) = path(t)?;
        let f = if nofollow {
            libc::lremovexattr
        } else {
            libc::removexattr
        };
        // SAFETY: NUL-terminated strings.
        cvt(unsafe { f(p.as_ptr(), name.as_ptr()) }).map(drop)
    }
}

/// One directory entry as `getdents64` returns it.
pub(crate) struct RawDirEntry {
    pub(crate) ino: u64,
    pub(crate) kind: u8,
    pub(crate) name: Vec<u8>,
}

/// Reads a whole directory from an fd opened `O_RDONLY | O_DIRECTORY`, from its start.
pub(crate) fn read_dir_all(fd: BorrowedFd<'_>) -> Result<Vec<RawDirEntry>> {
    lseek(fd, 0, libc::SEEK_SET)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `buf` is writable for its length; getdents64 writes whole records into it.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd() as libc::c_long,
                buf.as_mut_ptr(),
                buf.len() as libc::c_long,
            )
        };
        if n < 0 {
            return Err(VfsError::last_os());
        }
        if n == 0 {
            return Ok(out);
        }
        let n = n as usize;
        let mut pos = 0;
        // Record layout (linux_dirent64): u64 ino, i64 off, u16 reclen, u8 type, name NUL-terminated.
        while pos + 19 <= n {
            let ino = u64::from_ne_bytes(buf[pos..pos + 8].try_into().unwrap_or([0; 8]));
            let reclen = u16::from_ne_bytes([buf[pos + 16], buf[pos + 17]]) as usize;
            let kind = buf[pos + 18];
            if reclen < 19 || pos + reclen > n {
                return Err(VfsError::os(libc::EIO));
            }
            let name_bytes = &buf[pos + 19..pos + reclen];
            let len = name_bytes
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(name_bytes.len());
            out.push(RawDirEntry {
                ino,
                kind,
                name: name_bytes[..len].to_vec(),
            });
            pos += reclen;
        }
    }
}

/// The caller's credentials, applied to this thread's filesystem identity for the duration of a
/// call that creates something: the backing filesystem then assigns owner, group (including a
/// setgid parent's) and strips S_ISGID exactly as it would for the caller on the plain folder.
///
/// `setfsuid`/`setfsgid` and the raw `setgroups` syscall are per-thread on Linux (glibc's
/// `setgroups` wrapper would change every thread, so it is not used).
pub(crate) struct CallerCreds {
    active: bool,
}

impl CallerCreds {
    pub(crate) fn assume(uid: u32, gid: u32, pid: u32) -> CallerCreds {
        if uid == 0 && gid == 0 {
            return CallerCreds { active: false };
        }
        let groups = supplementary_groups(pid).unwrap_or_default();
        // SAFETY: per-thread credential syscalls with valid arguments; restored in Drop.
        unsafe {
            libc::syscall(
                libc::SYS_setgroups,
                groups.len() as libc::c_long,
                groups.as_ptr(),
            );
            libc::syscall(libc::SYS_setfsgid, gid as libc::c_long);
            libc::syscall(libc::SYS_setfsuid, uid as libc::c_long);
        }
        CallerCreds { active: true }
    }
}

impl Drop for CallerCreds {
    fn drop(&mut self) {
        if self.active {
            // SAFETY: restores the daemon's own identity (root, no supplementary groups) on this
            // thread; the daemon itself runs with no supplementary groups of its own.
            unsafe {
                libc::syscall(libc::SYS_setfsuid, 0 as libc::c_long);
                libc::syscall(libc::SYS_setfsgid, 0 as libc::c_long);
                libc::syscall(
                    libc::SYS_setgroups,
                    0 as libc::c_long,
                    std::ptr::null::<libc::gid_t>(),
                );
            }
        }
    }
}

/// The supplementary groups of process `pid`, from `/proc/PID/status`.
fn supplementary_groups(pid: u32) -> Option<Vec<libc::gid_t>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Groups:"))?;
    Some(
        line["Groups:".len()..]
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}
