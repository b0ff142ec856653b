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
use crate::progress::{PeerSync, count, human_bytes};

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
            if let Some(sync) = PeerSync::of_peer(p) {
                outln!(out, "  {:<16}  {}", "", sync.describe());
            }
        }
    }
    // Through JSON: the field exists only in daemons that reconcile.
    if let Ok(v) = serde_json::to_value(st) {
        print_reconcile(out, &v["reconcile"]);
    }
    if let Some(counters) = st.stats.as_object() {
        outln!(out, "counters");
        let width = counters.keys().map(String::len).max().unwrap_or(0);
        for (key, value) in counters {
            outln!(out, "  {key:<width$}  {value}");
        }
    }
}

/// The top-level `"reconcile"` object: the start scan's result and the recent conflicts
/// (`{"scan": {"files","changed","removed","ms"}, "conflicts": [{"path","copy","peer",
/// "time"}]}`). Prints nothing when the daemon reports none; missing numbers read as 0.
fn print_reconcile(out: &mut String, rec: &serde_json::Value) {
    if !rec.is_object() {
        return;
    }
    outln!(out, "reconcile");
    let scan = &rec["scan"];
    if scan.is_object() {
        let n = |k: &str| scan[k].as_u64().unwrap_or(0);
        outln!(
            out,
            "  start scan  {} files, {} changed, {} removed, in {}",
            count(n("files")),
            count(n("changed")),
            count(n("removed")),
            millis(n("ms"))
        );
    }
    let conflicts = rec["conflicts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if conflicts.is_empty() {
        outln!(out, "  conflicts   none");
        return;
    }
    outln!(out, "  conflicts   {}", count(conflicts.len() as u64));
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n
            .as_u64()
            .map(crate::timefmt::rfc3339_utc)
            .unwrap_or_else(|| n.to_string()),
        serde_json::Value::Null => "?".to_string(),
        other => other.to_string(),
    };
    for c in conflicts {
        outln!(
            out,
            "    {} \u{2192} {}, {}, {}",
            text(&c["path"]),
            text(&c["copy"]),
            text(&c["peer"]),
            text(&c["time"])
        );
    }
}

/// `850` → `850 ms`, `12345` → `12.3 s`.
fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From JSON, as the client gets it, so fields added to [`Status`] later (with
    /// `#[serde(default)]`, as older daemons lack them) need no change here.
    fn status(peers: Vec<serde_json::Value>) -> Status {
        serde_json::from_value(json!({
            "mounted": true, "pid": 7, "name": "office-a", "mountpoint": "/srv/drive",
            "backing": "/srv/share", "state": "/var/lib/peerfs/a",
            "since": "2026-11-25T10:00:00Z", "since_unix": 1_795_600_800_u64,
            "uptime_secs": 61, "version": "0.1.0",
            "drive": {"allow_other": true, "threads": 4, "passthrough": true, "cache_ttl": "1s"},
            "stats": {}, "peers": peers,
        }))
        .expect("a status")
    }

    #[test]
    fn a_sync_line_per_peer_that_reports_one() {
        let mut out = String::new();
        print_mounted(
            &mut out,
            &status(vec![
                json!({"name": "office-b", "connected": true, "since": "x", "queue": 0,
                       "sync": {"state": "syncing", "files_done": 1234, "files_total": 10_000,
                                "bytes_done": 1_258_291, "bytes_total": 10_276_044}}),
                // An older daemon's entry: no sync line, nothing else changes.
                json!({"name": "office-c", "connected": false}),
            ]),
        );
        let lines: Vec<&str> = out.lines().collect();
        let b = lines
            .iter()
            .position(|l| l.contains("office-b"))
            .expect("b");
        assert!(lines[b + 1].contains("queue 0 (0 B pending)"), "{out}");
        assert_eq!(
            lines[b + 2].trim(),
            "syncing 1,234/10,000 files, 1.2 MiB/9.8 MiB"
        );
        let c = lines
            .iter()
            .position(|l| l.contains("office-c"))
            .expect("c");
        assert!(lines[c + 1].contains("queue 0"), "{out}");
        assert_eq!(lines[c + 2], "counters");
        assert!(!out.contains("reconcile"), "{out}");
    }

    #[test]
    fn reconcile_scan_and_conflicts() {
        let mut out = String::new();
        print_reconcile(
            &mut out,
            &json!({"scan": {"files": 100_000, "changed": 1, "removed": 0, "ms": 1830},
                    "conflicts": [{"path": "docs/a.docx",
                                   "copy": "docs/a (conflict office-b).docx",
                                   "peer": "office-b", "time": 1_700_000_000_u64},
                                  {"path": "b.txt", "time": "2026-11-25T10:32:00Z"}]}),
        );
        assert_eq!(
            out,
            "reconcile\n  start scan  100,000 files, 1 changed, 0 removed, in 1.8 s\n  \
             conflicts   2\n    docs/a.docx \u{2192} docs/a (conflict office-b).docx, \
             office-b, 2023-11-14T22:13:20Z\n    b.txt \u{2192} ?, ?, 2026-11-25T10:32:00Z\n"
        );
        let mut out = String::new();
        print_reconcile(&mut out, &json!({"scan": {"ms": 12}}));
        assert_eq!(
            out,
            "reconcile\n  start scan  0 files, 0 changed, 0 removed, in 12 ms\n  conflicts   none\n"
        );
        let mut out = String::new();
        print_reconcile(&mut out, &serde_json::Value::Null);
        assert_eq!(out, "");
    }
}
