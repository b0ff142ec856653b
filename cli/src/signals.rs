//! Termination signals of a serving process: owns turning SIGINT, SIGTERM and SIGHUP into a
//! clean unmount.
//!
//! The signals are blocked in every thread (the mask is set before any thread exists and is
//! inherited) and taken by one dedicated thread with `sigwait`, so no async-signal-safety rules
//! apply: that thread may lock, log and call the `Unmounter` like any other code. SIGHUP counts
//! too, because a foreground drive whose terminal closes must not be left dead (ENOTCONN).
//!
//! A signal that arrives while the drive is still mounting is remembered and acted on as soon as
//! the unmounter is armed. The first signal unmounts through the drive's `Unmounter` (which itself
//! detaches a busy drive); should that fail anyway, a second signal detaches the mount lazily.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use peerfs_fs_linux::Unmounter;

#[derive(Default)]
struct State {
    signals: u32,
    unmounter: Option<Unmounter>,
}

/// Shared between the signal thread and the serving code.
#[derive(Clone)]
pub struct Shutdown {
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state stays consistent even if a holder panicked: it is two plain fields.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn termination_set() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t; the signal numbers are valid constants.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
    }
    Ok(set)
}

/// Blocks the termination signals in the calling thread; call before any thread is spawned so
/// that every thread inherits the mask and only the signal thread receives them.
pub fn block() -> io::Result<libc::sigset_t> {
    let set = termination_set()?;
    // SAFETY: `set` is initialized; a null old-mask pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

impl Shutdown {
    /// Starts the signal thread for a drive at `mountpoint`; `set` is what [`block`] returned.
    pub fn start(set: libc::sigset_t, mountpoint: PathBuf) -> io::Result<Shutdown> {
        let shutdown = Shutdown {
            state: Arc::new(Mutex::new(State::default())),
            mountpoint,
        };
        let worker = shutdown.clone();
        std::thread::Builder::new()
            .name("peerfs-signals".into())
            .spawn(move || worker.wait_loop(set))?;
        Ok(shutdown)
    }

    /// Hands over the drive's unmounter; unmounts at once if a signal came while mounting.
    pub fn arm(&self, unmounter: Unmounter) {
        let mut st = lock(&self.state);
        if st.signals > 0 {
            tracing::info!("termination signal arrived while mounting; unmounting now");
            let u = unmounter.clone();
            st.unmounter = Some(unmounter);
            drop(st);
            self.unmount(&u);
        } else {
            st.unmounter = Some(unmounter);
        }
    }

    fn wait_loop(&self, set: libc::sigset_t) {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialized signal set and `sig` a valid out-pointer.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                tracing::error!(
                    "sigwait failed: {}; signals no longer unmount the drive",
                    io::Error::from_raw_os_error(rc)
                );
                return;
            }
            let mut st = lock(&self.state);
            st.signals += 1;
            let count = st.signals;
            let unmounter = st.unmounter.clone();
            drop(st);
            tracing::info!("received {}; unmounting", signal_name(sig));
            match unmounter {
                None => {} // still mounting: `arm` acts on it
                Some(u) if count == 1 => self.unmount(&u),
                Some(_) => self.detach(),
            }
        }
    }

    fn unmount(&self, u: &Unmounter) {
        if let Err(e) = u.unmount() {
            tracing::error!(
                "unmount of {} failed: {e}; send the signal again to detach it lazily",
                self.mountpoint.display()
            );
        }
    }

    fn detach(&self) {
        // Only if the top mount there is still a peerfs one: after a successful first unmount
        // something else may be mounted on the folder, and that is not ours to detach.
        let ours = crate::mountinfo::MountTable::read()
            .ok()
            .and_then(|t| {
                t.find(&self.mountpoint)
                    .map(|e| e.fstype == crate::mountinfo::PEERFS_FSTYPE)
            })
            .unwrap_or(false);
        if !ours {
            tracing::info!("{} is no longer mounted", self.mountpoint.display());
            return;
        }
        match crate::mountinfo::umount2(&self.mountpoint, libc::MNT_DETACH) {
            Ok(()) => tracing::warn!(
                "detached {} lazily; it is freed once its last user leaves",
                self.mountpoint.display()
            ),
            Err(e) => tracing::error!("lazy unmount of {} failed: {e}", self.mountpoint.display()),
        }
    }
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
