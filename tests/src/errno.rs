//! Outcomes of file operations as comparable values: the Ok value or the errno, printed by name.

use std::fmt;
use std::io;

/// An operation's failure as the tests compare it: the OS errno, or (for the few std errors that
/// carry none, such as an unexpected EOF in `read_exact`) the std error kind.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    Os(i32),
    NotOs(io::ErrorKind),
}

/// The result of one operation, comparable between the plain directory and the mount.
pub type Outcome<T> = Result<T, Errno>;

/// Converts an `io::Result` into a comparable [`Outcome`].
pub fn outcome<T>(r: io::Result<T>) -> Outcome<T> {
    r.map_err(|e| match e.raw_os_error() {
        Some(n) => Errno::Os(n),
        None => Errno::NotOs(e.kind()),
    })
}

/// The symbolic name of an errno, for readable failure messages.
pub fn errno_name(n: i32) -> &'static str {
    match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ESTALE => "ESTALE",
        libc::EDQUOT => "EDQUOT",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EINTR => "EINTR",
        _ => "E?",
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Errno::Os(n) => write!(f, "{}({n})", errno_name(*n)),
            Errno::NotOs(kind) => write!(f, "non-OS error {kind:?}"),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Shorthand for an expected failure: `assert_eq!(r, fails(libc::ENOENT))`.
pub fn fails<T>(errno: i32) -> Outcome<T> {
    Err(Errno::Os(errno))
}
