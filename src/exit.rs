//! Exit codes: 64 (`EX_USAGE`, as linkerd's proxy) when what the operator
//! gave a command is wrong — a flag value, a config, policy or identity
//! file — and 1 when a correctly configured run fails. clap's own usage
//! errors keep clap's code 2.

use std::fmt;

/// The configuration given to the command is unusable.
pub const CONFIG: u8 = 64;
/// The run failed (a port in use, a peer gone, an I/O error).
pub const FAILURE: u8 = 1;

/// An error the operator fixes by changing the command line or a file the
/// command reads at start: [`code`] turns it into exit 64.
#[derive(Debug)]
pub struct ConfigError(anyhow::Error);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The whole chain on one line; no `source()`, so `{:#}` above does
        // not print it twice.
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Marks an error as a configuration error (exit 64).
pub fn config(err: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(ConfigError(err.into()))
}

/// `.config_err()` on results: the error, marked as a configuration error.
pub trait ConfigResult<T> {
    /// Marks the error, if any, as a configuration error (exit 64).
    fn config_err(self) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> ConfigResult<T> for Result<T, E> {
    fn config_err(self) -> anyhow::Result<T> {
        self.map_err(config)
    }
}

/// The exit code for `err`: [`CONFIG`] when a configuration error is
/// anywhere in its chain (context may have been added above it), else
/// [`FAILURE`].
pub fn code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| e.is::<ConfigError>()) {
        CONFIG
    } else {
        FAILURE
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    #[test]
    fn config_errors_exit_64_even_under_context() {
        let plain = anyhow::anyhow!("bind: address in use");
        assert_eq!(code(&plain), FAILURE);
        let bad: anyhow::Result<()> = Err(std::io::Error::other("no such file")).config_err();
        let bad = bad.context("--policy p.yaml").unwrap_err();
        assert_eq!(code(&bad), CONFIG);
        assert_eq!(format!("{bad:#}"), "--policy p.yaml: no such file");
        let inner = config(anyhow::anyhow!("b").context("a"));
        assert_eq!(format!("{inner:#}"), "a: b");
    }
}
