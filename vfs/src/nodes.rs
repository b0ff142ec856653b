//! The node table: which backing inodes the kernel knows, by node id, with the `O_PATH` fd that
//! pins each one and the name it was last seen under (so a node's path can be built for locks,
//! and a symlink reached for its xattrs).
//!
//! A node lives while the kernel holds references to it (lookups not yet forgotten) or while a
//! child node names it as parent: a path can always be built for every node that still has a
//! name. Node ids are backing inode numbers (root = 1); the pinned fd keeps the number from being
//! reused while the id is known.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use peerfs_proto::RelPath;

use crate::{FileKind, NodeId, ROOT};

/// First id handed to inodes whose number cannot serve as their id (another device mounted
/// inside the watch set, or inode number 1 below the root).
const FOREIGN_BASE: NodeId = 1 << 56;

struct Node {
    fd: Arc<OwnedFd>,
    kind: FileKind,
    /// References the kernel holds (lookups not yet forgotten).
    refs: u64,
    /// Child nodes whose `loc` names this node as parent.
    children: u64,
    /// Where the node was last seen: parent and name. None once that name was unlinked or
    /// replaced (the node may live on, open or under another hard link).
    loc: Option<(NodeId, OsString)>,
    /// (dev, ino) for nodes with a foreign id, so the id can be released.
    foreign_key: Option<(u64, u64)>,
}

pub(crate) struct NodeTable {
    root_dev: u64,
    root_ino: u64,
    nodes: HashMap<NodeId, Node>,
    /// (parent, name) → node, for every node with a `loc`.
    by_name: HashMap<(NodeId, OsString), NodeId>,
    foreign: HashMap<(u64, u64), NodeId>,
    next_foreign: NodeId,
    /// Nodes whose name now leads to another inode because the backing folder changed behind
    /// the kernel (a peer's update): found so by a lookup, or marked by the replicator.
    replaced: std::collections::HashSet<NodeId>,
}

impl NodeTable {
    pub(crate) fn new(root_fd: Arc<OwnedFd>, root_dev: u64, root_ino: u64) -> NodeTable {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                fd: root_fd,
                kind: FileKind::Dir,
                refs: 1,
                children: 0,
                loc: None,
                foreign_key: None,
            },
        );
        NodeTable {
            root_dev,
            root_ino,
            nodes,
            by_name: HashMap::new(),
            foreign: HashMap::new(),
            next_foreign: FOREIGN_BASE,
            replaced: std::collections::HashSet::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The node the kernel knows as `parent/name`, if any.
    pub(crate) fn child(&self, parent: NodeId, name: &OsStr) -> Option<NodeId> {
        self.by_name.get(&(parent, name.to_os_string())).copied()
    }

    pub(crate) fn get(&self, id: NodeId) -> Option<(Arc<OwnedFd>, FileKind)> {
        self.nodes.get(&id).map(|n| (n.fd.clone(), n.kind))
    }

    /// The node id for a backing (dev, ino), allocating a foreign id if needed.
    fn id_for(&mut self, dev: u64, ino: u64) -> NodeId {
        if (dev, ino) == (self.root_dev, self.root_ino) {
            ROOT
        } else if dev == self.root_dev && ino != ROOT && ino < FOREIGN_BASE {
            ino
        } else if let Some(id) = self.foreign.get(&(dev, ino)) {
            *id
        } else {
            let id = self.next_foreign;
            self.next_foreign += 1;
            self.foreign.insert((dev, ino), id);
            id
        }
    }

    /// Records one kernel reference to the inode (`dev`, `ino`) behind `fd`, found as
    /// `parent/name` if `at` is given. Returns its node id.
    pub(crate) fn remember(
        &mut self,
        fd: OwnedFd,
        dev: u64,
        ino: u64,
        kind: FileKind,
        at: Option<(NodeId, &OsStr)>,
    ) -> NodeId {
        let id = self.id_for(dev, ino);
        // ext4 reuses inode numbers: a node the table knows as unlinked or replaced that a
        // lookup now finds under a name is a new file with the old number. It takes the new
        // descriptor and is live again (open handles keep their own descriptors).
        let reused = at.is_some()
            && self
                .nodes
                .get(&id)
                .is_some_and(|n| n.loc.is_none() && id != ROOT)
            || at.is_some() && self.replaced.contains(&id);
        match self.nodes.get_mut(&id) {
            Some(n) if reused => {
                n.refs += 1;
                n.fd = Arc::new(fd);
                n.kind = kind;
                self.replaced.remove(&id);
            }
            Some(n) => n.refs += 1,
            None => {
                let foreign_key = (id >= FOREIGN_BASE).then_some((dev, ino));
                self.nodes.insert(
                    id,
                    Node {
                        fd: Arc::new(fd),
                        kind,
                        refs: 1,
                        children: 0,
                        loc: None,
                        foreign_key,
                    },
                );
            }
        }
        if let Some((parent, name)) = at {
            if id != ROOT {
                self.set_loc_replacing(id, Some((parent, name.to_os_string())), true);
            }
        }
        id
    }

    /// Takes one more kernel reference to a node already in the table.
    pub(crate) fn add_ref(&mut self, id: NodeId) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.refs += 1;
        }
    }

    /// Drops `n` kernel references to `id`.
    pub(crate) fn forget(&mut self, id: NodeId, n: u64) {
        if id == ROOT {
            return;
        }
        match self.nodes.get_mut(&id) {
            Some(node) => node.refs = node.refs.saturating_sub(n),
            None => {
                tracing::debug!(id, "forget of an unknown node");
                return;
            }
        }
        self.collect(id);
    }

    /// Removes `id` (and then any parents) once nothing references it any more.
    fn collect(&mut self, mut id: NodeId) {
        loop {
            let Some(node) = self.nodes.get(&id) else {
                return;
            };
            if id == ROOT || node.refs > 0 || node.children > 0 {
                return;
            }
            let Some(node) = self.nodes.remove(&id) else {
                return;
            };
            self.replaced.remove(&id);
            if let Some(key) = node.foreign_key {
                self.foreign.remove(&key);
            }
            let Some((parent, name)) = node.loc else {
                return;
            };
            let key = (parent, name);
            if self.by_name.get(&key) == Some(&id) {
                self.by_name.remove(&key);
            }
            match self.nodes.get_mut(&parent) {
                Some(p) => p.children = p.children.saturating_sub(1),
                None => return,
            }
            id = parent;
        }
    }

    /// Moves `id` to a new location (or none), keeping parent child counts and the name index.
    fn set_loc(&mut self, id: NodeId, loc: Option<(NodeId, OsString)>) {
        self.set_loc_replacing(id, loc, false);
    }

    /// Whether `id`, or a folder it was last seen in, was replaced by a peer's update (a
    /// file below a folder a peer removed or moved away has no path here any more, but the
    /// kernel may still reach it through names it cached).
    pub(crate) fn is_replaced_here_or_above(&self, id: NodeId) -> bool {
        let mut cur = id;
        for _ in 0..4096 {
            if self.replaced.contains(&cur) {
                return true;
            }
            match self.nodes.get(&cur).and_then(|n| n.loc.as_ref()) {
                Some((parent, _)) if cur != ROOT => cur = *parent,
                _ => return false,
            }
        }
        false
    }

    /// Marks `id` as replaced by a peer's update (see `is_replaced_here_or_above`).
    pub(crate) fn mark_replaced(&mut self, id: NodeId) {
        if self.nodes.contains_key(&id) {
            self.replaced.insert(id);
        }
    }

    /// [`Self::set_loc`]; `replacing`: a lookup found `id` under a name the kernel knew as
    /// another node, so that node was replaced behind the kernel's back.
    fn set_loc_replacing(&mut self, id: NodeId, loc: Option<(NodeId, OsString)>, replacing: bool) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        if node.loc == loc {
            return;
        }
        let old = std::mem::replace(&mut node.loc, loc.clone());
        // Someone else was known under the new name: that name is now ours.
        if let Some(key) = loc {
            if let Some(prev) = self.by_name.insert(key.clone(), id) {
                if prev != id {
                    if replacing {
                        self.replaced.insert(prev);
                    }
                    self.clear_loc_of(prev);
                }
            }
            if let Some(p) = self.nodes.get_mut(&key.0) {
                p.children += 1;
            }
        }
        if let Some(key) = old {
            if self.by_name.get(&key) == Some(&id) {
                self.by_name.remove(&key);
            }
            if let Some(p) = self.nodes.get_mut(&key.0) {
                p.children = p.children.saturating_sub(1);
            }
            self.collect(key.0);
        }
    }

    /// Forgets where `id` lives (its name went away).
    fn clear_loc_of(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let Some((parent, name)) = node.loc.take() else {
            return;
        };
        let key = (parent, name);
        if self.by_name.get(&key) == Some(&id) {
            self.by_name.remove(&key);
        }
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.children = p.children.saturating_sub(1);
        }
        self.collect(parent);
        self.collect(id);
    }

    /// A peer's update took `parent/name` away (removed, replaced or moved out of sight): the
    /// node known there keeps serving its open handles only (see `is_replaced_here_or_above`)
    /// and loses the name. Returns it.
    pub(crate) fn replaced_at(&mut self, parent: NodeId, name: &OsStr) -> Option<NodeId> {
        let old = self.child(parent, name);
        if let Some(old) = old {
            self.mark_replaced(old);
        }
        self.unlinked(parent, name);
        old
    }

    /// `parent/name` was unlinked or removed.
    pub(crate) fn unlinked(&mut self, parent: NodeId, name: &OsStr) {
        if let Some(id) = self.by_name.get(&(parent, name.to_os_string())).copied() {
            self.clear_loc_of(id);
        }
    }

    /// `parent/name` was renamed to `newparent/newname` (or swapped with it).
    pub(crate) fn renamed(
        &mut self,
        parent: NodeId,
        name: &OsStr,
        newparent: NodeId,
        newname: &OsStr,
        exchange: bool,
    ) {
        let from = (parent, name.to_os_string());
        let to = (newparent, newname.to_os_string());
        let moved = self.by_name.get(&from).copied();
        let other = self.by_name.get(&to).copied();
        if exchange {
            // Detach both first so neither move evicts the other.
            if let Some(id) = moved {
                self.detach(id);
            }
            if let Some(id) = other {
                self.detach(id);
            }
            if let Some(id) = moved {
                self.set_loc(id, Some(to));
            }
            if let Some(id) = other {
                self.set_loc(id, Some(from));
            }
        } else if let Some(id) = moved {
            // set_loc evicts whatever was known under the target name.
            self.set_loc(id, Some(to));
        } else if let Some(id) = other {
            self.clear_loc_of(id);
        }
    }

    /// Clears `id`'s location without collecting anything (it is about to get a new one).
    fn detach(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let Some(key) = node.loc.take() else { return };
        if self.by_name.get(&key) == Some(&id) {
            self.by_name.remove(&key);
        }
        if let Some(p) = self.nodes.get_mut(&key.0) {
            p.children = p.children.saturating_sub(1);
        }
        // The parent stays: the caller immediately re-attaches below some parent, and a
        // momentarily childless parent with kernel references is not collected anyway; if it
        // has none, collecting it now would only make it be looked up again.
        let parent = key.0;
        if self
            .nodes
            .get(&parent)
            .is_some_and(|p| p.refs == 0 && p.children == 0)
        {
            self.collect(parent);
        }
    }

    /// The directory fd and name `id` was last seen under.
    pub(crate) fn loc_of(&self, id: NodeId) -> Option<(Arc<OwnedFd>, OsString)> {
        let (parent, name) = self.nodes.get(&id)?.loc.clone()?;
        Some((self.nodes.get(&parent)?.fd.clone(), name))
    }

    /// The path of `id` from the root, if it still has a name all the way up.
    pub(crate) fn path_of(&self, id: NodeId) -> Option<RelPath> {
        let mut parts: Vec<&OsStr> = Vec::new();
        let mut cur = id;
        while cur != ROOT {
            let (parent, name) = self.nodes.get(&cur)?.loc.as_ref()?;
            parts.push(name);
            cur = *parent;
            if parts.len() > 4096 {
                return None; // a cycle would be a bug; never loop forever on one
            }
        }
        let mut bytes = Vec::new();
        for (i, p) in parts.iter().rev().enumerate() {
            if i > 0 {
                bytes.push(b'/');
            }
            bytes.extend_from_slice(p.as_bytes());
        }
        RelPath::new(&bytes).ok()
    }

    /// The path `parent/name` would have.
    pub(crate) fn child_path(&self, parent: NodeId, name: &OsStr) -> Option<RelPath> {
        let base = self.path_of(parent)?;
        let mut bytes = base.as_bytes().to_vec();
        if !bytes.is_empty() {
            bytes.push(b'/');
        }
        bytes.extend_from_slice(name.as_bytes());
        RelPath::new(&bytes).ok()
    }
}
