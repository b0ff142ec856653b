//! `peerfs trash list|restore`: owns presenting the drive's trash (`STATE/trash`, filled by the
//! replicator when a peer deletes or replaces a file) and bringing entries back.
//!
//! `list` reads the trash folder directly, daemon or not. `restore` goes through the daemon when
//! one answers on the control socket (so the restore reaches the peers too); without a daemon
//! it restores straight into the backing folder, which nobody else is serving then.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use peerfs_proto::RelPath;
use peerfs_replicator::trash::{Trash, TrashEntry};
use serde_json::json;

use crate::config::Config;
use crate::control::{self, ClientError, Request};
use crate::logging;

/// A restore through the daemon may copy a whole folder across filesystems.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);

/// `println!` into a String (printed once at the end; a closed pipe is not a panic).
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {{
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    }};
}

/// `peerfs trash [--config FILE] list|restore ...`: the config may come before or after the
/// action (`peerfs trash list --config FILE` or `peerfs trash --config FILE list`).
#[derive(Debug, Args)]
pub struct TrashArgs {
    /// The TOML config file (required).
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    action: TrashCommand,
}

#[derive(Debug, Subcommand)]
pub enum TrashCommand {
    /// List what peers' deletions and replaces left in the trash: when, from which peer, what.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Bring a file or folder back from the trash (beside the current one if its name is taken).
    Restore {
        /// The path in the drive (e.g. `docs/report.docx`, or an absolute path under the
        /// mountpoint).
        path: PathBuf,
        /// Take it from this trash entry (see `peerfs trash list`) instead of the newest.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// Print JSON instead of a sentence.
        #[arg(long)]
        json: bool,
    },
}

pub fn trash_command(args: TrashArgs) -> Result<u8> {
    let Some(config) = args.config else {
        // A usage error like clap's own (a global argument cannot be marked required).
        clap::Error::raw(
            clap::error::ErrorKind::MissingRequiredArgument,
            "the following required argument was not provided: --config <FILE>\n",
        )
        .exit();
    };
    // The library warns about unreadable entries or a slow cross-filesystem copy; show that.
    let _ = logging::init("warn", logging::Target::Stderr);
    match args.action {
        TrashCommand::List { json } => list_command(&config, json),
        TrashCommand::Restore { path, id, json } => {
            restore_command(&config, &path, id.as_deref(), json)
        }
    }
}

/// Opens the trash if it exists; None when nothing was ever trashed (no folder is created).
fn open_trash(cfg: &Config) -> Result<Option<Trash>> {
    let dir = cfg.state.join(peerfs_replicator::trash::TRASH_DIR);
    match std::fs::symlink_metadata(&dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!("trash {}: {e}", dir.display())),
    }
    Ok(Some(Trash::open(&cfg.state)?))
}

fn list_command(config_path: &Path, as_json: bool) -> Result<u8> {
    let cfg = Config::load(config_path)?;
    let entries = match open_trash(&cfg)? {
        Some(trash) => trash.list()?,
        None => Vec::new(),
    };
    let retention = crate::duration::format(cfg.trash.retention);
    let mut out = String::new();
    if as_json {
        let v = json!({
            "name": cfg.name,
            "trash": cfg.state.join(peerfs_replicator::trash::TRASH_DIR).to_string_lossy(),
            "retention": retention,
            "entries": entries,
        });
        outln!(out, "{}", serde_json::to_string_pretty(&v)?);
    } else if entries.is_empty() {
        outln!(out, "the trash of drive {:?} is empty", cfg.name);
    } else {
        print_entries(&mut out, &entries);
        outln!(
            out,
            "{} entr{}, kept {retention} after deletion (trash.retention); \
             `peerfs trash restore --config FILE PATH` brings one back",
            entries.len(),
            if entries.len() == 1 { "y" } else { "ies" }
        );
    }
    crate::print_stdout(&out)?;
    Ok(0)
}

fn print_entries(out: &mut String, entries: &[TrashEntry]) {
    let rows: Vec<[String; 6]> = entries
        .iter()
        .map(|e| {
            [
                deleted_at(e),
                printable(&e.origin),
                e.kind.as_str().to_string(),
                human_size(e.size),
                printable(&e.path.to_string()),
                e.id.clone(),
            ]
        })
        .collect();
    let header = ["deleted at", "origin", "kind", "size", "path", "id"];
    let mut width = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {:<w4$}  {}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4],
        )
    };
    outln!(out, "{}", line(header));
    for row in &rows {
        outln!(out, "{}", line(row.each_ref().map(String::as_str)));
    }
}

fn deleted_at(e: &TrashEntry) -> String {
    let secs = e
        .deleted_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    crate::timefmt::rfc3339_utc(secs)
}

/// Control characters in names would break the table (or the terminal): shown escaped.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `0 B`, `512 B`, `1.5 KiB`, `12.0 MiB`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn restore_command(config_path: &Path, path: &Path, id: Option<&str>, as_json: bool) -> Result<u8> {
    let cfg = Config::load(config_path)?;
    let rel = drive_path(&cfg, path)?;
    // Canonical where it exists, as the daemon sees it (like `peerfs status`).
    let state = std::fs::canonicalize(&cfg.state).unwrap_or_else(|_| cfg.state.clone());
    let socket = state.join("control.sock");

    let (restored, via) = match daemon_restore(&socket, &rel, id)? {
        Some(answer) => (answer, "through the daemon"),
        None => {
            let Some(trash) = open_trash(&cfg)? else {
                bail!(
                    "{rel} is not in the trash: the trash of drive {:?} is empty",
                    cfg.name
                );
            };
            let root: OwnedFd = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(&cfg.backing)
                .with_context(|| format!("backing {}", cfg.backing.display()))?
                .into();
            let restored = trash.restore(root.as_fd(), &rel, id)?;
            (
                serde_json::to_value(&restored)?,
                "into the backing folder (no daemon is running)",
            )
        }
    };
    let mut out = String::new();
    if as_json {
        outln!(out, "{}", serde_json::to_string_pretty(&restored)?);
    } else {
        let text = |k: &str| restored["entry"][k].as_str().unwrap_or("?").to_string();
        let to = restored["restored_to"].as_str().unwrap_or("?");
        let beside = if to == text("path") {
            String::new()
        } else {
            format!(
                " ({} exists; restored beside it)",
                printable(&rel.to_string())
            )
        };
        outln!(
            out,
            "restored {} (deleted {} by {}, entry {}) to {}{beside}, {via}",
            printable(&text("path")),
            text("deleted_at"),
            printable(&text("origin")),
            text("id"),
            printable(to),
        );
    }
    crate::print_stdout(&out)?;
    Ok(0)
}

/// Asks the daemon to restore; None when no daemon answers.
fn daemon_restore(
    socket: &Path,
    rel: &RelPath,
    id: Option<&str>,
) -> Result<Option<serde_json::Value>> {
    let text = std::str::from_utf8(rel.as_bytes())
        .map_err(|_| anyhow!("{rel}: the control socket takes UTF-8 paths only"));
    let req = match text {
        Ok(path) => Request::trash_restore(path.to_string(), id.map(str::to_string)),
        // Without a daemon the path needs no text form: try that way first.
        Err(e) => {
            return match control::request(socket, &Request::status()) {
                Err(ClientError::NoDaemon(_)) => Ok(None),
                _ => Err(e),
            };
        }
    };
    match control::request_with_timeout(socket, &req, RESTORE_TIMEOUT) {
        Ok(resp) if resp.ok => resp
            .restored
            .map(Some)
            .ok_or_else(|| anyhow!("the daemon answered without saying what it restored")),
        Ok(resp) => Err(anyhow!(
            "the daemon refused the restore: {}",
            resp.error.unwrap_or_else(|| "no reason given".into())
        )),
        Err(ClientError::NoDaemon(_)) => Ok(None),
        Err(e @ ClientError::BadAnswer(_)) => Err(anyhow!("{e}")),
    }
}

/// PATH as the drive names it: relative to the drive's root, or absolute under the
/// mountpoint (or under the backing folder), with `.` and trailing slashes dropped.
fn drive_path(cfg: &Config, path: &Path) -> Result<RelPath> {
    let inside = if path.is_absolute() {
        // The mountpoint's own name is not resolved: that would ask the (maybe busy) drive.
        let resolved = |p: &Path| -> Option<PathBuf> {
            let parent = std::fs::canonicalize(p.parent()?).ok()?;
            Some(parent.join(p.file_name()?))
        };
        let mut roots = vec![cfg.mountpoint.clone(), cfg.backing.clone()];
        roots.extend(resolved(&cfg.mountpoint));
        roots.extend(resolved(&cfg.backing));
        let under = |p: &Path| {
            roots
                .iter()
                .find_map(|root| p.strip_prefix(root).ok().map(Path::to_path_buf))
        };
        // Lexically first; through symlinks (e.g. /mnt -> /srv/mnt) only if that fails.
        match under(path).or_else(|| under(&resolved(path)?)) {
            Some(p) => p,
            None => bail!(
                "{} is not inside the drive (mounted at {}); give a path in the drive, \
                 e.g. docs/report.docx",
                path.display(),
                cfg.mountpoint.display()
            ),
        }
    } else {
        path.to_path_buf()
    };
    let mut bytes: Vec<u8> = Vec::new();
    for c in inside.components() {
        match c {
            Component::Normal(name) => {
                if !bytes.is_empty() {
                    bytes.push(b'/');
                }
                bytes.extend_from_slice(name.as_bytes());
            }
            Component::CurDir => {}
            Component::ParentDir => bail!("{}: '..' is not allowed here", path.display()),
            Component::RootDir | Component::Prefix(_) => {}
        }
    }
    if bytes.is_empty() {
        bail!(
            "{}: names the drive's root; name a file or folder in it",
            path.display()
        );
    }
    RelPath::new(&bytes).map_err(|e| {
        anyhow!(
            "{}: {e}",
            PathBuf::from(OsString::from_vec(bytes.clone())).display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse(
            "name = \"a\"\nbacking = \"/nonexistent/peerfs/b\"\nmountpoint = \"/nonexistent/peerfs/m\"\nstate = \"/nonexistent/peerfs/s\"\n",
            Path::new("/etc/peerfs/a.toml"),
        )
        .expect("config")
    }

    #[test]
    fn drive_paths() {
        let c = cfg();
        let ok = [
            ("docs/a.txt", "docs/a.txt"),
            ("./docs//a.txt/", "docs/a.txt"),
            ("/nonexistent/peerfs/m/docs/a.txt", "docs/a.txt"),
            ("/nonexistent/peerfs/b/x", "x"),
        ];
        for (input, want) in ok {
            let got = drive_path(&c, Path::new(input)).expect(input);
            assert_eq!(got.as_bytes(), want.as_bytes(), "{input}");
        }
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../b",
            ".",
            "/nonexistent/peerfs/m",
        ] {
            let e = drive_path(&c, Path::new(bad)).expect_err(bad).to_string();
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn sizes_and_names_print_safely() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(12 * 1024 * 1024), "12.0 MiB");
        assert_eq!(printable("a\nb\tc"), "a\\nb\\tc");
    }
}
