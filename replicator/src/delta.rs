//! Deltas: the edit script that turns the version a peer holds (its `base` manifest) into a new
//! version, as copies of byte ranges it already has plus chunks it lacks.
//!
//! The script is built against the manifest *that peer* acked last, never sent whole: a 256 MiB
//! file's manifest is ~0.5 MB, more than a small edit's whole budget. Copies of consecutive base
//! chunks are coalesced into one op, so a 1-byte edit of a huge file is a handful of ops.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkRef, Hash, MAX_SIZE};
use crate::manifest::{self, Manifest};

/// One step of the new file, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Bytes the receiver already has at `from_offset` in its current version: whole base
    /// chunks, consecutive ones coalesced.
    Copy { from_offset: u64, len: u64 },
    /// A chunk the receiver lacks; its bytes travel separately, once per distinct hash. The
    /// length lets the receiver rebuild the manifest and bound its buffer before receiving.
    Data { hash: Hash, len: u32 },
}

/// Edit script from a base version to a new one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// Size of the new version.
    pub size: u64,
    /// Content hash of the new version (see `manifest`).
    pub content_hash: Hash,
    pub ops: Vec<Op>,
}

/// Why a delta was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("delta encoding: {0}")]
    Encoding(#[from] postcard::Error),
    #[error("delta invalid: {0}")]
    Invalid(&'static str),
}

/// Where the receiver gets each chunk of the new version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Copied from the current version at this offset.
    Base { offset: u64 },
    /// Received from the sender.
    Received,
}

/// A delta checked against the receiver's base: the new manifest, and per chunk its origin.
#[derive(Clone, Debug)]
pub struct Plan {
    pub manifest: Manifest,
    pub origins: Vec<Origin>,
}

impl Delta {
    /// The edit script from `base` to `new`.
    pub fn compute(base: &Manifest, new: &Manifest) -> Delta {
        // First occurrence of each hash in the base; a run continues in place when it can,
        // which keeps copies coalesced even when the base repeats chunks.
        let mut index: HashMap<&Hash, usize> = HashMap::with_capacity(base.chunks().len());
        for (i, c) in base.chunks().iter().enumerate() {
            index.entry(&c.hash).or_insert(i);
        }
        let bc = base.chunks();
        let mut ops: Vec<Op> = Vec::new();
        let mut next_base: Option<usize> = None;
        for c in new.chunks() {
            // (Nested rather than a let-chain: the workspace's MSRV is 1.85.)
            if let Some(j) = next_base.filter(|&j| j < bc.len() && bc[j].hash == c.hash) {
                if let Some(Op::Copy { len, .. }) = ops.last_mut() {
                    *len += u64::from(c.len);
                    next_base = Some(j + 1);
                    continue;
                }
            }
            match index.get(&c.hash) {
                Some(&j) => {
                    ops.push(Op::Copy {
                        from_offset: bc[j].offset,
                        len: u64::from(c.len),
                    });
                    next_base = Some(j + 1);
                }
                None => {
                    ops.push(Op::Data {
                        hash: c.hash,
                        len: c.len,
                    });
                    next_base = None;
                }
            }
        }
        Delta {
            size: new.size(),
            content_hash: *new.content_hash(),
            ops,
        }
    }

    /// Distinct hashes of the chunks the receiver lacks, in order of first use: the order in
    /// which the sender sends them and `apply` asks for them.
    pub fn missing(&self) -> Vec<Hash> {
        let mut seen = HashSet::new();
        self.ops
            .iter()
            .filter_map(|op| match op {
                Op::Data { hash, .. } if seen.insert(*hash) => Some(*hash),
                _ => None,
            })
            .collect()
    }

    /// Compact encoding (postcard: varint integers, raw hashes).
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain integers and arrays into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes a delta from a peer. Structure only: `resolve` checks it against the base.
    pub fn decode(bytes: &[u8]) -> Result<Delta, DeltaError> {
        Ok(postcard::from_bytes(bytes)?)
    }

    /// Checks the delta against the receiver's `base` and expands it into the new manifest:
    /// every copy must cover whole consecutive base chunks, every received chunk must have a
    /// legal length, and the resulting chunks must match the size and content hash.
    pub fn resolve(&self, base: &Manifest) -> Result<Plan, DeltaError> {
        let bc = base.chunks();
        let mut chunks: Vec<ChunkRef> = Vec::new();
        let mut origins = Vec::new();
        let mut at = 0u64;
        for op in &self.ops {
            match op {
                Op::Copy { from_offset, len } => {
                    let mut j = bc
                        .binary_search_by_key(from_offset, |c| c.offset)
                        .map_err(|_| DeltaError::Invalid("copy does not start on a base chunk"))?;
                    let mut left = *len;
                    if left == 0 {
                        return Err(DeltaError::Invalid("empty copy"));
                    }
                    while left > 0 {
                        let c = bc
                            .get(j)
                            .ok_or(DeltaError::Invalid("copy runs past the base"))?;
                        left = left
                            .checked_sub(u64::from(c.len))
                            .ok_or(DeltaError::Invalid("copy ends inside a base chunk"))?;
                        chunks.push(ChunkRef {
                            offset: at,
                            len: c.len,
                            hash: c.hash,
                        });
                        origins.push(Origin::Base { offset: c.offset });
                        at = at
                            .checked_add(u64::from(c.len))
                            .ok_or(DeltaError::Invalid("size overflows"))?;
                        j += 1;
                    }
                }
                Op::Data { hash, len } => {
                    if *len == 0 || *len > MAX_SIZE {
                        return Err(DeltaError::Invalid("chunk length out of range"));
                    }
                    chunks.push(ChunkRef {
                        offset: at,
                        len: *len,
                        hash: *hash,
                    });
                    origins.push(Origin::Received);
                    at = at
                        .checked_add(u64::from(*len))
                        .ok_or(DeltaError::Invalid("size overflows"))?;
                }
            }
            if at > self.size {
                // Stops a hostile delta from making us expand more than it claims.
                return Err(DeltaError::Invalid("ops exceed the declared size"));
            }
        }
        if at != self.size {
            return Err(DeltaError::Invalid(
                "ops do not add up to the declared size",
            ));
        }
        if manifest::content_hash(at, &chunks) != self.content_hash {
            return Err(DeltaError::Invalid("content hash does not match the ops"));
        }
        Ok(Plan {
            manifest: Manifest::from_chunks(chunks),
            origins,
        })
    }
}
