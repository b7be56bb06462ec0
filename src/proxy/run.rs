//! Wiring of `stepmesh proxy`: registry, identity source, admin, policy,
//! listeners, then wait for a signal and drain.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use stepmesh_ca::spiffe_id::{SpiffeIdPattern, TrustDomain};
use tokio::net::TcpListener;

use super::args::ProxyArgs;
use super::conn::{Shared, Timeouts};
use super::launch::ListenerInfo;
use crate::accesslog::AccessLog;
use crate::admin::AdminState;
use crate::drain;
use crate::exit::{self, ConfigResult as _};
use crate::identity::store::CertStore;
use crate::metrics::{IdentityMetrics, ProxyMetrics};
use crate::policy::{Policy, PolicyWatch};
use crate::tls;

/// Runs the sidecar until SIGTERM/SIGINT and the drain end.
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    // Everything the flags say is checked before anything starts; a bad
    // value is a configuration error (exit 64).
    if args.inbound.is_empty() && args.outbound.is_empty() && !args.transparent {
        return Err(exit::config(anyhow::anyhow!(
            "no listener: give --inbound, --outbound or --transparent"
        )));
    }
    let expected: Vec<SpiffeIdPattern> = args
        .outbound
        .iter()
        .map(|o| {
            SpiffeIdPattern::parse(&o.expected_id)
                .with_context(|| format!("--outbound SPIFFE_ID {:?}", o.expected_id))
        })
        .collect::<anyhow::Result<_>>()
        .config_err()?;
    let trust_domain: Option<TrustDomain> = args
        .trust_domain
        .as_deref()
        .map(|td| td.parse().with_context(|| format!("--trust-domain {td:?}")))
        .transpose()
        .config_err()?;
    let probe_table = app_probes(args.app_probes.as_deref())?;

    let mut signals = drain::Signals::new().context("listening for SIGTERM/SIGINT")?;
    let provider = tls::provider();
    let mut registry = Registry::default();
    let proxy_metrics = ProxyMetrics::new(&mut registry);
    let identity_metrics = IdentityMetrics::new(&mut registry);
    let watched_policy = match &args.policy {
        Some(path) => Some(
            PolicyWatch::start(path.clone(), &mut registry)
                .with_context(|| format!("--policy {}", path.display()))
                .config_err()?,
        ),
        None => None,
    };
    let access_log = if args.no_access_log {
        AccessLog::disabled()
    } else {
        AccessLog::stdout(&mut registry).context("starting the access log writer")?
    };
    let stepup_metrics = crate::stepup::StepUpMetrics::register(&mut registry);
    let http_metrics = crate::http::HttpMetrics::register(&mut registry);
    let reauth = super::reauth::Reauth::new(&mut registry, args.idle_timeout);
    let probe_paths: Vec<String> = probe_table.keys().cloned().collect();
    let probes = crate::appprobe::Prober::new(probe_table, &mut registry);
    let workload_metrics = crate::workload::WorkloadMetrics::new(&mut registry);
    let registry = Arc::new(registry);
    let store = Arc::new(CertStore::new(provider.clone(), trust_domain.clone()));

    // Identity first: nothing can be served without an SVID.
    let source = super::identity_source(&args).config_err()?;
    let mut source = tokio::spawn(source.run(store.clone(), identity_metrics));

    let listeners_up = Arc::new(AtomicBool::new(false));
    let draining = Arc::new(AtomicBool::new(false));
    let policy_slot: Arc<OnceLock<PolicyWatch>> = Arc::new(OnceLock::new());
    let listener_infos: Arc<OnceLock<Vec<ListenerInfo>>> = Arc::new(OnceLock::new());
    let admin = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("--admin {}", args.admin))?;
    let admin_state = AdminState {
        registry,
        ready: {
            let (store, up, draining) = (store.clone(), listeners_up.clone(), draining.clone());
            Arc::new(move || not_ready(&store, &up, &draining))
        },
        config: {
            let (store, policy, infos, draining) = (
                store.clone(),
                policy_slot.clone(),
                listener_infos.clone(),
                draining.clone(),
            );
            Box::new(move || {
                let svid = store.info();
                let policy = policy.get().map(|p| p.current());
                serde_json::json!({
                    "spiffe_id": svid.as_ref().map(|s| s.id.to_string()),
                    "serial": svid.as_ref().map(|s| s.serial.clone()),
                    "not_after": svid.as_ref().map(|s| crate::accesslog::rfc3339(s.not_after)),
                    "trust_domain": store.trust_domain().map(|td| td.to_string()),
                    "bundle_roots": store.bundle().map(|b| b.roots().len()),
                    "policy_digest": policy.as_ref().map(|p| p.digest().to_owned()),
                    "policy_mode": policy.as_ref().map(|p| format!("{:?}", p.mode()).to_lowercase()),
                    "listeners": infos.get(),
                    "draining": draining.load(Ordering::Acquire),
                    "app_probes": probe_paths,
                })
            })
        },
        probes,
    };
    tracing::info!(admin = %admin.local_addr()?, "admin listening");
    tokio::spawn(crate::admin::sidecar(admin_state).serve(admin, std::future::pending()));

    // Off the data path: the Workload API waits for the first SVID itself,
    // so the socket exists (and clients may connect) from the start.
    if let Some(path) = &args.workload_api {
        let listener = crate::workload::bind(path)
            .await
            .with_context(|| format!("--workload-api {}", path.display()))
            .config_err()?;
        let callers = crate::workload::Callers::new(args.workload_api_uid.clone());
        tracing::info!(socket = %path.display(), uids = ?args.workload_api_uid, "SPIFFE Workload API listening");
        let store = store.clone();
        // JWT-SVIDs come from the CA, with the identity source's credential.
        let jwt = match (&args.ca, &args.ca_bundle, &args.token_file, &trust_domain) {
            (Some(ca), Some(bundle), Some(token), Some(td)) => {
                Some(Arc::new(crate::workload::jwt::JwtMinter::new(
                    ca.clone(),
                    bundle.clone(),
                    token.clone(),
                    td.clone(),
                )))
            }
            _ => None,
        };
        tokio::spawn(async move {
            let served = crate::workload::serve(listener, store, callers, workload_metrics, jwt);
            if let Err(e) = served.await {
                tracing::error!(error = %e, "SPIFFE Workload API server stopped");
            }
        });
    }

    tracing::info!("waiting for the first SVID");
    tokio::select! {
        () = store.wait_loaded() => {}
        // The source gives up only when its configuration cannot work.
        ended = &mut source => return Err(match ended {
            Ok(Err(e)) => e,
            Ok(Ok(never)) => match never {},
            Err(e) => anyhow::Error::new(e).context("identity source"),
        }),
        signal = signals.recv() => {
            tracing::info!(signal, "stopping before the first SVID");
            return Ok(());
        }
    }
    let td = store
        .trust_domain()
        .context("SVID loaded without a trust domain")?;
    let policy = match watched_policy {
        Some(policy) => policy,
        None => PolicyWatch::fixed(Policy::allow_authenticated(
            td.as_str()
                .parse()
                .with_context(|| format!("trust domain {td}"))?,
        )),
    };
    if policy.current().trust_domain().as_str() != td.as_str() {
        tracing::warn!(policy = %policy.current().trust_domain(), svid = %td, "policy trust domain differs from the SVID's");
    }
    let _ = policy_slot.set(policy.clone());

    let stepup = {
        // `jwks: {mesh: true}` providers verify JWT-SVIDs with the CA's key set.
        let store = store.clone();
        Arc::new(
            crate::stepup::StepUp::new(stepup_metrics)
                .with_mesh_jwks(Arc::new(move || store.jwks())),
        )
    };
    {
        // Fetch step-up keys before the first request needs them.
        let (stepup, policy) = (stepup.clone(), policy.current());
        tokio::spawn(async move { stepup.sync(&policy).await });
    }
    let request_log = {
        let log = access_log.clone();
        crate::http::RequestLog::new(move |record| log.log_line(|line| record.write_json(line)))
    };
    let connections = crate::net::caps::ConnectionBudget::new(
        crate::net::fdlimit::connection_limit(args.max_connections, crate::net::fdlimit::raise()),
    );
    let peer_cap = crate::net::caps::PerKeyCap::new(args.max_connections_per_peer);
    let http = Arc::new(
        crate::http::HttpLayer::new(policy.clone(), stepup, http_metrics, request_log)
            .with_connection_limits(connections.clone(), peer_cap.clone())
            .with_timeouts(args.idle_timeout, args.connect_timeout)
            .with_mesh_sidecar(store.clone(), proxy_metrics.clone())
            .with_mesh_keepalive(args.mesh_keepalive)
            .with_mesh_pool_idle(args.mesh_pool_idle)
            .with_limits(crate::http::HttpLimits {
                header_timeout: args.header_timeout,
                body_idle_timeout: args.body_idle_timeout,
                head: crate::http::HeadLimits {
                    bytes: args.max_request_header_bytes as usize,
                    fields: usize::from(args.max_request_headers),
                },
            }),
    );
    tokio::spawn(crate::http::HttpLayer::sweep_idle(Arc::downgrade(&http)));
    let shared = Arc::new(Shared {
        http,
        connections,
        peer_cap,
        source_cap: crate::net::caps::PerKeyCap::new(args.max_connections_per_source),
        opaque_ports: args.opaque_ports.clone(),
        reauth,
        tunnel: !args.no_tunnel,
        inbound_apps: std::sync::OnceLock::new(),
        store: store.clone(),
        policy,
        metrics: proxy_metrics.clone(),
        access_log,
        timeouts: Timeouts {
            handshake: args.handshake_timeout,
            idle: args.idle_timeout,
            connect: args.connect_timeout,
        },
    });
    tokio::spawn(super::reauth::follow(shared.clone()));
    tokio::spawn(super::reauth::tick_idle_periods(shared.clone()));
    let (trigger, watch) = drain::channel();
    let infos = super::launch::listeners(&args, expected, &td, &provider, &shared, &watch).await?;
    let _ = listener_infos.set(infos);
    drop(watch);
    listeners_up.store(true, Ordering::Release);

    let signal = signals.recv().await;
    draining.store(true, Ordering::Release);
    shared.http.start_drain();
    tracing::info!(signal, timeout = ?args.drain_timeout, "draining");
    tokio::select! {
        drained = trigger.drain(args.drain_timeout) => if drained {
            tracing::info!("drained");
        } else {
            tracing::warn!("drain timeout: closing the remaining connections");
        },
        second = signals.recv() => {
            tracing::warn!(signal = second, "second signal: closing the remaining connections now");
        }
    }
    let log = shared.access_log.clone();
    let _ = tokio::task::spawn_blocking(move || log.flush(Duration::from_secs(2))).await;
    Ok(())
}

/// Why `/ready` says 503, or `None` when ready: an SVID that is valid now,
/// every listener up, no drain.
fn not_ready(store: &CertStore, up: &AtomicBool, draining: &AtomicBool) -> Option<String> {
    if draining.load(Ordering::Acquire) {
        return Some("draining".into());
    }
    let trouble = || {
        store
            .trouble()
            .map(|t| format!(": {t}"))
            .unwrap_or_default()
    };
    let Some(svid) = store.info() else {
        return Some(format!("no SVID yet{}", trouble()));
    };
    // An expired SVID (the CA down for too long) makes every peer refuse
    // us: stop attracting traffic until renewed.
    if svid.not_after + stepmesh_ca::svid::CLOCK_SKEW <= std::time::SystemTime::now() {
        let at = crate::accesslog::rfc3339(svid.not_after);
        return Some(format!("SVID expired at {at}{}", trouble()));
    }
    if !up.load(Ordering::Acquire) {
        return Some("listeners not up yet".into());
    }
    None
}

/// The `--app-probes` table (none when absent or blank); a malformed one is
/// a configuration error naming the entry and field.
fn app_probes(json: Option<&str>) -> anyhow::Result<crate::appprobe::ProbeTable> {
    let table = match json.map(str::trim) {
        None | Some("") => Default::default(),
        Some(json) => crate::appprobe::parse(json)
            .context("--app-probes")
            .config_err()?,
    };
    if !table.is_empty() {
        tracing::info!(probes = table.len(), "app probes served on the admin port");
    }
    Ok(table)
}
