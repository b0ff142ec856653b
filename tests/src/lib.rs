//! Harness for peerfs's integration tests: real `peerfs mount` processes over temp folders
//! ([`Mount`]), a plain-directory twin ([`PlainDir`]) and a [`Pair`] of both that runs one
//! operation on each and asserts the drive behaves exactly like a plain directory (same value,
//! same errno, same resulting tree).
//!
//! The harness owns the test-side plumbing only: libc wrappers for calls std lacks ([`sys`]),
//! running a closure as another uid ([`user`]), and tree snapshots ([`tree`]). It never links
//! against peerfs's crates: the drive is exercised through the `peerfs` binary, as users run it.
//!
//! Build the binary before running the tests: `cargo build -p peerfs-cli`
//! (or set `PEERFS_BIN` to a `peerfs` executable).

pub mod errno;
pub mod mount;
pub mod peers;
pub mod sys;
pub mod tree;
pub mod user;

pub use errno::{Errno, Outcome, fails, outcome};
pub use mount::{DriveOptions, Mount, Pair, PlainDir, is_mounted, peerfs_bin};
pub use tree::{Kind, Snapshot, snapshot};
pub use user::{OTHER_GID, OTHER_UID, as_user};

/// Generates the same test bodies twice: once against a drive with kernel passthrough on (the
/// default) and once with `passthrough = false`, so both data paths (kernel passthrough and
/// daemon-served reads and writes) are held to the same behaviour.
///
/// Each named function must be `fn name(t: &peerfs_tests::Pair)` in the invoking file.
#[macro_export]
macro_rules! both_data_paths {
    ($($name:ident),* $(,)?) => {
        mod passthrough {
            $(
                #[test]
                fn $name() {
                    let pair = $crate::Pair::with($crate::DriveOptions::passthrough(true));
                    super::$name(&pair);
                }
            )*
        }
        mod no_passthrough {
            $(
                #[test]
                fn $name() {
                    let pair = $crate::Pair::with($crate::DriveOptions::passthrough(false));
                    super::$name(&pair);
                }
            )*
        }
    };
}

/// Deterministic pseudo-random bytes (xorshift64*), so test data needs no extra crate and a
/// failing case can be replayed from its seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        for b in v.to_le_bytes() {
            if out.len() == len {
                break;
            }
            out.push(b);
        }
    }
    out
}

/// Where two byte strings first differ, for failure messages that do not dump megabytes.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Asserts two byte strings are equal, reporting lengths and the first differing offset.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], expected: &[u8], what: &str) {
    if let Some(at) = first_difference(got, expected) {
        let show = |s: &[u8]| -> String {
            let end = (at + 16).min(s.len());
            format!("{:02x?}", &s[at.min(s.len())..end])
        };
        panic!(
            "{what}: contents differ at offset {at}: got len {} ({}...), expected len {} ({}...)",
            got.len(),
            show(got),
            expected.len(),
            show(expected)
        );
    }
}

/// The attributes of one name that must be identical on the drive and a plain directory
/// (everything `lstat` returns except inode, device, block counts and times).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub kind: tree::Kind,
    /// Full `st_mode`, file type bits included.
    pub mode: u32,
    pub size: u64,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
}

impl Attr {
    pub fn of(md: &std::fs::Metadata) -> Attr {
        use std::os::unix::fs::MetadataExt;
        Attr {
            kind: tree::Kind::of(md.file_type()),
            mode: md.mode(),
            size: md.size(),
            nlink: md.nlink(),
            uid: md.uid(),
            gid: md.gid(),
            rdev: md.rdev(),
        }
    }

    /// Permission bits with setuid, setgid and sticky.
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// `lstat` as an [`Attr`].
pub fn lstat(path: impl AsRef<std::path::Path>) -> std::io::Result<Attr> {
    std::fs::symlink_metadata(path).map(|m| Attr::of(&m))
}

/// `stat` (following symlinks) as an [`Attr`].
pub fn stat(path: impl AsRef<std::path::Path>) -> std::io::Result<Attr> {
    std::fs::metadata(path).map(|m| Attr::of(&m))
}

/// A timestamp as (seconds, nanoseconds).
pub type Stamp = (i64, i64);

/// atime, mtime and ctime of a name (`lstat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Times {
    pub atime: Stamp,
    pub mtime: Stamp,
    pub ctime: Stamp,
}

/// The times of a name, not following a final symlink.
pub fn times(path: impl AsRef<std::path::Path>) -> std::io::Result<Times> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)?;
    Ok(Times {
        atime: (m.atime(), m.atime_nsec()),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// The wall clock now as a [`Stamp`].
pub fn now() -> Stamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    (d.as_secs() as i64, i64::from(d.subsec_nanos()))
}

/// A table row for error cases: what, the operation on a root, the errno it must fail with.
pub type ErrCase<T = ()> = (
    &'static str,
    fn(&std::path::Path) -> std::io::Result<T>,
    i32,
);
