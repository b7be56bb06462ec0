//! `stepmesh login`, the kubectl exec credential plugin, as kubectl runs
//! it: the real binary with `KUBERNETES_EXEC_INFO`, against the test
//! OpenID provider (`stepmesh::demo::idp`, in process, over HTTPS with a
//! CA made here). A thread reads the plugin's stderr, takes the user code
//! from its "open ... (code XXXX-XXXX)" line and approves (or denies) it at
//! the provider's `/device/approve`, standing in for the person. A small
//! HTTPS server named a stand-in for the gateway serves the challenge
//! endpoint; another, a stand-in for the API server, lets a real kubectl
//! run the plugin.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod login_support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use stepmesh::demo::idp::{ACR_MFA, ACR_PWD};

use login_support::{
    cached_entry, kubectl, mode, now, on_path, sleep_until, verify, Act, Fixture, StandIn, STEPMESH,
};

#[test]
fn device_flow_then_cache_then_refresh_then_login_again() {
    // Tokens live 6 s; the plugin renews any expiring within 2 s.
    let f = Fixture::new(Duration::from_secs(6));
    let validity = ["--min-validity", "2s"];

    let before = now();
    let first = f.plugin(&validity, None, Act::Approve { mfa: false });
    assert_eq!(first.codes.len(), 1, "one device flow:\n{}", first.stderr);
    assert_eq!(first.decisions, vec![200]);
    let (token, claims) = f.credential(&first);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], "kubectl");
    assert_eq!(claims["azp"], "kubectl");
    assert_eq!(claims["email"], "alice@example.com");
    assert_eq!(claims["groups"], json!(["payments-admins"]));
    assert_eq!(claims["acr"], ACR_PWD);
    assert_eq!(claims["amr"], json!(["pwd"]));
    let auth_time = claims["auth_time"].as_u64().unwrap();
    assert!(auth_time >= before && auth_time <= now(), "{claims}");
    let request = f.idp.device_requests().pop().unwrap();
    assert_eq!(request.scope, "openid email groups offline_access");
    assert!(request.acr_values.is_empty() && request.max_age.is_none());

    let file = f.cache_file();
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&f.cache_dir()), 0o700);
    let entry = cached_entry(&f);
    assert_eq!(entry["id_token"], token);
    assert_eq!(entry["expiry"], claims["exp"]);
    let refresh_token = entry["refresh_token"].as_str().unwrap().to_owned();
    assert!(!first.stderr.contains(&refresh_token));

    // Still valid: the cache answers, no device flow, no refresh.
    let second = f.plugin(&validity, None, Act::Deny);
    assert!(second.codes.is_empty(), "{}", second.stderr);
    assert_eq!(f.credential(&second).0, token);
    assert_eq!(f.idp.refreshes(), 0);

    // Within 2 s of expiry: refreshed, the same login (auth_time, acr).
    sleep_until(claims["exp"].as_u64().unwrap() - 1);
    let third = f.plugin(&validity, None, Act::Deny);
    assert!(third.codes.is_empty(), "no device flow:\n{}", third.stderr);
    let (refreshed, again) = f.credential(&third);
    assert_ne!(refreshed, token);
    assert_eq!(again["auth_time"].as_u64(), Some(auth_time));
    assert_eq!(again["acr"], ACR_PWD);
    assert!(again["iat"].as_u64() > claims["iat"].as_u64());
    assert_eq!(f.idp.refreshes(), 1);
    let entry = cached_entry(&f);
    assert_eq!(entry["id_token"], refreshed);
    assert_ne!(entry["refresh_token"], refresh_token.as_str(), "rotated");

    // The provider ended the session: the refresh fails, a device flow follows.
    f.idp.revoke_refresh_tokens();
    sleep_until(again["exp"].as_u64().unwrap() - 1);
    let fourth = f.plugin(&validity, None, Act::Approve { mfa: false });
    assert_eq!(fourth.codes.len(), 1, "{}", fourth.stderr);
    let (_, relogin) = f.credential(&fourth);
    assert!(relogin["auth_time"].as_u64() > Some(auth_time));
    assert_eq!(f.idp.refreshes(), 1);

    // --logout removes the entry and prints nothing on stdout.
    let out = f.plugin(&["--logout"], None, Act::Deny);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "");
    assert_eq!(std::fs::read_dir(f.cache_dir()).unwrap().count(), 0);
}

/// A stand-in for a server (the gateway's challenge endpoint, or the API
/// server for kubectl): HTTPS with its own CA; records every request's
#[test]
fn a_pending_challenge_demanding_mfa_triggers_a_step_up_login() {
    let f = Fixture::new(Duration::from_secs(300));
    // The stand-in for the gateway: what its challenge endpoint answers.
    let answer: Arc<Mutex<(u16, String)>> = Arc::new(Mutex::new((204, String::new())));
    let current = answer.clone();
    let gateway = StandIn::start(
        &f,
        "gateway",
        Arc::new(move |method, path| match (method, path) {
            ("GET", "/stepmesh/v1/challenge") => current.lock().unwrap().clone(),
            _ => (404, "{}".into()),
        }),
    );
    let info = gateway.exec_info();
    let challenged = |max_age: u64| {
        let body = json!({
            "provider": "corp", "issuer": f.idp.issuer(), "acrValues": [ACR_MFA],
            "maxAge": max_age, "rule": "delete-in-prod", "issuedAt": now(),
        });
        *answer.lock().unwrap() = (200, body.to_string());
    };

    // Nothing pending: a plain login; the gateway was asked with that token.
    let first = f.plugin(&[], Some(&info), Act::Approve { mfa: false });
    let (pwd_token, claims) = f.credential(&first);
    assert_eq!(claims["acr"], ACR_PWD);
    let asked = gateway.requests();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].1, "/stepmesh/v1/challenge");
    assert_eq!(asked[0].2, format!("Bearer {pwd_token}"));

    // The gateway refused a sensitive request: MFA pending. A new device
    // flow asks for it; without the MFA step the provider refuses.
    challenged(600);
    let second = f.plugin(&[], Some(&info), Act::MfaAfterRefusal);
    assert_eq!(second.codes.len(), 1, "{}", second.stderr);
    assert_eq!(second.decisions, vec![400, 200]);
    assert!(
        second.stderr.contains(&format!(
            "the gateway requires acr {ACR_MFA} and a login within 600 s (rule delete-in-prod)"
        )),
        "{}",
        second.stderr
    );
    let (mfa_token, mfa) = f.credential(&second);
    assert_eq!(mfa["acr"], ACR_MFA);
    assert_eq!(mfa["amr"], json!(["pwd", "otp"]));
    let request = f.idp.device_requests().pop().unwrap();
    assert_eq!(request.acr_values, vec![ACR_MFA.to_owned()]);
    assert_eq!(request.max_age, Some(600));
    let asked = gateway.requests();
    assert_eq!(asked.len(), 2, "asked once per run");
    assert_eq!(asked[1].2, format!("Bearer {pwd_token}"));
    assert_eq!(cached_entry(&f)["id_token"], mfa_token);

    // Still pending, but the cached token meets it: no new login.
    let third = f.plugin(&[], Some(&info), Act::Deny);
    assert!(third.codes.is_empty(), "{}", third.stderr);
    assert_eq!(f.credential(&third).0, mfa_token);

    // maxAge 1 s and a login 2 s old: log in again.
    challenged(1);
    sleep_until(mfa["auth_time"].as_u64().unwrap() + 2);
    let fourth = f.plugin(&[], Some(&info), Act::Approve { mfa: true });
    assert_eq!(fourth.codes.len(), 1, "{}", fourth.stderr);
    let (_, fresh) = f.credential(&fourth);
    assert!(fresh["auth_time"].as_u64() > mfa["auth_time"].as_u64());
    assert_eq!(f.idp.device_requests().pop().unwrap().max_age, Some(1));

    // The gateway does not accept the token (401): a fresh login, once.
    *answer.lock().unwrap() = (401, String::new());
    let fifth = f.plugin(&[], Some(&info), Act::Approve { mfa: false });
    assert_eq!(fifth.codes.len(), 1, "{}", fifth.stderr);
    assert!(fifth.stderr.contains("does not accept the cached token"));
    assert_eq!(f.credential(&fifth).1["acr"], ACR_PWD);

    // The gateway unreachable: the current token, no login.
    let gone = json!({"kind": "ExecCredential", "apiVersion": "client.authentication.k8s.io/v1",
        "spec": {"cluster": {"server": "https://127.0.0.1:1"}, "interactive": false}});
    let sixth = f.plugin(&[], Some(&gone.to_string()), Act::Deny);
    assert!(sixth.codes.is_empty(), "{}", sixth.stderr);
    f.credential(&sixth);
}

#[test]
fn the_code_flow_with_pkce_logs_in_through_a_browser() {
    if !on_path("curl") {
        println!("skipped: no curl on PATH to stand in for the browser");
        return;
    }
    let f = Fixture::new(Duration::from_secs(300));
    let pkce = ["--flow", "pkce", "--login-timeout", "30s"];
    let first = f.plugin(&pkce, None, Act::Browser { mfa: false });
    assert_eq!(first.codes, vec!["browser"], "{}", first.stderr);
    assert_eq!(
        first.decisions,
        vec![200],
        "the plugin's page after the redirect"
    );
    let (_, claims) = f.credential(&first);
    assert_eq!(
        (claims["sub"].as_str(), claims["acr"].as_str()),
        (Some("alice"), Some(ACR_PWD))
    );
    assert!(claims["nonce"].as_str().is_some_and(|n| n.len() >= 16));
    assert!(f.idp.device_requests().is_empty(), "no device flow");

    // A pending MFA challenge: the browser login asks for it.
    let gateway = StandIn::start(
        &f,
        "gateway",
        Arc::new(move |_, path| match path {
            "/stepmesh/v1/challenge" => (
                200,
                json!({"acrValues": [ACR_MFA], "rule": "exec"}).to_string(),
            ),
            _ => (404, String::new()),
        }),
    );
    let second = f.plugin(
        &pkce,
        Some(&gateway.exec_info()),
        Act::Browser { mfa: true },
    );
    assert_eq!(second.codes.len(), 1, "{}", second.stderr);
    assert!(
        second
            .stderr
            .contains(&format!("requires acr {ACR_MFA} (rule exec)")),
        "{}",
        second.stderr
    );
    let url = second
        .stderr
        .lines()
        .find(|l| l.contains("/authorize?"))
        .unwrap();
    assert!(
        url.contains("acr_values=urn%3Astepmesh%3Aacr%3Amfa"),
        "{url}"
    );
    assert_eq!(f.credential(&second).1["acr"], ACR_MFA);

    // Denied in the browser: exit 1, one line.
    let logout = f.plugin(&["--logout"], None, Act::Deny);
    assert_eq!(logout.code, Some(0));
    let denied = f.plugin(&pkce, None, Act::BrowserDeny);
    assert_eq!(denied.code, Some(1), "{}", denied.stderr);
    assert_eq!(
        denied.stderr.lines().last(),
        Some("stepmesh: the login was denied at the identity provider")
    );
}

#[test]
fn a_denied_login_is_a_clear_error() {
    let f = Fixture::new(Duration::from_secs(300));
    let run = f.plugin(&[], None, Act::Deny);
    assert_eq!(run.decisions, vec![200]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert_eq!(run.stdout, "");
    let last = run.stderr.lines().last().unwrap();
    assert_eq!(
        last,
        "stepmesh: the login was denied at the identity provider"
    );
    assert!(!f.cache_dir().exists() || std::fs::read_dir(f.cache_dir()).unwrap().count() == 0);
}

#[test]
fn bad_command_lines_and_inputs_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().to_str().unwrap();
    let base = ["login", "--client-id", "kubectl", "--cache-dir", cache];
    let cases: Vec<(Vec<&str>, Option<&str>, &str)> = vec![
        (vec!["login", "--client-id", "k"], None, "--issuer"),
        (
            [&base[..], &["--issuer", "http://idp.example.com"]].concat(),
            None,
            "must be an https URL",
        ),
        (
            [
                &base[..],
                &[
                    "--issuer",
                    "https://idp",
                    "--ca-file",
                    "/nonexistent/ca.pem",
                ],
            ]
            .concat(),
            None,
            "/nonexistent/ca.pem",
        ),
        (
            [
                &base[..],
                &["--issuer", "https://idp", "--min-validity", "soon"],
            ]
            .concat(),
            None,
            "--min-validity",
        ),
        (
            [&base[..], &["--issuer", "https://idp", "--frob"]].concat(),
            None,
            "--frob",
        ),
        (
            [&base[..], &["--issuer", "https://idp"]].concat(),
            Some("{not json"),
            "KUBERNETES_EXEC_INFO",
        ),
        (
            [
                &base[..],
                &[
                    "--issuer",
                    "https://idp",
                    "--gateway",
                    "http://gw.example.com",
                ],
            ]
            .concat(),
            Some(""),
            "--gateway",
        ),
    ];
    for (args, info, names) in cases {
        let mut cmd = Command::new(STEPMESH);
        cmd.args(&args);
        match info {
            Some(info) => cmd.env("KUBERNETES_EXEC_INFO", info),
            None => cmd.env_remove("KUBERNETES_EXEC_INFO"),
        };
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("stepmesh: ") && stderr.contains(names),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn kubectl_sends_the_token_the_plugin_printed() {
    let Some(kubectl) = kubectl() else {
        println!("skipped: no kubectl ($KUBEBUILDER_ASSETS/kubectl or on PATH)");
        return;
    };
    let f = Fixture::new(Duration::from_secs(300));
    // A stand-in for the API server: legacy discovery and an empty PodList.
    let api = StandIn::start(
        &f,
        "apiserver",
        Arc::new(|method, path| {
            let body = match (method, path) {
                ("GET", "/api") => json!({"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
                ("GET", "/apis") => {
                    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
                }
                ("GET", "/api/v1") => json!({"kind": "APIResourceList", "groupVersion": "v1",
                    "resources": [{"name": "pods", "singularName": "pod", "namespaced": true,
                        "kind": "Pod", "verbs": ["get", "list"], "shortNames": ["po"]}]}),
                ("GET", "/api/v1/namespaces/default/pods") => json!({"kind": "PodList",
                    "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []}),
                _ => {
                    return (
                        404,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "NotFound", "code": 404})
                        .to_string(),
                    )
                }
            };
            (200, body.to_string())
        }),
    );
    let args: Vec<Value> = f.login_args().into_iter().map(Value::from).collect();
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {
            "server": api.url, "certificate-authority": api.ca_file}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "alice"}}],
        "users": [{"name": "alice", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": STEPMESH, "args": args,
            "interactiveMode": "IfAvailable", "provideClusterInfo": true}}}],
    });
    let config = f.dir.path().join("kubeconfig");
    std::fs::write(&config, kubeconfig.to_string()).unwrap();
    let mut cmd = Command::new(&kubectl);
    cmd.arg("--kubeconfig")
        .arg(&config)
        .arg("--cache-dir")
        .arg(f.dir.path().join("kube-cache"))
        .args(["get", "pods", "-n", "default", "-o", "name"]);
    let run = f.run(cmd, Act::Approve { mfa: false });
    assert_eq!(run.code, Some(0), "kubectl failed:\n{}", run.stderr);
    assert_eq!(
        run.codes.len(),
        1,
        "the plugin's line reached kubectl's stderr:\n{}",
        run.stderr
    );

    let token = cached_entry(&f)["id_token"].as_str().unwrap().to_owned();
    assert_eq!(verify(&f.idp, &token)["sub"], "alice");
    let seen = api.requests();
    let pods: Vec<_> = seen
        .iter()
        .filter(|(m, p, _)| m == "GET" && p == "/api/v1/namespaces/default/pods")
        .collect();
    assert!(!pods.is_empty(), "kubectl never listed pods: {seen:?}");
    for (_, _, auth) in pods {
        assert_eq!(*auth, format!("Bearer {token}"));
    }
    // The plugin asked the cluster (no stepmesh gateway: 404) and went on.
    assert!(seen.iter().any(|(_, p, _)| p == "/stepmesh/v1/challenge"));
}
