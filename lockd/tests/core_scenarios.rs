//! The core's rules one at a time, on a network whose deliveries each test orders by hand
//! (per-pair FIFO still holds): refcount and linger, holders denying, races and deferral,
//! timeouts and policies, leases after a disconnect, Holding after a restart, fencing,
//! queries, and hostile input.

mod sim;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use peerfs_lockd::{AcquireStart, Action, Held, LockConfig, LockCore, LockError, Policy, Ticket};
use peerfs_proto::PeerId;
use peerfs_proto::msg::{LockMsg, ReqId};
use sim::{Net, Sim, path, peer};

const T: Duration = Duration::from_millis(100);

fn cfg(policy: Policy) -> LockConfig {
    LockConfig {
        linger: Duration::from_millis(50),
        grace: Duration::from_millis(300),
        request_timeout: T,
        policy,
    }
}

/// Cores wired by hand: every send is queued per direction, and the test decides what is
/// delivered when.
struct Mesh {
    base: Instant,
    now: Duration,
    cores: Vec<LockCore>,
    queues: BTreeMap<(usize, usize), VecDeque<LockMsg>>,
    done: Vec<(usize, Ticket, Result<Held, LockError>)>,
    /// Every message ever sent, for "no message was sent" assertions.
    sent: usize,
}

impl Mesh {
    fn new(n: usize, policy: Policy) -> Mesh {
        let mut m = Mesh {
            base: Instant::now(),
            now: Duration::ZERO,
            cores: (0..n)
                .map(|i| LockCore::new(peer(i), cfg(policy)))
                .collect(),
            queues: BTreeMap::new(),
            done: Vec::new(),
            sent: 0,
        };
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    m.connect_one(a, b);
                }
            }
        }
        m.deliver_all();
        m
    }

    fn t(&self) -> Instant {
        self.base + self.now
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        for i in 0..self.cores.len() {
            let now = self.t();
            let actions = self.cores[i].tick(now);
            self.apply(i, actions);
        }
    }

    fn idx(&self, id: PeerId) -> usize {
        self.cores
            .iter()
            .position(|c| c.me() == id)
            .expect("known peer")
    }

    fn apply(&mut self, i: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { to, msg } => {
                    let j = self.idx(to);
                    self.sent += 1;
                    self.queues.entry((i, j)).or_default().push_back(msg);
                }
                Action::Complete { request, result } => self.done.push((i, request, result)),
            }
        }
    }

    /// `a` sees `b` connected (one side only).
    fn connect_one(&mut self, a: usize, b: usize) {
        let now = self.t();
        let id = self.cores[b].me();
        let actions = self.cores[a].peer_connected(id, now);
        self.apply(a, actions);
    }

    fn cut(&mut self, a: usize, b: usize) {
        self.queues.remove(&(a, b));
        self.queues.remove(&(b, a));
        for (x, y) in [(a, b), (b, a)] {
            let now = self.t();
            let id = self.cores[y].me();
            let actions = self.cores[x].peer_disconnected(id, now);
            self.apply(x, actions);
        }
    }

    fn heal(&mut self, a: usize, b: usize) {
        self.connect_one(a, b);
        self.connect_one(b, a);
    }

    fn acquire(&mut self, i: usize, name: &str) -> AcquireStart {
        let now = self.t();
        let start = self.cores[i].acquire(&path(name), now);
        if let AcquireStart::Pending { actions, .. } = &start {
            self.apply(i, actions.clone());
        }
        start
    }

    fn release(&mut self, i: usize, name: &str) {
        let now = self.t();
        let actions = self.cores[i].release(&path(name), now);
        self.apply(i, actions);
    }

    /// Delivers the next message from `a` to `b`; returns it.
    fn deliver(&mut self, a: usize, b: usize) -> LockMsg {
        let msg = self
            .queues
            .get_mut(&(a, b))
            .and_then(|q| q.pop_front())
            .unwrap_or_else(|| panic!("nothing in flight from p{a} to p{b}"));
        let now = self.t();
        let from = self.cores[a].me();
        let actions = self.cores[b].on_message(from, msg.clone(), now);
        self.apply(b, actions);
        msg
    }

    /// Delivers everything from `a` to `b`, including what that provokes in the same
    /// direction.
    fn flush(&mut self, a: usize, b: usize) {
        while self.queues.get(&(a, b)).is_some_and(|q| !q.is_empty()) {
            self.deliver(a, b);
        }
    }

    fn deliver_all(&mut self) {
        while let Some((a, b)) = self
            .queues
            .iter()
            .find(|(_, q)| !q.is_empty())
            .map(|(k, _)| *k)
        {
            self.deliver(a, b);
        }
    }

    fn in_flight(&self, a: usize, b: usize) -> Vec<LockMsg> {
        self.queues
            .get(&(a, b))
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The settled result of peer `i`'s ticket.
    fn result(&self, i: usize, ticket: Ticket) -> Option<Result<Held, LockError>> {
        self.done
            .iter()
            .find(|(p, t, _)| *p == i && *t == ticket)
            .map(|(_, _, r)| r.clone())
    }

    fn holds(&self, i: usize, name: &str) -> bool {
        self.cores[i]
            .holder_of(&path(name))
            .is_some_and(|(h, _)| h == self.cores[i].me())
    }
}

fn ticket(start: &AcquireStart) -> Ticket {
    match start {
        AcquireStart::Pending { ticket, .. } => *ticket,
        other => panic!("expected a pending acquire, got {other:?}"),
    }
}

fn held_by(i: usize) -> LockError {
    LockError::HeldBy { peer: peer(i) }
}

#[test]
fn with_no_peer_an_acquire_succeeds_at_once() {
    let mut core = LockCore::new(peer(0), cfg(Policy::Available));
    let now = Instant::now();
    assert_eq!(
        core.acquire(&path("a.txt"), now),
        AcquireStart::Done(Ok(Held { fencing: 1 }))
    );
    assert_eq!(core.holder_of(&path("a.txt")).map(|h| h.0), Some(peer(0)));
    // A declared peer that is not connected is left out under `available`...
    core.add_peer(peer(1));
    assert_eq!(
        core.acquire(&path("b.txt"), now),
        AcquireStart::Done(Ok(Held { fencing: 1 }))
    );
    // ...and refuses under `strict`.
    let mut strict = LockCore::new(peer(0), cfg(Policy::Strict));
    strict.add_peer(peer(1));
    assert_eq!(
        strict.acquire(&path("a.txt"), now),
        AcquireStart::Done(Err(LockError::Unreachable { peer: peer(1) }))
    );
}

#[test]
fn acquire_asks_every_peer_and_wins_with_all_grants() {
    let mut m = Mesh::new(3, Policy::Available);
    let start = m.acquire(0, "doc");
    let t = ticket(&start);
    let AcquireStart::Pending { actions, .. } = &start else {
        unreachable!()
    };
    let asked: Vec<PeerId> = actions
        .iter()
        .map(|a| match a {
            Action::Send {
                to,
                msg: LockMsg::Request { hops: 0, .. },
            } => *to,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(asked, vec![peer(1), peer(2)]);
    m.flush(0, 1);
    m.flush(1, 0);
    assert_eq!(m.result(0, t), None, "one grant of two is not enough");
    m.flush(0, 2);
    m.flush(2, 0);
    assert_eq!(m.result(0, t), Some(Ok(Held { fencing: 1 })));
    // The win is announced to everyone.
    for j in [1, 2] {
        assert!(matches!(
            m.in_flight(0, j).as_slice(),
            [LockMsg::Acquired { fencing: 1, .. }]
        ));
    }
    m.deliver_all();
    assert_eq!(
        m.cores[1].holder_of(&path("doc")).map(|h| h.0),
        Some(peer(0))
    );
}

#[test]
fn a_holder_denies_at_once_and_a_known_holder_fails_locally() {
    let mut m = Mesh::new(2, Policy::Available);
    let t = ticket(&m.acquire(0, "doc"));
    m.deliver_all();
    assert!(m.result(0, t).is_some_and(|r| r.is_ok()));
    // p1 knows from the Acquired: no round trip at all.
    let before = m.sent;
    assert_eq!(m.acquire(1, "doc"), AcquireStart::Done(Err(held_by(0))));
    assert_eq!(m.sent, before);
    // A peer that has not heard of it yet asks, and the holder denies at once.
    let mut fresh = Mesh::new(2, Policy::Available);
    let t0 = ticket(&fresh.acquire(0, "doc"));
    fresh.flush(0, 1);
    fresh.flush(1, 0); // p0 wins; its Acquired to p1 is still in flight
    assert!(fresh.result(0, t0).is_some_and(|r| r.is_ok()));
    let queued_acquired = fresh.queues.remove(&(0, 1));
    let t1 = ticket(&fresh.acquire(1, "doc"));
    fresh.flush(1, 0);
    assert!(matches!(
        fresh.in_flight(0, 1).as_slice(),
        [LockMsg::Deny { holder, .. }] if *holder == peer(0)
    ));
    fresh.flush(0, 1);
    assert_eq!(fresh.result(1, t1), Some(Err(held_by(0))));
    drop(queued_acquired);
}

#[test]
fn several_handles_share_one_lock_and_linger_is_revived_without_messages() {
    let mut m = Mesh::new(2, Policy::Available);
    let t = ticket(&m.acquire(0, "doc"));
    // A second write-open while the request is pending joins it.
    let t2 = ticket(&m.acquire(0, "doc"));
    m.deliver_all();
    assert_eq!(m.result(0, t), Some(Ok(Held { fencing: 1 })));
    assert_eq!(m.result(0, t2), Some(Ok(Held { fencing: 1 })));
    // A third one while held: at once, same token, no message.
    let sent = m.sent;
    assert_eq!(
        m.acquire(0, "doc"),
        AcquireStart::Done(Ok(Held { fencing: 1 }))
    );
    assert_eq!(m.sent, sent);
    let refs = |m: &Mesh| {
        m.cores[0]
            .snapshot(m.t(), SystemTime::now())
            .iter()
            .find(|r| r.holder == peer(0))
            .map(|r| (r.local_refs, r.lingering))
    };
    assert_eq!(refs(&m), Some((3, false)));
    m.release(0, "doc");
    m.release(0, "doc");
    assert_eq!(refs(&m), Some((1, false)));
    m.release(0, "doc");
    assert_eq!(refs(&m), Some((0, true)), "lingers after the last handle");
    assert_eq!(m.sent, sent, "nothing is said while lingering");
    // Others are denied throughout the linger.
    assert_eq!(m.acquire(1, "doc"), AcquireStart::Done(Err(held_by(0))));
    m.advance(Duration::from_millis(30));
    assert!(m.holds(0, "doc"));
    // Office's close-then-reopen: revived with no round trip, same holding.
    assert_eq!(
        m.acquire(0, "doc"),
        AcquireStart::Done(Ok(Held { fencing: 1 }))
    );
    assert_eq!(m.sent, sent);
    m.advance(Duration::from_millis(100));
    assert!(m.holds(0, "doc"), "a revived lock does not expire");
    m.release(0, "doc");
    m.advance(Duration::from_millis(49));
    assert!(m.holds(0, "doc"));
    m.advance(Duration::from_millis(1));
    assert!(!m.holds(0, "doc"), "released when the linger ends");
    assert!(matches!(
        m.in_flight(0, 1).as_slice(),
        [LockMsg::Release { fencing: 1, .. }]
    ));
    m.deliver_all();
    let t1 = ticket(&m.acquire(1, "doc"));
    m.deliver_all();
    assert_eq!(m.result(1, t1), Some(Ok(Held { fencing: 2 })));
}

#[test]
fn zero_linger_releases_at_once() {
    let mut core = LockCore::new(
        peer(0),
        LockConfig {
            linger: Duration::ZERO,
            ..cfg(Policy::Available)
        },
    );
    let now = Instant::now();
    let _ = core.peer_connected(peer(1), now);
    let _ = core.on_message(peer(1), LockMsg::Holding { locks: vec![] }, now);
    let start = core.acquire(&path("doc"), now);
    let t = ticket(&start);
    let out = core.on_message(
        peer(1),
        LockMsg::Grant {
            req: ReqId {
                origin: peer(0),
                seq: 1,
            },
            fencing: 0,
        },
        now,
    );
    assert!(out.contains(&Action::Complete {
        request: t,
        result: Ok(Held { fencing: 1 })
    }));
    let out = core.release(&path("doc"), now);
    assert_eq!(
        out,
        vec![Action::Send {
            to: peer(1),
            msg: LockMsg::Release {
                path: path("doc"),
                fencing: 1
            }
        }]
    );
    assert_eq!(core.holder_of(&path("doc")), None);
}

#[test]
fn simultaneous_requests_of_two_peers_the_first_by_priority_wins() {
    for order in [[0, 1], [1, 0]] {
        let mut m = Mesh::new(2, Policy::Available);
        let t0 = ticket(&m.acquire(0, "doc"));
        let t1 = ticket(&m.acquire(1, "doc"));
        // Both lamport 1: p0 wins the tie by id. The loser grants at once; the winner defers.
        m.flush(order[0], order[1]);
        m.flush(order[1], order[0]);
        m.deliver_all();
        assert_eq!(m.result(0, t0), Some(Ok(Held { fencing: 1 })), "{order:?}");
        assert_eq!(m.result(1, t1), Some(Err(held_by(0))), "{order:?}");
    }
}

#[test]
fn a_deferred_answer_waits_for_our_request_and_is_a_deny_when_it_wins() {
    let mut m = Mesh::new(2, Policy::Available);
    let t0 = ticket(&m.acquire(0, "doc"));
    let t1 = ticket(&m.acquire(1, "doc"));
    m.flush(1, 0); // p1's request reaches p0, which ranks first: no answer yet
    assert!(
        m.in_flight(0, 1)
            .iter()
            .all(|msg| matches!(msg, LockMsg::Request { .. }))
    );
    m.flush(0, 1); // p0's request reaches p1, which grants at once
    assert!(matches!(
        m.in_flight(1, 0).as_slice(),
        [LockMsg::Grant { .. }]
    ));
    m.flush(1, 0);
    assert_eq!(m.result(0, t0), Some(Ok(Held { fencing: 1 })));
    // Now the deferred answer: Acquired, then Deny naming the winner.
    assert!(matches!(
        m.in_flight(0, 1).as_slice(),
        [LockMsg::Acquired { .. }, LockMsg::Deny { holder, .. }] if *holder == peer(0)
    ));
    m.flush(0, 1);
    assert_eq!(m.result(1, t1), Some(Err(held_by(0))));
}

#[test]
fn a_deferred_answer_becomes_a_grant_when_our_request_loses() {
    // p0 ranks first but p2 never answers it and the policy is strict: p0 loses at its
    // deadline, and only then grants p1, whose request then wins.
    let mut m = Mesh::new(3, Policy::Strict);
    let t0 = ticket(&m.acquire(0, "doc"));
    m.advance(Duration::from_millis(10)); // p1's deadline comes after p0's
    let t1 = ticket(&m.acquire(1, "doc"));
    m.flush(1, 0); // deferred by p0
    m.flush(0, 1); // p1 answers p0
    m.flush(1, 0);
    m.flush(1, 2); // p2 grants p1 ...
    m.flush(2, 1);
    assert_eq!(m.result(1, t1), None, "p1 still waits for p0");
    // ... while p0's request to p2 never arrives.
    m.queues.remove(&(0, 2));
    m.advance(T - Duration::from_millis(10));
    assert_eq!(
        m.result(0, t0),
        Some(Err(LockError::Unreachable { peer: peer(2) }))
    );
    assert!(
        m.in_flight(0, 1)
            .iter()
            .any(|msg| matches!(msg, LockMsg::Grant { .. }))
    );
    m.flush(0, 1);
    assert_eq!(m.result(1, t1), Some(Ok(Held { fencing: 1 })));
}

/// DESIGN.md's trap: "C grants A, B refuses A, C refuses B: both lose". Here C names the peer
/// it granted instead of refusing, and that peer decides.
#[test]
fn three_peers_first_come_trap_still_has_exactly_one_winner() {
    for c_sees_a_first in [true, false] {
        let (a, b, c) = (0, 1, 2);
        let mut m = Mesh::new(3, Policy::Available);
        let ta = ticket(&m.acquire(a, "doc"));
        let tb = ticket(&m.acquire(b, "doc"));
        if c_sees_a_first {
            m.flush(a, c);
            m.flush(b, c);
        } else {
            m.flush(b, c);
            m.flush(a, c);
        }
        // C granted the first and named the first's origin to the second.
        let named = if c_sees_a_first { peer(a) } else { peer(b) };
        let to_second = if c_sees_a_first { b } else { a };
        assert!(
            m.in_flight(c, to_second)
                .iter()
                .any(|msg| matches!(msg, LockMsg::Deny { holder, .. } if *holder == named)),
            "C names the peer it granted"
        );
        m.deliver_all();
        // A ranks first (same lamport, lower id) and wins either way; B loses to it.
        assert_eq!(
            m.result(a, ta),
            Some(Ok(Held { fencing: 1 })),
            "{c_sees_a_first}"
        );
        assert_eq!(m.result(b, tb), Some(Err(held_by(a))), "{c_sees_a_first}");
    }
}

#[test]
fn timeout_proceeds_under_available_and_fails_under_strict() {
    for (policy, expected) in [
        (Policy::Available, Ok(Held { fencing: 1 })),
        (
            Policy::Strict,
            Err(LockError::Unreachable { peer: peer(1) }),
        ),
    ] {
        let mut m = Mesh::new(2, policy);
        let t = ticket(&m.acquire(0, "doc"));
        m.queues.remove(&(0, 1)); // p1 never hears of it
        m.advance(T - Duration::from_millis(1));
        assert_eq!(m.result(0, t), None);
        m.advance(Duration::from_millis(1));
        assert_eq!(m.result(0, t), Some(expected), "{policy}");
    }
}

#[test]
fn a_peer_lost_during_a_request_is_skipped_or_fails_it_by_policy() {
    for (policy, expected) in [
        (Policy::Available, Ok(Held { fencing: 1 })),
        (
            Policy::Strict,
            Err(LockError::Unreachable { peer: peer(1) }),
        ),
    ] {
        let mut m = Mesh::new(2, policy);
        let t = ticket(&m.acquire(0, "doc"));
        m.cut(0, 1);
        assert_eq!(m.result(0, t), Some(expected), "{policy}");
    }
}

#[test]
fn a_disconnected_holder_keeps_its_lock_for_the_grace_period_then_loses_it() {
    let mut m = Mesh::new(3, Policy::Available);
    let t = ticket(&m.acquire(0, "doc"));
    m.deliver_all();
    assert!(m.result(0, t).is_some_and(|r| r.is_ok()));
    m.cut(0, 1);
    m.cut(0, 2);
    // Grace: still p0's, everywhere.
    assert_eq!(m.acquire(1, "doc"), AcquireStart::Done(Err(held_by(0))));
    let grace_left = m.cores[1]
        .snapshot(m.t(), SystemTime::now())
        .into_iter()
        .find(|r| r.holder == peer(0))
        .and_then(|r| r.grace_left);
    assert_eq!(grace_left, Some(Duration::from_millis(300)));
    m.advance(Duration::from_millis(299));
    assert_eq!(m.acquire(2, "doc"), AcquireStart::Done(Err(held_by(0))));
    m.advance(Duration::from_millis(1));
    assert_eq!(m.cores[1].holder_of(&path("doc")), None, "grace over");
    let t1 = ticket(&m.acquire(1, "doc"));
    m.deliver_all();
    assert_eq!(m.result(1, t1), Some(Ok(Held { fencing: 2 })));
}

#[test]
fn a_holder_that_reconnects_within_grace_keeps_its_lock() {
    let mut m = Mesh::new(2, Policy::Available);
    let t = ticket(&m.acquire(0, "doc"));
    m.deliver_all();
    assert!(m.result(0, t).is_some_and(|r| r.is_ok()));
    m.cut(0, 1);
    m.advance(Duration::from_millis(200));
    m.heal(0, 1);
    m.deliver_all(); // Holding { doc } replaces what p1 knew
    m.advance(Duration::from_millis(500));
    assert_eq!(m.acquire(1, "doc"), AcquireStart::Done(Err(held_by(0))));
    let row = m.cores[1]
        .snapshot(m.t(), SystemTime::now())
        .into_iter()
        .find(|r| r.holder == peer(0));
    assert_eq!(row.map(|r| (r.fencing, r.grace_left)), Some((1, None)));
}

#[test]
fn a_restarted_peer_drops_its_old_locks_at_once_with_an_empty_holding() {
    let mut m = Mesh::new(2, Policy::Available);
    let t = ticket(&m.acquire(0, "doc"));
    m.deliver_all();
    assert!(m.result(0, t).is_some_and(|r| r.is_ok()));
    // p0 dies and comes back with nothing.
    m.cut(0, 1);
    m.cores[0] = LockCore::new(peer(0), cfg(Policy::Available));
    assert_eq!(m.acquire(1, "doc"), AcquireStart::Done(Err(held_by(0))));
    m.heal(0, 1);
    assert_eq!(
        m.in_flight(0, 1),
        vec![LockMsg::Holding { locks: vec![] }],
        "a restarted peer holds nothing"
    );
    m.deliver_all();
    assert_eq!(
        m.cores[1].holder_of(&path("doc")),
        None,
        "no waiting for grace"
    );
    let t1 = ticket(&m.acquire(1, "doc"));
    m.deliver_all();
    // The restarted peer forgot the token, but p1 saw the Acquired.
    assert_eq!(m.result(1, t1), Some(Ok(Held { fencing: 2 })));
}

#[test]
fn fencing_tokens_strictly_increase_across_successive_holders() {
    let mut m = Mesh::new(3, Policy::Available);
    let mut last = 0;
    for round in 0..9 {
        let i = round % 3;
        let t = ticket(&m.acquire(i, "doc"));
        m.deliver_all();
        let Some(Ok(Held { fencing })) = m.result(i, t) else {
            panic!("round {round}: {:?}", m.result(i, t));
        };
        assert!(fencing > last, "round {round}: {fencing} after {last}");
        last = fencing;
        m.release(i, "doc");
        m.advance(Duration::from_millis(50));
        m.deliver_all();
    }
    // Tokens are per name.
    let t = ticket(&m.acquire(1, "other"));
    m.deliver_all();
    assert_eq!(m.result(1, t), Some(Ok(Held { fencing: 1 })));
}

#[test]
fn a_partitioned_holder_is_protected_by_a_third_peer() {
    // p0 holds; the p0–p1 link is down, but p2 saw the Acquired. p1 (policy available) does
    // not ask p0, yet p2 names p0 and p1 cannot ask p0 to contradict it.
    let mut m = Mesh::new(3, Policy::Available);
    m.cut(0, 1);
    let t = ticket(&m.acquire(0, "doc"));
    m.deliver_all();
    assert!(m.result(0, t).is_some_and(|r| r.is_ok()));
    let t1 = ticket(&m.acquire(1, "doc"));
    m.deliver_all();
    assert_eq!(m.result(1, t1), Some(Err(held_by(0))));
}

#[test]
fn a_stale_deny_is_overruled_by_the_named_peer_itself() {
    // p0 releases; its Release reaches p1 but is still on its way to p2. p1's request gets
    // "p0 holds it" from p2 and a grant from p0: p0's own word wins.
    let mut m = Mesh::new(3, Policy::Available);
    m.cores.iter_mut().for_each(|c| {
        *c = LockCore::new(
            c.me(),
            LockConfig {
                linger: Duration::ZERO,
                ..cfg(Policy::Available)
            },
        )
    });
    m.queues.clear();
    for a in 0..3 {
        for b in 0..3 {
            if a != b {
                m.connect_one(a, b);
            }
        }
    }
    m.deliver_all();
    let t = ticket(&m.acquire(0, "doc"));
    m.deliver_all();
    assert!(m.result(0, t).is_some_and(|r| r.is_ok()));
    m.release(0, "doc");
    m.flush(0, 1); // p1 sees the Release; p2 does not yet
    let t1 = ticket(&m.acquire(1, "doc"));
    m.flush(1, 2);
    assert!(matches!(
        m.in_flight(2, 1).as_slice(),
        [LockMsg::Deny { holder, .. }] if *holder == peer(0)
    ));
    m.flush(2, 1);
    assert_eq!(m.result(1, t1), None, "waits for p0's own answer");
    m.flush(1, 0);
    m.flush(0, 1);
    assert_eq!(m.result(1, t1), Some(Ok(Held { fencing: 2 })));
}

#[test]
fn a_peer_that_connects_during_a_request_is_asked_too() {
    let mut m = Mesh::new(3, Policy::Available);
    m.cut(0, 2);
    let t = ticket(&m.acquire(0, "doc"));
    m.flush(0, 1);
    m.flush(1, 0);
    assert_eq!(
        m.result(0, t),
        Some(Ok(Held { fencing: 1 })),
        "p2 not connected: not asked"
    );
    let t = ticket(&m.acquire(0, "other"));
    m.heal(0, 2);
    assert!(matches!(
        m.in_flight(0, 2).as_slice(),
        [LockMsg::Holding { locks }, LockMsg::Request { .. }] if locks.len() == 1
    ));
    m.flush(0, 1);
    m.flush(1, 0);
    assert_eq!(m.result(0, t), None, "waits for the newcomer");
    m.deliver_all();
    assert_eq!(m.result(0, t), Some(Ok(Held { fencing: 1 })));
}

#[test]
fn an_abandoned_request_is_cancelled_and_a_late_win_is_not_leaked() {
    let mut m = Mesh::new(2, Policy::Available);
    let t = ticket(&m.acquire(0, "doc"));
    m.flush(0, 1); // p1 granted
    let now = m.t();
    let actions = m.cores[0].abandon(t, now);
    assert_eq!(
        actions,
        vec![Action::Send {
            to: peer(1),
            msg: LockMsg::Cancel {
                req: ReqId {
                    origin: peer(0),
                    seq: 1
                }
            }
        }]
    );
    m.apply(0, actions);
    m.deliver_all();
    assert_eq!(
        m.result(0, t),
        None,
        "no completion for an abandoned ticket"
    );
    assert!(!m.holds(0, "doc"));
    let t1 = ticket(&m.acquire(1, "doc"));
    m.deliver_all();
    assert_eq!(
        m.result(1, t1),
        Some(Ok(Held { fencing: 1 })),
        "no grant left behind"
    );
}

#[test]
fn holder_of_and_snapshot_report_ours_and_theirs() {
    let mut m = Mesh::new(2, Policy::Available);
    let t = ticket(&m.acquire(0, "a"));
    m.deliver_all();
    assert!(m.result(0, t).is_some_and(|r| r.is_ok()));
    m.advance(Duration::from_millis(10));
    let t = ticket(&m.acquire(1, "b"));
    m.deliver_all();
    assert!(m.result(1, t).is_some_and(|r| r.is_ok()));
    let at = m.t();
    assert_eq!(m.cores[0].holder_of(&path("a")), Some((peer(0), m.base)));
    assert_eq!(m.cores[0].holder_of(&path("b")), Some((peer(1), at)));
    assert_eq!(m.cores[0].holder_of(&path("c")), None);
    let wall = SystemTime::now();
    let rows = m.cores[0].snapshot(at + Duration::from_millis(5), wall);
    let summary: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.path.to_string(),
                r.holder,
                r.fencing,
                r.local_refs,
                r.lingering,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a".to_string(), peer(0), 1, 1, false),
            ("b".to_string(), peer(1), 1, 0, false)
        ]
    );
    assert_eq!(rows[0].since, wall - Duration::from_millis(15));
    assert_eq!(rows[1].since, wall - Duration::from_millis(5));
}

#[test]
fn hostile_or_confused_messages_change_nothing() {
    let me = peer(0);
    let (a, b, stranger) = (peer(1), peer(2), peer(9));
    let now = Instant::now();
    let mut core = LockCore::new(me, cfg(Policy::Available));
    let _ = core.peer_connected(a, now);
    let _ = core.peer_connected(b, now);
    let doc = path("doc");
    // A request relayed or claiming someone else's identity is refused outright.
    for (req, hops) in [
        (ReqId { origin: b, seq: 1 }, 0),
        (ReqId { origin: a, seq: 1 }, 1),
    ] {
        let out = core.on_message(
            a,
            LockMsg::Request {
                req,
                path: doc.clone(),
                lamport: 1,
                hops,
            },
            now,
        );
        assert_eq!(
            out,
            vec![Action::Send {
                to: a,
                msg: LockMsg::Deny { req, holder: me }
            }]
        );
    }
    // An absurd clock is refused too, and does not move ours.
    let req = ReqId { origin: a, seq: 2 };
    let out = core.on_message(
        a,
        LockMsg::Request {
            req,
            path: doc.clone(),
            lamport: u64::MAX,
            hops: 0,
        },
        now,
    );
    assert_eq!(
        out,
        vec![Action::Send {
            to: a,
            msg: LockMsg::Deny { req, holder: me }
        }]
    );
    // Answers to requests we never made, forged Acquired/Cancel, strangers: ignored.
    let ours = ReqId {
        origin: me,
        seq: 42,
    };
    let theirs = ReqId { origin: b, seq: 1 };
    for (from, msg) in [
        (
            a,
            LockMsg::Grant {
                req: ours,
                fencing: 9,
            },
        ),
        (
            a,
            LockMsg::Deny {
                req: ours,
                holder: a,
            },
        ),
        (
            a,
            LockMsg::Acquired {
                req: theirs,
                path: doc.clone(),
                fencing: 9,
            },
        ),
        (a, LockMsg::Cancel { req: theirs }),
        (
            stranger,
            LockMsg::Holding {
                locks: vec![(doc.clone(), 5)],
            },
        ),
        (
            stranger,
            LockMsg::Acquired {
                req: ReqId {
                    origin: stranger,
                    seq: 1,
                },
                path: doc.clone(),
                fencing: 5,
            },
        ),
    ] {
        assert_eq!(core.on_message(from, msg, now), vec![]);
    }
    assert_eq!(core.holder_of(&doc), None);
    // A duplicate answer cannot count twice; a peer connecting meanwhile is waited for.
    let start = core.acquire(&doc, now);
    let t = ticket(&start);
    assert!(
        matches!(&start, AcquireStart::Pending { actions, .. }
            if matches!(&actions[0], Action::Send { msg: LockMsg::Request { lamport: 1, .. }, .. })),
        "our clock was not moved by the absurd request: {start:?}"
    );
    let req = ReqId { origin: me, seq: 1 };
    assert_eq!(
        core.on_message(a, LockMsg::Grant { req, fencing: 0 }, now),
        vec![]
    );
    assert_eq!(
        core.on_message(a, LockMsg::Grant { req, fencing: 0 }, now),
        vec![]
    );
    let _ = core.peer_connected(peer(3), now);
    let out = core.on_message(b, LockMsg::Grant { req, fencing: 0 }, now);
    assert!(
        out.is_empty(),
        "peer(3) was asked on connect and has not answered: {out:?}"
    );
    let out = core.on_message(peer(3), LockMsg::Grant { req, fencing: 7 }, now);
    assert!(out.contains(&Action::Complete {
        request: t,
        result: Ok(Held { fencing: 8 })
    }));
    // Release of a name we never held, and a stray release, do nothing.
    assert_eq!(core.release(&path("never"), now), vec![]);
}

#[test]
fn the_sim_harness_itself_sees_a_plain_handover() {
    // Sanity check of the harness used by the random tests.
    let mut sim = Sim::new(3, cfg(Policy::Available), Net::default(), 1);
    assert_eq!(sim.acquire(0, &path("doc")), None);
    sim.settle(50);
    assert_eq!(sim.holders(&path("doc")), vec![0]);
    assert!(sim.release(0, &path("doc")));
    sim.settle(100);
    assert_eq!(sim.holders(&path("doc")), Vec::<usize>::new());
    sim.acquire(2, &path("doc"));
    sim.settle(50);
    assert_eq!(sim.holders(&path("doc")), vec![2]);
    assert_eq!(
        sim.holdings.iter().map(|h| h.fencing).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[test]
fn a_granted_request_is_a_claim_on_its_folder_before_its_acquired_arrives() {
    let mut m = Mesh::new(2, Policy::Available);
    let start = m.acquire(0, "proj/doc.docx");
    let t = ticket(&start);
    // B grants; A's acquire succeeds; A's Acquired is still in flight to B.
    m.flush(0, 1);
    m.flush(1, 0);
    assert_eq!(m.result(0, t), Some(Ok(Held { fencing: 1 })));
    assert_eq!(m.cores[1].holder_of(&path("proj/doc.docx")), None);
    for dir in ["proj", "proj/doc.docx"] {
        assert_eq!(m.cores[1].claim_below(&path(dir)), Some(peer(0)), "{dir}");
    }
    assert_eq!(m.cores[1].claim_below(&path("other")), None);
    assert_eq!(
        m.cores[1].claim_below(&path("pro")),
        None,
        "a prefix is not a folder"
    );
    // Once known as held, still a claim; once released, none.
    m.deliver_all();
    assert_eq!(m.cores[1].claim_below(&path("proj")), Some(peer(0)));
    assert_eq!(
        m.cores[0].claim_below(&path("proj")),
        None,
        "our own lock is no claim"
    );
    m.release(0, "proj/doc.docx");
    m.advance(Duration::from_millis(60));
    m.deliver_all();
    assert_eq!(m.cores[1].claim_below(&path("proj")), None);
}
