//! Reconciliation: the start scan, the summary exchange when two peers (re)connect, and
//! store-and-forward for peers that do not list each other (a relay, "peer parent").
//!
//! **Start scan.** Before the peers connect, every object of the backing folder is compared
//! with the index (size, mtime, inode); a file that differs is re-hashed, and a new content
//! becomes a new local version. Indexed paths no longer there become tombstones. Nothing is
//! queued: the comparison with each peer below finds what they lack.
//!
//! **Comparing with a peer.** Each side sends [`ReplMsg::Summary`] (the digest of its whole
//! tree) once its queue to the other is empty, so the records in flight are applied before the
//! trees are compared. Equal digests end it (one small frame each way). Otherwise the side
//! that sees the difference lists the root's children with their subtree digests
//! ([`ReplMsg::List`]); each side descends only into folders whose digests differ, and for
//! every differing name sends its state ([`ReplMsg::Have`]: kind, content hash, version).
//! A folder (or part of one) with more than [`LIST_THRESHOLD`] children is not listed by
//! name: its children are partitioned into [`BUCKET_FANOUT`] buckets by a hash of their names
//! and only the buckets' digests travel ([`ReplMsg::Buckets`]); the other side lists only
//! the buckets whose digests differ, recursively (six more bits of the hash per level). One
//! changed name in a folder of N children then costs about 1 KiB per level and a listing of
//! at most [`LIST_THRESHOLD`] names, not N names.
//! Seeing the other's state, each side queues its own version for the other exactly when the
//! other would take it ([`crate::catalog::decide`] from the other's point of view): newer,
//! concurrent (both are queued and both sides keep the same winner and conflict copy), or a
//! tombstone that dominates. Transfers then use the ordinary stream. When a side's queue
//! drains after a round it sends a new summary, until the digests agree (bounded rounds).
//!
//! **Relay.** A change applied from peer S is queued for every other peer P unless S and P
//! list each other (they then exchange it directly); each peer tells the others whom its
//! config lists in its summary. A change that changes nothing here is not forwarded, so
//! nothing loops.

use std::collections::{BTreeMap, HashSet};

use peerfs_proto::msg::{BUCKET_FANOUT, Bucket, Digest, ListItem, MAX_BUCKET_LEVEL, MAX_ITEMS};

use super::versions::{gone, kind_of};
use super::*;
use crate::catalog::{bucket_hash, decide, leaf_digest, max_clock, xor};
use crate::store::CatEntry;

/// Comparison rounds in a row that may queue something before the comparison pauses (a path
/// that keeps differing is reported instead of looping): the default of
/// [`Config::recon_rounds`].
pub const RECON_ROUNDS: u64 = 8;
/// How long the first pause lasts (the default of [`Config::recon_pause`]); each further pause
/// on the connection doubles it, up to [`PAUSE_MAX`]. Differences can take more rounds than
/// that to settle without any loop (three peers passing one change around), and must not wait
/// for the next reconnection.
pub const RECON_PAUSE: Duration = Duration::from_secs(4);
const PAUSE_MAX: Duration = Duration::from_secs(300);
/// A round counts as over when no message of it arrived for this long.
const ROUND_QUIET: Duration = Duration::from_millis(300);
/// Conflicts kept for `status`.
const MAX_CONFLICT_NOTES: usize = 100;
/// A listing of more live children than this sends bucket digests instead of names.
const LIST_THRESHOLD: usize = 64;
/// Large folders whose children's digests are kept between the messages of a comparison
/// (valid while the index does not change).
const CHILDREN_CACHE: usize = 4;

/// One child of a folder, as the comparison sees it.
pub(super) struct Child {
    name: Vec<u8>,
    /// [`bucket_hash`] of the name.
    hash: u64,
    kind: Kind,
    /// The digest of it with everything below it (zero for a tombstone).
    digest: Digest,
}

/// (index generation, folder, its children by name).
type CachedChildren = (u64, Vec<u8>, Arc<Vec<Child>>);

/// A conflict copy made here, for `status` and the log.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ConflictNote {
    pub path: String,
    pub copy: String,
    /// The peer whose version became the copy, and when it was made (UTC minutes).
    pub peer: String,
    pub time: String,
}

/// What the start scan found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ScanReport {
    /// False while the scan runs (peers are compared only after it).
    pub done: bool,
    pub files: u64,
    pub changed: u64,
    pub removed: u64,
    pub ms: u64,
}

/// Reconciliation with one peer, for `status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SyncProgress {
    /// `offline`, `comparing`, `syncing` or `in-sync`.
    pub state: String,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub recv_files_done: u64,
    pub recv_files_total: u64,
    pub recv_bytes_done: u64,
    pub recv_bytes_total: u64,
    pub rounds: u64,
    /// Times the comparison paused after `Config::recon_rounds` rounds without agreeing.
    pub paused: u64,
}

#[derive(Default)]
pub(super) struct Shared {
    conflicts: Mutex<VecDeque<ConflictNote>>,
    scan: Mutex<ScanReport>,
    children: Mutex<VecDeque<CachedChildren>>,
}

/// Per-peer reconciliation state (reset on every connection).
#[derive(Default)]
pub(super) struct PeerRecon {
    /// Send a summary once the queue to this peer is empty.
    want_summary: bool,
    /// After a round: send a summary once the round has been quiet until then (the trees
    /// may agree now without either side having queued anything).
    summary_due: Option<Instant>,
    comparing: bool,
    in_sync: bool,
    /// Rounds run on this connection (for `status`).
    rounds: u64,
    /// Pauses on this connection (for `status`).
    paused: u64,
    /// Rounds run since the digests last agreed (bounded by `Config::recon_rounds`).
    streak: u64,
    /// Paused after `Config::recon_rounds` rounds: comparing again from then.
    resume_at: Option<Instant>,
    /// Pauses since the digests last agreed.
    pauses: u32,
    /// Listings (folder, bucket) sent or received in this round: each is compared once.
    lists_sent: HashSet<(Vec<u8>, Bucket)>,
    haves_sent: HashSet<Vec<u8>>,
    /// A listing arriving in several frames.
    partial: Option<(Vec<u8>, Bucket, Vec<ListItem>)>,
    files_total: u64,
    bytes_total: u64,
    acked_base: u64,
    sent_base: u64,
    recv_files_total: u64,
    recv_bytes_total: u64,
    recv_files_base: u64,
    recv_bytes_base: u64,
}

impl PeerRecon {
    /// Compare digests with the peer once things have been quiet for a moment.
    pub(super) fn compare_soon(&mut self) {
        self.summary_due = Some(Instant::now() + ROUND_QUIET);
    }
}

impl Inner {
    // --- connection life -------------------------------------------------------------------

    /// A new connection to peer `i`: compare once its queue is empty.
    pub(super) fn recon_connected(&self, p: &Peer, st: &mut PeerState) {
        st.recon = PeerRecon {
            want_summary: true,
            files_total: self.store.len(&p.key).unwrap_or(0),
            bytes_total: self.store.bytes_pending(&p.key).unwrap_or(0),
            acked_base: p.counters.records_acked.load(Ordering::Relaxed),
            sent_base: p.counters.content_bytes_sent.load(Ordering::Relaxed),
            recv_files_base: p.counters.records_applied.load(Ordering::Relaxed),
            recv_bytes_base: p.counters.content_bytes_received.load(Ordering::Relaxed),
            ..PeerRecon::default()
        };
    }

    /// Called by the sender when it has nothing to send: the summary, if one is due.
    pub(super) fn maybe_summary(&self, p: &Peer) {
        {
            let mut st = p.state.lock();
            let due = st.recon.summary_due.is_some_and(|d| Instant::now() >= d);
            if !st.connected || !st.inflight.is_empty() || !(st.recon.want_summary || due) {
                return;
            }
            st.recon.want_summary = false;
            st.recon.summary_due = None;
        }
        self.send_summary(p, false);
    }

    /// How long an idle sender may sleep before a due summary.
    pub(super) fn idle_wait(st: &PeerState) -> Duration {
        match st.recon.summary_due {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(5), Duration::from_secs(1)),
            None => Duration::from_secs(1),
        }
    }

    /// A round's message was handled, or something from `p` changed this tree (an applied
    /// record): compare digests with it once things are quiet. Replication alone does not
    /// guarantee agreement: a receiver may keep a version as a conflict copy that its sender
    /// never makes (the sender's own version moved on), a relay may have been away, ... The
    /// comparison finds any such difference while connected, not only at the next
    /// reconnection; when nothing differs it costs two summaries.
    pub(super) fn compare_when_quiet(&self, p: &Peer) {
        p.state.lock().recon.compare_soon();
        p.wake.notify_all();
    }

    /// Something from a peer changed this tree: compare with every connected peer once
    /// things are quiet, not only with that one. Replication does not always carry the
    /// change on: a version that came back from a comparison, or as the answer to a stale
    /// record, was nothing new to its sender, so it sends it to no one else, and a peer that
    /// shares a link with the sender relays nothing (the sender would). Without this a third
    /// peer that agreed with both earlier keeps its old version, and both links still read
    /// "in-sync".
    pub(super) fn compare_all_when_quiet(&self) {
        for p in &self.peers {
            if p.state.lock().connected {
                self.compare_when_quiet(p);
            }
        }
    }

    fn send_summary(&self, p: &Peer, reply: bool) {
        let sum = self.store.dir_sum(b"").unwrap_or_default();
        let configured = self.cfg.peers.iter().map(|(id, _)| *id).collect();
        self.transport.send(
            p.id,
            ReplMsg::Summary {
                digest: sum.digest,
                files: sum.files,
                bytes: sum.bytes,
                configured,
                reply,
            },
            true,
        );
    }

    pub(super) fn sync_progress(&self, p: &Peer, st: &PeerState, queue: u64) -> SyncProgress {
        let r = &st.recon;
        // What a counter grew by since the connection began.
        let since = |c: &AtomicU64, base: u64| c.load(Ordering::Relaxed).saturating_sub(base);
        let acked = since(&p.counters.records_acked, r.acked_base);
        let sent = since(&p.counters.content_bytes_sent, r.sent_base);
        let applied = since(&p.counters.records_applied, r.recv_files_base);
        let received = since(&p.counters.content_bytes_received, r.recv_bytes_base);
        let state = if self.scanning.load(Ordering::SeqCst) {
            "scanning"
        } else if !st.connected {
            "offline"
        } else if queue > 0 {
            "syncing"
        } else if r.in_sync && !r.comparing {
            "in-sync"
        } else {
            "comparing"
        };
        // Queue sizes count operations by an estimate: an empty queue means all of it is done.
        let drained = st.connected && queue == 0;
        let (acked, sent) = if drained {
            (r.files_total, r.bytes_total)
        } else {
            (acked, sent)
        };
        let (applied, received) = if r.in_sync && drained {
            (r.recv_files_total, r.recv_bytes_total)
        } else {
            (applied, received)
        };
        SyncProgress {
            state: state.into(),
            files_done: acked.min(r.files_total),
            files_total: r.files_total,
            bytes_done: sent.min(r.bytes_total),
            bytes_total: r.bytes_total,
            recv_files_done: applied.min(r.recv_files_total),
            recv_files_total: r.recv_files_total,
            recv_bytes_done: received.min(r.recv_bytes_total),
            recv_bytes_total: r.recv_bytes_total,
            rounds: r.rounds,
            paused: r.paused,
        }
    }

    pub(super) fn conflicts(&self) -> Vec<ConflictNote> {
        self.recon.conflicts.lock().iter().cloned().collect()
    }

    pub(super) fn scan_report(&self) -> ScanReport {
        self.recon.scan.lock().clone()
    }

    pub(super) fn note_conflict(&self, path: &RelPath, copy: &RelPath, loser: &Version) {
        tracing::warn!(path = %path, copy = %copy, peer = %loser.origin_name, "conflict: concurrent versions; the other is kept as a conflict copy");
        let mut c = self.recon.conflicts.lock();
        if c.len() >= MAX_CONFLICT_NOTES {
            c.pop_front();
        }
        c.push_back(ConflictNote {
            path: path.to_string(),
            copy: copy.to_string(),
            peer: loser.origin_name.clone(),
            time: utc_minutes(loser.time.max(0) as u64),
        });
    }

    // --- queueing for one peer ---------------------------------------------------------------

    /// Appends a record to peer `i`'s queue only (not flushed: the caller flushes).
    pub(super) fn enqueue_to(&self, i: usize, rec: NewRecord) -> io::Result<u64> {
        let p = &self.peers[i];
        let mark = p.state.lock().cursor;
        let seq = self
            .store
            .enqueue_multi(&[(p.key, mark)], rec, false)
            .map_err(ioerr)?
            .first()
            .copied()
            .unwrap_or(0);
        p.wake.notify_all();
        Ok(seq)
    }

    /// Queues for peer `i` what brings its `path` to this server's entry `e`; a folder the
    /// peer lacks goes with everything below it. Returns (records, bytes) queued.
    pub(super) fn push_entry(
        &self,
        i: usize,
        path: &[u8],
        e: &CatEntry,
        whole_dir: bool,
    ) -> io::Result<(u64, u64)> {
        let Some(rel) = path_of_bytes(path) else {
            return Ok((0, 0));
        };
        if e.state.kind == Kind::Gone {
            let bytes = postcard::to_stdvec(&OpRecord {
                op: NsOp::Remove { path: rel.clone() },
                ver: Some(e.state.ver.clone()),
            })
            .map_err(ioerr)?;
            self.enqueue_to(
                i,
                NewRecord {
                    file: FileId(0),
                    kind: RecordKind::Op(bytes),
                    path: path.to_vec(),
                    fence: None,
                    bytes: 64,
                },
            )?;
            return Ok((1, 0));
        }
        let entries = if whole_dir && e.state.kind == Kind::Dir {
            self.store.cat_subtree(path).map_err(ioerr)?
        } else {
            vec![(path.to_vec(), e.clone())]
        };
        let (mut n, mut bytes) = (0, 0);
        for (p, e) in entries {
            if e.state.kind == Kind::Gone {
                continue;
            }
            let id = self
                .store
                .ensure_file_id(Path::new(OsStr::from_bytes(&p)))
                .map_err(ioerr)?;
            let size = if e.state.kind == Kind::File {
                e.state.size
            } else {
                0
            };
            self.enqueue_to(
                i,
                NewRecord {
                    file: id,
                    kind: RecordKind::Content,
                    path: p,
                    fence: None,
                    bytes: size.max(64),
                },
            )?;
            n += 1;
            bytes += size;
        }
        Ok((n, bytes))
    }

    /// Queues this server's attributes of `path` for peer `i`.
    pub(super) fn push_meta(&self, i: usize, path: &[u8]) -> io::Result<()> {
        let id = self
            .store
            .ensure_file_id(Path::new(OsStr::from_bytes(path)))
            .map_err(ioerr)?;
        self.enqueue_to(
            i,
            NewRecord {
                file: id,
                kind: RecordKind::Meta,
                path: path.to_vec(),
                fence: None,
                bytes: 128,
            },
        )?;
        Ok(())
    }

    /// Whether peers `a` and `b` list each other (as far as we know): they then exchange
    /// changes directly and this server does not relay between them.
    fn mutual(&self, a: usize, b: usize) -> bool {
        let lists = |x: usize, y: usize| {
            self.store
                .peer_config(&self.peers[x].key)
                .ok()
                .flatten()
                .is_some_and(|c| c.contains(&self.peers[y].key))
        };
        lists(a, b) && lists(b, a)
    }

    /// Relays a change applied from peer `src` at `path` (this server's entry now) to the peers
    /// that `src` does not exchange with directly.
    pub(super) fn forward(&self, src: usize, path: &[u8]) {
        for j in 0..self.peers.len() {
            if j == src || self.mutual(src, j) {
                continue;
            }
            let Some(e) = self.entry(path) else { continue };
            if let Err(err) = self.push_entry(j, path, &e, false) {
                tracing::warn!(peer = %self.peers[j].name, "replication: cannot relay a change: {err}");
            }
        }
    }

    /// Relays an applied operation record as is (a rename or link keeps its meaning).
    pub(super) fn forward_op(&self, src: usize, path: &RelPath, op: &NsOp, ver: Option<&Version>) {
        let targets: Vec<usize> = (0..self.peers.len())
            .filter(|&j| j != src && !self.mutual(src, j))
            .collect();
        if targets.is_empty() {
            return;
        }
        let Ok(bytes) = postcard::to_stdvec(&OpRecord {
            op: op.clone(),
            ver: ver.cloned(),
        }) else {
            return;
        };
        for j in targets {
            let r = self.enqueue_to(
                j,
                NewRecord {
                    file: FileId(0),
                    kind: RecordKind::Op(bytes.clone()),
                    path: path.as_bytes().to_vec(),
                    fence: None,
                    bytes: 64,
                },
            );
            if let Err(err) = r {
                tracing::warn!(peer = %self.peers[j].name, "replication: cannot relay a change: {err}");
            }
        }
    }

    // --- the comparison -----------------------------------------------------------------------

    /// A reconciliation message from peer `i` (on its receiver thread, in stream order).
    pub(super) fn on_recon(&self, i: usize, msg: ReplMsg) {
        let p = self.peers[i].clone();
        let r = match msg {
            ReplMsg::Summary {
                digest,
                configured,
                reply,
                ..
            } => self.on_summary(&p, digest, configured, reply),
            ReplMsg::List {
                dir,
                bucket,
                items,
                more,
            } => self.on_list(i, &p, dir, bucket, items, more),
            ReplMsg::Buckets {
                dir,
                bucket,
                digests,
            } => self.on_buckets(&p, dir, bucket, digests),
            ReplMsg::Have { items } => self.on_have(i, &p, items),
            ReplMsg::Plan { files, bytes } => {
                let mut st = p.state.lock();
                st.recon.recv_files_total = files;
                st.recon.recv_bytes_total = bytes;
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = r {
            tracing::warn!(peer = %p.name, "reconciliation: {e}");
        }
    }

    fn on_summary(
        &self,
        p: &Peer,
        digest: Digest,
        configured: Vec<PeerId>,
        reply: bool,
    ) -> io::Result<()> {
        let conf: Vec<PeerKey> = configured.iter().take(1024).map(|c| c.0).collect();
        // Summaries come after every burst of changes: write only what changed.
        if self.store.peer_config(&p.key).ok().flatten().as_ref() != Some(&conf) {
            self.store.set_peer_config(&p.key, &conf).map_err(ioerr)?;
        }
        if self.store.len(&p.key).unwrap_or(0) > 0 {
            // Ours follows once our queue to it is empty; the comparison happens then.
            p.state.lock().recon.want_summary = true;
            return Ok(());
        }
        let mine = self.store.dir_sum(b"").map_err(ioerr)?;
        let mut st = p.state.lock();
        if mine.digest == digest {
            st.recon.in_sync = true;
            st.recon.comparing = false;
            st.recon.streak = 0;
            st.recon.pauses = 0;
            st.recon.resume_at = None;
            drop(st);
            if !reply {
                // Tell it we agree (it may have compared before its queue drained).
                self.send_summary(p, true);
            }
            return Ok(());
        }
        st.recon.in_sync = false;
        let max_rounds = self.cfg.recon_rounds;
        if st.recon.streak >= max_rounds {
            let now = Instant::now();
            match st.recon.resume_at {
                Some(t) if now >= t => {
                    st.recon.streak = 0;
                    st.recon.resume_at = None;
                }
                Some(_) => return Ok(()),
                None => {
                    let pause = self
                        .cfg
                        .recon_pause
                        .saturating_mul(1 << st.recon.pauses.min(16))
                        .min(PAUSE_MAX);
                    st.recon.pauses += 1;
                    st.recon.paused += 1;
                    st.recon.resume_at = Some(now + pause);
                    // Our summary then starts the next rounds (the peer answers with its own).
                    st.recon.summary_due = Some(now + pause);
                    st.recon.comparing = false;
                    let msg = format!(
                        "reconciliation with {} did not converge after {max_rounds} rounds; comparing again in {:.1} s",
                        p.name,
                        pause.as_secs_f64()
                    );
                    tracing::error!("{msg}");
                    st.last_error = Some(msg);
                    drop(st);
                    p.wake.notify_all();
                    return Ok(());
                }
            }
        }
        st.recon.rounds += 1;
        st.recon.streak += 1;
        st.recon.comparing = true;
        st.recon.lists_sent.clear();
        st.recon.haves_sent.clear();
        st.recon.lists_sent.insert((Vec::new(), Bucket::ALL));
        drop(st);
        self.send_listing(p, b"", Bucket::ALL)
    }

    /// The children of `dir` here (tombstones too), by name, with their digests (a folder's
    /// includes its subtree). Kept for large folders while the index does not change, so a
    /// comparison descending through the buckets of one folder reads it once.
    fn children(&self, dir: &[u8]) -> io::Result<Arc<Vec<Child>>> {
        // Read before the index: a change after this makes the cached copy outdated.
        let generation = self.store.cat_generation();
        {
            let cache = self.recon.children.lock();
            if let Some((_, _, c)) = cache.iter().find(|(g, d, _)| *g == generation && d == dir) {
                return Ok(c.clone());
            }
        }
        let mut out = Vec::new();
        for (name, e) in self.store.cat_children(dir).map_err(ioerr)? {
            let path = join_bytes(dir, &name);
            let mut d = leaf_digest(&path, &e.state);
            if e.state.kind == Kind::Dir {
                d = xor(&d, &self.store.dir_sum(&path).map_err(ioerr)?.digest);
            }
            out.push(Child {
                hash: bucket_hash(&name),
                name,
                kind: e.state.kind,
                digest: d,
            });
        }
        let out = Arc::new(out);
        if out.len() > LIST_THRESHOLD {
            let mut cache = self.recon.children.lock();
            cache.retain(|(g, d, _)| *g == generation && d != dir);
            if cache.len() >= CHILDREN_CACHE {
                cache.pop_front();
            }
            cache.push_back((generation, dir.to_vec(), out.clone()));
        }
        Ok(out)
    }

    /// Sends this server's listing of `bucket` of folder `dir`: its live children by name, or
    /// when they are more than [`LIST_THRESHOLD`], the digests of its sub-buckets.
    fn send_listing(&self, p: &Peer, dir: &[u8], bucket: Bucket) -> io::Result<()> {
        let Some(rel) = path_of_bytes(dir) else {
            return Ok(());
        };
        let kids = self.children(dir)?;
        let live = || {
            kids.iter()
                .filter(move |c| c.kind != Kind::Gone && bucket.contains(c.hash))
        };
        if bucket.level < MAX_BUCKET_LEVEL && live().count() > LIST_THRESHOLD {
            self.transport.send(
                p.id,
                ReplMsg::Buckets {
                    dir: rel,
                    bucket,
                    digests: bucket_digests(&kids, bucket),
                },
                true,
            );
            return Ok(());
        }
        let items: Vec<ListItem> = live()
            .map(|c| ListItem {
                name: ByteBuf(c.name.clone()),
                dir: c.kind == Kind::Dir,
                digest: c.digest,
            })
            .collect();
        let parts: Vec<&[ListItem]> = if items.is_empty() {
            vec![&[][..]]
        } else {
            items.chunks(MAX_ITEMS).collect()
        };
        let n = parts.len();
        for (k, part) in parts.into_iter().enumerate() {
            self.transport.send(
                p.id,
                ReplMsg::List {
                    dir: rel.clone(),
                    bucket,
                    items: part.to_vec(),
                    more: k + 1 < n,
                },
                true,
            );
        }
        Ok(())
    }

    /// The peer's digests of the sub-buckets of `bucket` of `dir`: list ours of those that
    /// differ.
    fn on_buckets(
        &self,
        p: &Peer,
        dir: RelPath,
        bucket: Bucket,
        digests: Vec<Digest>,
    ) -> io::Result<()> {
        bucket
            .validate()
            .map_err(|e| ioerr(format!("refusing a bucket listing of {dir}: {e}")))?;
        if bucket.level >= MAX_BUCKET_LEVEL {
            return Err(ioerr(format!(
                "refusing a bucket listing of {dir}: below the deepest level"
            )));
        }
        if digests.len() != BUCKET_FANOUT {
            return Err(ioerr(format!(
                "refusing a bucket listing of {dir}: {} digests instead of {BUCKET_FANOUT}",
                digests.len()
            )));
        }
        let dirb = dir.as_bytes().to_vec();
        {
            let mut st = p.state.lock();
            st.recon.comparing = true;
            st.recon.lists_sent.insert((dirb.clone(), bucket));
        }
        let mine = bucket_digests(&self.children(&dirb)?, bucket);
        for (slot, (m, t)) in mine.iter().zip(&digests).enumerate() {
            if m == t {
                continue;
            }
            let sub = bucket.child(slot);
            let fresh = p.state.lock().recon.lists_sent.insert((dirb.clone(), sub));
            if fresh {
                self.send_listing(p, &dirb, sub)?;
            }
        }
        self.compare_when_quiet(p);
        Ok(())
    }

    fn on_list(
        &self,
        i: usize,
        p: &Peer,
        dir: RelPath,
        bucket: Bucket,
        items: Vec<ListItem>,
        more: bool,
    ) -> io::Result<()> {
        if items.len() > MAX_ITEMS {
            return Err(ioerr("a listing frame with too many entries"));
        }
        bucket
            .validate()
            .map_err(|e| ioerr(format!("refusing a listing of {dir}: {e}")))?;
        let dirb = dir.as_bytes().to_vec();
        let theirs = {
            let mut st = p.state.lock();
            let partial = match st.recon.partial.take() {
                Some((d, b, mut acc)) if d == dirb && b == bucket => {
                    acc.extend(items);
                    acc
                }
                _ => items,
            };
            if more {
                if partial.len() > 4 * 1024 * 1024 {
                    return Err(ioerr("a folder listing too large"));
                }
                st.recon.partial = Some((dirb, bucket, partial));
                return Ok(());
            }
            st.recon.comparing = true;
            st.recon.lists_sent.insert((dirb.clone(), bucket));
            partial
        };
        let mut outside = 0usize;
        let theirs: BTreeMap<Vec<u8>, ListItem> = theirs
            .into_iter()
            .filter(|it| {
                !it.name.0.is_empty()
                    && !it.name.0.contains(&b'/')
                    && !it.name.0.contains(&0)
                    && it.name.0 != b"."
                    && it.name.0 != b".."
            })
            .filter(|it| {
                let inside = bucket.contains(bucket_hash(&it.name.0));
                outside += usize::from(!inside);
                inside
            })
            .map(|it| (it.name.0.clone(), it))
            .collect();
        if outside > 0 {
            tracing::warn!(peer = %p.name, dir = %dir, outside, "reconciliation: ignoring listed names outside their bucket");
        }
        let kids = self.children(&dirb)?;
        let mine: BTreeMap<&[u8], &Child> = kids
            .iter()
            .filter(|c| bucket.contains(c.hash))
            .map(|c| (&c.name[..], c))
            .collect();
        let mut names: Vec<&[u8]> = theirs
            .keys()
            .map(Vec::as_slice)
            .chain(mine.keys().copied())
            .collect();
        names.sort();
        names.dedup();
        let mut haves = Vec::new();
        let mut lists = Vec::new();
        for name in names {
            let path = join_bytes(&dirb, name);
            let t = theirs.get(name);
            let m = mine.get(name).filter(|c| c.kind != Kind::Gone);
            match (m, t) {
                (Some(c), Some(t)) if c.digest == t.digest => {}
                (Some(c), Some(t)) if c.kind == Kind::Dir && t.dir => lists.push(path),
                _ => haves.push(path),
            }
        }
        for path in lists {
            let fresh = p
                .state
                .lock()
                .recon
                .lists_sent
                .insert((path.clone(), Bucket::ALL));
            if fresh {
                self.send_listing(p, &path, Bucket::ALL)?;
            }
        }
        self.send_haves(p, haves)?;
        let _ = i;
        self.compare_when_quiet(p);
        Ok(())
    }

    /// Sends this server's state of `paths` (those not sent in this round yet).
    fn send_haves(&self, p: &Peer, paths: Vec<Vec<u8>>) -> io::Result<()> {
        let mut items = Vec::new();
        for path in paths {
            if !p.state.lock().recon.haves_sent.insert(path.clone()) {
                continue;
            }
            let Some(rel) = path_of_bytes(&path) else {
                continue;
            };
            items.push((rel, self.entry(&path).map(|e| e.state)));
            if items.len() == MAX_ITEMS {
                self.transport.send(
                    p.id,
                    ReplMsg::Have {
                        items: std::mem::take(&mut items),
                    },
                    true,
                );
            }
        }
        if !items.is_empty() {
            self.transport.send(p.id, ReplMsg::Have { items }, true);
        }
        Ok(())
    }

    fn on_have(
        &self,
        i: usize,
        p: &Peer,
        items: Vec<(RelPath, Option<EntryState>)>,
    ) -> io::Result<()> {
        if items.len() > MAX_ITEMS {
            return Err(ioerr("a state frame with too many entries"));
        }
        let mut reply = Vec::new();
        let (mut files, mut bytes) = (0u64, 0u64);
        for (path, theirs) in items {
            if path.is_root() {
                continue;
            }
            if let Some(t) = &theirs {
                if let Err(e) = t.ver.validate() {
                    tracing::warn!(peer = %p.name, path = %path, "reconciliation: refusing a state: {e}");
                    continue;
                }
                let _ = self.store.observe_clock(max_clock(&t.ver));
            }
            let pb = path.as_bytes().to_vec();
            let ours = self.entry(&pb);
            let same = match (&ours, &theirs) {
                (None, None) => true,
                (Some(o), Some(t)) => o.state == *t,
                (Some(o), None) => o.state.kind == Kind::Gone,
                (None, Some(t)) => t.kind == Kind::Gone,
            };
            if !same {
                reply.push(pb.clone());
            }
            let Some(o) = ours else { continue };
            let (n, b) = self.reconcile_path(i, &pb, &o, theirs.as_ref())?;
            files += n;
            bytes += b;
        }
        self.send_haves(p, reply)?;
        self.compare_when_quiet(p);
        if files > 0 {
            self.store.flush().map_err(ioerr)?;
            let (ft, bt) = {
                let mut st = p.state.lock();
                st.recon.files_total += files;
                st.recon.bytes_total += bytes;
                st.recon.want_summary = true;
                st.recon.in_sync = false;
                (st.recon.files_total, st.recon.bytes_total)
            };
            self.transport.send(
                p.id,
                ReplMsg::Plan {
                    files: ft,
                    bytes: bt,
                },
                true,
            );
            p.wake.notify_all();
        }
        Ok(())
    }

    /// Queues our version of `path` for peer `i` when it would take it.
    fn reconcile_path(
        &self,
        i: usize,
        path: &[u8],
        ours: &CatEntry,
        theirs: Option<&EntryState>,
    ) -> io::Result<(u64, u64)> {
        let Some(t) = theirs else {
            if ours.state.kind == Kind::Gone {
                return Ok((0, 0));
            }
            return self.push_entry(i, path, ours, true);
        };
        if t.kind != Kind::Gone
            && ours.state.kind != Kind::Gone
            && crate::catalog::same_content(t, &ours.state)
        {
            // Same object: versions merge; attributes go the way of the later change.
            self.merge_seen(path, &t.ver.vv)?;
            let newer_meta =
                (ours.state.ver.mclock, ours.state.ver.mpeer) > (t.ver.mclock, t.ver.mpeer);
            if ours.state.mode & 0o777 != t.mode & 0o777 && newer_meta {
                self.push_meta(i, path)?;
                return Ok((1, 0));
            }
            return Ok((0, 0));
        }
        // Would the peer take ours? (Its view: its state is "ours", ours is "theirs".)
        match decide(Some(t), &ours.state) {
            Decision::Apply | Decision::OursLoses | Decision::TheirsLoses => {
                let whole = t.kind != Kind::Dir;
                self.push_entry(i, path, ours, whole)
            }
            Decision::Same | Decision::Stale => Ok((0, 0)),
        }
    }

    pub(super) fn expire_tombstones(&self, retention: Duration) -> usize {
        let cutoff = now_secs().saturating_sub(retention.as_secs().min(i64::MAX as u64) as i64);
        let mut old = Vec::new();
        for r in self.store.cat_all() {
            match r {
                Ok((p, e)) if e.state.kind == Kind::Gone && e.state.ver.time < cutoff => {
                    old.push((p, None))
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("tombstone sweep: unreadable index entry: {e}"),
            }
        }
        let n = old.len();
        for batch in old.chunks(1024) {
            if let Err(e) = self.store.cat_put_many(batch) {
                tracing::warn!("tombstone sweep: {e}");
                return 0;
            }
        }
        if n > 0 {
            tracing::info!(
                expired = n,
                "tombstones older than the trash retention forgotten"
            );
        }
        n
    }

    // --- the start scan ---------------------------------------------------------------------

    /// Compares the backing folder with the index and records what changed while peerfs was
    /// not running.
    pub(super) fn start_scan(&self) {
        let started = Instant::now();
        let mut report = ScanReport::default();
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
        while let Some(dir) = stack.pop() {
            let full = self.cfg.backing.join(OsStr::from_bytes(&dir));
            // The folder is listed, and opened once for all its entries (the `*at` calls of
            // each entry's scan are relative to it).
            let rel = if dir.is_empty() {
                Some(RelPath::root())
            } else {
                path_of_bytes(&dir)
            };
            let opened = rel
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
                .and_then(|r| open_dir(self.root(), &r, false))
                .and_then(|fd| Ok((std::fs::read_dir(&full)?, fd)));
            let (rd, dir_fd) = match opened {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(dir = %full.display(), "start scan: cannot read: {e}");
                    // Unreadable: keep what the index says below it.
                    for (p, _) in self.store.cat_subtree(&dir).unwrap_or_default() {
                        seen.insert(p);
                    }
                    continue;
                }
            };
            for ent in rd.flatten() {
                let name = ent.file_name();
                let nb = name.as_bytes();
                if nb.starts_with(TMP_PREFIX.as_bytes()) {
                    continue;
                }
                let path = join_bytes(&dir, nb);
                let Some(rel) = path_of_bytes(&path) else {
                    continue;
                };
                if self.cfg.filter.as_ref().is_some_and(|f| !f(&rel)) {
                    continue;
                }
                let Ok(cname) = CString::new(nb) else {
                    continue;
                };
                match self.scan_one(dir_fd.as_fd(), &cname, &rel, &mut report) {
                    Ok(Some(Kind::Dir)) => {
                        seen.insert(path.clone());
                        stack.push(path);
                    }
                    Ok(Some(_)) => {
                        seen.insert(path);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(path = %rel, "start scan: {e}");
                        seen.insert(path);
                    }
                }
            }
        }
        // Indexed objects no longer there were removed behind the drive's back.
        let mut gone_paths = Vec::new();
        for r in self.store.cat_all() {
            match r {
                Ok((p, e)) if e.state.kind != Kind::Gone && !seen.contains(&p) => {
                    gone_paths.push((p, e))
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("start scan: unreadable index entry: {e}"),
            }
        }
        for (p, e) in gone_paths {
            // Created through the drive while the scan ran (after it passed that folder).
            if path_of_bytes(&p).is_some_and(|r| self.existing(&r).ok().flatten().is_some()) {
                continue;
            }
            let r = self.store.next_clock().map_err(ioerr).and_then(|clock| {
                let mut v = e.state.ver.clone();
                v.vv = crate::catalog::bump(&v.vv, self.cfg.me, clock);
                v.origin = self.cfg.me;
                v.origin_name = self.cfg.me_name.clone();
                v.time = now_secs();
                self.store
                    .cat_put(
                        &p,
                        Some(&CatEntry {
                            state: gone(v),
                            stamp: None,
                        }),
                    )
                    .map_err(ioerr)
            });
            match r {
                Ok(()) => report.removed += 1,
                Err(err) => tracing::warn!("start scan: cannot record a removal: {err}"),
            }
            let _ = self.store.remove_path(Path::new(OsStr::from_bytes(&p)));
        }
        if let Err(e) = self.store.flush() {
            tracing::warn!("start scan: cannot flush the index: {e}");
        }
        report.ms = started.elapsed().as_millis() as u64;
        report.done = true;
        tracing::info!(
            files = report.files,
            changed = report.changed,
            removed = report.removed,
            ms = report.ms,
            "start scan done"
        );
        *self.recon.scan.lock() = report;
    }

    /// Scans one object, `name` in folder `dir` (`rel` from the root); returns its kind
    /// (`None`: not replicated, e.g. a FIFO).
    fn scan_one(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        rel: &RelPath,
        report: &mut ScanReport,
    ) -> io::Result<Option<Kind>> {
        let st = lstat_at(dir, name)?;
        let Some(kind) = kind_of(&st) else {
            return Ok(None);
        };
        let mode = st.st_mode & 0o7777;
        let changed = match kind {
            Kind::File => {
                report.files += 1;
                let stamp = stamp_of(&st);
                let known = self
                    .entry(rel.as_bytes())
                    .filter(|e| e.state.kind == Kind::File && e.stamp == Some(stamp));
                if let Some(e) = known {
                    if e.state.mode & 0o7777 != mode {
                        self.record_local_meta(rel.as_bytes())?;
                        true
                    } else {
                        false
                    }
                } else {
                    let file = File::from(openat2_beneath(
                        dir,
                        name,
                        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NOATIME,
                        0,
                    )?);
                    let m = Manifest::from_file(&file, st.st_size as u64)?;
                    let id = self
                        .store
                        .ensure_file_id(Path::new(OsStr::from_bytes(rel.as_bytes())))
                        .map_err(ioerr)?;
                    self.record_content(id, &m, stamp)?;
                    self.record_local(
                        rel.as_bytes(),
                        Kind::File,
                        *m.content_hash(),
                        m.size(),
                        mode,
                        Some(stamp),
                        st.st_mtime,
                    )?
                }
            }
            Kind::Dir => self.record_local(
                rel.as_bytes(),
                Kind::Dir,
                [0; 32],
                0,
                mode,
                None,
                now_secs(),
            )?,
            Kind::Symlink => {
                let target = readlinkat(dir, name)?;
                self.record_local(
                    rel.as_bytes(),
                    Kind::Symlink,
                    *blake3::hash(&target).as_bytes(),
                    0,
                    mode,
                    None,
                    st.st_mtime,
                )?
            }
            Kind::Gone => false,
        };
        if changed {
            report.changed += 1;
        }
        Ok(Some(kind))
    }
}

/// The digests of the [`BUCKET_FANOUT`] sub-buckets of `bucket` among `kids` (XOR of their
/// live children's digests; tombstones count as nothing).
fn bucket_digests(kids: &[Child], bucket: Bucket) -> Vec<Digest> {
    let mut out = vec![[0u8; 16]; BUCKET_FANOUT];
    for c in kids
        .iter()
        .filter(|c| c.kind != Kind::Gone && bucket.contains(c.hash))
    {
        let slot = bucket.slot(c.hash);
        out[slot] = xor(&out[slot], &c.digest);
    }
    out
}

/// `dir/name` (`name` alone at the root).
pub(super) fn join_bytes(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}
