//! The kernel's mount table: owns reading `/proc/self/mountinfo`, the `umount2` calls, and the
//! recovery of a mountpoint left dead (ENOTCONN) by a daemon that was killed.
//!
//! Everything here looks at the table or at the mountpoint's own dentry and never asks the drive
//! itself anything, so it works when the daemon is hung or gone.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The filesystem type peerfs mounts show in mountinfo (fs-linux's contract).
pub const PEERFS_FSTYPE: &str = "fuse.peerfs";

/// One line of mountinfo, the fields peerfs needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// A snapshot of `/proc/self/mountinfo`, in kernel order (later lines are mounted on top).
#[derive(Debug, Clone, Default)]
pub struct MountTable {
    entries: Vec<MountEntry>,
}

impl MountTable {
    pub fn read() -> Result<MountTable> {
        let text =
            std::fs::read("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
        Ok(MountTable::parse(&text))
    }

    /// Lines that don't parse are skipped: the kernel's format is stable, and one odd line
    /// must not make every command fail.
    pub fn parse(text: &[u8]) -> MountTable {
        let entries = text.split(|&b| b == b'\n').filter_map(parse_line).collect();
        MountTable { entries }
    }

    /// The topmost mount whose mount point is exactly `path` (which should be canonical).
    pub fn find(&self, path: &Path) -> Option<&MountEntry> {
        self.entries.iter().rev().find(|e| e.mount_point == path)
    }
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    // id parent major:minor root mount_point options [optional...] - fstype source super_options
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let mount_point = fields.get(4)?;
    let dash = fields.iter().skip(6).position(|f| *f == b"-")? + 6;
    let fstype = fields.get(dash + 1)?;
    let source = fields.get(dash + 2)?;
    Some(MountEntry {
        mount_point: PathBuf::from(std::ffi::OsString::from_vec(unescape(mount_point))),
        fstype: String::from_utf8_lossy(&unescape(fstype)).into_owned(),
        source: String::from_utf8_lossy(&unescape(source)).into_owned(),
    })
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 4 <= field.len() {
            let digits = &field[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// Resolves `path` to the form mountinfo uses without touching its last component: stat or
/// realpath on a mount point asks the filesystem mounted there, which for a dead FUSE mount
/// fails with ENOTCONN and for a hung one never returns.
pub fn canonical_mount_path(path: &Path) -> Result<PathBuf> {
    canonical_mount_path_at_depth(path, 0)
}

fn canonical_mount_path_at_depth(path: &Path, depth: u32) -> Result<PathBuf> {
    // The kernel's own limit on nested symlinks (ELOOP).
    if depth > 40 {
        bail!(
            "cannot resolve {}: too many levels of symbolic links",
            path.display()
        );
    }
    let abs =
        std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    let name = match abs.components().next_back() {
        Some(std::path::Component::Normal(name)) => name.to_os_string(),
        // "/", "..", ".": there is no last name to keep untouched, so resolve it all.
        _ => {
            return std::fs::canonicalize(&abs)
                .with_context(|| format!("cannot resolve {}", abs.display()));
        }
    };
    let parent = abs.parent().unwrap_or(Path::new("/"));
    let parent = std::fs::canonicalize(parent)
        .with_context(|| format!("cannot resolve {}", parent.display()))?;
    let joined = parent.join(&name);
    // The last component may itself be a symlink to the real mount point; following it is safe
    // (reading a link asks the parent's filesystem, not the mount).
    match std::fs::read_link(&joined) {
        Ok(target) => canonical_mount_path_at_depth(&parent.join(target), depth + 1),
        Err(_) => Ok(joined),
    }
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `umount2(path, flags)`.
pub fn umount2(path: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; umount2 only reads it.
    let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// True for the errors a FUSE mount gives once its daemon is gone.
pub fn is_dead_mount_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
    )
}

/// If `mountpoint` is a peerfs mount whose daemon died (kill -9 leaves it answering ENOTCONN),
/// detaches it lazily and returns a warning to log. A dead mount of another filesystem is
/// refused, not touched: it is not ours to remove.
pub fn recover_dead_mount(mountpoint: &Path) -> Result<Option<String>> {
    let err = match std::fs::metadata(mountpoint) {
        Ok(_) => return Ok(None),
        Err(e) if is_dead_mount_error(&e) => e,
        // Missing or otherwise unusable: config validation gives the precise message.
        Err(_) => return Ok(None),
    };
    let path = canonical_mount_path(mountpoint)?;
    let table = MountTable::read()?;
    let Some(entry) = table.find(&path) else {
        bail!(
            "mountpoint {}: {err}, but it is not in the mount table",
            path.display()
        );
    };
    if entry.fstype != PEERFS_FSTYPE {
        bail!(
            "mountpoint {}: a dead {} mount ({err}); unmount it first",
            path.display(),
            entry.fstype
        );
    }
    // MNT_DETACH: a plain umount of a dead FUSE mount still fails with EBUSY while some process
    // holds a file or cwd inside it; detaching frees the mountpoint now and the rest later.
    umount2(&path, libc::MNT_DETACH).with_context(|| {
        format!(
            "mountpoint {}: left dead by a previous daemon ({err}) and cannot be detached",
            path.display()
        )
    })?;
    Ok(Some(format!(
        "mountpoint {} was left dead by a previous peerfs daemon ({err}); detached it",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = b"\
22 27 0:21 / /proc rw,relatime - proc proc rw
24 27 0:6 / /dev rw,relatime shared:2 - devtmpfs devtmpfs rw,size=1k
90 27 0:50 / /mnt/my\\040drive rw,nosuid,nodev,relatime shared:7 master:1 - fuse.peerfs peerfs rw,user_id=0
91 27 0:51 / /tmp/x rw - tmpfs tmpfs rw
92 27 0:52 / /tmp/x rw - fuse.peerfs peerfs rw
garbage line
";

    #[test]
    fn parses_optional_fields_and_escapes() {
        let t = MountTable::parse(SAMPLE);
        let e = t.find(Path::new("/mnt/my drive")).expect("found");
        assert_eq!(e.fstype, "fuse.peerfs");
        assert_eq!(e.source, "peerfs");
        assert_eq!(
            t.find(Path::new("/dev")).map(|e| e.fstype.as_str()),
            Some("devtmpfs")
        );
        assert!(t.find(Path::new("/mnt")).is_none());
    }

    #[test]
    fn topmost_mount_wins() {
        let t = MountTable::parse(SAMPLE);
        assert_eq!(
            t.find(Path::new("/tmp/x")).map(|e| e.fstype.as_str()),
            Some("fuse.peerfs")
        );
    }

    #[test]
    fn unescape_handles_edges() {
        assert_eq!(unescape(b"a\\040b"), b"a b");
        assert_eq!(unescape(b"a\\134"), b"a\\");
        assert_eq!(unescape(b"trail\\"), b"trail\\");
        assert_eq!(unescape(b"\\04"), b"\\04");
        assert_eq!(unescape(b"\\999"), b"\\999");
    }

    #[test]
    fn canonical_mount_path_follows_parent_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = std::fs::canonicalize(dir.path()).expect("canon");
        std::fs::create_dir(real.join("r")).expect("mkdir");
        std::os::unix::fs::symlink(real.join("r"), real.join("l")).expect("symlink");
        std::os::unix::fs::symlink("r/m", real.join("lm")).expect("symlink");
        assert_eq!(
            canonical_mount_path(&real.join("l/m")).expect("ok"),
            real.join("r/m")
        );
        assert_eq!(
            canonical_mount_path(&real.join("lm")).expect("ok"),
            real.join("r/m")
        );
        assert_eq!(
            canonical_mount_path(&real.join("l/m/")).expect("ok"),
            real.join("r/m")
        );
    }
}
