//! The HTTP layer through a real sidecar pair (two `stepmesh proxy`
//! processes, real SVIDs, JWKS over HTTPS from a Python process): every
//! branch of the decision list, XFCC hygiene, gRPC-shaped unary and
//! streaming calls with trailers, HTTP/1.1 and HTTP/2 apps, a 100 MiB body
//! with the sidecars' memory flat, per-request access log and metrics.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod http_support;
#[path = "common/idp.rs"]
mod idp;

use std::net::SocketAddr;

use bytes::Bytes;
use common::mesh::{free_port, Sidecar, SvidFiles};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use stepmesh::stepup::testing::{base_claims, mint_hs256, now, TestIdp};
use stepmesh_ca::testing::Pki;

use http_support::app::{request, send, Answer, TestApp};

const ISS: &str = "https://idp.example.com";
const SERVER_ID: &str = "spiffe://mesh.test/ns/payments/sa/api";
const FRONTEND: &str = "spiffe://mesh.test/ns/web/sa/frontend";
const OTHER: &str = "spiffe://mesh.test/ns/web/sa/other";

struct Setup {
    rt: tokio::runtime::Runtime,
    idp: TestIdp,
    _jwks: idp::JwksServer,
    _dir: tempfile::TempDir,
    server: Sidecar,
    frontend: Sidecar,
    other: Sidecar,
}

fn policy(port: u16, jwks: &idp::JwksServer) -> String {
    format!(
        r#"
trustDomain: mesh.test
stepUp:
  providers:
    corp-idp:
      issuer: {ISS}
      jwks: {{url: "{url}", caFile: {ca}}}
      audiences: [payments]
      algorithms: [ES256, RS256]
inbound:
  default: deny
  ports:
    - port: {port}
      protocol: http
      allow:
        - name: web
          from: [{FRONTEND}, {OTHER}]
      routes:
        - name: refunds
          match: {{methods: [POST], path: /refunds/*}}
          from: [{FRONTEND}]
          stepUp: {{provider: corp-idp, acr: [urn:stepmesh:acr:mfa], maxAge: 300s, bindToPeer: azp}}
        - name: cnf
          match: {{path: /cnf}}
          stepUp: {{provider: corp-idp, bindToPeer: cnf}}
"#,
        url = jwks.url(),
        ca = jwks.ca_file.display()
    )
}

fn setup(app_h2: bool) -> Setup {
    setup_with(app_h2, true)
}

/// [`setup`]; `routes` false: the port's policy has no routes (identity
/// alone decides; the inbound relay then splices HTTP/1 heads).
fn setup_with(app_h2: bool, routes: bool) -> Setup {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(TestApp::start(app_h2));
    let idp = TestIdp::new(ISS).unwrap();
    let jwks = idp::JwksServer::start(&idp.jwks().to_string());
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("mesh.test");
    let port = free_port();
    let policy_file = dir.path().join("policy.yaml");
    let mut text = policy(port, &jwks);
    if !routes {
        text.truncate(text.find("      routes:").unwrap());
    }
    std::fs::write(&policy_file, text).unwrap();
    let files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
    let mut args = files.args();
    args.extend([
        "--inbound".into(),
        format!("127.0.0.1:{port}={}", app.addr),
        "--policy".into(),
        policy_file.display().to_string(),
    ]);
    let server = Sidecar::spawn(&args);
    let inbound = server.listener("inbound");
    let client = |name: &str, id: &str| {
        let files = SvidFiles::write(dir.path(), name, &pki, &pki.leaf(id));
        let mut args = files.args();
        args.extend([
            "--outbound".into(),
            format!("127.0.0.1:0={inbound}@{SERVER_ID}"),
        ]);
        let s = Sidecar::spawn(&args);
        s.wait_ready();
        s
    };
    let frontend = client("frontend", FRONTEND);
    let other = client("other", OTHER);
    server.wait_ready();
    Setup {
        rt,
        idp,
        _jwks: jwks,
        _dir: dir,
        server,
        frontend,
        other,
    }
}

fn claims(azp: &str) -> Value {
    let mut c = base_claims(ISS, "payments", "alice@example.com");
    c["acr"] = json!("urn:stepmesh:acr:mfa");
    c["azp"] = json!(azp);
    c
}

impl Setup {
    fn out(&self, who: &Sidecar) -> SocketAddr {
        who.listener("outbound")
    }

    fn call(
        &self,
        who: &Sidecar,
        h2: bool,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        self.rt.block_on(send(
            self.out(who),
            h2,
            request(h2, method, path, headers, b"{}"),
        ))
    }

    fn with_token(&self, h2: bool, token: &str) -> Answer {
        let auth = format!("Bearer {token}");
        self.call(
            &self.frontend,
            h2,
            "POST",
            "/refunds/9",
            &[("authorization", &auth)],
        )
    }
}

fn www(a: &Answer) -> String {
    a.headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[test]
fn every_branch_of_the_decision_list_through_a_sidecar_pair() {
    for (h2, app_h2) in [(false, false), (true, true)] {
        let s = setup(app_h2);
        let a = s.call(&s.frontend, h2, "GET", "/catalog", &[]);
        assert_eq!(a.status, 200, "{:?}", a.body);

        let a = s.call(&s.frontend, h2, "POST", "/refunds/9", &[]);
        assert_eq!(a.status, 401);
        assert_eq!(
            www(&a),
            r#"Bearer realm="stepmesh", acr_values="urn:stepmesh:acr:mfa", max_age=300"#
        );
        // A GET an app's method-override middleware would run as the POST.
        for name in ["x-http-method-override", "X_HTTP_Method_Override"] {
            let a = s.call(&s.frontend, h2, "GET", "/refunds/9", &[(name, "POST")]);
            assert_eq!(a.status, 401, "{name}: {:?}", a.body);
        }

        let mut c = claims(FRONTEND);
        c["acr"] = json!("urn:stepmesh:acr:pwd");
        let a = s.with_token(h2, &s.idp.es256(&c).unwrap());
        assert_eq!(a.status, 401);
        assert!(
            www(&a).starts_with(
                r#"Bearer error="insufficient_user_authentication", error_description=""#
            ),
            "{}",
            www(&a)
        );
        assert!(
            www(&a).ends_with(r#", acr_values="urn:stepmesh:acr:mfa", max_age=300"#),
            "{}",
            www(&a)
        );
        let mut c = claims(FRONTEND);
        c["auth_time"] = json!(now() - 3600);
        assert!(www(&s.with_token(h2, &s.idp.es256(&c).unwrap()))
            .contains("insufficient_user_authentication"));

        let mut invalid: Vec<String> = [
            ("exp", json!(now() - 600)),
            ("nbf", json!(now() + 600)),
            ("iss", json!("https://evil.example.com")),
            ("aud", json!("ledger")),
            ("azp", json!(OTHER)),
        ]
        .into_iter()
        .map(|(k, v)| {
            let mut c = claims(FRONTEND);
            c[k] = v;
            s.idp.es256(&c).unwrap()
        })
        .collect();
        invalid.push(
            TestIdp::with_kids(ISS, s.idp.es_kid(), "r")
                .unwrap()
                .es256(&claims(FRONTEND))
                .unwrap(),
        );
        invalid.push(
            s.idp
                .mint(&json!({"alg": "none"}), &claims(FRONTEND))
                .unwrap(),
        );
        invalid.push(mint_hs256(
            s.idp.es_public_pem().unwrap().as_bytes(),
            &json!({"alg": "HS256"}),
            &claims(FRONTEND),
        ));
        invalid.push(
            s.idp
                .mint(
                    &json!({"alg": "ES256", "kid": "who-knows"}),
                    &claims(FRONTEND),
                )
                .unwrap(),
        );
        for token in &invalid {
            let a = s.with_token(h2, token);
            assert_eq!(a.status, 401);
            assert!(
                www(&a).starts_with(r#"Bearer error="invalid_token""#),
                "{}",
                www(&a)
            );
        }
        let mut c = claims(FRONTEND);
        c["cnf"] = json!({"x5t#S256": "c29tZW9uZS1lbHNl"});
        let a = s.call(
            &s.frontend,
            h2,
            "GET",
            "/cnf",
            &[(
                "authorization",
                &format!("Bearer {}", s.idp.es256(&c).unwrap()),
            )],
        );
        assert!(www(&a).starts_with(r#"Bearer error="invalid_token""#));

        // Forbidden peer (on the port, not the route) with a perfect token.
        let perfect = s.idp.es256(&claims(OTHER)).unwrap();
        let a = s.call(
            &s.other,
            h2,
            "POST",
            "/refunds/9",
            &[("authorization", &format!("Bearer {perfect}"))],
        );
        assert_eq!(a.status, 403);

        // A good token: subject passed on, token stripped, XFCC ours.
        let good = s.idp.es256(&claims(FRONTEND)).unwrap();
        let auth = format!("Bearer {good}");
        let spoof =
            "By=spiffe://mesh.test/ns/x/sa/y;URI=spiffe://mesh.test/ns/kube-system/sa/admin";
        let a = s.call(
            &s.frontend,
            h2,
            "POST",
            "/refunds/9",
            &[
                ("authorization", &auth),
                ("x-forwarded-client-cert", spoof),
                ("x-stepup-sub", "root"),
                // One key with the real ones to a CGI-style app.
                ("x_stepup_sub", "root"),
                ("x_forwarded_client_cert", spoof),
            ],
        );
        assert_eq!(a.status, 200, "{:?}", a.body);
        let seen = a.json();
        for spelled in ["x_stepup_sub", "x_forwarded_client_cert"] {
            assert!(seen["headers"].get(spelled).is_none(), "{seen}");
        }
        assert_eq!(
            seen["headers"]["x-stepup-sub"],
            json!(["alice@example.com"]),
            "{seen}"
        );
        assert!(seen["headers"].get("authorization").is_none(), "{seen}");
        assert_eq!(
            seen["headers"]["x-forwarded-client-cert"],
            json!([format!("By={SERVER_ID};URI={FRONTEND}")]),
            "{seen}"
        );
        assert_eq!(
            seen["version"],
            if app_h2 { "HTTP/2.0" } else { "HTTP/1.1" }
        );

        // One access-log line per request, and the request metrics.
        let line = s.server.wait_access("refunds 200 line", |l| {
            l["kind"] == "http" && l["route"] == "refunds" && l["status"] == 200
        });
        assert_eq!(line["stepup_sub"], "alice@example.com");
        assert_eq!(line["peer_id"], FRONTEND);
        let metrics = s.server.metrics();
        assert!(
            metrics.contains(r#"route="refunds",decision="deny",status="401""#),
            "{metrics}"
        );
        assert!(
            metrics.contains(r#"stepmesh_stepup_challenges_total{reason="no_token"} "#),
            "{metrics}"
        );
    }
}

#[test]
fn spoofed_identity_fields_never_reach_an_app_on_a_port_without_routes() {
    // No field decides here, so the inbound relay passes an HTTP/1 head's
    // fields as they came but for those it sets itself: any spelling of
    // them, any number of copies, goes.
    let s = setup_with(false, false);
    let spoof = "By=spiffe://mesh.test/ns/x/sa/y;URI=spiffe://mesh.test/ns/kube-system/sa/admin";
    let a = s.call(
        &s.frontend,
        false,
        "POST",
        "/refunds/9",
        &[
            ("X-Forwarded-Client-Cert", spoof),
            ("x-stepup-sub", "root"),
            ("x-keep", "1"),
            ("X-STEPUP-SUB", "root again"),
            ("stepmesh-orig-proto", "HTTP/2"),
            ("x-forwarded-client-cert", spoof),
            ("X_Stepup_Sub", "root, underscored"),
            ("x_forwarded-client_cert", spoof),
            ("Stepmesh_Orig_Proto", "HTTP/2"),
            ("SCRIPT_NAME", "/refunds"),
            ("Path-Info", "/admin"),
        ],
    );
    assert_eq!(a.status, 200, "no route, no step-up: {:?}", a.body);
    let seen = a.json();
    assert_eq!(
        seen["headers"]["x-forwarded-client-cert"],
        json!([format!("By={SERVER_ID};URI={FRONTEND}")]),
        "{seen}"
    );
    assert!(seen["headers"].get("x-stepup-sub").is_none(), "{seen}");
    assert!(
        seen["headers"].get("stepmesh-orig-proto").is_none(),
        "{seen}"
    );
    for spelled in [
        "x_stepup_sub",
        "x_forwarded-client_cert",
        "stepmesh_orig_proto",
        "script_name",
        "path-info",
    ] {
        assert!(seen["headers"].get(spelled).is_none(), "{seen}");
    }
    assert_eq!(seen["headers"]["x-keep"], json!(["1"]), "{seen}");
    assert_eq!(seen["version"], "HTTP/1.1");
}

#[test]
fn grpc_shaped_calls_keep_trailers_through_the_pair() {
    let s = setup(true);
    let body: &'static [u8] = b"\x00\x00\x00\x00\x05hello";
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];
    let a = s.rt.block_on(send(
        s.out(&s.frontend),
        true,
        request(true, "POST", "/grpc.Echo/Unary", &grpc, body),
    ));
    assert_eq!(&a.body[5..], b"echo:hello");
    assert_eq!(a.trailers.as_ref().unwrap()["grpc-status"], "0");
    let a = s.rt.block_on(send(
        s.out(&s.frontend),
        true,
        request(true, "POST", "/grpc.Echo/Stream", &grpc, body),
    ));
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), 5 * (5 + 5), "five framed messages");
    assert_eq!(a.trailers.as_ref().unwrap()["grpc-message"], "done");
}

#[test]
fn a_100_mib_body_streams_with_flat_sidecar_memory() {
    const MIB: usize = 1 << 20;
    for (h2, app_h2) in [(false, false), (true, true)] {
        let s = setup(app_h2);
        // Warm both sidecars (pools, TLS) before measuring.
        assert_eq!(s.call(&s.frontend, h2, "GET", "/warm", &[]).status, 200);
        let before = (
            common::ca::proc_status(s.frontend.pid(), "VmHWM:"),
            common::ca::proc_status(s.server.pid(), "VmHWM:"),
        );
        let chunk = Bytes::from(vec![1u8; 64 * 1024]);
        let frames = (0..(100 * MIB / chunk.len()))
            .map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone())));
        let mut req = request(h2, "PUT", "/upload", &[], b"");
        *req.body_mut() = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let a = s.rt.block_on(send(s.out(&s.frontend), h2, req));
        assert_eq!(a.json()["received"], json!(100 * MIB));
        let after = (
            common::ca::proc_status(s.frontend.pid(), "VmHWM:"),
            common::ca::proc_status(s.server.pid(), "VmHWM:"),
        );
        let grown = (
            after.0.saturating_sub(before.0),
            after.1.saturating_sub(before.1),
        );
        assert!(
            grown.0 < 32 * 1024 && grown.1 < 32 * 1024,
            "sidecar peak RSS grew by {grown:?} KiB for 100 MiB"
        );
    }
}

#[test]
fn auto_ports_detect_http_and_keep_opaque_tcp_working() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(TestApp::start(false));
    let echo = common::mesh::echo_server();
    let idp = TestIdp::new(ISS).unwrap();
    let jwks = idp::JwksServer::start(&idp.jwks().to_string());
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("mesh.test");
    let (web, raw) = (free_port(), free_port());
    let policy_file = dir.path().join("policy.yaml");
    let text = policy(web, &jwks).replace("protocol: http", "protocol: auto")
        + &format!(
            "    - port: {raw}\n      protocol: auto\n      allow: [{{from: [{FRONTEND}]}}]\n"
        );
    std::fs::write(&policy_file, text).unwrap();
    let files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
    let mut args = files.args();
    args.extend([
        "--inbound".into(),
        format!("127.0.0.1:{web}={}", app.addr),
        "--inbound".into(),
        format!("127.0.0.1:{raw}={echo}"),
        "--policy".into(),
        policy_file.display().to_string(),
    ]);
    let server = Sidecar::spawn(&args);
    let files = SvidFiles::write(dir.path(), "frontend", &pki, &pki.leaf(FRONTEND));
    let mut args = files.args();
    let (out_web, out_raw) = (free_port(), free_port());
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:{out_web}=127.0.0.1:{web}@{SERVER_ID}"),
        "--outbound".into(),
        format!("127.0.0.1:{out_raw}=127.0.0.1:{raw}@{SERVER_ID}"),
    ]);
    let client = Sidecar::spawn(&args);
    server.wait_ready();
    client.wait_ready();
    let out_web: SocketAddr = format!("127.0.0.1:{out_web}").parse().unwrap();
    let out_raw: SocketAddr = format!("127.0.0.1:{out_raw}").parse().unwrap();

    let a = rt.block_on(send(
        out_web,
        false,
        request(false, "GET", "/catalog", &[], b""),
    ));
    assert_eq!(a.status, 200);
    let a = rt.block_on(send(
        out_web,
        false,
        request(false, "POST", "/refunds/1", &[], b""),
    ));
    assert_eq!(a.status, 401, "routes apply on a detected auto port");
    assert_eq!(
        common::mesh::roundtrip(out_raw, b"hello, opaque").unwrap(),
        b"hello, opaque"
    );
    // What Go serves as HTTP (any token is a method) is HTTP here too: a
    // caller's identity field never reaches the app as opaque bytes.
    for method in ["get", "M-SEARCH"] {
        let req =
            format!("{method} / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert: URI=x\r\n\r\n");
        let back = common::mesh::roundtrip(out_raw, req.as_bytes()).unwrap_or_default();
        let back = String::from_utf8_lossy(&back);
        assert!(!back.contains("URI=x"), "{method}: the app got it: {back}");
    }
    let back =
        common::mesh::roundtrip(out_web, b"\x16\x03\x01 not http at all").unwrap_or_default();
    assert!(
        back.is_empty(),
        "opaque bytes on a port with routes never reach the app: {back:?}"
    );
}

#[test]
fn sigterm_closes_idle_http_connections_without_waiting_for_the_deadline() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(TestApp::start(false));
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("mesh.test");
    let port = free_port();
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(
        &policy_file,
        format!("trustDomain: mesh.test\ninbound:\n  ports:\n    - port: {port}\n      protocol: http\n      allow: [{{from: [{FRONTEND}]}}]\n"),
    )
    .unwrap();
    let files = SvidFiles::write(dir.path(), "server", &pki, &pki.leaf(SERVER_ID));
    let mut args = files.args();
    args.extend(["--inbound".into(), format!("127.0.0.1:{port}={}", app.addr)]);
    args.extend([
        "--policy".into(),
        policy_file.display().to_string(),
        "--drain-timeout".into(),
        "60s".into(),
    ]);
    let mut server = Sidecar::spawn(&args);
    let files = SvidFiles::write(dir.path(), "frontend", &pki, &pki.leaf(FRONTEND));
    let mut args = files.args();
    args.extend([
        "--outbound".into(),
        format!("127.0.0.1:0=127.0.0.1:{port}@{SERVER_ID}"),
    ]);
    args.extend(["--drain-timeout".into(), "60s".into()]);
    let mut client = Sidecar::spawn(&args);
    server.wait_ready();
    client.wait_ready();
    let outbound = client.listener("outbound");
    // An idle keep-alive connection from the app, and the pooled mesh
    // connection behind it, both stay open after this request.
    let idle = rt.block_on(async {
        let io =
            hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(outbound).await.unwrap());
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let resp = send
            .send_request(request(false, "GET", "/catalog", &[], b""))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        send
    });
    for sidecar in [&mut server, &mut client] {
        let started = std::time::Instant::now();
        sidecar.signal(libc::SIGTERM);
        let status = sidecar.wait_exit();
        assert!(status.success(), "{status:?}");
        sidecar.wait_log("drained", |l| (l["message"] == "drained").then_some(()));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "drain waited for the deadline"
        );
    }
    drop(idle);
}
