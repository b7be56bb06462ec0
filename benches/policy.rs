//! Policy decisions, the per-connection and per-request hot path: a
//! realistic policy (20 ports, each with exact and wildcard identities, HTTP
//! ports with routes), decisions that scan to the end of the lists.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use stepmesh::policy::{Policy, SpiffeId};

const PORTS: u16 = 20;

fn policy_yaml() -> String {
    let mut yaml = String::from(
        "trustDomain: cluster.local\nmode: enforce\ninbound:\n  default: deny\n  ports:\n",
    );
    for p in 0..PORTS {
        let protocol = if p % 2 == 0 { "http" } else { "tcp" };
        yaml.push_str(&format!(
            "    - port: {}\n      protocol: {protocol}\n      allow:\n",
            8000 + p
        ));
        for rule in 0..3 {
            let ids: Vec<String> = (0..10)
                .map(|i| format!("spiffe://cluster.local/ns/team{rule}/sa/svc{i}"))
                .chain([format!("spiffe://cluster.local/ns/ops{rule}/*")])
                .collect();
            yaml.push_str(&format!("        - from: [{}]\n", ids.join(", ")));
        }
        if protocol == "http" {
            yaml.push_str("      routes:\n");
            for r in 0..5 {
                yaml.push_str(&format!(
                    "        - name: r{r}\n          match: {{methods: [POST, DELETE], path: /api{r}/*}}\n          from: [spiffe://cluster.local/ns/team2/sa/svc9]\n"
                ));
            }
        }
    }
    yaml
}

fn decisions(c: &mut Criterion) {
    let policy = Policy::from_yaml(&policy_yaml()).expect("the bench policy is valid");
    let last_exact = SpiffeId::parse("spiffe://cluster.local/ns/team2/sa/svc9").expect("valid ID");
    let wildcard = SpiffeId::parse("spiffe://cluster.local/ns/ops2/sa/anything").expect("valid ID");
    let unlisted = SpiffeId::parse("spiffe://cluster.local/ns/web/sa/other").expect("valid ID");
    let port = 8000 + PORTS - 2; // an HTTP port near the end of the list
    assert!(policy.authorize(&last_exact, port).allow);
    assert!(policy.authorize(&wildcard, port).allow);
    assert!(!policy.authorize(&unlisted, port).allow);

    let mut group = c.benchmark_group("policy");
    group.bench_function("authorize/allowed, last exact ID", |b| {
        b.iter(|| policy.authorize(black_box(&last_exact), black_box(port)))
    });
    group.bench_function("authorize/allowed, wildcard", |b| {
        b.iter(|| policy.authorize(black_box(&wildcard), black_box(port)))
    });
    group.bench_function("authorize/denied, scans every rule", |b| {
        b.iter(|| policy.authorize(black_box(&unlisted), black_box(port)))
    });
    let post = http::Method::POST;
    let headers = http::HeaderMap::new();
    for (name, target) in [
        ("last route of 5", "/api4/refunds/123"),
        ("no route matches", "/health"),
        // Upper case, a `;` parameter and an escape: 8 readings, each matched.
        ("hostile path, 8 readings", "/API4/Refunds;v=1/caf%C3%A9"),
        // The same with a format suffix (`.json`): 16 readings.
        (
            "hostile path with a format, 16 readings",
            "/API4/Refunds;v=1/caf%C3%A9.json",
        ),
    ] {
        let uri = http::Uri::from_static(target);
        group.bench_function(format!("authorize_request/{name}"), |b| {
            b.iter(|| {
                policy.authorize_request(
                    black_box(&last_exact),
                    port,
                    &post,
                    black_box(&uri),
                    &headers,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
