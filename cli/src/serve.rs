//! `peerfs mount`: owns the life of a serving process, in the foreground or as a daemon, from
//! validation to the clean exit after unmount.
//!
//! Order matters and is the point of this module:
//! 1. everything that can be checked is checked in the calling process, so bad input fails with
//!    a message on the user's terminal, not in a log file;
//! 2. only then, and still single-threaded, the daemon forks ([`crate::daemon`]);
//! 3. the serving process blocks termination signals before its first thread, binds the control
//!    socket, opens the vfs, mounts, writes the runtime record, and only then reports ready;
//! 4. it serves until unmounted and removes what it left behind (socket, record, pid file).

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result, anyhow, bail};
use peerfs_fs_linux::{Drive, MountOptions};
use peerfs_vfs::{Vfs, VfsConfig};

use crate::config::Config;
use crate::control::{self, ClientError, DaemonInfo, Request, Sources};
use crate::daemon::{self, Forked, Readiness};
use crate::logging;
use crate::mountinfo::{self, MountTable};
use crate::network::Network;
use crate::runtime::{self, PidFile, PidFileError, Record};
use crate::signals::{self, Shutdown};

/// How long the first write-opens may wait at mount for configured peers to be tried.
const STARTUP_PEER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

pub fn mount_command(config_path: &Path, daemon: bool) -> Result<u8> {
    let mut cfg = Config::load(config_path)?;
    // First, because "already mounted by pid N" explains every later complaint about the
    // mountpoint being in use.
    if let Ok(state) = crate::config::canonicalize_lenient(&cfg.state) {
        refuse_if_served(&state.join("control.sock"))?;
    }
    // A mount left by a kill -9'd daemon answers ENOTCONN to every stat, so it must be detached
    // before the folder checks can even look at the mountpoint.
    let recovered = mountinfo::recover_dead_mount(&cfg.mountpoint)?;
    cfg.check_for_mount(&MountTable::read()?)?;
    peerfs_fs_linux::check_fuse_device().map_err(|e| anyhow!("cannot use /dev/fuse: {e}"))?;

    if cfg.networked() {
        // Checked before the fork: a missing or loose key is the user's to fix, on their
        // terminal.
        peerfs_proto::Identity::load(&cfg.state).map_err(|e| anyhow!("{e}"))?;
    }
    create_state_dir(&cfg.state)?;
    let target = if daemon {
        logging::Target::File(open_log(&cfg.log_file())?)
    } else {
        logging::Target::Stderr
    };
    logging::init(&cfg.log_level, target)?;
    tracing::info!(
        "peerfs {} using config {}",
        env!("CARGO_PKG_VERSION"),
        cfg.file.display()
    );
    if let Some(warning) = recovered {
        tracing::warn!("{warning}");
        if daemon {
            // The log file is not where the person who typed the command looks.
            crate::print_stderr(&format!("peerfs: warning: {warning}"));
        }
    }
    let mut pid_file = take_pid_file(&cfg)?;
    clear_stale_socket(&cfg.control_socket())?;

    let mut readiness = if daemon {
        match daemon::daemonize(&cfg.log_file())? {
            Forked::Parent { code, pid } => {
                if code == 0 {
                    // The drive is up whatever happens to this line, so its failure is ignored.
                    let _ = crate::print_stdout(&format!(
                        "peerfs: {} mounted at {} (daemon pid {pid}, log {})\n",
                        cfg.name,
                        cfg.mountpoint.display(),
                        cfg.log_file().display()
                    ));
                }
                return Ok(code);
            }
            Forked::Child(readiness) => readiness,
        }
    } else {
        Readiness::none()
    };

    let result = pid_file
        .write_pid(std::process::id())
        .with_context(|| format!("cannot write {}", pid_file.path().display()))
        .and_then(|()| serve(&cfg, pid_file, &mut readiness));
    if let Err(e) = &result {
        readiness.failed(&format!("{e:#}"));
        if daemon {
            // The daemon's stderr is /dev/null: the log is the only witness.
            tracing::error!("{e:#}");
        }
    }
    result.map(|()| 0)
}

fn create_state_dir(state: &Path) -> Result<()> {
    // 0700: the state holds the control socket, logs and, later, keys and queues.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state)
        .with_context(|| format!("cannot create state folder {}", state.display()))
}

fn open_log(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .with_context(|| format!("cannot open log file {}", path.display()))
}

fn take_pid_file(cfg: &Config) -> Result<PidFile> {
    match PidFile::lock(&cfg.pid_file()) {
        Ok(f) => Ok(f),
        Err(PidFileError::Held(Some(pid))) => bail!(
            "already mounted by pid {pid} (state folder {} is in use)",
            cfg.state.display()
        ),
        Err(PidFileError::Held(None)) => bail!(
            "state folder {} is in use by another peerfs process",
            cfg.state.display()
        ),
        Err(PidFileError::Io(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", cfg.pid_file().display()))
        }
    }
}

/// Fails with "already mounted by pid N" if a daemon answers on the control socket.
fn refuse_if_served(path: &Path) -> Result<()> {
    match control::request(path, &Request::status()) {
        Ok(resp) => match resp.status {
            Some(st) => bail!("already mounted by pid {} at {}", st.pid, st.mountpoint),
            None => bail!("a daemon already answers on {}", path.display()),
        },
        Err(ClientError::NoDaemon(_)) => Ok(()),
        Err(ClientError::BadAnswer(why)) => bail!(
            "{} is in use by a process that does not answer as peerfs ({why})",
            path.display()
        ),
    }
}

/// Refuses to start if a daemon answers on the socket; removes a socket file nobody serves.
fn clear_stale_socket(path: &Path) -> Result<()> {
    refuse_if_served(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::info!("removed stale control socket {}", path.display());
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("cannot remove stale control socket {}", path.display()))
        }
    }
}

/// Removes what the serving process leaves behind, however it ends.
struct Cleanup {
    socket: Option<PathBuf>,
    record: Option<PathBuf>,
    pid_file: Option<PidFile>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mountpoint) = self.record.take() {
            runtime::remove_record(&mountpoint, std::process::id() as i32);
        }
        if let Some(socket) = self.socket.take() {
            let _ = std::fs::remove_file(socket);
        }
        if let Some(pid_file) = self.pid_file.take() {
            pid_file.remove();
        }
    }
}

fn serve(cfg: &Config, pid_file: PidFile, readiness: &mut Readiness) -> Result<()> {
    // Before any thread exists, so that every thread inherits the blocked mask.
    let sigset = signals::block().context("cannot block termination signals")?;
    let shutdown = Shutdown::start(sigset, cfg.mountpoint.clone())
        .context("cannot start the signal thread")?;

    let mut cleanup = Cleanup {
        socket: None,
        record: None,
        pid_file: Some(pid_file),
    };
    let socket = cfg.control_socket();
    let listener =
        control::bind(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
    cleanup.socket = Some(socket);

    let excludes = peerfs_vfs::exclude::Excludes::new(&cfg.files.exclude, &cfg.files.include)
        .map_err(|e| anyhow!("files: {e}"))?;
    let vfs = Vfs::new(VfsConfig {
        backing: cfg.backing.clone(),
        excludes,
        track_min_size: cfg.replication.track_min_size,
    })
    .map_err(|e| anyhow!("cannot open backing {}: {e}", cfg.backing.display()))?;
    let vfs = Arc::new(vfs);

    let network = if cfg.networked() {
        let net = Network::start(cfg)?;
        vfs.set_locks(net.vfs_locks());
        net.attach(&vfs);
        // Write-opens right after mount must see the peers that are up.
        net.wait_for_peers(cfg, STARTUP_PEER_WAIT);
        Some(net)
    } else {
        None
    };

    let opts = MountOptions {
        allow_other: cfg.drive.allow_other,
        threads: cfg.drive.threads,
        passthrough: cfg.drive.passthrough,
        cache_ttl: cfg.drive.cache_ttl,
        ..MountOptions::default()
    };
    let mut drive = Drive::mount(Arc::clone(&vfs), &cfg.mountpoint, &opts)
        .with_context(|| format!("cannot mount {}", cfg.mountpoint.display()))?;
    let pid = std::process::id();

    let record = Record {
        pid: pid as i32,
        start_time: runtime::process_start_time(pid as i32),
        state: cfg.state.clone(),
        mountpoint: cfg.mountpoint.clone(),
    };
    match runtime::write_record(&record) {
        Ok(_) => cleanup.record = Some(cfg.mountpoint.clone()),
        Err(e) => tracing::warn!(
            "cannot write runtime record in {}: {e}; `peerfs unmount` will not wait for this daemon",
            runtime::runtime_dir().display()
        ),
    }

    let info = DaemonInfo {
        pid,
        name: cfg.name.clone(),
        mountpoint: cfg.mountpoint.clone(),
        backing: cfg.backing.clone(),
        state: cfg.state.clone(),
        since: SystemTime::now(),
        drive: cfg.drive.clone(),
    };
    let stats_vfs = Arc::clone(&vfs);
    let sources = Sources {
        stats: Arc::new(move || {
            serde_json::to_value(stats_vfs.stats())
                .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
        }),
        peers: network.as_ref().map(Network::peers_source),
        locks: network.as_ref().map(Network::locks_source),
        reconcile: network.as_ref().map(Network::reconcile_source),
        // Through the daemon, a restore also replicates.
        trash_restore: network.as_ref().map(|n| n.trash_restore_source(&vfs)),
    };
    // Foreground only in effect: draws while peers sync, if stderr is a terminal.
    crate::progress::spawn(sources.peers.clone());
    // Started after the mount: a status answer means "mounted". If the thread cannot start,
    // the drive still works; only `status` is blind, which the log says.
    if let Err(e) = control::spawn_server(listener, info, sources) {
        tracing::error!(
            "cannot start the control socket server: {e}; `peerfs status` will not answer"
        );
    }

    shutdown.arm(drive.unmounter());
    readiness.ready();
    tracing::info!(
        "drive {} mounted at {} over {} (pid {pid})",
        cfg.name,
        cfg.mountpoint.display(),
        cfg.backing.display()
    );

    let result = drive.run();
    match &result {
        Ok(()) => tracing::info!(
            "drive {} unmounted from {}",
            cfg.name,
            cfg.mountpoint.display()
        ),
        Err(e) => tracing::error!("drive {} stopped with an error: {e}", cfg.name),
    }
    if let Some(net) = network {
        net.shutdown();
    }
    drop(cleanup);
    result.with_context(|| format!("serving {} failed", cfg.mountpoint.display()))
}
