//! Resolving untrusted relative paths under the watch set: every component is walked with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` from the backing root, so neither `..`
//! nor a symlink (a hostile peer may have replicated one) can lead outside the backing folder.
//! Callers then act on the last component with `*at` calls and `AT_SYMLINK_NOFOLLOW`.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use peerfs_proto::RelPath;

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `openat2` beneath `dir`; `flags` as for open(2). Read-only opens of files add `O_NOATIME`
/// where allowed: the replicator reading a file must not change what users see (pjdfstest
/// checks atime after UTIME_OMIT).
pub fn openat2_beneath(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    let reads_file = flags & libc::O_ACCMODE == libc::O_RDONLY
        && flags & (libc::O_PATH | libc::O_DIRECTORY | libc::O_CREAT) == 0;
    if reads_file {
        match openat2_raw(dir, path, flags | libc::O_NOATIME, mode) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            other => return other,
        }
    }
    openat2_raw(dir, path, flags, mode)
}

fn openat2_raw(dir: BorrowedFd<'_>, path: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    openat2_resolve(dir, path, flags, mode, 0)
}

/// `openat2` beneath `dir` with `resolve` flags added.
fn openat2_resolve(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain data; all-zero is a valid value to fill in.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
        how.mode = u64::from(mode);
    }
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS | resolve;
    loop {
        // SAFETY: `how` and `path` are valid for the call; the result is a new descriptor we own.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel returned a fresh descriptor.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) && e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Opens folder `rel` beneath `root` (`O_PATH`), creating missing folders (mode 0755) when
/// `create` is set.
pub fn open_dir(root: BorrowedFd<'_>, rel: &RelPath, create: bool) -> io::Result<OwnedFd> {
    // The usual case in one call: every folder exists and none is a symlink. Anything else
    // (a missing folder, a symlink, an error) takes the walk below, one component at a time.
    if !rel.is_root() {
        if let Ok(whole) = cstr(rel.as_bytes()) {
            if let Ok(fd) = openat2_resolve(
                root,
                &whole,
                libc::O_PATH | libc::O_DIRECTORY,
                0,
                libc::RESOLVE_NO_SYMLINKS,
            ) {
                return Ok(fd);
            }
        }
    }
    let mut cur = openat2_beneath(root, c".", libc::O_PATH | libc::O_DIRECTORY, 0)?;
    for comp in rel.components() {
        let name = cstr(comp.as_bytes())?;
        let next = match openat2_beneath(cur_fd(&cur), &name, libc::O_PATH | libc::O_DIRECTORY, 0) {
            Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) => {
                // SAFETY: plain mkdirat on a descriptor we own and a NUL-terminated name.
                let r = unsafe { libc::mkdirat(cur.as_raw_fd(), name.as_ptr(), 0o755) };
                if r != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(e);
                    }
                }
                openat2_beneath(cur_fd(&cur), &name, libc::O_PATH | libc::O_DIRECTORY, 0)?
            }
            other => other?,
        };
        cur = next;
    }
    Ok(cur)
}

fn cur_fd(fd: &OwnedFd) -> BorrowedFd<'_> {
    use std::os::fd::AsFd;
    fd.as_fd()
}

/// The folder holding `rel` (opened `O_PATH` beneath `root`) and the last component as a C
/// string. Fails with EINVAL for the root itself.
pub fn open_parent(
    root: BorrowedFd<'_>,
    rel: &RelPath,
    create: bool,
) -> io::Result<(OwnedFd, CString)> {
    let (parent, name) = rel
        .split_last()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let dir = open_dir(root, &parent, create)?;
    Ok((dir, cstr(name.as_bytes())?))
}

/// The name as an `OsStr` (for messages).
pub fn display_name(name: &CStr) -> &OsStr {
    OsStr::from_bytes(name.to_bytes())
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, NUL-terminated name, valid out-pointer.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(st)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn symlinks_cannot_lead_outside() {
        let root = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).expect("symlink");
        std::fs::create_dir(root.path().join("inside")).expect("mkdir");
        let rootfd = std::fs::File::open(root.path()).expect("open");
        let fd: OwnedFd = rootfd.into();
        let rel = RelPath::new(b"escape/x").expect("path");
        let err = open_parent(fd.as_fd(), &rel, false).expect_err("escape must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{err}");
        let rel = RelPath::new(b"inside/new/deeper/file").expect("path");
        let (_dir, name) = open_parent(fd.as_fd(), &rel, true).expect("create parents");
        assert_eq!(name.to_bytes(), b"file");
        assert!(root.path().join("inside/new/deeper").is_dir());
    }
}
