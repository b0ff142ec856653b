//! The peer mesh over real TLS on 127.0.0.1 (port 0 or reserved ports), real tokio: peers
//! connect and talk, duplicate dials collapse to one connection, strangers and hostile peers
//! are refused or cut off without harming anyone else, dead peers are noticed and come back,
//! and Control frames overtake a Bulk backlog.
//!
//! Hostile peers are raw TLS clients built from the crate's own tls and frame modules, so
//! they speak exactly the bytes we choose. Every wait is bounded and says what it saw.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use peerfs_proto::frame::{self, DEFAULT_MAX_FRAME};
use peerfs_proto::mesh::{
    BULK_MAX_FRAME, Direction, Mesh, MeshConfig, MeshEvent, PeerConfig, Priority, SendError,
};
use peerfs_proto::msg::{LockMsg, Message, PROTOCOL_VERSION, ReqId};
use peerfs_proto::{Identity, PeerId, RelPath, tls};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Generous: CI machines are small and share their cores with other test binaries.
const DEADLINE: Duration = Duration::from_secs(30);
const HEARTBEAT: Duration = Duration::from_millis(100);
const DEAD_AFTER: Duration = Duration::from_millis(1000);

// ----- log capture -----

/// Everything logged by any test in this binary (tests filter by the ids they made).
fn logs() -> String {
    String::from_utf8_lossy(&log_buffer().lock().expect("log lock")).into_owned()
}

/// The log lines that mention any of `ids` (for failure messages).
fn logs_about(ids: &[PeerId]) -> String {
    let ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    logs()
        .lines()
        .filter(|l| ids.iter().any(|id| l.contains(id.as_str())))
        .collect::<Vec<_>>()
        .join("\n")
}

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || Capture(writer.clone()))
            .try_init();
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(data);
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ----- helpers -----

struct Ident {
    _dir: tempfile::TempDir,
    identity: Identity,
}

fn ident(name: &str) -> Ident {
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::create(dir.path(), name).expect("identity");
    Ident {
        _dir: dir,
        identity,
    }
}

fn peer(name: &str, ident: &Ident, address: Option<SocketAddr>) -> PeerConfig {
    PeerConfig {
        name: name.into(),
        id: ident.identity.id,
        address: address.map(|a| a.to_string()),
    }
}

fn config(
    name: &str,
    me: &Ident,
    listen: Option<SocketAddr>,
    peers: Vec<PeerConfig>,
) -> MeshConfig {
    MeshConfig {
        listen,
        peers,
        heartbeat: HEARTBEAT,
        dead_after: DEAD_AFTER,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(300),
        ..MeshConfig::new(name, me.identity.clone())
    }
}

fn any_port() -> Option<SocketAddr> {
    Some("127.0.0.1:0".parse().expect("addr"))
}

/// A free loopback port, for tests that need an address before the mesh starts.
fn reserve_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Starts every config at once (concurrently). If any fails, the others are shut down and the
/// error returned: callers on reserved ports retry with fresh ones on `AddrInUse`, since
/// another test's outgoing connection can land on a port released a moment before.
async fn try_start_all(cfgs: Vec<MeshConfig>) -> std::io::Result<Vec<Node>> {
    log_buffer();
    let handles: Vec<_> = cfgs
        .into_iter()
        .map(|c| tokio::spawn(Mesh::start(c)))
        .collect();
    let mut nodes = Vec::new();
    let mut error = None;
    for h in handles {
        match h.await.expect("start task") {
            Ok((mesh, events)) => nodes.push(Node {
                mesh,
                events,
                seen: Vec::new(),
                pending: Default::default(),
            }),
            Err(e) => error = Some(e),
        }
    }
    match error {
        None => Ok(nodes),
        Some(e) => {
            for n in &nodes {
                n.mesh.shutdown().await;
            }
            Err(e)
        }
    }
}

/// [`try_start_all`] on `n` reserved ports, retried with new ports while they are taken.
async fn start_on_reserved_ports(
    n: usize,
    make: impl Fn(&[SocketAddr]) -> Vec<MeshConfig>,
) -> Vec<Node> {
    for _ in 0..20 {
        let addrs: Vec<SocketAddr> = (0..n).map(|_| reserve_port()).collect();
        match try_start_all(make(&addrs)).await {
            Ok(nodes) => return nodes,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("mesh start: {e}"),
        }
    }
    panic!("no free ports after 20 tries");
}

struct Node {
    mesh: Mesh,
    events: UnboundedReceiver<MeshEvent>,
    /// Every event taken from `events` so far, in order.
    seen: Vec<MeshEvent>,
    /// Events received but not yet claimed by an `expect`, in order.
    pending: std::collections::VecDeque<MeshEvent>,
}

impl Node {
    async fn start(cfg: MeshConfig) -> Node {
        log_buffer();
        let (mesh, events) = Mesh::start(cfg).await.expect("mesh start");
        Node {
            mesh,
            events,
            seen: Vec::new(),
            pending: Default::default(),
        }
    }

    /// Claims the first unclaimed event matching `pred`, waiting for it if need be (events
    /// of other peers may interleave, so non-matching ones stay for later claims).
    async fn expect(&mut self, what: &str, pred: impl Fn(&MeshEvent) -> bool) -> MeshEvent {
        if let Some(at) = self.pending.iter().position(&pred) {
            return self.pending.remove(at).expect("index in range");
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => {
                    self.seen.push(ev.clone());
                    if pred(&ev) {
                        return ev;
                    }
                    self.pending.push_back(ev);
                }
                Ok(None) => panic!(
                    "event stream ended while waiting for {what}; saw {:?}",
                    self.seen
                ),
                Err(_) => panic!("timed out waiting for {what}; saw {:?}", self.seen),
            }
        }
    }

    async fn connected(&mut self, peer: PeerId) {
        self.expect(
            &format!("Connected({peer:?})"),
            |e| matches!(e, MeshEvent::Connected { peer: p, .. } if *p == peer),
        )
        .await;
    }

    async fn disconnected(&mut self, peer: PeerId) -> String {
        match self
            .expect(
                &format!("Disconnected({peer:?})"),
                |e| matches!(e, MeshEvent::Disconnected { peer: p, .. } if *p == peer),
            )
            .await
        {
            MeshEvent::Disconnected { reason, .. } => reason,
            _ => unreachable!(),
        }
    }

    async fn message(&mut self, from: PeerId, want: &Message) {
        self.expect(
            &format!("{want:?} from {from:?}"),
            |e| matches!(e, MeshEvent::Message { peer, msg } if *peer == from && msg == want),
        )
        .await;
    }

    /// Takes whatever events are already queued, without waiting.
    fn drain(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            self.seen.push(ev.clone());
            self.pending.push_back(ev);
        }
    }
}

/// Polls `cond` until true; panics with `what` and the last `show()` on timeout.
async fn until(what: &str, mut cond: impl FnMut() -> bool, show: impl Fn() -> String) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}; state: {}", show());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn lock_msg(n: u64) -> Message {
    Message::Lock(LockMsg::Cancel {
        req: ReqId {
            origin: PeerId([9; 32]),
            seq: n,
        },
    })
}

/// Sends `msg` from `a` to `b` and waits for it on `b`.
async fn round(a: &Node, b: &mut Node, msg: Message) {
    let (aid, bid) = (a.mesh.local_id(), b.mesh.local_id());
    a.mesh
        .send(bid, msg.clone(), Priority::Control)
        .expect("send");
    b.message(aid, &msg).await;
}

fn status_of(mesh: &Mesh, peer: PeerId) -> peerfs_proto::mesh::PeerStatus {
    mesh.status()
        .into_iter()
        .find(|s| s.id == peer)
        .expect("configured peer")
}

// ----- raw TLS peers -----

async fn raw_connect(addr: SocketAddr, me: &Ident, server: PeerId) -> TlsStream<TcpStream> {
    let cfg = tls::client_config(&me.identity, server).expect("client config");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    TlsConnector::from(Arc::new(cfg))
        .connect(tls::server_name(), tcp)
        .await
        .expect("tls")
}

async fn raw_send(stream: &mut TlsStream<TcpStream>, payload: &[u8]) {
    frame::write_frame(stream, payload, usize::MAX)
        .await
        .expect("write frame");
    stream.flush().await.expect("flush");
}

async fn raw_hello(stream: &mut TlsStream<TcpStream>, name: &str, protocol: u32) {
    let hello = Message::Hello {
        protocol,
        name: name.into(),
    };
    raw_send(stream, &hello.encode()).await;
}

/// Reads the next message; `None` once the mesh closed the connection (EOF or error).
async fn raw_read(stream: &mut TlsStream<TcpStream>) -> Option<Message> {
    match tokio::time::timeout(DEADLINE, frame::read_frame(stream, DEFAULT_MAX_FRAME)).await {
        Ok(Ok(Some(bytes))) => Some(Message::decode(&bytes).expect("mesh sent a bad frame")),
        Ok(_) => None,
        Err(_) => panic!("raw peer: nothing from the mesh within {DEADLINE:?}"),
    }
}

/// Reads until the mesh closes the connection; fails if it never does.
async fn raw_until_closed(stream: &mut TlsStream<TcpStream>) {
    while raw_read(stream).await.is_some() {}
}

// ----- tests -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_connect_exchange_messages_and_report_status() {
    let (ia, ib) = (ident("a"), ident("b"));
    let mut a = Node::start(config("a", &ia, any_port(), vec![peer("b", &ib, None)])).await;
    let a_addr = a.mesh.local_addr().expect("listening");
    let mut b = Node::start(config("b", &ib, None, vec![peer("a", &ia, Some(a_addr))])).await;
    let (aid, bid) = (ia.identity.id, ib.identity.id);

    a.connected(bid).await;
    b.connected(aid).await;
    for n in 0..20 {
        round(&a, &mut b, lock_msg(n)).await;
        round(&b, &mut a, lock_msg(100 + n)).await;
    }
    let path = RelPath::new(b"docs/report.docx").expect("path");
    round(
        &a,
        &mut b,
        Message::Lock(LockMsg::Holding {
            locks: vec![(path, 7)],
        }),
    )
    .await;

    assert_eq!(a.mesh.connected_peers(), vec![bid]);
    until(
        "an RTT measurement on both sides",
        || status_of(&a.mesh, bid).rtt.is_some() && status_of(&b.mesh, aid).rtt.is_some(),
        || format!("{:?} / {:?}", a.mesh.status(), b.mesh.status()),
    )
    .await;
    let sa = status_of(&a.mesh, bid);
    assert!(
        sa.connected && sa.since.is_some() && sa.last_error.is_none(),
        "{sa:?}"
    );
    assert_eq!(sa.direction, Some(Direction::Inbound));
    assert_eq!(sa.connections, 1);
    assert_eq!(status_of(&b.mesh, aid).direction, Some(Direction::Outbound));
    let json = serde_json::to_string(&a.mesh.status()).expect("json");
    assert!(
        json.contains(&bid.to_string()),
        "ids are shown as text: {json}"
    );

    // Send errors.
    let stranger = PeerId([3; 32]);
    assert_eq!(
        a.mesh.send(stranger, lock_msg(1), Priority::Control),
        Err(SendError::NotConnected(stranger))
    );
    assert_eq!(
        a.mesh
            .send(bid, Message::Ping { nonce: 1 }, Priority::Control),
        Err(SendError::Reserved)
    );
    let big = Message::Lock(LockMsg::Holding {
        locks: (0..1000)
            .map(|i| (RelPath::new(format!("{i:0>100}").as_bytes()).expect("p"), i))
            .collect(),
    });
    assert!(matches!(
        a.mesh.send(bid, big.clone(), Priority::Bulk),
        Err(SendError::TooLarge {
            max: BULK_MAX_FRAME,
            ..
        })
    ));
    // The same message fits the Control lane's larger limit.
    round(&a, &mut b, big).await;

    a.mesh.shutdown().await;
    b.disconnected(aid).await;
    assert!(a.mesh.connected_peers().is_empty());
    a.disconnected(bid).await;
    b.mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_form_a_full_mesh() {
    let ids = [ident("a"), ident("b"), ident("c")];
    let names = ["a", "b", "c"];
    let mut nodes = start_on_reserved_ports(3, |addrs| {
        (0..3)
            .map(|i| {
                let peers = (0..3)
                    .filter(|j| *j != i)
                    .map(|j| peer(names[j], &ids[j], Some(addrs[j])))
                    .collect();
                config(names[i], &ids[i], Some(addrs[i]), peers)
            })
            .collect()
    })
    .await;
    for (i, node) in nodes.iter_mut().enumerate() {
        for (j, other) in ids.iter().enumerate() {
            if i != j {
                node.connected(other.identity.id).await;
            }
        }
    }
    for i in 0..3 {
        for j in 0..3 {
            if i == j {
                continue;
            }
            let msg = lock_msg((i * 10 + j) as u64);
            let to = ids[j].identity.id;
            nodes[i]
                .mesh
                .send(to, msg.clone(), Priority::Control)
                .expect("send");
            nodes[j].message(ids[i].identity.id, &msg).await;
        }
    }
    until(
        "one connection per pair",
        || {
            nodes.iter().all(|n| {
                n.mesh
                    .status()
                    .iter()
                    .all(|s| s.connected && s.connections == 1)
            })
        },
        || {
            format!(
                "{:?}",
                nodes.iter().map(|n| n.mesh.status()).collect::<Vec<_>>()
            )
        },
    )
    .await;
    for n in &nodes {
        n.mesh.shutdown().await;
    }
}

/// A TCP forwarder to `target` that holds its first connection until `gate` opens: put one in
/// front of each of two peers and both dials are surely in flight at once.
async fn gated_proxy(target: SocketAddr, gate: Arc<tokio::sync::Barrier>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut inbound, _)) = listener.accept().await {
            if first {
                gate.wait().await;
                first = false;
            }
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

/// Waits until a and b use one and the same connection — the one dialled by `expect_dialler`
/// when given — then checks that messages flow and that each saw one Connected and no
/// Disconnected (the duplicate never showed).
async fn assert_one_connection(
    a: &mut Node,
    b: &mut Node,
    expect_dialler: Option<PeerId>,
    label: &str,
) {
    let (aid, bid) = (a.mesh.local_id(), b.mesh.local_id());
    a.connected(bid).await;
    b.connected(aid).await;
    // Right after a duplicate dial each side may briefly hold a different connection; the
    // final state is what the rule promises.
    let (ma, mb) = (a.mesh.clone(), b.mesh.clone());
    let settled = || {
        let (sa, sb) = (status_of(&ma, bid), status_of(&mb, aid));
        let (Some(da), Some(db)) = (sa.direction, sb.direction) else {
            return false;
        };
        let dialler = if da == Direction::Outbound { aid } else { bid };
        sa.connections == 1
            && sb.connections == 1
            && da != db
            && expect_dialler.is_none_or(|want| want == dialler)
    };
    until(&format!("{label}: one shared connection"), settled, || {
        format!("{:?} / {:?}", ma.status(), mb.status())
    })
    .await;
    round(a, b, lock_msg(1)).await;
    round(b, a, lock_msg(2)).await;
    if expect_dialler.is_some() {
        // (Without a known final state, an agreed state may still be a transient one.)
        assert!(settled(), "{label}: the connection changed again");
    }
    a.drain();
    b.drain();
    for n in [&*a, &*b] {
        let connects = n
            .seen
            .iter()
            .filter(|e| matches!(e, MeshEvent::Connected { .. }))
            .count();
        let drops = n
            .seen
            .iter()
            .filter(|e| matches!(e, MeshEvent::Disconnected { .. }))
            .count();
        assert_eq!(
            (connects, drops),
            (1, 0),
            "{label}: {:?}\nlogs about these peers:\n{}",
            n.seen,
            logs_about(&[aid, bid])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dials_end_with_one_connection_per_pair() {
    for round_no in 0..5 {
        let (ia, ib) = (ident("a"), ident("b"));
        let (aid, bid) = (ia.identity.id, ib.identity.id);
        // Each dials the other through a proxy; the proxies release both dials together.
        let mut nodes = None;
        for _ in 0..20 {
            let (pa, pb) = (reserve_port(), reserve_port());
            let gate = Arc::new(tokio::sync::Barrier::new(2));
            let to_a = gated_proxy(pa, gate.clone()).await;
            let to_b = gated_proxy(pb, gate).await;
            let ca = config("a", &ia, Some(pa), vec![peer("b", &ib, Some(to_b))]);
            let cb = config("b", &ib, Some(pb), vec![peer("a", &ia, Some(to_a))]);
            match try_start_all(vec![ca, cb]).await {
                Ok(n) => {
                    nodes = Some(n);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => panic!("mesh start: {e}"),
            }
        }
        let mut nodes = nodes.expect("free ports");
        let (mut b, mut a) = (nodes.pop().expect("b"), nodes.pop().expect("a"));
        // Both keep the connection dialled by the lower id.
        let label = format!("gated round {round_no}");
        assert_one_connection(&mut a, &mut b, Some(aid.min(bid)), &label).await;
        a.mesh.shutdown().await;
        b.mesh.shutdown().await;
    }
    // Ungated starts race differently (often one side is connected before it dials at all):
    // whatever the race, both sides end on one shared connection with no flapping.
    for round_no in 0..5 {
        let (ia, ib) = (ident("a"), ident("b"));
        let mut nodes = start_on_reserved_ports(2, |p| {
            vec![
                config("a", &ia, Some(p[0]), vec![peer("b", &ib, Some(p[1]))]),
                config("b", &ib, Some(p[1]), vec![peer("a", &ia, Some(p[0]))]),
            ]
        })
        .await;
        let (mut b, mut a) = (nodes.pop().expect("b"), nodes.pop().expect("a"));
        assert_one_connection(&mut a, &mut b, None, &format!("free round {round_no}")).await;
        a.mesh.shutdown().await;
        b.mesh.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpinned_or_mismatched_certificates_are_refused_at_the_handshake() {
    let (ia, ib, iw) = (ident("a"), ident("b"), ident("w"));
    let (aid, bid, wid) = (ia.identity.id, ib.identity.id, iw.identity.id);

    // A pins only b. The stranger w knows a's id and address and keeps dialling.
    let mut a = Node::start(config("a", &ia, any_port(), vec![peer("b", &ib, None)])).await;
    let a_addr = a.mesh.local_addr().expect("listening");
    let w = Node::start(config("w", &iw, None, vec![peer("a", &ia, Some(a_addr))])).await;
    until(
        "a to log the refused id twice (w retried)",
        || logs().matches(&wid.to_string()).count() >= 2,
        || format!("w: {:?}", w.mesh.status()),
    )
    .await;
    a.drain();
    assert!(a.seen.is_empty(), "a must see nothing of w: {:?}", a.seen);
    assert!(w.mesh.connected_peers().is_empty());
    assert!(
        logs()
            .lines()
            .any(|l| l.contains("WARN") && l.contains(&wid.to_string())),
        "the refusal is a warning with the id seen"
    );

    // Mismatch the other way: a believes b lives where w listens.
    let wl = Node::start(config("w", &iw, any_port(), vec![peer("a", &ia, None)])).await;
    let w_addr = wl.mesh.local_addr().expect("listening");
    let a2 = Node::start(config("a", &ia, None, vec![peer("b", &ib, Some(w_addr))])).await;
    until(
        "a's status to name the wrong certificate",
        || {
            status_of(&a2.mesh, bid)
                .last_error
                .is_some_and(|e| e.contains(&wid.to_string()) && e.contains(&bid.to_string()))
        },
        || format!("{:?}", a2.mesh.status()),
    )
    .await;
    assert!(a2.mesh.connected_peers().is_empty());
    assert!(
        wl.mesh.connected_peers().is_empty(),
        "w must not accept a through a mismatch"
    );
    let _ = aid;
    for n in [&a, &w, &wl, &a2] {
        n.mesh.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_an_authenticated_peer_closes_only_its_connection() {
    let (ia, ib, ic) = (ident("a"), ident("b"), ident("c"));
    let (aid, bid, cid) = (ia.identity.id, ib.identity.id, ic.identity.id);
    let mut a = Node::start(config(
        "a",
        &ia,
        any_port(),
        vec![peer("b", &ib, None), peer("c", &ic, None)],
    ))
    .await;
    let addr = a.mesh.local_addr().expect("listening");
    let mut b = Node::start(config("b", &ib, None, vec![peer("a", &ia, Some(addr))])).await;
    a.connected(bid).await;
    b.connected(aid).await;

    // 1. Random bytes right after the TLS handshake: not a Hello.
    let mut c = raw_connect(addr, &ic, aid).await;
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    c.write_all(&junk).await.expect("write junk");
    c.flush().await.expect("flush");
    raw_until_closed(&mut c).await;
    round(&a, &mut b, lock_msg(1)).await;
    round(&b, &mut a, lock_msg(2)).await;
    a.drain();
    assert!(
        !a.seen
            .iter()
            .any(|e| matches!(e, MeshEvent::Connected { peer, .. } if *peer == cid)),
        "no session without a Hello: {:?}",
        a.seen
    );

    // 2. A valid Hello, then a 4 GiB length prefix.
    let mut c = raw_connect(addr, &ic, aid).await;
    raw_hello(&mut c, "c", PROTOCOL_VERSION).await;
    a.connected(cid).await;
    c.write_all(&[0xff, 0xff, 0xff, 0xff])
        .await
        .expect("write prefix");
    c.flush().await.expect("flush");
    let reason = a.disconnected(cid).await;
    assert!(reason.contains("larger than the maximum"), "{reason}");
    raw_until_closed(&mut c).await;
    round(&a, &mut b, lock_msg(3)).await;
    round(&b, &mut a, lock_msg(4)).await;

    // 3. A valid Hello, then a frame whose message tag is unknown.
    let mut c = raw_connect(addr, &ic, aid).await;
    raw_hello(&mut c, "c", PROTOCOL_VERSION).await;
    a.connected(cid).await;
    raw_send(&mut c, &[0xee, 0x01, 0x02]).await;
    let reason = a.disconnected(cid).await;
    assert!(reason.contains("undecodable"), "{reason}");
    raw_until_closed(&mut c).await;
    round(&a, &mut b, lock_msg(5)).await;

    // 4. A Hello of another protocol version: answered with ours, then closed.
    let mut c = raw_connect(addr, &ic, aid).await;
    raw_hello(&mut c, "c", PROTOCOL_VERSION + 1).await;
    match raw_read(&mut c).await {
        Some(Message::Hello { protocol, .. }) => assert_eq!(protocol, PROTOCOL_VERSION),
        other => panic!("expected a's Hello, got {other:?}"),
    }
    raw_until_closed(&mut c).await;
    round(&b, &mut a, lock_msg(6)).await;

    // 5. A second Hello mid-session.
    let mut c = raw_connect(addr, &ic, aid).await;
    raw_hello(&mut c, "c", PROTOCOL_VERSION).await;
    a.connected(cid).await;
    raw_hello(&mut c, "c", PROTOCOL_VERSION).await;
    let reason = a.disconnected(cid).await;
    assert!(reason.contains("Hello"), "{reason}");
    round(&a, &mut b, lock_msg(7)).await;

    // b's session was never touched, and every bad connection was logged as a warning
    // naming the peer.
    a.drain();
    assert!(
        !a.seen
            .iter()
            .any(|e| matches!(e, MeshEvent::Disconnected { peer, .. } if *peer == bid)),
        "{:?}",
        a.seen
    );
    assert_eq!(status_of(&a.mesh, bid).connections, 1);
    let log = logs();
    let cid_text = cid.to_string();
    for needle in [
        "larger than the maximum",
        "undecodable",
        "protocol version mismatch",
        "Hello",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(&cid_text) && l.contains(needle)),
            "no warning about {needle:?} for c"
        );
    }
    a.mesh.shutdown().await;
    b.mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_declared_dead_after_dead_after() {
    let (ia, ic) = (ident("a"), ident("c"));
    let (aid, cid) = (ia.identity.id, ic.identity.id);
    let mut a = Node::start(config("a", &ia, any_port(), vec![peer("c", &ic, None)])).await;
    let addr = a.mesh.local_addr().expect("listening");
    let mut c = raw_connect(addr, &ic, aid).await;
    raw_hello(&mut c, "c", PROTOCOL_VERSION).await;
    a.connected(cid).await;
    let since = Instant::now();
    // c reads nothing and sends nothing more (its socket stays open).
    let reason = a.disconnected(cid).await;
    let took = since.elapsed();
    assert!(reason.contains("no frame received"), "{reason}");
    assert!(
        took >= DEAD_AFTER - Duration::from_millis(50),
        "too early: {took:?}"
    );
    assert!(took < DEAD_AFTER * 5, "too late: {took:?}");
    drop(c);
    a.mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_peer_is_noticed_and_reconnected_when_it_returns() {
    let (ia, ib) = (ident("a"), ident("b"));
    let (aid, bid) = (ia.identity.id, ib.identity.id);
    // Only a dials (b has no address for a): reconnection is a's backoff at work.
    let mut b = Node::start(config("b", &ib, any_port(), vec![peer("a", &ia, None)])).await;
    let b_addr = b.mesh.local_addr().expect("listening");
    // b comes back on the same port.
    let cb = || config("b", &ib, Some(b_addr), vec![peer("a", &ia, None)]);
    // A dropped mesh lets go of its listener when its tasks have ended, a moment later.
    let restart_b = || async {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match Mesh::start(cb()).await {
                Ok((mesh, events)) => {
                    return Node {
                        mesh,
                        events,
                        seen: Vec::new(),
                        pending: Default::default(),
                    };
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("restarting b: {e}"),
            }
        }
    };
    let mut a = Node::start(config("a", &ia, None, vec![peer("b", &ib, Some(b_addr))])).await;
    a.connected(bid).await;
    b.connected(aid).await;
    round(&a, &mut b, lock_msg(1)).await;

    // Graceful shutdown.
    let t = Instant::now();
    b.mesh.shutdown().await;
    a.disconnected(bid).await;
    assert!(
        t.elapsed() < DEAD_AFTER + Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert!(a.mesh.connected_peers().is_empty());

    let mut b = restart_b().await;
    a.connected(bid).await;
    b.connected(aid).await;
    round(&a, &mut b, lock_msg(2)).await;
    round(&b, &mut a, lock_msg(3)).await;

    // Dropping every handle without shutdown also ends the mesh.
    let t = Instant::now();
    drop(b);
    a.disconnected(bid).await;
    assert!(
        t.elapsed() < DEAD_AFTER + Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );

    let mut b = restart_b().await;
    a.connected(bid).await;
    b.connected(aid).await;
    round(&b, &mut a, lock_msg(4)).await;
    a.mesh.shutdown().await;
    b.mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_overtakes_a_bulk_backlog() {
    let (ia, ic) = (ident("a"), ident("c"));
    let (aid, cid) = (ia.identity.id, ic.identity.id);
    let mut cfg = config("a", &ia, any_port(), vec![peer("c", &ic, None)]);
    // The raw receiver does not answer Pings while the backlog builds.
    cfg.dead_after = DEADLINE;
    let mut a = Node::start(cfg).await;
    let addr = a.mesh.local_addr().expect("listening");
    let mut c = raw_connect(addr, &ic, aid).await;
    raw_hello(&mut c, "c", PROTOCOL_VERSION).await;
    match raw_read(&mut c).await {
        Some(Message::Hello { .. }) => {}
        other => panic!("expected Hello, got {other:?}"),
    }
    a.connected(cid).await;

    // ~16 KiB per bulk message; its index travels in the fencing field.
    let paths: Vec<(RelPath, u64)> = (0..100)
        .map(|i| {
            (
                RelPath::new(format!("dir/{i:0>150}").as_bytes()).expect("p"),
                0,
            )
        })
        .collect();
    const BULK: u64 = 1000;
    for i in 0..BULK {
        let mut locks = paths.clone();
        locks[0].1 = i;
        a.mesh
            .send(
                cid,
                Message::Lock(LockMsg::Holding { locks }),
                Priority::Bulk,
            )
            .expect("bulk send");
    }
    let control = lock_msg(42);
    a.mesh
        .send(cid, control.clone(), Priority::Control)
        .expect("control send");
    assert!(status_of(&a.mesh, cid).bulk_queued > 0);

    let mut bulk_before = None;
    let mut next_bulk = 0u64;
    while next_bulk < BULK || bulk_before.is_none() {
        match raw_read(&mut c).await {
            Some(Message::Lock(LockMsg::Holding { locks })) => {
                assert_eq!(locks[0].1, next_bulk, "bulk frames arrive in order");
                next_bulk += 1;
            }
            Some(m) if m == control => bulk_before = Some(next_bulk),
            Some(Message::Ping { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let before = bulk_before.expect("control arrived");
    assert!(
        before < BULK / 2,
        "the Control message waited behind {before} of {BULK} bulk messages"
    );
    eprintln!("control message arrived after {before} of {BULK} bulk messages");
    a.mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_peer_replaces_its_connection_within_one_session() {
    let (ia, ic) = (ident("a"), ident("c"));
    let (aid, cid) = (ia.identity.id, ic.identity.id);
    let mut cfg = config("a", &ia, any_port(), vec![peer("c", &ic, None)]);
    // The raw peer answers no Pings.
    cfg.dead_after = DEADLINE;
    let mut a = Node::start(cfg).await;
    let addr = a.mesh.local_addr().expect("listening");

    // c dials again and again without closing its earlier connections: each newer one wins.
    let mut conns = Vec::new();
    for _ in 0..5 {
        let mut c = raw_connect(addr, &ic, aid).await;
        raw_hello(&mut c, "c", PROTOCOL_VERSION).await;
        match raw_read(&mut c).await {
            Some(Message::Hello { .. }) => {}
            other => panic!("expected Hello, got {other:?}"),
        }
        conns.push(c);
    }
    a.connected(cid).await;
    until(
        "a to hold at most the active and one draining connection",
        || status_of(&a.mesh, cid).connections <= 2,
        || format!("{:?}", a.mesh.status()),
    )
    .await;
    // The oldest were closed by a; messages go out on the newest.
    raw_until_closed(&mut conns[0]).await;
    let msg = lock_msg(5);
    a.mesh
        .send(cid, msg.clone(), Priority::Control)
        .expect("send");
    let newest = conns.last_mut().expect("conns");
    loop {
        match raw_read(newest).await {
            Some(m) if m == msg => break,
            Some(Message::Ping { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    a.drain();
    let sessions = a
        .seen
        .iter()
        .filter(|e| {
            matches!(
                e,
                MeshEvent::Connected { .. } | MeshEvent::Disconnected { .. }
            )
        })
        .count();
    assert_eq!(sessions, 1, "one session throughout: {:?}", a.seen);
    a.mesh.shutdown().await;
}
