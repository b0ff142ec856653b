//! A validated, normalised path relative to the watch set.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Longest accepted path, in bytes (Linux's `PATH_MAX` less the terminating NUL).
pub const MAX_PATH_BYTES: usize = 4095;
/// Longest accepted single component, in bytes (`NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelPathError {
    #[error("path is absolute")]
    Absolute,
    #[error("path contains a '..' component")]
    ParentComponent,
    #[error("path contains a '.' component")]
    CurrentComponent,
    #[error("path contains an empty component ('//' or a trailing '/')")]
    EmptyComponent,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path component is longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong,
    #[error("path is longer than {MAX_PATH_BYTES} bytes")]
    PathTooLong,
}

/// A relative path beneath the watch set: `/`-separated components, none of them empty, `.` or
/// `..`, no NUL, within `PATH_MAX`/`NAME_MAX`. The empty path names the root of the watch set.
///
/// Constructing one is the only check; holders can join it beneath the backing folder without
/// re-validating. (Symlinks inside the watch set are resolved by the caller with `O_NOFOLLOW`
/// walks, so a symlink component can never lead outside either.)
///
/// On the wire it is a byte string, validated again on decode: a peer cannot smuggle an
/// unvalidated path in.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "WirePath", into = "WirePath")]
pub struct RelPath(Vec<u8>);

/// The wire form of a [`RelPath`]: its bytes, unchecked until converted.
#[derive(serde::Serialize, serde::Deserialize)]
struct WirePath(#[serde(with = "serde_bytes")] Vec<u8>);

impl TryFrom<WirePath> for RelPath {
    type Error = RelPathError;
    fn try_from(w: WirePath) -> Result<Self, RelPathError> {
        RelPath::new(&w.0)
    }
}

impl From<RelPath> for WirePath {
    fn from(p: RelPath) -> WirePath {
        WirePath(p.0)
    }
}

impl RelPath {
    /// The root of the watch set.
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    /// Validates `bytes` as a relative path.
    pub fn new(bytes: &[u8]) -> Result<Self, RelPathError> {
        if bytes.is_empty() {
            return Ok(Self::root());
        }
        if bytes.len() > MAX_PATH_BYTES {
            return Err(RelPathError::PathTooLong);
        }
        if bytes.contains(&0) {
            return Err(RelPathError::Nul);
        }
        if bytes[0] == b'/' {
            return Err(RelPathError::Absolute);
        }
        for component in bytes.split(|b| *b == b'/') {
            match component {
                b"" => return Err(RelPathError::EmptyComponent),
                b"." => return Err(RelPathError::CurrentComponent),
                b".." => return Err(RelPathError::ParentComponent),
                c if c.len() > MAX_NAME_BYTES => return Err(RelPathError::NameTooLong),
                _ => {}
            }
        }
        Ok(RelPath(bytes.to_vec()))
    }

    /// Validates a `Path` (e.g. from a Windows adapter after separator conversion).
    pub fn from_path(path: &Path) -> Result<Self, RelPathError> {
        Self::new(path.as_os_str().as_bytes())
    }

    /// True for the root of the watch set.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The components, first to last; none for the root.
    pub fn components(&self) -> impl Iterator<Item = &OsStr> {
        self.0
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty())
            .map(OsStr::from_bytes)
    }

    /// The path as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The folder containing this path and the last component; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &OsStr)> {
        if self.is_root() {
            return None;
        }
        match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => Some((
                RelPath(self.0[..i].to_vec()),
                OsStr::from_bytes(&self.0[i + 1..]),
            )),
            None => Some((RelPath::root(), OsStr::from_bytes(&self.0))),
        }
    }

    /// The last component; `None` for the root.
    pub fn file_name(&self) -> Option<&OsStr> {
        self.split_last().map(|(_, n)| n)
    }

    /// This path with `name` appended (validated like any path).
    pub fn join(&self, name: &OsStr) -> Result<RelPath, RelPathError> {
        if self.is_root() {
            return RelPath::new(name.as_bytes());
        }
        let mut b = self.0.clone();
        b.push(b'/');
        b.extend_from_slice(name.as_bytes());
        RelPath::new(&b)
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        other.is_root()
            || self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.get(other.0.len()) == Some(&b'/'))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({:?})", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn attacks_are_refused() {
        let long_name = vec![b'a'; MAX_NAME_BYTES + 1];
        let long_path: Vec<u8> = std::iter::repeat_n(b"abcdefg/".as_slice(), 600)
            .flatten()
            .copied()
            .collect();
        let table: &[(&[u8], RelPathError)] = &[
            (b"/etc/passwd", RelPathError::Absolute),
            (b"..", RelPathError::ParentComponent),
            (b"../x", RelPathError::ParentComponent),
            (b"a/../../x", RelPathError::ParentComponent),
            (b"a/..", RelPathError::ParentComponent),
            (b"./a", RelPathError::CurrentComponent),
            (b"a//b", RelPathError::EmptyComponent),
            (b"a/", RelPathError::EmptyComponent),
            (b"a\0b", RelPathError::Nul),
            (&long_name, RelPathError::NameTooLong),
            (&long_path, RelPathError::PathTooLong),
        ];
        for (input, want) in table {
            assert_eq!(
                RelPath::new(input).as_ref().err(),
                Some(want),
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn ordinary_paths_are_accepted() {
        for ok in [
            &b"a"[..],
            b"a/b/c",
            b"...",
            b"..a",
            b".hidden/x",
            b"sp ace/\xff",
        ] {
            let p = RelPath::new(ok).expect("valid");
            assert_eq!(p.as_bytes(), ok);
        }
        assert!(RelPath::new(b"").expect("root").is_root());
        assert_eq!(RelPath::new(b"a/b").expect("ok").components().count(), 2);
    }

    proptest! {
        #[test]
        fn accepted_paths_never_escape(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = RelPath::new(&bytes) {
                for c in p.components() {
                    let c = c.as_bytes();
                    prop_assert!(!c.is_empty() && c != b"." && c != b".." && !c.contains(&b'/') && !c.contains(&0));
                }
                prop_assert!(!p.as_bytes().starts_with(b"/"));
            }
        }
    }
}
