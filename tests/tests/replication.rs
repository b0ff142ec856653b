//! Replication between real peers on loopback (issue 8): content written through one drive
//! appears identical on the others after close; namespace operations follow in order; removals
//! land in the trash; temp and owner files never travel; an offline peer catches up; a receiver
//! whose disk is full is reported and catches up once it has room.
//!
//! Every wait is bounded and polls a condition; nothing sleeps for a fixed time to let
//! replication happen.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use peerfs_tests::peers::{Peers, PeersOptions, RESERVED_PREFIX, wait_until};
use peerfs_tests::sys;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// Bound for a change to reach a connected peer.
const SYNC: Duration = Duration::from_secs(20);

fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    fs::File::open(path)?.read_to_end(&mut v)?;
    Ok(v)
}

/// Waits until `name` on peer `i` (read through its drive) has `want`.
#[track_caller]
fn wait_content(p: &Peers, i: usize, name: &str, want: &[u8]) {
    let path = p.file(i, name);
    wait_until(
        &format!("{} has the new {name}", p.name(i)),
        SYNC,
        || match read(&path) {
            Ok(v) if v == want => Ok(()),
            Ok(v) => Err(format!("{} bytes, differing", v.len())),
            Err(e) => Err(e.to_string()),
        },
    );
}

#[track_caller]
fn wait_gone(p: &Peers, i: usize, name: &str) {
    let path = p.file(i, name);
    wait_until(
        &format!("{name} is gone on {}", p.name(i)),
        SYNC,
        || match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Ok(_) => Err("still there".into()),
            Err(e) => Err(e.to_string()),
        },
    );
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn content_written_on_one_drive_appears_on_the_other() {
    let p = Peers::start(2);
    fs::write(p.file(A, "hello.txt"), b"hello from a\n").expect("write");
    wait_content(&p, B, "hello.txt", b"hello from a\n");
    // And back, once A's lock is gone (it lingers briefly after the close).
    p.wait_unlocked("hello.txt", SYNC);
    fs::write(p.file(B, "hello.txt"), b"B was here\n").expect("write on b");
    wait_content(&p, A, "hello.txt", b"B was here\n");
}

#[test]
fn edits_of_a_large_file_travel_as_small_deltas() {
    let p = Peers::start(2);
    let mut data = pseudo_random(8 << 20, 7);
    fs::write(p.file(A, "big.bin"), &data).expect("write");
    wait_content(&p, B, "big.bin", &data);
    let sent_before = content_sent(&p, A);
    // Overwrite 1 byte in the middle, insert, append, truncate.
    {
        let mut f = OpenOptions::new()
            .write(true)
            .open(p.file(A, "big.bin"))
            .expect("open");
        f.seek(SeekFrom::Start(4 << 20)).expect("seek");
        f.write_all(b"X").expect("write");
    }
    data[4 << 20] = b'X';
    wait_content(&p, B, "big.bin", &data);
    let delta = content_sent(&p, A) - sent_before;
    assert!(
        delta < 256 * 1024,
        "a 1-byte edit of 8 MiB sent {delta} content bytes"
    );

    data.truncate(5 << 20);
    data.extend_from_slice(b"appended tail");
    {
        let f = OpenOptions::new()
            .write(true)
            .open(p.file(A, "big.bin"))
            .expect("open");
        f.set_len(5 << 20).expect("truncate");
        let mut f = OpenOptions::new()
            .append(true)
            .open(p.file(A, "big.bin"))
            .expect("open");
        f.write_all(b"appended tail").expect("append");
    }
    wait_content(&p, B, "big.bin", &data);
    // Insert in the middle: rewrite the file with 100 bytes inserted at 1000.
    let mut inserted = data[..1000].to_vec();
    inserted.extend_from_slice(&[b'I'; 100]);
    inserted.extend_from_slice(&data[1000..]);
    let before = content_sent(&p, A);
    fs::write(p.file(A, "big.bin"), &inserted).expect("rewrite");
    wait_content(&p, B, "big.bin", &inserted);
    let delta = content_sent(&p, A) - before;
    assert!(delta < 256 * 1024, "an insert sent {delta} content bytes");
}

fn content_sent(p: &Peers, i: usize) -> u64 {
    let st = p.status(i).expect("status");
    st["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["content_bytes_sent"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn namespace_operations_replicate() {
    let p = Peers::start(2);
    let a = |n: &str| p.file(A, n);
    fs::create_dir(a("dir")).expect("mkdir");
    fs::create_dir(a("dir/sub")).expect("mkdir sub");
    fs::write(a("dir/sub/f.txt"), b"f").expect("write");
    std::os::unix::fs::symlink("sub/f.txt", a("dir/link")).expect("symlink");
    fs::hard_link(a("dir/sub/f.txt"), a("dir/hard")).expect("link");
    wait_content(&p, B, "dir/sub/f.txt", b"f");
    wait_content(&p, B, "dir/hard", b"f");
    wait_until("the symlink arrives", SYNC, || {
        fs::read_link(p.file(B, "dir/link"))
            .map_err(|e| e.to_string())
            .and_then(|t| {
                (t == Path::new("sub/f.txt"))
                    .then_some(())
                    .ok_or(format!("{t:?}"))
            })
    });
    // chmod, utimes, xattr
    fs::set_permissions(a("dir/sub/f.txt"), fs::Permissions::from_mode(0o640)).expect("chmod");
    wait_until("the mode arrives", SYNC, || {
        let m = fs::metadata(p.file(B, "dir/sub/f.txt")).map_err(|e| e.to_string())?;
        (m.mode() & 0o7777 == 0o640)
            .then_some(())
            .ok_or(format!("{:o}", m.mode()))
    });
    // rename a folder, then a file over another
    fs::rename(a("dir/sub"), a("dir/moved")).expect("rename dir");
    wait_content(&p, B, "dir/moved/f.txt", b"f");
    wait_gone(&p, B, "dir/sub");
    fs::write(a("dir/other.txt"), b"other").expect("write other");
    wait_content(&p, B, "dir/other.txt", b"other");
    fs::rename(a("dir/other.txt"), a("dir/moved/f.txt")).expect("rename over");
    wait_content(&p, B, "dir/moved/f.txt", b"other");
    wait_gone(&p, B, "dir/other.txt");
    // unlink, rmdir
    fs::remove_file(a("dir/hard")).expect("unlink");
    wait_gone(&p, B, "dir/hard");
    fs::remove_file(a("dir/link")).expect("unlink symlink");
    fs::remove_file(a("dir/moved/f.txt")).expect("unlink");
    fs::remove_dir(a("dir/moved")).expect("rmdir");
    wait_gone(&p, B, "dir/moved");
    // The removed file is in B's trash.
    let out = p.cli(B, "trash", &["list", "--json"]);
    assert!(
        out.stdout.contains("dir/moved/f.txt") || out.stdout.contains("f.txt"),
        "{}",
        out.describe()
    );
}

#[test]
fn three_peers_all_get_every_change() {
    let p = Peers::start(3);
    fs::write(p.file(A, "one.txt"), b"1").expect("write a");
    fs::write(p.file(C, "two.txt"), b"2").expect("write c");
    for i in [A, B, C] {
        wait_content(&p, i, "one.txt", b"1");
        wait_content(&p, i, "two.txt", b"2");
    }
}

#[test]
fn an_offline_peer_catches_up_in_order() {
    let mut p = Peers::start(2);
    fs::write(p.file(A, "keep.txt"), b"v1").expect("write");
    wait_content(&p, B, "keep.txt", b"v1");
    p.stop(B);
    fs::create_dir(p.file(A, "new")).expect("mkdir");
    fs::write(p.file(A, "new/a.txt"), b"a").expect("write");
    fs::rename(p.file(A, "new/a.txt"), p.file(A, "new/b.txt")).expect("rename");
    fs::write(p.file(A, "keep.txt"), b"v2").expect("rewrite");
    fs::remove_file(p.file(A, "new/b.txt")).expect("rm");
    fs::write(p.file(A, "new/c.txt"), b"c").expect("write c");
    p.restart(B);
    wait_content(&p, B, "keep.txt", b"v2");
    wait_content(&p, B, "new/c.txt", b"c");
    wait_gone(&p, B, "new/b.txt");
    wait_gone(&p, B, "new/a.txt");
    let _ = C;
    let _ = PeersOptions::default();
}

#[test]
fn overwrites_are_patched_in_place_unless_a_reader_has_the_file_open() {
    let p = Peers::start(2);
    let mut data = pseudo_random(4 << 20, 11);
    fs::write(p.file(A, "doc.bin"), &data).expect("write");
    wait_content(&p, B, "doc.bin", &data);
    let ino = |p: &Peers| {
        fs::metadata(p.backing_file(B, "doc.bin"))
            .expect("stat")
            .ino()
    };
    let before = ino(&p);
    // No one has it open on B (the reads above release their handles asynchronously): the
    // overwrite is patched into the same file (O(edit)).
    wait_until("B's drive has no open handles", SYNC, || {
        let st = p.status(B)?;
        match st["stats"]["open_handles"].as_u64() {
            Some(0) => Ok(()),
            other => Err(format!("open_handles {other:?}")),
        }
    });
    {
        let f = OpenOptions::new()
            .write(true)
            .open(p.file(A, "doc.bin"))
            .expect("open");
        std::os::unix::fs::FileExt::write_all_at(&f, b"PATCH", 1 << 20).expect("pwrite");
    }
    data[1 << 20..(1 << 20) + 5].copy_from_slice(b"PATCH");
    // Watched in B's backing folder: polling through B's drive would itself hold the file open
    // (and rightly make the update a rename).
    let backing = p.backing_file(B, "doc.bin");
    wait_until("B's backing file has the patch", SYNC, || {
        match read(&backing) {
            Ok(v) if v == data => Ok(()),
            Ok(v) => Err(format!("{} bytes, differing", v.len())),
            Err(e) => Err(e.to_string()),
        }
    });
    assert_eq!(ino(&p), before, "an in-place update keeps the inode");
    wait_content(&p, B, "doc.bin", &data);

    // A reader on B holds the file open: it keeps reading the version it opened.
    let reader = fs::File::open(p.file(B, "doc.bin")).expect("open on b");
    p.wait_unlocked("doc.bin", SYNC);
    let old = data.clone();
    {
        let f = OpenOptions::new()
            .write(true)
            .open(p.file(A, "doc.bin"))
            .expect("open");
        std::os::unix::fs::FileExt::write_all_at(&f, b"AGAIN", 2 << 20).expect("pwrite");
    }
    data[2 << 20..(2 << 20) + 5].copy_from_slice(b"AGAIN");
    wait_content(&p, B, "doc.bin", &data);
    let mut seen = Vec::new();
    (&reader).read_to_end(&mut seen).expect("read old");
    assert!(seen == old, "the open reader saw a changed file");
    assert_ne!(
        ino(&p),
        before,
        "with a reader, the update is renamed into place"
    );
}

/// `chattr FLAG PATH`; false when the filesystem has no such attribute (the caller skips).
fn chattr(flag: &str, path: &Path) -> bool {
    std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .status()
        .is_ok_and(|st| st.success())
}

/// Restores a file's mutability even if the test fails half way.
struct Mutable(std::path::PathBuf);

impl Drop for Mutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_failing_target_is_retried_reported_and_left_intact() {
    let p = Peers::start(2);
    fs::write(p.file(A, "doc.txt"), b"version 1").expect("write");
    wait_content(&p, B, "doc.txt", b"version 1");
    p.wait_unlocked("doc.txt", SYNC);
    // B's copy cannot be changed (EPERM even for root): the update must fail, be reported,
    // leave version 1 intact, and be retried until it works.
    let target = p.backing_file(B, "doc.txt");
    if !chattr("+i", &target) {
        eprintln!("SKIPPED: the backing filesystem has no immutable attribute (chattr +i)");
        return;
    }
    let guard = Mutable(target.clone());
    fs::write(p.file(A, "doc.txt"), b"version 2, longer").expect("rewrite");
    wait_until("A reports the failure for B", SYNC, || {
        let st = p.status(A)?;
        let peers = st["peers"].as_array().cloned().unwrap_or_default();
        peers
            .iter()
            .find_map(|x| x["replication_error"].as_str().map(str::to_string))
            .ok_or_else(|| format!("{peers:?}"))
    });
    assert_eq!(read(&p.file(B, "doc.txt")).expect("read b"), b"version 1");
    let queued = p.status(A).expect("status")["peers"][0]["queue"].as_u64();
    assert!(queued >= Some(1), "the change is still queued: {queued:?}");
    drop(guard);
    wait_content(&p, B, "doc.txt", b"version 2, longer");
}

#[test]
fn a_killed_sender_resumes_its_queue() {
    let mut p = Peers::start(2);
    fs::write(p.file(A, "base.txt"), b"base").expect("write");
    wait_content(&p, B, "base.txt", b"base");
    p.stop(B);
    fs::write(p.file(A, "queued-1.txt"), b"one").expect("write");
    fs::create_dir(p.file(A, "queued-dir")).expect("mkdir");
    fs::write(p.file(A, "queued-dir/two.txt"), b"two").expect("write");
    // close() returns before the kernel's asynchronous RELEASE, which is when the change is
    // recorded: wait until the lock went (it goes after the release).
    p.wait_unlocked("queued-dir/two.txt", SYNC);
    // A dies without any clean shutdown; its queue for B is on disk.
    p.kill9(A);
    p.restart(A);
    p.restart(B);
    wait_content(&p, B, "queued-1.txt", b"one");
    wait_content(&p, B, "queued-dir/two.txt", b"two");
}

#[test]
fn a_tree_of_many_files_replicates_and_so_does_its_removal() {
    let p = Peers::start(2);
    let root = p.file(A, "tree");
    fs::create_dir(&root).expect("mkdir");
    for d in 0..10 {
        let dir = root.join(format!("d{d}"));
        fs::create_dir(&dir).expect("mkdir");
        for f in 0..50 {
            fs::write(dir.join(format!("f{f}.txt")), format!("{d}/{f}")).expect("write");
        }
    }
    wait_until("B has all 500 files", Duration::from_secs(120), || {
        let mut n = 0;
        for d in 0..10 {
            for f in 0..50 {
                let path = p.file(B, &format!("tree/d{d}/f{f}.txt"));
                if read(&path).ok().as_deref() == Some(format!("{d}/{f}").as_bytes()) {
                    n += 1;
                }
            }
        }
        if n == 500 {
            Ok(())
        } else {
            Err(format!("{n} of 500"))
        }
    });
    fs::remove_dir_all(&root).expect("rm -rf");
    wait_until(
        "the tree is gone on B",
        Duration::from_secs(120),
        || match fs::symlink_metadata(p.file(B, "tree")) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Ok(_) => Err("still there".into()),
            Err(e) => Err(e.to_string()),
        },
    );
    // Every file is in B's trash, nothing was destroyed.
    let out = p.cli(B, "trash", &["list", "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.describe()));
    let listed = v["entries"].as_array().map(|a| a.len()).unwrap_or(0);
    assert!(listed >= 500, "{listed} trash entries: {}", out.describe());
}

#[test]
fn a_deleted_file_lands_in_the_trash_and_a_restore_replicates() {
    let p = Peers::start(2);
    fs::create_dir(p.file(A, "docs")).expect("mkdir");
    fs::write(p.file(A, "docs/plan.txt"), b"the plan").expect("write");
    wait_content(&p, B, "docs/plan.txt", b"the plan");
    p.wait_unlocked("docs/plan.txt", SYNC);
    fs::remove_file(p.file(A, "docs/plan.txt")).expect("rm");
    wait_gone(&p, B, "docs/plan.txt");
    // B keeps it in its trash, with its path.
    let out = p.cli(B, "trash", &["list", "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.describe()));
    let entries = v["entries"].as_array().cloned().unwrap_or_default();
    assert!(
        entries.iter().any(|e| e["path"] == "docs/plan.txt"),
        "{entries:?}"
    );
    // Restored on B (through its daemon), the file comes back on both peers.
    let out = p.cli(B, "trash", &["restore", "docs/plan.txt"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    wait_content(&p, B, "docs/plan.txt", b"the plan");
    wait_content(&p, A, "docs/plan.txt", b"the plan");
}

#[test]
fn small_changes_are_not_held_up_by_a_large_transfer() {
    let p = Peers::start(2);
    fs::create_dir(p.file(A, "big")).expect("mkdir");
    let big = pseudo_random(48 << 20, 3);
    fs::write(p.file(A, "big/video.bin"), &big).expect("write big");
    // Queued behind the large file: a small file elsewhere, a folder, a rename of the small
    // one, and an edit of the large file's folder contents that must wait for it.
    fs::write(p.file(A, "note.txt"), b"small").expect("write small");
    fs::create_dir(p.file(A, "later")).expect("mkdir later");
    fs::rename(p.file(A, "note.txt"), p.file(A, "later/note.txt")).expect("rename");
    fs::write(p.file(A, "big/readme.txt"), b"beside the video").expect("write beside");
    wait_content(&p, B, "later/note.txt", b"small");
    wait_content(&p, B, "big/video.bin", &big);
    wait_content(&p, B, "big/readme.txt", b"beside the video");
    wait_gone(&p, B, "note.txt");
}

/// B's disk fills up while A's files arrive: A reports B's "no space" error and keeps the
/// rest queued, B holds only whole files (each with A's content), and once B has room again
/// everything arrives.
#[test]
fn a_receiver_whose_disk_is_full_reports_it_and_catches_up_once_there_is_room() {
    let mut o = PeersOptions::default();
    o.drive.backing_tmpfs = Some(64 << 20);
    let p = Peers::start_with(2, o);
    let b_backing = p.backing_file(B, "");
    sys::resize_tmpfs(&b_backing, 1 << 20).expect("shrink B's backing filesystem to 1 MiB");
    let files: Vec<(String, Vec<u8>)> = (0..24)
        .map(|i| (format!("big/f{i}.bin"), pseudo_random(128 * 1024, 7000 + i)))
        .collect();
    fs::create_dir(p.file(A, "big")).expect("mkdir");
    for (name, content) in &files {
        fs::write(p.file(A, name), content).expect("write on A");
    }
    let error = wait_until("A reports B's full disk", SYNC * 3, || {
        let st = p.status(A)?;
        let peers = st["peers"].as_array().cloned().unwrap_or_default();
        peers
            .iter()
            .find_map(|x| x["replication_error"].as_str().map(str::to_string))
            .filter(|e| e.contains("space"))
            .ok_or_else(|| format!("{peers:?}"))
    });
    // Said as B's trouble, with the file: not to be taken for A's own disk.
    let whose = format!("{} could not apply big/f", p.name(B));
    assert!(error.starts_with(&whose), "{error:?} names B and the file");
    // Whatever B has is whole: a file is there with A's content or not at all.
    let mut whole = 0;
    for (name, content) in &files {
        match read(&p.backing_file(B, name)) {
            Ok(got) => {
                assert!(got == *content, "{name} on B: {} bytes, not A's", got.len());
                whole += 1;
            }
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::NotFound, "{name} on B: {e}"),
        }
    }
    assert!(whole < files.len(), "all {whole} files fit into 1 MiB?");
    let queued = p.status(A).expect("status")["peers"][0]["queue"].as_u64();
    assert!(queued >= Some(1), "the rest is still queued: {queued:?}");
    sys::resize_tmpfs(&b_backing, 64 << 20).expect("give B's backing filesystem room again");
    for (name, content) in &files {
        wait_content(&p, B, name, content);
    }
}

/// A backing folder on a filesystem that makes no unnamed files (`O_TMPFILE`), as FUSE and
/// CIFS mounts generally do not (here bindfs): received files are built under intermediate
/// names instead, and arrive whole, new names and updates alike, leaving no intermediate
/// name behind.
#[test]
fn a_backing_folder_without_unnamed_files_still_receives() {
    let mut o = PeersOptions::default();
    o.drive.backing_fuse = true;
    let p = Peers::start_with(2, o);
    // Else this would test the usual path again.
    let refused = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(p.backing_file(B, ""))
        .expect_err("B's backing filesystem makes unnamed files");
    assert_eq!(refused.raw_os_error(), Some(libc::EOPNOTSUPP), "{refused}");

    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                format!("docs/d{}/f{i}.bin", i % 4),
                pseudo_random(3000 + i * 97, 400 + i as u64),
            )
        })
        .collect();
    fs::create_dir(p.file(A, "docs")).expect("mkdir");
    for d in 0..4 {
        fs::create_dir(p.file(A, &format!("docs/d{d}"))).expect("mkdir");
    }
    for (name, content) in &files {
        fs::write(p.file(A, name), content).expect("write on A");
    }
    for (name, content) in &files {
        wait_content(&p, B, name, content);
    }
    // An update of a name B has (always built under a name) after new names (built unnamed
    // where the filesystem allows).
    p.wait_unlocked("docs/d0/f0.bin", SYNC);
    fs::write(p.file(A, "docs/d0/f0.bin"), b"second version").expect("rewrite on A");
    wait_content(&p, B, "docs/d0/f0.bin", b"second version");

    let said = p.mount(B).output();
    assert!(
        said.contains("makes no unnamed files"),
        "B did not say it fell back to named intermediate files:\n{said}"
    );
    let tree = peerfs_tests::tree::snapshot(&p.backing_file(B, ""))
        .unwrap_or_else(|e| panic!("B's backing tree: {e}"));
    let left: Vec<&String> = tree
        .keys()
        .filter(|k| {
            k.rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with(RESERVED_PREFIX))
        })
        .collect();
    assert!(left.is_empty(), "intermediate files left on B: {left:?}");
}
