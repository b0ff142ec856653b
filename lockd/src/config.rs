//! Lock configuration: the timers and the unreachable-peer policy, with their defaults.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Default [`LockConfig::linger`]: long enough to cover an office suite's close-then-reopen
/// around a save (milliseconds in practice), short enough that another office is not kept out
/// noticeably after the user really closed the document.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(1);
/// Default [`LockConfig::grace`]: how long a disconnected peer's locks and requests outlive its
/// connection, so that a short network hiccup does not hand its documents to another office.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// Largest accepted [`LockConfig::grace`]. A dead peer's locks keep every other office out of
/// its documents for that long; beyond this, users would wait on a peer that is gone.
pub const MAX_GRACE: Duration = Duration::from_secs(15);
/// Largest accepted [`LockConfig::linger`]: a lock nobody uses keeps other offices out for
/// this long at most.
pub const MAX_LINGER: Duration = Duration::from_secs(60);
/// Largest accepted [`LockConfig::request_timeout`]: a process blocked in open(2) cannot be
/// interrupted while it waits (see [`DEFAULT_REQUEST_TIMEOUT`]).
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`LockConfig::request_timeout`]: a write-open waits at most this long for the peers'
/// answers. fuser does not pass FUSE_INTERRUPT on, so nothing else would bound the wait of a
/// process blocked in open(2) (see DESIGN.md, "Don't block the kernel's workers").
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);

/// What a lock request does about a peer it cannot hear from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Policy {
    /// A peer that is not connected when the request starts, disconnects before answering, or
    /// does not answer within the request timeout is left out: the lock is taken from the
    /// peers that can be reached (edits on both sides are reconciled later). The default,
    /// because an office must keep working when another office's line is down.
    #[default]
    Available,
    /// Such a peer fails the request with [`crate::LockError::Unreachable`] (`ETXTBSY`): no
    /// write-open anywhere unless every known peer agreed.
    Strict,
}

/// Why a policy name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown lock policy {0:?} (expected \"available\" or \"strict\")")]
pub struct PolicyParseError(pub String);

impl FromStr for Policy {
    type Err = PolicyParseError;
    fn from_str(s: &str) -> Result<Policy, PolicyParseError> {
        match s {
            "available" => Ok(Policy::Available),
            "strict" => Ok(Policy::Strict),
            other => Err(PolicyParseError(other.to_string())),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Available => "available",
            Policy::Strict => "strict",
        })
    }
}

/// Timers and policy of the lock protocol. Every timer is configurable so tests run with short
/// ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockConfig {
    /// How long a lock stays ours after its last local handle is released (default
    /// [`DEFAULT_LINGER`], 1 s; zero releases at once; at most [`MAX_LINGER`], 60 s). Other peers are denied meanwhile and a
    /// new local acquire revives it without asking anyone.
    pub linger: Duration,
    /// How long a disconnected peer's locks and outstanding grants are still honoured (default
    /// [`DEFAULT_GRACE`], 10 s; at most [`MAX_GRACE`], 15 s).
    pub grace: Duration,
    /// Hard limit on one lock round trip (default [`DEFAULT_REQUEST_TIMEOUT`], 1.5 s; more
    /// than zero, at most [`MAX_REQUEST_TIMEOUT`], 30 s); peers that have not answered by then
    /// are treated by `policy`. Mutual exclusion between two connected peers assumes their
    /// messages arrive within half of it (see the crate documentation).
    pub request_timeout: Duration,
    /// Unreachable-peer policy (default [`Policy::Available`]).
    pub policy: Policy,
}

impl Default for LockConfig {
    fn default() -> LockConfig {
        LockConfig {
            linger: DEFAULT_LINGER,
            grace: DEFAULT_GRACE,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            policy: Policy::Available,
        }
    }
}

/// Why a [`LockConfig`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LockConfigError {
    #[error("lock grace period {0:?} is longer than the maximum of 15 s")]
    GraceTooLong(Duration),
    #[error("lock request timeout must be longer than zero")]
    ZeroRequestTimeout,
    #[error("lock request timeout {0:?} is longer than the maximum of 30 s")]
    RequestTimeoutTooLong(Duration),
    #[error("lock linger {0:?} is longer than the maximum of 60 s")]
    LingerTooLong(Duration),
}

impl LockConfig {
    /// Checks the bounds a config loader should report to the user. ([`crate::LockCore::new`]
    /// does not fail: it brings out-of-range values to the nearest bound, the zero timeout to
    /// 1 ms.)
    pub fn validate(&self) -> Result<(), LockConfigError> {
        if self.grace > MAX_GRACE {
            return Err(LockConfigError::GraceTooLong(self.grace));
        }
        if self.request_timeout.is_zero() {
            return Err(LockConfigError::ZeroRequestTimeout);
        }
        if self.request_timeout > MAX_REQUEST_TIMEOUT {
            return Err(LockConfigError::RequestTimeoutTooLong(self.request_timeout));
        }
        if self.linger > MAX_LINGER {
            return Err(LockConfigError::LingerTooLong(self.linger));
        }
        Ok(())
    }

    /// The config with out-of-range values brought into range (also what keeps `Instant +
    /// Duration` from overflowing in the core).
    pub(crate) fn clamped(mut self) -> LockConfig {
        self.grace = self.grace.min(MAX_GRACE);
        self.request_timeout = self
            .request_timeout
            .clamp(Duration::from_millis(1), MAX_REQUEST_TIMEOUT);
        self.linger = self.linger.min(MAX_LINGER);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = LockConfig::default();
        assert_eq!(c.linger, Duration::from_secs(1));
        assert_eq!(c.grace, Duration::from_secs(10));
        assert_eq!(c.request_timeout, Duration::from_millis(1500));
        assert_eq!(c.policy, Policy::Available);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn out_of_range_values_are_reported_and_clamped() {
        let c = LockConfig {
            grace: Duration::from_secs(16),
            ..LockConfig::default()
        };
        assert_eq!(
            c.validate(),
            Err(LockConfigError::GraceTooLong(Duration::from_secs(16)))
        );
        assert_eq!(c.clamped().grace, MAX_GRACE);
        let z = LockConfig {
            request_timeout: Duration::ZERO,
            ..LockConfig::default()
        };
        assert_eq!(z.validate(), Err(LockConfigError::ZeroRequestTimeout));
        assert_eq!(z.clamped().request_timeout, Duration::from_millis(1));
        let huge = LockConfig {
            linger: Duration::MAX,
            request_timeout: Duration::MAX,
            grace: Duration::MAX,
            ..LockConfig::default()
        };
        assert!(huge.validate().is_err());
        let c = huge.clamped();
        assert_eq!(
            (c.linger, c.request_timeout, c.grace),
            (MAX_LINGER, MAX_REQUEST_TIMEOUT, MAX_GRACE)
        );
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [Policy::Available, Policy::Strict] {
            assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
        }
        assert!("Strict!".parse::<Policy>().is_err());
    }
}
