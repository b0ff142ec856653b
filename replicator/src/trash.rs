//! The trash: a deletion (or a replace) that arrives from a peer never destroys a file; the
//! receiver moves it here, under `STATE/trash`, keeping its path, and users bring it back with
//! `peerfs trash restore`.
//!
//! Layout, one folder per entry:
//!
//! ```text
//! STATE/trash/20261125T103200.123Z-0001/.peerfs-entry      metadata (JSON)
//! STATE/trash/20261125T103200.123Z-0001/files/<rel path>   the object, as it was
//! ```
//!
//! The entry id is the UTC deletion time to the millisecond plus a counter, so ids sort by age.
//! The object sits below `files/` (not beside the metadata), so no name in the drive can collide
//! with `.peerfs-entry`.
//!
//! **A delete is a rename.** [`Trash::put`] resolves the parent beneath the backing root (no
//! `..`, no symlink leading out; the last component is never followed, so a symlink is trashed
//! as a symlink) and `renameat`s the object into the entry. Only when the state folder is on
//! another filesystem (EXDEV) is the object copied (recursively, keeping mode, owner, times,
//! `user.*` xattrs and symlinks), then removed; something changed in the source while it was
//! being copied is left in place rather than deleted unseen.
//!
//! **Crash safety.** The entry folder, its metadata and the folders leading to the object's
//! place are written and fsynced before the rename; both parents are fsynced after it. A crash
//! therefore leaves either the object in place (and a *half-made* entry: metadata, no data) or
//! the object in a complete entry. Half-made entries are ignored by [`Trash::list`] and removed by
//! [`Trash::sweep`] (after a minute, so a `put` in progress in another process is not disturbed).
//! Restores remove the metadata before the emptied folder, so an interrupted cleanup is also
//! just a half-made entry.
//!
//! Everything is done with descriptor-relative calls (`*at`), so paths up to `PATH_MAX` below
//! the trash work, and a symlink planted in the trash cannot redirect a restore or a sweep.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use peerfs_proto::RelPath;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};

use crate::apply::TMP_PREFIX;
use crate::beneath;

/// The trash folder's name inside the state folder.
pub const TRASH_DIR: &str = "trash";
/// The metadata file inside each entry folder.
pub const ENTRY_META: &str = ".peerfs-entry";
/// How long entries are kept when the config says nothing.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 86_400);

const META: &CStr = c".peerfs-entry";
const META_TMP: &CStr = c".peerfs-entry.tmp";
const FILES: &CStr = c"files";
const META_VERSION: u32 = 1;
/// Metadata is a few hundred bytes; anything much larger is not ours.
const MAX_META_BYTES: u64 = 64 * 1024;
/// A half-made entry younger than this may be a `put` in progress (in another process).
const HALF_MADE_GRACE: Duration = Duration::from_secs(60);
/// Candidate names tried for a restore onto a taken name.
const MAX_RESTORE_NAMES: u32 = 1000;
/// Longest file name (bytes), as RelPath enforces.
const NAME_MAX: usize = 255;

static SEQ: AtomicU32 = AtomicU32::new(0);
static TMP_SEQ: AtomicU32 = AtomicU32::new(0);

/// What was trashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A FIFO, socket or device node.
    Other,
}

impl EntryKind {
    fn of_mode(mode: libc::mode_t) -> EntryKind {
        match mode & libc::S_IFMT {
            libc::S_IFREG => EntryKind::File,
            libc::S_IFDIR => EntryKind::Dir,
            libc::S_IFLNK => EntryKind::Symlink,
            _ => EntryKind::Other,
        }
    }

    /// `"file"`, `"dir"`, `"symlink"` or `"other"`.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Other => "other",
        }
    }
}

/// One object in the trash.
///
/// Serializes (for `peerfs trash list --json` and the control socket) as
/// `{"id","path","deleted_at" (RFC 3339 UTC, ms),"deleted_at_unix_ms","origin","kind","size"}`,
/// with the path as text (non-UTF-8 bytes replaced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrashEntry {
    /// The entry folder's name, e.g. `20261125T103200.123Z-0001`; sorts by deletion time.
    pub id: String,
    /// Where the object was, relative to the drive's root.
    pub path: RelPath,
    /// When it was moved here (millisecond precision).
    pub deleted_at: SystemTime,
    /// The peer whose deletion (or replace) put it here.
    pub origin: String,
    pub kind: EntryKind,
    /// Bytes: a file's size, a symlink's target length, a folder's total.
    pub size: u64,
}

impl Serialize for TrashEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ms = unix_ms(self.deleted_at);
        let mut m = s.serialize_struct("TrashEntry", 7)?;
        m.serialize_field("id", &self.id)?;
        m.serialize_field("path", &self.path.to_string())?;
        m.serialize_field("deleted_at", &rfc3339_ms(ms))?;
        m.serialize_field("deleted_at_unix_ms", &ms)?;
        m.serialize_field("origin", &self.origin)?;
        m.serialize_field("kind", &self.kind)?;
        m.serialize_field("size", &self.size)?;
        m.end()
    }
}

/// What [`Trash::restore`] did: `entry` describes what came back (for a restore of one item
/// out of a trashed folder, that item), `restored_to` where it went: `entry.path`, or a free
/// name beside it when that was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Restored {
    pub entry: TrashEntry,
    #[serde(serialize_with = "relpath_text")]
    pub restored_to: RelPath,
}

fn relpath_text<S: Serializer>(p: &RelPath, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string())
}

/// What [`Trash::sweep`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SweepStats {
    /// Entries older than the retention, removed.
    pub removed: u64,
    /// Bytes those entries held.
    pub removed_bytes: u64,
    /// Half-made entries (a crash between their creation and the move) removed.
    pub half_made: u64,
    /// Entries kept.
    pub kept: u64,
}

/// The metadata file, as written.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    v: u32,
    /// The path when it is UTF-8 ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    /// ... its bytes in hex otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path_hex: Option<String>,
    deleted_at_unix_ms: u64,
    /// For people reading the file; `deleted_at_unix_ms` is what counts.
    #[serde(default)]
    deleted_at: String,
    origin: String,
    kind: EntryKind,
    size: u64,
}

impl Meta {
    fn of(entry: &TrashEntry) -> Meta {
        let ms = unix_ms(entry.deleted_at);
        let (path, path_hex) = match std::str::from_utf8(entry.path.as_bytes()) {
            Ok(s) => (Some(s.to_string()), None),
            Err(_) => (None, Some(hex(entry.path.as_bytes()))),
        };
        Meta {
            v: META_VERSION,
            path,
            path_hex,
            deleted_at_unix_ms: ms,
            deleted_at: rfc3339_ms(ms),
            origin: entry.origin.clone(),
            kind: entry.kind,
            size: entry.size,
        }
    }

    fn into_entry(self, id: &str) -> Result<TrashEntry, String> {
        let bytes = match (self.path, self.path_hex) {
            (_, Some(h)) => unhex(&h).ok_or("path_hex is not hex")?,
            (Some(p), None) => p.into_bytes(),
            (None, None) => return Err("no path".into()),
        };
        let path = RelPath::new(&bytes).map_err(|e| format!("path: {e}"))?;
        if path.is_root() {
            return Err("path is the drive's root".into());
        }
        Ok(TrashEntry {
            id: id.to_string(),
            path,
            deleted_at: UNIX_EPOCH + Duration::from_millis(self.deleted_at_unix_ms),
            origin: self.origin,
            kind: self.kind,
            size: self.size,
        })
    }
}

/// What one folder in the trash turned out to be.
enum Scanned {
    /// A complete entry (metadata and data).
    Entry(TrashEntry),
    /// Metadata without data, or nothing at all: an interrupted put, restore or sweep.
    HalfMade { id: String, mtime: SystemTime },
    /// Data without readable metadata: not something peerfs wrote; kept for the retention.
    Garbage {
        id: String,
        mtime: SystemTime,
        why: String,
    },
}

/// The trash of one drive: `STATE/trash`.
pub struct Trash {
    dir: PathBuf,
    fd: OwnedFd,
    exdev_warned: AtomicBool,
    /// Serializes restores and sweeps in this process (puts need no lock: each makes its own
    /// entry folder).
    lock: Mutex<()>,
}

impl std::fmt::Debug for Trash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trash").field("dir", &self.dir).finish()
    }
}

impl Trash {
    /// Opens `state_dir/trash`, creating it (and `state_dir`) with mode 0700 when missing.
    /// A `trash` that is a symlink or not a folder is refused.
    pub fn open(state_dir: &Path) -> io::Result<Trash> {
        let dir = state_dir.join(TRASH_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| ctx(e, format!("cannot create {}", dir.display())))?;
        let cdir = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in state path"))?;
        let fd = openat(
            None,
            &cdir,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| ctx(e, format!("cannot open {}", dir.display())))?;
        let st = fstat(fd.as_fd())?;
        if st.st_mode & 0o777 != 0o700 {
            fchmod(fd.as_fd(), 0o700)
                .map_err(|e| ctx(e, format!("cannot restrict {} to 0700", dir.display())))?;
        }
        Ok(Trash {
            dir,
            fd,
            exdev_warned: AtomicBool::new(false),
            lock: Mutex::new(()),
        })
    }

    /// The trash folder (`STATE/trash`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves the object at `rel` beneath `root` (the backing folder) into a new entry, recording
    /// `origin` as the peer that deleted it. The last component is not followed: a symlink is
    /// trashed as a symlink, a folder with everything in it.
    ///
    /// Errors keep their `io::ErrorKind` (`NotFound`: nothing at `rel`) and name the path; on
    /// any error the object is where it was.
    pub fn put(&self, root: BorrowedFd<'_>, rel: &RelPath, origin: &str) -> io::Result<TrashEntry> {
        self.put_as(root, rel, rel, origin)
    }

    /// [`Trash::put`] of the object now at `from`, recorded (and restored) as `rel`: a file a
    /// rename replaced is first swapped out of the way atomically (so readers never miss the
    /// name), then trashed under the name it had.
    pub fn put_as(
        &self,
        root: BorrowedFd<'_>,
        from: &RelPath,
        rel: &RelPath,
        origin: &str,
    ) -> io::Result<TrashEntry> {
        let at = |e: io::Error| ctx(e, format!("cannot move {rel} to the trash"));
        if rel.is_root() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot move the drive's root to the trash",
            ));
        }
        let (src_dir, name) =
            beneath::open_parent(root, from, false).map_err(|e| outside(e, from))?;
        let (kind, size) = tree_size(src_dir.as_fd(), &name).map_err(at)?;
        let now = now_ms();
        let (id, entry_fd) = self.new_entry_dir(now).map_err(at)?;
        let entry = TrashEntry {
            id: id.clone(),
            path: rel.clone(),
            deleted_at: now,
            origin: origin.to_string(),
            kind,
            size,
        };
        let result = (|| {
            write_meta(entry_fd.as_fd(), META, &Meta::of(&entry))?;
            let (dst_dir, dst_name) = self.prepare_data_parent(entry_fd.as_fd(), rel)?;
            // The entry is fresh: the object's own name is free (anything else is an error).
            self.move_object(src_dir.as_fd(), &name, dst_dir.as_fd(), |n| {
                (n == 0).then(|| dst_name.clone())
            })?;
            fsync_dir(dst_dir.as_fd())?;
            fsync_dir(src_dir.as_fd())
        })();
        if let Err(e) = result {
            if let Ok(false) = self.data_exists_in(entry_fd.as_fd(), rel) {
                // Nothing moved: drop the half-made entry.
                if let Err(ce) = remove_tree(self.fd.as_fd(), &cstr(id.as_bytes())?) {
                    tracing::warn!("trash: cannot remove half-made entry {id}: {ce}");
                }
                return Err(at(e));
            }
            // The object (or a copy of it) is in the entry: never remove that.
            tracing::warn!("trash: {rel} is kept as {id}, but the move did not finish: {e}");
            return Err(ctx(
                e,
                format!("{rel} is in the trash as {id}, but the move did not finish"),
            ));
        }
        tracing::debug!(
            "trash: {rel} ({}, {size} bytes) deleted by {origin:?} kept as {id}",
            kind.as_str()
        );
        Ok(entry)
    }

    /// The complete entries, oldest first. Half-made entries are skipped quietly, unreadable
    /// ones with a warning.
    pub fn list(&self) -> io::Result<Vec<TrashEntry>> {
        let mut out: Vec<TrashEntry> = self
            .scan()?
            .into_iter()
            .filter_map(|s| match s {
                Scanned::Entry(e) => Some(e),
                Scanned::HalfMade { id, .. } => {
                    tracing::debug!("trash: {id} is half-made; skipped");
                    None
                }
                Scanned::Garbage { id, why, .. } => {
                    tracing::warn!("trash: {}/{id}: {why}; skipped", self.dir.display());
                    None
                }
            })
            .collect();
        out.sort_by(|a, b| (a.deleted_at, &a.id).cmp(&(b.deleted_at, &b.id)));
        Ok(out)
    }

    /// Brings `rel` back beneath `root`: the newest entry for `rel` (or the entry `id`, which
    /// must hold `rel`), or, when no entry is `rel` itself, `rel` out of the newest trashed
    /// folder containing it. Missing parent folders are created. When something exists at
    /// `rel`, the object goes to a free name beside it, `name (restored 2026-11-25 10.32).ext`
    /// (the deletion time, UTC). An entry emptied by the restore is removed.
    pub fn restore(
        &self,
        root: BorrowedFd<'_>,
        rel: &RelPath,
        id: Option<&str>,
    ) -> io::Result<Restored> {
        let _guard = self.lock.lock();
        if rel.is_root() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot restore the drive's root",
            ));
        }
        let entries = self.list()?;
        let found = match id {
            Some(id) => {
                let e = entries.iter().find(|e| e.id == id).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no trash entry {id:?} (see `peerfs trash list`)"),
                    )
                })?;
                if !rel.starts_with(&e.path) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("trash entry {id} holds {}, not {rel}", e.path),
                    ));
                }
                Some(e)
            }
            None => entries.iter().rev().find(|e| e.path == *rel).or_else(|| {
                // No entry is `rel` itself: the newest trashed folder that still holds it.
                entries.iter().rev().find(|e| {
                    e.kind == EntryKind::Dir
                        && rel.starts_with(&e.path)
                        && self.data_exists(&e.id, rel).unwrap_or(false)
                })
            }),
        };
        let Some(entry) = found else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{rel} is not in the trash (see `peerfs trash list`)"),
            ));
        };
        let whole = entry.path == *rel;
        let at = |e: io::Error| ctx(e, format!("cannot restore {rel} from {}", entry.id));

        let entry_fd = self.open_entry(&entry.id).map_err(at)?;
        let files = openat(
            Some(entry_fd.as_fd()),
            FILES,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(at)?;
        let (src_dir, src_name) = beneath::open_parent(files.as_fd(), rel, false).map_err(at)?;
        let (kind, size) = if whole {
            (entry.kind, entry.size)
        } else {
            tree_size(src_dir.as_fd(), &src_name).map_err(at)?
        };
        let (dst_dir, dst_name) =
            beneath::open_parent(root, rel, true).map_err(|e| outside(e, rel))?;
        let (rel_parent, _) = rel
            .split_last()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let name_os = OsStr::from_bytes(dst_name.to_bytes());
        let used = self
            .move_object(src_dir.as_fd(), &src_name, dst_dir.as_fd(), |n| match n {
                0 => Some(dst_name.clone()),
                n if n <= MAX_RESTORE_NAMES => {
                    cstr(&restored_name(name_os, kind, entry.deleted_at, n)).ok()
                }
                _ => None,
            })
            .map_err(at)?;
        fsync_dir(dst_dir.as_fd()).map_err(at)?;
        fsync_dir(src_dir.as_fd()).map_err(at)?;
        let restored_to = rel_parent
            .join(OsStr::from_bytes(used.to_bytes()))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;

        if whole {
            // Metadata first: an interrupted cleanup leaves a half-made entry for sweep.
            let cleanup = unlinkat(entry_fd.as_fd(), META, 0)
                .and_then(|()| fsync_dir(entry_fd.as_fd()))
                .and_then(|()| remove_tree(self.fd.as_fd(), &cstr(entry.id.as_bytes())?))
                .and_then(|_| fsync_dir(self.fd.as_fd()));
            if let Err(e) = cleanup {
                tracing::warn!(
                    "trash: {} restored, but its emptied entry stays: {e}",
                    entry.id
                );
            }
        } else {
            // The rest of the folder stays in the trash; keep its size honest.
            let mut rest = entry.clone();
            rest.size = rest.size.saturating_sub(size);
            if let Err(e) = write_meta(entry_fd.as_fd(), META, &Meta::of(&rest)) {
                tracing::warn!("trash: {}: cannot update its size: {e}", entry.id);
            }
        }
        tracing::info!("trash: {rel} restored from {} to {restored_to}", entry.id);
        Ok(Restored {
            entry: TrashEntry {
                id: entry.id.clone(),
                path: rel.clone(),
                deleted_at: entry.deleted_at,
                origin: entry.origin.clone(),
                kind,
                size,
            },
            restored_to,
        })
    }

    /// Deletes entries deleted `retention` or longer before `now`, half-made entries older
    /// than a minute, and folders without readable metadata older than `retention` (by their
    /// modification time).
    pub fn sweep(&self, retention: Duration, now: SystemTime) -> io::Result<SweepStats> {
        let _guard = self.lock.lock();
        let age = |t: SystemTime| now.duration_since(t).unwrap_or(Duration::ZERO);
        let mut stats = SweepStats::default();
        for s in self.scan()? {
            let (id, expired, half_made) = match &s {
                Scanned::Entry(e) => (&e.id, age(e.deleted_at) >= retention, false),
                Scanned::HalfMade { id, mtime } => (id, age(*mtime) > HALF_MADE_GRACE, true),
                Scanned::Garbage { id, mtime, why } => {
                    let expired = age(*mtime) >= retention;
                    if expired {
                        tracing::warn!("trash: removing {id} ({why}) after the retention");
                    }
                    (id, expired, false)
                }
            };
            if !expired {
                stats.kept += 1;
                continue;
            }
            match self.remove_entry(id) {
                Ok(bytes) if half_made => {
                    stats.half_made += 1;
                    tracing::debug!("trash: removed half-made entry {id} ({bytes} bytes)");
                }
                Ok(bytes) => {
                    stats.removed += 1;
                    stats.removed_bytes += bytes;
                }
                Err(e) => {
                    tracing::warn!("trash: cannot remove {id}: {e}");
                    stats.kept += 1;
                }
            }
        }
        if stats.removed + stats.half_made > 0 {
            fsync_dir(self.fd.as_fd())?;
            tracing::info!(
                "trash: swept {} entries ({} bytes) and {} half-made; {} kept",
                stats.removed,
                stats.removed_bytes,
                stats.half_made,
                stats.kept
            );
        }
        Ok(stats)
    }

    // ---- internals ----

    /// Every entry folder, classified. Names starting with '.' and non-folders are not ours
    /// (non-folders get a warning).
    fn scan(&self) -> io::Result<Vec<Scanned>> {
        let names = read_dir(self.fd.as_fd())
            .map_err(|e| ctx(e, format!("cannot list {}", self.dir.display())))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if name.to_bytes().starts_with(b".") {
                continue;
            }
            let Ok(id) = std::str::from_utf8(name.to_bytes()).map(str::to_string) else {
                tracing::warn!(
                    "trash: {}/{}: not an entry name; skipped",
                    self.dir.display(),
                    name.to_string_lossy()
                );
                continue;
            };
            let entry_fd = match self.open_entry(&id) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!("trash: {}/{id}: {e}; skipped", self.dir.display());
                    continue;
                }
            };
            let mtime = fstat(entry_fd.as_fd())
                .map(|st| system_time(st.st_mtime, st.st_mtime_nsec))
                .unwrap_or(UNIX_EPOCH);
            let has_data = || -> bool {
                openat(
                    Some(entry_fd.as_fd()),
                    FILES,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )
                .and_then(|fd| read_dir(fd.as_fd()))
                .map(|names| !names.is_empty())
                .unwrap_or(false)
            };
            let scanned = match read_meta(entry_fd.as_fd()) {
                Ok(meta) => match meta.into_entry(&id) {
                    Ok(e) => match self.data_exists_in(entry_fd.as_fd(), &e.path) {
                        Ok(true) => Scanned::Entry(e),
                        Ok(false) => Scanned::HalfMade { id, mtime },
                        Err(err) => Scanned::Garbage {
                            id,
                            mtime,
                            why: format!("cannot reach its data: {err}"),
                        },
                    },
                    Err(why) if has_data() => Scanned::Garbage {
                        id,
                        mtime,
                        why: format!("bad metadata: {why}"),
                    },
                    Err(_) => Scanned::HalfMade { id, mtime },
                },
                Err(e) if has_data() => Scanned::Garbage {
                    id,
                    mtime,
                    why: format!("unreadable metadata: {e}"),
                },
                Err(_) => Scanned::HalfMade { id, mtime },
            };
            out.push(scanned);
        }
        Ok(out)
    }

    fn open_entry(&self, id: &str) -> io::Result<OwnedFd> {
        if id.is_empty() || id.starts_with('.') || id.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{id:?} is not a trash entry id"),
            ));
        }
        openat(
            Some(self.fd.as_fd()),
            &cstr(id.as_bytes())?,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
    }

    fn data_exists(&self, id: &str, rel: &RelPath) -> io::Result<bool> {
        self.data_exists_in(self.open_entry(id)?.as_fd(), rel)
    }

    fn data_exists_in(&self, entry: BorrowedFd<'_>, rel: &RelPath) -> io::Result<bool> {
        let files = match openat(
            Some(entry),
            FILES,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        ) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
            Err(e) => return Err(e),
        };
        let found = beneath::open_parent(files.as_fd(), rel, false)
            .and_then(|(dir, name)| beneath::lstat_at(dir.as_fd(), &name));
        match found {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates a fresh entry folder named after `now`, mode 0700.
    fn new_entry_dir(&self, now: SystemTime) -> io::Result<(String, OwnedFd)> {
        let stamp = id_stamp(unix_ms(now));
        for _ in 0..10_000 {
            let id = format!(
                "{stamp}-{:04}",
                SEQ.fetch_add(1, Ordering::Relaxed) % 10_000
            );
            let name = cstr(id.as_bytes())?;
            match mkdirat(self.fd.as_fd(), &name, 0o700) {
                Ok(()) => {
                    let fd = openat(
                        Some(self.fd.as_fd()),
                        &name,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                        0,
                    )?;
                    return Ok((id, fd));
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free trash entry name",
        ))
    }

    /// Creates `files/<parent of rel>` in the entry and fsyncs every folder from the trash
    /// down to it, so the rename that follows lands in a durable place.
    fn prepare_data_parent(
        &self,
        entry: BorrowedFd<'_>,
        rel: &RelPath,
    ) -> io::Result<(OwnedFd, CString)> {
        mkdirat(entry, FILES, 0o700)?;
        let files = openat(
            Some(entry),
            FILES,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        let (parent, name) = beneath::open_parent(files.as_fd(), rel, true)?;
        // Bottom-up: each folder, then the one holding its name.
        let (rel_parent, _) = rel
            .split_last()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut cur = rel_parent;
        loop {
            fsync_dir(beneath::open_dir(files.as_fd(), &cur, false)?.as_fd())?;
            match cur.split_last() {
                Some((up, _)) => cur = up,
                None => break,
            }
        }
        fsync_dir(entry)?;
        fsync_dir(self.fd.as_fd())?;
        Ok((parent, name))
    }

    /// Renames `src_dir/src_name` to the first free name `name_for(0)`, `name_for(1)`, ... in
    /// `dst_dir` (never replacing anything); across filesystems, copies it under a temporary
    /// name, renames that into place, then removes the source. Returns the name used.
    fn move_object(
        &self,
        src_dir: BorrowedFd<'_>,
        src_name: &CStr,
        dst_dir: BorrowedFd<'_>,
        mut name_for: impl FnMut(u32) -> Option<CString>,
    ) -> io::Result<CString> {
        let taken = || io::Error::new(io::ErrorKind::AlreadyExists, "no free name to move to");
        let mut n = 0;
        loop {
            let dst = name_for(n).ok_or_else(taken)?;
            match rename_noreplace(src_dir, src_name, dst_dir, &dst) {
                Ok(()) => return Ok(dst),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => n += 1,
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => break,
                Err(e) => return Err(e),
            }
        }
        if !self.exdev_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "trash: {} is on another filesystem than the backing folder: deleted files are \
                 copied into the trash and back instead of moved (slower, and needs the space \
                 twice); put the state folder on the backing folder's filesystem to avoid this",
                self.dir.display()
            );
        }
        let tmp = cstr(
            format!(
                "{TMP_PREFIX}trash-{}-{}",
                std::process::id(),
                TMP_SEQ.fetch_add(1, Ordering::Relaxed)
            )
            .as_bytes(),
        )?;
        let record = match copy_tree(src_dir, src_name, dst_dir, &tmp) {
            Ok(r) => r,
            Err(e) => {
                if let Err(ce) = remove_tree(dst_dir, &tmp) {
                    if ce.raw_os_error() != Some(libc::ENOENT) {
                        tracing::warn!(
                            "trash: cannot remove the partial copy {}: {ce}",
                            tmp.to_string_lossy()
                        );
                    }
                }
                return Err(e);
            }
        };
        fsync_dir(dst_dir)?;
        let mut n = 0;
        let used = loop {
            let Some(dst) = name_for(n) else {
                let _ = remove_tree(dst_dir, &tmp);
                return Err(taken());
            };
            match rename_noreplace(dst_dir, &tmp, dst_dir, &dst) {
                Ok(()) => break dst,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => n += 1,
                Err(e) => {
                    let _ = remove_tree(dst_dir, &tmp);
                    return Err(e);
                }
            }
        };
        fsync_dir(dst_dir)?;
        let kept = remove_copied(src_dir, src_name, &record)?;
        if kept > 0 {
            tracing::warn!(
                "trash: {kept} item(s) of {} changed while being copied and were left in place",
                src_name.to_string_lossy()
            );
        }
        Ok(used)
    }

    /// Removes an entry folder, metadata first. Returns the bytes it held.
    fn remove_entry(&self, id: &str) -> io::Result<u64> {
        let entry = self.open_entry(id)?;
        match unlinkat(entry.as_fd(), META, 0) {
            Ok(()) => fsync_dir(entry.as_fd())?,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        drop(entry);
        remove_tree(self.fd.as_fd(), &cstr(id.as_bytes())?)
    }
}

/// A clearer message when a path resolves outside the backing folder.
fn outside(e: io::Error, rel: &RelPath) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EXDEV) | Some(libc::ELOOP) => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{rel}: resolves outside the backing folder (through a symlink); refused"),
        ),
        _ => ctx(e, rel),
    }
}

fn ctx(e: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// `name (restored 2026-11-25 10.32).ext`, with ` N` before the `)` for n >= 2; folders keep
/// their whole name before the parenthesis. Kept within NAME_MAX by shortening the stem.
fn restored_name(name: &OsStr, kind: EntryKind, deleted_at: SystemTime, n: u32) -> Vec<u8> {
    let bytes = name.as_bytes();
    let split = if kind == EntryKind::Dir {
        None
    } else {
        bytes
            .iter()
            .rposition(|b| *b == b'.')
            .filter(|&i| i > 0 && i + 1 < bytes.len())
    };
    let (stem, ext) = match split {
        Some(i) => bytes.split_at(i),
        None => (bytes, &b""[..]),
    };
    let (y, mo, d, h, mi) = {
        let secs = unix_ms(deleted_at) / 1000;
        let (y, mo, d) = civil_from_days(secs / 86_400);
        (y, mo, d, secs % 86_400 / 3600, secs % 3600 / 60)
    };
    let mut tag = format!(" (restored {y:04}-{mo:02}-{d:02} {h:02}.{mi:02}");
    if n >= 2 {
        tag.push_str(&format!(" {n}"));
    }
    tag.push(')');
    let room = NAME_MAX.saturating_sub(tag.len() + ext.len());
    let mut cut = stem.len().min(room);
    // Do not cut a UTF-8 sequence in half.
    while cut > 0 && cut < stem.len() && stem[cut] & 0xC0 == 0x80 {
        cut -= 1;
    }
    let mut out = stem[..cut].to_vec();
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(ext);
    out
}

// ---- time ----

fn now_ms() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(unix_ms(SystemTime::now()))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn system_time(secs: i64, nanos: i64) -> SystemTime {
    let secs = u64::try_from(secs).unwrap_or(0);
    let nanos = u32::try_from(nanos).unwrap_or(0).min(999_999_999);
    UNIX_EPOCH + Duration::new(secs, nanos)
}

/// `20261125T103200.123Z`.
fn id_stamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days(secs / 86_400);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:03}Z",
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
        ms % 1000
    )
}

/// `2026-11-25T10:32:00.123Z`.
fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days(secs / 86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
        ms % 1000
    )
}

/// Howard Hinnant's `civil_from_days`, for days since 1970-01-01.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + u64::from(m <= 2), m, d)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect()
}

// ---- metadata ----

fn write_meta(entry: BorrowedFd<'_>, name: &CStr, meta: &Meta) -> io::Result<()> {
    let mut text = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
    text.push(b'\n');
    // Written beside and renamed over, so a rewrite (after a partial restore) is atomic too.
    let _ = unlinkat(entry, META_TMP, 0);
    let fd = openat(
        Some(entry),
        META_TMP,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        0o600,
    )?;
    let mut f = File::from(fd);
    f.write_all(&text)?;
    f.sync_all()?;
    drop(f);
    renameat(entry, META_TMP, entry, name)?;
    fsync_dir(entry)
}

fn read_meta(entry: BorrowedFd<'_>) -> io::Result<Meta> {
    let fd = openat(Some(entry), META, libc::O_RDONLY | libc::O_NOFOLLOW, 0)?;
    let mut text = Vec::new();
    File::from(fd)
        .take(MAX_META_BYTES + 1)
        .read_to_end(&mut text)?;
    if text.len() as u64 > MAX_META_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "metadata file too large",
        ));
    }
    serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

// ---- trees ----

/// The kind of `dir/name` and its size in bytes (a folder's: everything in it).
fn tree_size(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<(EntryKind, u64)> {
    let st = beneath::lstat_at(dir, name)?;
    let kind = EntryKind::of_mode(st.st_mode);
    let mut size = u64::try_from(st.st_size).unwrap_or(0);
    if kind == EntryKind::Dir {
        size = 0;
        let fd = openat(
            Some(dir),
            name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        for child in read_dir(fd.as_fd())? {
            size = size.saturating_add(tree_size(fd.as_fd(), &child)?.1);
        }
    }
    Ok((kind, size))
}

/// Removes `dir/name` and everything below it, never following a symlink. Returns the bytes
/// removed (regular files' and symlinks' sizes).
fn remove_tree(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<u64> {
    let st = beneath::lstat_at(dir, name)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        unlinkat(dir, name, 0)?;
        return Ok(u64::try_from(st.st_size).unwrap_or(0));
    }
    let fd = openat(
        Some(dir),
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    if st.st_mode & 0o300 != 0o300 {
        // A folder kept read-only (mode preserved from the drive): make it emptiable.
        fchmod(fd.as_fd(), 0o700)?;
    }
    let mut bytes = 0u64;
    for child in read_dir(fd.as_fd())? {
        bytes = bytes.saturating_add(remove_tree(fd.as_fd(), &child)?);
    }
    drop(fd);
    unlinkat(dir, name, libc::AT_REMOVEDIR)?;
    Ok(bytes)
}

/// What [`copy_tree`] copied, to remove exactly that from the source afterwards.
struct Copied {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    size: i64,
    children: Option<Vec<(CString, Copied)>>,
}

/// Copies `src_dir/src_name` to `dst_dir/dst_name` (which must not exist): files with their
/// data, folders recursively, symlinks as symlinks, FIFOs and device nodes as such; keeping
/// mode, owner (when permitted), times and `user.*` xattrs. Every file and folder is fsynced.
fn copy_tree(
    src_dir: BorrowedFd<'_>,
    src_name: &CStr,
    dst_dir: BorrowedFd<'_>,
    dst_name: &CStr,
) -> io::Result<Copied> {
    let st = beneath::lstat_at(src_dir, src_name)?;
    let times = stat_times(&st);
    let record = |st: &libc::stat, children| Copied {
        dev: st.st_dev,
        ino: st.st_ino,
        mtime: (st.st_mtime, st.st_mtime_nsec),
        size: st.st_size,
        children,
    };
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {
            let src = openat(
                Some(src_dir),
                src_name,
                libc::O_RDONLY | libc::O_NOFOLLOW,
                0,
            )?;
            // What we read is what we record (the name may have been replaced since the lstat).
            let st = fstat(src.as_fd())?;
            let dst = openat(
                Some(dst_dir),
                dst_name,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                0o600,
            )?;
            let (mut from, mut to) = (File::from(src), File::from(dst));
            io::copy(&mut from, &mut to)?;
            copy_xattrs(from.as_fd(), to.as_fd())?;
            finish_attrs(to.as_fd(), &st)?;
            to.sync_all()?;
            Ok(record(&st, None))
        }
        libc::S_IFDIR => {
            let src = openat(
                Some(src_dir),
                src_name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?;
            let st = fstat(src.as_fd())?;
            mkdirat(dst_dir, dst_name, 0o700)?;
            let dst = openat(
                Some(dst_dir),
                dst_name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?;
            let mut children = Vec::new();
            for child in read_dir(src.as_fd())? {
                let c = copy_tree(src.as_fd(), &child, dst.as_fd(), &child)?;
                children.push((child, c));
            }
            copy_xattrs(src.as_fd(), dst.as_fd())?;
            finish_attrs(dst.as_fd(), &st)?;
            fsync_dir(dst.as_fd())?;
            Ok(record(&st, Some(children)))
        }
        libc::S_IFLNK => {
            let target = readlinkat(src_dir, src_name)?;
            // SAFETY: NUL-terminated strings and a descriptor we borrow.
            let r =
                unsafe { libc::symlinkat(target.as_ptr(), dst_dir.as_raw_fd(), dst_name.as_ptr()) };
            check(r)?;
            chown_at(dst_dir, dst_name, &st)?;
            // SAFETY: valid descriptor, name and a two-element timespec array.
            let r = unsafe {
                libc::utimensat(
                    dst_dir.as_raw_fd(),
                    dst_name.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            check(r)?;
            Ok(record(&st, None))
        }
        _ => {
            // SAFETY: valid descriptor and name; mode and device come from the source's stat.
            let r = unsafe {
                libc::mknodat(
                    dst_dir.as_raw_fd(),
                    dst_name.as_ptr(),
                    st.st_mode,
                    st.st_rdev,
                )
            };
            check(r)?;
            chown_at(dst_dir, dst_name, &st)?;
            // SAFETY: as above; the node was just made and is not a symlink.
            check(unsafe {
                libc::fchmodat(
                    dst_dir.as_raw_fd(),
                    dst_name.as_ptr(),
                    st.st_mode & 0o7777,
                    0,
                )
            })?;
            // SAFETY: as above.
            check(unsafe {
                libc::utimensat(
                    dst_dir.as_raw_fd(),
                    dst_name.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
            Ok(record(&st, None))
        }
    }
}

/// Owner (when permitted: an unprivileged daemon keeps its own), then mode (after chown, which
/// clears set-id bits), then times.
fn finish_attrs(fd: BorrowedFd<'_>, st: &libc::stat) -> io::Result<()> {
    // SAFETY: plain syscalls on a descriptor we borrow.
    let r = unsafe { libc::fchown(fd.as_raw_fd(), st.st_uid, st.st_gid) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(e);
        }
    }
    fchmod(fd, st.st_mode & 0o7777)?;
    let times = stat_times(st);
    // SAFETY: valid descriptor and a two-element timespec array.
    check(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) })
}

fn chown_at(dir: BorrowedFd<'_>, name: &CStr, st: &libc::stat) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name.
    let r = unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.st_uid,
            st.st_gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    match check(r) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        other => other,
    }
}

/// Copies the `user.*` xattrs (Samba's `user.DOSATTRIB` among them). A destination that does
/// not support them loses them with a debug note rather than failing the move.
fn copy_xattrs(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> io::Result<()> {
    let names = match xattr_call(|buf, len| {
        // SAFETY: buf is valid for len bytes (or null with len 0).
        unsafe { libc::flistxattr(src.as_raw_fd(), buf.cast(), len) }
    }) {
        Ok(n) => n,
        Err(e) if unsupported(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in names.split(|b| *b == 0).filter(|n| n.starts_with(b"user.")) {
        let cname = cstr(name)?;
        let value = match xattr_call(|buf, len| {
            // SAFETY: valid descriptor, name, and buf valid for len bytes.
            unsafe { libc::fgetxattr(src.as_raw_fd(), cname.as_ptr(), buf.cast(), len) }
        }) {
            Ok(v) => v,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: valid descriptor, name and value buffer.
        let r = unsafe {
            libc::fsetxattr(
                dst.as_raw_fd(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        match check(r) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => {
                tracing::debug!("trash: xattrs not supported at the destination: {e}");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::ENOSYS))
}

/// The size-then-fetch dance of the xattr calls, retried when the value grows in between.
fn xattr_call(mut f: impl FnMut(*mut u8, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let len = f(std::ptr::null_mut(), 0);
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; len as usize];
        if buf.is_empty() {
            return Ok(buf);
        }
        let got = f(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

/// Removes from the source exactly what [`copy_tree`] copied: an item replaced or modified
/// since (another inode, another size or mtime) and a folder that gained entries are left in
/// place. Returns how many items were left.
fn remove_copied(dir: BorrowedFd<'_>, name: &CStr, rec: &Copied) -> io::Result<u64> {
    let st = match beneath::lstat_at(dir, name) {
        Ok(st) => st,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(0),
        Err(e) => return Err(e),
    };
    if st.st_dev != rec.dev || st.st_ino != rec.ino {
        return Ok(1);
    }
    match &rec.children {
        Some(children) => {
            let fd = openat(
                Some(dir),
                name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?;
            let mut kept = 0;
            for (child, c) in children {
                kept += remove_copied(fd.as_fd(), child, c)?;
            }
            drop(fd);
            match unlinkat(dir, name, libc::AT_REMOVEDIR) {
                Ok(()) => Ok(kept),
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) =>
                {
                    Ok(kept.max(1))
                }
                Err(e) => Err(e),
            }
        }
        None => {
            if (st.st_mtime, st.st_mtime_nsec) != rec.mtime || st.st_size != rec.size {
                return Ok(1);
            }
            unlinkat(dir, name, 0)?;
            Ok(0)
        }
    }
}

// ---- syscalls ----

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `openat` (relative to `dir`, or absolute/cwd-relative with None), close-on-exec.
fn openat(
    dir: Option<BorrowedFd<'_>>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    loop {
        // SAFETY: valid descriptor (or AT_FDCWD) and NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                dirfd,
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor we now own.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })
}

fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })
}

fn renameat(
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    to_dir: BorrowedFd<'_>,
    to: &CStr,
) -> io::Result<()> {
    // SAFETY: valid descriptors and NUL-terminated names.
    check(unsafe {
        libc::renameat(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
        )
    })
}

/// `renameat2(RENAME_NOREPLACE)`: EEXIST instead of replacing. Filesystems without it (EINVAL)
/// get a check-then-rename, which is only racy against a name appearing in between.
fn rename_noreplace(
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    to_dir: BorrowedFd<'_>,
    to: &CStr,
) -> io::Result<()> {
    // SAFETY: valid descriptors and NUL-terminated names.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    match beneath::lstat_at(to_dir, to) {
        Ok(_) => Err(io::Error::from_raw_os_error(libc::EEXIST)),
        Err(le) if le.raw_os_error() == Some(libc::ENOENT) => renameat(from_dir, from, to_dir, to),
        Err(_) => Err(e),
    }
}

fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and out-pointer.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid descriptor.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })
}

/// fsyncs a folder given any descriptor of it (an `O_PATH` one is reopened for reading).
fn fsync_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    let fd = openat(Some(dir), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    // SAFETY: valid descriptor.
    check(unsafe { libc::fsync(fd.as_raw_fd()) })
}

fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<CString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: valid descriptor, name and buffer of buf.len() bytes.
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
    let n = n as usize;
    if n >= buf.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    buf.truncate(n);
    cstr(&buf)
}

/// The names in a folder (without `.` and `..`).
fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    // fdopendir takes the descriptor: give it its own, opened for reading.
    let fd = openat(Some(dir), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: `raw` is an open directory descriptor; on success the DIR owns it.
    let dp = unsafe { libc::fdopendir(raw) };
    if dp.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so we still own `raw`.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
        return Err(e);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; resetting it tells end-of-folder from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dp` is a valid DIR until closedir below.
        let ent = unsafe { libc::readdir(dp) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error().unwrap_or(0) == 0 {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: `dp` is valid and closed exactly once.
    unsafe { libc::closedir(dp) };
    result.map(|()| names)
}

/// The (atime, mtime) of `st`, as utimensat takes them.
fn stat_times(st: &libc::stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    struct Fixture {
        _tmp: tempfile::TempDir,
        backing: PathBuf,
        state: PathBuf,
        root: OwnedFd,
    }

    impl Fixture {
        fn new() -> Fixture {
            let tmp = tempfile::tempdir().expect("tempdir");
            let backing = tmp.path().join("backing");
            let state = tmp.path().join("state");
            std::fs::create_dir(&backing).expect("mkdir");
            let root = File::open(&backing).expect("open backing").into();
            Fixture {
                _tmp: tmp,
                backing,
                state,
                root,
            }
        }

        fn root(&self) -> BorrowedFd<'_> {
            self.root.as_fd()
        }

        fn p(&self, rel: &str) -> PathBuf {
            self.backing.join(rel)
        }
    }

    fn rel(s: &str) -> RelPath {
        RelPath::new(s.as_bytes()).expect("valid path")
    }

    #[test]
    fn put_list_restore_a_file() {
        let f = Fixture::new();
        std::fs::create_dir_all(f.p("docs")).expect("mkdir");
        std::fs::write(f.p("docs/report.docx"), b"v1").expect("write");
        std::fs::set_permissions(
            f.p("docs/report.docx"),
            std::fs::Permissions::from_mode(0o640),
        )
        .expect("chmod");
        let ino = std::fs::metadata(f.p("docs/report.docx"))
            .expect("stat")
            .ino();
        let trash = Trash::open(&f.state).expect("open");
        let mode = std::fs::metadata(trash.dir())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);

        let e = trash
            .put(f.root(), &rel("docs/report.docx"), "office-b")
            .expect("put");
        assert!(!f.p("docs/report.docx").exists());
        assert!(f.p("docs").is_dir(), "only the file moves");
        assert_eq!((e.kind, e.size), (EntryKind::File, 2));
        assert_eq!(e.origin, "office-b");
        // A rename, not a copy: the same inode sits in the trash.
        let kept = trash.dir().join(&e.id).join("files/docs/report.docx");
        assert_eq!(std::fs::metadata(&kept).expect("in trash").ino(), ino);
        let id_ok = e.id.len() == "20261125T103200.123Z-0001".len()
            && e.id.as_bytes()[8] == b'T'
            && e.id.as_bytes()[19] == b'Z';
        assert!(id_ok, "{}", e.id);

        assert_eq!(trash.list().expect("list"), vec![e.clone()]);
        let json = serde_json::to_value(&e).expect("json");
        assert_eq!(json["path"], "docs/report.docx");
        assert_eq!(json["kind"], "file");
        assert!(json["deleted_at"].as_str().expect("str").ends_with('Z'));

        std::fs::remove_dir(f.p("docs")).expect("rmdir");
        let r = trash
            .restore(f.root(), &rel("docs/report.docx"), None)
            .expect("restore");
        assert_eq!(r.restored_to, rel("docs/report.docx"));
        assert_eq!(r.entry, e);
        assert_eq!(std::fs::read(f.p("docs/report.docx")).expect("back"), b"v1");
        let md = std::fs::metadata(f.p("docs/report.docx")).expect("stat");
        assert_eq!((md.ino(), md.mode() & 0o777), (ino, 0o640));
        assert!(trash.list().expect("list").is_empty());
        assert!(!trash.dir().join(&e.id).exists(), "emptied entry removed");
        let err = trash
            .restore(f.root(), &rel("docs/report.docx"), None)
            .expect_err("gone");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn put_and_restore_a_folder_and_one_file_out_of_it() {
        let f = Fixture::new();
        std::fs::create_dir_all(f.p("proj/sub")).expect("mkdir");
        std::fs::write(f.p("proj/a.txt"), b"aaaa").expect("write");
        std::fs::write(f.p("proj/sub/b.txt"), b"bb").expect("write");
        symlink("a.txt", f.p("proj/link")).expect("symlink");
        let trash = Trash::open(&f.state).expect("open");
        let e = trash.put(f.root(), &rel("proj"), "office-b").expect("put");
        assert_eq!(e.kind, EntryKind::Dir);
        assert_eq!(e.size, 4 + 2 + 5);
        assert!(!f.p("proj").exists());

        // One file out of the trashed folder: the entry keeps the rest.
        let r = trash
            .restore(f.root(), &rel("proj/sub/b.txt"), None)
            .expect("restore one");
        assert_eq!((r.entry.kind, r.entry.size), (EntryKind::File, 2));
        assert_eq!(std::fs::read(f.p("proj/sub/b.txt")).expect("back"), b"bb");
        let left = trash.list().expect("list");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].size, 9);

        // The folder, now that `proj` exists again: beside it.
        let r = trash
            .restore(f.root(), &rel("proj"), Some(&e.id))
            .expect("restore dir");
        let to = r.restored_to.to_string();
        assert!(
            to.starts_with("proj (restored ") && to.ends_with(')'),
            "{to}"
        );
        assert_eq!(
            std::fs::read(f.p(&format!("{to}/a.txt"))).expect("a"),
            b"aaaa"
        );
        assert_eq!(
            std::fs::read_link(f.p(&format!("{to}/link"))).expect("link"),
            Path::new("a.txt")
        );
        assert!(trash.list().expect("list").is_empty());
    }

    #[test]
    fn a_symlink_is_trashed_as_a_symlink() {
        let f = Fixture::new();
        let outside = tempfile::tempdir().expect("tmp");
        std::fs::write(outside.path().join("precious"), b"x").expect("write");
        symlink(outside.path().join("precious"), f.p("link")).expect("symlink");
        let trash = Trash::open(&f.state).expect("open");
        let e = trash.put(f.root(), &rel("link"), "office-b").expect("put");
        assert_eq!(e.kind, EntryKind::Symlink);
        assert!(outside.path().join("precious").exists(), "target untouched");
        assert!(std::fs::symlink_metadata(f.p("link")).is_err());
        trash
            .restore(f.root(), &rel("link"), None)
            .expect("restore");
        assert_eq!(
            std::fs::read_link(f.p("link")).expect("link"),
            outside.path().join("precious")
        );
    }

    #[test]
    fn restore_onto_a_taken_name_goes_beside_it() {
        let f = Fixture::new();
        let trash = Trash::open(&f.state).expect("open");
        std::fs::write(f.p("report.docx"), b"old").expect("write");
        let e1 = trash.put(f.root(), &rel("report.docx"), "b").expect("put");
        std::fs::write(f.p("report.docx"), b"older? no, newer").expect("write");
        let e2 = trash.put(f.root(), &rel("report.docx"), "c").expect("put");
        std::fs::write(f.p("report.docx"), b"current").expect("write");
        assert_eq!(trash.list().expect("list"), vec![e1.clone(), e2.clone()]);

        // Newest first; the current file is never touched.
        let r = trash
            .restore(f.root(), &rel("report.docx"), None)
            .expect("restore");
        assert_eq!(r.entry.id, e2.id);
        let name = r.restored_to.to_string();
        assert!(
            name.starts_with("report (restored ") && name.ends_with(").docx"),
            "{name}"
        );
        assert_eq!(std::fs::read(f.p("report.docx")).expect("cur"), b"current");
        assert_eq!(
            std::fs::read(f.p(&name)).expect("restored"),
            b"older? no, newer"
        );

        // The same minute again: a numbered name.
        let r = trash
            .restore(f.root(), &rel("report.docx"), Some(&e1.id))
            .expect("restore");
        let name1 = r.restored_to.to_string();
        if e1
            .deleted_at
            .duration_since(UNIX_EPOCH)
            .expect("t")
            .as_secs()
            / 60
            == e2
                .deleted_at
                .duration_since(UNIX_EPOCH)
                .expect("t")
                .as_secs()
                / 60
        {
            assert!(name1.ends_with(" 2).docx"), "{name1}");
        }
        assert_eq!(std::fs::read(f.p(&name1)).expect("restored"), b"old");
        let err = trash
            .restore(f.root(), &rel("other"), Some("20000101T000000.000Z-0000"))
            .expect_err("no such id");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn restored_names() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_602_720); // 2026-11-25 10:32 UTC
        let n = |name: &str, kind, n| {
            String::from_utf8(restored_name(OsStr::new(name), kind, t, n)).expect("utf8")
        };
        assert_eq!(
            n("report.docx", EntryKind::File, 1),
            "report (restored 2026-11-25 10.32).docx"
        );
        assert_eq!(
            n("a.tar.gz", EntryKind::File, 3),
            "a.tar (restored 2026-11-25 10.32 3).gz"
        );
        assert_eq!(
            n(".bashrc", EntryKind::File, 1),
            ".bashrc (restored 2026-11-25 10.32)"
        );
        assert_eq!(
            n("v1.0", EntryKind::Dir, 1),
            "v1.0 (restored 2026-11-25 10.32)"
        );
        let long = "é".repeat(127) + ".txt";
        let got = n(&long, EntryKind::File, 1);
        assert!(got.len() <= 255 && got.ends_with(").txt"), "{}", got.len());
    }

    #[test]
    fn sweep_by_age_and_half_made_entries() {
        let f = Fixture::new();
        let trash = Trash::open(&f.state).expect("open");
        std::fs::write(f.p("a"), b"12345").expect("write");
        std::fs::write(f.p("b"), b"1").expect("write");
        let ea = trash.put(f.root(), &rel("a"), "b").expect("put");
        std::thread::sleep(Duration::from_millis(5));
        let eb = trash.put(f.root(), &rel("b"), "b").expect("put");
        // A crash between creating an entry and moving the data into it.
        let half = trash.dir().join("20200101T000000.000Z-0000");
        std::fs::create_dir_all(half.join("files")).expect("mkdir");
        std::fs::write(half.join(ENTRY_META), b"{\"v\":1,\"path\":\"x\",\"deleted_at_unix_ms\":1,\"origin\":\"b\",\"kind\":\"file\",\"size\":1}").expect("write");
        // Garbage: a stray file and an unreadable entry without data.
        std::fs::write(trash.dir().join("stray"), b"?").expect("write");
        std::fs::create_dir(trash.dir().join("junk")).expect("mkdir");
        std::fs::write(trash.dir().join("junk").join(ENTRY_META), b"not json").expect("w");
        assert_eq!(trash.list().expect("list"), vec![ea.clone(), eb.clone()]);

        let day = Duration::from_secs(86_400);
        // Just created: nothing is old enough, and half-made ones get their grace minute.
        let s = trash.sweep(day, SystemTime::now()).expect("sweep");
        assert_eq!((s.removed, s.half_made), (0, 0));
        // 'a' is exactly one day old at this instant; 'b' a few ms younger.
        let s = trash.sweep(day, ea.deleted_at + day).expect("sweep");
        assert_eq!(
            (s.removed, s.removed_bytes, s.half_made),
            (1, 5, 2),
            "{s:?}"
        );
        assert_eq!(trash.list().expect("list"), vec![eb.clone()]);
        assert!(!half.exists() && !trash.dir().join("junk").exists());
        assert!(trash.dir().join("stray").exists(), "not ours: left alone");
        let s = trash
            .sweep(day, SystemTime::now() + 2 * day)
            .expect("sweep");
        assert_eq!(s.removed, 1);
        assert!(trash.list().expect("list").is_empty());
    }

    #[test]
    fn hostile_paths_move_nothing() {
        let f = Fixture::new();
        let outside = tempfile::tempdir().expect("tmp");
        std::fs::write(outside.path().join("secret"), b"s").expect("write");
        symlink(outside.path(), f.p("escape")).expect("symlink");
        symlink("../..", f.p("up")).expect("symlink");
        let trash = Trash::open(&f.state).expect("open");
        for p in ["escape/secret", "up/secret"] {
            let err = trash.put(f.root(), &rel(p), "evil").expect_err(p);
            assert!(err.to_string().contains("outside"), "{err}");
        }
        assert!(outside.path().join("secret").exists());
        assert!(trash.list().expect("list").is_empty());
        assert_eq!(
            std::fs::read_dir(trash.dir()).expect("ls").count(),
            0,
            "no half-made entries left"
        );
        let err = trash
            .put(f.root(), &rel("missing"), "b")
            .expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(trash.put(f.root(), &RelPath::root(), "b").is_err());

        // A restore through a symlink leading out is refused too.
        std::fs::write(f.p("x"), b"x").expect("write");
        trash.put(f.root(), &rel("x"), "b").expect("put");
        let err = trash
            .restore(f.root(), &rel("escape/x"), None)
            .expect_err("not in trash");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        // A tampered entry whose path leads through `escape`.
        let e = &trash.list().expect("list")[0];
        let files = trash.dir().join(&e.id).join("files");
        std::fs::create_dir(files.join("escape")).expect("mkdir");
        std::fs::rename(files.join("x"), files.join("escape/x")).expect("mv");
        let mut meta = read_meta(trash.open_entry(&e.id).expect("open").as_fd()).expect("meta");
        meta.path = Some("escape/x".into());
        write_meta(trash.open_entry(&e.id).expect("open").as_fd(), META, &meta).expect("write");
        let err = trash
            .restore(f.root(), &rel("escape/x"), None)
            .expect_err("escape");
        assert!(err.to_string().contains("outside"), "{err}");
        assert!(!outside.path().join("x").exists());
        assert_eq!(trash.list().expect("list").len(), 1, "still in the trash");
    }

    #[test]
    fn a_planted_trash_symlink_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(tmp.path().join("elsewhere")).expect("mkdir");
        symlink(tmp.path().join("elsewhere"), tmp.path().join(TRASH_DIR)).expect("symlink");
        assert!(Trash::open(tmp.path()).is_err());
    }

    #[test]
    fn a_copied_source_loses_only_what_was_copied() {
        let f = Fixture::new();
        std::fs::create_dir_all(f.p("d/sub")).expect("mkdir");
        for name in ["d/same", "d/changed", "d/sub/same"] {
            std::fs::write(f.p(name), b"1").expect("write");
        }
        let copy = tempfile::tempdir().expect("tmp");
        let dst: OwnedFd = File::open(copy.path()).expect("open").into();
        let rec = copy_tree(f.root(), c"d", dst.as_fd(), c"d").expect("copy");
        assert_eq!(
            std::fs::read(copy.path().join("d/sub/same")).expect("r"),
            b"1"
        );
        // Meanwhile, through the drive: a write, a new file.
        std::fs::write(f.p("d/changed"), b"22").expect("write");
        std::fs::write(f.p("d/sub/new"), b"3").expect("write");
        let kept = remove_copied(f.root(), c"d", &rec).expect("remove");
        assert_eq!(
            kept, 2,
            "the changed file and the folder holding the new one"
        );
        assert!(!f.p("d/same").exists() && !f.p("d/sub/same").exists());
        assert_eq!(std::fs::read(f.p("d/changed")).expect("kept"), b"22");
        assert!(f.p("d/sub/new").exists());
    }

    /// Mounts a tmpfs at `dir`; None when this process may not (not root, no mount namespace).
    fn mount_tmpfs(dir: &Path) -> Option<()> {
        let target = CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: valid NUL-terminated strings; no data argument.
        let r = unsafe {
            libc::mount(
                c"peerfs-test".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        (r == 0).then_some(())
    }

    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            if let Ok(p) = CString::new(self.0.as_os_str().as_bytes()) {
                // SAFETY: valid path.
                unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }

    fn set_xattr(p: &Path, name: &CStr, value: &[u8]) -> io::Result<()> {
        let cp = CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: valid path, name and value.
        check(unsafe {
            libc::lsetxattr(
                cp.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        })
    }

    fn get_xattr(p: &Path, name: &CStr) -> Option<Vec<u8>> {
        let cp = CString::new(p.as_os_str().as_bytes()).ok()?;
        let mut buf = vec![0u8; 256];
        // SAFETY: valid path, name and buffer.
        let n = unsafe {
            libc::lgetxattr(
                cp.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    }

    #[test]
    fn across_filesystems_the_trash_copies() {
        let f = Fixture::new();
        std::fs::create_dir(&f.state).expect("mkdir state");
        if mount_tmpfs(&f.state).is_none() {
            eprintln!(
                "skipped: cannot mount a tmpfs here ({})",
                io::Error::last_os_error()
            );
            return;
        }
        let _unmount = Unmount(f.state.clone());
        let trash = Trash::open(&f.state).expect("open");
        // Does the tmpfs take user xattrs (Linux 6.6+)?
        let probe = f.state.join("probe");
        std::fs::write(&probe, b"").expect("probe");
        let xattrs_ok = set_xattr(&probe, c"user.probe", b"1").is_ok()
            && set_xattr(&f.p(""), c"user.probe", b"1").is_ok();
        std::fs::remove_file(&probe).expect("rm probe");
        if !xattrs_ok {
            eprintln!("note: this tmpfs takes no user xattrs; their copy is not checked");
        }

        std::fs::create_dir_all(f.p("dir/sub")).expect("mkdir");
        std::fs::write(f.p("dir/sub/file"), b"content").expect("write");
        std::fs::set_permissions(f.p("dir/sub/file"), std::fs::Permissions::from_mode(0o604))
            .expect("chmod");
        symlink("sub/file", f.p("dir/link")).expect("symlink");
        if xattrs_ok {
            set_xattr(&f.p("dir/sub/file"), c"user.DOSATTRIB", b"0x20").expect("xattr");
        }
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
        File::options()
            .write(true)
            .open(f.p("dir/sub/file"))
            .and_then(|fh| fh.set_modified(mtime))
            .expect("mtime");
        std::fs::set_permissions(f.p("dir/sub"), std::fs::Permissions::from_mode(0o555))
            .expect("chmod dir");

        let e = trash
            .put(f.root(), &rel("dir"), "office-b")
            .expect("put across filesystems");
        assert!(!f.p("dir").exists(), "original removed after the copy");
        let kept = trash.dir().join(&e.id).join("files/dir");
        let md = std::fs::metadata(kept.join("sub/file")).expect("copied");
        assert_eq!(md.mode() & 0o777, 0o604);
        assert_eq!(md.modified().expect("mtime"), mtime);
        assert_eq!(
            std::fs::metadata(kept.join("sub")).expect("d").mode() & 0o777,
            0o555
        );
        assert_eq!(
            std::fs::read_link(kept.join("link")).expect("l"),
            Path::new("sub/file")
        );
        if xattrs_ok {
            assert_eq!(
                get_xattr(&kept.join("sub/file"), c"user.DOSATTRIB").as_deref(),
                Some(&b"0x20"[..])
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(&f.backing).expect("ls").collect();
        assert!(
            leftovers.is_empty(),
            "no temporary copies left: {leftovers:?}"
        );

        // And back across again.
        let r = trash.restore(f.root(), &rel("dir"), None).expect("restore");
        assert_eq!(r.restored_to, rel("dir"));
        let md = std::fs::metadata(f.p("dir/sub/file")).expect("back");
        assert_eq!(
            (md.mode() & 0o777, md.modified().expect("m")),
            (0o604, mtime)
        );
        assert_eq!(std::fs::read(f.p("dir/sub/file")).expect("r"), b"content");
        if xattrs_ok {
            assert_eq!(
                get_xattr(&f.p("dir/sub/file"), c"user.DOSATTRIB").as_deref(),
                Some(&b"0x20"[..])
            );
        }
        assert!(trash.list().expect("list").is_empty());
        assert_eq!(std::fs::read_dir(trash.dir()).expect("ls").count(), 0);
    }
}
