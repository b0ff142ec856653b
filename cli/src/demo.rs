//! `peerfs demo`: owns a throw-away set of N peers on this machine, each with its own drive,
//! from creating their folders, identities and configs to unmounting every drive at the end.
//!
//! Layout under the demo folder (a fresh `/tmp/peerfs-demo-*`, or `--dir`), per peer `X`:
//! `peer-X/state` (identity, control socket, log), `peer-X/backing`, `peer-X/drive` (the mount
//! point) and `peer-X/peerfs.toml`, which lists every other peer on its loopback port.
//!
//! Each peer is a child process of this binary, `peerfs mount --config FILE` in the
//! foreground, so that this process sees at once when one ends. The children run in process
//! groups of their own: Ctrl-C on the terminal reaches only the demo, which then unmounts each
//! drive through the same code as `peerfs unmount`. Should the demo itself die without cleaning
//! up, the kernel sends every child SIGTERM (`PR_SET_PDEATHSIG`), on which a serving process
//! unmounts its drive; so no path leaves a mount behind.
//!
//! Readiness is asked from the daemons (control socket) and the kernel (mount table), never
//! from the mounts themselves.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use peerfs_proto::{Identity, IdentityError};

use crate::config::Config;
use crate::control::{self, ClientError, Request};
use crate::mountinfo::{self, MountTable, PEERFS_FSTYPE};

/// Fewest and most peers a demo runs (`--peers`).
pub const MIN_PEERS: u8 = 2;
pub const MAX_PEERS: u8 = 8;
/// Where a demo without `--dir` makes its folder.
const TEMP_BASE: &str = "/tmp";
/// How long all peers may take to mount and connect to each other.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the children may take to exit once asked to stop, before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How often children, daemons and signals are looked at while waiting.
const POLL: Duration = Duration::from_millis(100);
/// How many times the peers are started on fresh ports when a port was taken meanwhile.
const PORT_ATTEMPTS: u32 = 3;
/// Lines of a failed peer's log shown to the user.
const LOG_TAIL_LINES: usize = 20;

/// `peerfs demo [--peers N] [--dir DIR]`.
pub fn demo_command(peers: u8, dir: Option<&Path>) -> Result<u8> {
    if !(MIN_PEERS..=MAX_PEERS).contains(&peers) {
        bail!("--peers {peers}: a demo runs {MIN_PEERS} to {MAX_PEERS} peers");
    }
    // First, before any thread exists (all inherit the mask): from here on, Ctrl-C, SIGTERM
    // and SIGHUP wait in the kernel until the loops below take them, so every stop is clean.
    let signals = crate::signals::block().context("cannot block termination signals")?;
    peerfs_fs_linux::check_fuse_device().map_err(|e| anyhow!("cannot use /dev/fuse: {e}"))?;
    let exe = std::env::current_exe().context("cannot locate the peerfs binary")?;

    let (root, temporary) = match dir {
        Some(d) => (given_root(d)?, false),
        None => (temp_root()?, true),
    };
    // From here on, dropping `demo` (any `?` below) stops the children, leaves no mount behind
    // and removes a temporary folder.
    let mut demo = Demo {
        root,
        temporary,
        peers: Vec::new(),
        running: Vec::new(),
    };
    for i in 0..peers {
        let peer = demo.prepare_peer(char::from(b'a' + i))?;
        demo.peers.push(peer);
    }
    demo.refuse_if_running()?;
    crate::print_stdout(&format!(
        "peerfs demo: starting {peers} peers in {}\n",
        demo.root.display()
    ))?;

    if let Some(sig) = demo.start(&exe, &signals)? {
        return demo.finish(sig);
    }
    crate::print_stdout(&demo.ready_text(&exe))?;

    match demo.watch(&signals) {
        Stop::Signal(sig) => demo.finish(sig),
        Stop::Exited(i, status) => Err(demo.died(i, status)),
    }
}

/// One peer's folders and identity.
struct Peer {
    name: String,
    config: PathBuf,
    drive: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    id: String,
}

/// A started `peerfs mount` child.
struct Running {
    child: Child,
    /// Length of the log when the child started: its tail shows only this run.
    log_start: u64,
}

/// Why the demo stops.
enum Stop {
    /// A termination signal arrived.
    Signal(libc::c_int),
    /// Peer `i`'s process ended.
    Exited(usize, ExitStatus),
}

/// The demo's peers and their processes. Dropping it stops what still runs.
struct Demo {
    root: PathBuf,
    /// `root` was made by this demo and is removed at the end.
    temporary: bool,
    peers: Vec<Peer>,
    /// Indexed like `peers`; None: not started, or ended and reaped.
    running: Vec<Option<Running>>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            crate::report_error(&e);
        }
        if self.temporary {
            self.remove_root();
        }
    }
}

impl Demo {
    /// Makes `peer-<name>` with its folders and identity (kept if a previous demo made it).
    fn prepare_peer(&self, name: char) -> Result<Peer> {
        let folder = self.root.join(format!("peer-{name}"));
        let state = folder.join("state");
        let drive = folder.join("drive");
        // A drive left dead by a killed demo (ENOTCONN) would fail every check below; detach
        // it as `peerfs mount` would.
        if let Some(warning) = mountinfo::recover_dead_mount(&drive)? {
            crate::print_stderr(&format!("peerfs demo: warning: {warning}"));
        }
        // Other users (Samba, `su`) may reach the drive: the folders above it stay traversable.
        for dir in [&folder, &folder.join("backing"), &drive] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        // As `peerfs init` does it: a 0700 state folder, then the library's identity.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state)
            .with_context(|| format!("cannot create the state folder {}", state.display()))?;
        let identity = match Identity::load(&state) {
            Ok(identity) => identity,
            Err(IdentityError::Missing { .. }) => {
                Identity::create(&state, &name.to_string()).map_err(|e| anyhow!("{e}"))?
            }
            Err(e) => bail!("peer {name}: {e}"),
        };
        let config = folder.join("peerfs.toml");
        Ok(Peer {
            name: name.to_string(),
            drive,
            socket: state.join("control.sock"),
            log: state.join("peerfs.log"),
            config,
            id: identity.id.to_string(),
        })
    }

    /// A demo already serving these folders (an earlier `peerfs demo --dir` still running)
    /// must not be disturbed, and would make every peer fail anyway.
    fn refuse_if_running(&self) -> Result<()> {
        for p in &self.peers {
            if let Ok(resp) = control::request(&p.socket, &Request::status()) {
                let pid = resp.status.map(|s| s.pid.to_string()).unwrap_or_default();
                bail!(
                    "peer {} in {} is already running (pid {pid}); stop that demo first or use \
                     another --dir",
                    p.name,
                    self.root.display()
                );
            }
        }
        Ok(())
    }

    /// Writes the configs and starts every peer, on fresh ports again if one was taken
    /// between choosing it and the peer binding it. Returns the signal that interrupted it,
    /// if one did.
    fn start(&mut self, exe: &Path, signals: &libc::sigset_t) -> Result<Option<libc::c_int>> {
        let mut attempt = 1;
        loop {
            self.write_configs()?;
            // Filled first: should a later spawn fail, `stop` still sees the earlier ones.
            self.running = self.peers.iter().map(|_| None).collect();
            for i in 0..self.peers.len() {
                self.running[i] = Some(self.spawn(i, exe)?);
            }
            match self.wait_ready(signals)? {
                None => return Ok(None),
                Some(Stop::Signal(sig)) => return Ok(Some(sig)),
                Some(Stop::Exited(i, status)) => {
                    let tail = self.log_tail(i);
                    let port_taken = tail
                        .iter()
                        .any(|l| l.contains("os error 98") || l.contains("ddress already in use"));
                    if port_taken && attempt < PORT_ATTEMPTS {
                        attempt += 1;
                        crate::print_stdout(&format!(
                            "peerfs demo: peer {}'s port was taken meanwhile; starting again on \
                             other ports\n",
                            self.peers[i].name
                        ))?;
                        self.stop()?;
                        continue;
                    }
                    return Err(self.died(i, status));
                }
            }
        }
    }

    /// Each peer's config: loopback ports chosen now, every other peer listed by id.
    fn write_configs(&self) -> Result<()> {
        let ports = free_ports(self.peers.len())?;
        let n = self.peers.len();
        for (i, p) in self.peers.iter().enumerate() {
            let mut text = String::new();
            let _ = write!(
                text,
                "# Written by `peerfs demo`: peer {name} of {n}, on this machine. Every key is\n\
                 # described in docs/CONFIGURATION.md; paths are relative to this file's folder.\n\
                 name = \"{name}\"\n\
                 backing = \"backing\"\n\
                 mountpoint = \"drive\"\n\
                 state = \"state\"\n\
                 listen = \"127.0.0.1:{port}\"\n",
                name = p.name,
                port = ports[i],
            );
            for (j, other) in self.peers.iter().enumerate() {
                if j != i {
                    let _ = write!(
                        text,
                        "\n[[peers]]\nname = \"{}\"\nid = \"{}\"\naddress = \"127.0.0.1:{}\"\n",
                        other.name, other.id, ports[j]
                    );
                }
            }
            std::fs::write(&p.config, text)
                .with_context(|| format!("cannot write {}", p.config.display()))?;
            // What `peerfs mount` will read: a mistake here is ours, and clearer now.
            Config::load(&p.config)?;
        }
        Ok(())
    }

    /// Starts `peerfs mount --config FILE` for peer `i`, its output appended to its log.
    fn spawn(&self, i: usize, exe: &Path) -> Result<Running> {
        let p = &self.peers[i];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&p.log)
            .with_context(|| format!("cannot open the log {}", p.log.display()))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let stderr = log
            .try_clone()
            .with_context(|| format!("cannot open the log {}", p.log.display()))?;
        let parent = std::process::id();
        let mut cmd = Command::new(exe);
        cmd.arg("mount")
            .arg("--config")
            .arg(&p.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            // Ctrl-C on the terminal is for the demo, which stops the peers in order.
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only makes two system
        // calls, both async-signal-safe; it allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                // If the demo dies without cleaning up, the peer gets SIGTERM and unmounts.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The demo may have died before prctl: then nobody would stop this peer.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    return Err(io::Error::other("the demo exited"));
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        Ok(Running { child, log_start })
    }

    /// Waits (at most [`READY_TIMEOUT`]) until every drive is mounted and every peer reports
    /// all the others connected (None); a signal or a peer's exit ends the wait early.
    fn wait_ready(&mut self, signals: &libc::sigset_t) -> Result<Option<Stop>> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(stop) = self.exited() {
                return Ok(Some(stop));
            }
            let waiting = self.not_ready();
            if waiting.is_empty() {
                return Ok(None);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the peers were not ready within {}s: {}; their logs are in {}",
                    READY_TIMEOUT.as_secs(),
                    waiting.join("; "),
                    self.root.join("peer-*/state/peerfs.log").display()
                );
            }
            if let Some(sig) = take_signal(signals, POLL) {
                return Ok(Some(Stop::Signal(sig)));
            }
        }
    }

    /// What each peer still lacks; empty when all are ready.
    fn not_ready(&self) -> Vec<String> {
        let table = MountTable::read().unwrap_or_default();
        let others = self.peers.len() - 1;
        let mut waiting = Vec::new();
        for p in &self.peers {
            let status = match control::request(&p.socket, &Request::status()) {
                Ok(resp) => resp.status,
                Err(ClientError::NoDaemon(_)) => None,
                Err(e) => {
                    waiting.push(format!("{}: {e}", p.name));
                    continue;
                }
            };
            let Some(status) = status.filter(|s| s.mounted) else {
                waiting.push(format!("{}: not mounted yet", p.name));
                continue;
            };
            if !peerfs_mounted(&table, &p.drive) {
                waiting.push(format!(
                    "{}: {} not in the mount table",
                    p.name,
                    p.drive.display()
                ));
                continue;
            }
            let connected = status
                .peers
                .iter()
                .filter(|q| q["connected"].as_bool() == Some(true))
                .count();
            if connected < others {
                waiting.push(format!(
                    "{}: {connected} of {others} peers connected",
                    p.name
                ));
            }
        }
        waiting
    }

    /// Waits for a termination signal, or for a peer to end.
    fn watch(&mut self, signals: &libc::sigset_t) -> Stop {
        loop {
            if let Some(sig) = take_signal(signals, POLL) {
                return Stop::Signal(sig);
            }
            if let Some(stop) = self.exited() {
                return stop;
            }
        }
    }

    /// The first peer whose process has ended, if any.
    fn exited(&mut self) -> Option<Stop> {
        for (i, r) in self.running.iter_mut().enumerate() {
            if let Some(r) = r {
                match r.child.try_wait() {
                    Ok(Some(status)) => return Some(Stop::Exited(i, status)),
                    Ok(None) => {}
                    // ECHILD cannot happen for our own child; say something rather than spin.
                    Err(e) => crate::print_stderr(&format!(
                        "peerfs demo: warning: cannot check peer {}: {e}",
                        self.peers[i].name
                    )),
                }
            }
        }
        None
    }

    /// Peer `i` ended on its own: shows the end of its log and returns the error to report.
    /// The caller drops the demo, which stops the other peers.
    fn died(&self, i: usize, status: ExitStatus) -> anyhow::Error {
        let p = &self.peers[i];
        let mut text = format!(
            "peerfs demo: peer {} stopped unexpectedly ({status}); the end of its log {}:\n",
            p.name,
            p.log.display()
        );
        for line in self.log_tail(i) {
            let _ = writeln!(text, "  | {line}");
        }
        crate::print_stderr(text.trim_end());
        anyhow!(
            "peer {} stopped unexpectedly ({status}); the demo stopped the other peers",
            p.name
        )
    }

    /// The last lines peer `i` wrote to its log during this run.
    fn log_tail(&self, i: usize) -> Vec<String> {
        let start = self
            .running
            .get(i)
            .and_then(|r| r.as_ref())
            .map_or(0, |r| r.log_start);
        let mut bytes = Vec::new();
        let read = File::open(&self.peers[i].log).and_then(|mut f| {
            f.seek(SeekFrom::Start(start))?;
            f.read_to_end(&mut bytes)
        });
        if let Err(e) = read {
            return vec![format!(
                "(cannot read {}: {e})",
                self.peers[i].log.display()
            )];
        }
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return vec!["(nothing)".to_string()];
        }
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..]
            .iter()
            .map(|l| l.to_string())
            .collect()
    }

    /// After a termination signal: stops every peer and says so.
    fn finish(mut self, sig: libc::c_int) -> Result<u8> {
        let what = match sig {
            libc::SIGINT => "Ctrl-C",
            libc::SIGTERM => "SIGTERM",
            libc::SIGHUP => "SIGHUP",
            _ => "a signal",
        };
        crate::print_stdout(&format!(
            "\npeerfs demo: {what}: unmounting every drive and stopping the peers...\n"
        ))?;
        self.stop()?;
        let place = if !self.temporary {
            format!("; their folders stay in {}", self.root.display())
        } else if self.remove_root() {
            format!("; removed {}", self.root.display())
        } else {
            String::new() // remove_root said why not
        };
        crate::print_stdout(&format!("peerfs demo: stopped{place}.\n"))?;
        Ok(0)
    }

    /// Stops every running peer and makes sure none of their drives stays mounted:
    /// 1. a peer serving its drive is unmounted like `peerfs unmount` does it (which waits for
    ///    the daemon to exit); one that is busy or not mounted yet gets SIGTERM, on which a
    ///    serving process unmounts (detaching a busy drive);
    /// 2. every child is waited for, bounded, and killed after [`STOP_TIMEOUT`];
    /// 3. a drive still mounted with no daemon answering (a killed peer's) is detached.
    fn stop(&mut self) -> Result<()> {
        if self.running.iter().all(Option::is_none) {
            return Ok(());
        }
        for i in 0..self.running.len() {
            let Some(r) = self.running[i].as_mut() else {
                continue;
            };
            if matches!(r.child.try_wait(), Ok(Some(_))) {
                continue;
            }
            let p = &self.peers[i];
            if serves(p, r.child.id()) {
                match crate::unmount::unmount_command(&p.drive) {
                    Ok(()) => continue,
                    Err(e) => crate::print_stderr(&format!(
                        "peerfs demo: {e:#}; stopping peer {} with SIGTERM instead (it detaches \
                         a busy drive)",
                        p.name
                    )),
                }
            }
            signal(&r.child, libc::SIGTERM);
        }

        let deadline = Instant::now() + STOP_TIMEOUT;
        for i in 0..self.running.len() {
            let Some(r) = self.running[i].as_mut() else {
                continue;
            };
            if wait_until(&mut r.child, deadline).is_none() {
                crate::print_stderr(&format!(
                    "peerfs demo: peer {} did not stop within {}s; killing it",
                    self.peers[i].name,
                    STOP_TIMEOUT.as_secs()
                ));
                signal(&r.child, libc::SIGKILL);
                if wait_until(&mut r.child, Instant::now() + Duration::from_secs(5)).is_none() {
                    continue; // still ours to reap on a later stop
                }
            }
            self.running[i] = None;
        }

        let table = MountTable::read()?;
        let mut left = Vec::new();
        for p in &self.peers {
            if !peerfs_mounted(&table, &p.drive) {
                continue;
            }
            // A daemon that answers is not one of ours (ours have all exited): not ours to
            // touch. Without one, the mount is a dead leftover of a killed peer.
            let detached = matches!(
                control::request(&p.socket, &Request::status()),
                Err(ClientError::NoDaemon(_))
            ) && mountinfo::umount2(&p.drive, libc::MNT_DETACH).is_ok();
            if !detached {
                left.push(p.drive.display().to_string());
            }
        }
        if let Some(r) = self.running.iter().flatten().next() {
            bail!("a peer (pid {}) could not be stopped", r.child.id());
        }
        if !left.is_empty() {
            bail!("still mounted: {}", left.join(", "));
        }
        Ok(())
    }

    /// Removes the temporary folder, unless something could still be mounted inside it;
    /// returns whether it did. Done once: Drop does not try again.
    fn remove_root(&mut self) -> bool {
        self.temporary = false;
        let mounted = match MountTable::read() {
            Ok(table) => self.peers.iter().any(|p| table.find(&p.drive).is_some()),
            Err(_) => true,
        };
        if mounted || self.running.iter().any(Option::is_some) {
            crate::print_stderr(&format!(
                "peerfs demo: warning: left {} in place: a drive in it may still be mounted",
                self.root.display()
            ));
            return false;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.root) {
            crate::print_stderr(&format!(
                "peerfs demo: warning: cannot remove {}: {e}",
                self.root.display()
            ));
            return false;
        }
        true
    }

    /// The block printed once every peer is up.
    fn ready_text(&self, exe: &Path) -> String {
        let (a, b) = (&self.peers[0], &self.peers[1]);
        let drive = |p: &Peer, file: &str| shell_quote(&p.drive.join(file));
        let mut t = String::new();
        let _ = writeln!(
            t,
            "peerfs demo: ready. {} peers run on this machine, connected over mutual TLS:",
            self.peers.len()
        );
        for p in &self.peers {
            let _ = writeln!(t, "  {}  {}", p.name, p.drive.display());
        }
        let _ = writeln!(
            t,
            "  (next to each drive: its config peerfs.toml, its backing folder and its state with \
             the log)\n\
             \n\
             Try it from another terminal:\n\
             \x20 1. On a, open a file for writing and keep it open:\n\
             \x20      exec 3<>{a_notes}\n\
             \x20 2. On b, writing it now fails with \"Text file busy\" (it is in use on a):\n\
             \x20      echo x > {b_notes}\n\
             \x20 3. Close it on a; a second later b may write it:\n\
             \x20      exec 3>&-\n\
             \x20 4. Replication: a file written on a appears on b a moment after it is closed:\n\
             \x20      echo hello > {a_hello} && sleep 0.5 && cat {b_hello}\n\
             \x20    Deleted on b, it goes to a's trash:\n\
             \x20      rm {b_hello} && sleep 2 && {exe} trash list --config {a_config}\n\
             \x20 Who holds which lock, and the peers' state:\n\
             \x20      {exe} locks --config {a_config}\n\
             \x20      {exe} status --config {a_config}\n\
             \n\
             Ctrl-C to stop (every drive is unmounted).",
            a_notes = drive(a, "notes.txt"),
            b_notes = drive(b, "notes.txt"),
            a_hello = drive(a, "hello.txt"),
            b_hello = drive(b, "hello.txt"),
            exe = shell_quote(exe),
            a_config = shell_quote(&a.config),
        );
        t
    }
}

/// Whether the topmost mount at `drive` is a peerfs drive.
fn peerfs_mounted(table: &MountTable, drive: &Path) -> bool {
    table.find(drive).is_some_and(|e| e.fstype == PEERFS_FSTYPE)
}

/// Whether peer `p`'s drive is mounted and served by process `pid` (our child).
fn serves(p: &Peer, pid: u32) -> bool {
    MountTable::read().is_ok_and(|t| peerfs_mounted(&t, &p.drive))
        && control::request(&p.socket, &Request::status())
            .ok()
            .and_then(|r| r.status)
            .is_some_and(|s| s.pid == pid)
}

/// Sends `sig` to a child that has not been reaped (so its pid is still its own).
fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill has no memory arguments; `pid` is our unreaped child.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Polls `child` until it exits or `deadline` passes.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// Takes a pending termination signal, waiting at most `wait` for one. The signals are
/// blocked, so they wait in the kernel until taken here.
fn take_signal(set: &libc::sigset_t, wait: Duration) -> Option<libc::c_int> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(wait.as_secs()).unwrap_or(libc::time_t::MAX),
        // Below 10^9, so it fits a c_long everywhere.
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` is an initialized signal set, `ts` a valid timespec; a null siginfo
    // pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    if sig > 0 {
        return Some(sig);
    }
    let err = io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
        // Never expected; keeps the callers' loops from spinning.
        std::thread::sleep(wait);
    }
    None
}

/// `n` distinct free loopback ports: all bound at once on 127.0.0.1:0, then released.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()
        .context("cannot find a free port on 127.0.0.1")?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<io::Result<Vec<_>>>()
        .context("cannot find a free port on 127.0.0.1")
}

/// `--dir`: created if missing, made canonical (mount points are compared as real paths).
fn given_root(dir: &Path) -> Result<PathBuf> {
    if std::fs::metadata(dir).is_ok_and(|m| !m.is_dir()) {
        bail!("--dir {}: not a directory", dir.display());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))
}

/// A fresh `/tmp/peerfs-demo-<pid>[-<k>]`; `mkdir` never reuses what exists.
fn temp_root() -> Result<PathBuf> {
    let base =
        std::fs::canonicalize(TEMP_BASE).with_context(|| format!("cannot resolve {TEMP_BASE}"))?;
    let pid = std::process::id();
    for k in 0..100 {
        let name = if k == 0 {
            format!("peerfs-demo-{pid}")
        } else {
            format!("peerfs-demo-{pid}-{k}")
        };
        let dir = base.join(name);
        match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    bail!("cannot create a fresh folder in {TEMP_BASE}: too many peerfs-demo-{pid}* exist")
}

/// `path` as one shell word, quoted only when it needs to be.
fn shell_quote(path: &Path) -> String {
    let s = path.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:@%,=".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote(Path::new("/tmp/a-b/c.txt")), "/tmp/a-b/c.txt");
        assert_eq!(shell_quote(Path::new("/tmp/a b")), "'/tmp/a b'");
        assert_eq!(shell_quote(Path::new("/tmp/it's")), r"'/tmp/it'\''s'");
    }

    #[test]
    fn ports_are_distinct() {
        let ports = free_ports(8).expect("ports");
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 8);
        assert!(ports.iter().all(|&p| p != 0));
    }
}
