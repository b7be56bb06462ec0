//! A real kubectl against the exec stand-in (`tests/python/exec_standin.py`),
//! directly, no gateway: proves the far end the gateway's exec/attach/
//! port-forward pass-through tests rely on (issue 12, item 8). Each test
//! runs both transports, WebSocket and SPDY/3.1, and checks in the stand-in's
//! log that the transport asked for is the one used (kubectl silently falls
//! back from WebSocket to SPDY). Skips, saying why, without a kubectl.

#![allow(clippy::unwrap_used)]

#[path = "common/exec_standin.rs"]
mod exec_standin;

use exec_standin::{
    exec_stdin, kubectl, random_bytes, run_kubectl, sha256_hex, ExecStandin, KubectlTarget,
    PortForward, Transport,
};

const MIB: usize = 1 << 20;

/// 1 MiB of random bytes through `exec -i -- cat` comes back byte-exact,
/// and the far end saw exactly those bytes on stdin.
#[test]
fn exec_cat_one_mib_byte_exact_both_transports() {
    let Some(kubectl) = kubectl() else { return };
    let standin = ExecStandin::start();
    for (i, transport) in Transport::ALL.into_iter().enumerate() {
        let input = random_bytes(MIB, 12 + i as u64);
        let run = exec_stdin(&kubectl, &standin.target(), transport, &["cat"], &input);
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
    for (i, transport) in Transport::ALL.into_iter().enumerate() {
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
    for transport in Transport::ALL {
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
    for (i, transport) in Transport::ALL.into_iter().enumerate() {
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
