//! End-to-end tests of `peerfs demo`: the real binary starts two real peers in a folder of the
//! test's, which must come up mounted and connected, lock a file across the two drives, and
//! go away cleanly on Ctrl-C (SIGINT), leaving no mount behind.
//!
//! They need root and /dev/fuse (as CI has); where those are missing they say so and return.
//! Every wait is a bounded poll on a condition that prints what it saw on timeout.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_peerfs");
/// Two peers to mount and connect: generous, CI machines are small.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// For the demo to exit after SIGINT (it unmounts every drive and waits for its peers).
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// For a released lock (after its linger) to let the other peer write.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// For a file written on one drive to appear on the other.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(20);
/// What the demo prints once every peer is up.
const READY_LINE: &str = "peerfs demo: ready";

fn can_mount_fuse() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .is_ok();
    if !ok {
        eprintln!("SKIPPED: the demo mounts drives, which needs root and a usable /dev/fuse");
    }
    ok
}

/// The fstype of the topmost mount at `path`, from /proc/self/mountinfo.
fn mount_type(path: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let want = path.to_str().expect("utf-8 path").replace(' ', "\\040");
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        (fields.get(4)? == &want).then(|| fields.get(dash + 1).map(|s| s.to_string()))?
    })
}

/// Mount points at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let prefix = dir.to_str().expect("utf-8 path").replace(' ', "\\040");
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|mp| mp.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Polls `f` every 20 ms until it returns `Ok`, for at most `timeout`; panics with what it
/// saw last (and `context()`) otherwise.
#[track_caller]
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, String>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(seen) if Instant::now() >= deadline => panic!(
                "timed out after {timeout:?} waiting for {what}; last seen: {seen}\n{}",
                context()
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A pipe drained into a string on a thread, so the child never blocks on a full pipe.
fn drain(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&text);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            let chunk = String::from_utf8_lossy(&buf[..n]).into_owned();
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_str(&chunk);
        }
    });
    text
}

/// A running `peerfs demo --peers 2 --dir <temp>/demo`. Drop stops it (SIGTERM, then SIGKILL)
/// and detaches whatever is still mounted, before the temp folder goes.
struct Demo {
    child: Option<Child>,
    /// The `--dir` (created by the demo).
    dir: PathBuf,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    // Last: removed after Drop has unmounted everything.
    _tmp: tempfile::TempDir,
}

impl Demo {
    /// Starts the demo and waits until it says it is ready.
    fn start() -> Demo {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = fs::canonicalize(tmp.path()).expect("canonical tempdir");
        let dir = root.join("demo");
        let mut child = Command::new(BIN)
            .args(["demo", "--peers", "2", "--dir"])
            .arg(&dir)
            // Keep runtime records out of the real /run and away from other tests.
            .env("PEERFS_RUNTIME_DIR", root.join("run"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run peerfs demo");
        let stdout = drain(child.stdout.take().expect("stdout pipe"));
        let stderr = drain(child.stderr.take().expect("stderr pipe"));
        let mut demo = Demo {
            child: Some(child),
            dir,
            stdout,
            stderr,
            _tmp: tmp,
        };
        let out = Arc::clone(&demo.stdout);
        let ctx = demo.context_fn();
        let child = demo.child.as_mut().expect("child");
        wait_for(
            "the demo to print its ready line",
            READY_TIMEOUT,
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    // Reported by the context below, with the output.
                    return Err(format!("the demo exited with {status}"));
                }
                let text = out.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if text.lines().any(|l| l.starts_with(READY_LINE)) {
                    Ok(())
                } else {
                    Err("no ready line yet".to_string())
                }
            },
            ctx,
        );
        demo
    }

    /// Peer `name`'s drive (the layout the demo promises: `DIR/peer-X/drive`).
    fn drive(&self, name: &str) -> PathBuf {
        self.dir.join(format!("peer-{name}")).join("drive")
    }

    /// The demo's output so far, for failure messages.
    fn output(&self) -> String {
        (self.context_fn())()
    }

    fn context_fn(&self) -> impl Fn() -> String + use<> {
        let (out, err) = (Arc::clone(&self.stdout), Arc::clone(&self.stderr));
        move || {
            format!(
                "--- demo stdout ---\n{}\n--- demo stderr ---\n{}",
                out.lock().unwrap_or_else(|e| e.into_inner()),
                err.lock().unwrap_or_else(|e| e.into_inner())
            )
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
            // SAFETY: kill has no memory arguments; `pid` is our unreaped child.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// Waits (bounded) for the demo to exit; None on timeout.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(libc::SIGTERM);
            if self.wait_exit(EXIT_TIMEOUT).is_none() {
                self.signal(libc::SIGKILL);
                let _ = self.wait_exit(Duration::from_secs(5));
            }
        }
        for name in ["a", "b"] {
            let drive = self.drive(name);
            if mount_type(&drive).is_some() {
                let c = CString::new(drive.as_os_str().as_bytes()).expect("no NUL");
                // SAFETY: valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

fn open_rw(path: &Path) -> std::io::Result<fs::File> {
    // What `exec 3<>FILE` does in a shell.
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

#[test]
fn demo_runs_two_locking_peers_and_stops_cleanly_on_ctrl_c() {
    if !can_mount_fuse() {
        return;
    }
    let mut demo = Demo::start();
    let (a, b) = (demo.drive("a"), demo.drive("b"));
    for drive in [&a, &b] {
        assert_eq!(
            mount_type(drive).as_deref(),
            Some("fuse.peerfs"),
            "{} is not a peerfs mount\n{}",
            drive.display(),
            demo.output()
        );
    }
    let out = demo.output();
    assert!(
        out.contains(&a.display().to_string()) && out.contains(&b.display().to_string()),
        "the ready block names both drives\n{out}"
    );

    // A write-open on a locks the name on every peer: b cannot open it for writing meanwhile
    // (ETXTBSY, 26, "Text file busy").
    let held = open_rw(&a.join("notes.txt")).expect("open notes.txt read-write on a");
    match open_rw(&b.join("notes.txt")) {
        Ok(_) => panic!(
            "b opened notes.txt read-write while a holds it open\n{}",
            demo.output()
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::ETXTBSY),
            "b's open while a holds the file: {e}\n{}",
            demo.output()
        ),
    }
    // Closed on a, the lock goes after its linger and b may write.
    drop(held);
    let ctx = demo.context_fn();
    let on_b = wait_for(
        "b to open notes.txt read-write once a closed it",
        RELEASE_TIMEOUT,
        || open_rw(&b.join("notes.txt")).map_err(|e| e.to_string()),
        ctx,
    );
    drop(on_b);

    demo.signal(libc::SIGINT);
    let status = demo.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "the demo did not exit within {EXIT_TIMEOUT:?} of SIGINT\n{}",
            demo.output()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGINT\n{}",
        demo.output()
    );
    let left = mounts_under(&demo.dir);
    assert!(
        left.is_empty(),
        "mounts left behind: {left:?}\n{}",
        demo.output()
    );
    // --dir is kept, with what the demo made in it.
    for name in ["a", "b"] {
        let config = demo.dir.join(format!("peer-{name}/peerfs.toml"));
        assert!(config.is_file(), "{} is kept", config.display());
    }
}

#[test]
fn demo_replicates_a_new_file_from_a_to_b() {
    if !can_mount_fuse() {
        return;
    }
    let mut demo = Demo::start();
    let (a, b) = (demo.drive("a"), demo.drive("b"));
    fs::write(a.join("hello.txt"), b"hello").expect("write hello.txt on a");
    let ctx = demo.context_fn();
    wait_for(
        "hello.txt to appear on b with a's content",
        REPLICATION_TIMEOUT,
        || match fs::read(b.join("hello.txt")) {
            Ok(bytes) if bytes == b"hello" => Ok(()),
            Ok(bytes) => Err(format!("content {:?}", String::from_utf8_lossy(&bytes))),
            Err(e) => Err(e.to_string()),
        },
        ctx,
    );
    demo.signal(libc::SIGINT);
    let status = demo.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exit after SIGINT\n{}",
        demo.output()
    );
    assert!(mounts_under(&demo.dir).is_empty(), "no mount left behind");
}
