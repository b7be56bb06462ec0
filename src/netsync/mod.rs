//! `stepmesh netpol sync`: keeps the cluster's NetworkPolicies equal to what
//! the policy ConfigMaps compile to (`policy::netpol`, the same objects
//! `stepmesh policy netpol` prints). Every `--interval`, the Lease holder
//! lists the policy ConfigMaps (a label selects them) and the namespaces,
//! compiles the policies together, server-side applies what is missing or
//! differs under its own field manager, and deletes what it owns that is
//! no longer computed. It owns only objects carrying its label and never
//! touches others.
//!
//! A policy that fails validation changes nothing: it is reported (an Event
//! on the ConfigMap, a metric, a log line naming the field) and the last
//! version of it that validated in this process is compiled in its place,
//! so neither its own objects nor its callers' egress (derived from its
//! inbound rules, in other namespaces too) move. Standby replicas learn the
//! valid versions too, so a takeover keeps them. A ConfigMap first seen
//! broken (after a restart, or by a standby started after it broke) has no
//! such version: any set computed without it would miss its contribution,
//! so until it is fixed or removed (`stepmesh_netpol_blocked_configmaps`)
//! its own objects stay as they are and egress to callees, the one object
//! derived from other policies, keeps its rules towards that ConfigMap's
//! namespace ([`objects`]); the rest is kept as usual.
//!
//! An object the API server refuses (an admission policy, a quota, RBAC in
//! its namespace: a 4xx) is reported on the ConfigMap it was compiled from
//! (an Event, a metric, a log line) and the round goes on with the others;
//! that ConfigMap's objects are not pruned in that round, so its old ones
//! stay in force until its new ones all land. An API server that does not
//! answer, or answers 5xx, 401, 408 or 429, ends the round: the next
//! retries.
//!
//! Polling lists rather than watch streams: one small list per interval,
//! and no missed-event bookkeeping.

mod api;
mod lease;
mod metrics;
mod objects;
mod read;
mod sources;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use http::Method;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

use crate::policy::netpol;
use api::{query, rfc3339};
use metrics::Metrics;
use objects::{same, Blocked};
use sources::{Collected, LastGood, Refused};
use stepmesh_ca::kube::{Api, KubeError};

/// The label on every object the controller owns.
pub const OWNER_LABEL: &str = "stepmesh.io/netpol-owner";
/// Its value.
pub const OWNER: &str = "sync";
/// The label naming the ConfigMap an owned object was compiled from.
pub const SOURCE_LABEL: &str = "stepmesh.io/policy-configmap";
/// The field manager of its server-side applies.
pub const FIELD_MANAGER: &str = "stepmesh-netpol-sync";

/// `stepmesh netpol` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum NetpolCommand {
    /// The controller: keep NetworkPolicies equal to the policy ConfigMaps.
    Sync(SyncArgs),
}

/// Flags of `stepmesh netpol sync`.
#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// The API server (default: in-cluster, from KUBERNETES_SERVICE_HOST/PORT).
    #[arg(long)]
    pub server: Option<String>,
    /// CA bundle of the API server.
    #[arg(long, default_value = stepmesh_ca::https::IN_CLUSTER_CA)]
    pub ca_file: PathBuf,
    /// Bearer token file (re-read on every call).
    #[arg(long, default_value = stepmesh_ca::https::IN_CLUSTER_TOKEN)]
    pub token_file: PathBuf,
    /// Label selector of the policy ConfigMaps.
    #[arg(long, default_value = "stepmesh.io/policy=netpol")]
    pub configmap_selector: String,
    /// The ConfigMap key holding the policy.
    #[arg(long, default_value = "policy.yaml")]
    pub key: String,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "stepmesh-system")]
    pub lease_namespace: String,
    /// Name of the Lease.
    #[arg(long, default_value = "stepmesh-netpol-sync")]
    pub lease_name: String,
    /// This replica's name in the Lease (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How often to reconcile (and renew the Lease).
    #[arg(long, default_value = "1s", value_parser = crate::units::parse_duration)]
    pub interval: Duration,
    /// How long a Lease not renewed stays its holder's.
    #[arg(long, default_value = "10s", value_parser = crate::units::parse_duration)]
    pub lease_duration: Duration,
    /// Metrics and health (`/metrics`, `/ready`).
    #[arg(long, default_value = "0.0.0.0:15023")]
    pub admin: SocketAddr,
    /// The compiler's options.
    #[command(flatten)]
    pub options: crate::policy_cmd::NetpolOptionArgs,
}

/// Runs the controller until SIGTERM/SIGINT (then gives up the Lease).
pub async fn run(cmd: NetpolCommand) -> anyhow::Result<()> {
    let NetpolCommand::Sync(args) = cmd;
    let options = args.options.options().map_err(crate::exit::config)?;
    let server = match &args.server {
        Some(s) => s.clone(),
        None => stepmesh_ca::kube::in_cluster_server()
            .map_err(|e| crate::exit::config(anyhow::anyhow!("--server not given: {e}")))?,
    };
    let api = Api::new(server, &args.ca_file, args.token_file.clone())
        .map_err(|e| crate::exit::config(anyhow::Error::new(e).context("--ca-file")))?;
    let identity = match &args.identity {
        Some(i) => i.clone(),
        None => format!("stepmesh-netpol-{}", std::process::id()),
    };
    let metrics = Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let listener = tokio::net::TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding the admin address {}", args.admin))?;
    let admin_addr = listener.local_addr()?;
    let admin = stepmesh_ca::admin::Admin::new(Arc::new(registry), Arc::new(|| None));
    tokio::spawn(admin.serve(listener, std::future::pending()));
    println!("netpol sync {identity} admin {admin_addr}");
    tracing::info!(%identity, admin = %admin_addr, "netpol sync started");
    let mut lease = Lease::new(
        args.lease_namespace.clone(),
        args.lease_name.clone(),
        identity,
        args.lease_duration,
    );
    let mut sync = Sync {
        api,
        args,
        options,
        metrics,
        applied_before: BTreeSet::new(),
        reported: BTreeMap::new(),
        reported_refusals: BTreeMap::new(),
        last_good: LastGood::default(),
        configmaps: read::ConfigMaps::default(),
    };
    let mut signals = crate::drain::Signals::new().context("listening for signals")?;
    let mut tick = tokio::time::interval(sync.args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            signal = signals.recv() => {
                tracing::info!(signal, "stopping; giving up the Lease");
                if let Err(e) = lease.release(&sync.api).await {
                    tracing::warn!(error = %format!("{e:#}"), "releasing the Lease");
                }
                return Ok(());
            }
        }
        let leader = match lease.hold(&sync.api).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "Lease");
                false
            }
        };
        sync.metrics.leader.set(i64::from(leader));
        if !leader {
            if let Err(e) = sync.observe().await {
                tracing::warn!(error = %format!("{e:#}"), "standby: reading the policies");
            }
            continue;
        }
        if let Err(e) = sync.round(&lease).await {
            tracing::warn!(error = %format!("{e:#}"), "sync failed; nothing more changed this round");
        }
    }
}

use lease::Lease;

struct Sync {
    api: Api,
    args: SyncArgs,
    options: netpol::Options,
    metrics: Metrics,
    /// Objects applied since start: one missing now was deleted by someone.
    applied_before: BTreeSet<(String, String)>,
    /// ConfigMap → the resourceVersion whose refusal has an Event.
    reported: BTreeMap<(String, String), String>,
    /// ConfigMap → the resourceVersion whose refused objects have an Event.
    reported_refusals: BTreeMap<(String, String), String>,
    /// Per ConfigMap, the last policy that validated.
    last_good: LastGood,
    /// The policy ConfigMaps as last read.
    configmaps: read::ConfigMaps,
}

impl Sync {
    /// The policies of this moment, as [`LastGood::collect`] judges them.
    async fn collect(&mut self) -> anyhow::Result<Collected> {
        let active: BTreeSet<String> = self
            .api
            .list("/api/v1/namespaces")
            .await?
            .iter()
            .filter(|n| n["status"]["phase"] != "Terminating")
            .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        let selector = &self.args.configmap_selector;
        let cms = self.configmaps.read(&self.api, selector).await?;
        Ok(self.last_good.collect(&cms, &active, &self.args.key))
    }

    /// A standby's round: learn the valid policies, write nothing, so that
    /// after a takeover a broken ConfigMap still has a version to stand in.
    /// The blocked gauge is set here too: above 0, a takeover would block.
    async fn observe(&mut self) -> anyhow::Result<()> {
        let collected = self.collect().await?;
        self.metrics.blocked.set(count(collected.blocking()));
        Ok(())
    }

    async fn round(&mut self, lease: &Lease) -> anyhow::Result<()> {
        let collected = self.collect().await?;
        for r in &collected.refused {
            self.refuse(r).await;
        }
        let blocking: Vec<String> = collected
            .blocking()
            .map(|r| format!("{}/{}", r.source.namespace, r.source.name))
            .collect();
        self.metrics.blocked.set(count(blocking.iter()));
        let good = &collected.policies;
        let blocked = Blocked::new(
            collected.blocking().map(|r| &r.source),
            good.iter().map(|(s, _)| s),
        );
        if blocked.is_some() {
            tracing::warn!(configmaps = %blocking.join(", "), "sync blocked in part: broken policies with no valid version seen by this process; their NetworkPolicies stay as they are and other workloads' egress towards their namespaces is kept until they are fixed or removed");
        }
        let inputs = good
            .iter()
            .map(|(s, p)| {
                netpol::Input::new(format!("configmap {}/{}", s.namespace, s.name), p, None)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let objects = netpol::compile(&inputs, &self.options)?;
        // Each object with the index (in `good`) of the ConfigMap it is
        // compiled from.
        let mut desired: BTreeMap<(String, String), (Value, usize)> = BTreeMap::new();
        for o in objects.into_iter().filter(|o| !o.value.is_null()) {
            let mut v = o.value;
            let src = &good[o.input].0;
            v["metadata"]["labels"][OWNER_LABEL] = json!(OWNER);
            v["metadata"]["labels"][SOURCE_LABEL] = json!(src.label_value());
            let key = (
                src.namespace.clone(),
                v["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            desired.insert(key, (v, o.input));
        }
        let live: BTreeMap<(String, String), Value> = self
            .api
            .list(&format!(
                "/apis/networking.k8s.io/v1/networkpolicies?labelSelector={}",
                query(&format!("{OWNER_LABEL}={OWNER}"))
            ))
            .await?
            .into_iter()
            .map(|o| {
                let m = &o["metadata"];
                (
                    (
                        m["namespace"].as_str().unwrap_or_default().to_owned(),
                        m["name"].as_str().unwrap_or_default().to_owned(),
                    ),
                    o,
                )
            })
            .collect();
        // ConfigMaps (indices in `good`) with an object refused this round.
        let mut incomplete: BTreeSet<usize> = BTreeSet::new();
        for (key, (want, input)) in &desired {
            lease.writable()?;
            let current = live.get(key);
            if current.is_some_and(|c| same(c, want)) {
                self.applied_before.insert(key.clone());
                continue;
            }
            let grown;
            let want = match (&blocked, current) {
                (Some(b), Some(c)) if b.keeps(c, true) => continue,
                (Some(b), Some(c)) if objects::is_egress_calls(&key.1) => match b.grown(c, want) {
                    Some(g) => {
                        grown = g;
                        &grown
                    }
                    None => continue,
                },
                _ => want,
            };
            if current.is_none() && !self.applied_before.contains(key) && self.foreign(key).await? {
                tracing::warn!(namespace = %key.0, name = %key.1, "a NetworkPolicy of that name exists and is not ours: left alone");
                continue;
            }
            // New: server-side apply. Existing and different: replaced
            // whole, since an apply keeps the fields another manager added
            // (an egress rule on an ingress object stayed, and the object
            // was "repaired" every round for ever).
            let object = format!(
                "/apis/networking.k8s.io/v1/namespaces/{}/networkpolicies/{}?fieldManager={FIELD_MANAGER}",
                key.0, key.1
            );
            let (method, path, content_type) = match current {
                None => (
                    Method::PATCH,
                    format!("{object}&force=true"),
                    "application/apply-patch+yaml",
                ),
                Some(_) => (Method::PUT, object, "application/json"),
            };
            let applied = self
                .api
                .ok(
                    method,
                    &path,
                    Some((content_type, serde_json::to_vec(want)?)),
                )
                .await;
            // Deleted since the list (a replace does not create): the next
            // round creates it; not the API server refusing it.
            if current.is_some() && api::not_found(&applied) {
                continue;
            }
            if let Err(e) = applied {
                let src = &good[*input].0;
                self.refused_object(src, key, e).await?;
                incomplete.insert(*input);
                continue;
            }
            self.metrics.applied.inc();
            let digest =
                |v: &Value| v["metadata"]["annotations"]["stepmesh.io/policy-digest"].clone();
            let drifted = match current {
                Some(c) => digest(c) == digest(want),
                None => self.applied_before.contains(key),
            };
            if drifted {
                self.metrics.drift.inc();
                tracing::info!(namespace = %key.0, name = %key.1, "drift repaired");
            } else {
                tracing::info!(namespace = %key.0, name = %key.1, "applied");
            }
            self.applied_before.insert(key.clone());
        }
        // A ConfigMap with a refused object keeps its old objects.
        let kept: BTreeSet<(String, String)> = incomplete
            .iter()
            .map(|&i| objects::source_key(&good[i].0))
            .collect();
        let mut undeleted = 0;
        for (key, object) in &live {
            lease.writable()?;
            if desired.contains_key(key)
                || kept.contains(&objects::source_of(object))
                || blocked.as_ref().is_some_and(|b| b.keeps(object, false))
            {
                continue;
            }
            let path = format!(
                "/apis/networking.k8s.io/v1/namespaces/{}/networkpolicies/{}",
                key.0, key.1
            );
            match self.api.ok(Method::DELETE, &path, None).await {
                Ok(_) => {}
                Err(KubeError::Status { status, .. }) if status == http::StatusCode::NOT_FOUND => {}
                Err(e) if refused_by_server(&e) => {
                    self.metrics.refused.inc();
                    tracing::warn!(error = %e, "a NetworkPolicy no longer computed could not be deleted; retried next round");
                    undeleted += 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            self.applied_before.remove(key);
            self.metrics.pruned.inc();
            tracing::info!(namespace = %key.0, name = %key.1, "pruned");
        }
        if !incomplete.is_empty() || undeleted > 0 || blocked.is_some() {
            return Ok(());
        }
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.metrics
            .last_sync
            .set(i64::try_from(now.as_secs()).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Whether an object we did not apply already has this name (made by
    /// hand, or ours with the owner label removed before this process
    /// started): it is not ours to overwrite.
    async fn foreign(&self, key: &(String, String)) -> anyhow::Result<bool> {
        let path = format!(
            "/apis/networking.k8s.io/v1/namespaces/{}/networkpolicies/{}",
            key.0, key.1
        );
        let (status, _) = self.api.call(Method::GET, &path, None).await?;
        match status {
            http::StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            s => anyhow::bail!("GET {path}: {s}"),
        }
    }

    /// Reports a refused policy: log line and metric every round, an Event
    /// once per ConfigMap version.
    async fn refuse(&mut self, refused: &Refused) {
        let (src, why) = (&refused.source, &refused.why);
        let outcome = if refused.last_good {
            "its last valid version stays in force"
        } else {
            "no valid version of it seen by this controller: its NetworkPolicies stay as they are, and other workloads' egress towards its namespace is kept, until it is fixed or removed"
        };
        self.metrics.errors.inc();
        tracing::warn!(namespace = %src.namespace, configmap = %src.name, error = %why, "policy refused; {outcome}");
        if self.reported.get(&src.key()) == Some(&src.version)
            || !self
                .event(src, "InvalidPolicy", format!("{why}; {outcome}"))
                .await
        {
            return;
        }
        self.reported.insert(src.key(), src.version.clone());
    }

    /// Reports an object of `src` the API server refused (log line and
    /// metric every round, an Event once per ConfigMap version); an error
    /// that is no refusal of this object ends the round.
    async fn refused_object(
        &mut self,
        src: &sources::Source,
        key: &(String, String),
        e: KubeError,
    ) -> anyhow::Result<()> {
        if !refused_by_server(&e) {
            return Err(e.into());
        }
        let message = match &e {
            KubeError::Status {
                status, message, ..
            } => format!("{status}: {message}"),
            other => other.to_string(),
        };
        self.metrics.refused.inc();
        tracing::warn!(namespace = %key.0, name = %key.1, configmap = %src.name, error = %message, "the API server refused a NetworkPolicy; the ConfigMap's other objects are applied, none of its old ones pruned");
        if self.reported_refusals.get(&src.key()) == Some(&src.version) {
            return Ok(());
        }
        let text = format!("the API server refused NetworkPolicy {}/{} ({message}); this policy's old NetworkPolicies stay until its new ones are all applied", key.0, key.1);
        if self.event(src, "NetworkPolicyRefused", text).await {
            self.reported_refusals
                .insert(src.key(), src.version.clone());
        }
        Ok(())
    }

    /// Posts a Warning Event on ConfigMap `src`; whether it was taken.
    async fn event(&self, src: &sources::Source, reason: &str, message: String) -> bool {
        let now = rfc3339(SystemTime::now(), false);
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": format!("{}.", src.name), "namespace": src.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "ConfigMap", "namespace": src.namespace,
                               "name": src.name, "uid": src.uid, "resourceVersion": src.version},
            "reason": reason, "type": "Warning",
            "message": message,
            "source": {"component": FIELD_MANAGER},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        });
        let path = format!("/api/v1/namespaces/{}/events", src.namespace);
        let body = serde_json::to_vec(&event).unwrap_or_default();
        match self
            .api
            .ok(Method::POST, &path, Some(("application/json", body)))
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "posting the Event");
                false
            }
        }
    }
}

/// Whether the API server refused the one object (4xx: its content, an
/// admission policy, a quota, RBAC in its namespace) rather than failed to
/// answer, asked us to wait, or refused us (5xx, 408, 429, 401: an expired
/// token, no answer): the first is that object's, the second ends the
/// round.
fn refused_by_server(e: &KubeError) -> bool {
    use http::StatusCode;
    matches!(e, KubeError::Status { status, .. }
        if status.is_client_error()
            && ![StatusCode::UNAUTHORIZED, StatusCode::REQUEST_TIMEOUT, StatusCode::TOO_MANY_REQUESTS]
                .contains(status))
}

/// How many, as a gauge value.
fn count<T>(items: impl Iterator<Item = T>) -> i64 {
    i64::try_from(items.count()).unwrap_or(i64::MAX)
}
