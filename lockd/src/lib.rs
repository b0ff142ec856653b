//! Distributed locks for peerfs: the lock table, leases, fencing tokens, the mesh protocol and
//! the etcd backend.
//!
//! Nothing lives here yet: the single-server drive takes no cross-peer locks. The peers-and-locks
//! issue fills this crate; `vfs` will call it before every read-write open.
