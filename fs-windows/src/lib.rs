//! The WinFsp adapter: translates WinFsp's path-based file system callbacks into `peerfs-vfs`
//! calls, nothing more — the Windows sibling of `peerfs-fs-linux`.
//!
//! Empty on purpose: it builds only for Windows targets with the `winfsp` crate, and no Windows
//! machine is available to build or test it yet. `peerfs-vfs` already offers the path-based
//! entry points (`Vfs::resolve`) this adapter needs, because WinFsp opens by name.
