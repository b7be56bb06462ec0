//! `stepmesh netpol sync` against a real kube-apiserver and etcd (envtest;
//! skipped with a printed reason without KUBEBUILDER_ASSETS), as the
//! ServiceAccount of deploy/netpol with exactly its RBAC: it applies what
//! `policy netpol` prints for the same policies, follows an edit, puts back
//! a deleted or edited object, never touches a hand-made one. A broken
//! callee policy leaves every object as it was, its callers' egress in
//! another namespace included (an Event says why), and its fix is followed;
//! a policy first seen broken keeps its own objects and other namespaces'
//! egress towards its namespace until removed, the rest kept as usual.
//! An object an admission policy refuses is reported on its ConfigMap while
//! the other ConfigMaps' objects are applied, and its ConfigMap's old
//! objects stay until the refusal is lifted. A
//! removed policy's objects are pruned. With two processes only the Lease
//! holder writes, the other taking over when it is killed (or at once on
//! SIGTERM), keeping the last valid version of a policy broken since.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "netpol_sync/support.rs"]
mod support;

use common::envtest::Envtest;
use support::*;

/// Two namespaces, three workloads: payments admits sync-b/frontend on
/// 8080; worker admits nobody; frontend calls payments.
fn policies() -> [(&'static str, &'static str, String); 3] {
    [
        ("sync-a", "payments", "trustDomain: cluster.local\nworkload: {namespace: sync-a, serviceAccount: api}\ninbound:\n  ports:\n    - port: 8080\n      allow: [{from: [spiffe://cluster.local/ns/sync-b/sa/frontend]}]\n".into()),
        ("sync-a", "worker", "trustDomain: cluster.local\nworkload: {namespace: sync-a, serviceAccount: worker}\n".into()),
        ("sync-b", "frontend", "trustDomain: cluster.local\nworkload: {namespace: sync-b, serviceAccount: frontend}\n".into()),
    ]
}

/// An admission policy the cluster may have: no NetworkPolicy for port
/// 7070 of `api` (the API server refuses it, 403 or 422).
const RESERVED_PORT: &str = "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: reserved-port}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - apiGroups: [networking.k8s.io]
        apiVersions: [v1]
        operations: [CREATE, UPDATE]
        resources: [networkpolicies]
  validations:
    - expression: \"object.metadata.name != 'stepmesh-api-port-7070'\"
      message: port 7070 is reserved
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: reserved-port}
spec:
  policyName: reserved-port
  validationActions: [Deny]
";

#[test]
fn the_controller_keeps_networkpolicies_equal_to_the_policies() {
    let Some(k8s) = Envtest::shared() else { return };
    if Command::new("curl").arg("--version").output().is_err() {
        println!("skip: curl not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for ns in ["stepmesh-system", "sync-a", "sync-b"] {
        k8s.create_namespace(ns);
    }
    let rbac = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/netpol/rbac.yaml"),
    )
    .unwrap();
    k8s.apply(&rbac);
    // The Deployment as shipped: the real API server accepts it.
    let deployment =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/netpol/deployment.yaml"))
            .unwrap();
    let o = k8s.kubectl_with_stdin(&["apply", "--dry-run=server", "-f", "-"], &deployment);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let token = dir.path().join("token");
    std::fs::write(
        &token,
        k8s.service_account_token("stepmesh-system", "stepmesh-netpol-sync", ""),
    )
    .unwrap();
    let mut set = policies().to_vec();
    for (ns, name, text) in &set {
        k8s.apply(&configmap(ns, name, text));
    }
    k8s.apply("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: hand-made, namespace: sync-a}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n");
    let hand_rv = || {
        k8s.kubectl_ok(&[
            "get",
            "networkpolicy",
            "hand-made",
            "-n",
            "sync-a",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
    };
    let hand_before = hand_rv();
    // A hand-made object with the name of a computed one: not ours either.
    k8s.apply("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: stepmesh-worker-mesh, namespace: sync-a}\nspec: {podSelector: {matchLabels: {app: squatter}}, policyTypes: [Ingress]}\n");
    let squat_rv = || {
        k8s.kubectl_ok(&[
            "get",
            "networkpolicy",
            "stepmesh-worker-mesh",
            "-n",
            "sync-a",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
    };
    let squat_before = squat_rv();

    let (port_a, port_b) = (free_port(), free_port());
    let a = controller(k8s, dir.path(), &token, "replica-a", port_a);
    let mut want = expected(dir.path(), &set);
    assert_eq!(want.len(), 8, "{want:?}");
    assert!(want.remove("sync-a/stepmesh-worker-mesh"));
    let took = wait("first sync", Duration::from_secs(30), || owned(k8s) == want);
    println!("first sync: {took:?}");

    // A policy edit: payments opens 9090 too.
    set[0].2.push_str(
        "    - port: 9090\n      allow: [{from: [spiffe://cluster.local/ns/sync-b/sa/frontend]}]\n",
    );
    k8s.apply(&configmap("sync-a", "payments", &set[0].2));
    let mut want = expected(dir.path(), &set);
    assert!(want.contains("sync-a/stepmesh-api-port-9090"));
    want.remove("sync-a/stepmesh-worker-mesh");
    let took = wait("edit followed", Duration::from_secs(5), || {
        owned(k8s) == want
    });
    println!("edit followed: {took:?}");

    // A deleted generated object comes back; an edited one is put back.
    k8s.kubectl_ok(&[
        "delete",
        "networkpolicy",
        "stepmesh-api-port-8080",
        "-n",
        "sync-a",
    ]);
    let took = wait("deleted object back", Duration::from_secs(5), || {
        owned(k8s).contains("sync-a/stepmesh-api-port-8080")
    });
    println!("deleted object back: {took:?}");
    k8s.kubectl_ok(&[
        "patch",
        "networkpolicy",
        "stepmesh-api-port-8080",
        "-n",
        "sync-a",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/ingress/0/ports/0/port","value":1}]"#,
    ]);
    let port = || {
        k8s.kubectl_ok(&[
            "get",
            "networkpolicy",
            "stepmesh-api-port-8080",
            "-n",
            "sync-a",
            "-o",
            "jsonpath={.spec.ingress[0].ports[0].port}",
        ])
    };
    wait("edited object put back", Duration::from_secs(5), || {
        port() == "8080"
    });
    assert!(metric(port_a, "stepmesh_netpol_drift_repaired_total") >= 2.0);
    // A field another manager adds (server-side apply keeps what it does
    // not own) is removed too: here egress rules on an ingress object.
    let np = ["networkpolicy", "stepmesh-api-port-8080", "-n", "sync-a"];
    let added = r#"{"spec":{"egress":[{"ports":[{"port":53}]}]}}"#;
    k8s.kubectl_ok(&[&["patch"], &np[..], &["--type=merge", "-p", added]].concat());
    let egress =
        || k8s.kubectl_ok(&[&["get"], &np[..], &["-o", "jsonpath={.spec.egress}"]].concat());
    wait("added field removed", Duration::from_secs(5), || {
        !egress().contains("53")
    });
    let repaired = metric(port_a, "stepmesh_netpol_drift_repaired_total");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        metric(port_a, "stepmesh_netpol_drift_repaired_total"),
        repaired,
        "repaired once, then left alone"
    );

    // Policies of 1.2 MiB together (each readable alone) do not stop the
    // rounds: the ConfigMaps are listed as metadata and read one by one
    // (one list of their data was past the client's 1 MiB, every round).
    k8s.create_namespace("sync-c");
    for pad in ["pad-1", "pad-2"] {
        let text = format!(
            "trustDomain: cluster.local\nworkload: {{namespace: sync-c, serviceAccount: {pad}}}\n# {}\n",
            "x".repeat(600 << 10)
        );
        let o = k8s.kubectl_with_stdin(
            &["create", "-f", "-"],
            configmap("sync-c", pad, &text).as_bytes(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    wait(
        "policies past 1 MiB together applied",
        Duration::from_secs(10),
        || {
            owned(k8s)
                .iter()
                .any(|o| o.starts_with("sync-c/stepmesh-pad-2"))
        },
    );
    k8s.kubectl_ok(&["delete", "configmap", "pad-1", "pad-2", "-n", "sync-c"]);
    wait("their objects pruned", Duration::from_secs(10), || {
        !owned(k8s).iter().any(|o| o.starts_with("sync-c/"))
    });

    // A broken callee changes nothing: neither its own objects nor the
    // egress its callers in other namespaces derive from it.
    let before = snapshot(k8s);
    let calls = "sync-b/stepmesh-frontend-egress-calls";
    assert!(before[calls].to_string().contains("9090"), "{before:?}");
    k8s.apply(&configmap("sync-a", "payments", BROKEN));
    wait("event", Duration::from_secs(5), || {
        events(k8s, "sync-a", "payments").contains("inbound.ports[0].port")
    });
    std::thread::sleep(Duration::from_millis(1500)); // five sync periods
    assert_eq!(snapshot(k8s), before, "a broken policy changed objects");
    assert!(metric(port_a, "stepmesh_netpol_policy_errors_total") >= 1.0);
    assert_eq!(metric(port_a, BLOCKED), 0.0);

    // Fixed (9090 closed again), it is followed.
    set[0].2 = policies()[0].2.clone();
    k8s.apply(&configmap("sync-a", "payments", &set[0].2));
    let mut want = expected(dir.path(), &set);
    want.remove("sync-a/stepmesh-worker-mesh");
    wait("fix followed", Duration::from_secs(5), || {
        owned(k8s) == want && !snapshot(k8s)[calls].to_string().contains("9090")
    });

    // An object the API server refuses (here an admission policy) is
    // reported on its ConfigMap; the others' objects are applied, and the
    // refused ConfigMap's old objects are not pruned until its new ones
    // all land.
    k8s.apply(RESERVED_PORT);
    let reserved = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: stepmesh-api-port-7070, namespace: sync-a}\nspec: {podSelector: {}}\n";
    wait("admission policy in force", Duration::from_secs(10), || {
        let o = k8s.kubectl_with_stdin(
            &["apply", "--dry-run=server", "-f", "-"],
            reserved.as_bytes(),
        );
        String::from_utf8_lossy(&o.stderr).contains("port 7070 is reserved")
    });
    let mut edited = set.clone();
    edited[0].2 = edited[0].2.replace("port: 8080", "port: 7070");
    edited[1].2.push_str("inbound:\n  ports:\n    - port: 6060\n      allow: [{from: [spiffe://cluster.local/ns/sync-b/sa/frontend]}]\n");
    for (ns, name, text) in &edited[..2] {
        k8s.apply(&configmap(ns, name, text));
    }
    wait(
        "the other ConfigMap applied",
        Duration::from_secs(5),
        || owned(k8s).contains("sync-a/stepmesh-worker-port-6060"),
    );
    wait("refusal reported", Duration::from_secs(5), || {
        k8s.kubectl_ok(&[
            "get",
            "events",
            "-n",
            "sync-a",
            "--field-selector",
            "involvedObject.name=payments,reason=NetworkPolicyRefused",
            "-o",
            "jsonpath={.items[*].message}",
        ])
        .contains("port 7070 is reserved")
    });
    std::thread::sleep(Duration::from_millis(1000)); // three sync periods
    let now = owned(k8s);
    assert!(
        now.contains("sync-a/stepmesh-api-port-8080"),
        "pruned: {now:?}"
    );
    assert!(!now.contains("sync-a/stepmesh-api-port-7070"), "{now:?}");
    assert!(metric(port_a, "stepmesh_netpol_objects_refused_total") >= 1.0);
    k8s.kubectl_ok(&[
        "delete",
        "validatingadmissionpolicybinding",
        "reserved-port",
    ]);
    let mut edited_want = expected(dir.path(), &edited);
    edited_want.remove("sync-a/stepmesh-worker-mesh");
    wait(
        "the refused object applied once allowed",
        Duration::from_secs(10),
        || owned(k8s) == edited_want,
    );
    for (ns, name, text) in &set[..2] {
        k8s.apply(&configmap(ns, name, text));
    }
    wait("back to the policies", Duration::from_secs(5), || {
        owned(k8s) == want
    });

    // A policy first seen broken blocks the round in part: its own
    // objects stay as they are (it has none yet), and other namespaces'
    // egress keeps its rules towards its namespace (a callee there may be
    // it); the rest is kept as usual, in its own namespace too (before,
    // nothing was applied or pruned).
    k8s.apply(&configmap("sync-a", "newcomer", BROKEN));
    wait("blocked", Duration::from_secs(5), || {
        metric(port_a, BLOCKED) == 1.0
    });
    assert!(events(k8s, "sync-a", "newcomer").contains("stay as they are"));
    let last_sync = metric(port_a, "stepmesh_netpol_last_sync_timestamp_seconds");
    let moved = set[0].2.replace("port: 8080", "port: 9191");
    k8s.apply(&configmap("sync-a", "payments", &moved));
    let frontend_egress = || snapshot(k8s)[calls].to_string();
    wait("followed while blocked", Duration::from_secs(5), || {
        let now = owned(k8s);
        now.contains("sync-a/stepmesh-api-port-9191")
            && !now.contains("sync-a/stepmesh-api-port-8080")
            && frontend_egress().contains("9191")
    });
    let kept = frontend_egress();
    assert!(
        kept.contains("8080"),
        "egress towards sync-a shrank: {kept}"
    );
    k8s.kubectl_ok(&["delete", "configmap", "worker", "-n", "sync-a"]);
    wait("a removed policy pruned", Duration::from_secs(5), || {
        !owned(k8s)
            .iter()
            .any(|o| o.starts_with("sync-a/stepmesh-worker"))
    });
    assert_eq!(
        metric(port_a, "stepmesh_netpol_last_sync_timestamp_seconds"),
        last_sync,
        "a blocked round is no complete sync"
    );
    k8s.kubectl_ok(&["delete", "configmap", "newcomer", "-n", "sync-a"]);
    wait(
        "unblocked, egress as computed",
        Duration::from_secs(5),
        || metric(port_a, BLOCKED) == 0.0 && !frontend_egress().contains("8080"),
    );
    assert!(metric(port_a, "stepmesh_netpol_pruned_total") >= 1.0);
    // No policy ConfigMap at all is a list of nothing (the API server's
    // metadata list says `items: null`): every owned object is pruned.
    k8s.kubectl_ok(&["delete", "configmap", "payments", "-n", "sync-a"]);
    k8s.kubectl_ok(&["delete", "configmap", "frontend", "-n", "sync-b"]);
    wait("all pruned", Duration::from_secs(10), || {
        owned(k8s).is_empty()
    });
    for (ns, name, text) in &set[..2] {
        k8s.apply(&configmap(ns, name, text));
    }
    let in_a = |o: &&String| o.starts_with("sync-a/");
    let want_a: BTreeSet<String> = want.iter().filter(in_a).cloned().collect();
    wait("back again", Duration::from_secs(10), || {
        owned(k8s) == want_a
    });
    assert!(metric(port_a, "stepmesh_netpol_last_sync_timestamp_seconds") > 1.7e9);
    assert_eq!(
        hand_rv(),
        hand_before,
        "the hand-made NetworkPolicy was touched"
    );
    assert_eq!(
        squat_rv(),
        squat_before,
        "the hand-made namesake was touched"
    );

    // Two processes: only the Lease holder writes; killing it hands over.
    let b = controller(k8s, dir.path(), &token, "replica-b", port_b);
    wait("b up", Duration::from_secs(10), || {
        metric(port_b, "stepmesh_netpol_leader") == 0.0
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(metric(port_a, "stepmesh_netpol_leader"), 1.0);
    assert_eq!(
        metric(port_b, "stepmesh_netpol_applied_total"),
        0.0,
        "the standby wrote"
    );
    // Broken after the standby saw it valid: the standby keeps that version.
    k8s.apply(&configmap("sync-a", "worker", BROKEN));
    wait("worker refused", Duration::from_secs(5), || {
        events(k8s, "sync-a", "worker").contains("last valid version")
    });
    let pid = a.program_pid().unwrap();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let killed = Instant::now();
    k8s.kubectl_ok(&[
        "delete",
        "networkpolicy",
        "stepmesh-api-port-8080",
        "-n",
        "sync-a",
    ]);
    wait("handover", Duration::from_secs(15), || {
        owned(k8s).contains("sync-a/stepmesh-api-port-8080")
    });
    println!("handover: {:?}", killed.elapsed());
    let holder = k8s.kubectl_ok(&[
        "get",
        "lease",
        "stepmesh-netpol-sync",
        "-n",
        "stepmesh-system",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder, "replica-b");
    assert_eq!(hand_rv(), hand_before);

    // SIGTERM gives the Lease up: a third replica takes it at once.
    let port_c = free_port();
    let _c = controller(k8s, dir.path(), &token, "replica-c", port_c);
    wait("c up", Duration::from_secs(10), || {
        metric(port_c, "stepmesh_netpol_leader") == 0.0
    });
    // It never saw worker valid: a takeover would block, and says so.
    wait("c would block", Duration::from_secs(5), || {
        metric(port_c, BLOCKED) == 1.0
    });
    assert_eq!(metric(port_b, BLOCKED), 0.0);
    let of_worker = || {
        let mut s = snapshot(k8s);
        s.retain(|k, _| k.starts_with("sync-a/stepmesh-worker-"));
        s
    };
    let worker_before = of_worker();
    assert!(!worker_before.is_empty());
    Command::new("kill")
        .args(["-TERM", &b.program_pid().unwrap().to_string()])
        .status()
        .unwrap();
    let took = wait("release", Duration::from_secs(3), || {
        metric(port_c, "stepmesh_netpol_leader") == 1.0
    });
    println!("handover after SIGTERM: {took:?}");
    assert_eq!(metric(port_c, BLOCKED), 1.0);
    // c keeps worker's objects as they are and repairs the rest (the
    // object the handover above repaired, deleted again).
    let np = ["networkpolicy", "stepmesh-api-port-8080", "-n", "sync-a"];
    k8s.kubectl_ok(&[&["delete"], &np[..]].concat());
    wait("repaired by c", Duration::from_secs(5), || {
        owned(k8s).contains("sync-a/stepmesh-api-port-8080")
    });
    assert_eq!(
        of_worker(),
        worker_before,
        "the blocking policy's objects moved"
    );
}
