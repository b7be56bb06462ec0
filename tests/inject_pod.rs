//! The injected pod runs: the command lines the injector writes into a pod
//! are started as they stand, against a real `stepmesh ca serve`, with local
//! stand-ins for the volumes kubelet would mount (a join token as the
//! projected token, the CA's bundle.pem as the `stepmesh-ca-bundle`
//! ConfigMap, deploy/example's frontend policy as `stepmesh-policy`), and
//! the sidecar must reach `/ready`. The init container runs the built
//! `stepmesh`, the sidecar the built `stepmesh-proxy`, as in the image.
//!
//! As root, in a fresh network namespace (the pod) joined by a veth to a
//! second one (the node): the init container's args install the rules for
//! real, the proxy runs as the container's `runAsUser` with every flag as
//! injected but the three mounted paths — the CA address included (the
//! cluster DNS name resolves through the namespace's hosts file to a relay
//! on the node side) — and `/ready` is probed on the pod IP at the
//! readiness probe's port, as kubelet does. Without root, the same flags
//! run in the test's own namespace with `--admin`, `--inbound-port`,
//! `--outbound-port` and `--ca` values moved to free local addresses, and
//! the init args with `--dry-run`.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod inject_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::ca::CaProcess;
use common::mesh::eventually;
use common::netns::{self, Link, Netns};
use inject_support::{docs, inject_stdin, BIN, PROXY_BIN};
use serde_json::Value;

const NS: &str = "stepmesh-demo";
const SA: &str = "frontend";
const TOKEN: &str = "join-frontend";
const ID: &str = "spiffe://cluster.local/ns/stepmesh-demo/sa/frontend";

const POD: &str = "
apiVersion: v1
kind: Pod
metadata:
  name: frontend-0
  namespace: stepmesh-demo
  annotations:
    stepmesh.io/exclude-inbound-ports: '9090'
    stepmesh.io/exclude-outbound-ports: '5432'
    stepmesh.io/exclude-outbound-cidrs: 169.254.169.254/32
spec:
  serviceAccountName: frontend
  containers:
    - name: app
      image: registry.k8s.io/pause:3.10
      ports: [{name: http, containerPort: 8080}]
      readinessProbe:
        httpGet: {path: /healthz, port: http}
        periodSeconds: 2
        timeoutSeconds: 3
";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The injected pod: its spec, the init container and the proxy.
struct Injected {
    spec: Value,
    init: Value,
    proxy: Value,
}

impl Injected {
    fn new() -> Self {
        let (out, _) = inject_stdin(POD);
        let spec = docs(&out)[0]["spec"].clone();
        let init = spec["initContainers"][0].clone();
        let proxy = spec["initContainers"][1].clone();
        assert_eq!(init["name"], "stepmesh-init");
        assert_eq!(proxy["name"], "stepmesh-proxy");
        Self { spec, init, proxy }
    }

    /// `command` (the image's `image_command`, replaced by the built
    /// binary `bin`) and `args`.
    fn argv(container: &Value, image_command: &str, bin: &Path) -> Vec<String> {
        let command: Vec<String> = serde_json::from_value(container["command"].clone()).unwrap();
        assert_eq!(command, [image_command], "{container}");
        let mut argv = vec![bin.display().to_string()];
        argv.extend(serde_json::from_value::<Vec<String>>(container["args"].clone()).unwrap());
        argv
    }

    /// The value of `--flag` in the proxy's args.
    fn proxy_flag(&self, flag: &str) -> String {
        let args: Vec<String> = serde_json::from_value(self.proxy["args"].clone()).unwrap();
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1].clone()
    }

    /// The proxy's environment as kubelet would set it (downward API
    /// fields given their pod values).
    fn proxy_env(&self, pod_ip: &str) -> Vec<(String, String)> {
        let env = self.proxy["env"].as_array().unwrap().iter();
        env.map(|e| {
            let value = match (
                &e["value"],
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (Value::String(v), _) => v.clone(),
                (_, Some("metadata.name")) => "frontend-0".into(),
                (_, Some("metadata.namespace")) => NS.into(),
                (_, Some("spec.serviceAccountName")) => SA.into(),
                (_, Some("status.podIP")) => pod_ip.into(),
                _ => panic!("an env entry this test cannot fill: {e}"),
            };
            (e["name"].as_str().unwrap().to_owned(), value)
        })
        .collect()
    }
}

/// Local directories standing in for the proxy's volume mounts, filled as
/// kubelet fills them from the pod's volumes.
struct Volumes {
    /// (mountPath in the pod, local directory).
    mounts: Vec<(String, PathBuf)>,
}

impl Volumes {
    fn new(pod: &Injected, root: &Path, ca: &CaProcess) -> Self {
        let policy = std::fs::read_to_string(repo("deploy/example/policy-frontend.yaml")).unwrap();
        // ConfigMap name → (key → contents): what deploy/ publishes.
        let config_map = |name: &str, key: &str| match (name, key) {
            ("stepmesh-ca-bundle", "bundle.pem") => ca.bundle_pem.clone(),
            ("stepmesh-policy", "policy.yaml") => policy.clone(),
            _ => panic!("no contents for ConfigMap {name} key {key}"),
        };
        let mut mounts = Vec::new();
        for mount in pod.proxy["volumeMounts"].as_array().unwrap() {
            let name = mount["name"].as_str().unwrap();
            let volume = pod.spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("volumeMount {name} has no volume"));
            let dir = root.join(name);
            std::fs::create_dir(&dir).unwrap();
            let write = |path: &str, text: &str| {
                let file = dir.join(path);
                std::fs::write(&file, text).unwrap();
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            };
            if let Some(sources) = volume["projected"]["sources"].as_array() {
                let token = &sources[0]["serviceAccountToken"];
                assert_eq!(token["audience"], "stepmesh-ca");
                write(token["path"].as_str().unwrap(), TOKEN);
            } else {
                let cm = volume["configMap"]["name"].as_str().unwrap();
                for item in volume["configMap"]["items"].as_array().unwrap() {
                    let key = item["key"].as_str().unwrap();
                    write(item["path"].as_str().unwrap(), &config_map(cm, key));
                }
            }
            let path = mount["mountPath"].as_str().unwrap().to_owned();
            mounts.push((path, dir));
        }
        Self { mounts }
    }

    /// `arg` with a mount path prefix replaced by its local directory.
    fn localize(&self, arg: &str) -> String {
        self.mounts
            .iter()
            .find_map(|(pod, local)| {
                let rest = arg.strip_prefix(pod.as_str())?.strip_prefix('/')?;
                Some(local.join(rest).display().to_string())
            })
            .unwrap_or_else(|| arg.to_owned())
    }
}

/// A running sidecar; its stderr (JSON logs) collected; killed on drop.
struct Proxy {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn spawn(mut cmd: Command, env: &[(String, String)]) -> Self {
        let mut child = cmd
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[proxy] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, logs }
    }

    /// The admin address it logged.
    fn admin(&mut self) -> SocketAddr {
        eventually("the admin address in the log", || {
            assert!(self.child.try_wait().unwrap().is_none(), "the proxy exited");
            self.logs.lock().unwrap().iter().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                (v["message"] == "admin listening").then(|| v["admin"].as_str()?.parse().ok())?
            })
        })
    }

    /// Polls `GET /ready` on `addr` (connecting from `from`, when given)
    /// until 200, then returns `/config`.
    fn wait_ready(&mut self, from: Option<&Netns>, addr: SocketAddr) -> Value {
        eventually("/ready to answer 200", || {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "the proxy exited: {:?}",
                self.logs.lock().unwrap()
            );
            (get(from, addr, "/ready")?.0 == 200).then_some(())
        });
        let (status, body) = get(from, addr, "/config").unwrap();
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One plain HTTP GET, from namespace `from` when given; `None` while
/// nothing listens.
fn get(from: Option<&Netns>, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let connect = || TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok();
    let mut s = match from {
        Some(ns) => ns.enter(connect)?,
        None => connect()?,
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_owned()))
}

/// What a ready sidecar must report: our identity, the ConfigMap's policy
/// (the digest `policy netpol` stamped on deploy/example's NetworkPolicies)
/// and the transparent listeners.
fn assert_config(config: &Value, inbound_port: u16, outbound_port: u16) {
    assert_eq!(config["spiffe_id"], ID, "{config}");
    let netpols = std::fs::read_to_string(repo("deploy/example/networkpolicies.yaml")).unwrap();
    let digest = docs(&netpols)
        .into_iter()
        .find(|o| o["metadata"]["name"] == "stepmesh-frontend-default-deny")
        .unwrap()["metadata"]["annotations"]["stepmesh.io/policy-digest"]
        .clone();
    assert_eq!(config["policy_digest"], digest, "{config}");
    let ports: Vec<(String, u16)> = config["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let listen: SocketAddr = l["listen"].as_str().unwrap().parse().unwrap();
            (l["kind"].as_str().unwrap().to_owned(), listen.port())
        })
        .collect();
    assert_eq!(
        ports,
        [
            ("transparent-inbound".to_owned(), inbound_port),
            ("transparent-outbound".to_owned(), outbound_port),
        ],
        "{config}"
    );
}

/// A temp dir other UIDs may enter (the proxy runs as 1337).
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn injected_pod_starts_in_a_network_namespace() {
    let Some(link) = Link::create(
        "smpod",
        &[
            "iptables-restore",
            "iptables-save",
            "ip6tables-restore",
            "setpriv",
        ],
    ) else {
        return;
    };
    let pod = Injected::new();
    let dir = open_tempdir();

    // The CA, reached the way a pod reaches it: its Service name and port
    // (a hosts entry in the pod's namespace) on the node side of the veth,
    // relayed to the CA process. Its serving certificate carries that name
    // (the CA Deployment's --dns-name).
    let ca_addr = pod.proxy_flag("--ca");
    let (ca_host, ca_port) = ca_addr.rsplit_once(':').unwrap();
    let ca = CaProcess::start_with(
        "cluster.local",
        &[(TOKEN, ID)],
        &[&format!("--dns-name={ca_host}")],
    );
    let node_side = SocketAddr::from((Link::A_IP, ca_port.parse().unwrap()));
    netns::relay(
        link.a.enter(|| TcpListener::bind(node_side).unwrap()),
        ca.grpc_addr,
    );
    if let Err(e) = link
        .b
        .set_hosts(&format!("127.0.0.1 localhost\n{} {ca_host}\n", Link::A_IP))
    {
        eprintln!("skipped: cannot write /etc/netns for the pod's hosts file: {e}");
        return;
    }
    let volumes = Volumes::new(&pod, dir.path(), &ca);

    // The init container, for real, in the pod's namespace.
    let init = Injected::argv(&pod.init, "stepmesh", Path::new(BIN));
    netns::check(link.b.command(&init[0]).args(&init[1..]));

    // The proxy: as the container's user, every flag as injected but the
    // mounted paths.
    let uid = pod.proxy["securityContext"]["runAsUser"].as_u64().unwrap();
    let gid = pod.proxy["securityContext"]["runAsGroup"].as_u64().unwrap();
    let bin = netns::runnable_by(uid as u32, Path::new(PROXY_BIN), dir.path());
    let argv: Vec<String> = Injected::argv(&pod.proxy, "stepmesh-proxy", &bin)
        .iter()
        .map(|a| volumes.localize(a))
        .collect();
    let mut cmd = link.b.command("setpriv");
    cmd.args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()])
        .arg("--clear-groups")
        .args(&argv);
    let mut proxy = Proxy::spawn(cmd, &pod.proxy_env(&Link::B_IP.to_string()));

    // The app: plain HTTP on 0.0.0.0:8080 in the pod, answering `status`.
    let status = Arc::new(AtomicU16::new(200));
    let app = link
        .b
        .enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 8080)).unwrap());
    serve_status(app, status.clone());

    // kubelet's readiness probe: the pod IP, the probe's port, from outside.
    let probe = &pod.proxy["readinessProbe"]["httpGet"];
    let port = probe["port"].as_u64().unwrap() as u16;
    assert_eq!(probe["path"], "/ready");
    let config = proxy.wait_ready(Some(&link.a), SocketAddr::from((Link::B_IP, port)));
    let port_of = |flag| pod.proxy_flag(flag).parse().unwrap();
    assert_config(
        &config,
        port_of("--inbound-port"),
        port_of("--outbound-port"),
    );
    // The proxy's own call to the CA left the pod un-redirected (its UID is
    // the init container's --proxy-uid; otherwise it would have been sent
    // back to the proxy's own outbound port): the CA issued over the veth.
    ca.wait_audit(|a| a["outcome"] == "issued" && a["identity"] == ID);

    // The app's own readiness probe, as kubelet runs it after injection:
    // the rewritten probe's port and path on the pod IP, from the node
    // side. The sidecar runs the original against the app over localhost.
    let rewritten = &pod.spec["containers"][0]["readinessProbe"]["httpGet"];
    assert_eq!(rewritten["path"], "/app-health/app/readyz");
    let path = rewritten["path"].as_str().unwrap();
    let admin = SocketAddr::from((Link::B_IP, rewritten["port"].as_u64().unwrap() as u16));
    let (code, body) = get(Some(&link.a), admin, path).unwrap();
    assert_eq!(code, 200, "{body}");
    status.store(500, Ordering::SeqCst);
    assert_eq!(get(Some(&link.a), admin, path).unwrap().0, 500);
    // Without the rewrite, kubelet's plaintext probe of the app port meets
    // the sidecar's mTLS inbound: no HTTP answer at all.
    let direct = SocketAddr::from((Link::B_IP, 8080));
    assert_eq!(get(Some(&link.a), direct, "/healthz"), None);
}

/// A plain HTTP app answering every request with `status`.
fn serve_status(listener: TcpListener, status: Arc<AtomicU16>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && !line.ends_with("\r\n\r\n") {}
            let code = status.load(Ordering::SeqCst);
            let _ = write!(
                conn,
                "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
}

#[test]
fn injected_command_lines_are_accepted_without_root() {
    let pod = Injected::new();
    let dir = open_tempdir();
    let ca = CaProcess::start("cluster.local", &[(TOKEN, ID)]);
    let volumes = Volumes::new(&pod, dir.path(), &ca);

    let mut init = Injected::argv(&pod.init, "stepmesh", Path::new(BIN));
    init.push("--dry-run".into());
    let out = netns::check(Command::new(&init[0]).args(&init[1..]));
    let rules = String::from_utf8(out.stdout).unwrap();
    for rule in [
        "--dport 9090 -j RETURN",
        "--dport 5432 -j RETURN",
        "-d 169.254.169.254/32 -j RETURN",
        "--uid-owner 1337 -j RETURN",
        "--to-ports 15006",
        "--to-ports 15001",
    ] {
        assert!(rules.contains(rule), "{rule} missing:\n{rules}");
    }

    // Pinned ports and the cluster address moved to free local ones.
    let moved = |flag: &str| match flag {
        "--admin" => Some("127.0.0.1:0".to_owned()),
        "--inbound-port" | "--outbound-port" => Some("0".to_owned()),
        "--ca" => Some(ca.grpc_host_port()),
        _ => None,
    };
    let mut argv = Injected::argv(&pod.proxy, "stepmesh-proxy", Path::new(PROXY_BIN));
    for i in 1..argv.len() {
        if let Some(value) = moved(&argv[i - 1]) {
            argv[i] = value;
        }
        argv[i] = volumes.localize(&argv[i]);
    }
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let mut proxy = Proxy::spawn(cmd, &pod.proxy_env("127.0.0.1"));
    let admin = proxy.admin();
    let config = proxy.wait_ready(None, admin);
    assert_eq!(config["spiffe_id"], ID, "{config}");
    let listeners = config["listeners"].as_array().unwrap();
    let inbound: SocketAddr = listeners[0]["listen"].as_str().unwrap().parse().unwrap();
    let outbound: SocketAddr = listeners[1]["listen"].as_str().unwrap().parse().unwrap();
    assert_config(&config, inbound.port(), outbound.port());
}
