//! The control socket `<state>/control.sock`: owns its JSON protocol, the daemon-side server and
//! the client used by `status` (and by `mount` to detect a live daemon).
//!
//! One request per connection: the client sends one JSON object on one line, the daemon answers
//! one JSON object on one line and closes. Both carry `"v"`, the protocol version; a daemon
//! refuses a request with a newer version than it speaks. Commands today: `status`, `locks` and
//! `trash-restore` (`{"v":1,"cmd":"trash-restore","path":"docs/a.txt","id":null}`). Later issues
//! add commands as new `cmd` values and new optional fields in [`Request`] and [`Response`],
//! which older peers ignore.
//!
//! The server never calls into the mount (that would deadlock against the kernel when the drive
//! is busy or hung); it reads counters from the `Vfs` in memory.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use peerfs_proto::RelPath;

use crate::config::DriveConfig;

/// Version of the JSON shapes below.
pub const PROTOCOL_VERSION: u32 = 1;
/// Requests are tiny; anything longer is a confused or hostile client.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// Responses carry counters and, later, lock and peer lists.
const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;
/// The server answers one connection at a time: a silent client may hold it this long at most.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client waits for the daemon's answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

fn v1() -> u32 {
    PROTOCOL_VERSION
}

/// `{"v":1,"cmd":"status"}`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    #[serde(default = "v1")]
    pub v: u32,
    pub cmd: String,
    /// `trash-restore`: the path in the drive to bring back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `trash-restore`: the trash entry to take it from (default: the newest holding `path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl Request {
    fn plain(cmd: &str) -> Request {
        Request {
            v: PROTOCOL_VERSION,
            cmd: cmd.into(),
            path: None,
            id: None,
        }
    }

    pub fn status() -> Request {
        Request::plain("status")
    }

    pub fn locks() -> Request {
        Request::plain("locks")
    }

    pub fn trash_restore(path: String, id: Option<String>) -> Request {
        Request {
            path: Some(path),
            id,
            ..Request::plain("trash-restore")
        }
    }
}

/// `{"v":1,"ok":true,"status":{...}}` or `{"v":1,"ok":false,"error":"..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// The answer to `locks`: `[{"path","holder","holder_id","since","fencing","local",...}]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locks: Option<serde_json::Value>,
    /// The answer to `trash-restore`: `{"entry":{"id","path","deleted_at",...},"restored_to"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<serde_json::Value>,
}

impl Response {
    fn ok() -> Response {
        Response {
            v: PROTOCOL_VERSION,
            ok: true,
            error: None,
            status: None,
            locks: None,
            restored: None,
        }
    }

    fn error(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            ..Response::ok()
        }
    }
}

/// The daemon's answer to `status`; also what `peerfs status --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub mounted: bool,
    pub pid: u32,
    pub name: String,
    /// Paths as text (lossy for non-UTF-8 bytes: this is for display and scripts).
    pub mountpoint: String,
    pub backing: String,
    pub state: String,
    /// RFC 3339, UTC.
    pub since: String,
    pub since_unix: u64,
    pub uptime_secs: u64,
    /// peerfs version of the daemon (may differ from the client's after an upgrade).
    pub version: String,
    pub drive: DriveInfo,
    /// `Vfs::stats()` as the daemon's vfs serializes it; kept as JSON so the client prints
    /// counters it does not know yet.
    pub stats: serde_json::Value,
    /// The configured peers: `[{"name","id","address","connected","since","rtt_ms",...}]`;
    /// empty for a drive without peers.
    #[serde(default)]
    pub peers: Vec<serde_json::Value>,
    /// Reconciliation: `{"scan": {"files","changed","removed","ms"}, "conflicts": [...]}`;
    /// null for a drive without peers (or an older daemon).
    #[serde(default)]
    pub reconcile: serde_json::Value,
}

/// The `[drive]` settings the daemon runs with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DriveInfo {
    pub allow_other: bool,
    pub threads: usize,
    pub passthrough: bool,
    pub cache_ttl: String,
}

impl From<&DriveConfig> for DriveInfo {
    fn from(d: &DriveConfig) -> Self {
        DriveInfo {
            allow_other: d.allow_other,
            threads: d.threads,
            passthrough: d.passthrough,
            cache_ttl: crate::duration::format(d.cache_ttl),
        }
    }
}

/// What the daemon knows about itself, fixed at mount.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    pub pid: u32,
    pub name: String,
    pub mountpoint: PathBuf,
    pub backing: PathBuf,
    pub state: PathBuf,
    pub since: SystemTime,
    pub drive: DriveConfig,
}

/// Produces a JSON value on demand (counters, peers, locks).
pub type Source = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Restores `path` (from trash entry `id`, or the newest holding it) into the drive and
/// describes what it did (`peerfs_replicator::trash::Restored` as JSON), or says why not in
/// one line. Installed by the daemon so that a restore also replicates.
pub type TrashRestore =
    Arc<dyn Fn(&RelPath, Option<&str>) -> Result<serde_json::Value, String> + Send + Sync>;

/// Where the daemon's live answers come from.
#[derive(Clone)]
pub struct Sources {
    /// `Vfs::stats()` serialized.
    pub stats: Source,
    /// The peers' connection states (an array); None without networking.
    pub peers: Option<Source>,
    /// The locks this server holds and knows of (an array); None without networking.
    pub locks: Option<Source>,
    /// The start scan's report and the conflict copies made here; None without networking.
    pub reconcile: Option<Source>,
    /// `trash-restore`; None: the daemon answers that it cannot restore.
    pub trash_restore: Option<TrashRestore>,
}

/// Binds the socket (the caller removed any stale one) and restricts it to its owner: the
/// socket exposes drive metadata, and later issues add commands that change state.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests on its own thread until the process exits.
pub fn spawn_server(
    listener: UnixListener,
    info: DaemonInfo,
    sources: Sources,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("peerfs-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(e) = handle(stream, &info, &sources) {
                            tracing::debug!("control connection ended: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!("control socket accept failed: {e}");
                        // Out of descriptors, typically: give the process time to free some
                        // rather than spinning on the same error.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
}

fn handle(stream: UnixStream, info: &DaemonInfo, sources: &Sources) -> io::Result<()> {
    stream.set_read_timeout(Some(SERVER_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST_BYTES)).read_line(&mut line)?;
    let response = answer(&line, info, sources);
    let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
    out.push(b'\n');
    (&stream).write_all(&out)
}

fn answer(line: &str, info: &DaemonInfo, sources: &Sources) -> Response {
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return Response::error(format!("bad request: {e}")),
    };
    if req.v > PROTOCOL_VERSION {
        return Response::error(format!(
            "protocol version {} is newer than this daemon's {PROTOCOL_VERSION}",
            req.v
        ));
    }
    match req.cmd.as_str() {
        "status" => Response {
            status: Some(status_of(info, sources)),
            ..Response::ok()
        },
        "locks" => Response {
            locks: Some(
                sources
                    .locks
                    .as_ref()
                    .map_or_else(|| serde_json::json!([]), |f| f()),
            ),
            ..Response::ok()
        },
        "trash-restore" => trash_restore(&req, sources),
        other => Response::error(format!("unknown command {other:?}")),
    }
}

fn trash_restore(req: &Request, sources: &Sources) -> Response {
    let Some(path) = req.path.as_deref() else {
        return Response::error("trash-restore needs a \"path\"");
    };
    let rel = match RelPath::new(path.as_bytes()) {
        Ok(rel) if !rel.is_root() => rel,
        Ok(_) => return Response::error("trash-restore: the path names the drive's root"),
        Err(e) => return Response::error(format!("trash-restore: path {path:?}: {e}")),
    };
    let Some(restore) = sources.trash_restore.as_ref() else {
        return Response::error(
            "this daemon cannot restore from the trash; unmount the drive and run \
             `peerfs trash restore` again to restore into the backing folder",
        );
    };
    match restore(&rel, req.id.as_deref()) {
        Ok(restored) => Response {
            restored: Some(restored),
            ..Response::ok()
        },
        Err(why) => Response::error(why),
    }
}

fn status_of(info: &DaemonInfo, sources: &Sources) -> Status {
    let since_unix = info
        .since
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let uptime_secs = SystemTime::now()
        .duration_since(info.since)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Status {
        mounted: true,
        pid: info.pid,
        name: info.name.clone(),
        mountpoint: info.mountpoint.to_string_lossy().into_owned(),
        backing: info.backing.to_string_lossy().into_owned(),
        state: info.state.to_string_lossy().into_owned(),
        since: crate::timefmt::rfc3339_utc(since_unix),
        since_unix,
        uptime_secs,
        version: env!("CARGO_PKG_VERSION").to_string(),
        drive: DriveInfo::from(&info.drive),
        stats: (sources.stats)(),
        peers: sources
            .peers
            .as_ref()
            .and_then(|f| f().as_array().cloned())
            .unwrap_or_default(),
        reconcile: sources
            .reconcile
            .as_ref()
            .map_or(serde_json::Value::Null, |f| f()),
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing listens: no socket file, or a stale one nobody accepts on.
    NoDaemon(io::Error),
    /// Something accepted but did not answer properly.
    BadAnswer(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NoDaemon(e) => write!(f, "no daemon answers: {e}"),
            ClientError::BadAnswer(why) => f.write_str(why),
        }
    }
}

/// Sends one request and returns the daemon's response.
pub fn request(path: &Path, req: &Request) -> Result<Response, ClientError> {
    request_with_timeout(path, req, CLIENT_TIMEOUT)
}

/// [`request`] for commands that may take long (a restore that copies across filesystems).
pub fn request_with_timeout(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(path).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED) | Some(libc::ENOTSOCK) => {
            ClientError::NoDaemon(e)
        }
        _ => ClientError::BadAnswer(format!("cannot connect to {}: {e}", path.display())),
    })?;
    let bad =
        |e: io::Error| ClientError::BadAnswer(format!("control socket {}: {e}", path.display()));
    stream.set_read_timeout(Some(timeout)).map_err(bad)?;
    stream.set_write_timeout(Some(timeout)).map_err(bad)?;
    let mut line = serde_json::to_vec(req).map_err(|e| bad(io::Error::other(e)))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(bad)?;
    let mut answer = Vec::new();
    (&stream)
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut answer)
        .map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                bad(io::Error::new(
                    e.kind(),
                    format!("the daemon did not answer within {}s", timeout.as_secs()),
                ))
            } else {
                bad(e)
            }
        })?;
    let resp: Response = serde_json::from_slice(&answer).map_err(|e| {
        ClientError::BadAnswer(format!(
            "control socket {}: unreadable answer: {e}",
            path.display()
        ))
    })?;
    if resp.v > PROTOCOL_VERSION {
        // Still usable: newer daemons only add fields. Worth a note, not a failure.
        tracing::debug!(
            "daemon speaks protocol {}, we speak {PROTOCOL_VERSION}",
            resp.v
        );
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DaemonInfo {
        DaemonInfo {
            pid: 7,
            name: "office-a".into(),
            mountpoint: "/mnt/share".into(),
            backing: "/srv/share".into(),
            state: "/var/lib/peerfs/a".into(),
            since: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            drive: DriveConfig::default(),
        }
    }

    fn stats() -> Sources {
        Sources {
            stats: Arc::new(|| serde_json::json!({"lookups": 3, "reads": 1})),
            peers: None,
            locks: Some(Arc::new(|| serde_json::json!([{"path": "a.docx"}]))),
            reconcile: None,
            trash_restore: None,
        }
    }

    #[test]
    fn status_round_trip_over_a_real_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        let listener = bind(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        spawn_server(listener, info(), stats()).expect("spawn");

        let resp = request(&path, &Request::status()).expect("answer");
        assert!(resp.ok, "{resp:?}");
        let st = resp.status.expect("status");
        assert!(st.mounted);
        assert_eq!(st.pid, 7);
        assert_eq!(st.since, "2023-11-14T22:13:20Z");
        assert_eq!(st.stats["lookups"], 3);
        assert_eq!(st.drive.cache_ttl, "1s");
        assert!(st.peers.is_empty());

        let resp = request(&path, &Request::locks()).expect("answer");
        assert!(resp.ok, "{resp:?}");
        assert_eq!(resp.locks.expect("locks")[0]["path"], "a.docx");

        let resp = request(&path, &Request::plain("frobnicate")).expect("answer");
        assert!(!resp.ok);
        assert!(resp.error.unwrap_or_default().contains("frobnicate"));
    }

    #[test]
    fn versions_and_garbage_are_refused() {
        let (i, s) = (info(), stats());
        assert!(!answer("{\"v\":99,\"cmd\":\"status\"}", &i, &s).ok);
        assert!(!answer("not json", &i, &s).ok);
        // A missing version means 1, so `{"cmd":"status"}` works by hand (socat).
        assert!(answer("{\"cmd\":\"status\"}", &i, &s).ok);
    }

    #[test]
    fn trash_restore_goes_to_the_hook() {
        let (i, mut s) = (info(), stats());
        let req = |path: &str| {
            serde_json::to_string(&Request::trash_restore(path.into(), None)).expect("json")
        };
        let resp = answer(&req("docs/a.txt"), &i, &s);
        assert!(!resp.ok);
        assert!(resp.error.unwrap_or_default().contains("cannot restore"));

        s.trash_restore = Some(Arc::new(|rel: &RelPath, id: Option<&str>| {
            if rel.as_bytes() == b"missing" {
                return Err("missing is not in the trash".into());
            }
            Ok(serde_json::json!({"restored_to": rel.to_string(), "id": id}))
        }));
        let resp = answer(&req("docs/a.txt"), &i, &s);
        assert!(resp.ok, "{resp:?}");
        assert_eq!(
            resp.restored.expect("restored")["restored_to"],
            "docs/a.txt"
        );
        let with_id = "{\"v\":1,\"cmd\":\"trash-restore\",\"path\":\"a\",\"id\":\"X-1\"}";
        assert_eq!(answer(with_id, &i, &s).restored.expect("r")["id"], "X-1");
        let resp = answer(&req("missing"), &i, &s);
        assert_eq!(resp.error.as_deref(), Some("missing is not in the trash"));
        for bad in ["../etc/passwd", "/etc/passwd", ""] {
            assert!(!answer(&req(bad), &i, &s).ok, "{bad}");
        }
        assert!(!answer("{\"cmd\":\"trash-restore\"}", &i, &s).ok);
        // Old clients' requests carry no path or id, and still parse.
        assert_eq!(
            serde_json::to_string(&Request::status()).expect("json"),
            "{\"v\":1,\"cmd\":\"status\"}"
        );
    }

    #[test]
    fn no_socket_means_no_daemon() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        assert!(matches!(
            request(&path, &Request::status()),
            Err(ClientError::NoDaemon(_))
        ));
        // A stale socket file nobody listens on.
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(matches!(
            request(&path, &Request::status()),
            Err(ClientError::NoDaemon(_))
        ));
    }
}
