//! Exit codes: 64 (`EX_USAGE`, as linkerd's proxy) when what the operator
//! gave a command is wrong — the command line (an unknown flag, a missing
//! argument, a value that does not parse), a config, policy or identity
//! file — and 1 when a correctly configured run fails; 0 for `--help` and
//! `--version`. Every error is one line on stderr, `stepmesh: <reason>`.

use std::fmt;
use std::process::ExitCode;

use clap::error::ErrorKind;

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

/// What `main` does with the outcome of a run: 0, or the error on one line
/// (the whole cause chain: what an operator reads at 3 a.m.) and [`code`].
/// Shared by `stepmesh` and `stepmesh-proxy`.
pub fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stepmesh: {err:#}");
            ExitCode::from(code(&err))
        }
    }
}

/// What `main` does with a command line clap refused: `--help` and
/// `--version` print to stdout and exit 0; any other error — a value a
/// value parser rejects, an unknown flag, a missing argument, including
/// from a `STEPMESH_*` variable — prints [`command_line_reason`] on one
/// line and exits [`CONFIG`]. A command run without its subcommand prints
/// its help to stderr, as clap does, and exits [`CONFIG`] too.
pub fn command_line(err: &clap::Error) -> ExitCode {
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // stdout is gone (a closed pipe): nothing better to do.
            let _ = err.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            ExitCode::from(CONFIG)
        }
        _ => {
            eprintln!("stepmesh: {}", command_line_reason(err));
            ExitCode::from(CONFIG)
        }
    }
}

/// clap's message on one line: its `error:` line, then the details clap
/// puts on the lines below (the missing arguments, `[possible values: …]`,
/// `tip: …`), without the usage and `--help` hints.
pub fn command_line_reason(err: &clap::Error) -> String {
    // `StyledStr`'s `Display` drops the colours.
    let text = err.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let head = lines.next().unwrap_or("invalid command line");
    let head = head.strip_prefix("error: ").unwrap_or(head);
    let details: Vec<&str> = lines
        .take_while(|l| !l.starts_with("Usage:"))
        .filter(|l| !l.starts_with("For more information"))
        // "[possible values: a, b]" reads better in the parentheses below
        .map(|l| {
            l.strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
                .unwrap_or(l)
        })
        .collect();
    match (details.is_empty(), head.strip_suffix(':')) {
        (true, _) => head.to_owned(),
        // "the following required arguments were not provided:" + a list
        (false, Some(head)) => format!("{head}: {}", details.join(", ")),
        (false, None) => format!("{head} ({})", details.join("; ")),
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

    fn reason(args: &[&str]) -> String {
        use clap::Parser as _;
        let err = crate::cli::Cli::try_parse_from(args).unwrap_err();
        command_line_reason(&err)
    }

    #[test]
    fn command_line_errors_are_one_line() {
        let line = reason(&["stepmesh", "proxy", "--drain-timeout", "xyz"]);
        assert!(
            line.starts_with("invalid value 'xyz' for '--drain-timeout <DURATION>': "),
            "{line}"
        );
        let line = reason(&["stepmesh", "--log-format", "x", "proxy"]);
        assert_eq!(
            line,
            "invalid value 'x' for '--log-format <LOG_FORMAT>' (possible values: plain, json)"
        );
        let line = reason(&["stepmesh", "ca", "serve"]);
        assert_eq!(
            line,
            "the following required arguments were not provided: --state-dir <STATE_DIR>"
        );
        let line = reason(&["stepmesh", "inject", "serve", "--timeout", "1s"]);
        assert!(
            line.starts_with("unexpected argument '--timeout' found ("),
            "{line}"
        );
        assert!(line.contains("'--body-timeout'"), "{line}");
        for args in [
            &["stepmesh", "proxy", "--inbound", "nonsense"][..],
            &["stepmesh", "frob"],
            &[
                "stepmesh", "policy", "explain", "p.yaml", "--from", "x", "--port", "x",
            ],
        ] {
            let line = reason(args);
            assert!(
                !line.contains('\n') && !line.is_empty(),
                "{args:?}: {line:?}"
            );
        }
    }
}
