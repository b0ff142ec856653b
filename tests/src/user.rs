//! Running a closure as another user: fork, drop to that uid/gid in the child, report the
//! closure's result (value or errno) back over a pipe. The parent waits with a deadline.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

/// A uid/gid that is neither root nor the owner of anything the tests create as root.
pub const OTHER_UID: u32 = 65534;
pub const OTHER_GID: u32 = 65534;

/// How long a child may take before it is killed and the test fails.
const CHILD_DEADLINE: Duration = Duration::from_secs(30);

/// Runs `f` in a forked child whose real and effective ids are `uid`/`gid` (supplementary
/// groups: `groups`), and returns its result. `f` should make plain system calls only: it runs
/// in a forked copy of a multi-threaded process (allocation is fine with glibc; printing is not).
pub fn as_user_groups(
    uid: u32,
    gid: u32,
    groups: &[u32],
    f: impl FnOnce() -> io::Result<u64>,
) -> io::Result<u64> {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: the child only makes system calls and runs `f` before `_exit`; it never returns
    // into the test harness.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // Child.
        // SAFETY: plain system calls on values owned by this process; `_exit` never returns.
        unsafe {
            libc::close(rd);
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(120);
            }
        }
        let (tag, value): (u8, u64) = match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(v)) => (0, v),
            Ok(Err(e)) => (1, e.raw_os_error().unwrap_or(libc::EIO) as u64),
            // SAFETY: leaving the forked child without unwinding into the harness.
            Err(_) => unsafe { libc::_exit(121) },
        };
        let mut msg = [0u8; 9];
        msg[0] = tag;
        msg[1..].copy_from_slice(&value.to_le_bytes());
        // SAFETY: `msg` is 9 readable bytes; `_exit` never returns.
        unsafe {
            libc::write(wr, msg.as_ptr().cast::<libc::c_void>(), msg.len());
            libc::_exit(0);
        }
    }
    // Parent.
    // SAFETY: closing our copy of the write end, which we own.
    unsafe { libc::close(wr) };
    let deadline = Instant::now() + CHILD_DEADLINE;
    let mut status = 0;
    loop {
        // SAFETY: `pid` is our child; `status` is writable.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: closing our read end, which we own.
            unsafe { libc::close(rd) };
            panic!("waitpid({pid}) failed: {e}");
        }
        if Instant::now() > deadline {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
                libc::close(rd);
            }
            panic!("child running as uid {uid} did not finish within {CHILD_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut msg = [0u8; 9];
    // SAFETY: reading at most 9 bytes into `msg`; the child has exited so this cannot block.
    let n = unsafe { libc::read(rd, msg.as_mut_ptr().cast::<libc::c_void>(), msg.len()) };
    // SAFETY: closing our read end, which we own.
    unsafe { libc::close(rd) };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    assert!(
        code == 0 && n == 9,
        "child running as uid {uid} gid {gid} failed: exit code {code} (120 = could not switch \
         ids, 121 = panicked), status {status:#x}, {n} bytes reported"
    );
    let mut v = [0u8; 8];
    v.copy_from_slice(&msg[1..]);
    let value = u64::from_le_bytes(v);
    if msg[0] == 0 {
        Ok(value)
    } else {
        Err(io::Error::from_raw_os_error(value as i32))
    }
}

/// [`as_user_groups`] with no supplementary groups.
pub fn as_user(uid: u32, gid: u32, f: impl FnOnce() -> io::Result<u64>) -> io::Result<u64> {
    as_user_groups(uid, gid, &[], f)
}
