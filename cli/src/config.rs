//! The config file: owns parsing the one TOML file, resolving its paths and validating it.
//!
//! Two stages, because not every command needs the drive's folders to be usable:
//! [`Config::load`] parses, resolves relative paths against the config file's folder and checks
//! what needs no filesystem (names, addresses, durations); `status` stops there.
//! [`Config::check_for_mount`] then checks the folders as `mount` needs them and replaces them by
//! their canonical forms, so every later comparison (nesting, mountinfo, runtime record) is
//! between real paths.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

use crate::duration;
use crate::mountinfo::MountTable;

/// Port peers listen on when an address names only a host.
pub const DEFAULT_PORT: u16 = 7333;
/// Log level when the config sets none (RUST_LOG still overrides it).
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// `sockaddr_un.sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Upper bound for `[drive] threads`: more FUSE workers than this only adds contention.
const MAX_THREADS: usize = 1024;

/// The file as written; every key the contract in API.md allows, nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: String,
    backing: PathBuf,
    mountpoint: PathBuf,
    state: PathBuf,
    log_level: Option<String>,
    listen: Option<String>,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    drive: RawDrive,
    #[serde(default)]
    locks: RawLocks,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    files: RawFiles,
    #[serde(default)]
    trash: RawTrash,
    #[serde(default)]
    replication: RawReplication,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    id: String,
    /// Optional: a peer without an address is accepted when it dials in, never dialled.
    address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocks {
    policy: Option<String>,
    linger: Option<toml::Value>,
    grace: Option<toml::Value>,
    timeout: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    heartbeat: Option<toml::Value>,
    dead_after: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    include: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    owners: Option<bool>,
    track_min_size: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrash {
    retention: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrive {
    allow_other: Option<bool>,
    threads: Option<usize>,
    passthrough: Option<bool>,
    /// Kept as a raw value so a bare number gets a message about units, not about types.
    cache_ttl: Option<toml::Value>,
}

/// A loaded, resolved config. Paths are absolute; after [`Config::check_for_mount`] canonical.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file, absolute.
    pub file: PathBuf,
    pub name: String,
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub state: PathBuf,
    pub log_level: String,
    /// Normalized `HOST:PORT`; reserved for the peers issue.
    pub listen: Option<String>,
    pub peers: Vec<Peer>,
    pub drive: DriveConfig,
    pub locks: LocksConfig,
    pub network: NetworkConfig,
    pub files: FilesConfig,
    pub trash: TrashConfig,
    pub replication: ReplicationConfig,
}

/// One `[[peers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub id: peerfs_proto::PeerId,
    /// Normalized `HOST:PORT`; None: only accepted, never dialled.
    pub address: Option<String>,
}

/// What a write-open does while a configured peer is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockPolicy {
    /// Proceed with the reachable peers' grants; reconcile later.
    Available,
    /// Refuse with ETXTBSY.
    Strict,
}

/// The `[locks]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocksConfig {
    pub policy: LockPolicy,
    pub linger: Duration,
    pub grace: Duration,
    pub timeout: Duration,
}

impl Default for LocksConfig {
    fn default() -> Self {
        LocksConfig {
            policy: LockPolicy::Available,
            linger: Duration::from_secs(1),
            grace: Duration::from_secs(10),
            timeout: Duration::from_millis(1500),
        }
    }
}

/// The `[network]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub heartbeat: Duration,
    pub dead_after: Duration,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(5),
        }
    }
}

/// The `[files]` table: exclusion globs beyond the built-in temp/owner defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilesConfig {
    pub exclude: Vec<String>,
    pub include: Vec<String>,
}

/// The `[replication]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Apply the owner (uid/gid) of files received from peers (else they belong to the daemon).
    pub owners: bool,
    /// Write opens of files at least this big (bytes) are served by the daemon so that their
    /// written ranges are known (O(edit) deltas); smaller ones use kernel passthrough and are
    /// re-chunked whole at close.
    pub track_min_size: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            owners: true,
            track_min_size: 16 * 1024 * 1024,
        }
    }
}

/// The `[trash]` table: what peers' deletions and replaces leave in `STATE/trash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrashConfig {
    /// Entries older than this are deleted for good.
    pub retention: Duration,
}

impl Default for TrashConfig {
    fn default() -> Self {
        TrashConfig {
            retention: peerfs_replicator::trash::DEFAULT_RETENTION,
        }
    }
}

/// The `[drive]` table: FUSE tuning handed to `peerfs_fs_linux::MountOptions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    pub allow_other: bool,
    pub threads: usize,
    pub passthrough: bool,
    pub cache_ttl: Duration,
}

impl Default for DriveConfig {
    /// The same defaults as `MountOptions::default()` in fs-linux (see API.md).
    fn default() -> Self {
        DriveConfig {
            allow_other: true,
            threads: 4,
            passthrough: true,
            cache_ttl: Duration::from_secs(1),
        }
    }
}

impl Config {
    /// Reads and parses `file`, resolving relative paths against its folder.
    pub fn load(file: &Path) -> Result<Config> {
        let file = std::path::absolute(file)
            .with_context(|| format!("cannot resolve config path {}", file.display()))?;
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read config {}", file.display()))?;
        Config::parse(&text, &file)
    }

    /// Parses config text; `file` is the (absolute) path it came from, for messages and for
    /// resolving relative paths.
    pub fn parse(text: &str, file: &Path) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| line_of(text, span.start));
            match line {
                Some(line) => anyhow!("config {}: line {line}: {}", file.display(), e.message()),
                None => anyhow!("config {}: {}", file.display(), e.message()),
            }
        })?;
        let bad = |msg: String| anyhow!("config {}: {msg}", file.display());

        let name = raw.name.trim().to_string();
        validate_name(&name).map_err(|m| bad(format!("name: {m}")))?;

        let folder = file.parent().unwrap_or(Path::new("/"));
        let resolve = |key: &str, p: &Path| -> Result<PathBuf> {
            if p.as_os_str().is_empty() {
                return Err(bad(format!("{key}: must not be empty")));
            }
            Ok(normalize(&folder.join(p)))
        };
        let backing = resolve("backing", &raw.backing)?;
        let mountpoint = resolve("mountpoint", &raw.mountpoint)?;
        let state = resolve("state", &raw.state)?;
        if socket_path(&state).as_os_str().len() > MAX_SOCKET_PATH {
            return Err(bad(format!(
                "state: {} is too long: the control socket path must stay under {} bytes",
                state.display(),
                MAX_SOCKET_PATH + 1
            )));
        }

        let log_level = raw
            .log_level
            .map(|l| l.trim().to_string())
            .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string());
        validate_log_level(&log_level).map_err(|m| bad(format!("log_level: {m}")))?;

        let listen = raw
            .listen
            .map(|l| parse_host_port(&l))
            .transpose()
            .map_err(|m| bad(format!("listen: {m}")))?;

        let mut peers = Vec::with_capacity(raw.peers.len());
        let mut seen = HashSet::new();
        for (i, p) in raw.peers.into_iter().enumerate() {
            let at = |m: String| bad(format!("peers[{i}]: {m}"));
            let pname = p.name.trim().to_string();
            validate_name(&pname).map_err(|m| at(format!("name: {m}")))?;
            if pname == name {
                return Err(at(format!("name {pname:?} is this server's own name")));
            }
            if !seen.insert(pname.clone()) {
                return Err(at(format!("name {pname:?} appears more than once")));
            }
            let id: peerfs_proto::PeerId = p.id.trim().parse().map_err(|e| {
                at(format!(
                    "peer {pname:?}: id {:?}: {e} (copy it from `peerfs id` on that peer)",
                    p.id
                ))
            })?;
            let address = p
                .address
                .map(|a| parse_host_port(&a))
                .transpose()
                .map_err(|m| at(format!("peer {pname:?}: address: {m}")))?;
            peers.push(Peer {
                name: pname,
                id,
                address,
            });
        }

        let defaults = DriveConfig::default();
        let threads = raw.drive.threads.unwrap_or(defaults.threads);
        if !(1..=MAX_THREADS).contains(&threads) {
            return Err(bad(format!(
                "drive.threads: {threads} is out of range 1..={MAX_THREADS}"
            )));
        }
        // Durations are strings with a unit; a bare number gets a message about units.
        let dur = |key: &str, v: Option<toml::Value>, default: Duration| -> Result<Duration> {
            match v {
                Some(toml::Value::String(text)) => {
                    duration::parse(&text).map_err(|m| bad(format!("{key}: {m}")))
                }
                Some(other) => Err(bad(format!(
                    "{key}: {other} is not a duration; write it with a unit, e.g. \"1s\" or \"500ms\""
                ))),
                None => Ok(default),
            }
        };
        let cache_ttl = dur("drive.cache_ttl", raw.drive.cache_ttl, defaults.cache_ttl)?;
        let drive = DriveConfig {
            allow_other: raw.drive.allow_other.unwrap_or(defaults.allow_other),
            threads,
            passthrough: raw.drive.passthrough.unwrap_or(defaults.passthrough),
            cache_ttl,
        };

        let ld = LocksConfig::default();
        let policy = match raw.locks.policy.as_deref().map(str::trim) {
            None | Some("available") => LockPolicy::Available,
            Some("strict") => LockPolicy::Strict,
            Some(other) => {
                return Err(bad(format!(
                    "locks.policy: {other:?} is neither \"available\" nor \"strict\""
                )));
            }
        };
        let locks = LocksConfig {
            policy,
            linger: dur("locks.linger", raw.locks.linger, ld.linger)?,
            grace: dur("locks.grace", raw.locks.grace, ld.grace)?,
            timeout: dur("locks.timeout", raw.locks.timeout, ld.timeout)?,
        };
        if locks.timeout.is_zero() {
            return Err(bad("locks.timeout: must be more than 0".into()));
        }
        let nd = NetworkConfig::default();
        let network = NetworkConfig {
            heartbeat: dur("network.heartbeat", raw.network.heartbeat, nd.heartbeat)?,
            dead_after: dur("network.dead_after", raw.network.dead_after, nd.dead_after)?,
        };
        if network.heartbeat.is_zero() || network.dead_after <= network.heartbeat {
            return Err(bad(
                "network: heartbeat must be more than 0 and dead_after longer than heartbeat"
                    .into(),
            ));
        }
        let files = FilesConfig {
            exclude: raw.files.exclude,
            include: raw.files.include,
        };
        peerfs_vfs::exclude::Excludes::new(&files.exclude, &files.include)
            .map_err(|e| bad(format!("files: {e}")))?;
        let trash = TrashConfig {
            retention: dur(
                "trash.retention",
                raw.trash.retention,
                TrashConfig::default().retention,
            )?,
        };
        if trash.retention.is_zero() {
            return Err(bad(
                "trash.retention: must be more than 0 (deleted files would be lost at once)".into(),
            ));
        }

        let replication = ReplicationConfig {
            owners: raw
                .replication
                .owners
                .unwrap_or(ReplicationConfig::default().owners),
            track_min_size: raw
                .replication
                .track_min_size
                .unwrap_or(ReplicationConfig::default().track_min_size),
        };

        Ok(Config {
            file: file.to_path_buf(),
            name,
            backing,
            mountpoint,
            state,
            log_level,
            listen,
            peers,
            drive,
            locks,
            network,
            files,
            trash,
            replication,
        })
    }

    /// Whether this server talks to peers at all (a lone drive needs no identity).
    pub fn networked(&self) -> bool {
        self.listen.is_some() || !self.peers.is_empty()
    }

    /// Checks the folders as `mount` needs them, and makes every path canonical.
    ///
    /// `mounts` is the current mount table; the caller has already detached a dead peerfs mount
    /// (ENOTCONN) at the mountpoint, so any mount found there now is live and in the way.
    pub fn check_for_mount(&mut self, mounts: &MountTable) -> Result<()> {
        self.backing = existing_dir("backing", &self.backing)?;
        let mountpoint = existing_dir("mountpoint", &self.mountpoint)?;
        if let Some(entry) = mounts.find(&mountpoint) {
            bail!(
                "mountpoint {}: already a mount point ({} from {}); unmount it first",
                mountpoint.display(),
                entry.fstype,
                entry.source
            );
        }
        // mountinfo can miss a mount made in another mount namespace we see through; a device
        // change between the folder and its parent is the classic test and catches that.
        if let Some(parent) = mountpoint.parent() {
            let (md, pmd) = (meta(&mountpoint)?, meta(parent)?);
            if md.dev() != pmd.dev() {
                bail!(
                    "mountpoint {}: already a mount point; unmount it first",
                    mountpoint.display()
                );
            }
        }
        let mut entries = std::fs::read_dir(&mountpoint)
            .with_context(|| format!("mountpoint {}: cannot list", mountpoint.display()))?;
        if entries.next().is_some() {
            // Mounting over files would hide them from everyone until the next unmount.
            bail!(
                "mountpoint {}: not empty; the drive must be mounted on an empty folder",
                mountpoint.display()
            );
        }
        self.mountpoint = mountpoint;

        // The state folder may not exist yet: canonicalize what exists of it.
        self.state = canonicalize_lenient(&self.state)
            .with_context(|| format!("state {}", self.state.display()))?;
        match std::fs::metadata(&self.state) {
            Ok(md) if !md.is_dir() => {
                bail!(
                    "state {}: exists but is not a directory",
                    self.state.display()
                )
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => bail!("state {}: {e}", self.state.display()),
        }

        check_disjoint(&self.backing, &self.mountpoint, &self.state)
    }

    /// `<state>/control.sock`.
    pub fn control_socket(&self) -> PathBuf {
        socket_path(&self.state)
    }

    /// `<state>/peerfs.log`, where the daemon logs.
    pub fn log_file(&self) -> PathBuf {
        self.state.join("peerfs.log")
    }

    /// `<state>/peerfs.pid`, written and locked by the serving process.
    pub fn pid_file(&self) -> PathBuf {
        self.state.join("peerfs.pid")
    }
}

fn socket_path(state: &Path) -> PathBuf {
    state.join("control.sock")
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    // Names end up in conflict-copy file names and log lines: no path separators or controls.
    if name
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(format!(
            "{name:?} must not contain '/', '\\' or control characters"
        ));
    }
    Ok(())
}

fn validate_log_level(level: &str) -> Result<(), String> {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    if level.contains(['=', ',']) {
        // A full filter such as "info,peerfs_vfs=debug".
        return tracing_subscriber::EnvFilter::builder()
            .parse(level)
            .map(|_| ())
            .map_err(|e| format!("{level:?}: {e}"));
    }
    // A bare word would otherwise be taken as a target name and silently log nothing useful.
    if LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
        Ok(())
    } else {
        Err(format!(
            "{level:?} is not one of {} (or a filter like \"info,peerfs_vfs=debug\")",
            LEVELS.join(", ")
        ))
    }
}

/// Validates `HOST:PORT` (or a bare host, given [`DEFAULT_PORT`]) and returns it normalized.
/// Hosts are not resolved here: DNS may not be up when the drive mounts.
pub fn parse_host_port(text: &str) -> Result<String, String> {
    let s = text.trim();
    let bad = |why: &str| format!("{s:?} is not HOST:PORT ({why})");
    if s.is_empty() {
        return Err(bad("empty"));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or_else(|| bad("missing ']'"))?;
        v6.parse::<Ipv6Addr>()
            .map_err(|_| bad("bad IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
        };
        (format!("[{v6}]"), port)
    } else if let Ok(v6) = s.parse::<Ipv6Addr>() {
        (format!("[{v6}]"), None)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    if !host.starts_with('[') {
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let hostname_ok = host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
        if host.parse::<Ipv4Addr>().is_err() && !(hostname_ok && host.len() <= 253) {
            return Err(bad("bad host name"));
        }
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p.parse::<u16>().map_err(|_| bad("port must be 0-65535"))?,
    };
    Ok(format!("{host}:{port}"))
}

/// Makes a path absolute-looking without touching the filesystem: drops `.` components and
/// trailing slashes. `..` stays, since only the filesystem knows what it means across symlinks.
fn normalize(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

fn meta(p: &Path) -> Result<std::fs::Metadata> {
    std::fs::metadata(p).with_context(|| format!("cannot stat {}", p.display()))
}

fn existing_dir(key: &str, p: &Path) -> Result<PathBuf> {
    match std::fs::metadata(p) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => bail!("{key} {}: not a directory", p.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("{key} {}: does not exist", p.display())
        }
        Err(e) => bail!("{key} {}: {e}", p.display()),
    }
    std::fs::canonicalize(p).with_context(|| format!("{key} {}", p.display()))
}

/// Canonicalizes the longest existing prefix of `p` and appends the rest, so a folder that is
/// still to be created compares correctly with real paths.
pub fn canonicalize_lenient(p: &Path) -> io::Result<PathBuf> {
    let mut missing: Vec<OsString> = Vec::new();
    let mut cur = p.to_path_buf();
    loop {
        match std::fs::canonicalize(&cur) {
            Ok(mut real) => {
                for part in missing.iter().rev() {
                    if part.as_bytes() == b".." {
                        real.pop();
                    } else {
                        real.push(part);
                    }
                }
                return Ok(real);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Not `file_name()`: that is None for a trailing "..", which we must keep.
                let Some(last) = cur.components().next_back() else {
                    return Err(e);
                };
                missing.push(last.as_os_str().to_os_string());
                if !cur.pop() {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Refuses any nesting between the watch set, the mountpoint and peerfs's own state.
fn check_disjoint(backing: &Path, mountpoint: &Path, state: &Path) -> Result<()> {
    let rules: [(&str, &Path, &str, &Path, &str); 6] = [
        (
            "mountpoint",
            mountpoint,
            "backing",
            backing,
            "the drive would contain itself",
        ),
        (
            "backing",
            backing,
            "mountpoint",
            mountpoint,
            "the drive would hide its own backing folder",
        ),
        (
            "state",
            state,
            "backing",
            backing,
            "peerfs's own data must live outside the watch set",
        ),
        (
            "backing",
            backing,
            "state",
            state,
            "the watch set must not live inside peerfs's own data",
        ),
        (
            "state",
            state,
            "mountpoint",
            mountpoint,
            "peerfs's own data must not be reached through the drive",
        ),
        (
            "mountpoint",
            mountpoint,
            "state",
            state,
            "the drive must not be mounted inside peerfs's own data",
        ),
    ];
    for (inner_key, inner, outer_key, outer, why) in rules {
        if inner.starts_with(outer) {
            let relation = if inner == outer {
                "is the same folder as"
            } else {
                "is inside"
            };
            bail!(
                "{inner_key} {} {relation} {outer_key} {}: {why}",
                inner.display(),
                outer.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/peerfs/a.toml"))
    }

    const MINIMAL: &str = r#"
name = "office-a"
backing = "share"
mountpoint = "/mnt/share"
state = "./state/a/"
"#;

    #[test]
    fn minimal_config_gets_defaults_and_relative_paths() {
        let c = parse(MINIMAL).expect("parses");
        assert_eq!(c.name, "office-a");
        assert_eq!(c.backing, Path::new("/etc/peerfs/share"));
        assert_eq!(c.mountpoint, Path::new("/mnt/share"));
        assert_eq!(c.state, Path::new("/etc/peerfs/state/a"));
        assert_eq!(c.log_level, "info");
        assert_eq!(c.listen, None);
        assert!(c.peers.is_empty());
        assert_eq!(c.drive, DriveConfig::default());
        assert_eq!(c.trash.retention, Duration::from_secs(30 * 86_400));
        assert_eq!(
            c.control_socket(),
            Path::new("/etc/peerfs/state/a/control.sock")
        );
    }

    #[test]
    fn full_config_parses() {
        let text = format!(
            "{MINIMAL}log_level = \"debug\"\nlisten = \"0.0.0.0\"\n\
             [[peers]]\nname = \"office-b\"\nid = \"OR4L-B6GN-RNPW-TQDP-RBCZ-PDBP-SZF7-QMYU-ERIO-U2BO-VDZ2-ZAPX-3ITA\"\naddress = \"b.example.org:7444\"\n\
             [[peers]]\nname = \"office-c\"\nid = \"MTJE-E4OB-UIJV-BWIP-LSLL-IDAA-PCZ2-WKD2-MGW3-MI5D-N7WA-EWXR-3P2Q\"\naddress = \"[::1]\"\n\
             [drive]\nallow_other = false\nthreads = 8\npassthrough = false\ncache_ttl = \"500ms\"\n\
             [locks]\npolicy = \"strict\"\nlinger = \"2s\"\ngrace = \"5s\"\ntimeout = \"800ms\"\n\
             [network]\nheartbeat = \"250ms\"\ndead_after = \"2s\"\n\
             [files]\nexclude = [\"*.bak\"]\ninclude = [\"keep.tmp\"]\n\
             [trash]\nretention = \"7d12h\"\n"
        );
        let c = parse(&text).expect("parses");
        assert_eq!(c.listen.as_deref(), Some("0.0.0.0:7333"));
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[0].address.as_deref(), Some("b.example.org:7444"));
        assert_eq!(c.peers[1].address.as_deref(), Some("[::1]:7333"));
        assert_eq!(
            c.peers[0].id.to_string(),
            "OR4L-B6GN-RNPW-TQDP-RBCZ-PDBP-SZF7-QMYU-ERIO-U2BO-VDZ2-ZAPX-3ITA"
        );
        assert_eq!(
            c.locks,
            LocksConfig {
                policy: LockPolicy::Strict,
                linger: Duration::from_secs(2),
                grace: Duration::from_secs(5),
                timeout: Duration::from_millis(800),
            }
        );
        assert_eq!(c.network.heartbeat, Duration::from_millis(250));
        assert_eq!(c.files.exclude, vec!["*.bak".to_string()]);
        assert_eq!(
            c.trash.retention,
            Duration::from_secs(7 * 86_400 + 12 * 3600)
        );
        assert!(c.networked());
        assert_eq!(
            c.drive,
            DriveConfig {
                allow_other: false,
                threads: 8,
                passthrough: false,
                cache_ttl: Duration::from_millis(500)
            }
        );
    }

    fn err_of(text: &str) -> String {
        let e = parse(text).expect_err("must fail");
        let s = format!("{e:#}");
        assert!(!s.contains('\n'), "one line: {s}");
        s
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let s = err_of(&format!("{MINIMAL}colour = \"blue\"\n"));
        assert!(s.contains("`colour`") && s.contains("line 6"), "{s}");
        let s = err_of(&format!("{MINIMAL}[drive]\nthread = 3\n"));
        assert!(s.contains("`thread`"), "{s}");
        let s = err_of(&format!(
            "{MINIMAL}[[peers]]\nname = \"b\"\nid = \"x\"\naddress = \"b\"\nport = 1\n"
        ));
        assert!(s.contains("`port`"), "{s}");
        let c = Config::parse(
            &format!("{MINIMAL}[replication]\nowners = false\ntrack_min_size = 1048576\n"),
            Path::new("/etc/peerfs/a.toml"),
        )
        .expect("replication table");
        assert_eq!(
            c.replication,
            ReplicationConfig {
                owners: false,
                track_min_size: 1 << 20
            }
        );
        let s = err_of(&format!("{MINIMAL}[replication]\nowner = true\n"));
        assert!(s.contains("owner"), "{s}");
        let s = err_of(&format!("{MINIMAL}[trash]\nretention = \"1d\"\nkeep = 3\n"));
        assert!(s.contains("`keep`") && s.contains("line 8"), "{s}");
    }

    #[test]
    fn missing_required_keys_are_named() {
        let s = err_of("name = \"a\"\nbacking = \"/b\"\nmountpoint = \"/m\"\n");
        assert!(s.contains("`state`"), "{s}");
        let s = err_of(&format!(
            "{MINIMAL}[[peers]]\nname = \"b\"\naddress = \"b\"\n"
        ));
        assert!(s.contains("`id`"), "{s}");
    }

    #[test]
    fn bad_values_are_refused() {
        for (extra, needle) in [
            ("listen = \"host:port\"\n", "listen"),
            ("listen = \":7333\"\n", "listen"),
            ("listen = \"a b:1\"\n", "listen"),
            ("listen = \"[::1\"\n", "listen"),
            ("log_level = \"loud\"\n", "log_level"),
            ("[drive]\nthreads = 0\n", "drive.threads"),
            ("[drive]\ncache_ttl = \"1\"\n", "drive.cache_ttl"),
            ("[drive]\ncache_ttl = 1\n", "write it with a unit"),
            ("[locks]\npolicy = \"maybe\"\n", "locks.policy"),
            ("[locks]\ntimeout = \"0s\"\n", "locks.timeout"),
            ("[locks]\nlinger = 5\n", "locks.linger"),
            (
                "[network]\nheartbeat = \"2s\"\ndead_after = \"1s\"\n",
                "dead_after",
            ),
            ("[files]\nexclude = [\"a[\"]\n", "files"),
            ("[locks]\nbogus = 1\n", "bogus"),
            (
                "[trash]\nretention = \"0d\"\n",
                "trash.retention: must be more than 0",
            ),
            ("[trash]\nretention = 30\n", "write it with a unit"),
            ("[trash]\nretention = \"30 days\"\n", "trash.retention"),
            (
                "[[peers]]\nname = \"b\"\nid = \"not-an-id\"\naddress = \"b\"\n",
                "peerfs id",
            ),
            (
                "[[peers]]\nname = \"\"\nid = \"OR4L-B6GN-RNPW-TQDP-RBCZ-PDBP-SZF7-QMYU-ERIO-U2BO-VDZ2-ZAPX-3ITA\"\naddress = \"b\"\n",
                "peers[0]: name",
            ),
            (
                "[[peers]]\nname = \"b\"\nid = \"\"\naddress = \"b\"\n",
                "id",
            ),
            (
                "[[peers]]\nname = \"b\"\nid = \"OR4L-B6GN-RNPW-TQDP-RBCZ-PDBP-SZF7-QMYU-ERIO-U2BO-VDZ2-ZAPX-3ITA\"\naddress = \"\"\n",
                "address",
            ),
            (
                "[[peers]]\nname = \"office-a\"\nid = \"OR4L-B6GN-RNPW-TQDP-RBCZ-PDBP-SZF7-QMYU-ERIO-U2BO-VDZ2-ZAPX-3ITA\"\naddress = \"b\"\n",
                "own name",
            ),
            (
                "[[peers]]\nname = \"b\"\nid = \"OR4L-B6GN-RNPW-TQDP-RBCZ-PDBP-SZF7-QMYU-ERIO-U2BO-VDZ2-ZAPX-3ITA\"\naddress = \"b\"\n\
                 [[peers]]\nname = \"b\"\nid = \"MTJE-E4OB-UIJV-BWIP-LSLL-IDAA-PCZ2-WKD2-MGW3-MI5D-N7WA-EWXR-3P2Q\"\naddress = \"c\"\n",
                "more than once",
            ),
        ] {
            let s = err_of(&format!("{MINIMAL}{extra}"));
            assert!(s.contains(needle), "{extra:?} -> {s}");
        }
        let s = err_of("name = \"\"\nbacking = \"/b\"\nmountpoint = \"/m\"\nstate = \"/s\"\n");
        assert!(s.contains("name: must not be empty"), "{s}");
    }

    #[test]
    fn host_port_forms() {
        let ok = [
            ("127.0.0.1:1", "127.0.0.1:1"),
            ("localhost", "localhost:7333"),
            ("b.example.org:0", "b.example.org:0"),
            ("[::1]:80", "[::1]:80"),
            ("::1", "[::1]:7333"),
            ("[fe80::1]", "[fe80::1]:7333"),
        ];
        for (text, want) in ok {
            assert_eq!(parse_host_port(text).as_deref(), Ok(want), "{text}");
        }
        for text in ["", ":1", "h:", "h:70000", "h:x", "a..b", "[::1]x", "[zz]:1"] {
            assert!(parse_host_port(text).is_err(), "{text}");
        }
    }

    #[test]
    fn nesting_rules() {
        let p = Path::new;
        assert!(check_disjoint(p("/srv/share"), p("/mnt/share"), p("/var/lib/peerfs")).is_ok());
        assert!(check_disjoint(p("/srv/share"), p("/srv/share2"), p("/srv/share-state")).is_ok());
        let cases = [
            (
                p("/srv"),
                p("/srv/mnt"),
                p("/var/s"),
                "mountpoint /srv/mnt is inside backing /srv",
            ),
            (
                p("/mnt/x/b"),
                p("/mnt/x"),
                p("/var/s"),
                "backing /mnt/x/b is inside mountpoint",
            ),
            (
                p("/srv"),
                p("/mnt"),
                p("/srv/.state"),
                "state /srv/.state is inside backing /srv",
            ),
            (
                p("/var/s/b"),
                p("/mnt"),
                p("/var/s"),
                "backing /var/s/b is inside state",
            ),
            (
                p("/srv"),
                p("/mnt"),
                p("/mnt/s"),
                "state /mnt/s is inside mountpoint",
            ),
            (p("/srv"), p("/srv"), p("/var/s"), "is the same folder as"),
        ];
        for (b, m, s, want) in cases {
            let e = check_disjoint(b, m, s).expect_err(want).to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn lenient_canonicalize_keeps_missing_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = std::fs::canonicalize(dir.path()).expect("canon");
        let got = canonicalize_lenient(&dir.path().join("a/b/../c")).expect("ok");
        assert_eq!(got, real.join("a/c"));
    }
}
