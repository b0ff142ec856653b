//! Replication for peerfs: content-defined chunking, manifests, durable per-peer queues,
//! push/apply, and the start scan with reconciliation.
//!
//! Nothing lives here yet: the single-server drive replicates nothing. The replication issue
//! fills this crate; `vfs` will call it on release and on namespace changes.
