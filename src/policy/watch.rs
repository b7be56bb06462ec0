//! Hot reload: the policy file is polled by content hash (so Kubernetes'
//! ConfigMap symlink swaps are seen like any edit), parsed and validated on
//! a thread of its own, and swapped in whole. A bad file keeps the old policy.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::compile::sha256_hex;
use super::{Policy, PolicyError};

const POLL: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

/// The live policy: `current()` is a lock-free load of an `Arc`.
#[derive(Clone, Debug)]
pub struct PolicyWatch {
    current: Arc<ArcSwap<Policy>>,
    /// Bumped after every swap, so live connections re-check themselves.
    changed: Arc<tokio::sync::watch::Sender<u64>>,
    /// Dropping the last clone disconnects the poller, which then exits.
    _stop: Arc<mpsc::Sender<()>>,
}

impl PolicyWatch {
    /// Loads `path` (refusing to start on a bad file) and polls it for
    /// changes every 500 ms. Registers `stepmesh_policy_reloads_total{result}`.
    pub fn start(
        path: impl Into<PathBuf>,
        registry: &mut Registry,
    ) -> Result<PolicyWatch, PolicyError> {
        Self::start_every(path.into(), registry, POLL)
    }

    /// A policy that never changes (no `--policy`, or tests).
    pub fn fixed(policy: Policy) -> PolicyWatch {
        let (stop, _) = mpsc::channel();
        PolicyWatch {
            current: Arc::new(ArcSwap::from_pointee(policy)),
            changed: Arc::new(tokio::sync::watch::Sender::new(0)),
            _stop: Arc::new(stop),
        }
    }

    fn start_every(
        path: PathBuf,
        registry: &mut Registry,
        every: Duration,
    ) -> Result<PolicyWatch, PolicyError> {
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "stepmesh_policy_reloads",
            "Policy file reloads by result (ok, error)",
            reloads.clone(),
        );
        let bytes = read(&path)?;
        let policy = Policy::from_yaml(&String::from_utf8_lossy(&bytes))?;
        tracing::info!(path = %path.display(), digest = policy.digest(), "policy loaded");
        let current = Arc::new(ArcSwap::from_pointee(policy));
        let (stop, stopped) = mpsc::channel::<()>();
        let changed = Arc::new(tokio::sync::watch::Sender::new(0));
        let poller = Poller {
            path,
            seen: sha256_hex(&bytes),
            current: current.clone(),
            changed: changed.clone(),
            reloads,
        };
        std::thread::Builder::new()
            .name("policy-watch".into())
            .spawn(move || poller.run(&stopped, every))
            .map_err(|source| PolicyError::Io {
                path: PathBuf::from("<policy-watch thread>"),
                source,
            })?;
        Ok(PolicyWatch {
            current,
            changed,
            _stop: Arc::new(stop),
        })
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// Whether the policy in force now routes requests on `port`: a look
    /// that keeps no reference (asked before every HTTP/1 request's head
    /// is parsed, where a reference taken and dropped is two atomic
    /// read-modify-writes on a count every connection shares).
    pub fn routes_requests(&self, port: u16) -> bool {
        self.current.load().routes_requests(port)
    }

    /// Changes (its value: the number of swaps so far) after every reload
    /// that replaced the policy: established connections re-check themselves
    /// on it. A refused file changes nothing.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

struct Poller {
    path: PathBuf,
    /// Hash of the last content acted on (good or bad), so a bad file is
    /// reported once, not every poll.
    seen: String,
    current: Arc<ArcSwap<Policy>>,
    changed: Arc<tokio::sync::watch::Sender<u64>>,
    reloads: Family<ReloadLabels, Counter>,
}

impl Poller {
    fn run(mut self, stopped: &mpsc::Receiver<()>, every: Duration) {
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
            self.poll();
        }
    }

    fn poll(&mut self) {
        let bytes = match read(&self.path) {
            Ok(b) => b,
            Err(err) => {
                let key = format!("io:{err}");
                if key != self.seen {
                    self.seen = key;
                    self.fail(&err);
                }
                return;
            }
        };
        let hash = sha256_hex(&bytes);
        if hash == self.seen {
            return;
        }
        self.seen = hash;
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|e| PolicyError::Parse(format!("not UTF-8: {e}")))
            .and_then(Policy::from_yaml);
        match parsed {
            Ok(policy) => {
                tracing::info!(path = %self.path.display(), digest = policy.digest(), "policy reloaded");
                self.current.store(Arc::new(policy));
                self.changed.send_modify(|swaps| *swaps += 1);
                self.reloads
                    .get_or_create(&ReloadLabels { result: "ok" })
                    .inc();
            }
            Err(err) => self.fail(&err),
        }
    }

    fn fail(&self, err: &PolicyError) {
        tracing::warn!(
            path = %self.path.display(),
            error = %err,
            kept = self.current.load().digest(),
            "policy reload refused; keeping the current policy"
        );
        self.reloads
            .get_or_create(&ReloadLabels { result: "error" })
            .inc();
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PolicyError> {
    std::fs::read(path).map_err(|source| PolicyError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use std::time::Instant;

    const A: &str = "trustDomain: a.test\ninbound: {default: deny}\n";
    const B: &str = "trustDomain: b.test\ninbound: {default: allow-authenticated}\n";

    fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn metrics(reg: &Registry) -> String {
        let mut out = String::new();
        encode(&mut out, reg).unwrap();
        out
    }

    #[test]
    fn reloads_good_files_and_keeps_the_old_policy_on_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.yaml");
        std::fs::write(&file, A).unwrap();
        let mut reg = Registry::default();
        let watch =
            PolicyWatch::start_every(file.clone(), &mut reg, Duration::from_millis(20)).unwrap();
        assert_eq!(watch.current().trust_domain().as_str(), "a.test");

        std::fs::write(&file, B).unwrap();
        eventually("reload to b.test", || {
            watch.current().trust_domain().as_str() == "b.test"
        });
        let good = watch.current().digest().to_owned();

        std::fs::write(&file, "trustDomain: c.test\nbogus: 1\n").unwrap();
        eventually("error counted", || {
            metrics(&reg).contains("stepmesh_policy_reloads_total{result=\"error\"} 1")
        });
        assert_eq!(
            watch.current().digest(),
            good,
            "bad file must not replace the policy"
        );

        std::fs::remove_file(&file).unwrap();
        eventually("missing file counted", || {
            metrics(&reg).contains("result=\"error\"} 2")
        });
        assert_eq!(watch.current().digest(), good);
        assert!(metrics(&reg).contains("stepmesh_policy_reloads_total{result=\"ok\"} 1"));
    }

    #[test]
    fn follows_a_configmap_style_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("..v1");
        let v2 = dir.path().join("..v2");
        std::fs::create_dir(&v1).unwrap();
        std::fs::create_dir(&v2).unwrap();
        std::fs::write(v1.join("policy.yaml"), A).unwrap();
        std::fs::write(v2.join("policy.yaml"), B).unwrap();
        let data = dir.path().join("..data");
        std::os::unix::fs::symlink("..v1", &data).unwrap();
        let file = dir.path().join("policy.yaml");
        std::os::unix::fs::symlink("..data/policy.yaml", &file).unwrap();

        let mut reg = Registry::default();
        let watch = PolicyWatch::start_every(file, &mut reg, Duration::from_millis(20)).unwrap();
        assert_eq!(watch.current().trust_domain().as_str(), "a.test");
        // Kubernetes: new ..data link made aside, then renamed over the old.
        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink("..v2", &tmp).unwrap();
        std::fs::rename(&tmp, &data).unwrap();
        eventually("swap seen", || {
            watch.current().trust_domain().as_str() == "b.test"
        });
    }

    #[test]
    fn refuses_to_start_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.yaml");
        std::fs::write(&file, "trustDomain: A_B\n").unwrap();
        let err = PolicyWatch::start(&file, &mut Registry::default()).unwrap_err();
        assert!(err.to_string().contains("trustDomain"), "{err}");
        let err =
            PolicyWatch::start(dir.path().join("nope.yaml"), &mut Registry::default()).unwrap_err();
        assert!(err.to_string().contains("nope.yaml"), "{err}");
    }
}
