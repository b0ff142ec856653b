//! The tokio driver of a [`LockCore`]: owns the core behind a mutex, the timer task that calls
//! `tick`, the outbound channel to the connection manager and the callers waiting for their
//! acquires (async tasks and plain threads alike).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak, mpsc};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use peerfs_proto::msg::LockMsg;
use peerfs_proto::{PeerId, RelPath};
use tokio::sync::{Notify, mpsc::UnboundedSender, oneshot};

use crate::{AcquireStart, Action, Held, LockConfig, LockCore, LockError, LockInfo, Ticket};

/// How much longer than the request timeout [`LockService::acquire_blocking`] waits before
/// giving up on its own: the core settles every request at its deadline, so this only covers
/// the timer task being late on a busy runtime.
const BLOCKING_MARGIN: Duration = Duration::from_millis(500);

type Outcome = Result<Held, LockError>;

/// Where a pending acquire's result goes.
enum Waiter {
    Async(oneshot::Sender<Outcome>),
    Blocking(mpsc::SyncSender<Outcome>),
}

struct State {
    core: LockCore,
    /// Pending local acquires: the name (to release a lock nobody waits for any more) and the
    /// caller's channel.
    waiters: HashMap<Ticket, (RelPath, Waiter)>,
}

struct Inner {
    state: Mutex<State>,
    outbound: UnboundedSender<(PeerId, LockMsg)>,
    timer: Arc<TimerSignal>,
    request_timeout: Duration,
}

/// Wakes the timer task when a deadline may have moved, and stops it with the service.
struct TimerSignal {
    wake: Notify,
    closed: AtomicBool,
}

/// Distributed locks for one peer, driven by tokio. Feed it the connection manager's events
/// (`peer_connected`, `on_message`, `peer_disconnected`); it sends its messages through the
/// `outbound` channel given to [`LockService::new`], in order (per-peer order matters).
pub struct LockService {
    inner: Arc<Inner>,
    me: PeerId,
}

impl LockService {
    /// A service for peer `me`. Must be called within a tokio runtime: it spawns the timer
    /// task, which ends when the service is dropped.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn` does).
    pub fn new(
        me: PeerId,
        cfg: LockConfig,
        outbound: UnboundedSender<(PeerId, LockMsg)>,
    ) -> LockService {
        let core = LockCore::new(me, cfg);
        let request_timeout = core.config().request_timeout;
        let timer = Arc::new(TimerSignal {
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                core,
                waiters: HashMap::new(),
            }),
            outbound,
            timer: timer.clone(),
            request_timeout,
        });
        tokio::spawn(run_timer(Arc::downgrade(&inner), timer));
        LockService { inner, me }
    }

    /// This peer's id.
    pub fn me(&self) -> PeerId {
        self.me
    }

    /// Declares a configured peer, so that policy `strict` refuses locks while it is not
    /// connected (see [`LockCore::add_peer`]).
    pub fn add_peer(&self, peer: PeerId) {
        self.inner.state.lock().core.add_peer(peer);
    }

    /// A lock message from `from`. Call it only between `peer_connected(from)` and
    /// `peer_disconnected(from)`, in the order the connection delivered them.
    pub fn on_message(&self, from: PeerId, msg: LockMsg) {
        self.inner
            .with_core(|core, now| core.on_message(from, msg, now));
    }

    /// The connection to `p` is up (after Hello, before any of its lock messages is passed
    /// in). Sends it our `Holding` first.
    pub fn peer_connected(&self, p: PeerId) {
        self.inner
            .with_core(|core, now| core.peer_connected(p, now));
    }

    /// The connection to `p` is gone.
    pub fn peer_disconnected(&self, p: PeerId) {
        self.inner
            .with_core(|core, now| core.peer_disconnected(p, now));
    }

    /// Takes the lock on `path` for one write handle; settles within the request timeout.
    /// Dropping the future gives up the request (a lock obtained meanwhile is released).
    pub async fn acquire(&self, path: &RelPath) -> Result<Held, LockError> {
        let (tx, rx) = oneshot::channel();
        let ticket = match self.inner.start(path, Waiter::Async(tx)) {
            Ok(ticket) => ticket,
            Err(done) => return done,
        };
        let mut guard = GiveUp {
            inner: &self.inner,
            ticket,
            path,
            rx: Some(Receiver::Async(rx)),
        };
        let outcome = match guard.rx.as_mut() {
            Some(Receiver::Async(rx)) => rx.await.unwrap_or(Err(LockError::Timeout)),
            _ => Err(LockError::Timeout),
        };
        guard.rx = None;
        outcome
    }

    /// For callers on non-async threads (FUSE workers): blocks at most the request timeout
    /// plus a small margin. Never call it on a runtime worker thread: it blocks the thread,
    /// and the timer that settles the request may need that very thread.
    pub fn acquire_blocking(&self, path: &RelPath) -> Result<Held, LockError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let ticket = match self.inner.start(path, Waiter::Blocking(tx)) {
            Ok(ticket) => ticket,
            Err(done) => return done,
        };
        let wait = self.inner.request_timeout + BLOCKING_MARGIN;
        match rx.recv_timeout(wait) {
            Ok(outcome) => outcome,
            Err(_) => {
                let guard = GiveUp {
                    inner: &self.inner,
                    ticket,
                    path,
                    rx: Some(Receiver::Blocking(rx)),
                };
                // The result may have arrived between the timeout and now: take it then.
                guard.settle_now().unwrap_or(Err(LockError::Timeout))
            }
        }
    }

    /// Releases one write handle's use of `path` (the lock lingers after the last one).
    pub fn release(&self, path: &RelPath) {
        self.inner.with_core(|core, now| core.release(path, now));
    }

    /// Who holds `path`, as far as this peer knows (itself included).
    pub fn holder_of(&self, path: &RelPath) -> Option<PeerId> {
        self.inner
            .state
            .lock()
            .core
            .holder_of(path)
            .map(|(peer, _)| peer)
    }

    /// Another peer holding, or being granted, `dir` or a path below it (see
    /// [`LockCore::claim_below`]).
    pub fn claim_below(&self, dir: &RelPath) -> Option<PeerId> {
        self.inner.state.lock().core.claim_below(dir)
    }

    /// Every lock this peer knows of, for `peerfs locks`.
    pub fn snapshot(&self) -> Vec<LockInfo> {
        self.inner
            .state
            .lock()
            .core
            .snapshot(Instant::now(), SystemTime::now())
    }
}

impl Drop for LockService {
    fn drop(&mut self) {
        self.inner.timer.closed.store(true, Ordering::Release);
        self.inner.timer.wake.notify_one();
    }
}

impl Inner {
    /// Runs one core input and carries out its actions, all under the lock: messages must
    /// leave in the order the core produced them, across callers too (a Release must not
    /// overtake the next Request to the same peer).
    fn with_core(&self, f: impl FnOnce(&mut LockCore, Instant) -> Vec<Action>) {
        let mut state = self.state.lock();
        let actions = f(&mut state.core, Instant::now());
        self.dispatch(&mut state, actions);
        drop(state);
        // Deadlines may have moved.
        self.timer.wake.notify_one();
    }

    /// Starts an acquire: `Err` with its outcome when settled at once, else its ticket.
    fn start(&self, path: &RelPath, waiter: Waiter) -> Result<Ticket, Outcome> {
        let mut state = self.state.lock();
        match state.core.acquire(path, Instant::now()) {
            AcquireStart::Done(outcome) => Err(outcome),
            AcquireStart::Pending { ticket, actions } => {
                state.waiters.insert(ticket, (path.clone(), waiter));
                self.dispatch(&mut state, actions);
                drop(state);
                self.timer.wake.notify_one();
                Ok(ticket)
            }
        }
    }

    fn dispatch(&self, state: &mut State, actions: Vec<Action>) {
        let mut queue = actions;
        while !queue.is_empty() {
            let mut next = Vec::new();
            for action in queue {
                match action {
                    Action::Send { to, msg } => {
                        if self.outbound.send((to, msg)).is_err() {
                            tracing::debug!("lock outbound channel closed; message dropped");
                        }
                    }
                    Action::Complete { request, result } => {
                        let Some((path, waiter)) = state.waiters.remove(&request) else {
                            continue;
                        };
                        let delivered = match waiter {
                            Waiter::Async(tx) => tx.send(result.clone()).is_ok(),
                            Waiter::Blocking(tx) => tx.try_send(result.clone()).is_ok(),
                        };
                        if !delivered && result.is_ok() {
                            // Its caller is gone: nobody will release it.
                            next.extend(state.core.release(&path, Instant::now()));
                        }
                    }
                }
            }
            queue = next;
        }
    }
}

enum Receiver {
    Async(oneshot::Receiver<Outcome>),
    Blocking(mpsc::Receiver<Outcome>),
}

/// Gives up a pending acquire whose caller stopped waiting (a dropped future, a blocking
/// wait past its limit), without leaking a lock that was granted in the meantime.
struct GiveUp<'a> {
    inner: &'a Inner,
    ticket: Ticket,
    path: &'a RelPath,
    /// None once the outcome was taken.
    rx: Option<Receiver>,
}

impl GiveUp<'_> {
    /// Under the core lock: still pending → abandon it (None); already settled → the outcome
    /// it was sent (Some), which is then the caller's.
    fn settle_now(mut self) -> Option<Outcome> {
        self.take()
    }

    fn take(&mut self) -> Option<Outcome> {
        let rx = self.rx.take()?;
        let mut state = self.inner.state.lock();
        if state.waiters.remove(&self.ticket).is_some() {
            let actions = state.core.abandon(self.ticket, Instant::now());
            self.inner.dispatch(&mut state, actions);
            return None;
        }
        // Completions are sent under this lock, so the outcome is in the channel already.
        match rx {
            Receiver::Async(mut rx) => rx.try_recv().ok(),
            Receiver::Blocking(rx) => rx.try_recv().ok(),
        }
    }
}

impl Drop for GiveUp<'_> {
    fn drop(&mut self) {
        if let Some(Ok(_)) = self.take() {
            // Granted, but the caller is gone.
            self.inner
                .with_core(|core, now| core.release(self.path, now));
        }
    }
}

/// Calls `tick` at every deadline of the core; stops with the service.
async fn run_timer(inner: Weak<Inner>, signal: Arc<TimerSignal>) {
    loop {
        if signal.closed.load(Ordering::Acquire) {
            return;
        }
        let next = {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let mut state = inner.state.lock();
            let now = Instant::now();
            let actions = state.core.tick(now);
            inner.dispatch(&mut state, actions);
            state.core.next_deadline()
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = signal.wake.notified() => {}
                }
            }
            None => signal.wake.notified().await,
        }
    }
}
