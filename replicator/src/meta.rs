//! Replicated attributes ([`Meta`]): read from a local object, applied to a received one.
//!
//! Policy (a peer is trusted with data, not with the server): setuid/setgid bits are never
//! applied, only `user.*` extended attributes travel, ownership is applied only when the
//! configuration says so, and atime never replicates.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use peerfs_proto::msg::{ByteBuf, Meta};

use crate::beneath::openat2_beneath;

/// Largest xattr value read or applied (Linux's limit is 64 KiB).
const XATTR_MAX: usize = 64 * 1024;
/// At most this many user xattrs per object travel.
const XATTRS_MAX: usize = 128;

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cvt_size(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// The attributes of an object from its stat and (for files and folders) its `user.*` xattrs
/// read through `fd` (an fd opened for reading; `None` for symlinks).
pub fn read_meta(st: &libc::stat, fd: Option<BorrowedFd<'_>>) -> Meta {
    let xattrs = fd
        .map(|fd| read_user_xattrs(fd).unwrap_or_default())
        .unwrap_or_default();
    Meta {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime_sec: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec as u32,
        xattrs,
    }
}

fn list_xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: buf is valid for its length.
        let r = unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match cvt_size(r) {
            Ok(n) => {
                buf.truncate(n);
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < 1 << 20 => {
                buf.resize(buf.len() * 4, 0);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
    }
    Ok(buf
        .split(|b| *b == 0)
        .filter(|n| n.starts_with(b"user."))
        .map(<[u8]>::to_vec)
        .collect())
}

fn read_user_xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<(ByteBuf, ByteBuf)>> {
    let mut out = Vec::new();
    for name in list_xattrs(fd)?.into_iter().take(XATTRS_MAX) {
        let Ok(cname) = CString::new(name.clone()) else {
            continue;
        };
        let mut buf = vec![0u8; XATTR_MAX];
        // SAFETY: valid name and buffer.
        let r = unsafe {
            libc::fgetxattr(
                fd.as_raw_fd(),
                cname.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if let Ok(n) = cvt_size(r) {
            buf.truncate(n);
            out.push((ByteBuf(name), ByteBuf(buf)));
        }
    }
    out.sort();
    Ok(out)
}

/// Applies `meta` to the object behind `fd` (a file or folder opened for reading, or an
/// `O_PATH` symlink when `symlink`). `owners`: also apply uid/gid.
pub fn apply_meta(fd: BorrowedFd<'_>, meta: &Meta, owners: bool, symlink: bool) -> io::Result<()> {
    apply_meta_as(fd, meta, owners, symlink, None)
}

/// [`apply_meta`] for a regular file this process has just created (`O_EXCL` or `O_TMPFILE`)
/// and written nothing but content to; `st` is its `fstat`. What already holds is not applied again: the
/// owner, the permissions and, with no extended attributes to set, the attributes (a new file
/// has no `user.` attributes to remove). Receivers apply metadata to every file they build, so
/// each syscall left out here is one per replicated file.
pub fn apply_meta_new(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    owners: bool,
    st: &libc::stat,
) -> io::Result<()> {
    apply_meta_as(fd, meta, owners, false, Some(st))
}

fn apply_meta_as(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    owners: bool,
    symlink: bool,
    new: Option<&libc::stat>,
) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    let empty = c"";
    let owned = new.is_some_and(|st| st.st_uid == meta.uid && st.st_gid == meta.gid);
    if owners && !owned {
        // SAFETY: AT_EMPTY_PATH on our own descriptor.
        cvt(unsafe {
            libc::fchownat(
                raw,
                empty.as_ptr(),
                meta.uid,
                meta.gid,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
    }
    if !symlink {
        // Never setuid/setgid from a peer; the sticky bit and permissions travel.
        let mode = meta.mode & 0o1777;
        // SAFETY: plain fchmod.
        cvt(unsafe { libc::fchmod(raw, mode) })?;
        apply_xattrs(fd, &meta.xattrs)?;
    }
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: meta.mtime_sec as libc::time_t,
            tv_nsec: (meta.mtime_nsec.min(999_999_999)) as libc::c_long,
        },
    ];
    // SAFETY: AT_EMPTY_PATH utimensat on our own descriptor with two valid timespecs.
    cvt(unsafe {
        libc::utimensat(
            raw,
            empty.as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .or_else(|e| {
        // Older kernels refuse AT_EMPTY_PATH for utimensat; fall back to futimens.
        if e.raw_os_error() == Some(libc::EINVAL) && !symlink {
            // SAFETY: futimens with two valid timespecs.
            cvt(unsafe { libc::futimens(raw, times.as_ptr()) })
        } else {
            Err(e)
        }
    })
}

fn apply_xattrs(fd: BorrowedFd<'_>, want: &[(ByteBuf, ByteBuf)]) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    let have = list_xattrs(fd)?;
    for name in &have {
        if !want.iter().any(|(n, _)| &n.0 == name) {
            if let Ok(c) = CString::new(name.clone()) {
                // SAFETY: valid name.
                let _ = unsafe { libc::fremovexattr(raw, c.as_ptr()) };
            }
        }
    }
    for (name, value) in want.iter().take(XATTRS_MAX) {
        if !name.0.starts_with(b"user.") || value.0.len() > XATTR_MAX {
            continue;
        }
        let Ok(c) = CString::new(name.0.clone()) else {
            continue;
        };
        // SAFETY: valid name and value buffer.
        let r =
            unsafe { libc::fsetxattr(raw, c.as_ptr(), value.0.as_ptr().cast(), value.0.len(), 0) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOTSUP) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Opens `name` in `dir` for reading attributes: files read-only, folders as folders, never
/// following a symlink (`None` for a symlink or a special file).
pub fn open_for_meta(
    dir: BorrowedFd<'_>,
    name: &std::ffi::CStr,
    st: &libc::stat,
) -> io::Result<Option<OwnedFd>> {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => openat2_beneath(
            dir,
            name,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            0,
        )
        .map(Some),
        libc::S_IFDIR => openat2_beneath(
            dir,
            name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map(Some),
        _ => Ok(None),
    }
}
