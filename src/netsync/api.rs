//! The few Kubernetes API calls the controller makes, over the one HTTPS
//! client of stepmesh (`stepmesh_ca::https`), with the ServiceAccount
//! token re-read on every call (kubelet rotates it).

use std::path::PathBuf;

use anyhow::Context;
use http::{Method, StatusCode};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;
use stepmesh_ca::https::HttpsClient;

/// The API server and the credentials to reach it.
#[derive(Debug, Clone)]
pub struct Api {
    client: HttpsClient,
    server: String,
    token_file: PathBuf,
}

impl Api {
    /// A client of `server` (`https://host:port`) trusting `ca_file`.
    pub fn new(
        server: String,
        ca_file: &std::path::Path,
        token_file: PathBuf,
    ) -> anyhow::Result<Api> {
        let client = HttpsClient::new(ca_file).context("--ca-file")?;
        Ok(Api {
            client,
            server: server.trim_end_matches('/').to_owned(),
            token_file,
        })
    }

    /// One call: the status and the JSON body (null when not JSON).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let token = tokio::fs::read_to_string(&self.token_file)
            .await
            .with_context(|| format!("reading the token {}", self.token_file.display()))?;
        let url = format!("{}{path}", self.server);
        let r = self
            .client
            .request(method.clone(), &url, Some(token.trim()), body)
            .await
            .with_context(|| format!("{method} {path}"))?;
        Ok((
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        ))
    }

    /// A call that must succeed (2xx): its body.
    pub async fn ok(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<Value> {
        let (status, v) = self.call(method.clone(), path, body).await?;
        if !status.is_success() {
            anyhow::bail!(
                "{method} {path}: {status}: {}",
                v["message"].as_str().unwrap_or("")
            );
        }
        Ok(v)
    }

    /// The `items` of a list.
    pub async fn list(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        let v = self.ok(Method::GET, path, None).await?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }
}

/// `s` as a query parameter value.
pub fn query(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// Unix time as RFC 3339 UTC with microseconds (Kubernetes `MicroTime`),
/// or whole seconds (`Time`) when `micros` is false.
pub fn rfc3339(now: std::time::SystemTime, micros: bool) -> String {
    let d = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    let base = format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if micros {
        format!("{base}.{:06}Z", d.subsec_micros())
    } else {
        format!("{base}Z")
    }
}

/// Year, month, day of a count of days since 1970-01-01 (H. Hinnant's
/// `civil_from_days`, for dates after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_what_kubernetes_parses() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_764_936_000_123_456);
        assert_eq!(rfc3339(t, true), "2025-12-05T12:00:00.123456Z");
        assert_eq!(rfc3339(t, false), "2025-12-05T12:00:00Z");
        assert_eq!(query("a.io/b=c"), "a%2Eio%2Fb%3Dc");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
    }
}
