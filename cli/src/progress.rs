//! Sync progress: owns reading the per-peer `"sync"` objects of the status JSON (what
//! reconciliation reports while peers compare and exchange what differs) and presenting them,
//! as the line `peerfs status` prints per peer and as the progress bar of a foreground
//! `peerfs mount`.
//!
//! A peer entry's `"sync"` is `{"state", "files_done", "files_total", "bytes_done",
//! "bytes_total", "recv_files_done", "recv_files_total", "recv_bytes_done", "recv_bytes_total",
//! "rounds", "paused"}`: `state` is `offline`, `comparing`, `syncing` or `in-sync`; `paused` counts
//! the comparisons that did not agree within their rounds and wait to compare again; the plain
//! counters are
//! what this server sends to that peer in the current connection, the `recv_` ones what it
//! receives (totals as the sender announced them). Daemons older than reconciliation have no
//! `"sync"`, and any counter may be missing: a missing counter reads as 0.
//!
//! The bar runs on its own thread and only reads the in-process peers source every
//! [`POLL`] (the same JSON the control socket serves), so it never holds up the drive. It is
//! drawn only while some peer is comparing or syncing and only when stderr is a terminal (not
//! with `--daemon`, whose stderr is /dev/null, nor under tests).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::control::Source;

/// How often the bar reads the peers' state.
const POLL: Duration = Duration::from_millis(200);

/// One peer's `"sync"` object, missing counters as 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSync {
    pub state: String,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub recv_files_done: u64,
    pub recv_files_total: u64,
    pub recv_bytes_done: u64,
    pub recv_bytes_total: u64,
    pub rounds: u64,
    pub paused: u64,
}

impl PeerSync {
    /// The `"sync"` object of one entry of the status's `"peers"`; None when the daemon reports
    /// none (older than reconciliation).
    pub fn of_peer(peer: &Value) -> Option<PeerSync> {
        let s = peer.get("sync").filter(|s| s.is_object())?;
        let n = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
        Some(PeerSync {
            state: s
                .get("state")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
            files_done: n("files_done"),
            files_total: n("files_total"),
            bytes_done: n("bytes_done"),
            bytes_total: n("bytes_total"),
            recv_files_done: n("recv_files_done"),
            recv_files_total: n("recv_files_total"),
            recv_bytes_done: n("recv_bytes_done"),
            recv_bytes_total: n("recv_bytes_total"),
            rounds: n("rounds"),
            paused: n("paused"),
        })
    }

    /// Comparing digests or transferring: what the bar waits for.
    pub fn active(&self) -> bool {
        matches!(self.state.as_str(), "comparing" | "syncing")
    }

    /// The line `peerfs status` prints under the peer: `sync in-sync`, `sync comparing (2
    /// rounds)`, `sync comparing (16 rounds, paused twice)`, `syncing 1,234/10,000 files, 1.2 MiB/9.8 MiB (receiving 3/3 files, 3.0
    /// KiB/3.0 KiB)`.
    pub fn describe(&self) -> String {
        let sending = (self.files_total > 0 || self.bytes_total > 0).then(|| {
            transfer(
                self.files_done,
                self.files_total,
                self.bytes_done,
                self.bytes_total,
            )
        });
        let receiving = (self.recv_files_total > 0 || self.recv_bytes_total > 0).then(|| {
            transfer(
                self.recv_files_done,
                self.recv_files_total,
                self.recv_bytes_done,
                self.recv_bytes_total,
            )
        });
        let rounds = match self.rounds {
            0 => None,
            1 => Some("1 round".to_string()),
            r => Some(format!("{} rounds", count(r))),
        };
        let paused = match self.paused {
            0 => None,
            1 => Some("paused once".to_string()),
            2 => Some("paused twice".to_string()),
            n => Some(format!("paused {} times", count(n))),
        };
        let rounds = match [rounds, paused].into_iter().flatten().collect::<Vec<_>>() {
            v if v.is_empty() => String::new(),
            v => format!(" ({})", v.join(", ")),
        };
        match self.state.as_str() {
            "syncing" => match (sending, receiving) {
                (Some(s), Some(r)) => format!("syncing {s} (receiving {r})"),
                (Some(s), None) => format!("syncing {s}"),
                (None, Some(r)) => format!("syncing, receiving {r}"),
                (None, None) => format!("syncing{rounds}"),
            },
            other => format!("sync {other}{rounds}"),
        }
    }
}

/// `1,234/10,000 files, 1.2 MiB/9.8 MiB`.
fn transfer(files_done: u64, files_total: u64, bytes_done: u64, bytes_total: u64) -> String {
    format!(
        "{}/{} files, {}/{}",
        count(files_done),
        count(files_total),
        human_bytes(bytes_done),
        human_bytes(bytes_total)
    )
}

/// `1234567` → `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
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

/// What the bar shows: the sums over the peers that are comparing or syncing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BarState {
    /// Received so far and announced by the senders, over the active peers.
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// What this server sends them (shown when it receives nothing).
    pub send_files_done: u64,
    pub send_files_total: u64,
    /// The active peers' names, in the status's order.
    pub peers: Vec<String>,
    /// Every active peer is still comparing digests (nothing to count yet).
    pub comparing: bool,
}

impl BarState {
    /// From a status JSON value (an object with `"peers"`) or the peers array itself; None
    /// when no peer is comparing or syncing (or the daemon reports no sync state at all).
    pub fn of_status(status: &Value) -> Option<BarState> {
        let peers = if status.is_array() {
            status
        } else {
            status.get("peers")?
        };
        let mut st = BarState {
            comparing: true,
            ..BarState::default()
        };
        for peer in peers.as_array()? {
            let Some(sync) = PeerSync::of_peer(peer).filter(PeerSync::active) else {
                continue;
            };
            st.peers.push(
                peer.get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
            );
            // A sender's counts may run ahead of its announced total for a moment (a file
            // changed again while in flight): never past the end of the bar.
            st.files_total += sync.recv_files_total;
            st.files_done += sync.recv_files_done.min(sync.recv_files_total);
            st.bytes_total += sync.recv_bytes_total;
            st.bytes_done += sync.recv_bytes_done.min(sync.recv_bytes_total);
            st.send_files_total += sync.files_total;
            st.send_files_done += sync.files_done.min(sync.files_total);
            st.comparing &= sync.state == "comparing";
        }
        (!st.peers.is_empty()).then_some(st)
    }

    /// The text beside the bar: bytes, direction and peers.
    pub fn message(&self) -> String {
        let with = self.peers.join(", ");
        if self.comparing {
            format!("comparing with {with}")
        } else if self.files_total > 0 || self.bytes_total > 0 {
            format!(
                "{}/{} from {with}",
                human_bytes(self.bytes_done),
                human_bytes(self.bytes_total)
            )
        } else if self.send_files_total > 0 {
            format!(
                "sending {}/{} files to {with}",
                count(self.send_files_done),
                count(self.send_files_total)
            )
        } else {
            format!("syncing with {with}")
        }
    }

    /// Whether there is a count to draw a bar for (else a spinner and the message).
    pub fn has_total(&self) -> bool {
        !self.comparing && self.files_total > 0
    }
}

/// Starts the foreground bar over the peers source, on its own thread; does nothing without
/// peers or when stderr is not a terminal.
pub fn spawn(peers: Option<Source>) {
    let Some(peers) = peers else {
        return;
    };
    if !std::io::stderr().is_terminal() {
        return;
    }
    let started = std::thread::Builder::new()
        .name("peerfs-progress".into())
        .spawn(move || run(peers.as_ref()));
    if let Err(e) = started {
        tracing::debug!("no sync progress bar: cannot start its thread: {e}");
    }
}

fn run(peers: &(dyn Fn() -> Value + Send + Sync)) {
    let bar_style = ProgressStyle::with_template(
        "{spinner} sync {wide_bar} {human_pos}/{human_len} files, {msg} ({elapsed})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let spin_style = ProgressStyle::with_template("{spinner} sync: {msg} ({elapsed})")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let mut bar: Option<(ProgressBar, bool)> = None;
    loop {
        match BarState::of_status(&peers()) {
            Some(st) => {
                let (pb, counting) = bar.get_or_insert_with(|| {
                    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                    pb.set_style(spin_style.clone());
                    (pb, false)
                });
                if st.has_total() != *counting {
                    *counting = st.has_total();
                    pb.set_style(if *counting {
                        bar_style.clone()
                    } else {
                        spin_style.clone()
                    });
                }
                if *counting {
                    pb.set_length(st.files_total);
                    pb.set_position(st.files_done);
                } else {
                    pb.unset_length();
                }
                pb.set_message(st.message());
                pb.tick();
            }
            None => {
                if let Some((pb, _)) = bar.take() {
                    pb.finish_and_clear();
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn peer(name: &str, sync: Value) -> Value {
        json!({"name": name, "connected": true, "bytes_sent": 10, "sync": sync})
    }

    #[test]
    fn counts_and_bytes_format() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_234), "1,234");
        assert_eq!(count(10_000), "10,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(9_800 * 1024), "9.6 MiB");
    }

    #[test]
    fn a_missing_sync_object_or_counter_is_tolerated() {
        assert_eq!(PeerSync::of_peer(&json!({"name": "b"})), None);
        assert_eq!(PeerSync::of_peer(&json!({"name": "b", "sync": null})), None);
        let s = PeerSync::of_peer(&peer("b", json!({"state": "syncing"}))).expect("sync");
        assert_eq!(s.files_total, 0);
        assert_eq!(s.describe(), "syncing");
        let s = PeerSync::of_peer(&peer("b", json!({}))).expect("sync");
        assert_eq!(s.state, "unknown");
        assert!(!s.active());
    }

    #[test]
    fn status_lines() {
        let line = |sync: Value| {
            PeerSync::of_peer(&peer("b", sync))
                .expect("sync")
                .describe()
        };
        assert_eq!(
            line(json!({"state": "in-sync", "rounds": 0})),
            "sync in-sync"
        );
        assert_eq!(line(json!({"state": "offline"})), "sync offline");
        assert_eq!(
            line(json!({"state": "comparing", "rounds": 3})),
            "sync comparing (3 rounds)"
        );
        assert_eq!(
            line(json!({"state": "comparing", "rounds": 16, "paused": 2})),
            "sync comparing (16 rounds, paused twice)"
        );
        assert_eq!(
            line(json!({"state": "in-sync", "rounds": 1, "paused": 1})),
            "sync in-sync (1 round, paused once)"
        );
        assert_eq!(
            line(
                json!({"state": "syncing", "files_done": 1234, "files_total": 10_000,
                        "bytes_done": 1_258_291, "bytes_total": 10_276_044,
                        "recv_files_done": 3, "recv_files_total": 3,
                        "recv_bytes_done": 3072, "recv_bytes_total": 3072})
            ),
            "syncing 1,234/10,000 files, 1.2 MiB/9.8 MiB (receiving 3/3 files, 3.0 KiB/3.0 KiB)"
        );
        assert_eq!(
            line(
                json!({"state": "syncing", "recv_files_done": 5, "recv_files_total": 9,
                        "recv_bytes_done": 100, "recv_bytes_total": 900})
            ),
            "syncing, receiving 5/9 files, 100 B/900 B"
        );
    }

    #[test]
    fn the_bar_sums_what_active_peers_send_here() {
        let status = json!({"mounted": true, "peers": [
            peer("b", json!({"state": "syncing", "recv_files_done": 100,
                             "recv_files_total": 1000, "recv_bytes_done": 102_400,
                             "recv_bytes_total": 1_024_000, "files_done": 7,
                             "files_total": 7})),
            peer("c", json!({"state": "in-sync", "recv_files_done": 50,
                             "recv_files_total": 50})),
            peer("d", json!({"state": "syncing", "recv_files_done": 20,
                             "recv_files_total": 10, "recv_bytes_done": 0,
                             "recv_bytes_total": 4096})),
            json!({"name": "e", "connected": false}),
        ]});
        let st = BarState::of_status(&status).expect("syncing");
        assert_eq!(st.peers, ["b", "d"]);
        assert_eq!((st.files_done, st.files_total), (110, 1010));
        assert_eq!((st.bytes_done, st.bytes_total), (102_400, 1_028_096));
        assert_eq!((st.send_files_done, st.send_files_total), (7, 7));
        assert!(st.has_total());
        assert_eq!(st.message(), "100.0 KiB/1004.0 KiB from b, d");
        // The peers array alone (the in-process source) gives the same.
        assert_eq!(BarState::of_status(&status["peers"]), Some(st));
    }

    #[test]
    fn no_bar_when_nothing_syncs() {
        assert_eq!(BarState::of_status(&json!({"mounted": true})), None);
        assert_eq!(BarState::of_status(&json!({"peers": []})), None);
        // An older daemon: peers without a sync object.
        assert_eq!(
            BarState::of_status(&json!([{"name": "b", "connected": true}])),
            None
        );
        let idle = json!([
            peer("b", json!({"state": "in-sync"})),
            peer("c", json!({"state": "offline"}))
        ]);
        assert_eq!(BarState::of_status(&idle), None);
    }

    #[test]
    fn comparing_and_sending_only_show_a_spinner() {
        let st = BarState::of_status(&json!([peer("b", json!({"state": "comparing"}))]))
            .expect("active");
        assert!(st.comparing && !st.has_total());
        assert_eq!(st.message(), "comparing with b");
        let st = BarState::of_status(&json!([
            peer("b", json!({"state": "comparing"})),
            peer(
                "c",
                json!({"state": "syncing", "files_done": 2, "files_total": 2000})
            )
        ]))
        .expect("active");
        assert!(!st.comparing && !st.has_total());
        assert_eq!(st.message(), "sending 2/2,000 files to b, c");
    }
}
