//! Snapshots of a whole directory tree (everything a user can observe except inode numbers,
//! devices and times) and a readable diff between two of them.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::errno::{Outcome, outcome};
use crate::sys::{self, On};

/// File type as seen by `lstat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    pub fn of(ft: fs::FileType) -> Kind {
        if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else if ft.is_char_device() {
            Kind::CharDev
        } else {
            Kind::BlockDev
        }
    }
}

/// What a snapshot records of one name.
#[derive(Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    /// `st_size`, except for directories (whose size depends on their history).
    pub size: Option<u64>,
    pub content: Option<Vec<u8>>,
    pub target: Option<Vec<u8>>,
    pub rdev: u64,
    /// All xattrs (`llistxattr` + `lgetxattr`), or the errno listing or reading them gave.
    pub xattrs: Outcome<BTreeMap<String, Vec<u8>>>,
    /// The other paths in the tree that are hard links to the same inode.
    pub links: Vec<String>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} mode {:o} uid {} gid {} nlink {}",
            self.kind, self.mode, self.uid, self.gid, self.nlink
        )?;
        if let Some(s) = self.size {
            write!(f, " size {s}")?;
        }
        if let Some(t) = &self.target {
            write!(f, " -> {:?}", String::from_utf8_lossy(t))?;
        }
        if self.rdev != 0 {
            write!(f, " rdev {:#x}", self.rdev)?;
        }
        match &self.xattrs {
            Ok(x) if x.is_empty() => {}
            Ok(x) => write!(f, " xattrs {:?}", x.keys().collect::<Vec<_>>())?,
            Err(e) => write!(f, " xattrs {e:?}")?,
        }
        if !self.links.is_empty() {
            write!(f, " links {:?}", self.links)?;
        }
        Ok(())
    }
}

/// Relative path (`"."` for the root) to node.
pub type Snapshot = BTreeMap<String, Node>;

/// Snapshots the tree under `root`, root included (as `"."`). Symlinks are not followed.
pub fn snapshot(root: &Path) -> io::Result<Snapshot> {
    let mut out = Snapshot::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    walk(root, root, &mut out, &mut inodes)?;
    for paths in inodes.values() {
        if paths.len() > 1 {
            for p in paths {
                let others: Vec<String> = paths.iter().filter(|q| *q != p).cloned().collect();
                if let Some(n) = out.get_mut(p) {
                    n.links = others;
                }
            }
        }
    }
    Ok(out)
}

fn rel(root: &Path, path: &Path) -> String {
    match path.strip_prefix(root) {
        Ok(r) if r.as_os_str().is_empty() => ".".to_owned(),
        Ok(r) => String::from_utf8_lossy(r.as_os_str().as_bytes()).into_owned(),
        Err(_) => String::from_utf8_lossy(path.as_os_str().as_bytes()).into_owned(),
    }
}

fn xattrs_of(path: &Path) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let mut xattrs = BTreeMap::new();
    for x in sys::listxattr_on(On::Link(path))? {
        let v = sys::getxattr_on(On::Link(path), &x)?;
        xattrs.insert(x, v);
    }
    Ok(xattrs)
}

fn walk(
    root: &Path,
    path: &Path,
    out: &mut Snapshot,
    inodes: &mut BTreeMap<u64, Vec<String>>,
) -> io::Result<()> {
    let md = fs::symlink_metadata(path)?;
    let kind = Kind::of(md.file_type());
    let name = rel(root, path);
    let xattrs = outcome(xattrs_of(path));
    let node = Node {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        nlink: md.nlink(),
        size: (kind != Kind::Dir).then_some(md.size()),
        content: (kind == Kind::File).then(|| fs::read(path)).transpose()?,
        target: (kind == Kind::Symlink)
            .then(|| fs::read_link(path).map(|t| t.as_os_str().as_bytes().to_vec()))
            .transpose()?,
        rdev: md.rdev(),
        xattrs,
        links: Vec::new(),
    };
    if kind != Kind::Dir {
        inodes.entry(md.ino()).or_default().push(name.clone());
    }
    out.insert(name, node);
    if kind == Kind::Dir {
        let mut children: Vec<_> = fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<_>>()?;
        children.sort();
        for c in children {
            walk(root, &c, out, inodes)?;
        }
    }
    Ok(())
}

/// Differences of `got` against `expected`, one human-readable line each; empty if equal.
pub fn diff(got: &Snapshot, expected: &Snapshot) -> Vec<String> {
    let mut lines = Vec::new();
    for (path, e) in expected {
        match got.get(path) {
            None => lines.push(format!("  {path}: missing (expected {e:?})")),
            Some(g) if g != e => lines.push(format!("  {path}: {}", node_diff(g, e))),
            Some(_) => {}
        }
    }
    for (path, g) in got {
        if !expected.contains_key(path) {
            lines.push(format!("  {path}: unexpected ({g:?})"));
        }
    }
    lines
}

fn node_diff(g: &Node, e: &Node) -> String {
    let mut parts = Vec::new();
    if g.kind != e.kind {
        parts.push(format!("kind {:?} != expected {:?}", g.kind, e.kind));
    }
    if g.mode != e.mode {
        parts.push(format!("mode {:o} != expected {:o}", g.mode, e.mode));
    }
    if (g.uid, g.gid) != (e.uid, e.gid) {
        parts.push(format!(
            "owner {}:{} != expected {}:{}",
            g.uid, g.gid, e.uid, e.gid
        ));
    }
    if g.nlink != e.nlink {
        parts.push(format!("nlink {} != expected {}", g.nlink, e.nlink));
    }
    if g.size != e.size {
        parts.push(format!("size {:?} != expected {:?}", g.size, e.size));
    }
    if g.content != e.content {
        let (gc, ec) = (
            g.content.as_deref().unwrap_or_default(),
            e.content.as_deref().unwrap_or_default(),
        );
        parts.push(format!(
            "content differs at offset {:?}",
            crate::first_difference(gc, ec)
        ));
    }
    if g.target != e.target {
        let show = |t: &Option<Vec<u8>>| {
            t.as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        parts.push(format!(
            "target {:?} != expected {:?}",
            show(&g.target),
            show(&e.target)
        ));
    }
    if g.rdev != e.rdev {
        parts.push(format!("rdev {:#x} != expected {:#x}", g.rdev, e.rdev));
    }
    if g.xattrs != e.xattrs {
        parts.push(format!("xattrs {:?} != expected {:?}", g.xattrs, e.xattrs));
    }
    if g.links != e.links {
        parts.push(format!(
            "hard links {:?} != expected {:?}",
            g.links, e.links
        ));
    }
    parts.join("; ")
}
