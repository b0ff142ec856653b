//! The FUSE adapter: translates kernel requests (through `fuser`) into `peerfs-vfs` calls and
//! replies with their results, nothing more. All behaviour lives in `vfs`; the only logic here is
//! what is FUSE-specific: negotiating kernel features, kernel passthrough of open files, and the
//! one mapping from [`VfsError`] to errno ([`errno`]).

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle,
    FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    SessionACL, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use peerfs_vfs::{Attr, Caller, FileKind, Opened, SetAttr, SetTime, Vfs, VfsError, XattrReply};
use tracing::{debug, warn};

/// How the drive is mounted.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Let other users (Samba's, everyone's) reach the drive; the kernel checks permissions.
    pub allow_other: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// Serve open files' reads and writes in the kernel (FUSE passthrough, Linux 6.9+) when the
    /// kernel offers it.
    pub passthrough: bool,
    /// How long the kernel may cache names and attributes.
    pub cache_ttl: Duration,
    /// The mount's source as shown in /proc/self/mountinfo.
    pub fsname: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: true,
            threads: 4,
            passthrough: true,
            cache_ttl: Duration::from_secs(1),
            fsname: "peerfs".into(),
        }
    }
}

/// Checks that `/dev/fuse` can be opened, so `mount` can fail early with a clear reason.
pub fn check_fuse_device() -> io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("/dev/fuse is not usable: {e}")))
}

/// A mounted drive, ready to serve.
pub struct Drive {
    session: fuser::Session<Adapter>,
    mount: Arc<KernelMount>,
}

/// Unmounts a drive from another thread (signal handling, shutdown).
#[derive(Clone)]
pub struct Unmounter(Arc<KernelMount>);

impl Unmounter {
    /// Unmounts the drive. If it is busy (open files, a shell inside), the mount is detached
    /// and its FUSE connection aborted, so the serving loop ends either way and processes still
    /// inside get ENOTCONN instead of hanging.
    pub fn unmount(&self) -> io::Result<()> {
        self.0.unmount()
    }
}

/// The kernel side of a mount made by this process: its path and FUSE connection number.
struct KernelMount {
    mountpoint: CString,
    /// Minor device number of the mount: the FUSE connection's id under
    /// /sys/fs/fuse/connections.
    connection: u32,
}

impl KernelMount {
    fn unmount(&self) -> io::Result<()> {
        // SAFETY: NUL-terminated path.
        if unsafe { libc::umount2(self.mountpoint.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINVAL) => Ok(()), // not mounted (any more)
            Some(libc::EBUSY) => {
                warn!("drive busy; detaching it and aborting its FUSE connection");
                // SAFETY: NUL-terminated path.
                unsafe { libc::umount2(self.mountpoint.as_ptr(), libc::MNT_DETACH) };
                let abort = format!("/sys/fs/fuse/connections/{}/abort", self.connection);
                std::fs::write(&abort, b"1")
                    .map_err(|e| io::Error::new(e.kind(), format!("{abort}: {e}")))
            }
            _ => Err(err),
        }
    }
}

/// Mounts a FUSE file system of type `fuse.peerfs` with the given options and returns the
/// /dev/fuse descriptor that serves it. (fuser's own mount always says plain `fuse`; the subtype
/// lets `peerfs unmount`, `mount -t` and monitoring tell peerfs drives apart.)
fn kernel_mount(mountpoint: &CStr, opts: &MountOptions) -> io::Result<(OwnedFd, u32)> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| io::Error::new(e.kind(), format!("/dev/fuse: {e}")))?;
    let dev = OwnedFd::from(dev);
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: NUL-terminated path; `st` is written on success.
    if unsafe { libc::stat(mountpoint.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: stat succeeded and initialised `st`.
    let root_mode = unsafe { st.assume_init() }.st_mode & libc::S_IFMT;
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={uid},group_id={gid},default_permissions",
        dev.as_raw_fd()
    );
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    let source = CString::new(opts.fsname.replace(',', "_"))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "fsname contains NUL"))?;
    let data = CString::new(data).map_err(|_| io::Error::other("mount data contains NUL"))?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            mountpoint.as_ptr(),
            c"fuse.peerfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("mount: {e}")));
    }
    // Not stat(): the kernel would ask this very daemon, which has not answered INIT yet.
    let connection = connection_of(mountpoint).unwrap_or(0);
    Ok((dev, connection))
}

/// The minor device number of the newest mount at `mountpoint`, from /proc/self/mountinfo
/// (fields: id, parent, major:minor, root, mount point, ...; the mount point octal-escaped).
fn connection_of(mountpoint: &CStr) -> Option<u32> {
    let info = std::fs::read("/proc/self/mountinfo").ok()?;
    let want = mountpoint.to_bytes();
    info.split(|b| *b == b'\n')
        .rev()
        .filter_map(|line| {
            let mut fields = line.split(|b| *b == b' ');
            let dev = fields.nth(2)?;
            let point = fields.nth(1)?;
            (unescape_mountinfo(point) == want).then_some(dev)
        })
        .next()
        .and_then(|dev| {
            let dev = std::str::from_utf8(dev).ok()?;
            dev.split_once(':')?.1.parse().ok()
        })
}

fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && i + 3 < field.len()
            && field[i + 1..i + 4]
                .iter()
                .all(|d| (b'0'..=b'7').contains(d))
        {
            let v = field[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

impl Drive {
    /// Mounts `vfs` on `mountpoint` and completes the kernel handshake: when this returns Ok the
    /// drive is usable. Call only after any fork (`run` starts the worker threads).
    pub fn mount(vfs: Arc<Vfs>, mountpoint: &Path, opts: &MountOptions) -> io::Result<Drive> {
        let mut config = fuser::Config::default();
        config.acl = if opts.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(opts.threads.max(1));
        config.clone_fd = true;
        // With peers, lock round trips run off the FUSE workers (see `Adapter::run`).
        let offload = if vfs.has_locks() {
            Some(Arc::new(Offload::start(OFFLOAD_THREADS)?))
        } else {
            None
        };
        let adapter = Adapter {
            vfs,
            ttl: opts.cache_ttl,
            want_passthrough: opts.passthrough,
            passthrough: false,
            backing: Arc::new(Mutex::new(BackingCache::default())),
            offload,
        };
        let path = CString::new(mountpoint.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mountpoint contains NUL"))?;
        let (fd, connection) = kernel_mount(&path, opts)?;
        let mount = Arc::new(KernelMount {
            mountpoint: path,
            connection,
        });
        let acl = config.acl;
        let vfs = adapter.vfs.clone();
        match fuser::Session::from_fd(adapter, fd, acl, config) {
            Ok(session) => {
                vfs.set_invalidator(Box::new(KernelInvalidator::start(session.notifier())?));
                Ok(Drive { session, mount })
            }
            Err(e) => {
                let _ = mount.unmount();
                Err(e)
            }
        }
    }

    pub fn unmounter(&mut self) -> Unmounter {
        Unmounter(self.mount.clone())
    }

    /// Serves requests until the drive is unmounted.
    pub fn run(self) -> io::Result<()> {
        let r = self.session.run();
        // If the loop ended for another reason than an unmount, do not leave a dead mount
        // answering ENOTCONN behind.
        let _ = self.mount.unmount();
        r
    }
}

/// Sends cache invalidations to the kernel from a thread of their own: never from a request
/// handler, because the kernel may hold the inode's lock while it waits for that handler.
struct KernelInvalidator {
    tx: Mutex<std::sync::mpsc::Sender<Inval>>,
}

enum Inval {
    /// Attributes only (offset -1 keeps cached pages).
    Attrs(u64),
    /// Attributes and cached pages.
    Data(u64),
    Entry(u64, std::ffi::OsString),
}

impl KernelInvalidator {
    fn start(notifier: fuser::Notifier) -> io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Inval>();
        std::thread::Builder::new()
            .name("peerfs-inval".into())
            .spawn(move || {
                for inval in rx {
                    let r = match &inval {
                        Inval::Attrs(node) => notifier.inval_inode(INodeNo(*node), -1, 0),
                        Inval::Data(node) => notifier.inval_inode(INodeNo(*node), 0, 0),
                        Inval::Entry(parent, name) => notifier.inval_entry(INodeNo(*parent), name),
                    };
                    match r {
                        Ok(()) => {}
                        // The kernel no longer knows the node: nothing to invalidate.
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => warn!(error = %e, "kernel cache invalidation failed"),
                    }
                }
            })?;
        Ok(KernelInvalidator { tx: Mutex::new(tx) })
    }

    fn send(&self, inval: Inval) {
        // The receiver lives as long as the session; a send can only fail during shutdown.
        let _ = self.tx.lock().send(inval);
    }
}

impl peerfs_vfs::Invalidator for KernelInvalidator {
    fn inode(&self, node: u64) {
        self.send(Inval::Attrs(node));
    }

    fn data(&self, node: u64) {
        self.send(Inval::Data(node));
    }

    fn entry(&self, parent: u64, name: &OsStr) {
        self.send(Inval::Entry(parent, name.to_os_string()));
    }
}

/// Threads for requests that may wait for a lock round trip. Each waits at most the lock
/// timeout; this many can wait at once before further ones queue.
const OFFLOAD_THREADS: usize = 16;

/// Flags of every file open. NOFLUSH: `close()` need not wait for a FLUSH round trip; writes
/// already reached the backing file, and locks and replication act at RELEASE.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// The one mapping from drive errors to errno. No catch-all arm: a new error kind must be
/// mapped here deliberately.
pub fn errno(e: &VfsError) -> Errno {
    match e {
        VfsError::Os(errno) => Errno::from_i32(errno.0),
        VfsError::UnknownNode(_) => Errno::ESTALE,
        VfsError::UnknownHandle(_) => Errno::EBADF,
        VfsError::InvalidName => Errno::EINVAL,
        // ETXTBSY, not EBUSY/EACCES/EAGAIN: smbd maps exactly this one to
        // NT_STATUS_SHARING_VIOLATION ("file in use") and fails at once.
        VfsError::Locked { .. } => Errno::ETXTBSY,
        VfsError::Setup { .. } => Errno::EIO,
    }
}

/// Kernel passthrough ids, shared by all open handles of one inode (the kernel requires one
/// backing file per inode): held weakly per inode, strongly per handle.
#[derive(Default)]
struct BackingCache {
    by_node: HashMap<u64, Weak<BackingId>>,
    by_handle: HashMap<u64, Arc<BackingId>>,
    /// Open handles served by the daemon, per inode (their handle → inode).
    daemon_nodes: HashMap<u64, usize>,
    daemon_handles: HashMap<u64, u64>,
}

/// Cheap to clone: requests that may wait for peers take a clone to another thread.
#[derive(Clone)]
struct Adapter {
    vfs: Arc<Vfs>,
    ttl: Duration,
    want_passthrough: bool,
    /// Negotiated with the kernel at init.
    passthrough: bool,
    backing: Arc<Mutex<BackingCache>>,
    /// Where requests that may wait for a lock round trip run, so the FUSE workers keep
    /// serving everyone else's lookups and reads meanwhile. None for a drive without peers.
    offload: Option<Arc<Offload>>,
}

/// A pool of threads for requests that may block on the network. fuser hands us the reply
/// object, which can be answered from any thread.
struct Offload {
    tx: Mutex<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
}

impl Offload {
    fn start(threads: usize) -> io::Result<Offload> {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("peerfs-lock-{i}"))
                .spawn(move || {
                    loop {
                        // The guard is dropped before the job runs: jobs run concurrently.
                        let job = rx.lock().recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return, // the adapter is gone
                        }
                    }
                })?;
        }
        Ok(Offload { tx: Mutex::new(tx) })
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

/// Attributes that carry only an inode number and a kind: for negative entries (node id 0)
/// and the `.`/`..` entries of readdirplus, of which the kernel reads nothing else.
fn bare_attr(ino: u64, kind: FileKind) -> FileAttr {
    file_attr(&Attr {
        ino,
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        kind,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
    })
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(undo_fuser_pre_epoch(t)),
    })
}

/// fuser 0.18.0 turns the kernel's (secs < 0, nsecs) into `EPOCH - (|secs| s + nsecs ns)`,
/// where the time really is `EPOCH - |secs| s + nsecs ns` (its `system_time_from_time` has a
/// TODO for exactly this). Undo that for times before 1970.
fn undo_fuser_pre_epoch(t: SystemTime) -> SystemTime {
    match SystemTime::UNIX_EPOCH.duration_since(t) {
        Ok(before) if before.subsec_nanos() != 0 => {
            SystemTime::UNIX_EPOCH - Duration::from_secs(before.as_secs())
                + Duration::from_nanos(u64::from(before.subsec_nanos()))
        }
        _ => t,
    }
}

/// Logs a failed operation at a level fitting its cause and returns its errno.
fn fail(op: &str, e: &VfsError) -> Errno {
    match e {
        VfsError::Os(_) | VfsError::InvalidName | VfsError::Locked { .. } => {
            debug!(op, error = %e, "failed")
        }
        VfsError::UnknownNode(_) | VfsError::UnknownHandle(_) | VfsError::Setup { .. } => {
            warn!(op, error = %e, "failed")
        }
    }
    errno(e)
}

impl Adapter {
    /// Runs `job` on the offload pool when the request may wait for peers (`may_block`),
    /// otherwise right here on the FUSE worker.
    fn run(&self, may_block: bool, job: impl FnOnce(&Adapter) + Send + 'static) {
        match (&self.offload, may_block) {
            (Some(pool), true) => {
                let me = self.clone();
                let job: Box<dyn FnOnce() + Send> = Box::new(move || job(&me));
                if let Err(returned) = pool.tx.lock().send(job) {
                    // Only when the pool is gone (shutdown): run it here rather than drop the
                    // reply unanswered.
                    (returned.0)();
                }
            }
            _ => job(self),
        }
    }

    /// Whether changing `parent/name` may wait for peers (see `Vfs::may_wait_for_peers`).
    fn name_may_block(&self, parent: u64, name: &OsStr) -> bool {
        self.vfs
            .may_wait_for_peers(self.vfs.child_path(parent, name))
    }

    fn entry(&self, op: &str, r: Result<Attr, VfsError>, reply: ReplyEntry) {
        match r {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(fail(op, &e)),
        }
    }

    fn empty(&self, op: &str, r: Result<(), VfsError>, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail(op, &e)),
        }
    }

    fn xattr(&self, op: &str, r: Result<XattrReply, VfsError>, reply: ReplyXattr) {
        match r {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(fail(op, &e)),
        }
    }

    /// The passthrough backing id for a newly opened handle: reuses the inode's if one is live.
    ///
    /// Setuid/setgid files are served through the daemon, which clears those bits when another
    /// user writes (a passthrough write runs with the daemon's privileges and would keep them) —
    /// unless the inode already has passthrough opens: the kernel refuses to mix the two modes.
    fn backing_for(
        &self,
        opened: Opened,
        open_backing: impl FnOnce(&peerfs_vfs::FileHandle) -> io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        if !self.passthrough {
            return None;
        }
        let fh = opened.fh;
        let file = self.vfs.file(fh).ok()?;
        let node = file.node();
        let mut cache = self.backing.lock();
        let id = match cache.by_node.get(&node).and_then(Weak::upgrade) {
            Some(id) => id,
            // Served by the daemon: setuid files, tracked writers, and every other open of an
            // inode that has such handles (the kernel refuses to mix the two modes).
            None if opened.sets_id || opened.track || cache.daemon_nodes.contains_key(&node) => {
                *cache.daemon_nodes.entry(node).or_insert(0) += 1;
                cache.daemon_handles.insert(fh, node);
                return None;
            }
            None => match open_backing(&file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    cache.by_node.insert(node, Arc::downgrade(&id));
                    id
                }
                Err(e) => {
                    warn!(node, error = %e, "kernel passthrough refused; serving this open through the daemon");
                    *cache.daemon_nodes.entry(node).or_insert(0) += 1;
                    cache.daemon_handles.insert(fh, node);
                    return None;
                }
            },
        };
        cache.by_handle.insert(fh, id.clone());
        drop(cache);
        if file.writes() {
            // The drive will not see this handle's writes.
            self.vfs.untracked(fh);
        }
        Some(id)
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let caps = config.capabilities();
        // Not FUSE_ATOMIC_O_TRUNC: with it the daemon truncates in OPEN, before the kernel
        // checks that no one runs the file (ETXTBSY), so `open(O_TRUNC)` of a running program
        // truncated it under the program (which then died of SIGBUS, and a second open went
        // through). Without it the kernel checks first, then truncates with a SETATTR.
        let mut want = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO;
        // The drive clears setuid/setgid itself on write, truncate and chown (see `Vfs::write`,
        // `Opened::sets_id`); otherwise the kernel asks GETXATTR security.capability before
        // every single write.
        want |= InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        if self.want_passthrough && caps.contains(InitFlags::FUSE_PASSTHROUGH) {
            // Passthrough needs a stacking depth of at least 1 and no writeback cache (never
            // requested: it would make the kernel trust its own size/mtime over remote updates).
            if config.set_max_stack_depth(1).is_ok() {
                want |= InitFlags::FUSE_PASSTHROUGH;
            }
        }
        want &= caps;
        if let Err(unsupported) = config.add_capabilities(want) {
            warn!(?unsupported, "kernel refused FUSE capabilities");
        }
        self.passthrough = want.contains(InitFlags::FUSE_PASSTHROUGH);
        // Big requests: fewer round trips for the daemon-served I/O path.
        let _ = config.set_max_write(1024 * 1024);
        let _ = config.set_max_readahead(1024 * 1024);
        let _ = config.set_max_background(64);
        tracing::info!(passthrough = self.passthrough, "kernel handshake done");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.vfs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            // A negative entry (node id 0) lets the kernel cache "no such name" for the TTL.
            Err(VfsError::Os(e)) if e.0 == libc::ENOENT => {
                let attr = bare_attr(0, FileKind::File);
                reply.entry(&self.ttl, &attr, Generation(0))
            }
            Err(e) => reply.error(fail("lookup", &e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.vfs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.vfs.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&self.ttl, &file_attr(&a)),
            Err(e) => reply.error(fail("getattr", &e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
            // FATTR_KILL_SUIDGID (not passed on by fuser) accompanies a truncation exactly when
            // the caller lacks CAP_FSETID; an unprivileged uid is the faithful stand-in.
            kill_suidgid: req.uid() != 0,
        };
        // Only a truncate can need a lock.
        let may_block = size.is_some() && self.vfs.may_wait_for_peers(self.vfs.path(ino.0));
        self.run(may_block, move |me| {
            match me.vfs.setattr(ino.0, fh.map(|f| f.0), set) {
                Ok(a) => reply.attr(&me.ttl, &file_attr(&a)),
                Err(e) => reply.error(fail("setattr", &e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.vfs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(fail("readlink", &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (who, name) = (caller(req), name.to_os_string());
        self.run(self.name_may_block(parent.0, &name), move |me| {
            me.entry(
                "mknod",
                me.vfs.mknod(who, parent.0, &name, mode, rdev),
                reply,
            )
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let (who, name) = (caller(req), name.to_os_string());
        self.run(self.name_may_block(parent.0, &name), move |me| {
            me.entry("mkdir", me.vfs.mkdir(who, parent.0, &name, mode), reply)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_os_string();
        self.run(self.name_may_block(parent.0, &name), move |me| {
            me.empty("unlink", me.vfs.unlink(parent.0, &name), reply)
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_os_string();
        self.run(false, move |me| {
            me.empty("rmdir", me.vfs.rmdir(parent.0, &name), reply)
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (who, name, target) = (
            caller(req),
            link_name.to_os_string(),
            target.as_os_str().to_os_string(),
        );
        self.run(self.name_may_block(parent.0, &name), move |me| {
            me.entry(
                "symlink",
                me.vfs.symlink(who, parent.0, &name, &target),
                reply,
            )
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let flags = peerfs_vfs::RenameFlags(flags.bits());
        let (name, newname) = (name.to_os_string(), newname.to_os_string());
        self.run(
            self.name_may_block(parent.0, &name) || self.name_may_block(newparent.0, &newname),
            move |me| {
                me.empty(
                    "rename",
                    me.vfs.rename(parent.0, &name, newparent.0, &newname, flags),
                    reply,
                )
            },
        );
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (who, newname) = (caller(req), newname.to_os_string());
        self.run(self.name_may_block(newparent.0, &newname), move |me| {
            me.entry(
                "link",
                me.vfs.link(who, ino.0, newparent.0, &newname),
                reply,
            )
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // An unprivileged caller's truncating open clears setuid/setgid (FUSE_OPEN_KILL_SUIDGID,
        // which fuser does not pass on, is set exactly when the caller lacks CAP_FSETID).
        let kill = req.uid() != 0;
        // Read-only opens never lock: they stay on the FUSE worker.
        let writes = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let may_block = writes && self.vfs.may_wait_for_peers(self.vfs.path(ino.0));
        self.run(may_block, move |me| {
            match me.vfs.open(ino.0, flags.0, kill) {
                Ok(opened) => {
                    match me.backing_for(opened, |f| reply.open_backing(f.backing_fd())) {
                        Some(id) => {
                            // A setuid/setgid file that is already open in passthrough mode
                            // stays in it (the kernel does not mix modes on an inode, and a
                            // handle's release reaches us after its close returned): the
                            // daemon will not see this writer's writes, so the bits go now,
                            // not at its first write.
                            if opened.sets_id && writes && kill {
                                if let Err(e) = me.vfs.kill_suidgid_now(opened.fh) {
                                    warn!(error = %e, "cannot clear setuid/setgid for a writer");
                                }
                            }
                            reply.opened_passthrough(FileHandle(opened.fh), OPEN_FLAGS, &id)
                        }
                        None => reply.opened(FileHandle(opened.fh), OPEN_FLAGS),
                    }
                }
                Err(e) => reply.error(fail("open", &e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.vfs.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(fail("read", &e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.vfs.write(fh.0, offset, data, kill) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(fail("write", &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.empty("flush", self.vfs.flush(fh.0), reply);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        {
            let mut cache = self.backing.lock();
            if let Some(id) = cache.by_handle.remove(&fh.0) {
                // Last handle of the inode: drop its entry too, or the map grows forever.
                if Arc::strong_count(&id) == 1 {
                    cache.by_node.remove(&ino.0);
                }
            }
            if let Some(node) = cache.daemon_handles.remove(&fh.0) {
                if let Some(n) = cache.daemon_nodes.get_mut(&node) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        cache.daemon_nodes.remove(&node);
                    }
                }
            }
        }
        self.empty("release", self.vfs.release(fh.0), reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.empty("fsync", self.vfs.fsync(fh.0, datasync), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.vfs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(fail("opendir", &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.vfs.readdir(fh.0, offset, false, |e, _| {
            reply.add(INodeNo(e.ino), e.offset, file_type(e.kind), &e.name)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("readdir", &e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.ttl;
        let r = self.vfs.readdir(fh.0, offset, true, |e, attr| match attr {
            Some(a) => reply.add(
                INodeNo(e.ino),
                e.offset,
                &e.name,
                &ttl,
                &file_attr(a),
                Generation(0),
            ),
            None => {
                // `.` and `..`: the kernel takes no reference for them; a zero TTL and the
                // directory entry's own inode number are all it reads.
                let attr = bare_attr(e.ino, e.kind);
                reply.add(
                    INodeNo(e.ino),
                    e.offset,
                    &e.name,
                    &Duration::ZERO,
                    &attr,
                    Generation(0),
                )
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("readdirplus", &e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.empty("releasedir", self.vfs.releasedir(fh.0), reply);
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.empty("fsyncdir", self.vfs.fsyncdir(fh.0, datasync), reply);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.vfs.statfs(ino.0) {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(fail("statfs", &e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.empty(
            "setxattr",
            self.vfs.setxattr(ino.0, name, value, flags),
            reply,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.xattr("getxattr", self.vfs.getxattr(ino.0, name, size), reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.xattr("listxattr", self.vfs.listxattr(ino.0, size), reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty("removexattr", self.vfs.removexattr(ino.0, name), reply);
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.empty(
            "access",
            self.vfs.access(caller(req), ino.0, mask.bits()),
            reply,
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (who, name) = (caller(req), name.to_os_string());
        self.run(self.name_may_block(parent.0, &name), move |me| {
            match me.vfs.create(who, parent.0, &name, mode, flags) {
                Ok((attr, opened)) => {
                    let attr = file_attr(&attr);
                    match me.backing_for(opened, |f| reply.open_backing(f.backing_fd())) {
                        Some(id) => reply.created_passthrough(
                            &me.ttl,
                            &attr,
                            Generation(0),
                            FileHandle(opened.fh),
                            OPEN_FLAGS,
                            &id,
                        ),
                        None => reply.created(
                            &me.ttl,
                            &attr,
                            Generation(0),
                            FileHandle(opened.fh),
                            OPEN_FLAGS,
                        ),
                    }
                }
                Err(e) => reply.error(fail("create", &e)),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.empty(
            "fallocate",
            self.vfs.fallocate(fh.0, offset, length, mode),
            reply,
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.vfs.lseek(fh.0, offset, whence) {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(fail("lseek", &e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self
            .vfs
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(fail("copy_file_range", &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_epoch_times_survive_fusers_conversion() {
        // The kernel's (-1000 s, 5 ns), as fuser 0.18.0 hands it over.
        let from_fuser = SystemTime::UNIX_EPOCH - Duration::new(1000, 5);
        let want = SystemTime::UNIX_EPOCH - Duration::from_secs(1000) + Duration::from_nanos(5);
        assert_eq!(undo_fuser_pre_epoch(from_fuser), want);
        let whole = SystemTime::UNIX_EPOCH - Duration::from_secs(7);
        assert_eq!(undo_fuser_pre_epoch(whole), whole);
        let after = SystemTime::UNIX_EPOCH + Duration::new(7, 9);
        assert_eq!(undo_fuser_pre_epoch(after), after);
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(br"/a\040b\011c\134d"), b"/a b\tc\\d");
        assert_eq!(unescape_mountinfo(br"/plain"), b"/plain");
        assert_eq!(unescape_mountinfo(br"/trailing\04"), br"/trailing\04");
    }
}
