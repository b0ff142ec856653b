//! Several real peers on loopback: [`Peers`] gives each peer its own drive ([`Mount`]: temp
//! `backing/`, `mnt/` and `state/`), an identity made by `peerfs init`, a free loopback port and
//! a config that lists the other peers with short timings, starts every `peerfs mount` in the
//! foreground and waits until every peer reports its peers connected (`peerfs status --json`).
//!
//! Locks are observed the way an operator sees them (`peerfs locks --json`, [`Peers::locks`]);
//! everything that happens asynchronously (a lock's release after the last close and its
//! linger, a dead peer's locks expiring after the grace period) is waited for with
//! [`wait_until`], bounded, never with a fixed sleep.
//!
//! For reconciliation tests: [`PeersOptions::links`] chooses which pairs know each other (a
//! relay topology; [`Peers::set_links`] / [`Peers::relink`] re-point them later),
//! [`PeersOptions::seed`] fills one peer's backing folder before its first start,
//! [`Peers::launch`] starts a daemon without waiting for any connection, and
//! [`Peers::wait_trees_equal`] waits until several peers' backing folders hold the same
//! [`Tree`] (names, kinds, permission bits, content, symlink targets), printing a diff of the
//! trees and every log when they do not.

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::mount::{DriveOptions, Mount, peerfs_bin};
use crate::tree::Kind;

/// How long all peers may take to connect to each other after they started.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one `peerfs status` / `peerfs locks` / `peerfs init` run.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// How a peer's identity is (mis)known to the others, for tests of peers that must never
/// connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outsider {
    /// The other peers' configs do not list this peer at all (it lists them correctly).
    Unlisted,
    /// The other peers list this peer by its name and address but with the id of another
    /// identity (a certificate made by `peerfs init` that this peer does not have).
    WrongId,
}

/// Timings and policy written into every peer's config, the drive options, files to put in
/// every backing folder before the drives start, and which peers are outsiders.
#[derive(Clone, Debug)]
pub struct PeersOptions {
    /// `[locks] policy`; `None` leaves the key out (the default, `available`).
    pub policy: Option<String>,
    pub linger: Duration,
    pub grace: Duration,
    /// `[locks] timeout`: bound on one lock round trip.
    pub timeout: Duration,
    pub heartbeat: Duration,
    pub dead_after: Duration,
    pub drive: DriveOptions,
    /// Written into every peer's backing folder before the drives start (no replication yet:
    /// this is how the tests give every peer the same document).
    pub files: Vec<(String, Vec<u8>)>,
    /// `(peer index, how it is mis-known)`: these peers never connect to anyone.
    pub outsiders: Vec<(usize, Outsider)>,
    /// Which pairs of peers list each other in their configs (unordered pairs of indices);
    /// `None` is the full mesh. Peers of no listed pair list nobody. [`Peers::wait_connected`]
    /// waits only for listed pairs.
    pub links: Option<Vec<(usize, usize)>>,
    /// `(peer index, name, content)`: written into that one peer's backing folder before its
    /// first start (unlike [`PeersOptions::files`], which every peer gets), for trees that
    /// never met.
    pub seeds: Vec<(usize, String, Vec<u8>)>,
}

impl Default for PeersOptions {
    fn default() -> PeersOptions {
        PeersOptions {
            policy: None,
            linger: Duration::from_millis(200),
            grace: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            heartbeat: Duration::from_millis(200),
            dead_after: Duration::from_secs(1),
            drive: DriveOptions::default(),
            files: Vec::new(),
            outsiders: Vec::new(),
            links: None,
            seeds: Vec::new(),
        }
    }
}

impl PeersOptions {
    /// Adds a file that every peer's backing folder has before the drives start.
    pub fn file(mut self, name: &str, content: &[u8]) -> PeersOptions {
        self.files.push((name.to_string(), content.to_vec()));
        self
    }

    /// Adds a file that only peer `peer`'s backing folder has before its first start (parent
    /// folders are created as needed).
    pub fn seed(mut self, peer: usize, name: &str, content: &[u8]) -> PeersOptions {
        self.seeds.push((peer, name.to_string(), content.to_vec()));
        self
    }

    /// Only these pairs of peers list each other (see [`PeersOptions::links`]).
    pub fn links(mut self, pairs: &[(usize, usize)]) -> PeersOptions {
        self.links = Some(pairs.to_vec());
        self
    }

    fn outsider(&self, i: usize) -> Option<Outsider> {
        self.outsiders
            .iter()
            .find(|(j, _)| *j == i)
            .map(|(_, kind)| *kind)
    }
}

/// Formats a duration for the config (milliseconds, which every duration parser accepts).
fn toml_duration(d: Duration) -> String {
    format!("\"{}ms\"", d.as_millis())
}

/// One row of `peerfs locks --json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockInfo {
    /// The locked path relative to the drive's root, without a leading `/`.
    pub path: String,
    /// The holding peer's configured name.
    pub holder: String,
    pub holder_id: String,
    pub since: String,
    pub fencing: u64,
    /// Held by this peer (not by another one).
    pub local: bool,
}

impl LockInfo {
    fn from_json(v: &serde_json::Value) -> Result<LockInfo, String> {
        let s = |k: &str| -> Result<String, String> {
            v.get(k)
                .and_then(|x| x.as_str())
                .map(str::to_owned)
                .ok_or_else(|| format!("lock entry without string {k:?}: {v}"))
        };
        let path = s("path")?;
        Ok(LockInfo {
            path: path.trim_start_matches('/').to_string(),
            holder: s("holder")?,
            holder_id: s("holder_id")?,
            since: s("since")?,
            fencing: v
                .get("fencing")
                .and_then(|x| x.as_u64())
                .ok_or_else(|| format!("lock entry without integer \"fencing\": {v}"))?,
            local: v
                .get("local")
                .and_then(|x| x.as_bool())
                .ok_or_else(|| format!("lock entry without boolean \"local\": {v}"))?,
        })
    }
}

/// One entry of the `"peers"` array of `peerfs status --json`.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerState {
    pub name: String,
    pub id: String,
    pub connected: bool,
    pub last_error: Option<String>,
}

/// What one CLI run printed.
#[derive(Clone, Debug)]
pub struct CliOutput {
    /// Exit code (`None` if killed by a signal or after [`CLI_TIMEOUT`]).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn describe(&self) -> String {
        format!(
            "exit {:?}; stdout: {}; stderr: {}",
            self.code,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// Runs the `peerfs` binary with `args`, bounded by [`CLI_TIMEOUT`] (then killed).
pub fn peerfs(args: &[&std::ffi::OsStr]) -> CliOutput {
    let bin = peerfs_bin();
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    // Read both pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout pipe");
    let mut err = child.stderr.take().expect("stderr pipe");
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + CLI_TIMEOUT;
    let code = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    CliOutput {
        code,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// A free loopback TCP port: bound on 127.0.0.1:0, read, released.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// `peerfs init --state DIR --name NAME`; returns the peer id (its last stdout line).
pub fn init_identity(state: &Path, name: &str) -> String {
    let out = peerfs(&[
        "init".as_ref(),
        "--state".as_ref(),
        state.as_os_str(),
        "--name".as_ref(),
        name.as_ref(),
    ]);
    assert!(
        out.code == Some(0),
        "`peerfs init --state {} --name {name}` failed ({}); check `peerfs init --help`",
        state.display(),
        out.describe()
    );
    let id = out
        .stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or_default()
        .to_string();
    assert!(
        !id.is_empty() && !id.contains(' '),
        "`peerfs init` did not end with a peer id line: {}",
        out.describe()
    );
    id
}

/// Polls `f` (every 20 ms) until it returns `Ok`, for at most `timeout`; `Err` carries what
/// was seen. On timeout, returns a message naming `desc` and the last thing seen.
pub fn poll_until<T>(
    desc: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let start = Instant::now();
    let mut tries = 0u64;
    loop {
        tries += 1;
        match f() {
            Ok(v) => return Ok(v),
            Err(seen) => {
                if start.elapsed() > timeout {
                    return Err(format!(
                        "timed out after {:?} ({tries} tries) waiting until {desc}; last seen: \
                         {seen}",
                        start.elapsed()
                    ));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`poll_until`] that panics on timeout.
#[track_caller]
pub fn wait_until<T>(desc: &str, timeout: Duration, f: impl FnMut() -> Result<T, String>) -> T {
    poll_until(desc, timeout, f).unwrap_or_else(|e| panic!("{e}"))
}

/// One peer: its drive, name, identity and listening port.
pub struct Peer {
    pub name: String,
    pub id: String,
    pub port: u16,
    pub mount: Mount,
}

/// Several peers on loopback, each with a running drive. Drop stops every drive (SIGTERM, then
/// SIGKILL, lazy unmount) and removes the temp folders.
pub struct Peers {
    peers: Vec<Peer>,
    /// Whether each peer's daemon was started and not stopped or killed since.
    running: Vec<bool>,
    opts: PeersOptions,
    /// Which pairs list each other now (`None`: full mesh); starts as `opts.links`, changed by
    /// [`Peers::set_links`].
    links: Option<Vec<(usize, usize)>>,
    /// The identities the others wrongly believe a [`Outsider::WrongId`] outsider has.
    wrong_ids: Vec<(usize, String)>,
}

impl Peers {
    /// `n` peers with the default (short) test timings, all connected to each other.
    pub fn start(n: usize) -> Peers {
        Peers::start_with(n, PeersOptions::default())
    }

    /// `n` peers with `opts`; returns once every peer that is not an outsider reports every
    /// other such peer connected.
    pub fn start_with(n: usize, opts: PeersOptions) -> Peers {
        assert!(n >= 1, "at least one peer");
        let mut peers = Vec::with_capacity(n);
        for i in 0..n {
            let name = Peers::default_name(i);
            let mount = Mount::prepare(&format!("peerfs-{name}-"), &opts.drive);
            let id = init_identity(mount.state(), &name);
            let own = opts
                .seeds
                .iter()
                .filter(|(j, _, _)| *j == i)
                .map(|(_, f, c)| (f, c));
            for (file, content) in opts.files.iter().map(|(f, c)| (f, c)).chain(own) {
                let p = mount.backing().join(file);
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir).expect("create seed folder");
                }
                std::fs::write(&p, content).expect("write seed file");
            }
            peers.push(Peer {
                name,
                id,
                port: free_port(),
                mount,
            });
        }
        // The identity the others wrongly believe an outsider has.
        let mut wrong_ids = Vec::new();
        for &(i, kind) in &opts.outsiders {
            assert!(i < n, "outsider index {i} out of range");
            if kind == Outsider::WrongId {
                let spare = tempfile::tempdir().expect("temp dir for a spare identity");
                let id = init_identity(spare.path(), "impostor");
                assert_ne!(id, peers[i].id, "two `peerfs init` runs gave the same id");
                wrong_ids.push((i, id));
            }
        }
        for &(i, _, _) in &opts.seeds {
            assert!(i < n, "seed for peer {i} out of range");
        }
        for &(i, j) in opts.links.iter().flatten() {
            assert!(i < n && j < n && i != j, "bad link ({i}, {j})");
        }
        let mut me = Peers {
            running: vec![false; n],
            peers,
            links: opts.links.clone(),
            opts,
            wrong_ids,
        };
        me.write_configs();
        for i in 0..n {
            me.peers[i].mount.launch();
            me.running[i] = true;
        }
        me.wait_connected();
        me
    }

    /// The name of peer `i`: `peer-a`, `peer-b`, ...
    pub fn default_name(i: usize) -> String {
        format!("peer-{}", (b'a' + i as u8) as char)
    }

    /// Whether peers `i` and `j` list each other (always, without [`PeersOptions::links`]).
    pub fn linked(&self, i: usize, j: usize) -> bool {
        i != j
            && self.links.as_ref().is_none_or(|pairs| {
                pairs
                    .iter()
                    .any(|&(a, b)| (a, b) == (i, j) || (a, b) == (j, i))
            })
    }

    /// (Re)writes every peer's config from the options and the current links.
    fn write_configs(&self) {
        for i in 0..self.len() {
            let text = self.config_extra(i, &self.wrong_ids);
            self.peers[i].mount.write_config(&self.peers[i].name, &text);
        }
    }

    fn config_extra(&self, i: usize, wrong_ids: &[(usize, String)]) -> String {
        let o = &self.opts;
        let mut t = String::new();
        let _ = writeln!(t, "listen = \"127.0.0.1:{}\"", self.peers[i].port);
        for (j, p) in self.peers.iter().enumerate() {
            if j == i || !self.linked(i, j) {
                continue;
            }
            // Outsiders list everyone correctly; the others do not list an unlisted outsider
            // and list a wrong-id outsider with the impostor id.
            let id = if self.opts.outsider(i).is_some() {
                p.id.clone()
            } else {
                match self.opts.outsider(j) {
                    Some(Outsider::Unlisted) => continue,
                    Some(Outsider::WrongId) => wrong_ids
                        .iter()
                        .find(|(k, _)| *k == j)
                        .map(|(_, id)| id.clone())
                        .expect("wrong id made"),
                    None => p.id.clone(),
                }
            };
            let _ = writeln!(
                t,
                "\n[[peers]]\nname = \"{}\"\nid = \"{}\"\naddress = \"127.0.0.1:{}\"",
                p.name, id, p.port
            );
        }
        let _ = writeln!(t, "\n[locks]");
        if let Some(policy) = &o.policy {
            let _ = writeln!(t, "policy = \"{policy}\"");
        }
        let _ = writeln!(t, "linger = {}", toml_duration(o.linger));
        let _ = writeln!(t, "grace = {}", toml_duration(o.grace));
        let _ = writeln!(t, "timeout = {}", toml_duration(o.timeout));
        let _ = writeln!(t, "\n[network]");
        let _ = writeln!(t, "heartbeat = {}", toml_duration(o.heartbeat));
        let _ = writeln!(t, "dead_after = {}", toml_duration(o.dead_after));
        t.push('\n');
        t
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Always false: there is at least one peer.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Whether peer `i`'s daemon runs (started, not stopped or killed since).
    pub fn is_running(&self, i: usize) -> bool {
        self.running[i]
    }

    pub fn options(&self) -> &PeersOptions {
        &self.opts
    }

    pub fn peer(&self, i: usize) -> &Peer {
        &self.peers[i]
    }

    pub fn mount(&self, i: usize) -> &Mount {
        &self.peers[i].mount
    }

    pub fn name(&self, i: usize) -> &str {
        &self.peers[i].name
    }

    pub fn id(&self, i: usize) -> &str {
        &self.peers[i].id
    }

    /// Peer `i`'s mount point.
    pub fn path(&self, i: usize) -> &Path {
        self.peers[i].mount.path()
    }

    /// `name` in peer `i`'s drive.
    pub fn file(&self, i: usize, name: &str) -> PathBuf {
        self.path(i).join(name)
    }

    /// `name` in peer `i`'s backing folder.
    pub fn backing_file(&self, i: usize, name: &str) -> PathBuf {
        self.peers[i].mount.backing().join(name)
    }

    /// Runs `peerfs SUBCOMMAND --config <peer i's config> ARGS...`.
    pub fn cli(&self, i: usize, subcommand: &str, args: &[&str]) -> CliOutput {
        let config = self.peers[i].mount.config().as_os_str();
        let mut all: Vec<&std::ffi::OsStr> = vec![subcommand.as_ref(), "--config".as_ref(), config];
        all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        peerfs(&all)
    }

    /// `peerfs status --json` of peer `i`, parsed.
    pub fn status(&self, i: usize) -> Result<serde_json::Value, String> {
        let out = self.cli(i, "status", &["--json"]);
        serde_json::from_str(&out.stdout).map_err(|e| {
            format!(
                "status of {} is not JSON ({e}): {}",
                self.name(i),
                out.describe()
            )
        })
    }

    /// The `"peers"` of peer `i`'s status (`Err` if the daemon does not answer or the status
    /// has no such array).
    pub fn peer_states(&self, i: usize) -> Result<Vec<PeerState>, String> {
        let v = self.status(i)?;
        let arr = v
            .get("peers")
            .and_then(|p| p.as_array())
            .ok_or_else(|| format!("status of {} has no \"peers\" array: {v}", self.name(i)))?;
        arr.iter()
            .map(|p| {
                Ok(PeerState {
                    name: p
                        .get("name")
                        .and_then(|x| x.as_str())
                        .ok_or_else(|| format!("peer entry without name: {p}"))?
                        .to_string(),
                    id: p
                        .get("id")
                        .and_then(|x| x.as_str())
                        .unwrap_or_default()
                        .to_string(),
                    connected: p
                        .get("connected")
                        .and_then(|x| x.as_bool())
                        .ok_or_else(|| format!("peer entry without boolean connected: {p}"))?,
                    last_error: p
                        .get("last_error")
                        .and_then(|x| x.as_str())
                        .map(str::to_owned),
                })
            })
            .collect()
    }

    /// Whether peer `i`'s status shows peer `j` connected.
    pub fn connected(&self, i: usize, j: usize) -> Result<bool, String> {
        let states = self.peer_states(i)?;
        states
            .iter()
            .find(|s| s.name == self.peers[j].name)
            .map(|s| s.connected)
            .ok_or_else(|| {
                format!(
                    "{} does not list {} in its status: {states:?}",
                    self.name(i),
                    self.name(j)
                )
            })
    }

    /// The locks peer `i` knows of (`peerfs locks --json`).
    pub fn try_locks(&self, i: usize) -> Result<Vec<LockInfo>, String> {
        let out = self.cli(i, "locks", &["--json"]);
        if out.code != Some(0) {
            return Err(format!(
                "`peerfs locks` on {}: {}",
                self.name(i),
                out.describe()
            ));
        }
        let v: serde_json::Value = serde_json::from_str(&out.stdout).map_err(|e| {
            format!(
                "`peerfs locks --json` on {} is not JSON ({e}): {}",
                self.name(i),
                out.describe()
            )
        })?;
        v.get("locks")
            .and_then(|l| l.as_array())
            .ok_or_else(|| format!("no \"locks\" array in {v}"))?
            .iter()
            .map(LockInfo::from_json)
            .collect()
    }

    /// Like [`Peers::try_locks`]; panics (with the peers' logs) if the command fails.
    #[track_caller]
    pub fn locks(&self, i: usize) -> Vec<LockInfo> {
        self.try_locks(i)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// The lock on `path` that peer `i` knows of, if any.
    #[track_caller]
    pub fn lock_on(&self, i: usize, path: &str) -> Option<LockInfo> {
        let path = path.trim_start_matches('/');
        self.locks(i).into_iter().find(|l| l.path == path)
    }

    /// Waits until no running peer lists a lock on `path`.
    #[track_caller]
    pub fn wait_unlocked(&self, path: &str, timeout: Duration) {
        let path = path.trim_start_matches('/').to_string();
        let running: Vec<usize> = (0..self.len()).filter(|&i| self.running[i]).collect();
        let this = self;
        this.wait_until(
            &format!("no peer lists a lock on {path:?}"),
            timeout,
            || {
                for &i in &running {
                    let locks = this.try_locks(i)?;
                    if let Some(l) = locks.iter().find(|l| l.path == path) {
                        return Err(format!("{} lists {l:?}", this.name(i)));
                    }
                }
                Ok(())
            },
        );
    }

    /// [`wait_until`] that also prints every peer's log on timeout.
    #[track_caller]
    pub fn wait_until<T>(
        &self,
        desc: &str,
        timeout: Duration,
        f: impl FnMut() -> Result<T, String>,
    ) -> T {
        poll_until(desc, timeout, f).unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// Waits (at most [`CONNECT_TIMEOUT`]) until every running peer that is not an outsider
    /// reports every other running non-outsider it is linked to (see [`PeersOptions::links`])
    /// connected.
    #[track_caller]
    pub fn wait_connected(&self) {
        self.poll_connected(CONNECT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }

    /// What [`Peers::wait_connected`] waits for, bounded by `timeout`; `Err` (without the
    /// logs) on timeout instead of a panic.
    pub fn poll_connected(&self, timeout: Duration) -> Result<(), String> {
        let insiders: Vec<usize> = (0..self.len())
            .filter(|&i| self.opts.outsider(i).is_none() && self.running[i])
            .collect();
        let this = self;
        poll_until("all peers report each other connected", timeout, || {
            let mut missing = Vec::new();
            for &i in &insiders {
                let states = this.peer_states(i)?;
                for &j in &insiders {
                    if !this.linked(i, j) {
                        continue;
                    }
                    let s = states.iter().find(|s| s.name == this.peers[j].name);
                    if !s.is_some_and(|s| s.connected) {
                        missing.push(format!("{} -> {}: {s:?}", this.name(i), this.name(j)));
                    }
                }
            }
            if missing.is_empty() {
                Ok(())
            } else {
                Err(missing.join("; "))
            }
        })
    }

    /// Kills peer `i`'s daemon with SIGKILL (its mount is left dead, as after a crash).
    pub fn kill9(&mut self, i: usize) {
        self.peers[i].mount.kill9();
        self.running[i] = false;
    }

    /// Stops peer `i`'s daemon with SIGTERM (a clean shutdown) and waits for it to exit.
    pub fn stop(&mut self, i: usize) {
        let status = self.peers[i].mount.stop();
        self.running[i] = false;
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM; its output:\n{}",
            self.name(i),
            self.peers[i].mount.output()
        );
    }

    /// Starts peer `i`'s daemon again with the same config and waits until the peers are all
    /// connected again.
    pub fn restart(&mut self, i: usize) {
        self.peers[i].mount.launch();
        self.running[i] = true;
        self.wait_connected();
    }

    /// Starts peer `i`'s daemon (again) with its current config and returns once its drive is
    /// mounted, without waiting for any connection (a peer that starts alone, or several
    /// started before one [`Peers::wait_connected`]).
    pub fn launch(&mut self, i: usize) {
        self.peers[i].mount.launch();
        self.running[i] = true;
    }

    /// The indices of the running peers.
    pub fn running(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| self.running[i]).collect()
    }

    /// Which pairs list each other now (`None`: the full mesh).
    pub fn links(&self) -> Option<&[(usize, usize)]> {
        self.links.as_deref()
    }

    /// Rewrites every peer's config so that exactly `links` list each other (`None`: full
    /// mesh). Running daemons are not touched: each reads its new peer list at its next start.
    pub fn set_links(&mut self, links: Option<Vec<(usize, usize)>>) {
        for &(i, j) in links.iter().flatten() {
            assert!(
                i < self.len() && j < self.len() && i != j,
                "bad link ({i}, {j})"
            );
        }
        self.links = links;
        self.write_configs();
    }

    /// [`Peers::set_links`], then restarts every running peer (SIGTERM, start) so it reads its
    /// new peer list, and waits until the linked running peers are connected.
    pub fn relink(&mut self, links: Option<Vec<(usize, usize)>>) {
        self.set_links(links);
        let running = self.running();
        for &i in &running {
            self.stop(i);
        }
        for &i in &running {
            self.launch(i);
        }
        self.wait_connected();
    }

    /// The `"sync"` object of peer `j` in peer `i`'s `peerfs status --json`.
    pub fn sync_state(&self, i: usize, j: usize) -> Result<serde_json::Value, String> {
        let st = self.status(i)?;
        let name = self.name(j);
        let peers = st
            .get("peers")
            .and_then(|p| p.as_array())
            .ok_or_else(|| format!("status of {} has no \"peers\" array: {st}", self.name(i)))?;
        let entry = peers
            .iter()
            .find(|p| p.get("name").and_then(|n| n.as_str()) == Some(name))
            .ok_or_else(|| format!("status of {} does not list {name}: {st}", self.name(i)))?;
        match entry.get("sync") {
            Some(s) if s.is_object() => Ok(s.clone()),
            _ => Err(format!(
                "{}'s status entry for {name} has no \"sync\" object: {entry}",
                self.name(i)
            )),
        }
    }

    /// The top-level `"reconcile"` object of peer `i`'s `peerfs status --json`.
    pub fn reconcile_state(&self, i: usize) -> Result<serde_json::Value, String> {
        let st = self.status(i)?;
        match st.get("reconcile") {
            Some(r) if r.is_object() => Ok(r.clone()),
            _ => Err(format!(
                "status of {} has no \"reconcile\" object: {st}",
                self.name(i)
            )),
        }
    }

    /// Snapshot of peer `i`'s backing folder (see [`backing_tree`]).
    pub fn backing_tree(&self, i: usize) -> std::io::Result<Tree> {
        backing_tree(self.peers[i].mount.backing())
    }

    /// Polls (every 100 ms, at most `timeout`) until the backing trees of `peers` are all
    /// equal, and still the same tree on the next poll at least 300 ms later (a tree that is
    /// equal only in passing is not converged); returns that tree. `Err` describes the last
    /// difference (a diff of the trees) and carries every peer's log.
    pub fn poll_trees_equal(&self, peers: &[usize], timeout: Duration) -> Result<Tree, String> {
        assert!(!peers.is_empty(), "no peers to compare");
        let start = Instant::now();
        let mut stable: Option<(Tree, Instant)> = None;
        let mut tries = 0u64;
        loop {
            tries += 1;
            let last = match self.compare_trees(peers) {
                Ok(tree) => {
                    match &stable {
                        Some((prev, since)) if *prev == tree => {
                            if since.elapsed() >= Duration::from_millis(300) {
                                return Ok(tree);
                            }
                        }
                        _ => stable = Some((tree, Instant::now())),
                    }
                    "equal trees, but still changing".to_string()
                }
                Err(diff) => {
                    stable = None;
                    diff
                }
            };
            if start.elapsed() > timeout {
                return Err(format!(
                    "timed out after {:?} ({tries} tries) waiting until the backing trees of {} \
                     are equal; last difference:\n{last}\n{}",
                    start.elapsed(),
                    peers
                        .iter()
                        .map(|&i| self.name(i))
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Peers::poll_trees_equal`] that panics on timeout with the diff and every log.
    #[track_caller]
    pub fn wait_trees_equal(&self, peers: &[usize], timeout: Duration) -> Tree {
        self.poll_trees_equal(peers, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The common tree of `peers` now (one look, no waiting), or a readable diff of their
    /// trees.
    pub fn compare_trees(&self, peers: &[usize]) -> Result<Tree, String> {
        let mut trees = Vec::new();
        for &i in peers {
            match self.backing_tree(i) {
                Ok(t) => trees.push((self.name(i).to_string(), t)),
                Err(e) => return Err(format!("cannot snapshot {}'s backing: {e}", self.name(i))),
            }
        }
        if trees.windows(2).all(|w| w[0].1 == w[1].1) {
            return Ok(trees.swap_remove(0).1);
        }
        Err(trees_diff(&trees))
    }

    /// Every peer's recent output, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in &self.peers {
            let _ = writeln!(
                s,
                "--- {} ({}) output ---\n{}",
                p.name,
                p.mount.root().display(),
                p.mount.output()
            );
        }
        s
    }
}

/// What a backing-tree snapshot records of one name: what every peer's copy must agree on
/// after reconciliation.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    /// A file's content, a symlink's target, nothing for a folder.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {:o}", self.kind, self.mode)?;
        match self.kind {
            Kind::Dir => Ok(()),
            Kind::Symlink => write!(f, " -> {}", show_bytes(&self.data)),
            _ => write!(f, " {} bytes {}", self.data.len(), show_bytes(&self.data)),
        }
    }
}

/// Relative path (no leading `/`, `/`-separated) to [`Entry`]; the root is not included.
pub type Tree = std::collections::BTreeMap<String, Entry>;

/// peerfs's own hidden names in a backing folder (intermediate files): never compared.
pub const RESERVED_PREFIX: &str = ".peerfs-tmp-";

/// At most 60 bytes of `b`, quoted, lossy UTF-8.
fn show_bytes(b: &[u8]) -> String {
    let cut = b.len().min(60);
    let more = if b.len() > cut { "..." } else { "" };
    format!("{:?}{more}", String::from_utf8_lossy(&b[..cut]))
}

/// Snapshots the tree under `root` (a backing folder): every name below it with its kind,
/// permission bits and content or symlink target; names starting with [`RESERVED_PREFIX`]
/// (and what is below them) are skipped. Symlinks are not followed.
pub fn backing_tree(root: &Path) -> std::io::Result<Tree> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    fn walk(root: &Path, dir: &Path, out: &mut Tree) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_name()
                .as_bytes()
                .starts_with(RESERVED_PREFIX.as_bytes())
            {
                continue;
            }
            let path = e.path();
            let md = std::fs::symlink_metadata(&path)?;
            let kind = Kind::of(md.file_type());
            let data = match kind {
                Kind::File => std::fs::read(&path)?,
                Kind::Symlink => std::fs::read_link(&path)?.as_os_str().as_bytes().to_vec(),
                _ => Vec::new(),
            };
            let rel = path
                .strip_prefix(root)
                .map(|r| String::from_utf8_lossy(r.as_os_str().as_bytes()).into_owned())
                .unwrap_or_default();
            out.insert(
                rel,
                Entry {
                    kind,
                    mode: md.mode() & 0o7777,
                    data,
                },
            );
            if kind == Kind::Dir {
                walk(root, &path, out)?;
            }
        }
        Ok(())
    }
    let mut out = Tree::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

/// A readable diff of named trees: one line per path on which they do not all agree, with
/// what each one has there.
pub fn trees_diff(trees: &[(String, Tree)]) -> String {
    let mut paths: Vec<&String> = trees.iter().flat_map(|(_, t)| t.keys()).collect();
    paths.sort();
    paths.dedup();
    let mut s = String::new();
    let mut shown = 0;
    let mut differing = 0;
    for path in paths {
        let seen: Vec<Option<&Entry>> = trees.iter().map(|(_, t)| t.get(path)).collect();
        if seen.windows(2).all(|w| w[0] == w[1]) {
            continue;
        }
        differing += 1;
        if shown == 200 {
            continue;
        }
        shown += 1;
        let _ = write!(s, "  {path}:");
        for ((name, _), e) in trees.iter().zip(&seen) {
            match e {
                Some(e) => {
                    let _ = write!(s, "  [{name}: {e:?}]");
                }
                None => {
                    let _ = write!(s, "  [{name}: missing]");
                }
            }
        }
        s.push('\n');
    }
    if differing > shown {
        let _ = writeln!(s, "  ... and {} more differing names", differing - shown);
    }
    let counts: Vec<String> = trees
        .iter()
        .map(|(n, t)| format!("{n}: {} names", t.len()))
        .collect();
    let _ = writeln!(s, "  ({})", counts.join(", "));
    s
}
