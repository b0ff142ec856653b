//! `peerfs trash list|restore` end to end: the binary against a trash filled through the
//! library (`Trash::put`, as the replicator does when a peer deletes a file).
//!
//! Without a daemon, `restore` writes into the backing folder directly; with one (a real
//! mount, root and /dev/fuse needed, skipped otherwise) it goes through the control socket.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use peerfs_proto::RelPath;
use peerfs_replicator::trash::{Trash, TrashEntry};

const BIN: &str = env!("CARGO_BIN_EXE_peerfs");

/// `backing/`, `mnt/` and `config.toml` (state in `state/`, not created).
struct Scratch {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = fs::canonicalize(dir.path()).expect("canonical tempdir");
        fs::create_dir(root.join("backing")).expect("mkdir backing");
        fs::create_dir(root.join("mnt")).expect("mkdir mnt");
        fs::write(
            root.join("config.toml"),
            "name = \"office-a\"\nbacking = \"backing\"\nmountpoint = \"mnt\"\nstate = \"state\"\n\
             [trash]\nretention = \"7d\"\n",
        )
        .expect("write config");
        Scratch { _dir: dir, root }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn config(&self) -> String {
        self.path("config.toml").display().to_string()
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("PEERFS_RUNTIME_DIR", self.path("run"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run peerfs")
    }

    fn trash(&self, args: &[&str]) -> Output {
        let config = self.config();
        let mut all = vec!["trash", args[0], "--config", &config];
        all.extend_from_slice(&args[1..]);
        self.run(&all)
    }

    /// What a peer's deletion does: the file goes to the trash.
    fn delete_from_peer(&self, rel: &str, origin: &str) -> TrashEntry {
        let root: OwnedFd = fs::File::open(self.path("backing")).expect("open").into();
        let trash = Trash::open(&self.path("state")).expect("open trash");
        let rel = RelPath::new(rel.as_bytes()).expect("path");
        trash.put(root.as_fd(), &rel, origin).expect("put")
    }
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({:?}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    let text = stdout(out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn assert_one_line_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr:?}");
    assert!(lines[0].starts_with("peerfs: error: "), "{stderr:?}");
    for needle in needles {
        assert!(lines[0].contains(needle), "{needle:?} not in {stderr:?}");
    }
}

#[test]
fn list_on_an_empty_trash() {
    let s = Scratch::new();
    let out = stdout(&s.trash(&["list"]));
    assert!(out.contains("is empty"), "{out}");
    let v = json(&s.trash(&["list", "--json"]));
    assert_eq!(v["entries"], serde_json::json!([]), "{v}");
    assert_eq!(v["retention"], "7d", "{v}");
    assert!(!s.path("state").exists(), "listing creates nothing");

    // An existing but empty trash says the same.
    Trash::open(&s.path("state")).expect("open");
    assert!(stdout(&s.trash(&["list"])).contains("is empty"));
}

#[test]
fn list_shows_entries_as_table_and_json() {
    let s = Scratch::new();
    fs::create_dir(s.path("backing/docs")).expect("mkdir");
    fs::write(s.path("backing/docs/report.docx"), vec![b'x'; 2048]).expect("write");
    fs::write(s.path("backing/notes.txt"), b"n").expect("write");
    let e1 = s.delete_from_peer("docs/report.docx", "office-b");
    let e2 = s.delete_from_peer("notes.txt", "office-c");

    let out = stdout(&s.trash(&["list"]));
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("deleted at") && lines[0].contains("origin"),
        "{out}"
    );
    assert!(lines[1].contains("office-b") && lines[1].contains("docs/report.docx"));
    assert!(
        lines[1].contains("2.0 KiB") && lines[1].contains(&e1.id),
        "{out}"
    );
    assert!(
        lines[2].contains("office-c") && lines[2].contains(&e2.id),
        "{out}"
    );
    assert!(out.contains("kept 7d"), "{out}");

    let v = json(&s.trash(&["list", "--json"]));
    let entries = v["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 2, "{v}");
    assert_eq!(entries[0]["path"], "docs/report.docx");
    assert_eq!(entries[0]["origin"], "office-b");
    assert_eq!(entries[0]["kind"], "file");
    assert_eq!(entries[0]["size"], 2048);
    assert_eq!(entries[0]["id"], e1.id.as_str());
    assert!(
        entries[0]["deleted_at"]
            .as_str()
            .expect("time")
            .ends_with('Z')
    );
}

#[test]
fn restore_without_a_daemon() {
    let s = Scratch::new();
    fs::create_dir(s.path("backing/docs")).expect("mkdir");
    fs::write(s.path("backing/docs/report.docx"), b"the report").expect("write");
    let e = s.delete_from_peer("docs/report.docx", "office-b");
    // The peer deleted the folder too.
    fs::remove_dir(s.path("backing/docs")).expect("rmdir");

    let out = stdout(&s.trash(&["restore", "docs/report.docx"]));
    assert!(out.starts_with("restored docs/report.docx"), "{out}");
    assert!(out.contains(&e.id) && out.contains("office-b"), "{out}");
    assert!(out.contains("backing folder"), "{out}");
    assert_eq!(
        fs::read(s.path("backing/docs/report.docx")).expect("restored"),
        b"the report"
    );
    assert_eq!(
        json(&s.trash(&["list", "--json"]))["entries"],
        serde_json::json!([])
    );

    // Once restored it is gone from the trash.
    let out = s.trash(&["restore", "docs/report.docx"]);
    assert_one_line_error(&out, &["docs/report.docx", "not in the trash"]);
}

#[test]
fn restore_by_absolute_path_and_id() {
    let s = Scratch::new();
    fs::write(s.path("backing/a.txt"), b"first").expect("write");
    let first = s.delete_from_peer("a.txt", "office-b");
    fs::write(s.path("backing/a.txt"), b"second").expect("write");
    s.delete_from_peer("a.txt", "office-b");

    // An absolute path under the mountpoint, and the older entry by id.
    let abs = s.path("mnt/a.txt").display().to_string();
    let v = json(&s.trash(&["restore", &abs, "--id", &first.id, "--json"]));
    assert_eq!(v["restored_to"], "a.txt", "{v}");
    assert_eq!(v["entry"]["id"], first.id.as_str(), "{v}");
    assert_eq!(fs::read(s.path("backing/a.txt")).expect("back"), b"first");
    assert_eq!(
        json(&s.trash(&["list", "--json"]))["entries"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    let out = s.trash(&["restore", "/etc/passwd"]);
    assert_one_line_error(&out, &["/etc/passwd", "not inside the drive"]);
    let out = s.trash(&["restore", "../a.txt"]);
    assert_one_line_error(&out, &["'..'"]);
    let out = s.trash(&["restore", "a.txt", "--id", "20000101T000000.000Z-0000"]);
    assert_one_line_error(&out, &["no trash entry"]);
}

#[test]
fn restore_onto_a_taken_name() {
    let s = Scratch::new();
    fs::write(s.path("backing/report.docx"), b"old").expect("write");
    s.delete_from_peer("report.docx", "office-b");
    fs::write(s.path("backing/report.docx"), b"new").expect("write");

    let out = stdout(&s.trash(&["restore", "report.docx"]));
    assert!(out.contains("restored beside it"), "{out}");
    assert_eq!(
        fs::read(s.path("backing/report.docx")).expect("cur"),
        b"new"
    );
    let beside: Vec<String> = fs::read_dir(s.path("backing"))
        .expect("ls")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "report.docx")
        .collect();
    assert_eq!(beside.len(), 1, "{beside:?}");
    assert!(
        beside[0].starts_with("report (restored ") && beside[0].ends_with(").docx"),
        "{beside:?}"
    );
    assert!(out.contains(&beside[0]), "{out}");
    assert_eq!(
        fs::read(s.path("backing").join(&beside[0])).expect("restored"),
        b"old"
    );
}

#[test]
fn config_before_or_after_the_action() {
    let s = Scratch::new();
    let config = s.config();
    let before = s.run(&["trash", "--config", &config, "list", "--json"]);
    assert_eq!(json(&before)["entries"], serde_json::json!([]));
    let short = s.run(&["trash", "list", "-c", &config]);
    assert!(stdout(&short).contains("is empty"));
    let missing = s.run(&["trash", "list"]);
    assert_eq!(missing.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--config"));
}

#[test]
fn unknown_trash_key_is_refused() {
    let s = Scratch::new();
    fs::write(
        s.path("config.toml"),
        "name = \"a\"\nbacking = \"backing\"\nmountpoint = \"mnt\"\nstate = \"state\"\n\
         [trash]\nretension = \"7d\"\n",
    )
    .expect("write");
    let out = s.trash(&["list"]);
    assert_one_line_error(&out, &["`retension`", "line 6"]);
}

fn can_mount_fuse() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    let ok = unsafe { libc::geteuid() == 0 }
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .is_ok();
    if !ok {
        eprintln!("SKIPPED: mounting tests need root and a usable /dev/fuse");
    }
    ok
}

/// Detaches the mount and kills the daemon if the test did not get to unmount.
struct Cleanup(PathBuf, PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(c) = CString::new(self.0.as_os_str().as_bytes()) {
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        if let Some(pid) = fs::read_to_string(&self.1)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: kill has no memory arguments.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[test]
fn restore_with_a_daemon_goes_through_it() {
    if !can_mount_fuse() {
        return;
    }
    let s = Scratch::new();
    fs::write(s.path("backing/a.txt"), b"kept").expect("write");
    s.delete_from_peer("a.txt", "office-b");
    let config = s.config();
    let out = s.run(&["mount", "--config", &config, "--daemon"]);
    assert!(
        out.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _cleanup = Cleanup(s.path("mnt"), s.path("state/peerfs.pid"));

    // Listing never needs the daemon; restoring asks it (never writes behind its back).
    assert!(stdout(&s.trash(&["list"])).contains("a.txt"));
    let out = s.trash(&["restore", "a.txt"]);
    if out.status.success() {
        let text = stdout(&out);
        assert!(text.contains("through the daemon"), "{text}");
        assert_eq!(fs::read(s.path("mnt/a.txt")).expect("via drive"), b"kept");
    } else {
        // A daemon without the restore hook says so, and nothing is touched.
        assert_one_line_error(&out, &["cannot restore"]);
        assert!(!s.path("backing/a.txt").exists());
        assert!(stdout(&s.trash(&["list"])).contains("a.txt"));
    }
    let mnt = s.path("mnt").display().to_string();
    let out = s.run(&["unmount", &mnt]);
    assert!(
        out.status.success(),
        "unmount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_path_is_resolved_like_the_drive_names_it() {
    let s = Scratch::new();
    fs::create_dir(s.path("backing/d")).expect("mkdir");
    fs::write(s.path("backing/d/f"), b"f").expect("write");
    s.delete_from_peer("d", "office-b");
    // One file out of a trashed folder, named with `./` and a trailing slash on the folder.
    let out = stdout(&s.trash(&["restore", "./d/f"]));
    assert!(out.starts_with("restored d/f"), "{out}");
    assert!(Path::new(&s.path("backing/d/f")).exists());
    let out = stdout(&s.trash(&["restore", "d/"]));
    assert!(out.contains("restored beside it"), "{out}");
}
