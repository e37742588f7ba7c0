//! A private podman: its own storage root (vfs, under a temp dir), its own containers.conf
//! (runc, cgroupfs, no default ulimits: this machine's sandbox refuses to raise them), its own
//! registries.conf and signature policy, so nothing on the host is read or changed.
//!
//! Nothing leaves the machine: podman runs with HTTP(S)_PROXY pointing at `Refuser`, which
//! answers every connection by closing it (Go never proxies loopback, so 127.0.0.1 is reached
//! directly).

use std::path::PathBuf;
use std::process::Command;

use tokio::net::TcpListener;

pub struct Podman {
    dir: tempfile::TempDir,
    refuser: Refuser,
}

const CONTAINERS_CONF: &str = r#"[containers]
default_ulimits = []
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"#;

const POLICY: &str = r#"{"default":[{"type":"insecureAcceptAnything"}]}"#;

impl Podman {
    /// A podman whose image lookups use `registries_conf`.
    pub async fn new(registries_conf: &str) -> Podman {
        let dir = tempfile::tempdir().expect("podman temp dir");
        let root = dir.path();
        let storage = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            root.join("graph").display(),
            root.join("run").display()
        );
        std::fs::write(root.join("storage.conf"), storage).unwrap();
        std::fs::write(root.join("containers.conf"), CONTAINERS_CONF).unwrap();
        std::fs::write(root.join("registries.conf"), registries_conf).unwrap();
        std::fs::write(root.join("policy.json"), POLICY).unwrap();
        std::fs::create_dir(root.join("tmp")).unwrap();
        std::fs::create_dir(root.join("home")).unwrap();
        Podman {
            dir,
            refuser: Refuser::start().await,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn policy(&self) -> PathBuf {
        self.path("policy.json")
    }

    /// `podman ARGS...` with the private configuration and a clean environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("podman");
        command
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", self.path("home"))
            .env("TMPDIR", self.path("tmp"))
            .env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.path("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            .envs(self.refuser.proxy_env())
            .args(["--root", &self.path("graph").display().to_string()])
            .args(["--runroot", &self.path("run").display().to_string()])
            .args(["--tmpdir", &self.path("libpod-tmp").display().to_string()])
            .args(args)
            .stdin(std::process::Stdio::null());
        command
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers hold mounts under the run root (/dev/shm); remove them before the temp dir.
        let _ = self
            .command(&["rm", "--all", "--force", "--time", "0"])
            .output();
    }
}

/// The internet's stand-in for a proxied client: accepts and closes every connection.
pub struct Refuser {
    url: String,
    accept: tokio::task::JoinHandle<()>,
}

impl Refuser {
    pub async fn start() -> Refuser {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind refuser");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        Refuser { url, accept }
    }

    pub fn proxy_env(&self) -> [(&'static str, &str); 5] {
        [
            ("HTTP_PROXY", self.url.as_str()),
            ("HTTPS_PROXY", self.url.as_str()),
            ("http_proxy", self.url.as_str()),
            ("https_proxy", self.url.as_str()),
            ("NO_PROXY", "127.0.0.1,localhost"),
        ]
    }
}

impl Drop for Refuser {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
