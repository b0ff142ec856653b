//! A peer's identity on the wire: the SHA-256 of its self-signed certificate, pinned in every
//! other peer's config (as Syncthing does).

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;
use sha2::{Digest, Sha256};

/// The SHA-256 of a peer's certificate (DER).
///
/// Written as 52 base32 characters in 13 dash-separated groups of 4 (`ABCD-EFGH-...`): no
/// characters that are easy to confuse in a terminal font, safe to double-click and paste.
/// Parsing accepts any case and ignores dashes and spaces.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct PeerId(pub [u8; 32]);

impl PeerId {
    /// The id of the peer whose certificate is `cert_der`.
    pub fn of_certificate(cert_der: &[u8]) -> PeerId {
        PeerId(Sha256::digest(cert_der).into())
    }

    /// The first group, for compact log lines.
    pub fn short(&self) -> String {
        self.to_string()[..4].to_string()
    }
}

/// Why a peer id string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a peer id (expected 52 base32 characters, optionally in dash-separated groups)")]
pub struct PeerIdError;

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b32 = BASE32_NOPAD.encode(&self.0);
        for (i, chunk) in b32.as_bytes().chunks(4).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            // base32 output is ASCII.
            f.write_str(std::str::from_utf8(chunk).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

impl FromStr for PeerId {
    type Err = PeerIdError;

    fn from_str(s: &str) -> Result<PeerId, PeerIdError> {
        let cleaned: String = s
            .chars()
            .filter(|c| *c != '-' && !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let bytes = BASE32_NOPAD
            .decode(cleaned.as_bytes())
            .map_err(|_| PeerIdError)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| PeerIdError)?;
        Ok(PeerId(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_round_trips_and_is_forgiving_on_input() {
        let id = PeerId::of_certificate(b"some certificate");
        let text = id.to_string();
        assert_eq!(text.len(), 52 + 12);
        assert_eq!(text.split('-').count(), 13);
        assert_eq!(text.parse::<PeerId>(), Ok(id));
        assert_eq!(text.to_lowercase().parse::<PeerId>(), Ok(id));
        assert_eq!(text.replace('-', "").parse::<PeerId>(), Ok(id));
        assert_eq!(
            format!(" {} ", text.replace('-', " ")).parse::<PeerId>(),
            Ok(id)
        );
    }

    #[test]
    fn garbage_is_refused() {
        for bad in ["", "ABCD", "!!!!-!!!!", &"A".repeat(60), &"A".repeat(51)] {
            assert_eq!(bad.parse::<PeerId>(), Err(PeerIdError), "{bad:?}");
        }
    }
}
