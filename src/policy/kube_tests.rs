//! The `kubernetes:` section: validation names the field, matching reads
//! rules the way RBAC does.

use super::*;
use crate::policy::Policy;

const HEAD: &str = r#"
trustDomain: example.org
stepUp:
  providers:
    corp:
      issuer: https://idp.example
      jwks: {file: /dev/null}
      audiences: [kubectl]
      algorithms: [ES256]
"#;

fn policy(kubernetes: &str) -> Result<Policy, PolicyError> {
    Policy::from_yaml(&format!("{HEAD}kubernetes:\n{kubernetes}"))
}

fn req<'a>(
    verb: &'a str,
    resource: &'a str,
    sub: &'a str,
    ns: &'a str,
    name: &'a str,
) -> KubeRequest<'a> {
    KubeRequest {
        verb,
        connect: matches!(sub, "exec" | "attach" | "portforward"),
        api_group: "",
        resource,
        subresource: sub,
        namespace: ns,
        name,
    }
}

const RULES: &str = r#"
  authentication: {provider: corp, usernameClaim: email, groupsClaim: groups, groupsPrefix: "oidc:"}
  rules:
  - name: routine-reads
    verbs: [get, list, watch]
    resources: ["*"]
    namespaces: ["*"]
  - name: exec-in-prod
    verbs: [connect]
    resources: [pods/exec, pods/attach]
    namespaces: [prod, prod-*]
    stepUp: {provider: corp, acr: [urn:stepmesh:acr:mfa], maxAge: 10m}
  - name: delete-in-prod
    verbs: [delete, deletecollection]
    resources: ["*"]
    namespaces: [prod]
    groups: ["oidc:dev*"]
    stepUp: {provider: corp, acr: [urn:stepmesh:acr:mfa]}
"#;

#[test]
fn first_matching_rule_decides_like_rbac() {
    let p = policy(RULES).unwrap();
    let k = p.kubernetes().unwrap();
    let devs = vec!["oidc:developers".to_owned()];
    let name = |r: &KubeRequest<'_>, g: &[String]| k.rule_for(r, g).map(|r| r.name.to_string());
    assert_eq!(
        name(&req("list", "pods", "", "prod", ""), &devs).as_deref(),
        Some("routine-reads")
    );
    // exec is a GET over WebSocket: still `connect`, never `get`'s exemption.
    assert_eq!(
        name(&req("get", "pods", "exec", "prod-eu", "web"), &devs).as_deref(),
        Some("exec-in-prod")
    );
    assert_eq!(
        name(&req("create", "pods", "exec", "staging", "web"), &devs),
        None
    );
    assert_eq!(
        name(&req("delete", "configmaps", "", "prod", "x"), &devs).as_deref(),
        Some("delete-in-prod")
    );
    assert_eq!(
        name(
            &req("delete", "configmaps", "", "prod", "x"),
            &["oidc:ops".to_owned()]
        ),
        None
    );
    // `routine-reads` names `*`: subresources too (pods/log is a read).
    assert_eq!(
        name(&req("get", "pods", "log", "prod", "web"), &devs).as_deref(),
        Some("routine-reads")
    );
    assert_eq!(k.authentication.username_prefix, "");
}

#[test]
fn an_update_or_patch_that_may_create_meets_the_create_rule_too() {
    let p = policy(
        r#"
  authentication: {provider: corp, usernameClaim: email}
  rules:
  - name: edits
    verbs: [update, patch]
    resources: ["*"]
    namespaces: ["*"]
  - name: new-bindings
    verbs: [create]
    resources: [rolebindings]
    namespaces: ["*"]
    stepUp: {provider: corp, acr: [urn:stepmesh:acr:mfa]}
  - name: everything
    verbs: ["*"]
    resources: ["*"]
    namespaces: ["*"]
"#,
    )
    .unwrap();
    let k = p.kubernetes().unwrap();
    let names = |r: KubeRequest<'_>| -> [String; 2] {
        k.rules_for(&r, &[])
            .map(|r| r.map_or("-".to_owned(), |r| r.name.to_string()))
    };
    // `kubectl apply --server-side` of a binding that may not exist: a
    // PATCH the API server also authorizes as `create`.
    for verb in ["patch", "update"] {
        assert_eq!(
            names(req(verb, "rolebindings", "", "prod", "x")),
            ["edits", "new-bindings"]
        );
    }
    // No object named (a collection), a subresource, another verb: the
    // verb's rule alone.
    for (r, own) in [
        (req("patch", "rolebindings", "", "prod", ""), "edits"),
        (req("patch", "pods", "status", "prod", "x"), "edits"),
        (req("get", "rolebindings", "", "prod", "x"), "everything"),
        (
            req("create", "rolebindings", "", "prod", "x"),
            "new-bindings",
        ),
    ] {
        assert_eq!(names(r), [own, "-"], "{r:?}");
    }
    assert_eq!(
        names(req("patch", "configmaps", "", "prod", "x")),
        ["edits", "everything"]
    );
    // One rule both ways: once.
    let one = policy(
        "  authentication: {provider: corp, usernameClaim: email}\n  rules:\n  - {name: all, verbs: [\"*\"], resources: [\"*\"], namespaces: [\"*\"]}\n",
    )
    .unwrap();
    let [own, create] = one
        .kubernetes()
        .unwrap()
        .rules_for(&req("patch", "pods", "", "prod", "x"), &[]);
    assert_eq!(own.map(|r| &*r.name), Some("all"));
    assert!(create.is_none());
}

#[test]
fn resource_forms_follow_rbac() {
    let r =
        |rule: &str, res: &str, sub: &str| resource_matches(rule, &req("get", res, sub, "", ""));
    assert!(r("pods", "pods", ""));
    assert!(!r("pods", "pods", "exec"));
    assert!(r("pods/*", "pods", "log"));
    assert!(!r("pods/*", "pods", ""));
    assert!(r("*/scale", "deployments", "scale"));
    assert!(r("*", "secrets", ""));
}

#[test]
fn a_rule_naming_an_object_meets_its_proxy_however_spelled() {
    let p = policy(
        r#"
  authentication: {provider: corp, usernameClaim: email}
  rules:
  - name: db-proxy
    verbs: ["*"]
    resources: [services/proxy, pods/proxy]
    names: [db]
    namespaces: ["*"]
    stepUp: {provider: corp}
"#,
    )
    .unwrap();
    let rules = &p.kubernetes().unwrap().rules;
    for name in ["db", "db:5432", "https:db:443", "http:db:", ":db:5432"] {
        let r = req("get", "services", "proxy", "prod", name);
        assert!(rules[0].matches(&r, &[]), "{name}");
    }
    for name in ["dbx:5432", "https:other:443", "a:b:c:d"] {
        let r = req("get", "services", "proxy", "prod", name);
        assert!(!rules[0].matches(&r, &[]), "{name}");
    }
    let plain = req("get", "services", "", "prod", "https:db:443");
    assert!(!rules[0].matches(&plain, &[]), "not a proxy request");
}

#[test]
fn globs() {
    assert!(glob("prod-*", "prod-eu"));
    assert!(!glob("prod-*", "prod"));
    assert!(glob("*", ""));
    assert!(glob("a*b*c", "axxbyyc"));
    assert!(!glob("a*b*c", "axxbyy"));
    assert!(glob("exact", "exact"));
    assert!(!glob("exact", "exact2"));
}

#[test]
fn default_username_prefix_is_kube_apiservers() {
    let p = policy("  authentication: {provider: corp}\n").unwrap();
    let a = &p.kubernetes().unwrap().authentication;
    assert_eq!(
        (a.username_claim.as_str(), a.username_prefix.as_str()),
        ("sub", "https://idp.example#")
    );
    let p = policy("  authentication: {provider: corp, usernamePrefix: \"-\"}\n").unwrap();
    assert_eq!(p.kubernetes().unwrap().authentication.username_prefix, "");
}

#[test]
fn errors_name_the_field() {
    for (section, field) in [
        ("  authentication: {provider: nope}\n", "kubernetes.authentication.provider"),
        ("  authentication: {provider: corp}\n  rules:\n  - {name: a, resources: [pods]}\n", "kubernetes.rules[0].verbs"),
        ("  authentication: {provider: corp}\n  rules:\n  - {name: a, verbs: [remove], resources: [pods]}\n", "kubernetes.rules[0].verbs[0]"),
        ("  authentication: {provider: corp}\n  rules:\n  - {name: a, verbs: [get]}\n", "kubernetes.rules[0].resources"),
        ("  authentication: {provider: corp}\n  rules:\n  - {name: a, verbs: [get], resources: [\"po*\"]}\n", "kubernetes.rules[0].resources[0]"),
        ("  authentication: {provider: corp}\n  rules:\n  - {name: a, verbs: [get], resources: [pods], stepUp: {provider: corp, bindToPeer: azp}}\n", "kubernetes.rules[0].stepUp"),
        ("  authentication: {provider: corp}\n  rules:\n  - {name: a, verbs: [get], resources: [pods], stepUp: {provider: other}}\n", "kubernetes.rules[0].stepUp.provider"),
        ("  authentication: {provider: corp}\n  rules:\n  - {name: a, verbs: [get], resources: [pods]}\n  - {name: a, verbs: [get], resources: [pods]}\n", "kubernetes.rules[1].name"),
    ] {
        let err = policy(section).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{field}:")), "{section}\n=> {err}");
    }
    let err = policy("  authentication: {provider: corp}\n  rules:\n  - {name: a, verbs: [get], resources: [pods], nmespaces: [x]}\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("nmespaces"), "{err}");
}

#[test]
fn rules_that_can_never_match_are_refused() {
    let head = "  authentication: {provider: corp}\n  rules:\n  - {name: a, ";
    for (rule, field, says) in [
        (
            "verbs: [create], resources: [pods/exec]",
            "resources[0]",
            "add connect",
        ),
        (
            "verbs: [get], resources: [pods, services/proxy]",
            "resources[1]",
            "add connect",
        ),
        (
            "verbs: [get], resources: [pods], namespaces: []",
            "namespaces",
            "matches nothing",
        ),
        (
            "verbs: [get], resources: [pods], apiGroups: []",
            "apiGroups",
            "matches nothing",
        ),
        (
            "verbs: [get], resources: [pods], names: []",
            "names",
            "matches nothing",
        ),
        (
            "verbs: [get], resources: [pods], groups: []",
            "groups",
            "matches nothing",
        ),
        (
            "verbs: [get], resources: [pods], apiGroups: [core]",
            "apiGroups[0]",
            "is \"\"",
        ),
    ] {
        let err = policy(&format!("{head}{rule}}}\n"))
            .unwrap_err()
            .to_string();
        let field = format!("kubernetes.rules[0].{field}:");
        assert!(
            err.starts_with(&field) && err.contains(says),
            "{rule}\n=> {err}"
        );
    }
    // What they should have said loads.
    for rule in [
        "verbs: [connect], resources: [pods/exec]",
        "verbs: [\"*\"], resources: [nodes/proxy]",
        "verbs: [get], resources: [pods], apiGroups: [\"\"]",
    ] {
        policy(&format!("{head}{rule}}}\n")).unwrap_or_else(|e| panic!("{rule}: {e}"));
    }
}

#[test]
fn groups_need_a_prefix_asked_for() {
    let err = policy("  authentication: {provider: corp, groupsClaim: groups}\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("kubernetes.authentication.groupsPrefix:")
            && err.contains("\"-\" for none"),
        "{err}"
    );
    let none =
        policy("  authentication: {provider: corp, groupsClaim: groups, groupsPrefix: \"-\"}\n")
            .unwrap();
    assert_eq!(none.kubernetes().unwrap().authentication.groups_prefix, "");
    let without_groups = policy("  authentication: {provider: corp}\n").unwrap();
    assert_eq!(
        without_groups
            .kubernetes()
            .unwrap()
            .authentication
            .groups_prefix,
        ""
    );
}

#[test]
fn a_list_across_namespaces_meets_step_up_rules_of_any_namespace() {
    let p = policy(
        "  authentication: {provider: corp}\n  rules:\n\
         \x20 - {name: dev-reads, verbs: [list, watch], resources: [secrets], namespaces: [dev]}\n\
         \x20 - {name: prod-secrets, verbs: [get, list, watch], resources: [secrets], namespaces: [prod], \
         stepUp: {provider: corp, acr: [urn:stepmesh:acr:mfa]}}\n",
    )
    .unwrap();
    let k = p.kubernetes().unwrap();
    let decided = |r: KubeRequest<'_>| k.rule_for(&r, &[]).map(|rule| &*rule.name);
    // `kubectl get secrets -A` and its watch read prod's too; the dev
    // exemption does not cover every namespace, so it does not decide.
    for verb in ["list", "watch"] {
        assert_eq!(
            decided(req(verb, "secrets", "", "", "")),
            Some("prod-secrets"),
            "{verb}"
        );
    }
    assert_eq!(
        decided(req("list", "secrets", "", "dev", "")),
        Some("dev-reads")
    );
    // A field selector naming `db` still lists every namespace's `db`.
    assert_eq!(
        decided(req("list", "secrets", "", "", "db")),
        Some("prod-secrets")
    );
    assert_eq!(decided(req("list", "secrets", "", "staging", "")), None);
    // A named get has a namespace: only its own.
    assert_eq!(decided(req("get", "secrets", "", "staging", "db")), None);
}

#[test]
fn a_list_across_namespaces_meets_every_step_up_rule_not_the_first_alone() {
    let p = policy(
        "  authentication: {provider: corp}\n  rules:\n\
         \x20 - {name: dev, verbs: [list], resources: [secrets], namespaces: [dev], \
         stepUp: {provider: corp, maxAge: 12h}}\n\
         \x20 - {name: prod, verbs: [list], resources: [secrets], namespaces: [prod], \
         stepUp: {provider: corp, acr: [urn:stepmesh:acr:mfa], maxAge: 10m}}\n",
    )
    .unwrap();
    let k = p.kubernetes().unwrap();
    let names = |r: KubeRequest<'_>| -> Vec<String> {
        k.step_ups_across(&r, &[])
            .iter()
            .map(|r| r.name.to_string())
            .collect()
    };
    assert_eq!(names(req("list", "secrets", "", "", "")), ["dev", "prod"]);
    // An exemption for every namespace, first, holds as written.
    let on_call = policy(
        "  authentication: {provider: corp}\n  rules:\n\
         \x20 - {name: on-call, verbs: [list], resources: [secrets], namespaces: [\"*\"]}\n\
         \x20 - {name: prod, verbs: [list], resources: [secrets], namespaces: [prod], \
         stepUp: {provider: corp}}\n",
    )
    .unwrap();
    let k2 = on_call.kubernetes().unwrap();
    assert!(k2
        .step_ups_across(&req("list", "secrets", "", "", ""), &[])
        .is_empty());
    assert!(
        names(req("list", "secrets", "", "prod", "")).is_empty(),
        "one namespace: first match"
    );
    assert!(names(req("get", "secrets", "", "", "x")).is_empty());
}
