//! End-to-end tests of the `peerfs` binary: bad input gives one clear line and a non-zero exit;
//! real mounts (foreground and `--daemon`) come up usable, report status, and go away cleanly.
//!
//! Mounting tests need root and /dev/fuse (as CI has); where those are missing they say so and
//! return. Every wait is a bounded poll on a condition that prints what it saw on timeout.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_peerfs");
/// Generous: CI machines are small and share their two cores with other test binaries.
const DEADLINE: Duration = Duration::from_secs(30);

/// A scratch folder with `backing/`, `mnt/` and a config file that uses relative paths.
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
        let s = Scratch { _dir: dir, root };
        s.write_config("config.toml", "backing", "mnt", "state", "");
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn config(&self) -> PathBuf {
        self.path("config.toml")
    }

    fn write_config(
        &self,
        file: &str,
        backing: &str,
        mnt: &str,
        state: &str,
        extra: &str,
    ) -> PathBuf {
        let text = format!(
            "name = \"test-a\"\nbacking = \"{backing}\"\nmountpoint = \"{mnt}\"\nstate = \"{state}\"\n\
             log_level = \"debug\"\n{extra}"
        );
        let path = self.path(file);
        fs::write(&path, text).expect("write config");
        path
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        // Keep runtime records out of the real /run and away from other tests.
        c.env("PEERFS_RUNTIME_DIR", self.path("run"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run peerfs")
    }

    fn mount_args(&self, config: &Path) -> Vec<String> {
        vec![
            "mount".into(),
            "--config".into(),
            config.display().to_string(),
        ]
    }

    fn run_mount(&self, config: &Path) -> Output {
        self.cmd()
            .args(self.mount_args(config))
            .output()
            .expect("run peerfs mount")
    }
}

/// Asserts a failed run printed exactly one `peerfs: error:` line containing every needle.
fn assert_one_line_error(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected failure, got {:?}; stderr: {stderr}",
        out.status
    );
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one stderr line, got: {stderr:?}");
    assert!(lines[0].starts_with("peerfs: error: "), "{stderr:?}");
    for needle in needles {
        assert!(lines[0].contains(needle), "{needle:?} not in {stderr:?}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn can_mount_fuse() -> bool {
    let ok = is_root()
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

/// The fstype of the topmost mount at `path`, from /proc/self/mountinfo.
fn mount_type(path: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let want = path.to_str().expect("utf-8 path").replace(' ', "\\040");
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        (fields.get(4)? == &want).then(|| fields.get(dash + 1).map(|s| s.to_string()))?
    })
}

/// Running and not a zombie (a daemon reparented to a PID 1 that reaps late stays a zombie).
fn process_running(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_string));
            !matches!(state.as_deref(), Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool, mut seen: impl FnMut() -> String) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        if Instant::now() >= deadline {
            panic!(
                "timed out after {DEADLINE:?} waiting for {what}; saw: {}",
                seen()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lazily unmounts and kills whatever a test left behind, so a failing test does not leave
/// mounts that break the next run.
struct Cleanup {
    mountpoint: PathBuf,
    pid: Option<i32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if mount_type(&self.mountpoint).is_some() {
            let c = CString::new(self.mountpoint.as_os_str().as_bytes()).expect("no NUL");
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        if let Some(pid) = self.pid.filter(|&p| process_running(p)) {
            // SAFETY: kill has no memory arguments.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn read_pid(s: &Scratch) -> i32 {
    fs::read_to_string(s.path("state/peerfs.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

fn status_json(s: &Scratch) -> (Option<i32>, serde_json::Value) {
    let out = s.run(&[
        "status",
        "--config",
        s.config().to_str().expect("utf-8"),
        "--json",
    ]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[test]
fn version_prints() {
    let out = Command::new(BIN).arg("--version").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("peerfs "));
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(BIN).arg("mount").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN).arg("frobnicate").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn missing_config() {
    let s = Scratch::new();
    let out = s.run_mount(&s.path("nope.toml"));
    assert_one_line_error(&out, &["cannot read config", "nope.toml"]);
}

#[test]
fn unknown_key_is_named() {
    let s = Scratch::new();
    let cfg = s.write_config("c.toml", "backing", "mnt", "state", "colour = \"blue\"\n");
    assert_one_line_error(&s.run_mount(&cfg), &["`colour`"]);
    let cfg = s.write_config("d.toml", "backing", "mnt", "state", "[drive]\nthread = 2\n");
    assert_one_line_error(&s.run_mount(&cfg), &["`thread`"]);
}

#[test]
fn backing_missing() {
    let s = Scratch::new();
    let cfg = s.write_config("c.toml", "gone", "mnt", "state", "");
    assert_one_line_error(&s.run_mount(&cfg), &["backing", "gone", "does not exist"]);
}

#[test]
fn backing_not_a_directory() {
    let s = Scratch::new();
    fs::write(s.path("file"), b"x").expect("write");
    let cfg = s.write_config("c.toml", "file", "mnt", "state", "");
    assert_one_line_error(&s.run_mount(&cfg), &["backing", "not a directory"]);
}

#[test]
fn mountpoint_missing() {
    let s = Scratch::new();
    let cfg = s.write_config("c.toml", "backing", "nomnt", "state", "");
    assert_one_line_error(
        &s.run_mount(&cfg),
        &["mountpoint", "nomnt", "does not exist"],
    );
}

#[test]
fn mountpoint_not_empty() {
    let s = Scratch::new();
    fs::write(s.path("mnt/hidden"), b"x").expect("write");
    assert_one_line_error(&s.run_mount(&s.config()), &["mountpoint", "not empty"]);
}

#[test]
fn mountpoint_already_a_mount() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    }
    let s = Scratch::new();
    let mnt = s.path("mnt");
    let _cleanup = Cleanup {
        mountpoint: mnt.clone(),
        pid: None,
    };
    let target = CString::new(mnt.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"size=1m".as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
    assert_one_line_error(
        &s.run_mount(&s.config()),
        &["mountpoint", "already a mount point"],
    );
    // And `unmount` refuses what is not a peerfs drive.
    let out = s.run(&["unmount", mnt.to_str().expect("utf-8")]);
    assert_one_line_error(&out, &["not a peerfs drive", "tmpfs"]);
    assert_eq!(
        mount_type(&mnt).as_deref(),
        Some("tmpfs"),
        "tmpfs must be untouched"
    );
}

#[test]
fn state_inside_backing() {
    let s = Scratch::new();
    let cfg = s.write_config("c.toml", "backing", "mnt", "backing/.peerfs", "");
    assert_one_line_error(&s.run_mount(&cfg), &["state", "inside backing"]);
    assert!(
        !s.path("backing/.peerfs").exists(),
        "nothing created for a refused config"
    );
}

#[test]
fn nesting_of_backing_and_mountpoint() {
    let s = Scratch::new();
    fs::create_dir(s.path("backing/inner")).expect("mkdir");
    let cfg = s.write_config("c.toml", "backing", "backing/inner", "state", "");
    assert_one_line_error(&s.run_mount(&cfg), &["mountpoint", "inside backing"]);
    let cfg = s.write_config("d.toml", "mnt", "mnt", "state", "");
    assert_one_line_error(&s.run_mount(&cfg), &["same folder"]);
}

#[test]
fn bad_listen_and_peers() {
    let s = Scratch::new();
    for (extra, needle) in [
        ("listen = \"host:notaport\"\n", "listen"),
        (
            "[[peers]]\nname = \"\"\nid = \"x\"\naddress = \"b\"\n",
            "name",
        ),
        ("[[peers]]\nname = \"b\"\naddress = \"b\"\n", "`id`"),
        ("[[peers]]\nname = \"b\"\nid = \"x\"\n", "peerfs id"),
        (
            "[[peers]]\nname = \"b\"\nid = \"OR4L-B6GN-RNPW-TQDP-RBCZ-PDBP-SZF7-QMYU-ERIO-U2BO-VDZ2-ZAPX-3ITA\"\naddress = \"b\"\n\
             [[peers]]\nname = \"b\"\nid = \"MTJE-E4OB-UIJV-BWIP-LSLL-IDAA-PCZ2-WKD2-MGW3-MI5D-N7WA-EWXR-3P2Q\"\naddress = \"c\"\n",
            "more than once",
        ),
        // A networked drive needs an identity: `peerfs init` first.
        ("listen = \"127.0.0.1:0\"\n", "peerfs init"),
        ("[drive]\ncache_ttl = \"soon\"\n", "cache_ttl"),
    ] {
        let cfg = s.write_config("c.toml", "backing", "mnt", "state", extra);
        assert_one_line_error(&s.run_mount(&cfg), &[needle]);
    }
}

#[test]
fn status_without_daemon_exits_3() {
    let s = Scratch::new();
    let cfg = s.config();
    let out = s.run(&["status", "--config", cfg.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("not mounted"));
    let (code, v) = status_json(&s);
    assert_eq!(code, Some(3));
    assert_eq!(v["mounted"], false);
    assert_eq!(v["name"], "test-a");
}

#[test]
fn unmount_of_a_plain_folder() {
    let s = Scratch::new();
    let out = s.run(&["unmount", s.path("mnt").to_str().expect("utf-8")]);
    assert_one_line_error(&out, &["not a mount point"]);
}

// ---------------------------------------------------------------------------------------------
// Real mounts

#[test]
fn daemon_mount_status_unmount() {
    if !can_mount_fuse() {
        return;
    }
    let s = Scratch::new();
    let mnt = s.path("mnt");
    let mut cleanup = Cleanup {
        mountpoint: mnt.clone(),
        pid: None,
    };
    let mut args = s.mount_args(&s.config());
    args.push("--daemon".into());
    let out = s.cmd().args(&args).output().expect("mount --daemon");
    assert!(
        out.status.success(),
        "mount --daemon failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = read_pid(&s);
    cleanup.pid = Some(pid);

    // Readiness: the command returned, so the drive must be usable now, without waiting.
    assert_eq!(mount_type(&mnt).as_deref(), Some("fuse.peerfs"));
    fs::write(mnt.join("hello.txt"), b"through the drive").expect("write through mount");
    assert_eq!(
        fs::read(s.path("backing/hello.txt")).expect("file in backing"),
        b"through the drive"
    );

    let (code, v) = status_json(&s);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["mounted"], true, "{v}");
    assert_eq!(v["pid"], pid, "{v}");
    assert_eq!(v["mountpoint"], mnt.to_str().expect("utf-8"), "{v}");
    assert!(v["stats"].get("lookups").is_some(), "{v}");

    // A second mount of the same state is refused by name.
    let out = s.cmd().args(&args).output().expect("second mount");
    assert_one_line_error(&out, &["already mounted by pid", &pid.to_string()]);

    let log = fs::read_to_string(s.path("state/peerfs.log")).expect("daemon log");
    assert!(log.contains("mounted at"), "{log}");

    // A file held open keeps the drive busy: unmount must say so and leave it mounted.
    let held = fs::File::open(mnt.join("hello.txt")).expect("open");
    let out = s.run(&["unmount", mnt.to_str().expect("utf-8")]);
    assert_one_line_error(&out, &["drive busy"]);
    assert_eq!(mount_type(&mnt).as_deref(), Some("fuse.peerfs"));
    drop(held);

    let out = s.run(&["unmount", mnt.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "unmount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `unmount` waits for the daemon: both must be gone as soon as it returns.
    assert!(
        !process_running(pid),
        "daemon {pid} still running after unmount"
    );
    assert_eq!(mount_type(&mnt), None);
    assert!(!s.path("state/control.sock").exists());
    assert!(!s.path("state/peerfs.pid").exists());
    assert_eq!(
        fs::read_dir(s.path("run")).map(|d| d.count()).unwrap_or(0),
        0,
        "runtime record removed"
    );
    let (code, v) = status_json(&s);
    assert_eq!(
        (code, &v["mounted"]),
        (Some(3), &serde_json::Value::Bool(false))
    );
}

#[test]
fn foreground_mount_unmounts_on_sigterm() {
    if !can_mount_fuse() {
        return;
    }
    let s = Scratch::new();
    let mnt = s.path("mnt");
    let log = fs::File::create(s.path("foreground.log")).expect("log file");
    let mut child: Child = s
        .cmd()
        .args(s.mount_args(&s.config()))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn mount");
    let _cleanup = Cleanup {
        mountpoint: mnt.clone(),
        pid: i32::try_from(child.id()).ok(),
    };
    let read_log = || fs::read_to_string(s.path("foreground.log")).unwrap_or_default();

    wait_until(
        "the foreground drive to answer status",
        || status_json(&s).1["mounted"] == true,
        read_log,
    );
    assert_eq!(mount_type(&mnt).as_deref(), Some("fuse.peerfs"));
    fs::write(mnt.join("fg.txt"), b"fg").expect("write through mount");
    assert_eq!(
        fs::read(s.path("backing/fg.txt")).expect("in backing"),
        b"fg"
    );

    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    // SAFETY: kill has no memory arguments; `pid` is our child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut status = None;
    wait_until(
        "the foreground daemon to exit after SIGTERM",
        || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        },
        read_log,
    );
    let status = status.expect("exited");
    assert_eq!(status.code(), Some(0), "exit status; log: {}", read_log());
    assert_eq!(mount_type(&mnt), None, "still mounted after SIGTERM");
    assert!(read_log().contains("SIGTERM"), "{}", read_log());
}

#[test]
fn mount_recovers_a_dead_mountpoint() {
    if !can_mount_fuse() {
        return;
    }
    let s = Scratch::new();
    let mnt = s.path("mnt");
    let mut cleanup = Cleanup {
        mountpoint: mnt.clone(),
        pid: None,
    };
    let mut args = s.mount_args(&s.config());
    args.push("--daemon".into());
    let out = s.cmd().args(&args).output().expect("mount --daemon");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = read_pid(&s);
    // SAFETY: kill has no memory arguments.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_until(
        "the killed daemon's mount to answer ENOTCONN",
        || fs::metadata(&mnt).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN),
        || format!("{:?}", fs::metadata(&mnt).map(|_| "ok")),
    );

    let out = s.cmd().args(&args).output().expect("mount again");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "remount failed: {stderr}");
    assert!(
        stderr.contains("peerfs: warning:") && stderr.contains("detached"),
        "{stderr}"
    );
    cleanup.pid = Some(read_pid(&s));
    fs::write(mnt.join("again.txt"), b"x").expect("write through new mount");
    assert!(s.path("backing/again.txt").exists());

    let out = s.run(&["unmount", mnt.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mount_type(&mnt), None);
}
