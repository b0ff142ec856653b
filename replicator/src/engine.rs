//! The replicator at work: turns the drive's local changes into durable per-peer queue records,
//! streams them to each peer (content as deltas against what that peer holds), and applies
//! what peers stream here, atomically, into the backing folder.
//!
//! Threads: one sender per peer (blocking file I/O, bounded memory: one chunk at a time, at
//! most [`Config::window`] bytes of content unacknowledged), one receiver per peer (applies
//! that peer's stream in order) with a commit thread beside it (small new files are committed
//! in batches — one filesystem sync, the renames, one more sync, then their acknowledgements —
//! while the receiver builds the next batch). The network is behind [`Transport`];
//! acknowledgements and flow credit arrive through [`Replicator::on_message`] and are handled
//! inline.
//!
//! Stream order is queue order: each peer applies records in the order they happened here.
//! A receiver that refuses a record (its base differs, a rename's source is missing, a disk is
//! full) ignores the rest of that *epoch*; the sender starts a new epoch at that record, with
//! what the refusal asked for (another base, the content instead of the operation, or later).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};
use peerfs_proto::msg::{
    AckOutcome, ByteBuf, EntryState, Kind, MAX_INLINE, Meta, NsOp, ReplMsg, Version,
};
use peerfs_proto::{PeerId, RelPath};

use crate::beneath::{lstat_at, open_dir, open_parent, openat2_beneath};
use crate::chunk::{ChunkRef, Hash, MAX_SIZE, hash_bytes};
use crate::delta::{Delta, Op};
use crate::manifest::{self, Manifest};
use crate::meta::{apply_meta, apply_meta_new, open_for_meta, read_meta};
use crate::store::{FileId, NewRecord, PeerKey, QueueRecord, RecordKind, ScanStamp, Store};

mod recon;
mod versions;

use crate::catalog::Decision;
use versions::now_secs;

pub use recon::{ConflictNote, RECON_PAUSE, RECON_ROUNDS, ScanReport, SyncProgress};

/// See [`Replicator::pause_applies`].
pub struct ApplyPause<'a>(#[allow(dead_code)] parking_lot::MutexGuard<'a, ()>);

/// Decides whether a path replicates (the drive's include/exclude rules).
pub type Filter = Arc<dyn Fn(&RelPath) -> bool + Send + Sync>;

/// A namespace operation as queued: the operation and the version it makes.
#[derive(serde::Serialize, serde::Deserialize)]
struct OpRecord {
    op: NsOp,
    ver: Option<Version>,
}

/// Decodes a queued operation (records queued by older builds hold a bare `NsOp`).
fn decode_op(bytes: &[u8]) -> Result<OpRecord, postcard::Error> {
    postcard::from_bytes::<OpRecord>(bytes)
        .or_else(|_| postcard::from_bytes::<NsOp>(bytes).map(|op| OpRecord { op, ver: None }))
}

/// Name prefix of the receiver's intermediate files (hidden by the drive, swept at mount).
pub use crate::apply::TMP_PREFIX;

/// Largest bytes payload of one `Data` message (the Bulk lane's frames are ≤ 64 KiB).
const DATA_PART: usize = 60 * 1024;
/// Records sent ahead of their acknowledgements.
const MAX_INFLIGHT: usize = 1024;
/// Acknowledged records are removed from the durable queue at least this often.
const TRIM_EVERY: u64 = 128;
/// Content transfers with more new bytes than this go beside the stream, so that small changes
/// queued after a large file do not wait for all of it.
const SIDE_MIN_BYTES: u64 = 4 * 1024 * 1024;
/// Side transfers in flight per peer.
const MAX_SIDE: usize = 2;
/// Versions with more chunks than this (files over ~1 GiB) are not kept as "sent" in sled.
const SENT_KEEP_MAX_CHUNKS: usize = 128 * 1024;

/// The receiver reports progress every this many received bytes.
const PROGRESS_EVERY: u64 = 1024 * 1024;

/// Moves an object of the backing folder to the trash (`origin`: the peer whose change
/// removed or replaced it). Installed by the daemon.
/// Arguments: the backing root, where the object is now, the path to record it under (the
/// name it had), and the peer whose change removed it.
pub type TrashFn =
    Arc<dyn Fn(BorrowedFd<'_>, &RelPath, &RelPath, &str) -> io::Result<()> + Send + Sync>;

/// Tells the drive what a peer changed in the backing folder, so it drops cached names,
/// attributes and pages. Must not block.
pub trait Applied: Send + Sync {
    /// `path` now names a new or changed object.
    fn changed(&self, path: &RelPath);
    /// `path` was removed (moved to the trash).
    fn removed(&self, path: &RelPath);
    /// `from` was renamed to `to`.
    fn renamed(&self, from: &RelPath, to: &RelPath);
    /// Asks to patch the file at `path` (inode `ino`) in place: true if no one has it open,
    /// and then new opens wait until [`Applied::ungate`].
    fn gate(&self, _path: &RelPath, _ino: u64) -> bool {
        true
    }
    fn ungate(&self, _ino: u64) {}
    /// Whether the drive has the file at `path` open for writing: a peer's version never
    /// replaces it under its writer (the update is retried once the writer is done, and then
    /// decided against the writer's version).
    fn writing(&self, _path: &RelPath) -> bool {
        false
    }
}

/// Whether this server holds the lock on a name (see [`Replicator::set_held_probe`]).
pub type HeldProbe = Arc<dyn Fn(&RelPath) -> bool + Send + Sync>;

/// The network, as the replicator needs it.
pub trait Transport: Send + Sync {
    /// Queues `msg` for `peer` (Bulk lane when `bulk`, else Control); false if not connected.
    fn send(&self, peer: PeerId, msg: ReplMsg, bulk: bool) -> bool;
}

/// Settings.
#[derive(Clone)]
pub struct Config {
    pub backing: PathBuf,
    /// The state folder (journals of in-place updates live in `state/journal`).
    pub state: PathBuf,
    pub me: PeerId,
    /// This server's own name (conflict copies of its versions carry it).
    pub me_name: String,
    /// Which paths replicate (the start scan skips the others); `None`: all.
    pub filter: Option<Filter>,
    /// Every configured peer and its name.
    pub peers: Vec<(PeerId, String)>,
    /// Apply owners (uid/gid) received from peers (needs root).
    pub owners: bool,
    /// Content bytes a sender may have in flight per transfer before the receiver's progress.
    pub window: u64,
    /// How long a removal of a name this server holds the lock on waits for a save to put a
    /// new file there (Office renames the document away, then a temp onto it).
    pub hold_removes: Duration,
    /// Retries of failed transfers back off up to this.
    pub max_backoff: Duration,
    /// Comparison rounds in a row that may queue something before a comparison that does not
    /// agree pauses ([`RECON_ROUNDS`]).
    pub recon_rounds: u64,
    /// The first such pause; each further one on the connection doubles it, up to 5 minutes
    /// ([`RECON_PAUSE`]).
    pub recon_pause: Duration,
}

/// A change the drive made, as it reports it (after the change succeeded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalChange {
    /// `path` has new content: written (`dirty`: the written ranges, `None` if unknown), or
    /// a file renamed onto it from a name that does not replicate.
    Content {
        path: RelPath,
        dirty: Option<Vec<Range<u64>>>,
        fence: Option<u64>,
    },
    /// Attributes of `path` changed (mode, owner, times, xattrs).
    Meta {
        path: RelPath,
    },
    Mkdir {
        path: RelPath,
    },
    Symlink {
        path: RelPath,
    },
    Link {
        existing: RelPath,
        path: RelPath,
    },
    /// `path` was unlinked, removed or renamed to a name that does not replicate. `held`: this
    /// server holds the name's lock (a save may put a new file there in a moment).
    Remove {
        path: RelPath,
        held: bool,
    },
    Rename {
        from: RelPath,
        to: RelPath,
    },
}

/// Replication counters of one peer, for `status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PeerReplStatus {
    pub name: String,
    pub id: String,
    pub queue: u64,
    pub queue_bytes: u64,
    pub content_bytes_sent: u64,
    pub content_bytes_received: u64,
    pub records_sent: u64,
    pub records_applied: u64,
    pub last_error: Option<String>,
    pub sync: SyncProgress,
}

/// Counters of what this server sent and applied.
#[derive(Default)]
struct Counters {
    content_bytes_sent: AtomicU64,
    content_bytes_received: AtomicU64,
    records_sent: AtomicU64,
    records_applied: AtomicU64,
    /// Records the peer acknowledged (applied or skipped for good).
    records_acked: AtomicU64,
}

/// What the sender does differently when it resends a record after a refusal.
#[derive(Clone, Debug, Default)]
struct Override {
    /// The receiver holds this content (or nothing): delta against it if known, else in full
    /// (and the receiver keeps both if it has another file).
    base: Option<Option<Hash>>,
    /// Send the content of this path instead of the operation.
    as_content: Option<RelPath>,
}

struct Inflight {
    seq: u64,
    done: bool,
    /// For content: the file and the manifest the receiver will hold once it acks.
    acked: Option<(FileId, Hash)>,
}

#[derive(Default)]
struct PeerState {
    connected: bool,
    epoch: u64,
    /// Next queue position to send.
    cursor: u64,
    inflight: VecDeque<Inflight>,
    /// Highest seq acknowledged (every record up to it is applied or skipped).
    acked_upto: Option<u64>,
    /// Highest seq removed from the durable queue (trimming lags acknowledgements a little).
    trimmed_upto: Option<u64>,
    progress: HashMap<u64, u64>,
    overrides: HashMap<u64, Override>,
    backoff: Duration,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    /// Bumped whenever the stream restarts: a transfer in progress stops.
    generation: u64,
    /// Side transfers in flight: seq → the path they write.
    side: HashMap<u64, RelPath>,
    /// Seqs acknowledged beyond `acked_upto` (side transfers finish out of order).
    acked_beyond: std::collections::HashSet<u64>,
    /// The file each content record sent was about (kept across restarts: an ack of a record
    /// sent before a restart still tells which version the peer holds).
    sent_ids: HashMap<u64, FileId>,
    /// Reconciliation with this peer in this connection.
    recon: recon::PeerRecon,
}

struct Peer {
    id: PeerId,
    key: PeerKey,
    name: String,
    state: Mutex<PeerState>,
    wake: Condvar,
    rx: Mutex<Option<mpsc::Sender<Incoming>>>,
    counters: Counters,
}

enum Incoming {
    Msg(ReplMsg),
    Reset,
}

struct Waiter {
    targets: Vec<(usize, u64)>,
    done: Option<Box<dyn FnOnce() + Send>>,
}

struct Inner {
    cfg: Config,
    root: OwnedFd,
    store: Arc<Store>,
    transport: Arc<dyn Transport>,
    peers: Vec<Arc<Peer>>,
    applied: Mutex<Option<Arc<dyn Applied>>>,
    /// Whether this server holds (or lingers) the lock on a name: a removal held back for a
    /// save waits at least that long.
    held_probe: Mutex<Option<HeldProbe>>,
    trash: TrashFn,
    /// Removals held back while a save may put a new file at the name.
    held: Mutex<HashMap<RelPath, Instant>>,
    /// Reconciliation: conflicts made here, the start scan's report.
    recon: recon::Shared,
    /// Held while a peer's change is checked against the backing folder and put in place:
    /// the receivers of different peers never decide on a state another one is replacing.
    apply_lock: Mutex<()>,
    /// The start scan is running: peers are compared and their streams applied only after.
    scanning: AtomicBool,
    /// Peers that connected during the scan.
    pending_connect: Mutex<Vec<PeerId>>,
    waiters: Mutex<Vec<Waiter>>,
    stop: AtomicBool,
}

/// The running replicator. Dropping it does not stop its threads: call [`Replicator::stop`].
#[derive(Clone)]
pub struct Replicator {
    inner: Arc<Inner>,
}

fn key_of(id: &PeerId) -> PeerKey {
    id.0
}

fn err_str(e: &dyn std::fmt::Display) -> String {
    e.to_string()
}

fn ioerr<E: std::fmt::Display>(e: E) -> io::Error {
    io::Error::other(e.to_string())
}

fn path_of_bytes(b: &[u8]) -> Option<RelPath> {
    RelPath::new(b).ok()
}

fn stamp_of(st: &libc::stat) -> ScanStamp {
    ScanStamp {
        size: st.st_size as u64,
        mtime_sec: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec as u32,
        inode: st.st_ino,
    }
}

fn is_kind(st: &libc::stat, kind: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == kind
}

impl Replicator {
    /// Starts the senders and receivers. `trash` moves removed or replaced objects to the trash.
    pub fn start(
        cfg: Config,
        store: Arc<Store>,
        transport: Arc<dyn Transport>,
        trash: TrashFn,
    ) -> io::Result<Replicator> {
        let backing = CString::new(cfg.backing.as_os_str().as_bytes()).map_err(ioerr)?;
        // SAFETY: plain open of a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                backing.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        let root = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let peers = cfg
            .peers
            .iter()
            .map(|(id, name)| {
                Arc::new(Peer {
                    id: *id,
                    key: key_of(id),
                    name: name.clone(),
                    state: Mutex::new(PeerState::default()),
                    wake: Condvar::new(),
                    rx: Mutex::new(None),
                    counters: Counters::default(),
                })
            })
            .collect();
        let inner = Arc::new(Inner {
            cfg,
            root,
            store,
            transport,
            peers,
            applied: Mutex::new(None),
            held_probe: Mutex::new(None),
            trash,
            held: Mutex::new(HashMap::new()),
            recon: recon::Shared::default(),
            apply_lock: Mutex::new(()),
            scanning: AtomicBool::new(true),
            pending_connect: Mutex::new(Vec::new()),
            waiters: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let replayed = crate::patch::replay_all(&inner.journal_dir(), inner.root());
        if replayed > 0 {
            tracing::info!(replayed, "finished in-place updates a crash interrupted");
        }
        sweep_tmp(&inner.cfg.backing);
        // What changed while peerfs was not running, before any peer compares trees with us
        // (in the background: a first scan of a large tree hashes everything; the drive is
        // usable meanwhile, replication with peers starts when it is done).
        {
            let me = inner.clone();
            std::thread::Builder::new()
                .name("repl-scan".into())
                .spawn(move || {
                    me.start_scan();
                    me.scanning.store(false, Ordering::SeqCst);
                    let pending = std::mem::take(&mut *me.pending_connect.lock());
                    for peer in pending {
                        me.connect(peer);
                    }
                })?;
        }
        for (i, p) in inner.peers.iter().enumerate() {
            let me = inner.clone();
            std::thread::Builder::new()
                .name(format!("repl-send-{}", p.name))
                .spawn(move || me.sender(i))?;
            let (tx, rx) = mpsc::channel();
            *p.rx.lock() = Some(tx);
            let me = inner.clone();
            std::thread::Builder::new()
                .name(format!("repl-recv-{}", p.name))
                .spawn(move || me.receiver(i, rx))?;
        }
        let me = inner.clone();
        std::thread::Builder::new()
            .name("repl-held".into())
            .spawn(move || me.held_timer())?;
        Ok(Replicator { inner })
    }

    /// Installs the drive's cache invalidation for remote changes.
    pub fn set_applied(&self, applied: Arc<dyn Applied>) {
        *self.inner.applied.lock() = Some(applied);
    }

    /// Installs the lock probe: a removal held back for a save ships only once this server no
    /// longer holds the name's lock (the save dance is over).
    pub fn set_held_probe(&self, probe: HeldProbe) {
        *self.inner.held_probe.lock() = Some(probe);
    }

    /// Stops the threads (queues stay in sled).
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        for p in &self.inner.peers {
            p.wake.notify_all();
            if let Some(tx) = p.rx.lock().take() {
                drop(tx);
            }
        }
        // Index updates still gathered in memory (or in sled's buffer) are written now: a
        // process that exits after this does not lose what it recorded just before.
        if let Err(e) = self.inner.store.flush() {
            tracing::warn!("replication: cannot flush the index at stop: {e}");
        }
    }

    /// Records a local change for every peer (durably, before returning). Returns the queue
    /// positions to wait for before the change counts as delivered to the connected peers.
    pub fn local(&self, change: LocalChange) -> Vec<(PeerId, u64)> {
        match self.inner.local(change) {
            Ok(t) => t
                .into_iter()
                .map(|(i, s)| (self.inner.peers[i].id, s))
                .collect(),
            // Gone already (created and removed in a moment): the removal's record covers it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::debug!("replication: a changed object vanished before it was recorded");
                Vec::new()
            }
            Err(e) => {
                tracing::error!("replication: cannot record a local change: {e}");
                Vec::new()
            }
        }
    }

    /// Calls `done` once every connected target peer acknowledged its position (or
    /// disconnected, or is failing and backing off).
    pub fn when_delivered(&self, targets: Vec<(PeerId, u64)>, done: Box<dyn FnOnce() + Send>) {
        let targets: Vec<(usize, u64)> = targets
            .into_iter()
            .filter_map(|(id, s)| {
                self.inner
                    .peers
                    .iter()
                    .position(|p| p.id == id)
                    .map(|i| (i, s))
            })
            .collect();
        let w = Waiter {
            targets,
            done: Some(done),
        };
        if self.inner.waiter_done(&w) {
            if let Some(f) = w.done {
                f();
            }
            return;
        }
        self.inner.waiters.lock().push(w);
        // Re-check: an ack may have arrived between the check and the push.
        self.inner.check_waiters();
    }

    /// `peer` connected. Its messages may follow at once: the receiving side forgets the
    /// last connection's partial transfers now, in order with them. During the start scan the
    /// rest (restarting this side's stream, reconciling) waits for the scan to end.
    pub fn peer_connected(&self, peer: PeerId) {
        if let Some((_, p)) = self.inner.peer(peer) {
            if let Some(tx) = p.rx.lock().as_ref() {
                let _ = tx.send(Incoming::Reset);
            }
        }
        {
            let mut pending = self.inner.pending_connect.lock();
            if self.inner.scanning.load(Ordering::SeqCst) {
                if !pending.contains(&peer) {
                    pending.push(peer);
                }
                return;
            }
        }
        self.inner.connect(peer);
    }

    pub fn peer_disconnected(&self, peer: PeerId) {
        self.inner.pending_connect.lock().retain(|p| *p != peer);
        if let Some((_, p)) = self.inner.peer(peer) {
            if let Some(tx) = p.rx.lock().as_ref() {
                let _ = tx.send(Incoming::Reset);
            }
            let mut st = p.state.lock();
            st.connected = false;
            self.inner.restart(&mut st, 0);
            drop(st);
            p.wake.notify_all();
            self.inner.check_waiters();
        }
    }

    /// A replication message from `peer`.
    pub fn on_message(&self, peer: PeerId, msg: ReplMsg) {
        let Some((i, p)) = self.inner.peer(peer) else {
            return;
        };
        match msg {
            ReplMsg::Ack {
                seq,
                epoch,
                outcome,
                holds,
            } => self.inner.on_ack(i, seq, epoch, outcome, holds),
            ReplMsg::Progress { seq, bytes } => {
                let mut st = p.state.lock();
                st.progress.insert(seq, bytes);
                drop(st);
                p.wake.notify_all();
            }
            other => {
                if let Some(tx) = p.rx.lock().as_ref() {
                    let _ = tx.send(Incoming::Msg(other));
                }
            }
        }
    }

    /// Holds off applying peers' changes while the guard lives: for tools (and tests) that
    /// change the backing folder directly and report it with [`Replicator::local`], as the
    /// drive's locks otherwise keep peers' changes and local ones apart.
    pub fn pause_applies(&self) -> ApplyPause<'_> {
        ApplyPause(self.inner.apply_lock.lock())
    }

    /// Conflict copies made here (most recent last).
    pub fn conflicts(&self) -> Vec<ConflictNote> {
        self.inner.conflicts()
    }

    /// Forgets tombstones older than `retention` (a peer away longer than that may bring
    /// back what was deleted: its trash copy is gone too). Returns how many were dropped.
    pub fn expire_tombstones(&self, retention: Duration) -> usize {
        self.inner.expire_tombstones(retention)
    }

    /// The index as recorded: every path's kind and content hash, tombstones included
    /// (diagnostics; tests compare it with the backing tree).
    pub fn index_entries(&self) -> Vec<(Vec<u8>, peerfs_proto::msg::EntryState)> {
        self.inner
            .store
            .cat_all()
            .filter_map(|r| r.ok())
            .map(|(p, e)| (p, e.state))
            .collect()
    }

    /// The sending side of every peer's stream, one line each (diagnostics).
    pub fn stream_states(&self) -> Vec<String> {
        self.inner
            .peers
            .iter()
            .map(|p| {
                let st = p.state.lock();
                format!(
                    "{}: connected {} epoch {} gen {} cursor {} inflight {:?} acked_upto {:?} retry_in {:?} queued {}",
                    p.name,
                    st.connected,
                    st.epoch,
                    st.generation,
                    st.cursor,
                    st.inflight.iter().map(|f| (f.seq, f.done)).collect::<Vec<_>>(),
                    st.acked_upto,
                    st.retry_at.map(|t| t.saturating_duration_since(Instant::now())),
                    self.inner.store.len(&p.key).unwrap_or(0),
                )
            })
            .collect()
    }

    /// What the start scan found.
    pub fn scan_report(&self) -> ScanReport {
        self.inner.scan_report()
    }

    /// Per-peer counters.
    pub fn status(&self) -> Vec<PeerReplStatus> {
        self.inner
            .peers
            .iter()
            .map(|p| {
                let st = p.state.lock();
                let queue = self.inner.store.len(&p.key).unwrap_or(0);
                PeerReplStatus {
                    sync: self.inner.sync_progress(p, &st, queue),
                    name: p.name.clone(),
                    id: p.id.to_string(),
                    queue,
                    queue_bytes: self.inner.store.bytes_pending(&p.key).unwrap_or(0),
                    content_bytes_sent: p.counters.content_bytes_sent.load(Ordering::Relaxed),
                    content_bytes_received: p
                        .counters
                        .content_bytes_received
                        .load(Ordering::Relaxed),
                    records_sent: p.counters.records_sent.load(Ordering::Relaxed),
                    records_applied: p.counters.records_applied.load(Ordering::Relaxed),
                    last_error: st.last_error.clone(),
                }
            })
            .collect()
    }
}

/// Removes intermediate files a crash left behind (top level and one folder down is where
/// receivers create them; deeper ones are found when that folder is next written).
fn sweep_tmp(backing: &Path) {
    fn sweep_dir(dir: &Path, depth: u32) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            if name.as_bytes().starts_with(TMP_PREFIX.as_bytes()) {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    tracing::warn!(path = %e.path().display(), "cannot remove a leftover intermediate file: {err}");
                } else {
                    tracing::info!(path = %e.path().display(), "removed a leftover intermediate file");
                }
            } else if depth > 0 && e.file_type().is_ok_and(|t| t.is_dir()) {
                sweep_dir(&e.path(), depth - 1);
            }
        }
    }
    sweep_dir(backing, 8);
}

// ------------------------------------------------------------------------------------------
// Local changes → queue records.

impl Inner {
    fn peer(&self, id: PeerId) -> Option<(usize, &Arc<Peer>)> {
        self.peers.iter().enumerate().find(|(_, p)| p.id == id)
    }

    fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Starts streaming with `peer` (after the start scan).
    /// The sending side of a connection to `peer` (see [`Replicator::peer_connected`], which
    /// has reset the receiving side).
    fn connect(&self, peer: PeerId) {
        if let Some((_, p)) = self.peer(peer) {
            let mut st = p.state.lock();
            st.connected = true;
            // Acknowledged records still in the queue (trimming lags) are not sent again.
            if let Some(a) = st
                .acked_upto
                .filter(|a| st.trimmed_upto.is_none_or(|t| *a > t))
            {
                st.trimmed_upto = Some(a);
                if let Err(e) = self.store.ack(&p.key, a) {
                    tracing::warn!("replication: cannot trim the queue: {e}");
                }
            }
            // What the peer asked for on an earlier connection may no longer hold.
            st.overrides.clear();
            self.restart(&mut st, 0);
            st.retry_at = None;
            st.backoff = Duration::ZERO;
            self.recon_connected(p, &mut st);
            drop(st);
            p.wake.notify_all();
        }
    }

    fn journal_dir(&self) -> PathBuf {
        self.cfg.state.join("journal")
    }

    /// Appends a record to every peer's queue (one batch, flushed unless `durable` is false);
    /// returns (peer index, seq) of the connected peers.
    fn enqueue_all_with(&self, rec: NewRecord, durable: bool) -> io::Result<Vec<(usize, u64)>> {
        let marks: Vec<(PeerKey, u64)> = self
            .peers
            .iter()
            .map(|p| (p.key, p.state.lock().cursor))
            .collect();
        let seqs = self
            .store
            .enqueue_multi(&marks, rec, durable)
            .map_err(ioerr)?;
        let mut out = Vec::new();
        for ((i, p), seq) in self.peers.iter().enumerate().zip(seqs) {
            let connected = {
                let st = p.state.lock();
                st.connected && st.retry_at.is_none()
            };
            if connected {
                out.push((i, seq));
            }
            p.wake.notify_all();
        }
        Ok(out)
    }

    fn enqueue_all(&self, rec: NewRecord) -> io::Result<Vec<(usize, u64)>> {
        self.enqueue_all_with(rec, true)
    }

    fn enqueue_op(
        &self,
        file: FileId,
        path: &RelPath,
        op: &NsOp,
        ver: Option<Version>,
    ) -> io::Result<Vec<(usize, u64)>> {
        let bytes = postcard::to_stdvec(&OpRecord {
            op: op.clone(),
            ver,
        })
        .map_err(ioerr)?;
        self.enqueue_all(NewRecord {
            file,
            kind: RecordKind::Op(bytes),
            path: path.as_bytes().to_vec(),
            fence: None,
            bytes: 64,
        })
    }

    /// Sends held-back removals of `path`, of paths below it and of its ancestors first, so
    /// that what follows is ordered after them.
    fn flush_held_related(&self, path: &RelPath) -> io::Result<()> {
        let related: Vec<RelPath> = {
            let mut held = self.held.lock();
            let keys: Vec<RelPath> = held
                .keys()
                .filter(|k| k.starts_with(path) || path.starts_with(k))
                .cloned()
                .collect();
            for k in &keys {
                held.remove(k);
            }
            keys
        };
        let many = related.len() > 1;
        for p in related {
            self.enqueue_remove_with(&p, !many)?;
        }
        if many {
            self.store.flush().map_err(ioerr)?;
        }
        Ok(())
    }

    fn enqueue_remove(&self, path: &RelPath) -> io::Result<Vec<(usize, u64)>> {
        self.enqueue_remove_with(path, true)
    }

    fn enqueue_remove_with(&self, path: &RelPath, durable: bool) -> io::Result<Vec<(usize, u64)>> {
        // Forget the path and everything below it (a removed folder).
        let id = self
            .store
            .remove_tree(Path::new(OsStr::from_bytes(path.as_bytes())))
            .map_err(ioerr)?
            .unwrap_or(FileId(0));
        let ver = self.tomb_local(path.as_bytes())?;
        let bytes = postcard::to_stdvec(&OpRecord {
            op: NsOp::Remove { path: path.clone() },
            ver: Some(ver),
        })
        .map_err(ioerr)?;
        self.enqueue_all_with(
            NewRecord {
                file: id,
                kind: RecordKind::Op(bytes),
                path: path.as_bytes().to_vec(),
                fence: None,
                bytes: 64,
            },
            durable,
        )
    }

    fn local(&self, change: LocalChange) -> io::Result<Vec<(usize, u64)>> {
        let p = |r: &RelPath| PathBuf::from(OsStr::from_bytes(r.as_bytes()));
        match change {
            LocalChange::Content { path, dirty, fence } => {
                // A held-back removal of this name merges with the new content: one update.
                self.held.lock().remove(&path);
                self.flush_held_related(&path)?;
                self.local_content(&path, dirty, fence)
            }
            LocalChange::Meta { path } => {
                self.flush_held_related(&path)?;
                self.record_local_meta(path.as_bytes())?;
                let id = self.store.ensure_file_id(&p(&path)).map_err(ioerr)?;
                self.enqueue_all(NewRecord {
                    file: id,
                    kind: RecordKind::Meta,
                    path: path.as_bytes().to_vec(),
                    fence: None,
                    bytes: 128,
                })
            }
            LocalChange::Mkdir { path } => {
                self.flush_held_related(&path)?;
                let id = self.store.ensure_file_id(&p(&path)).map_err(ioerr)?;
                let (st, meta) = self.meta_of(&path)?;
                self.record_local(
                    path.as_bytes(),
                    Kind::Dir,
                    [0; 32],
                    0,
                    st.st_mode & 0o7777,
                    None,
                    now_secs(),
                )?;
                let ver = self.entry(path.as_bytes()).map(|e| e.state.ver);
                self.enqueue_op(
                    id,
                    &path,
                    &NsOp::Mkdir {
                        path: path.clone(),
                        meta,
                    },
                    ver,
                )
            }
            LocalChange::Symlink { path } => {
                self.flush_held_related(&path)?;
                self.local_content(&path, None, None)
            }
            LocalChange::Link { existing, path } => {
                self.flush_held_related(&path)?;
                let id = self.store.ensure_file_id(&p(&path)).map_err(ioerr)?;
                let ver = match self.entry(existing.as_bytes()) {
                    Some(e) if e.state.kind == Kind::File => {
                        let (st, _) = self.meta_of(&path)?;
                        self.record_local(
                            path.as_bytes(),
                            Kind::File,
                            e.state.hash,
                            e.state.size,
                            st.st_mode & 0o7777,
                            Some(stamp_of(&st)),
                            st.st_mtime,
                        )?;
                        self.entry(path.as_bytes()).map(|e| e.state.ver)
                    }
                    _ => None,
                };
                self.enqueue_op(
                    id,
                    &path,
                    &NsOp::Link {
                        existing,
                        path: path.clone(),
                    },
                    ver,
                )
            }
            LocalChange::Remove { path, held } => {
                if held {
                    self.held
                        .lock()
                        .insert(path, Instant::now() + self.cfg.hold_removes);
                    return Ok(Vec::new());
                }
                self.flush_held_related(&path)?;
                self.enqueue_remove(&path)
            }
            LocalChange::Rename { from, to } => {
                self.held.lock().remove(&to);
                self.flush_held_related(&from)?;
                self.flush_held_related(&to)?;
                let id = self.store.rename_path(&p(&from), &p(&to)).map_err(ioerr)?;
                let _ = id;
                let ver = self.rename_local(from.as_bytes(), to.as_bytes())?;
                let file = self.store.ensure_file_id(&p(&to)).map_err(ioerr)?;
                self.enqueue_op(
                    file,
                    &to,
                    &NsOp::Rename {
                        from,
                        to: to.clone(),
                    },
                    ver,
                )
            }
        }
    }

    /// Stat and attributes of the object at `path`.
    fn meta_of(&self, path: &RelPath) -> io::Result<(libc::stat, Meta)> {
        let (dir, name) = open_parent(self.root(), path, false)?;
        let st = lstat_at(dir.as_fd(), &name)?;
        let fd = open_for_meta(dir.as_fd(), &name, &st)?;
        Ok((st, read_meta(&st, fd.as_ref().map(|f| f.as_fd()))))
    }

    fn local_content(
        &self,
        path: &RelPath,
        dirty: Option<Vec<Range<u64>>>,
        fence: Option<u64>,
    ) -> io::Result<Vec<(usize, u64)>> {
        let pb = PathBuf::from(OsStr::from_bytes(path.as_bytes()));
        let (dir, name) = open_parent(self.root(), path, false)?;
        let st = lstat_at(dir.as_fd(), &name)?;
        if is_kind(&st, libc::S_IFDIR) {
            // A folder renamed in from a name that does not replicate: send it whole.
            return self.local_tree(path);
        }
        let id = self.store.ensure_file_id(&pb).map_err(ioerr)?;
        let bytes;
        if is_kind(&st, libc::S_IFREG) {
            let file = File::from(openat2_beneath(
                dir.as_fd(),
                &name,
                libc::O_RDONLY | libc::O_NOFOLLOW,
                0,
            )?);
            let manifest = self.chunk_local(path.as_bytes(), id, &file, &st, dirty.as_deref())?;
            bytes = manifest.size();
        } else if is_kind(&st, libc::S_IFLNK) {
            // Symlinks travel as operations.
            let target = readlinkat(dir.as_fd(), &name)?;
            let meta = read_meta(&st, None);
            self.record_local(
                path.as_bytes(),
                Kind::Symlink,
                *blake3::hash(&target).as_bytes(),
                0,
                st.st_mode & 0o7777,
                None,
                st.st_mtime,
            )?;
            let ver = self.entry(path.as_bytes()).map(|e| e.state.ver);
            return self.enqueue_op(
                id,
                path,
                &NsOp::Symlink {
                    path: path.clone(),
                    target: ByteBuf(target),
                    meta,
                },
                ver,
            );
        } else {
            // Devices, FIFOs and sockets stay local.
            return Ok(Vec::new());
        }
        self.enqueue_all(NewRecord {
            file: id,
            kind: RecordKind::Content,
            path: path.as_bytes().to_vec(),
            fence,
            bytes,
        })
    }

    /// Enqueues a folder and everything below it (a folder renamed in from an excluded name).
    fn local_tree(&self, path: &RelPath) -> io::Result<Vec<(usize, u64)>> {
        let mut out = self.local(LocalChange::Mkdir { path: path.clone() })?;
        let dir = open_dir(self.root(), path, false)?;
        let rd = openat2_beneath(dir.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let names = read_dir_names(rd)?;
        for n in names {
            let Ok(child) = path.join(&n) else { continue };
            if n.as_bytes().starts_with(TMP_PREFIX.as_bytes()) {
                continue;
            }
            let t = self.local(LocalChange::Content {
                path: child,
                dirty: None,
                fence: None,
            })?;
            out.extend(t);
        }
        Ok(out)
    }

    /// The manifest of the file's current content: re-chunked around `dirty` from the stored
    /// manifest when the drive tracked the writes, in full otherwise; stored with its stamp.
    fn chunk_local(
        &self,
        path: &[u8],
        id: FileId,
        file: &File,
        st: &libc::stat,
        dirty: Option<&[Range<u64>]>,
    ) -> io::Result<Manifest> {
        let old = self
            .store
            .manifest(id)
            .ok()
            .flatten()
            .and_then(|b| Manifest::decode(&b).ok());
        let manifest = match (old, dirty) {
            (Some(old), Some(dirty)) => manifest::rechunk(&old, file, dirty)?,
            _ => Manifest::from_file(file, st.st_size as u64)?,
        };
        self.record_content(id, &manifest, stamp_of(st))?;
        // The index follows: a new content is a new version made here.
        self.record_local(
            path,
            Kind::File,
            *manifest.content_hash(),
            manifest.size(),
            st.st_mode & 0o7777,
            Some(stamp_of(st)),
            st.st_mtime,
        )?;
        if manifest.chunks().len() > TRIM_CHUNKS {
            trim_heap();
        }
        Ok(manifest)
    }

    fn record_content(&self, id: FileId, m: &Manifest, stamp: ScanStamp) -> io::Result<()> {
        let version = crate::store::ContentVersion {
            vv: Default::default(),
            hash: *m.content_hash(),
            size: m.size(),
        };
        self.store
            .set_content(id, &version, &m.encode(), stamp, !one_chunk(m))
            .map_err(ioerr)
    }

    /// The manifest stored for `id`, if the file still has the stamp it was stored with.
    fn stored_manifest(&self, id: FileId, st: &libc::stat) -> Option<Manifest> {
        self.store
            .file_state(id)
            .ok()
            .flatten()
            .filter(|s| s.stamp == Some(stamp_of(st)))
            .and_then(|_| self.store.manifest(id).ok().flatten())
            .and_then(|b| Manifest::decode(&b).ok())
    }

    fn held_timer(self: Arc<Self>) {
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            let now = Instant::now();
            let probe = self.held_probe.lock().clone();
            let due: Vec<RelPath> = {
                let mut held = self.held.lock();
                let due: Vec<RelPath> = held
                    .iter()
                    .filter(|(_, t)| **t <= now)
                    .map(|(p, _)| p.clone())
                    .collect();
                let mut out = Vec::new();
                for p in due {
                    if probe.as_ref().is_some_and(|f| f(&p)) {
                        // Still locked here: the save may yet put a file there.
                        held.insert(p, now + Duration::from_millis(200));
                    } else {
                        held.remove(&p);
                        out.push(p);
                    }
                }
                out
            };
            for p in due {
                if let Err(e) = self.enqueue_remove(&p) {
                    tracing::error!(path = %p, "replication: cannot record a removal: {e}");
                }
            }
        }
    }
}

fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: valid buffer and name.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn read_dir_names(fd: OwnedFd) -> io::Result<Vec<OsString>> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let mut out = Vec::new();
    for e in std::fs::read_dir(path)? {
        out.push(e?.file_name());
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// Sending.

/// What sending a record did.
enum Sent {
    /// Sent in the stream (for content, what the peer holds once it acks is registered in the
    /// in-flight entry before the End goes out).
    Record,
    /// Begun beside the stream: the job streams the rest from its own thread.
    Side(SideJob, (FileId, Hash)),
}

/// The rest of a side transfer (after its Begin).
struct SideJob {
    seq: u64,
    generation: u64,
    file: File,
    new: Manifest,
    delta: Delta,
}

/// Why a transfer stopped early.
enum Stop {
    /// The stream restarted (disconnect, refusal): the record is resent later.
    Restarted,
    /// Reading or sending failed: retry with backoff, reported in `status`.
    Io(io::Error),
    /// A local writer changed the file while it was being sent: send its newer version in a
    /// moment (no backoff, nothing to report).
    Changed,
}

impl Inner {
    fn restart(&self, st: &mut PeerState, at: u64) {
        st.epoch += 1;
        st.generation += 1;
        st.cursor = at;
        st.inflight.clear();
        st.progress.clear();
        st.side.clear();
        st.acked_beyond.clear();
    }

    fn sender(self: Arc<Self>, i: usize) {
        let p = self.peers[i].clone();
        loop {
            // Wait for something to send.
            let (epoch, generation, cursor) = {
                let mut st = p.state.lock();
                loop {
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Some(t) = st.retry_at {
                        if Instant::now() >= t {
                            st.retry_at = None;
                        }
                    }
                    if st.connected && st.retry_at.is_none() && st.inflight.len() < MAX_INFLIGHT {
                        break;
                    }
                    let wait = st
                        .retry_at
                        .map(|t| t.saturating_duration_since(Instant::now()))
                        .unwrap_or(Duration::from_secs(1))
                        .max(Duration::from_millis(5));
                    p.wake.wait_for(&mut st, wait);
                }
                (st.epoch, st.generation, st.cursor)
            };
            let recs = match self.store.peek_from(&p.key, cursor, 1) {
                Ok(r) => r,
                Err(crate::store::StoreError::QueueRecord { seq, source }) => {
                    tracing::error!(peer = %p.name, seq, "replication: skipping an unreadable queue record: {source}");
                    let _ = self.store.ack(&p.key, seq);
                    continue;
                }
                Err(e) => {
                    tracing::error!(peer = %p.name, "replication: queue unreadable: {e}");
                    self.backoff(&p, format!("queue unreadable: {e}"));
                    continue;
                }
            };
            let Some(rec) = recs.into_iter().next() else {
                // Nothing queued: compare trees if due, then sleep until woken.
                self.maybe_summary(&p);
                let mut st = p.state.lock();
                if st.generation == generation && st.cursor == cursor {
                    let wait = Self::idle_wait(&st);
                    p.wake.wait_for(&mut st, wait);
                }
                continue;
            };
            // A record touching the path of a side transfer still in flight waits for it.
            let paths = Self::record_paths(&rec);
            {
                let mut st = p.state.lock();
                while st.generation == generation
                    && !self.stop.load(Ordering::SeqCst)
                    && st.side.values().any(|sp| {
                        paths
                            .iter()
                            .any(|rp| rp.starts_with(sp) || sp.starts_with(rp))
                    })
                {
                    p.wake.wait_for(&mut st, Duration::from_millis(200));
                }
                if st.generation != generation {
                    continue;
                }
            }
            // Registered before anything is sent: the ack may come back at once.
            let ov = {
                let mut st = p.state.lock();
                if st.generation != generation {
                    continue;
                }
                st.cursor = rec.seq + 1;
                st.inflight.push_back(Inflight {
                    seq: rec.seq,
                    done: false,
                    acked: None,
                });
                // Kept until the record is acknowledged: a record refused twice for different
                // reasons (a rename whose source is missing, then a base the peer lacks) needs
                // both answers (taking them one at a time made the two alternate for ever).
                st.overrides.get(&rec.seq).cloned()
            };
            let result = self.send_record(&p, epoch, generation, &rec, ov);
            let mut st = p.state.lock();
            if st.generation != generation {
                continue;
            }
            match result {
                Ok(sent) => {
                    p.counters.records_sent.fetch_add(1, Ordering::Relaxed);
                    if let Sent::Side(job, acked) = sent {
                        if let Some(f) = st.inflight.iter_mut().find(|f| f.seq == rec.seq) {
                            f.acked = Some(acked);
                        }
                        st.sent_ids.insert(rec.seq, acked.0);
                        let (me, peer) = (self.clone(), p.clone());
                        if let Err(e) = std::thread::Builder::new()
                            .name(format!("repl-side-{}", p.name))
                            .spawn(move || me.run_side(peer, job))
                        {
                            tracing::error!("cannot start a transfer thread: {e}; retrying");
                            let at = rec.seq;
                            self.restart(&mut st, at);
                        }
                    }
                }
                Err(Stop::Restarted) => {}
                Err(Stop::Changed) => {
                    drop(st);
                    tracing::debug!(peer = %p.name, seq = rec.seq, "replication: the file changed while being sent; sending it again");
                    self.retry_soon(&p);
                }
                Err(Stop::Io(e)) => {
                    drop(st);
                    tracing::warn!(peer = %p.name, seq = rec.seq, "replication: cannot send: {e}; retrying");
                    self.backoff(
                        &p,
                        format!("sending {}: {e}", String::from_utf8_lossy(&rec.path)),
                    );
                }
            }
        }
    }

    /// Restarts the stream at the oldest unacknowledged record after a short pause.
    fn retry_soon(&self, p: &Peer) {
        let mut st = p.state.lock();
        st.retry_at = Some(Instant::now() + Duration::from_millis(50));
        let at = st.inflight.front().map_or(st.cursor, |f| f.seq);
        self.restart(&mut st, at);
    }

    fn backoff(&self, p: &Peer, error: String) {
        let mut st = p.state.lock();
        st.backoff = (st.backoff * 2)
            .max(Duration::from_millis(200))
            .min(self.cfg.max_backoff);
        st.retry_at = Some(Instant::now() + st.backoff);
        st.last_error = Some(error);
        let at = st.inflight.front().map_or(st.cursor, |f| f.seq);
        self.restart(&mut st, at);
        drop(st);
        self.check_waiters();
    }

    /// A record with nothing left to send (its file is gone, or it cannot be applied): a
    /// no-op in its place keeps the peer's acknowledgements in order.
    fn send_noop(&self, p: &Peer, epoch: u64, seq: u64) -> Result<(), Stop> {
        let op = NsOp::Remove {
            path: RelPath::root(),
        };
        self.send(
            p,
            ReplMsg::Op {
                epoch,
                seq,
                op,
                ver: None,
            },
            true,
        )
    }

    /// The version a queued rename or link is sent with. Like content, it is the file's
    /// current one when the file is still where the operation put it: the stream may already
    /// have brought the peer a later content of the file under its old name (records send
    /// current content), and the operation must cover that content too (its history names it).
    fn op_version(&self, file: FileId, op: &NsOp, stored: Option<Version>) -> Option<Version> {
        let target = match op {
            NsOp::Rename { to, .. } => to,
            NsOp::Link { path, .. } => path,
            _ => return stored,
        };
        let here = self
            .store
            .path_of(file)
            .ok()
            .flatten()
            .is_some_and(|p| p.as_os_str().as_bytes() == target.as_bytes());
        let current = self
            .entry(target.as_bytes())
            .filter(|e| here && e.state.kind != Kind::Gone);
        // Changed after the rename: that content goes by its own record (not under the old
        // name, see `send_record`), and the rename keeps the version it made. The current
        // one carries later clocks: the tombstone it leaves at the source would look newer
        // than a file renamed there afterwards.
        let changed_since = |e: &crate::store::CatEntry, s: &Version| {
            matches!(e.state.kind, Kind::File | Kind::Symlink)
                && matches!(op, NsOp::Rename { .. })
                && s.history.first().is_some_and(|h| *h != e.state.hash)
        };
        match (current, stored) {
            (Some(e), Some(s)) if changed_since(&e, &s) => Some(s),
            (Some(e), stored) => {
                let mut v = e.state.ver;
                if matches!(e.state.kind, Kind::File | Kind::Symlink) {
                    v.history = crate::catalog::push_history(&v.history, e.state.hash);
                }
                if let Some(s) = &stored {
                    v.vv = crate::catalog::merge(&v.vv, &s.vv);
                    for h in s.history.iter().rev() {
                        if !v.history.contains(h)
                            && v.history.len() < peerfs_proto::msg::MAX_HISTORY
                        {
                            v.history.push(*h);
                        }
                    }
                }
                Some(v)
            }
            (None, stored) => stored,
        }
    }

    /// The version of the object at `path` here, as the index has it.
    fn ver_of(&self, path: &RelPath) -> Option<Version> {
        self.entry(path.as_bytes())
            .filter(|e| e.state.kind != Kind::Gone)
            .map(|e| e.state.ver)
    }

    fn send(&self, p: &Peer, msg: ReplMsg, bulk: bool) -> Result<(), Stop> {
        if self.transport.send(p.id, msg, bulk) {
            Ok(())
        } else {
            Err(Stop::Restarted)
        }
    }

    /// Sends one record. `Ok(Some(Some(..)))`: a content transfer whose manifest the peer holds
    /// once it acks; `Ok(Some(None))`/`Ok(None)`: an operation (acked like any record).
    fn send_record(
        &self,
        p: &Peer,
        epoch: u64,
        generation: u64,
        rec: &QueueRecord,
        ov: Option<Override>,
    ) -> Result<Sent, Stop> {
        let seq = rec.seq;
        let Some(mut path) = path_of_bytes(&rec.path) else {
            // Unrepresentable path: nothing a peer could apply. Send a no-op so acks stay in order.
            tracing::error!(peer = %p.name, seq, "replication: skipping a record with an invalid path");
            self.send_noop(p, epoch, seq)?;
            return Ok(Sent::Record);
        };
        let ov = ov.unwrap_or_default();
        if let Some(path) = ov.as_content {
            let id = self
                .store
                .file_id(Path::new(OsStr::from_bytes(path.as_bytes())))
                .ok()
                .flatten()
                .unwrap_or(FileId(0));
            return self.send_content(
                p, epoch, generation, seq, id, &path, &path, ov.base, rec.fence,
            );
        }
        let (kind, base_override) = (rec.kind.clone(), ov.base);
        match kind {
            RecordKind::Op(bytes) => {
                let OpRecord { op, ver } = decode_op(&bytes).map_err(|e| Stop::Io(ioerr(e)))?;
                let ver = self.op_version(rec.file, &op, ver);
                self.send(
                    p,
                    ReplMsg::Op {
                        epoch,
                        seq,
                        op,
                        ver: ver.map(Box::new),
                    },
                    true,
                )?;
                Ok(Sent::Record)
            }
            RecordKind::Meta => {
                let current = self.store.path_of(rec.file).ok().flatten();
                let meta = current
                    .as_deref()
                    .and_then(|c| RelPath::new(c.as_os_str().as_bytes()).ok())
                    .and_then(|c| self.meta_of(&c).ok());
                match meta {
                    Some((_, meta)) => {
                        let ver = current
                            .as_deref()
                            .and_then(|c| RelPath::new(c.as_os_str().as_bytes()).ok())
                            .and_then(|c| self.ver_of(&c));
                        self.send(
                            p,
                            ReplMsg::Op {
                                epoch,
                                seq,
                                op: NsOp::SetMeta { path, meta },
                                ver: ver.map(Box::new),
                            },
                            true,
                        )?
                    }
                    // Gone since: a later record removes or renames it.
                    None => self.send_noop(p, epoch, seq)?,
                }
                Ok(Sent::Record)
            }
            RecordKind::Content => {
                let current = self.store.path_of(rec.file).ok().flatten();
                let Some(current) =
                    current.and_then(|c| RelPath::new(c.as_os_str().as_bytes()).ok())
                else {
                    // Removed since: a later record removes it on the peer too.
                    self.send_noop(p, epoch, seq)?;
                    return Ok(Sent::Record);
                };
                // The file moved since this record was queued. If a later record of the queue
                // renames the record's name, that rename brings the peer up to date (it moves
                // what the peer has, and asks for the content when that is not the renamer's);
                // the file's current content must not go under the old name: its version
                // would stand at a name where another file may live now, and beat that file's
                // versions. Otherwise (the rename was recorded before this change, e.g. a
                // writer released after renaming) the peer knows the file by its current name.
                if current != path {
                    if self.renamed_later(p, seq, &path) {
                        self.send_noop(p, epoch, seq)?;
                        return Ok(Sent::Record);
                    }
                    path = current.clone();
                }
                self.send_content(
                    p,
                    epoch,
                    generation,
                    seq,
                    rec.file,
                    &path,
                    &current,
                    base_override,
                    rec.fence,
                )
            }
        }
    }

    /// Whether a record of `p`'s queue after `seq` renames `path` (or a folder above it).
    fn renamed_later(&self, p: &Peer, seq: u64, path: &RelPath) -> bool {
        let Ok(later) = self.store.peek_from(&p.key, seq + 1, 4096) else {
            return true;
        };
        later.iter().any(|r| match &r.kind {
            RecordKind::Op(bytes) => matches!(
                decode_op(bytes),
                Ok(OpRecord { op: NsOp::Rename { from, .. }, .. }) if path.starts_with(&from)
            ),
            _ => false,
        })
    }

    /// Streams the content of the file now at `current` to the peer's `path`.
    #[allow(clippy::too_many_arguments)]
    fn send_content(
        &self,
        p: &Peer,
        epoch: u64,
        generation: u64,
        seq: u64,
        id: FileId,
        path: &RelPath,
        current: &RelPath,
        base_override: Option<Option<Hash>>,
        // The lock's fencing token of the change: no longer sent (versions decide conflicts).
        _fence: Option<u64>,
    ) -> Result<Sent, Stop> {
        let opened = open_parent(self.root(), current, false).and_then(|(dir, name)| {
            let st = lstat_at(dir.as_fd(), &name)?;
            Ok((dir, name, st))
        });
        let (dir, name, st) = match opened {
            Ok(x) => x,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                self.send_noop(p, epoch, seq)?;
                return Ok(Sent::Record);
            }
            Err(e) => return Err(Stop::Io(e)),
        };
        if is_kind(&st, libc::S_IFDIR) {
            let meta = self.meta_of(current).map(|(_, m)| m).unwrap_or_default();
            self.send(
                p,
                ReplMsg::Op {
                    epoch,
                    seq,
                    op: NsOp::Mkdir {
                        path: path.clone(),
                        meta,
                    },
                    ver: self.ver_of(current).map(Box::new),
                },
                true,
            )?;
            return Ok(Sent::Record);
        }
        if is_kind(&st, libc::S_IFLNK) {
            let target = readlinkat(dir.as_fd(), &name).map_err(Stop::Io)?;
            let meta = read_meta(&st, None);
            self.send(
                p,
                ReplMsg::Op {
                    epoch,
                    seq,
                    op: NsOp::Symlink {
                        path: path.clone(),
                        target: ByteBuf(target),
                        meta,
                    },
                    ver: self.ver_of(current).map(Box::new),
                },
                true,
            )?;
            return Ok(Sent::Record);
        }
        if !is_kind(&st, libc::S_IFREG) {
            self.send_noop(p, epoch, seq)?;
            return Ok(Sent::Record);
        }
        let file = File::from(
            openat2_beneath(dir.as_fd(), &name, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
                .map_err(Stop::Io)?,
        );
        // What was opened (the name may have been replaced since the lstat).
        let st = fstat(&file).map_err(Stop::Io)?;
        let id = if id.0 == 0 {
            self.store
                .ensure_file_id(Path::new(OsStr::from_bytes(current.as_bytes())))
                .map_err(|e| Stop::Io(ioerr(e)))?
        } else {
            id
        };
        // Chunked afresh when the stored manifest no longer describes the file; what that
        // content is (a version this server knows, or a change made here that the index
        // missed) is for `content_version` to say, under the apply lock.
        let (new, fresh) = match self.stored_manifest(id, &st) {
            Some(m) => (m, false),
            None => (
                Manifest::from_file(&file, st.st_size as u64).map_err(Stop::Io)?,
                true,
            ),
        };
        let meta = read_meta(&st, Some(file.as_fd()));
        let ver = self.content_version(current, id, &dir, &name, &st, &new, fresh)?;

        // The version the peer holds: what it acked last, else the version before this one.
        // (Decoded one at a time: a 4 GiB file's manifest is ~25 MB.)
        let decode = |b: Option<Vec<u8>>| b.and_then(|b| Manifest::decode(&b).ok());
        let acked = || decode(self.store.acked_manifest(&p.key, id).ok().flatten());
        let sent = |h: &Hash| decode(self.store.sent_manifest(&p.key, id, h).ok().flatten());
        let prev = || decode(self.store.prev_manifest(id).ok().flatten());
        let base: Option<Manifest> = match base_override {
            Some(None) => None,
            Some(Some(h)) if h == *new.content_hash() => Some(new.clone()),
            Some(Some(h)) => acked()
                .filter(|m| *m.content_hash() == h)
                .or_else(|| sent(&h).filter(|m| *m.content_hash() == h))
                .or_else(|| prev().filter(|m| *m.content_hash() == h))
                .or_else(|| {
                    // Any version this server knows by that hash (e.g. the file a rename here
                    // replaced): the peer holds it, so it is a valid base.
                    self.store
                        .manifests_for_hash(&h)
                        .ok()?
                        .iter()
                        .filter_map(|b| Manifest::decode(b).ok())
                        .find(|m| *m.content_hash() == h)
                }),
            None => acked().or_else(prev),
        };
        let checked = matches!(base_override, Some(Some(_))) && base.is_none();
        // Remember what is sent (medium files: their manifests are cheap to keep; a multi-GiB
        // file's is tens of MB, and its ack is matched against the current or previous version
        // instead). A file of one chunk is not remembered at all: what the peer holds of it
        // makes no delta smaller, and the version before the current one is the base then
        // (a peer holding another says so, and is answered against that one).
        let remember = !one_chunk(&new);
        if remember && new.chunks().len() <= SENT_KEEP_MAX_CHUNKS {
            if let Err(e) =
                self.store
                    .set_sent_manifest(&p.key, id, seq, new.content_hash(), &new.encode())
            {
                return Err(Stop::Io(ioerr(e)));
            }
        }
        let delta = match &base {
            Some(b) => Delta::compute(b, &new),
            None => Delta::compute(&Manifest::empty(), &new),
        };
        let new_bytes: u64 = delta
            .ops
            .iter()
            .map(|op| match op {
                Op::Data { len, .. } => u64::from(*len),
                Op::Copy { .. } => 0,
            })
            .sum();
        let side = new_bytes >= SIDE_MIN_BYTES && {
            let mut st = p.state.lock();
            if st.generation == generation && st.side.len() < MAX_SIDE {
                st.side.insert(seq, path.clone());
                true
            } else {
                false
            }
        };
        let same = base
            .as_ref()
            .is_some_and(|b| b.content_hash() == new.content_hash());
        let hash = *new.content_hash();
        // A small version whose every byte travels goes whole in its Begin (one message
        // instead of three); the Begin then makes the peer answer, so what it will hold is
        // recorded first.
        let inline = if !side
            && !same
            && new.size() <= MAX_INLINE as u64
            && meta
                .xattrs
                .iter()
                .map(|(n, v)| n.0.len() + v.0.len())
                .sum::<usize>()
                <= INLINE_MAX_XATTRS
            && delta.ops.iter().all(|op| matches!(op, Op::Data { .. }))
        {
            let bytes = read_verified(&file, &new)?;
            p.counters
                .content_bytes_sent
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.holds_once_acked(p, seq, id, hash, remember);
            Some(ByteBuf(bytes))
        } else {
            None
        };
        let whole = inline.is_some();
        self.send(
            p,
            ReplMsg::Begin {
                epoch,
                seq,
                path: path.clone(),
                base: base.as_ref().map(|b| *b.content_hash()),
                size: new.size(),
                content_hash: *new.content_hash(),
                meta,
                aligned: aligned(&delta),
                checked,
                side,
                ver: Some(Box::new(ver)),
                inline,
            },
            true,
        )?;
        if whole {
            return Ok(Sent::Record);
        }
        if side {
            return Ok(Sent::Side(
                SideJob {
                    seq,
                    generation,
                    file,
                    new,
                    delta,
                },
                (id, hash),
            ));
        }
        if !same {
            self.stream_ops(p, generation, seq, &file, &new, &delta)?;
        }
        // What the peer holds once it acks, recorded before the End that makes it ack.
        self.holds_once_acked(p, seq, id, hash, remember);
        self.send(p, ReplMsg::End { seq }, true)?;
        if new.chunks().len() > TRIM_CHUNKS {
            drop((new, delta, base));
            trim_heap();
        }
        Ok(Sent::Record)
    }

    /// The version of content `new` read from the file at `current` (of id `id`; `fresh`: just
    /// chunked, the stored manifest described another content). The index says which version
    /// it is; when it names another content, it is looked at again under the apply lock (a
    /// receiver may have been halfway through replacing or moving the file): a file that
    /// changed meanwhile is sent again in a moment; one that did not is a change made here that
    /// the index missed (e.g. behind the drive's back), recorded now as a local version. Only
    /// then: content a receiver put at the name is the version it received, never one of ours.
    /// Content never goes out without its version: a receiver would have to guess.
    #[allow(clippy::too_many_arguments)]
    fn content_version(
        &self,
        current: &RelPath,
        id: FileId,
        dir: &OwnedFd,
        name: &CStr,
        st: &libc::stat,
        new: &Manifest,
        fresh: bool,
    ) -> Result<Version, Stop> {
        let matching = || {
            self.entry(current.as_bytes())
                .filter(|e| e.state.kind == Kind::File && e.state.hash == *new.content_hash())
                .map(|e| e.state.ver)
        };
        if !fresh {
            if let Some(v) = matching() {
                return Ok(v);
            }
        }
        let _applying = self.apply_lock.lock();
        let unchanged = lstat_at(dir.as_fd(), name).is_ok_and(|now| stamp_of(&now) == stamp_of(st));
        let ours = || {
            self.store
                .file_id(Path::new(OsStr::from_bytes(current.as_bytes())))
                .ok()
                .flatten()
                == Some(id)
        };
        if fresh && unchanged && ours() {
            // The manifest describes the file at this stamp: stored, so the next send (and a
            // delta against it) needs no chunking.
            self.record_content(id, new, stamp_of(st))
                .map_err(Stop::Io)?;
        }
        if let Some(v) = matching() {
            return Ok(v);
        }
        if !unchanged {
            return Err(Stop::Changed);
        }
        self.record_local(
            current.as_bytes(),
            Kind::File,
            *new.content_hash(),
            new.size(),
            st.st_mode & 0o7777,
            Some(stamp_of(st)),
            st.st_mtime,
        )
        .map_err(Stop::Io)?;
        matching().ok_or(Stop::Changed)
    }

    /// Streams a side transfer's pieces and its End (on its own thread).
    fn run_side(self: Arc<Self>, p: Arc<Peer>, job: SideJob) {
        let r = self
            .stream_ops(&p, job.generation, job.seq, &job.file, &job.new, &job.delta)
            .and_then(|()| self.send(&p, ReplMsg::End { seq: job.seq }, true));
        let big = job.new.chunks().len() > TRIM_CHUNKS;
        drop(job.new);
        drop(job.delta);
        if big {
            trim_heap();
        }
        match r {
            Ok(()) | Err(Stop::Restarted) => {}
            Err(Stop::Changed) => {
                if p.state.lock().generation == job.generation {
                    self.retry_soon(&p);
                }
            }
            Err(Stop::Io(e)) => {
                let current = p.state.lock().generation == job.generation;
                if current {
                    tracing::warn!(peer = %p.name, seq = job.seq, "replication: cannot send: {e}; retrying");
                    self.backoff(&p, format!("sending a large file: {e}"));
                }
            }
        }
        p.wake.notify_all();
    }

    /// Paths a record touches (for ordering against side transfers).
    fn record_paths(rec: &QueueRecord) -> Vec<RelPath> {
        let mut out: Vec<RelPath> = path_of_bytes(&rec.path).into_iter().collect();
        if let RecordKind::Op(bytes) = &rec.kind {
            if let Ok(OpRecord { op, .. }) = decode_op(bytes) {
                match op {
                    NsOp::Rename { from, to } => out.extend([from, to]),
                    NsOp::Link { existing, path } => out.extend([existing, path]),
                    NsOp::Mkdir { path, .. }
                    | NsOp::Symlink { path, .. }
                    | NsOp::Remove { path }
                    | NsOp::SetMeta { path, .. } => out.push(path),
                }
            }
        }
        out
    }

    /// Records that `p` holds version `hash` of `id` once it acknowledges record `seq`
    /// (`remember`: the version sent is kept for the acknowledgement, see `send_content`).
    fn holds_once_acked(&self, p: &Peer, seq: u64, id: FileId, hash: Hash, remember: bool) {
        let mut st = p.state.lock();
        if let Some(f) = st.inflight.iter_mut().find(|f| f.seq == seq) {
            f.acked = Some((id, hash));
        }
        if remember {
            st.sent_ids.insert(seq, id);
        }
    }

    fn stream_ops(
        &self,
        p: &Peer,
        generation: u64,
        seq: u64,
        file: &File,
        new: &Manifest,
        delta: &Delta,
    ) -> Result<(), Stop> {
        let chunks = new.chunks();
        let mut ci = 0usize;
        let mut sent: u64 = 0;
        let largest = delta.ops.iter().map(|op| match op {
            Op::Data { len, .. } => *len as usize,
            Op::Copy { .. } => 0,
        });
        let mut buf = vec![0u8; largest.max().unwrap_or(0)];
        for op in &delta.ops {
            match op {
                Op::Copy { from_offset, len } => {
                    // Advance over the new chunks this copy covers.
                    let mut covered = 0u64;
                    while covered < *len && ci < chunks.len() {
                        covered += u64::from(chunks[ci].len);
                        ci += 1;
                    }
                    self.send(
                        p,
                        ReplMsg::Copy {
                            seq,
                            from_offset: *from_offset,
                            len: *len,
                        },
                        true,
                    )?;
                }
                Op::Data { hash, len } => {
                    let Some(c) = chunks.get(ci) else {
                        return Err(Stop::Io(ioerr("delta and manifest disagree")));
                    };
                    ci += 1;
                    let n = *len as usize;
                    let b = &mut buf[..n];
                    file.read_exact_at(b, c.offset).map_err(|e| {
                        if e.kind() == io::ErrorKind::UnexpectedEof {
                            Stop::Changed
                        } else {
                            Stop::Io(e)
                        }
                    })?;
                    if hash_bytes(b) != *hash {
                        return Err(Stop::Changed);
                    }
                    // Flow control: wait for the receiver to catch up.
                    self.wait_window(p, generation, seq, sent)?;
                    let mut at = 0;
                    while at < n {
                        let end = (at + DATA_PART).min(n);
                        let last = end == n;
                        self.send(
                            p,
                            ReplMsg::Data {
                                seq,
                                hash: last.then_some(*hash),
                                bytes: ByteBuf(b[at..end].to_vec()),
                            },
                            true,
                        )?;
                        at = end;
                    }
                    sent += n as u64;
                    p.counters
                        .content_bytes_sent
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    fn wait_window(&self, p: &Peer, generation: u64, seq: u64, sent: u64) -> Result<(), Stop> {
        let mut st = p.state.lock();
        loop {
            if st.generation != generation || self.stop.load(Ordering::SeqCst) {
                return Err(Stop::Restarted);
            }
            let done = st.progress.get(&seq).copied().unwrap_or(0);
            if sent.saturating_sub(done) < self.cfg.window {
                return Ok(());
            }
            p.wake.wait_for(&mut st, Duration::from_millis(200));
        }
    }

    fn on_ack(&self, i: usize, seq: u64, epoch: u64, outcome: AckOutcome, holds: Option<Hash>) {
        let p = &self.peers[i];
        // The version the peer now holds, even for a record sent before a restart.
        if let (AckOutcome::Applied, Some(h)) = (&outcome, holds) {
            let id = p.state.lock().sent_ids.get(&seq).copied();
            if let Some(id) = id {
                match self.store.promote_sent(&p.key, id, &h) {
                    Ok(true) => {}
                    Ok(false) => self.promote_current(&p.key, id, &h),
                    Err(e) => {
                        tracing::warn!("replication: cannot record an acknowledgement: {e}")
                    }
                }
            }
        }
        let mut st = p.state.lock();
        if epoch != st.epoch {
            // An answer of an earlier stream: the record was sent again since (or will be),
            // and that sending gets its own answer.
            tracing::trace!(peer = %p.name, seq, epoch, current = st.epoch, ?outcome, "replication: an answer of an earlier stream; ignored");
            return;
        }
        let Some(pos) = st.inflight.iter().position(|f| f.seq == seq) else {
            tracing::trace!(peer = %p.name, seq, ?outcome, "replication: an answer for a record not in flight; ignored");
            return;
        };
        match outcome {
            AckOutcome::Applied => {
                p.counters.records_acked.fetch_add(1, Ordering::Relaxed);
                st.overrides.remove(&seq);
                st.inflight[pos].done = true;
                st.acked_beyond.insert(seq);
                st.side.remove(&seq);
                st.backoff = Duration::ZERO;
                st.last_error = None;
            }
            AckOutcome::Failed {
                error,
                retry: false,
            } => {
                // Said as the peer's, with the path: it is the peer's disk, or its refusal.
                let error = format!("{} refused {}: {error}", p.name, self.record_path(p, seq));
                tracing::error!(peer = %p.name, seq, "replication: the peer refused a change for good: {error}");
                // What the change would have brought is compared again once things are quiet.
                st.recon.compare_soon();
                st.overrides.remove(&seq);
                st.last_error = Some(error);
                st.inflight[pos].done = true;
                st.inflight[pos].acked = None;
                st.acked_beyond.insert(seq);
                st.side.remove(&seq);
            }
            AckOutcome::Failed { error, retry: true } => {
                let error = format!(
                    "{} could not apply {}: {error}",
                    p.name,
                    self.record_path(p, seq)
                );
                tracing::warn!(peer = %p.name, seq, "replication: {error}; retrying");
                st.backoff = (st.backoff * 2)
                    .max(Duration::from_millis(200))
                    .min(self.cfg.max_backoff);
                st.retry_at = Some(Instant::now() + st.backoff);
                st.last_error = Some(error);
                self.restart(&mut st, seq);
                drop(st);
                p.wake.notify_all();
                self.check_waiters();
                return;
            }
            AckOutcome::BaseMismatch { have } => {
                tracing::info!(peer = %p.name, seq, "replication: the peer holds another version; resending against it");
                st.overrides.entry(seq).or_default().base = Some(have);
                self.restart(&mut st, seq);
                drop(st);
                p.wake.notify_all();
                return;
            }
            AckOutcome::NeedContent { path } => {
                st.overrides.entry(seq).or_default().as_content = Some(path);
                self.restart(&mut st, seq);
                drop(st);
                p.wake.notify_all();
                return;
            }
        }
        // Retire the acknowledged prefix.
        let mut last = None;
        let mut acked = Vec::new();
        while st.inflight.front().is_some_and(|f| f.done) {
            if let Some(f) = st.inflight.pop_front() {
                last = Some(f.seq);
                if let Some(a) = f.acked {
                    acked.push(a);
                }
            }
        }
        if let Some(last) = last {
            st.acked_upto = Some(last);
            st.acked_beyond.retain(|s| *s > last);
            if st.sent_ids.len() > 4096 {
                st.sent_ids.retain(|s, _| *s > last);
            }
        }
        // The durable queue is trimmed once nothing is in flight, or every TRIM_EVERY records
        // during a long stream (each trim walks the queue's head: per ack, that was a large
        // part of a sender's work for many small files). Records acknowledged but not trimmed
        // yet are only sent again after a restart, which is harmless (replays are idempotent).
        let trim = last.filter(|l| {
            st.inflight.is_empty() || st.trimmed_upto.is_none_or(|t| *l >= t + TRIM_EVERY)
        });
        if trim.is_some() {
            st.trimmed_upto = trim;
        }
        drop(st);
        p.wake.notify_all();
        let _ = acked;
        if let Some(last) = trim {
            if let Err(e) = self.store.ack(&p.key, last) {
                tracing::warn!("replication: cannot trim the queue: {e}");
            }
        }
        self.check_waiters();
    }

    /// The path of record `seq` of `p`'s queue, for messages (a refused record is still there).
    fn record_path(&self, p: &Peer, seq: u64) -> String {
        match self.store.peek_from(&p.key, seq, 1) {
            Ok(recs) => match recs.first().filter(|r| r.seq == seq) {
                Some(r) => String::from_utf8_lossy(&r.path).into_owned(),
                None => format!("record {seq}"),
            },
            Err(_) => format!("record {seq}"),
        }
    }

    /// The peer acked version `hash` of `id`, which was not kept as sent (a huge file): it is
    /// the file's current or previous version, if either still matches.
    fn promote_current(&self, peer: &PeerKey, id: FileId, hash: &Hash) {
        let current_hash = self
            .store
            .file_state(id)
            .ok()
            .flatten()
            .and_then(|st| st.version)
            .map(|v| v.hash);
        let m = if current_hash.as_ref() == Some(hash) {
            self.store.manifest(id).ok().flatten()
        } else {
            self.store
                .prev_manifest(id)
                .ok()
                .flatten()
                .filter(|b| Manifest::decode(b).is_ok_and(|m| m.content_hash() == hash))
        };
        if let Some(m) = m {
            if let Err(e) = self.store.set_acked_manifest(peer, id, &m) {
                tracing::warn!("replication: cannot record an acknowledgement: {e}");
            }
        }
    }

    fn waiter_done(&self, w: &Waiter) -> bool {
        w.targets.iter().all(|(i, seq)| {
            let st = self.peers[*i].state.lock();
            !st.connected
                || st.retry_at.is_some()
                || st.acked_upto.is_some_and(|a| a >= *seq)
                || st.acked_beyond.contains(seq)
        })
    }

    fn check_waiters(&self) {
        let ready: Vec<Box<dyn FnOnce() + Send>> = {
            let mut ws = self.waiters.lock();
            let mut ready = Vec::new();
            ws.retain_mut(|w| {
                if self.waiter_done(w) {
                    if let Some(f) = w.done.take() {
                        ready.push(f);
                    }
                    false
                } else {
                    true
                }
            });
            ready
        };
        for f in ready {
            f();
        }
    }
}

// ------------------------------------------------------------------------------------------
// Receiving.

/// A content transfer being applied.
struct Transfer {
    seq: u64,
    path: RelPath,
    dir: OwnedFd,
    name: CString,
    /// Where the new version is built; `None` when the receiver already has it (metadata only).
    tmp: Option<(File, CString)>,
    /// The intermediate file has no name yet (`O_TMPFILE`): the name beside it is the one it
    /// gets if it must be renamed into place; a new name takes it by a link, atomically.
    unnamed: bool,
    base: Option<(File, Manifest)>,
    cloned: bool,
    at: u64,
    chunks: Vec<ChunkRef>,
    part: Vec<u8>,
    size: u64,
    content_hash: Hash,
    meta: Meta,
    received: u64,
    reported: u64,
    /// What to do with the incoming version, given ours.
    decision: Decision,
    /// Nothing to build (ours is newer or the same): pieces are ignored.
    discard: bool,
    theirs: EntryState,
    ours: Option<EntryState>,
    /// The object at the path when the decision was made (`None`: nothing there).
    seen: Option<ScanStamp>,
    /// That object was nothing or a regular file with one link: a new version may replace it
    /// in a batch commit (which first checks that it is still `seen`).
    plain_target: bool,
    failed: Option<AckOutcome>,
    /// Patch mode: the changed bytes go to a journal, applied in place at the end.
    journal: Option<crate::patch::Journal>,
}

impl Drop for Transfer {
    fn drop(&mut self) {
        if let Some((_, name)) = self.tmp.take().filter(|_| !self.unnamed) {
            // SAFETY: unlinkat on our own directory descriptor.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), name.as_ptr(), 0) };
        }
        if let Some(j) = self.journal.take() {
            j.discard();
        }
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Attribute bytes beyond which a small version's content is not sent inline (the Begin must
/// fit in one Bulk frame).
const INLINE_MAX_XATTRS: usize = 8 * 1024;

/// The whole content of `file` as `m` describes it; `Stop::Changed` if it no longer is that.
fn read_verified(file: &File, m: &Manifest) -> Result<Vec<u8>, Stop> {
    let size = usize::try_from(m.size()).map_err(|_| Stop::Changed)?;
    let mut bytes = vec![0u8; size];
    file.read_exact_at(&mut bytes, 0).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Stop::Changed
        } else {
            Stop::Io(e)
        }
    })?;
    for c in m.chunks() {
        let piece = usize::try_from(c.offset)
            .ok()
            .and_then(|at| bytes.get(at..at + c.len as usize));
        if piece.is_none_or(|b| hash_bytes(b) != c.hash) {
            return Err(Stop::Changed);
        }
    }
    Ok(bytes)
}

/// A version of at most one chunk: any change replaces it whole, so no delta is computed
/// against it, and which of its versions a peer holds is not remembered.
fn one_chunk(m: &Manifest) -> bool {
    m.chunks().len() <= 1
}

/// A fresh name for an intermediate file: the prefix the start sweeps, this process, a counter.
fn tmp_name() -> String {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    format!(
        "{TMP_PREFIX}{}-{}",
        PID.get_or_init(std::process::id),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Inner {
    fn receiver(self: Arc<Self>, i: usize, rx: mpsc::Receiver<Incoming>) {
        let p = self.peers[i].clone();
        let mut epoch = 0u64;
        let mut halted = false;
        let mut cur: Option<Transfer> = None;
        // Side transfers in progress (their pieces interleave with the stream).
        let mut side: HashMap<u64, Transfer> = HashMap::new();
        // Small new versions built and waiting to be committed together (one filesystem
        // sync for many files, then their renames, then their acknowledgements), and the
        // acknowledgements of records handled meanwhile, which go out after them (in order).
        let mut batch: Vec<Queued> = Vec::new();
        // Batches are committed on a thread of their own while the next one is built.
        let mut committer = Committer::start(self.clone(), p.clone());
        // The end of a transfer whose content came inline in its Begin, handled next.
        let mut inline_end: Option<u64> = None;
        // Nothing from peers is applied before the start scan has recorded what is here.
        while self.scanning.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        loop {
            let m = if let Some(seq) = inline_end.take() {
                Incoming::Msg(ReplMsg::End { seq })
            } else if batch.is_empty() {
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            } else {
                match rx.try_recv() {
                    Ok(m) => m,
                    Err(mpsc::TryRecvError::Empty) => {
                        committer.hand_off(&self, &p, &mut batch);
                        continue;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => {
                        committer.hand_off(&self, &p, &mut batch);
                        break;
                    }
                }
            };
            // Anything but the pieces of a transfer, or a transfer or operation on paths
            // unrelated to the batches' (e.g. the next folder of a tree), waits for the
            // batches to be committed.
            let related = match &m {
                Incoming::Msg(
                    ReplMsg::Copy { .. } | ReplMsg::Data { .. } | ReplMsg::End { .. },
                ) => false,
                Incoming::Msg(ReplMsg::Begin { path, .. }) => committer.touches(&[path]),
                Incoming::Msg(ReplMsg::Op { op, .. }) => committer.touches(&op_paths(op)),
                _ => true,
            };
            if related {
                committer.hand_off(&self, &p, &mut batch);
                committer.wait_idle();
            }
            let msg = match m {
                Incoming::Reset => {
                    epoch = 0;
                    halted = false;
                    cur = None;
                    side.clear();
                    continue;
                }
                Incoming::Msg(m) => m,
            };
            // Epoch rules: a newer epoch restarts the stream; an older one is stale.
            let msg_epoch = match &msg {
                ReplMsg::Op { epoch, .. } | ReplMsg::Begin { epoch, .. } => Some(*epoch),
                _ => None,
            };
            if let Some(e) = msg_epoch {
                if e < epoch {
                    tracing::trace!(peer = %p.name, epoch = e, current = epoch, "replication: a record of an older stream; dropped");
                    continue;
                }
                if e > epoch {
                    epoch = e;
                    halted = false;
                    cur = None;
                    side.clear();
                }
                if halted {
                    tracing::trace!(peer = %p.name, epoch = e, "replication: the stream waits for its restart; record dropped");
                    continue;
                }
            }
            // A removal held back here (a save may yet put a file at the name) goes out
            // before a peer's change of that name is decided: the change must meet the
            // removal, not the removed file's entry. Sent later, the removal would take
            // whatever the peer's change left at the name for what it removed, and remove
            // it on every other peer while this one keeps the file.
            let held_paths = match &msg {
                ReplMsg::Op { op, .. } => op_paths(op),
                ReplMsg::Begin { path, .. } => vec![path],
                _ => Vec::new(),
            };
            // (The root is no name: a no-op record names it.)
            for path in held_paths.into_iter().filter(|p| !p.is_root()) {
                if let Err(e) = self.flush_held_related(path) {
                    tracing::error!(path = %path, "replication: cannot record a removal: {e}");
                }
            }
            // True while the stream goes on: after an outcome that makes the sender restart
            // (a retry, a base or content it must change) the rest of this stream is dropped
            // until the restart arrives. A change refused for good is skipped by the sender,
            // which goes on with the same stream. Acknowledgements keep the stream's order:
            // behind a batch waiting or being committed they wait too.
            let busy = committer.busy();
            let mut ack = |seq: u64, outcome: AckOutcome, holds: Option<Hash>| {
                let goes_on = matches!(
                    outcome,
                    AckOutcome::Applied | AckOutcome::Failed { retry: false, .. }
                );
                if batch.is_empty() && !busy {
                    self.ack(&p, seq, epoch, outcome, holds);
                } else {
                    batch.push(Queued::Ack {
                        seq,
                        epoch,
                        outcome,
                        holds,
                    });
                }
                goes_on
            };
            match msg {
                ReplMsg::Op { seq, op, ver, .. } => {
                    let outcome = self.apply_op(&p, op, ver.map(|v| *v));
                    if !ack(seq, outcome, None) {
                        halted = true;
                    }
                }
                ReplMsg::Begin {
                    seq,
                    path,
                    base,
                    size,
                    content_hash,
                    meta,
                    aligned,
                    checked,
                    side: beside,
                    ver,
                    inline,
                    ..
                } => match self.begin(
                    &p,
                    seq,
                    path,
                    base,
                    size,
                    content_hash,
                    meta,
                    aligned,
                    checked,
                    ver.map(|v| *v),
                ) {
                    Ok(mut t) => {
                        if let Some(bytes) = inline {
                            // The whole transfer: its content, and its end next.
                            if t.failed.is_none() {
                                if let Err(e) = t.inline(&bytes.0) {
                                    t.failed = Some(failed(&e));
                                }
                            }
                            let n = bytes.0.len() as u64;
                            t.received += n;
                            p.counters
                                .content_bytes_received
                                .fetch_add(n, Ordering::Relaxed);
                            inline_end = Some(seq);
                        }
                        if beside {
                            side.insert(seq, t);
                        } else {
                            cur = Some(t);
                        }
                    }
                    Err(outcome) => {
                        if !ack(seq, outcome, None) {
                            halted = true;
                        }
                        cur = None;
                    }
                },
                ReplMsg::Copy {
                    seq,
                    from_offset,
                    len,
                } => {
                    let t = match cur.as_mut().filter(|t| t.seq == seq) {
                        Some(t) => Some(t),
                        None => side.get_mut(&seq),
                    };
                    if let Some(t) = t {
                        if t.failed.is_none() {
                            if let Err(e) = t.copy(from_offset, len) {
                                t.failed = Some(failed(&e));
                            }
                        }
                    }
                }
                ReplMsg::Data { seq, hash, bytes } => {
                    let t = match cur.as_mut().filter(|t| t.seq == seq) {
                        Some(t) => Some(t),
                        None => side.get_mut(&seq),
                    };
                    if let Some(t) = t {
                        let n = bytes.0.len() as u64;
                        if t.failed.is_none() {
                            if let Err(e) = t.data(hash, &bytes.0) {
                                t.failed = Some(failed(&e));
                            }
                        }
                        t.received += n;
                        p.counters
                            .content_bytes_received
                            .fetch_add(n, Ordering::Relaxed);
                        if t.received - t.reported >= PROGRESS_EVERY {
                            t.reported = t.received;
                            self.transport.send(
                                p.id,
                                ReplMsg::Progress {
                                    seq,
                                    bytes: t.received,
                                },
                                false,
                            );
                        }
                    }
                }
                ReplMsg::End { seq } => {
                    let t = if cur.as_ref().is_some_and(|t| t.seq == seq) {
                        cur.take()
                    } else {
                        side.remove(&seq)
                    };
                    if let Some(t) = t {
                        // A conflict copy leaves this server's own version at the path.
                        let holds = matches!(
                            t.decision,
                            Decision::Apply | Decision::OursLoses | Decision::Same
                        )
                        .then_some(t.content_hash);
                        let big = t.chunks.len() > TRIM_CHUNKS;
                        match self.finish(&p, t, true) {
                            Finished::Done(outcome) => {
                                if !ack(seq, outcome, holds) {
                                    halted = true;
                                }
                            }
                            Finished::Deferred(mut pending) => {
                                pending.epoch = epoch;
                                committer.building.add(&pending.path);
                                batch.push(Queued::File(pending));
                                if batch.len() >= BATCH_FILES {
                                    committer.hand_off(&self, &p, &mut batch);
                                }
                            }
                        }
                        if big {
                            trim_heap();
                        }
                    }
                }
                m @ (ReplMsg::Summary { .. }
                | ReplMsg::List { .. }
                | ReplMsg::Buckets { .. }
                | ReplMsg::Have { .. }
                | ReplMsg::Plan { .. }) => self.on_recon(i, m),
                ReplMsg::Ack { .. } | ReplMsg::Progress { .. } => {}
            }
        }
    }

    /// `None` if the object at `name` may be replaced by a peer's version: it is still what
    /// the decision saw (`seen`), and the drive does not have it open for writing. Otherwise
    /// the refusal to send (the sender retries, and the next decision sees the change).
    fn replaceable(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        path: &RelPath,
        seen: Option<ScanStamp>,
    ) -> Option<AckOutcome> {
        let now = lstat_at(dir, name).ok().map(|st| stamp_of(&st));
        if now != seen {
            return Some(changed_here(path));
        }
        if self.applied().is_some_and(|a| a.writing(path)) {
            return Some(AckOutcome::Failed {
                error: format!("{path} is open for writing here"),
                retry: true,
            });
        }
        None
    }

    /// Acknowledges record `seq` to `p`; true if it was applied.
    fn ack(
        &self,
        p: &Peer,
        seq: u64,
        epoch: u64,
        outcome: AckOutcome,
        holds: Option<Hash>,
    ) -> bool {
        tracing::trace!(me = %self.cfg.me_name, peer = %p.name, seq, epoch, ?outcome, "replication: answer");
        let ok = outcome == AckOutcome::Applied;
        if ok {
            p.counters.records_applied.fetch_add(1, Ordering::Relaxed);
            self.compare_all_when_quiet();
        }
        if !self.transport.send(
            p.id,
            ReplMsg::Ack {
                seq,
                epoch,
                outcome,
                holds: if ok { holds } else { None },
            },
            false,
        ) {
            tracing::debug!(peer = %p.name, seq, "ack not sent: disconnected");
        }
        ok
    }

    /// Commits the small versions built so far: one filesystem sync makes their data durable,
    /// then each is renamed into place (readers see whole files only), one more sync makes
    /// the renames durable, and only then are they acknowledged. A crash before the first
    /// sync leaves only intermediate files (swept at start); the sender resends.
    fn commit_batch(&self, p: &Peer, batch: &mut Vec<Queued>) {
        if batch.is_empty() {
            return;
        }
        let files = batch.iter().any(|q| matches!(q, Queued::File(_)));
        let synced = files && syncfs(self.root());
        let applying = self.apply_lock.lock();
        let mut outcomes = Vec::with_capacity(batch.len());
        for q in batch.drain(..) {
            let pd = match q {
                Queued::File(pd) => *pd,
                Queued::Ack {
                    seq,
                    epoch,
                    outcome,
                    holds,
                } => {
                    outcomes.push((seq, epoch, outcome, holds));
                    continue;
                }
            };
            let (seq, epoch) = (pd.seq, pd.epoch);
            let holds = Some(pd.content_hash);
            let r = (|| -> io::Result<AckOutcome> {
                if !synced {
                    pd.tmp.sync_all()?;
                }
                self.commit_one(p, pd, !synced)
            })();
            let outcome = match r {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(peer = %p.name, seq, "replication: cannot apply an update: {e}");
                    failed(&e)
                }
            };
            outcomes.push((seq, epoch, outcome, holds));
        }
        drop(applying);
        if synced && !syncfs(self.root()) {
            tracing::warn!("replication: the renames of a batch may not be durable yet");
        }
        for (seq, epoch, outcome, holds) in outcomes {
            self.ack(p, seq, epoch, outcome, holds);
        }
    }

    /// Renames one built version into place and records it (see [`Inner::commit_batch`]).
    fn commit_one(&self, p: &Peer, pd: Pending, sync_dir: bool) -> io::Result<AckOutcome> {
        let Pending {
            path,
            dir,
            name,
            theirs,
            ours,
            seen,
            tmp,
            tmp_name,
            unnamed,
            guard,
            manifest,
            ..
        } = pd;
        if let Some(refusal) = self.replaceable(dir.as_fd(), &name, &path, seen) {
            return Ok(refusal);
        }
        if unnamed {
            // The decision saw nothing at the name; a link never replaces what came since.
            match link_unnamed(&tmp, dir.as_fd(), &name) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(changed_here(&path)),
                other => other?,
            }
        } else {
            renameat(dir.as_fd(), &tmp_name, dir.as_fd(), &name)?;
        }
        std::mem::forget(guard);
        if sync_dir {
            fsync_dir(dir.as_fd());
        }
        // The descriptor of the intermediate file is the file now at the name.
        self.received(p, &path, &manifest, &tmp, theirs, ours.as_ref())?;
        if let Some(a) = self.applied() {
            a.changed(&path);
        }
        self.forward(self.index_of(p), path.as_bytes());
        Ok(AckOutcome::Applied)
    }

    fn applied(&self) -> Option<Arc<dyn Applied>> {
        self.applied.lock().clone()
    }

    /// What the receiver holds at `path`, which the caller found as `st` (`None`: nothing):
    /// the open regular file and its manifest. The caller holds the apply lock (`applying`);
    /// a file that must be read whole (its stamp is not the one its stored manifest has) is
    /// read without it, so a large file changed behind the drive's back holds neither other
    /// applies nor the drive's write opens back meanwhile. If the name no longer has that
    /// stamp afterwards, the transfer is refused (the sender retries).
    fn have(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        path: &RelPath,
        st: Option<&libc::stat>,
        applying: &mut parking_lot::MutexGuard<'_, ()>,
    ) -> Result<Option<(File, Manifest)>, AckOutcome> {
        let Some(st) = st.filter(|st| is_kind(st, libc::S_IFREG)) else {
            return Ok(None);
        };
        let file = File::from(
            openat2_beneath(dir, name, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
                .map_err(|e| failed(&e))?,
        );
        let id = self
            .store
            .ensure_file_id(Path::new(OsStr::from_bytes(path.as_bytes())))
            .map_err(|e| failed(&ioerr(e)))?;
        // Read only: a content the index does not have is a local change not reported yet
        // (or another apply half done); the decision treats it as such, and it is not
        // recorded as a version from here.
        if let Some(m) = self.stored_manifest(id, st) {
            return Ok(Some((file, m)));
        }
        let m = parking_lot::MutexGuard::unlocked(applying, || {
            Manifest::from_file(&file, st.st_size as u64)
        })
        .map_err(|e| failed(&e))?;
        if lstat_at(dir, name).map(|now| stamp_of(&now)).ok() != Some(stamp_of(st)) {
            return Err(changed_here(path));
        }
        Ok(Some((file, m)))
    }

    /// This server's state of `path` as a decision sees it: the index entry, unless the
    /// backing object says otherwise (`true`: an object the index does not describe, e.g. a
    /// file a local writer is changing right now, which counts as a concurrent version).
    /// `st`: what the caller found at the name (`None`: nothing).
    fn ours_view(
        &self,
        path: &RelPath,
        dir: BorrowedFd<'_>,
        name: &CStr,
        have_hash: Option<Hash>,
        st: Option<&libc::stat>,
    ) -> (Option<EntryState>, bool) {
        let entry = self.entry(path.as_bytes()).map(|e| e.state);
        let mut on_disk = st.and_then(versions::kind_of);
        // A file whose content the caller did not read: it is read now.
        let have_hash = match have_hash {
            None if on_disk == Some(Kind::File) => {
                let h = content_hash_at(dir, name);
                if h.is_none() {
                    on_disk = None;
                }
                h
            }
            h => h,
        };
        match (entry, on_disk) {
            (None, None) => (None, false),
            (Some(e), None) if e.kind == Kind::Gone => (Some(e), false),
            // Indexed but gone from the disk (e.g. a removal held back for a save): a deletion.
            (Some(e), None) => (Some(versions::gone(e.ver)), false),
            (Some(e), Some(k)) if e.kind == k && (k != Kind::File || Some(e.hash) == have_hash) => {
                (Some(e), false)
            }
            (e, Some(k)) => {
                let mtime = st.map_or(0, |s| s.st_mtime);
                let (vv, mut history) = e.map_or((Vec::new(), Vec::new()), |e| {
                    let h = if e.kind == Kind::File {
                        crate::catalog::push_history(&e.ver.history, e.hash)
                    } else {
                        e.ver.history.clone()
                    };
                    (e.ver.vv, h)
                });
                history.truncate(peerfs_proto::msg::MAX_HISTORY);
                (
                    Some(EntryState {
                        kind: k,
                        hash: have_hash.unwrap_or([0; 32]),
                        size: 0,
                        mode: 0,
                        ver: Version {
                            vv,
                            origin: self.cfg.me,
                            origin_name: self.cfg.me_name.clone(),
                            time: mtime,
                            history,
                            mclock: 0,
                            mpeer: self.cfg.me,
                        },
                    }),
                    true,
                )
            }
        }
    }

    /// The decision for an incoming version `theirs` (see [`crate::catalog::decide`]); an
    /// object the index does not describe is concurrent with it unless `theirs` descends from
    /// its content.
    fn decide_incoming(
        &self,
        ours: Option<&EntryState>,
        unrecorded: bool,
        theirs: &EntryState,
    ) -> Decision {
        let Some(o) = ours.filter(|_| unrecorded) else {
            return crate::catalog::decide(ours, theirs);
        };
        if crate::catalog::same_content(o, theirs) {
            Decision::Same
        } else if o.kind == Kind::File && theirs.ver.history.contains(&o.hash) {
            Decision::Apply
        } else if crate::catalog::theirs_wins(o, theirs) {
            Decision::OursLoses
        } else {
            Decision::TheirsLoses
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn begin(
        &self,
        p: &Peer,
        seq: u64,
        path: RelPath,
        base: Option<Hash>,
        size: u64,
        content_hash: Hash,
        meta: Meta,
        aligned: bool,
        checked: bool,
        ver: Option<Version>,
    ) -> Result<Transfer, AckOutcome> {
        if path.is_root() {
            return Err(AckOutcome::Failed {
                error: "content for the root".into(),
                retry: false,
            });
        }
        let versioned = ver.is_some();
        let ver = self.incoming_version(p, ver)?;
        let (dir, name) = open_parent(self.root(), &path, true).map_err(|e| failed(&e))?;
        // The decision reads a state no other apply is halfway through changing, from one
        // look at the name: the same look is what the commit finds unchanged (`seen`) before
        // it replaces anything, so whatever appears after it sends the transfer back.
        let mut applying = self.apply_lock.lock();
        let st = match lstat_at(dir.as_fd(), &name) {
            Ok(st) => Some(st),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(failed(&e)),
        };
        let have = self.have(dir.as_fd(), &name, &path, st.as_ref(), &mut applying)?;
        let have_hash = have.as_ref().map(|(_, m)| *m.content_hash());
        let theirs = EntryState {
            kind: Kind::File,
            hash: content_hash,
            size,
            mode: meta.mode & 0o7777,
            ver,
        };
        let (ours, unrecorded) = self.ours_view(&path, dir.as_fd(), &name, have_hash, st.as_ref());
        let decision = if versioned {
            self.decide_incoming(ours.as_ref(), unrecorded, &theirs)
        } else if have_hash == Some(content_hash) {
            Decision::Same
        } else if have_hash.is_none() || (base.is_some() && base == have_hash) {
            // No version (a record of an older build): the base decides, as it used to.
            Decision::Apply
        } else {
            Decision::TheirsLoses
        };
        tracing::debug!(me = %self.cfg.me_name, peer = %p.name, path = %path, ?decision, unrecorded, base = ?base.map(|b| b[0]), have = ?have_hash.map(|h| h[0]), theirs = ?content_hash[0], ours_vv = ?ours.as_ref().map(|o| (o.kind, o.ver.vv.iter().map(|(p, c)| (p.0[0], *c)).collect::<Vec<_>>())), theirs_vv = ?theirs.ver.vv.iter().map(|(p, c)| (p.0[0], *c)).collect::<Vec<_>>(), "replication: incoming version");
        // Metadata only until a mode is chosen below; the receiver's file is the base.
        let mut t = Transfer {
            seq,
            path,
            dir,
            name,
            tmp: None,
            unnamed: false,
            base: have,
            cloned: false,
            at: 0,
            chunks: Vec::new(),
            part: Vec::new(),
            size,
            content_hash,
            meta,
            received: 0,
            reported: 0,
            decision,
            discard: false,
            theirs,
            ours,
            seen: st.as_ref().map(stamp_of),
            plain_target: st
                .as_ref()
                .is_none_or(|st| is_kind(st, libc::S_IFREG) && st.st_nlink <= 1),
            failed: None,
            journal: None,
        };
        drop(applying);
        match decision {
            Decision::Same if have_hash == Some(content_hash) => return Ok(t),
            Decision::Same | Decision::Stale => {
                // Ours is newer (or the same object): nothing to build.
                t.discard = true;
                return Ok(t);
            }
            _ => {}
        }
        let conflict = matches!(decision, Decision::OursLoses | Decision::TheirsLoses);
        match (base, have_hash) {
            (Some(b), Some(h)) if b == h => {}
            (Some(_), other) => {
                return Err(AckOutcome::BaseMismatch { have: other });
            }
            (None, None) => {}
            (None, Some(h)) if !checked => {
                // The sender does not know what is here: tell it (it may know this version).
                return Err(AckOutcome::BaseMismatch { have: Some(h) });
            }
            // Everything travels; the decision says where it goes.
            (None, Some(_)) => {}
        }
        if aligned && !conflict {
            if let Some((bf, _)) = &t.base {
                // Overwrites, appends, truncations: journal the new bytes, patch in place.
                let ino = fstat(bf).map_err(|e| failed(&e))?.st_ino;
                let journal = crate::patch::Journal::create(
                    &self.journal_dir(),
                    &t.path,
                    ino,
                    size,
                    content_hash,
                )
                .map_err(|e| failed(&e))?;
                t.journal = Some(journal);
                return Ok(t);
            }
        }
        let tmp_name = CString::new(tmp_name()).map_err(|e| failed(&ioerr(e)))?;
        // A version for a name that has nothing is built without a name: a link then puts it
        // at the name, and nothing is left to rename or remove (one entry written in the
        // folder instead of three, which counts when a whole tree arrives).
        let unnamed = if st.is_none() {
            open_unnamed(t.dir.as_fd())
        } else {
            None
        };
        t.unnamed = unnamed.is_some();
        let tmp = match unnamed {
            Some(f) => f,
            None => openat2_beneath(
                t.dir.as_fd(),
                &tmp_name,
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                0o600,
            )
            .map_err(|e| failed(&e))?,
        };
        let tmp = File::from(tmp);
        // Copies come from the receiver's file when it is the transfer's base.
        if !(base.is_some() && base == have_hash) {
            t.base = None;
        }
        // Where the filesystem can share extents (XFS, btrfs), start from a clone of the base:
        // unchanged chunks then cost nothing.
        t.cloned = t.base.as_ref().is_some_and(|(bf, _)| {
            // SAFETY: FICLONE between two descriptors we own.
            unsafe { libc::ioctl(tmp.as_raw_fd(), libc::FICLONE, bf.as_raw_fd()) == 0 }
        });
        t.tmp = Some((tmp, tmp_name));
        Ok(t)
    }

    /// A version from peer `p`, checked; a sender that sent none (a record of an older build)
    /// gets a version that is concurrent with everything ours.
    fn incoming_version(&self, p: &Peer, ver: Option<Version>) -> Result<Version, AckOutcome> {
        match ver {
            Some(v) => {
                v.validate().map_err(|e| AckOutcome::Failed {
                    error: format!("a malformed version: {e}"),
                    retry: false,
                })?;
                let _ = self.store.observe_clock(crate::catalog::max_clock(&v));
                Ok(v)
            }
            None => Ok(Version {
                vv: Vec::new(),
                origin: p.id,
                origin_name: p.name.clone(),
                time: now_secs(),
                history: Vec::new(),
                mclock: 0,
                mpeer: p.id,
            }),
        }
    }

    fn index_of(&self, p: &Peer) -> usize {
        self.peers.iter().position(|x| x.id == p.id).unwrap_or(0)
    }

    /// Queues this server's (newer) version of `path` for peer `p`, which sent an older one.
    fn push_back(&self, p: &Peer, path: &RelPath) {
        let i = self.index_of(p);
        if let Some(e) = self.entry(path.as_bytes()) {
            match self.push_entry(i, path.as_bytes(), &e, true) {
                Ok(_) => {
                    let _ = self.store.flush();
                }
                Err(err) => {
                    tracing::warn!(peer = %p.name, path = %path, "replication: cannot queue our newer version: {err}")
                }
            }
        }
    }

    /// The same object arrived: merge the versions; the attributes of the later change win.
    fn merge_same(&self, t: &Transfer) -> io::Result<()> {
        let Some(o) = &t.ours else { return Ok(()) };
        let theirs_meta = (t.theirs.ver.mclock, t.theirs.ver.mpeer) >= (o.ver.mclock, o.ver.mpeer);
        let mut state = o.clone();
        state.ver.vv = crate::catalog::merge(&o.ver.vv, &t.theirs.ver.vv);
        let mut stamp = self.entry(t.path.as_bytes()).and_then(|e| e.stamp);
        if theirs_meta {
            if let Some((file, _)) = &t.base {
                apply_meta(file.as_fd(), &t.meta, self.cfg.owners, false)?;
                stamp = Some(stamp_of(&fstat(file)?));
            }
            state.mode = t.theirs.mode;
            state.ver.mclock = t.theirs.ver.mclock;
            state.ver.mpeer = t.theirs.ver.mpeer;
        }
        self.store
            .cat_put(
                t.path.as_bytes(),
                Some(&crate::store::CatEntry { state, stamp }),
            )
            .map_err(ioerr)
    }

    /// Ends a transfer. `may_defer`: a small new version replacing a file (or nothing) may
    /// wait for [`Inner::commit_batch`] instead of its own fsyncs.
    fn finish(&self, p: &Peer, mut t: Transfer, may_defer: bool) -> Finished {
        if let Some(f) = t.failed.take() {
            return Finished::Done(f);
        }
        let i = self.index_of(p);
        let mut deferred: Option<Box<Pending>> = None;
        let r = (|| -> io::Result<AckOutcome> {
            if t.discard {
                if t.decision == Decision::Same {
                    let _applying = self.apply_lock.lock();
                    self.merge_same(&t)?;
                } else {
                    tracing::debug!(path = %t.path, peer = %p.name, "replication: an older version; ours is newer and goes back");
                    self.push_back(p, &t.path);
                }
                return Ok(AckOutcome::Applied);
            }
            if let Some(journal) = t.journal.take() {
                return self.finish_patch(p, &mut t, journal);
            }
            let Some((tmp, tmp_name)) = t.tmp.take() else {
                // Metadata only: the content is already here.
                let _applying = self.apply_lock.lock();
                self.merge_same(&t)?;
                if let Some((file, m)) = &t.base {
                    self.note_received(p, &t.path, m, file)?;
                }
                if let Some(a) = self.applied() {
                    a.changed(&t.path);
                }
                return Ok(AckOutcome::Applied);
            };
            let mut guard = TmpName {
                dir: t.dir.as_raw_fd(),
                name: (!t.unnamed).then(|| tmp_name.clone()),
            };
            if t.at != t.size || !t.part.is_empty() {
                return Ok(AckOutcome::Failed {
                    error: format!("incomplete transfer: {} of {} bytes", t.at, t.size),
                    retry: true,
                });
            }
            if t.cloned {
                // A clone of the base may be longer; written pieces alone end at `t.at`.
                tmp.set_len(t.size)?;
            }
            let m = Manifest::from_chunks(std::mem::take(&mut t.chunks));
            if *m.content_hash() != t.content_hash || m.size() != t.size {
                return Ok(AckOutcome::Failed {
                    error: "the rebuilt file does not match the sender's content hash".into(),
                    retry: true,
                });
            }
            // The intermediate file is new (a clone of the base shares content, not metadata).
            apply_meta_new(tmp.as_fd(), &t.meta, self.cfg.owners, &fstat(&tmp)?)?;
            let plain = t.decision == Decision::Apply && t.size <= BATCH_MAX_FILE && t.plain_target;
            if t.unnamed && !(may_defer && plain) {
                // What follows renames the intermediate file: it takes its name first.
                link_unnamed(&tmp, t.dir.as_fd(), &tmp_name)?;
                guard.name = Some(tmp_name.clone());
            }
            if may_defer && plain {
                deferred = Some(Box::new(Pending {
                    seq: t.seq,
                    epoch: 0,
                    path: t.path.clone(),
                    dir: t.dir.try_clone()?,
                    name: t.name.clone(),
                    theirs: t.theirs.clone(),
                    ours: t.ours.clone(),
                    content_hash: t.content_hash,
                    seen: t.seen,
                    tmp,
                    tmp_name,
                    unnamed: t.unnamed,
                    guard,
                    manifest: m,
                }));
                return Ok(AckOutcome::Applied);
            }
            tmp.sync_all()?;
            let _applying = self.apply_lock.lock();
            let sibling = |n: &CStr| -> io::Result<RelPath> {
                match t.path.split_last() {
                    Some((parent, _)) => {
                        parent.join(OsStr::from_bytes(n.to_bytes())).map_err(ioerr)
                    }
                    None => Ok(t.path.clone()),
                }
            };
            let applied = self.applied();
            match t.decision {
                Decision::TheirsLoses => {
                    // Ours keeps the name; theirs becomes the conflict copy (named from its
                    // version, so every peer makes the same one).
                    let (copy, there) = conflict_target(
                        t.dir.as_fd(),
                        &t.name,
                        &t.theirs.ver,
                        Some(&t.content_hash),
                        &|n| self.older_copy(&t.path, n, &t.theirs.ver),
                    );
                    let copy_path = sibling(&copy)?;
                    if !there {
                        renameat(t.dir.as_fd(), &tmp_name, t.dir.as_fd(), &copy)?;
                        std::mem::forget(guard);
                        fsync_dir(t.dir.as_fd());
                    }
                    let file = File::from(openat2_beneath(
                        t.dir.as_fd(),
                        &copy,
                        libc::O_RDONLY | libc::O_NOFOLLOW,
                        0,
                    )?);
                    self.received(p, &copy_path, &m, &file, t.theirs.clone(), None)?;
                    // The name keeps our version as it was: merging the loser's vector into it
                    // would make it look like a descendant of the loser, and a peer holding
                    // the loser at the name would then replace it without keeping a copy.
                    self.note_conflict(&t.path, &copy_path, &t.theirs.ver);
                    if let Some(a) = applied {
                        a.changed(&copy_path);
                    }
                    self.forward(i, copy_path.as_bytes());
                    return Ok(AckOutcome::Applied);
                }
                Decision::OursLoses => {
                    // Theirs takes the name; ours moves to the conflict copy, atomically for
                    // readers (the name is never missing).
                    if let Some(refusal) = self.replaceable(t.dir.as_fd(), &t.name, &t.path, t.seen)
                    {
                        return Ok(refusal);
                    }
                    let ours = t
                        .ours
                        .clone()
                        .unwrap_or_else(|| versions::gone(t.theirs.ver.clone()));
                    let ours_content = (ours.kind == Kind::File).then_some(&ours.hash);
                    let (copy, there) =
                        conflict_target(t.dir.as_fd(), &t.name, &ours.ver, ours_content, &|n| {
                            self.older_copy(&t.path, n, &ours.ver)
                        });
                    let copy_path = sibling(&copy)?;
                    let present = lstat_at(t.dir.as_fd(), &t.name).is_ok();
                    if present && there {
                        // The same copy of our version is there already (it came another way):
                        // ours is kept; the name takes theirs.
                        renameat(t.dir.as_fd(), &tmp_name, t.dir.as_fd(), &t.name)?;
                    } else if present {
                        renameat2_exchange(t.dir.as_fd(), &tmp_name, t.dir.as_fd(), &t.name)?;
                        renameat(t.dir.as_fd(), &tmp_name, t.dir.as_fd(), &copy)?;
                    } else {
                        renameat(t.dir.as_fd(), &tmp_name, t.dir.as_fd(), &t.name)?;
                    }
                    std::mem::forget(guard);
                    fsync_dir(t.dir.as_fd());
                    if present && !there {
                        let old = self.entry(t.path.as_bytes());
                        let copy_stamp = lstat_at(t.dir.as_fd(), &copy).ok().map(|s| stamp_of(&s));
                        let mut state = ours.clone();
                        if let Some(e) = old.filter(|e| e.state.kind == ours.kind) {
                            state.mode = e.state.mode;
                            state.size = e.state.size;
                        }
                        let _ = self.store.rename_path(
                            Path::new(OsStr::from_bytes(t.path.as_bytes())),
                            Path::new(OsStr::from_bytes(copy_path.as_bytes())),
                        );
                        self.record_remote(copy_path.as_bytes(), state, None, copy_stamp)?;
                        self.note_conflict(&t.path, &copy_path, &ours.ver);
                    }
                    let file = File::from(openat2_beneath(
                        t.dir.as_fd(),
                        &t.name,
                        libc::O_RDONLY | libc::O_NOFOLLOW,
                        0,
                    )?);
                    // The winner's version as it is (see TheirsLoses): ours lives on in the copy.
                    self.received(p, &t.path, &m, &file, t.theirs.clone(), None)?;
                    if let Some(a) = applied {
                        if present {
                            a.changed(&copy_path);
                        }
                        a.changed(&t.path);
                    }
                    self.forward(i, t.path.as_bytes());
                    if present {
                        // Our version is news to everyone but the sender... and to it too.
                        for j in 0..self.peers.len() {
                            if let Some(e) = self.entry(copy_path.as_bytes()) {
                                let _ = self.push_entry(j, copy_path.as_bytes(), &e, false);
                            }
                        }
                    }
                    return Ok(AckOutcome::Applied);
                }
                _ => {}
            }
            if let Some(refusal) = self.replaceable(t.dir.as_fd(), &t.name, &t.path, t.seen) {
                return Ok(refusal);
            }
            let target_name = t.name.clone();
            let target_path = t.path.clone();
            // A folder, symlink or special file in the way goes to the trash (nothing lost).
            if lstat_at(t.dir.as_fd(), &target_name).is_ok_and(|st| !is_kind(&st, libc::S_IFREG)) {
                self.trash(p, &target_path)?;
            }
            // Hard-linked files are updated in place, so every name sees the new version.
            let in_place = lstat_at(t.dir.as_fd(), &target_name)
                .is_ok_and(|st| is_kind(&st, libc::S_IFREG) && st.st_nlink > 1);
            if in_place {
                let target = File::from(openat2_beneath(
                    t.dir.as_fd(),
                    &target_name,
                    libc::O_WRONLY | libc::O_NOFOLLOW,
                    0,
                )?);
                copy_all(&tmp, &target, t.size)?;
                target.set_len(t.size)?;
                apply_meta(target.as_fd(), &t.meta, self.cfg.owners, false)?;
                target.sync_all()?;
                drop(guard);
            } else {
                renameat(t.dir.as_fd(), &tmp_name, t.dir.as_fd(), &target_name)?;
                std::mem::forget(guard);
                fsync_dir(t.dir.as_fd());
            }
            let file = File::from(openat2_beneath(
                t.dir.as_fd(),
                &target_name,
                libc::O_RDONLY | libc::O_NOFOLLOW,
                0,
            )?);
            self.received(
                p,
                &target_path,
                &m,
                &file,
                t.theirs.clone(),
                t.ours.as_ref(),
            )?;
            if let Some(a) = applied {
                a.changed(&target_path);
            }
            self.forward(i, target_path.as_bytes());
            Ok(AckOutcome::Applied)
        })();
        match r {
            Ok(_) if deferred.is_some() => match deferred {
                Some(d) => Finished::Deferred(d),
                None => Finished::Done(AckOutcome::Applied),
            },
            Ok(o) => Finished::Done(o),
            Err(e) => {
                tracing::warn!(path = %t.path, peer = %p.name, "replication: cannot apply an update: {e}");
                Finished::Done(failed(&e))
            }
        }
    }

    /// Ends a patch-mode transfer: verify, commit the journal, patch the file in place (or, if
    /// someone has it open, rebuild it beside and rename), fsync, drop the journal.
    fn finish_patch(
        &self,
        p: &Peer,
        t: &mut Transfer,
        mut journal: crate::patch::Journal,
    ) -> io::Result<AckOutcome> {
        if t.at != t.size || !t.part.is_empty() {
            journal.discard();
            return Ok(AckOutcome::Failed {
                error: format!("incomplete transfer: {} of {} bytes", t.at, t.size),
                retry: true,
            });
        }
        let m = Manifest::from_chunks(std::mem::take(&mut t.chunks));
        if *m.content_hash() != t.content_hash || m.size() != t.size {
            journal.discard();
            return Ok(AckOutcome::Failed {
                error: "the rebuilt file does not match the sender's content hash".into(),
                retry: true,
            });
        }
        let Some((base, _)) = t.base.as_ref() else {
            journal.discard();
            return Err(ioerr("a patch without a base"));
        };
        let ino = fstat(base)?.st_ino;
        let _applying = self.apply_lock.lock();
        let target = File::from(openat2_beneath(
            t.dir.as_fd(),
            &t.name,
            libc::O_WRONLY | libc::O_NOFOLLOW,
            0,
        )?);
        let st = fstat(&target)?;
        if st.st_ino != ino || Some(stamp_of(&st)) != t.seen {
            journal.discard();
            return Ok(AckOutcome::Failed {
                error: "the file was replaced or changed during the transfer".into(),
                retry: true,
            });
        }
        journal.commit()?;
        let applied = self.applied();
        let gated = applied.as_ref().is_none_or(|a| a.gate(&t.path, ino));
        if gated {
            let r = (|| {
                journal.apply_to(&target)?;
                apply_meta(target.as_fd(), &t.meta, self.cfg.owners, false)?;
                target.sync_all()
            })();
            if let Some(a) = &applied {
                a.ungate(ino);
            }
            if let Err(e) = r {
                // The journal stays committed: the next start finishes the patch.
                std::mem::forget(journal);
                return Err(e);
            }
            journal.remove();
            self.received(p, &t.path, &m, base, t.theirs.clone(), t.ours.as_ref())?;
        } else if applied.as_ref().is_some_and(|a| a.writing(&t.path)) {
            journal.discard();
            return Ok(AckOutcome::Failed {
                error: format!("{} is open for writing here", t.path),
                retry: true,
            });
        } else {
            // Someone has the file open: rebuild beside it from the base plus the journal,
            // and rename, so readers keep the old version.
            let tmp_name = CString::new(tmp_name()).map_err(ioerr)?;
            let tmp = File::from(openat2_beneath(
                t.dir.as_fd(),
                &tmp_name,
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                0o600,
            )?);
            let guard = TmpName {
                dir: t.dir.as_raw_fd(),
                name: Some(tmp_name.clone()),
            };
            // SAFETY: FICLONE between two descriptors we own.
            let cloned =
                unsafe { libc::ioctl(tmp.as_raw_fd(), libc::FICLONE, base.as_raw_fd()) == 0 };
            if !cloned {
                copy_all(base, &tmp, fstat(base)?.st_size as u64)?;
            }
            journal.apply_to(&tmp)?;
            apply_meta(tmp.as_fd(), &t.meta, self.cfg.owners, false)?;
            tmp.sync_all()?;
            renameat(t.dir.as_fd(), &tmp_name, t.dir.as_fd(), &t.name)?;
            std::mem::forget(guard);
            fsync_dir(t.dir.as_fd());
            journal.remove();
            self.received(p, &t.path, &m, &tmp, t.theirs.clone(), t.ours.as_ref())?;
        }
        if let Some(a) = applied {
            a.changed(&t.path);
        }
        Ok(AckOutcome::Applied)
    }

    /// Records a version received from `p` now in `file` at `path`: the manifest (the sender
    /// holds it too, so its next delta may start from it) and the index entry with the file's
    /// stamp.
    fn received(
        &self,
        p: &Peer,
        path: &RelPath,
        m: &Manifest,
        file: &File,
        state: EntryState,
        ours: Option<&EntryState>,
    ) -> io::Result<()> {
        let stamp = stamp_of(&fstat(file)?);
        self.note_received_as(p, path, m, stamp)?;
        self.record_remote(path.as_bytes(), state, ours, Some(stamp))
    }

    /// Records that this server holds manifest `m` at `path`, received from `p` (which holds it
    /// too: its next delta may be computed against it).
    fn note_received(&self, p: &Peer, path: &RelPath, m: &Manifest, file: &File) -> io::Result<()> {
        self.note_received_as(p, path, m, stamp_of(&fstat(file)?))
    }

    /// [`Inner::note_received`] of a file whose stamp the caller has.
    fn note_received_as(
        &self,
        p: &Peer,
        path: &RelPath,
        m: &Manifest,
        stamp: ScanStamp,
    ) -> io::Result<()> {
        let id = self
            .store
            .ensure_file_id(Path::new(OsStr::from_bytes(path.as_bytes())))
            .map_err(ioerr)?;
        self.record_content(id, m, stamp)?;
        if one_chunk(m) {
            // Nothing to remember for a delta (see `remember` in the sender).
            return Ok(());
        }
        self.store
            .set_acked_manifest(&p.key, id, &m.encode())
            .map_err(ioerr)
    }

    fn apply_op(&self, p: &Peer, op: NsOp, ver: Option<Version>) -> AckOutcome {
        let ver = match ver {
            Some(v) => match v.validate() {
                Ok(()) => {
                    let _ = self.store.observe_clock(crate::catalog::max_clock(&v));
                    Some(v)
                }
                Err(e) => {
                    tracing::warn!(peer = %p.name, "replication: refusing an operation with a malformed version: {e}");
                    return AckOutcome::Failed {
                        error: format!("a malformed version: {e}"),
                        retry: false,
                    };
                }
            },
            None => None,
        };
        let r = {
            let _applying = self.apply_lock.lock();
            self.apply_op_io(p, &op, ver.as_ref())
        };
        match r {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(peer = %p.name, ?op, "replication: cannot apply: {e}");
                failed(&e)
            }
        }
    }

    fn trash(&self, p: &Peer, path: &RelPath) -> io::Result<()> {
        (self.trash)(self.root(), path, path, &p.name)
    }

    /// The object at `path` (its folder, name and stat), or `None` if there is none.
    fn existing(&self, path: &RelPath) -> io::Result<Option<(OwnedFd, CString, libc::stat)>> {
        let found = open_parent(self.root(), path, false)
            .and_then(|(dir, name)| lstat_at(dir.as_fd(), &name).map(|st| (dir, name, st)));
        match found {
            Ok(x) => Ok(Some(x)),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Moves our object at `path` (a version the incoming one does not know) aside to its
    /// conflict-copy name, records it, and queues it for every peer.
    fn set_aside(&self, dir: BorrowedFd<'_>, name: &CStr, path: &RelPath) -> io::Result<RelPath> {
        let ours = self
            .entry(path.as_bytes())
            .filter(|e| e.state.kind != Kind::Gone)
            .ok_or_else(|| ioerr("nothing to set aside"))?;
        let content = (ours.state.kind == Kind::File).then_some(&ours.state.hash);
        let (copy, there) = conflict_target(dir, name, &ours.state.ver, content, &|n| {
            self.older_copy(path, n, &ours.state.ver)
        });
        if there {
            // The same copy is there already: ours is kept by it; clear the name.
            let dup = CString::new(tmp_name()).map_err(ioerr)?;
            renameat(dir, name, dir, &dup)?;
            // SAFETY: unlinkat on our descriptor; the content lives on in the copy.
            unsafe { libc::unlinkat(dir.as_raw_fd(), dup.as_ptr(), 0) };
            return match path.split_last() {
                Some((parent, _)) => parent
                    .join(OsStr::from_bytes(copy.to_bytes()))
                    .map_err(ioerr),
                None => Err(ioerr("the root cannot be set aside")),
            };
        }
        renameat(dir, name, dir, &copy)?;
        fsync_dir(dir);
        let copy_path = match path.split_last() {
            Some((parent, _)) => parent
                .join(OsStr::from_bytes(copy.to_bytes()))
                .map_err(ioerr)?,
            None => return Err(ioerr("the root cannot be set aside")),
        };
        let _ = self.store.rename_path(
            Path::new(OsStr::from_bytes(path.as_bytes())),
            Path::new(OsStr::from_bytes(copy_path.as_bytes())),
        );
        let sub = self.store.cat_subtree(path.as_bytes()).map_err(ioerr)?;
        self.rename_entries(
            path.as_bytes(),
            copy_path.as_bytes(),
            &sub,
            &ours.state.ver,
            None,
        )?;
        self.note_conflict(path, &copy_path, &ours.state.ver);
        if let Some(e) = self.entry(copy_path.as_bytes()) {
            for j in 0..self.peers.len() {
                let _ = self.push_entry(j, copy_path.as_bytes(), &e, true);
            }
        }
        if let Some(a) = self.applied() {
            a.renamed(path, &copy_path);
        }
        Ok(copy_path)
    }

    /// Whether sibling `name` of `path` holds a file whose content version `loser` replaced
    /// (its history names it), recorded as it is on the disk and not open for writing: a
    /// conflict copy of `loser` may take its place. Vectors are not enough: after a conflict
    /// the name's winner keeps its own vector, so the loser's server's next edit there has a
    /// vector covering the copy it never saw.
    fn older_copy(&self, path: &RelPath, name: &CStr, loser: &Version) -> bool {
        let Some(copy) = path
            .split_last()
            .and_then(|(parent, _)| parent.join(OsStr::from_bytes(name.to_bytes())).ok())
        else {
            return false;
        };
        let Some(e) = self.entry(copy.as_bytes()) else {
            return false;
        };
        e.state.kind == Kind::File
            && loser.history.contains(&e.state.hash)
            && !self.unrecorded(copy.as_bytes(), &e)
            && !self.applied().is_some_and(|a| a.writing(&copy))
    }

    /// Whether the file at `path` differs from what the index recorded of it (a local change
    /// not reported yet: a writer is at work).
    fn unrecorded(&self, path: &[u8], e: &crate::store::CatEntry) -> bool {
        if e.state.kind != Kind::File {
            return false;
        }
        let Some(rel) = path_of_bytes(path) else {
            return false;
        };
        match self.existing(&rel) {
            Ok(Some((dir, name, st))) if e.stamp.is_some_and(|s| s != stamp_of(&st)) => {
                // The stamp moved: only a different content counts.
                content_hash_at(dir.as_fd(), &name) != Some(e.state.hash)
            }
            _ => false,
        }
    }

    /// Whether our entry at `path` holds a version the incoming `ver` does not know.
    fn unknown_to(&self, path: &RelPath, ver: Option<&Version>) -> bool {
        !self.known_to(path, ver, |e, v| !crate::catalog::unknown_to(e, v))
    }

    /// Whether the incoming `ver` knew our entry at `path`, by `rule` (an operation without a
    /// version, or a path without an entry: it did).
    fn known_to(
        &self,
        path: &RelPath,
        ver: Option<&Version>,
        rule: fn(&EntryState, &Version) -> bool,
    ) -> bool {
        match (ver, self.entry(path.as_bytes())) {
            (Some(v), Some(e)) => rule(&e.state, v),
            _ => true,
        }
    }

    fn apply_op_io(&self, p: &Peer, op: &NsOp, ver: Option<&Version>) -> io::Result<AckOutcome> {
        let pb = |r: &RelPath| PathBuf::from(OsStr::from_bytes(r.as_bytes()));
        let applied = self.applied();
        let i = self.index_of(p);
        let fallback = || Version {
            vv: Vec::new(),
            origin: p.id,
            origin_name: p.name.clone(),
            time: now_secs(),
            history: Vec::new(),
            mclock: 0,
            mpeer: p.id,
        };
        match op {
            NsOp::Remove { path } => {
                if path.is_root() {
                    // A no-op (a record the sender had nothing left to send for).
                    return Ok(AckOutcome::Applied);
                }
                let tomb = ver.cloned().unwrap_or_else(fallback);
                let sub = self.store.cat_subtree(path.as_bytes()).map_err(ioerr)?;
                // What the removal did not know (edits made here meanwhile) survives.
                let kept: Vec<Vec<u8>> = match ver {
                    Some(v) => sub
                        .iter()
                        .filter(|(sp, e)| {
                            matches!(e.state.kind, Kind::File | Kind::Symlink)
                                && (crate::catalog::unknown_to(&e.state, v)
                                    || self.unrecorded(sp, e))
                        })
                        .map(|(p, _)| p.clone())
                        .collect(),
                    None => Vec::new(),
                };
                let Some((dir, name, st)) = self.existing(path)? else {
                    self.tomb_entries(path.as_bytes(), &sub, &tomb)?;
                    return Ok(AckOutcome::Applied);
                };
                if kept.is_empty() {
                    // An empty folder holds nothing to lose.
                    let removed_empty = is_kind(&st, libc::S_IFDIR)
                        // SAFETY: unlinkat on our descriptor.
                        && unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) } == 0;
                    if !removed_empty {
                        self.trash(p, path)?;
                    }
                    let _ = self.store.remove_tree(&pb(path));
                    self.tomb_entries(path.as_bytes(), &sub, &tomb)?;
                    if let Some(a) = applied {
                        a.removed(path);
                    }
                    self.forward_op(i, path, op, ver);
                    return Ok(AckOutcome::Applied);
                }
                // Remove what the removal knew, deepest first; keep the rest and send it back.
                let mut gone_items = Vec::new();
                for (sp, e) in sub.iter().rev() {
                    if e.state.kind == Kind::Gone || kept.iter().any(|k| k == sp) {
                        continue;
                    }
                    let Some(rel) = path_of_bytes(sp) else {
                        continue;
                    };
                    let Some((d, n, s)) = self.existing(&rel)? else {
                        continue;
                    };
                    if is_kind(&s, libc::S_IFDIR) {
                        // SAFETY: unlinkat on our descriptor; a folder still holding kept
                        // entries stays.
                        if unsafe { libc::unlinkat(d.as_raw_fd(), n.as_ptr(), libc::AT_REMOVEDIR) }
                            != 0
                        {
                            continue;
                        }
                    } else {
                        self.trash(p, &rel)?;
                    }
                    let _ = self.store.remove_path(&pb(&rel));
                    gone_items.push((sp.clone(), e.clone()));
                    if let Some(a) = &applied {
                        a.removed(&rel);
                    }
                }
                for (sp, e) in &gone_items {
                    self.tomb_entries(sp, std::slice::from_ref(&(sp.clone(), e.clone())), &tomb)?;
                }
                tracing::info!(path = %path, kept = kept.len(), "replication: a removal from a peer keeps what changed here meanwhile");
                for k in &kept {
                    if let Some(e) = self.entry(k) {
                        let _ = self.push_entry(i, k, &e, false);
                    }
                }
                let _ = self.store.flush();
                Ok(AckOutcome::Applied)
            }
            NsOp::Mkdir { path, meta } => {
                let ours = self.entry(path.as_bytes());
                let theirs_ver = ver.cloned().unwrap_or_else(fallback);
                if let Some(o) = &ours {
                    if o.state.kind == Kind::Gone
                        && ver.is_some()
                        && crate::catalog::relate(&o.state.ver.vv, &theirs_ver.vv)
                            == crate::catalog::Relation::After
                    {
                        // We removed it since: our removal goes back.
                        self.push_back(p, path);
                        return Ok(AckOutcome::Applied);
                    }
                }
                let (dir, name) = open_parent(self.root(), path, true)?;
                match lstat_at(dir.as_fd(), &name) {
                    Ok(st) if is_kind(&st, libc::S_IFDIR) => {}
                    Ok(_) => {
                        if self.unknown_to(path, ver) {
                            self.set_aside(dir.as_fd(), &name, path)?;
                        } else {
                            self.trash(p, path)?;
                        }
                        mkdirat(dir.as_fd(), &name, meta.mode)?;
                    }
                    Err(_) => mkdirat(dir.as_fd(), &name, meta.mode)?,
                }
                let fd = openat2_beneath(
                    dir.as_fd(),
                    &name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )?;
                let theirs_meta = ours.as_ref().is_none_or(|o| {
                    o.state.kind != Kind::Dir
                        || (theirs_ver.mclock, theirs_ver.mpeer)
                            >= (o.state.ver.mclock, o.state.ver.mpeer)
                });
                if theirs_meta {
                    apply_meta(fd.as_fd(), meta, self.cfg.owners, false)?;
                }
                let _ = self.store.ensure_file_id(&pb(path));
                let mode = fstat_fd(fd.as_fd())?.st_mode & 0o7777;
                let mut state = EntryState {
                    kind: Kind::Dir,
                    hash: [0; 32],
                    size: 0,
                    mode,
                    ver: theirs_ver.clone(),
                };
                if !theirs_meta {
                    if let Some(o) = &ours {
                        state.ver.mclock = o.state.ver.mclock;
                        state.ver.mpeer = o.state.ver.mpeer;
                    }
                }
                let known = ours
                    .as_ref()
                    .is_some_and(|o| o.state.kind == Kind::Dir && o.state.mode == mode);
                self.record_remote(
                    path.as_bytes(),
                    state,
                    ours.as_ref().map(|o| &o.state),
                    None,
                )?;
                if let Some(a) = applied {
                    a.changed(path);
                }
                if !known {
                    self.forward_op(i, path, op, ver);
                }
                Ok(AckOutcome::Applied)
            }
            NsOp::Symlink { path, target, meta } => {
                let (dir, name) = open_parent(self.root(), path, true)?;
                let ctarget = CString::new(target.0.clone()).map_err(ioerr)?;
                let theirs = EntryState {
                    kind: Kind::Symlink,
                    hash: *blake3::hash(&target.0).as_bytes(),
                    size: 0,
                    mode: meta.mode & 0o7777,
                    ver: ver.cloned().unwrap_or_else(fallback),
                };
                let st = lstat_at(dir.as_fd(), &name).ok();
                let (mut ours, mut unrecorded) =
                    self.ours_view(path, dir.as_fd(), &name, None, st.as_ref());
                // A symlink's content is its target: compare it on the disk.
                if let Ok(t) = readlinkat(dir.as_fd(), &name) {
                    let h = *blake3::hash(&t).as_bytes();
                    if let Some(o) = ours.as_mut().filter(|o| o.kind == Kind::Symlink) {
                        if o.hash != h {
                            o.hash = h;
                            unrecorded = true;
                        }
                    }
                }
                let decision = if ver.is_some() {
                    self.decide_incoming(ours.as_ref(), unrecorded, &theirs)
                } else {
                    Decision::Apply
                };
                let mut at = path.clone();
                match decision {
                    Decision::Same => {
                        self.merge_seen(path.as_bytes(), &theirs.ver.vv)?;
                        return Ok(AckOutcome::Applied);
                    }
                    Decision::Stale => {
                        self.push_back(p, path);
                        return Ok(AckOutcome::Applied);
                    }
                    Decision::OursLoses => {
                        if lstat_at(dir.as_fd(), &name).is_ok() {
                            self.set_aside(dir.as_fd(), &name, path)?;
                        }
                        symlinkat(&ctarget, dir.as_fd(), &name)?;
                    }
                    Decision::TheirsLoses => {
                        let (copy, there) =
                            conflict_target(dir.as_fd(), &name, &theirs.ver, None, &|_| false);
                        at = match path.split_last() {
                            Some((parent, _)) => parent
                                .join(OsStr::from_bytes(copy.to_bytes()))
                                .map_err(ioerr)?,
                            None => return Ok(AckOutcome::Applied),
                        };
                        if !there {
                            symlinkat(&ctarget, dir.as_fd(), &copy)?;
                        }
                        self.note_conflict(path, &at, &theirs.ver);
                    }
                    Decision::Apply => match lstat_at(dir.as_fd(), &name) {
                        Ok(st)
                            if is_kind(&st, libc::S_IFLNK)
                                && readlinkat(dir.as_fd(), &name).ok().as_deref()
                                    == Some(&target.0[..]) => {}
                        Ok(_) => {
                            self.trash(p, path)?;
                            symlinkat(&ctarget, dir.as_fd(), &name)?;
                        }
                        Err(_) => symlinkat(&ctarget, dir.as_fd(), &name)?,
                    },
                }
                let at_name = CString::new(
                    at.file_name()
                        .map(|n| n.as_bytes().to_vec())
                        .unwrap_or_default(),
                )
                .map_err(ioerr)?;
                if let Ok(fd) =
                    openat2_beneath(dir.as_fd(), &at_name, libc::O_PATH | libc::O_NOFOLLOW, 0)
                {
                    let _ = apply_meta(fd.as_fd(), meta, self.cfg.owners, true);
                }
                let _ = self.store.ensure_file_id(&pb(&at));
                // A conflict's winner keeps its version unmerged (see content transfers).
                let merge_with = if at == *path && decision == Decision::Apply {
                    ours.as_ref()
                } else {
                    None
                };
                self.record_remote(at.as_bytes(), theirs, merge_with, None)?;
                if let Some(a) = applied {
                    a.changed(&at);
                }
                self.forward(i, at.as_bytes());
                Ok(AckOutcome::Applied)
            }
            NsOp::Link { existing, path } => {
                let Some((sdir, sname, sst)) = self.existing(existing)? else {
                    return Ok(AckOutcome::NeedContent { path: path.clone() });
                };
                let (dir, name) = open_parent(self.root(), path, true)?;
                match lstat_at(dir.as_fd(), &name) {
                    Ok(st) if st.st_ino == sst.st_ino && st.st_dev == sst.st_dev => {
                        return Ok(AckOutcome::Applied);
                    }
                    Ok(_) => {
                        if self.unknown_to(path, ver) {
                            self.set_aside(dir.as_fd(), &name, path)?;
                        } else {
                            self.trash(p, path)?;
                        }
                    }
                    Err(_) => {}
                }
                // SAFETY: linkat between our descriptors, never following symlinks.
                let r = unsafe {
                    libc::linkat(
                        sdir.as_raw_fd(),
                        sname.as_ptr(),
                        dir.as_raw_fd(),
                        name.as_ptr(),
                        0,
                    )
                };
                if r != 0 {
                    return Err(io::Error::last_os_error());
                }
                let _ = self.store.ensure_file_id(&pb(path));
                if let Some(src) = self
                    .entry(existing.as_bytes())
                    .filter(|e| e.state.kind == Kind::File)
                {
                    let state = EntryState {
                        ver: ver.cloned().unwrap_or_else(fallback),
                        ..src.state
                    };
                    self.record_remote(path.as_bytes(), state, None, src.stamp)?;
                }
                if let Some(a) = applied {
                    a.changed(path);
                    a.changed(existing);
                }
                self.forward_op(i, path, op, ver);
                Ok(AckOutcome::Applied)
            }
            NsOp::Rename { from, to } => {
                let Some((sdir, sname, sst)) = self.existing(from)? else {
                    // Already renamed (a replay), or never received: the content of `to`
                    // brings it up to date either way.
                    return Ok(AckOutcome::NeedContent { path: to.clone() });
                };
                if !self.known_to(from, ver, crate::catalog::moved_knowingly) {
                    // Changed here meanwhile (or came here another way): our version stays at
                    // `from` (and goes back to the sender); `to` gets the sender's content.
                    tracing::info!(from = %from, to = %to, "replication: a rename from a peer keeps the version changed here meanwhile");
                    self.push_back(p, from);
                    return Ok(AckOutcome::NeedContent { path: to.clone() });
                }
                let (ddir, dname) = open_parent(self.root(), to, true)?;
                let mut dst = lstat_at(ddir.as_fd(), &dname).ok();
                if let Some(d) = &dst {
                    let same = d.st_ino == sst.st_ino && d.st_dev == sst.st_dev;
                    if !same && !self.known_to(to, ver, crate::catalog::replaced_knowingly) {
                        // The object the rename replaces there has changes the renamer did not
                        // know: keep them as a conflict copy.
                        self.set_aside(ddir.as_fd(), &dname, to)?;
                        dst = None;
                    }
                }
                let sub = self.store.cat_subtree(from.as_bytes()).map_err(ioerr)?;
                let rver = match ver {
                    Some(v) => v.clone(),
                    None => sub
                        .first()
                        .map(|(_, e)| e.state.ver.clone())
                        .unwrap_or_else(fallback),
                };
                let replaces_file = dst.as_ref().is_some_and(|d| {
                    let same = d.st_ino == sst.st_ino && d.st_dev == sst.st_dev;
                    let dirs = is_kind(d, libc::S_IFDIR) || is_kind(&sst, libc::S_IFDIR);
                    !same && !dirs
                });
                if replaces_file {
                    // Swap the two atomically (readers never miss `to`), then trash the old
                    // object under the name it had.
                    renameat2_exchange(sdir.as_fd(), &sname, ddir.as_fd(), &dname)?;
                    fsync_dir(ddir.as_fd());
                    if let Err(e) = (self.trash)(self.root(), from, to, &p.name) {
                        // Put both back as they were: the index still describes them so.
                        if let Err(e2) =
                            renameat2_exchange(sdir.as_fd(), &sname, ddir.as_fd(), &dname)
                        {
                            tracing::error!(from = %from, to = %to, "replication: cannot undo a rename's exchange after the trash failed: {e2}");
                        }
                        return Err(e);
                    }
                } else {
                    if let Some(dst) = dst {
                        if !(dst.st_ino == sst.st_ino && dst.st_dev == sst.st_dev) {
                            // The replaced object is kept in the trash (nothing is destroyed).
                            let empty_dir = is_kind(&dst, libc::S_IFDIR)
                                // SAFETY: unlinkat on our descriptor.
                                && unsafe { libc::unlinkat(ddir.as_raw_fd(), dname.as_ptr(), libc::AT_REMOVEDIR) } == 0;
                            if !empty_dir {
                                self.trash(p, to)?;
                            }
                        }
                    }
                    renameat(sdir.as_fd(), &sname, ddir.as_fd(), &dname)?;
                    fsync_dir(ddir.as_fd());
                }
                let _ = self.store.rename_path(&pb(from), &pb(to));
                let renamed = ver.and_then(|v| v.history.first());
                self.rename_entries(from.as_bytes(), to.as_bytes(), &sub, &rver, renamed)?;
                if let Some(a) = applied {
                    a.renamed(from, to);
                }
                self.forward_op(i, to, op, ver);
                // What moved is an older content than the one the renamer moved (its later
                // content was not sent under the old name): ask for the current one.
                let older = sub.iter().any(|(path, e)| {
                    path == from.as_bytes()
                        && matches!(e.state.kind, Kind::File | Kind::Symlink)
                        && renamed.is_some_and(|h| *h != e.state.hash)
                });
                if older {
                    return Ok(AckOutcome::NeedContent { path: to.clone() });
                }
                Ok(AckOutcome::Applied)
            }
            NsOp::SetMeta { path, meta } => {
                let Some((dir, name, st)) = self.existing(path)? else {
                    return Ok(AckOutcome::Applied);
                };
                let ours = self
                    .entry(path.as_bytes())
                    .filter(|e| e.state.kind != Kind::Gone);
                if let (Some(v), Some(o)) = (ver, &ours) {
                    if (v.mclock, v.mpeer) < (o.state.ver.mclock, o.state.ver.mpeer) {
                        // Ours were set later: they win (and go back).
                        let _ = self.push_meta(i, path.as_bytes());
                        return Ok(AckOutcome::Applied);
                    }
                }
                if is_kind(&st, libc::S_IFLNK) {
                    let fd =
                        openat2_beneath(dir.as_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                    apply_meta(fd.as_fd(), meta, self.cfg.owners, true)?;
                } else if let Some(fd) = open_for_meta(dir.as_fd(), &name, &st)? {
                    apply_meta(fd.as_fd(), meta, self.cfg.owners, false)?;
                    if is_kind(&st, libc::S_IFREG) {
                        // The stamp moved (mtime): keep the index in step.
                        if let Ok(Some(id)) = self.store.file_id(&pb(path)) {
                            // SAFETY: zeroed stat buffer for fstat.
                            let mut nst: libc::stat = unsafe { std::mem::zeroed() };
                            // SAFETY: valid descriptor and buffer.
                            if unsafe { libc::fstat(fd.as_raw_fd(), &mut nst) } == 0
                                && self
                                    .store
                                    .file_state(id)
                                    .ok()
                                    .flatten()
                                    .and_then(|s| s.stamp)
                                    == Some(stamp_of(&st))
                            {
                                let _ = self.store.set_stamp(id, stamp_of(&nst));
                            }
                        }
                    }
                }
                if let Some(mut o) = ours {
                    if let Ok(nst) = lstat_at(dir.as_fd(), &name) {
                        o.state.mode = nst.st_mode & 0o7777;
                        if o.stamp.is_some_and(|s| s == stamp_of(&st)) {
                            o.stamp = Some(stamp_of(&nst));
                        }
                    }
                    if let Some(v) = ver {
                        o.state.ver.mclock = v.mclock;
                        o.state.ver.mpeer = v.mpeer;
                    }
                    self.store
                        .cat_put(path.as_bytes(), Some(&o))
                        .map_err(ioerr)?;
                }
                if let Some(a) = applied {
                    a.changed(path);
                }
                self.forward_op(i, path, op, ver);
                Ok(AckOutcome::Applied)
            }
        }
    }
}

impl Transfer {
    fn tmp(&self) -> io::Result<&File> {
        self.tmp
            .as_ref()
            .map(|(f, _)| f)
            .ok_or_else(|| ioerr("no transfer in progress"))
    }

    fn copy(&mut self, from: u64, len: u64) -> io::Result<()> {
        if self.tmp.is_none() && self.journal.is_none() {
            return Ok(());
        }
        if self.journal.is_some() && from != self.at {
            return Err(ioerr("an unaligned copy in an in-place update"));
        }
        let Some((base, bm)) = &self.base else {
            return Err(ioerr("a copy without a base version"));
        };
        // The copy must cover whole base chunks: their hashes make up the new manifest.
        let chunks = bm.chunks();
        let start = chunks.partition_point(|c| c.offset < from);
        let end = from
            .checked_add(len)
            .filter(|e| self.at.checked_add(len).is_some_and(|n| n <= self.size) && *e <= bm.size())
            .ok_or_else(|| ioerr("a copy outside the base or the new size"))?;
        let mut at = from;
        let mut i = start;
        while at < end {
            let c = chunks
                .get(i)
                .filter(|c| c.offset == at)
                .ok_or_else(|| ioerr("a copy does not cover whole base chunks"))?;
            self.chunks.push(ChunkRef {
                offset: self.at + (at - from),
                len: c.len,
                hash: c.hash,
            });
            at += u64::from(c.len);
            i += 1;
        }
        if at != end {
            return Err(ioerr("a copy does not cover whole base chunks"));
        }
        if self.journal.is_none() && !(self.cloned && from == self.at) {
            let tmp = self.tmp()?;
            copy_range(base, from, tmp, self.at, len)?;
        }
        self.at += len;
        Ok(())
    }

    /// The whole content, sent inline: cut into chunks as the sender did (the chunker is
    /// deterministic; the content hash checked at the end covers the cut too).
    fn inline(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.tmp.is_none() && self.journal.is_none() {
            return Ok(());
        }
        if bytes.len() > MAX_INLINE {
            return Err(ioerr("inline content larger than the maximum"));
        }
        if self.at != 0 || !self.part.is_empty() {
            return Err(ioerr("inline content after pieces"));
        }
        let chunks = crate::chunk::chunk_slice(bytes);
        match self.journal.as_mut() {
            Some(j) => {
                for c in &chunks {
                    j.piece(c.offset, &bytes[c.offset as usize..c.end() as usize])?;
                }
            }
            None if bytes.is_empty() => {}
            None => self.tmp()?.write_all_at(bytes, 0)?,
        }
        self.at = bytes.len() as u64;
        self.chunks = chunks;
        Ok(())
    }

    fn data(&mut self, hash: Option<Hash>, bytes: &[u8]) -> io::Result<()> {
        if self.tmp.is_none() && self.journal.is_none() {
            return Ok(());
        }
        if self.part.len() + bytes.len() > MAX_SIZE as usize {
            return Err(ioerr("a chunk larger than the maximum"));
        }
        self.part.extend_from_slice(bytes);
        let Some(hash) = hash else { return Ok(()) };
        if self.part.is_empty() || hash_bytes(&self.part) != hash {
            return Err(ioerr("a received chunk does not match its hash"));
        }
        if self.at.saturating_add(self.part.len() as u64) > self.size {
            return Err(ioerr("more data than the announced size"));
        }
        let part = std::mem::take(&mut self.part);
        match self.journal.as_mut() {
            Some(j) => j.piece(self.at, &part)?,
            None => self.tmp()?.write_all_at(&part, self.at)?,
        }
        self.chunks.push(ChunkRef {
            offset: self.at,
            len: part.len() as u32,
            hash,
        });
        self.at += part.len() as u64;
        Ok(())
    }
}

/// Small versions are committed together (see [`Inner::commit_batch`]): at most this many...
const BATCH_FILES: usize = 128;
/// ...of at most this size each (larger ones are fsynced on their own).
const BATCH_MAX_FILE: u64 = 1024 * 1024;

/// How a transfer ended.
enum Finished {
    Done(AckOutcome),
    /// Built and verified; committed with the next batch.
    Deferred(Box<Pending>),
}

/// Commits a receiver's batches ([`Inner::commit_batch`]) on a thread of its own, in order,
/// while the receiver builds more: the filesystem syncs and the renames no longer stall the
/// stream. Group commit: what is handed off while a commit runs is committed together by the
/// next one (one pair of syncs for all of it), so the batches grow with the syncs' latency. At
/// most [`COMMIT_MAX_OPEN`] files wait or are being committed (each holds two descriptors).
struct Committer {
    group: Arc<(Mutex<Group>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Paths of the files of the batch the receiver is building (not handed off yet).
    building: Waiting,
    /// Paths of the files handed off since the committer was last seen idle.
    handed: Waiting,
}

/// Paths of files waiting for a commit, indexed so that whether a path is one of them,
/// contains one or lies within one costs a lookup per component of that path, however many
/// files wait (a batch holds hundreds, and every record of the stream asks).
#[derive(Default)]
struct Waiting {
    files: HashSet<Vec<u8>>,
    /// Every folder above a waiting file, the root (empty) included.
    dirs: HashSet<Vec<u8>>,
}

impl Waiting {
    fn add(&mut self, path: &RelPath) {
        let b = path.as_bytes();
        let ends = std::iter::once(0).chain(
            b.iter()
                .enumerate()
                .filter(|(_, c)| **c == b'/')
                .map(|(i, _)| i),
        );
        for end in ends {
            if !self.dirs.contains(&b[..end]) {
                self.dirs.insert(b[..end].to_vec());
            }
        }
        self.files.insert(b.to_vec());
    }

    fn clear(&mut self) {
        self.files.clear();
        self.dirs.clear();
    }

    /// Adds every path of `other`, which is left empty.
    fn absorb(&mut self, other: &mut Waiting) {
        if self.files.is_empty() {
            std::mem::swap(self, other);
        } else {
            self.files.extend(other.files.drain());
            self.dirs.extend(other.dirs.drain());
        }
    }

    /// Whether `path` is, contains or lies within a waiting file's path.
    fn relates(&self, path: &RelPath) -> bool {
        if self.files.is_empty() {
            return false;
        }
        let b = path.as_bytes();
        self.files.contains(b)
            || self.dirs.contains(b)
            || b.iter()
                .enumerate()
                .any(|(i, c)| *c == b'/' && self.files.contains(&b[..i]))
    }
}

#[derive(Default)]
struct Group {
    /// Handed off, not taken yet (in stream order), and how many of them are files.
    queued: Vec<Queued>,
    queued_files: usize,
    /// Files of the commit in progress (`active`).
    committing: usize,
    active: bool,
    stop: bool,
}

/// Most files waiting for or in a group commit.
const COMMIT_MAX_OPEN: usize = 512;

fn files_in(batch: &[Queued]) -> usize {
    batch
        .iter()
        .filter(|q| matches!(q, Queued::File(_)))
        .count()
}

impl Committer {
    fn start(inner: Arc<Inner>, p: Arc<Peer>) -> Committer {
        let group = Arc::new((Mutex::new(Group::default()), Condvar::new()));
        let g = group.clone();
        let name = format!("repl-commit-{}", p.name);
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            loop {
                let mut batch = {
                    let mut st = g.0.lock();
                    while st.queued.is_empty() && !st.stop {
                        g.1.wait(&mut st);
                    }
                    if st.queued.is_empty() {
                        return;
                    }
                    st.active = true;
                    st.committing = std::mem::take(&mut st.queued_files);
                    std::mem::take(&mut st.queued)
                };
                inner.commit_batch(&p, &mut batch);
                let mut st = g.0.lock();
                st.active = false;
                st.committing = 0;
                g.1.notify_all();
            }
        });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("cannot start a commit thread: {e}; committing on the receiver");
                None
            }
        };
        Committer {
            group,
            thread,
            building: Waiting::default(),
            handed: Waiting::default(),
        }
    }

    /// Hands `batch` (emptied) to the commit thread, or commits it here if there is none.
    fn hand_off(&mut self, inner: &Inner, p: &Peer, batch: &mut Vec<Queued>) {
        if batch.is_empty() {
            self.building.clear();
            return;
        }
        if self.thread.is_none() {
            inner.commit_batch(p, batch);
            self.building.clear();
            return;
        }
        if !self.busy() {
            self.handed.clear();
        }
        self.handed.absorb(&mut self.building);
        let files = files_in(batch);
        let (lock, cv) = &*self.group;
        let mut st = lock.lock();
        while st.queued_files + st.committing > 0
            && st.queued_files + st.committing + files > COMMIT_MAX_OPEN
        {
            cv.wait(&mut st);
        }
        st.queued.append(batch);
        st.queued_files += files;
        cv.notify_all();
    }

    fn busy(&self) -> bool {
        let st = self.group.0.lock();
        st.active || !st.queued.is_empty()
    }

    /// Waits until everything handed off is committed (and acknowledged).
    fn wait_idle(&mut self) {
        let (lock, cv) = &*self.group;
        let mut st = lock.lock();
        while st.active || !st.queued.is_empty() {
            cv.wait(&mut st);
        }
        drop(st);
        self.handed.clear();
    }

    /// Whether any of `paths` is, contains or lies within the path of a file waiting for a
    /// commit: in the batch being built, or handed off and not committed yet.
    fn touches(&mut self, paths: &[&RelPath]) -> bool {
        if paths.iter().any(|path| self.building.relates(path)) {
            return true;
        }
        if !self.handed.files.is_empty() && !self.busy() {
            self.handed.clear();
        }
        paths.iter().any(|path| self.handed.relates(path))
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        {
            let mut st = self.group.0.lock();
            st.stop = true;
            self.group.1.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What waits for the next batch commit, in stream order.
enum Queued {
    File(Box<Pending>),
    /// The acknowledgement of a record handled while the batch was waiting.
    Ack {
        seq: u64,
        epoch: u64,
        outcome: AckOutcome,
        holds: Option<Hash>,
    },
}

/// The paths a namespace operation touches.
fn op_paths(op: &NsOp) -> Vec<&RelPath> {
    match op {
        NsOp::Rename { from, to } => vec![from, to],
        NsOp::Link { existing, path } => vec![existing, path],
        NsOp::Mkdir { path, .. }
        | NsOp::Symlink { path, .. }
        | NsOp::Remove { path }
        | NsOp::SetMeta { path, .. } => vec![path],
    }
}

/// A verified new version waiting in its intermediate file for the batch commit.
struct Pending {
    seq: u64,
    /// The stream it came in (set by the receiver).
    epoch: u64,
    path: RelPath,
    dir: OwnedFd,
    name: CString,
    theirs: EntryState,
    ours: Option<EntryState>,
    content_hash: Hash,
    seen: Option<ScanStamp>,
    tmp: File,
    tmp_name: CString,
    /// `tmp` has no name: a link puts it at `name` (see [`Transfer::unnamed`]).
    unnamed: bool,
    guard: TmpName,
    manifest: Manifest,
}

/// syncfs(2) of the filesystem holding `fd`: every dirty page and the journal, at once.
fn syncfs(fd: BorrowedFd<'_>) -> bool {
    // The root is opened O_PATH; syncfs needs a real descriptor.
    let dir = match openat2_beneath(fd, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("cannot open the backing folder to sync it: {e}");
            return false;
        }
    };
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } == 0 {
        true
    } else {
        tracing::warn!("syncfs failed: {}", io::Error::last_os_error());
        false
    }
}

/// Unlinks an intermediate file unless disarmed.
struct TmpName {
    dir: i32,
    name: Option<CString>,
}

impl Drop for TmpName {
    fn drop(&mut self) {
        if let Some(n) = self.name.take() {
            // SAFETY: unlinkat on a live descriptor owned by the transfer.
            unsafe { libc::unlinkat(self.dir, n.as_ptr(), 0) };
        }
    }
}

/// Whether every copy of `delta` keeps its offset (the receiver may patch in place).
fn aligned(delta: &Delta) -> bool {
    let mut at = 0u64;
    for op in &delta.ops {
        match op {
            Op::Copy { from_offset, len } => {
                if *from_offset != at {
                    return false;
                }
                at += len;
            }
            Op::Data { len, .. } => at += u64::from(*len),
        }
    }
    true
}

/// Hands freed heap memory back to the system after work on a large file (glibc otherwise
/// keeps the manifests' tens of MB in its arenas, and the daemon's RSS stays high).
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory at the top of the heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Manifests with more chunks than this (files over ~128 MiB) make us trim the heap after use.
const TRIM_CHUNKS: usize = 16 * 1024;

fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

/// The refusal of a transfer whose target changed here after the decision (the sender retries,
/// and the next decision sees the change).
fn changed_here(path: &RelPath) -> AckOutcome {
    AckOutcome::Failed {
        error: format!("{path} changed here during the transfer"),
        retry: true,
    }
}

fn failed(e: &io::Error) -> AckOutcome {
    let retry = matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC)
            | Some(libc::EDQUOT)
            | Some(libc::EACCES)
            | Some(libc::EPERM)
            | Some(libc::EIO)
            | Some(libc::EROFS)
            | Some(libc::EBUSY)
            | Some(libc::ETXTBSY)
            | Some(libc::EMFILE)
            | Some(libc::ENFILE)
            | Some(libc::ENOMEM)
            | Some(libc::EAGAIN)
    ) || e.raw_os_error().is_none();
    AckOutcome::Failed {
        error: err_str(e),
        retry,
    }
}

fn copy_range(
    src: &File,
    mut off_in: u64,
    dst: &File,
    mut off_out: u64,
    len: u64,
) -> io::Result<()> {
    let mut left = len;
    while left > 0 {
        let mut i = off_in as i64;
        let mut o = off_out as i64;
        // SAFETY: copy_file_range between two descriptors we own, with valid offset pointers.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut i,
                dst.as_raw_fd(),
                &mut o,
                left.min(1 << 30) as usize,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.raw_os_error(),
                Some(libc::EXDEV) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
            ) {
                return copy_slow(src, off_in, dst, off_out, left);
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        left -= n as u64;
        off_in += n as u64;
        off_out += n as u64;
    }
    Ok(())
}

fn copy_slow(
    src: &File,
    mut off_in: u64,
    dst: &File,
    mut off_out: u64,
    mut left: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], off_in)?;
        dst.write_all_at(&buf[..n], off_out)?;
        left -= n as u64;
        off_in += n as u64;
        off_out += n as u64;
    }
    Ok(())
}

fn copy_all(src: &File, dst: &File, len: u64) -> io::Result<()> {
    copy_range(src, 0, dst, 0, len)
}

fn fstat(f: &File) -> io::Result<libc::stat> {
    fstat_fd(f.as_fd())
}

fn fstat_fd(f: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat buffer filled by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and buffer.
    if unsafe { libc::fstat(f.as_raw_fd(), &mut st) } == 0 {
        Ok(st)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn renameat2_exchange(
    d1: BorrowedFd<'_>,
    n1: &CStr,
    d2: BorrowedFd<'_>,
    n2: &CStr,
) -> io::Result<()> {
    // SAFETY: renameat2 between our descriptors with NUL-terminated names.
    let r = unsafe {
        libc::renameat2(
            d1.as_raw_fd(),
            n1.as_ptr(),
            d2.as_raw_fd(),
            n2.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether this backing filesystem makes unnamed files (`O_TMPFILE`); cleared at the first
/// refusal, after which intermediate files get names as before.
static UNNAMED_WORKS: AtomicBool = AtomicBool::new(true);

/// A new unnamed regular file (mode 0600) in folder `dir`, open for reading and writing;
/// `None` where the filesystem makes none (then also for every later call).
fn open_unnamed(dir: BorrowedFd<'_>) -> Option<OwnedFd> {
    if !UNNAMED_WORKS.load(Ordering::Relaxed) {
        return None;
    }
    match openat2_beneath(dir, c".", libc::O_RDWR | libc::O_TMPFILE, 0o600) {
        Ok(fd) => Some(fd),
        Err(e) => {
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            ) {
                tracing::info!(
                    "replication: the backing filesystem makes no unnamed files ({e}); intermediate files get names"
                );
                UNNAMED_WORKS.store(false, Ordering::Relaxed);
            }
            None
        }
    }
}

/// Gives the unnamed file `file` the name `name` in `dir`; fails with EEXIST if the name is
/// taken (nothing is replaced).
fn link_unnamed(file: &File, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: linkat of our own descriptor (empty path) into a descriptor we hold.
    let r = unsafe {
        libc::linkat(
            file.as_raw_fd(),
            c"".as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM)) {
        return Err(e);
    }
    // Kernels before 6.10 allow the empty path only with CAP_DAC_READ_SEARCH; the
    // descriptor's /proc link works without it.
    link_by_proc(file, dir, name)
}

/// [`link_unnamed`] through the descriptor's `/proc/self/fd` link.
fn link_by_proc(file: &File, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let proc = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(ioerr)?;
    // SAFETY: valid NUL-terminated paths; the directory descriptor is ours.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn renameat(d1: BorrowedFd<'_>, n1: &CStr, d2: BorrowedFd<'_>, n2: &CStr) -> io::Result<()> {
    // SAFETY: renameat between our descriptors with NUL-terminated names.
    let r = unsafe { libc::renameat(d1.as_raw_fd(), n1.as_ptr(), d2.as_raw_fd(), n2.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: mkdirat on our descriptor.
    let r = unsafe {
        libc::mkdirat(
            dir.as_raw_fd(),
            name.as_ptr(),
            (mode & 0o1777) as libc::mode_t,
        )
    };
    if r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: symlinkat on our descriptor.
    let r = unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// fsync of an `O_PATH` folder descriptor (reopened for reading); failures are logged only.
fn fsync_dir(dir: BorrowedFd<'_>) {
    match openat2_beneath(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0) {
        Ok(fd) => {
            // SAFETY: fsync on our descriptor.
            if unsafe { libc::fsync(fd.as_raw_fd()) } != 0 {
                tracing::warn!("fsync of a folder failed: {}", io::Error::last_os_error());
            }
        }
        Err(e) => tracing::warn!("cannot open a folder to fsync it: {e}"),
    }
}

/// The conflict-copy name of version `loser` of `name` in `dir`: named from that version's
/// origin and time, so every peer picks the same. `Ok((name, true))`: a file with that name
/// and `content` is there already (the same copy arrived another way). Otherwise a name not
/// taken (" 2", " 3", ... before the extension: an earlier conflict copy is never replaced).
///
/// A name holding an older version of the loser (`older`: what the loser's origin had
/// before it, which that origin knowingly replaced) is reused: the loser's later edits update
/// their copy instead of piling up `... 2`, `... 3` copies of one line of edits.
fn conflict_target(
    dir: BorrowedFd<'_>,
    name: &CStr,
    loser: &Version,
    content: Option<&Hash>,
    older: &dyn Fn(&CStr) -> bool,
) -> (CString, bool) {
    let first = conflict_name(name, &loser.origin_name, loser.time.max(0) as u64);
    let same = |n: &CStr| content.is_some_and(|h| content_hash_at(dir, n).as_ref() == Some(h));
    if lstat_at(dir, &first).is_err() {
        return (first, false);
    }
    if same(&first) {
        return (first, true);
    }
    if older(&first) {
        return (first, false);
    }
    let bytes = first.to_bytes();
    let (stem, ext) = match bytes.iter().rposition(|b| *b == b')') {
        Some(i) => (&bytes[..=i], &bytes[i + 1..]),
        None => (bytes, &b""[..]),
    };
    for n in 2..10_000u32 {
        let mut v = stem.to_vec();
        v.extend_from_slice(format!(" {n}").as_bytes());
        v.extend_from_slice(ext);
        v.truncate(255);
        if let Ok(c) = CString::new(v) {
            if lstat_at(dir, &c).is_err() {
                return (c, false);
            }
            if same(&c) {
                return (c, true);
            }
            if older(&c) {
                return (c, false);
            }
        }
    }
    (first, false)
}

/// The content hash of the regular file `name` in `dir` as it is now (`None`: not there, or
/// unreadable).
fn content_hash_at(dir: BorrowedFd<'_>, name: &CStr) -> Option<Hash> {
    let fd = openat2_beneath(
        dir,
        name,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NOATIME,
        0,
    )
    .ok()?;
    let m = Manifest::from_file(&File::from(fd), 0).ok()?;
    Some(*m.content_hash())
}

/// `report.docx` → `report (conflict peer-b 2026-11-21 10.32).docx`.
pub fn conflict_name(name: &CStr, peer: &str, secs: u64) -> CString {
    let bytes = name.to_bytes();
    let (stem, ext) = match bytes.iter().rposition(|b| *b == b'.') {
        Some(i) if i > 0 => (&bytes[..i], &bytes[i..]),
        _ => (bytes, &b""[..]),
    };
    let stamp = utc_minutes(secs);
    let peer: String = peer
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    let mut out = stem.to_vec();
    out.extend_from_slice(format!(" (conflict {peer} {stamp})").as_bytes());
    out.extend_from_slice(ext);
    out.truncate(255);
    CString::new(out).unwrap_or_else(|_| c"conflict".to_owned())
}

/// `YYYY-MM-DD HH.MM` in UTC.
fn utc_minutes(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}.{:02}",
        rem / 3600,
        (rem % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_names() {
        let n = conflict_name(c"report.docx", "peer-b", 1_795_000_000);
        assert_eq!(
            n.to_str().expect("utf8"),
            "report (conflict peer-b 2026-11-18 11.06).docx"
        );
        let n = conflict_name(c"Makefile", "b", 0);
        assert!(
            n.to_str()
                .expect("utf8")
                .starts_with("Makefile (conflict b ")
        );
        assert_eq!(utc_minutes(0), "1970-01-01 00.00");
        assert_eq!(utc_minutes(1_795_000_000), "2026-11-18 11.06");
    }

    fn rel(s: &str) -> RelPath {
        RelPath::new(s.as_bytes()).expect("valid path")
    }

    /// Both ways of naming an unnamed file: the direct link and the `/proc` link (taken on
    /// kernels before 6.10 without CAP_DAC_READ_SEARCH, so not otherwise run here). Neither
    /// replaces a name that is taken.
    #[test]
    fn an_unnamed_file_gets_its_name_either_way_and_never_replaces_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = File::open(dir.path()).expect("open dir");
        type Link = fn(&File, BorrowedFd<'_>, &CStr) -> io::Result<()>;
        let ways: [(&CStr, Link); 2] = [(c"direct", link_unnamed), (c"proc", link_by_proc)];
        for (name, link) in ways {
            let fd = open_unnamed(d.as_fd()).expect("this filesystem makes unnamed files");
            let mut f = File::from(fd);
            std::io::Write::write_all(&mut f, name.to_bytes()).expect("write");
            link(&f, d.as_fd(), name).expect("link");
            let got = std::fs::read(dir.path().join(name.to_str().expect("utf8"))).expect("read");
            assert_eq!(got, name.to_bytes());

            let other = File::from(open_unnamed(d.as_fd()).expect("unnamed"));
            let e = link(&other, d.as_fd(), name).expect_err("linked over a taken name");
            assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");
        }
        // Nothing else was left in the folder.
        let names = std::fs::read_dir(dir.path()).expect("list").count();
        assert_eq!(names, 2);
    }

    #[test]
    fn waiting_files_relate_to_themselves_their_folders_and_what_lies_below_them() {
        let mut w = Waiting::default();
        assert!(!w.relates(&RelPath::root()));
        w.add(&rel("a/b/f.txt"));
        w.add(&rel("top.txt"));
        for yes in [
            "a/b/f.txt",
            "a/b",
            "a",
            "",
            "top.txt",
            "a/b/f.txt/x",
            "top.txt/y/z",
        ] {
            assert!(w.relates(&rel(yes)), "{yes:?} relates");
        }
        for no in [
            "a/b/g.txt",
            "a/c",
            "a/b/f.tx",
            "a/b/f.txt2",
            "b",
            "top",
            "top.txt2/x",
        ] {
            assert!(!w.relates(&rel(no)), "{no:?} does not relate");
        }
        let mut other = Waiting::default();
        other.add(&rel("c/d.txt"));
        w.absorb(&mut other);
        assert!(w.relates(&rel("c")) && w.relates(&rel("a/b/f.txt")));
        assert!(!other.relates(&rel("c/d.txt")));
        other.absorb(&mut w);
        assert!(other.relates(&rel("c/d.txt")) && !w.relates(&rel("c")));
        other.clear();
        assert!(!other.relates(&RelPath::root()));
    }
}
