//! The SPIFFE Workload API on `--workload-api`, against a foreign client:
//! py-spiffe (the `spiffe` package, unchanged) fetches the X.509-SVID and
//! bundle through the sidecar's socket, opens mTLS with them to another
//! sidecar, and sees a rotation arrive on its stream; gets JWT-SVIDs that
//! validate for their audience only and not once expired; calls without the
//! security header or from a UID not listed are refused.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::ca::CaProcess;
use common::mesh::*;
use serde_json::Value;
use stepmesh_ca::testing::Pki;

const TD: &str = "mesh.test";
const CALLS: &str = r#"stepmesh_workload_api_calls_total{method="FetchX509SVID"}"#;

/// Whether python3 with py-spiffe is here; says why not on stdout.
fn py_spiffe() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import spiffe, grpc, grpc_tools, cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("skipping: python3 with py-spiffe is not installed (pip install -r tests/python/requirements.txt)");
    }
    ok
}

/// Runs `workload_client.py ARGS` with `SPIFFE_ENDPOINT_SOCKET` at `socket`;
/// its JSON lines.
fn client(socket: &Path, args: &[&str]) -> (Output, Vec<Value>) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/workload_client.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (out, lines)
}

fn one(out: &Output, lines: &[Value]) -> Value {
    assert!(
        out.status.success() && lines.len() == 1,
        "python client failed ({}): stdout {lines:?}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    lines[0].clone()
}

/// The app's sidecar: an SVID for CLIENT_ID from `ca`, the Workload API on
/// `dir/workload.sock`, an inbound listener (a sidecar needs one).
fn app_sidecar(ca: &CaProcess, dir: &Path, ttl: &str, extra: &[&str]) -> (Sidecar, PathBuf) {
    let socket = dir.join("workload.sock");
    let mut args = ca.enrol_args(dir, "client-token", Some(ttl));
    args.extend(["--inbound".into(), format!("127.0.0.1:0={}", echo_server())]);
    args.extend(["--workload-api".into(), socket.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let sidecar = Sidecar::spawn(&args);
    sidecar.wait_ready();
    (sidecar, socket)
}

fn start_ca() -> CaProcess {
    CaProcess::start(
        TD,
        &[("server-token", SERVER_ID), ("client-token", CLIENT_ID)],
    )
}

/// A sidecar with SVID files (no CA) serving the Workload API with `extra`.
fn files_sidecar(dir: &Path, extra: &[&str]) -> (Sidecar, PathBuf) {
    let pki = Pki::new(TD);
    let files = SvidFiles::write(dir, "app", &pki, &pki.leaf(CLIENT_ID));
    let socket = dir.join("workload.sock");
    let mut args = files.args();
    args.extend(["--inbound".into(), format!("127.0.0.1:0={}", echo_server())]);
    args.extend(["--workload-api".into(), socket.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let sidecar = Sidecar::spawn(&args);
    sidecar.wait_ready();
    (sidecar, socket)
}

fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

#[test]
fn the_proto_is_upstreams_field_for_field() {
    if !py_spiffe() {
        return;
    }
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/spiffe/workload.proto");
    let (out, lines) = client(Path::new("/nonexistent"), &["protocheck", proto]);
    let got = one(&out, &lines);
    assert_eq!(
        got["same"], true,
        "differs from py-spiffe's descriptor: {got}"
    );
    assert_eq!(got["package"], "", "no package: /SpiffeWorkloadAPI/...");
    assert_eq!(got["methods"], 5);
}

#[test]
fn py_spiffe_gets_the_svid_and_bundle_and_another_sidecar_accepts_it() {
    if !py_spiffe() {
        return;
    }
    let ca = start_ca();
    let dir = tempfile::tempdir().unwrap();
    let (app, socket) = app_sidecar(&ca, dir.path(), "1h", &[]);
    let mut args = ca.enrol_args(dir.path(), "server-token", Some("1h"));
    args.extend(["--inbound".into(), format!("127.0.0.1:0={}", echo_server())]);
    let server = Sidecar::spawn(&args);
    let inbound = server.listener("inbound");
    server.wait_ready();

    let (out, lines) = client(&socket, &["fetch", &inbound.to_string()]);
    let got = one(&out, &lines);
    assert_eq!(got["spiffe_id"], CLIENT_ID);
    assert_eq!(
        got["serial"],
        app.config()["serial"],
        "the sidecar's own SVID"
    );
    assert_eq!(got["bundle_trust_domains"], serde_json::json!([TD]));
    assert_eq!(got["peer"], serde_json::json!([SERVER_ID]));
    assert_eq!(got["echoed"], "hello from py-spiffe\n");
    assert_eq!(got["tls"], "TLSv1.3");
    let line = server.wait_access("the app's connection", |l| {
        l["peer_id"] == CLIENT_ID && l["direction"] == "inbound"
    });
    assert_eq!(line["peer_id"], CLIENT_ID, "{line}");
    // fetch_x509_svid and fetch_x509_bundles: one call each.
    assert_eq!(app.metric(CALLS), 1.0);
    assert_eq!(
        app.metric(r#"stepmesh_workload_api_calls_total{method="FetchX509Bundles"}"#),
        1.0
    );
}

#[test]
fn a_rotation_arrives_on_the_open_stream() {
    if !py_spiffe() {
        return;
    }
    let ca = start_ca();
    let dir = tempfile::tempdir().unwrap();
    // A 4 s SVID is renewed about every 2 s.
    let (app, socket) = app_sidecar(&ca, dir.path(), "4s", &[]);
    let started = std::time::Instant::now();
    let (out, lines) = client(&socket, &["watch", "2", "30"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let updates: Vec<&Value> = lines.iter().filter(|l| l.get("update").is_some()).collect();
    assert!(
        lines.iter().all(|l| l.get("error").is_none()) && updates.len() == 2,
        "two updates and no stream end: {lines:?}"
    );
    assert_eq!(updates[0]["spiffe_id"], CLIENT_ID);
    assert_eq!(updates[1]["spiffe_id"], CLIENT_ID);
    assert_ne!(updates[0]["serial"], updates[1]["serial"], "a new SVID");
    assert!(started.elapsed().as_secs() < 30);
    // One call: the second SVID came on the first stream.
    assert_eq!(app.metric(CALLS), 1.0);
}

#[test]
fn a_call_without_the_security_header_is_invalid_argument() {
    if !py_spiffe() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (sidecar, socket) = files_sidecar(dir.path(), &[]);
    let (out, lines) = client(&socket, &["raw", "no"]);
    let got = one(&out, &lines);
    assert_eq!(got["code"], "INVALID_ARGUMENT");
    assert!(
        !got.to_string().contains("spiffe://"),
        "nothing leaks: {got}"
    );
    assert_eq!(
        sidecar.metric(r#"stepmesh_workload_api_refused_total{reason="no_header"}"#),
        1.0
    );
    assert_eq!(sidecar.metric(CALLS), 0.0, "the method never ran");

    let (out, lines) = client(&socket, &["raw", "yes"]);
    let got = one(&out, &lines);
    assert_eq!(got["code"], "OK");
    assert_eq!(got["svids"], 1);
}

#[test]
fn a_uid_not_listed_is_permission_denied() {
    if !py_spiffe() {
        return;
    }
    let other = (my_uid() + 4242).to_string();
    let dir = tempfile::tempdir().unwrap();
    let (sidecar, socket) = files_sidecar(dir.path(), &["--workload-api-uid", &other]);
    let (out, lines) = client(&socket, &["raw", "yes"]);
    let got = one(&out, &lines);
    assert_eq!(got["code"], "PERMISSION_DENIED");
    let text = got.to_string();
    assert!(
        !text.contains("spiffe://") && !text.contains(&other),
        "nothing leaks: {got}"
    );
    assert_eq!(
        sidecar.metric(r#"stepmesh_workload_api_refused_total{reason="uid"}"#),
        1.0
    );
    let logged = sidecar.wait_log("the refusal", |l| {
        (l["message"] == "Workload API call refused: UID not in --workload-api-uid")
            .then(|| l["uid"].clone())
    });
    assert_eq!(logged, my_uid());

    // Listed (with another), the same caller is served.
    let dir = tempfile::tempdir().unwrap();
    let mine = my_uid().to_string();
    let (_sidecar, socket) = files_sidecar(
        dir.path(),
        &["--workload-api-uid", &other, "--workload-api-uid", &mine],
    );
    let (out, lines) = client(&socket, &["raw", "yes"]);
    assert_eq!(one(&out, &lines)["code"], "OK");
}

/// A UID the list refuses gets at most 16 connections at once (each
/// answered `PERMISSION_DENIED` per call): more are closed at accept, so
/// that half-sent header blocks (up to 80 KiB each) cannot grow the
/// sidecar without end. Runs without Python: raw sockets.
#[test]
fn a_refused_uid_holds_at_most_sixteen_connections() {
    use std::io::{Read, Write};
    let other = (my_uid() + 4242).to_string();
    let dir = tempfile::tempdir().unwrap();
    let (sidecar, socket) = files_sidecar(dir.path(), &["--workload-api-uid", &other]);
    // The HTTP/2 preface and a HEADERS frame without END_HEADERS: a header
    // block left open.
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    opening.extend_from_slice(&[0, 0, 4, 1, 0, 0, 0, 0, 1, 0x82, 0x86, 0x84, 0x41]);
    let held: Vec<_> = (0..40)
        .map(|_| {
            let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
                .unwrap();
            let _ = s.write_all(&opening);
            s
        })
        .collect();
    // Served: the server's SETTINGS come, then nothing (the block is
    // open) until the read times out. Closed at accept: EOF (or a reset).
    let readers: Vec<_> = held
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let mut buf = [0; 256];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => return true,
                        Ok(_) => continue,
                        Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
                    }
                }
            })
        })
        .collect();
    let closed = readers
        .into_iter()
        .map(|r| r.join().unwrap())
        .filter(|&c| c)
        .count();
    assert_eq!(closed, 40 - 16, "16 served, the rest closed");
    assert_eq!(
        sidecar.metric(r#"stepmesh_workload_api_refused_total{reason="uid_connections"}"#),
        24.0
    );
}

#[test]
fn a_file_in_the_sockets_place_is_a_configuration_error_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(TD);
    let files = SvidFiles::write(dir.path(), "app", &pki, &pki.leaf(CLIENT_ID));
    let not_a_socket = dir.path().join("workload.sock");
    std::fs::write(&not_a_socket, "precious").unwrap();
    let mut args = files.args();
    args.extend(["--inbound".into(), format!("127.0.0.1:0={}", echo_server())]);
    args.extend(["--workload-api".into(), not_a_socket.display().to_string()]);
    let out = Command::new(env!("CARGO_BIN_EXE_stepmesh"))
        .args(["proxy", "--admin", "127.0.0.1:0"])
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "a configuration error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--workload-api") && stderr.contains("exists and is not a socket"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&not_a_socket).unwrap(), "precious");
}

#[test]
fn py_spiffe_gets_a_jwt_svid_that_validates_for_its_audience_only() {
    if !py_spiffe() {
        return;
    }
    let ca = start_ca();
    let dir = tempfile::tempdir().unwrap();
    let (app, socket) = app_sidecar(&ca, dir.path(), "1h", &[]);
    let (out, lines) = client(&socket, &["jwt", "payments-db"]);
    let got = one(&out, &lines);
    assert_eq!(got["spiffe_id"], CLIENT_ID);
    assert_eq!(got["validated"], CLIENT_ID, "ValidateJWTSVID accepted it");
    assert_eq!(
        got["pyjwt_sub"], CLIENT_ID,
        "PyJWT verified it with the bundle's key"
    );
    assert_eq!(got["pyjwt_aud"], serde_json::json!(["payments-db"]));
    assert_eq!(got["ttl"], 300, "5 minutes");
    assert_eq!(got["kids"].as_array().unwrap().len(), 1);
    let other_audience = got["other_audience"].as_str().unwrap();
    assert!(other_audience.contains("InvalidAudience"), "{got}");
    let other_key = got["other_key"].as_str().unwrap();
    assert!(other_key.contains("InvalidSignature"), "{got}");
    assert!(got["pyjwt_other_key"]
        .as_str()
        .unwrap()
        .contains("InvalidSignature"));
    assert!(
        !got.to_string().contains("eyJ"),
        "no token in any refusal: {got}"
    );
    ca.wait_audit(|l| l["decision"] == "sign_jwt_svid" && l["identity"] == CLIENT_ID);
    assert_eq!(
        app.metric(r#"stepmesh_workload_api_calls_total{method="ValidateJWTSVID"}"#),
        3.0
    );
}

/// A JWT-SVID is handed out again for the same audiences while half its
/// life is left: an app that asks per request costs the CA one signing,
/// not one per request (nor runs out its identity's rate limit there).
/// Other audiences get a token of their own.
#[test]
fn a_jwt_svid_is_handed_out_again_for_the_same_audiences() {
    if !py_spiffe() {
        return;
    }
    let ca = start_ca();
    let dir = tempfile::tempdir().unwrap();
    let (_app, socket) = app_sidecar(&ca, dir.path(), "1h", &[]);
    let signed = || {
        ca.audit()
            .iter()
            .filter(|l| l["decision"] == "sign_jwt_svid")
            .count()
    };
    for aud in ["payments-db", "payments-db", "orders"] {
        let (out, lines) = client(&socket, &["jwt", aud]);
        assert_eq!(one(&out, &lines)["validated"], CLIENT_ID, "{aud}");
    }
    // The CA writes each audit line before it answers; the reader may not
    // have them all yet.
    ca.wait_audit(|l| {
        l["decision"] == "sign_jwt_svid" && l["audience"].to_string().contains("orders")
    });
    assert_eq!(signed(), 2, "one signing per audience");
}

/// A JWT-SVID the CA signed for the caller's identity is refused through
/// the socket once it has expired (past `exp` and the validator's 5 s
/// leeway); the same request with a fresh token is accepted, so the refusal
/// is the expiry's.
#[test]
fn an_expired_jwt_svid_is_refused_through_the_socket() {
    if !py_spiffe() {
        return;
    }
    let ca = start_ca();
    let dir = tempfile::tempdir().unwrap();
    let (_app, socket) = app_sidecar(&ca, dir.path(), "1h", &[]);
    let sign = |ttl: u64| {
        let audience = ["payments-db".to_owned()];
        let ttl = Some(std::time::Duration::from_secs(ttl));
        let rt = tokio::runtime::Runtime::new().unwrap();
        // The client spawns its connection: made inside the runtime.
        rt.block_on(async {
            ca.client()
                .sign_jwt_svid("client-token", &audience, ttl)
                .await
        })
        .unwrap()
        .token
    };
    let (fresh, short) = (sign(60), sign(1));
    let (out, lines) = client(&socket, &["validate", &fresh, "payments-db"]);
    assert_eq!(one(&out, &lines)["validated"], CLIENT_ID);

    std::thread::sleep(std::time::Duration::from_secs(7));
    let (out, lines) = client(&socket, &["validate", &short, "payments-db"]);
    let got = one(&out, &lines);
    let refused = got["refused"].as_str().unwrap_or_else(|| panic!("{got}"));
    assert!(refused.to_lowercase().contains("expired"), "{got}");
    assert!(!refused.contains("eyJ"), "no token in the refusal: {got}");
}

/// The issue's budget: 1,000 open `FetchX509SVID` streams cost at most
/// 16 MiB of the sidecar's RSS (measured on whichever build runs the test;
/// STEPMESH_BIN points it at a release build).
#[test]
fn a_thousand_open_streams_cost_at_most_16_mib() {
    if !py_spiffe() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (sidecar, socket) = files_sidecar(dir.path(), &[]);
    // Warm up: the server's first connection and call.
    let (out, lines) = client(&socket, &["raw", "yes"]);
    assert_eq!(one(&out, &lines)["code"], "OK");
    let before = sidecar.rss_kib();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/workload_client.py"
    );
    let mut holder = Command::new("python3")
        .args([script, "hold", "1000", "120"])
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let held: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    let after = sidecar.rss_kib();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(held["open"], 1000, "{line}");
    assert_eq!(sidecar.metric(CALLS), 1001.0);
    let grown = after.saturating_sub(before);
    println!("1000 streams: RSS {before} KiB -> {after} KiB (+{grown} KiB)");
    assert!(grown <= 16 * 1024, "+{grown} KiB for 1000 streams");
}
