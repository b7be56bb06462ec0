//! `stepmesh policy`: check a file, explain a decision, compile NetworkPolicies.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

use crate::policy::{netpol, target, Policy, SpiffeId};
use crate::stepup::{self, Outcome, Peer, RequestInfo, StepUp, StepUpMetrics};

/// `stepmesh policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file (exit 1 with the field path on error).
    Check {
        /// Policy file.
        file: PathBuf,
    },
    /// Print the decision for a peer, port and (for HTTP) request, and the
    /// rule that made it. Step-up keys are fetched as the sidecar would.
    Explain(ExplainArgs),
    /// Print Kubernetes NetworkPolicies (default deny + allows derived from
    /// the identity rules) for the pods a selector picks.
    Netpol {
        /// Policy file.
        file: PathBuf,
        /// Namespace of the pods the policy protects.
        #[arg(long)]
        namespace: String,
        /// Pod label selecting them, `key=value`.
        #[arg(long)]
        selector: String,
    },
}

/// Flags of `stepmesh policy explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Policy file.
    pub file: PathBuf,
    /// The caller's SPIFFE ID.
    #[arg(long, required_unless_present = "kubernetes")]
    pub from: Option<String>,
    /// The port it dials.
    #[arg(long, required_unless_present = "kubernetes")]
    pub port: Option<u16>,
    /// Explain a Kubernetes API request through `stepmesh gateway`
    /// (`kubernetes:` rules): give --method (an HTTP method or a verb such as
    /// delete, list, watch) and --path (`/api/v1/namespaces/NS/...`), and
    /// --token or --group.
    #[arg(long, conflicts_with_all = ["from", "port", "host", "cert"])]
    pub kubernetes: bool,
    /// The person's groups (with the policy's prefix), when no --token is
    /// given: which rule would apply to them.
    #[arg(long, requires = "kubernetes")]
    pub group: Vec<String>,
    /// HTTP method (an HTTP request is explained when --method or --path is given).
    #[arg(long)]
    pub method: Option<String>,
    /// HTTP request target as sent: a path with optional query, or an
    /// absolute-form `http://host/path` (read exactly as the sidecar reads it).
    #[arg(long)]
    pub path: Option<String>,
    /// The request's `Host` (checked against an absolute-form target's
    /// authority; give it twice to explain a request with two).
    #[arg(long)]
    pub host: Vec<String>,
    /// Step-up token, sent in the header the matched route reads.
    #[arg(long)]
    pub token: Option<String>,
    /// The caller's certificate (PEM), for routes with `bindToPeer: cnf`.
    #[arg(long)]
    pub cert: Option<PathBuf>,
}

/// Runs a `stepmesh policy` subcommand.
pub async fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Check { file } => {
            let policy = load(&file).await?;
            println!(
                "{}: ok (trust domain {}, mode {:?}, {} ports, {} step-up providers, {} kubernetes rules, digest {})",
                file.display(),
                policy.trust_domain(),
                policy.mode(),
                policy.ports().len(),
                policy.providers().len(),
                policy.kubernetes().map_or(0, |k| k.rules.len()),
                policy.digest()
            );
        }
        PolicyCommand::Explain(args) => print!("{}", explain(&args).await?),
        PolicyCommand::Netpol {
            file,
            namespace,
            selector,
        } => {
            let policy = load(&file).await?;
            print!("{}", netpol::render(&policy, &namespace, &selector)?);
        }
    }
    Ok(())
}

async fn load(file: &Path) -> anyhow::Result<Policy> {
    let text = tokio::fs::read_to_string(file)
        .await
        .with_context(|| format!("reading policy {}", file.display()))?;
    Policy::from_yaml(&text).with_context(|| format!("policy {}", file.display()))
}

/// The decision, as `key: value` lines.
pub async fn explain(args: &ExplainArgs) -> anyhow::Result<String> {
    let policy = load(&args.file).await?;
    if args.kubernetes {
        let method = args
            .method
            .as_deref()
            .context("--kubernetes needs --method")?;
        let path = args.path.as_deref().context("--kubernetes needs --path")?;
        let head = format!(
            "policy: {} (digest {}, mode {:?})\n",
            args.file.display(),
            policy.digest(),
            policy.mode()
        );
        let request = crate::gateway::explain::Request {
            method,
            target: path,
            token: args.token.as_deref(),
            groups: &args.group,
        };
        return Ok(head + &crate::gateway::explain::explain(&policy, request).await?);
    }
    // clap requires both unless --kubernetes.
    let (Some(from), Some(port)) = (args.from.as_deref(), args.port) else {
        anyhow::bail!("give --from and --port (or --kubernetes)");
    };
    let peer = SpiffeId::parse(from).context("--from")?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy: {} (digest {}, mode {:?})",
        args.file.display(),
        policy.digest(),
        policy.mode()
    );
    let _ = writeln!(
        out,
        "peer: {peer}\nport: {} ({:?})",
        port,
        policy.port_protocol(port)
    );
    if args.method.is_none() && args.path.is_none() {
        let d = policy.authorize(&peer, port);
        let verdict = if d.would_deny {
            "allow (audit: enforce would deny)"
        } else if d.allow {
            "allow"
        } else {
            "deny"
        };
        let _ = writeln!(
            out,
            "decision: {verdict}\nrule: {}\nreason: {}",
            d.rule, d.reason
        );
        return Ok(out);
    }
    let method = http::Method::from_bytes(
        args.method
            .as_deref()
            .unwrap_or("GET")
            .to_ascii_uppercase()
            .as_bytes(),
    )
    .context("--method")?;
    let path = args.path.as_deref().unwrap_or("/");
    let mut headers = http::HeaderMap::new();
    for host in &args.host {
        headers.append(
            http::header::HOST,
            http::HeaderValue::from_str(host).context("--host")?,
        );
    }
    let uri = match target::parse(path) {
        Ok(uri) => uri,
        Err(refusal) => {
            let _ = writeln!(out, "request: {method} {path}");
            let _ = writeln!(
                out,
                "decision: 400 bad request\nrule: request target\nreason: {}\nwhy: {refusal}",
                refusal.reason()
            );
            return Ok(out);
        }
    };
    if let Some(token) = &args.token {
        let step_up = policy
            .route_request(port, &method, &uri, &headers)
            .ok()
            .flatten()
            .and_then(|r| r.step_up.as_ref());
        if let Some(rule) = step_up {
            let value = if rule.header == http::header::AUTHORIZATION {
                format!("Bearer {token}")
            } else {
                token.clone()
            };
            headers.insert(
                rule.header.clone(),
                http::HeaderValue::from_str(&value).context("--token")?,
            );
        }
    }
    let x5t = match &args.cert {
        Some(path) => {
            let pem = tokio::fs::read(path)
                .await
                .with_context(|| format!("reading {}", path.display()))?;
            let certs = stepmesh_ca::pem::decode_certs(&pem)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let cert = certs
                .first()
                .with_context(|| format!("{}: no certificate", path.display()))?;
            stepup::x5t_s256(cert)
        }
        None => String::new(),
    };
    let stepup = StepUp::new(StepUpMetrics::default());
    stepup.sync(&policy).await;
    let req = RequestInfo {
        peer: Peer {
            id: &peer,
            x5t_s256: &x5t,
        },
        port,
        method: &method,
        uri: &uri,
        headers: &headers,
    };
    let d = stepup::decide(&policy, &stepup, req, stepup::gate::unix_now()).await;
    let verdict = match (&d.outcome, d.would_deny) {
        (Outcome::Allow, true) => "allow (audit: enforce would refuse)".to_owned(),
        (Outcome::Allow, false) => "allow".to_owned(),
        (Outcome::Forbidden, _) => "403 forbidden".to_owned(),
        (Outcome::Challenge(_), _) => "401 unauthorized".to_owned(),
        (Outcome::BadRequest(_), _) => "400 bad request".to_owned(),
    };
    let _ = writeln!(out, "request: {method} {path}");
    let _ = writeln!(
        out,
        "route: {}",
        d.route
            .as_deref()
            .unwrap_or("(none: the port's allow list decides)")
    );
    let _ = writeln!(
        out,
        "decision: {verdict}\nrule: {}\nreason: {}",
        d.rule, d.reason
    );
    if let Outcome::BadRequest(refusal) = &d.outcome {
        let _ = writeln!(out, "why: {refusal}");
    }
    if let Outcome::Challenge(v) = &d.outcome {
        let _ = writeln!(out, "www-authenticate: {}", v.to_str().unwrap_or("?"));
    }
    if let Some(sub) = &d.subject {
        let _ = writeln!(out, "x-stepup-sub: {sub}");
    }
    if let Some(h) = &d.strip {
        let _ = writeln!(out, "strips: {h}");
    }
    Ok(out)
}
