//! Reconciliation between real peers on loopback (issue 9): an offline peer catches up, truly
//! concurrent edits keep both versions (the loser as a conflict copy named
//! `NAME (conflict PEER YYYY-MM-DD HH.MM).EXT`, identically on every peer), an edit beats a
//! concurrent delete, deletes are remembered, two trees that never met merge into their union,
//! the start scan finds what changed in the backing folder while the drive was down, a peer
//! relays changes and locks between two peers that do not know each other, a sender or a
//! receiver killed during a first sync resumes without losing or doubling anything, and
//! `peerfs status --json` reports sync progress.
//!
//! The assertions are on the files themselves: every test ends with the peers' backing trees
//! equal (names, kinds, content, permission bits, symlink targets; peerfs's own `.peerfs-tmp-*`
//! names aside) and then checks that tree. Every wait polls a condition with a generous bound;
//! nothing sleeps for a fixed time to let synchronisation happen.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use peerfs_tests::Kind;
use peerfs_tests::peers::{Peers, PeersOptions, Tree};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// Bound for a change, a reconnection or a reconciliation to complete.
const SYNC: Duration = Duration::from_secs(60);

const ETXTBSY: i32 = libc::ETXTBSY;

fn read(path: &Path) -> io::Result<Vec<u8>> {
    fs::read(path)
}

/// Waits until `name` on peer `i` (read through its drive) has `want`.
#[track_caller]
fn wait_content(p: &Peers, i: usize, name: &str, want: &[u8]) {
    let path = p.file(i, name);
    p.wait_until(
        &format!(
            "{} has {name} = {:?}",
            p.name(i),
            String::from_utf8_lossy(want)
        ),
        SYNC,
        || match read(&path) {
            Ok(v) if v == want => Ok(()),
            Ok(v) => Err(format!("{:?}", String::from_utf8_lossy(&v))),
            Err(e) => Err(e.to_string()),
        },
    );
}

/// Waits until `name` does not exist on peer `i` (through its drive).
#[track_caller]
fn wait_gone(p: &Peers, i: usize, name: &str) {
    let path = p.file(i, name);
    p.wait_until(
        &format!("{name} is gone on {}", p.name(i)),
        SYNC,
        || match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Ok(_) => Err("still there".into()),
            Err(e) => Err(e.to_string()),
        },
    );
}

/// Waits until no running peer lists any lock: every write-open was released, which is when
/// the change is recorded and (for connected peers) delivered.
#[track_caller]
fn wait_no_locks(p: &Peers) {
    let running = p.running();
    p.wait_until("no running peer lists a lock", SYNC, || {
        for &i in &running {
            let locks = p.try_locks(i)?;
            if !locks.is_empty() {
                return Err(format!("{} lists {locks:?}", p.name(i)));
            }
        }
        Ok(())
    });
}

/// Writes `content` to `name` through peer `i`'s drive (create or truncate).
#[track_caller]
fn write(p: &Peers, i: usize, name: &str, content: &[u8]) {
    fs::write(p.file(i, name), content)
        .unwrap_or_else(|e| panic!("write {name} on {}: {e}\n{}", p.name(i), p.logs()));
}

/// The content of a regular file in `tree` (panics with the tree if it is not one).
#[track_caller]
fn content<'t>(tree: &'t Tree, name: &str) -> &'t [u8] {
    match tree.get(name) {
        Some(e) if e.kind == Kind::File => &e.data,
        other => {
            panic!("{name} is not a regular file in the converged tree ({other:?}): {tree:#?}")
        }
    }
}

/// A conflict copy of `stem.ext` (or of `stem` when `ext` is empty) in folder `dir`
/// (`""` for the root), as named by the promise: `stem (conflict PEER YYYY-MM-DD HH.MM).ext`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConflictCopy {
    /// Its path in the tree.
    path: String,
    /// The peer named in it.
    peer: String,
    content: Vec<u8>,
}

/// `YYYY-MM-DD HH.MM`.
fn is_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 16
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b' ',
            13 => *c == b'.',
            _ => c.is_ascii_digit(),
        })
}

/// The peer named in `name` if it is a conflict copy of `stem` + `ext` (`ext` with its dot,
/// or empty).
fn conflict_peer(name: &str, stem: &str, ext: &str) -> Option<String> {
    let inner = name
        .strip_prefix(stem)?
        .strip_prefix(" (conflict ")?
        .strip_suffix(ext)?
        .strip_suffix(')')?;
    // "PEER YYYY-MM-DD HH.MM"; the peer name itself has no spaces here.
    let (peer, when) = inner.split_once(' ')?;
    (!peer.is_empty() && is_date_time(when)).then(|| peer.to_string())
}

/// Every name in `tree` that looks like a conflict copy of `file` (`dir/stem.ext`), with
/// the peer its name gives. Names containing `(conflict` that do not follow the promised
/// pattern are returned too (with an empty peer), so a misnamed copy fails the count.
fn conflict_copies(tree: &Tree, file: &str) -> Vec<ConflictCopy> {
    let (dir, base) = match file.rsplit_once('/') {
        Some((d, b)) => (format!("{d}/"), b),
        None => (String::new(), file),
    };
    let (stem, ext) = match base.rfind('.') {
        Some(dot) if dot > 0 => (&base[..dot], &base[dot..]),
        _ => (base, ""),
    };
    tree.iter()
        .filter_map(|(path, e)| {
            let name = path.strip_prefix(&dir)?;
            if name.contains('/') || !name.starts_with(stem) || !name.contains("(conflict") {
                return None;
            }
            Some(ConflictCopy {
                path: path.clone(),
                peer: conflict_peer(name, stem, ext).unwrap_or_default(),
                content: e.data.clone(),
            })
        })
        .collect()
}

/// Every name in `tree` containing `(conflict`.
fn any_conflict_names(tree: &Tree) -> Vec<&String> {
    tree.keys().filter(|k| k.contains("(conflict")).collect()
}

fn set(items: &[&[u8]]) -> BTreeSet<Vec<u8>> {
    items.iter().map(|b| b.to_vec()).collect()
}

/// Asserts `file` and exactly one well-named conflict copy of it hold exactly `a` (written
/// by peer `pa`) and `b` (by peer `pb`), and the copy names the peer whose version it holds.
/// Returns the copy.
#[track_caller]
fn assert_one_conflict(
    p: &Peers,
    tree: &Tree,
    file: &str,
    (pa, a): (usize, &[u8]),
    (pb, b): (usize, &[u8]),
) -> ConflictCopy {
    let copies = conflict_copies(tree, file);
    assert!(
        copies.len() == 1,
        "expected exactly one conflict copy of {file} named `STEM (conflict PEER YYYY-MM-DD \
         HH.MM).EXT`, found {copies:?}; tree: {tree:#?}"
    );
    let copy = copies[0].clone();
    assert!(
        !copy.peer.is_empty(),
        "the conflict copy {:?} does not follow `STEM (conflict PEER YYYY-MM-DD HH.MM).EXT`",
        copy.path
    );
    let got: BTreeSet<Vec<u8>> = [content(tree, file).to_vec(), copy.content.clone()].into();
    assert_eq!(
        got,
        set(&[a, b]),
        "{file} and its conflict copy {:?} must hold exactly the two concurrent versions",
        copy.path
    );
    // The copy is named after the peer that made the version it keeps.
    let maker = if copy.content == a { pa } else { pb };
    assert_eq!(
        copy.peer,
        p.name(maker),
        "the conflict copy {:?} holds {}'s version but names {}",
        copy.path,
        p.name(maker),
        copy.peer
    );
    copy
}

/// Waits until some peer of `peers` lists a conflict for `file` whose copy is `copy` in the
/// `reconcile.conflicts` of its `peerfs status --json`.
#[track_caller]
fn wait_conflict_reported(p: &Peers, peers: &[usize], file: &str, copy: &str) {
    p.wait_until(
        &format!("a peer reports the conflict {file} -> {copy} in status reconcile.conflicts"),
        SYNC,
        || {
            let mut seen = Vec::new();
            for &i in peers {
                let rec = p.reconcile_state(i)?;
                let conflicts = rec["conflicts"].as_array().cloned().unwrap_or_default();
                let norm = |v: &serde_json::Value| {
                    v.as_str()
                        .map(|s| s.trim_start_matches('/').to_string())
                        .unwrap_or_default()
                };
                if conflicts
                    .iter()
                    .any(|c| norm(&c["path"]) == file && norm(&c["copy"]) == copy)
                {
                    return Ok(());
                }
                seen.push(format!("{}: {conflicts:?}", p.name(i)));
            }
            Err(seen.join("; "))
        },
    );
}

fn opts() -> PeersOptions {
    PeersOptions::default()
}

/// B is stopped while A creates, edits, renames, deletes, makes a folder with a file in it, a
/// symlink and changes modes, all through its drive; when B returns, it has all of it.
#[test]
fn an_offline_peer_catches_up_on_every_kind_of_change() {
    let mut p = Peers::start_with(2, opts());
    write(&p, A, "keep.txt", b"kept");
    write(&p, A, "edit.txt", b"v1");
    write(&p, A, "old-name.txt", b"renamed");
    write(&p, A, "gone.txt", b"to be deleted");
    write(&p, A, "mode.txt", b"mode");
    p.wait_trees_equal(&[A, B], SYNC);
    wait_no_locks(&p);

    p.stop(B);
    let a = |n: &str| p.file(A, n);
    write(&p, A, "new.txt", b"created while b was away");
    write(&p, A, "edit.txt", b"v2, longer than v1");
    fs::rename(a("old-name.txt"), a("new-name.txt")).expect("rename");
    fs::remove_file(a("gone.txt")).expect("unlink");
    fs::create_dir(a("sub")).expect("mkdir");
    write(&p, A, "sub/inner.txt", b"inside");
    std::os::unix::fs::symlink("sub/inner.txt", a("link")).expect("symlink");
    fs::set_permissions(a("mode.txt"), fs::Permissions::from_mode(0o600)).expect("chmod");
    fs::set_permissions(a("sub"), fs::Permissions::from_mode(0o750)).expect("chmod dir");
    wait_no_locks(&p);

    p.restart(B);
    let tree = p.wait_trees_equal(&[A, B], SYNC);
    assert_eq!(content(&tree, "keep.txt"), b"kept");
    assert_eq!(content(&tree, "new.txt"), b"created while b was away");
    assert_eq!(content(&tree, "edit.txt"), b"v2, longer than v1");
    assert_eq!(content(&tree, "new-name.txt"), b"renamed");
    assert_eq!(content(&tree, "sub/inner.txt"), b"inside");
    assert!(!tree.contains_key("old-name.txt"), "{tree:#?}");
    assert!(!tree.contains_key("gone.txt"), "{tree:#?}");
    assert_eq!(tree["mode.txt"].mode, 0o600, "{tree:#?}");
    assert_eq!(tree["sub"].kind, Kind::Dir);
    assert_eq!(tree["sub"].mode, 0o750, "{tree:#?}");
    assert_eq!(tree["link"].kind, Kind::Symlink);
    assert_eq!(tree["link"].data, b"sub/inner.txt");
    assert!(any_conflict_names(&tree).is_empty(), "{tree:#?}");
}

/// While B is stopped, A makes a file, renames it and writes it again (with two peers, and
/// with a third peer C running that follows A): B, back, gets the final file under its final
/// name and nothing under the first.
#[test]
fn a_file_made_renamed_and_rewritten_while_a_peer_was_away_reaches_it() {
    for n in [2, 3] {
        let mut p = Peers::start_with(n, opts());
        p.stop(B);
        write(&p, A, "first.txt", b"first name");
        fs::rename(p.file(A, "first.txt"), p.file(A, "second.txt")).expect("rename");
        write(&p, A, "second.txt", b"rewritten under the second name");
        wait_no_locks(&p);
        p.restart(B);
        let all: Vec<usize> = (0..n).collect();
        let tree = p.wait_trees_equal(&all, SYNC);
        assert_eq!(
            content(&tree, "second.txt"),
            b"rewritten under the second name"
        );
        assert_eq!(tree.len(), 1, "with {n} peers: {tree:#?}");
    }
}

/// A and B edit doc.txt while they cannot see each other (B stopped while A edits, A stopped
/// while B edits, the default `available` policy lets both): both edits survive, one as
/// `doc (conflict PEER DATE).txt`, identically on both peers.
#[test]
fn concurrent_edits_while_apart_keep_both_versions() {
    let mut p = Peers::start_with(2, opts());
    write(&p, A, "doc.txt", b"common base");
    wait_content(&p, B, "doc.txt", b"common base");
    wait_no_locks(&p);

    p.stop(B);
    write(&p, A, "doc.txt", b"edited on a");
    wait_no_locks(&p);
    p.stop(A);
    p.launch(B);
    write(&p, B, "doc.txt", b"edited on b while a was down");
    wait_no_locks(&p);
    p.launch(A);
    p.wait_connected();

    let tree = p.wait_trees_equal(&[A, B], SYNC);
    let copy = assert_one_conflict(
        &p,
        &tree,
        "doc.txt",
        (A, b"edited on a"),
        (B, b"edited on b while a was down"),
    );
    assert_eq!(
        tree.len(),
        2,
        "only doc.txt and its conflict copy: {tree:#?}"
    );
    wait_conflict_reported(&p, &[A, B], "doc.txt", &copy.path);
}

/// B, alone, makes new.txt; then A, alone, makes new.txt too; then B and C (which saw
/// neither) return together: both versions survive, one as a conflict copy, on all three.
#[test]
fn concurrent_creations_of_one_name_keep_both_with_three_peers() {
    let mut p = Peers::start_with(3, opts());
    p.stop(A);
    p.stop(C);
    write(&p, B, "new.txt", b"made on b");
    wait_no_locks(&p);
    p.stop(B);
    p.launch(A);
    write(&p, A, "new.txt", b"made on a, later");
    wait_no_locks(&p);
    p.launch(B);
    p.launch(C);
    p.wait_connected();
    let tree = p.wait_trees_equal(&[A, B, C], SYNC);
    assert_one_conflict(
        &p,
        &tree,
        "new.txt",
        (A, b"made on a, later"),
        (B, b"made on b"),
    );
    assert_eq!(tree.len(), 2, "{tree:#?}");
}

/// A deletes x.txt while B, apart from it, edits x.txt: the edit survives on both (and is
/// not a content conflict).
#[test]
fn an_edit_beats_a_concurrent_delete() {
    let mut p = Peers::start_with(2, opts());
    write(&p, A, "x.txt", b"original");
    write(&p, A, "other.txt", b"untouched");
    p.wait_trees_equal(&[A, B], SYNC);
    wait_no_locks(&p);

    p.stop(B);
    fs::remove_file(p.file(A, "x.txt")).expect("delete on a");
    wait_no_locks(&p);
    p.stop(A);
    p.launch(B);
    write(&p, B, "x.txt", b"edited on b, which never saw the delete");
    wait_no_locks(&p);
    p.launch(A);
    p.wait_connected();

    let tree = p.wait_trees_equal(&[A, B], SYNC);
    assert_eq!(
        content(&tree, "x.txt"),
        b"edited on b, which never saw the delete"
    );
    assert_eq!(content(&tree, "other.txt"), b"untouched");
    assert!(any_conflict_names(&tree).is_empty(), "{tree:#?}");
}

/// A deletes x.txt while B is stopped; B never changed x.txt, so when it returns x.txt is
/// removed there too (its copy going to B's trash), and it stays gone across later restarts
/// of either peer.
#[test]
fn a_delete_made_while_a_peer_was_away_is_not_undone_by_it() {
    let mut p = Peers::start_with(2, opts());
    write(&p, A, "x.txt", b"doomed");
    write(&p, A, "y.txt", b"stays");
    p.wait_trees_equal(&[A, B], SYNC);
    wait_no_locks(&p);

    p.stop(B);
    fs::remove_file(p.file(A, "x.txt")).expect("delete on a");
    wait_no_locks(&p);
    p.restart(B);
    let tree = p.wait_trees_equal(&[A, B], SYNC);
    assert!(!tree.contains_key("x.txt"), "x.txt came back: {tree:#?}");
    assert_eq!(content(&tree, "y.txt"), b"stays");

    for i in [B, A] {
        p.stop(i);
        p.restart(i);
        let tree = p.wait_trees_equal(&[A, B], SYNC);
        assert!(
            !tree.contains_key("x.txt"),
            "x.txt came back after {} restarted: {tree:#?}",
            p.name(i)
        );
        assert_eq!(content(&tree, "y.txt"), b"stays");
        assert!(any_conflict_names(&tree).is_empty(), "{tree:#?}");
    }
}

/// Two peers whose backing folders were filled separately and who never met: the result is
/// the union; a name with the same content is one file, a name with different content is
/// kept twice (one a conflict copy).
#[test]
fn two_trees_that_never_met_merge_into_their_union() {
    let o = opts()
        .seed(A, "only-a.txt", b"only on a")
        .seed(A, "same.txt", b"same")
        .seed(A, "differ.txt", b"from a")
        .seed(A, "dir/a", b"a in dir")
        .seed(B, "only-b.txt", b"only on b")
        .seed(B, "same.txt", b"same")
        .seed(B, "differ.txt", b"from b")
        .seed(B, "dir/b", b"b in dir");
    let p = Peers::start_with(2, o);
    let tree = p.wait_trees_equal(&[A, B], SYNC);
    assert_eq!(content(&tree, "only-a.txt"), b"only on a");
    assert_eq!(content(&tree, "only-b.txt"), b"only on b");
    assert_eq!(content(&tree, "same.txt"), b"same");
    assert_eq!(content(&tree, "dir/a"), b"a in dir");
    assert_eq!(content(&tree, "dir/b"), b"b in dir");
    assert!(
        conflict_copies(&tree, "same.txt").is_empty(),
        "identical content is never a conflict: {tree:#?}"
    );
    let copy = assert_one_conflict(&p, &tree, "differ.txt", (A, b"from a"), (B, b"from b"));
    let expected: BTreeSet<&str> = [
        "only-a.txt",
        "only-b.txt",
        "same.txt",
        "differ.txt",
        copy.path.as_str(),
        "dir",
        "dir/a",
        "dir/b",
    ]
    .into();
    let got: BTreeSet<&str> = tree.keys().map(String::as_str).collect();
    assert_eq!(got, expected, "the union and nothing else");
}

/// While A is stopped, its backing folder is changed directly (a new file, a modified one, a
/// removed one, a new folder with a file): the scan at mount finds it all and B gets it.
#[test]
fn the_start_scan_finds_changes_made_behind_the_drives_back() {
    let mut p = Peers::start_with(2, opts());
    write(&p, A, "keep.txt", b"kept");
    write(&p, A, "mod.txt", b"old");
    write(&p, A, "del.txt", b"removed behind peerfs's back");
    fs::create_dir(p.file(A, "olddir")).expect("mkdir");
    write(&p, A, "olddir/f.txt", b"in old dir");
    p.wait_trees_equal(&[A, B], SYNC);
    wait_no_locks(&p);

    p.stop(A);
    let back = |n: &str| p.backing_file(A, n);
    fs::write(back("new.txt"), b"new behind its back").expect("write");
    fs::write(back("mod.txt"), b"modified behind its back, and longer").expect("modify");
    fs::remove_file(back("del.txt")).expect("remove");
    fs::create_dir(back("newdir")).expect("mkdir");
    fs::write(back("newdir/inside.txt"), b"inside the new folder").expect("write");
    fs::write(back("olddir/f.txt"), b"changed in old dir").expect("modify in dir");

    p.restart(A);
    let tree = p.wait_trees_equal(&[A, B], SYNC);
    assert_eq!(content(&tree, "keep.txt"), b"kept");
    assert_eq!(content(&tree, "new.txt"), b"new behind its back");
    assert_eq!(
        content(&tree, "mod.txt"),
        b"modified behind its back, and longer"
    );
    assert!(!tree.contains_key("del.txt"), "{tree:#?}");
    assert_eq!(tree["newdir"].kind, Kind::Dir);
    assert_eq!(
        content(&tree, "newdir/inside.txt"),
        b"inside the new folder"
    );
    assert_eq!(content(&tree, "olddir/f.txt"), b"changed in old dir");
    assert!(any_conflict_names(&tree).is_empty(), "{tree:#?}");

    let scan = p.reconcile_state(A).unwrap_or_else(|e| panic!("{e}"))["scan"].clone();
    let n = |k: &str| scan[k].as_u64();
    assert!(
        n("changed") >= Some(3) && n("removed") >= Some(1) && n("files") >= Some(5),
        "A's reconcile.scan must count the 3+ changed and 1 removed files: {scan}"
    );
}

/// Opens `name` on peer `i` for reading and writing.
fn open_rw(p: &Peers, i: usize, name: &str) -> io::Result<fs::File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p.file(i, name))
}

/// A–B and B–C know each other, A and C do not: B relays changes both ways and the locks;
/// then B goes away for good and A and C are pointed at each other, and they converge
/// without conflict copies or losses.
#[test]
fn a_peer_relays_changes_and_locks_between_peers_that_do_not_know_each_other() {
    let mut p = Peers::start_with(3, opts().links(&[(A, B), (B, C)]));
    write(&p, A, "from-a.txt", b"written on a");
    wait_content(&p, C, "from-a.txt", b"written on a");
    write(&p, C, "from-c.txt", b"written on c");
    wait_content(&p, A, "from-c.txt", b"written on c");
    fs::create_dir(p.file(A, "folder")).expect("mkdir");
    write(&p, A, "folder/inner.txt", b"inner");
    wait_content(&p, C, "folder/inner.txt", b"inner");
    wait_no_locks(&p);
    fs::rename(p.file(A, "folder"), p.file(A, "renamed")).expect("rename folder");
    wait_content(&p, C, "renamed/inner.txt", b"inner");
    wait_gone(&p, C, "folder");
    let tree = p.wait_trees_equal(&[A, B, C], SYNC);
    assert!(any_conflict_names(&tree).is_empty(), "{tree:#?}");
    wait_no_locks(&p);

    // A write-open on A is known on C through B, and the other way round.
    for (holder, other) in [(A, C), (C, A)] {
        let held = open_rw(&p, holder, "from-a.txt")
            .unwrap_or_else(|e| panic!("O_RDWR open on {}: {e}\n{}", p.name(holder), p.logs()));
        // The open returned: every peer, the unlinked one through B, granted the lock.
        match open_rw(&p, other, "from-a.txt") {
            Err(e) if e.raw_os_error() == Some(ETXTBSY) => {}
            other_result => panic!(
                "O_RDWR open of from-a.txt on {} while {} holds it open for writing: expected \
                 ETXTBSY, got {other_result:?}\n{}",
                p.name(other),
                p.name(holder),
                p.logs()
            ),
        }
        drop(held);
        p.wait_unlocked("from-a.txt", SYNC);
        let after = open_rw(&p, other, "from-a.txt").unwrap_or_else(|e| {
            panic!(
                "O_RDWR open on {} after {}'s lock went: {e}\n{}",
                p.name(other),
                p.name(holder),
                p.logs()
            )
        });
        drop(after);
        p.wait_unlocked("from-a.txt", SYNC);
    }

    // B goes away for good; A and C change things, then are pointed at each other.
    p.stop(B);
    write(
        &p,
        A,
        "from-a.txt",
        b"written on a, edited while b was gone",
    );
    write(&p, C, "while-apart-c.txt", b"made on c while b was gone");
    wait_no_locks(&p);
    p.relink(Some(vec![(A, C)]));
    write(&p, A, "after-a.txt", b"after the re-point, on a");
    write(&p, C, "after-c.txt", b"after the re-point, on c");
    let tree = p.wait_trees_equal(&[A, C], SYNC);
    assert!(
        any_conflict_names(&tree).is_empty(),
        "re-pointing made conflict copies: {tree:#?}"
    );
    for (name, want) in [
        ("from-a.txt", &b"written on a, edited while b was gone"[..]),
        ("from-c.txt", b"written on c"),
        ("renamed/inner.txt", b"inner"),
        ("while-apart-c.txt", b"made on c while b was gone"),
        ("after-a.txt", b"after the re-point, on a"),
        ("after-c.txt", b"after the re-point, on c"),
    ] {
        assert_eq!(
            content(&tree, name),
            want,
            "{name} after re-pointing: {tree:#?}"
        );
    }
    assert!(!tree.contains_key("folder"), "{tree:#?}");
}

/// Reads peer `i`'s `sync` object for peer `j` and checks its numbers are consistent; returns
/// it (or `None` if the status has none).
fn checked_sync(p: &Peers, i: usize, j: usize) -> Result<Option<serde_json::Value>, String> {
    let Ok(s) = p.sync_state(i, j) else {
        return Ok(None);
    };
    let state = s["state"].as_str().unwrap_or_default();
    if !["offline", "comparing", "syncing", "in-sync"].contains(&state) {
        return Err(format!(
            "{}'s sync state for {} is {state:?}: {s}",
            p.name(i),
            p.name(j)
        ));
    }
    for (done, total) in [
        ("files_done", "files_total"),
        ("bytes_done", "bytes_total"),
        ("recv_files_done", "recv_files_total"),
        ("recv_bytes_done", "recv_bytes_total"),
    ] {
        let (d, t) = (s[done].as_u64(), s[total].as_u64());
        match (d, t) {
            (Some(d), Some(t)) if d <= t => {}
            _ => {
                return Err(format!(
                    "{}'s sync for {}: {done} {d:?} must be a number <= {total} {t:?}: {s}",
                    p.name(i),
                    p.name(j)
                ));
            }
        }
    }
    Ok(Some(s))
}

/// 2,000 small files made on A while B is stopped reach B when it returns; meanwhile the sync
/// progress both report is consistent (done <= total), and once in sync, everything sent was
/// counted.
#[test]
fn a_large_catch_up_reports_consistent_progress() {
    const DIRS: usize = 20;
    const PER_DIR: usize = 100;
    let mut p = Peers::start_with(2, opts());
    p.stop(B);
    for d in 0..DIRS {
        fs::create_dir(p.file(A, &format!("d{d:02}"))).expect("mkdir");
        for f in 0..PER_DIR {
            write(
                &p,
                A,
                &format!("d{d:02}/f{f:03}.txt"),
                format!("file {f} of folder {d}\n").as_bytes(),
            );
        }
    }
    wait_no_locks(&p);
    p.launch(B);

    let mut observed = Vec::new();
    let mut max_total = 0;
    p.wait_until(
        "B has all 2,000 files (trees equal) with consistent progress reports",
        Duration::from_secs(180),
        || {
            for (i, j) in [(A, B), (B, A)] {
                if let Some(s) = checked_sync(&p, i, j).unwrap_or_else(|e| panic!("{e}")) {
                    max_total = max_total.max(s["files_total"].as_u64().unwrap_or(0));
                    if observed.len() < 20 {
                        observed.push(format!("{}->{}: {s}", p.name(i), p.name(j)));
                    }
                }
            }
            p.compare_trees(&[A, B]).map(|_| ())
        },
    );
    let tree = p.wait_trees_equal(&[A, B], SYNC);
    assert_eq!(tree.len(), DIRS * (PER_DIR + 1), "{} names", tree.len());
    assert_eq!(
        content(&tree, "d07/f042.txt"),
        b"file 42 of folder 7\n".as_slice()
    );

    // Once in sync, both report it, and every count is complete.
    let (a_for_b, b_for_a) = p.wait_until("A and B report each other in-sync", SYNC, || {
        let a = checked_sync(&p, A, B)?.ok_or("A's status has no sync object for B")?;
        let b = checked_sync(&p, B, A)?.ok_or("B's status has no sync object for A")?;
        if a["state"] == "in-sync" && b["state"] == "in-sync" {
            Ok((a, b))
        } else {
            Err(format!("A: {a}; B: {b}"))
        }
    });
    for s in [&a_for_b, &b_for_a] {
        for (done, total) in [
            ("files_done", "files_total"),
            ("bytes_done", "bytes_total"),
            ("recv_files_done", "recv_files_total"),
            ("recv_bytes_done", "recv_bytes_total"),
        ] {
            assert_eq!(s[done], s[total], "in-sync but {done} != {total}: {s}");
        }
        assert!(s["rounds"].as_u64().is_some(), "no \"rounds\" number: {s}");
    }
    let sent = a_for_b["files_done"].as_u64().unwrap_or(0);
    let received = b_for_a["recv_files_done"].as_u64().unwrap_or(0);
    assert!(
        sent.max(received) >= (DIRS * PER_DIR) as u64,
        "2,000 files went from A to B since they connected, but A counts {sent} sent and B \
         {received} received (largest files_total seen during the sync: {max_total}; first \
         reports: {observed:#?})"
    );
}

/// How many files of the `bulk/` tree that [`a_receiver_killed_during_a_first_sync_loses_nothing`]
/// seeds are in backing folder `root` (by name).
fn bulk_files_in(root: &Path) -> usize {
    let Ok(dirs) = fs::read_dir(root.join("bulk")) else {
        return 0;
    };
    dirs.filter_map(Result::ok)
        .filter_map(|d| fs::read_dir(d.path()).ok())
        .map(|files| {
            files
                .filter_map(Result::ok)
                .filter(|f| f.file_name().to_string_lossy().starts_with('f'))
                .count()
        })
        .sum()
}

/// B is killed (SIGKILL) while it receives A's tree for the first time, and started again: it
/// gets the rest, and nothing is lost, doubled or left behind. Files B had put in place but whose
/// index entries the kill cut off are found by its start scan with the content A has: the same
/// version, not a conflict.
#[test]
fn a_receiver_killed_during_a_first_sync_loses_nothing() {
    killed_during_a_first_sync(B);
}

/// The same with the sender killed: A's queue of what the comparison found B lacks was on disk,
/// or is found again by the next comparison.
#[test]
fn a_sender_killed_during_a_first_sync_loses_nothing() {
    killed_during_a_first_sync(A);
}

/// A's seeded tree of 4,000 files reaches B, whose backing folder starts empty; `victim` is
/// killed once B has an eighth of it, then started again; the trees must end equal, with every
/// file once, no conflict copy and nothing left of the interrupted transfers.
fn killed_during_a_first_sync(victim: usize) {
    const DIRS: usize = 20;
    const FILES: usize = 200;
    let mut o = opts();
    for d in 0..DIRS {
        for f in 0..FILES {
            o = o.seed(
                A,
                &format!("bulk/d{d}/f{f}.txt"),
                format!("{d}/{f} ").repeat(40).as_bytes(),
            );
        }
    }
    let mut p = Peers::start_with(2, o);
    let b_backing = p.backing_file(B, "");
    let all = DIRS * FILES;
    let deadline = std::time::Instant::now() + SYNC;
    // Killed once an eighth is there: commits of the next files are under way then.
    while bulk_files_in(&b_backing) < all / 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "B did not receive an eighth"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    p.kill9(victim);
    let at_kill = bulk_files_in(&b_backing);
    eprintln!(
        "B had {at_kill} of {all} files when {} was killed",
        p.name(victim)
    );
    p.restart(victim);
    let tree = p.wait_trees_equal(&[A, B], SYNC * 2);
    let files = tree
        .keys()
        .filter(|k| k.starts_with("bulk/d") && k.ends_with(".txt"));
    assert_eq!(files.count(), all, "every file, once");
    for d in [0, DIRS - 1] {
        for f in [0, FILES - 1] {
            let want = format!("{d}/{f} ").repeat(40);
            assert_eq!(
                content(&tree, &format!("bulk/d{d}/f{f}.txt")),
                want.as_bytes()
            );
        }
    }
    assert!(
        any_conflict_names(&tree).is_empty(),
        "no conflict copies: {:?}",
        any_conflict_names(&tree)
    );
    // Nothing of the interrupted transfers is left in B's backing folder.
    let mut leftovers = Vec::new();
    for d in 0..DIRS {
        let dir = b_backing.join(format!("bulk/d{d}"));
        for e in fs::read_dir(&dir).expect("folder").filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('f') {
                leftovers.push(format!("bulk/d{d}/{name}"));
            }
        }
    }
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}
