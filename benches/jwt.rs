//! Step-up JWT verification as the sidecar does it per request: cold (a
//! token the provider has not seen: parse, key lookup, signature, claims) for
//! ES256 and RS256, cached (seen before, until its `exp`), and the whole
//! gate decision of a sensitive route with a cached token; and the
//! Kubernetes gateway's whole decision on `kubectl delete` with a cached
//! token (authenticate, classify, match the rule, check the step-up).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use prometheus_client::registry::Registry;
use stepmesh::policy::{Policy, ProviderConfig, SpiffeId};
use stepmesh::stepup::testing::{base_claims, now, TestIdp};
use stepmesh::stepup::{self, Peer, Provider, RequestInfo, StepUp, StepUpMetrics};

const ISSUER: &str = "https://idp.bench.example";
const FRONTEND: &str = "spiffe://cluster.local/ns/web/sa/frontend";

struct Setup {
    rt: tokio::runtime::Runtime,
    idp: TestIdp,
    policy: Policy,
    config: Arc<ProviderConfig>,
    metrics: StepUpMetrics,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let idp = TestIdp::new(ISSUER).expect("test keys");
    let dir = tempfile::tempdir().expect("a temp dir");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, idp.jwks().to_string()).expect("writing the JWKS");
    let yaml = format!(
        "trustDomain: cluster.local\nstepUp:\n  providers:\n    idp:\n      issuer: {ISSUER}\n      jwks: {{file: {}}}\n      audiences: [payments]\n      algorithms: [ES256, RS256]\ninbound:\n  default: deny\n  ports:\n    - port: 8080\n      protocol: http\n      allow:\n        - from: [{FRONTEND}]\n      routes:\n        - name: refunds\n          match: {{methods: [POST], path: /refunds/*}}\n          stepUp:\n            provider: idp\n            acr: [urn:stepmesh:acr:mfa]\n            maxAge: 300s\n            bindToPeer: azp\nkubernetes:\n  authentication: {{provider: idp, usernameClaim: email, groupsClaim: groups, groupsPrefix: \"-\"}}\n  rules:\n    - name: routine\n      verbs: [get, list, watch]\n      resources: [configmaps]\n    - name: delete-in-prod\n      verbs: [delete]\n      resources: [\"*\"]\n      namespaces: [prod]\n      stepUp: {{provider: idp, acr: [urn:stepmesh:acr:mfa], maxAge: 10m}}\n",
        jwks.display()
    );
    let policy = Policy::from_yaml(&yaml).expect("the bench policy is valid");
    let config = policy.provider("idp").expect("provider idp").clone();
    let metrics = StepUpMetrics::register(&mut Registry::default());
    Setup {
        rt,
        idp,
        policy,
        config,
        metrics,
        _dir: dir,
    }
}

fn claims() -> serde_json::Value {
    let mut claims = base_claims(ISSUER, "payments", "alice");
    claims["azp"] = FRONTEND.into();
    claims["acr"] = "urn:stepmesh:acr:mfa".into();
    claims["auth_time"] = now().into();
    claims["email"] = "alice@example.com".into();
    claims["groups"] = serde_json::json!(["developers"]);
    claims
}

fn verify(c: &mut Criterion) {
    let s = setup();
    let es = s.idp.es256(&claims()).expect("minting");
    let rs = s.idp.rs256(&claims()).expect("minting");
    let at = now() as u64;
    let fresh = || {
        s.rt.block_on(Provider::start(s.config.clone(), s.metrics.clone(), None))
    };
    let provider = fresh();
    for token in [&es, &rs] {
        s.rt.block_on(provider.verify(token, at))
            .expect("the bench tokens verify");
    }

    let mut group = c.benchmark_group("jwt");
    for (name, token) in [("ES256", &es), ("RS256", &rs)] {
        // A provider that has never seen the token: nothing cached.
        group.bench_function(format!("verify cold/{name}"), |b| {
            b.iter_batched(
                fresh,
                |p| s.rt.block_on(p.verify(black_box(token), at)),
                BatchSize::PerIteration,
            )
        });
        group.bench_function(format!("verify cached/{name}"), |b| {
            b.iter(|| s.rt.block_on(provider.verify(black_box(token), at)))
        });
    }

    // The whole decision of `POST /refunds/1` with a cached ES256 token.
    let stepup = StepUp::new(s.metrics.clone());
    s.rt.block_on(stepup.sync(&s.policy));
    let peer_id = SpiffeId::parse(FRONTEND).expect("valid ID");
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {es}").parse().expect("a header value"),
    );
    let method = http::Method::POST;
    let uri = http::Uri::from_static("/refunds/1");
    let request = RequestInfo {
        peer: Peer {
            id: &peer_id,
            x5t_s256: "",
        },
        port: 8080,
        method: &method,
        uri: &uri,
        headers: &headers,
    };
    let first =
        s.rt.block_on(stepup::decide(&s.policy, &stepup, request, at));
    assert_eq!(
        first.subject.as_deref(),
        Some("alice"),
        "the bench request is allowed: {first:?}"
    );
    group.bench_function("gate decision/sensitive route, cached token", |b| {
        b.iter(|| {
            s.rt.block_on(stepup::decide(&s.policy, &stepup, black_box(request), at))
        })
    });

    // The gateway: `kubectl delete configmap x -n prod` with a cached token
    // that meets the rule's step-up.
    let method = http::Method::DELETE;
    let uri = http::Uri::from_static("/api/v1/namespaces/prod/configmaps/x");
    let first = s.rt.block_on(stepmesh::gateway::decide::decide(
        &s.policy, &stepup, &method, &uri, &headers, at,
    ));
    assert_eq!(
        first.reason, "step_up_ok",
        "the bench request passes: {first:?}"
    );
    group.bench_function("gateway decision/kubectl delete, cached token", |b| {
        b.iter(|| {
            s.rt.block_on(stepmesh::gateway::decide::decide(
                &s.policy,
                &stepup,
                black_box(&method),
                black_box(&uri),
                &headers,
                at,
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
