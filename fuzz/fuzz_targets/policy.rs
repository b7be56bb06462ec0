//! Policies are YAML written by operators and, through the injector's
//! ConfigMaps, by anyone who can edit one: `Policy::from_yaml` must refuse
//! any bad document with an error, never a panic. A policy that loads must
//! load the same way again (same digest), and every decision on it (connect,
//! route, outbound, NetworkPolicy rendering) must be answerable.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use stepmesh::policy::target::{self, Readings};
use stepmesh::policy::{netpol, Mode, Policy, SpiffeId};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::from_yaml(text) else {
        return;
    };
    let again = Policy::from_yaml(text).expect("a policy that loaded loads again");
    assert_eq!(
        again.digest(),
        policy.digest(),
        "the digest is a function of the text"
    );

    let td = policy.trust_domain().clone();
    let peers = [
        SpiffeId::for_service_account(&td, "default", "default"),
        SpiffeId::parse("spiffe://foreign.test/ns/a/sa/b"),
    ];
    let mut ports: Vec<u16> = policy.ports().iter().map(|p| p.port).collect();
    ports.extend([0, 80, 8080, 65535]);
    let methods = [http::Method::GET, http::Method::POST, http::Method::DELETE];
    let paths = [
        "/",
        "/admin",
        "/Admin/",
        "/api/v1/x",
        "/a;x/b",
        "/a%41",
        "/a/../b",
        "*",
    ];
    let no_headers = http::HeaderMap::new();
    for peer in peers.iter().flatten() {
        for &port in &ports {
            let d = policy.authorize(peer, port);
            match policy.mode() {
                Mode::Enforce => assert!(!d.would_deny, "enforce mode never only logs"),
                Mode::Audit => assert!(d.allow, "audit mode never denies"),
            }
            let _ = policy.port_protocol(port);
            let options = policy.port(port).map(|p| p.path_match).unwrap_or_default();
            for method in &methods {
                for path in paths {
                    let Ok(uri) = target::parse(path) else {
                        continue;
                    };
                    let Ok(m) = policy.authorize_request(peer, port, method, &uri, &no_headers)
                    else {
                        continue;
                    };
                    if m.decision.allow && !m.decision.would_deny {
                        assert!(d.allow && !d.would_deny, "a route only narrows the port");
                    }
                    if let Some(route) = m.route {
                        assert!(
                            route.matches_method(method),
                            "the route taken matches the method"
                        );
                        let readings =
                            Readings::of(uri.path(), options).expect("a routed path has readings");
                        assert!(
                            readings.iter().any(|r| route.matches_path(r)),
                            "the route taken matches a reading of the path"
                        );
                    }
                }
            }
        }
    }
    for addr in ["10.0.0.1:80", "[::1]:443", "192.168.1.1:5432"] {
        let addr: SocketAddr = addr.parse().expect("fixed address");
        let _ = policy.outbound(addr);
    }
    let _ = netpol::render(&policy, "default", "app=fuzz");
});
