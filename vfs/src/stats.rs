//! Operation counters of a mounted drive, read by `peerfs status`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($field:ident),* $(,)?) => {
        /// Live counters, bumped by the drive's operations.
        #[derive(Default)]
        pub(crate) struct Counters {
            $(pub(crate) $field: AtomicU64,)*
        }

        /// A point-in-time copy of the counters.
        #[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
        pub struct Stats {
            $(pub $field: u64,)*
            /// Open file handles right now.
            pub open_handles: u64,
            /// Inodes the kernel currently holds references to.
            pub known_nodes: u64,
        }

        impl Counters {
            pub(crate) fn snapshot(&self, open_handles: u64, known_nodes: u64) -> Stats {
                Stats {
                    $($field: self.$field.load(Relaxed),)*
                    open_handles,
                    known_nodes,
                }
            }
        }
    };
}

counters!(
    lookups,
    getattrs,
    setattrs,
    opens,
    creates,
    reads,
    writes,
    bytes_read,
    bytes_written,
    releases,
    fsyncs,
    readdirs,
    mkdirs,
    unlinks,
    rmdirs,
    renames,
    links,
    symlinks,
    mknods,
    xattr_ops,
    errors,
    lock_denials,
);

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}
