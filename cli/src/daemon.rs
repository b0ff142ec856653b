//! Daemonizing: owns the fork, the detachment of the child and the readiness pipe through which
//! `peerfs mount --daemon` returns only once the drive is usable (as mountpoint-s3's run.rs does).
//!
//! The fork happens before any thread exists: after `fork` only the calling thread survives, so
//! a thread holding a lock (an allocator arena, a logging queue, a runtime) would leave it locked
//! forever in the child. [`daemonize`] refuses to fork if the process already has threads.
//!
//! Pipe protocol, child to parent, one line: `READY` or `ERROR <one-line reason>`. End-of-file
//! without a line means the child died; the parent then reports its exit status.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long the parent waits for the child to mount.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The child's end of the readiness pipe. Dropping it unreported reads as a failure.
pub struct Readiness {
    pipe: Option<File>,
}

impl Readiness {
    /// For the foreground: nobody waits.
    pub fn none() -> Readiness {
        Readiness { pipe: None }
    }

    /// The drive is mounted and usable.
    pub fn ready(&mut self) {
        self.send("READY\n");
    }

    /// Mounting failed; `reason` is shown to the user by the waiting parent.
    pub fn failed(&mut self, reason: &str) {
        self.send(&format!("ERROR {}\n", crate::one_line(reason)));
    }

    fn send(&mut self, line: &str) {
        if let Some(mut pipe) = self.pipe.take() {
            // The parent may have timed out and gone (EPIPE); the log has the story then.
            if let Err(e) = pipe.write_all(line.as_bytes()) {
                tracing::warn!("cannot report readiness to the starting process: {e}");
            }
        }
    }
}

/// Which side of the fork we are on.
pub enum Forked {
    /// The original process: exit with `code`; `pid` is the daemon's.
    Parent { code: u8, pid: i32 },
    /// The daemon: go on serving, and report through `Readiness`.
    Child(Readiness),
}

/// Number of threads of this process, from /proc (the only reliable source).
fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Forks. The parent waits for the child's readiness line and returns the exit code to use;
/// the child detaches (new session, standard streams on /dev/null) and returns its `Readiness`.
pub fn daemonize(log_file: &Path) -> Result<Forked> {
    if let Some(n) = thread_count().filter(|&n| n > 1) {
        bail!("internal error: refusing to fork with {n} threads running");
    }
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error()).context("cannot create the readiness pipe");
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // SAFETY: the process is single-threaded (checked above), so the child gets a consistent
    // copy of all memory and locks; both sides only continue with ordinary Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error()).context("cannot fork the daemon");
    }
    if pid > 0 {
        drop(write_end);
        let code = wait_for_child(pid, File::from(read_end), log_file);
        return Ok(Forked::Parent { code, pid });
    }

    drop(read_end);
    detach().context("cannot detach the daemon")?;
    Ok(Forked::Child(Readiness {
        pipe: Some(File::from(write_end)),
    }))
}

/// In the child: leave the terminal's session and stop using the caller's streams.
fn detach() -> io::Result<()> {
    // SAFETY: setsid has no memory arguments; it fails only if we are a group leader, which a
    // freshly forked child never is.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    // Do not keep the caller's working directory busy (it may be on a filesystem someone wants
    // to unmount). All our paths are absolute by now.
    std::env::set_current_dir("/")?;
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: both descriptors are valid; dup2 atomically replaces `fd`, which this process
        // owns as one of its standard streams.
        if unsafe { libc::dup2(devnull.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    close_inherited_fds();
    Ok(())
}

/// Closes descriptors the caller handed us by accident (a test harness's pipe, a shell's
/// redirection): a daemon holding the write end of someone's pipe keeps them waiting for EOF
/// for as long as the drive is mounted. Only descriptors without FD_CLOEXEC are closed:
/// everything Rust opened in this process (log, pid file, readiness pipe) has it, so nothing
/// that some object still owns is touched.
fn close_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    // Collect first: closing while iterating would also close the directory's own descriptor.
    let fds: Vec<libc::c_int> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > libc::STDERR_FILENO)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD only reads the descriptor's flags; a stale number just fails (EBADF).
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            // SAFETY: the descriptor is not owned by any Rust object (those are all
            // close-on-exec, see above), so closing it cannot cause a double close.
            unsafe { libc::close(fd) };
        }
    }
}

/// In the parent: read the child's line within [`READY_TIMEOUT`] and turn it into an exit code,
/// printing the child's reason on failure.
fn wait_for_child(pid: libc::pid_t, mut pipe: File, log_file: &Path) -> u8 {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut buf = Vec::new();
    let outcome = loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            break Outcome::Line(String::from_utf8_lossy(&buf[..end]).into_owned());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Outcome::TimedOut;
        }
        let mut pfd = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis())
            .unwrap_or(libc::c_int::MAX)
            .max(1);
        // SAFETY: `pfd` is a valid pollfd for the duration of the call; nfds is 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Outcome::Io(e);
        }
        if rc == 0 {
            continue; // the deadline check above ends the loop
        }
        let mut chunk = [0u8; 4096];
        match pipe.read(&mut chunk) {
            Ok(0) => break Outcome::Eof,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Outcome::Io(e),
        }
    };

    let fail = |msg: String| {
        crate::report_error(&anyhow::anyhow!(msg));
        crate::EXIT_ERROR
    };
    match outcome {
        Outcome::Line(line) if line == "READY" => 0,
        Outcome::Line(line) => {
            reap(pid);
            let reason = line.strip_prefix("ERROR ").unwrap_or(&line);
            fail(reason.to_string())
        }
        Outcome::Eof => {
            let how = reap(pid);
            fail(format!(
                "the daemon exited before the drive was mounted ({how}); see {}",
                log_file.display()
            ))
        }
        Outcome::TimedOut => {
            // A mount that is not usable after this long is stuck (e.g. the kernel handshake
            // never completed); a half-started daemon nobody waits for must not linger.
            // SAFETY: kill has no memory arguments; `pid` is our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reap(pid);
            fail(format!(
                "the daemon did not report the drive usable within {}s and was killed; see {}",
                READY_TIMEOUT.as_secs(),
                log_file.display()
            ))
        }
        Outcome::Io(e) => fail(format!("cannot read the daemon's readiness: {e}")),
    }
}

enum Outcome {
    Line(String),
    Eof,
    TimedOut,
    Io(io::Error),
}

/// Waits for our failed child (bounded, it is exiting) and describes how it ended.
fn reap(pid: libc::pid_t) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid out-pointer; WNOHANG keeps the call from blocking.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            return if libc::WIFEXITED(status) {
                format!("exit status {}", libc::WEXITSTATUS(status))
            } else if libc::WIFSIGNALED(status) {
                format!("killed by signal {}", libc::WTERMSIG(status))
            } else {
                "stopped".to_string()
            };
        }
        if rc < 0 || Instant::now() >= deadline {
            return "status unknown".to_string();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
