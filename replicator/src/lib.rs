//! Replication for peerfs: content-defined chunking, manifests, deltas, their atomic
//! application on the receiver, and the durable replication state in sled.
//!
//! - [`chunk`]: FastCDC cut points and blake3 chunk ids (fixed 2/8/64 KiB sizes).
//! - [`manifest`]: a version's chunk list and content hash, encoding, O(edit) re-chunking.
//! - [`delta`]: the edit script a peer needs to go from the version it holds to the new one.
//! - [`apply`]: the receiver rebuilding the new version beside the target and renaming it in.
//! - [`store`]: the durable state in sled: manifests and per-peer outgoing queues.

pub mod apply;
pub mod beneath;
pub mod catalog;
pub mod chunk;
pub mod delta;
pub mod engine;
pub mod manifest;
pub mod meta;
pub mod patch;
pub mod store;
pub mod trash;

pub use apply::{ApplyError, ApplyOutcome, ChunkSource, TMP_PREFIX, VerifiedChunk, apply};
pub use chunk::{AVG_SIZE, ChunkRef, Hash, MAX_SIZE, MIN_SIZE};
pub use delta::{Delta, DeltaError, Op};
pub use manifest::{Manifest, ManifestError, RechunkStats, Splice, rechunk, rechunk_splices};
