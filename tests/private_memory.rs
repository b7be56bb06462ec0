//! The sidecar's memory stays its own (src/app.rs, `keep_memory_private`):
//! another process running as the sidecar's UID, as a container of a pod
//! that shares its process namespace could after a `setuid`, cannot read
//! the sidecar's memory or environment through /proc.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::mesh::*;
use common::netns::runnable_by;

/// The injector's `proxyUid`.
const PROXY_UID: u32 = 1337;

/// `setpriv` as `PROXY_UID`, the wrapper a process of another container
/// running as the sidecar's UID stands for.
fn as_proxy_uid() -> Vec<String> {
    let id = PROXY_UID.to_string();
    [
        "setpriv",
        "--reuid",
        &id,
        "--regid",
        &id,
        "--clear-groups",
        "--",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// `program` run as `PROXY_UID`.
fn command_as_proxy_uid(program: &str) -> Command {
    let wrapper = as_proxy_uid();
    let mut cmd = Command::new(&wrapper[0]);
    cmd.args(&wrapper[1..]).arg(program);
    cmd
}

/// `cat PATH` as `PROXY_UID`: its output, or its error message.
fn read_as_proxy_uid(path: &str) -> Result<Vec<u8>, String> {
    let out = command_as_proxy_uid("cat")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn a_process_running_as_the_sidecars_uid_cannot_read_its_memory() {
    if !rustix::process::geteuid().is_root() {
        println!("skipped: running the sidecar as UID {PROXY_UID} needs root");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        println!("skipped: no setpriv (util-linux) to run processes as UID {PROXY_UID}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pki = stepmesh_ca::testing::Pki::new("mesh.test");
    let files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
    for file in [&files.cert, &files.key, &files.bundle] {
        std::os::unix::fs::chown(file, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    }
    let bin = runnable_by(
        PROXY_UID,
        Path::new(env!("CARGO_BIN_EXE_stepmesh")),
        dir.path(),
    );
    let mut args = files.args();
    args.extend(["--inbound".into(), "127.0.0.1:0=127.0.0.1:1".into()]);
    let sidecar = Sidecar::spawn_bin(&bin, &as_proxy_uid(), None, &args);
    sidecar.wait_ready();
    let pid = sidecar.pid();
    assert_eq!(
        common::ca::proc_status(pid, "Uid:"),
        u64::from(PROXY_UID),
        "the sidecar runs as the proxy UID"
    );

    // The control: a process of that UID that did not opt out is readable
    // by another of the same UID (no LSM in the way on this machine).
    let mut plain = command_as_proxy_uid("sleep").arg("60").spawn().unwrap();
    // Until setpriv has exec'd it, the process is root's.
    let comm = format!("/proc/{}/comm", plain.id());
    common::mesh::eventually("sleep running as the proxy UID", || {
        (std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep")).then_some(())
    });
    let environ = read_as_proxy_uid(&format!("/proc/{}/environ", plain.id()));
    plain.kill().unwrap();
    plain.wait().unwrap();
    assert!(
        environ.is_ok(),
        "the control failed: another process of UID {PROXY_UID} could not read a plain one's environment: {environ:?}"
    );

    // `environ` and `maps` need read access, which only the flag takes
    // away; `mem` needs attach access, which Yama (ptrace_scope 1) also
    // refuses a non-ancestor, so on such a machine it alone proves nothing.
    for file in ["environ", "mem", "maps"] {
        match read_as_proxy_uid(&format!("/proc/{pid}/{file}")) {
            Ok(_) => panic!("/proc/PID/{file} of the sidecar was readable by UID {PROXY_UID}"),
            Err(refusal) => assert!(refusal.contains("Permission denied"), "{file}: {refusal}"),
        }
    }
    // The sidecar itself still serves (its admin port answered /ready) and
    // reads what it needs.
    assert!(sidecar.metrics().contains("stepmesh_"));
}
