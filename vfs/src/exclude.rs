//! Which names are temp and owner files of editors and office suites: never locked across peers
//! and never replicated (see shared/OFFICE-SAVES.md). One matcher, built from the defaults plus
//! the config's `exclude` and `include` globs.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use peerfs_proto::RelPath;

/// The default exclusions, matched case-insensitively against a file's name (Excel writes
/// `.TMP`, Word 2003 `~WRD0001.TMP`).
pub const DEFAULT_EXCLUDES: &[&str] = &[
    "~$*",       // Office owner files (~$report.docx)
    ".~lock.*#", // LibreOffice lock files
    "*.tmp",     // Word/PowerPoint/LibreOffice temps, Excel's probe
    "*.temp",    //
    "*~",        // vim/emacs backups, Excel's ~RF....TMP handled by *.tmp
    ".*.swp",    // vim swap
    ".*.swx",    // vim swap (second)
    ".nfs*",     // NFS silly-renames
    "[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]", // Excel temp, no extension
    "4913",      // vim's write probe
    ".goutputstream-*", // GIO (gedit, GNOME)
    "*.sb-*",    // Mac Office save folders
    "._*",       // macOS resource forks
    ".#*",       // Emacs lock links
    "#*#",       // Emacs auto-save
    "*___jb_tmp___", // JetBrains
    "*___jb_old___", // JetBrains
];

/// Why a glob was refused.
#[derive(Debug, thiserror::Error)]
#[error("bad glob {glob:?}: {source}")]
pub struct GlobError {
    glob: String,
    #[source]
    source: globset::Error,
}

/// The exclusion matcher. A glob without `/` matches a name in any folder; a glob with `/`
/// matches the whole path from the root of the watch set. `include` wins over `exclude`.
#[derive(Clone, Debug)]
pub struct Excludes {
    names: GlobSet,
    paths: GlobSet,
    include_names: GlobSet,
    include_paths: GlobSet,
}

fn build(globs: &[&str]) -> Result<(GlobSet, GlobSet), GlobError> {
    let mut names = GlobSetBuilder::new();
    let mut paths = GlobSetBuilder::new();
    for g in globs {
        let glob = GlobBuilder::new(g.trim_start_matches('/'))
            .case_insensitive(true)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|source| GlobError {
                glob: (*g).to_string(),
                source,
            })?;
        if g.contains('/') {
            paths.add(glob);
        } else {
            names.add(glob);
        }
    }
    let finish = |b: GlobSetBuilder| {
        b.build().map_err(|source| GlobError {
            glob: globs.join(", "),
            source,
        })
    };
    Ok((finish(names)?, finish(paths)?))
}

impl Excludes {
    /// The defaults plus `exclude`, minus anything matching `include`.
    pub fn new(exclude: &[String], include: &[String]) -> Result<Excludes, GlobError> {
        let mut all: Vec<&str> = DEFAULT_EXCLUDES.to_vec();
        all.extend(exclude.iter().map(String::as_str));
        let (names, paths) = build(&all)?;
        let include: Vec<&str> = include.iter().map(String::as_str).collect();
        let (include_names, include_paths) = build(&include)?;
        Ok(Excludes {
            names,
            paths,
            include_names,
            include_paths,
        })
    }

    /// The defaults alone.
    pub fn defaults() -> Excludes {
        // The default globs are fixed and tested to compile.
        Excludes::new(&[], &[]).unwrap_or_else(|e| panic!("default excludes: {e}"))
    }

    /// True if `path` (or any folder above it) is a temp or owner file that stays local.
    pub fn is_excluded(&self, path: &RelPath) -> bool {
        let full = OsStr::from_bytes(path.as_bytes());
        let mut excluded = false;
        for name in path.components() {
            if self.names.is_match(name) {
                excluded = true;
                break;
            }
        }
        if !excluded && self.paths.is_match(full) {
            excluded = true;
        }
        excluded
            && !path
                .components()
                .last()
                .is_some_and(|n| self.include_names.is_match(n))
            && !self.include_paths.is_match(full)
    }

    /// True if a file called `name` directly in any folder would be excluded by name alone.
    pub fn is_excluded_name(&self, name: &OsStr) -> bool {
        self.names.is_match(name) && !self.include_names.is_match(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excluded(e: &Excludes, p: &str) -> bool {
        e.is_excluded(&RelPath::new(p.as_bytes()).expect("path"))
    }

    #[test]
    fn office_and_editor_temps_are_excluded() {
        let e = Excludes::defaults();
        for p in [
            "~$arterly report.docx",
            "dir/~$Budget.xlsx",
            ".~lock.notes.odt#",
            "A1B2C3D4.tmp",
            "~WRL0001.tmp",
            "~WRD0001.TMP",
            "5EE27100",
            "5ee27100",
            "Budget.xlsx~RF172f241.TMP",
            "ppt5C4F.tmp",
            "lu12345abc.tmp",
            "notes.txt~",
            ".notes.txt.swp",
            "4913",
            ".goutputstream-ABC123",
            "report.docx.sb-1a2b3c4d-5e6f7g",
            "._report.docx",
            ".#notes.txt",
            "#notes.txt#",
            "Main.java___jb_tmp___",
            "Main.java___jb_old___",
            ".nfs000000001",
            "report.docx.sb-1a2b3c4d-5e6f7g/inner.xml",
        ] {
            assert!(excluded(&e, p), "{p} should be excluded");
        }
    }

    #[test]
    fn documents_are_not_excluded() {
        let e = Excludes::defaults();
        for p in [
            "report.docx",
            "Budget.xlsx",
            "dir/notes.odt",
            "5EE2710",   // 7 hex digits
            "5EE271001", // 9
            "ZEE27100",  // not hex
            "49130",
            "tmp",
            "a.tmpl",
            "~report.docx",
        ] {
            assert!(!excluded(&e, p), "{p} should replicate");
        }
    }

    #[test]
    fn config_globs_extend_and_include_wins() {
        let e = Excludes::new(
            &["*.bak".into(), "build/*".into()],
            &["keep.tmp".into(), "special/*.tmp".into()],
        )
        .expect("globs");
        assert!(excluded(&e, "x.BAK"));
        assert!(excluded(&e, "build/out.o"));
        assert!(
            !excluded(&e, "src/build/out.o"),
            "a path glob is anchored at the root"
        );
        assert!(!excluded(&e, "keep.tmp"));
        assert!(!excluded(&e, "special/x.tmp"));
        assert!(excluded(&e, "other/x.tmp"));
    }

    #[test]
    fn bad_globs_are_reported() {
        let err = Excludes::new(&["a[".into()], &[]).expect_err("bad glob");
        assert!(err.to_string().contains("a["));
    }
}
