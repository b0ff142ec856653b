//! Unit tests of the drive without a kernel in between: the node table's reference counting,
//! path resolution and the refusal of names that could leave the watch set.

use super::*;
use parking_lot::Mutex;

fn drive() -> (tempfile::TempDir, Vfs) {
    let dir = tempfile::tempdir().expect("tempdir");
    let vfs = Vfs::new(VfsConfig::new(dir.path().to_path_buf())).expect("vfs");
    (dir, vfs)
}

const ROOT_CALLER: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: 0,
};

#[test]
fn nodes_live_until_the_kernel_forgets_every_lookup() {
    let (_dir, vfs) = drive();
    let (attr, opened) = vfs
        .create(ROOT_CALLER, ROOT, OsStr::new("a"), 0o644, libc::O_RDWR)
        .expect("create");
    vfs.release(opened.fh).expect("release");
    let again = vfs.lookup(ROOT, OsStr::new("a")).expect("lookup");
    assert_eq!(again.ino, attr.ino, "one inode, one node id");
    assert_eq!(vfs.stats().known_nodes, 2, "root and a");
    vfs.forget(attr.ino, 1);
    assert!(vfs.getattr(attr.ino, None).is_ok(), "one reference left");
    vfs.forget(attr.ino, 1);
    assert!(matches!(
        vfs.getattr(attr.ino, None),
        Err(VfsError::UnknownNode(_))
    ));
    vfs.forget(ROOT, 1000);
    assert!(
        vfs.getattr(ROOT, None).is_ok(),
        "the root is never forgotten"
    );
}

#[test]
fn hard_links_share_a_node() {
    let (_dir, vfs) = drive();
    let a = vfs
        .mknod(ROOT_CALLER, ROOT, OsStr::new("a"), libc::S_IFREG | 0o600, 0)
        .expect("mknod");
    let b = vfs
        .link(ROOT_CALLER, a.ino, ROOT, OsStr::new("b"))
        .expect("link");
    assert_eq!(a.ino, b.ino);
    assert_eq!(b.nlink, 2);
}

#[test]
fn dot_names_never_resolve() {
    let (_dir, vfs) = drive();
    for name in [".", ".."] {
        assert!(matches!(
            vfs.lookup(ROOT, OsStr::new(name)),
            Err(VfsError::InvalidName)
        ));
    }
}

#[test]
fn resolve_walks_from_the_root_and_keeps_one_reference() {
    let (dir, vfs) = drive();
    std::fs::create_dir_all(dir.path().join("x/y")).expect("mkdir");
    std::fs::write(dir.path().join("x/y/z"), b"hello").expect("write");
    let path = RelPath::new(b"x/y/z").expect("path");
    let attr = vfs.resolve(&path).expect("resolve");
    assert_eq!(attr.size, 5);
    // The kernel-style reference is on the final node only; the folders above it stay in the
    // table as its ancestors (its path must stay buildable) and go with it.
    assert_eq!(vfs.stats().known_nodes, 4);
    vfs.forget(attr.ino, 1);
    assert_eq!(vfs.stats().known_nodes, 1, "only the root is left");
    let missing = RelPath::new(b"x/nope").expect("path");
    assert!(matches!(
        vfs.resolve(&missing),
        Err(VfsError::Os(Errno(libc::ENOENT)))
    ));
}

#[test]
fn readdir_resumes_at_the_offset_it_returned() {
    let (dir, vfs) = drive();
    for i in 0..50 {
        std::fs::write(dir.path().join(format!("f{i}")), b"").expect("write");
    }
    let fh = vfs.opendir(ROOT).expect("opendir");
    let mut names = Vec::new();
    let mut offset = 0;
    loop {
        let mut batch = Vec::new();
        vfs.readdir(fh, offset, false, |e, _| {
            batch.push(e.clone());
            batch.len() == 7
        })
        .expect("readdir");
        // The entry that did not fit is not part of the batch.
        if batch.len() == 7 {
            batch.pop();
        }
        let Some(last) = batch.last() else { break };
        offset = last.offset;
        names.extend(batch.into_iter().map(|e| e.name));
    }
    vfs.releasedir(fh).expect("releasedir");
    names.retain(|n| n != "." && n != "..");
    names.sort();
    let mut want: Vec<OsString> = (0..50).map(|i| format!("f{i}").into()).collect();
    want.sort();
    assert_eq!(names, want);
}

fn path_str(vfs: &Vfs, id: NodeId) -> Option<String> {
    vfs.path(id).map(|p| p.to_string())
}

#[test]
fn paths_follow_renames_of_the_node_and_its_ancestors() {
    let (_dir, vfs) = drive();
    let a = vfs
        .mkdir(ROOT_CALLER, ROOT, OsStr::new("a"), 0o755)
        .expect("mkdir");
    let b = vfs
        .mkdir(ROOT_CALLER, a.ino, OsStr::new("b"), 0o755)
        .expect("mkdir");
    let (f, h) = vfs
        .create(
            ROOT_CALLER,
            b.ino,
            OsStr::new("doc.txt"),
            0o644,
            libc::O_RDWR,
        )
        .expect("create");
    vfs.release(h.fh).expect("release");
    assert_eq!(path_str(&vfs, f.ino).as_deref(), Some("a/b/doc.txt"));
    assert_eq!(path_str(&vfs, ROOT).as_deref(), Some(""));

    // Renaming an ancestor moves every path below it.
    vfs.rename(
        ROOT,
        OsStr::new("a"),
        ROOT,
        OsStr::new("z"),
        RenameFlags::default(),
    )
    .expect("rename dir");
    assert_eq!(path_str(&vfs, f.ino).as_deref(), Some("z/b/doc.txt"));

    // Renaming the file itself, across folders.
    vfs.rename(
        b.ino,
        OsStr::new("doc.txt"),
        ROOT,
        OsStr::new("top.txt"),
        RenameFlags::default(),
    )
    .expect("rename file");
    assert_eq!(path_str(&vfs, f.ino).as_deref(), Some("top.txt"));

    // The kernel forgetting the directories does not lose the file's path: they stay while
    // they have children, and go once the last child is gone.
    vfs.forget(a.ino, 1);
    vfs.forget(b.ino, 1);
    assert_eq!(path_str(&vfs, f.ino).as_deref(), Some("top.txt"));
    assert!(
        vfs.getattr(b.ino, None).is_err(),
        "childless and forgotten: gone"
    );
}

#[test]
fn unlink_and_rename_over_clear_the_old_name() {
    let (_dir, vfs) = drive();
    let mk = |name: &str| {
        let (a, h) = vfs
            .create(ROOT_CALLER, ROOT, OsStr::new(name), 0o644, libc::O_RDWR)
            .expect("create");
        vfs.release(h.fh).expect("release");
        a.ino
    };
    let doc = mk("doc");
    let tmp = mk("tmp");
    // Word's save: the temp is renamed over the document.
    vfs.rename(
        ROOT,
        OsStr::new("tmp"),
        ROOT,
        OsStr::new("doc"),
        RenameFlags::default(),
    )
    .expect("rename over");
    assert_eq!(path_str(&vfs, tmp).as_deref(), Some("doc"));
    assert_eq!(
        path_str(&vfs, doc),
        None,
        "the replaced file has no name any more"
    );
    vfs.unlink(ROOT, OsStr::new("doc")).expect("unlink");
    assert_eq!(path_str(&vfs, tmp), None);
}

#[test]
fn exchange_swaps_paths() {
    let (_dir, vfs) = drive();
    let a = vfs
        .mkdir(ROOT_CALLER, ROOT, OsStr::new("a"), 0o755)
        .expect("mkdir");
    let b = vfs
        .mknod(ROOT_CALLER, ROOT, OsStr::new("b"), libc::S_IFREG | 0o644, 0)
        .expect("mknod");
    vfs.rename(
        ROOT,
        OsStr::new("a"),
        ROOT,
        OsStr::new("b"),
        RenameFlags(RenameFlags::EXCHANGE),
    )
    .expect("exchange");
    assert_eq!(path_str(&vfs, a.ino).as_deref(), Some("b"));
    assert_eq!(path_str(&vfs, b.ino).as_deref(), Some("a"));
    assert_eq!(
        vfs.child_path(a.ino, OsStr::new("x"))
            .map(|p| p.to_string())
            .as_deref(),
        Some("b/x")
    );
}

/// A lock service stand-in: `held` paths belong to peer "b"; every call is logged.
#[derive(Default)]
struct FakeLocks {
    held: Mutex<Vec<String>>,
    log: Mutex<Vec<String>>,
}

impl Locks for FakeLocks {
    fn acquire(&self, path: &RelPath) -> std::result::Result<(), LockDenied> {
        self.log.lock().push(format!("acquire {path}"));
        if self.held.lock().iter().any(|h| h == &path.to_string()) {
            return Err(LockDenied { holder: "b".into() });
        }
        Ok(())
    }
    fn release(&self, path: &RelPath) {
        self.log.lock().push(format!("release {path}"));
    }
    fn held_here(&self, _path: &RelPath) -> bool {
        false
    }
    fn held_below(&self, dir: &RelPath) -> Option<LockDenied> {
        let dir = dir.to_string();
        self.held
            .lock()
            .iter()
            .any(|h| *h == dir || h.starts_with(&format!("{dir}/")))
            .then(|| LockDenied { holder: "b".into() })
    }
}

fn locked_drive() -> (tempfile::TempDir, Vfs, Arc<FakeLocks>) {
    let (dir, vfs) = drive();
    let locks = Arc::new(FakeLocks::default());
    vfs.set_locks(locks.clone());
    (dir, vfs, locks)
}

fn is_locked<T: std::fmt::Debug>(r: Result<T>) -> bool {
    matches!(r, Err(VfsError::Locked { ref holder, .. }) if holder == "b")
}

#[test]
fn write_opens_lock_and_read_opens_never_do() {
    let (dir, vfs, locks) = locked_drive();
    std::fs::write(dir.path().join("doc.docx"), b"x").expect("write");
    let doc = vfs.lookup(ROOT, OsStr::new("doc.docx")).expect("lookup");
    let ro = vfs
        .open(doc.ino, libc::O_RDONLY, false)
        .expect("read-only open");
    assert!(
        locks.log.lock().is_empty(),
        "a read-only open takes no lock"
    );
    let rw = vfs.open(doc.ino, libc::O_RDWR, false).expect("write open");
    assert_eq!(*locks.log.lock(), vec!["acquire doc.docx"]);
    vfs.release(ro.fh).expect("release");
    vfs.release(rw.fh).expect("release");
    assert_eq!(
        *locks.log.lock(),
        vec!["acquire doc.docx", "release doc.docx"]
    );

    locks.held.lock().push("doc.docx".into());
    assert!(is_locked(vfs.open(doc.ino, libc::O_WRONLY, false)));
    assert!(is_locked(vfs.open(
        doc.ino,
        libc::O_RDONLY | libc::O_TRUNC,
        false
    )));
    let ro = vfs
        .open(doc.ino, libc::O_RDONLY, false)
        .expect("reads still work");
    vfs.release(ro.fh).expect("release");
    let set = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    assert!(
        is_locked(vfs.setattr(doc.ino, None, set)),
        "truncate by path"
    );
    assert_eq!(
        std::fs::read(dir.path().join("doc.docx")).expect("read"),
        b"x"
    );
}

#[test]
fn namespace_changes_respect_a_peers_lock() {
    let (dir, vfs, locks) = locked_drive();
    std::fs::create_dir(dir.path().join("proj")).expect("mkdir");
    std::fs::write(dir.path().join("proj/doc.docx"), b"x").expect("write");
    std::fs::write(dir.path().join("other.txt"), b"y").expect("write");
    locks.held.lock().push("proj/doc.docx".into());
    let proj = vfs.lookup(ROOT, OsStr::new("proj")).expect("lookup");
    let none = RenameFlags::default();

    assert!(is_locked(vfs.unlink(proj.ino, OsStr::new("doc.docx"))));
    assert!(is_locked(vfs.rename(
        proj.ino,
        OsStr::new("doc.docx"),
        ROOT,
        OsStr::new("x"),
        none
    )));
    assert!(is_locked(vfs.rename(
        ROOT,
        OsStr::new("other.txt"),
        proj.ino,
        OsStr::new("doc.docx"),
        none
    )));
    assert!(is_locked(vfs.create(
        ROOT_CALLER,
        proj.ino,
        OsStr::new("doc.docx"),
        0o644,
        libc::O_RDWR
    )));
    // The folder holding a locked document can be neither moved nor removed.
    assert!(is_locked(vfs.rename(
        ROOT,
        OsStr::new("proj"),
        ROOT,
        OsStr::new("p2"),
        none
    )));
    std::fs::remove_file(dir.path().join("proj/doc.docx")).expect("rm behind");
    assert!(is_locked(vfs.rmdir(ROOT, OsStr::new("proj"))));
    // Nothing above changed the tree.
    assert!(dir.path().join("proj").is_dir());
    assert!(dir.path().join("other.txt").is_file());
}

#[test]
fn temp_and_owner_files_never_lock() {
    let (_dir, vfs, locks) = locked_drive();
    for name in [
        "~$arterly report.docx",
        "A1B2C3D4.tmp",
        "5EE27100",
        ".~lock.notes.odt#",
    ] {
        let (a, h) = vfs
            .create(
                ROOT_CALLER,
                ROOT,
                OsStr::new(name),
                0o644,
                libc::O_RDWR | libc::O_EXCL,
            )
            .expect("create");
        vfs.release(h.fh).expect("release");
        let h = vfs.open(a.ino, libc::O_RDWR, false).expect("open");
        vfs.release(h.fh).expect("release");
        vfs.unlink(ROOT, OsStr::new(name)).expect("unlink");
    }
    assert!(locks.log.lock().is_empty(), "{:?}", locks.log.lock());
}

#[test]
fn word_save_locks_the_document_name_only() {
    let (dir, vfs, locks) = locked_drive();
    std::fs::write(dir.path().join("report.docx"), b"v1").expect("write");
    let doc = vfs.lookup(ROOT, OsStr::new("report.docx")).expect("lookup");
    let held = vfs.open(doc.ino, libc::O_RDWR, false).expect("open");
    let (_, tmp) = vfs
        .create(
            ROOT_CALLER,
            ROOT,
            OsStr::new("A1B2C3D4.tmp"),
            0o644,
            libc::O_RDWR | libc::O_EXCL,
        )
        .expect("temp");
    vfs.write(tmp.fh, 0, b"v2", false).expect("write");
    vfs.release(tmp.fh).expect("release");
    let none = RenameFlags::default();
    vfs.rename(
        ROOT,
        OsStr::new("report.docx"),
        ROOT,
        OsStr::new("~WRL0001.tmp"),
        none,
    )
    .expect("doc away");
    vfs.rename(
        ROOT,
        OsStr::new("A1B2C3D4.tmp"),
        ROOT,
        OsStr::new("report.docx"),
        none,
    )
    .expect("temp onto doc");
    vfs.release(held.fh).expect("close old");
    vfs.unlink(ROOT, OsStr::new("~WRL0001.tmp"))
        .expect("unlink backup");
    let log = locks.log.lock().clone();
    assert!(log.iter().all(|l| l.ends_with(" report.docx")), "{log:?}");
    let acquires = log.iter().filter(|l| l.starts_with("acquire")).count();
    let releases = log.iter().filter(|l| l.starts_with("release")).count();
    assert_eq!(acquires, releases, "every reference is given back: {log:?}");
    assert_eq!(
        std::fs::read(dir.path().join("report.docx")).expect("read"),
        b"v2"
    );
}

#[test]
fn only_lockable_names_may_wait_for_peers() {
    let (_dir, vfs) = drive();
    let doc = RelPath::new(b"report.docx").ok();
    assert!(
        !vfs.may_wait_for_peers(doc.clone()),
        "no lock service: never waits"
    );
    let locks = Arc::new(FakeLocks::default());
    vfs.set_locks(locks);
    assert!(vfs.may_wait_for_peers(doc));
    assert!(!vfs.may_wait_for_peers(RelPath::new(b"~$report.docx").ok()));
    assert!(!vfs.may_wait_for_peers(RelPath::new(b"A1B2C3D4.tmp").ok()));
    assert!(
        !vfs.may_wait_for_peers(None),
        "a nameless (unlinked) file has no lock"
    );
}

/// A peer's save renamed its temp file over a document this drive's kernel had looked up. An
/// open through the name the kernel still caches must not reach the replaced file: that file
/// has no name any more, so the open would take no lock, and its writes would go to a file
/// the replicator just moved to the trash. ESTALE sends the kernel to look the name up again.
#[test]
fn a_file_a_peers_rename_replaced_refuses_opens_through_its_old_name() {
    for temp_known in [false, true] {
        let (dir, vfs, locks) = locked_drive();
        std::fs::write(dir.path().join("doc.docx"), b"old").expect("write");
        std::fs::write(dir.path().join("~tmp1.tmp"), b"new").expect("write");
        let doc = vfs.lookup(ROOT, OsStr::new("doc.docx")).expect("lookup");
        if temp_known {
            vfs.lookup(ROOT, OsStr::new("~tmp1.tmp")).expect("lookup");
        }
        // What the replicator does when it applies the peer's rename.
        std::fs::rename(dir.path().join("~tmp1.tmp"), dir.path().join("doc.docx")).expect("rename");
        let from = RelPath::new(b"~tmp1.tmp").expect("path");
        let to = RelPath::new(b"doc.docx").expect("path");
        vfs.remote_renamed(&from, &to);

        locks.held.lock().push("doc.docx".into());
        let r = vfs.open(doc.ino, libc::O_RDWR, false);
        assert!(
            matches!(r, Err(VfsError::Os(Errno(libc::ESTALE)))),
            "temp known: {temp_known}: {:?}",
            r.map(|o| o.fh)
        );
        assert!(
            locks.log.lock().is_empty(),
            "the refused open asked for no lock"
        );
        // The kernel looks the name up again: the new file, and the peer's lock applies.
        let now = vfs.lookup(ROOT, OsStr::new("doc.docx")).expect("lookup");
        assert!(is_locked(vfs.open(now.ino, libc::O_RDWR, false)));
        let ro = vfs.open(now.ino, libc::O_RDONLY, false).expect("read");
        assert_eq!(vfs.read(ro.fh, 0, 16).expect("read"), b"new");
        vfs.release(ro.fh).expect("release");
    }
}

/// A peer moved a file into a folder this drive's kernel never looked at: the node loses its
/// name here. An open through the old name the kernel still caches must not reach the moved
/// file (unlocked, and its change unreported: it has no path); once the kernel looks the
/// new name up, the file is reachable and locks again.
#[test]
fn a_file_a_peer_moved_out_of_sight_refuses_opens_through_its_old_name() {
    let (dir, vfs, locks) = locked_drive();
    std::fs::write(dir.path().join("doc.docx"), b"text").expect("write");
    std::fs::create_dir(dir.path().join("archive")).expect("mkdir");
    let doc = vfs.lookup(ROOT, OsStr::new("doc.docx")).expect("lookup");
    std::fs::rename(
        dir.path().join("doc.docx"),
        dir.path().join("archive/doc.docx"),
    )
    .expect("rename");
    let from = RelPath::new(b"doc.docx").expect("path");
    let to = RelPath::new(b"archive/doc.docx").expect("path");
    vfs.remote_renamed(&from, &to);
    let r = vfs.open(doc.ino, libc::O_RDWR, false);
    assert!(
        matches!(r, Err(VfsError::Os(Errno(libc::ESTALE)))),
        "{:?}",
        r.map(|o| o.fh)
    );
    assert!(locks.log.lock().is_empty());
    let archive = vfs.lookup(ROOT, OsStr::new("archive")).expect("lookup");
    let moved = vfs
        .lookup(archive.ino, OsStr::new("doc.docx"))
        .expect("lookup");
    assert_eq!(moved.ino, doc.ino, "the same file, found again");
    let rw = vfs.open(moved.ino, libc::O_RDWR, false).expect("open");
    assert_eq!(*locks.log.lock(), vec!["acquire archive/doc.docx"]);
    vfs.release(rw.fh).expect("release");
}

/// A peer removed a folder (to the trash) while this drive's kernel still caches a file in
/// it: an open through that name must not write, unlocked, to the file now in the trash.
#[test]
fn a_file_below_a_folder_a_peer_removed_refuses_opens() {
    let (dir, vfs, locks) = locked_drive();
    std::fs::create_dir(dir.path().join("proj")).expect("mkdir");
    std::fs::write(dir.path().join("proj/doc.docx"), b"text").expect("write");
    let proj = vfs.lookup(ROOT, OsStr::new("proj")).expect("lookup");
    let doc = vfs
        .lookup(proj.ino, OsStr::new("doc.docx"))
        .expect("lookup");
    // What the replicator does: the folder goes to the trash, then the drive hears of it.
    std::fs::create_dir(dir.path().join(".trash")).expect("mkdir");
    std::fs::rename(dir.path().join("proj"), dir.path().join(".trash/proj")).expect("rename");
    vfs.remote_removed(&RelPath::new(b"proj").expect("path"));
    let r = vfs.open(doc.ino, libc::O_RDWR, false);
    assert!(
        matches!(r, Err(VfsError::Os(Errno(libc::ESTALE)))),
        "{:?}",
        r.map(|o| o.fh)
    );
    // Nor may a name be made or removed in it: it would land in, or vanish from, the trash,
    // unlocked and unreported.
    let stale = |r: Result<()>| matches!(r, Err(VfsError::Os(Errno(libc::ESTALE))));
    let created = vfs
        .create(
            ROOT_CALLER,
            proj.ino,
            OsStr::new("new.txt"),
            0o644,
            libc::O_RDWR,
        )
        .map(drop);
    assert!(stale(created), "create");
    assert!(
        stale(vfs.unlink(proj.ino, OsStr::new("doc.docx"))),
        "unlink"
    );
    assert!(
        stale(vfs.rename(
            proj.ino,
            OsStr::new("doc.docx"),
            ROOT,
            OsStr::new("out.docx"),
            RenameFlags::default()
        )),
        "rename out of it"
    );
    assert!(locks.log.lock().is_empty());
    assert!(dir.path().join(".trash/proj/doc.docx").exists());
    assert!(!dir.path().join("out.docx").exists());
    assert!(vfs.lookup(ROOT, OsStr::new("proj")).is_err(), "gone");
}
