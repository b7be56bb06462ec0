//! A real kubectl against the exec stand-in (`tests/python/exec_standin.py`),
//! directly, no gateway: proves the far end the gateway's exec/attach/
//! port-forward pass-through tests rely on (issue 12, item 8). Each test
//! runs both transports, WebSocket and SPDY/3.1, and checks in the stand-in's
//! log that the transport asked for is the one used (kubectl silently falls
//! back from WebSocket to SPDY). Skips, saying why, without a kubectl.

#![allow(clippy::unwrap_used)]

use std::io::Write;

#[path = "common/exec_standin.rs"]
mod exec_standin;

use exec_standin::{
    exec_cat_round_trip, exec_stdin, kubectl, random_bytes, run_kubectl, run_kubectl_feeding,
    sha256_hex, transports, ExecStandin, KubectlTarget, PortForward, Transport,
};

const MIB: usize = 1 << 20;

/// 1 MiB of random bytes through `exec -i -- cat` comes back byte-exact,
/// and the far end saw exactly those bytes on stdin.
#[test]
fn exec_cat_one_mib_byte_exact_both_transports() {
    let Some(kubectl) = kubectl() else { return };
    let standin = ExecStandin::start();
    for (i, transport) in transports(&kubectl).into_iter().enumerate() {
        let (input, run) = exec_cat_round_trip(&kubectl, &standin.target(), transport, MIB);
        assert_eq!(run.code, Some(0), "{transport:?}: {}", run.stderr);
        assert_eq!(
            run.stdout.len(),
            input.len(),
            "{transport:?}: stdout length"
        );
        assert!(
            run.stdout == input,
            "{transport:?}: stdout differs from stdin"
        );
        let session = standin.wait_session(i);
        assert_eq!(session["transport"], transport.logged_as(), "{session}");
        let protocol = match transport {
            Transport::WebSocket => "v5.channel.k8s.io",
            Transport::Spdy => "v4.channel.k8s.io",
        };
        assert_eq!(session["protocol"], protocol, "{session}");
        assert_eq!(session["stdin_bytes"], MIB, "{session}");
        assert_eq!(session["stdout_bytes"], MIB, "{session}");
        assert_eq!(session["stdin_sha256"], sha256_hex(&input), "{session}");
        if transport == Transport::Spdy {
            // 1 MiB of stdin granted back in 32 KiB steps (SPDY/3.1 flow control).
            assert_eq!(session["window_updates_out"], 32, "{session}");
        }
        println!(
            "exec cat 1 MiB over {transport:?}: kubectl {} ms in all, stand-in session {} ms",
            run.elapsed.as_millis(),
            session["ms"]
        );
    }
}

/// `attach -i` streams 1 MiB both ways too.
#[test]
fn attach_one_mib_byte_exact_both_transports() {
    let Some(kubectl) = kubectl() else { return };
    let standin = ExecStandin::start();
    for (i, transport) in transports(&kubectl).into_iter().enumerate() {
        let input = random_bytes(MIB, 40 + i as u64);
        let args = ["attach", "-i", "-n", "ns", "pod"];
        let run = run_kubectl(&kubectl, &standin.target(), transport, &args, &input);
        assert_eq!(run.code, Some(0), "{transport:?}: {}", run.stderr);
        assert!(
            run.stdout == input,
            "{transport:?}: stdout differs from stdin"
        );
        let session = standin.wait_session(i);
        assert_eq!(session["subresource"], "attach", "{session}");
        assert_eq!(session["transport"], transport.logged_as(), "{session}");
    }
}

/// What only arrives after stdin ends (a digest), and the status channel:
/// a non-zero exit code reaches kubectl's exit code and message.
#[test]
fn output_after_stdin_end_and_exit_status_both_transports() {
    let Some(kubectl) = kubectl() else { return };
    let standin = ExecStandin::start();
    let target = standin.target();
    for transport in transports(&kubectl) {
        let input = random_bytes(300_000, 7);
        let run = exec_stdin(&kubectl, &target, transport, &["sha256sum"], &input);
        assert_eq!(run.code, Some(0), "{transport:?}: {}", run.stderr);
        let expected = format!("{}  -\n", sha256_hex(&input));
        assert_eq!(
            String::from_utf8_lossy(&run.stdout),
            expected,
            "{transport:?}"
        );

        let run = exec_stdin(&kubectl, &target, transport, &["echo", "a", "b"], b"");
        assert_eq!((run.code, run.stdout.as_slice()), (Some(0), &b"a b\n"[..]));

        let run = exec_stdin(&kubectl, &target, transport, &["false"], b"");
        assert_eq!(run.code, Some(1), "{transport:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("command terminated with exit code 1"),
            "{transport:?}: {}",
            run.stderr
        );

        let run = exec_stdin(&kubectl, &target, transport, &["no-such-cmd"], b"");
        assert_eq!(run.code, Some(127), "{transport:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("stand-in: unknown command"),
            "{}",
            run.stderr
        );
    }
}

/// `port-forward`: 1 MiB through one forwarded connection comes back
/// byte-exact (every port of the stand-in echoes), WebSocket tunnel and SPDY.
#[test]
fn port_forward_one_mib_byte_exact_both_transports() {
    let Some(kubectl) = kubectl() else { return };
    let standin = ExecStandin::start();
    for (i, transport) in transports(&kubectl).into_iter().enumerate() {
        let forward = PortForward::start(&kubectl, &standin.target(), transport, 8080);
        let input = random_bytes(MIB, 80 + i as u64);
        let started = std::time::Instant::now();
        let back = forward.round_trip(&input);
        let elapsed = started.elapsed();
        assert_eq!(back.len(), input.len(), "{transport:?}: echoed length");
        assert!(back == input, "{transport:?}: echo differs");
        drop(forward); // the session is logged when kubectl goes away
        let session = standin.wait_session(i);
        let protocol = match transport {
            Transport::WebSocket => "SPDY/3.1+portforward.k8s.io",
            Transport::Spdy => "portforward.k8s.io",
        };
        assert_eq!(session["protocol"], protocol, "{session}");
        assert_eq!(session["echoed"], MIB, "{session}");
        println!(
            "port-forward 1 MiB over {transport:?}: {} ms",
            elapsed.as_millis()
        );
    }
}

/// Refusals are Kubernetes Statuses kubectl prints, and the bearer token
/// reaches the far end (its log has a fingerprint, never the token itself).
#[test]
fn refusal_is_a_status_and_token_is_fingerprinted() {
    let Some(kubectl) = kubectl() else { return };
    let standin = ExecStandin::start();
    let token = "secret-token-of-the-test";
    let target = KubectlTarget::token(&standin.url(), &standin.ca_file, token);
    let args = ["get", "--raw", "/api/v1/nodes"];
    let run = run_kubectl(&kubectl, &target, Transport::Spdy, &args, b"");
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("NotFound"), "{}", run.stderr);
    let requests = standin.events("request");
    let nodes = requests
        .iter()
        .find(|r| r["path"] == "/api/v1/nodes")
        .unwrap();
    assert_eq!(
        nodes["token"],
        format!("sha256:{}", &sha256_hex(token.as_bytes())[..16])
    );
    assert!(!standin.logs().iter().any(|l| l.contains(token)));
    assert!(standin.events("session").is_empty());
}

/// A session longer than kubectl's 5 s heartbeat: its pings (WebSocket
/// ping frames, SPDY PING frames) are answered and the session goes on.
#[test]
fn heartbeats_answered_in_a_six_second_session_both_transports() {
    let Some(kubectl) = kubectl() else { return };
    let standin = ExecStandin::start();
    let exec_requests = || {
        standin
            .events("request")
            .iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.ends_with("/exec")))
            .count()
    };
    for (i, transport) in transports(&kubectl).into_iter().enumerate() {
        let before = exec_requests();
        // The 6 s count from the session's start at the far end, not from
        // kubectl's spawn: a loaded machine may take seconds to get there.
        let feed = |mut pipe: std::process::ChildStdin| {
            pipe.write_all(b"before ").unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while exec_requests() == before && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            std::thread::sleep(std::time::Duration::from_millis(6_000));
            pipe.write_all(b"after").unwrap();
        };
        let args = ["exec", "-i", "-n", "ns", "pod", "--", "cat"];
        let run = run_kubectl_feeding(&kubectl, &standin.target(), transport, &args, feed);
        assert_eq!(run.code, Some(0), "{transport:?}: {}", run.stderr);
        assert_eq!(run.stdout, b"before after", "{transport:?}");
        let session = standin.wait_session(i);
        assert!(session["pings"].as_u64().unwrap() >= 1, "{session}");
    }
}

/// The stand-in's WebSocket side on its own, with frames kubectl may not
/// send: v4 negotiated when v5 is not offered, a message fragmented in three
/// with a ping between the fragments, 1 MiB frames both ways (64-bit
/// lengths), the v5 preference, a refused subprotocol and an unmasked frame.
#[test]
fn websocket_v4_fragments_ping_and_large_frames() {
    let standin = ExecStandin::start();
    let path = "/api/v1/namespaces/ns/pods/pod/exec?command=cat&stdin=true&stdout=true&stderr=true";

    let (mut ws, head) = ws::connect(&standin, path, "v4.channel.k8s.io");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    assert!(
        head.contains("Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n"),
        "{head}"
    );
    let first = random_bytes(MIB, 1);
    let message = [&[0u8][..], &first].concat();
    ws::send(&mut ws, false, 2, &message[..100_000], true);
    ws::send(&mut ws, true, 9, b"hb", true);
    ws::send(&mut ws, false, 0, &message[100_000..700_000], true);
    ws::send(&mut ws, true, 0, &message[700_000..], true);
    assert_eq!(
        ws::recv(&mut ws),
        (true, 10, b"hb".to_vec()),
        "pong mid-message"
    );
    let (fin, op, echo) = ws::recv(&mut ws);
    assert_eq!((fin, op, echo[0], echo.len()), (true, 2, 1, MIB + 1));
    assert!(echo[1..] == first[..], "fragmented stdin echoed byte-exact");
    let second = random_bytes(MIB, 2);
    ws::send(&mut ws, true, 2, &[&[0u8][..], &second].concat(), true);
    let (_, _, echo) = ws::recv(&mut ws);
    assert!(
        echo[0] == 1 && echo[1..] == second[..],
        "1 MiB frame echoed"
    );
    ws::send(&mut ws, true, 2, &[255, 0], true);
    let (_, op, status) = ws::recv(&mut ws);
    assert_eq!((op, status[0]), (2, 3));
    let status: serde_json::Value = serde_json::from_slice(&status[1..]).unwrap();
    assert_eq!(
        status,
        serde_json::json!({"metadata": {}, "status": "Success"})
    );
    let (_, op, close) = ws::recv(&mut ws);
    assert_eq!((op, &close[..2]), (8, &1000u16.to_be_bytes()[..]));
    ws::send(&mut ws, true, 8, &1000u16.to_be_bytes(), true);
    let session = standin.wait_session(0);
    assert_eq!(session["protocol"], "v4.channel.k8s.io", "{session}");
    assert_eq!(session["stdin_bytes"], 2 * MIB, "{session}");
    assert_eq!(session["peer_close"], 1000, "{session}");

    let (_, head) = ws::connect(&standin, path, "v4.channel.k8s.io, v5.channel.k8s.io");
    assert!(
        head.contains("Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n"),
        "{head}"
    );
    let (_, head) = ws::connect(&standin, path, "channel.k8s.io");
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let (mut ws, _) = ws::connect(&standin, path, "v5.channel.k8s.io");
    ws::send(&mut ws, true, 2, &[0, b'x'], false);
    let (_, op, close) = ws::recv(&mut ws);
    assert_eq!(
        (op, &close[..2]),
        (8, &1002u16.to_be_bytes()[..]),
        "unmasked frame refused"
    );
}

/// A bare RFC 6455 client over rustls, for the framing test.
mod ws {
    use super::ExecStandin;
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::Arc;

    pub type Conn = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

    /// Connects over TLS and sends the upgrade (the RFC's sample key); returns the response head.
    pub fn connect(standin: &ExecStandin, path: &str, protocols: &str) -> (Conn, String) {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&standin.ca_file).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = "127.0.0.1".try_into().unwrap();
        let tls = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", standin.port)).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut conn = rustls::StreamOwned::new(tls, tcp);
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer t\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n"
        );
        conn.write_all(request.as_bytes()).unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            conn.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        (conn, String::from_utf8(head).unwrap())
    }

    /// Writes one frame, masked unless `masked` is false.
    pub fn send(conn: &mut Conn, fin: bool, opcode: u8, payload: &[u8], masked: bool) {
        let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
        let bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(bit | n as u8),
            n if n < 65536 => {
                frame.push(bit | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(bit | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let mask = [0x37, 0xfa, 0x21, 0x3d];
            frame.extend_from_slice(&mask);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        conn.write_all(&frame).unwrap();
    }

    /// Reads one frame: (fin, opcode, payload); server frames are unmasked.
    pub fn recv(conn: &mut Conn) -> (bool, u8, Vec<u8>) {
        let mut head = [0u8; 2];
        conn.read_exact(&mut head).unwrap();
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                conn.read_exact(&mut b).unwrap();
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                conn.read_exact(&mut b).unwrap();
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).unwrap();
        (head[0] & 0x80 != 0, head[0] & 0x0f, payload)
    }
}
