//! One active replica: a `coordination.k8s.io/v1` Lease, held by renewing
//! it and taken over when its holder has not renewed it for its duration.
//! Expiry is judged as client-go does, by how long this process has seen
//! the same holder and renew time (no trust in other clocks); updates carry
//! the resourceVersion read, so two contenders cannot both win.

use std::time::{Duration, Instant, SystemTime};

use http::{Method, StatusCode};
use serde_json::json;

use stepmesh_ca::kube::Api;

use super::api::rfc3339;

/// This process's view of the Lease.
#[derive(Debug)]
pub struct Lease {
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
    observed: Option<(String, Instant)>,
    /// When this process last began a renewal that succeeded (before its
    /// read: no other replica can have seen the new renew time earlier).
    renewed: Option<Instant>,
}

impl Lease {
    /// The Lease `namespace/name`, contended for as `identity`.
    pub fn new(namespace: String, name: String, identity: String, duration: Duration) -> Lease {
        Lease {
            namespace,
            name,
            identity,
            duration,
            observed: None,
            renewed: None,
        }
    }

    fn path(&self) -> String {
        format!(
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases/{}",
            self.namespace, self.name
        )
    }

    /// Renews or takes the Lease; whether this process holds it now. An
    /// error (the API server unreachable) means it does not: write nothing.
    pub async fn hold(&mut self, api: &Api) -> anyhow::Result<bool> {
        let started = Instant::now();
        self.renewed = None;
        let held = self.renew(api).await?;
        if held {
            self.renewed = Some(started);
        }
        Ok(held)
    }

    /// Whether this process may still write: within two thirds of the
    /// duration of its last renewal (as client-go's renew deadline is
    /// short of its lease duration). Another replica takes over only after
    /// seeing the same renew time for the whole duration, on its clock, so
    /// a round slower than that stops rather than writes beside it.
    pub fn may_write(&self) -> bool {
        self.renewed
            .is_some_and(|at| at.elapsed() < self.duration * 2 / 3)
    }

    /// [`Lease::may_write`], as the error that ends a round.
    pub fn writable(&self) -> anyhow::Result<()> {
        if self.may_write() {
            return Ok(());
        }
        anyhow::bail!(
            "the round outlasted its Lease renewal; stopped before another replica may write"
        )
    }

    async fn renew(&mut self, api: &Api) -> anyhow::Result<bool> {
        let now = rfc3339(SystemTime::now(), true);
        let secs = self.duration.as_secs().max(1);
        let (status, mut current) = api.call(Method::GET, &self.path(), None).await?;
        if status == StatusCode::NOT_FOUND {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": secs,
                         "acquireTime": now, "renewTime": now, "leaseTransitions": 0},
            });
            let path = format!(
                "/apis/coordination.k8s.io/v1/namespaces/{}/leases",
                self.namespace
            );
            let body = serde_json::to_vec(&lease)?;
            let (status, _) = api
                .call(Method::POST, &path, Some(("application/json", body)))
                .await?;
            return Ok(status.is_success());
        }
        if !status.is_success() {
            anyhow::bail!("reading Lease {}/{}: {status}", self.namespace, self.name);
        }
        let spec = &current["spec"];
        let holder = spec["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let stamp = format!(
            "{holder}|{}",
            spec["renewTime"].as_str().unwrap_or_default()
        );
        let expired = match &self.observed {
            Some((seen, since)) if *seen == stamp => since.elapsed() > self.duration,
            _ => {
                self.observed = Some((stamp, Instant::now()));
                false
            }
        };
        let mine = holder == self.identity;
        if !(mine || holder.is_empty() || expired) {
            return Ok(false);
        }
        let transitions = spec["leaseTransitions"].as_i64().unwrap_or(0);
        let spec = &mut current["spec"];
        spec["holderIdentity"] = json!(self.identity);
        spec["leaseDurationSeconds"] = json!(secs);
        spec["renewTime"] = json!(now);
        if !mine {
            spec["acquireTime"] = json!(now);
            spec["leaseTransitions"] = json!(transitions + 1);
            tracing::info!(previous = %holder, "taking over the Lease");
        }
        let body = serde_json::to_vec(&current)?;
        let (status, _) = api
            .call(Method::PUT, &self.path(), Some(("application/json", body)))
            .await?;
        // 409: someone else updated it first; they hold it.
        Ok(status.is_success())
    }

    /// Gives the Lease up if this process holds it (on SIGTERM): another
    /// replica takes it at its next interval instead of after the duration.
    pub async fn release(&mut self, api: &Api) -> anyhow::Result<()> {
        let (status, mut current) = api.call(Method::GET, &self.path(), None).await?;
        if !status.is_success() || current["spec"]["holderIdentity"] != self.identity.as_str() {
            return Ok(());
        }
        current["spec"]["holderIdentity"] = json!("");
        let body = serde_json::to_vec(&current)?;
        let (status, _) = api
            .call(Method::PUT, &self.path(), Some(("application/json", body)))
            .await?;
        if !status.is_success() {
            anyhow::bail!("releasing the Lease: {status}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_stop_two_thirds_into_the_duration_of_the_last_renewal() {
        let duration = Duration::from_secs(9);
        let mut lease = Lease::new("ns".into(), "l".into(), "me".into(), duration);
        assert!(!lease.may_write(), "never renewed");
        lease.renewed = Some(Instant::now());
        assert!(lease.may_write() && lease.writable().is_ok());
        lease.renewed = Instant::now().checked_sub(Duration::from_secs(6));
        assert!(!lease.may_write(), "6 s of 9: another replica may be near");
        assert!(lease.writable().is_err());
    }
}
