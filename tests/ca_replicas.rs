//! The CA as two replicas: two real `stepmesh ca serve` processes signing
//! under the same key material (the state files copied), sharing
//! revocations through a ConfigMap of a real kube-apiserver (envtest;
//! skipped with a printed reason without KUBEBUILDER_ASSETS), as the
//! ServiceAccount of deploy/ca with exactly the Role of deploy/ca/rbac.yaml.
//! A revocation made through one replica is enforced by sidecars fed by the
//! other within 5 s and survives a restart (so do a serial revoke found at
//! the issuing replica and a forced re-issue); a replica SIGKILLed while a
//! sidecar renews under load costs no request (the sidecar renews from the
//! other); a bad `--shared-state` or a malformed object changes nothing;
//! with the API server down replicas serve their last state and refuse
//! changes; deploy/ca passes a server-side dry run.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::ca::CaProcess;
use common::ca_mesh::*;
use common::envtest::Envtest;
use common::mesh::*;

/// How soon a change made through one replica is enforced by the other's sidecars.
const SHARED_WITHIN: Duration = Duration::from_secs(5);
const STATE: &str = "stepmesh-ca-state";

/// The API server, the CA's token (deploy/ca's Role in `ns`) and the files
/// every replica is started with.
struct Cluster<'k> {
    k8s: &'k Envtest,
    ns: String,
    dir: tempfile::TempDir,
    admin_token: PathBuf,
}

impl<'k> Cluster<'k> {
    fn new(k8s: &'k Envtest, ns: &str) -> Self {
        k8s.create_namespace(ns);
        // deploy/ca/rbac.yaml's namespaced objects, in this namespace.
        let rbac = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ca/rbac.yaml"),
        )
        .unwrap();
        for doc in rbac.split("\n---\n") {
            if doc.contains("kind: Role\n") || doc.contains("kind: RoleBinding\n") {
                k8s.apply(&doc.replace("stepmesh-system", ns));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let token = k8s.service_account_token(ns, "stepmesh-ca", "");
        std::fs::write(dir.path().join("sa.token"), token).unwrap();
        let admin_token = admin_token(dir.path(), ADMIN_TOKEN);
        Self {
            k8s,
            ns: ns.to_owned(),
            dir,
            admin_token,
        }
    }

    fn shared_flags(&self) -> Vec<String> {
        let object = format!("configmap/{}/{STATE}", self.ns);
        let token = self.dir.path().join("sa.token");
        [
            "--shared-state",
            &object,
            "--shared-state-server",
            &self.k8s.url,
            "--shared-state-ca-file",
            self.k8s.ca_file.to_str().unwrap(),
            "--shared-state-token-file",
            token.to_str().unwrap(),
            "--admin-token-file",
            self.admin_token.to_str().unwrap(),
            "--sign-burst",
            "100",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Replica 1 (makes the root), then replica 2 on a copy of its key
    /// material (as deploy/ mounts one Secret into both pods).
    fn two_replicas(&self) -> (CaProcess, CaProcess) {
        let flags = self.shared_flags();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let one = CaProcess::start_with(TD, &PAIR_TOKENS, &flags);
        let state = copy_keys(&one.state_dir, &self.dir.path().join("replica-2"));
        let two = CaProcess::spawn(TD, &state, &one.join_tokens_path, &flags);
        assert_eq!(one.bundle_pem, two.bundle_pem, "one root");
        (one, two)
    }

    /// `stepmesh ca SUB` at `ca` with the admin token.
    fn admin(&self, ca: &CaProcess, sub: &str, args: &[&str]) -> Output {
        admin(
            &ca.grpc_host_port(),
            &ca.bundle_path,
            &self.admin_token,
            sub,
            args,
        )
    }

    fn configmap(&self) -> serde_json::Value {
        let out = self
            .k8s
            .kubectl_ok(&["get", "configmap", STATE, "-n", &self.ns, "-o", "json"]);
        serde_json::from_str(&out).unwrap()
    }
}

/// A state dir holding `from`'s key material (not its revocation files).
fn copy_keys(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir(to).unwrap();
    for file in std::fs::read_dir(from).unwrap() {
        let file = file.unwrap();
        let name = file.file_name();
        if name != "issued.jsonl" && name != "revocations.json" {
            std::fs::copy(file.path(), to.join(&name)).unwrap();
        }
    }
    to.to_owned()
}

fn ca_metric(ca: &CaProcess, series: &str) -> f64 {
    metric_value(&ca.admin_get("/metrics").1, series)
}

#[test]
fn a_revocation_through_one_replica_is_enforced_by_the_others_sidecars() {
    let Some(k8s) = Envtest::shared() else { return };
    let cluster = Cluster::new(k8s, "ca-replicas-revoke");
    let (one, two) = cluster.two_replicas();
    // Sidecars fed by replica 2 only.
    let (server, client, outbound) = mesh(
        &two.grpc_host_port(),
        &two.bundle_path,
        cluster.dir.path(),
        "1h",
    );
    let mut conn = live(outbound);

    // Revoke X through replica 1.
    let out = cluster.admin(
        &one,
        "revoke",
        &["--id", CLIENT_ID, "--reason", "compromised"],
    );
    let revoked = Instant::now();
    assert!(out.status.success(), "{}", text(&out));
    let closed = closed_at(&mut conn).duration_since(revoked);
    eprintln!("X's live connection (fed by replica 2) closed {closed:?} after the revoke through replica 1");
    assert!(closed < SHARED_WITHIN, "closed after {closed:?}");
    assert!(
        roundtrip(outbound, b"new").unwrap_or_default() != b"new",
        "a new connection from X is refused"
    );
    two.wait_audit(|v| v["decision"] == "shared_state" && v["outcome"] == "applied");
    assert!(
        ca_metric(
            &two,
            "stepmesh_ca_shared_state_events_total{event=\"applied\"}"
        ) >= 1.0
    );
    assert!(
        ca_metric(
            &one,
            "stepmesh_ca_shared_state_events_total{event=\"written\"}"
        ) >= 1.0
    );
    let stored = cluster.configmap();
    assert!(
        stored["data"]["revocations.json"]
            .as_str()
            .unwrap()
            .contains(CLIENT_ID),
        "{stored}"
    );

    // A serial is known to the replica that issued it: through replica 1
    // alone it is unknown; with both replicas named, the CLI finds it.
    let serial = client.config()["serial"].as_str().unwrap().to_owned();
    let out = cluster.admin(&one, "revoke", &["--serial", &serial]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("is not a certificate this CA issued"),
        "{}",
        text(&out)
    );
    let both = format!("{},{}", one.grpc_host_port(), two.grpc_host_port());
    let out = admin(
        &both,
        &one.bundle_path,
        &cluster.admin_token,
        "revoke",
        &["--serial", &serial],
    );
    assert!(out.status.success(), "{}", text(&out));

    // A forced re-issue through replica 1 reaches the server sidecar fed
    // by replica 2 (rotations are shared state too).
    let server_serial = server.config()["serial"].clone();
    let out = cluster.admin(&one, "rotate", &["--id", SERVER_ID]);
    assert!(out.status.success(), "{}", text(&out));
    eventually("the server sidecar renews from replica 2", || {
        (server.config()["serial"] != server_serial).then_some(())
    });

    // The list through replica 2 shows it; so it does after a restart.
    let out = cluster.admin(&two, "revocations", &[]);
    assert!(text(&out).contains(CLIENT_ID), "{}", text(&out));
    let flags = cluster.shared_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let two = two.restart(&flags);
    let out = cluster.admin(&two, "revocations", &[]);
    assert!(
        text(&out).contains(CLIENT_ID),
        "kept across a restart: {}",
        text(&out)
    );
    // X cannot renew from the restarted replica either.
    let err = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async {
            two.client()
                .issue(
                    &stepmesh_ca::client::Credential::Token("client-token".into()),
                    None,
                )
                .await
        })
        .unwrap_err();
    assert!(err.to_string().contains("is revoked"), "{err}");

    // Malformed state in the object: both replicas keep their last good
    // state, a revoke is refused with the reason, the object is untouched.
    let before = two.logs().len();
    k8s.kubectl_ok(&[
        "patch",
        "configmap",
        STATE,
        "-n",
        &cluster.ns,
        "--type",
        "merge",
        "-p",
        r#"{"data":{"revocations.json":"not json"}}"#,
    ]);
    let version = cluster.configmap()["metadata"]["resourceVersion"].clone();
    eventually("replica 2 says the object is malformed", || {
        two.logs()[before..]
            .iter()
            .any(|l| l.contains("is malformed") && l.contains("not a revocation list"))
            .then_some(())
    });
    assert!(
        ca_metric(
            &two,
            "stepmesh_ca_shared_state_events_total{event=\"malformed\"}"
        ) >= 1.0
    );
    let out = cluster.admin(&two, "revocations", &[]);
    assert!(
        text(&out).contains(CLIENT_ID),
        "last good state kept: {}",
        text(&out)
    );
    let out = cluster.admin(&one, "revoke", &["--id", SERVER_ID]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("malformed") && text(&out).contains("nothing was changed"),
        "{}",
        text(&out)
    );
    assert_eq!(
        cluster.configmap()["metadata"]["resourceVersion"],
        version,
        "object untouched"
    );
    assert!(
        roundtrip(outbound, b"still").unwrap_or_default() != b"still",
        "X is still refused"
    );
    // A replica starting on a malformed object refuses to start, saying why.
    let three = copy_keys(&two.state_dir, &cluster.dir.path().join("replica-3"));
    let out = common::ca::serve_refused(&three, &[&["--trust-domain", TD][..], &flags].concat());
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is malformed"), "{}", text(&out));

    // A bad --shared-state value: a usage error naming the form, no start.
    let out = common::ca::serve_refused(
        &cluster.dir.path().join("unused"),
        &["--trust-domain", TD, "--shared-state", "secret/ns"],
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("configmap/NAMESPACE/NAME"),
        "{}",
        text(&out)
    );
    assert!(!cluster.dir.path().join("unused").exists(), "nothing made");
}

#[test]
fn killing_the_replica_a_sidecar_renews_from_loses_no_request() {
    let Some(k8s) = Envtest::shared() else { return };
    let cluster = Cluster::new(k8s, "ca-replicas-kill");
    let (mut one, two) = cluster.two_replicas();
    // X renews every ~3 s from whichever replica answers; replica 1 first.
    let both = format!("{},{}", one.grpc_host_port(), two.grpc_host_port());
    let (server, client, outbound) = mesh(&both, &one.bundle_path, cluster.dir.path(), "6s");
    let issued_by = |ca: &CaProcess| {
        ca.audit()
            .iter()
            .filter(|v| {
                v["decision"] == "sign" && v["outcome"] == "issued" && v["identity"] == CLIENT_ID
            })
            .count()
    };
    one.wait_audit(|v| v["decision"] == "sign" && v["identity"] == CLIENT_ID);

    let load = Load::start(outbound);
    // Kill replica 1 while X is renewing from it.
    let serial = client.config()["serial"].as_str().unwrap().to_owned();
    eventually("X renews from replica 1 under load", || {
        (client.config()["serial"] != serial.as_str()).then_some(())
    });
    one.stop(); // SIGKILL
    let killed = Instant::now();
    let from_two_before = issued_by(&two);
    // Three renewals after the kill: each from replica 2, each in use.
    let mut seen = vec![client.config()["serial"].as_str().unwrap().to_owned()];
    while seen.len() < 4 {
        let now = eventually("X renews after the kill", || {
            let s = client.config()["serial"].as_str().unwrap().to_owned();
            (!seen.contains(&s)).then_some(s)
        });
        seen.push(now);
    }
    let LoadResult {
        ok,
        failed,
        fresh_ok,
        fresh_failed,
    } = load.stop();
    eprintln!(
        "after the SIGKILL of replica 1: renewals {:?} over {:?}; kept connections: {ok} ok, {failed} failed; new connections: {fresh_ok} ok, {fresh_failed} failed",
        &seen[1..],
        killed.elapsed()
    );
    assert!(
        issued_by(&two) >= from_two_before + 3,
        "renewed from replica 2"
    );
    assert_eq!(failed, 0, "no request on a kept connection failed");
    assert_eq!(fresh_failed, 0, "no new connection failed");
    assert!(ok > 100 && fresh_ok > 10, "load ran: {ok} {fresh_ok}");
    // The first renewal after the kill asked replica 1 (the one that
    // answered last) and moved on: the operator sees it counted.
    let failovers = client.metric("stepmesh_ca_replica_failovers_total");
    assert!(failovers >= 1.0, "failovers counted: {failovers}");

    // The trust-bundle streams (on replica 1 before the kill) moved to
    // replica 2: a revocation made there reaches the pair.
    let out = cluster.admin(&two, "revoke", &["--id", CLIENT_ID]);
    assert!(out.status.success(), "{}", text(&out));
    // (This namespace had no revocation: the first list that is not empty
    // came over a stream from replica 2.)
    server.wait_log("a revocation list from replica 2", |v| {
        (v["message"] == "revocation list updated" && v["empty"] == false).then_some(())
    });
    eventually("the pair enforces it", || {
        (roundtrip(outbound, b"after").unwrap_or_default() != b"after").then_some(())
    });
}

#[test]
fn deploy_ca_is_accepted_by_the_api_server() {
    let Some(k8s) = Envtest::shared() else { return };
    k8s.create_namespace("stepmesh-system");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ca");
    let out = k8s.kubectl_ok(&["apply", "--dry-run=server", "-k", dir.to_str().unwrap()]);
    for object in [
        "deployment.apps/stepmesh-ca",
        "poddisruptionbudget.policy/stepmesh-ca",
        "role.rbac.authorization.k8s.io/stepmesh-ca-state",
        "rolebinding.rbac.authorization.k8s.io/stepmesh-ca-state",
        "service/stepmesh-ca-replicas",
    ] {
        assert!(
            out.contains(&format!("{object} created (server dry run)")),
            "{out}"
        );
    }
}

#[test]
fn with_the_api_server_down_replicas_serve_their_last_state_and_refuse_changes() {
    // An API server of its own: this test kills it.
    let Some(k8s) = Envtest::start(&[]) else {
        return;
    };
    let cluster = Cluster::new(&k8s, "ca-replicas-down");
    let (one, two) = cluster.two_replicas();
    let out = cluster.admin(&one, "revoke", &["--id", CLIENT_ID]);
    assert!(out.status.success(), "{}", text(&out));
    eventually("replica 2 applies the revocation", || {
        let out = cluster.admin(&two, "revocations", &[]);
        text(&out).contains(CLIENT_ID).then_some(())
    });

    let (_, apiserver) = k8s.pids();
    let killed = Command::new("kill")
        .args(["-KILL", &apiserver.unwrap().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // A change is refused (not applied on one replica alone), with the reason.
    let out = cluster.admin(&two, "revoke", &["--id", SERVER_ID]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("nothing was changed")
            && text(&out).contains("configmap/ca-replicas-down/"),
        "{}",
        text(&out)
    );
    // Both keep serving what they had: the list, signing, refusing X.
    for ca in [&one, &two] {
        let out = cluster.admin(ca, "revocations", &[]);
        assert!(text(&out).contains(CLIENT_ID), "{}", text(&out));
        assert!(!text(&out).contains(SERVER_ID), "{}", text(&out));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let issue = |token: &str| {
            let cred = stepmesh_ca::client::Credential::Token(token.into());
            rt.block_on(async { ca.client().issue(&cred, None).await })
        };
        assert!(issue("server-token").is_ok());
        let err = issue("client-token").unwrap_err();
        assert!(err.to_string().contains("is revoked"), "{err}");
        eventually("the poll counts the outage", || {
            (ca_metric(
                ca,
                "stepmesh_ca_shared_state_events_total{event=\"unavailable\"}",
            ) >= 1.0)
                .then_some(())
        });
    }
}

#[test]
fn concurrent_revokes_through_both_replicas_are_all_kept() {
    let Some(k8s) = Envtest::shared() else { return };
    let cluster = Cluster::new(k8s, "ca-replicas-race");
    let (one, two) = cluster.two_replicas();
    let ids: Vec<String> = (0..10)
        .map(|i| format!("spiffe://{TD}/ns/race/sa/w{i}"))
        .collect();
    // Ten revokes at once, alternating replicas: every write but the first
    // of a round meets a newer resourceVersion and must re-read.
    std::thread::scope(|s| {
        for (i, id) in ids.iter().enumerate() {
            let (cluster, ca) = (&cluster, if i % 2 == 0 { &one } else { &two });
            s.spawn(move || {
                let out = cluster.admin(ca, "revoke", &["--id", id]);
                assert!(out.status.success(), "{id}: {}", text(&out));
            });
        }
    });
    let stored = cluster.configmap();
    let stored = stored["data"]["revocations.json"].as_str().unwrap();
    for id in &ids {
        assert!(stored.contains(id.as_str()), "{id} lost: {stored}");
    }
    let conflicts: f64 = [&one, &two]
        .iter()
        .map(|ca| {
            ca_metric(
                ca,
                "stepmesh_ca_shared_state_events_total{event=\"conflict\"}",
            )
        })
        .sum();
    eprintln!(
        "10 concurrent revokes through 2 replicas: all kept, {conflicts} write conflicts retried"
    );
    eventually("each retried conflict is audited", || {
        let audited = [&one, &two]
            .iter()
            .flat_map(|ca| ca.audit())
            .filter(|v| v["decision"] == "shared_state" && v["outcome"] == "conflict_retried")
            .count();
        (audited as f64 == conflicts).then_some(())
    });
    for ca in [&one, &two] {
        eventually("both replicas enforce all ten", || {
            let out = cluster.admin(ca, "revocations", &[]);
            ids.iter()
                .all(|id| text(&out).contains(id.as_str()))
                .then_some(())
        });
    }
}
