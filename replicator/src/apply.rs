//! The receiver's side: rebuilds a new version from its current one and a delta, beside the
//! target, verified chunk by chunk, then renames it into place atomically.
//!
//! A reader of the target sees the old or the new version, never a mix: the new one is built
//! in an intermediate file named with [`TMP_PREFIX`] in the target's directory (same
//! filesystem, so the rename is atomic), fsynced, renamed over the target, and the directory is
//! fsynced so the rename survives a crash. Any failure (a chunk whose hash does not match,
//! ENOSPC, EACCES, a base that is not what the manifest says) removes the intermediate file
//! and leaves the target untouched.
//!
//! Cost: O(file), since unchanged chunks are copied (and re-hashed, which also proves the base
//! is what its manifest says). The O(edit) paths of DESIGN.md (reflink then patch; redo journal
//! then in-place patch) are not built here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::chunk::{Hash, MAX_SIZE, hash_bytes};
use crate::delta::{Delta, DeltaError, Origin};
use crate::manifest::Manifest;

/// Reserved name prefix of intermediate files. The drive must hide and refuse names with this
/// prefix, and must not replicate them; a start-up scan may delete leftovers (a crash between
/// create and rename).
pub const TMP_PREFIX: &str = ".peerfs-tmp-";

/// Why an apply failed. In every case the target is untouched and no intermediate file is left.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Delta(#[from] DeltaError),
    #[error("received chunk does not match its hash")]
    ChunkMismatch,
    #[error("current version at offset {0} does not match the base manifest")]
    BaseMismatch(u64),
    #[error("invalid target name")]
    BadName,
}

/// A chunk whose bytes were checked against their blake3 hash. The only constructor is
/// [`VerifiedChunk::verify`], so code that writes a `VerifiedChunk` cannot write unchecked data.
#[derive(Debug)]
pub struct VerifiedChunk {
    hash: Hash,
    data: Vec<u8>,
}

impl VerifiedChunk {
    /// Checks `data` against `expected` (and the length bound, before hashing anything).
    pub fn verify(expected: &Hash, data: Vec<u8>) -> Result<Self, ApplyError> {
        if data.is_empty() || data.len() > MAX_SIZE as usize || hash_bytes(&data) != *expected {
            return Err(ApplyError::ChunkMismatch);
        }
        Ok(VerifiedChunk {
            hash: *expected,
            data,
        })
    }

    pub fn hash(&self) -> &Hash {
        &self.hash
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

/// Where received chunk bytes come from (the connection to the sender, in production). Asked
/// once per distinct missing hash, in the order of [`Delta::missing`].
pub trait ChunkSource {
    /// The bytes of the chunk named `hash`, `len` bytes long (untrusted: `apply` verifies them).
    fn fetch(&mut self, hash: &Hash, len: u32) -> io::Result<Vec<u8>>;
}

/// What an apply did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// The new version's manifest, for the caller to store and ack.
    pub manifest: Manifest,
    /// Bytes copied from the current version.
    pub bytes_copied: u64,
    /// Bytes received through the chunk source (each distinct chunk once).
    pub bytes_received: u64,
}

/// Deletes the intermediate file unless the rename happened.
struct TmpGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: the error that got us here matters more than a failed cleanup.
            let _ = fs::remove_file(&self.path);
        }
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Rebuilds `dir/name` from its current version (`base_file`, described by `base`; `None` for a
/// new file) and `delta`, fetching missing chunks from `source`, and renames it into place.
pub fn apply(
    dir: &Path,
    name: &OsStr,
    base_file: Option<&File>,
    base: &Manifest,
    delta: &Delta,
    source: &mut dyn ChunkSource,
) -> Result<ApplyOutcome, ApplyError> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes == b"."
        || bytes == b".."
        || bytes.contains(&b'/')
        || bytes.starts_with(TMP_PREFIX.as_bytes())
    {
        return Err(ApplyError::BadName);
    }
    // Everything checkable without I/O is checked before the intermediate file exists.
    let plan = delta.resolve(base)?;

    let tmp_name = format!(
        "{TMP_PREFIX}{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let tmp_path = dir.join(tmp_name);
    let tmp = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp_path)?;
    let mut guard = TmpGuard {
        path: tmp_path,
        armed: true,
    };
    if let Some(bf) = base_file {
        // Keep the target's permission bits across the replacement.
        tmp.set_permissions(fs::Permissions::from_mode(
            bf.metadata()?.permissions().mode() & 0o7777,
        ))?;
    }

    let mut outcome_copied = 0u64;
    let mut outcome_received = 0u64;
    // Received chunks already written: a repeat is copied back from the intermediate file
    // instead of being fetched again (each distinct chunk crosses the wire once).
    let mut written: HashMap<Hash, u64> = HashMap::new();
    let mut buf = vec![0u8; MAX_SIZE as usize];
    for (c, origin) in plan.manifest.chunks().iter().zip(&plan.origins) {
        let len = c.len as usize;
        let chunk = match origin {
            Origin::Base { offset } => {
                let bf = base_file.ok_or(ApplyError::BaseMismatch(*offset))?;
                read_exact_at(bf, &mut buf[..len], *offset)?;
                if hash_bytes(&buf[..len]) != c.hash {
                    return Err(ApplyError::BaseMismatch(*offset));
                }
                outcome_copied += u64::from(c.len);
                &buf[..len]
            }
            Origin::Received => match written.get(&c.hash) {
                Some(&at) => {
                    read_exact_at(&tmp, &mut buf[..len], at)?;
                    if hash_bytes(&buf[..len]) != c.hash {
                        return Err(ApplyError::Io(io::Error::other(
                            "intermediate file changed under us",
                        )));
                    }
                    &buf[..len]
                }
                None => {
                    let data = source.fetch(&c.hash, c.len)?;
                    if data.len() != len {
                        return Err(ApplyError::ChunkMismatch);
                    }
                    let verified = VerifiedChunk::verify(&c.hash, data)?;
                    outcome_received += u64::from(c.len);
                    written.insert(c.hash, c.offset);
                    buf[..len].copy_from_slice(verified.data());
                    &buf[..len]
                }
            },
        };
        tmp.write_all_at(chunk, c.offset)?;
    }
    // Every chunk was verified against the plan, whose chunk list `resolve` checked against
    // the delta's content hash: the file as written is the new version.
    tmp.sync_all()?;
    drop(tmp);
    fs::rename(&guard.path, dir.join(name))?;
    guard.armed = false;
    File::open(dir)?.sync_all()?;
    Ok(ApplyOutcome {
        manifest: plan.manifest,
        bytes_copied: outcome_copied,
        bytes_received: outcome_received,
    })
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}
