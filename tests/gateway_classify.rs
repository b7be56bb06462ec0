//! `gateway::classify` against the real API server's own RequestInfo.
//!
//! Each request of the table is sent as the admin to a real kube-apiserver
//! (tests/common/envtest.rs); its outcome does not matter (404, 405, 400
//! are fine) as long as it reaches authorization. The audit event of the
//! request (found by the `Audit-Id` response header) carries the server's
//! reading: `verb` and `objectRef` are RequestInfo's fields, and a
//! non-resource request has the lower-cased method and no `objectRef`.
//! Bodies are never sent, so the server never fills `objectRef` from a
//! decoded object: what it records is the path and query's reading alone.

mod common;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::envtest::Envtest;
use common::kube_client::{AuditEvent, KubeClient, ObjectRef};
use http::Method;
use stepmesh::gateway::classify::{classify, RequestInfo};

/// Namespace the table's objects live in.
const NS: &str = "ct";

/// `(method, target)`: at least 60, every shape RequestInfo tells apart.
const TABLE: &[(&str, &str)] = &[
    // core, namespaced: the verbs from methods
    ("GET", "/api/v1/namespaces/ct/pods"),
    ("GET", "/api/v1/namespaces/ct/pods/web-1"),
    ("HEAD", "/api/v1/namespaces/ct/pods/web-1"),
    ("POST", "/api/v1/namespaces/ct/pods"),
    ("PUT", "/api/v1/namespaces/ct/pods/web-2"),
    ("PATCH", "/api/v1/namespaces/ct/pods/web-2"),
    ("DELETE", "/api/v1/namespaces/ct/pods/web-2"),
    ("DELETE", "/api/v1/namespaces/ct-empty/pods"),
    ("GET", "/api/v1/pods"),
    ("OPTIONS", "/api/v1/namespaces/ct/pods"),
    ("GET", "/api/v1/namespaces/ct/pods/"),
    ("GET", "/api/v1/namespaces/ct/pods?labelSelector=app%3Dweb"),
    ("GET", "/api/v1/namespaces/c%74/configmaps/settings"),
    // watch and list from the query
    ("GET", "/api/v1/pods?watch=true"),
    ("GET", "/api/v1/namespaces/ct/configmaps?watch=1"),
    ("GET", "/api/v1/namespaces/ct/configmaps?watch=True"),
    ("GET", "/api/v1/namespaces/ct/configmaps?watch=false"),
    ("GET", "/api/v1/namespaces/ct/configmaps?watch=0"),
    ("GET", "/api/v1/namespaces/ct/configmaps?watch="),
    ("GET", "/api/v1/namespaces/ct/configmaps?watch=true&resourceVersion=0&timeoutSeconds=5"),
    ("GET", "/api/v1/namespaces/ct/configmaps?watch=f"),
    ("GET", "/api/v1/namespaces/ct/configmaps?watch=no"),
    ("GET", "/api/v1/namespaces/ct/configmaps?watch=maybe"),
    ("GET", "/api/v1/namespaces/ct/configmaps?watch=FALSE"),
    ("GET", "/api/v1/namespaces/ct/configmaps?wat%63h=true"),
    ("GET", "/api/v1/namespaces/ct/configmaps?x=%zz&watch=true"),
    ("GET", "/api/v1/namespaces/ct/configmaps/settings?watch=true"),
    // fieldSelector metadata.name names the object
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3Ddb"),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3Ddb&watch=true"),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3D%3Ddb"),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name!%3Ddb"),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.namespace%3Dct,metadata.name%3Ddb"),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3D.."),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3Da%2Fb"),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3D"),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=type%3DOpaque"),
    ("DELETE", "/api/v1/namespaces/ct-empty/secrets?fieldSelector=metadata.name%3Ddb"),
    // list options that fail to decode: the name is dropped, the watch kept
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3Ddb&limit=500"),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3Ddb&limit=abc"),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3Ddb&limit="),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3Ddb&limit=5&limit=x"),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3Ddb&timeoutSeconds=x&watch=1"),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3Ddb&timeoutSeconds="),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3Ddb&allowWatchBookmarks=x"),
    ("GET", "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name%3Ddb&sendInitialEvents=x&watch=1"),
    // the /watch/ and /proxy/ path forms
    ("GET", "/api/v1/watch/namespaces/ct/configmaps"),
    ("GET", "/api/v1/watch/namespaces/ct/configmaps/settings"),
    ("GET", "/api/v1/watch/pods"),
    ("GET", "/api/v1/watch/namespaces"),
    ("GET", "/api/v1/watch/namespaces/ct"),
    ("GET", "/apis/apps/v1/watch/namespaces/ct/deployments"),
    ("GET", "/api/v1/proxy/namespaces/ct/pods/web-1"),
    ("GET", "/api/v1/proxy/namespaces/ct/pods/web-1/metrics/x"),
    ("POST", "/api/v1/proxy/namespaces/ct/services/svc:80/x"),
    ("GET", "/api/v1/proxy/nodes/node-1/stats"),
    // subresources, the connect ones by path whatever the method
    ("GET", "/api/v1/namespaces/ct/pods/web-1/log"),
    ("GET", "/api/v1/namespaces/ct/pods/web-1/log/extra/parts"),
    ("GET", "/api/v1/namespaces/ct/pods/web-1/status"),
    ("PUT", "/api/v1/namespaces/ct/pods/web-1/status"),
    ("PATCH", "/api/v1/namespaces/ct/pods/web-1/status"),
    ("GET", "/api/v1/namespaces/ct/pods/web-1/exec?command=sh&stdin=true"),
    ("POST", "/api/v1/namespaces/ct/pods/web-1/exec?command=sh"),
    ("GET", "/api/v1/namespaces/ct/pods/web-1/attach?stdout=true"),
    ("POST", "/api/v1/namespaces/ct/pods/web-1/attach"),
    ("GET", "/api/v1/namespaces/ct/pods/web-1/portforward?ports=80"),
    ("POST", "/api/v1/namespaces/ct/pods/web-1/portforward"),
    ("GET", "/api/v1/namespaces/ct/pods/web-1/proxy"),
    ("PUT", "/api/v1/namespaces/ct/pods/web-1/proxy/some/path"),
    ("GET", "/api/v1/namespaces/ct/services/svc/proxy/a/b"),
    ("GET", "/api/v1/nodes/node-1/proxy/stats"),
    ("POST", "/api/v1/namespaces/ct/pods/web-1/eviction"),
    ("POST", "/api/v1/namespaces/ct/pods/web-1/binding"),
    ("PATCH", "/api/v1/namespaces/ct/pods/web-1/ephemeralcontainers"),
    ("POST", "/api/v1/namespaces/ct/serviceaccounts/robot/token"),
    ("GET", "/api/v1/namespaces/ct/replicationcontrollers/rc/scale"),
    // namespaces and their own subresources
    ("GET", "/api/v1/namespaces"),
    ("POST", "/api/v1/namespaces"),
    ("GET", "/api/v1/namespaces/ct"),
    ("DELETE", "/api/v1/namespaces/ct-never"),
    ("DELETE", "/api/v1/namespaces"),
    ("GET", "/api/v1/namespaces/ct/status"),
    ("PUT", "/api/v1/namespaces/ct/status"),
    ("PUT", "/api/v1/namespaces/ct/finalize"),
    // cluster-scoped
    ("GET", "/api/v1/nodes"),
    ("GET", "/api/v1/nodes/node-1"),
    ("PATCH", "/api/v1/nodes/node-1/status"),
    ("GET", "/api/v1/persistentvolumes/pv-1"),
    ("DELETE", "/apis/rbac.authorization.k8s.io/v1/clusterroles/cr-never"),
    ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings?watch=true"),
    ("GET", "/apis/storage.k8s.io/v1/storageclasses"),
    ("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"),
    ("POST", "/apis/authentication.k8s.io/v1/tokenreviews"),
    // named groups, namespaced
    ("GET", "/apis/apps/v1/namespaces/ct/deployments"),
    ("GET", "/apis/apps/v1/namespaces/ct/deployments/web"),
    ("PUT", "/apis/apps/v1/namespaces/ct/deployments/web/scale"),
    ("PATCH", "/apis/apps/v1/namespaces/ct/deployments/web/status"),
    ("DELETE", "/apis/apps/v1/namespaces/ct-empty/deployments"),
    ("GET", "/apis/apps/v1/deployments"),
    ("GET", "/apis/batch/v1/namespaces/ct/jobs?watch=true"),
    ("POST", "/apis/batch/v1/namespaces/ct/cronjobs"),
    ("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"),
    ("GET", "/apis/networking.k8s.io/v1/namespaces/ct/networkpolicies/np"),
    ("GET", "/apis/apps/v1beta1/namespaces/ct/deployments"),
    // a CRD's group (created by the test), its status and scale
    ("GET", "/apis/stable.example.com/v1/namespaces/ct/crontabs/my-cron"),
    ("GET", "/apis/stable.example.com/v1/namespaces/ct/crontabs?watch=true"),
    ("PUT", "/apis/stable.example.com/v1/namespaces/ct/crontabs/my-cron/status"),
    ("GET", "/apis/stable.example.com/v1/namespaces/ct/crontabs/my-cron/scale"),
    ("DELETE", "/apis/stable.example.com/v1/crontabs"),
    ("DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/never.example.com"),
    // discovery and non-resource paths
    ("GET", "/api"),
    ("GET", "/api/v1"),
    ("GET", "/apis"),
    ("GET", "/apis/apps"),
    ("GET", "/apis/apps/v1"),
    ("GET", "/apis/apps/v1/"),
    ("GET", "/apis/stable.example.com/v1"),
    ("GET", "/healthz"),
    ("HEAD", "/healthz"),
    ("POST", "/healthz"),
    ("OPTIONS", "/healthz"),
    ("GET", "/livez"),
    ("GET", "/readyz?verbose"),
    ("GET", "/version"),
    ("GET", "/openapi/v2"),
    ("GET", "/openapi/v3"),
    ("GET", "/.well-known/openid-configuration"),
    ("GET", "/metrics"),
    ("DELETE", "/logs"),
    ("GET", "/API/v1/pods"),
    ("GET", "/apis/v1/pods"),
];

/// Forms the classifier refuses; sent too, to report what the server does.
const REFUSED: &[(&str, &str)] = &[
    ("GET", "/api/v1/namespaces/ct/pods/../secrets"),
    ("GET", "/api/v1/namespaces/ct/pods/web-1/exec/.."),
    ("DELETE", "/api/v1/namespaces/ct/./secrets/db"),
    ("GET", "/api/v1/namespaces/ct/pods/%2e%2e/secrets"),
    ("GET", "/api/v1/namespaces/ct//secrets"),
    ("GET", "//api/v1/namespaces/ct/secrets"),
    ("GET", "/api/v1/namespaces/ct/secrets%2Fdb"),
    ("GET", "/api/v1/namespaces/ct/pods/web-1%2Fexec"),
    ("GET", "/api/v1/watch"),
    ("GET", "/api/v1/namespaces/ct/secrets?watch=fal%C5%BFe"),
    ("GET", "/api/v1/namespaces/ct/secrets?watch=%zz"),
    (
        "GET",
        "/api/v1/namespaces/ct/secrets?labelSelector=app%3Dweb&fieldSelector=metadata.name%3Ddb",
    ),
    (
        "GET",
        "/api/v1/namespaces/ct/secrets?labelSelector=%21%21&fieldSelector=metadata.name%3Ddb",
    ),
    (
        "GET",
        "/api/v1/namespaces/ct/secrets?watch=false&watch=true",
    ),
    ("GET", "/api/v1/namespaces/ct/secrets?watch=1;x=2"),
    (
        "GET",
        "/api/v1/namespaces/ct/secrets?fieldSelector=metadata.name",
    ),
];

/// The objects some rows find (so those reach real handlers, not 404).
const FIXTURES: &str = "apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: ct}
data: {mode: 'on'}
---
apiVersion: v1
kind: Secret
metadata: {name: db, namespace: ct}
stringData: {password: hunter2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: ct}
spec:
  containers: [{name: app, image: example.invalid/app:1}]
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: crontabs.stable.example.com}
spec:
  group: stable.example.com
  scope: Namespaced
  names: {plural: crontabs, singular: crontab, kind: CronTab}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas}
";

/// What the server recorded, in the classifier's terms.
#[derive(Debug, PartialEq, Eq)]
struct Reading {
    verb: String,
    object: Option<ObjectRef>,
}

impl Reading {
    fn of_event(e: &AuditEvent) -> Reading {
        Reading {
            verb: e.verb.clone(),
            object: e.object_ref.clone(),
        }
    }

    fn of_classifier(i: &RequestInfo) -> Reading {
        Reading {
            verb: i.verb.clone(),
            object: i.is_resource_request.then(|| ObjectRef {
                resource: i.resource.clone(),
                subresource: i.subresource.clone(),
                namespace: i.namespace.clone(),
                name: i.name.clone(),
                api_group: i.api_group.clone(),
                api_version: i.api_version.clone(),
            }),
        }
    }
}

fn show(r: &Reading) -> String {
    match &r.object {
        None => format!("{} (non-resource)", r.verb),
        Some(o) => format!(
            "{} g={:?} v={} ns={:?} res={}{} name={:?}",
            r.verb,
            o.api_group,
            o.api_version,
            o.namespace,
            o.resource,
            if o.subresource.is_empty() {
                String::new()
            } else {
                format!("/{}", o.subresource)
            },
            o.name
        ),
    }
}

/// Field-by-field differences.
fn differences(server: &Reading, ours: &Reading) -> Vec<String> {
    let mut out = Vec::new();
    if server.verb != ours.verb {
        out.push(format!("verb {:?} vs {:?}", server.verb, ours.verb));
    }
    match (&server.object, &ours.object) {
        (Some(s), Some(o)) => {
            for (field, a, b) in [
                ("apiGroup", &s.api_group, &o.api_group),
                ("apiVersion", &s.api_version, &o.api_version),
                ("namespace", &s.namespace, &o.namespace),
                ("resource", &s.resource, &o.resource),
                ("subresource", &s.subresource, &o.subresource),
                ("name", &s.name, &o.name),
            ] {
                if a != b {
                    out.push(format!("{field} {a:?} vs {b:?}"));
                }
            }
        }
        (None, None) => {}
        (s, _) => out.push(format!(
            "server says {}resource request",
            if s.is_some() { "" } else { "non-" }
        )),
    }
    out
}

fn split(target: &str) -> (&str, Option<&str>) {
    target
        .split_once('?')
        .map_or((target, None), |(p, q)| (p, Some(q)))
}

/// Sends every request, then reads their audit events (status, events).
fn send_all(
    admin: &KubeClient,
    k8s: &Envtest,
    rows: &[(&str, &str)],
) -> Vec<(u16, Vec<AuditEvent>)> {
    let sent: Vec<(u16, Option<String>)> = rows
        .iter()
        .map(|(method, target)| {
            // Head only: watches stream; nothing after the head matters.
            let r = admin.request_head(method, target, &[]);
            (r.status, r.audit_id().map(str::to_owned))
        })
        .collect();
    let ids: Vec<&str> = sent
        .iter()
        .map(|(_, id)| id.as_deref().unwrap_or(""))
        .collect();
    // Some requests have no event (the server fails before auditing): wait
    // for one sent after all of them, then take what the log holds.
    let sentinel = admin.request("GET", "/version", &[], b"");
    let audit = k8s.audit();
    let sentinel_id = sentinel.audit_id().expect("an Audit-Id header");
    assert!(!audit.wait(sentinel_id).is_empty());
    let events = audit.wait_all(&ids, Duration::from_secs(1));
    sent.iter().map(|(status, _)| *status).zip(events).collect()
}

#[test]
fn the_classifier_reads_every_request_as_the_api_server_does() {
    let Some(k8s) = Envtest::shared() else { return };
    assert!(TABLE.len() >= 60, "the table has {} rows", TABLE.len());
    k8s.create_namespace(NS);
    k8s.apply(FIXTURES);
    k8s.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/crontabs.stable.example.com",
        "--timeout=30s",
    ]);

    let began = Instant::now();
    let results = send_all(&k8s.admin(), k8s, TABLE);
    let took = began.elapsed();

    let mut table = String::new();
    let mut disagreements = String::new();
    for ((method, target), (status, events)) in TABLE.iter().zip(&results) {
        let event = events
            .first()
            .unwrap_or_else(|| panic!("{method} {target}: no audit event (status {status})"));
        let server = Reading::of_event(event);
        let (path, query) = split(target);
        let method_ = Method::from_bytes(method.as_bytes()).unwrap();
        let line = match classify(&method_, path, query) {
            Ok(info) => {
                let ours = Reading::of_classifier(&info);
                let diff = differences(&server, &ours);
                if !diff.is_empty() {
                    writeln!(
                        disagreements,
                        "{method} {target}\n    server:     {}\n    classifier: {}\n    differ: {}",
                        show(&server),
                        show(&ours),
                        diff.join("; ")
                    )
                    .unwrap();
                }
                format!(
                    "{} {}",
                    if diff.is_empty() { "ok  " } else { "DIFF" },
                    show(&server)
                )
            }
            Err(e) => {
                writeln!(
                    disagreements,
                    "{method} {target}\n    server:     {}\n    classifier refused: {e}",
                    show(&server)
                )
                .unwrap();
                format!("REFUSED {}", show(&server))
            }
        };
        writeln!(table, "{status} {method:6} {target}\n        {line}").unwrap();
    }
    println!("{table}");
    println!(
        "{} requests sent and their audit events read in {took:?} (server startup {:?})",
        TABLE.len(),
        k8s.startup
    );
    assert!(
        disagreements.is_empty(),
        "the classifier disagrees with the API server:\n{disagreements}"
    );
}

#[test]
fn refused_forms_are_ones_the_gateway_may_refuse() {
    let Some(k8s) = Envtest::shared() else { return };
    // Go's url.ParseQuery reads nothing from more than 10,000 parameters.
    let many = format!(
        "/api/v1/namespaces/ct/secrets?watch=true{}",
        "&x".repeat(10_000)
    );
    let mut rows = REFUSED.to_vec();
    rows.push(("GET", &many));
    let results = send_all(&k8s.admin(), k8s, &rows);
    let mut report = String::new();
    for ((method, target), (status, events)) in rows.iter().zip(&results) {
        let shown = if target.len() > 120 {
            format!("{}... ({} bytes)", &target[..60], target.len())
        } else {
            (*target).to_owned()
        };
        let (path, query) = split(target);
        let method_ = Method::from_bytes(method.as_bytes()).unwrap();
        let ours = classify(&method_, path, query);
        assert!(ours.is_err(), "{method} {shown}: classified as {ours:?}");
        let server = events
            .first()
            .map_or("no audit event".to_owned(), |e| show(&Reading::of_event(e)));
        writeln!(
            report,
            "{status} {method:6} {shown}\n        server: {server}\n        refused: {}",
            ours.unwrap_err()
        )
        .unwrap();
    }
    println!("{report}");
}
