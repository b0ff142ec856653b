//! Manifests: the chunk list and content hash of one version of a file, their compact encoding,
//! and O(edit) re-chunking after writes.
//!
//! The content hash is a blake3 over the size and the ordered (len, hash) list of the chunks,
//! not a flat blake3 of the bytes. Both commit to the whole content (chunking is deterministic
//! and blake3 collision resistant), but only this one can be recomputed after an edit without
//! reading the whole file again, which is the point of `rechunk`.

use std::fs::File;
use std::io;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::chunk::{self, ChunkRef, Chunker, Hash, MAX_SIZE, RangeReader};

/// Domain separation for the content hash, so it cannot collide with a chunk hash.
const CONTENT_HASH_CONTEXT: &str = "peerfs 2026 manifest content hash v1";

/// Files up to this size are chunked in memory by [`Manifest::from_file`].
const IN_MEMORY_MAX: u64 = 1024 * 1024;

/// Why an encoded manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest encoding: {0}")]
    Encoding(#[from] postcard::Error),
    #[error("manifest invalid: {0}")]
    Invalid(&'static str),
}

/// One version of a file: its size, its chunks in order, and its content hash.
///
/// Deserialising (with any serde format) always validates, so an unchecked manifest cannot be
/// built from untrusted bytes, whether they come from a peer or from a damaged store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawManifest")]
pub struct Manifest {
    size: u64,
    chunks: Vec<ChunkRef>,
    content_hash: Hash,
}

/// The wire shape of a manifest before validation.
#[derive(Deserialize)]
struct RawManifest {
    size: u64,
    chunks: Vec<ChunkRef>,
    content_hash: Hash,
}

impl TryFrom<RawManifest> for Manifest {
    type Error = ManifestError;

    fn try_from(raw: RawManifest) -> Result<Self, ManifestError> {
        let m = Manifest {
            size: raw.size,
            chunks: raw.chunks,
            content_hash: raw.content_hash,
        };
        m.validate()?;
        Ok(m)
    }
}

/// Content hash of a chunk list (see the module comment for why it is not a flat hash).
pub fn content_hash(size: u64, chunks: &[ChunkRef]) -> Hash {
    let mut hasher = blake3::Hasher::new_derive_key(CONTENT_HASH_CONTEXT);
    hasher.update(&size.to_le_bytes());
    for c in chunks {
        hasher.update(&c.len.to_le_bytes());
        hasher.update(&c.hash);
    }
    *hasher.finalize().as_bytes()
}

impl Manifest {
    /// The manifest of an empty file.
    pub fn empty() -> Self {
        Self::from_chunks(Vec::new())
    }

    /// Builds a manifest from a contiguous chunk list (offsets are trusted: internal use and
    /// tests; decoded manifests go through `decode`).
    pub fn from_chunks(chunks: Vec<ChunkRef>) -> Self {
        let size = chunks.last().map_or(0, ChunkRef::end);
        let content_hash = content_hash(size, &chunks);
        Manifest {
            size,
            chunks,
            content_hash,
        }
    }

    /// Chunks a whole stream (full re-chunk, O(file)): for files written behind the drive's back.
    pub fn from_reader<R: io::Read>(reader: R) -> io::Result<Self> {
        Ok(Self::from_chunks(chunk::chunk_reader(reader)?))
    }

    /// Chunks a whole file (full re-chunk, O(file)) whose size was last seen as `size_hint`: a
    /// small one in one read and in memory, a larger one as a stream (bounded memory).
    pub fn from_file(file: &File, size_hint: u64) -> io::Result<Self> {
        let mut bytes_read = 0;
        let mut reader = RangeReader {
            file,
            pos: 0,
            end: u64::MAX,
            bytes_read: &mut bytes_read,
        };
        if size_hint <= IN_MEMORY_MAX {
            let mut buf = Vec::with_capacity(size_hint as usize + 1);
            io::Read::read_to_end(
                &mut io::Read::take(&mut reader, IN_MEMORY_MAX + 1),
                &mut buf,
            )?;
            if buf.len() as u64 <= IN_MEMORY_MAX {
                return Ok(Self::from_chunks(chunk::chunk_slice(&buf)));
            }
            // It grew past the bound meanwhile: streamed from the start after all.
            reader.pos = 0;
        }
        Self::from_reader(io::BufReader::with_capacity(256 * 1024, reader))
    }

    /// File size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunks in file order.
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// Content hash (see module comment).
    pub fn content_hash(&self) -> &Hash {
        &self.content_hash
    }

    /// Compact encoding (postcard).
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain integers and arrays into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes and validates: offsets contiguous from 0, every length in 1..=MAX_SIZE, lengths
    /// summing to the size, content hash matching. Bytes from a peer are untrusted.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        // Decoded as the raw shape and converted here, rather than through serde's `try_from`,
        // so the error keeps its precise reason instead of serde's generic message.
        let raw: RawManifest = postcard::from_bytes(bytes)?;
        Manifest::try_from(raw)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        let mut at = 0u64;
        for c in &self.chunks {
            if c.offset != at {
                return Err(ManifestError::Invalid("chunk offsets are not contiguous"));
            }
            if c.len == 0 || c.len > MAX_SIZE {
                return Err(ManifestError::Invalid("chunk length out of range"));
            }
            at = at
                .checked_add(u64::from(c.len))
                .ok_or(ManifestError::Invalid("size overflows"))?;
        }
        if at != self.size {
            return Err(ManifestError::Invalid(
                "chunk lengths do not sum to the size",
            ));
        }
        if content_hash(self.size, &self.chunks) != self.content_hash {
            return Err(ManifestError::Invalid(
                "content hash does not match the chunks",
            ));
        }
        Ok(())
    }
}

/// One edit in old-file coordinates: the old bytes `old` were replaced by `new_len` new bytes.
/// Overwrite: `a..a+n, n`; insert: `a..a, n`; delete: `a..b, 0`; append: `size..size, n`;
/// truncate: `t..size, 0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Splice {
    pub old: Range<u64>,
    pub new_len: u64,
}

/// What a re-chunk cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RechunkStats {
    /// Bytes read from the new file.
    pub bytes_read: u64,
    /// Old chunks reused without reading.
    pub chunks_reused: u64,
}

/// Turns written ranges (new-file offsets, as the drive tracks writes per inode) into splices:
/// ranges are clipped and merged, bytes past the old end count as appended, a shrink as a
/// truncation. An insert in the middle seen this way is a write of the whole tail: correct,
/// but O(tail); callers that know the shift use `rechunk_splices`.
pub fn dirty_to_splices(old_size: u64, new_size: u64, dirty: &[Range<u64>]) -> Vec<Splice> {
    let common = old_size.min(new_size);
    let mut ranges: Vec<Range<u64>> = dirty
        .iter()
        .map(|r| r.start.min(common)..r.end.min(common))
        .filter(|r| r.start < r.end)
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut splices: Vec<Splice> = Vec::new();
    for r in ranges {
        match splices.last_mut() {
            Some(last) if r.start <= last.old.end => {
                let end = last.old.end.max(r.end);
                last.old.end = end;
                last.new_len = end - last.old.start;
            }
            _ => splices.push(Splice {
                new_len: r.end - r.start,
                old: r,
            }),
        }
    }
    if new_size > old_size {
        splices.push(Splice {
            old: old_size..old_size,
            new_len: new_size - old_size,
        });
    } else if new_size < old_size {
        splices.push(Splice {
            old: new_size..old_size,
            new_len: 0,
        });
    }
    splices
}

/// Re-chunks `file` (the new version) after writes to `dirty` (new-file offsets), reading only
/// around the written ranges. Equal to `Manifest::from_reader(file)`.
pub fn rechunk(old: &Manifest, file: &File, dirty: &[Range<u64>]) -> io::Result<Manifest> {
    let new_size = file.metadata()?.len();
    let splices = dirty_to_splices(old.size, new_size, dirty);
    Ok(rechunk_splices(old, file, &splices)?.0)
}

/// Re-chunks `file` after `splices` (sorted, non-overlapping, in old-file coordinates) were
/// applied to the version described by `old`.
///
/// Why this equals a full chunking: a FastCDC cut depends only on the bytes from the chunk's
/// start to one byte past its end (the hash tests byte `end` before cutting before it) and on
/// the distance to end-of-file when that is under `MAX_SIZE`. So an old chunk is reused as is
/// when no splice touches its bytes or the byte after it, its distance to EOF is the same or
/// at least `MAX_SIZE` in both versions, and the new chunking has a cut where it starts. The
/// walk keeps that last condition true: it starts at 0, and after a reused chunk or a newly
/// cut one it stands on a true cut point; re-chunking stops as soon as it stands on the start
/// of a reusable old chunk (resynchronised). Cost: the bytes from the start of the chunk an
/// edit touches until resynchronisation (typically a few chunks), plus one read-ahead buffer.
pub fn rechunk_splices(
    old: &Manifest,
    file: &File,
    splices: &[Splice],
) -> io::Result<(Manifest, RechunkStats)> {
    let new_size = file.metadata()?.len();
    check_splices(old.size, new_size, splices)?;

    // For each old chunk, where its start lands in the new file and whether it can be reused.
    let max = u64::from(MAX_SIZE);
    let mut key = Vec::with_capacity(old.chunks.len());
    let mut reusable = Vec::with_capacity(old.chunks.len());
    let mut k = 0usize;
    let mut shift: i128 = 0;
    for c in &old.chunks {
        let (s, e) = (c.offset, c.end());
        // Splices wholly before the chunk (inserts at its start included) shift it.
        while k < splices.len() && splices[k].old.end <= s {
            let sp = &splices[k];
            shift += i128::from(sp.new_len) - i128::from(sp.old.end - sp.old.start);
            k += 1;
        }
        let mapped = i128::from(s) + shift;
        let mapped = u64::try_from(mapped).map_err(|_| invalid("splice shift below zero"))?;
        // The next splice starts at or before `e`: it touches the chunk or the byte after it.
        let touched = k < splices.len() && splices[k].old.start <= e;
        let (old_rem, new_rem) = (old.size - s, new_size.saturating_sub(mapped));
        let eof_same = old_rem == new_rem || (old_rem >= max && new_rem >= max);
        key.push(mapped);
        reusable.push(!touched && eof_same);
    }

    let mut stats = RechunkStats::default();
    let mut out: Vec<ChunkRef> = Vec::with_capacity(old.chunks.len());
    let mut pos = 0u64;
    let mut i = 0usize;
    while pos < new_size {
        if i < old.chunks.len() && key[i] == pos && reusable[i] {
            let c = old.chunks[i];
            out.push(ChunkRef { offset: pos, ..c });
            pos += u64::from(c.len);
            stats.chunks_reused += 1;
            i += 1;
            continue;
        }
        // Re-chunk from `pos` (a true cut point) until we stand on a reusable old chunk.
        let reader = RangeReader {
            file,
            pos,
            end: new_size,
            bytes_read: &mut stats.bytes_read,
        };
        let mut resynced = false;
        for item in Chunker::new(reader, pos) {
            let (c, _) = item?;
            out.push(c);
            pos = c.end();
            while i < old.chunks.len() && key[i] < pos {
                i += 1;
            }
            if i < old.chunks.len() && key[i] == pos && reusable[i] {
                resynced = true;
                break;
            }
        }
        if !resynced && pos < new_size {
            // The chunker hit end-of-file early: the file shrank while we read it.
            return Err(io::Error::other("file changed while re-chunking"));
        }
    }
    if pos != new_size {
        return Err(io::Error::other("file changed while re-chunking"));
    }
    Ok((Manifest::from_chunks(out), stats))
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Splices must be sorted, non-overlapping, inside the old file, and explain the new size;
/// otherwise the file changed in a way the caller did not track and a full re-chunk is due.
fn check_splices(old_size: u64, new_size: u64, splices: &[Splice]) -> io::Result<()> {
    let mut prev_end = 0u64;
    let mut size = i128::from(old_size);
    for sp in splices {
        if sp.old.start > sp.old.end || sp.old.end > old_size || sp.old.start < prev_end {
            return Err(invalid(
                "splices must be sorted, disjoint and inside the old file",
            ));
        }
        prev_end = sp.old.end;
        size += i128::from(sp.new_len) - i128::from(sp.old.end - sp.old.start);
    }
    if size != i128::from(new_size) {
        return Err(invalid("splices do not explain the new file size"));
    }
    Ok(())
}
