//! `peerfs status`: owns asking the daemon over its control socket and presenting the answer,
//! as a table or as JSON. It never touches the mount itself, so it answers even when the drive
//! is busy; the mount table is read only to warn about a mount nobody serves.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde_json::json;

use crate::config::Config;
use crate::control::{self, ClientError, Request, Response, Status};
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

/// Sends `req` to the daemon serving `cfg`. Returns the state folder as the daemon sees it
/// (canonical where it exists) and the daemon's answer, None when no daemon answers; a refused
/// request or a garbled answer is an error.
fn ask(cfg: &Config, req: &Request) -> Result<(PathBuf, Option<Response>)> {
    let state = std::fs::canonicalize(&cfg.state).unwrap_or_else(|_| cfg.state.clone());
    let socket = state.join("control.sock");
    match control::request(&socket, req) {
        Ok(resp) if resp.ok => Ok((state, Some(resp))),
        Ok(resp) => bail!(
            "the daemon on {} refused the {} request: {}",
            socket.display(),
            req.cmd,
            resp.error.unwrap_or_else(|| "no reason given".into())
        ),
        Err(ClientError::NoDaemon(_)) => Ok((state, None)),
        Err(e @ ClientError::BadAnswer(_)) => Err(anyhow::anyhow!("{e}")),
    }
}

pub fn status_command(config_path: &Path, as_json: bool) -> Result<u8> {
    let cfg = Config::load(config_path)?;
    let (state, answer) = ask(&cfg, &Request::status())?;
    let mut out = String::new();
    let code = match answer {
        Some(resp) => {
            let Some(status) = resp.status else {
                bail!("the daemon of {:?} answered without a status", cfg.name);
            };
            if as_json {
                outln!(out, "{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_mounted(&mut out, &status);
            }
            0
        }
        None => {
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
    };
    crate::print_stdout(&out)?;
    Ok(code)
}

/// `peerfs locks`: the locks the daemon holds and knows of.
pub fn locks_command(config_path: &Path, as_json: bool) -> Result<u8> {
    let cfg = Config::load(config_path)?;
    let (_, answer) = ask(&cfg, &Request::locks())?;
    let mut out = String::new();
    let code = match answer {
        Some(resp) => {
            let Some(locks) = resp.locks else {
                bail!("the daemon of {:?} answered without a lock list", cfg.name);
            };
            if as_json {
                outln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&json!({ "locks": locks }))?
                );
            } else {
                print_locks(&mut out, &locks);
            }
            0
        }
        None => {
            if as_json {
                outln!(out, "{}", json!({ "mounted": false, "locks": [] }));
            } else {
                outln!(out, "drive {:?}: not mounted", cfg.name);
            }
            crate::EXIT_NOT_MOUNTED
        }
    };
    crate::print_stdout(&out)?;
    Ok(code)
}

fn print_locks(out: &mut String, locks: &serde_json::Value) {
    let rows = locks.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        outln!(out, "no locks");
        return;
    }
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("").to_string();
    let width = rows
        .iter()
        .map(|r| text(r, "path").len())
        .max()
        .unwrap_or(4)
        .max(4);
    outln!(
        out,
        "{:<width$}  {:<16}  {:<20}  note",
        "path",
        "holder",
        "since"
    );
    for r in rows {
        let mut note = String::new();
        if r["lingering"].as_bool() == Some(true) {
            note.push_str("lingering");
        } else if let Some(h) = r["handles"].as_u64().filter(|h| *h > 0) {
            note.push_str(&format!("{h} handle(s)"));
        }
        if let Some(ms) = r["grace_left_ms"].as_u64() {
            note.push_str(&format!(
                "holder unreachable, expires in {:.1}s",
                ms as f64 / 1000.0
            ));
        }
        outln!(
            out,
            "{:<width$}  {:<16}  {:<20}  {note}",
            text(r, "path"),
            text(r, "holder"),
            text(r, "since")
        );
    }
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
    if !st.peers.is_empty() {
        outln!(out, "peers");
        for p in &st.peers {
            let name = p["name"].as_str().unwrap_or("?");
            let state = if p["connected"].as_bool() == Some(true) {
                let rtt = p["rtt_ms"]
                    .as_f64()
                    .map(|ms| format!(", rtt {ms:.2} ms"))
                    .unwrap_or_default();
                format!(
                    "connected since {}{rtt}",
                    p["since"].as_str().unwrap_or("?")
                )
            } else {
                let err = p["last_error"]
                    .as_str()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                format!("not connected{err}")
            };
            outln!(out, "  {name:<16}  {state}");
            let n = |k: &str| p[k].as_u64().unwrap_or(0);
            outln!(
                out,
                "  {:<16}  queue {} ({} pending), sent {}, received {}",
                "",
                n("queue"),
                human_bytes(n("queue_bytes")),
                human_bytes(n("bytes_sent")),
                human_bytes(n("bytes_received")),
            );
            if let Some(e) = p["replication_error"].as_str() {
                outln!(out, "  {:<16}  replication error: {e}", "");
            }
        }
    }
    if let Some(counters) = st.stats.as_object() {
        outln!(out, "counters");
        let width = counters.keys().map(String::len).max().unwrap_or(0);
        for (key, value) in counters {
            outln!(out, "  {key:<width$}  {value}");
        }
    }
}

/// `1536` → `1.5 KiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
