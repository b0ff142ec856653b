//! The typed messages peers exchange, one per frame (postcard encoding; layout in
//! docs/PROTOCOL.md). Decoding validates every field: paths through [`RelPath`], enums by tag;
//! an unknown tag or trailing bytes is a decode error that closes the connection.

use serde::{Deserialize, Serialize};

use crate::{PeerId, RelPath};

/// The protocol version this build speaks; exchanged in [`Message::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

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
                locks: vec![(path, 5)],
            }),
        ]
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
