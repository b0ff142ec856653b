//! `LockService`s wired together in-process: one router task per service carries its outbound
//! messages to the others (per-pair FIFO, as one TLS connection would), links can be cut.
//! Covers async and blocking acquires, races from plain threads, timeouts, linger, grace,
//! and callers that give up.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Weak};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use peerfs_lockd::{Held, LockConfig, LockError, LockService, Policy};
use peerfs_proto::msg::LockMsg;
use peerfs_proto::{PeerId, RelPath};
use tokio::sync::mpsc;

fn peer(i: usize) -> PeerId {
    let mut id = [0u8; 32];
    id[0] = u8::try_from(i + 1).expect("few peers");
    PeerId(id)
}

fn path(name: &str) -> RelPath {
    RelPath::new(name.as_bytes()).expect("valid test path")
}

fn cfg(linger_ms: u64, policy: Policy) -> LockConfig {
    LockConfig {
        linger: Duration::from_millis(linger_ms),
        grace: Duration::from_millis(400),
        request_timeout: Duration::from_millis(800),
        policy,
    }
}

/// Services `0..n` and the links between them.
struct Cluster {
    services: Vec<Arc<LockService>>,
    /// Unordered pairs whose messages are dropped.
    cut: Arc<Mutex<BTreeSet<(usize, usize)>>>,
    /// Messages delivered so far.
    delivered: Arc<AtomicU64>,
}

impl Cluster {
    /// Must run inside a runtime (services spawn their timer task).
    fn new(n: usize, cfg: LockConfig) -> Cluster {
        let mut services = Vec::new();
        let mut outbound = Vec::new();
        for i in 0..n {
            let (tx, rx) = mpsc::unbounded_channel::<(PeerId, LockMsg)>();
            services.push(Arc::new(LockService::new(peer(i), cfg.clone(), tx)));
            outbound.push(rx);
        }
        // Connect before any router runs: a peer must be connected before its messages are
        // passed in (what the connection manager guarantees), and the Holding messages wait
        // in the channels meanwhile.
        for (a, service) in services.iter().enumerate() {
            for b in (0..n).filter(|b| *b != a) {
                service.peer_connected(peer(b));
            }
        }
        let cut = Arc::new(Mutex::new(BTreeSet::new()));
        let delivered = Arc::new(AtomicU64::new(0));
        for (i, mut rx) in outbound.into_iter().enumerate() {
            let targets: Vec<Weak<LockService>> = services.iter().map(Arc::downgrade).collect();
            let cut = cut.clone();
            let delivered = delivered.clone();
            tokio::spawn(async move {
                while let Some((to, msg)) = rx.recv().await {
                    let j = usize::from(to.0[0]) - 1;
                    if cut.lock().contains(&(i.min(j), i.max(j))) {
                        continue;
                    }
                    let Some(target) = targets[j].upgrade() else {
                        return;
                    };
                    delivered.fetch_add(1, Ordering::SeqCst);
                    target.on_message(peer(i), msg);
                }
            });
        }
        Cluster {
            services,
            cut,
            delivered,
        }
    }

    fn cut(&self, a: usize, b: usize) {
        self.cut.lock().insert((a.min(b), a.max(b)));
        self.services[a].peer_disconnected(peer(b));
        self.services[b].peer_disconnected(peer(a));
    }

    /// Drops `a`'s messages to and from `b` without telling either side (a silent peer).
    fn silence(&self, a: usize, b: usize) {
        self.cut.lock().insert((a.min(b), a.max(b)));
    }
}

/// Waits (polling, with a deadline) until `cond` holds; panics with `what` otherwise.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

async fn wait_until_async(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("runtime")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_exclude_each_other_and_hand_over() {
    let c = Cluster::new(2, cfg(50, Policy::Available));
    let (a, b) = (&c.services[0], &c.services[1]);
    let doc = path("report.docx");
    assert_eq!(a.acquire(&doc).await, Ok(Held { fencing: 1 }));
    wait_until_async("b knows a holds it", || b.holder_of(&doc) == Some(peer(0))).await;
    assert_eq!(
        b.acquire(&doc).await,
        Err(LockError::HeldBy { peer: peer(0) })
    );
    a.release(&doc);
    wait_until_async("the linger ended and b saw the Release", || {
        b.holder_of(&doc).is_none()
    })
    .await;
    assert_eq!(b.acquire(&doc).await, Ok(Held { fencing: 2 }));
    wait_until_async("a knows b holds it", || a.holder_of(&doc) == Some(peer(1))).await;
    let rows = a.snapshot();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].holder, rows[0].fencing), (peer(1), 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_lock_is_revived_without_a_message() {
    let c = Cluster::new(2, cfg(2_000, Policy::Available));
    let (a, b) = (&c.services[0], &c.services[1]);
    let doc = path("budget.xlsx");
    let held = a.acquire(&doc).await.expect("first acquire");
    wait_until_async("b knows", || b.holder_of(&doc) == Some(peer(0))).await;
    let before = c.delivered.load(Ordering::SeqCst);
    a.release(&doc);
    assert_eq!(
        b.acquire(&doc).await,
        Err(LockError::HeldBy { peer: peer(0) })
    );
    assert_eq!(a.acquire(&doc).await, Ok(held), "revived: same holding");
    assert_eq!(c.delivered.load(Ordering::SeqCst), before);
    assert!(
        a.snapshot()
            .iter()
            .any(|r| r.local_refs == 1 && !r.lingering)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_services_racing_have_exactly_one_winner() {
    let c = Cluster::new(3, cfg(0, Policy::Available));
    let doc = path("race.docx");
    for round in 0..50 {
        let (r0, r1, r2) = tokio::join!(
            c.services[0].acquire(&doc),
            c.services[1].acquire(&doc),
            c.services[2].acquire(&doc)
        );
        let outcomes = [r0, r1, r2];
        let winners: Vec<usize> = (0..3).filter(|i| outcomes[*i].is_ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        c.services[winners[0]].release(&doc);
        wait_until_async("everyone saw the release", || {
            c.services.iter().all(|s| s.holder_of(&doc).is_none())
        })
        .await;
    }
}

#[test]
fn acquire_blocking_from_std_threads_racing_200_times_never_both_succeed() {
    let rt = runtime();
    let _enter = rt.enter();
    let c = Cluster::new(2, cfg(0, Policy::Available));
    let doc = path("race.docx");
    let mut last = 0;
    for round in 0..200 {
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let s = c.services[i].clone();
                let barrier = barrier.clone();
                let doc = doc.clone();
                thread::spawn(move || {
                    barrier.wait();
                    s.acquire_blocking(&doc)
                })
            })
            .collect();
        let outcomes: Vec<Result<Held, LockError>> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        let winners: Vec<usize> = (0..2).filter(|i| outcomes[*i].is_ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        let fencing = outcomes[winners[0]].clone().map(|h| h.fencing).unwrap_or(0);
        assert!(
            fencing > last,
            "round {round}: fencing {fencing} after {last}"
        );
        last = fencing;
        c.services[winners[0]].release(&doc);
        wait_until("both saw the release", || {
            c.services.iter().all(|s| s.holder_of(&doc).is_none())
        });
    }
}

#[test]
fn blocking_and_async_acquires_respect_the_timeout_and_the_policy() {
    let rt = runtime();
    let _enter = rt.enter();
    for (policy, expected) in [
        (Policy::Available, Ok(Held { fencing: 1 })),
        (
            Policy::Strict,
            Err(LockError::Unreachable { peer: peer(1) }),
        ),
    ] {
        let c = Cluster::new(2, cfg(0, policy));
        c.silence(0, 1); // connected, but nothing gets through
        let started = Instant::now();
        assert_eq!(
            c.services[0].acquire_blocking(&path("a")),
            expected,
            "{policy}"
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(790) && took < Duration::from_millis(1_300),
            "{policy}: blocked {took:?}"
        );
        let started = Instant::now();
        let got = rt.block_on(c.services[0].acquire(&path("b")));
        assert_eq!(got, expected, "{policy}");
        assert!(started.elapsed() < Duration::from_millis(1_300));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_leaves_no_lock_behind() {
    // A long linger: a request that went on without its caller and won would still show.
    let c = Cluster::new(2, cfg(5_000, Policy::Available));
    let a = &c.services[0];
    c.silence(0, 1); // under `available`, a silent peer lets requests win at their deadline
    let doc = path("doc");
    let gave_up = tokio::time::timeout(Duration::from_millis(20), a.acquire(&doc)).await;
    assert!(gave_up.is_err(), "still pending after 20 ms");
    // Let the abandoned request's deadline pass: a probe on another name takes a full
    // request timeout, and started after it.
    assert_eq!(a.acquire(&path("probe")).await.map(|h| h.fencing), Ok(1));
    assert_eq!(a.holder_of(&doc), None, "the abandoned request did not win");
    let names: Vec<String> = a.snapshot().iter().map(|r| r.path.to_string()).collect();
    assert_eq!(names, vec!["probe".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_holder_keeps_the_name_for_the_grace_period() {
    let c = Cluster::new(2, cfg(0, Policy::Available));
    let (a, b) = (&c.services[0], &c.services[1]);
    let doc = path("doc");
    a.acquire(&doc).await.expect("a acquires");
    wait_until_async("b knows", || b.holder_of(&doc) == Some(peer(0))).await;
    c.cut(0, 1);
    assert_eq!(
        b.acquire(&doc).await,
        Err(LockError::HeldBy { peer: peer(0) })
    );
    let row = b.snapshot().into_iter().next().expect("a's lock in grace");
    assert!(
        row.grace_left
            .is_some_and(|g| g <= Duration::from_millis(400))
    );
    wait_until_async("grace ran out", || b.holder_of(&doc).is_none()).await;
    assert_eq!(b.acquire(&doc).await.map(|h| h.fencing), Ok(2));
}
