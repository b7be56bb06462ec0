//! The envtest harness itself (tests/common/envtest.rs): a real
//! kube-apiserver and etcd start, the real kubectl reaches them with the
//! admin kubeconfig, the audit log records who did what, and no process
//! outlives the test process, however it ends.

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::envtest::{kubeconfig, run_kubectl, Envtest, KubeconfigUser};

/// Set in the child test process of [`no_process_outlives_a_killed_test_process`].
const PROBE_ENV: &str = "STEPMESH_ENVTEST_PROBE";

#[test]
fn kubectl_reaches_the_api_server_as_admin_and_the_audit_log_records_it() {
    let Some(k8s) = Envtest::shared() else { return };
    println!("startup {:?}", k8s.startup);
    let names = k8s.kubectl_ok(&["get", "namespaces", "-o", "name"]);
    for ns in ["namespace/default", "namespace/kube-system"] {
        assert!(names.lines().any(|l| l == ns), "{ns} missing: {names}");
    }
    let who = k8s.kubectl_ok(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(who, "envtest-admin");

    k8s.create_namespace("harness-a");
    k8s.create_configmap("harness-a", "settings", &[("mode", "on: yes")]);
    let value = k8s.kubectl_ok(&[
        "get",
        "configmap",
        "settings",
        "-n",
        "harness-a",
        "-o",
        "jsonpath={.data.mode}",
    ]);
    assert_eq!(value, "on: yes");

    // A raw request, matched to its audit event by the Audit-Id header.
    let r = k8s.admin().request(
        "GET",
        "/api/v1/namespaces/harness-a/configmaps/settings",
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body_text());
    let id = r.audit_id().expect("the API server names the audit ID");
    let events = k8s.audit().wait(id);
    let e = events.last().expect("an audit event for the request");
    assert_eq!(e.user.username, "envtest-admin");
    assert!(e.user.groups.iter().any(|g| g == "system:masters"));
    assert_eq!(e.verb, "get");
    let o = e.object_ref.as_ref().unwrap();
    assert_eq!(
        (o.resource.as_str(), o.namespace.as_str(), o.name.as_str()),
        ("configmaps", "harness-a", "settings")
    );
    assert_eq!(e.response_status.as_ref().unwrap().code, 200);
    assert!(e.annotations.contains_key("authorization.k8s.io/decision"));
}

#[test]
fn impersonation_shows_in_the_audit_log() {
    let Some(k8s) = Envtest::shared() else { return };
    let r = k8s.admin().request(
        "GET",
        "/api/v1/namespaces/default/secrets",
        &[
            ("Impersonate-User", "alice@example.com"),
            ("Impersonate-Group", "devs"),
            ("Impersonate-Extra-acr", "mfa"),
        ],
        b"",
    );
    // alice has no RBAC: 403, decided after impersonation.
    assert_eq!(r.status, 403, "{}", r.body_text());
    let e = k8s.audit().wait(r.audit_id().unwrap()).pop().unwrap();
    let who = e.impersonated_user.expect("impersonatedUser");
    assert_eq!(who.username, "alice@example.com");
    assert!(who.groups.iter().any(|g| g == "devs"));
    assert_eq!(who.extra.get("acr"), Some(&vec!["mfa".to_owned()]));
    assert_eq!(e.user.username, "envtest-admin");
    assert_eq!(e.response_status.unwrap().code, 403);
    assert_eq!(
        e.annotations
            .get("authorization.k8s.io/decision")
            .map(String::as_str),
        Some("forbid")
    );
}

#[test]
fn a_service_account_token_authenticates() {
    let Some(k8s) = Envtest::shared() else { return };
    k8s.create_namespace("harness-sa");
    let token = k8s.service_account_token("harness-sa", "robot", "");
    let bearer = format!("Bearer {token}");
    let r = k8s.client(None).request(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        br#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body_text());
    assert!(
        r.body_text()
            .contains("system:serviceaccount:harness-sa:robot"),
        "{}",
        r.body_text()
    );
    // The same token in a kubeconfig of its own, for the real kubectl.
    let config = k8s.dir.join("robot.kubeconfig");
    let user = KubeconfigUser::Token(token.clone());
    std::fs::write(&config, kubeconfig(&k8s.url, &k8s.ca_file, &user)).unwrap();
    let out = run_kubectl(
        &k8s.assets,
        &config,
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"system:serviceaccount:harness-sa:robot");
}

/// Run only as the child of [`no_process_outlives_a_killed_test_process`]:
/// starts an envtest, prints its PIDs and data dir, and waits to be killed.
#[test]
fn probe_holds_an_envtest_until_killed() {
    if std::env::var_os(PROBE_ENV).is_none() {
        println!("skip: run by no_process_outlives_a_killed_test_process as its child");
        return;
    }
    let Some(k8s) = Envtest::start(&[]) else {
        return;
    };
    let (etcd, apiserver) = k8s.pids();
    println!(
        "PROBE {} {} {}",
        etcd.unwrap(),
        apiserver.unwrap(),
        k8s.dir.display()
    );
    std::thread::sleep(Duration::from_secs(300));
}

#[test]
fn no_process_outlives_a_killed_test_process() {
    if common::envtest::assets().is_err() {
        println!("skip: KUBEBUILDER_ASSETS is unset or incomplete");
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "probe_holds_an_envtest_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    while !line.starts_with("PROBE ") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "probe ended early");
    }
    let fields: Vec<&str> = line.split_whitespace().collect();
    let pids: Vec<u32> = fields[1..3].iter().map(|p| p.parse().unwrap()).collect();
    let dir = std::path::PathBuf::from(fields[3]);
    assert!(pids.iter().all(|p| alive(*p)), "{pids:?} not running");
    assert!(dir.is_dir());

    child.kill().unwrap(); // SIGKILL: no destructor, no atexit
    child.wait().unwrap();
    let killed = Instant::now();
    while pids.iter().any(|p| alive(*p)) || dir.exists() {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "still there 15 s after the test process died: {:?}, dir {}",
            pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>(),
            dir.exists()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "etcd and kube-apiserver gone, data dir removed {:?} after SIGKILL",
        killed.elapsed()
    );
}

/// Running: present in /proc and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}
