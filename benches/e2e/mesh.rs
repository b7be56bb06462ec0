//! The mesh under test: a `stepmesh ca serve` process and pairs of
//! `stepmesh proxy` processes (outbound sidecar → mTLS → inbound sidecar),
//! each with an SVID issued by the CA against a join token.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::bail;

use crate::procs::{free_port, Proc};

const TRUST_DOMAIN: &str = "bench.local";

/// The SPIFFE ID of a benchmark workload. Every sidecar has its own, so the
/// CA's per-identity rate limit never throttles the benchmark's starts.
fn id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/bench/sa/{name}")
}
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The backends a pair forwards to.
#[derive(Clone, Copy)]
pub struct Upstreams {
    /// HTTP backend (behind the HTTP port).
    pub http: SocketAddr,
    /// Echo backend (behind the bulk port).
    pub echo: SocketAddr,
    /// HTTP backend behind a one-byte prefix (behind the L4 port).
    pub l4: SocketAddr,
}

/// How sidecars are started.
pub struct SidecarCmd {
    /// The sidecar binary: `stepmesh-proxy`, or `stepmesh` with `subcommand`.
    pub program: PathBuf,
    /// `proxy` when `program` is the all-in-one `stepmesh`.
    pub subcommand: Option<&'static str>,
    /// A command the sidecar runs under (`valgrind --tool=callgrind`), if any.
    pub wrap: Vec<String>,
    /// Flags added to every sidecar's command line.
    pub extra: Vec<String>,
}

impl SidecarCmd {
    /// The program and its subcommand, for the report.
    pub fn command_line(&self) -> String {
        let program = self.program.display();
        match self.subcommand {
            Some(sub) => format!("{program} {sub}"),
            None => program.to_string(),
        }
    }
}

/// A running CA.
pub struct Ca {
    proc: Proc,
    addr: SocketAddr,
    bundle: PathBuf,
}

impl Ca {
    /// Starts `stepmesh ca serve` with a fresh state dir and a join token
    /// for each of `names` (in `<dir>/<name>.token`); waits until it serves.
    pub async fn start(stepmesh: &Path, dir: &Path, names: &[String]) -> anyhow::Result<Ca> {
        let state = dir.join("ca-state");
        std::fs::create_dir_all(&state)?;
        let tokens = dir.join("join-tokens");
        let mut lines = String::new();
        for name in names {
            let token = format!("bench-{name}-{:016x}", fastrand::u64(..));
            writeln!(lines, "{token} {}", id(name))?;
            std::fs::write(dir.join(format!("{name}.token")), &token)?;
        }
        std::fs::write(&tokens, lines)?;
        let addr = free_port()?;
        let admin = free_port()?;
        let mut cmd = Command::new(stepmesh);
        cmd.args(["ca", "serve", "--trust-domain", TRUST_DOMAIN])
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--admin")
            .arg(admin.to_string())
            .arg("--state-dir")
            .arg(&state)
            .arg("--join-tokens")
            .arg(&tokens);
        let mut proc = Proc::spawn("ca", cmd, &dir.join("ca.log"))?;
        proc.wait_ready(admin, READY_TIMEOUT).await?;
        let bundle = state.join("bundle.pem");
        if !bundle.exists() {
            bail!("the CA is ready but wrote no {}", bundle.display());
        }
        Ok(Ca { proc, addr, bundle })
    }

    /// Fails if the CA process died.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        Ok(self.proc.check_alive()?)
    }
}

/// The three ports a pair offers the client, and the sidecar processes.
pub struct Pair {
    /// Outbound listener to the inbound `protocol: tcp` port (HTTP backend).
    pub l4: SocketAddr,
    /// Outbound listener to the inbound `protocol: http` port (HTTP backend).
    pub http: SocketAddr,
    /// Outbound listener to the inbound `protocol: tcp` port (echo backend).
    pub bulk: SocketAddr,
    /// The client-side sidecar.
    pub outbound: Proc,
    /// The server-side sidecar.
    pub inbound: Proc,
    /// Time from spawn to `/ready` of each sidecar (inbound, outbound).
    pub ready: [Duration; 2],
}

impl Pair {
    /// Starts an inbound sidecar in front of `up`, then an outbound sidecar
    /// pointing at it; both `--workers 1`.
    pub async fn start(
        stepmesh: &SidecarCmd,
        ca: &Ca,
        dir: &Path,
        label: &str,
        up: Upstreams,
        resumption: bool,
    ) -> anyhow::Result<Pair> {
        let [in_l4, in_http, in_bulk] = [free_port()?, free_port()?, free_port()?];
        let [l4, http, bulk] = [free_port()?, free_port()?, free_port()?];
        let (client, server) = (format!("client-{label}"), format!("server-{label}"));
        let policy = dir.join(format!("policy-{label}.yaml"));
        std::fs::write(
            &policy,
            policy_yaml(
                &id(&client),
                &[
                    (in_l4, "tcp"),
                    (in_http, "http"),
                    (in_bulk, "tcp"),
                    (l4, "tcp"),
                    (http, "http"),
                    (bulk, "tcp"),
                ],
            ),
        )?;

        let inbound_args = [
            format!("{in_l4}={}", up.l4),
            format!("{in_http}={}", up.http),
            format!("{in_bulk}={}", up.echo),
        ];
        let mut inbound = sidecar(
            stepmesh,
            ca,
            dir,
            &format!("inbound {label}"),
            &server,
            &policy,
            resumption,
            |cmd| {
                for a in &inbound_args {
                    cmd.arg("--inbound").arg(a);
                }
            },
        )?;
        let outbound_args = [(l4, in_l4), (http, in_http), (bulk, in_bulk)]
            .map(|(listen, peer)| format!("{listen}={peer}@{}", id(&server)));
        let mut outbound = sidecar(
            stepmesh,
            ca,
            dir,
            &format!("outbound {label}"),
            &client,
            &policy,
            resumption,
            |cmd| {
                for a in &outbound_args {
                    cmd.arg("--outbound").arg(a);
                }
            },
        )?;
        let ready_in = inbound.0.wait_ready(inbound.1, READY_TIMEOUT).await?;
        let ready_out = outbound.0.wait_ready(outbound.1, READY_TIMEOUT).await?;
        Ok(Pair {
            l4,
            http,
            bulk,
            outbound: outbound.0,
            inbound: inbound.0,
            ready: [ready_in, ready_out],
        })
    }

    /// Fails if either sidecar died.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.inbound.check_alive()?;
        Ok(self.outbound.check_alive()?)
    }
}

#[allow(clippy::too_many_arguments)]
fn sidecar(
    stepmesh: &SidecarCmd,
    ca: &Ca,
    dir: &Path,
    name: &str,
    identity: &str,
    policy: &Path,
    resumption: bool,
    listeners: impl FnOnce(&mut Command),
) -> anyhow::Result<(Proc, SocketAddr)> {
    let admin = free_port()?;
    let mut cmd = match stepmesh.wrap.split_first() {
        Some((wrapper, wrapper_args)) => {
            let mut cmd = Command::new(wrapper);
            cmd.args(wrapper_args).arg(&stepmesh.program);
            cmd
        }
        None => Command::new(&stepmesh.program),
    };
    cmd.args(stepmesh.subcommand)
        .args(["--workers", "1", "--trust-domain", TRUST_DOMAIN])
        .arg("--ca")
        .arg(ca.addr.to_string())
        .arg("--ca-bundle")
        .arg(&ca.bundle)
        .arg("--token-file")
        .arg(dir.join(format!("{identity}.token")))
        .arg("--policy")
        .arg(policy)
        .arg("--admin")
        .arg(admin.to_string())
        // The bench's client is one source address and one peer identity:
        // the per-source and per-peer caps (4,096 each) would refuse the
        // idle-connections scenario's 10,000. The total cap stays.
        .args([
            "--max-connections-per-source",
            "0",
            "--max-connections-per-peer",
            "0",
        ])
        // Given explicitly, the total cap is kept even where the descriptor
        // limit (20,000 on some benchmark machines) would lower the default
        // for two descriptors per connection: the idle scenario's tunnelled
        // connections take one per side.
        .args(["--max-connections", "16384"]);
    if !resumption {
        cmd.arg("--no-session-resumption");
    }
    listeners(&mut cmd);
    cmd.args(&stepmesh.extra);
    Ok((
        Proc::spawn(
            name,
            cmd,
            &dir.join(format!("{}.log", name.replace(' ', "-"))),
        )?,
        admin,
    ))
}

/// Pair labels and fresh-start names whose tokens the CA must know.
pub fn identities(labels: &[&str], startups: usize) -> Vec<String> {
    let mut names: Vec<String> = labels
        .iter()
        .flat_map(|l| [format!("client-{l}"), format!("server-{l}")])
        .collect();
    names.extend((0..startups).map(|i| format!("startup-{i}")));
    names
}

fn policy_yaml(client: &str, ports: &[(SocketAddr, &str)]) -> String {
    let mut yaml = format!(
        "trustDomain: {TRUST_DOMAIN}\nmode: enforce\ninbound:\n  default: deny\n  ports:\n"
    );
    for (addr, protocol) in ports {
        // Writing to a String cannot fail.
        let _ = write!(
            yaml,
            "    - port: {}\n      protocol: {protocol}\n      allow:\n        - from: [{client}]\n",
            addr.port()
        );
    }
    yaml
}

/// Spawns a fresh sidecar `n` times against the running CA and returns each
/// one's time from process start to `/ready` (an SVID from the CA included).
pub async fn startup_times(
    stepmesh: &SidecarCmd,
    ca: &Ca,
    dir: &Path,
    up: Upstreams,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let policy = dir.join("policy-startup.yaml");
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let port = free_port()?;
        std::fs::write(&policy, policy_yaml(&id("client-main"), &[(port, "tcp")]))?;
        let target = format!("{port}={}", up.http);
        let name = format!("startup-{i}");
        let (mut proc, admin) = sidecar(stepmesh, ca, dir, &name, &name, &policy, true, |cmd| {
            cmd.arg("--inbound").arg(&target);
        })?;
        times.push(proc.wait_ready(admin, READY_TIMEOUT).await?);
    }
    Ok(times)
}
