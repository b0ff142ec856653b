//! Real drives for tests: [`Mount`] runs `peerfs mount --config FILE` in the foreground as a
//! child process over a fresh temp folder and tears it down in `Drop` (SIGTERM, bounded wait,
//! lazy unmount if anything is left); [`PlainDir`] is the plain-directory twin; [`Pair`] runs
//! an operation on both and asserts identical outcomes.

use std::fmt::Debug;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::errno::{Outcome, outcome};
use crate::sys;
use crate::tree;

/// How long a mount may take to appear (override: `PEERFS_TEST_MOUNT_TIMEOUT_SECS`).
const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `peerfs mount` may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `[drive]` table of the config, plus harness-only knobs. `None` leaves a key out so the
/// binary's default applies.
#[derive(Clone, Debug, Default)]
pub struct DriveOptions {
    pub passthrough: Option<bool>,
    pub threads: Option<usize>,
    /// Human-readable duration, e.g. `"1s"`.
    pub cache_ttl: Option<String>,
    pub allow_other: Option<bool>,
    /// Mount a tmpfs of this many bytes on the backing folder (and on the plain twin) first,
    /// for out-of-space tests.
    pub backing_tmpfs: Option<u64>,
    /// Put the backing folder on a FUSE filesystem (`bindfs` of a folder beside it; not the
    /// plain twin's): one that, like FUSE and CIFS mounts generally, makes no unnamed
    /// (`O_TMPFILE`) files.
    pub backing_fuse: bool,
}

impl DriveOptions {
    /// Defaults except `passthrough`.
    pub fn passthrough(on: bool) -> DriveOptions {
        DriveOptions {
            passthrough: Some(on),
            ..DriveOptions::default()
        }
    }

    fn drive_table(&self) -> String {
        let mut t = String::new();
        if let Some(v) = self.allow_other {
            let _ = writeln!(t, "allow_other = {v}");
        }
        if let Some(v) = self.threads {
            let _ = writeln!(t, "threads = {v}");
        }
        if let Some(v) = self.passthrough {
            let _ = writeln!(t, "passthrough = {v}");
        }
        if let Some(v) = &self.cache_ttl {
            let _ = writeln!(t, "cache_ttl = {}", toml_str(v));
        }
        if t.is_empty() {
            t
        } else {
            format!("[drive]\n{t}")
        }
    }
}

fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn path_str(p: &Path) -> String {
    toml_str(p.to_str().expect("temp paths are UTF-8"))
}

/// The `peerfs` binary under test: `$PEERFS_BIN`, else `target/<profile>/peerfs` next to
/// this test executable's `deps/` folder.
pub fn peerfs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PEERFS_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "PEERFS_BIN={} is not a file; build it with `cargo build -p peerfs-cli`",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test executable has a folder")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let bin = dir.join("peerfs");
    assert!(
        bin.is_file(),
        "the peerfs binary is missing at {}: run `cargo build -p peerfs-cli` (same profile as \
         the tests) before `cargo test -p peerfs-tests`, or set PEERFS_BIN",
        bin.display()
    );
    bin
}

fn new_tempdir(prefix: &str) -> (tempfile::TempDir, PathBuf) {
    let base = std::env::var_os("PEERFS_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .expect("create temp dir");
    // Other uids (the permission tests) must be able to traverse to the roots.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    let root = dir.path().canonicalize().expect("canonicalize temp dir");
    (dir, root)
}

/// Unescapes a mountinfo path field (`\040` for space, etc.).
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The mountinfo entries (whole lines) whose mount point is `path`, in mount order.
pub fn mountinfo_lines(path: &Path) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.as_os_str().as_bytes();
    info.lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|mp| unescape_mountinfo(mp) == want)
        })
        .map(str::to_owned)
        .collect()
}

/// The filesystem type of the topmost mount at `path`, if `path` is a mount point.
pub fn mount_fstype(path: &Path) -> Option<String> {
    let line = mountinfo_lines(path).pop()?;
    let (_, after) = line.split_once(" - ")?;
    after.split(' ').next().map(str::to_owned)
}

/// Whether anything is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    mount_fstype(path).is_some()
}

/// A running `peerfs mount` over fresh `backing/`, `mnt/` and `state/` folders in a temp dir.
pub struct Mount {
    root: PathBuf,
    backing: PathBuf,
    mnt: PathBuf,
    state: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Something is mounted on `backing` (a tmpfs or bindfs), unmounted at drop.
    backing_mounted: bool,
    /// The `[drive]` table written into the config.
    drive_table: String,
    // Last: removed after Drop has unmounted everything.
    _dir: tempfile::TempDir,
}

impl Mount {
    /// A drive with the binary's default options.
    pub fn new() -> Mount {
        Mount::with(DriveOptions::default())
    }

    /// A drive with the given `[drive]` options.
    pub fn with(opts: DriveOptions) -> Mount {
        let mut m = Mount::prepare("peerfs-test-", &opts);
        m.write_config("test", "");
        m.start();
        m
    }

    /// The folders of a drive (`backing/`, `mnt/`, `state/` in a fresh temp dir whose name
    /// starts with `prefix`), without a config and not started: for harnesses that must set up
    /// the state folder (e.g. `peerfs init`) or learn other drives' details before writing the
    /// config with [`Mount::write_config`] and starting it with [`Mount::launch`].
    pub fn prepare(prefix: &str, opts: &DriveOptions) -> Mount {
        let (dir, root) = new_tempdir(prefix);
        let backing = root.join("backing");
        let mnt = root.join("mnt");
        let state = root.join("state");
        for d in [&backing, &mnt, &state] {
            fs::create_dir(d).expect("create test folder");
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod test folder");
        }
        let mut backing_mounted = false;
        if let Some(size) = opts.backing_tmpfs {
            sys::mount_tmpfs(&backing, size).expect("mount tmpfs on the backing folder");
            backing_mounted = true;
        }
        if opts.backing_fuse {
            let under = root.join("under-backing");
            fs::create_dir(&under).expect("create the folder under bindfs");
            let out = Command::new("bindfs")
                .arg(&under)
                .arg(&backing)
                .output()
                .unwrap_or_else(|e| panic!("bindfs (apt-get install bindfs): {e}"));
            assert!(
                out.status.success(),
                "bindfs {} {}: {}",
                under.display(),
                backing.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            backing_mounted = true;
        }
        let config = root.join("peerfs.toml");
        let log = root.join("peerfs.log");
        Mount {
            root,
            backing,
            mnt,
            state,
            config,
            log,
            child: None,
            backing_mounted,
            drive_table: opts.drive_table(),
            _dir: dir,
        }
    }

    /// Writes the config: `name`, the four folders, the log level
    /// (`PEERFS_TEST_LOG_LEVEL`, default `info`), then `extra` (TOML: top-level keys first,
    /// then tables such as `[[peers]]` or `[locks]`), then the `[drive]` table.
    pub fn write_config(&self, name: &str, extra: &str) {
        let log_level = std::env::var("PEERFS_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into());
        let mut text = format!(
            "name = {}\nbacking = {}\nmountpoint = {}\nstate = {}\nlog_level = {}\n",
            toml_str(name),
            path_str(&self.backing),
            path_str(&self.mnt),
            path_str(&self.state),
            toml_str(&log_level),
        );
        text.push_str(extra);
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&self.drive_table);
        fs::write(&self.config, text).expect("write config");
    }

    /// Starts `peerfs mount` (again) and waits until the drive is mounted; panics with the
    /// drive's output if it exits first or does not mount in time. Output is appended to the
    /// same log across restarts.
    pub fn launch(&mut self) {
        assert!(
            self.child.is_none(),
            "peerfs mount is already running for {}",
            self.config.display()
        );
        self.start();
    }

    /// Kills `peerfs mount` with SIGKILL (no cleanup: the mount is left behind, answering
    /// ENOTCONN, as after a crash) and reaps it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("the drive is running");
        // SAFETY: signalling our own child process, which has not been reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = child.wait();
    }

    fn start(&mut self) {
        let bin = peerfs_bin();
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log file");
        let err = out.try_clone().expect("clone log file");
        let mut cmd = Command::new(&bin);
        cmd.arg("mount")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("RUST_BACKTRACE", "1");
        // SAFETY: prctl is async-signal-safe; it makes the drive exit if the test thread that
        // started it dies without running Drop (e.g. the test binary is killed).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        self.child = Some(child);

        let timeout = std::env::var("PEERFS_TEST_MOUNT_TIMEOUT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(MOUNT_TIMEOUT);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
                self.child = None;
                panic!(
                    "`peerfs mount --config {}` exited with {status} before the drive was \
                     mounted; its output:\n{}",
                    self.config.display(),
                    self.output()
                );
            }
            if mount_fstype(&self.mnt).as_deref() == Some("fuse.peerfs") {
                // statfs blocks until the FUSE handshake is answered, and proves it was.
                match sys::statfs(&self.mnt) {
                    Ok(s) if s.fs_type == sys::FUSE_SUPER_MAGIC => return,
                    Ok(_) | Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                let seen = mountinfo_lines(&self.mnt);
                panic!(
                    "the drive did not appear as a fuse.peerfs mount at {} within {timeout:?}; \
                     mountinfo entries there: {seen:?}; peerfs output:\n{}",
                    self.mnt.display(),
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("drive process")
    }

    /// The mount point: where tests operate.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// The backing folder under the drive.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// peerfs's state folder.
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// The config file the drive was started with.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The temp folder holding everything of this drive.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The process id of `peerfs mount`, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything `peerfs mount` printed so far (last 300 lines).
    pub fn output(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(300);
        lines[start..].join("\n")
    }

    /// Sends SIGTERM and waits (bounded) for `peerfs mount` to exit; kills it after
    /// [`STOP_TIMEOUT`]. Returns the exit status and whether it had to be killed.
    fn terminate(&mut self) -> Option<(ExitStatus, bool)> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some((status, false));
        }
        // SAFETY: signalling our own child process, which has not been reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some((status, false)),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = child.kill();
                    let status = child.wait().expect("wait for killed peerfs");
                    return Some((status, true));
                }
            }
        }
    }

    /// Stops the drive the way an operator does (SIGTERM) and returns how it exited, for
    /// tests of the shutdown path. Panics if it had to be killed after [`STOP_TIMEOUT`].
    pub fn stop(&mut self) -> ExitStatus {
        let (status, killed) = self.terminate().expect("the drive is running");
        assert!(
            !killed,
            "peerfs mount did not exit within {STOP_TIMEOUT:?} of SIGTERM; output:\n{}",
            self.output()
        );
        status
    }
}

impl Default for Mount {
    fn default() -> Self {
        Mount::new()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let stopped = self.terminate();
        let mut notes = Vec::new();
        if let Some((status, killed)) = stopped {
            if killed {
                notes.push(format!(
                    "peerfs mount ignored SIGTERM for {STOP_TIMEOUT:?}; killed"
                ));
            } else if !status.success() {
                notes.push(format!("peerfs mount exited with {status} after SIGTERM"));
            }
        }
        // Never leave a mount behind, whatever state the drive died in.
        for _ in 0..8 {
            if !is_mounted(&self.mnt) {
                break;
            }
            notes.push(format!(
                "{} was still mounted; lazy unmount",
                self.mnt.display()
            ));
            if let Err(e) = sys::umount2(&self.mnt, libc::MNT_DETACH) {
                notes.push(format!("umount2({}) failed: {e}", self.mnt.display()));
                break;
            }
        }
        if self.backing_mounted && is_mounted(&self.backing) {
            let _ = sys::umount2(&self.backing, libc::MNT_DETACH);
        }
        if !notes.is_empty() || std::thread::panicking() {
            eprintln!(
                "--- drive at {} ---\n{}\n--- peerfs output ---\n{}\n---",
                self.mnt.display(),
                notes.join("\n"),
                self.output()
            );
        }
    }
}

/// The plain-directory twin: a fresh folder on the same filesystem as the drive's backing
/// folder (or a tmpfs of the same size), the reference every drive result is compared with.
pub struct PlainDir {
    path: PathBuf,
    tmpfs: bool,
    _dir: tempfile::TempDir,
}

impl PlainDir {
    pub fn new() -> PlainDir {
        PlainDir::with(&DriveOptions::default())
    }

    /// Honours [`DriveOptions::backing_tmpfs`] so the twin has the same space limit.
    pub fn with(opts: &DriveOptions) -> PlainDir {
        let (dir, root) = new_tempdir("peerfs-plain-");
        let path = root.join("plain");
        fs::create_dir(&path).expect("create plain folder");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod plain");
        let mut tmpfs = false;
        if let Some(size) = opts.backing_tmpfs {
            sys::mount_tmpfs(&path, size).expect("mount tmpfs on the plain folder");
            tmpfs = true;
        }
        PlainDir {
            path,
            tmpfs,
            _dir: dir,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for PlainDir {
    fn default() -> Self {
        PlainDir::new()
    }
}

impl Drop for PlainDir {
    fn drop(&mut self) {
        if self.tmpfs {
            let _ = sys::umount2(&self.path, libc::MNT_DETACH);
        }
    }
}

/// Cuts a failure message's value to a readable length (file contents can be megabytes).
fn shorten(s: String) -> String {
    const MAX: usize = 600;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} characters in all)", &s[..end], s.len())
}

/// A drive and its plain twin. Every operation runs on the plain folder first, then on the
/// drive, and must give the same outcome (Ok value or errno).
pub struct Pair {
    pub plain: PlainDir,
    pub mount: Mount,
}

impl Pair {
    pub fn new() -> Pair {
        Pair::with(DriveOptions::default())
    }

    pub fn with(opts: DriveOptions) -> Pair {
        let plain = PlainDir::with(&opts);
        let mount = Mount::with(opts);
        Pair { plain, mount }
    }

    /// The two roots: plain folder, then mount point.
    pub fn roots(&self) -> [&Path; 2] {
        [self.plain.path(), self.mount.path()]
    }

    /// Runs `f` on the plain folder, then on the drive, asserts both outcomes are equal and
    /// returns it. `what` names the operation in the failure message.
    #[track_caller]
    pub fn both<T: PartialEq + Debug>(
        &self,
        what: &str,
        f: impl Fn(&Path) -> io::Result<T>,
    ) -> Outcome<T> {
        let expected = outcome(f(self.plain.path()));
        let got = outcome(f(self.mount.path()));
        assert!(
            got == expected,
            "{what}: the drive gave {}, a plain directory gave {}",
            shorten(format!("{got:?}")),
            shorten(format!("{expected:?}"))
        );
        got
    }

    /// Like [`Pair::both`], and also asserts the outcome is `Ok`.
    #[track_caller]
    pub fn both_ok<T: PartialEq + Debug>(
        &self,
        what: &str,
        f: impl Fn(&Path) -> io::Result<T>,
    ) -> T {
        match self.both(what, f) {
            Ok(v) => v,
            Err(e) => panic!("{what}: failed on both the drive and a plain directory: {e:?}"),
        }
    }

    /// Asserts the drive's tree, and its backing folder's, equal the plain folder's: names,
    /// kinds, modes, owners, sizes, contents, symlink targets, link counts, hard-link groups
    /// and xattrs.
    #[track_caller]
    pub fn assert_same_tree(&self) {
        let expected = tree::snapshot(self.plain.path()).expect("snapshot of the plain folder");
        let got = tree::snapshot(self.mount.path()).expect("snapshot of the drive");
        let d = tree::diff(&got, &expected);
        assert!(
            d.is_empty(),
            "the drive's tree differs from the plain folder's:\n{}",
            d.join("\n")
        );
        let backing = tree::snapshot(self.mount.backing()).expect("snapshot of the backing");
        let d = tree::diff(&backing, &expected);
        assert!(
            d.is_empty(),
            "the drive's backing folder differs from the plain folder:\n{}",
            d.join("\n")
        );
    }
}

impl Default for Pair {
    fn default() -> Self {
        Pair::new()
    }
}
