//! `stepmesh demo`: a whole mesh on loopback — the CA, a test identity
//! provider, the `payments` app behind its sidecar and the `frontend` and
//! `reports` workloads behind theirs — walking through allow, deny and
//! step-up. Everything runs in a temporary directory and is stopped and
//! removed on exit or Ctrl-C.

pub mod apps;
pub mod child;
pub mod idp;
pub mod mesh;
pub mod walk;

use anyhow::Context;
use clap::Args;

use mesh::{Mesh, FRONTEND};
use walk::Outcome;

/// Flags of `stepmesh demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep running after the walkthrough and print curl commands.
    #[arg(long)]
    pub serve: bool,
}

/// Runs the walkthrough (and, with `--serve`, keeps the mesh up until
/// Ctrl-C or SIGTERM). Fails if a step did not behave as the policy says.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("stepmesh-demo-")
        .tempdir()
        .context("creating a temp dir")?;
    let result = tokio::select! {
        result = demo(&args, dir.path()) => result,
        signal = shutdown_signal() => {
            signal?;
            println!("\nstopping: every child process is killed and {} removed", dir.path().display());
            Ok(())
        }
    };
    // The demo's future (and with it every child and server) is dropped by
    // now; removing the directory is the last step.
    dir.close().context("removing the demo's temp dir")?;
    result
}

async fn demo(args: &DemoArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    println!(
        "stepmesh demo: a mesh on loopback, state in {}\n",
        dir.display()
    );
    let mut mesh = Mesh::start(dir).await?;
    let outcomes = walk::run(&mesh).await;
    mesh.check_alive()?;
    let expected = outcomes
        .iter()
        .filter(|o| **o == Outcome::AsExpected)
        .count();
    println!(
        "\n{expected} of {} steps behaved as the policy says",
        outcomes.len()
    );
    let unexpected = outcomes.len() - expected;
    anyhow::ensure!(
        unexpected == 0,
        "{unexpected} step(s) did not behave as the policy says"
    );
    if args.serve {
        print_curl(&mesh);
        std::future::pending::<()>().await;
    }
    Ok(())
}

fn print_curl(mesh: &Mesh) {
    let (front, reports) = (mesh.frontend_out, mesh.reports_out);
    println!("\nThe mesh keeps running (Ctrl-C stops it). Try, from another shell:\n");
    println!("  # as frontend (through its sidecar): allowed");
    println!("  curl -si http://{front}/balance");
    println!("  # as reports: denied by identity");
    println!("  curl -si http://{reports}/balance");
    println!("  # a sensitive route without step-up: 401 and the challenge");
    println!("  curl -si -X POST http://{front}/refunds");
    println!("  # the \"MFA login\", then the same request with the token");
    println!(
        "  TOKEN=$(curl -s -X POST '{}')",
        mesh.idp.token_url("alice", FRONTEND)
    );
    println!("  curl -si -X POST -H \"Authorization: Bearer $TOKEN\" http://{front}/refunds");
    let issuer = mesh.idp.issuer();
    let cache = mesh.policy.parent().unwrap_or(&mesh.policy).join("login");
    println!("  # an OIDC device-flow login as kubectl runs it (prints a code on stderr) ...");
    println!(
        "  stepmesh login --issuer {issuer} --client-id kubectl --cache-dir {}",
        cache.display()
    );
    println!("  # ... and, from another shell, alice approving that code with the MFA step");
    println!("  curl -s -d user_code=XXXX-XXXX -d user=alice -d mfa=true {issuer}/device/approve");
    println!("\n  policy: {}", mesh.policy.display());
    for child in &mesh.children {
        println!("  {} log: {}", child.name(), child.log_path().display());
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    tokio::select! {
        ctrl_c = tokio::signal::ctrl_c() => ctrl_c.context("listening for Ctrl-C"),
        _ = term.recv() => Ok(()),
    }
}
