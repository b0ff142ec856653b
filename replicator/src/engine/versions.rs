//! Keeping the reconciliation index in step with the tree: every local change becomes a new
//! version (this server's counter in the path's version vector goes up), every applied remote
//! change takes the sender's version, every removal leaves a tombstone.

use peerfs_proto::msg::{EntryState, Kind, Version};

use super::*;
use crate::catalog::{bump, merge, push_history};
use crate::store::CatEntry;

/// Unix seconds now.
pub(super) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A tombstone state carrying `ver`.
pub(super) fn gone(ver: Version) -> EntryState {
    EntryState {
        kind: Kind::Gone,
        hash: [0; 32],
        size: 0,
        mode: 0,
        ver,
    }
}

/// The tombstone that removal (or rename) `ver` leaves where `e` was: it dominates `e`.
fn tomb_over(ver: &Version, e: &EntryState) -> CatEntry {
    let mut v = ver.clone();
    v.vv = merge(&ver.vv, &e.ver.vv);
    CatEntry {
        state: gone(v),
        stamp: None,
    }
}

/// The kind of a stat result, as the index names it (`None`: devices, FIFOs, sockets).
pub(super) fn kind_of(st: &libc::stat) -> Option<Kind> {
    if is_kind(st, libc::S_IFREG) {
        Some(Kind::File)
    } else if is_kind(st, libc::S_IFDIR) {
        Some(Kind::Dir)
    } else if is_kind(st, libc::S_IFLNK) {
        Some(Kind::Symlink)
    } else {
        None
    }
}

impl Inner {
    /// The index entry of `path` (live or tombstone).
    pub(super) fn entry(&self, path: &[u8]) -> Option<CatEntry> {
        match self.store.cat_get(path) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(path = %String::from_utf8_lossy(path), "replication: unreadable index entry: {e}");
                None
            }
        }
    }

    fn put_entries(&self, items: &[(Vec<u8>, Option<CatEntry>)]) -> io::Result<()> {
        self.store.cat_put_many(items).map_err(ioerr)
    }

    /// A new local version replacing `old` (whose vector it dominates).
    fn new_version(&self, old: Option<&EntryState>, hash: &Hash, time: i64) -> io::Result<Version> {
        let clock = self.store.next_clock().map_err(ioerr)?;
        let vv = bump(old.map_or(&[][..], |o| &o.ver.vv[..]), self.cfg.me, clock);
        let history = match old {
            Some(o) if matches!(o.kind, Kind::File | Kind::Symlink) && o.hash != *hash => {
                push_history(&o.ver.history, o.hash)
            }
            Some(o) => o.ver.history.clone(),
            None => Vec::new(),
        };
        let (mclock, mpeer) = match old {
            Some(o) if o.kind != Kind::Gone => (o.ver.mclock, o.ver.mpeer),
            _ => (clock, self.cfg.me),
        };
        Ok(Version {
            vv,
            origin: self.cfg.me,
            origin_name: self.cfg.me_name.clone(),
            time,
            history,
            mclock,
            mpeer,
        })
    }

    /// Records the object the drive (or the start scan) just found at `path`: a new version if
    /// its kind or content changed, new attributes if only its mode did. Returns whether the
    /// index changed.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record_local(
        &self,
        path: &[u8],
        kind: Kind,
        hash: Hash,
        size: u64,
        mode: u32,
        stamp: Option<ScanStamp>,
        time: i64,
    ) -> io::Result<bool> {
        let old = self.entry(path);
        if let Some(o) = &old {
            if o.state.kind == kind && (kind == Kind::Dir || o.state.hash == hash) {
                let mut e = o.clone();
                if stamp.is_some() {
                    e.stamp = stamp;
                }
                e.state.size = size;
                if o.state.mode & 0o7777 != mode & 0o7777 {
                    e.state.mode = mode;
                    e.state.ver.mclock = self.store.next_clock().map_err(ioerr)?;
                    e.state.ver.mpeer = self.cfg.me;
                }
                if e == *o {
                    return Ok(false);
                }
                self.put_entries(&[(path.to_vec(), Some(e))])?;
                return Ok(true);
            }
        }
        let ver = self.new_version(old.as_ref().map(|o| &o.state), &hash, time)?;
        tracing::debug!(me = %self.cfg.me_name, path = %String::from_utf8_lossy(path), ?kind, hash = hash[0], "index: a new local version");
        let mut items = vec![(
            path.to_vec(),
            Some(CatEntry {
                state: EntryState {
                    kind,
                    hash,
                    size,
                    mode,
                    ver,
                },
                stamp,
            }),
        )];
        self.parent_entries(path, &mut items);
        self.put_entries(&items)?;
        Ok(true)
    }

    /// Entries for the folders above `path` that the index lacks (created implicitly, e.g. by
    /// a transfer into a folder this server did not have): recorded from the backing folder.
    pub(super) fn parent_entries(&self, path: &[u8], items: &mut Vec<(Vec<u8>, Option<CatEntry>)>) {
        let mut end = 0;
        let mut parents = Vec::new();
        while let Some(i) = path[end..].iter().position(|b| *b == b'/') {
            parents.push(&path[..end + i]);
            end += i + 1;
        }
        for dir in parents {
            let known = self.entry(dir).is_some_and(|e| e.state.kind == Kind::Dir)
                || items.iter().any(|(p, e)| {
                    p == dir && e.as_ref().is_some_and(|e| e.state.kind == Kind::Dir)
                });
            if known {
                continue;
            }
            let Some(rel) = path_of_bytes(dir) else {
                continue;
            };
            let Ok((st, _)) = self.meta_of(&rel) else {
                continue;
            };
            if !is_kind(&st, libc::S_IFDIR) {
                continue;
            }
            let Ok(clock) = self.store.next_clock() else {
                continue;
            };
            let old = self.entry(dir);
            let vv = bump(
                old.as_ref().map_or(&[][..], |o| &o.state.ver.vv[..]),
                self.cfg.me,
                clock,
            );
            items.push((
                dir.to_vec(),
                Some(CatEntry {
                    state: EntryState {
                        kind: Kind::Dir,
                        hash: [0; 32],
                        size: 0,
                        mode: st.st_mode & 0o7777,
                        ver: Version {
                            vv,
                            origin: self.cfg.me,
                            origin_name: self.cfg.me_name.clone(),
                            time: now_secs(),
                            history: Vec::new(),
                            mclock: 0,
                            mpeer: self.cfg.me,
                        },
                    },
                    stamp: None,
                }),
            ));
        }
    }

    /// Records new attributes (mode) of `path` made here.
    pub(super) fn record_local_meta(&self, path: &[u8]) -> io::Result<()> {
        let Some(mut e) = self.entry(path).filter(|e| e.state.kind != Kind::Gone) else {
            return Ok(());
        };
        let Some(rel) = path_of_bytes(path) else {
            return Ok(());
        };
        let (st, _) = self.meta_of(&rel)?;
        let mode = st.st_mode & 0o7777;
        if e.state.mode & 0o7777 == mode {
            return Ok(());
        }
        e.state.mode = mode;
        e.state.ver.mclock = self.store.next_clock().map_err(ioerr)?;
        e.state.ver.mpeer = self.cfg.me;
        self.put_entries(&[(path.to_vec(), Some(e))])
    }

    /// Tombstones for `path` and everything below it, made here. Returns the removal's version:
    /// it dominates every version removed.
    pub(super) fn tomb_local(&self, path: &[u8]) -> io::Result<Version> {
        let sub = self.store.cat_subtree(path).map_err(ioerr)?;
        let clock = self.store.next_clock().map_err(ioerr)?;
        let mut all: Vec<(PeerId, u64)> = Vec::new();
        for (_, e) in &sub {
            all = merge(&all, &e.state.ver.vv);
        }
        // The contents removed, so a peer whose vector for them differs (its copy arrived by
        // another way) still sees that this removal knew them.
        let mut history = Vec::new();
        for (_, e) in &sub {
            if matches!(e.state.kind, Kind::File | Kind::Symlink) {
                history = push_history(&history, e.state.hash);
            }
        }
        let ver = Version {
            vv: bump(&all, self.cfg.me, clock),
            origin: self.cfg.me,
            origin_name: self.cfg.me_name.clone(),
            time: now_secs(),
            history,
            mclock: clock,
            mpeer: self.cfg.me,
        };
        self.tomb_entries(path, &sub, &ver)?;
        Ok(ver)
    }

    /// Turns `sub` (entries at and below `path`) into tombstones of the removal `ver`.
    pub(super) fn tomb_entries(
        &self,
        path: &[u8],
        sub: &[(Vec<u8>, CatEntry)],
        ver: &Version,
    ) -> io::Result<()> {
        let mut items = Vec::with_capacity(sub.len() + 1);
        let mut top = false;
        for (p, e) in sub {
            if p == path || e.state.kind != Kind::Gone {
                top |= p == path;
                items.push((p.clone(), Some(tomb_over(ver, &e.state))));
            }
        }
        if !top {
            items.push((
                path.to_vec(),
                Some(CatEntry {
                    state: gone(ver.clone()),
                    stamp: None,
                }),
            ));
        }
        self.put_entries(&items)
    }

    /// A local rename: the entries at and below `from` move to `to` (the object renamed takes
    /// a new version that dominates whatever `to` held), tombstones stay at the old paths.
    /// Returns the version of the object now at `to`.
    pub(super) fn rename_local(&self, from: &[u8], to: &[u8]) -> io::Result<Option<Version>> {
        let sub = self.store.cat_subtree(from).map_err(ioerr)?;
        let Some((_, top)) = sub
            .first()
            .filter(|(p, e)| p == from && e.state.kind != Kind::Gone)
        else {
            return Ok(None);
        };
        let clock = self.store.next_clock().map_err(ioerr)?;
        let old_to = self.entry(to);
        // The content renamed, as its own ancestor (first: receivers read it as what the
        // rename moved), then the file it replaces: a peer holding that one at `to` sees the
        // rename descend from it. The replaced file's vector is not merged in: its counters
        // come from another name's changes, and the renamed file's versions would then look
        // newer than edits of the renamed name it never saw (a peer overwrote one).
        let mut history = if matches!(top.state.kind, Kind::File | Kind::Symlink) {
            push_history(&top.state.ver.history, top.state.hash)
        } else {
            top.state.ver.history.clone()
        };
        // A name emptied just before (a save that moved or deleted the original first, then
        // renamed its new file in): the content last there, which its tombstone names first.
        let replaced = old_to.as_ref().and_then(|o| match o.state.kind {
            Kind::File | Kind::Symlink => Some(o.state.hash),
            Kind::Gone => o.state.ver.history.first().copied(),
            Kind::Dir => None,
        });
        if let Some(h) = replaced {
            if !history.contains(&h) {
                history.insert(history.len().min(1), h);
                history.truncate(peerfs_proto::msg::MAX_HISTORY);
            }
        }
        let ver = Version {
            vv: bump(&top.state.ver.vv, self.cfg.me, clock),
            origin: self.cfg.me,
            origin_name: self.cfg.me_name.clone(),
            time: now_secs(),
            history,
            mclock: top.state.ver.mclock,
            mpeer: top.state.ver.mpeer,
        };
        self.rename_entries(from, to, &sub, &ver, None)?;
        Ok(Some(ver))
    }

    /// Moves `sub` (the entries at and below `from`) to `to`; the top takes `ver`, the old
    /// paths become tombstones that dominate what they held, and whatever the index had at
    /// and below `to` is replaced. `renamed`: the content the renamer moved (a rename's
    /// version names it first in its history); a file here with other content moves with its
    /// own version, so the renamer's newer content still counts as newer afterwards.
    pub(super) fn rename_entries(
        &self,
        from: &[u8],
        to: &[u8],
        sub: &[(Vec<u8>, CatEntry)],
        ver: &Version,
        renamed: Option<&Hash>,
    ) -> io::Result<()> {
        let mut items: Vec<(Vec<u8>, Option<CatEntry>)> = Vec::new();
        let replaced = self.store.cat_subtree(to).map_err(ioerr)?;
        let mut moved: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        for (p, e) in sub {
            if e.state.kind == Kind::Gone && p != from {
                continue;
            }
            let new_path = [to, &p[from.len()..]].concat();
            let other_content = matches!(e.state.kind, Kind::File | Kind::Symlink)
                && renamed.is_some_and(|h| *h != e.state.hash);
            let state = if p == from && !other_content {
                EntryState {
                    ver: ver.clone(),
                    ..e.state.clone()
                }
            } else {
                e.state.clone()
            };
            // The tombstone knows what was here, not what the rename replaced at `to` (its
            // version names that too): a peer that moved that file here meanwhile keeps it.
            let mut left = tomb_over(ver, &e.state);
            left.state.ver.history = if matches!(e.state.kind, Kind::File | Kind::Symlink) {
                push_history(&e.state.ver.history, e.state.hash)
            } else {
                e.state.ver.history.clone()
            };
            items.push((p.clone(), Some(left)));
            moved.insert(new_path.clone());
            items.push((
                new_path,
                Some(CatEntry {
                    state,
                    stamp: e.stamp,
                }),
            ));
        }
        for (p, e) in replaced {
            if !moved.contains(&p) && e.state.kind != Kind::Gone {
                items.push((p, Some(tomb_over(ver, &e.state))));
            }
        }
        self.parent_entries(to, &mut items);
        self.put_entries(&items)
    }

    /// Records a version received from a peer at `path` (`ours`' vector merged in: this server
    /// has seen both), with the backing object's stamp.
    pub(super) fn record_remote(
        &self,
        path: &[u8],
        mut state: EntryState,
        ours: Option<&EntryState>,
        stamp: Option<ScanStamp>,
    ) -> io::Result<()> {
        if let Some(o) = ours {
            state.ver.vv = merge(&state.ver.vv, &o.ver.vv);
        }
        let mut items = vec![(path.to_vec(), Some(CatEntry { state, stamp }))];
        self.parent_entries(path, &mut items);
        self.put_entries(&items)
    }

    /// Merges `vv` into the entry of `path` (this server has seen that version too).
    pub(super) fn merge_seen(&self, path: &[u8], vv: &[(PeerId, u64)]) -> io::Result<()> {
        if let Some(mut e) = self.entry(path) {
            let m = merge(&e.state.ver.vv, vv);
            if m != e.state.ver.vv {
                e.state.ver.vv = m;
                self.put_entries(&[(path.to_vec(), Some(e))])?;
            }
        }
        Ok(())
    }
}
