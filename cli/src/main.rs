//! The `peerfs` command: owns argument parsing, dispatch to the subcommands and the process exit
//! code. Every failure leaves through [`main`] as one `peerfs: error: <reason>` line.
//!
//! Exit codes: 0 success, 1 error, 2 usage error (from clap), 3 `status` found no daemon.

mod config;
mod control;
mod daemon;
mod demo;
mod duration;
mod identity_cmd;
mod logging;
mod mountinfo;
mod network;
mod progress;
mod runtime;
mod serve;
mod signals;
mod status;
mod timefmt;
mod trash;
mod unmount;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for a failure with a reason on stderr.
pub const EXIT_ERROR: u8 = 1;
/// Exit code of `peerfs status` when no daemon answers for the drive.
pub const EXIT_NOT_MOUNTED: u8 = 3;

#[derive(Debug, Parser)]
#[command(name = "peerfs", version, about = "peer-to-peer collaborative drive")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mount the drive described by a config file (foreground unless --daemon).
    Mount {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Detach into the background; returns once the drive is usable.
        #[arg(short, long)]
        daemon: bool,
    },
    /// Unmount a drive and wait until the daemon serving it has exited.
    Unmount {
        /// The mount point of the drive.
        mountpoint: PathBuf,
    },
    /// Create this server's peer identity (key and certificate) in a state folder; prints
    /// the peer id as the last line.
    Init {
        /// The state folder (created with mode 0700 if missing); use the config's `state`.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// This server's name, written into its certificate (default: the host name).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Print this server's peer id (from the identity in the state folder).
    Id {
        /// The state folder that `peerfs init` wrote to.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
    /// Show whether the drive is mounted, and its counters (exit code 3 when not mounted).
    Status {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the locks this server holds and knows of: path, holder, since (exit code 3 when
    /// not mounted).
    Locks {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The trash: what peers' deletions and replaces left behind (`list`, `restore`).
    Trash(trash::TrashArgs),
    /// Start N peers on this machine, each with its own drive, connected to each other; shows
    /// what to try, and unmounts everything on Ctrl-C.
    Demo {
        /// How many peers (2 to 8).
        #[arg(
            long,
            value_name = "N",
            default_value_t = 2,
            value_parser = clap::value_parser!(u8).range(2..=8)
        )]
        peers: u8,
        /// Where to put them (created if missing, kept afterwards; default: a temporary folder
        /// under /tmp, removed at exit).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // clap exits by itself with code 2 on usage errors and 0 for --help/--version.
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Mount { config, daemon } => serve::mount_command(&config, daemon),
        Command::Unmount { mountpoint } => unmount::unmount_command(&mountpoint).map(|()| 0),
        Command::Status { config, json } => status::status_command(&config, json),
        Command::Locks { config, json } => status::locks_command(&config, json),
        Command::Trash(args) => trash::trash_command(args),
        Command::Init { state, name } => identity_cmd::init_command(&state, name.as_deref()),
        Command::Id { state } => identity_cmd::id_command(&state),
        Command::Demo { peers, dir } => demo::demo_command(peers, dir.as_deref()),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            report_error(&err);
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Prints an error chain as the single line scripts and tests rely on.
pub fn report_error(err: &anyhow::Error) {
    print_stderr(&format!("peerfs: error: {}", one_line(&format!("{err:#}"))));
}

/// Writes a line to stderr; unlike `eprintln!`, never panics when stderr is gone.
pub fn print_stderr(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Writes to stdout. A reader that went away (`| head`) is not an error worth a message;
/// unlike `println!`, nothing here panics.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to stdout"))
        }
        _ => Ok(()),
    }
}

/// Folds any embedded line breaks (e.g. from a library's multi-line Display) into one line.
pub fn one_line(s: &str) -> String {
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
