//! Injection patch generation: the pure `mutate` on the API server's own
//! AdmissionReview fixture, and the whole review (decode, mutate, encode).
//! Run: cargo bench -j2 --bench inject_patch
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::Value;
use stepmesh::inject::config::InjectorConfig;
use stepmesh::inject::mutate::{mutate, Mutation};
use stepmesh::inject::review::review;

const FIXTURE: &str = include_str!("../tests/fixtures/k8s/admissionreview-pod-create.json");

fn patch_generation(c: &mut Criterion) {
    let config = InjectorConfig::default();
    let review_doc: Value = serde_json::from_str(FIXTURE).unwrap();
    let pod = review_doc["request"]["object"].clone();
    assert!(matches!(
        mutate(&pod, &config, "default"),
        Ok(Mutation::Patch(_))
    ));
    c.bench_function("inject/mutate", |b| {
        b.iter(|| mutate(black_box(&pod), &config, "default").unwrap())
    });
    let body = FIXTURE.as_bytes();
    c.bench_function("inject/review (decode+mutate+encode)", |b| {
        b.iter(|| review(black_box(body), &config).unwrap())
    });
}

criterion_group!(benches, patch_generation);
criterion_main!(benches);
