//! O(edit) application of an update in place, made crash-safe by a redo journal.
//!
//! When a new version keeps every unchanged byte where it was (overwrites, appends, truncations:
//! the delta's copies are all at their own offset), the receiver need not rebuild the file:
//! it writes the changed bytes and the target size into a journal under `STATE/journal`,
//! fsyncs it and marks it committed, then patches the file in place, fsyncs it and deletes the
//! journal. A crash after the commit is repaired at the next start by replaying the journal
//! (idempotent: it holds the new bytes, never a diff against the old ones); a crash before it
//! leaves the file untouched and the uncommitted journal is discarded.
//!
//! Readers must not see the patch half done: the drive holds new opens of the file off while
//! it runs, and the receiver only patches files that no one has open (else it rebuilds beside
//! the target and renames, as for any other update).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use peerfs_proto::RelPath;
use serde::{Deserialize, Serialize};

use crate::beneath::{open_parent, openat2_beneath};
use crate::chunk::{Hash, MAX_SIZE};

const MAGIC: &[u8; 8] = b"PFSJRNL1";
/// Committed journals end in `.commit`; anything else is a journal that never committed.
const COMMITTED: &str = "commit";

static COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Header {
    target: RelPath,
    /// The inode the patch applies to: a replay skips a file replaced since.
    ino: u64,
    size: u64,
    content_hash: Hash,
}

/// A journal being written, then applied.
pub struct Journal {
    file: io::BufWriter<File>,
    path: PathBuf,
    header: Header,
    pieces: u64,
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl Journal {
    /// Starts a journal in `dir` for a patch of `target` (inode `ino`) to `size` bytes.
    pub fn create(
        dir: &Path,
        target: &RelPath,
        ino: u64,
        size: u64,
        content_hash: Hash,
    ) -> io::Result<Journal> {
        fs::create_dir_all(dir)?;
        let path = dir.join(format!(
            "{}-{}.part",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let header = Header {
            target: target.clone(),
            ino,
            size,
            content_hash,
        };
        let mut file = io::BufWriter::with_capacity(256 * 1024, f);
        let h = postcard::to_stdvec(&header).map_err(|e| invalid(&e.to_string()))?;
        file.write_all(MAGIC)?;
        file.write_all(&(h.len() as u32).to_be_bytes())?;
        file.write_all(&h)?;
        Ok(Journal {
            file,
            path,
            header,
            pieces: 0,
        })
    }

    /// Records new bytes at `offset` of the new version.
    pub fn piece(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(&offset.to_be_bytes())?;
        self.file.write_all(&(bytes.len() as u32).to_be_bytes())?;
        self.file.write_all(bytes)?;
        self.pieces += 1;
        Ok(())
    }

    /// Makes the journal durable and marks it committed: from here on the patch happens, now
    /// or at the next start.
    pub fn commit(&mut self) -> io::Result<()> {
        // End marker: offset u64::MAX, then the piece count.
        self.file.write_all(&u64::MAX.to_be_bytes())?;
        self.file.write_all(&self.pieces.to_be_bytes())?;
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        let committed = self.path.with_extension(COMMITTED);
        fs::rename(&self.path, &committed)?;
        self.path = committed;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Writes the journal's pieces into `target` and sets its size (the caller fsyncs).
    pub fn apply_to(&self, target: &File) -> io::Result<()> {
        apply_file(&self.path, target).map(drop)
    }

    /// Deletes the journal (after the patched file was fsynced).
    pub fn remove(self) {
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "cannot remove a journal: {e}");
        }
    }

    /// Discards an uncommitted journal.
    pub fn discard(self) {
        let _ = fs::remove_file(&self.path);
    }

    pub fn target(&self) -> &RelPath {
        &self.header.target
    }
}

fn read_header(r: &mut impl Read) -> io::Result<Header> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(invalid("not a peerfs journal"));
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 64 * 1024 {
        return Err(invalid("journal header too long"));
    }
    let mut h = vec![0u8; len];
    r.read_exact(&mut h)?;
    postcard::from_bytes(&h).map_err(|e| invalid(&e.to_string()))
}

/// Applies a committed journal's pieces to `target` and truncates it to the recorded size.
fn apply_file(journal: &Path, target: &File) -> io::Result<Header> {
    let mut r = BufReader::with_capacity(256 * 1024, File::open(journal)?);
    let header = read_header(&mut r)?;
    let mut buf = vec![0u8; MAX_SIZE as usize];
    let mut pieces = 0u64;
    loop {
        let mut off = [0u8; 8];
        r.read_exact(&mut off)?;
        let off = u64::from_be_bytes(off);
        if off == u64::MAX {
            let mut n = [0u8; 8];
            r.read_exact(&mut n)?;
            if u64::from_be_bytes(n) != pieces {
                return Err(invalid("journal piece count mismatch"));
            }
            break;
        }
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > buf.len() || off.saturating_add(len as u64) > header.size {
            return Err(invalid("journal piece out of range"));
        }
        r.read_exact(&mut buf[..len])?;
        target.write_all_at(&buf[..len], off)?;
        pieces += 1;
    }
    target.set_len(header.size)?;
    Ok(header)
}

/// At start: finishes every committed patch of `dir` (a crash came between commit and delete)
/// and discards uncommitted ones. Returns how many were replayed.
pub fn replay_all(dir: &Path, root: BorrowedFd<'_>) -> usize {
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    let mut replayed = 0;
    for e in rd.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some(COMMITTED) {
            let _ = fs::remove_file(&path);
            continue;
        }
        match replay_one(&path, root) {
            Ok(true) => {
                replayed += 1;
                tracing::info!(journal = %path.display(), "finished an interrupted in-place update");
            }
            Ok(false) => {
                tracing::warn!(journal = %path.display(), "journal target was replaced since; journal dropped");
            }
            Err(err) => {
                tracing::error!(journal = %path.display(), "cannot replay a journal: {err}; dropped (the start scan re-checks the file)");
            }
        }
        let _ = fs::remove_file(&path);
    }
    replayed
}

fn replay_one(journal: &Path, root: BorrowedFd<'_>) -> io::Result<bool> {
    let header = read_header(&mut BufReader::new(File::open(journal)?))?;
    let (dir, name) = open_parent(root, &header.target, false)?;
    let target = File::from(openat2_beneath(
        dir.as_fd(),
        &name,
        libc::O_WRONLY | libc::O_NOFOLLOW,
        0,
    )?);
    // SAFETY: zeroed stat buffer filled by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and buffer.
    if unsafe { libc::fstat(target.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_ino != header.ino {
        return Ok(false);
    }
    apply_file(journal, &target)?;
    target.sync_all()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    #[test]
    fn committed_journals_replay_and_uncommitted_ones_vanish() {
        let root = tempfile::tempdir().expect("tmp");
        let state = tempfile::tempdir().expect("tmp");
        let jdir = state.path().join("journal");
        let target = root.path().join("doc.bin");
        fs::write(&target, vec![b'a'; 100_000]).expect("write");
        let ino = fs::metadata(&target)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .expect("stat");
        let rel = RelPath::new(b"doc.bin").expect("path");

        let mut j = Journal::create(&jdir, &rel, ino, 90_000, [0; 32]).expect("journal");
        j.piece(10, b"XYZ").expect("piece");
        j.piece(89_990, b"0123456789").expect("piece");
        j.commit().expect("commit");
        // An uncommitted one (a crash mid-transfer) must not touch the file.
        let mut k = Journal::create(&jdir, &rel, ino, 5, [0; 32]).expect("journal");
        k.piece(0, b"bad").expect("piece");
        drop(k);

        let rootfd: OwnedFd = File::open(root.path()).expect("open").into();
        assert_eq!(replay_all(&jdir, rootfd.as_fd()), 1);
        let data = fs::read(&target).expect("read");
        assert_eq!(data.len(), 90_000);
        assert_eq!(&data[10..13], b"XYZ");
        assert_eq!(&data[89_990..], b"0123456789");
        assert_eq!(data[0], b'a');
        assert_eq!(
            fs::read_dir(&jdir).expect("dir").count(),
            0,
            "journals removed"
        );
        // Replaying twice is harmless (nothing left).
        assert_eq!(replay_all(&jdir, rootfd.as_fd()), 0);
    }
}
