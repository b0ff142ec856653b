//! Types shared by every peerfs crate that talks about files across a trust boundary.
//!
//! Today that is [`RelPath`], the one validated relative-path type: everything that names a file
//! inside the watch set from outside the kernel (a Windows adapter's path, and soon a peer's wire
//! message) goes through it, so nothing can name a path outside the backing folder. The wire
//! messages and peer identity join this crate with the peers issue.

mod relpath;

pub use relpath::{RelPath, RelPathError};
