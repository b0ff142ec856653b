//! Runtime bookkeeping of a serving daemon: owns the pid file (`<state>/peerfs.pid`, locked so
//! two daemons never serve one state folder) and the runtime record that lets
//! `peerfs unmount MOUNTPOINT` find the daemon it must wait for.
//!
//! The record lives in `/run/peerfs/mounts/<hex of the canonical mountpoint>` (the folder can be
//! moved with `PEERFS_RUNTIME_DIR`), holds `key=value` lines (pid, process start time, state,
//! mountpoint) and is removed when the daemon exits. `/run` is a tmpfs, so records never outlive
//! a reboot; a record left by a killed daemon is recognised as stale by its pid's start time.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Default folder of runtime records.
const DEFAULT_RUNTIME_DIR: &str = "/run/peerfs/mounts";
/// Overrides [`DEFAULT_RUNTIME_DIR`] (tests, or systems without a writable /run).
pub const RUNTIME_DIR_ENV: &str = "PEERFS_RUNTIME_DIR";
/// File names are limited to 255 bytes; hex doubles the length, so long paths get a hash.
const MAX_HEX_NAME: usize = 240;

pub fn runtime_dir() -> PathBuf {
    match std::env::var_os(RUNTIME_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_RUNTIME_DIR),
    }
}

/// What a daemon leaves behind for `peerfs unmount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub pid: i32,
    /// Start time of `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22), so a reused
    /// pid is not mistaken for the daemon.
    pub start_time: Option<u64>,
    pub state: PathBuf,
    pub mountpoint: PathBuf,
}

/// The record's file name for a canonical mountpoint.
pub fn record_name(mountpoint: &Path) -> String {
    let bytes = mountpoint.as_os_str().as_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if hex.len() <= MAX_HEX_NAME {
        hex
    } else {
        // FNV-1a: stable across builds (unlike std's hasher); the record repeats the full path,
        // which `read_record` compares, so a collision cannot mislead.
        let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("h{hash:016x}-{}", bytes.len())
    }
}

pub fn record_path(mountpoint: &Path) -> PathBuf {
    runtime_dir().join(record_name(mountpoint))
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(format!("pid={}\n", self.pid).as_bytes());
        if let Some(t) = self.start_time {
            out.extend_from_slice(format!("start_time={t}\n").as_bytes());
        }
        // Paths are written raw: they are not UTF-8 necessarily, and a newline in them is
        // refused at write time.
        for (key, path) in [("state", &self.state), ("mountpoint", &self.mountpoint)] {
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(path.as_os_str().as_bytes());
            out.push(b'\n');
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Record> {
        let (mut pid, mut start_time, mut state, mut mountpoint) = (None, None, None, None);
        for line in bytes.split(|&b| b == b'\n') {
            let Some(eq) = line.iter().position(|&b| b == b'=') else {
                continue;
            };
            let (key, value) = (&line[..eq], &line[eq + 1..]);
            let text = || std::str::from_utf8(value).ok();
            match key {
                b"pid" => pid = text().and_then(|t| t.parse().ok()),
                b"start_time" => start_time = text().and_then(|t| t.parse().ok()),
                b"state" => {
                    state = Some(PathBuf::from(std::ffi::OsString::from_vec(value.to_vec())))
                }
                b"mountpoint" => {
                    mountpoint = Some(PathBuf::from(std::ffi::OsString::from_vec(value.to_vec())))
                }
                _ => {}
            }
        }
        Some(Record {
            pid: pid?,
            start_time,
            state: state?,
            mountpoint: mountpoint?,
        })
    }
}

/// Writes the record for `rec.mountpoint` atomically (temp file + rename) and returns its path.
pub fn write_record(rec: &Record) -> io::Result<PathBuf> {
    for p in [&rec.state, &rec.mountpoint] {
        if p.as_os_str().as_bytes().contains(&b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "path contains a newline",
            ));
        }
    }
    let dir = runtime_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)?;
    let path = dir.join(record_name(&rec.mountpoint));
    let tmp = dir.join(format!(".{}.tmp{}", record_name(&rec.mountpoint), rec.pid));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(&rec.encode())?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The record for a canonical mountpoint, if one exists and really is for it.
pub fn read_record(mountpoint: &Path) -> io::Result<Option<Record>> {
    let path = record_path(mountpoint);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Record::decode(&bytes).filter(|r| r.mountpoint == mountpoint))
}

/// Removes the record for `mountpoint` if it still names `pid` (a newer daemon may have
/// replaced it after a lazy unmount).
pub fn remove_record(mountpoint: &Path, pid: i32) {
    if matches!(read_record(mountpoint), Ok(Some(rec)) if rec.pid == pid) {
        let _ = std::fs::remove_file(record_path(mountpoint));
    }
}

/// Start time of a live (non-zombie) process in clock ticks since boot; None if it is gone.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces or ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 (starttime) is fields[19].
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether the process a record names still runs (same pid and, when known, same start time).
pub fn process_alive(pid: i32, start_time: Option<u64>) -> bool {
    match (process_start_time(pid), start_time) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(now), Some(then)) => now == then,
    }
}

/// `<state>/peerfs.pid`, held with `flock` for the daemon's lifetime. The lock belongs to the
/// open file description, so it survives the fork into the daemon and the parent's exit.
#[derive(Debug)]
pub struct PidFile {
    file: File,
    path: PathBuf,
}

/// Why a pid file could not be taken.
#[derive(Debug)]
pub enum PidFileError {
    /// Another process holds it; its pid if readable.
    Held(Option<i32>),
    Io(io::Error),
}

impl PidFile {
    pub fn lock(path: &Path) -> Result<PidFile, PidFileError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(PidFileError::Io)?;
        // SAFETY: flock on a valid, open descriptor owned by `file`; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(PidFileError::Held(pid));
            }
            return Err(PidFileError::Io(err));
        }
        Ok(PidFile {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Records the serving process's pid (called again in the daemon after the fork).
    pub fn write_pid(&mut self, pid: u32) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(format!("{pid}\n").as_bytes())?;
        self.file.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file at exit. Unlinking while still holding the lock means a starter that
    /// opened the old file just before either waits for us or finds the file gone.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let rec = Record {
            pid: 42,
            start_time: Some(123456),
            state: PathBuf::from("/var/lib/peerfs/a b"),
            mountpoint: PathBuf::from("/mnt/share"),
        };
        assert_eq!(Record::decode(&rec.encode()), Some(rec));
        assert_eq!(Record::decode(b"pid=1\n"), None);
    }

    #[test]
    fn record_names_are_hex_or_hashed() {
        assert_eq!(record_name(Path::new("/mnt")), "2f6d6e74");
        let long = PathBuf::from(format!("/{}", "x".repeat(300)));
        let name = record_name(&long);
        assert!(name.starts_with('h') && name.len() < 40, "{name}");
        assert_eq!(name, record_name(&long));
    }

    #[test]
    fn own_process_is_alive_and_identified_by_start_time() {
        let pid = std::process::id() as i32;
        let start = process_start_time(pid);
        assert!(start.is_some());
        assert!(process_alive(pid, start));
        assert!(!process_alive(pid, start.map(|s| s + 1)));
    }

    #[test]
    fn pid_file_lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("peerfs.pid");
        let mut first = PidFile::lock(&path).expect("first lock");
        first.write_pid(4242).expect("write");
        match PidFile::lock(&path) {
            Err(PidFileError::Held(pid)) => assert_eq!(pid, Some(4242)),
            other => panic!("expected Held, got {other:?}"),
        }
        first.remove();
        assert!(!path.exists());
        PidFile::lock(&path).expect("free again");
    }
}
