//! `peerfs init` and `peerfs id` end to end: the identity files and their modes, the peer id
//! as the last line of stdout, refusals as one `peerfs: error:` line with exit code 1. Loading
//! a key with loose permissions is checked through peerfs-proto directly.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use peerfs_proto::{Identity, PeerId};

const BIN: &str = env!("CARGO_BIN_EXE_peerfs");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run peerfs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("utf-8 stderr")
}

fn last_line(out: &Output) -> String {
    stdout(out).lines().last().unwrap_or_default().to_string()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o7777
}

fn assert_one_error_line(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(out));
    let err = stderr(out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("peerfs: error: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

#[test]
fn init_creates_a_private_identity_and_prints_its_id_last() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state/nested");
    let s = state.to_str().expect("utf-8 path");

    let out = run(&["init", "--state", s, "--name", "office-a"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let id_text = last_line(&out);
    let id: PeerId = id_text.parse().expect("last line is a peer id");
    assert_eq!(id.to_string(), id_text, "printed in canonical form");

    assert_eq!(mode(&state), 0o700, "state folder");
    assert_eq!(mode(&state.join("peer.key")), 0o600, "key file");
    assert_eq!(Identity::load(&state).expect("load").id, id);

    // `peerfs id` prints the same id, alone.
    let out = run(&["id", "--state", s]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), format!("{id_text}\n"));
}

#[test]
fn init_twice_refuses_and_keeps_the_identity() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = tmp.path().to_str().expect("utf-8 path");
    let first = run(&["init", "--state", s]);
    assert!(first.status.success(), "stderr: {}", stderr(&first));
    let key = fs::read(tmp.path().join("peer.key")).expect("key");

    let second = run(&["init", "--state", s, "--name", "other"]);
    assert_one_error_line(&second, "refusing to replace");
    assert!(stdout(&second).is_empty());
    assert_eq!(fs::read(tmp.path().join("peer.key")).expect("key"), key);
    assert_eq!(last_line(&run(&["id", "--state", s])), last_line(&first));
}

#[test]
fn id_without_identity_says_to_run_init() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = tmp.path().to_str().expect("utf-8 path");
    let out = run(&["id", "--state", s]);
    assert_one_error_line(&out, "peerfs init --state");
}

#[test]
fn a_loose_key_mode_is_refused_with_the_fix() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = tmp.path().to_str().expect("utf-8 path");
    assert!(run(&["init", "--state", s]).status.success());
    let key = tmp.path().join("peer.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");

    let err = Identity::load(tmp.path()).expect_err("0644 key");
    assert_eq!(
        err.to_string(),
        format!(
            "key file {k} is readable by group or others (mode 0644): run chmod 600 {k}",
            k = key.display()
        )
    );
    // The CLI reports the same, as one line.
    assert_one_error_line(&run(&["id", "--state", s]), "run chmod 600");
}

#[test]
fn bad_names_and_unusable_folders_are_one_line_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = tmp.path().join("x");
    let s = s.to_str().expect("utf-8 path");
    assert_one_error_line(&run(&["init", "--state", s, "--name", "a/b"]), "--name");
    assert_one_error_line(&run(&["init", "--state", s, "--name", ""]), "--name");

    let file = tmp.path().join("file");
    fs::write(&file, "").expect("write");
    let f = file.to_str().expect("utf-8 path");
    assert_one_error_line(&run(&["init", "--state", f]), f);
}
