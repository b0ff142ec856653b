//! Owns a serving daemon's link to its peers: the TLS mesh (proto), the lock service (lockd)
//! and the glue between them, plus the `vfs::Locks` face the drive calls.
//!
//! The mesh and lockd run on a small tokio runtime of their own, started after the daemon's
//! fork. The drive's FUSE threads are not runtime threads: they block in
//! `LockService::acquire_blocking`, bounded by the lock timeout.

use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use peerfs_lockd::{LockConfig, LockError, LockService, Policy};
use peerfs_proto::mesh::{Mesh, MeshConfig, MeshEvent, PeerConfig, Priority};
use peerfs_proto::msg::Message;
use peerfs_proto::{Identity, PeerId, RelPath};
use peerfs_replicator::engine::{self, Applied, LocalChange, Replicator, Transport};
use peerfs_replicator::store::Store;
use peerfs_replicator::trash::Trash;
use peerfs_vfs::{Change, LockDenied, Locks, Replicate, Vfs};
use serde_json::json;

use crate::config::{Config, LockPolicy};

/// The running network side of a daemon.
pub struct Network {
    runtime: tokio::runtime::Runtime,
    mesh: Mesh,
    locks: Arc<LockService>,
    repl: Replicator,
    trash: Arc<Trash>,
    root: Arc<std::os::fd::OwnedFd>,
    names: Arc<HashMap<PeerId, String>>,
    router: Arc<std::sync::Mutex<Router>>,
    me: PeerId,
}

impl Network {
    /// Loads the identity, starts the mesh and the lock service.
    pub fn start(cfg: &Config) -> Result<Network> {
        let identity = Identity::load(&cfg.state).map_err(|e| anyhow!("{e}"))?;
        let me = identity.id;
        let listen = match &cfg.listen {
            Some(l) => Some(
                l.to_socket_addrs()
                    .with_context(|| format!("listen {l}: cannot resolve"))?
                    .next()
                    .ok_or_else(|| anyhow!("listen {l}: resolves to no address"))?,
            ),
            None => None,
        };
        let peers: Vec<PeerConfig> = cfg
            .peers
            .iter()
            .map(|p| PeerConfig {
                name: p.name.clone(),
                id: p.id,
                address: p.address.clone(),
            })
            .collect();
        let mut names: HashMap<PeerId, String> =
            cfg.peers.iter().map(|p| (p.id, p.name.clone())).collect();
        names.insert(me, cfg.name.clone());
        let names = Arc::new(names);

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("peerfs-net")
            .enable_all()
            .build()
            .context("cannot start the network runtime")?;

        let lock_cfg = LockConfig {
            linger: cfg.locks.linger,
            grace: cfg.locks.grace,
            request_timeout: cfg.locks.timeout,
            policy: match cfg.locks.policy {
                LockPolicy::Available => Policy::Available,
                LockPolicy::Strict => Policy::Strict,
            },
        };
        lock_cfg.validate().map_err(|e| anyhow!("locks: {e}"))?;
        let mesh_cfg = MeshConfig {
            listen,
            peers,
            heartbeat: cfg.network.heartbeat,
            dead_after: cfg.network.dead_after,
            ..MeshConfig::new(cfg.name.clone(), identity)
        };

        let store = Arc::new(
            Store::open(&cfg.state)
                .map_err(|e| anyhow!("state database in {}: {e}", cfg.state.display()))?,
        );
        let trash = Arc::new(
            Trash::open(&cfg.state)
                .with_context(|| format!("cannot open the trash in {}", cfg.state.display()))?,
        );
        let excludes = peerfs_vfs::exclude::Excludes::new(&cfg.files.exclude, &cfg.files.include)
            .map_err(|e| anyhow!("files: {e}"))?;
        let repl_cfg = engine::Config {
            backing: cfg.backing.clone(),
            state: cfg.state.clone(),
            me,
            me_name: cfg.name.clone(),
            filter: Some(Arc::new(move |p: &RelPath| !excludes.is_excluded(p))),
            peers: cfg.peers.iter().map(|p| (p.id, p.name.clone())).collect(),
            owners: cfg.replication.owners,
            window: 16 * 1024 * 1024,
            hold_removes: cfg.locks.linger + Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            recon_rounds: engine::RECON_ROUNDS,
            recon_pause: engine::RECON_PAUSE,
        };
        let (mesh, locks, repl, router) = runtime.block_on(async {
            let (mesh, mut events) =
                Mesh::start(mesh_cfg)
                    .await
                    .with_context(|| match &cfg.listen {
                        Some(l) => format!("cannot listen on {l}"),
                        None => "cannot start the peer mesh".to_string(),
                    })?;
            let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel();
            let locks = Arc::new(LockService::new(me, lock_cfg, out_tx));
            for p in &cfg.peers {
                locks.add_peer(p.id);
            }
            let trash_for_fn = Arc::clone(&trash);
            let trash_fn: engine::TrashFn = Arc::new(move |root, at, rel, origin| {
                let trash = &trash_for_fn;
                let entry = trash.put_as(root, at, rel, origin)?;
                tracing::info!(path = %rel, by = origin, entry = %entry.id, "moved to the trash");
                Ok(())
            });
            let repl = Replicator::start(
                repl_cfg,
                store,
                Arc::new(MeshTransport(mesh.clone())),
                trash_fn,
            )
            .context("cannot start the replicator")?;
            // lockd → peers. Lock traffic is Control: it never waits behind bulk data. A peer
            // reachable only through another one (a relay) gets it wrapped in `Routed`.
            let router_out = Arc::new(std::sync::Mutex::new(Router::new(me)));
            let router = Arc::clone(&router_out);
            let sender = mesh.clone();
            let out_router = Arc::clone(&router);
            tokio::spawn(async move {
                while let Some((peer, msg)) = out_rx.recv().await {
                    let via = out_router
                        .lock()
                        .map(|r| r.via(peer))
                        .unwrap_or(None);
                    let r = match via {
                        Some(via) => sender.send(
                            via,
                            Message::Routed {
                                from: me,
                                to: peer,
                                hops: 1,
                                lock: Box::new(msg),
                            },
                            Priority::Control,
                        ),
                        None => sender.send(peer, Message::Lock(msg), Priority::Control),
                    };
                    if let Err(e) = r {
                        tracing::debug!(peer = %peer.short(), "lock message not sent: {e}");
                    }
                }
            });
            // peers → lockd, in connection order.
            let svc = Arc::clone(&locks);
            let peer_names = Arc::clone(&names);
            let rp = repl.clone();
            let relay = mesh.clone();
            tokio::spawn(async move {
                // Tells every directly connected peer whom we are connected to.
                let announce = |r: &Router| {
                    let peers: Vec<(PeerId, String)> = r
                        .direct()
                        .into_iter()
                        .map(|p| (p, peer_names.get(&p).cloned().unwrap_or_default()))
                        .collect();
                    for p in r.direct() {
                        let _ = relay.send(
                            p,
                            Message::Neighbors {
                                peers: peers.clone(),
                            },
                            Priority::Control,
                        );
                    }
                };
                // Routed peers that appeared or went away: lockd treats them as (dis)connected.
                let apply = |changes: (Vec<PeerId>, Vec<PeerId>)| {
                    for p in changes.1 {
                        tracing::info!(id = %p, "peer no longer reachable through a relay");
                        svc.peer_disconnected(p);
                    }
                    for p in changes.0 {
                        tracing::info!(id = %p, "peer reachable through a relay");
                        svc.peer_connected(p);
                    }
                };
                while let Some(ev) = events.recv().await {
                    match ev {
                        MeshEvent::Connected { peer, name } => {
                            tracing::info!(peer = %name, id = %peer, "peer connected");
                            svc.peer_connected(peer);
                            rp.peer_connected(peer);
                            let changes = match router.lock() {
                                Ok(mut r) => {
                                    r.direct.insert(peer);
                                    announce(&r);
                                    r.recompute()
                                }
                                Err(_) => (Vec::new(), Vec::new()),
                            };
                            apply(changes);
                        }
                        MeshEvent::Disconnected { peer, reason } => {
                            let name = peer_names.get(&peer).cloned().unwrap_or_default();
                            tracing::info!(peer = %name, id = %peer, "peer disconnected: {reason}");
                            svc.peer_disconnected(peer);
                            rp.peer_disconnected(peer);
                            let changes = match router.lock() {
                                Ok(mut r) => {
                                    r.direct.remove(&peer);
                                    r.neighbors.remove(&peer);
                                    announce(&r);
                                    r.recompute()
                                }
                                Err(_) => (Vec::new(), Vec::new()),
                            };
                            apply(changes);
                        }
                        MeshEvent::Message {
                            peer,
                            msg: Message::Lock(m),
                        } => svc.on_message(peer, m),
                        MeshEvent::Message {
                            peer,
                            msg: Message::Repl(m),
                        } => rp.on_message(peer, m),
                        MeshEvent::Message {
                            peer,
                            msg: Message::Neighbors { peers },
                        } => {
                            let changes = match router.lock() {
                                Ok(mut r) => {
                                    let mut peers = peers;
                                    peers.truncate(1024);
                                    for (id, name) in &peers {
                                        let ok = !name.is_empty()
                                            && name.len() <= 64
                                            && !name.chars().any(char::is_control);
                                        if ok && !peer_names.contains_key(id) {
                                            r.names.insert(*id, name.clone());
                                        }
                                    }
                                    r.neighbors
                                        .insert(peer, peers.into_iter().map(|(id, _)| id).collect());
                                    r.recompute()
                                }
                                Err(_) => (Vec::new(), Vec::new()),
                            };
                            apply(changes);
                        }
                        MeshEvent::Message {
                            peer,
                            msg:
                                Message::Routed {
                                    from,
                                    to,
                                    hops,
                                    lock,
                                },
                        } => {
                            let (deliver, forward) = match router.lock() {
                                Ok(r) => (
                                    to == me && r.via(from) == Some(peer),
                                    to != me
                                        && r.direct.contains(&to)
                                        && hops < peerfs_proto::msg::MAX_HOPS,
                                ),
                                Err(_) => (false, false),
                            };
                            if deliver {
                                svc.on_message(from, *lock);
                            } else if forward {
                                let _ = relay.send(
                                    to,
                                    Message::Routed {
                                        from,
                                        to,
                                        hops: hops + 1,
                                        lock,
                                    },
                                    Priority::Control,
                                );
                            } else {
                                tracing::debug!(peer = %peer.short(), from = %from.short(), to = %to.short(), "routed lock message dropped");
                            }
                        }
                        MeshEvent::Message { peer, msg } => {
                            tracing::debug!(peer = %peer.short(), ?msg, "message not for lockd");
                        }
                    }
                }
            });
            anyhow::Ok((mesh, locks, repl, router_out))
        })?;
        let root = Arc::new(
            std::fs::File::open(&cfg.backing)
                .map(std::os::fd::OwnedFd::from)
                .with_context(|| format!("cannot open backing {}", cfg.backing.display()))?,
        );
        // The trash keeps deleted files for `retention`, and the index their tombstones: swept
        // now and every hour.
        {
            let trash = Arc::clone(&trash);
            let retention = cfg.trash.retention;
            let repl = repl.clone();
            std::thread::Builder::new()
                .name("trash-sweep".into())
                .spawn(move || {
                    loop {
                        match trash.sweep(retention, std::time::SystemTime::now()) {
                            Ok(st) if st.removed > 0 || st.half_made > 0 => tracing::info!(
                                removed = st.removed,
                                bytes = st.removed_bytes,
                                half_made = st.half_made,
                                kept = st.kept,
                                "trash swept"
                            ),
                            Ok(_) => {}
                            Err(e) => tracing::warn!("cannot sweep the trash: {e}"),
                        }
                        // Tombstones live as long as the trash keeps what they removed.
                        repl.expire_tombstones(retention);
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                })
                .context("cannot start the trash sweeper")?;
        }
        tracing::info!(
            id = %me,
            listen = ?mesh.local_addr(),
            peers = cfg.peers.len(),
            "peer mesh started"
        );
        Ok(Network {
            runtime,
            mesh,
            locks,
            repl,
            trash,
            root,
            names,
            router,
            me,
        })
    }

    /// Waits (at most `max`) until every configured peer with an address is connected or was
    /// tried and failed once, so the first write-opens after mount see the peers that are up.
    pub fn wait_for_peers(&self, cfg: &Config, max: Duration) {
        let deadline = Instant::now() + max;
        let dialled: Vec<PeerId> = cfg
            .peers
            .iter()
            .filter(|p| p.address.is_some())
            .map(|p| p.id)
            .collect();
        loop {
            let status = self.mesh.status();
            let pending = dialled.iter().any(|id| {
                status
                    .iter()
                    .find(|s| s.id == *id)
                    .is_some_and(|s| !s.connected && s.last_error.is_none())
            });
            if !pending || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The drive's view of the lock service.
    pub fn vfs_locks(&self) -> Arc<dyn Locks> {
        Arc::new(MeshLocks {
            svc: Arc::clone(&self.locks),
            names: Arc::clone(&self.names),
        })
    }

    /// Connects the drive and the replicator: the drive reports its changes, and changes from
    /// peers invalidate the drive's kernel caches.
    pub fn attach(&self, vfs: &Arc<Vfs>) {
        vfs.set_replicator(Arc::new(DriveChanges {
            repl: self.repl.clone(),
            locks: Arc::clone(&self.locks),
        }));
        self.repl
            .set_applied(Arc::new(DriveCaches(Arc::downgrade(vfs))));
        let locks = Arc::clone(&self.locks);
        self.repl.set_held_probe(Arc::new(move |path| {
            locks.holder_of(path) == Some(locks.me())
        }));
    }

    /// `trash-restore` for the control socket: moves the entry back into the backing folder,
    /// tells the drive's kernel caches, and replicates the restored object to the peers.
    pub fn trash_restore_source(&self, vfs: &Arc<Vfs>) -> crate::control::TrashRestore {
        let trash = Arc::clone(&self.trash);
        let root = Arc::clone(&self.root);
        let repl = self.repl.clone();
        let vfs = Arc::downgrade(vfs);
        Arc::new(move |rel, id| {
            use std::os::fd::AsFd;
            let restored = trash
                .restore(root.as_fd(), rel, id)
                .map_err(|e| format!("cannot restore {rel}: {e}"))?;
            if let Some(v) = vfs.upgrade() {
                v.remote_changed(&restored.restored_to);
            }
            repl.local(LocalChange::Content {
                path: restored.restored_to.clone(),
                dirty: None,
                fence: None,
            });
            tracing::info!(path = %restored.restored_to, entry = %restored.entry.id, "restored from the trash");
            serde_json::to_value(&restored).map_err(|e| e.to_string())
        })
    }

    /// `status`'s peer list.
    pub fn peers_source(&self) -> crate::control::Source {
        let mesh = self.mesh.clone();
        let repl = self.repl.clone();
        Arc::new(move || {
            let rs = repl.status();
            let peers: Vec<serde_json::Value> = mesh
                .status()
                .into_iter()
                .map(|p| {
                    let id = p.id.to_string();
                    let r = rs.iter().find(|r| r.id == id).cloned().unwrap_or_default();
                    json!({
                        "queue": r.queue,
                        "queue_bytes": r.queue_bytes,
                        "bytes_sent": p.bytes_sent,
                        "bytes_received": p.bytes_received,
                        "content_bytes_sent": r.content_bytes_sent,
                        "content_bytes_received": r.content_bytes_received,
                        "records_sent": r.records_sent,
                        "records_applied": r.records_applied,
                        "replication_error": r.last_error,
                        "sync": r.sync,
                        "name": p.name,
                        "id": p.id.to_string(),
                        "address": p.address,
                        "connected": p.connected,
                        "since": p.since.map(rfc3339),
                        "rtt_ms": p.rtt.map(|d| d.as_secs_f64() * 1000.0),
                        "last_error": p.last_error,
                    })
                })
                .collect();
            serde_json::Value::Array(peers)
        })
    }

    /// `status`'s reconciliation report: the start scan and the conflict copies made here.
    pub fn reconcile_source(&self) -> crate::control::Source {
        let repl = self.repl.clone();
        Arc::new(move || {
            json!({
                "scan": repl.scan_report(),
                "conflicts": repl.conflicts(),
            })
        })
    }

    /// `locks`'s answer.
    pub fn locks_source(&self) -> crate::control::Source {
        let svc = Arc::clone(&self.locks);
        let names = Arc::clone(&self.names);
        let router = Arc::clone(&self.router);
        let me = self.me;
        Arc::new(move || {
            let locks: Vec<serde_json::Value> = svc
                .snapshot()
                .into_iter()
                .map(|l| {
                    json!({
                        "path": l.path.to_string(),
                        "holder": names
                            .get(&l.holder)
                            .cloned()
                            .or_else(|| router.lock().ok().and_then(|r| r.names.get(&l.holder).cloned()))
                            .unwrap_or_else(|| l.holder.short()),
                        "holder_id": l.holder.to_string(),
                        "local": l.holder == me,
                        "since": rfc3339(l.since),
                        "fencing": l.fencing,
                        "handles": l.local_refs,
                        "lingering": l.lingering,
                        "grace_left_ms": l.grace_left.map(|d| d.as_millis() as u64),
                    })
                })
                .collect();
            serde_json::Value::Array(locks)
        })
    }

    /// Stops the mesh (peers see the connection close at once, not after `dead_after`).
    pub fn shutdown(self) {
        self.repl.stop();
        let Network { runtime, mesh, .. } = self;
        runtime.block_on(mesh.shutdown());
        runtime.shutdown_timeout(Duration::from_secs(2));
    }
}

fn rfc3339(t: std::time::SystemTime) -> String {
    crate::timefmt::rfc3339_utc(
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// `vfs::Locks` over the lock service, naming holders as the config names them.
struct MeshLocks {
    svc: Arc<LockService>,
    names: Arc<HashMap<PeerId, String>>,
}

impl MeshLocks {
    fn name(&self, peer: &PeerId) -> String {
        self.names
            .get(peer)
            .cloned()
            .unwrap_or_else(|| peer.to_string())
    }
}

impl Locks for MeshLocks {
    fn acquire(&self, path: &RelPath) -> std::result::Result<(), LockDenied> {
        match self.svc.acquire_blocking(path) {
            Ok(_held) => Ok(()),
            Err(LockError::HeldBy { peer }) => Err(LockDenied {
                holder: self.name(&peer),
            }),
            Err(LockError::Unreachable { peer }) => Err(LockDenied {
                holder: format!("{} (unreachable; lock policy strict)", self.name(&peer)),
            }),
            Err(LockError::Timeout) => Err(LockDenied {
                holder: "unknown (the lock request timed out)".into(),
            }),
        }
    }

    fn release(&self, path: &RelPath) {
        self.svc.release(path);
    }

    fn held_here(&self, path: &RelPath) -> bool {
        self.svc.holder_of(path) == Some(self.svc.me())
    }

    fn held_below(&self, dir: &RelPath) -> Option<LockDenied> {
        self.svc.claim_below(dir).map(|peer| LockDenied {
            holder: self.name(&peer),
        })
    }
}

/// The replicator's network: replication messages over the mesh (the stream on the Bulk
/// lane, acknowledgements and flow credit on the Control lane).
struct MeshTransport(Mesh);

impl Transport for MeshTransport {
    fn send(&self, peer: PeerId, msg: peerfs_proto::msg::ReplMsg, bulk: bool) -> bool {
        let prio = if bulk {
            Priority::Bulk
        } else {
            Priority::Control
        };
        match self.0.send(peer, Message::Repl(msg), prio) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(peer = %peer.short(), "replication message not sent: {e}");
                false
            }
        }
    }
}

/// The drive's changes, recorded for the peers. A new version of a locked name keeps the lock
/// (one more reference) until every connected peer has acknowledged it: transfer under lock,
/// then unlock.
struct DriveChanges {
    repl: Replicator,
    locks: Arc<LockService>,
}

impl Replicate for DriveChanges {
    fn changed(&self, change: Change) {
        let held = match &change {
            Change::Content { path, .. } if self.locks.holder_of(path) == Some(self.locks.me()) => {
                // Already held here: this only adds a reference, without a round trip.
                self.locks
                    .acquire_blocking(path)
                    .ok()
                    .map(|h| (path.clone(), h.fencing))
            }
            _ => None,
        };
        let fence = held.as_ref().map(|(_, f)| *f);
        let local = match change {
            Change::Content { path, dirty } => LocalChange::Content { path, dirty, fence },
            Change::Meta { path } => LocalChange::Meta { path },
            Change::Mkdir { path } => LocalChange::Mkdir { path },
            Change::Symlink { path } => LocalChange::Symlink { path },
            Change::Link { existing, path } => LocalChange::Link { existing, path },
            Change::Remove { path, held } => LocalChange::Remove { path, held },
            Change::Rename { from, to } => LocalChange::Rename { from, to },
        };
        let targets = self.repl.local(local);
        if let Some((path, _)) = held {
            let locks = Arc::clone(&self.locks);
            self.repl
                .when_delivered(targets, Box::new(move || locks.release(&path)));
        }
    }
}

/// Changes from peers, as the drive's kernel caches need to hear of them.
struct DriveCaches(std::sync::Weak<Vfs>);

impl Applied for DriveCaches {
    fn changed(&self, path: &RelPath) {
        if let Some(v) = self.0.upgrade() {
            v.remote_changed(path);
        }
    }
    fn removed(&self, path: &RelPath) {
        if let Some(v) = self.0.upgrade() {
            v.remote_removed(path);
        }
    }
    fn renamed(&self, from: &RelPath, to: &RelPath) {
        if let Some(v) = self.0.upgrade() {
            v.remote_renamed(from, to);
        }
    }
    fn gate(&self, path: &RelPath, ino: u64) -> bool {
        self.0.upgrade().is_none_or(|v| v.remote_gate(path, ino))
    }
    fn ungate(&self, ino: u64) {
        if let Some(v) = self.0.upgrade() {
            v.remote_ungate(ino);
        }
    }
    fn writing(&self, path: &RelPath) -> bool {
        self.0.upgrade().is_some_and(|v| v.remote_writing(path))
    }
}

/// Which peers are reachable only through another peer (one relay: a neighbor of a neighbor),
/// from the neighbor lists peers announce. Lock messages to such a peer travel as
/// [`Message::Routed`] through the relay; the relay delivers them unchanged, so the lock
/// protocol works across it as over a direct link.
pub(crate) struct Router {
    me: PeerId,
    /// Peers connected directly.
    direct: std::collections::HashSet<PeerId>,
    /// What each direct peer announced as its own direct peers.
    neighbors: HashMap<PeerId, Vec<PeerId>>,
    /// Peer → the direct peer that relays to it.
    routes: HashMap<PeerId, PeerId>,
    /// Names of peers our config does not list, as their relays call them.
    names: HashMap<PeerId, String>,
}

impl Router {
    pub(crate) fn new(me: PeerId) -> Router {
        Router {
            me,
            direct: Default::default(),
            neighbors: HashMap::new(),
            routes: HashMap::new(),
            names: HashMap::new(),
        }
    }

    fn direct(&self) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = self.direct.iter().copied().collect();
        v.sort();
        v
    }

    /// The relay for `peer` (`None`: direct, or unreachable).
    pub(crate) fn via(&self, peer: PeerId) -> Option<PeerId> {
        if self.direct.contains(&peer) {
            None
        } else {
            self.routes.get(&peer).copied()
        }
    }

    /// Recomputes the routes; returns the peers that became reachable through a relay and
    /// those that no longer are (neither includes direct peers).
    pub(crate) fn recompute(&mut self) -> (Vec<PeerId>, Vec<PeerId>) {
        let mut routes: HashMap<PeerId, PeerId> = HashMap::new();
        let mut relays: Vec<&PeerId> = self.neighbors.keys().collect();
        relays.sort();
        for relay in relays {
            if !self.direct.contains(relay) {
                continue;
            }
            for t in &self.neighbors[relay] {
                if *t != self.me && !self.direct.contains(t) {
                    routes.entry(*t).or_insert(*relay);
                }
            }
        }
        let added = routes
            .keys()
            .filter(|t| !self.routes.contains_key(*t))
            .copied()
            .collect();
        let lost = self
            .routes
            .keys()
            .filter(|t| !routes.contains_key(*t) && !self.direct.contains(*t))
            .copied()
            .collect();
        self.routes = routes;
        (added, lost)
    }
}

#[cfg(test)]
mod router_tests {
    use super::*;

    #[test]
    fn a_neighbor_of_a_neighbor_is_routed_and_forgotten_with_it() {
        let (a, b, c) = (PeerId([1; 32]), PeerId([2; 32]), PeerId([3; 32]));
        let mut r = Router::new(a);
        r.direct.insert(b);
        r.neighbors.insert(b, vec![a, c]);
        assert_eq!(r.recompute(), (vec![c], vec![]));
        assert_eq!(r.via(c), Some(b));
        assert_eq!(r.via(b), None);
        // C connects directly: no route needed, nothing "lost".
        r.direct.insert(c);
        assert_eq!(r.recompute(), (vec![], vec![]));
        assert_eq!(r.via(c), None);
        // B goes away while C is not direct: C is lost.
        r.direct.remove(&c);
        r.recompute();
        r.direct.remove(&b);
        r.neighbors.remove(&b);
        assert_eq!(r.recompute(), (vec![], vec![c]));
        assert_eq!(r.via(c), None);
    }
}
