//! The typed messages peers exchange, one per frame (postcard encoding; layout in
//! docs/PROTOCOL.md). Decoding validates every field: paths through [`RelPath`], enums by tag;
//! an unknown tag or trailing bytes is a decode error that closes the connection.

use serde::{Deserialize, Serialize};

use crate::{PeerId, RelPath};

/// The protocol version this build speaks; exchanged in [`Message::Hello`].
pub const PROTOCOL_VERSION: u32 = 5;

/// Largest content sent inline in a [`ReplMsg::Begin`]: with a path, a version and a few
/// attributes it stays well within a Bulk frame (64 KiB).
pub const MAX_INLINE: usize = 32 * 1024;

/// One frame's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First frame in each direction after the TLS handshake. A different `protocol` ends the
    /// connection with a logged reason.
    Hello {
        protocol: u32,
        name: String,
    },
    /// Heartbeat; answered with [`Message::Pong`] carrying the same nonce (round-trip time).
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Distributed locking (lockd, mesh mode).
    Lock(LockMsg),
    /// Replication (the replicator's push stream and its acknowledgements).
    Repl(ReplMsg),
    /// The peers the sender is connected to right now (sent on every connection and whenever
    /// that set changes): a peer that is not connected to one of them directly reaches it
    /// through the sender (peer parent / relay).
    Neighbors {
        peers: Vec<(PeerId, String)>,
    },
    /// A lock message from `from` for `to`, relayed by the peer that sends this frame. `hops`
    /// counts relays so far; a relay forwards only to a peer it is connected to.
    Routed {
        from: PeerId,
        to: PeerId,
        hops: u8,
        lock: Box<LockMsg>,
    },
}

/// Most relays a routed message may take.
pub const MAX_HOPS: u8 = 2;

/// A 16-byte digest of a subtree (per-folder summaries of reconciliation).
pub type Digest = [u8; 16];

/// Most peers a version vector may name (bounds decoding work).
pub const MAX_VV: usize = 256;
/// Most earlier content hashes a version carries.
pub const MAX_HISTORY: usize = 8;
/// Most entries in one [`ReplMsg::List`] or [`ReplMsg::Have`] frame.
pub const MAX_ITEMS: usize = 1024;

/// Bits of a child's name hash that each bucket level adds: a bucket splits into
/// [`BUCKET_FANOUT`] sub-buckets.
pub const BUCKET_BITS: u32 = 6;
/// Sub-buckets per bucket (the digests in one [`ReplMsg::Buckets`]).
pub const BUCKET_FANOUT: usize = 1 << BUCKET_BITS;
/// Deepest bucket level (a bucket of this level is always listed by name).
pub const MAX_BUCKET_LEVEL: u8 = 5;

/// A part of a folder's children in a reconciliation listing: those whose name hash (the
/// first 8 bytes of blake3 of the name, big-endian) begins with the `level * BUCKET_BITS`
/// bits `index`. Level 0 (index 0) is the whole folder.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Bucket {
    pub level: u8,
    pub index: u64,
}

impl Bucket {
    /// The whole folder.
    pub const ALL: Bucket = Bucket { level: 0, index: 0 };

    /// Checks the bounds decoding cannot express.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.level > MAX_BUCKET_LEVEL {
            return Err("bucket level too deep");
        }
        if self.index >> (u32::from(self.level) * BUCKET_BITS) != 0 {
            return Err("bucket index out of range");
        }
        Ok(())
    }

    /// Whether a child whose name hashes to `hash` is in this bucket.
    pub fn contains(&self, hash: u64) -> bool {
        self.level == 0 || hash >> (64 - u32::from(self.level) * BUCKET_BITS) == self.index
    }

    /// The sub-bucket (one level deeper) of a child whose name hashes to `hash`, by its
    /// position `0..BUCKET_FANOUT` in this bucket. Only for a bucket above the deepest level.
    pub fn slot(&self, hash: u64) -> usize {
        let shift = 64 - (u32::from(self.level) + 1) * BUCKET_BITS;
        ((hash >> shift) as usize) & (BUCKET_FANOUT - 1)
    }

    /// Sub-bucket `slot` of this bucket.
    pub fn child(&self, slot: usize) -> Bucket {
        Bucket {
            level: self.level + 1,
            index: (self.index << BUCKET_BITS) | (slot as u64 & (BUCKET_FANOUT as u64 - 1)),
        }
    }
}

/// The version of an object at a path: who changed it how often (version vector), where and
/// when the newest change was made, and the content hashes it replaced (ancestry by hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// (peer, counter), sorted by peer, each peer at most once.
    pub vv: Vec<(PeerId, u64)>,
    /// The peer that made this version, its own name, and its clock then (Unix seconds).
    pub origin: PeerId,
    pub origin_name: String,
    pub time: i64,
    /// Content hashes of earlier versions of this object, newest first.
    pub history: Vec<Hash>,
    /// Attribute clock (Lamport) and the peer that set the attributes last.
    pub mclock: u64,
    pub mpeer: PeerId,
}

impl Version {
    /// Checks the bounds decoding cannot express.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.vv.len() > MAX_VV {
            return Err("version vector too long");
        }
        if self.vv.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("version vector not sorted");
        }
        if self.history.len() > MAX_HISTORY {
            return Err("history too long");
        }
        if self.origin_name.len() > 64
            || self
                .origin_name
                .chars()
                .any(|c| c.is_control() || c == '/' || c == '\\')
        {
            return Err("bad origin name");
        }
        Ok(())
    }
}

/// What kind of object an entry of the reconciliation index is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Deleted (a tombstone): remembered so a returning peer does not bring it back.
    Gone,
}

/// A peer's state of one path, as reconciliation compares it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryState {
    pub kind: Kind,
    /// Content hash of a file, hash of a symlink's target, zero otherwise.
    pub hash: Hash,
    pub size: u64,
    pub mode: u32,
    pub ver: Version,
}

/// One child in a [`ReplMsg::List`]: its name, whether it is a folder, and the digest of it
/// (with everything below it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListItem {
    pub name: ByteBuf,
    pub dir: bool,
    pub digest: Digest,
}

/// A 32-byte blake3 hash (chunk id or content hash).
pub type Hash = [u8; 32];

/// Replicated attributes of a file, folder or symlink. Ownership and modes are applied by the
/// receiver's policy (setuid/setgid are always stripped); only `user.*` xattrs travel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub xattrs: Vec<(ByteBuf, ByteBuf)>,
}

/// Bytes serialised compactly (postcard byte string, not a sequence of integers).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ByteBuf(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// A namespace change, applied by the receiver in stream order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NsOp {
    Mkdir {
        path: RelPath,
        meta: Meta,
    },
    Symlink {
        path: RelPath,
        target: ByteBuf,
        meta: Meta,
    },
    /// A new hard link `path` to the file at `existing`.
    Link {
        existing: RelPath,
        path: RelPath,
    },
    /// Moves the object at `path` (a folder with everything in it) to the receiver's trash.
    Remove {
        path: RelPath,
    },
    /// Renames (over an existing object, which goes to the trash).
    Rename {
        from: RelPath,
        to: RelPath,
    },
    /// New attributes for the object at `path`.
    SetMeta {
        path: RelPath,
        meta: Meta,
    },
}

/// How the receiver fared with one record of the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckOutcome {
    Applied,
    /// The receiver's current content at the path is not the transfer's base (`have`: its
    /// content hash, `None` if it has no file there): resend against that, or in full.
    BaseMismatch {
        have: Option<Hash>,
    },
    /// The operation needs an object the receiver does not have (a rename's source, a link's
    /// target): send the content of `path` instead.
    NeedContent {
        path: RelPath,
    },
    /// Applying failed; the receiver's files are unchanged. `retry`: worth trying again later
    /// (disk full, permission), else the record is skipped.
    Failed {
        error: String,
        retry: bool,
    },
}

/// Replication stream, sender → receiver on the Bulk lane (in order), acknowledgements and
/// flow credit receiver → sender on the Control lane.
///
/// Each queued record travels as one [`ReplMsg::Op`] or as a content transfer:
/// [`ReplMsg::Begin`], then `Copy`/`Data` pieces in new-file order, then [`ReplMsg::End`]
/// (a small version travels whole in its `Begin`: `inline`). A
/// receiver that refuses a record ignores the rest of that `epoch`; the sender starts a new
/// epoch at the record it resends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplMsg {
    Op {
        epoch: u64,
        seq: u64,
        op: NsOp,
        /// The version the operation makes (for a removal: the tombstone's).
        ver: Option<Box<Version>>,
    },
    /// Start of a content transfer of `path`: the new version is `size` bytes with
    /// `content_hash`, built from the receiver's version `base` (its content hash; `None`:
    /// everything travels) plus pieces.
    Begin {
        epoch: u64,
        seq: u64,
        path: RelPath,
        base: Option<Hash>,
        size: u64,
        content_hash: Hash,
        meta: Meta,
        /// Every copy keeps its offset (overwrites, appends, truncations): the receiver may
        /// patch its file in place instead of rebuilding it.
        aligned: bool,
        /// The sender was told what the receiver holds and knows no common version: a receiver
        /// holding another file there keeps both (its own, and this one as a conflict copy).
        /// Unset, such a receiver answers `BaseMismatch` so the sender can look its version up.
        checked: bool,
        /// A large transfer sent beside the stream: its pieces interleave with the records
        /// that follow it (none of which touches its path), and it is acknowledged on its own.
        side: bool,
        /// The version being sent.
        ver: Option<Box<Version>>,
        /// A small version whose every byte travels: all of it ([`MAX_INLINE`] bytes at most),
        /// which the receiver cuts into chunks as the sender did. No pieces and no `End`
        /// follow: this message is the whole transfer.
        inline: Option<ByteBuf>,
    },
    /// Bytes of the base version at `from_offset` (whole base chunks).
    Copy {
        seq: u64,
        from_offset: u64,
        len: u64,
    },
    /// Part of a new chunk; the part with `hash` set completes it (≤ 64 KiB per chunk).
    Data {
        seq: u64,
        hash: Option<Hash>,
        bytes: ByteBuf,
    },
    End {
        seq: u64,
    },
    /// `holds`: for a content transfer, the content hash the receiver now has at the path
    /// (what the sender may take as that peer's version from now on). `epoch`: the stream the
    /// record came in; an answer from an earlier stream says nothing about the record as it
    /// was sent again.
    Ack {
        seq: u64,
        epoch: u64,
        outcome: AckOutcome,
        holds: Option<Hash>,
    },
    /// Flow credit: the receiver has consumed `bytes` of transfer `seq`.
    Progress {
        seq: u64,
        bytes: u64,
    },
    /// Reconciliation: the digest of the sender's whole tree, sent once its queue to the
    /// receiver is empty. `configured`: the peers the sender's config lists (a relay forwards
    /// changes between two peers that do not list each other).
    Summary {
        digest: Digest,
        files: u64,
        bytes: u64,
        configured: Vec<PeerId>,
        /// An answer to the receiver's summary (equal digests are answered once, so both
        /// sides learn they agree).
        reply: bool,
    },
    /// Reconciliation: the children of folder `dir` in `bucket` with their digests (`more`:
    /// the listing continues in the next frame).
    List {
        dir: RelPath,
        bucket: Bucket,
        items: Vec<ListItem>,
        more: bool,
    },
    /// Reconciliation: the sender's state of paths whose digests differ (`None`: nothing).
    Have {
        items: Vec<(RelPath, Option<EntryState>)>,
    },
    /// Reconciliation: what the sender queued for the receiver since the connection began
    /// (files and bytes), for progress.
    Plan {
        files: u64,
        bytes: u64,
    },
    /// Reconciliation: the children of folder `dir` in `bucket` are too many to list: the
    /// digests of its [`BUCKET_FANOUT`] sub-buckets (XOR of their children's digests, zero
    /// for an empty one), in order.
    Buckets {
        dir: RelPath,
        bucket: Bucket,
        digests: Vec<Digest>,
    },
}

/// Identifies one lock request across the mesh: the peer that asked and its sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReqId {
    pub origin: PeerId,
    pub seq: u64,
}

/// Mesh lock protocol. A lock is keyed by a name (path) and requested from every reachable
/// peer; it is held once all of them granted. Concurrent requests are ordered by
/// (`lamport`, origin id): a peer with its own pending request of higher priority defers its
/// answer until its own request is settled; a held lock is denied at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockMsg {
    /// Ask for the write lock on `path`. `hops` counts relays (0 = from the origin itself).
    Request {
        req: ReqId,
        path: RelPath,
        lamport: u64,
        hops: u8,
    },
    /// The sender does not hold `path` and has no higher-priority request for it. `fencing` is
    /// the sender's last known fencing token for the name.
    Grant { req: ReqId, fencing: u64 },
    /// `holder` holds `path` (or is about to: its request has priority).
    Deny { req: ReqId, holder: PeerId },
    /// The request `req` collected every grant: its origin now holds `path` with `fencing`.
    Acquired {
        req: ReqId,
        path: RelPath,
        fencing: u64,
    },
    /// The request `req` failed or was abandoned: forget any grant given to it.
    Cancel { req: ReqId },
    /// The holder released `path` (fencing token of the holding).
    Release { path: RelPath, fencing: u64 },
    /// Sent right after Hello: every lock the sender holds now. A restarted peer sends none,
    /// so grants recorded for its previous life are dropped at once.
    Holding { locks: Vec<(RelPath, u64)> },
}

/// Why a frame's bytes are not a message.
#[derive(Debug, thiserror::Error)]
#[error("undecodable message: {0}")]
pub struct DecodeError(#[from] postcard::Error);

impl Message {
    /// Encodes the message (no length prefix).
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes a whole frame; trailing bytes are an error.
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        let (msg, rest) = postcard::take_from_bytes::<Message>(bytes)?;
        if !rest.is_empty() {
            return Err(DecodeError(postcard::Error::DeserializeBadEncoding));
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<Message> {
        let id = PeerId([7; 32]);
        let req = ReqId { origin: id, seq: 9 };
        let path = RelPath::new(b"dir/report.docx").expect("path");
        vec![
            Message::Hello {
                protocol: PROTOCOL_VERSION,
                name: "office-a".into(),
            },
            Message::Ping { nonce: 1 },
            Message::Pong { nonce: u64::MAX },
            Message::Lock(LockMsg::Request {
                req,
                path: path.clone(),
                lamport: 3,
                hops: 0,
            }),
            Message::Lock(LockMsg::Grant { req, fencing: 4 }),
            Message::Lock(LockMsg::Deny { req, holder: id }),
            Message::Lock(LockMsg::Acquired {
                req,
                path: path.clone(),
                fencing: 5,
            }),
            Message::Lock(LockMsg::Cancel { req }),
            Message::Lock(LockMsg::Release {
                path: path.clone(),
                fencing: 5,
            }),
            Message::Lock(LockMsg::Holding {
                locks: vec![(path.clone(), 5)],
            }),
            Message::Repl(ReplMsg::List {
                dir: path.clone(),
                bucket: Bucket {
                    level: 2,
                    index: 77,
                },
                items: vec![ListItem {
                    name: ByteBuf(b"a.txt".to_vec()),
                    dir: false,
                    digest: [3; 16],
                }],
                more: false,
            }),
            Message::Repl(ReplMsg::Buckets {
                dir: path,
                bucket: Bucket::ALL,
                digests: vec![[1; 16]; BUCKET_FANOUT],
            }),
        ]
    }

    #[test]
    fn buckets_partition_by_hash_prefix() {
        assert!(Bucket::ALL.validate().is_ok());
        assert!(Bucket { level: 0, index: 1 }.validate().is_err());
        assert!(
            Bucket {
                level: 1,
                index: 63
            }
            .validate()
            .is_ok()
        );
        assert!(
            Bucket {
                level: 1,
                index: 64
            }
            .validate()
            .is_err()
        );
        assert!(
            Bucket {
                level: MAX_BUCKET_LEVEL + 1,
                index: 0
            }
            .validate()
            .is_err()
        );
        for hash in [
            0u64,
            1,
            u64::MAX,
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
        ] {
            let mut b = Bucket::ALL;
            while b.level < MAX_BUCKET_LEVEL {
                assert!(b.contains(hash));
                let c = b.child(b.slot(hash));
                assert!(c.validate().is_ok(), "{c:?}");
                assert!(c.contains(hash), "{hash:x} in {c:?}");
                // Exactly one sub-bucket holds it.
                let n = (0..BUCKET_FANOUT)
                    .filter(|&s| b.child(s).contains(hash))
                    .count();
                assert_eq!(n, 1);
                b = c;
            }
        }
    }

    #[test]
    fn every_message_round_trips() {
        for m in sample() {
            assert_eq!(Message::decode(&m.encode()).expect("decode"), m);
        }
    }

    #[test]
    fn hostile_paths_and_trailing_bytes_are_refused() {
        let m = Message::Lock(LockMsg::Release {
            path: RelPath::new(b"abc").expect("path"),
            fencing: 1,
        });
        let mut bytes = m.encode();
        // The path's bytes sit right before the fencing varint: turn "abc" into "../".
        let at = bytes.len() - 4;
        bytes[at..at + 3].copy_from_slice(b"../");
        assert!(
            Message::decode(&bytes).is_err(),
            "a .. path must not decode"
        );
        let mut trailing = m.encode();
        trailing.push(0);
        assert!(Message::decode(&trailing).is_err());
        assert!(Message::decode(&[0xff, 0xff]).is_err(), "unknown tag");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(&bytes);
        }
    }
}
