//! Log lines carry ANSI colour only on a terminal: piped into a file or a
//! log collector they are plain, and `NO_COLOR` turns colour off on a
//! terminal too.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_stepmesh");
const ESC: &str = "\x1b[";

/// A proxy whose identity files never appear: it logs a warning while it
/// waits (`--wait-for-files`), then exits 64.
fn args() -> Vec<&'static str> {
    let mut args = common::PROXY_WITHOUT_FILES.to_vec();
    args.push("--wait-for-files=300ms");
    args
}

fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("STEPMESH_")) {
        cmd.env_remove(name);
    }
    cmd.env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null());
    cmd
}

#[test]
fn piped_stderr_gets_no_escape_codes() {
    let out = command("timeout")
        .arg("20")
        .arg(BIN)
        .args(args())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("waiting for --cert"), "{stderr}");
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(!stderr.contains(ESC), "{stderr:?}");
}

/// On a terminal (a pty from util-linux `script`, when installed) colour is
/// on, so the check above is not passing for want of any colour at all;
/// with `NO_COLOR=1` it is off.
#[test]
fn a_terminal_gets_colour_unless_no_color() {
    if Command::new("script").arg("--version").output().is_err() {
        println!("skipped: util-linux `script` (a pty for the colour check) is not installed");
        return;
    }
    let line = std::iter::once(BIN)
        .chain(args())
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let on_pty = |no_color: Option<&str>| {
        let mut cmd = command("timeout");
        cmd.args(["20", "script", "-qec", &line, "/dev/null"]);
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let out = cmd.output().unwrap();
        // `script` copies the terminal (the proxy's stderr) to its stdout.
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_pty(None);
    assert!(coloured.contains("waiting for --cert"), "{coloured:?}");
    assert!(coloured.contains(ESC), "{coloured:?}");
    let plain = on_pty(Some("1"));
    assert!(plain.contains("waiting for --cert"), "{plain:?}");
    assert!(!plain.contains(ESC), "{plain:?}");
}
