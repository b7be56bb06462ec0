//! The demo's mesh on loopback: `stepmesh ca serve` and one `stepmesh proxy`
//! per workload, all child processes of this binary, each sidecar with an
//! SVID the CA issued against a join token.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::apps::Payments;
use super::child::{free_port, Child};
use super::idp::{self, Idp};

/// The trust domain of the demo.
pub const TRUST_DOMAIN: &str = "demo.local";
/// The frontend workload: allowed to call payments.
pub const FRONTEND: &str = "spiffe://demo.local/ns/web/sa/frontend";
/// The payments workload.
pub const PAYMENTS: &str = "spiffe://demo.local/ns/payments/sa/api";
/// A workload the payments policy does not list.
pub const REPORTS: &str = "spiffe://demo.local/ns/web/sa/reports";

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Every process and server of the demo; dropping it stops them all.
pub struct Mesh {
    /// The payments sidecar's inbound (mTLS) port, as named in the policy.
    pub payments_inbound: SocketAddr,
    /// The frontend sidecar's outbound listener (plain HTTP, to payments).
    pub frontend_out: SocketAddr,
    /// The reports sidecar's outbound listener (plain HTTP, to payments).
    pub reports_out: SocketAddr,
    /// The identity provider.
    pub idp: Idp,
    /// The payments app.
    pub payments: Payments,
    /// Sidecars (payments, frontend, reports), then the CA; dropped in order.
    pub children: Vec<Child>,
    /// The policy file of the payments sidecar.
    pub policy: PathBuf,
    /// The CA's address.
    pub ca: SocketAddr,
}

impl Mesh {
    /// Starts the CA, the identity provider, the payments app and the three
    /// sidecars, printing each as it comes up.
    pub async fn start(dir: &Path) -> anyhow::Result<Mesh> {
        let exe = std::env::current_exe().context("locating the stepmesh binary")?;
        let (ca, ca_child, bundle) = start_ca(&exe, dir).await?;
        println!(
            "  CA            {ca}  trust domain {TRUST_DOMAIN}, root and bundle.pem in {}",
            dir.join("ca").display()
        );

        let idp = Idp::start(&dir.join("idp-jwks.json"))
            .await
            .context("starting the identity provider")?;
        println!(
            "  IdP           {}  ES256 key made just now, JWKS at {}",
            idp.addr(),
            idp.jwks_url()
        );
        let payments = Payments::start()
            .await
            .context("starting the payments app")?;
        println!(
            "  payments app  {}  (plain HTTP, reachable only through its sidecar)",
            payments.addr
        );

        let sidecar = |name: &str,
                       listeners: &[String],
                       policy: Option<&Path>|
         -> anyhow::Result<(Child, SocketAddr)> {
            let admin = free_port()?;
            let mut cmd = Command::new(&exe);
            cmd.args(["proxy", "--trust-domain", TRUST_DOMAIN, "--workers", "1"])
                .arg("--ca")
                .arg(ca.to_string())
                .arg("--ca-bundle")
                .arg(&bundle)
                .arg("--token-file")
                .arg(dir.join(format!("{name}.token")))
                .arg("--admin")
                .arg(admin.to_string())
                .args(listeners)
                .env("RUST_LOG", "info");
            if let Some(policy) = policy {
                cmd.arg("--policy").arg(policy);
            }
            Ok((
                Child::spawn(
                    &format!("{name} sidecar"),
                    cmd,
                    &dir.join(format!("{name}-sidecar.log")),
                )?,
                admin,
            ))
        };

        let payments_inbound = free_port()?;
        let inbound = [format!("--inbound={payments_inbound}={}", payments.addr)];
        let policy = dir.join("payments-policy.yaml");
        std::fs::write(&policy, policy_yaml(payments_inbound.port(), &idp, dir))?;
        // Checked before any sidecar starts, so a policy mistake is one
        // clear line rather than a sidecar that never becomes ready.
        if let Some(reason) = policy_refused(&exe, &policy)? {
            anyhow::bail!("the demo's payments policy is refused: {reason}");
        }
        let (mut payments_sidecar, admin) = sidecar("payments", &inbound, Some(&policy))?;
        payments_sidecar.wait_ready(admin, READY_TIMEOUT).await?;
        println!(
            "  payments sidecar  mTLS on {payments_inbound} as {PAYMENTS}, policy {}",
            policy.display()
        );

        let mut children = vec![payments_sidecar];
        let mut outs = vec![];
        for name in ["frontend", "reports"] {
            let out = free_port()?;
            let (mut child, admin) = sidecar(
                name,
                &[format!("--outbound={out}={payments_inbound}@{PAYMENTS}")],
                None,
            )?;
            child.wait_ready(admin, READY_TIMEOUT).await?;
            let id = if name == "frontend" {
                FRONTEND
            } else {
                REPORTS
            };
            println!("  {name} sidecar  {out} (plain HTTP in) → mTLS to payments, as {id}");
            children.push(child);
            outs.push(out);
        }
        children.push(ca_child);
        Ok(Mesh {
            payments_inbound,
            frontend_out: outs[0],
            reports_out: outs[1],
            idp,
            payments,
            children,
            policy,
            ca,
        })
    }

    /// The payments sidecar (its log holds the access log).
    pub fn payments_sidecar(&self) -> &Child {
        &self.children[0]
    }

    /// Fails if any child has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for child in &mut self.children {
            child.check_alive()?;
        }
        Ok(())
    }
}

/// Why `stepmesh policy check` refuses `policy`, if it does.
fn policy_refused(exe: &Path, policy: &Path) -> anyhow::Result<Option<String>> {
    let out = Command::new(exe)
        .args(["policy", "check"])
        .arg(policy)
        .output()
        .context("running stepmesh policy check")?;
    if out.status.success() {
        return Ok(None);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Ok(Some(
        stderr.lines().last().unwrap_or("refused").trim().to_owned(),
    ))
}

async fn start_ca(exe: &Path, dir: &Path) -> anyhow::Result<(SocketAddr, Child, PathBuf)> {
    let state = dir.join("ca");
    std::fs::create_dir_all(&state)?;
    let mut tokens = String::from("# join tokens of the demo workloads\n");
    for (name, id) in [
        ("frontend", FRONTEND),
        ("payments", PAYMENTS),
        ("reports", REPORTS),
    ] {
        let token = format!(
            "demo-{name}-{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        );
        writeln!(tokens, "{token} {id}")?;
        write_private(&dir.join(format!("{name}.token")), &token)?;
    }
    let tokens_file = dir.join("join-tokens");
    write_private(&tokens_file, &tokens)?;
    let (addr, admin) = (free_port()?, free_port()?);
    let mut cmd = Command::new(exe);
    cmd.args(["ca", "serve", "--trust-domain", TRUST_DOMAIN])
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--admin")
        .arg(admin.to_string())
        .arg("--state-dir")
        .arg(&state)
        .arg("--join-tokens")
        .arg(&tokens_file);
    let mut child = Child::spawn("CA", cmd, &dir.join("ca.log"))?;
    child.wait_ready(admin, READY_TIMEOUT).await?;
    let bundle = state.join("bundle.pem");
    anyhow::ensure!(
        bundle.exists(),
        "the CA is ready but wrote no {}",
        bundle.display()
    );
    Ok((addr, child, bundle))
}

/// Tokens are credentials: owner-only from the first byte.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

/// The payments policy: frontend may call the port; POST /refunds needs a
/// fresh MFA step-up bound to the calling workload.
fn policy_yaml(port: u16, idp: &Idp, dir: &Path) -> String {
    format!(
        "trustDomain: {TRUST_DOMAIN}
mode: enforce
stepUp:
  providers:
    demo-idp:
      issuer: {issuer}
      jwks: {{file: {jwks}}}
      audiences: [{audience}]
      algorithms: [ES256]
inbound:
  default: deny
  ports:
    - port: {port}
      protocol: http
      allow:
        - from: [{FRONTEND}]
      routes:
        - name: refunds
          match: {{methods: [POST], path: /refunds}}
          stepUp:
            provider: demo-idp
            acr: [{acr}]
            maxAge: 300s
            bindToPeer: azp
",
        issuer = idp.issuer(),
        jwks = dir.join("idp-jwks.json").display(),
        audience = idp::AUDIENCE,
        acr = idp::ACR_MFA,
    )
}
