//! The peerfs wire layer, shared by every crate that talks across a trust boundary: owns the
//! validated relative path, peer identity and TLS, framing, the typed messages and the peer
//! connection manager ([`mesh`]). Nothing here knows about locks' or replication's rules.
//!
//! [`RelPath`] is the one validated relative-path type: everything that names a file inside the
//! watch set from outside the kernel (a Windows adapter's path, a peer's wire message) goes
//! through it, so nothing can name a path outside the backing folder. [`PeerId`] and the
//! [`msg`] types are what peers say to each other; docs/PROTOCOL.md describes the protocol.

pub mod frame;
pub mod identity;
pub mod mesh;
pub mod msg;
mod peer_id;
mod relpath;
pub mod tls;

pub use identity::{Identity, IdentityError};
pub use peer_id::{PeerId, PeerIdError};
pub use relpath::{RelPath, RelPathError};

/// The TCP port peers listen on unless configured otherwise.
pub const DEFAULT_PORT: u16 = 7333;
