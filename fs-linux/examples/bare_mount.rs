//! Mounts a folder with default options and no configuration file, for debugging the adapter
//! in isolation: `cargo run --example bare_mount -- BACKING MOUNTPOINT`. Ctrl-C does not
//! unmount; use `umount MOUNTPOINT`.

use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args_os().skip(1);
    let (Some(backing), Some(mountpoint)) = (args.next(), args.next()) else {
        return Err("usage: bare_mount BACKING MOUNTPOINT".into());
    };
    let vfs = peerfs_vfs::Vfs::new(peerfs_vfs::VfsConfig::new(backing.into()))?;
    let opts = peerfs_fs_linux::MountOptions {
        passthrough: std::env::var_os("PEERFS_PASSTHROUGH").is_none_or(|v| v != "0"),
        cache_ttl: std::time::Duration::from_secs(
            std::env::var("TTL")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
        ),
        threads: std::env::var("THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4),
        ..Default::default()
    };
    let drive =
        peerfs_fs_linux::Drive::mount(Arc::new(vfs), std::path::Path::new(&mountpoint), &opts)?;
    drive.run()?;
    Ok(())
}
