//! The real `stepmesh` binary run as an operator runs it, and the contract
//! of its refusals: an exit code and exactly one `stepmesh: ` line on
//! stderr (tests/exit_codes.rs, tests/identity_files.rs).

use std::path::Path;
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_stepmesh");

/// Runs `stepmesh ARGS` (with `env`, 20 s at most; no `STEPMESH_*` from the
/// caller's environment).
pub fn output<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    args: &[S],
    env: &[(&str, &str)],
) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("20").arg(BIN).args(args);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("STEPMESH_")) {
        cmd.env_remove(name);
    }
    cmd.env("RUST_LOG", "error")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// Runs `stepmesh ARGS` and returns (code, stderr).
pub fn run<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> (Option<i32>, String) {
    let out = output(args, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr)
}

/// Exit 64 with exactly one line on stderr, `stepmesh: ...needle...`.
pub fn assert_config_error<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], needle: &str) {
    let (code, stderr) = run(args);
    assert_one_line(code, &stderr, 64, &format!("{args:?}"), needle);
}

pub fn assert_one_line(code: Option<i32>, stderr: &str, want: i32, what: &str, needle: &str) {
    assert_eq!(code, Some(want), "{what}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{what}: not one line: {stderr}");
    assert!(stderr.starts_with("stepmesh: "), "{what}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{what}: {needle:?} not in {stderr}"
    );
}

pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}
