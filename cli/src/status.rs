//! `peerfs status`: owns asking the daemon over its control socket and presenting the answer,
//! as a table or as JSON. It never touches the mount itself, so it answers even when the drive
//! is busy; the mount table is read only to warn about a mount nobody serves.

use std::path::Path;

use anyhow::{Result, bail};
use serde_json::json;

use crate::config::Config;
use crate::control::{self, ClientError, Request, Status};
use crate::duration::format_uptime;
use crate::mountinfo::{MountTable, PEERFS_FSTYPE};

/// `println!` into a String: printing happens once, at the end, and a closed pipe
/// (`peerfs status | head -1`) is not a panic.
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {{
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    }};
}

pub fn status_command(config_path: &Path, as_json: bool) -> Result<u8> {
    let cfg = Config::load(config_path)?;
    // Compare with what the daemon sees: canonical where the folders exist.
    let state = std::fs::canonicalize(&cfg.state).unwrap_or_else(|_| cfg.state.clone());
    let socket = state.join("control.sock");
    let mut out = String::new();
    let code = match control::request(&socket, &Request::status()) {
        Ok(resp) => {
            let Some(status) = resp.status.filter(|_| resp.ok) else {
                bail!(
                    "the daemon on {} refused the status request: {}",
                    socket.display(),
                    resp.error.unwrap_or_else(|| "no reason given".into())
                );
            };
            if as_json {
                outln!(out, "{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_mounted(&mut out, &status);
            }
            0
        }
        Err(ClientError::NoDaemon(_)) => {
            let orphan = orphan_mount(&cfg);
            if as_json {
                let v = json!({
                    "mounted": false,
                    "name": cfg.name,
                    "mountpoint": cfg.mountpoint.to_string_lossy(),
                    "backing": cfg.backing.to_string_lossy(),
                    "state": state.to_string_lossy(),
                    "orphan_mount": orphan,
                });
                outln!(out, "{}", serde_json::to_string_pretty(&v)?);
            } else {
                outln!(out, "drive {:?}: not mounted", cfg.name);
                print_paths(
                    &mut out,
                    &cfg.mountpoint.display().to_string(),
                    &cfg.backing.display().to_string(),
                    &state.display().to_string(),
                );
                if orphan {
                    outln!(
                        out,
                        "note: {} is still a peerfs mount but no daemon answers for it; \
                         run `peerfs unmount {}`",
                        cfg.mountpoint.display(),
                        cfg.mountpoint.display()
                    );
                }
            }
            crate::EXIT_NOT_MOUNTED
        }
        Err(e @ ClientError::BadAnswer(_)) => return Err(anyhow::anyhow!("{e}")),
    };
    crate::print_stdout(&out)?;
    Ok(code)
}

/// A peerfs mount at the configured mountpoint with no daemon answering: a killed daemon, or a
/// daemon of another state folder mounted there.
fn orphan_mount(cfg: &Config) -> bool {
    let Ok(path) = crate::mountinfo::canonical_mount_path(&cfg.mountpoint) else {
        return false;
    };
    MountTable::read()
        .ok()
        .and_then(|t| t.find(&path).map(|e| e.fstype == PEERFS_FSTYPE))
        .unwrap_or(false)
}

fn print_paths(out: &mut String, mountpoint: &str, backing: &str, state: &str) {
    outln!(out, "  mountpoint  {mountpoint}");
    outln!(out, "  backing     {backing}");
    outln!(out, "  state       {state}");
}

fn print_mounted(out: &mut String, st: &Status) {
    outln!(out, "drive {:?}: mounted", st.name);
    outln!(out, "  pid         {}", st.pid);
    print_paths(out, &st.mountpoint, &st.backing, &st.state);
    outln!(
        out,
        "  since       {} (up {})",
        st.since,
        format_uptime(st.uptime_secs)
    );
    outln!(out, "  version     {}", st.version);
    outln!(
        out,
        "  drive       threads={} passthrough={} allow_other={} cache_ttl={}",
        st.drive.threads,
        st.drive.passthrough,
        st.drive.allow_other,
        st.drive.cache_ttl
    );
    if let Some(counters) = st.stats.as_object() {
        outln!(out, "counters");
        let width = counters.keys().map(String::len).max().unwrap_or(0);
        for (key, value) in counters {
            outln!(out, "  {key:<width$}  {value}");
        }
    }
}
