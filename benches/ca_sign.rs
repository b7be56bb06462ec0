//! Criterion micro-benchmarks of the CA's hot pieces: CSR check + sign,
//! X.509-SVID verification, SPIFFE ID parsing.
//!
//! `cargo bench --bench ca_sign`

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use rustls_pki_types::UnixTime;
use stepmesh_ca::client::make_csr;
use stepmesh_ca::signer::{Csr, Signer};
use stepmesh_ca::spiffe_id::SpiffeId;
use stepmesh_ca::store::{self, Mode};
use stepmesh_ca::svid;
use stepmesh_ca::testing::Pki;

fn sign(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let td = "td".parse().unwrap();
    let authority = store::load(dir.path(), &td, &Mode::Root).unwrap();
    let signer = Signer::new(
        authority,
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    );
    let id = SpiffeId::parse("spiffe://td/ns/default/sa/web").unwrap();
    let csr_pem = make_csr(&rcgen::KeyPair::generate().unwrap(), None).unwrap();
    c.bench_function("csr_parse_and_check", |b| {
        b.iter(|| Csr::from_pem(black_box(&csr_pem)).unwrap())
    });
    let csr = Csr::from_pem(&csr_pem).unwrap();
    c.bench_function("csr_sign", |b| {
        b.iter(|| {
            signer
                .sign(black_box(&csr), &id, Duration::from_secs(3600))
                .unwrap()
        })
    });
}

fn verify(c: &mut Criterion) {
    let pki = Pki::new("td");
    let bundle = pki.bundle();
    let leaf = pki.leaf("spiffe://td/ns/default/sa/web");
    c.bench_function("svid_verify", |b| {
        b.iter(|| svid::verify(black_box(&leaf.chain), &bundle, UnixTime::now()).unwrap())
    });
}

fn parse(c: &mut Criterion) {
    c.bench_function("spiffe_id_parse", |b| {
        b.iter(|| SpiffeId::parse(black_box("spiffe://cluster.local/ns/payments/sa/api")).unwrap())
    });
}

criterion_group!(benches, sign, verify, parse);
criterion_main!(benches);
