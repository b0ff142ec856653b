//! Durable replication state: the file index (path ↔ [`FileId`], content versions, scan stamps,
//! manifests) and the per-peer outgoing queues. This is the only module that touches sled; all of
//! it sits behind the private [`Kv`] struct (get / prefix scan / atomic batch / flush), so the
//! database can be swapped without touching callers (garage's `src/db` seam).
//!
//! Every stored record is `[format version byte] ++ postcard`, so a later build can migrate old
//! records and an unknown or damaged record decodes to a [`StoreError`], never a panic.
//!
//! Everything lives in one sled tree under one-byte key prefixes, so each logical update is a
//! single atomic batch; writers are serialised by a mutex so read-modify-write updates
//! (counters, coalescing) cannot interleave. [`Kv`] gathers the batches of a few milliseconds
//! and hands them to sled as one (sled writes its log out on every `apply_batch`).
//!
//! Durability: [`Store::enqueue`] flushes before returning (the issue promises a change is
//! recorded before the writer's release completes). Other writes become durable with the next
//! flush (any enqueue, [`Store::flush`], or sled's periodic flush); losing them is recoverable
//! because the backing files are the truth and the start scan rebuilds the index.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// sled's page cache. Its default (1 GiB) is resident memory, and the issue bounds the whole
/// peer at 256 MiB while a 4 GiB file replicates.
pub const CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Format version written in front of every record this build stores.
const FORMAT: u8 = 1;
/// Layout of the keyspace as a whole; bumped (with a migration) when prefixes change.
const SCHEMA: u8 = 1;

/// A peer's identity as raw bytes (`peerfs_proto::PeerId.0`).
pub type PeerKey = [u8; 32];

/// A version vector: how many content versions each peer has authored for a file.
pub type VersionVector = BTreeMap<PeerKey, u64>;

/// Stable identity of a replicated file: allocated monotonically, never reused, survives renames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FileId(pub u64);

/// A file's content version: what base checks and conflicts compare.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentVersion {
    pub vv: VersionVector,
    /// blake3 of the whole content.
    pub hash: [u8; 32],
    pub size: u64,
}

/// What the start scan last saw of the backing file; a mismatch means it changed behind the drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanStamp {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub inode: u64,
}

/// Per-file index entry (the manifest is stored beside it, see [`Store::manifest`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// `None` until the first content version is recorded (e.g. a directory or a new empty file).
    pub version: Option<ContentVersion>,
    pub stamp: Option<ScanStamp>,
}

/// What a queued record asks the peer to do. Content and metadata are read at send time from
/// the current file: old versions no longer exist to send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordKind {
    /// Bring the peer's object at the record's path to the file's current content and
    /// attributes (a folder or symlink: its current kind and attributes).
    Content,
    /// Bring the attributes of the peer's object at the record's path up to date.
    Meta,
    /// A namespace operation, encoded by the replicator. Never coalesced: applied in order.
    Op(Vec<u8>),
}

/// A record as the caller hands it to [`Store::enqueue`] (the store assigns the sequence number).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewRecord {
    pub file: FileId,
    pub kind: RecordKind,
    /// The path the peer knows the file by at this point of the stream (path bytes).
    pub path: Vec<u8>,
    /// The lock's fencing token, when the change was made under a lock.
    pub fence: Option<u64>,
    /// Bytes this record is expected to send (for `bytes_pending`); an estimate is fine.
    pub bytes: u64,
}

/// A record in a peer's queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRecord {
    /// Position in this peer's queue; strictly increasing, never reused.
    pub seq: u64,
    pub file: FileId,
    pub kind: RecordKind,
    pub path: Vec<u8>,
    pub fence: Option<u64>,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database: {0}")]
    Db(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(
        "{what} record has format version {found}; this build reads version {supported} or older"
    )]
    UnknownVersion {
        what: &'static str,
        found: u8,
        supported: u8,
    },
    #[error("{what} record is corrupt: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// A queued record cannot be decoded. It can never be sent: `ack` its `seq` to skip it (the
    /// start scan recovers the change from the backing files).
    #[error("queue record {seq}: {source}")]
    QueueRecord {
        seq: u64,
        #[source]
        source: Box<StoreError>,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Db(Box::new(e))
    }
}

// ---------------------------------------------------------------------------------------------
// The database seam: the only code that names sled.

/// A set of writes applied atomically.
#[derive(Default)]
struct Batch(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl Batch {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.0.push((key, Some(value)));
    }
    fn del(&mut self, key: Vec<u8>) {
        self.0.push((key, None));
    }
}

type KvIter<'a> = Box<dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + 'a>;
/// A gathered write: key and new value (`None`: removed).
type Gathered = (Vec<u8>, Option<Vec<u8>>);

/// How long written batches may wait before they go to sled together (see [`Kv`]).
const GATHER: Duration = Duration::from_millis(10);
/// Gathered writes beyond these go to sled at once, by the writer that crossed the line.
const GATHER_MAX_KEYS: usize = 8192;
const GATHER_MAX_BYTES: usize = 8 * 1024 * 1024;

/// The database seam. Every [`Kv::apply`] is atomic and visible to every reader at once, but
/// batches are not handed to sled one by one: sled 0.34's `apply_batch` seals and writes out
/// its log buffer on every call (a `pwrite` and a waited `sync_file_range` on one of its IO
/// threads), which cost a disk write per index update — several per replicated file, and most
/// of the CPU of an initial sync of small files. So batches are gathered in memory (`pending`,
/// which reads consult first) and handed to sled as one atomic batch [`GATHER`] after the first
/// of them, when they grow large, or at [`Kv::flush`]. Durability is unchanged: only `flush`
/// ever promised it, and it hands over what is gathered first. A crash loses at most the last
/// few milliseconds of unflushed batches, whole and in order (sled recovers a prefix of its
/// log, and each hand-over is one atomic batch), as it already lost sled's unflushed buffer.
struct Kv {
    shared: Arc<Shared>,
    gatherer: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    db: sled::Db,
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    /// The newest value of each key written since the last hand-over (`None`: removed).
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    bytes: usize,
    stop: bool,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A panicking writer inserts whole batches or nothing: the map is always consistent.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands the gathered writes to sled as one atomic batch (kept gathered if sled refuses).
    fn commit(&self, p: &mut Pending) -> Result<()> {
        if p.writes.is_empty() {
            return Ok(());
        }
        let mut b = sled::Batch::default();
        for (k, v) in &p.writes {
            match v {
                Some(v) => b.insert(k.as_slice(), v.as_slice()),
                None => b.remove(k.as_slice()),
            }
        }
        self.db.apply_batch(b)?;
        p.writes.clear();
        p.bytes = 0;
        Ok(())
    }

    /// The gatherer thread: hands writes over [`GATHER`] after the first one arrives.
    fn run(&self) {
        loop {
            let mut p = self.pending();
            while p.writes.is_empty() && !p.stop {
                p = self.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.stop {
                return;
            }
            drop(p);
            std::thread::sleep(GATHER);
            let mut p = self.pending();
            if let Err(e) = self.commit(&mut p) {
                tracing::warn!("state database: cannot write the index: {e}; retrying");
                drop(p);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

impl Kv {
    fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .open()?;
        let shared = Arc::new(Shared {
            db,
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let gatherer = std::thread::Builder::new()
            .name("peerfs-store".into())
            .spawn(move || s.run())
            .map_err(|e| StoreError::Db(Box::new(e)))?;
        Ok(Kv {
            shared,
            gatherer: Some(gatherer),
        })
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.shared.pending().writes.get(key) {
            return Ok(v.clone());
        }
        // Not gathered now: sled has the newest value (a hand-over clears what it applied
        // only once sled holds it, under the same lock).
        Ok(self.shared.db.get(key)?.map(|v| v.to_vec()))
    }

    fn apply(&self, batch: Batch) -> Result<()> {
        let mut p = self.shared.pending();
        let first = p.writes.is_empty();
        for (k, v) in batch.0 {
            p.bytes += k.len() + v.as_ref().map_or(0, Vec::len);
            p.writes.insert(k, v);
        }
        if p.writes.len() >= GATHER_MAX_KEYS || p.bytes >= GATHER_MAX_BYTES {
            return self.shared.commit(&mut p);
        }
        if first {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> KvIter<'_> {
        // Gathered writes first (a snapshot), then sled's iterator, merged by key.
        let gathered: Vec<Gathered> = self
            .shared
            .pending()
            .writes
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let db = self.shared.db.scan_prefix(prefix);
        merged(gathered, db)
    }

    fn range(&self, range: RangeInclusive<Vec<u8>>) -> KvIter<'_> {
        let gathered: Vec<Gathered> = self
            .shared
            .pending()
            .writes
            .range(range.clone())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let db = self.shared.db.range(range);
        merged(gathered, db)
    }

    fn flush(&self) -> Result<()> {
        self.shared.commit(&mut self.shared.pending())?;
        self.shared.db.flush()?;
        Ok(())
    }
}

impl Drop for Kv {
    fn drop(&mut self) {
        {
            let mut p = self.shared.pending();
            p.stop = true;
            if let Err(e) = self.shared.commit(&mut p) {
                tracing::warn!("state database: cannot write the index at close: {e}");
            }
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.gatherer.take() {
            let _ = t.join();
        }
    }
}

/// Gathered writes (sorted, `None` = removed) laid over a sled iterator of the same range:
/// a gathered key replaces sled's entry, a gathered removal hides it.
fn merged<'a>(gathered: Vec<Gathered>, db: sled::Iter) -> KvIter<'a> {
    let db = db.map(|r| {
        r.map(|(k, v)| (k.to_vec(), v.to_vec()))
            .map_err(StoreError::from)
    });
    if gathered.is_empty() {
        return Box::new(db);
    }
    Box::new(Merged {
        gathered: gathered.into_iter().peekable(),
        db: (Box::new(db) as KvIter<'a>).peekable(),
    })
}

struct Merged<'a> {
    gathered: std::iter::Peekable<std::vec::IntoIter<Gathered>>,
    db: std::iter::Peekable<KvIter<'a>>,
}

impl Iterator for Merged<'_> {
    type Item = Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let gathered_first = match (self.gathered.peek(), self.db.peek()) {
                (None, _) => return self.db.next(),
                (Some(_), None) => true,
                (Some((gk, _)), Some(Ok((dk, _)))) => gk <= dk,
                // sled's error comes out as it is.
                (Some(_), Some(Err(_))) => false,
            };
            if !gathered_first {
                return self.db.next();
            }
            let (k, v) = self.gathered.next()?;
            if matches!(self.db.peek(), Some(Ok((dk, _))) if *dk == k) {
                self.db.next();
            }
            if let Some(v) = v {
                return Some(Ok((k, v)));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Record encoding.

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let out = vec![FORMAT];
    // postcard into a Vec fails only on types serde cannot express, which ours are not.
    match postcard::to_extend(value, out) {
        Ok(v) => v,
        Err(e) => unreachable!("postcard cannot encode a store record: {e}"),
    }
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    let body = check_version(what, bytes)?;
    let (value, rest) = postcard::take_from_bytes::<T>(body).map_err(|e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(StoreError::Corrupt {
            what,
            detail: format!("{} trailing bytes", rest.len()),
        });
    }
    Ok(value)
}

fn check_version<'a>(what: &'static str, bytes: &'a [u8]) -> Result<&'a [u8]> {
    match bytes.split_first() {
        None => Err(StoreError::Corrupt {
            what,
            detail: "empty".into(),
        }),
        Some((&FORMAT, body)) => Ok(body),
        Some((&found, _)) => Err(StoreError::UnknownVersion {
            what,
            found,
            supported: FORMAT,
        }),
    }
}

fn decode_u64(what: &'static str, bytes: &[u8]) -> Result<u64> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what,
            detail: format!("{} bytes where 8 were expected", bytes.len()),
        })
}

// ---------------------------------------------------------------------------------------------
// Keys. One-byte prefixes; integers big-endian so sled's byte order is numeric order.

const K_PATH: u8 = b'P'; // path -> FileId
const K_ID_PATH: u8 = b'I'; // FileId -> path
const K_FILE: u8 = b'F'; // FileId -> FileState
const K_MANIFEST: u8 = b'm'; // FileId -> manifest
const K_QUEUE: u8 = b'Q'; // peer, seq -> QueueRecord
const K_COALESCE: u8 = b'C'; // (earlier builds: the coalescing index, now in memory)
const K_STATS: u8 = b'S'; // peer -> PeerStats
const K_ACKED: u8 = b'A'; // file, peer -> manifest the peer acked
const K_SENT: u8 = b's'; // file, peer -> manifest last sent to the peer (acked or not)
const K_PREV: u8 = b'p'; // FileId -> manifest of the version before the current one
const K_HASH: u8 = b'H'; // content hash -> FileId that had it (current or previous version)
const K_CAT: u8 = b'E'; // parent folder, 0, name -> CatEntry (reconciliation index)
const K_DIG: u8 = b'D'; // folder -> DirSum of everything below it
const K_PEERCONF: u8 = b'K'; // peer -> the peers its config lists (as it told us)

// b'M': database-wide values.
const META_NEXT_ID: &[u8] = b"Mnext_file_id";
const META_NEXT_SENT: &[u8] = b"Mnext_sent";
const META_SCHEMA: &[u8] = b"Mschema";
const META_CLOCK: &[u8] = b"Mclock";

fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![prefix];
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_encoded_bytes()
}

fn path_from_bytes(bytes: &[u8]) -> Result<PathBuf> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        // Encoded bytes are WTF-8 on Windows; well-formed UTF-8 covers every name Windows
        // users can type (unpaired surrogates are refused rather than decoded unsafely).
        String::from_utf8(bytes.to_vec())
            .map(PathBuf::from)
            .map_err(|e| StoreError::Corrupt {
                what: "path",
                detail: e.to_string(),
            })
    }
}

fn id_key(prefix: u8, id: FileId) -> Vec<u8> {
    key(prefix, &[&id.0.to_be_bytes()])
}

fn queue_key(peer: &PeerKey, seq: u64) -> Vec<u8> {
    key(K_QUEUE, &[peer, &seq.to_be_bytes()])
}

/// The coalescing index: (peer, file, kind tag) → `seq` of the newest pending Content or Meta
/// record of that file, so a later change of it joins that record instead of adding one. It
/// is derived from the queues, kept in memory and rebuilt from them at open (it used to be
/// stored, which cost two index writes per queued record). An entry may be stale (a record
/// acknowledged meanwhile, or a batch that failed): users check the record it names.
#[derive(Default)]
struct Coalesce(std::collections::HashMap<(PeerKey, FileId, u8), u64>);

impl Coalesce {
    fn rebuild(kv: &Kv) -> Result<Coalesce> {
        let mut index = Coalesce::default();
        for kv in kv.scan_prefix(&[K_QUEUE]) {
            let (k, v) = kv?;
            let Some(peer) = k.get(1..33).and_then(|p| PeerKey::try_from(p).ok()) else {
                continue;
            };
            // Undecodable records are reported when the queue is read, not here.
            if let Ok(rec) = decode::<QueueRecord>("queue", &v) {
                if let Some(tag) = coalesce_tag(&rec.kind) {
                    // In key order: the newest record of a file wins.
                    index.0.insert((peer, rec.file, tag), rec.seq);
                }
            }
        }
        // The stored index of earlier builds is dropped.
        let mut b = Batch::default();
        for kv in kv.scan_prefix(&[K_COALESCE]) {
            b.del(kv?.0);
        }
        if !b.0.is_empty() {
            kv.apply(b)?;
        }
        Ok(index)
    }
}

/// Sent-but-unacknowledged versions kept per file and peer, at most...
pub const SENT_KEEP: usize = 64;
/// ...and at most this many manifest bytes (a 4 GiB file's manifest is ~25 MB).
pub const SENT_KEEP_BYTES: usize = 64 * 1024 * 1024;

fn sent_key(file: FileId, peer: &PeerKey) -> Vec<u8> {
    key(K_SENT, &[&file.0.to_be_bytes(), peer])
}

fn acked_key(file: FileId, peer: &PeerKey) -> Vec<u8> {
    key(K_ACKED, &[&file.0.to_be_bytes(), peer])
}

/// Records of one kind for one file that supersede each other while unsent; `None` for records
/// that must all be delivered in order (renames).
fn coalesce_tag(kind: &RecordKind) -> Option<u8> {
    match kind {
        RecordKind::Content => Some(0),
        RecordKind::Meta => Some(2),
        RecordKind::Op(_) => None,
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct PeerStats {
    next_seq: u64,
    len: u64,
    bytes: u64,
}

// ---------------------------------------------------------------------------------------------

/// The replicator's durable state, opened from `STATE/db`.
pub struct Store {
    kv: Kv,
    /// Serialises writers: every update reads counters or indexes before its atomic batch.
    /// It guards the coalescing index, which lives in memory only (see [`Coalesce`]).
    write: Mutex<Coalesce>,
    /// Grows with every change of the reconciliation index (what was computed from it at one
    /// value is still right while the value stays).
    cat_gen: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Opens (creating if needed) the database at `state_dir/db`.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let kv = Kv::open(&state_dir.join("db"))?;
        match kv.get(META_SCHEMA)? {
            None => {
                let mut b = Batch::default();
                b.put(META_SCHEMA.to_vec(), vec![SCHEMA]);
                kv.apply(b)?;
                kv.flush()?;
            }
            Some(v) if v.as_slice() == [SCHEMA] => {}
            Some(v) => {
                return Err(StoreError::UnknownVersion {
                    what: "database schema",
                    found: v.first().copied().unwrap_or(0),
                    supported: SCHEMA,
                });
            }
        }
        let coalesce = Coalesce::rebuild(&kv)?;
        Ok(Store {
            kv,
            write: Mutex::new(coalesce),
            cat_gen: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.kv.flush()
    }

    fn lock(&self) -> MutexGuard<'_, Coalesce> {
        // The guarded index only ever points at records to check (see `Coalesce`): a panic in
        // another writer cannot leave it wrong in a harmful way, so a poisoned lock is safe
        // to take.
        self.write.lock().unwrap_or_else(|e| e.into_inner())
    }

    // --- file index ---------------------------------------------------------------------------

    pub fn file_id(&self, path: &Path) -> Result<Option<FileId>> {
        self.kv
            .get(&key(K_PATH, &[path_bytes(path)]))?
            .map(|v| decode_u64("path index", &v).map(FileId))
            .transpose()
    }

    /// The id of `path`, allocating a fresh one if the path is not indexed yet.
    pub fn ensure_file_id(&self, path: &Path) -> Result<FileId> {
        let _g = self.lock();
        if let Some(id) = self.file_id(path)? {
            return Ok(id);
        }
        let next = match self.kv.get(META_NEXT_ID)? {
            Some(v) => decode_u64("file id counter", &v)?,
            None => 1,
        };
        let id = FileId(next);
        let mut b = Batch::default();
        b.put(META_NEXT_ID.to_vec(), (next + 1).to_be_bytes().to_vec());
        b.put(
            key(K_PATH, &[path_bytes(path)]),
            id.0.to_be_bytes().to_vec(),
        );
        b.put(id_key(K_ID_PATH, id), path_bytes(path).to_vec());
        self.kv.apply(b)?;
        Ok(id)
    }

    pub fn path_of(&self, id: FileId) -> Result<Option<PathBuf>> {
        self.kv
            .get(&id_key(K_ID_PATH, id))?
            .map(|v| path_from_bytes(&v))
            .transpose()
    }

    /// Moves `from` (and, for a directory, every indexed path under it) to `to`. A file indexed
    /// at `to` loses its name and its id is returned (rename over: how office suites save).
    pub fn rename_path(&self, from: &Path, to: &Path) -> Result<Option<FileId>> {
        let _g = self.lock();
        let (from, to) = (path_bytes(from), path_bytes(to));
        if from == to {
            return Ok(None);
        }
        let mut b = Batch::default();
        let displaced = match self.kv.get(&key(K_PATH, &[to]))? {
            Some(v) => {
                let id = FileId(decode_u64("path index", &v)?);
                b.del(id_key(K_ID_PATH, id));
                Some(id)
            }
            None => None,
        };
        let mut moves = Vec::new();
        if let Some(v) = self.kv.get(&key(K_PATH, &[from]))? {
            moves.push((from.to_vec(), v));
        }
        let sep = [std::path::MAIN_SEPARATOR as u8];
        for kv in self.kv.scan_prefix(&key(K_PATH, &[from, &sep])) {
            let (k, v) = kv?;
            moves.push((k[1..].to_vec(), v));
        }
        for (old, v) in moves {
            let id = FileId(decode_u64("path index", &v)?);
            let mut new = to.to_vec();
            new.extend_from_slice(&old[from.len()..]);
            b.del(key(K_PATH, &[&old]));
            b.put(key(K_PATH, &[&new]), v);
            b.put(id_key(K_ID_PATH, id), new);
        }
        self.kv.apply(b)?;
        Ok(displaced)
    }

    /// Drops `path` from the index, keeping the file's record (its last version still matters
    /// for a delete/edit conflict until [`Store::forget_file`]).
    pub fn remove_path(&self, path: &Path) -> Result<Option<FileId>> {
        let _g = self.lock();
        let k = key(K_PATH, &[path_bytes(path)]);
        let Some(v) = self.kv.get(&k)? else {
            return Ok(None);
        };
        let id = FileId(decode_u64("path index", &v)?);
        let mut b = Batch::default();
        b.del(k);
        b.del(id_key(K_ID_PATH, id));
        self.kv.apply(b)?;
        Ok(Some(id))
    }

    /// Drops `path` and every indexed path below it (a removed folder) from the index, in one
    /// batch; returns the id of `path` itself.
    pub fn remove_tree(&self, path: &Path) -> Result<Option<FileId>> {
        let _g = self.lock();
        let pb = path_bytes(path);
        let mut b = Batch::default();
        let mut own = None;
        if let Some(v) = self.kv.get(&key(K_PATH, &[pb]))? {
            let id = FileId(decode_u64("path index", &v)?);
            b.del(key(K_PATH, &[pb]));
            b.del(id_key(K_ID_PATH, id));
            own = Some(id);
        }
        let sep = [std::path::MAIN_SEPARATOR as u8];
        for kv in self.kv.scan_prefix(&key(K_PATH, &[pb, &sep])) {
            let (k, v) = kv?;
            let id = FileId(decode_u64("path index", &v)?);
            b.del(k);
            b.del(id_key(K_ID_PATH, id));
        }
        self.kv.apply(b)?;
        Ok(own)
    }

    /// Removes everything known about `id` (name, record, manifest, peers' acked manifests).
    /// Queued records for it stay; the sender finds the file gone and skips them.
    pub fn forget_file(&self, id: FileId) -> Result<()> {
        let _g = self.lock();
        let mut b = Batch::default();
        if let Some(p) = self.kv.get(&id_key(K_ID_PATH, id))? {
            b.del(key(K_PATH, &[&p]));
        }
        b.del(id_key(K_ID_PATH, id));
        b.del(id_key(K_FILE, id));
        b.del(id_key(K_MANIFEST, id));
        b.del(id_key(K_PREV, id));
        for kv in self.kv.scan_prefix(&id_key(K_SENT, id)) {
            b.del(kv?.0);
        }
        for kv in self.kv.scan_prefix(&id_key(K_ACKED, id)) {
            b.del(kv?.0);
        }
        self.kv.apply(b)
    }

    /// Every indexed (path, id), in path byte order, streamed (for the start scan).
    pub fn paths(&self) -> impl Iterator<Item = Result<(PathBuf, FileId)>> + '_ {
        self.kv.scan_prefix(&[K_PATH]).map(|kv| {
            let (k, v) = kv?;
            Ok((
                path_from_bytes(&k[1..])?,
                FileId(decode_u64("path index", &v)?),
            ))
        })
    }

    pub fn file_state(&self, id: FileId) -> Result<Option<FileState>> {
        self.kv
            .get(&id_key(K_FILE, id))?
            .map(|v| decode("file", &v))
            .transpose()
    }

    /// Records a new current content version together with its manifest and the stamp of the
    /// file that holds it, atomically. `by_hash`: findable by its content hash
    /// ([`Store::manifests_for_hash`], which finds a delta base; pointless for a file of one
    /// chunk, which any change replaces whole).
    pub fn set_content(
        &self,
        id: FileId,
        version: &ContentVersion,
        manifest: &[u8],
        stamp: ScanStamp,
        by_hash: bool,
    ) -> Result<()> {
        let _g = self.lock();
        let mut state = self.file_state(id)?.unwrap_or_default();
        state.version = Some(version.clone());
        state.stamp = Some(stamp);
        let mut m = Vec::with_capacity(manifest.len() + 1);
        m.push(FORMAT);
        m.extend_from_slice(manifest);
        let mut b = Batch::default();
        if let Some(cur) = self.kv.get(&id_key(K_MANIFEST, id))? {
            if cur != m {
                b.put(id_key(K_PREV, id), cur);
            }
        }
        b.put(id_key(K_FILE, id), encode(&state));
        b.put(id_key(K_MANIFEST, id), m);
        if by_hash {
            b.put(key(K_HASH, &[&version.hash]), id.0.to_be_bytes().to_vec());
        }
        self.kv.apply(b)
    }

    /// A stored manifest (some file's current or previous version) with content hash `hash`:
    /// proves which version a peer holds without its history. Raw manifest bytes; the caller
    /// decodes and checks the hash (the index may point at a file that changed since).
    pub fn manifests_for_hash(&self, hash: &[u8; 32]) -> Result<Vec<Vec<u8>>> {
        let Some(v) = self.kv.get(&key(K_HASH, &[hash]))? else {
            return Ok(Vec::new());
        };
        let id = FileId(decode_u64("hash index", &v)?);
        Ok([self.manifest(id)?, self.prev_manifest(id)?]
            .into_iter()
            .flatten()
            .collect())
    }

    /// The manifest of the version before the current one (the version peers most likely hold
    /// when this server has no acknowledgement from them).
    pub fn prev_manifest(&self, id: FileId) -> Result<Option<Vec<u8>>> {
        self.kv
            .get(&id_key(K_PREV, id))?
            .map(|v| check_version("manifest", &v).map(<[u8]>::to_vec))
            .transpose()
    }

    /// Records what the start scan saw of the backing file.
    pub fn set_stamp(&self, id: FileId, stamp: ScanStamp) -> Result<()> {
        let _g = self.lock();
        let mut state = self.file_state(id)?.unwrap_or_default();
        state.stamp = Some(stamp);
        let mut b = Batch::default();
        b.put(id_key(K_FILE, id), encode(&state));
        self.kv.apply(b)
    }

    /// The manifest bytes of the file's current version (opaque here; `manifest.rs` owns them).
    pub fn manifest(&self, id: FileId) -> Result<Option<Vec<u8>>> {
        self.kv
            .get(&id_key(K_MANIFEST, id))?
            .map(|v| check_version("manifest", &v).map(<[u8]>::to_vec))
            .transpose()
    }

    // --- per-peer queues ----------------------------------------------------------------------

    fn stats(&self, peer: &PeerKey) -> Result<PeerStats> {
        match self.kv.get(&key(K_STATS, &[peer]))? {
            Some(v) => decode("queue counters", &v),
            None => Ok(PeerStats::default()),
        }
    }

    /// Appends a record to `peer`'s queue and flushes before returning; returns its `seq`.
    ///
    /// Coalescing: a Content or Meta record for the same file and path that is still pending
    /// with `seq >= unsent_from` (the caller's mark of what it has not sent yet) already brings
    /// the peer to the file's state at send time, so the new record is not added and that
    /// record's `seq` is returned. Operations are never coalesced.
    pub fn enqueue(&self, peer: &PeerKey, rec: NewRecord, unsent_from: u64) -> Result<u64> {
        let seqs = self.enqueue_multi(&[(*peer, unsent_from)], rec, true)?;
        Ok(seqs.first().copied().unwrap_or(0))
    }

    /// [`Store::enqueue`] for several peers (distinct) in one atomic batch; flushed before
    /// returning when `durable` (a caller recording many changes at once flushes once, at the
    /// end, with [`Store::flush`]). Returns each peer's `seq`, in order.
    pub fn enqueue_multi(
        &self,
        peers: &[(PeerKey, u64)],
        rec: NewRecord,
        durable: bool,
    ) -> Result<Vec<u64>> {
        let mut index = self.lock();
        let tag = coalesce_tag(&rec.kind);
        let mut b = Batch::default();
        let mut out = Vec::with_capacity(peers.len());
        for (peer, unsent_from) in peers {
            if let Some(seq) = self.pending_same(&index, peer, &rec, tag, *unsent_from)? {
                out.push(seq);
                continue;
            }
            let mut stats = self.stats(peer)?;
            let seq = stats.next_seq;
            let record = QueueRecord {
                seq,
                file: rec.file,
                kind: rec.kind.clone(),
                path: rec.path.clone(),
                fence: rec.fence,
                bytes: rec.bytes,
            };
            stats.next_seq += 1;
            stats.len += 1;
            stats.bytes = stats.bytes.saturating_add(record.bytes);
            if let Some(tag) = tag {
                // Before the batch is applied: if it fails, the entry points at a record
                // that does not exist, which `pending_same` checks.
                index.0.insert((*peer, record.file, tag), seq);
            }
            b.put(queue_key(peer, seq), encode(&record));
            b.put(key(K_STATS, &[peer]), encode(&stats));
            out.push(seq);
        }
        self.kv.apply(b)?;
        if durable {
            self.kv.flush()?;
        }
        Ok(out)
    }

    /// The pending record that already brings `peer` to `rec`'s state (see [`Store::enqueue`]).
    fn pending_same(
        &self,
        index: &Coalesce,
        peer: &PeerKey,
        rec: &NewRecord,
        tag: Option<u8>,
        unsent_from: u64,
    ) -> Result<Option<u64>> {
        let Some(tag) = tag else { return Ok(None) };
        let Some(&old_seq) = index.0.get(&(*peer, rec.file, tag)) else {
            return Ok(None);
        };
        if old_seq < unsent_from {
            return Ok(None);
        }
        let Some(v) = self.kv.get(&queue_key(peer, old_seq))? else {
            return Ok(None);
        };
        Ok(match decode::<QueueRecord>("queue", &v) {
            Ok(old) if old.path == rec.path && old.kind == rec.kind => Some(old.seq),
            _ => None,
        })
    }

    /// Up to `n` records of `peer`'s queue with `seq >= from`, in order.
    pub fn peek_from(&self, peer: &PeerKey, from: u64, n: usize) -> Result<Vec<QueueRecord>> {
        let mut out = Vec::with_capacity(n.min(1024));
        for kv in self
            .kv
            .range(queue_key(peer, from)..=queue_key(peer, u64::MAX))
            .take(n)
        {
            let (k, v) = kv?;
            let seq = decode_u64("queue key", &k[1 + 32..])?;
            let rec = decode::<QueueRecord>("queue", &v).map_err(|e| StoreError::QueueRecord {
                seq,
                source: Box::new(e),
            })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Up to `n` records from the head of `peer`'s queue, in order. A record that cannot be
    /// decoded ends the list with [`StoreError::QueueRecord`] naming its `seq`.
    pub fn peek(&self, peer: &PeerKey, n: usize) -> Result<Vec<QueueRecord>> {
        let mut out = Vec::with_capacity(n.min(1024));
        for kv in self.kv.scan_prefix(&key(K_QUEUE, &[peer])).take(n) {
            let (k, v) = kv?;
            let seq = decode_u64("queue key", &k[1 + 32..])?;
            let rec = decode::<QueueRecord>("queue", &v).map_err(|e| StoreError::QueueRecord {
                seq,
                source: Box::new(e),
            })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Removes every record of `peer`'s queue with `seq <= up_to_seq`; returns how many.
    /// Re-acking is harmless. Not flushed: a lost ack only replays records, which is idempotent.
    pub fn ack(&self, peer: &PeerKey, up_to_seq: u64) -> Result<usize> {
        let mut index = self.lock();
        let mut stats = self.stats(peer)?;
        let mut b = Batch::default();
        let mut removed = 0;
        for kv in self
            .kv
            .range(queue_key(peer, 0)..=queue_key(peer, up_to_seq))
        {
            let (k, v) = kv?;
            // Undecodable records are removed too (that is how a caller skips them); their
            // bytes are unknown, so the counter is clamped and reset once the queue is empty.
            if let Ok(rec) = decode::<QueueRecord>("queue", &v) {
                stats.bytes = stats.bytes.saturating_sub(rec.bytes);
                if let Some(tag) = coalesce_tag(&rec.kind) {
                    let k = (*peer, rec.file, tag);
                    if index.0.get(&k) == Some(&rec.seq) {
                        index.0.remove(&k);
                    }
                }
            }
            b.del(k);
            stats.len = stats.len.saturating_sub(1);
            removed += 1;
        }
        if removed == 0 {
            return Ok(0);
        }
        if stats.len == 0 {
            stats.bytes = 0;
        }
        b.put(key(K_STATS, &[peer]), encode(&stats));
        self.kv.apply(b)?;
        Ok(removed)
    }

    /// Records pending for `peer`.
    pub fn len(&self, peer: &PeerKey) -> Result<u64> {
        Ok(self.stats(peer)?.len)
    }

    /// Sum of the pending records' `bytes`.
    pub fn bytes_pending(&self, peer: &PeerKey) -> Result<u64> {
        Ok(self.stats(peer)?.bytes)
    }

    /// Remembers the manifest `peer` acknowledged last for `file`: the next delta is computed
    /// against it.
    pub fn set_acked_manifest(&self, peer: &PeerKey, file: FileId, manifest: &[u8]) -> Result<()> {
        let _g = self.lock();
        let mut m = Vec::with_capacity(manifest.len() + 1);
        m.push(FORMAT);
        m.extend_from_slice(manifest);
        let mut b = Batch::default();
        b.put(acked_key(file, peer), m);
        self.kv.apply(b)
    }

    /// Remembers a version sent to `peer` for `file` (stream position `seq`): when its ack
    /// comes it becomes the acked one ([`Store::promote_sent`]), even if the file changed
    /// meanwhile; and if the peer says it holds that version, it is a valid base. Versions of
    /// one file sent back to back are all kept until acked (the last [`SENT_KEEP`]).
    pub fn set_sent_manifest(
        &self,
        peer: &PeerKey,
        file: FileId,
        seq: u64,
        hash: &[u8; 32],
        manifest: &[u8],
    ) -> Result<()> {
        let _g = self.lock();
        let mut m = Vec::with_capacity(manifest.len() + 33);
        m.push(FORMAT);
        m.extend_from_slice(hash);
        m.extend_from_slice(manifest);
        let mut b = Batch::default();
        let prefix = sent_key(file, peer);
        // Keep the newest versions: at most SENT_KEEP of them and SENT_KEEP_BYTES in all.
        let existing: Vec<(Vec<u8>, usize)> = self
            .kv
            .scan_prefix(&prefix)
            .filter_map(|kv| kv.ok().map(|(k, v)| (k, v.len())))
            .collect();
        let mut budget = SENT_KEEP_BYTES.saturating_sub(m.len());
        let mut kept = 1;
        for (k, len) in existing.iter().rev() {
            if kept < SENT_KEEP && *len <= budget {
                kept += 1;
                budget -= len;
            } else {
                b.del(k.clone());
            }
        }
        // Keyed by send order (a store-wide counter, not the queue position: a record resent
        // after a restart may carry another version under the same position).
        let _ = seq;
        let n = match self.kv.get(META_NEXT_SENT)? {
            Some(v) => decode_u64("sent counter", &v)?,
            None => 0,
        };
        b.put(META_NEXT_SENT.to_vec(), (n + 1).to_be_bytes().to_vec());
        let mut k = prefix;
        k.extend_from_slice(&n.to_be_bytes());
        b.put(k, m);
        self.kv.apply(b)
    }

    /// The version with content hash `hash` sent to `peer` for `file`, if still kept.
    pub fn sent_manifest(
        &self,
        peer: &PeerKey,
        file: FileId,
        hash: &[u8; 32],
    ) -> Result<Option<Vec<u8>>> {
        Ok(self.find_sent(peer, file, hash)?.map(|(_, v)| v))
    }

    fn find_sent(
        &self,
        peer: &PeerKey,
        file: FileId,
        hash: &[u8; 32],
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        for kv in self.kv.scan_prefix(&sent_key(file, peer)) {
            let (k, v) = kv?;
            let body = check_version("sent manifest", &v)?;
            if body.len() >= 32 && &body[..32] == hash {
                return Ok(Some((k, body[32..].to_vec())));
            }
        }
        Ok(None)
    }

    /// The peer acknowledged the version `hash` sent for `file`: it becomes the acked
    /// manifest, and it and older sent versions are dropped. False if it is not kept.
    pub fn promote_sent(&self, peer: &PeerKey, file: FileId, hash: &[u8; 32]) -> Result<bool> {
        let _g = self.lock();
        let Some((key_found, manifest)) = self.find_sent(peer, file, hash)? else {
            return Ok(false);
        };
        let mut b = Batch::default();
        let mut m = Vec::with_capacity(manifest.len() + 1);
        m.push(FORMAT);
        m.extend_from_slice(&manifest);
        b.put(acked_key(file, peer), m);
        for kv in self.kv.scan_prefix(&sent_key(file, peer)) {
            let (k, _) = kv?;
            if k <= key_found {
                b.del(k);
            }
        }
        self.kv.apply(b)?;
        Ok(true)
    }

    pub fn acked_manifest(&self, peer: &PeerKey, file: FileId) -> Result<Option<Vec<u8>>> {
        self.kv
            .get(&acked_key(file, peer))?
            .map(|v| check_version("acked manifest", &v).map(<[u8]>::to_vec))
            .transpose()
    }

    /// Test and migration hook: writes raw bytes as a queue record (e.g. a damaged one).
    #[doc(hidden)]
    pub fn put_raw_queue_record(&self, peer: &PeerKey, seq: u64, bytes: &[u8]) -> Result<()> {
        let _g = self.lock();
        let mut b = Batch::default();
        b.put(queue_key(peer, seq), bytes.to_vec());
        self.kv.apply(b)?;
        self.kv.flush()
    }
}

// ---------------------------------------------------------------------------------------------
// Reconciliation index: every path's state and version, tombstones, and per-folder digests.

/// One path's entry in the reconciliation index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatEntry {
    pub state: peerfs_proto::msg::EntryState,
    /// What the backing object looked like when this entry was recorded (files only).
    pub stamp: Option<ScanStamp>,
}

/// The summary of a folder: XOR of the digests of every live entry below it, and how many
/// files and bytes they hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirSum {
    pub digest: [u8; 16],
    pub files: u64,
    pub bytes: u64,
}

/// `path`'s key in the index: its parent folder, a NUL (never in a name), its name. A
/// folder's children are then one prefix scan, without its grandchildren.
fn cat_key(path: &[u8]) -> Vec<u8> {
    let (parent, name) = match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&b""[..], path),
    };
    key(K_CAT, &[parent, b"\0", name])
}

fn cat_path(k: &[u8]) -> Option<Vec<u8>> {
    let body = k.get(1..)?;
    let nul = body.iter().position(|b| *b == 0)?;
    let (parent, name) = (&body[..nul], &body[nul + 1..]);
    Some(if parent.is_empty() {
        name.to_vec()
    } else {
        [parent, b"/", name].concat()
    })
}

/// Every folder above `path`, the root (empty) first.
fn ancestors(path: &[u8]) -> Vec<&[u8]> {
    let mut out = vec![&path[..0]];
    for (i, b) in path.iter().enumerate() {
        if *b == b'/' {
            out.push(&path[..i]);
        }
    }
    out
}

impl Store {
    /// The entry of `path` (live or tombstone).
    pub fn cat_get(&self, path: &[u8]) -> Result<Option<CatEntry>> {
        self.kv
            .get(&cat_key(path))?
            .map(|v| decode("index entry", &v))
            .transpose()
    }

    /// Sets (or with `None` forgets) the entry of `path`, updating every folder summary above
    /// it in the same atomic batch.
    pub fn cat_put(&self, path: &[u8], entry: Option<&CatEntry>) -> Result<()> {
        self.cat_put_many(&[(path.to_vec(), entry.cloned())])
    }

    /// [`Store::cat_put`] of several paths in one batch.
    pub fn cat_put_many(&self, items: &[(Vec<u8>, Option<CatEntry>)]) -> Result<()> {
        use peerfs_proto::msg::Kind;
        let _g = self.lock();
        let mut sums: BTreeMap<Vec<u8>, DirSum> = BTreeMap::new();
        let mut b = Batch::default();
        let mut written: BTreeMap<Vec<u8>, Option<CatEntry>> = BTreeMap::new();
        for (path, entry) in items {
            let old = match written.get(path) {
                Some(e) => e.clone(),
                None => self.cat_get(path)?,
            };
            let leaf = |e: &Option<CatEntry>| {
                e.as_ref()
                    .map(|e| crate::catalog::leaf_digest(path, &e.state))
                    .unwrap_or([0; 16])
            };
            let (dl, dr) = (leaf(&old), leaf(entry));
            let change = crate::catalog::xor(&dl, &dr);
            let count = |e: &Option<CatEntry>| match e {
                Some(e) if e.state.kind == Kind::File => (1i64, e.state.size as i64),
                _ => (0, 0),
            };
            let ((of, ob), (nf, nb)) = (count(&old), count(entry));
            if change != [0; 16] || of != nf || ob != nb {
                for a in ancestors(path) {
                    let sum = match sums.get(a) {
                        Some(s) => *s,
                        None => self.dir_sum(a)?,
                    };
                    let s = DirSum {
                        digest: crate::catalog::xor(&sum.digest, &change),
                        files: (sum.files as i64 + nf - of).max(0) as u64,
                        bytes: (sum.bytes as i64 + nb - ob).max(0) as u64,
                    };
                    sums.insert(a.to_vec(), s);
                }
            }
            match entry {
                Some(e) => b.put(cat_key(path), encode(e)),
                None => b.del(cat_key(path)),
            }
            written.insert(path.clone(), entry.clone());
        }
        for (dir, s) in sums {
            b.put(key(K_DIG, &[&dir]), encode(&s));
        }
        self.kv.apply(b)?;
        // After the batch: a reader that took the old value before reading stays outdated.
        self.cat_gen
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// A value that changes whenever the reconciliation index does: read it *before* reading
    /// the index, and what was read stays right as long as it has not changed.
    pub fn cat_generation(&self) -> u64 {
        self.cat_gen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The summary of folder `dir` (empty: the root).
    pub fn dir_sum(&self, dir: &[u8]) -> Result<DirSum> {
        Ok(self
            .kv
            .get(&key(K_DIG, &[dir]))?
            .map(|v| decode("folder summary", &v))
            .transpose()?
            .unwrap_or_default())
    }

    /// The entries directly in folder `dir` (live and tombstones), by name.
    pub fn cat_children(&self, dir: &[u8]) -> Result<Vec<(Vec<u8>, CatEntry)>> {
        let prefix = key(K_CAT, &[dir, b"\0"]);
        let mut out = Vec::new();
        for r in self.kv.scan_prefix(&prefix) {
            let (k, v) = r?;
            out.push((k[prefix.len()..].to_vec(), decode("index entry", &v)?));
        }
        Ok(out)
    }

    /// Every entry at or below `path`, parents before children.
    pub fn cat_subtree(&self, path: &[u8]) -> Result<Vec<(Vec<u8>, CatEntry)>> {
        let mut out = Vec::new();
        if let Some(e) = self.cat_get(path)? {
            out.push((path.to_vec(), e));
        }
        let mut i = 0;
        while i < out.len() {
            if out[i].1.state.kind == peerfs_proto::msg::Kind::Dir {
                let dir = out[i].0.clone();
                for (name, e) in self.cat_children(&dir)? {
                    out.push(([&dir[..], b"/", &name[..]].concat(), e));
                }
            }
            i += 1;
        }
        Ok(out)
    }

    /// Every entry of the index, in no particular order.
    pub fn cat_all(&self) -> impl Iterator<Item = Result<(Vec<u8>, CatEntry)>> + '_ {
        self.kv.scan_prefix(&[K_CAT]).map(|r| {
            let (k, v) = r?;
            let path = cat_path(&k).ok_or_else(|| StoreError::Corrupt {
                what: "index key",
                detail: "no separator".into(),
            })?;
            Ok((path, decode("index entry", &v)?))
        })
    }

    /// The next value of this server's Lamport clock.
    pub fn next_clock(&self) -> Result<u64> {
        let _g = self.lock();
        let now = match self.kv.get(META_CLOCK)? {
            Some(v) => decode_u64("clock", &v)?,
            None => 0,
        };
        let mut b = Batch::default();
        b.put(META_CLOCK.to_vec(), (now + 1).to_be_bytes().to_vec());
        self.kv.apply(b)?;
        Ok(now + 1)
    }

    /// Raises the clock to at least `seen` (every version received moves it).
    pub fn observe_clock(&self, seen: u64) -> Result<()> {
        let _g = self.lock();
        let now = match self.kv.get(META_CLOCK)? {
            Some(v) => decode_u64("clock", &v)?,
            None => 0,
        };
        if seen > now {
            let mut b = Batch::default();
            b.put(META_CLOCK.to_vec(), seen.to_be_bytes().to_vec());
            self.kv.apply(b)?;
        }
        Ok(())
    }

    /// Remembers which peers `peer`'s config lists.
    pub fn set_peer_config(&self, peer: &PeerKey, configured: &[PeerKey]) -> Result<()> {
        let mut b = Batch::default();
        b.put(key(K_PEERCONF, &[peer]), encode(&configured.to_vec()));
        self.kv.apply(b)
    }

    /// What [`Store::set_peer_config`] stored for `peer`.
    pub fn peer_config(&self, peer: &PeerKey) -> Result<Option<Vec<PeerKey>>> {
        self.kv
            .get(&key(K_PEERCONF, &[peer]))?
            .map(|v| decode("peer config", &v))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(kv: &Kv, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        kv.scan_prefix(prefix).map(|r| r.expect("scan")).collect()
    }

    fn kvs(items: &[(&[u8], &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
        items
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }

    /// Batches not yet handed to sled are read back, laid over sled's entries by key (a
    /// gathered removal hides one), and end up in sled unchanged.
    #[test]
    fn gathered_writes_read_back_merged_and_persist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let kv = Kv::open(&path).expect("open");
        let mut b = Batch::default();
        for k in [&b"a1"[..], b"a3", b"a5", b"a7"] {
            b.put(k.to_vec(), b"old".to_vec());
        }
        kv.apply(b).expect("apply");
        kv.flush().expect("flush");
        let mut b = Batch::default();
        b.put(b"a2".to_vec(), b"new".to_vec());
        b.put(b"a3".to_vec(), b"new".to_vec());
        b.del(b"a5".to_vec());
        b.del(b"a6".to_vec());
        b.put(b"a8".to_vec(), b"new".to_vec());
        b.put(b"b1".to_vec(), b"x".to_vec());
        kv.apply(b).expect("apply");
        let want = kvs(&[
            (b"a1", b"old"),
            (b"a2", b"new"),
            (b"a3", b"new"),
            (b"a7", b"old"),
            (b"a8", b"new"),
        ]);
        assert_eq!(scan(&kv, b"a"), want);
        assert_eq!(kv.get(b"a5").expect("get"), None);
        assert_eq!(kv.get(b"a3").expect("get"), Some(b"new".to_vec()));
        let ranged: Vec<_> = kv
            .range(b"a3".to_vec()..=b"b1".to_vec())
            .map(|r| r.expect("range"))
            .collect();
        assert_eq!(
            ranged,
            kvs(&[
                (b"a3", b"new"),
                (b"a7", b"old"),
                (b"a8", b"new"),
                (b"b1", b"x")
            ])
        );
        kv.flush().expect("flush");
        assert_eq!(scan(&kv, b"a"), want);
        drop(kv);
        let kv = Kv::open(&path).expect("reopen");
        assert_eq!(scan(&kv, b"a"), want);
        assert_eq!(kv.get(b"b1").expect("get"), Some(b"x".to_vec()));
    }

    /// Without a flush, the gatherer hands the batches to sled by itself.
    #[test]
    fn gathered_writes_reach_sled_unflushed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kv = Kv::open(&dir.path().join("db")).expect("open");
        let mut b = Batch::default();
        b.put(b"k".to_vec(), b"v".to_vec());
        kv.apply(b).expect("apply");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while kv.shared.db.get(b"k").expect("get").is_none() {
            assert!(std::time::Instant::now() < deadline, "never handed over");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(kv.shared.pending().writes.is_empty());
    }
}
