//! `peerfs init` and `peerfs id`: owns creating this server's peer identity (key and
//! self-signed certificate) in a state folder and printing its peer id. The files themselves
//! are `peerfs_proto::identity`'s business.
//!
//! The peer id is always the last line of stdout, so scripts can take it with `tail -n 1` and
//! people can copy it into the other servers' `[[peers]]` entries.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use peerfs_proto::Identity;
use peerfs_proto::identity::{CERT_FILE, KEY_FILE};

/// `peerfs init --state DIR [--name NAME]`.
pub fn init_command(state: &Path, name: Option<&str>) -> Result<u8> {
    let name = match name {
        Some(n) => n.to_string(),
        None => default_name(),
    };
    check_name(&name)?;
    // 0700: the folder holds the private key (and later queues and logs); like `mount`, an
    // existing folder keeps its mode.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state)
        .with_context(|| format!("cannot create the state folder {}", state.display()))?;
    let identity = Identity::create(state, &name)?;
    crate::print_stdout(&format!(
        "created the peer identity of {name:?} in {dir}\n  \
         private key: {key} (mode 0600; keep it here, never copy it to other servers)\n  \
         certificate: {cert}\n\
         this server's peer id (give it to the other servers, as `id` in their [[peers]]):\n\
         {id}\n",
        dir = state.display(),
        key = state.join(KEY_FILE).display(),
        cert = state.join(CERT_FILE).display(),
        id = identity.id,
    ))?;
    Ok(0)
}

/// `peerfs id --state DIR`.
pub fn id_command(state: &Path) -> Result<u8> {
    let identity = Identity::load(state)?;
    crate::print_stdout(&format!("{}\n", identity.id))?;
    Ok(0)
}

/// The host name, which is what most sites call their servers anyway.
fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "peerfs".to_string())
}

/// The same rule as the config's `name`: it ends up in log lines and conflict-copy names.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        bail!("--name must not be empty");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        bail!("--name {name:?} must not contain '/', '\\' or control characters");
    }
    Ok(())
}
