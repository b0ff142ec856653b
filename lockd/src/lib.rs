//! Distributed write locks for peerfs (mesh mode): owns the lock table, the mesh protocol that
//! decides who may write-open a name, leases and fencing tokens. It knows nothing of files or
//! sockets: `vfs` asks it before every read-write open, and the connection manager in `proto`
//! carries its [`LockMsg`](peerfs_proto::msg::LockMsg)s.
//!
//! - [`LockCore`] is the protocol as a deterministic state machine (no clock, no I/O): inputs
//!   in, [`Action`]s out. All the rules below live there and are tested there, with a
//!   simulated network.
//! - [`LockService`] drives a core from tokio: a timer task, an outbound channel, and
//!   `acquire` for async callers and for plain threads (FUSE workers).
//!
//! # The protocol
//!
//! Locks are keyed by name ([`RelPath`](peerfs_proto::RelPath)) only. A peer *holds* a name
//! from the moment its request wins until it sends `Release`; that includes the *linger*
//! after its last local handle was released.
//!
//! **Acquiring.** A local acquire of a name we hold or linger on succeeds at once: it adds a
//! reference (several write handles share one lock) and cancels the linger, with no message.
//! A local acquire while our own request for the name is pending joins it. Otherwise, if we
//! know of a holder (from its `Acquired` or `Holding`, also while it is disconnected within
//! its grace), the acquire fails at once with [`LockError::HeldBy`]. Otherwise we send
//! `Request { req, path, lamport: ++clock, hops: 0 }` to every connected peer (and to any
//! peer that connects while it is pending) and wait for every answer. With no peer connected
//! it succeeds at once. The winner's fencing token is the maximum of the granters' tokens and
//! our own last known one, plus one; it sends `Acquired` to every connected peer. A loser
//! sends `Cancel` to every peer except those that denied in their own name, so no record of
//! it is left behind.
//!
//! **Priority.** Requests are ordered by `(lamport, origin peer id)`, lower first. Receiving
//! any `Request` raises our clock to its `lamport`, so a request made after seeing another
//! always ranks after it.
//!
//! **Answering a request** for a name, the first rule that applies:
//! 1. we hold it (lingering included): `Deny { holder: us }` — the only final refusal;
//! 2. our own request for it is pending and ranks first: *defer*, and answer when ours is
//!    settled: `Deny { us }` if it won, otherwise by these rules again;
//! 3. we know another holder: `Deny { holder: it }`;
//! 4. we answered another peer's request for it that is not settled yet (no `Acquired`, no
//!    `Cancel`): `Deny { holder: that peer }` (the first of them by priority);
//! 5. otherwise `Grant { fencing: our last known token }`.
//!
//! After rules 3–5 we keep a record of the request until its origin settles it (`Acquired`,
//! `Cancel`, or its `Holding` after a reconnect). Such a request ranks before every request of
//! ours that is pending or made later (rule 2 and the Lamport rule), so it counts against ours
//! (below).
//!
//! **Judging the answers** ("the named peer decides"). A `Deny` from the holder itself is
//! final: we lose. A `Deny` naming a third peer is a *claim*, and so is our own knowledge: a
//! holder we know of, and every request we answered that is not settled. The named peer
//! settles a claim: if it answered our request with anything but "I hold it", the claim is
//! overruled (it was stale, or that peer's competing request lost or ranks below ours); if it
//! has not answered yet, we wait for it; if it is not among the peers asked (not connected,
//! disconnected meanwhile, or still silent at our deadline), the claim stands and we lose with
//! `HeldBy` it. We win when every peer asked has answered and no claim stands. A `Deny`
//! naming ourselves can only be stale and is ignored.
//!
//! **Timeouts and the policy.** Every request has a hard deadline
//! ([`LockConfig::request_timeout`]). At the deadline, claims whose peer is silent stand; other
//! peers that are still silent are treated by the policy: `available` wins without them,
//! `strict` fails with [`LockError::Unreachable`]. A peer that disconnects while we wait for
//! it is skipped (`available`) or fails the request at once (`strict`). Under `strict`, an
//! acquire also fails at once while a known peer (declared with [`LockCore::add_peer`], or
//! ever connected) is not connected; under `available` such a peer is not asked.
//!
//! **Leases.** What we know of another peer — its holdings and its unsettled requests — is
//! bound to its connection: while it is connected it lasts until its `Release`, `Acquired` or
//! `Cancel`; when it disconnects it becomes a lease that expires after [`LockConfig::grace`].
//! When it reconnects, its `Holding` (sent first on every connection) replaces everything we
//! knew about it — a restarted peer sends an empty one, freeing its old names at once — and
//! our pending requests are sent to it again. Release of our own lock waits for the linger
//! ([`LockConfig::linger`]); an acquire meanwhile revives it with no round trip, and other
//! peers are denied throughout (Office closes and reopens a document around every save; see
//! `shared/OFFICE-SAVES.md`).
//!
//! # Why this gives mutual exclusion
//!
//! *Claim.* Two peers X and Y whose connection stays up, delivering in order and in less than
//! half the request timeout, never hold the same name at the same time — whatever the other
//! peers, links and timeouts do. Suppose requests x of X and y of Y both won and their
//! holdings overlap; say x ranks first.
//!
//! 1. y reached X while x was pending or held. Had it arrived before x was made, X's clock
//!    would have put x after y. Had it arrived after X's holding ended, Y could not have won
//!    before then: not with all answers (X answers after its `Release`, which FIFO delivers
//!    first), and not at its deadline, which comes after y reaches X.
//! 2. So X never granted y: it deferred y behind x (rule 2) and answered `Deny { X }` when x
//!    won, or refused at once while holding (rule 1). y could only have won at its deadline,
//!    with X silent and no claim naming X standing.
//! 3. But x reached Y before y's deadline (x was made before y reached X: within two message
//!    delays of y's start). Y did not hold the name (that would have been a final refusal of
//!    x), and x ranks first, so Y answered x by rules 3–5 — possibly after deferring it behind
//!    an earlier request of its own, which must then have lost — and kept its record: a claim
//!    naming X. It lasts until x settles — `Acquired` replaces it with "X holds" (a claim on X still),
//!    `Cancel` means x lost. At y's deadline X is silent, so the claim stands and y loses.
//!
//! Claims only ever add refusals, and one is overruled only by the named peer's own answer —
//! which is the argument above between us and that peer. So third peers cannot make two
//! holders; they only narrow where best effort applies (below).
//!
//! *Exactly one winner among racers.* Take the first-ranked pending request r. Nobody defers
//! it (rule 2 defers only lower-ranked requests), so every peer answers at once, and only a
//! real holder answers "I hold it". Its origin has no unsettled record of a request ranking
//! before r (that request would be pending and rank first). Every claim against r names a
//! peer that answers r at once as well. So r wins unless someone truly holds the name, and
//! its origin then denies every other racer, which ranks after it. This is why rule 4 names
//! the competing requester instead of refusing: "first come" refusals (C grants A, B refuses
//! A, C refuses B) make both racers lose.
//!
//! *No deadlock.* A request waits only for answers; an answer is held back only behind a
//! strictly higher-ranked request of the answering peer, so waits form no cycle; and every
//! request has a hard deadline.
//!
//! *Where exclusion is best effort.* Under policy `available`, peers that cannot hear each
//! other in time (connection down, or answers slower than the request timeout allows) may both
//! take a name: that is what `available` means. Third-party knowledge — holders and requests
//! seen by a peer both can reach, kept for the grace period after a disconnect — still stops
//! most such cases, and content conflicts are resolved by the replicator's versions. Under
//! policy `strict` a request wins only with an answer from every known peer, and a silent or
//! lost peer fails it, so no link failure lets two peers hold a name.
//!
//! The simulated-network tests check these claims at every step of random schedules (with
//! cut, slow and restarted peers), including two shrunk cases that broke weaker versions of
//! rule 4 and of the claims.
//!
//! **Fencing.** The token of a holding is larger than every token the winner knows or its
//! granters reported. A previous holder that answered, or whose `Acquired` was seen, passes on
//! its token, so tokens strictly increase along successive holders of a name whenever each
//! new holder could hear from the previous one. It only serves to refuse a writer whose lease
//! expired; content conflicts are decided by versions.
//!
//! # Configuration ([`LockConfig`]) and defaults
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `linger` | 1 s ([`DEFAULT_LINGER`]), at most 60 s ([`MAX_LINGER`]) | our lock outlives its last handle this long (0: released at once) |
//! | `grace` | 10 s ([`DEFAULT_GRACE`]), at most 15 s ([`MAX_GRACE`]) | a disconnected peer's locks and requests are honoured this long |
//! | `request_timeout` | 1.5 s ([`DEFAULT_REQUEST_TIMEOUT`]), 1 ms to 30 s ([`MAX_REQUEST_TIMEOUT`]) | hard limit of one request, then the policy applies; two connected peers stay exclusive while their messages take less than half of it |
//! | `policy` | [`Policy::Available`] | what an unreachable peer means: ignored, or ([`Policy::Strict`]) refusal |
//!
//! # Wire notes
//!
//! The messages are `proto`'s [`LockMsg`](peerfs_proto::msg::LockMsg), unchanged. `hops` is
//! always 0: a request relayed by another peer (or whose origin is not the connection's peer)
//! is refused with `Deny { holder: us }` until relays exist. Answers to requests we did not
//! send, and messages from peers not reported connected, are ignored.

mod config;
mod core;
mod error;
mod service;

pub use crate::config::{
    DEFAULT_GRACE, DEFAULT_LINGER, DEFAULT_REQUEST_TIMEOUT, LockConfig, LockConfigError, MAX_GRACE,
    MAX_LINGER, MAX_REQUEST_TIMEOUT, Policy, PolicyParseError,
};
pub use crate::core::{AcquireStart, Action, Held, LockCore, LockInfo, Ticket};
pub use crate::error::LockError;
pub use crate::service::LockService;
