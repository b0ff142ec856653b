//! The one error type of the drive. Adapters map it to their platform's codes (errno on Linux,
//! NTSTATUS on Windows) in exactly one place each.

use std::fmt;
use std::io;

use crate::NodeId;

/// Everything a drive operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum VfsError {
    /// The backing filesystem refused the operation; its errno is passed through unchanged so
    /// the drive behaves exactly like the folder beneath it.
    #[error("{0}")]
    Os(Errno),
    /// The kernel named a node this drive does not know (already forgotten). A kernel/daemon
    /// disagreement, not a user error.
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// The kernel named a file or directory handle this drive does not know.
    #[error("unknown handle {0}")]
    UnknownHandle(u64),
    /// Another peer holds the write lock on `path` (or on something below it, for a folder).
    /// Linux maps this to ETXTBSY, which Samba turns into a sharing violation ("file in use").
    #[error("{path} is locked by peer {holder}")]
    Locked {
        path: peerfs_proto::RelPath,
        holder: String,
    },
    /// A name that cannot exist on the backing filesystem (an interior NUL byte).
    #[error("invalid name")]
    InvalidName,
    /// Setting the drive up failed (only from [`crate::Vfs::new`]).
    #[error("{what}: {source}")]
    Setup {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl VfsError {
    /// Shorthand for a passed-through errno.
    pub(crate) fn os(errno: i32) -> Self {
        VfsError::Os(Errno(errno))
    }

    /// The error of the last failed libc call on this thread.
    pub(crate) fn last_os() -> Self {
        Self::os(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
}

impl From<io::Error> for VfsError {
    fn from(e: io::Error) -> Self {
        Self::os(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// A raw errno value from the backing filesystem.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Errno({}: {})",
            self.0,
            io::Error::from_raw_os_error(self.0)
        )
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.0))
    }
}

/// The drive's result type.
pub type Result<T, E = VfsError> = std::result::Result<T, E>;
