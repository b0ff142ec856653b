//! The peer mesh: owns every connection to the configured peers — listening, dialling with
//! backoff, the TLS and Hello handshakes, the one-connection-per-pair rule, heartbeats and
//! liveness, and the two-lane (Control before Bulk) writer of each connection. Callers see
//! [`MeshEvent`]s and [`Mesh::send`]; what messages mean (locks, replication) is theirs.
//!
//! Shape: one task accepts, one task per peer with an address dials, and each established
//! connection has a reader (inline in its task) and a writer task. Per peer, a *session* runs
//! from `Connected` to `Disconnected`; its two queues (Control, Bulk) belong to the session,
//! not to a TCP connection, so when a duplicate connection replaces another (both sides
//! dialled) the queued messages move with it and callers notice nothing.
//!
//! The rules, and why, are in docs/PROTOCOL.md; in short:
//! - **One connection per pair.** The connection dialled by the peer with the lower id wins;
//!   between two connections in the same direction, the newer one wins (the dialler only
//!   dials again when it believes the old one is gone). The acceptor of a connection always
//!   registers it before the dialler does (it answers Hello only after registering), so the
//!   dialler of the winning connection is the one that closes the losing one; the other side
//!   only stops writing on it and reads until it closes, so nothing in flight is lost.
//! - **Liveness.** Each side sends `Ping` every `heartbeat`; any frame counts as a sign of
//!   life; `dead_after` without a frame closes the connection.
//! - **A bad frame closes that connection only**, with a warning naming the peer and why.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedMutexGuard, Semaphore, mpsc, watch};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use crate::frame::{self, FrameError};
use crate::identity::Identity;
use crate::msg::{Message, PROTOCOL_VERSION};
use crate::{DEFAULT_PORT, PeerId, tls};

/// Largest frame accepted on the Bulk lane. Keeping bulk frames small bounds how long a
/// Control frame can wait behind the one bulk frame being written; larger payloads (file
/// content) must be cut into chunks by the caller.
pub const BULK_MAX_FRAME: usize = 64 * 1024;

/// Unsent bytes the kernel may hold per socket (`TCP_NOTSENT_LOWAT`): beyond this the socket
/// reports "not writable", so bulk data waits in our queue — where Control frames overtake it
/// — instead of in the kernel's send buffer, where nothing can.
const NOTSENT_LOWAT: u32 = 32 * 1024;

/// A writer that finds more frames waiting joins them into one write until it holds this
/// many bytes (the last frame joined may pass it: a write is at most this plus one frame).
const COALESCE_BYTES: usize = 16 * 1024;

/// TLS handshakes from unauthenticated addresses allowed at once; more are dropped at accept.
const MAX_PENDING_HANDSHAKES: usize = 64;

/// One configured peer.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// The name used in logs, events and status.
    pub name: String,
    /// The pinned id: only a certificate with this id is accepted for this peer.
    pub id: PeerId,
    /// `host:port` to dial (port 7333 when only a host is given); `None`: only accept.
    pub address: Option<String>,
}

/// Everything [`Mesh::start`] needs.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// This server's name, sent in Hello.
    pub name: String,
    pub identity: Identity,
    /// Where to accept peers; `None`: dial only.
    pub listen: Option<SocketAddr>,
    pub peers: Vec<PeerConfig>,
    /// Interval between Pings on each connection.
    pub heartbeat: Duration,
    /// A connection with no frame received for this long is dead. Also bounds each handshake
    /// step and each frame write.
    pub dead_after: Duration,
    /// First redial delay after a failure; doubles per failure (with jitter) up to
    /// `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Largest frame payload accepted or sent (the Bulk lane is further capped at
    /// [`BULK_MAX_FRAME`]).
    pub max_frame: usize,
}

impl MeshConfig {
    /// A config with the default timings (1 s heartbeat, 5 s dead_after, 100 ms–10 s backoff,
    /// 1 MiB frames), no listener and no peers.
    pub fn new(name: impl Into<String>, identity: Identity) -> MeshConfig {
        MeshConfig {
            name: name.into(),
            identity,
            listen: None,
            peers: Vec::new(),
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            max_frame: frame::DEFAULT_MAX_FRAME,
        }
    }
}

/// Which lane a message takes. Control frames are always written before any queued Bulk frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Locks, heartbeats, small requests: never waits behind bulk data.
    Control,
    /// File content and other large transfers: at most [`BULK_MAX_FRAME`] per message.
    Bulk,
}

/// What the mesh tells its owner. Per peer, events come in the order
/// `Connected`, `Message`*, `Disconnected`, repeated; no `Message` arrives outside a
/// `Connected`–`Disconnected` span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshEvent {
    Connected { peer: PeerId, name: String },
    Disconnected { peer: PeerId, reason: String },
    Message { peer: PeerId, msg: Message },
}

/// Who dialled a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// This server dialled.
    Outbound,
    /// The peer dialled.
    Inbound,
}

/// One peer as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    pub name: String,
    #[serde(serialize_with = "serialize_display")]
    pub id: PeerId,
    pub address: Option<String>,
    pub connected: bool,
    /// When the current session started.
    pub since: Option<SystemTime>,
    /// Last measured Ping round trip.
    pub rtt: Option<Duration>,
    /// Why the last connection or dial attempt failed (cleared on connect).
    pub last_error: Option<String>,
    /// Who dialled the connection in use.
    pub direction: Option<Direction>,
    /// TLS connections open with this peer, including one being retired (normally 0 or 1).
    pub connections: usize,
    /// Bytes queued on the Bulk lane, not yet written (for callers' flow control).
    pub bulk_queued: usize,
    /// Bytes sent to / received from this peer since the mesh started, as TCP carried them
    /// (TLS records included; TCP/IP headers not).
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

fn serialize_display<S: serde::Serializer>(id: &PeerId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// Why [`Mesh::send`] refused a message. Nothing is queued in either case.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No session with this peer (or not a configured peer).
    #[error("peer {0} is not connected")]
    NotConnected(PeerId),
    /// The encoded message exceeds the lane's frame limit.
    #[error("message of {len} bytes exceeds the {max}-byte frame limit of its lane")]
    TooLarge { len: usize, max: usize },
    /// Hello, Ping and Pong belong to the mesh itself.
    #[error("Hello, Ping and Pong are sent by the mesh itself")]
    Reserved,
}

/// Handle to a running mesh. Cheap to clone; the mesh shuts down when the last handle is
/// dropped (or on [`Mesh::shutdown`]).
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
    _guard: Arc<DropGuard>,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("id", &self.inner.local_id)
            .field("local_addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}

/// Signals shutdown when the last [`Mesh`] handle goes away, so tasks (which hold `Inner`,
/// not the guard) end and release their sockets.
struct DropGuard(Arc<Inner>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.shutdown.send_replace(true);
    }
}

impl Mesh {
    /// Binds the listener (if any), starts accepting and dialling, and returns the handle and
    /// the event stream. Must be called within a tokio runtime.
    pub async fn start(cfg: MeshConfig) -> io::Result<(Mesh, mpsc::UnboundedReceiver<MeshEvent>)> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        let local_id = cfg.identity.id;
        if cfg.heartbeat.is_zero() || cfg.dead_after.is_zero() {
            return Err(invalid("heartbeat and dead_after must be positive".into()));
        }
        if cfg.max_frame < 512 {
            return Err(invalid(format!("max_frame {} is too small", cfg.max_frame)));
        }
        let mut slots = Vec::with_capacity(cfg.peers.len());
        let mut by_id = HashMap::new();
        for p in &cfg.peers {
            if p.id == local_id {
                return Err(invalid(format!(
                    "peer {:?} has this server's own id {}",
                    p.name, p.id
                )));
            }
            let client = tls::client_config(&cfg.identity, p.id).map_err(io::Error::other)?;
            let (connected, _) = watch::channel(false);
            let slot = Arc::new(Slot {
                name: p.name.clone(),
                id: p.id,
                address: p.address.clone(),
                connector: TlsConnector::from(Arc::new(client)),
                connected,
                state: Mutex::new(SlotState::default()),
            });
            if by_id.insert(p.id, slot.clone()).is_some() {
                return Err(invalid(format!("peer id {} is configured twice", p.id)));
            }
            slots.push(slot);
        }
        let server =
            tls::server_config(&cfg.identity, by_id.keys().copied()).map_err(io::Error::other)?;

        let listener = match cfg.listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let local_addr = match &listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let (events, events_rx) = mpsc::unbounded_channel();
        let (shutdown, _) = watch::channel(false);
        let (live_tasks, _) = watch::channel(0usize);
        let inner = Arc::new(Inner {
            local_id,
            name: cfg.name,
            timing: Timing {
                heartbeat: cfg.heartbeat,
                dead_after: cfg.dead_after,
                backoff_min: cfg.backoff_min.max(Duration::from_millis(1)),
                backoff_max: cfg.backoff_max.max(cfg.backoff_min),
                max_frame: cfg.max_frame,
            },
            slots,
            by_id,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            local_addr,
            events,
            shutdown,
            live_tasks,
            next_conn: AtomicU64::new(1),
            next_nonce: AtomicU64::new(1),
            handshakes: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
        });
        if let Some(listener) = listener {
            inner.spawn(inner.clone().accept_loop(listener));
        }
        for slot in &inner.slots {
            if slot.address.is_some() {
                inner.spawn(inner.clone().dial_loop(slot.clone()));
            }
        }
        tracing::info!(
            id = %local_id,
            listen = ?local_addr,
            peers = inner.slots.len(),
            "peer mesh started"
        );
        let guard = Arc::new(DropGuard(inner.clone()));
        Ok((
            Mesh {
                inner,
                _guard: guard,
            },
            events_rx,
        ))
    }

    /// The address actually bound (useful with port 0), if listening.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.local_addr
    }

    /// This server's peer id.
    pub fn local_id(&self) -> PeerId {
        self.inner.local_id
    }

    /// Queues `msg` for `peer` without waiting. Messages of one lane arrive in the order sent;
    /// Control messages may overtake Bulk ones. Messages still queued when the session ends
    /// are dropped (the next session starts empty).
    pub fn send(&self, peer: PeerId, msg: Message, prio: Priority) -> Result<(), SendError> {
        if matches!(
            msg,
            Message::Hello { .. } | Message::Ping { .. } | Message::Pong { .. }
        ) {
            return Err(SendError::Reserved);
        }
        let slot = self
            .inner
            .by_id
            .get(&peer)
            .ok_or(SendError::NotConnected(peer))?;
        let payload = msg.encode();
        let max = match prio {
            Priority::Control => self.inner.timing.max_frame,
            Priority::Bulk => BULK_MAX_FRAME.min(self.inner.timing.max_frame),
        };
        let frame = frame::encode_frame(&payload, max).map_err(|_| SendError::TooLarge {
            len: payload.len(),
            max,
        })?;
        let st = slot.state.lock();
        let active = st.active.as_ref().ok_or(SendError::NotConnected(peer))?;
        let sent = match prio {
            Priority::Control => active.lanes.control.send(frame),
            Priority::Bulk => {
                let len = frame.len();
                let sent = active.lanes.bulk.send(frame);
                if sent.is_ok() {
                    active.lanes.bulk_bytes.fetch_add(len, Ordering::Relaxed);
                }
                sent
            }
        };
        sent.map_err(|_| SendError::NotConnected(peer))
    }

    /// Peers with a session now.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        self.inner
            .slots
            .iter()
            .filter(|s| s.state.lock().active.is_some())
            .map(|s| s.id)
            .collect()
    }

    /// Every configured peer, in config order.
    pub fn status(&self) -> Vec<PeerStatus> {
        self.inner
            .slots
            .iter()
            .map(|slot| {
                let st = slot.state.lock();
                let (mut sent, mut received) = (st.bytes_sent_closed, st.bytes_received_closed);
                for c in st.conns.values() {
                    let (s, r) = tcp_bytes(c.fd);
                    sent += s;
                    received += r;
                }
                PeerStatus {
                    bytes_sent: sent,
                    bytes_received: received,
                    name: slot.name.clone(),
                    id: slot.id,
                    address: slot.address.clone(),
                    connected: st.active.is_some(),
                    since: st.since,
                    rtt: st.rtt,
                    last_error: st.last_error.clone(),
                    direction: st.active.as_ref().map(|a| a.direction),
                    connections: st.conns.len(),
                    bulk_queued: st
                        .active
                        .as_ref()
                        .map_or(0, |a| a.lanes.bulk_bytes.load(Ordering::Relaxed)),
                }
            })
            .collect()
    }

    /// Stops accepting and dialling, closes every connection (TLS close_notify, bounded by
    /// `dead_after`) and waits for all of the mesh's tasks to end. A `Disconnected` event is
    /// emitted for each connected peer.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let mut live = self.inner.live_tasks.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }
}

/// Timings and limits, fixed at start.
#[derive(Clone, Copy, Debug)]
struct Timing {
    heartbeat: Duration,
    dead_after: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    max_frame: usize,
}

struct Inner {
    local_id: PeerId,
    name: String,
    timing: Timing,
    /// Config order, for `status`.
    slots: Vec<Arc<Slot>>,
    by_id: HashMap<PeerId, Arc<Slot>>,
    acceptor: TlsAcceptor,
    local_addr: Option<SocketAddr>,
    events: mpsc::UnboundedSender<MeshEvent>,
    shutdown: watch::Sender<bool>,
    /// Count of running tasks, so `shutdown` can wait for them.
    live_tasks: watch::Sender<usize>,
    next_conn: AtomicU64,
    next_nonce: AtomicU64,
    handshakes: Arc<Semaphore>,
}

/// One configured peer's connection state.
struct Slot {
    name: String,
    id: PeerId,
    address: Option<String>,
    connector: TlsConnector,
    /// Mirrors `state.active.is_some()`, for the dialler to wait on.
    connected: watch::Sender<bool>,
    /// Never held across an await.
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// The connection carrying the current session.
    active: Option<Active>,
    /// Counts sessions; a connection delivers messages only while its session is current.
    session: u64,
    since: Option<SystemTime>,
    rtt: Option<Duration>,
    last_error: Option<String>,
    /// Every registered connection still open (the active one and any being retired).
    conns: HashMap<u64, ConnEntry>,
    /// The last Ping sent and when, to measure the round trip.
    ping: Option<(u64, Instant)>,
    /// TCP payload bytes (TLS records included) of connections already closed.
    bytes_sent_closed: u64,
    bytes_received_closed: u64,
}

struct Active {
    conn: u64,
    direction: Direction,
    lanes: Lanes,
}

struct ConnEntry {
    cmd: watch::Sender<ConnCmd>,
    /// The connection's socket, for its TCP byte counters (valid while registered: the stream
    /// is dropped only after `unregister`).
    fd: std::os::fd::RawFd,
}

/// A session's queues. The senders are cloned to whichever connection is active; the receivers
/// are held by that connection's writer (the lock hands them over on a replacement).
#[derive(Clone)]
struct Lanes {
    control: mpsc::UnboundedSender<Vec<u8>>,
    bulk: mpsc::UnboundedSender<Vec<u8>>,
    queues: Arc<tokio::sync::Mutex<Queues>>,
    bulk_bytes: Arc<AtomicUsize>,
}

struct Queues {
    control: mpsc::UnboundedReceiver<Vec<u8>>,
    bulk: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl Lanes {
    fn new() -> Lanes {
        let (control, control_rx) = mpsc::unbounded_channel();
        let (bulk, bulk_rx) = mpsc::unbounded_channel();
        Lanes {
            control,
            bulk,
            queues: Arc::new(tokio::sync::Mutex::new(Queues {
                control: control_rx,
                bulk: bulk_rx,
            })),
            bulk_bytes: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A Bulk frame of `len` bytes left the queue.
    fn bulk_taken(&self, len: usize) {
        let _ = self
            .bulk_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(len))
            });
    }
}

/// What a connection's tasks are told to do.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ConnCmd {
    Run,
    /// Replaced by another connection: stop writing; `close` sends close_notify (the dialler of
    /// the replacement does), otherwise just read until the peer closes.
    Retire {
        close: bool,
    },
    /// End now, for this reason.
    Stop(End),
}

/// Why a connection ended, and whether that is the peer's fault (logged as a warning).
#[derive(Clone, Debug, PartialEq, Eq)]
struct End {
    reason: String,
    bad: bool,
}

impl End {
    fn ok(reason: impl Into<String>) -> End {
        End {
            reason: reason.into(),
            bad: false,
        }
    }
    fn bad(reason: impl Into<String>) -> End {
        End {
            reason: reason.into(),
            bad: true,
        }
    }
}

enum Registration {
    Active {
        session: u64,
        lanes: Lanes,
    },
    /// Lost to an existing connection: read only, until the peer closes it.
    Retired {
        session: u64,
    },
    /// Lost, and we are the acceptor: close without answering Hello.
    Rejected,
}

type Stream = TlsStream<TcpStream>;

/// Guard that counts a running task.
struct TaskGuard(watch::Sender<usize>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Inner {
    fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.live_tasks.send_modify(|n| *n += 1);
        let guard = TaskGuard(self.live_tasks.clone());
        tokio::spawn(async move {
            let _guard = guard;
            fut.await;
        });
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn wait_shutdown(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Whether a connection in `direction` with `peer` is the one the pair keeps: the one
    /// dialled by the lower id. Both sides compute the same answer.
    fn preferred(&self, peer: PeerId, direction: Direction) -> bool {
        preferred(self.local_id, peer, direction)
    }

    // ----- accepting -----

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.wait_shutdown() => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((tcp, addr)) => {
                    let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
                        tracing::warn!(%addr, "too many pending handshakes; dropping connection");
                        continue;
                    };
                    let inner = self.clone();
                    self.spawn(async move {
                        inner.accepted(tcp, addr, permit).await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends: don't spin.
                    tracing::warn!("accepting a peer connection failed: {e}");
                    tokio::select! {
                        _ = self.wait_shutdown() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
    }

    async fn accepted(
        self: Arc<Self>,
        tcp: TcpStream,
        addr: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        setup_socket(&tcp);
        let limit = self.timing.dead_after;
        let handshake = tokio::select! {
            _ = self.wait_shutdown() => return,
            r = tokio::time::timeout(limit, self.acceptor.accept(tcp)) => r,
        };
        let mut stream: Stream = match handshake {
            Ok(Ok(s)) => s.into(),
            Ok(Err(e)) => {
                // An unpinned certificate was already logged, with its id, by the verifier.
                tracing::debug!(%addr, "incoming TLS handshake failed: {}", tls::describe_handshake_error(&e));
                return;
            }
            Err(_) => {
                tracing::debug!(%addr, "incoming TLS handshake timed out");
                return;
            }
        };
        drop(permit);
        let Some(slot) = peer_of(&stream).and_then(|id| self.by_id.get(&id).cloned()) else {
            // The verifier admits only pinned ids; this is a belt-and-braces check.
            tracing::warn!(%addr, "incoming connection without a known peer certificate");
            return;
        };

        let hello = tokio::select! {
            _ = self.wait_shutdown() => return,
            r = tokio::time::timeout(limit, self.read_hello(&mut stream)) => r,
        };
        let hello = match hello {
            Ok(Ok(name)) => name,
            Ok(Err(HelloError::Version(v))) => {
                // Answer with our own Hello so the other side can log the mismatch too.
                let _ = self.write_hello(&mut stream).await;
                let _ = tokio::time::timeout(limit, stream.shutdown()).await;
                slot.fail(End::bad(version_mismatch(v)), Some(addr));
                return;
            }
            Ok(Err(HelloError::End(end))) => {
                slot.fail(end, Some(addr));
                return;
            }
            Err(_) => {
                slot.fail(End::bad(format!("no Hello within {limit:?}")), Some(addr));
                return;
            }
        };
        slot.check_name(&hello);

        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (cmd, _) = watch::channel(ConnCmd::Run);
        match self.register(&slot, conn, Direction::Inbound, &cmd, raw_fd(&stream)) {
            Registration::Rejected => {
                tracing::debug!(peer = %slot.name, id = %slot.id, %addr,
                    "closing a duplicate connection: the one dialled by the lower id is kept");
                let _ = tokio::time::timeout(limit, stream.shutdown()).await;
            }
            registration => {
                // Hello goes out only now, after registering: the dialler registers on
                // receiving it, so the acceptor is always first (see the module doc).
                if let Err(e) = self.write_hello(&mut stream).await {
                    self.unregister(&slot, conn, End::ok(format!("writing Hello failed: {e}")));
                    return;
                }
                self.run_connection(slot, conn, Direction::Inbound, stream, registration, cmd)
                    .await;
            }
        }
    }

    // ----- dialling -----

    async fn dial_loop(self: Arc<Self>, slot: Arc<Slot>) {
        let mut connected = slot.connected.subscribe();
        let mut failures: u32 = 0;
        loop {
            tokio::select! {
                _ = self.wait_shutdown() => return,
                _ = connected.wait_for(|c| !*c) => {}
            }
            let started = Instant::now();
            match self.clone().dial_once(&slot).await {
                Ok(()) => {
                    // A connection that lived a while was a success; one that died at once
                    // (e.g. refused after Hello) counts as a failure, so it backs off too.
                    if started.elapsed() >= self.timing.dead_after {
                        failures = 0;
                    } else {
                        failures = failures.saturating_add(1);
                    }
                }
                Err(end) => {
                    failures = failures.saturating_add(1);
                    if !*connected.borrow() && !self.shutting_down() {
                        slot.fail(end, None);
                    }
                }
            }
            let delay = backoff_delay(
                failures,
                self.timing.backoff_min,
                self.timing.backoff_max,
                random_u64(),
            );
            tokio::select! {
                _ = self.wait_shutdown() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Dials `slot` once; returns `Ok` after a registered connection has ended.
    async fn dial_once(self: Arc<Self>, slot: &Arc<Slot>) -> Result<(), End> {
        let limit = self.timing.dead_after;
        let address = slot.address.clone().unwrap_or_default();
        let steps = async {
            let target = with_default_port(&address);
            let addrs: Vec<SocketAddr> =
                tokio::time::timeout(limit, tokio::net::lookup_host(target.as_str()))
                    .await
                    .map_err(|_| End::ok(format!("resolving {target} timed out")))?
                    .map_err(|e| End::ok(format!("cannot resolve {target}: {e}")))?
                    .collect();
            let mut last = End::ok(format!("{target} resolves to no address"));
            let mut tcp = None;
            for addr in addrs {
                match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
                    Ok(Ok(s)) => {
                        tcp = Some(s);
                        break;
                    }
                    Ok(Err(e)) => last = End::ok(format!("cannot connect to {addr}: {e}")),
                    Err(_) => last = End::ok(format!("connecting to {addr} timed out")),
                }
            }
            let tcp = tcp.ok_or(last)?;
            setup_socket(&tcp);
            let tls = tokio::time::timeout(limit, slot.connector.connect(tls::server_name(), tcp))
                .await
                .map_err(|_| End::ok("TLS handshake timed out"))?
                .map_err(|e| {
                    End::bad(format!(
                        "TLS handshake failed: {}",
                        tls::describe_handshake_error(&e)
                    ))
                })?;
            let mut stream: Stream = tls.into();
            self.write_hello(&mut stream)
                .await
                .map_err(|e| End::ok(format!("writing Hello failed: {e}")))?;
            match tokio::time::timeout(limit, self.read_hello(&mut stream)).await {
                Ok(Ok(name)) => Ok((stream, name)),
                Ok(Err(HelloError::Version(v))) => Err(End::bad(version_mismatch(v))),
                Ok(Err(HelloError::End(end))) => Err(end),
                Err(_) => Err(End::bad(format!("no Hello within {limit:?}"))),
            }
        };
        let (stream, name) = tokio::select! {
            _ = self.wait_shutdown() => return Ok(()),
            r = steps => r?,
        };
        slot.check_name(&name);
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (cmd, _) = watch::channel(ConnCmd::Run);
        let registration = self.register(slot, conn, Direction::Outbound, &cmd, raw_fd(&stream));
        self.run_connection(
            slot.clone(),
            conn,
            Direction::Outbound,
            stream,
            registration,
            cmd,
        )
        .await;
        Ok(())
    }

    // ----- Hello -----

    async fn write_hello(&self, stream: &mut Stream) -> io::Result<()> {
        let hello = Message::Hello {
            protocol: PROTOCOL_VERSION,
            name: self.name.clone(),
        };
        let frame = frame::encode_frame(&hello.encode(), self.timing.max_frame)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        tokio::time::timeout(self.timing.dead_after, async {
            stream.write_all(&frame).await?;
            stream.flush().await
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))?
    }

    /// Reads the first frame, which must be a Hello of our protocol version.
    async fn read_hello(&self, stream: &mut Stream) -> Result<String, HelloError> {
        let bytes = match frame::read_frame(stream, self.timing.max_frame).await {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(HelloError::End(End::ok(
                    "closed by the peer before its Hello (a duplicate connection, or refused)",
                )));
            }
            Err(e) => return Err(HelloError::End(frame_end(e))),
        };
        match Message::decode(&bytes) {
            Ok(Message::Hello { protocol, name }) if protocol == PROTOCOL_VERSION => Ok(name),
            Ok(Message::Hello { protocol, .. }) => Err(HelloError::Version(protocol)),
            Ok(other) => Err(HelloError::End(End::bad(format!(
                "first message is {} instead of Hello",
                kind(&other)
            )))),
            Err(e) => Err(HelloError::End(End::bad(format!("first frame: {e}")))),
        }
    }

    // ----- registration (the one-connection rule) -----

    fn register(
        &self,
        slot: &Slot,
        conn: u64,
        direction: Direction,
        cmd: &watch::Sender<ConnCmd>,
        fd: std::os::fd::RawFd,
    ) -> Registration {
        let mut st = slot.state.lock();
        let entry = ConnEntry {
            cmd: cmd.clone(),
            fd,
        };
        let Some(current) = st.active.as_ref() else {
            st.session += 1;
            let lanes = Lanes::new();
            st.active = Some(Active {
                conn,
                direction,
                lanes: lanes.clone(),
            });
            st.since = Some(SystemTime::now());
            st.rtt = None;
            st.ping = None;
            st.last_error = None;
            st.conns.insert(conn, entry);
            slot.connected.send_replace(true);
            tracing::info!(peer = %slot.name, id = %slot.id, ?direction, "peer connected");
            let _ = self.events.send(MeshEvent::Connected {
                peer: slot.id,
                name: slot.name.clone(),
            });
            return Registration::Active {
                session: st.session,
                lanes,
            };
        };
        let session = st.session;
        if self.preferred(slot.id, current.direction) && !self.preferred(slot.id, direction) {
            return match direction {
                Direction::Inbound => Registration::Rejected,
                Direction::Outbound => {
                    // The acceptor registered this one and will close it once it registers
                    // the winner (it is that connection's dialler).
                    cmd.send_replace(ConnCmd::Retire { close: false });
                    st.conns.insert(conn, entry);
                    Registration::Retired { session }
                }
            };
        }
        // The new connection wins; the session, its queues and its events go on unchanged.
        let lanes = current.lanes.clone();
        let old = current.conn;
        for (id, entry) in &st.conns {
            if *id == old {
                entry.cmd.send_replace(ConnCmd::Retire {
                    close: direction == Direction::Outbound,
                });
            } else {
                // Connections replaced earlier and still draining: keep at most one, so a peer
                // that keeps reconnecting cannot pile up open connections.
                entry
                    .cmd
                    .send_replace(ConnCmd::Stop(End::ok("replaced by a newer connection")));
            }
        }
        tracing::debug!(peer = %slot.name, id = %slot.id, ?direction, "a newer or preferred connection replaces the current one");
        st.active = Some(Active {
            conn,
            direction,
            lanes: lanes.clone(),
        });
        st.conns.insert(conn, entry);
        Registration::Active { session, lanes }
    }

    /// Forgets a connection that ended. If it carried the session, the session ends: every
    /// other connection with the peer is stopped and `Disconnected` is emitted.
    fn unregister(&self, slot: &Slot, conn: u64, end: End) {
        let mut st = slot.state.lock();
        if let Some(e) = st.conns.remove(&conn) {
            let (sent, received) = tcp_bytes(e.fd);
            st.bytes_sent_closed += sent;
            st.bytes_received_closed += received;
        }
        if st.active.as_ref().is_some_and(|a| a.conn == conn) {
            st.active = None;
            st.since = None;
            st.rtt = None;
            st.ping = None;
            if !self.shutting_down() {
                st.last_error = Some(end.reason.clone());
            }
            for other in st.conns.values() {
                other
                    .cmd
                    .send_replace(ConnCmd::Stop(End::ok("the session ended")));
            }
            slot.connected.send_replace(false);
            if end.bad {
                tracing::warn!(peer = %slot.name, id = %slot.id, reason = %end.reason, "closing the connection with a peer");
            } else {
                tracing::info!(peer = %slot.name, id = %slot.id, reason = %end.reason, "peer disconnected");
            }
            let _ = self.events.send(MeshEvent::Disconnected {
                peer: slot.id,
                reason: end.reason,
            });
        } else if end.bad {
            tracing::warn!(peer = %slot.name, id = %slot.id, reason = %end.reason, "closing a replaced connection with a peer");
        } else {
            tracing::debug!(peer = %slot.name, id = %slot.id, reason = %end.reason, "a replaced connection ended");
        }
    }

    // ----- running a connection -----

    async fn run_connection(
        self: Arc<Self>,
        slot: Arc<Slot>,
        conn: u64,
        direction: Direction,
        stream: Stream,
        registration: Registration,
        cmd: watch::Sender<ConnCmd>,
    ) {
        let (session, lanes) = match registration {
            Registration::Active { session, lanes } => (session, Some(lanes)),
            Registration::Retired { session } => (session, None),
            Registration::Rejected => return,
        };
        let (rd, wr) = tokio::io::split(stream);
        let writer = lanes.clone().map(|lanes| {
            tokio::spawn(
                self.clone()
                    .write_loop(slot.clone(), wr, lanes, cmd.clone()),
            )
        });
        let end = self
            .read_loop(&slot, rd, session, lanes, cmd.subscribe())
            .await;
        tracing::trace!(peer = %slot.name, conn, ?direction, reason = %end.reason, "connection ended");
        self.unregister(&slot, conn, end.clone());
        cmd.send_replace(ConnCmd::Stop(end));
        if let Some(writer) = writer {
            // The writer ends promptly on Stop (close_notify is bounded by dead_after).
            let _ = writer.await;
        }
    }

    async fn read_loop(
        &self,
        slot: &Slot,
        mut rd: ReadHalf<Stream>,
        session: u64,
        lanes: Option<Lanes>,
        mut cmd: watch::Receiver<ConnCmd>,
    ) -> End {
        let dead_after = self.timing.dead_after;
        loop {
            // Only Stop and shutdown interrupt a read (a frame read is not cancel-safe, and
            // a retired connection keeps reading).
            let read = tokio::select! {
                biased;
                _ = self.wait_shutdown() => return End::ok("shutting down"),
                c = cmd.wait_for(|c| matches!(c, ConnCmd::Stop(_))) => {
                    return match c.as_deref() {
                        Ok(ConnCmd::Stop(end)) => end.clone(),
                        _ => End::ok("stopped"),
                    };
                }
                r = tokio::time::timeout(dead_after, frame::read_frame(&mut rd, self.timing.max_frame)) => r,
            };
            let bytes = match read {
                Ok(Ok(Some(bytes))) => bytes,
                Ok(Ok(None)) => return End::ok("closed by the peer"),
                Ok(Err(e)) => return frame_end(e),
                Err(_) => return End::bad(format!("no frame received for {dead_after:?}")),
            };
            let msg = match Message::decode(&bytes) {
                Ok(m) => m,
                Err(e) => return End::bad(e.to_string()),
            };
            match msg {
                Message::Hello { .. } => return End::bad("unexpected second Hello"),
                Message::Ping { nonce } => {
                    // Answer only on the connection in use; a retired one just drains.
                    let running = *cmd.borrow() == ConnCmd::Run;
                    if let (true, Some(lanes)) = (running, &lanes) {
                        let pong = Message::Pong { nonce }.encode();
                        if let Ok(f) = frame::encode_frame(&pong, self.timing.max_frame) {
                            let _ = lanes.control.send(f);
                        }
                    }
                }
                Message::Pong { nonce } => {
                    let mut st = slot.state.lock();
                    if let Some((sent, at)) = st.ping {
                        if sent == nonce {
                            st.rtt = Some(at.elapsed());
                            st.ping = None;
                        }
                    }
                }
                msg => {
                    // Under the slot lock, so no Message can follow the session's
                    // Disconnected.
                    let st = slot.state.lock();
                    if st.active.is_some() && st.session == session {
                        let _ = self.events.send(MeshEvent::Message { peer: slot.id, msg });
                    }
                }
            }
        }
    }

    async fn write_loop(
        self: Arc<Self>,
        slot: Arc<Slot>,
        mut wr: WriteHalf<Stream>,
        lanes: Lanes,
        cmd: watch::Sender<ConnCmd>,
    ) {
        let mut cmd_rx = cmd.subscribe();
        let limit = self.timing.dead_after;
        // Take the session's queues; on a replacement, wait for the previous writer to finish
        // its current frame and let go.
        let queues: Option<OwnedMutexGuard<Queues>> = tokio::select! {
            biased;
            _ = cmd_rx.wait_for(|c| *c != ConnCmd::Run) => None,
            q = lanes.queues.clone().lock_owned() => Some(q),
        };
        let Some(mut queues) = queues else {
            self.finish_writer(&mut wr, &cmd_rx).await;
            return;
        };
        // Disjoint borrows of the two queues inside one select.
        let q: &mut Queues = &mut queues;
        let mut tick = tokio::time::interval(self.timing.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let frame = tokio::select! {
                biased;
                // wait_for looks at the current value first: a Retire sent before this task
                // first ran must not be missed.
                _ = cmd_rx.wait_for(|c| *c != ConnCmd::Run) => break,
                Some(f) = q.control.recv() => f,
                _ = tick.tick() => {
                    let nonce = self.next_nonce.fetch_add(1, Ordering::Relaxed);
                    slot.state.lock().ping = Some((nonce, Instant::now()));
                    match frame::encode_frame(&Message::Ping { nonce }.encode(), self.timing.max_frame) {
                        Ok(f) => f,
                        Err(_) => continue,
                    }
                }
                Some(f) = q.bulk.recv() => {
                    lanes.bulk_taken(f.len());
                    f
                }
            };
            // Frames already waiting go out with this one, Control first: one write (and TLS
            // record) for many small frames instead of one each — a burst of small files or
            // acknowledgements otherwise costs a syscall and 22 bytes of record per frame.
            let mut frame = frame;
            while frame.len() < COALESCE_BYTES {
                let next = match q.control.try_recv() {
                    Ok(f) => f,
                    Err(_) => match q.bulk.try_recv() {
                        Ok(f) => {
                            lanes.bulk_taken(f.len());
                            f
                        }
                        Err(_) => break,
                    },
                };
                frame.extend_from_slice(&next);
            }
            let written = tokio::select! {
                _ = self.wait_shutdown() => break,
                r = tokio::time::timeout(limit, async {
                    wr.write_all(&frame).await?;
                    // Batch: flush only once nothing else is waiting.
                    if q.control.is_empty() && q.bulk.is_empty() {
                        wr.flush().await?;
                    }
                    Ok::<(), io::Error>(())
                }) => r,
            };
            let failure = match written {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => End::ok(format!("write failed: {e}")),
                Err(_) => End::bad(format!("peer accepted no data for {limit:?}")),
            };
            cmd.send_replace(ConnCmd::Stop(failure));
            return;
        }
        drop(queues);
        self.finish_writer(&mut wr, &cmd_rx).await;
    }

    /// Ends a writer: sends close_notify unless the connection is only being retired quietly.
    async fn finish_writer(&self, wr: &mut WriteHalf<Stream>, cmd: &watch::Receiver<ConnCmd>) {
        let close = !matches!(*cmd.borrow(), ConnCmd::Retire { close: false });
        if close {
            let _ = tokio::time::timeout(self.timing.dead_after, wr.shutdown()).await;
        }
    }
}

enum HelloError {
    Version(u32),
    End(End),
}

impl Slot {
    /// Records why a dial or handshake failed; logs a new reason as a warning (a peer that
    /// stays down would otherwise log the same line every backoff period).
    fn fail(&self, end: End, addr: Option<SocketAddr>) {
        let mut st = self.state.lock();
        let repeated = st.last_error.as_deref() == Some(end.reason.as_str());
        if !repeated && (end.bad || addr.is_none()) {
            tracing::warn!(peer = %self.name, id = %self.id, addr = ?addr, reason = %end.reason, "peer connection failed");
        } else {
            tracing::debug!(peer = %self.name, id = %self.id, addr = ?addr, reason = %end.reason, "peer connection failed");
        }
        if st.active.is_none() {
            st.last_error = Some(end.reason);
        }
    }

    fn check_name(&self, hello_name: &str) {
        if hello_name != self.name {
            // Debug-formatted: the name comes from the network and may hold control characters.
            tracing::debug!(peer = %self.name, id = %self.id, hello_name = ?hello_name, "peer calls itself by another name; the configured one is used");
        }
    }
}

fn peer_of(stream: &Stream) -> Option<PeerId> {
    match stream {
        TlsStream::Client(s) => tls::peer_id_of(s.get_ref().1),
        TlsStream::Server(s) => tls::peer_id_of(s.get_ref().1),
    }
}

fn frame_end(e: FrameError) -> End {
    match e {
        FrameError::Io(e) => End::ok(format!("connection error: {e}")),
        e => End::bad(e.to_string()),
    }
}

fn version_mismatch(theirs: u32) -> String {
    format!("protocol version mismatch: the peer speaks {theirs}, this server {PROTOCOL_VERSION}")
}

fn kind(msg: &Message) -> &'static str {
    match msg {
        Message::Hello { .. } => "Hello",
        Message::Ping { .. } => "Ping",
        Message::Pong { .. } => "Pong",
        Message::Lock(_) => "Lock",
        Message::Repl(_) => "Repl",
        Message::Neighbors { .. } => "Neighbors",
        Message::Routed { .. } => "Routed",
    }
}

/// See [`Inner::preferred`].
fn preferred(local: PeerId, peer: PeerId, direction: Direction) -> bool {
    let dialler = match direction {
        Direction::Outbound => local,
        Direction::Inbound => peer,
    };
    dialler == local.min(peer)
}

/// Redial delay after `failures` consecutive failures: `min · 2^failures`, capped at `max`,
/// then drawn uniformly from its upper half so peers that failed together don't retry in step.
fn backoff_delay(failures: u32, min: Duration, max: Duration, random: u64) -> Duration {
    let factor = 1u32 << failures.min(20);
    let base = min.saturating_mul(factor).min(max);
    let half = base / 2;
    let span = u64::try_from((base - half).as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(random % span.saturating_add(1))
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Only jitter depends on it: a failing RNG just means no jitter.
    let _ = tls::provider().secure_random.fill(&mut b);
    u64::from_le_bytes(b)
}

/// `host` → `host:7333`, `[v6]` → `[v6]:7333`; anything with a port is left alone.
fn with_default_port(address: &str) -> String {
    let has_port = if address.starts_with('[') {
        address.contains("]:")
    } else {
        address.contains(':')
    };
    if has_port {
        address.to_string()
    } else {
        format!("{address}:{DEFAULT_PORT}")
    }
}

/// Latency settings for a peer socket; failures only cost latency, so they are logged.
fn raw_fd(stream: &Stream) -> std::os::fd::RawFd {
    use std::os::fd::AsRawFd;
    match stream {
        TlsStream::Client(s) => s.get_ref().0.as_raw_fd(),
        TlsStream::Server(s) => s.get_ref().0.as_raw_fd(),
    }
}

/// (bytes acknowledged by the peer, bytes received) of a TCP socket; zeros if unavailable.
fn tcp_bytes(fd: std::os::fd::RawFd) -> (u64, u64) {
    // SAFETY: tcp_info is plain data; zero is a valid initial value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid out-parameters of the stated size; a stale or foreign
    // descriptor only makes the call fail.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return (0, 0);
    }
    (info.tcpi_bytes_acked, info.tcpi_bytes_received)
}

fn setup_socket(tcp: &TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!("cannot set TCP_NODELAY: {e}");
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = set_notsent_lowat(tcp, NOTSENT_LOWAT) {
        tracing::debug!("cannot set TCP_NOTSENT_LOWAT: {e}");
    }
}

#[cfg(target_os = "linux")]
fn set_notsent_lowat(tcp: &TcpStream, bytes: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor belongs to `tcp`, which outlives the call; the option value
    // points to a live c_int and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_agree_on_the_connection_to_keep() {
        let lo = PeerId([1; 32]);
        let hi = PeerId([2; 32]);
        // The connection lo dialled: outbound on lo, inbound on hi. Both keep it.
        assert!(preferred(lo, hi, Direction::Outbound));
        assert!(preferred(hi, lo, Direction::Inbound));
        // The connection hi dialled: both drop it.
        assert!(!preferred(hi, lo, Direction::Outbound));
        assert!(!preferred(lo, hi, Direction::Inbound));
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for failures in 0..40 {
            let base = (min * 2u32.pow(failures.min(20))).min(max);
            for random in [0, 1, 12_345, u64::MAX] {
                let d = backoff_delay(failures, min, max, random);
                assert!(d >= base / 2 && d <= base, "{failures}: {d:?} vs {base:?}");
            }
        }
        assert_eq!(backoff_delay(0, min, max, 0), Duration::from_millis(50));
        assert_eq!(backoff_delay(30, min, max, 0), Duration::from_secs(5));
    }

    #[test]
    fn default_port_is_added_only_when_missing() {
        assert_eq!(with_default_port("host"), "host:7333");
        assert_eq!(with_default_port("host:1"), "host:1");
        assert_eq!(with_default_port("[::1]"), "[::1]:7333");
        assert_eq!(with_default_port("[::1]:9"), "[::1]:9");
        assert_eq!(with_default_port("10.0.0.1"), "10.0.0.1:7333");
    }
}
