//! Types shared by every peerfs crate that talks about files across a trust boundary.
//!
//! [`RelPath`] is the one validated relative-path type: everything that names a file inside the
//! watch set from outside the kernel (a Windows adapter's path, a peer's wire message) goes
//! through it, so nothing can name a path outside the backing folder. [`PeerId`] and the
//! [`msg`] types are what peers say to each other.

pub mod msg;
mod peer_id;
mod relpath;

pub use peer_id::{PeerId, PeerIdError};
pub use relpath::{RelPath, RelPathError};
