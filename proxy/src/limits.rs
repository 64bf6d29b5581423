//! The client connection cap (`proxy.max_connections`), fitted at start to the open-file
//! limit the process runs under: raised up to the hard limit when the cap needs it, refused
//! when an explicit cap cannot fit.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// The cap when `proxy.max_connections` is not set.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Files kept for everything but client and backend connections: listeners, the admin API,
/// health checks, the route file watch, logs.
const RESERVED_FILES: u64 = 256;

/// Open files a cap needs: each client connection may hold a backend connection too.
pub fn files_needed(connections: usize) -> u64 {
    2 * connections as u64 + RESERVED_FILES
}

/// The cap to enforce and the soft file limit it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fit {
    pub max_connections: usize,
    /// The soft open-file limit to run with (the current one when it suffices).
    pub soft_limit: u64,
    /// The default cap was lowered to what the hard limit allows.
    pub lowered: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("proxy.max_connections must be at least 1")]
    Zero,
    #[error(
        "proxy.max_connections = {max_connections} needs about {needed} open files (a client \
         and a backend connection each, plus {RESERVED_FILES}), but the hard file limit is \
         {hard}: raise it (systemd LimitNOFILE=, ulimit -Hn, the container's nofile) or lower \
         proxy.max_connections"
    )]
    TooFewFiles { max_connections: usize, needed: u64, hard: u64 },
    #[error("the open-file limit ({hard}) leaves no room for client connections")]
    NoRoom { hard: u64 },
    #[error("cannot read or raise the open-file limit")]
    Rlimit(#[source] nix::Error),
}

/// Decides the cap for `setting` under the soft and hard open-file limits.
pub fn fit(setting: Option<usize>, soft: u64, hard: u64) -> Result<Fit, LimitError> {
    let wanted = setting.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if wanted == 0 {
        return Err(LimitError::Zero);
    }
    let needed = files_needed(wanted);
    if needed <= soft {
        return Ok(Fit { max_connections: wanted, soft_limit: soft, lowered: false });
    }
    if needed <= hard {
        return Ok(Fit { max_connections: wanted, soft_limit: needed, lowered: false });
    }
    if setting.is_some() {
        return Err(LimitError::TooFewFiles { max_connections: wanted, needed, hard });
    }
    let room = hard.saturating_sub(RESERVED_FILES) / 2;
    match usize::try_from(room) {
        Ok(max_connections) if max_connections > 0 => {
            Ok(Fit { max_connections, soft_limit: hard, lowered: true })
        }
        _ => Err(LimitError::NoRoom { hard }),
    }
}

/// Fits `setting` to this process's open-file limit, raising the soft limit if needed.
pub fn apply(setting: Option<usize>) -> Result<Fit, LimitError> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(LimitError::Rlimit)?;
    let fit = fit(setting, soft, hard)?;
    if fit.soft_limit != soft {
        setrlimit(Resource::RLIMIT_NOFILE, fit.soft_limit, hard).map_err(LimitError::Rlimit)?;
    }
    if fit.lowered {
        tracing::warn!(
            max_connections = fit.max_connections,
            hard_file_limit = hard,
            "the open-file limit is too low for {DEFAULT_MAX_CONNECTIONS} client connections; \
             capped lower (raise LimitNOFILE= or set proxy.max_connections)"
        );
    }
    Ok(fit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_within_the_soft_limit_changes_nothing() {
        let fit = fit(Some(100), 1024, 4096).expect("fits");
        assert_eq!(fit, Fit { max_connections: 100, soft_limit: 1024, lowered: false });
    }

    #[test]
    fn the_soft_limit_is_raised_only_as_far_as_needed() {
        let fit = fit(None, 1024, 524_288).expect("fits");
        assert_eq!(fit.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(fit.soft_limit, files_needed(DEFAULT_MAX_CONNECTIONS));
    }

    #[test]
    fn an_explicit_cap_beyond_the_hard_limit_is_refused_with_the_numbers() {
        let err = fit(Some(5000), 1024, 4096).expect_err("refused");
        assert_eq!(
            err,
            LimitError::TooFewFiles { max_connections: 5000, needed: 10_256, hard: 4096 }
        );
        let message = err.to_string();
        assert!(message.contains("10256") && message.contains("4096"), "{message}");
    }

    #[test]
    fn the_default_cap_is_lowered_to_what_the_hard_limit_allows() {
        let fit = fit(None, 1024, 1024).expect("fits");
        assert_eq!(fit, Fit { max_connections: 384, soft_limit: 1024, lowered: true });
        assert_eq!(super::fit(None, 200, 200), Err(LimitError::NoRoom { hard: 200 }));
    }

    #[test]
    fn zero_is_refused() {
        assert_eq!(fit(Some(0), 1024, 1024), Err(LimitError::Zero));
    }

    #[test]
    fn an_unlimited_hard_limit_is_enough() {
        let fit = fit(Some(1_000_000), 1024, u64::MAX).expect("fits");
        assert_eq!(fit.soft_limit, files_needed(1_000_000));
    }
}
