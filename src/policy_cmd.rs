//! `stepmesh policy`: check a file, explain a decision, compile NetworkPolicies.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

use crate::policy::{netpol, target, Cidr, Policy, SpiffeId};
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
    /// Print Kubernetes NetworkPolicies for a set of policies: default deny
    /// of ingress and egress, allows derived from the identity rules (the
    /// callers' egress from the callees' inbound rules), the outbound rules
    /// as egress, and what the mesh needs.
    Netpol(NetpolArgs),
    /// Report risky configurations for CI, one line each (`file: field:
    /// CODE message`): exit 0 clean, 1 findings, 64 unreadable or invalid.
    Lint(LintArgs),
}

/// Flags of `stepmesh policy lint`.
#[derive(Debug, clap::Args)]
pub struct LintArgs {
    /// Policy files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Silence a finding code (repeatable), e.g. `--allow SM006`.
    #[arg(long)]
    pub allow: Vec<String>,
    /// `text` (one line per finding) or `json` (an array, for tools).
    #[arg(long, value_enum, default_value = "text")]
    pub format: LintFormat,
    /// A production namespace (repeatable): `mode: audit` (SM003) in a
    /// policy whose `workload.namespace` is one is an error, not a warning.
    #[arg(long)]
    pub production: Vec<String>,
}

/// How `policy lint` prints.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LintFormat {
    /// `file: field: CODE message`.
    Text,
    /// A JSON array of `{file, field, code, severity, message}`.
    Json,
}

/// Flags of `stepmesh policy netpol`.
#[derive(Debug, clap::Args)]
pub struct NetpolArgs {
    /// Policy files, compiled together; each names its pods in `workload:`
    /// (or give one file and --namespace/--selector).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Namespace of the pods the one policy protects.
    #[arg(long, requires = "selector")]
    pub namespace: Option<String>,
    /// Pod label selecting them, `key=value`.
    #[arg(long, requires = "namespace")]
    pub selector: Option<String>,
    /// What the compiler needs beyond the policies.
    #[command(flatten)]
    pub options: NetpolOptionArgs,
}

/// The compiler's options as flags (`policy netpol` and `netpol sync`).
#[derive(Debug, Clone, clap::Args)]
pub struct NetpolOptionArgs {
    /// `deny`: only what the policies and the mesh need leaves the pods;
    /// `open`: no Egress policies (adopt in steps).
    #[arg(long, value_enum, default_value = "deny")]
    pub egress: netpol::EgressMode,
    /// The API server's endpoint addresses (CIDR), for workloads with
    /// `apiServer: true` (default: any address on 443 and 6443).
    #[arg(long = "api-server")]
    pub api_server: Vec<Cidr>,
    /// Where kubelet probes come from (the node CIDRs; default: anywhere).
    #[arg(long = "probe-cidr")]
    pub probe_cidr: Vec<Cidr>,
    /// The cluster DNS pods, `namespace/key=value`.
    #[arg(long, default_value = "kube-system/k8s-app=kube-dns")]
    pub dns: String,
    /// The stepmesh CA pods, `namespace/key=value`.
    #[arg(
        long,
        default_value = "stepmesh-system/app.kubernetes.io/name=stepmesh-ca"
    )]
    pub ca: String,
}

impl NetpolOptionArgs {
    /// The compiler options these flags say.
    pub fn options(&self) -> anyhow::Result<netpol::Options> {
        Ok(netpol::Options {
            egress: self.egress,
            api_server: self.api_server.clone(),
            probe_sources: self.probe_cidr.clone(),
            dns: pod_ref("--dns", &self.dns)?,
            ca: pod_ref("--ca", &self.ca)?,
        })
    }
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
    /// Another header field of the request, `NAME: VALUE` (repeatable): a
    /// method override (`X-HTTP-Method-Override: DELETE`), a field the
    /// sidecar would drop.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
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
        PolicyCommand::Netpol(args) => print!("{}", netpol_set(&args).await?),
        // app.rs runs lint itself: its findings exit 1, not 64.
        PolicyCommand::Lint(args) => lint(&args)?,
    }
    Ok(())
}

/// `stepmesh policy lint`: prints the findings; an unreadable or invalid
/// file is a configuration error (exit 64, every file reported), findings
/// of severity error an unmarked error (exit 1). Blocking reads: call off
/// the runtime threads.
pub fn lint(args: &LintArgs) -> anyhow::Result<()> {
    use crate::policy::lint::{self, Severity, CODES};
    if let Some(code) = args
        .allow
        .iter()
        .find(|c| !CODES.iter().any(|(k, _)| k == c))
    {
        return Err(crate::exit::config(anyhow::anyhow!(
            "--allow {code:?}: not a lint code (SM001..SM{:03})",
            CODES.len()
        )));
    }
    let mut bad = Vec::new();
    let mut found = Vec::new();
    for file in &args.files {
        match Policy::from_file(file) {
            Ok(p) => {
                let production = p
                    .workload()
                    .is_some_and(|w| args.production.contains(&w.namespace));
                found.extend(
                    lint::lint(&p)
                        .into_iter()
                        .filter(|f| !args.allow.iter().any(|a| a == f.code))
                        .map(|mut f| {
                            if production && f.code == "SM003" {
                                f.severity = Severity::Error;
                                f.message.push_str(" (a production namespace)");
                            }
                            (file.display().to_string(), f)
                        }),
                )
            }
            Err(e) => bad.push(format!("{}: {e}", file.display())),
        }
    }
    if !bad.is_empty() {
        return Err(crate::exit::config(anyhow::anyhow!("{}", bad.join("; "))));
    }
    match args.format {
        LintFormat::Text => {
            for (file, f) in &found {
                let warn = if f.severity == Severity::Warning {
                    "warning: "
                } else {
                    ""
                };
                println!("{file}: {}: {} {warn}{}", f.field, f.code, f.message);
            }
        }
        LintFormat::Json => {
            let rows: Vec<serde_json::Value> = found
                .iter()
                .map(|(file, f)| {
                    serde_json::json!({"file": file, "field": f.field, "code": f.code,
                                       "severity": f.severity, "message": f.message})
                })
                .collect();
            println!("{}", serde_json::Value::Array(rows));
        }
    }
    let errors = found
        .iter()
        .filter(|(_, f)| f.severity == Severity::Error)
        .count();
    if errors > 0 {
        anyhow::bail!("{errors} finding(s) ({} warning(s))", found.len() - errors);
    }
    Ok(())
}

/// `namespace/key=value`.
fn pod_ref(flag: &str, text: &str) -> anyhow::Result<netpol::PodRef> {
    let parsed = text.split_once('/').and_then(|(ns, sel)| {
        let (k, v) = sel.split_once('=')?;
        Some((ns, k, v))
    });
    let Some((ns, k, v)) = parsed.filter(|(ns, k, _)| !ns.is_empty() && !k.is_empty()) else {
        anyhow::bail!("{flag} {text:?}: expected namespace/key=value");
    };
    Ok(netpol::PodRef {
        namespace: ns.to_owned(),
        labels: [(k.to_owned(), v.to_owned())].into(),
    })
}

/// The YAML `policy netpol` prints for `args`.
pub async fn netpol_set(args: &NetpolArgs) -> anyhow::Result<String> {
    let flags = args.namespace.as_deref().zip(args.selector.as_deref());
    if flags.is_some() && args.files.len() > 1 {
        anyhow::bail!("--namespace/--selector name the pods of one policy: give one file, or a workload: section in each");
    }
    let mut policies = Vec::with_capacity(args.files.len());
    for file in &args.files {
        policies.push((file.display().to_string(), load(file).await?));
    }
    let inputs = policies
        .iter()
        .map(|(name, p)| netpol::Input::new(name.clone(), p, flags))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = args.options.options()?;
    Ok(netpol::to_yaml(&netpol::compile(&inputs, &opts)?)?)
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
    for field in &args.headers {
        let (name, value) = field
            .split_once(':')
            .with_context(|| format!("--header {field:?}: not NAME: VALUE"))?;
        headers.append(
            http::HeaderName::from_bytes(name.trim().as_bytes())
                .with_context(|| format!("--header {field:?}: not a field name"))?,
            http::HeaderValue::from_str(value.trim())
                .with_context(|| format!("--header {field:?}: not a field value"))?,
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
