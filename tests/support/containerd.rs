//! A real containerd client: Debian's `containerd` (1.6) as a private child process, and `ctr`
//! pulling through a `hosts.toml` mirror, the way a Kubernetes node reaches berth.
//!
//! Owns: containerd's config, root, state, temp dir and sockets (all in one temp dir, so nothing
//! under /var/lib, /run or /opt is touched), its process (killed on drop) and log, the `ctr`
//! invocations, and the registry hosts directory (`HostsDir`) that `ctr --hosts-dir` reads.
//! Does not own: what is pulled (see `push`) or the registry it comes from.
//!
//! Who does what in a pull: `ctr images pull` resolves and fetches in the `ctr` process itself
//! (it reads `--hosts-dir` and makes every HTTP request), streaming content into the daemon's
//! content store over gRPC; the daemon then unpacks layers into its snapshotter. Unpacking
//! mounts (overlayfs here; the VM runs tests as root, so it works), which is why `pull` unpacks
//! by default and `fetch` (`ctr content fetch`: the same requests, no unpack, no mounts) exists
//! for tests that only care about the registry traffic.
//!
//! A mirror entry in `hosts.toml` makes containerd add `?ns=<registry name>` to every request it
//! sends to that mirror (containerd 1.6 `remotes/docker`), which is how berth learns the upstream.
//!
//! Nothing leaves the machine: `ctr` and the daemon run with `HTTP(S)_PROXY` pointing at an
//! in-process stand-in for the internet that refuses everything (Go never proxies loopback, so
//! berth, taps and registries on 127.0.0.1 are reached directly). A fallback from a failing
//! mirror to `https://<registry>` therefore costs no DNS lookup and shows up in
//! `Containerd::escapes` instead.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::process::LogTail;
use tokio::task::JoinHandle;

use super::client::{basic_auth, Creds};

/// containerd boots in well under a second; a loaded 2-core CI box gets slack.
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
/// The containerd namespace every test uses; images live per namespace.
pub const NAMESPACE: &str = "test";

/// Plugins that would fail, skip noisily, need kernel support or the network, or write outside
/// our directories: CRI (needs CNI and would pull a sandbox image), the snapshotters that need a
/// particular filesystem, and `opt`, which creates /opt/containerd.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
];

/// A running `containerd`, killed when dropped.
pub struct Containerd {
    /// Config, root, state, sockets and log; removed after the process is gone.
    dir: tempfile::TempDir,
    child: Option<Child>,
    log: LogTail,
    /// Where every request for a non-loopback address goes instead of the network.
    outside: Outside,
}

/// An image as `ctr images ls` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtrImage {
    pub name: String,
    /// The target descriptor's media type (manifest or index).
    pub media_type: String,
    /// The target descriptor's digest: the manifest or index digest that was resolved.
    pub digest: String,
}

impl Containerd {
    /// Starts containerd with a private config and waits until it reports it has booted.
    pub async fn start() -> Containerd {
        let outside = Outside::start().await;
        let dir = tempfile::tempdir().expect("containerd temp dir");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml(dir.path())).expect("write containerd config");
        std::fs::create_dir(dir.path().join("tmp")).expect("containerd tmp dir");
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            // No proxy, CONTAINERD_* or XDG variable from a developer's shell may leak in.
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("TMPDIR", dir.path().join("tmp"))
            .envs(outside.proxy_env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn containerd (Debian package containerd)");
        let log = LogTail::default();
        let (tx, rx) = oneshot::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let tail = log.clone();
        std::thread::spawn(move || {
            let booted = |line: &str| {
                line.contains("containerd successfully booted")
                    .then_some(())
            };
            tail.follow(stderr, booted, tx)
        });
        let containerd = Containerd {
            dir,
            child: Some(child),
            log,
            outside,
        };
        if !matches!(tokio::time::timeout(BOOT_TIMEOUT, rx).await, Ok(Ok(()))) {
            panic!(
                "containerd did not boot within {BOOT_TIMEOUT:?}; log tail:\n{}",
                containerd.log_tail()
            );
        }
        containerd
    }

    /// The gRPC socket, for `ctr --address`.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// Requests that tried to leave the machine (`CONNECT mirror.test:443`, `GET http://...`),
    /// in arrival order: a `hosts.toml` fallback to the registry itself, or a malformed
    /// `hosts.toml`, which containerd ignores. Each was refused with 403, without DNS.
    pub fn escapes(&self) -> Vec<String> {
        self.outside.seen.lock().unwrap().clone()
    }

    /// The last lines containerd logged, for assertion messages.
    pub fn log_tail(&self) -> String {
        self.log.text()
    }

    /// Runs `ctr --address SOCK --namespace test ARGS...` with a clean environment.
    pub async fn ctr(&self, args: &[&str]) -> Output {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", NAMESPACE])
            .args(args)
            // ctr honours HTTP(S)_PROXY and CONTAINERD_* variables; none may leak in.
            .env_clear()
            .env("TMPDIR", self.dir.path().join("tmp"))
            .envs(self.outside.proxy_env())
            .stdin(Stdio::null());
        tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("ctr thread")
            .expect("run ctr (Debian package containerd)")
    }

    /// `ctr images pull --hosts-dir HOSTS EXTRA... REFERENCE`: fetches and unpacks. `extra_args`
    /// are e.g. `["--platform", "linux/arm64"]`, `["--all-platforms"]`, `["--user", "u:p"]`;
    /// a mirror in `hosts_dir` speaks plain HTTP by its `http://` URL, without `--plain-http`.
    pub async fn pull(&self, reference: &str, hosts_dir: &Path, extra_args: &[&str]) -> Output {
        self.ctr_through(["images", "pull"], reference, hosts_dir, extra_args)
            .await
    }

    /// `ctr COMMAND --hosts-dir HOSTS EXTRA... REFERENCE`.
    async fn ctr_through(
        &self,
        command: [&str; 2],
        reference: &str,
        hosts_dir: &Path,
        extra_args: &[&str],
    ) -> Output {
        let hosts = hosts_dir.to_str().expect("UTF-8 hosts dir");
        let mut args = vec![command[0], command[1], "--hosts-dir", hosts];
        args.extend_from_slice(extra_args);
        args.push(reference);
        self.ctr(&args).await
    }

    /// `pull`, failing the test with ctr's output and containerd's log unless it succeeds.
    pub async fn pull_ok(&self, reference: &str, hosts_dir: &Path, extra_args: &[&str]) {
        let output = self.pull(reference, hosts_dir, extra_args).await;
        self.assert_ok("images pull", &output);
    }

    /// `ctr content fetch --hosts-dir HOSTS EXTRA... REFERENCE`: the same resolution and the
    /// same blob requests as `pull` (for the default platform), without unpacking.
    pub async fn fetch(&self, reference: &str, hosts_dir: &Path, extra_args: &[&str]) -> Output {
        self.ctr_through(["content", "fetch"], reference, hosts_dir, extra_args)
            .await
    }

    /// Every image in the namespace, from `ctr images ls`.
    pub async fn images(&self) -> Vec<CtrImage> {
        let output = self.ctr(&["images", "ls"]).await;
        self.assert_ok("images ls", &output);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .skip(1)
            .filter_map(|line| {
                // REF TYPE DIGEST SIZE PLATFORMS LABELS; SIZE has a space in it, so only the
                // first three columns are read.
                let mut columns = line.split_whitespace();
                Some(CtrImage {
                    name: columns.next()?.to_owned(),
                    media_type: columns.next()?.to_owned(),
                    digest: columns.next()?.to_owned(),
                })
            })
            .collect()
    }

    /// The digests in the content store (`ctr content ls -q`), sorted.
    pub async fn content(&self) -> Vec<String> {
        let output = self.ctr(&["content", "ls", "-q"]).await;
        self.assert_ok("content ls", &output);
        let mut digests: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        digests.sort();
        digests
    }

    /// A blob's bytes from the content store, or `None` if it is not there.
    pub async fn blob(&self, digest: &str) -> Option<Vec<u8>> {
        let output = self.ctr(&["content", "get", digest]).await;
        output.status.success().then_some(output.stdout)
    }

    /// Removes an image and waits for garbage collection to delete the content only it held,
    /// so the next pull of it goes to the registry again.
    pub async fn remove(&self, reference: &str) {
        let output = self.ctr(&["images", "rm", "--sync", reference]).await;
        self.assert_ok("images rm", &output);
    }

    fn assert_ok(&self, what: &str, output: &Output) {
        assert!(
            output.status.success(),
            "ctr {what} failed ({}):\nstdout:\n{}\nstderr:\n{}\ncontainerd log tail:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log_tail()
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.outside.accept.abort();
        if let Some(mut child) = self.child.take() {
            // SIGKILL is safe: nothing stays mounted between operations (unpack mounts are
            // temporary), so the temp dir can be removed right after.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn config_toml(dir: &Path) -> String {
    let disabled: Vec<String> = DISABLED_PLUGINS.iter().map(|p| format!("{p:?}")).collect();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
temp = "{tmp}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  level = "info"

[metrics]
  address = ""
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        tmp = dir.join("tmp").display(),
        sock = dir.join("containerd.sock").display(),
        disabled = disabled.join(", "),
    )
}

/// A registry hosts directory for `ctr --hosts-dir` (containerd's `hosts.toml` format,
/// docs/hosts.md): one `<registry name>/hosts.toml` per registry that should be reached some
/// other way than `https://<registry name>`.
pub struct HostsDir {
    dir: tempfile::TempDir,
}

impl Default for HostsDir {
    fn default() -> Self {
        HostsDir::new()
    }
}

impl HostsDir {
    pub fn new() -> HostsDir {
        HostsDir {
            dir: tempfile::tempdir().expect("hosts dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Routes pulls of `registry` (`docker.io`, `mirror.test`, `HOST:PORT`) to `mirror_url`
    /// (`http://127.0.0.1:PORT`: berth or a `Tap`), with Basic credentials if given: a
    /// `[host."URL"]` entry with `capabilities = ["pull", "resolve"]`, as a node's config has.
    ///
    /// Like a node's config it names no `server`, so the registry itself stays the fallback:
    /// containerd tries `https://<registry>` after the mirror answers 404 or cannot be reached
    /// (not after a 5xx, which fails the pull). Under `Containerd` that fallback reaches only
    /// the stand-in behind `Containerd::escapes`.
    pub fn mirror(&self, registry: &str, mirror_url: &str, creds: Creds<'_>) {
        self.write(registry, &hosts_toml(mirror_url, creds));
    }

    /// Writes `<registry>/hosts.toml` verbatim, for tests that need another shape. containerd
    /// 1.6 rejects a file without a `[host]` table ("invalid `host` tree") and then ignores it,
    /// going straight to `https://<registry>`.
    pub fn write(&self, registry: &str, hosts_toml: &str) {
        let dir = self.dir.path().join(registry);
        std::fs::create_dir_all(&dir).expect("create hosts.toml dir");
        std::fs::write(dir.join("hosts.toml"), hosts_toml).expect("write hosts.toml");
    }
}

/// A mirror entry that may pull and resolve tags (without `resolve` containerd asks a mirror
/// for digests only). `skip_verify` only matters for an `https://` mirror with a test cert.
fn hosts_toml(mirror_url: &str, creds: Creds<'_>) -> String {
    let mut toml = format!("[host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
    if mirror_url.starts_with("https://") {
        toml.push_str("  skip_verify = true\n");
    }
    if let Some((user, password)) = creds {
        let value = basic_auth(user, password);
        let value = value.to_str().expect("base64 is ASCII");
        toml.push_str(&format!(
            "  [host.\"{mirror_url}\".header]\n    Authorization = [\"{value}\"]\n"
        ));
    }
    toml
}

/// A stand-in for the internet: `ctr` and containerd get it as `HTTP_PROXY`/`HTTPS_PROXY`, so
/// a request for any host but loopback (Go never proxies loopback) arrives here instead of
/// being resolved and sent. It answers 403 and records the request line.
struct Outside {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
    accept: JoinHandle<()>,
}

impl Outside {
    async fn start() -> Outside {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind outside");
        let url = format!("http://{}", listener.local_addr().expect("outside address"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut head = vec![0; 4096];
                    let n = stream.read(&mut head).await.unwrap_or(0);
                    let text = String::from_utf8_lossy(&head[..n]);
                    let line = text.lines().next().unwrap_or_default().to_owned();
                    log.lock().unwrap().push(line);
                    let refusal =
                        "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                    let _ = stream.write_all(refusal.as_bytes()).await;
                });
            }
        });
        Outside { url, seen, accept }
    }

    fn proxy_env(&self) -> [(&'static str, &str); 4] {
        [
            ("HTTP_PROXY", self.url.as_str()),
            ("HTTPS_PROXY", self.url.as_str()),
            ("http_proxy", self.url.as_str()),
            ("https_proxy", self.url.as_str()),
        ]
    }
}
