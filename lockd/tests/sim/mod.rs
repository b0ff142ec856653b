//! A deterministic in-process network for [`LockCore`]s: virtual milliseconds, one FIFO queue
//! per direction of each peer pair (the transport is one TLS connection per pair) with random
//! delays, so messages between different pairs reorder freely; links can be cut (in-flight
//! messages are lost, as with a dead connection), slowed past the request timeout, and peers
//! restarted with empty state. After every event the oracles run: mutual exclusion, fencing
//! order, every acquire settled by its deadline.

#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use peerfs_lockd::{AcquireStart, Action, LockConfig, LockCore, LockError, Policy, Ticket};
use peerfs_proto::msg::LockMsg;
use peerfs_proto::{PeerId, RelPath};

/// SplitMix64: small, seedable, good enough to pick delays and schedules.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

pub fn peer(i: usize) -> PeerId {
    // Distinct and ordered by index, so priority ties break towards lower indices.
    let mut id = [0u8; 32];
    id[0] = u8::try_from(i + 1).expect("few peers");
    PeerId(id)
}

pub fn path(name: &str) -> RelPath {
    RelPath::new(name.as_bytes()).expect("valid test path")
}

/// The names random schedules lock: few, so that requests collide.
pub const NAMES: [&str; 2] = ["report.docx", "budget.xlsx"];

/// Network timing (virtual milliseconds).
#[derive(Clone, Copy, Debug)]
pub struct Net {
    pub min_delay: u64,
    pub max_delay: u64,
    /// Delay of a message sent on a slowed link: longer than the request timeout.
    pub slow_delay: u64,
}

impl Default for Net {
    fn default() -> Net {
        Net {
            min_delay: 1,
            max_delay: 8,
            slow_delay: 250,
        }
    }
}

/// One holding streak of a name by a peer: from the win to the Release (linger included).
#[derive(Clone, Debug)]
pub struct Holding {
    pub peer: usize,
    pub name: RelPath,
    pub fencing: u64,
    /// When the request that led to it started.
    pub requested: u64,
    pub won: u64,
    pub ended: Option<u64>,
}

/// A settled local acquire.
#[derive(Clone, Debug)]
pub struct Settled {
    pub peer: usize,
    pub name: RelPath,
    pub started: u64,
    pub at: u64,
    pub result: Result<u64, LockError>,
}

struct InFlight {
    at: u64,
    msg: LockMsg,
}

pub struct SimPeer {
    pub id: PeerId,
    pub core: LockCore,
    /// Pending local acquires: name and start time.
    pub tickets: BTreeMap<Ticket, (RelPath, u64)>,
    /// Local write handles holding each name (what the caller must release).
    pub handles: BTreeMap<RelPath, u32>,
    /// The holding streak in progress per name (index into `Sim::holdings`).
    current: BTreeMap<RelPath, usize>,
    /// Start of the earliest acquire settled Ok during the current event, per name.
    won_request: BTreeMap<RelPath, u64>,
}

pub struct Sim {
    pub base: Instant,
    pub now: u64,
    pub cfg: LockConfig,
    pub net: Net,
    pub rng: Rng,
    pub peers: Vec<SimPeer>,
    up: BTreeMap<(usize, usize), bool>,
    slow_until: BTreeMap<(usize, usize), u64>,
    queues: BTreeMap<(usize, usize), VecDeque<InFlight>>,
    /// Per unordered pair: intervals during which the link was down, slow or restarted.
    impaired: BTreeMap<(usize, usize), Vec<(u64, u64)>>,
    restarts: Vec<Vec<u64>>,
    pub holdings: Vec<Holding>,
    pub settled: Vec<Settled>,
    pub messages: u64,
    pub log: Vec<String>,
    /// Whether `impaired` ever got an entry (cut, slow or restart).
    pub ever_impaired: bool,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    /// `n` peers, all connected at time 0, every one declared to every other.
    pub fn new(n: usize, cfg: LockConfig, net: Net, seed: u64) -> Sim {
        let base = Instant::now();
        let peers = (0..n)
            .map(|i| SimPeer {
                id: peer(i),
                core: Self::fresh_core(i, n, &cfg),
                tickets: BTreeMap::new(),
                handles: BTreeMap::new(),
                current: BTreeMap::new(),
                won_request: BTreeMap::new(),
            })
            .collect();
        let mut sim = Sim {
            base,
            now: 0,
            cfg,
            net,
            rng: Rng::new(seed),
            peers,
            up: BTreeMap::new(),
            slow_until: BTreeMap::new(),
            queues: BTreeMap::new(),
            impaired: BTreeMap::new(),
            restarts: vec![Vec::new(); n],
            holdings: Vec::new(),
            settled: Vec::new(),
            messages: 0,
            log: Vec::new(),
            ever_impaired: false,
        };
        for a in 0..n {
            for b in a + 1..n {
                sim.connect(a, b);
            }
        }
        sim
    }

    fn fresh_core(i: usize, n: usize, cfg: &LockConfig) -> LockCore {
        let mut core = LockCore::new(peer(i), cfg.clone());
        for j in (0..n).filter(|j| *j != i) {
            core.add_peer(peer(j));
        }
        core
    }

    pub fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn index_of(&self, id: PeerId) -> usize {
        self.peers
            .iter()
            .position(|p| p.id == id)
            .expect("message to a simulated peer")
    }

    pub fn is_up(&self, a: usize, b: usize) -> bool {
        self.up.get(&pair(a, b)).copied().unwrap_or(false)
    }

    fn note(&mut self, line: String) {
        self.log.push(format!("{:>6} {line}", self.now));
    }

    /// The last lines of the event log, for failure messages.
    pub fn trace(&self) -> String {
        let from = self.log.len().saturating_sub(150);
        self.log[from..].join("\n")
    }

    // ----- operations -------------------------------------------------------------------

    /// A local acquire on peer `i`. Returns its immediate outcome, if any.
    pub fn acquire(&mut self, i: usize, name: &RelPath) -> Option<Result<u64, LockError>> {
        let now = self.at(self.now);
        let start = self.peers[i].core.acquire(name, now);
        self.note(format!("p{i} acquire {name} -> {start:?}"));
        let immediate = match start {
            AcquireStart::Done(result) => {
                let result = result.map(|h| h.fencing);
                self.record_settled(i, name.clone(), self.now, result.clone());
                Some(result)
            }
            AcquireStart::Pending { ticket, actions } => {
                self.peers[i]
                    .tickets
                    .insert(ticket, (name.clone(), self.now));
                self.apply(i, actions);
                None
            }
        };
        self.check();
        immediate
    }

    /// Releases one of peer `i`'s handles on `name`, if it has one.
    pub fn release(&mut self, i: usize, name: &RelPath) -> bool {
        let Some(n) = self.peers[i].handles.get_mut(name).filter(|n| **n > 0) else {
            return false;
        };
        *n -= 1;
        let now = self.at(self.now);
        let actions = self.peers[i].core.release(name, now);
        self.note(format!("p{i} release {name}"));
        self.apply(i, actions);
        self.check();
        true
    }

    /// Cuts the link between `a` and `b`: both sides see the disconnect now, and whatever was
    /// in flight is lost.
    pub fn disconnect(&mut self, a: usize, b: usize) {
        if a == b || !self.is_up(a, b) {
            return;
        }
        self.note(format!("cut p{a}-p{b}"));
        self.up.insert(pair(a, b), false);
        self.queues.remove(&(a, b));
        self.queues.remove(&(b, a));
        self.impaired
            .entry(pair(a, b))
            .or_default()
            .push((self.now, u64::MAX));
        self.ever_impaired = true;
        for (x, y) in [(a, b), (b, a)] {
            let now = self.at(self.now);
            let id = self.peers[y].id;
            let actions = self.peers[x].core.peer_disconnected(id, now);
            self.apply(x, actions);
        }
        self.check();
    }

    /// Restores the link between `a` and `b`: both sides see the connection now.
    pub fn reconnect(&mut self, a: usize, b: usize) {
        if a == b || self.is_up(a, b) {
            return;
        }
        if let Some(last) = self
            .impaired
            .get_mut(&pair(a, b))
            .and_then(|v| v.last_mut())
        {
            if last.1 == u64::MAX {
                last.1 = self.now;
            }
        }
        self.connect(a, b);
        self.check();
    }

    fn connect(&mut self, a: usize, b: usize) {
        self.note(format!("connect p{a}-p{b}"));
        self.up.insert(pair(a, b), true);
        for (x, y) in [(a, b), (b, a)] {
            let now = self.at(self.now);
            let id = self.peers[y].id;
            let actions = self.peers[x].core.peer_connected(id, now);
            self.apply(x, actions);
        }
    }

    /// Messages sent on the link `a`–`b` during the next `ms` take longer than the request
    /// timeout (a congested line: the connection stays up).
    pub fn slow(&mut self, a: usize, b: usize, ms: u64) {
        if a == b {
            return;
        }
        self.note(format!("slow p{a}-p{b} for {ms}"));
        self.slow_until.insert(pair(a, b), self.now + ms);
    }

    /// Restarts peer `i`: its process dies (handles, pending acquires and state are gone),
    /// its links drop, and it comes back at once with empty state and reconnects.
    pub fn restart(&mut self, i: usize) {
        self.note(format!("restart p{i}"));
        let others: Vec<usize> = (0..self.peers.len())
            .filter(|j| *j != i && self.is_up(i, *j))
            .collect();
        for j in &others {
            self.disconnect(i, *j);
        }
        let n = self.peers.len();
        let now = self.now;
        let p = &mut self.peers[i];
        p.core = Self::fresh_core(i, n, &self.cfg);
        p.tickets.clear();
        p.handles.clear();
        p.won_request.clear();
        for (_, idx) in std::mem::take(&mut p.current) {
            self.holdings[idx].ended = Some(now);
        }
        self.restarts[i].push(now);
        self.ever_impaired = true;
        for j in others {
            self.reconnect(i, j);
        }
        self.check();
    }

    // ----- time -------------------------------------------------------------------------

    /// Processes every event up to and including `t`, then sets the clock to `t`.
    pub fn run_until(&mut self, t: u64) {
        let mut guard = 0u32;
        while let Some(at) = self.next_event_time().filter(|at| *at <= t) {
            guard += 1;
            assert!(guard < 1_000_000, "event storm\n{}", self.trace());
            self.now = self.now.max(at);
            self.step(at);
        }
        self.now = self.now.max(t);
        self.check();
    }

    /// Runs until nothing is in flight and no timer is set, or `limit` ms have passed.
    pub fn settle(&mut self, limit: u64) {
        let end = self.now + limit;
        self.run_until(end);
    }

    fn next_event_time(&self) -> Option<u64> {
        let msgs = self.queues.values().filter_map(|q| q.front().map(|m| m.at));
        let timers = self
            .peers
            .iter()
            .filter_map(|p| p.core.next_deadline())
            .map(|d| self.ms_of(d));
        msgs.chain(timers).min()
    }

    fn ms_of(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.base);
        let ms = u64::try_from(d.as_millis()).expect("short simulation");
        if self.base + Duration::from_millis(ms) < t {
            ms + 1
        } else {
            ms
        }
    }

    /// Processes one event due at `at`, chosen at random among simultaneous ones.
    fn step(&mut self, at: u64) {
        #[derive(Clone, Copy, Debug)]
        enum Ev {
            Deliver(usize, usize),
            Tick(usize),
        }
        let mut due: Vec<Ev> = self
            .queues
            .iter()
            .filter(|(_, q)| q.front().is_some_and(|m| m.at <= at))
            .map(|((a, b), _)| Ev::Deliver(*a, *b))
            .collect();
        for (i, p) in self.peers.iter().enumerate() {
            if p.core.next_deadline().is_some_and(|d| self.ms_of(d) <= at) {
                due.push(Ev::Tick(i));
            }
        }
        let pick = usize::try_from(self.rng.next_u64() % due.len() as u64).expect("index");
        match due[pick] {
            Ev::Deliver(a, b) => {
                let Some(m) = self.queues.get_mut(&(a, b)).and_then(|q| q.pop_front()) else {
                    return;
                };
                self.note(format!("p{a} -> p{b}: {:?}", m.msg));
                let now = self.at(self.now);
                let from = self.peers[a].id;
                let actions = self.peers[b].core.on_message(from, m.msg, now);
                self.apply(b, actions);
            }
            Ev::Tick(i) => {
                let now = self.at(self.now);
                let actions = self.peers[i].core.tick(now);
                if !actions.is_empty() {
                    self.note(format!("p{i} tick"));
                }
                self.apply(i, actions);
            }
        }
        self.check();
    }

    fn apply(&mut self, i: usize, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send { to, msg } => {
                    let j = self.index_of(to);
                    if !self.is_up(i, j) {
                        self.note(format!("p{i} -> p{j} dropped (link down): {msg:?}"));
                        continue;
                    }
                    self.messages += 1;
                    let slow = self
                        .slow_until
                        .get(&pair(i, j))
                        .is_some_and(|until| self.now < *until);
                    let delay = if slow {
                        self.net.slow_delay
                    } else {
                        self.rng.range(self.net.min_delay, self.net.max_delay)
                    };
                    let q = self.queues.entry((i, j)).or_default();
                    // FIFO per direction: never overtake what was sent before.
                    let at = q.back().map_or(0, |m| m.at).max(self.now + delay);
                    q.push_back(InFlight { at, msg });
                    if slow {
                        self.impaired
                            .entry(pair(i, j))
                            .or_default()
                            .push((self.now, at));
                        self.ever_impaired = true;
                    }
                }
                Action::Complete { request, result } => {
                    let Some((name, started)) = self.peers[i].tickets.remove(&request) else {
                        panic!(
                            "p{i}: completion of unknown ticket {request:?}\n{}",
                            self.trace()
                        );
                    };
                    let result = result.map(|h| h.fencing);
                    self.note(format!("p{i} settled {name} (from {started}): {result:?}"));
                    self.record_settled(i, name, started, result);
                }
            }
        }
    }

    fn record_settled(
        &mut self,
        i: usize,
        name: RelPath,
        started: u64,
        result: Result<u64, LockError>,
    ) {
        if result.is_ok() {
            *self.peers[i].handles.entry(name.clone()).or_insert(0) += 1;
            let w = self.peers[i]
                .won_request
                .entry(name.clone())
                .or_insert(started);
            *w = (*w).min(started);
        }
        self.settled.push(Settled {
            peer: i,
            name,
            started,
            at: self.now,
            result,
        });
    }

    // ----- oracles ----------------------------------------------------------------------

    fn impaired_between(&self, a: usize, b: usize, from: u64, to: u64) -> bool {
        if a == b {
            return self.restarts[a].iter().any(|t| *t >= from && *t <= to);
        }
        let link = self
            .impaired
            .get(&pair(a, b))
            .is_some_and(|v| v.iter().any(|(s, e)| *s <= to && *e >= from));
        let restart = [a, b]
            .iter()
            .any(|p| self.restarts[*p].iter().any(|t| *t >= from && *t <= to));
        link || restart
    }

    /// Every oracle, on the state after the last event.
    pub fn check(&mut self) {
        self.track_holdings();
        self.check_exclusion();
        self.check_deadlines();
    }

    fn track_holdings(&mut self) {
        for i in 0..self.peers.len() {
            let names: Vec<RelPath> = NAMES
                .iter()
                .map(|n| path(n))
                .chain(self.peers[i].current.keys().cloned())
                .chain(self.peers[i].handles.keys().cloned())
                .collect();
            for name in names {
                let holds = self.peers[i]
                    .core
                    .holder_of(&name)
                    .is_some_and(|(h, _)| h == self.peers[i].id);
                let tracked = self.peers[i].current.get(&name).copied();
                match (holds, tracked) {
                    (true, None) => self.start_holding(i, name),
                    (false, Some(idx)) => {
                        self.holdings[idx].ended = Some(self.now);
                        self.peers[i].current.remove(&name);
                    }
                    _ => {}
                }
            }
            self.peers[i].won_request.clear();
        }
    }

    fn start_holding(&mut self, i: usize, name: RelPath) {
        let fencing = self.peers[i]
            .core
            .snapshot(self.at(self.now), SystemTime::now())
            .into_iter()
            .find(|r| r.path == name && r.holder == self.peers[i].id)
            .map(|r| r.fencing)
            .expect("holder has a snapshot row");
        let requested = self.peers[i]
            .won_request
            .get(&name)
            .copied()
            .unwrap_or(self.now);
        // Fencing: strictly above every earlier holding of the name that this peer could
        // learn of: its own (no restart since), or another peer's when their link was
        // unimpaired from that holding (or this request, if earlier) until now.
        for h in self.holdings.iter().filter(|h| h.name == name) {
            let from = h.won.min(requested);
            let informed = if h.peer == i {
                !self.impaired_between(i, i, h.won, self.now)
            } else {
                !self.impaired_between(h.peer, i, from, self.now)
            };
            if informed {
                assert!(
                    fencing > h.fencing,
                    "fencing did not increase: p{i} got {fencing} for {name} at {}, after p{} held {} (won {})\n{}",
                    self.now,
                    h.peer,
                    h.fencing,
                    h.won,
                    self.trace()
                );
            }
        }
        self.note(format!("p{i} HOLDS {name} fencing {fencing}"));
        self.holdings.push(Holding {
            peer: i,
            name: name.clone(),
            fencing,
            requested,
            won: self.now,
            ended: None,
        });
        let idx = self.holdings.len() - 1;
        self.peers[i].current.insert(name, idx);
    }

    fn check_exclusion(&self) {
        let mut by_name: BTreeMap<&RelPath, Vec<&Holding>> = BTreeMap::new();
        for p in &self.peers {
            for idx in p.current.values() {
                let h = &self.holdings[*idx];
                by_name.entry(&h.name).or_default().push(h);
            }
        }
        for (name, hs) in by_name {
            for (k, x) in hs.iter().enumerate() {
                for y in &hs[k + 1..] {
                    let from = x.requested.min(y.requested);
                    // Policy `available` lets peers that cannot hear each other both proceed;
                    // `strict` never does.
                    let excused = self.cfg.policy == Policy::Available
                        && self.impaired_between(x.peer, y.peer, from, self.now);
                    assert!(
                        excused,
                        "two holders of {name} at {}: p{} (requested {}, won {}) and p{} (requested {}, won {})\n{}",
                        self.now,
                        x.peer,
                        x.requested,
                        x.won,
                        y.peer,
                        y.requested,
                        y.won,
                        self.trace()
                    );
                }
            }
        }
    }

    fn check_deadlines(&self) {
        let limit = u64::try_from(self.cfg.request_timeout.as_millis()).expect("short timeout");
        for (i, p) in self.peers.iter().enumerate() {
            for (name, started) in p.tickets.values() {
                assert!(
                    self.now <= started + limit,
                    "p{i}: acquire of {name} started at {started} still pending at {}\n{}",
                    self.now,
                    self.trace()
                );
            }
        }
    }

    /// Currently holding peers of `name`.
    pub fn holders(&self, name: &RelPath) -> Vec<usize> {
        (0..self.peers.len())
            .filter(|i| self.peers[*i].current.contains_key(name))
            .collect()
    }
}
