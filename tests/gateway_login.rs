//! The whole person's path, with real parts end to end: the real kubectl,
//! configured with `stepmesh login` as its exec credential plugin, talks to
//! `stepmesh gateway` in front of a real kube-apiserver (envtest); the
//! plugin logs in at the test OpenID provider (device flow, over HTTPS); a
//! thread stands in for the person entering the code and doing (or not) the
//! MFA step. Routine reads never ask for MFA; a delete in prod fails with a
//! message naming what is needed and deletes nothing; run again, the plugin
//! reads the gateway's challenge, logs in with MFA, and the delete happens,
//! audited by the API server as the person with their `acr`; once `maxAge`
//! has passed, the next sensitive action asks again. Skips (printing why)
//! without `KUBEBUILDER_ASSETS`.

#![allow(clippy::unwrap_used)] // tests may panic

mod common;
mod login_support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::envtest::Envtest;
use common::gateway::Gateway;
use login_support::{now, sleep_until, Act, Fixture, Run};
use stepmesh::demo::idp::{ACR_MFA, ACR_PWD};

const ALICE: &str = "alice@example.com";
/// Short, so the test can outlive it.
const MAX_AGE_SECS: u64 = 20;

fn policy(f: &Fixture) -> String {
    format!(
        r#"trustDomain: example.org
stepUp:
  providers:
    corp:
      issuer: {issuer}
      jwks: {{url: {jwks}, caFile: {ca}}}
      audiences: [kubectl]
      algorithms: [ES256]
      # maxAge is checked with the provider's clock-skew leeway (30 s by
      # default): keep it small, so the test can outlive both.
      leeway: 1s
kubernetes:
  authentication: {{provider: corp, usernameClaim: email, groupsClaim: groups, groupsPrefix: "oidc:"}}
  rules:
  - name: delete-in-prod
    verbs: [delete, deletecollection]
    resources: ["*"]
    namespaces: ["prod*"]
    stepUp: {{provider: corp, acr: [{ACR_MFA}], maxAge: {MAX_AGE_SECS}s}}
"#,
        issuer = f.idp.issuer(),
        jwks = f.idp.jwks_url(),
        ca = f.idp_ca.display(),
    )
}

/// A kubeconfig whose user runs `stepmesh login` against the provider.
fn kubeconfig(f: &Fixture, gateway: &Gateway) -> std::path::PathBuf {
    let args: Vec<String> = f.login_args().iter().map(|a| format!("\"{a}\"")).collect();
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: gw
  cluster: {{server: \"{server}\", certificate-authority: \"{ca}\"}}
users:
- name: alice
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1
      command: \"{bin}\"
      args: [{args}]
      interactiveMode: Never
      provideClusterInfo: true
contexts:
- name: gw
  context: {{cluster: gw, user: alice}}
current-context: gw
",
        server = gateway.url(),
        ca = gateway.ca_file.display(),
        bin = login_support::STEPMESH,
        args = args.join(", "),
    );
    let path = f.dir.path().join("kubeconfig");
    std::fs::write(&path, text).unwrap();
    path
}

fn kubectl(k8s: &Envtest, f: &Fixture, config: &std::path::Path, args: &[&str], act: Act) -> Run {
    let mut cmd = Command::new(k8s.assets.join("kubectl"));
    cmd.arg("--kubeconfig").arg(config).args(args);
    f.run(cmd, act)
}

#[test]
fn kubectl_with_stepmesh_login_steps_up_only_for_sensitive_actions() {
    let Some(k8s) = Envtest::shared() else { return };
    let f = Fixture::new(Duration::from_secs(300));
    k8s.apply(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: alice-login-admin\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}}\n\
         subjects:\n- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: \"{ALICE}\"}}\n"
    ));
    let gateway = Gateway::start(k8s, &k8s.url, &k8s.ca_file, &policy(&f));
    let config = kubeconfig(&f, &gateway);
    let ns = format!("prod-{:06x}", fastrand::u32(..1 << 24));
    k8s.create_namespace(&ns);
    for name in ["first", "second"] {
        k8s.create_configmap(&ns, name, &[("a", "1")]);
    }

    // A plain login (device flow, password only) reads without MFA.
    let get = kubectl(
        k8s,
        &f,
        &config,
        &["get", "configmaps", "-n", &ns],
        Act::Approve { mfa: false },
    );
    assert_eq!(get.code, Some(0), "{}", get.stderr);
    assert_eq!(get.codes.len(), 1, "one plain login:\n{}", get.stderr);
    assert!(get.stdout.contains("first"), "{}", get.stdout);

    // The delete is refused, with what to do; nothing is deleted. client-go
    // runs the plugin again after a 401: it reads the gateway's challenge
    // and logs in with MFA at once, but kubectl does not resend the delete.
    let delete = ["delete", "configmap", "first", "-n", ns.as_str()];
    let refused = kubectl(k8s, &f, &config, &delete, Act::Approve { mfa: true });
    assert_ne!(refused.code, Some(0));
    assert!(
        refused
            .stderr
            .contains("step-up required by rule \"delete-in-prod\""),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains(ACR_MFA) && refused.stderr.contains(ACR_PWD),
        "{}",
        refused.stderr
    );
    k8s.kubectl_ok(&["get", "configmap", "first", "-n", &ns]);

    // Again: with the MFA login the delete goes through.
    let stepped = kubectl(k8s, &f, &config, &delete, Act::Approve { mfa: true });
    assert_eq!(stepped.code, Some(0), "{}", stepped.stderr);
    assert_eq!(
        refused.codes.len() + stepped.codes.len(),
        1,
        "one MFA login:\n{}\n{}",
        refused.stderr,
        stepped.stderr
    );
    let asked = f.idp.device_requests().last().cloned().unwrap();
    assert!(
        format!("{asked:?}").contains(ACR_MFA),
        "the plugin asked for the acr: {asked:?}"
    );
    let gone = k8s.kubectl(&["get", "configmap", "first", "-n", &ns]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
    let mfa_at = now();

    // The API server's audit log: alice, through the gateway, with MFA.
    let deadline = Instant::now() + Duration::from_secs(10);
    let who = loop {
        let event = k8s.audit().events().into_iter().find(|e| {
            e.verb == "delete"
                && e.stage == "ResponseComplete"
                && e.object_ref
                    .as_ref()
                    .is_some_and(|o| o.namespace == ns && o.name == "first")
        });
        if let Some(e) = event {
            break e.impersonated_user.expect("impersonated");
        }
        assert!(Instant::now() < deadline, "no audit event for the delete");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(who.username, ALICE);
    assert_eq!(
        who.extra.get("stepmesh.io/acr"),
        Some(&vec![ACR_MFA.to_owned()])
    );

    // Routine reads never ask, before or after maxAge.
    sleep_until(mfa_at + MAX_AGE_SECS + 2);
    let get = kubectl(
        k8s,
        &f,
        &config,
        &["get", "configmaps", "-n", &ns],
        Act::Deny,
    );
    assert_eq!(get.code, Some(0), "{}", get.stderr);
    assert!(get.codes.is_empty(), "no login for a read:\n{}", get.stderr);

    // maxAge passed: the next delete asks again, and the MFA login passes.
    let delete = ["delete", "configmap", "second", "-n", ns.as_str()];
    let stale = kubectl(k8s, &f, &config, &delete, Act::Approve { mfa: true });
    let mut logins = stale.codes.len();
    if stale.code != Some(0) {
        assert!(
            stale
                .stderr
                .contains("More recent authentication is required"),
            "{}",
            stale.stderr
        );
        let again = kubectl(k8s, &f, &config, &delete, Act::Approve { mfa: true });
        assert_eq!(again.code, Some(0), "{}", again.stderr);
        logins += again.codes.len();
    }
    assert_eq!(logins, 1, "one fresh MFA login:\n{}", stale.stderr);
    let gone = k8s.kubectl(&["get", "configmap", "second", "-n", &ns]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
}
