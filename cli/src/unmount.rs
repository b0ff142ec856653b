//! `peerfs unmount MOUNTPOINT`: owns unmounting a drive and waiting (bounded) until the daemon
//! that served it has exited, so that a script can remount or remove the state right after.
//!
//! The daemon is found through its runtime record ([`crate::runtime`]), never by asking the
//! mount, which may be dead or busy.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::mountinfo::{self, MountTable, PEERFS_FSTYPE};
use crate::runtime;

/// How long to wait for the daemon to exit after the kernel let go of the mount.
const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn unmount_command(mountpoint: &Path) -> Result<()> {
    let path = mountinfo::canonical_mount_path(mountpoint)?;
    let table = MountTable::read()?;
    let entry = table
        .find(&path)
        .ok_or_else(|| anyhow!("{} is not a mount point", path.display()))?;
    if entry.fstype != PEERFS_FSTYPE {
        bail!(
            "{} is not a peerfs drive (it is a {} mount)",
            path.display(),
            entry.fstype
        );
    }

    let record = match runtime::read_record(&path) {
        Ok(r) => r,
        Err(e) => {
            crate::print_stderr(&format!(
                "peerfs: warning: cannot read the runtime record of {}: {e}",
                path.display()
            ));
            None
        }
    };
    // Only a daemon that still runs is worth waiting for (a kill -9'd one left its record).
    let daemon = record.filter(|r| runtime::process_alive(r.pid, r.start_time));

    if let Err(e) = mountinfo::umount2(&path, 0) {
        match e.raw_os_error() {
            Some(libc::EBUSY) => bail!(
                "drive busy: {} is in use (a process has a file, folder or working directory \
                 open on it; `fuser -vm {}` lists them)",
                path.display(),
                path.display()
            ),
            Some(libc::EPERM) => bail!(
                "cannot unmount {}: {e}; unmounting needs root (or `fusermount3 -u` as the user \
                 who mounted it)",
                path.display()
            ),
            _ => return Err(e).with_context(|| format!("cannot unmount {}", path.display())),
        }
    }

    if let Some(rec) = daemon {
        let deadline = Instant::now() + DAEMON_EXIT_TIMEOUT;
        while runtime::process_alive(rec.pid, rec.start_time) {
            if Instant::now() >= deadline {
                bail!(
                    "{} is unmounted, but its daemon (pid {}) did not exit within {}s; see {}",
                    path.display(),
                    rec.pid,
                    DAEMON_EXIT_TIMEOUT.as_secs(),
                    rec.state.join("peerfs.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}
