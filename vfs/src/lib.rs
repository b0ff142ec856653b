//! The platform-neutral drive: every file operation over the watch set (the backing folder).
//!
//! It knows nothing of fuser or WinFsp: adapters translate kernel or WinFsp requests into calls
//! on [`Vfs`] and map [`VfsError`] to their platform's codes. Locks (before write opens) and
//! replication (on release and namespace changes) will hook in here, so both platforms share
//! them.
//!
//! The drive keeps a node table (node id → `O_PATH` fd of the backing inode) and performs every
//! operation with fd-relative `*at` calls, never with path strings: that is what keeps
//! open-but-unlinked files, renamed ancestors of open handles and PATH_MAX-long paths working.
//! Node ids are the backing inode numbers (root = 1). While the kernel holds a node, its `O_PATH`
//! fd pins the inode, so the number cannot be reused for another file: ids are stable and unique
//! for as long as the kernel can name them.

mod error;
pub mod exclude;
mod nodes;
mod stats;
mod sys;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nodes::NodeTable;
use parking_lot::{Mutex, RwLock};
use peerfs_proto::RelPath;

pub use error::{Errno, Result, VfsError};
pub use stats::Stats;
use stats::{Counters, add, bump};
use sys::{CallerCreds, ProcPath, cname};

/// A node id as the kernel knows it.
pub type NodeId = u64;
/// The root of the drive.
pub const ROOT: NodeId = 1;

/// What kind of object a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    fn from_mode(mode: u32) -> FileKind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            _ => FileKind::File,
        }
    }

    fn from_dirent(d_type: u8) -> Option<FileKind> {
        Some(match d_type {
            libc::DT_REG => FileKind::File,
            libc::DT_DIR => FileKind::Dir,
            libc::DT_LNK => FileKind::Symlink,
            libc::DT_FIFO => FileKind::Fifo,
            libc::DT_SOCK => FileKind::Socket,
            libc::DT_CHR => FileKind::CharDevice,
            libc::DT_BLK => FileKind::BlockDevice,
            _ => return None,
        })
    }
}

/// Attributes of a node, as the backing filesystem reports them (with the drive's node id as
/// inode number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: NodeId,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky.
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// Who is asking: the credentials the kernel attached to the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A time to set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

/// The attributes a setattr changes; `None` leaves one alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// Clear setuid/setgid as a truncation by an unprivileged caller must.
    pub kill_suidgid: bool,
}

/// `renameat2` flags (values as on Linux).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags(pub u32);

impl RenameFlags {
    pub const NOREPLACE: u32 = libc::RENAME_NOREPLACE;
    pub const EXCHANGE: u32 = libc::RENAME_EXCHANGE;
    pub const WHITEOUT: u32 = libc::RENAME_WHITEOUT;
}

/// One directory entry; `offset` is the cookie that resumes listing after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub offset: u64,
    pub kind: FileKind,
    pub name: OsString,
}

/// File system statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// The answer to an xattr get or list: the size asked for (buffer size 0), or the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

/// Tells the platform's caches that the drive changed something behind them (an attribute the
/// kernel did not ask to change, later: a remote update). Implementations must not block: the
/// kernel may hold locks while the request that caused the change is in flight.
pub trait Invalidator: Send + Sync {
    /// The attributes of `node` are stale.
    fn inode(&self, node: NodeId);
    /// The attributes and the cached content of `node` are stale.
    fn data(&self, node: NodeId) {
        self.inode(node);
    }
    /// The name `name` in folder `parent` may now lead elsewhere (or nowhere).
    fn entry(&self, _parent: NodeId, _name: &OsStr) {}
}

/// A change the drive made to a replicated name, reported after it succeeded (the replicator
/// records it durably before the call returns). Temp and owner files never produce changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `path` has new content: the last writer released it (`dirty`: the byte ranges written
    /// through the drive, `None` when some writes bypassed it), or a file was renamed onto it
    /// from a name that does not replicate.
    Content {
        path: RelPath,
        dirty: Option<Vec<std::ops::Range<u64>>>,
    },
    /// Mode, owner, times or xattrs of `path` changed.
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
    /// `path` is gone (unlinked, removed, or renamed to a name that does not replicate).
    /// `held`: a file, which a save may replace in a moment (see OFFICE-SAVES.md).
    Remove {
        path: RelPath,
        held: bool,
    },
    Rename {
        from: RelPath,
        to: RelPath,
    },
}

/// Where the drive reports changes for replication.
pub trait Replicate: Send + Sync {
    fn changed(&self, change: Change);
}

/// Written ranges of one inode while write handles are open (tracked per inode, not per
/// handle: every handle's writes land in the same file).
#[derive(Debug, Default)]
struct Dirty {
    writers: u32,
    ranges: Vec<std::ops::Range<u64>>,
    /// Some writes bypassed the drive (kernel passthrough) or moved data around: re-chunk it all.
    untracked: bool,
    /// (size, mtime, ctime) when the first writer opened it; `None` for a file just created.
    before: Option<(i64, i64, i64, i64, i64)>,
    /// Locks of names this file was renamed onto while open for writing (GIO renames its
    /// stream over the document before closing it): held until the last writer goes.
    locks: Vec<RelPath>,
    /// The file got a replicated name by a rename while these write handles were open: it
    /// ships when they are all released, even if the application reopened it meanwhile
    /// (PowerPoint reopens the document before the kernel releases the temp's handle).
    ship_after: Vec<u64>,
}

/// Ranges beyond this many are not worth tracking: the file is re-chunked in full.
const MAX_DIRTY_RANGES: usize = 512;

impl Dirty {
    fn add(&mut self, r: std::ops::Range<u64>) {
        if r.start >= r.end || self.untracked {
            return;
        }
        // Merge with the last range when adjacent or overlapping (sequential writes).
        if let Some(last) = self.ranges.last_mut() {
            if r.start <= last.end && r.end >= last.start {
                last.start = last.start.min(r.start);
                last.end = last.end.max(r.end);
                return;
            }
        }
        self.ranges.push(r);
        if self.ranges.len() > MAX_DIRTY_RANGES {
            self.ranges.sort_by_key(|r| r.start);
            let mut merged: Vec<std::ops::Range<u64>> = Vec::with_capacity(self.ranges.len());
            for r in self.ranges.drain(..) {
                match merged.last_mut() {
                    Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
                    _ => merged.push(r),
                }
            }
            if merged.len() > MAX_DIRTY_RANGES {
                self.untracked = true;
                merged.clear();
            }
            self.ranges = merged;
        }
    }
}

fn stamp(st: &libc::stat) -> (i64, i64, i64, i64, i64) {
    (
        st.st_size,
        st.st_mtime,
        st.st_mtime_nsec,
        st.st_ctime,
        st.st_ctime_nsec,
    )
}

/// Cross-peer write locks, as the drive needs them (lockd provides them; tests may fake them).
/// Locks are keyed by path; temp and owner files (see [`exclude`]) never reach this.
pub trait Locks: Send + Sync {
    /// Takes, or shares with this server's other writers, the write lock on `path`. Blocks at
    /// most the lock service's request timeout.
    fn acquire(&self, path: &RelPath) -> std::result::Result<(), LockDenied>;
    /// Drops one reference taken by `acquire`; the lock lingers briefly before it is released
    /// to the peers (an application's close-and-reopen save must not let another office in).
    fn release(&self, path: &RelPath);
    /// The holder of a lock on `dir` or on any path below it held by another peer, if any
    /// (a folder with a locked document inside cannot be renamed or removed).
    fn held_below(&self, dir: &RelPath) -> Option<LockDenied>;
    /// Whether this server holds the lock on `path` now (open handles or lingering), so that
    /// `acquire` would answer without asking anyone.
    fn held_here(&self, path: &RelPath) -> bool;
}

/// Another peer holds the lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockDenied {
    /// The holding peer, as operators know it (its configured name).
    pub holder: String,
}

/// Settings of a drive.
#[derive(Clone)]
pub struct VfsConfig {
    /// The watch set: the folder the drive shows.
    pub backing: PathBuf,
    /// Temp and owner files that are never locked across peers (nor replicated).
    pub excludes: exclude::Excludes,
    /// With a replicator: write opens of files at least this big track their written ranges
    /// (served by the drive rather than kernel passthrough). `u64::MAX`: never.
    pub track_min_size: u64,
}

impl VfsConfig {
    /// A drive over `backing` with the default exclusions.
    pub fn new(backing: PathBuf) -> VfsConfig {
        VfsConfig {
            backing,
            excludes: exclude::Excludes::defaults(),
            track_min_size: 16 * 1024 * 1024,
        }
    }
}

/// An open file.
pub struct FileHandle {
    fd: OwnedFd,
    node: NodeId,
    /// The path whose lock this write handle holds: the name it was opened under (renaming the
    /// open file away does not move the lock).
    lock: Option<RelPath>,
    /// Opened for writing: its node's written ranges are tracked until the last such handle.
    writes: bool,
}

impl FileHandle {
    /// The backing file, for adapters that hand it to the kernel (FUSE passthrough).
    pub fn backing_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The node this handle was opened on.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Opened for writing.
    pub fn writes(&self) -> bool {
        self.writes
    }
}

struct DirHandle {
    fd: OwnedFd,
    node: NodeId,
    /// Snapshot taken when listing starts at offset 0; offsets index into it.
    entries: Mutex<Vec<sys::RawDirEntry>>,
}

/// An open file's handle number plus what adapters need to decide how to serve it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    /// A write handle whose written ranges the drive tracks for replication: serve its writes
    /// through the drive (not kernel passthrough) unless the inode already uses passthrough
    /// (then call [`Vfs::untracked`]).
    pub track: bool,
    /// The file is setuid, or setgid and group-executable: a write by another user must clear
    /// those bits, so its writes have to pass through the drive (not kernel passthrough).
    pub sets_id: bool,
}

/// The drive.
pub struct Vfs {
    root_fd: Arc<OwnedFd>,
    root_ino: u64,
    nodes: RwLock<NodeTable>,
    files: RwLock<HashMap<u64, Arc<FileHandle>>>,
    dirs: RwLock<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    counters: Counters,
    invalidator: std::sync::OnceLock<Box<dyn Invalidator>>,
    locks: std::sync::OnceLock<Arc<dyn Locks>>,
    replicator: std::sync::OnceLock<Arc<dyn Replicate>>,
    dirty: Mutex<HashMap<NodeId, Dirty>>,
    /// Files a peer's update is patching in place: their opens wait (see [`Vfs::remote_gate`]).
    patching: Mutex<std::collections::HashSet<NodeId>>,
    patched: parking_lot::Condvar,
    /// Write opens of files at least this big are served by the drive (not kernel
    /// passthrough), so their written ranges are known and a small edit costs a small delta.
    track_min_size: u64,
    excludes: exclude::Excludes,
}

const O_PATH_FLAGS: i32 = libc::O_PATH | libc::O_NOFOLLOW;

/// Open flags the backing open must not see. O_CREAT/O_EXCL were the kernel's business;
/// O_NOFOLLOW would refuse the `/proc/self/fd` magic link. O_DIRECT stays with the kernel: it
/// serves direct I/O from the caller's aligned buffers itself (also in passthrough), while
/// daemon-served requests arrive in buffers of no particular alignment.
const OPEN_STRIP: i32 =
    libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW | libc::O_DIRECT;

impl Vfs {
    /// Opens the backing folder.
    ///
    /// Also raises the process's open-file limit to its hard maximum: the node table holds one
    /// `O_PATH` descriptor per inode the kernel keeps cached, which is easily tens of thousands.
    pub fn new(cfg: VfsConfig) -> Result<Vfs> {
        raise_fd_limit();
        let setup = |what: &str, e: VfsError| VfsError::Setup {
            what: format!("{what} {}", cfg.backing.display()),
            source: match e {
                VfsError::Os(errno) => std::io::Error::from_raw_os_error(errno.0),
                other => std::io::Error::other(other.to_string()),
            },
        };
        let path = cname(cfg.backing.as_os_str()).map_err(|e| setup("backing folder", e))?;
        let root = sys::open_path(&path, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| setup("cannot open backing folder", e))?;
        let st = sys::fstat(root.as_fd()).map_err(|e| setup("cannot stat backing folder", e))?;
        let root_fd = Arc::new(root);
        let table = NodeTable::new(root_fd.clone(), st.st_dev, st.st_ino);
        Ok(Vfs {
            root_fd,
            root_ino: st.st_ino,
            nodes: RwLock::new(table),
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            counters: Counters::default(),
            invalidator: std::sync::OnceLock::new(),
            locks: std::sync::OnceLock::new(),
            replicator: std::sync::OnceLock::new(),
            dirty: Mutex::new(HashMap::new()),
            patching: Mutex::new(std::collections::HashSet::new()),
            patched: parking_lot::Condvar::new(),
            track_min_size: cfg.track_min_size,
            excludes: cfg.excludes,
        })
    }

    /// Installs the cross-peer lock service (once, before mounting; later calls are ignored).
    pub fn set_locks(&self, locks: Arc<dyn Locks>) {
        if self.locks.set(locks).is_err() {
            tracing::warn!("lock service already installed");
        }
    }

    /// Installs the replicator (once, before mounting; later calls are ignored).
    pub fn set_replicator(&self, r: Arc<dyn Replicate>) {
        if self.replicator.set(r).is_err() {
            tracing::warn!("replicator already installed");
        }
    }

    /// The replicated name `path`, if changes to it are reported: a replicator is installed and
    /// the name is neither the root, a temp/owner file, nor peerfs's own.
    fn replicated(&self, path: Option<RelPath>) -> Option<RelPath> {
        self.replicator.get()?;
        let path = path?;
        if path.is_root() || self.excludes.is_excluded(&path) || is_reserved_path(&path) {
            return None;
        }
        Some(path)
    }

    fn report(&self, change: Change) {
        if let Some(r) = self.replicator.get() {
            r.changed(change);
        }
    }

    /// Starts (or joins) tracking writes to `node` for a new write handle.
    fn track_open(&self, node: NodeId, before: Option<&libc::stat>, truncated_from: Option<u64>) {
        if self.replicator.get().is_none() {
            return;
        }
        let mut dirty = self.dirty.lock();
        let d = dirty.entry(node).or_insert_with(|| Dirty {
            before: before.map(stamp),
            ..Dirty::default()
        });
        d.writers += 1;
        if let Some(old) = truncated_from {
            d.add(0..old);
        }
    }

    fn track_range(&self, node: NodeId, r: std::ops::Range<u64>) {
        if let Some(d) = self.dirty.lock().get_mut(&node) {
            d.add(r);
        }
    }

    /// The adapter serves write handle `fh` in kernel passthrough: the drive does not see its
    /// writes, so the file is re-chunked in full when its last writer closes.
    pub fn untracked(&self, fh: u64) {
        let Ok(h) = self.file(fh) else { return };
        if let Some(d) = self.dirty.lock().get_mut(&h.node) {
            d.untracked = true;
        }
    }

    /// The last write handle of `node` went away: report its new content (if it changed).
    fn track_release(&self, node: NodeId, fh: u64, fd: BorrowedFd<'_>) {
        // A rename gave the file its name while `fh` was open: once every such handle is gone,
        // that save ships, whoever else has the file open by now.
        let ship = {
            let mut dirty = self.dirty.lock();
            match dirty.get_mut(&node) {
                Some(d) if d.ship_after.contains(&fh) => {
                    d.ship_after.retain(|x| *x != fh);
                    d.ship_after.is_empty() && d.writers > 1
                }
                _ => false,
            }
        };
        if ship {
            self.save_point(node, fd);
        }
        let locks = self.track_release_report(node, fd);
        if let Some(l) = self.locks.get() {
            for path in locks {
                l.release(&path);
            }
        }
    }

    /// Reports the new content if this was the last writer; returns the locks it kept.
    fn track_release_report(&self, node: NodeId, fd: BorrowedFd<'_>) -> Vec<RelPath> {
        let done = {
            let mut dirty = self.dirty.lock();
            let Some(d) = dirty.get_mut(&node) else {
                return Vec::new();
            };
            d.writers = d.writers.saturating_sub(1);
            if d.writers > 0 {
                return Vec::new();
            }
            dirty.remove(&node)
        };
        let Some(mut d) = done else {
            return Vec::new();
        };
        let locks = std::mem::take(&mut d.locks);
        let Some(path) = self.replicated(self.path(node)) else {
            return locks;
        };
        // A write open that changed nothing ships nothing (gedit's stat-only open, Samba).
        let now = sys::fstat(fd).ok();
        let unchanged =
            d.ranges.is_empty() && d.before.is_some() && now.as_ref().map(stamp) == d.before;
        if unchanged {
            return locks;
        }
        let dirty = if d.untracked || d.before.is_none() {
            None
        } else {
            Some(d.ranges)
        };
        self.report(Change::Content { path, dirty });
        locks
    }

    /// Whether a write open of a file of `size` bytes should be served by the drive.
    fn wants_tracking(&self, size: i64) -> bool {
        self.replicator.get().is_some() && size as u64 >= self.track_min_size
    }

    /// Whether `node` has write handles open now.
    fn has_writers(&self, node: NodeId) -> bool {
        self.dirty.lock().get(&node).is_some_and(|d| d.writers > 0)
    }

    // ---- changes made by peers (the replicator wrote the backing folder directly) -------------

    /// The node of folder `path` if the kernel knows it (walking known names from the root).
    fn known_dir(&self, path: &RelPath) -> Option<NodeId> {
        let nodes = self.nodes.read();
        let mut cur = ROOT;
        for c in path.components() {
            cur = nodes.child(cur, c)?;
        }
        Some(cur)
    }

    /// A peer changed or created `path`: drop what the kernel caches of the name, the old
    /// object's attributes and its pages.
    pub fn remote_changed(&self, path: &RelPath) {
        let Some((parent, name)) = path.split_last() else {
            return;
        };
        let Some(pnode) = self.known_dir(&parent) else {
            return;
        };
        let old = self.nodes.read().child(pnode, name);
        let current = cname(name).ok().and_then(|c| {
            self.node_fd(pnode)
                .ok()
                .and_then(|fd| sys::fstatat(fd.as_fd(), &c).ok())
        });
        let Some(inv) = self.invalidator.get() else {
            return;
        };
        if let Some(old) = old {
            let same = self
                .node_fd(old)
                .ok()
                .and_then(|fd| sys::fstat(fd.as_fd()).ok())
                .zip(current.as_ref())
                .is_some_and(|(a, b)| a.st_ino == b.st_ino && a.st_dev == b.st_dev);
            if !same {
                // Replaced by a new file: the old node keeps serving its open handles only.
                self.nodes.write().replaced_at(pnode, name);
            }
            inv.data(old);
        }
        inv.entry(pnode, name);
        inv.inode(pnode);
    }

    /// Whether a handle of the drive has the file at `path` open for writing (a peer's version
    /// must not replace it under its writer).
    pub fn remote_writing(&self, path: &RelPath) -> bool {
        let Some((parent, name)) = path.split_last() else {
            return false;
        };
        let Some(node) = self
            .known_dir(&parent)
            .and_then(|p| self.nodes.read().child(p, name))
        else {
            return false;
        };
        self.files
            .read()
            .values()
            .any(|h| h.node == node && h.writes)
    }

    /// A peer's update wants to patch the file `ino` (at `path`) in place: granted when no
    /// handle of the drive has it open; new opens then wait until [`Vfs::remote_ungate`].
    pub fn remote_gate(&self, _path: &RelPath, ino: u64) -> bool {
        let mut patching = self.patching.lock();
        if self.files.read().values().any(|h| h.node == ino) {
            return false;
        }
        patching.insert(ino);
        true
    }

    pub fn remote_ungate(&self, ino: u64) {
        self.patching.lock().remove(&ino);
        self.patched.notify_all();
    }

    /// A peer removed `path`.
    pub fn remote_removed(&self, path: &RelPath) {
        let Some((parent, name)) = path.split_last() else {
            return;
        };
        let Some(pnode) = self.known_dir(&parent) else {
            return;
        };
        let old = self.nodes.write().replaced_at(pnode, name);
        if let Some(inv) = self.invalidator.get() {
            if let Some(old) = old {
                inv.inode(old);
            }
            inv.entry(pnode, name);
            inv.inode(pnode);
        }
    }

    /// A peer renamed `from` to `to`.
    pub fn remote_renamed(&self, from: &RelPath, to: &RelPath) {
        let (Some((fp, fname)), Some((tp, tname))) = (from.split_last(), to.split_last()) else {
            return;
        };
        let fnode = self.known_dir(&fp);
        let tnode = self.known_dir(&tp);
        // The file the rename replaced keeps serving its open handles only: a name the kernel
        // cached before the rename must not reach it (an open through it would write to a
        // file no name holds any more, and take no lock: it has no path).
        let displaced = {
            let mut nodes = self.nodes.write();
            match (fnode, tnode) {
                (Some(a), Some(b)) => {
                    let moved = nodes.child(a, fname);
                    let displaced = nodes.child(b, tname).filter(|d| Some(*d) != moved);
                    if let Some(d) = displaced {
                        nodes.mark_replaced(d);
                    }
                    nodes.renamed(a, fname, b, tname, false);
                    displaced
                }
                // Moved into a folder the kernel never looked at: likewise for the moved file
                // (unlocked and unreported through its old name); a lookup of the new name
                // revives it.
                (Some(a), None) => {
                    nodes.replaced_at(a, fname);
                    None
                }
                (None, Some(b)) => nodes.replaced_at(b, tname),
                (None, None) => None,
            }
        };
        if let Some(inv) = self.invalidator.get() {
            if let Some(d) = displaced {
                inv.inode(d);
            }
            if let Some(a) = fnode {
                inv.entry(a, fname);
                inv.inode(a);
            }
            if let Some(b) = tnode {
                inv.entry(b, tname);
                inv.inode(b);
            }
        }
    }

    /// Whether a lock service is installed: then write-opens and namespace changes may wait for
    /// a network round trip (adapters keep such requests off their request threads).
    pub fn has_locks(&self) -> bool {
        self.locks.get().is_some()
    }

    /// The lock a change of `path` needs, if any: none without a lock service, for names that
    /// no longer resolve, and for temp and owner files.
    fn lockable(&self, path: Option<RelPath>) -> Option<(&dyn Locks, RelPath)> {
        let locks = self.locks.get()?;
        let path = path?;
        if path.is_root() || self.excludes.is_excluded(&path) {
            return None;
        }
        Some((locks.as_ref(), path))
    }

    /// Whether changing `path` may wait for a lock round trip to the peers: not without a lock
    /// service, not for temp and owner files, and not while this server already holds the lock
    /// (a handle is open, or it lingers). Adapters run only such requests off their request
    /// threads. A hint: a lock that expires right after it was asked about costs one round trip
    /// on the request thread, still bounded by the lock timeout.
    pub fn may_wait_for_peers(&self, path: Option<RelPath>) -> bool {
        self.lockable(path)
            .is_some_and(|(locks, path)| !locks.held_here(&path))
    }

    /// Takes the lock on `path` for a writer; the returned guard releases it unless kept.
    fn lock(&self, path: Option<RelPath>, what: &str) -> Result<Option<LockGuard<'_>>> {
        let Some((locks, path)) = self.lockable(path) else {
            return Ok(None);
        };
        match locks.acquire(&path) {
            Ok(()) => Ok(Some(LockGuard {
                locks,
                path: Some(path),
            })),
            Err(denied) => {
                bump(&self.counters.lock_denials);
                tracing::info!(path = %path, holder = %denied.holder, "{what} refused: locked by peer");
                Err(VfsError::Locked {
                    path,
                    holder: denied.holder,
                })
            }
        }
    }

    /// Refuses to move or remove folder `dir` while another peer holds a lock below it.
    fn check_below(&self, dir: Option<RelPath>, what: &str) -> Result<()> {
        let Some(locks) = self.locks.get() else {
            return Ok(());
        };
        let Some(dir) = dir else { return Ok(()) };
        match locks.held_below(&dir) {
            None => Ok(()),
            Some(denied) => {
                bump(&self.counters.lock_denials);
                tracing::info!(path = %dir, holder = %denied.holder, "{what} refused: a lock is held below");
                Err(VfsError::Locked {
                    path: dir,
                    holder: denied.holder,
                })
            }
        }
    }

    /// Installs the adapter's cache invalidation (once; later calls are ignored).
    pub fn set_invalidator(&self, inv: Box<dyn Invalidator>) {
        if self.invalidator.set(inv).is_err() {
            tracing::warn!("invalidator already installed");
        }
    }

    /// Clears setuid/setgid of `node` and, if that changed its mode, tells the kernel.
    fn kill_suidgid(&self, node: NodeId, fd: BorrowedFd<'_>) -> Result<()> {
        if kill_suidgid_fd(fd)? {
            if let Some(inv) = self.invalidator.get() {
                inv.inode(node);
            }
        }
        Ok(())
    }

    /// Counters for `peerfs status`.
    pub fn stats(&self) -> Stats {
        let handles = (self.files.read().len() + self.dirs.read().len()) as u64;
        let nodes = self.nodes.read().len() as u64;
        self.counters.snapshot(handles, nodes)
    }

    fn count<T>(&self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            bump(&self.counters.errors);
        }
        r
    }

    // ---- node table ----------------------------------------------------------------------

    fn node(&self, id: NodeId) -> Result<(Arc<OwnedFd>, FileKind)> {
        if id == ROOT {
            return Ok((self.root_fd.clone(), FileKind::Dir));
        }
        self.nodes.read().get(id).ok_or(VfsError::UnknownNode(id))
    }

    fn node_fd(&self, id: NodeId) -> Result<Arc<OwnedFd>> {
        self.node(id).map(|(fd, _)| fd)
    }

    /// The folder `id` for a change of a name in it: refused (ESTALE) if a peer's update
    /// removed, replaced or moved it (or a folder above it) away, as the kernel may still
    /// reach it through names it cached. Its names have no path here any more, so the change
    /// would take no lock, be reported to no peer, and land in the trash.
    fn parent_fd(&self, id: NodeId) -> Result<Arc<OwnedFd>> {
        self.check_not_replaced(id)?;
        self.node_fd(id)
    }

    /// Records one kernel reference to the inode behind `fd` (found as `parent/name` if `at` is
    /// given) and returns its attributes.
    fn remember(&self, fd: OwnedFd, st: &libc::stat, at: Option<(NodeId, &OsStr)>) -> Attr {
        let kind = FileKind::from_mode(st.st_mode);
        let id = self
            .nodes
            .write()
            .remember(fd, st.st_dev, st.st_ino, kind, at);
        attr_from_stat(id, st)
    }

    /// Looks `name` up in `parent` and records a kernel reference to it.
    fn lookup_ref(&self, parent: NodeId, parent_fd: BorrowedFd<'_>, name: &OsStr) -> Result<Attr> {
        // The kernel never looks these up (no NFS export support is negotiated); refusing them
        // keeps `..` of the root from ever naming the folder above the watch set.
        if name == "." || name == ".." {
            return Err(VfsError::InvalidName);
        }
        if is_reserved(name) {
            return Err(VfsError::os(libc::ENOENT));
        }
        let cname = cname(name)?;
        let fd = sys::openat(parent_fd, &cname, O_PATH_FLAGS, 0)?;
        let st = sys::fstat(fd.as_fd())?;
        Ok(self.remember(fd, &st, Some((parent, name))))
    }

    /// Looks `name` up in `parent`; the kernel now holds one more reference to the result.
    pub fn lookup(&self, parent: NodeId, name: &OsStr) -> Result<Attr> {
        bump(&self.counters.lookups);
        let r = self
            .node_fd(parent)
            .and_then(|pfd| self.lookup_ref(parent, pfd.as_fd(), name));
        // A missing name is the common answer to a lookup, not an error worth counting.
        if !matches!(&r, Err(VfsError::Os(Errno(libc::ENOENT)))) {
            return self.count(r);
        }
        r
    }

    /// Resolves a path from the root (for path-based adapters such as WinFsp). The kernel-style
    /// reference is taken on the final node only.
    pub fn resolve(&self, path: &RelPath) -> Result<Attr> {
        let mut current = self.getattr(ROOT, None)?;
        let mut first = true;
        for component in path.components() {
            let next = self.lookup(current.ino, component);
            if !first {
                self.forget(current.ino, 1);
            }
            current = next?;
            first = false;
        }
        if first {
            // The root: take the reference the caller will forget.
            self.nodes.write().add_ref(ROOT);
        }
        Ok(current)
    }

    /// The path of a node from the root of the watch set, as last seen (None once its name was
    /// unlinked). Locks are keyed by it.
    pub fn path(&self, id: NodeId) -> Option<RelPath> {
        self.nodes.read().path_of(id)
    }

    /// The path `parent/name` would have.
    pub fn child_path(&self, parent: NodeId, name: &OsStr) -> Option<RelPath> {
        self.nodes.read().child_path(parent, name)
    }

    /// Drops `n` kernel references to `id`.
    pub fn forget(&self, id: NodeId, n: u64) {
        self.nodes.write().forget(id, n);
    }

    /// Refuses to open (or truncate by name) a file a peer's update replaced, or one below a
    /// folder a peer's update replaced, removed or moved away: the kernel reached it through
    /// a name it cached before the update. ESTALE makes the kernel look the name up again and
    /// open the new version (the path walk retries with LOOKUP_REVAL).
    fn check_not_replaced(&self, id: NodeId) -> Result<()> {
        if self.nodes.read().is_replaced_here_or_above(id) {
            return Err(VfsError::os(libc::ESTALE));
        }
        Ok(())
    }

    // ---- attributes ----------------------------------------------------------------------

    pub fn getattr(&self, id: NodeId, fh: Option<u64>) -> Result<Attr> {
        bump(&self.counters.getattrs);
        let r = (|| {
            let st = match fh.and_then(|fh| self.files.read().get(&fh).cloned()) {
                Some(h) => sys::fstat(h.fd.as_fd())?,
                None => sys::fstat(self.node_fd(id)?.as_fd())?,
            };
            Ok(attr_from_stat(id, &st))
        })();
        self.count(r)
    }

    pub fn setattr(&self, id: NodeId, fh: Option<u64>, set: SetAttr) -> Result<Attr> {
        bump(&self.counters.setattrs);
        let r = (|| {
            if fh.is_none() {
                self.check_not_replaced(id)?;
            }
            let (fd, kind) = self.node(id)?;
            let fd = fd.as_fd();
            let mut meta_changed = false;
            if let Some(mode) = set.mode {
                if kind == FileKind::Symlink {
                    return Err(VfsError::os(libc::EOPNOTSUPP));
                }
                sys::fchmod_fd(fd, mode & 0o7777)?;
                meta_changed = true;
            }
            if set.uid.is_some() || set.gid.is_some() {
                sys::fchownat_fd(fd, set.uid.unwrap_or(u32::MAX), set.gid.unwrap_or(u32::MAX))?;
                meta_changed = true;
            }
            if let Some(size) = set.size {
                let handle = fh.and_then(|fh| self.files.read().get(&fh).cloned());
                // A truncate changes the document: it needs the lock, unless it comes through a
                // write handle that already holds it.
                let _guard = match &handle {
                    Some(h) if h.lock.is_some() => None,
                    _ => self.lock(self.path(id), "truncate")?,
                };
                if set.kill_suidgid {
                    kill_suidgid_fd(fd)?;
                }
                let old = sys::fstat(fd)?.st_size as u64;
                // A truncating read-only open (O_RDONLY|O_TRUNC) truncates through its handle
                // too, which cannot: by the node then.
                match handle {
                    Some(h) if sys::opened_for_writing(h.fd.as_fd()) => {
                        sys::ftruncate(h.fd.as_fd(), size)?
                    }
                    _ => sys::truncate_fd_path(fd, size)?,
                }
                let changed = old.min(size)..old.max(size);
                if self.has_writers(id) {
                    self.track_range(id, changed);
                } else if old != size {
                    if let Some(path) = self.replicated(self.path(id)) {
                        self.report(Change::Content {
                            path,
                            dirty: Some(vec![changed]),
                        });
                    }
                }
            }
            if set.atime.is_some() || set.mtime.is_some() {
                sys::utimens_fd(fd, &[timespec(set.atime), timespec(set.mtime)])?;
                // atime never replicates.
                meta_changed |= set.mtime.is_some();
            }
            if meta_changed {
                if let Some(path) = self.replicated(self.path(id)) {
                    self.report(Change::Meta { path });
                }
            }
            Ok(attr_from_stat(id, &sys::fstat(fd)?))
        })();
        self.count(r)
    }

    pub fn readlink(&self, id: NodeId) -> Result<Vec<u8>> {
        let r = self.node_fd(id).and_then(|fd| sys::readlink_fd(fd.as_fd()));
        self.count(r)
    }

    // ---- creating names --------------------------------------------------------------------

    /// Runs `make` in `parent` as the caller, then looks the new name up.
    fn create_node(
        &self,
        caller: Caller,
        parent: NodeId,
        name: &OsStr,
        make: impl FnOnce(BorrowedFd<'_>, &std::ffi::CStr) -> Result<()>,
    ) -> Result<Attr> {
        let pfd = self.parent_fd(parent)?;
        if is_reserved(name) {
            return Err(VfsError::os(libc::EPERM));
        }
        let cname = cname(name)?;
        // Creating a name (a node, a folder, a symlink, a hard link) takes that name's lock.
        let _guard = self.lock(self.child_path(parent, name), "create")?;
        {
            thread_setup();
            let _creds = CallerCreds::assume(caller.uid, caller.gid, caller.pid);
            make(pfd.as_fd(), &cname)?;
        }
        self.lookup_ref(parent, pfd.as_fd(), name)
    }

    pub fn mknod(
        &self,
        caller: Caller,
        parent: NodeId,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> Result<Attr> {
        bump(&self.counters.mknods);
        let r = self.create_node(caller, parent, name, |dir, n| {
            sys::mknodat(dir, n, mode, u64::from(rdev))
        });
        if r.as_ref().is_ok_and(|a| a.kind == FileKind::File) {
            if let Some(path) = self.replicated(self.child_path(parent, name)) {
                self.report(Change::Content { path, dirty: None });
            }
        }
        self.count(r)
    }

    pub fn mkdir(&self, caller: Caller, parent: NodeId, name: &OsStr, mode: u32) -> Result<Attr> {
        bump(&self.counters.mkdirs);
        let r = self.create_node(caller, parent, name, |dir, n| sys::mkdirat(dir, n, mode));
        if r.is_ok() {
            if let Some(path) = self.replicated(self.child_path(parent, name)) {
                self.report(Change::Mkdir { path });
            }
        }
        self.count(r)
    }

    pub fn symlink(
        &self,
        caller: Caller,
        parent: NodeId,
        name: &OsStr,
        target: &OsStr,
    ) -> Result<Attr> {
        bump(&self.counters.symlinks);
        let target = cname(target)?;
        let r = self.create_node(caller, parent, name, |dir, n| {
            sys::symlinkat(&target, dir, n)
        });
        if r.is_ok() {
            if let Some(path) = self.replicated(self.child_path(parent, name)) {
                self.report(Change::Symlink { path });
            }
        }
        self.count(r)
    }

    pub fn link(
        &self,
        caller: Caller,
        id: NodeId,
        newparent: NodeId,
        newname: &OsStr,
    ) -> Result<Attr> {
        bump(&self.counters.links);
        let existing = self.path(id);
        let r = self.node_fd(id).and_then(|fd| {
            self.create_node(caller, newparent, newname, |dir, n| {
                sys::link_fd(fd.as_fd(), dir, n)
            })
        });
        if r.is_ok() {
            if let Some(path) = self.replicated(self.child_path(newparent, newname)) {
                // A link to a name that does not replicate brings its content along.
                match self.replicated(existing) {
                    Some(existing) => self.report(Change::Link { existing, path }),
                    None => self.report(Change::Content { path, dirty: None }),
                }
            }
        }
        self.count(r)
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        caller: Caller,
        parent: NodeId,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Attr, Opened)> {
        bump(&self.counters.creates);
        let r = (|| {
            let pfd = self.parent_fd(parent)?;
            if is_reserved(name) {
                return Err(VfsError::os(libc::EPERM));
            }
            let cname = cname(name)?;
            // Creating a name takes its lock, also for a create that only opens an existing file.
            let guard = self.lock(self.child_path(parent, name), "create")?;
            let fd = {
                thread_setup();
                let _creds = CallerCreds::assume(caller.uid, caller.gid, caller.pid);
                sys::openat(
                    pfd.as_fd(),
                    &cname,
                    (flags | libc::O_CREAT | libc::O_NOFOLLOW) & !(libc::O_NOCTTY | libc::O_DIRECT),
                    mode,
                )?
            };
            // The node fd comes from the open file itself, so a concurrent rename of the name
            // cannot make the node and the handle disagree.
            let proc = ProcPath::new(fd.as_fd());
            let path_fd = sys::open_path(proc.as_cstr(), libc::O_PATH, 0)?;
            let st = sys::fstat(fd.as_fd())?;
            let attr = self.remember(path_fd, &st, Some((parent, name)));
            // A create opened for reading only (O_CREAT|O_RDONLY) does not keep the lock.
            let lock = if writes(flags) {
                guard.and_then(LockGuard::keep)
            } else {
                None
            };
            let w = writes(flags);
            if w {
                self.track_open(attr.ino, None, None);
            } else if let Some(path) = self.replicated(self.child_path(parent, name)) {
                // Created (or opened) read-only: no writer will report it.
                self.report(Change::Content { path, dirty: None });
            }
            let fh = self.add_file(fd, attr.ino, lock, w);
            let sets_id = sets_id(st.st_mode);
            let track = w && self.wants_tracking(st.st_size);
            Ok((attr, Opened { fh, sets_id, track }))
        })();
        self.count(r)
    }

    // ---- removing and moving names ---------------------------------------------------------

    pub fn unlink(&self, parent: NodeId, name: &OsStr) -> Result<()> {
        bump(&self.counters.unlinks);
        // smbd deletes without opening: the delete itself must respect another peer's lock.
        let r = self.parent_fd(parent).and_then(|pfd| {
            let _guard = self.lock(self.child_path(parent, name), "unlink")?;
            sys::unlinkat(pfd.as_fd(), &cname(name)?, 0)
        });
        if r.is_ok() {
            let path = self.replicated(self.child_path(parent, name));
            self.nodes.write().unlinked(parent, name);
            if let Some(path) = path {
                self.report(Change::Remove { path, held: true });
            }
        }
        self.count(r)
    }

    pub fn rmdir(&self, parent: NodeId, name: &OsStr) -> Result<()> {
        bump(&self.counters.rmdirs);
        let r = self.parent_fd(parent).and_then(|pfd| {
            self.check_below(self.child_path(parent, name), "rmdir")?;
            sys::unlinkat(pfd.as_fd(), &cname(name)?, libc::AT_REMOVEDIR)
        });
        if r.is_ok() {
            let path = self.replicated(self.child_path(parent, name));
            self.nodes.write().unlinked(parent, name);
            if let Some(path) = path {
                self.report(Change::Remove { path, held: false });
            }
        }
        self.count(r)
    }

    pub fn rename(
        &self,
        parent: NodeId,
        name: &OsStr,
        newparent: NodeId,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<()> {
        bump(&self.counters.renames);
        let r = (|| {
            let old_dir = self.parent_fd(parent)?;
            let new_dir = self.parent_fd(newparent)?;
            let oldname = cname(name)?;
            if is_reserved(newname) {
                return Err(VfsError::os(libc::EPERM));
            }
            let [_from_guard, to_guard] =
                self.lock_rename(&old_dir, parent, name, &new_dir, newparent, newname)?;
            let from_path = self.child_path(parent, name);
            let to_path = self.child_path(newparent, newname);
            let moved = sys::fstatat(old_dir.as_fd(), &oldname).ok();
            let newname_os = newname;
            let newname = cname(newname)?;
            sys::renameat2(
                old_dir.as_fd(),
                &oldname,
                new_dir.as_fd(),
                &newname,
                flags.0,
            )?;
            self.nodes.write().renamed(
                parent,
                name,
                newparent,
                OsStr::from_bytes(newname.as_bytes()),
                flags.0 & RenameFlags::EXCHANGE != 0,
            );
            self.report_rename(
                from_path,
                to_path,
                moved.as_ref(),
                newparent,
                newname_os,
                flags.0 & RenameFlags::EXCHANGE != 0,
            );
            // A file still open for writing that now has the name keeps the name's lock until
            // its last writer goes: no other office may write it meanwhile.
            let node = self.nodes.read().child(newparent, newname_os);
            if let Some(node) = node {
                let handles: Vec<u64> = self
                    .files
                    .read()
                    .iter()
                    .filter(|(_, h)| h.node == node && h.writes)
                    .map(|(fh, _)| *fh)
                    .collect();
                let mut dirty = self.dirty.lock();
                if let Some(d) = dirty.get_mut(&node).filter(|d| d.writers > 0) {
                    if let Some(path) = to_guard.and_then(LockGuard::keep) {
                        d.locks.push(path);
                    }
                    d.ship_after = handles;
                }
            }
            Ok(())
        })();
        self.count(r)
    }

    /// What a successful rename means for the peers (see OFFICE-SAVES.md): between replicated
    /// names a rename; onto a replicated name from a temp a content update (shipped now unless
    /// the file is still open for writing: then at its release); away to a temp a removal.
    fn report_rename(
        &self,
        from: Option<RelPath>,
        to: Option<RelPath>,
        moved: Option<&libc::stat>,
        newparent: NodeId,
        newname: &OsStr,
        exchange: bool,
    ) {
        let from = self.replicated(from);
        let to = self.replicated(to);
        let is_dir = moved.is_some_and(|st| FileKind::from_mode(st.st_mode) == FileKind::Dir);
        let node = self.nodes.read().child(newparent, newname);
        let open_for_writing = node.is_some_and(|n| self.has_writers(n));
        match (from, to) {
            (Some(from), Some(to)) if exchange => {
                self.report(Change::Content {
                    path: from,
                    dirty: None,
                });
                self.report(Change::Content {
                    path: to,
                    dirty: None,
                });
            }
            (Some(from), Some(to)) => self.report(Change::Rename { from, to }),
            (Some(from), None) => self.report(Change::Remove {
                path: from,
                held: !is_dir,
            }),
            (None, Some(to)) => {
                if !open_for_writing {
                    self.report(Change::Content {
                        path: to,
                        dirty: None,
                    });
                }
            }
            (None, None) => {}
        }
    }

    /// The locks a rename needs: renaming a name away and renaming onto a name both take that
    /// name's lock (vim renames the document away with no handle open; Office renames a temp
    /// onto it), and a folder with another peer's lock below it cannot move or be replaced.
    fn lock_rename(
        &self,
        old_dir: &OwnedFd,
        parent: NodeId,
        name: &OsStr,
        new_dir: &OwnedFd,
        newparent: NodeId,
        newname: &OsStr,
    ) -> Result<[Option<LockGuard<'_>>; 2]> {
        if self.locks.get().is_none() {
            return Ok([None, None]);
        }
        let from = self.child_path(parent, name);
        let to = self.child_path(newparent, newname);
        let is_dir = |dir: &OwnedFd, n: &OsStr| {
            cname(n)
                .ok()
                .and_then(|c| sys::fstatat(dir.as_fd(), &c).ok())
                .is_some_and(|st| FileKind::from_mode(st.st_mode) == FileKind::Dir)
        };
        if is_dir(old_dir, name) {
            self.check_below(from.clone(), "rename")?;
        }
        if is_dir(new_dir, newname) {
            self.check_below(to.clone(), "rename")?;
        }
        let a = self.lock(from, "rename")?;
        let b = self.lock(to, "rename onto")?;
        Ok([a, b])
    }

    // ---- files -----------------------------------------------------------------------------

    fn add_file(&self, fd: OwnedFd, node: NodeId, lock: Option<RelPath>, writes: bool) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        // A peer's update is patching this file in place: the open completes after it, so the
        // caller reads the old or the new version, never a mix. (Checked and inserted under
        // the same lock `remote_gate` takes, so no open slips in between.)
        let mut patching = self.patching.lock();
        while patching.contains(&node) {
            self.patched.wait(&mut patching);
        }
        self.files.write().insert(
            fh,
            Arc::new(FileHandle {
                fd,
                node,
                lock,
                writes,
            }),
        );
        fh
    }

    /// The open file behind a handle number.
    pub fn file(&self, fh: u64) -> Result<Arc<FileHandle>> {
        self.files
            .read()
            .get(&fh)
            .cloned()
            .ok_or(VfsError::UnknownHandle(fh))
    }

    /// Opens an existing node. `flags` are POSIX open flags (O_CREAT/O_EXCL already handled by
    /// the kernel; O_TRUNC honoured). `kill_suidgid`: the caller is unprivileged, so a truncating
    /// open clears setuid/setgid.
    pub fn open(&self, id: NodeId, flags: i32, kill_suidgid: bool) -> Result<Opened> {
        bump(&self.counters.opens);
        let r = (|| {
            self.check_not_replaced(id)?;
            let (fd, kind) = self.node(id)?;
            // A read-write open takes the name's lock before anything else happens; read-only
            // opens never lock. (Directories and devices are not documents.)
            let guard = if writes(flags) && kind == FileKind::File {
                self.lock(self.path(id), "write-open")?
            } else {
                None
            };
            if kill_suidgid && flags & libc::O_TRUNC != 0 {
                self.kill_suidgid(id, fd.as_fd())?;
            }
            let w = writes(flags) && kind == FileKind::File;
            let before = if w { sys::fstat(fd.as_fd()).ok() } else { None };
            let proc = ProcPath::new(fd.as_fd());
            let flags = flags & !OPEN_STRIP;
            let file = sys::open_path(proc.as_cstr(), flags, 0)?;
            let st = sys::fstat(file.as_fd())?;
            let sets_id = sets_id(st.st_mode);
            let track = w && self.wants_tracking(before.as_ref().map_or(0, |b| b.st_size));
            if w {
                let truncated = (flags & libc::O_TRUNC != 0)
                    .then(|| before.as_ref().map_or(0, |b| b.st_size as u64));
                self.track_open(id, before.as_ref(), truncated);
            }
            Ok(Opened {
                fh: self.add_file(file, id, guard.and_then(LockGuard::keep), w),
                sets_id,
                track,
            })
        })();
        self.count(r)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        bump(&self.counters.reads);
        let r = (|| {
            let h = self.file(fh)?;
            let mut buf = vec![0u8; size as usize];
            let mut done = 0;
            while done < buf.len() {
                let n = sys::pread(h.fd.as_fd(), &mut buf[done..], offset + done as u64)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            buf.truncate(done);
            add(&self.counters.bytes_read, done as u64);
            Ok(buf)
        })();
        self.count(r)
    }

    /// Clears setuid/setgid of the file behind handle `fh` now: for an unprivileged writer
    /// whose writes the drive will not see (kernel passthrough), instead of at its first write.
    pub fn kill_suidgid_now(&self, fh: u64) -> Result<()> {
        let h = self.file(fh)?;
        self.kill_suidgid(h.node, h.fd.as_fd())
    }

    /// Writes at `offset`. `kill_suidgid`: the writer is unprivileged (the kernel says so), so
    /// setuid/setgid are cleared first, as a write on the plain folder would.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_suidgid: bool) -> Result<u32> {
        bump(&self.counters.writes);
        let r = (|| {
            let h = self.file(fh)?;
            if kill_suidgid {
                self.kill_suidgid(h.node, h.fd.as_fd())?;
            }
            let mut done = 0;
            while done < data.len() {
                let n = sys::pwrite(h.fd.as_fd(), &data[done..], offset + done as u64)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            add(&self.counters.bytes_written, done as u64);
            self.track_range(h.node, offset..offset + done as u64);
            Ok(done as u32)
        })();
        self.count(r)
    }

    /// `close()` of one file descriptor. Writes already reached the backing file synchronously.
    pub fn flush(&self, fh: u64) -> Result<()> {
        self.file(fh).map(drop)
    }

    /// The last reference to an open file went away.
    pub fn release(&self, fh: u64) -> Result<()> {
        bump(&self.counters.releases);
        let handle = self.files.write().remove(&fh);
        match handle {
            Some(h) => {
                // The last writer reports the new content before the lock goes: the replicator
                // holds the lock until the peers have the new version.
                if h.writes {
                    self.track_release(h.node, fh, h.fd.as_fd());
                }
                // The last write handle of a name lets its lock go (lockd counts references).
                if let (Some(path), Some(locks)) = (&h.lock, self.locks.get()) {
                    locks.release(path);
                }
                Ok(())
            }
            None => self.count(Err(VfsError::UnknownHandle(fh))),
        }
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        bump(&self.counters.fsyncs);
        let r = self.file(fh).and_then(|h| {
            sys::fsync(h.fd.as_fd(), datasync)?;
            if h.writes {
                self.save_point(h.node, h.fd.as_fd());
            }
            Ok(())
        });
        self.count(r)
    }

    /// A writer fsynced: that is how an application that saves in place while keeping the
    /// document open (LibreOffice on linked files, databases) marks a consistent version, so
    /// it ships now rather than at the close (which ships again only if more changed).
    fn save_point(&self, node: NodeId, fd: BorrowedFd<'_>) {
        let Some(path) = self.replicated(self.path(node)) else {
            return;
        };
        let now = sys::fstat(fd).ok();
        let dirty = {
            let mut map = self.dirty.lock();
            let Some(d) = map.get_mut(&node) else { return };
            let unchanged =
                d.ranges.is_empty() && d.before.is_some() && now.as_ref().map(stamp) == d.before;
            if unchanged {
                return;
            }
            let dirty = if d.untracked || d.before.is_none() {
                None
            } else {
                Some(std::mem::take(&mut d.ranges))
            };
            // From here on, only what changes after this point counts.
            d.before = now.as_ref().map(stamp);
            dirty
        };
        self.report(Change::Content { path, dirty });
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let r = self.file(fh).and_then(|h| {
            sys::fallocate(h.fd.as_fd(), mode, offset, length)?;
            if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
                // Data moved: no range describes that.
                if let Some(d) = self.dirty.lock().get_mut(&h.node) {
                    d.untracked = true;
                }
            } else {
                self.track_range(h.node, offset..offset.saturating_add(length));
            }
            Ok(())
        });
        self.count(r)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let r = self
            .file(fh)
            .and_then(|h| sys::lseek(h.fd.as_fd(), offset, whence));
        self.count(r)
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    ) -> Result<u32> {
        let r = (|| {
            let src = self.file(fh_in)?;
            let dst = self.file(fh_out)?;
            let len = len.min(u64::from(u32::MAX));
            let n =
                sys::copy_file_range(src.fd.as_fd(), offset_in, dst.fd.as_fd(), offset_out, len)?;
            add(&self.counters.bytes_written, n as u64);
            self.track_range(dst.node, offset_out..offset_out + n as u64);
            Ok(n as u32)
        })();
        self.count(r)
    }

    // ---- directories -----------------------------------------------------------------------

    pub fn opendir(&self, id: NodeId) -> Result<u64> {
        let r = (|| {
            let fd = self.node_fd(id)?;
            let dir = sys::openat(fd.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
            self.dirs.write().insert(
                fh,
                Arc::new(DirHandle {
                    fd: dir,
                    node: id,
                    entries: Mutex::new(Vec::new()),
                }),
            );
            Ok(fh)
        })();
        self.count(r)
    }

    fn dir(&self, fh: u64) -> Result<Arc<DirHandle>> {
        self.dirs
            .read()
            .get(&fh)
            .cloned()
            .ok_or(VfsError::UnknownHandle(fh))
    }

    /// Lists entries after `offset`, handing each to `fill` until it reports the reply full.
    /// With `plus`, each entry (but `.` and `..`) also carries its attributes and a kernel
    /// reference, taken only for entries `fill` accepted.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        plus: bool,
        mut fill: impl FnMut(&DirEntry, Option<&Attr>) -> bool,
    ) -> Result<()> {
        bump(&self.counters.readdirs);
        let r = (|| {
            let dir = self.dir(fh)?;
            let mut entries = dir.entries.lock();
            if offset == 0 {
                *entries = sys::read_dir_all(dir.fd.as_fd())?;
            }
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            for (i, raw) in entries.iter().enumerate().skip(start) {
                let name = OsStr::from_bytes(&raw.name);
                if is_reserved(name) {
                    continue;
                }
                let dot = raw.name == b"." || raw.name == b"..";
                let (kind, attr) = if plus && !dot {
                    match self.lookup_ref(dir.node, dir.fd.as_fd(), name) {
                        Ok(a) => (a.kind, Some(a)),
                        // Gone since the snapshot: leave it out, as a fresh listing would.
                        Err(VfsError::Os(Errno(libc::ENOENT))) => continue,
                        Err(e) => return Err(e),
                    }
                } else {
                    let kind = match FileKind::from_dirent(raw.kind) {
                        Some(k) => k,
                        None => match sys::fstatat(dir.fd.as_fd(), &cname(name)?) {
                            Ok(st) => FileKind::from_mode(st.st_mode),
                            Err(_) => continue,
                        },
                    };
                    (kind, None)
                };
                let entry = DirEntry {
                    ino: self.dirent_ino(raw.ino),
                    offset: i as u64 + 1,
                    kind,
                    name: name.to_os_string(),
                };
                if fill(&entry, attr.as_ref()) {
                    if let Some(a) = attr {
                        self.forget(a.ino, 1);
                    }
                    break;
                }
            }
            Ok(())
        })();
        self.count(r)
    }

    fn dirent_ino(&self, ino: u64) -> u64 {
        if ino == self.root_ino { ROOT } else { ino }
    }

    pub fn releasedir(&self, fh: u64) -> Result<()> {
        match self.dirs.write().remove(&fh) {
            Some(_) => Ok(()),
            None => Err(VfsError::UnknownHandle(fh)),
        }
    }

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> Result<()> {
        let r = self
            .dir(fh)
            .and_then(|d| sys::fsync(d.fd.as_fd(), datasync));
        self.count(r)
    }

    // ---- the rest --------------------------------------------------------------------------

    pub fn statfs(&self, id: NodeId) -> Result<StatFs> {
        let r = (|| {
            let fd = self.node_fd(id)?;
            let st = sys::fstatvfs(fd.as_fd())?;
            Ok(StatFs {
                blocks: st.f_blocks,
                bfree: st.f_bfree,
                bavail: st.f_bavail,
                files: st.f_files,
                ffree: st.f_ffree,
                bsize: st.f_bsize as u32,
                namelen: st.f_namemax as u32,
                frsize: st.f_frsize as u32,
            })
        })();
        self.count(r)
    }

    pub fn access(&self, caller: Caller, id: NodeId, mask: i32) -> Result<()> {
        let r = (|| {
            let fd = self.node_fd(id)?;
            let proc = ProcPath::new(fd.as_fd());
            let _creds = CallerCreds::assume(caller.uid, caller.gid, caller.pid);
            // SAFETY: NUL-terminated path; AT_EACCESS checks with the filesystem identity the
            // guard just assumed.
            sys::cvt(unsafe {
                libc::faccessat(
                    libc::AT_FDCWD,
                    proc.as_cstr().as_ptr(),
                    mask,
                    libc::AT_EACCESS,
                )
            })
            .map(drop)
        })();
        self.count(r)
    }

    /// Where xattr calls reach `id`: its `O_PATH` fd, or for a symlink the directory and name it
    /// was last seen under, checked to still be that very inode (a symlink cannot be opened,
    /// and the xattr calls refuse `O_PATH` fds). A symlink whose name is gone answers ENOTSUP,
    /// as libfuse's passthrough_hp does for every symlink.
    fn xattr_target(&self, id: NodeId) -> Result<sys::xattr::Target> {
        bump(&self.counters.xattr_ops);
        let (fd, kind) = self.node(id)?;
        if kind != FileKind::Symlink {
            return Ok(sys::xattr::Target::Fd(fd));
        }
        let Some((dir, name)) = self.nodes.read().loc_of(id) else {
            return Err(VfsError::os(libc::ENOTSUP));
        };
        let name = cname(&name)?;
        let want = sys::fstat(fd.as_fd())?;
        match sys::fstatat(dir.as_fd(), &name) {
            Ok(st) if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino) => {
                Ok(sys::xattr::Target::Link(dir, name))
            }
            _ => Err(VfsError::os(libc::ENOTSUP)),
        }
    }

    pub fn getxattr(&self, id: NodeId, name: &OsStr, size: u32) -> Result<XattrReply> {
        let r = (|| {
            let target = self.xattr_target(id)?;
            let name = cname(name)?;
            let mut buf = vec![0u8; size as usize];
            let n = sys::xattr::get(&target, &name, &mut buf)?;
            Ok(sized_reply(buf, n, size))
        })();
        self.count_xattr(r)
    }

    pub fn listxattr(&self, id: NodeId, size: u32) -> Result<XattrReply> {
        let r = (|| {
            let target = self.xattr_target(id)?;
            let mut buf = vec![0u8; size as usize];
            let n = sys::xattr::list(&target, &mut buf)?;
            Ok(sized_reply(buf, n, size))
        })();
        self.count_xattr(r)
    }

    pub fn setxattr(&self, id: NodeId, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let r = (|| {
            let target = self.xattr_target(id)?;
            sys::xattr::set(&target, &cname(name)?, value, flags)?;
            if let Some(path) = self.replicated(self.path(id)) {
                self.report(Change::Meta { path });
            }
            Ok(())
        })();
        self.count_xattr(r)
    }

    pub fn removexattr(&self, id: NodeId, name: &OsStr) -> Result<()> {
        let r = (|| {
            let target = self.xattr_target(id)?;
            sys::xattr::remove(&target, &cname(name)?)?;
            if let Some(path) = self.replicated(self.path(id)) {
                self.report(Change::Meta { path });
            }
            Ok(())
        })();
        self.count_xattr(r)
    }

    /// ENODATA is the ordinary answer for an absent attribute (Samba probes constantly).
    fn count_xattr<T>(&self, r: Result<T>) -> Result<T> {
        match &r {
            Err(VfsError::Os(Errno(libc::ENODATA))) => r,
            _ => self.count(r),
        }
    }
}

/// Names peerfs keeps for itself in the backing folder (the replicator's intermediate files):
/// hidden from listings and lookups, refused for creation.
pub const RESERVED_PREFIX: &[u8] = b".peerfs-tmp-";

fn is_reserved(name: &OsStr) -> bool {
    name.as_bytes().starts_with(RESERVED_PREFIX)
}

fn is_reserved_path(path: &RelPath) -> bool {
    path.components().any(is_reserved)
}

/// Setuid, or setgid with group execute (setgid without it marks mandatory locking, which a
/// write does not clear).
fn sets_id(mode: u32) -> bool {
    mode & libc::S_ISUID != 0
        || mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP
}

/// Clears setuid/setgid (under the rule of [`sets_id`]) of the inode behind `fd`; true if the
/// mode changed.
fn kill_suidgid_fd(fd: BorrowedFd<'_>) -> Result<bool> {
    let mode = sys::fstat(fd)?.st_mode;
    if !sets_id(mode) {
        return Ok(false);
    }
    let mut new = mode & 0o7777 & !libc::S_ISUID;
    if new & libc::S_IXGRP != 0 {
        new &= !libc::S_ISGID;
    }
    sys::fchmod_fd(fd, new)?;
    Ok(true)
}

/// Whether open flags ask for writing (or truncating, which writes).
fn writes(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

/// One reference on a path's lock, released when dropped unless kept by a write handle.
struct LockGuard<'a> {
    locks: &'a dyn Locks,
    path: Option<RelPath>,
}

impl LockGuard<'_> {
    /// Hands the reference over to a write handle (released at its release).
    fn keep(mut self) -> Option<RelPath> {
        self.path.take()
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            self.locks.release(&path);
        }
    }
}

fn sized_reply(mut buf: Vec<u8>, n: usize, size: u32) -> XattrReply {
    if size == 0 {
        XattrReply::Size(n as u32)
    } else {
        buf.truncate(n);
        XattrReply::Data(buf)
    }
}

fn raise_fd_limit() {
    // As root the hard limit itself can rise, up to the kernel's per-process maximum.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok());
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to fill in and then pass back.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if let Some(max) = nr_open.filter(|m| *m > lim.rlim_max) {
            let raised = libc::rlimit {
                rlim_cur: max,
                rlim_max: max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return;
            }
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(
                    "cannot raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Gives the calling thread its own umask of 0, once: the kernel applied the caller's umask to
/// the modes it sends, and the daemon's own umask must not strip them again. (umask lives in the
/// fs_struct, which a thread can unshare; the daemon's other threads keep theirs.)
fn thread_setup() {
    thread_local! {
        static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    DONE.with(|done| {
        if !done.get() {
            // SAFETY: unshare(CLONE_FS) only detaches this thread's cwd/root/umask; umask
            // cannot fail.
            unsafe {
                if libc::unshare(libc::CLONE_FS) == 0 {
                    libc::umask(0);
                } else {
                    tracing::error!(
                        "unshare(CLONE_FS) failed: {}; new files get the daemon's umask",
                        std::io::Error::last_os_error()
                    );
                }
            }
            done.set(true);
        }
    });
}

fn timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
            Err(e) => {
                // Before 1970: a negative second count with a non-negative nanosecond part.
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nanos = d.subsec_nanos() as i64;
                if nanos > 0 {
                    secs -= 1;
                    nanos = 1_000_000_000 - nanos;
                }
                libc::timespec {
                    tv_sec: secs as libc::time_t,
                    tv_nsec: nanos as libc::c_long,
                }
            }
        },
    }
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn attr_from_stat(ino: NodeId, st: &libc::stat) -> Attr {
    Attr {
        ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        kind: FileKind::from_mode(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
    }
}

#[cfg(test)]
mod tests;
