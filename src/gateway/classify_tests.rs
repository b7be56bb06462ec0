//! Unit checks of the RequestInfo port; `tests/gateway_classify.rs`
//! compares it with a real API server's own reading.

use http::Method;

use super::*;

fn c(method: Method, target: &str) -> RequestInfo {
    let (path, query) = target
        .split_once('?')
        .map_or((target, None), |(p, q)| (p, Some(q)));
    classify(&method, path, query).unwrap_or_else(|e| panic!("{target}: {e}"))
}

#[test]
fn core_and_named_groups() {
    let i = c(Method::GET, "/api/v1/namespaces/prod/pods/web-1");
    assert_eq!(
        (
            i.verb.as_str(),
            i.api_group.as_str(),
            i.namespace.as_str(),
            i.resource.as_str(),
            i.name.as_str()
        ),
        ("get", "", "prod", "pods", "web-1")
    );
    let i = c(Method::DELETE, "/apis/apps/v1/namespaces/prod/deployments");
    assert_eq!(
        (i.verb.as_str(), i.api_group.as_str()),
        ("deletecollection", "apps")
    );
    let i = c(
        Method::GET,
        "/apis/rbac.authorization.k8s.io/v1/clusterroles?watch=1",
    );
    assert_eq!((i.verb.as_str(), i.namespace.as_str()), ("watch", ""));
}

#[test]
fn connect_subresources_are_classified_by_path_not_method() {
    for method in [Method::GET, Method::POST] {
        let i = c(
            method,
            "/api/v1/namespaces/prod/pods/web-1/exec?command=sh&stdin=true",
        );
        assert_eq!(i.resource_path(), "pods/exec");
        assert!(i.is_connect());
    }
    let i = c(Method::GET, "/api/v1/proxy/namespaces/prod/pods/web-1/a/b");
    assert_eq!(
        (i.verb.as_str(), i.subresource.as_str(), i.name.as_str()),
        ("proxy", "", "web-1")
    );
    assert!(i.is_connect());
}

#[test]
fn namespaces_and_their_own_subresources() {
    let i = c(Method::GET, "/api/v1/namespaces/prod");
    assert_eq!(
        (i.resource.as_str(), i.name.as_str(), i.namespace.as_str()),
        ("namespaces", "prod", "prod")
    );
    let i = c(Method::PUT, "/api/v1/namespaces/prod/finalize");
    assert_eq!(i.resource_path(), "namespaces/finalize");
    let i = c(Method::GET, "/api/v1/namespaces");
    assert_eq!((i.verb.as_str(), i.namespace.as_str()), ("list", ""));
}

#[test]
fn discovery_and_non_resource_paths() {
    for target in [
        "/api",
        "/api/v1",
        "/apis",
        "/apis/apps",
        "/apis/apps/v1",
        "/healthz",
        "/version",
    ] {
        let i = c(Method::GET, target);
        assert!(!i.is_resource_request, "{target}");
        assert_eq!(i.verb, "get");
    }
}

#[test]
fn field_selector_on_name_names_the_object() {
    let i = c(
        Method::GET,
        "/api/v1/namespaces/prod/secrets?fieldSelector=metadata.name%3Ddb&watch=true",
    );
    assert_eq!((i.verb.as_str(), i.name.as_str()), ("watch", "db"));
    let i = c(
        Method::GET,
        "/api/v1/namespaces/prod/secrets?fieldSelector=metadata.name!%3Ddb",
    );
    assert_eq!((i.verb.as_str(), i.name.as_str()), ("list", ""));
}

#[test]
fn ambiguous_forms_are_refused() {
    for (path, query) in [
        ("/api/v1/namespaces/prod/pods/../secrets", None),
        ("/api/v1/namespaces/prod//secrets", None),
        ("/api/v1/namespaces/prod/secrets%2Fx", None),
        ("/api/v1/watch", None),
        ("/api/v1/namespaces/prod/secrets", Some("watch=fal%C5%BFe")),
        (
            "/api/v1/namespaces/prod/secrets",
            Some("labelSelector=a%3Db&fieldSelector=metadata.name%3Ddb"),
        ),
        (
            "/api/v1/namespaces/prod/secrets",
            Some("watch=false&watch=true"),
        ),
        (
            "/api/v1/namespaces/prod/secrets",
            Some("fieldSelector=metadata.name"),
        ),
        ("/api/v1/namespaces/prod/secrets", Some("watch=1;x=2")),
    ] {
        assert!(
            classify(&Method::GET, path, query).is_err(),
            "{path}?{query:?}"
        );
    }
}

#[test]
fn an_escape_is_read_decoded_as_the_api_server_does() {
    let i = c(Method::DELETE, "/api/v1/namespaces/pr%6fd/secrets/db");
    assert_eq!((i.namespace.as_str(), i.verb.as_str()), ("prod", "delete"));
}

#[test]
fn watch_is_read_as_the_parameter_codec_reads_booleans() {
    // Found by tests/gateway_classify.rs against kube-apiserver 1.36: not
    // strconv.ParseBool; only `0` and `false` (any case) are false.
    for (value, verb) in [
        ("true", "watch"),
        ("1", "watch"),
        ("", "watch"),
        ("f", "watch"),
        ("no", "watch"),
        ("maybe", "watch"),
        ("0", "list"),
        ("false", "list"),
        ("FaLsE", "list"),
    ] {
        let i = c(Method::GET, &format!("/api/v1/pods?watch={value}"));
        assert_eq!(i.verb, verb, "watch={value}");
    }
}

#[test]
fn undecodable_list_options_drop_the_name_but_keep_the_watch() {
    let base = "/api/v1/namespaces/prod/secrets?fieldSelector=metadata.name%3Ddb";
    let i = c(Method::GET, &format!("{base}&limit=500&timeoutSeconds=5"));
    assert_eq!((i.verb.as_str(), i.name.as_str()), ("list", "db"));
    for bad in ["limit=abc", "limit=", "timeoutSeconds=1.5"] {
        let i = c(Method::GET, &format!("{base}&{bad}&watch=true"));
        assert_eq!((i.verb.as_str(), i.name.as_str()), ("watch", ""), "{bad}");
    }
    // Only the first value is decoded.
    let i = c(Method::GET, &format!("{base}&limit=5&limit=x"));
    assert_eq!(i.name, "db");
    // A label selector alone changes nothing.
    let i = c(Method::GET, "/api/v1/pods?labelSelector=app%3Dweb");
    assert_eq!((i.verb.as_str(), i.name.as_str()), ("list", ""));
}

#[test]
fn a_query_of_more_than_a_thousand_parameters_is_refused() {
    let query = format!("watch=true{}", "&x=1".repeat(1000));
    assert!(classify(&Method::GET, "/api/v1/pods", Some(&query)).is_err());
    let query = format!("watch=true{}", "&x=1".repeat(998));
    assert!(classify(&Method::GET, "/api/v1/pods", Some(&query)).is_ok());
}
