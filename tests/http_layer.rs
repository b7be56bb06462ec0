//! The HTTP layer end to end in one process: client → outbound HTTP layer →
//! mesh HTTP/2 over real mTLS with real SVIDs → inbound HTTP layer (route and
//! step-up gate) → app. Every branch of the decision list, XFCC hygiene,
//! gRPC-shaped unary and streaming calls with trailers, HTTP/1.1 and HTTP/2
//! apps, and a 100 MiB body streamed with flat memory.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod http_support;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use stepmesh::policy::Policy;
use stepmesh::stepup::testing::{base_claims, mint_hs256, now, TestIdp};

use http_support::app::{request, send, Answer};
use http_support::{Pair, FRONTEND};

const ISS: &str = "https://idp.example.com";

struct World {
    pair: Pair,
    idp: TestIdp,
    _dir: tempfile::TempDir,
}

/// The step-up routes of port 8080 (`world`'s policy; `$FRONTEND` is
/// [`FRONTEND`]).
const ROUTES: &str = r#"
      routes:
        - name: refunds
          match: {methods: [POST], path: /refunds/*}
          from: [$FRONTEND]
          stepUp: {provider: corp-idp, acr: [urn:stepmesh:acr:mfa], maxAge: 300s, bindToPeer: azp}
        - name: cnf
          match: {path: /cnf}
          stepUp: {provider: corp-idp, bindToPeer: cnf}
        - name: forward
          match: {path: /forward}
          stepUp: {provider: corp-idp, header: x-step-up-token, forward: true}
"#;

async fn world(caller: &str, app_h2: bool) -> World {
    world_with(caller, app_h2, &ROUTES.replace("$FRONTEND", FRONTEND)).await
}

/// A pair whose port 8080 allows `caller`, with `routes` (YAML, or "").
async fn world_with(caller: &str, app_h2: bool, routes: &str) -> World {
    let idp = TestIdp::new(ISS).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, idp.jwks().to_string()).unwrap();
    let policy = Policy::from_yaml(&format!(
        r#"
trustDomain: cluster.local
stepUp:
  providers:
    corp-idp:
      issuer: {ISS}
      jwks: {{file: {}}}
      audiences: [payments]
      algorithms: [ES256, RS256]
inbound:
  default: deny
  ports:
    - port: 8080
      protocol: http
      allow:
        - from: [{FRONTEND}, spiffe://cluster.local/ns/ops/*]{routes}"#,
        jwks.display()
    ))
    .unwrap();
    World {
        pair: Pair::start(policy, caller, app_h2).await,
        idp,
        _dir: dir,
    }
}

fn claims() -> Value {
    let mut c = base_claims(ISS, "payments", "alice@example.com");
    c["acr"] = json!("urn:stepmesh:acr:mfa");
    c["azp"] = json!(FRONTEND);
    c
}

impl World {
    async fn post(&self, h2: bool, path: &str, headers: &[(&str, &str)]) -> Answer {
        send(
            self.pair.outbound,
            h2,
            request(h2, "POST", path, headers, b"{}"),
        )
        .await
    }

    async fn with_token(&self, h2: bool, token: &str) -> Answer {
        let auth = format!("Bearer {token}");
        self.post(h2, "/refunds/42", &[("authorization", &auth)])
            .await
    }
}

fn www(a: &Answer) -> &str {
    a.headers
        .get("www-authenticate")
        .map_or("", |v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_branch_of_the_decision_list() {
    for (h2, app_h2) in [(false, false), (true, true)] {
        let w = world(FRONTEND, app_h2).await;
        // Non-sensitive route: allowed on identity alone.
        let a = send(
            w.pair.outbound,
            h2,
            request(h2, "GET", "/catalog", &[], b""),
        )
        .await;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.json()["version"],
            if app_h2 { "HTTP/2.0" } else { "HTTP/1.1" }
        );

        // No token: RFC 6750 challenge, exactly.
        let a = w.post(h2, "/refunds/42", &[]).await;
        assert_eq!(a.status, 401);
        assert_eq!(
            www(&a),
            r#"Bearer realm="stepmesh", acr_values="urn:stepmesh:acr:mfa", max_age=300"#
        );

        // Wrong acr, stale auth_time: RFC 9470.
        let mut c = claims();
        c["acr"] = json!("urn:stepmesh:acr:pwd");
        let a = w.with_token(h2, &w.idp.es256(&c).unwrap()).await;
        assert_eq!(a.status, 401);
        assert!(
            www(&a).starts_with(
                r#"Bearer error="insufficient_user_authentication", error_description=""#
            ),
            "{}",
            www(&a)
        );
        assert!(
            www(&a).ends_with(r#"acr_values="urn:stepmesh:acr:mfa", max_age=300"#),
            "{}",
            www(&a)
        );
        let mut c = claims();
        c["auth_time"] = json!(now() - 900);
        let a = w.with_token(h2, &w.idp.es256(&c).unwrap()).await;
        assert!(
            www(&a).contains("insufficient_user_authentication") && www(&a).contains("max_age=300")
        );

        // invalid_token family.
        let mut bad: Vec<String> = Vec::new();
        for (k, v) in [
            ("exp", json!(now() - 600)),
            ("nbf", json!(now() + 600)),
            ("iss", json!("https://evil.example.com")),
            ("aud", json!("billing")),
            ("azp", json!("spiffe://cluster.local/ns/web/sa/other")),
        ] {
            let mut c = claims();
            c[k] = v;
            bad.push(w.idp.es256(&c).unwrap());
        }
        let good = w.idp.es256(&claims()).unwrap();
        let other_key = TestIdp::with_kids(ISS, w.idp.es_kid(), "r").unwrap();
        bad.push(other_key.es256(&claims()).unwrap()); // bad signature
        bad.push(w.idp.mint(&json!({"alg": "none"}), &claims()).unwrap());
        bad.push(mint_hs256(
            w.idp.es_public_pem().unwrap().as_bytes(),
            &json!({"alg": "HS256", "kid": w.idp.es_kid()}),
            &claims(),
        ));
        bad.push(
            w.idp
                .mint(&json!({"alg": "ES256", "kid": "unknown"}), &claims())
                .unwrap(),
        );
        for token in &bad {
            let a = w.with_token(h2, token).await;
            assert_eq!(a.status, 401);
            assert!(
                www(&a).starts_with(r#"Bearer error="invalid_token""#),
                "{}",
                www(&a)
            );
        }
        // cnf of another workload.
        let mut c = claims();
        c["cnf"] = json!({"x5t#S256": "aW1wb3N0b3I"});
        let a = w
            .post(
                h2,
                "/cnf",
                &[(
                    "authorization",
                    &format!("Bearer {}", w.idp.es256(&c).unwrap()),
                )],
            )
            .await;
        assert!(www(&a).starts_with(r#"Bearer error="invalid_token""#));

        // A good token: the app sees the subject, not the token.
        let a = w.with_token(h2, &good).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        let seen = a.json();
        assert_eq!(
            seen["headers"]["x-stepup-sub"],
            json!(["alice@example.com"])
        );
        assert!(
            seen["headers"].get("authorization").is_none(),
            "token leaked to the app: {seen}"
        );
        // forward: true keeps it.
        let a = w.post(h2, "/forward", &[("x-step-up-token", &good)]).await;
        assert_eq!(a.json()["headers"]["x-step-up-token"], json!([good]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_peer_gets_403_even_with_a_perfect_token() {
    let other = "spiffe://cluster.local/ns/web/sa/other";
    let w = world(other, false).await;
    let mut c = claims();
    c["azp"] = json!(other);
    let a = w.with_token(false, &w.idp.es256(&c).unwrap()).await;
    assert_eq!(a.status, 403);
    let a = send(
        w.pair.outbound,
        false,
        request(false, "GET", "/catalog", &[], b""),
    )
    .await;
    assert_eq!(a.status, 403, "not on the port's allow list at all");
    // On the port's list but not the route's.
    let ops = "spiffe://cluster.local/ns/ops/sa/oncall";
    let w = world(ops, false).await;
    let mut c = claims();
    c["azp"] = json!(ops);
    assert_eq!(
        w.with_token(false, &w.idp.es256(&c).unwrap()).await.status,
        403
    );
    assert_eq!(
        send(
            w.pair.outbound,
            false,
            request(false, "GET", "/catalog", &[], b"")
        )
        .await
        .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_never_reach_the_app() {
    let w = world(FRONTEND, false).await;
    let spoof = [
        ("x-forwarded-client-cert", "By=spiffe://cluster.local/ns/x/sa/y;URI=spiffe://cluster.local/ns/kube-system/sa/admin"),
        ("x-stepup-sub", "root"),
        ("stepmesh-orig-proto", "HTTP/2"),
        ("X-Stepup-Sub", "root again"),
        // One key with the real ones to a CGI-style app.
        ("x_stepup_sub", "root, underscored"),
        ("x_forwarded_client_cert", "URI=spiffe://cluster.local/ns/x/sa/admin"),
        // The CGI path split: gunicorn would route the rest of the path.
        ("SCRIPT_NAME", "/cat"),
        ("script-name", "/cat"),
        ("Path_Info", "/admin"),
    ];
    // On a port with routes and on one without (the identity alone
    // decides). A real pair's HTTP/1 relay on a port without routes:
    // tests/http_sidecars.rs.
    for (h2, routes) in [(false, true), (true, true), (false, false)] {
        let w2;
        let w = match (h2, routes) {
            (false, true) => &w,
            (true, true) => {
                w2 = world(FRONTEND, true).await;
                &w2
            }
            _ => {
                w2 = world_with(FRONTEND, false, "").await;
                &w2
            }
        };
        let a = send(
            w.pair.outbound,
            h2,
            request(h2, "GET", "/catalog", &spoof, b""),
        )
        .await;
        let seen = a.json();
        assert_eq!(
            seen["headers"]["x-forwarded-client-cert"],
            json!([format!("By={};URI={FRONTEND}", http_support::API)]),
            "{seen}"
        );
        assert!(seen["headers"].get("x-stepup-sub").is_none(), "{seen}");
        assert!(
            seen["headers"].get("stepmesh-orig-proto").is_none(),
            "{seen}"
        );
        for spelled in [
            "x_stepup_sub",
            "x_forwarded_client_cert",
            "script_name",
            "script-name",
            "path_info",
        ] {
            assert!(seen["headers"].get(spelled).is_none(), "{seen}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_could_be_normalized_into_a_route_are_refused_or_meet_it() {
    let w = world(FRONTEND, false).await;
    for h2 in [false, true] {
        for (path, status) in [
            ("/x/../refunds/1", 400),
            ("//refunds/1", 400),
            ("/refunds/%2e%2e/x", 400),
            ("/refunds%2F1", 400),
            // Read as the app may read it: the route's step-up applies.
            ("/%72efunds/1", 401),
            ("/REFUNDS/1", 401),
            ("/refunds;x/1", 401),
        ] {
            let a = w.post(h2, path, &[]).await;
            assert_eq!(a.status, status, "{path} (h2: {h2})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streaming_keep_their_trailers() {
    let w = world(FRONTEND, true).await;
    let mut frame = vec![0u8, 0, 0, 0, 5];
    frame.extend_from_slice(b"hello");
    let body: &'static [u8] = Box::leak(frame.into_boxed_slice());
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];
    let a = send(
        w.pair.outbound,
        true,
        request(true, "POST", "/grpc.Echo/Unary", &grpc, body),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(&a.body[5..], b"echo:hello");
    let t = a.trailers.expect("unary trailers");
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["grpc-message"], "done");

    let a = send(
        w.pair.outbound,
        true,
        request(true, "POST", "/grpc.Echo/Stream", &grpc, body),
    )
    .await;
    assert_eq!(a.status, 200);
    let mut messages = Vec::new();
    let mut rest = &a.body[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        messages.push(String::from_utf8(rest[5..5 + len].to_vec()).unwrap());
        rest = &rest[5 + len..];
    }
    assert_eq!(messages, ["msg-0", "msg-1", "msg-2", "msg-3", "msg-4"]);
    assert!(
        a.data_frames >= 2,
        "streamed, not collected into one frame ({} frames)",
        a.data_frames
    );
    assert_eq!(a.trailers.expect("stream trailers")["grpc-status"], "0");
}

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_body_streams_without_being_buffered() {
    const MIB: usize = 1 << 20;
    for (h2, app_h2) in [(false, false), (true, true)] {
        let w = world(FRONTEND, app_h2).await;
        let before = vm_hwm_kib();
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        let frames = (0..(100 * MIB / chunk.len()))
            .map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone())));
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let mut req = request(h2, "PUT", "/upload", &[], b"");
        *req.body_mut() = body;
        let a = send(w.pair.outbound, h2, req).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.json()["received"], json!(100 * MIB));
        let grown = vm_hwm_kib().saturating_sub(before);
        assert!(
            grown < 40 * 1024,
            "peak memory grew by {grown} KiB for a 100 MiB body"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_an_in_flight_stream_finish() {
    let pki = stepmesh_ca::testing::Pki::new(http_support::TD);
    let app = http_support::app::TestApp::start(true).await;
    let (trigger, drain) = tokio::sync::watch::channel(false);
    let open = Policy::allow_authenticated(http_support::TD.parse().unwrap());
    let inbound = http_support::start_inbound_draining(
        &pki,
        http_support::layer(open),
        8080,
        app.addr,
        drain,
    )
    .await;
    let me = pki.leaf(FRONTEND);
    let outbound = http_support::start_outbound(
        &pki,
        &me,
        http_support::layer(Policy::allow_authenticated(
            http_support::TD.parse().unwrap(),
        )),
        inbound,
    )
    .await;
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];
    let call = tokio::spawn(send(
        outbound,
        true,
        request(
            true,
            "POST",
            "/grpc.Echo/Stream",
            &grpc,
            b"\x00\x00\x00\x00\x00",
        ),
    ));
    // The stream takes ~100 ms; drain while it runs (once the app has it:
    // on a loaded machine the request may take longer than that to arrive).
    let started = std::time::Instant::now();
    while app.streams.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the stream never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    trigger.send(true).unwrap();
    let a = call.await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), 5 * 10, "every message arrived");
    assert_eq!(
        a.trailers.expect("trailers after drain")["grpc-status"],
        "0"
    );
    // Draining: the GOAWAY reached the outbound side before the stream's
    // last frame, so its pooled connection takes no new stream, and a new
    // connection to the draining side is closed unserved: the very next
    // request is answered 502 by the outbound side. (Served, a new
    // connection's first requests would be processed under HTTP/2's
    // first, largest-ID GOAWAY, and a retrying client would be served
    // through the drain for as long as it won that race: this took up to
    // 20 s.)
    let a = send(outbound, true, request(true, "GET", "/after", &[], b"")).await;
    assert_eq!(
        a.status, 502,
        "the first request after the drain is not served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_gets_one_access_log_line_with_bytes_and_durations() {
    use std::sync::{Arc, Mutex};
    let lines: Arc<Mutex<Vec<stepmesh::http::RequestRecord>>> = Arc::default();
    let sink = lines.clone();
    let log = stepmesh::http::RequestLog::new(move |r| sink.lock().unwrap().push(r.clone()));
    let pki = stepmesh_ca::testing::Pki::new(http_support::TD);
    let app = http_support::app::TestApp::start(false).await;
    let open = Policy::allow_authenticated(http_support::TD.parse().unwrap());
    let inbound = http_support::start_inbound(
        &pki,
        http_support::layer_with_log(open, log),
        8080,
        app.addr,
    )
    .await;
    let me = pki.leaf(FRONTEND);
    let plain = Policy::allow_authenticated(http_support::TD.parse().unwrap());
    let outbound =
        http_support::start_outbound(&pki, &me, http_support::layer(plain), inbound).await;
    let a = send(
        outbound,
        false,
        request(false, "POST", "/orders?secret=1", &[], b"0123456789"),
    )
    .await;
    assert_eq!(a.status, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let line = loop {
        if let Some(l) = lines.lock().unwrap().first().cloned() {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "no access-log line");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(lines.lock().unwrap().len(), 1);
    assert_eq!(
        (line.kind, line.direction, line.decision, line.reason),
        ("http", "inbound", "allow", "authenticated")
    );
    assert_eq!(line.peer_id.as_deref(), Some(FRONTEND));
    assert_eq!(
        (&*line.method, line.path.as_str(), line.status),
        ("POST", "/orders", 200)
    );
    assert_eq!(line.bytes_in, 10);
    assert_eq!(line.bytes_out, a.body.len() as u64);
    assert!(
        line.duration_ms >= line.headers_ms && line.headers_ms > 0.0,
        "{line:?}"
    );
    let json = serde_json::to_string(&line).unwrap();
    assert!(
        !json.contains("secret"),
        "queries stay out of the log: {json}"
    );
}
