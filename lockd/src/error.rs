//! The one error type of lock acquisition; vfs maps every variant to `ETXTBSY`.

use peerfs_proto::PeerId;

/// Why a lock was not obtained.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// `peer` holds the name (or is about to: its concurrent request has priority, or it may
    /// have won while we could not hear from it).
    #[error("locked by peer {peer}")]
    HeldBy { peer: PeerId },
    /// Policy `strict` and `peer` is not connected or did not answer in time.
    #[error("peer {peer} is unreachable (lock policy strict)")]
    Unreachable { peer: PeerId },
    /// The request could not be settled in time by the service (its caller gave up, or the
    /// service is shutting down). The core itself always settles by its deadline.
    #[error("lock request timed out")]
    Timeout,
}
