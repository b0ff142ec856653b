//! Content-defined chunking: cuts a byte stream into chunks with FastCDC (2020) and names each
//! chunk by the blake3 hash of its bytes.
//!
//! The sizes are fixed, not configurable: every peer must cut the same file at the same points,
//! or nothing would deduplicate between them. 2/8/64 KiB (DESIGN.md, "Replication") makes 100
//! scattered 4 KiB edits cheaper than rsync's ~16 KiB blocks. The fastcdc crate is pinned
//! exactly and `tests/chunk_golden.rs` holds the cut points of a seeded input, so an upgrade that
//! moves cut points fails the build instead of silently re-sending every file.
//!
//! Memory is bounded: fastcdc's `StreamCDC` keeps one `MAX_SIZE` buffer, whatever the file size.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use fastcdc::v2020::StreamCDC;
use serde::{Deserialize, Serialize};

/// Smallest chunk (except the last chunk of a file, which may be shorter).
pub const MIN_SIZE: u32 = 2 * 1024;
/// Target average chunk size.
pub const AVG_SIZE: u32 = 8 * 1024;
/// Largest chunk: also the bound on any single buffer holding chunk bytes.
pub const MAX_SIZE: u32 = 64 * 1024;

/// A blake3 hash (of a chunk, or the content hash of a manifest).
pub type Hash = [u8; 32];

/// One chunk of a file: where it is, how long, and the blake3 hash of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Byte offset of the chunk in its file.
    pub offset: u64,
    /// Length in bytes, 1..=`MAX_SIZE`.
    pub len: u32,
    /// blake3 of the chunk's bytes.
    pub hash: Hash,
}

impl ChunkRef {
    /// Offset one past the chunk's last byte.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// blake3 of `bytes`: the chunk id.
pub fn hash_bytes(bytes: &[u8]) -> Hash {
    *blake3::hash(bytes).as_bytes()
}

/// Streams the chunks of `reader`, whose first byte is at `start` in its file (so a re-chunk
/// that starts mid-file reports file offsets). Yields each chunk with its bytes, which the
/// caller may drop; at most one `MAX_SIZE` buffer plus one chunk is alive at a time.
pub struct Chunker<R: Read> {
    cdc: StreamCDC<R>,
    start: u64,
}

impl<R: Read> Chunker<R> {
    /// Chunks `reader` from its current position, reporting offsets from `start`.
    pub fn new(reader: R, start: u64) -> Self {
        Chunker {
            cdc: StreamCDC::new(
                reader,
                MIN_SIZE as usize,
                AVG_SIZE as usize,
                MAX_SIZE as usize,
            ),
            start,
        }
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = io::Result<(ChunkRef, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        let chunk = match self.cdc.next()? {
            Ok(chunk) => chunk,
            Err(e) => return Some(Err(e.into())),
        };
        // StreamCDC never yields more than its max_size, but the length is checked rather than
        // cast blindly so a broken upgrade shows as an error, not as a truncated length.
        let len = match u32::try_from(chunk.length) {
            Ok(len) if len <= MAX_SIZE => len,
            _ => return Some(Err(io::Error::other("chunker produced an oversized chunk"))),
        };
        let chunk_ref = ChunkRef {
            offset: self.start + chunk.offset,
            len,
            hash: hash_bytes(&chunk.data),
        };
        Some(Ok((chunk_ref, chunk.data)))
    }
}

/// Chunks bytes already in memory (from offset 0): the same cut points as [`chunk_reader`]
/// (fastcdc's slice and stream forms run one algorithm; `tests/chunk_golden.rs` checks that
/// they agree), without the stream form's `MAX_SIZE` buffer, which costs more than the
/// chunking itself for a small file.
pub fn chunk_slice(bytes: &[u8]) -> Vec<ChunkRef> {
    fastcdc::v2020::FastCDC::new(
        bytes,
        MIN_SIZE as usize,
        AVG_SIZE as usize,
        MAX_SIZE as usize,
    )
    .map(|c| ChunkRef {
        offset: c.offset as u64,
        len: c.length as u32,
        hash: hash_bytes(&bytes[c.offset..c.offset + c.length]),
    })
    .collect()
}

/// Chunks a whole stream from offset 0 and returns the chunk list.
pub fn chunk_reader<R: Read>(reader: R) -> io::Result<Vec<ChunkRef>> {
    Chunker::new(reader, 0)
        .map(|item| item.map(|(chunk, _)| chunk))
        .collect()
}

/// A `Read` over `file` from `pos` up to `end` by positioned reads (the file's cursor is not
/// moved, so a `&File` shared with others is fine), counting the bytes it reads so callers can
/// prove their cost.
pub(crate) struct RangeReader<'a> {
    pub(crate) file: &'a File,
    pub(crate) pos: u64,
    pub(crate) end: u64,
    pub(crate) bytes_read: &'a mut u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        *self.bytes_read += n as u64;
        Ok(n)
    }
}
