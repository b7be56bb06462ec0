//! `stepmesh ca revoke | unrevoke | revocations`: the CA's admin calls,
//! authenticated by the admin token the CA reads from its
//! `--admin-token-file` (docs/CA.md, "Revocation").

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use stepmesh_ca::client::{CaClient, ClientError};
use stepmesh_ca::proto::v1::Revocation;

/// Where the CA is and how to prove the caller is its operator.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The CA's gRPC address (replicas: comma-separated; the first that
    /// answers is used).
    #[arg(long = "ca", default_value = "127.0.0.1:15012", env = "STEPMESH_CA")]
    pub ca: String,
    /// Roots the CA's serving certificate chains to (its bundle.pem).
    #[arg(long, env = "STEPMESH_CA_BUNDLE")]
    pub ca_bundle: PathBuf,
    /// File holding the CA's admin token (the same Secret the CA reads).
    #[arg(long, env = "STEPMESH_CA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: PathBuf,
}

/// What `revoke` and `unrevoke` name: exactly one of the two.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// A certificate serial the CA issued (hex, colons allowed).
    #[arg(long)]
    pub serial: Option<String>,
    /// A SPIFFE ID: all its certificates, and no new ones until unrevoked.
    #[arg(long)]
    pub id: Option<String>,
}

/// Flags of `stepmesh ca revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The serial or ID.
    #[command(flatten)]
    pub target: TargetArgs,
    /// Why (kept in the list and the CA's audit line).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// The CA and the admin token.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Flags of `stepmesh ca rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Which workloads renew now.
    #[command(flatten)]
    pub target: RotateTarget,
    /// The CA and the admin token.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// One ID, or all.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RotateTarget {
    /// The SPIFFE ID whose sidecars renew now.
    #[arg(long)]
    pub id: Option<String>,
    /// Every sidecar renews now.
    #[arg(long)]
    pub all: bool,
}

/// `ca rotate`.
pub async fn rotate(args: RotateArgs) -> anyhow::Result<()> {
    let (client, token) = args.admin.connect().await?;
    let rotation = client
        .rotate(&token, args.target.id.as_deref())
        .await
        .map_err(refused)?;
    let who = if rotation.id.is_empty() {
        "every workload"
    } else {
        &rotation.id
    };
    println!(
        "asked {who} to renew SVIDs issued before {}",
        at(rotation.issued_before)
    );
    Ok(())
}

/// Flags of `stepmesh ca unrevoke`.
#[derive(Debug, Args)]
pub struct UnrevokeArgs {
    /// The serial or ID.
    #[command(flatten)]
    pub target: TargetArgs,
    /// The CA and the admin token.
    #[command(flatten)]
    pub admin: AdminArgs,
}

impl AdminArgs {
    async fn connect(&self) -> anyhow::Result<(CaClient, String)> {
        let read = |what: &str, path: &PathBuf| {
            std::fs::read_to_string(path)
                .with_context(|| format!("{what} {}", path.display()))
                .map_err(crate::exit::config)
        };
        let bundle = read("--ca-bundle", &self.ca_bundle)?;
        let token = read("--admin-token-file", &self.admin_token_file)?;
        let client = CaClient::connect(&self.ca, &bundle)
            .with_context(|| format!("--ca {}", self.ca))
            .map_err(crate::exit::config)?;
        Ok((client, token.trim().to_owned()))
    }
}

/// The CA's refusal as the command's error: what the caller named wrong
/// is a usage error (exit 64), anything else a failed run (exit 1).
fn refused(err: ClientError) -> anyhow::Error {
    match &err {
        ClientError::Rpc { code, message } => {
            let err = anyhow::anyhow!("the CA refused: {message}");
            match code {
                tonic::Code::InvalidArgument | tonic::Code::NotFound => crate::exit::config(err),
                _ => err,
            }
        }
        _ => anyhow::Error::new(err),
    }
}

/// `ca revoke`.
pub async fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let (client, token) = args.admin.connect().await?;
    let (serial, id) = target(&args.target);
    let entry = client
        .revoke(&token, serial, id, &args.reason)
        .await
        .map_err(refused)?;
    println!("revoked {}", line(&entry));
    Ok(())
}

/// `ca unrevoke`.
pub async fn unrevoke(args: UnrevokeArgs) -> anyhow::Result<()> {
    let (client, token) = args.admin.connect().await?;
    let (serial, id) = target(&args.target);
    let entry = client.unrevoke(&token, serial, id).await.map_err(refused)?;
    println!("unrevoked {}", line(&entry));
    Ok(())
}

/// `ca revocations`: one line per entry.
pub async fn list(args: AdminArgs) -> anyhow::Result<()> {
    let (client, token) = args.connect().await?;
    let entries = client.revocations(&token).await.map_err(refused)?;
    if entries.is_empty() {
        println!("no revocations");
    }
    for entry in &entries {
        println!("{}", line(entry));
    }
    Ok(())
}

fn target(t: &TargetArgs) -> (&str, &str) {
    (
        t.serial.as_deref().unwrap_or(""),
        t.id.as_deref().unwrap_or(""),
    )
}

fn at(secs: i64) -> String {
    let secs = u64::try_from(secs).unwrap_or(0);
    crate::accesslog::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// `serial=… id=… revoked_at=… expires=… reason="…"`.
fn line(e: &Revocation) -> String {
    let serial = if e.serial.is_empty() { "*" } else { &e.serial };
    let expires = if e.expires_at == 0 {
        "until-unrevoked".to_owned()
    } else {
        at(e.expires_at)
    };
    format!(
        "serial={serial} id={} revoked_at={} expires={expires} reason={:?}",
        e.id,
        at(e.revoked_at),
        e.reason
    )
}
