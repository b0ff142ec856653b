//! The sans-IO lock table and mesh protocol: owns what this peer holds, what it knows other
//! peers hold or have asked for, and its own pending requests. It has no clock, no thread and
//! no socket: callers pass the time in and carry out the returned [`Action`]s in order, so the
//! whole protocol runs deterministically in tests. [`crate::LockService`] is the tokio driver.
//!
//! The protocol and the argument for mutual exclusion are in the crate documentation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use peerfs_proto::msg::{LockMsg, ReqId};
use peerfs_proto::{PeerId, RelPath};

use crate::{LockConfig, LockError, Policy};

/// Identifies one local acquire call until its [`Action::Complete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// A lock obtained by a local acquire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// The holding's fencing token: larger than that of every earlier holding of the name that
    /// this peer or any peer it asked knew of. All local handles sharing one holding (refcount,
    /// linger revival) see the same token.
    pub fencing: u64,
}

/// What the caller must do after an input, in this order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `msg` to `to` over its connection. Messages to one peer must leave in the order
    /// they are returned: the protocol relies on per-connection FIFO.
    Send { to: PeerId, msg: LockMsg },
    /// The local acquire `request` is settled.
    Complete {
        request: Ticket,
        result: Result<Held, LockError>,
    },
}

/// What a local acquire did at once.
#[derive(Debug, PartialEq, Eq)]
pub enum AcquireStart {
    /// Settled without a round trip: the name was already ours (refcount or linger revival),
    /// no peer had to be asked, a holder is known, or the policy refused.
    Done(Result<Held, LockError>),
    /// Settles later with an [`Action::Complete`] for `ticket` (at the latest at the request
    /// deadline, when [`LockCore::tick`] is called); `actions` are the requests to send.
    Pending {
        ticket: Ticket,
        actions: Vec<Action>,
    },
}

/// One row of `peerfs locks`: a name and who holds it, as this peer knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockInfo {
    pub path: RelPath,
    /// The holder; this peer's own id for its own locks.
    pub holder: PeerId,
    /// When the holding started (for remote holders: when this peer learnt of it).
    pub since: SystemTime,
    pub fencing: u64,
    /// Local handles using the lock (0 for remote holders and for a lingering lock).
    pub local_refs: u32,
    /// Our lock, no handle left, kept for the linger period.
    pub lingering: bool,
    /// A remote holder that is disconnected: its lock is forgotten after this much longer.
    pub grace_left: Option<Duration>,
}

/// Our own holding of a name.
#[derive(Debug)]
struct LocalHold {
    refs: u32,
    fencing: u64,
    since: Instant,
    /// Set while lingering (refs == 0): when the lock is released to the peers.
    linger_until: Option<Instant>,
}

/// A peer's answer to one of our requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Waiting,
    Granted(u64),
    Denied(PeerId),
    /// Disconnected before answering (policy `available`; `strict` fails the request at once).
    Gone,
}

/// Another peer's request whose answer we hold back while our own request has priority.
#[derive(Debug)]
struct Deferred {
    from: PeerId,
    req: ReqId,
    lamport: u64,
}

/// Our own request for a name, from its first local acquire until it is settled.
#[derive(Debug)]
struct OwnRequest {
    seq: u64,
    lamport: u64,
    deadline: Instant,
    /// Every peer asked; peers that connect while it is pending are asked too.
    answers: BTreeMap<PeerId, Answer>,
    /// Local acquires waiting on it (several write-opens of one name share one request).
    waiters: Vec<Ticket>,
    deferred: Vec<Deferred>,
}

/// What we know another peer holds.
#[derive(Debug)]
struct RemoteHold {
    fencing: u64,
    since: Instant,
    /// Set while the holder is disconnected: the end of its grace period.
    expires: Option<Instant>,
}

/// Another peer's request that we answered with anything but "we hold it" (a grant, or a deny
/// naming a third peer) and that it has not settled yet (no Acquired, no Cancel). It ranks
/// before any request of ours made since (Lamport), and before our request pending when it
/// came (else we would have deferred it), so it is a claim against ours: see `judge`.
#[derive(Debug)]
struct Answered {
    path: RelPath,
    lamport: u64,
    /// Set while the requester is disconnected: the end of its grace period.
    expires: Option<Instant>,
}

/// How an own request stands.
#[derive(Debug)]
enum Verdict {
    Wait,
    Win,
    Lose(LockError),
}

/// Largest `lamport` accepted in a request. Honest clocks grow by one per request seen; a
/// value near `u64::MAX` can only come from a broken or hostile peer, and taking it would
/// saturate our clock and with it the ordering every request relies on.
const MAX_LAMPORT: u64 = 1 << 62;

/// Priority of a request: lower wins.
fn prio(lamport: u64, origin: PeerId) -> (u64, PeerId) {
    (lamport, origin)
}

/// The lock state machine of one peer. See the crate documentation for the protocol.
#[derive(Debug)]
pub struct LockCore {
    me: PeerId,
    cfg: LockConfig,
    /// Lamport clock: requests carry `++clock`; every received request raises it.
    clock: u64,
    next_seq: u64,
    next_ticket: u64,
    connected: BTreeSet<PeerId>,
    /// Every peer we should hear from: configured ones and every one that ever connected
    /// (policy `strict` refuses while one of them is not connected).
    known: BTreeSet<PeerId>,
    // Ordered maps throughout: iteration order decides the order of actions, and tests replay
    // schedules deterministically.
    local: BTreeMap<RelPath, LocalHold>,
    pending: BTreeMap<RelPath, OwnRequest>,
    remote: BTreeMap<RelPath, BTreeMap<PeerId, RemoteHold>>,
    answered: BTreeMap<ReqId, Answered>,
    /// Largest fencing token seen per name. Kept after the lock goes away so the next holder's
    /// token is larger; one u64 per name ever locked.
    fencing: BTreeMap<RelPath, u64>,
}

impl LockCore {
    /// A peer `me` that knows no other peer yet. `cfg.grace` is clamped to
    /// [`crate::MAX_GRACE`] (use [`LockConfig::validate`] to report it instead).
    pub fn new(me: PeerId, cfg: LockConfig) -> LockCore {
        if cfg.validate().is_err() {
            tracing::warn!(?cfg, "lock config out of range; clamped");
        }
        LockCore {
            me,
            cfg: cfg.clamped(),
            clock: 0,
            next_seq: 1,
            next_ticket: 1,
            connected: BTreeSet::new(),
            known: BTreeSet::new(),
            local: BTreeMap::new(),
            pending: BTreeMap::new(),
            remote: BTreeMap::new(),
            answered: BTreeMap::new(),
            fencing: BTreeMap::new(),
        }
    }

    /// This peer's id.
    pub fn me(&self) -> PeerId {
        self.me
    }

    /// The configuration in force (after clamping).
    pub fn config(&self) -> &LockConfig {
        &self.cfg
    }

    /// Declares a configured peer before it ever connects, so that policy `strict` refuses
    /// locks while it is unreachable. (Peers that connect are added automatically.)
    pub fn add_peer(&mut self, peer: PeerId) {
        if peer != self.me {
            self.known.insert(peer);
        }
    }

    /// Starts a local acquire of `path` for one write handle.
    pub fn acquire(&mut self, path: &RelPath, now: Instant) -> AcquireStart {
        // Our own lock, in use or lingering: one more handle, no round trip. Reviving a
        // lingering lock is what keeps other offices out of an office suite's save gap.
        if let Some(h) = self.local.get_mut(path) {
            h.refs += 1;
            h.linger_until = None;
            return AcquireStart::Done(Ok(Held { fencing: h.fencing }));
        }
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        if let Some(req) = self.pending.get_mut(path) {
            req.waiters.push(ticket);
            return AcquireStart::Pending {
                ticket,
                actions: Vec::new(),
            };
        }
        // A holder we know of (connected, or disconnected within its grace): fail at once, as
        // a write-open of a file in use must.
        if let Some(holder) = self.remote_holder(path) {
            return AcquireStart::Done(Err(LockError::HeldBy { peer: holder }));
        }
        if self.cfg.policy == Policy::Strict {
            if let Some(peer) = self.known.difference(&self.connected).next() {
                return AcquireStart::Done(Err(LockError::Unreachable { peer: *peer }));
            }
        }
        // Saturating: peers cannot push it near the top (MAX_LAMPORT).
        self.clock = self.clock.saturating_add(1);
        let req = OwnRequest {
            seq: self.next_seq,
            lamport: self.clock,
            deadline: now + self.cfg.request_timeout,
            answers: self
                .connected
                .iter()
                .map(|p| (*p, Answer::Waiting))
                .collect(),
            waiters: vec![ticket],
            deferred: Vec::new(),
        };
        self.next_seq += 1;
        match self.judge(path, &req, false) {
            Verdict::Wait => {
                let msg = LockMsg::Request {
                    req: ReqId {
                        origin: self.me,
                        seq: req.seq,
                    },
                    path: path.clone(),
                    lamport: req.lamport,
                    hops: 0,
                };
                let actions = self
                    .connected
                    .iter()
                    .map(|p| Action::Send {
                        to: *p,
                        msg: msg.clone(),
                    })
                    .collect();
                self.pending.insert(path.clone(), req);
                AcquireStart::Pending { ticket, actions }
            }
            // Decided before anything was sent: no peer is connected (else their answers
            // would be awaited), so there is no one to tell and nothing deferred.
            Verdict::Win => {
                let fencing = self.known_fencing(path).saturating_add(1);
                self.fencing.insert(path.clone(), fencing);
                self.local.insert(
                    path.clone(),
                    LocalHold {
                        refs: 1,
                        fencing,
                        since: now,
                        linger_until: None,
                    },
                );
                AcquireStart::Done(Ok(Held { fencing }))
            }
            Verdict::Lose(e) => AcquireStart::Done(Err(e)),
        }
    }

    /// Releases one local handle's use of `path`. The lock lingers after the last one.
    pub fn release(&mut self, path: &RelPath, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(h) = self.local.get_mut(path) else {
            tracing::warn!(%path, "release of a lock this peer does not hold");
            return out;
        };
        if h.refs == 0 {
            tracing::warn!(%path, "release of a lingering lock with no handle");
            return out;
        }
        h.refs -= 1;
        if h.refs == 0 {
            if self.cfg.linger.is_zero() {
                self.drop_local(path, &mut out);
            } else {
                h.linger_until = Some(now + self.cfg.linger);
            }
        }
        out
    }

    /// Gives up on a pending local acquire (its caller stopped waiting). No
    /// [`Action::Complete`] follows for it; if it was the request's last waiter the request is
    /// cancelled.
    pub fn abandon(&mut self, ticket: Ticket, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(path) = self
            .pending
            .iter()
            .find(|(_, r)| r.waiters.contains(&ticket))
            .map(|(p, _)| p.clone())
        else {
            return out;
        };
        let now_empty = match self.pending.get_mut(&path) {
            Some(req) => {
                req.waiters.retain(|t| *t != ticket);
                req.waiters.is_empty()
            }
            None => false,
        };
        if now_empty {
            self.settle(&path, Verdict::Lose(LockError::Timeout), now, &mut out);
        }
        out
    }

    /// A connection to `peer` is established (after its Hello): it gets our `Holding` first,
    /// then every request of ours still pending. A second call for a connected peer means
    /// the connection was replaced: what was in flight on the old one is treated as lost.
    pub fn peer_connected(&mut self, peer: PeerId, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if peer == self.me {
            return out;
        }
        if self.connected.contains(&peer) {
            out.extend(self.peer_disconnected(peer, now));
        }
        self.connected.insert(peer);
        self.known.insert(peer);
        // While connected, its locks and requests we know of do not expire; its Holding
        // replaces them.
        for holders in self.remote.values_mut() {
            if let Some(h) = holders.get_mut(&peer) {
                h.expires = None;
            }
        }
        for (id, g) in self.answered.iter_mut() {
            if id.origin == peer {
                g.expires = None;
            }
        }
        let locks = self
            .local
            .iter()
            .map(|(p, h)| (p.clone(), h.fencing))
            .collect();
        out.push(Action::Send {
            to: peer,
            msg: LockMsg::Holding { locks },
        });
        for (path, req) in self.pending.iter_mut() {
            // Ask afresh even if it answered on an earlier connection: our Holding makes it
            // forget our requests.
            req.answers.insert(peer, Answer::Waiting);
            out.push(Action::Send {
                to: peer,
                msg: LockMsg::Request {
                    req: ReqId {
                        origin: self.me,
                        seq: req.seq,
                    },
                    path: path.clone(),
                    lamport: req.lamport,
                    hops: 0,
                },
            });
        }
        out
    }

    /// The connection to `peer` is gone. Its locks and its requests we answered become leases
    /// that expire after the grace period unless it reconnects first.
    pub fn peer_disconnected(&mut self, peer: PeerId, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.connected.remove(&peer) {
            return out;
        }
        let grace_end = now + self.cfg.grace;
        for holders in self.remote.values_mut() {
            if let Some(h) = holders.get_mut(&peer) {
                h.expires.get_or_insert(grace_end);
            }
        }
        for (id, g) in self.answered.iter_mut() {
            if id.origin == peer {
                g.expires.get_or_insert(grace_end);
            }
        }
        let paths: Vec<RelPath> = self.pending.keys().cloned().collect();
        for path in paths {
            let Some(req) = self.pending.get_mut(&path) else {
                continue;
            };
            // Its requests cannot be answered any more; it treats us as gone.
            req.deferred.retain(|d| d.from != peer);
            if req.answers.get(&peer) == Some(&Answer::Waiting) {
                req.answers.insert(peer, Answer::Gone);
                if self.cfg.policy == Policy::Strict {
                    self.settle(
                        &path,
                        Verdict::Lose(LockError::Unreachable { peer }),
                        now,
                        &mut out,
                    );
                    continue;
                }
            }
            self.rejudge(&path, now, &mut out);
        }
        out
    }

    /// A lock message from `from`. Everything in it is untrusted: unknown requests, answers
    /// from peers that were not asked and identities that do not match the connection are
    /// ignored (or refused), never trusted.
    pub fn on_message(&mut self, from: PeerId, msg: LockMsg, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.connected.contains(&from) {
            tracing::debug!(peer = ?from, "lock message from a peer that is not connected; ignored");
            return out;
        }
        match msg {
            LockMsg::Request {
                req,
                path,
                lamport,
                hops,
            } => {
                if hops != 0 || req.origin != from || lamport > MAX_LAMPORT {
                    // Relays come with the reconciliation issue. Until then, a request on
                    // someone else's behalf (or with an absurd clock) is refused outright:
                    // ignoring it would let the requester time out and, under `available`,
                    // proceed without us.
                    tracing::warn!(peer = ?from, ?req, hops, lamport, "lock request refused");
                    out.push(Action::Send {
                        to: from,
                        msg: LockMsg::Deny {
                            req,
                            holder: self.me,
                        },
                    });
                    return out;
                }
                self.clock = self.clock.max(lamport);
                if let Some(reply) = self.answer(from, req, &path, lamport) {
                    out.push(Action::Send {
                        to: from,
                        msg: reply,
                    });
                }
            }
            LockMsg::Grant { req, fencing } => {
                self.record_answer(from, req, Answer::Granted(fencing), now, &mut out);
            }
            LockMsg::Deny { req, holder } => {
                self.record_answer(from, req, Answer::Denied(holder), now, &mut out);
            }
            LockMsg::Acquired { req, path, fencing } => {
                if req.origin != from {
                    tracing::warn!(peer = ?from, ?req, "Acquired for another peer's request; ignored");
                    return out;
                }
                self.answered.remove(&req);
                if let Some(own) = self.pending.get_mut(&path) {
                    // It won without our answer (its timeout, policy `available`).
                    own.deferred.retain(|d| d.req != req);
                }
                self.note_remote(&path, from, fencing, now);
                self.rejudge(&path, now, &mut out);
            }
            LockMsg::Cancel { req } => {
                if req.origin != from {
                    tracing::warn!(peer = ?from, ?req, "Cancel of another peer's request; ignored");
                    return out;
                }
                let answered = self.answered.remove(&req).map(|a| a.path);
                for own in self.pending.values_mut() {
                    own.deferred.retain(|d| d.req != req);
                }
                if let Some(path) = answered {
                    self.rejudge(&path, now, &mut out);
                }
            }
            LockMsg::Release { path, fencing } => {
                self.note_fencing(&path, fencing);
                self.forget_remote(&path, from);
                self.rejudge(&path, now, &mut out);
            }
            LockMsg::Holding { locks } => {
                // Replaces all we knew of this peer: a restarted peer sends none, dropping
                // the locks and requests of its previous life at once.
                let mut touched: BTreeSet<RelPath> = BTreeSet::new();
                for (path, holders) in self.remote.iter_mut() {
                    if holders.remove(&from).is_some() {
                        touched.insert(path.clone());
                    }
                }
                self.remote.retain(|_, holders| !holders.is_empty());
                self.answered.retain(|id, g| {
                    if id.origin == from {
                        touched.insert(g.path.clone());
                        false
                    } else {
                        true
                    }
                });
                for (path, fencing) in locks {
                    self.note_remote(&path, from, fencing, now);
                    touched.insert(path);
                }
                for path in touched {
                    self.rejudge(&path, now, &mut out);
                }
            }
        }
        out
    }

    /// Timers: request deadlines, linger ends, grace ends. Call it at (or after)
    /// [`LockCore::next_deadline`].
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let due: Vec<RelPath> = self
            .pending
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for path in due {
            if let Some(req) = self.pending.get(&path) {
                let verdict = self.judge(&path, req, true);
                self.settle(&path, verdict, now, &mut out);
            }
        }
        let lingered: Vec<RelPath> = self
            .local
            .iter()
            .filter(|(_, h)| h.refs == 0 && h.linger_until.is_some_and(|t| t <= now))
            .map(|(p, _)| p.clone())
            .collect();
        for path in lingered {
            self.drop_local(&path, &mut out);
        }
        let mut expired = false;
        for holders in self.remote.values_mut() {
            holders.retain(|_, h| {
                let keep = h.expires.is_none_or(|t| t > now);
                expired |= !keep;
                keep
            });
        }
        self.remote.retain(|_, holders| !holders.is_empty());
        self.answered.retain(|_, g| {
            let keep = g.expires.is_none_or(|t| t > now);
            expired |= !keep;
            keep
        });
        if expired {
            let paths: Vec<RelPath> = self.pending.keys().cloned().collect();
            for path in paths {
                self.rejudge(&path, now, &mut out);
            }
        }
        out
    }

    /// The earliest time at which [`LockCore::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let requests = self.pending.values().map(|r| r.deadline);
        let lingers = self.local.values().filter_map(|h| h.linger_until);
        let holds = self
            .remote
            .values()
            .flat_map(|hs| hs.values().filter_map(|h| h.expires));
        let answered = self.answered.values().filter_map(|a| a.expires);
        requests.chain(lingers).chain(holds).chain(answered).min()
    }

    /// Who holds `path` as far as this peer knows, and since when (this peer itself for its
    /// own locks, lingering included).
    pub fn holder_of(&self, path: &RelPath) -> Option<(PeerId, Instant)> {
        if let Some(h) = self.local.get(path) {
            return Some((self.me, h.since));
        }
        self.remote
            .get(path)?
            .iter()
            .min_by_key(|(id, h)| (h.since, **id))
            .map(|(id, h)| (*id, h.since))
    }

    /// Records that `from` holds `path` with `fencing` (from its Acquired or Holding).
    fn note_remote(&mut self, path: &RelPath, from: PeerId, fencing: u64, now: Instant) {
        if self.local.contains_key(path) {
            tracing::warn!(%path, peer = ?from, "peer holds a name we hold (they could not reach us)");
        }
        self.note_fencing(path, fencing);
        self.remote.entry(path.clone()).or_default().insert(
            from,
            RemoteHold {
                fencing,
                since: now,
                expires: None,
            },
        );
    }

    /// Another peer with a claim on `dir` or on any path below it: a holder we know of, or a
    /// requester we granted (or answered) and that has not settled yet — its write-open may
    /// already have succeeded before its `Acquired` reaches us. The empty path (the root)
    /// covers everything. Used to refuse moving or removing a folder with a locked document
    /// inside.
    pub fn claim_below(&self, dir: &RelPath) -> Option<PeerId> {
        let below = |p: &RelPath| {
            let (p, d) = (p.as_bytes(), dir.as_bytes());
            d.is_empty() || p == d || (p.starts_with(d) && p.get(d.len()) == Some(&b'/'))
        };
        let held = self
            .remote
            .iter()
            .filter(|(path, _)| below(path))
            .flat_map(|(_, holders)| holders.keys())
            .find(|peer| **peer != self.me)
            .copied();
        held.or_else(|| {
            self.answered
                .iter()
                .find(|(id, a)| id.origin != self.me && below(&a.path))
                .map(|(id, _)| id.origin)
        })
    }

    /// Every lock this peer knows of, ours and others', sorted by path. `now` and `wall` are
    /// the same moment on the monotonic and the wall clock.
    pub fn snapshot(&self, now: Instant, wall: SystemTime) -> Vec<LockInfo> {
        let wall_of = |t: Instant| {
            wall.checked_sub(now.saturating_duration_since(t))
                .unwrap_or(wall)
        };
        let mut rows: Vec<LockInfo> = self
            .local
            .iter()
            .map(|(path, h)| LockInfo {
                path: path.clone(),
                holder: self.me,
                since: wall_of(h.since),
                fencing: h.fencing,
                local_refs: h.refs,
                lingering: h.refs == 0,
                grace_left: None,
            })
            .collect();
        for (path, holders) in &self.remote {
            for (id, h) in holders {
                rows.push(LockInfo {
                    path: path.clone(),
                    holder: *id,
                    since: wall_of(h.since),
                    fencing: h.fencing,
                    local_refs: 0,
                    lingering: false,
                    grace_left: h.expires.map(|t| t.saturating_duration_since(now)),
                });
            }
        }
        rows.sort_by(|a, b| (&a.path, a.holder).cmp(&(&b.path, b.holder)));
        rows
    }

    /// The answer to another peer's request, or None when it is deferred. The order of the
    /// rules matters: see "Answering a request" in the crate documentation.
    fn answer(
        &mut self,
        from: PeerId,
        req: ReqId,
        path: &RelPath,
        lamport: u64,
    ) -> Option<LockMsg> {
        let deny = |holder| Some(LockMsg::Deny { req, holder });
        // 1. We hold it (lingering included): final answer.
        if self.local.contains_key(path) {
            return deny(self.me);
        }
        // 2. Our own pending request has priority: answer when it is settled. This comes
        //    before any third-party knowledge: naming someone else instead would let the
        //    requester win on that peer's word while we still compete.
        if let Some(own) = self.pending.get_mut(path) {
            if prio(own.lamport, self.me) < prio(lamport, req.origin) {
                own.deferred.push(Deferred { from, req, lamport });
                return None;
            }
        }
        // The requester asks, so it holds nothing here and has settled its earlier requests
        // (its Release / Cancel / Acquired came first on the same connection): anything else
        // we recorded about it for this name is stale.
        if let Some(holders) = self.remote.get_mut(path) {
            holders.remove(&req.origin);
            if holders.is_empty() {
                self.remote.remove(path);
            }
        }
        self.answered
            .retain(|id, a| !(id.origin == req.origin && a.path == *path && *id != req));
        // 3. Someone else holds it as far as we know: say who. The requester only accepts
        //    this if that peer does not contradict it (see `judge`).
        // 4. Else, we answered a request of someone else that is not settled: name that peer
        //    (the first by priority). It decides — it defers or grants by priority — so this
        //    never makes two racers lose, and a requester that cannot reach it fails instead
        //    of winning blindly.
        // 5. Else grant.
        let reply = match self.remote_holder(path).or_else(|| {
            self.answered
                .iter()
                .filter(|(id, a)| a.path == *path && id.origin != req.origin)
                .min_by_key(|(id, a)| prio(a.lamport, id.origin))
                .map(|(id, _)| id.origin)
        }) {
            Some(holder) => LockMsg::Deny { req, holder },
            None => LockMsg::Grant {
                req,
                fencing: self.known_fencing(path),
            },
        };
        // Whatever we said, the request now counts against our own later requests for the
        // name until its origin settles it (its Cancel reaches every peer that did not deny
        // in its own name).
        self.answered.insert(
            req,
            Answered {
                path: path.clone(),
                lamport,
                expires: None,
            },
        );
        Some(reply)
    }

    /// Records `from`'s answer to our request `req`, then settles it if that decides it.
    fn record_answer(
        &mut self,
        from: PeerId,
        req: ReqId,
        answer: Answer,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if req.origin != self.me {
            return;
        }
        let Some(path) = self
            .pending
            .iter()
            .find(|(_, r)| r.seq == req.seq)
            .map(|(p, _)| p.clone())
        else {
            // Late answer to a settled request.
            return;
        };
        let Some(own) = self.pending.get_mut(&path) else {
            return;
        };
        match own.answers.get_mut(&from) {
            Some(slot @ Answer::Waiting) => *slot = answer,
            // Not asked, or answered already: a duplicate or a peer making things up.
            _ => return,
        }
        self.rejudge(&path, now, out);
    }

    /// How our request `req` for `path` stands. At the deadline it never waits.
    ///
    /// A `Deny` names a holder. When the holder itself says so, the request has lost. When
    /// a third party says so (from an Acquired/Holding it saw, or from a request it answered),
    /// the named peer decides: if it answered us anything else, the claim is stale or that
    /// peer's competing request lost or ranks after ours, and is overruled; if it has not
    /// answered yet, we wait for it; if we cannot ask it (or it is silent at the deadline),
    /// the claim stands. Our own knowledge — holders we know, requests we answered that are
    /// not settled — counts as the same kind of claim.
    fn judge(&self, path: &RelPath, req: &OwnRequest, at_deadline: bool) -> Verdict {
        let mut claims: Vec<PeerId> = Vec::new();
        for (peer, answer) in &req.answers {
            if let Answer::Denied(holder) = answer {
                if holder == peer {
                    return Verdict::Lose(LockError::HeldBy { peer: *holder });
                }
                claims.push(*holder);
            }
        }
        if let Some(holders) = self.remote.get(path) {
            claims.extend(holders.keys().copied());
        }
        claims.extend(
            self.answered
                .iter()
                .filter(|(_, g)| g.path == *path)
                .map(|(id, _)| id.origin),
        );
        let mut undecided = false;
        for holder in claims {
            if holder == self.me {
                // Someone thinks we hold it: stale, we know better.
                continue;
            }
            match req.answers.get(&holder) {
                Some(Answer::Granted(_) | Answer::Denied(_)) => {} // overruled
                Some(Answer::Waiting) if !at_deadline => undecided = true,
                Some(Answer::Waiting | Answer::Gone) | None => {
                    return Verdict::Lose(LockError::HeldBy { peer: holder });
                }
            }
        }
        if undecided {
            return Verdict::Wait;
        }
        let silent = req
            .answers
            .iter()
            .find(|(_, a)| **a == Answer::Waiting)
            .map(|(p, _)| *p);
        match silent {
            None => Verdict::Win,
            Some(_) if !at_deadline => Verdict::Wait,
            Some(peer) => match self.cfg.policy {
                Policy::Strict => Verdict::Lose(LockError::Unreachable { peer }),
                Policy::Available => Verdict::Win,
            },
        }
    }

    /// Judges our pending request for `path` (if any) and settles it if decided.
    fn rejudge(&mut self, path: &RelPath, now: Instant, out: &mut Vec<Action>) {
        let Some(req) = self.pending.get(path) else {
            return;
        };
        let verdict = self.judge(path, req, false);
        if !matches!(verdict, Verdict::Wait) {
            self.settle(path, verdict, now, out);
        }
    }

    /// Ends our pending request for `path` with `verdict` (Win or Lose).
    fn settle(&mut self, path: &RelPath, verdict: Verdict, now: Instant, out: &mut Vec<Action>) {
        let Some(req) = self.pending.remove(path) else {
            return;
        };
        let id = ReqId {
            origin: self.me,
            seq: req.seq,
        };
        match verdict {
            Verdict::Wait => {
                // Not a settlement; put it back untouched.
                self.pending.insert(path.clone(), req);
            }
            Verdict::Win => {
                let granted = req.answers.values().filter_map(|a| match a {
                    Answer::Granted(f) => Some(*f),
                    _ => None,
                });
                // Saturating: tokens come from peers.
                let fencing = granted
                    .fold(self.known_fencing(path), u64::max)
                    .saturating_add(1);
                self.fencing.insert(path.clone(), fencing);
                let refs = u32::try_from(req.waiters.len()).unwrap_or(u32::MAX);
                self.local.insert(
                    path.clone(),
                    LocalHold {
                        refs,
                        fencing,
                        since: now,
                        // Every waiter gave up meanwhile: keep it only for the linger.
                        linger_until: (refs == 0).then_some(now + self.cfg.linger),
                    },
                );
                for peer in &self.connected {
                    out.push(Action::Send {
                        to: *peer,
                        msg: LockMsg::Acquired {
                            req: id,
                            path: path.clone(),
                            fencing,
                        },
                    });
                }
                for d in req.deferred {
                    out.push(Action::Send {
                        to: d.from,
                        msg: LockMsg::Deny {
                            req: d.req,
                            holder: self.me,
                        },
                    });
                }
                for t in req.waiters {
                    out.push(Action::Complete {
                        request: t,
                        result: Ok(Held { fencing }),
                    });
                }
            }
            Verdict::Lose(err) => {
                // Every peer that may have recorded the request (all but those that denied
                // in their own name) must forget it: a record left behind would block the
                // name. Peers still deferring it drop it too.
                for (peer, answer) in &req.answers {
                    let final_deny = *answer == Answer::Denied(*peer);
                    if !final_deny && *answer != Answer::Gone && self.connected.contains(peer) {
                        out.push(Action::Send {
                            to: *peer,
                            msg: LockMsg::Cancel { req: id },
                        });
                    }
                }
                // What we held back for our own request is answered afresh now.
                for d in req.deferred {
                    if let Some(reply) = self.answer(d.from, d.req, path, d.lamport) {
                        out.push(Action::Send {
                            to: d.from,
                            msg: reply,
                        });
                    }
                }
                for t in req.waiters {
                    out.push(Action::Complete {
                        request: t,
                        result: Err(err.clone()),
                    });
                }
            }
        }
    }

    /// Ends our holding of `path` and tells the connected peers.
    fn drop_local(&mut self, path: &RelPath, out: &mut Vec<Action>) {
        let Some(h) = self.local.remove(path) else {
            return;
        };
        for peer in &self.connected {
            out.push(Action::Send {
                to: *peer,
                msg: LockMsg::Release {
                    path: path.clone(),
                    fencing: h.fencing,
                },
            });
        }
    }

    fn forget_remote(&mut self, path: &RelPath, holder: PeerId) {
        if let Some(holders) = self.remote.get_mut(path) {
            holders.remove(&holder);
            if holders.is_empty() {
                self.remote.remove(path);
            }
        }
    }

    /// The remote holder of `path` we learnt of first.
    fn remote_holder(&self, path: &RelPath) -> Option<PeerId> {
        self.remote
            .get(path)?
            .iter()
            .min_by_key(|(id, h)| (h.since, **id))
            .map(|(id, _)| *id)
    }

    fn known_fencing(&self, path: &RelPath) -> u64 {
        self.fencing.get(path).copied().unwrap_or(0)
    }

    fn note_fencing(&mut self, path: &RelPath, fencing: u64) {
        let f = self.fencing.entry(path.clone()).or_insert(0);
        *f = (*f).max(fencing);
    }
}
