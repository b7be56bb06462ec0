//! Helpers of the controller's Kubernetes calls (the client itself is
//! `stepmesh_ca::kube::Api`, shared with the CA): query encoding and the
//! API's time formats.

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

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

/// Whether a call failed because its object does not exist (404).
pub fn not_found<T>(result: &Result<T, stepmesh_ca::kube::KubeError>) -> bool {
    matches!(result, Err(stepmesh_ca::kube::KubeError::Status { status, .. })
        if *status == http::StatusCode::NOT_FOUND)
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
