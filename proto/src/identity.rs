//! This peer's identity on disk: owns `STATE/peer.key` and `STATE/peer.crt` — creating them
//! once (`peerfs init`), loading them with their permissions checked, and the [`PeerId`] they
//! give. The TLS configs built from an identity live in [`crate::tls`].
//!
//! The key is an ECDSA P-256 key in PKCS#8, the certificate self-signed; both files are PEM. A
//! peer's id is the SHA-256 of its certificate, so the certificate must never be regenerated:
//! `create` refuses to touch an existing identity.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::PeerId;

/// The private key's file name inside the state folder.
pub const KEY_FILE: &str = "peer.key";
/// The certificate's file name inside the state folder.
pub const CERT_FILE: &str = "peer.crt";

/// The subject alternative name of every peerfs certificate. Peers are pinned by id, not by
/// name, so this only has to be a well-formed DNS name that TLS clients can ask for.
pub const CERT_SERVER_NAME: &str = "peerfs";

/// A peer's certificate and private key, and the id they give it.
#[derive(Clone)]
pub struct Identity {
    /// The self-signed certificate (DER).
    pub cert_der: Vec<u8>,
    /// The private key (PKCS#8 DER). Never logged: [`Identity`]'s `Debug` omits it.
    pub key_der: Vec<u8>,
    /// SHA-256 of `cert_der`.
    pub id: PeerId,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why an identity could not be created or loaded. Messages say what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "{dir} already holds a peer identity ({KEY_FILE}); refusing to replace it, because its \
         peer id is pinned by the other servers (remove {KEY_FILE} and {CERT_FILE} yourself to \
         start over with a new id)"
    )]
    AlreadyExists { dir: PathBuf },
    #[error("no peer identity in {dir} ({missing} is missing): run `peerfs init --state {dir}`")]
    Missing { dir: PathBuf, missing: PathBuf },
    #[error(
        "incomplete peer identity in {dir}: {missing} is missing; restore it from a backup, or \
         remove {KEY_FILE} and run `peerfs init --state {dir}` for a new peer id"
    )]
    MissingCert { dir: PathBuf, missing: PathBuf },
    #[error(
        "key file {path} is readable by group or others (mode {mode:04o}): run chmod 600 {path}"
    )]
    LooseKeyMode { path: PathBuf, mode: u32 },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot generate a key and certificate: {0}")]
    Generate(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Identity {
    /// Generates a new key and self-signed certificate named `name` and stores them in
    /// `state_dir` (which must exist). Refuses if an identity is already there.
    ///
    /// Both files are written under temporary names with their final modes and fsynced; then
    /// the key is hard-linked into place (`link` never replaces a file, so of two concurrent
    /// `init`s exactly one wins) and the certificate renamed after it. A certificate without a
    /// key is the leftover of an interrupted create and is replaced; a crash between the two
    /// steps leaves a key without certificate, which `load` reports.
    pub fn create(state_dir: &Path, name: &str) -> Result<Identity, IdentityError> {
        let key_path = state_dir.join(KEY_FILE);
        let cert_path = state_dir.join(CERT_FILE);
        match std::fs::metadata(state_dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(IdentityError::Io {
                    path: state_dir.to_path_buf(),
                    source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
                });
            }
            Err(e) => return Err(io_err(state_dir)(e)),
        }
        if key_path.symlink_metadata().is_ok() {
            return Err(IdentityError::AlreadyExists {
                dir: state_dir.to_path_buf(),
            });
        }

        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Generate(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![CERT_SERVER_NAME.to_string()])
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, name);
        params.distinguished_name = dn;
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;

        // Unique temporary names: the pid separates concurrent processes.
        let tmp_key = state_dir.join(format!(".{KEY_FILE}.tmp-{}", std::process::id()));
        let tmp_cert = state_dir.join(format!(".{CERT_FILE}.tmp-{}", std::process::id()));
        let result = (|| {
            // 0600 at creation: the key is never readable by others, not even for a moment
            // (the umask can only remove bits). O_EXCL: never write through a planted file or
            // symlink.
            write_new(&tmp_key, 0o600, key.serialize_pem().as_bytes())?;
            write_new(&tmp_cert, 0o644, cert.pem().as_bytes())?;
            match std::fs::hard_link(&tmp_key, &key_path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    Err(IdentityError::AlreadyExists {
                        dir: state_dir.to_path_buf(),
                    })
                }
                Err(e) => Err(io_err(&key_path)(e)),
            }?;
            // The key is ours now; a certificate already there is a leftover of an
            // interrupted create (nobody else gets past the link above).
            std::fs::rename(&tmp_cert, &cert_path).map_err(io_err(&cert_path))?;
            // Make the new names durable, not only the contents.
            File::open(state_dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(state_dir))
        })();
        let _ = std::fs::remove_file(&tmp_key);
        let _ = std::fs::remove_file(&tmp_cert);
        result?;

        Ok(Identity {
            id: PeerId::of_certificate(cert.der()),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    /// Loads the identity stored in `state_dir`, refusing a key file that group or others may
    /// read and a key that does not belong to the certificate.
    pub fn load(state_dir: &Path) -> Result<Identity, IdentityError> {
        let key_path = state_dir.join(KEY_FILE);
        let cert_path = state_dir.join(CERT_FILE);

        // Check the mode of the file actually opened (fstat), not of whatever the name pointed
        // to a moment earlier.
        let mut key_file = match File::open(&key_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(IdentityError::Missing {
                    dir: state_dir.to_path_buf(),
                    missing: key_path,
                });
            }
            Err(e) => return Err(io_err(&key_path)(e)),
        };
        let mode = key_file.metadata().map_err(io_err(&key_path))?.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::LooseKeyMode {
                path: key_path,
                mode,
            });
        }
        let mut key_pem = Vec::new();
        key_file
            .read_to_end(&mut key_pem)
            .map_err(io_err(&key_path))?;
        let cert_pem = match std::fs::read(&cert_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(IdentityError::MissingCert {
                    dir: state_dir.to_path_buf(),
                    missing: cert_path,
                });
            }
            Err(e) => return Err(io_err(&cert_path)(e)),
        };

        let key =
            PrivatePkcs8KeyDer::from_pem_slice(&key_pem).map_err(|e| IdentityError::Invalid {
                path: key_path.clone(),
                reason: format!("not a PEM PKCS#8 private key ({e})"),
            })?;
        let cert =
            CertificateDer::from_pem_slice(&cert_pem).map_err(|e| IdentityError::Invalid {
                path: cert_path.clone(),
                reason: format!("not a PEM certificate ({e})"),
            })?;
        let identity = Identity {
            id: PeerId::of_certificate(&cert),
            cert_der: cert.to_vec(),
            key_der: key.secret_pkcs8_der().to_vec(),
        };
        identity
            .check_key_matches()
            .map_err(|reason| IdentityError::Invalid {
                path: key_path,
                reason: format!("{reason} (does it belong to {}?)", cert_path.display()),
            })?;
        Ok(identity)
    }

    /// The certificate in the form rustls takes.
    pub fn cert(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    /// The private key in the form rustls takes.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Errs unless the key parses and its public half is the certificate's.
    fn check_key_matches(&self) -> Result<(), String> {
        let provider = crate::tls::provider();
        // from_der parses the key and compares its public half with the certificate's.
        match rustls::sign::CertifiedKey::from_der(vec![self.cert()], self.key(), &provider) {
            Ok(_) => Ok(()),
            Err(rustls::Error::InconsistentKeys(_)) => {
                Err("private key does not match the certificate".to_string())
            }
            Err(e) => Err(format!("unusable private key: {e}")),
        }
    }
}

/// Creates `path` (which must not exist) with `mode`, writes `data` and fsyncs it.
fn write_new(path: &Path, mode: u32, data: &[u8]) -> Result<(), IdentityError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_then_load_gives_the_same_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let made = Identity::create(dir.path(), "office-a").expect("create");
        assert_eq!(made.id, PeerId::of_certificate(&made.cert_der));
        let loaded = Identity::load(dir.path()).expect("load");
        assert_eq!(loaded.id, made.id);
        assert_eq!(loaded.cert_der, made.cert_der);
        assert_eq!(loaded.key_der, made.key_der);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .expect("stat key")
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(
            !format!("{made:?}").contains("key_der"),
            "Debug hides the key"
        );
    }

    #[test]
    fn two_identities_differ() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let ia = Identity::create(a.path(), "x").expect("create a");
        let ib = Identity::create(b.path(), "x").expect("create b");
        assert_ne!(ia.id, ib.id);
    }

    #[test]
    fn create_refuses_to_replace_an_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Identity::create(dir.path(), "a").expect("create");
        let err = Identity::create(dir.path(), "a").expect_err("second create");
        assert!(matches!(err, IdentityError::AlreadyExists { .. }), "{err}");
        assert!(err.to_string().contains("refusing to replace"), "{err}");
        assert_eq!(Identity::load(dir.path()).expect("load").id, first.id);
    }

    #[test]
    fn a_certificate_without_key_is_an_interrupted_create_and_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(CERT_FILE), "leftover").expect("write");
        let made = Identity::create(dir.path(), "a").expect("create");
        assert_eq!(Identity::load(dir.path()).expect("load").id, made.id);
    }

    #[test]
    fn loose_key_mode_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        Identity::create(dir.path(), "a").expect("create");
        let key = dir.path().join(KEY_FILE);
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let err = Identity::load(dir.path()).expect_err("loose mode");
            let text = err.to_string();
            let want = format!(
                "key file {} is readable by group or others (mode {mode:04o}): run chmod 600 {}",
                key.display(),
                key.display()
            );
            assert_eq!(text, want);
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).expect("chmod");
        Identity::load(dir.path()).expect("0400 is fine");
    }

    #[test]
    fn missing_files_say_how_to_create_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Identity::load(dir.path()).expect_err("empty dir");
        let text = err.to_string();
        assert!(text.contains("peerfs init --state"), "{text}");
        assert!(text.contains(KEY_FILE), "{text}");

        Identity::create(dir.path(), "a").expect("create");
        std::fs::remove_file(dir.path().join(CERT_FILE)).expect("rm cert");
        let text = Identity::load(dir.path()).expect_err("no cert").to_string();
        assert!(
            text.contains(CERT_FILE) && text.contains("peerfs init"),
            "{text}"
        );
    }

    #[test]
    fn create_in_a_missing_folder_fails_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Identity::create(&dir.path().join("nope"), "a").expect_err("missing dir");
        assert!(matches!(err, IdentityError::Io { .. }), "{err}");
    }

    #[test]
    fn garbage_or_mismatched_files_are_refused() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        Identity::create(a.path(), "a").expect("create a");
        Identity::create(b.path(), "b").expect("create b");
        // b's certificate with a's key.
        std::fs::copy(b.path().join(CERT_FILE), a.path().join(CERT_FILE)).expect("copy");
        let text = Identity::load(a.path()).expect_err("mismatch").to_string();
        assert!(text.contains("does not match"), "{text}");

        std::fs::write(b.path().join(CERT_FILE), "not pem").expect("write");
        let text = Identity::load(b.path()).expect_err("garbage").to_string();
        assert!(text.contains("not a PEM certificate"), "{text}");
    }
}
