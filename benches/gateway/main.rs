//! Benchmark of `stepmesh gateway serve` in front of a real kube-apiserver
//! (envtest: etcd + kube-apiserver from `$KUBEBUILDER_ASSETS`), for the
//! targets of issue 12: what a GET through the gateway adds over the same
//! GET sent straight to the API server at a fixed rate, and what 1,000
//! watches held open cost in gateway RSS. The gateway is the release
//! `stepmesh` binary of this build. `cargo bench --bench gateway -- --help`
//! lists the flags; benches/README.md says how to read the output. Without
//! `KUBEBUILDER_ASSETS` it prints why and exits 0.

#![allow(clippy::unwrap_used)] // the shared test harness panics on setup failure

mod client;
mod latency;
mod report;
mod watches;

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use http::HeaderValue;
use serde_json::json;
use stepmesh::stepup::testing::{base_claims, now, TestIdp};

use client::Proto;
use common::envtest::Envtest;
use common::gateway::Gateway;
use report::{LatencyRound, Report, WatchRun};

const ISSUER: &str = "https://idp.stepmesh.test";
const ALICE: &str = "alice@example.com";
const GROUP: &str = "developers";

/// Gateway benchmark: GET latency through the gateway against the API
/// server directly, and the gateway's RSS holding many watches.
#[derive(Debug, Parser)]
#[command(name = "gateway")]
pub struct Args {
    /// Requests per second to EACH path (gateway, direct), interleaved.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Measured seconds of each latency round.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Seconds of load before measuring, each round.
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// Latency rounds (the spread between them is reported).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// HTTP version of the latency client (h2 as kubectl, or h1 keep-alive).
    #[arg(long, value_enum, default_value_t = Proto::H2)]
    pub proto: Proto,
    /// Watches held open in each watch run.
    #[arg(long, default_value_t = 1000)]
    pub watches: usize,
    /// Watch runs (comma-separated): h1 = one TLS connection per watch,
    /// h2 = `--streams-per-conn` watches per HTTP/2 connection.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Proto::H1, Proto::H2])]
    pub watch_protos: Vec<Proto>,
    /// Watches per HTTP/2 connection in the h2 watch run.
    #[arg(long, default_value_t = 100)]
    pub streams_per_conn: usize,
    /// Watch handshakes in flight at once while opening.
    #[arg(long, default_value_t = 64)]
    pub open_parallel: usize,
    /// Seconds every watch has to see the probe ConfigMap.
    #[arg(long, default_value_t = 10.0)]
    pub event_timeout: f64,
    /// Seconds all watches have to be answered (response head).
    #[arg(long, default_value_t = 60.0)]
    pub open_timeout: f64,
    /// Extra kube-apiserver flag (repeatable), e.g.
    /// `--apiserver-arg=--http2-max-streams-per-connection=2000`.
    #[arg(long, allow_hyphen_values = true)]
    pub apiserver_arg: Vec<String>,
    /// Skip the latency scenario.
    #[arg(long)]
    pub no_latency: bool,
    /// Where to write the JSON results (default: target/bench-gateway.json).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

fn policy(jwks: &std::path::Path) -> String {
    format!(
        r#"trustDomain: example.org
stepUp:
  providers:
    corp:
      issuer: {ISSUER}
      jwks: {{file: {jwks}}}
      audiences: [kubectl]
      algorithms: [ES256]
kubernetes:
  authentication: {{provider: corp, usernameClaim: email, groupsClaim: groups, groupsPrefix: "oidc:"}}
  rules:
  - name: delete-in-prod
    verbs: [delete, deletecollection]
    resources: ["*"]
    namespaces: ["prod*"]
    stepUp: {{provider: corp, acr: [urn:stepmesh:acr:mfa], maxAge: 10m}}
"#,
        jwks = jwks.display()
    )
}

/// Everything the scenarios share.
struct Setup {
    k8s: Envtest,
    idp: TestIdp,
    _jwks: tempfile::TempDir,
    policy: String,
    namespace: String,
}

impl Setup {
    fn bearer(&self) -> anyhow::Result<HeaderValue> {
        let mut c = base_claims(ISSUER, "kubectl", "alice");
        c["email"] = json!(ALICE);
        c["groups"] = json!([GROUP]);
        c["acr"] = json!("urn:stepmesh:acr:pwd");
        c["amr"] = json!(["pwd"]);
        c["auth_time"] = json!(now() - 60);
        let token = self.idp.es256(&c)?;
        let mut v = HeaderValue::from_str(&format!("Bearer {token}"))?;
        v.set_sensitive(true);
        Ok(v)
    }

    /// The gateway, without its per-source cap: every watch of the bench
    /// comes from 127.0.0.1, as from behind one load balancer (1,000
    /// HTTP/1.1 watches are 1,000 connections).
    fn gateway(&self) -> Gateway {
        let uncapped = ["--max-connections-per-source", "0"];
        Gateway::start_with(
            &self.k8s,
            &self.k8s.url,
            &self.k8s.ca_file,
            &self.policy,
            &uncapped,
        )
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Err(why) = common::envtest::assets() {
        println!("skip: {why}");
        return Ok(());
    }
    let machine_before = report::Machine::read();
    let extra: Vec<&str> = args.apiserver_arg.iter().map(String::as_str).collect();
    let Some(k8s) = Envtest::start(&extra) else {
        return Ok(());
    };
    let idp = TestIdp::new(ISSUER)?;
    let jwks_dir = tempfile::tempdir()?;
    let jwks = jwks_dir.path().join("jwks.json");
    std::fs::write(&jwks, idp.jwks().to_string())?;
    // Alice may read anything, through the gateway (impersonated) and
    // directly (her client certificate): the same RBAC path both ways.
    k8s.apply(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: alice-admin\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}}\n\
         subjects:\n- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: \"{ALICE}\"}}\n"
    ));
    let namespace = format!("bench-{:06x}", fastrand::u32(..1 << 24));
    k8s.create_namespace(&namespace);
    k8s.create_configmap(&namespace, "settings", &[("config", &"x".repeat(1024))]);
    let setup = Setup {
        policy: policy(&jwks),
        k8s,
        idp,
        _jwks: jwks_dir,
        namespace,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut report = Report::new(&args, machine_before);
    if !args.no_latency {
        report.latency = run_latency(&args, &setup, &runtime)?;
    }
    for &proto in &args.watch_protos {
        report
            .watches
            .push(run_watches(&args, &setup, &runtime, proto)?);
    }
    report.machine_after = Some(report::Machine::read());
    println!("{}", report.markdown());
    let json = args.json.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-gateway.json")
    });
    if let Some(dir) = json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    eprintln!("JSON written to {}", json.display());
    Ok(())
}

fn run_latency(
    args: &Args,
    setup: &Setup,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Vec<LatencyRound>> {
    let gateway = setup.gateway();
    let k8s = &setup.k8s;
    let path = format!("/api/v1/namespaces/{}/configmaps/settings", setup.namespace);
    let alice = k8s.client_cert(ALICE, &[&format!("oidc:{GROUP}")]);
    let pid = gateway
        .proc
        .program_pid()
        .context("the gateway's PID (it exited?)")?;
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let load_before = report::loadavg();
        let cpu_before = watches::cpu_seconds(pid)?;
        // Fresh clients each round: their connections are opened by the
        // first GET, outside the measured window.
        let targets = runtime.block_on(async {
            let gw_tls = client::tls_config(&gateway.ca_pem, None)?;
            let direct_tls =
                client::tls_config(&k8s.ca_pem, Some((&alice.cert_pem, &alice.key_pem)))?;
            anyhow::Ok(vec![
                latency::Target {
                    name: "gateway",
                    client: client::pooled(gw_tls, args.proto),
                    uri: format!("{}{path}", gateway.url()).parse()?,
                    auth: Some(setup.bearer()?),
                },
                latency::Target {
                    name: "direct",
                    client: client::pooled(direct_tls, args.proto),
                    uri: format!("{}{path}", k8s.url).parse()?,
                    auth: None,
                },
            ])
        })?;
        let results = runtime.block_on(latency::run(
            &targets,
            args.rate,
            Duration::from_secs_f64(args.duration),
            Duration::from_secs_f64(args.warmup),
        ))?;
        let cpu = watches::cpu_seconds(pid)? - cpu_before;
        let mut r = LatencyRound::new(round, load_before, report::loadavg(), &results);
        // Every gateway request of the round, warm-up and first GET included.
        let served = (args.rate as f64 * (args.duration + args.warmup)).max(1.0) + 1.0;
        r.gateway_cpu_us_per_req = cpu * 1e6 / served;
        eprintln!("{}", r.summary());
        rounds.push(r);
    }
    Ok(rounds)
}

fn run_watches(
    args: &Args,
    setup: &Setup,
    runtime: &tokio::runtime::Runtime,
    proto: Proto,
) -> anyhow::Result<WatchRun> {
    let k8s = &setup.k8s;
    let limit = report::open_files_limit();
    // The bench holds one socket per HTTP/1.1 watch and so does the gateway
    // (its upstream side is pooled HTTP/2); both inherit this limit.
    if proto == Proto::H1 && limit.is_some_and(|l| l < args.watches as u64 + 256) {
        anyhow::bail!(
            "the open-file limit ({limit:?}) is too low for {} watches: raise `ulimit -n`",
            args.watches
        );
    }
    let namespace = format!(
        "watch-{}-{:06x}",
        proto_name(proto),
        fastrand::u32(..1 << 24)
    );
    k8s.create_namespace(&namespace);
    let gateway = setup.gateway();
    let pid = gateway
        .proc
        .program_pid()
        .context("the gateway's PID (it exited?)")?;
    let probe = format!("probe-{}", proto_name(proto));
    let target = Arc::new(watches::WatchTarget {
        port: gateway.port,
        tls: Arc::new(client::with_alpn(
            client::tls_config(&gateway.ca_pem, None)?,
            proto,
        )),
        path: format!("/api/v1/namespaces/{namespace}/configmaps?watch=true"),
        auth: setup.bearer()?,
    });
    // One GET first: the gateway's upstream connection and token cache are
    // warm, as in a gateway that has served anything at all.
    runtime.block_on(async {
        let t = latency::Target {
            name: "gateway",
            client: client::pooled(client::tls_config(&gateway.ca_pem, None)?, Proto::H1),
            uri: format!("{}/api/v1/namespaces/{namespace}/configmaps", gateway.url()).parse()?,
            auth: Some(setup.bearer()?),
        };
        t.get().await.map(|_| ())
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let before = watches::memory(pid)?;
    let admin = k8s.admin();
    let create_path = format!("/api/v1/namespaces/{namespace}/configmaps");
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": probe}, "data": {"a": "1"}})
    .to_string();
    let (held_mem, held, seen, seen_in) = runtime.block_on(async {
        let held = watches::open(
            target,
            args.watches,
            proto,
            args.streams_per_conn,
            args.open_parallel,
            &format!("\"name\":\"{probe}\""),
            Duration::from_secs_f64(args.open_timeout),
        )
        .await?;
        // Let buffers settle: every stream is idle now.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let held_mem = watches::memory(pid)?;
        let created = tokio::task::spawn_blocking(move || {
            admin.request(
                "POST",
                &create_path,
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
        });
        let (seen, seen_in) = held
            .wait_seen(Duration::from_secs_f64(args.event_timeout))
            .await;
        let status = created.await?.status;
        anyhow::ensure!(status == 201, "creating the probe ConfigMap: {status}");
        anyhow::Ok((held_mem, held, seen, seen_in))
    })?;
    let open_time = held.open_time;
    let connections = held.connections;
    // Aborted tasks drop their connections when the runtime runs them.
    let closed = runtime.block_on(async {
        held.close();
        tokio::time::sleep(Duration::from_secs(2)).await;
        watches::memory(pid)
    })?;
    let run = WatchRun::new(
        proto,
        args.watches,
        connections,
        [before, held_mem, closed],
        seen,
        seen_in,
        open_time,
    );
    eprintln!("{}", run.summary());
    Ok(run)
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::H1 => "h1",
        Proto::H2 => "h2",
    }
}
