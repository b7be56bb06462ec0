//! `stepmesh netpol sync`: keeps the cluster's NetworkPolicies equal to what
//! the policy ConfigMaps compile to (`policy::netpol`, the same objects
//! `stepmesh policy netpol` prints). Every `--interval`, the Lease holder
//! lists the policy ConfigMaps (a label selects them) and the namespaces,
//! compiles the good policies together, server-side applies what is
//! missing or differs under its own field manager, and deletes what it owns
//! that is no longer computed. It owns only objects carrying its label,
//! never touches others, and leaves the objects of a broken policy as they
//! are (an Event on the ConfigMap, a metric, a log line naming the field).
//! Polling lists rather than watch streams: one small list per interval,
//! and no missed-event bookkeeping.

mod api;
mod lease;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use http::Method;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

use crate::policy::{netpol, Policy};
use api::{query, rfc3339};
use stepmesh_ca::kube::Api;

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

/// The controller's metrics.
#[derive(Debug, Clone, Default)]
struct Metrics {
    applied: Counter,
    pruned: Counter,
    drift: Counter,
    errors: Counter,
    leader: Gauge,
    last_sync: Gauge,
}

impl Metrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "stepmesh_netpol_applied",
            "NetworkPolicies applied (created or changed)",
            self.applied.clone(),
        );
        r.register(
            "stepmesh_netpol_pruned",
            "owned NetworkPolicies deleted: no longer computed",
            self.pruned.clone(),
        );
        r.register(
            "stepmesh_netpol_drift_repaired",
            "owned NetworkPolicies put back after an edit or a delete",
            self.drift.clone(),
        );
        r.register(
            "stepmesh_netpol_policy_errors",
            "policy ConfigMaps refused in a sync",
            self.errors.clone(),
        );
        r.register(
            "stepmesh_netpol_leader",
            "1 while this replica holds the Lease",
            self.leader.clone(),
        );
        r.register(
            "stepmesh_netpol_last_sync_timestamp_seconds",
            "end of the last complete sync (unix time)",
            self.last_sync.clone(),
        );
    }
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
            continue;
        }
        if let Err(e) = sync.round().await {
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
}

/// A policy ConfigMap's identity and content.
struct Source {
    namespace: String,
    name: String,
    uid: String,
    version: String,
}

impl Sync {
    async fn round(&mut self) -> anyhow::Result<()> {
        let active: BTreeSet<String> = self
            .api
            .list("/api/v1/namespaces")
            .await?
            .iter()
            .filter(|n| n["status"]["phase"] != "Terminating")
            .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        let cms = self
            .api
            .list(&format!(
                "/api/v1/configmaps?labelSelector={}",
                query(&self.args.configmap_selector)
            ))
            .await?;
        let mut good: Vec<(Source, Policy)> = Vec::new();
        let mut broken: BTreeSet<(String, String)> = BTreeSet::new();
        for cm in &cms {
            let meta = &cm["metadata"];
            let src = Source {
                namespace: meta["namespace"].as_str().unwrap_or_default().to_owned(),
                name: meta["name"].as_str().unwrap_or_default().to_owned(),
                uid: meta["uid"].as_str().unwrap_or_default().to_owned(),
                version: meta["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            };
            if !active.contains(&src.namespace) {
                continue;
            }
            match self.check(cm, &src, &good) {
                Ok(p) => good.push((src, p)),
                Err(why) => {
                    broken.insert((src.namespace.clone(), src.name.clone()));
                    self.refuse(&src, &why).await;
                }
            }
        }
        let inputs = good
            .iter()
            .map(|(s, p)| {
                netpol::Input::new(format!("configmap {}/{}", s.namespace, s.name), p, None)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let objects = netpol::compile(&inputs, &self.options)?;
        let mut desired: BTreeMap<(String, String), Value> = BTreeMap::new();
        for o in objects.into_iter().filter(|o| !o.value.is_null()) {
            let mut v = o.value;
            let src = &good[o.input].0;
            v["metadata"]["labels"][OWNER_LABEL] = json!(OWNER);
            v["metadata"]["labels"][SOURCE_LABEL] = json!(src.name);
            let key = (
                src.namespace.clone(),
                v["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            desired.insert(key, v);
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
        for (key, want) in &desired {
            let current = live.get(key);
            if current.is_some_and(|c| same(c, want)) {
                self.applied_before.insert(key.clone());
                continue;
            }
            if current.is_none() && !self.applied_before.contains(key) && self.foreign(key).await? {
                tracing::warn!(namespace = %key.0, name = %key.1, "a NetworkPolicy of that name exists and is not ours: left alone");
                continue;
            }
            let path = format!(
                "/apis/networking.k8s.io/v1/namespaces/{}/networkpolicies/{}?fieldManager={FIELD_MANAGER}&force=true",
                key.0, key.1
            );
            self.api
                .ok(
                    Method::PATCH,
                    &path,
                    Some(("application/apply-patch+yaml", serde_json::to_vec(want)?)),
                )
                .await?;
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
        for (key, obj) in &live {
            if desired.contains_key(key) {
                continue;
            }
            let source = obj["metadata"]["labels"][SOURCE_LABEL]
                .as_str()
                .unwrap_or_default();
            // A broken policy keeps its objects as they were.
            if broken.contains(&(key.0.clone(), source.to_owned())) {
                continue;
            }
            let path = format!(
                "/apis/networking.k8s.io/v1/namespaces/{}/networkpolicies/{}",
                key.0, key.1
            );
            let (status, v) = self.api.call(Method::DELETE, &path, None).await?;
            if !status.is_success() && status != http::StatusCode::NOT_FOUND {
                anyhow::bail!(
                    "DELETE {path}: {status}: {}",
                    v["message"].as_str().unwrap_or("")
                );
            }
            self.applied_before.remove(key);
            self.metrics.pruned.inc();
            tracing::info!(namespace = %key.0, name = %key.1, "pruned");
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

    /// The ConfigMap's policy, if it is usable in this set.
    fn check(&self, cm: &Value, src: &Source, good: &[(Source, Policy)]) -> Result<Policy, String> {
        let text = cm["data"][&self.args.key]
            .as_str()
            .ok_or_else(|| format!("data.{}: missing", self.args.key))?;
        let policy = Policy::from_yaml(text).map_err(|e| e.to_string())?;
        let w = policy
            .workload()
            .ok_or("workload: missing: name the pods this policy protects")?;
        // A policy may only write NetworkPolicies in its own namespace.
        if w.namespace != src.namespace {
            return Err(format!(
                "workload.namespace: {:?} is not the ConfigMap's namespace {:?}",
                w.namespace, src.namespace
            ));
        }
        if let Some((other, _)) = good.iter().find(|(_, p)| {
            p.workload()
                .is_some_and(|o| o.namespace == w.namespace && o.selector == w.selector)
        }) {
            return Err(format!(
                "workload: the same pods as ConfigMap {}",
                other.name
            ));
        }
        Ok(policy)
    }

    /// Reports a refused policy: log line and metric every round, an Event
    /// once per ConfigMap version.
    async fn refuse(&mut self, src: &Source, why: &str) {
        self.metrics.errors.inc();
        tracing::warn!(namespace = %src.namespace, configmap = %src.name, error = %why, "policy refused; its NetworkPolicies are left as they were");
        let key = (src.namespace.clone(), src.name.clone());
        if self.reported.get(&key) == Some(&src.version) {
            return;
        }
        let now = rfc3339(SystemTime::now(), false);
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": format!("{}.", src.name), "namespace": src.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "ConfigMap", "namespace": src.namespace,
                               "name": src.name, "uid": src.uid, "resourceVersion": src.version},
            "reason": "InvalidPolicy", "type": "Warning",
            "message": format!("{why}; its NetworkPolicies are left as they were"),
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
            Ok(_) => {
                self.reported.insert(key, src.version.clone());
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "posting the Event"),
        }
    }
}

/// Whether the live object already says what we want: the same spec
/// (empty lists and maps dropped, as the API server drops them) and our
/// labels and digest.
fn same(live: &Value, want: &Value) -> bool {
    let labels_ok = want["metadata"]["labels"]
        .as_object()
        .is_some_and(|w| w.iter().all(|(k, v)| live["metadata"]["labels"][k] == *v));
    labels_ok
        && live["metadata"]["annotations"]["stepmesh.io/policy-digest"]
            == want["metadata"]["annotations"]["stepmesh.io/policy-digest"]
        && prune_empty(&live["spec"]) == prune_empty(&want["spec"])
}

fn prune_empty(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), prune_empty(v)))
                .filter(|(_, v)| !matches!(v, Value::Null) && v != &json!([]) && v != &json!({}))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(prune_empty).collect()),
        other => other.clone(),
    }
}
