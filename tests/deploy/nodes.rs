//! `deploy/nodes/`: each shipped node config, with berth's address put in for `BERTH_ADDR`,
//! makes its real client pull through berth: containerd (`ctr --hosts-dir`), podman
//! (`registries.conf`) and dockerd (`daemon.json`).
//!
//! A registry on loopback stands in for every real one: berth (the binary, so its request log
//! can be read) has `docker.io`, `ghcr.io` and `registry.example.test` all pointing at it.
//! The clients would fall back to the real registries if berth failed them; that traffic goes
//! to a refusing stand-in (or nowhere: this machine has no internet), so a pull that succeeds
//! came through berth, and berth's log line for it says so.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::podman::{Podman, Refuser};
use super::support::{push_image, Auth, BerthProcess, Containerd, Flavor, Image, Registry};
use super::tools::{deploy, have, output_ok, with_address};

/// The loopback registry and berth in front of it, as every node test uses them.
struct Site {
    _registry: Registry,
    berth: BerthProcess,
    _work: tempfile::TempDir,
    /// `library/nodes:v1` (docker.io), `team/app:v1` (ghcr.io), `team/other:v1` (a registry
    /// only `_default` covers).
    images: [Image; 3],
}

impl Site {
    async fn start() -> Site {
        let registry = Registry::start(Auth::None).await;
        let images = [
            Image::random(Flavor::Docker, 1611, &[30_000]),
            Image::random(Flavor::Oci, 1612, &[20_000]),
            Image::random(Flavor::Oci, 1613, &[10_000]),
        ];
        for (repo, image) in ["library/nodes", "team/app", "team/other"]
            .iter()
            .zip(&images)
        {
            push_image(&registry.url(), repo, "v1", image, None)
                .await
                .unwrap();
        }
        let work = tempfile::tempdir().unwrap();
        let url = registry.url();
        let config = format!(
            "listen = \"127.0.0.1:0\"\ndefault_upstream = \"docker.io\"\n\
             [cache]\ndir = \"{}\"\n\
             [[upstream]]\nhost = \"docker.io\"\nendpoint = \"{url}\"\n\
             [[upstream]]\nhost = \"ghcr.io\"\nendpoint = \"{url}\"\n\
             [[upstream]]\nhost = \"registry.example.test\"\nendpoint = \"{url}\"\n",
            work.path().join("cache").display()
        );
        let berth = BerthProcess::start(&config, work.path());
        Site {
            _registry: registry,
            berth,
            _work: work,
            images,
        }
    }

    /// Waits for berth's request log line for a manifest `path` and returns it.
    fn logged(&mut self, path: &str) -> String {
        let line = self.berth.wait_line(&format!("path={path} "));
        assert!(line.contains("status=200"), "{line}");
        line
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_through_berth_with_the_shipped_hosts_toml() {
    if !have(
        "containerd_pulls_through_berth_with_the_shipped_hosts_toml",
        &["containerd", "ctr", "docker-registry"],
    ) {
        return;
    }
    let mut site = Site::start().await;
    let hosts = tempfile::tempdir().unwrap();
    let shipped = deploy("nodes/containerd");
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let registry = entry.unwrap().file_name();
        let dir = hosts.path().join(&registry);
        std::fs::create_dir(&dir).unwrap();
        let text = with_address(
            &shipped.join(&registry).join("hosts.toml"),
            &site.berth.addr,
        );
        std::fs::write(dir.join("hosts.toml"), text).unwrap();
    }
    let containerd = Containerd::start().await;
    for reference in [
        "docker.io/library/nodes:v1",
        "ghcr.io/team/app:v1",
        // No directory of its own: `_default`.
        "registry.example.test/team/other:v1",
    ] {
        containerd.pull_ok(reference, hosts.path(), &[]).await;
    }
    let images = containerd.images().await;
    for (name, image) in [
        "docker.io/library/nodes:v1",
        "ghcr.io/team/app:v1",
        "registry.example.test/team/other:v1",
    ]
    .iter()
    .zip(&site.images)
    {
        let pulled = images.iter().find(|i| i.name == *name);
        assert_eq!(
            pulled.map(|i| i.digest.as_str()),
            Some(image.digest()),
            "{images:?}"
        );
    }
    // Nothing fell back to the registries themselves.
    assert_eq!(containerd.escapes(), Vec::<String>::new());
    // containerd's ?ns= chose the upstream.
    let line = site.logged("/v2/library/nodes/manifests/v1");
    assert!(line.contains("upstream=\"docker.io\""), "{line}");
    let line = site.logged("/v2/team/app/manifests/v1");
    assert!(line.contains("upstream=\"ghcr.io\""), "{line}");
    let line = site.logged("/v2/team/other/manifests/v1");
    assert!(
        line.contains("upstream=\"registry.example.test\""),
        "{line}"
    );

    // berth down: containerd falls back to the registry's own `server`, so a node never needs
    // berth to pull (berth's own image included). Here that is the refusing stand-in.
    site.berth.kill9();
    let fetched = containerd
        .fetch("docker.io/library/berth:v1", hosts.path(), &[])
        .await;
    assert!(!fetched.status.success());
    let escapes = containerd.escapes();
    assert!(
        escapes
            .iter()
            .any(|e| e.contains("registry-1.docker.io:443")),
        "no fallback to docker.io's server: {escapes:?}"
    );
}

#[test]
fn every_shipped_hosts_toml_keeps_its_registry_as_the_fallback_server() {
    let shipped = deploy("nodes/containerd");
    let mut registries = Vec::new();
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let registry = entry.unwrap().file_name().into_string().unwrap();
        let text = with_address(&shipped.join(&registry).join("hosts.toml"), "10.0.0.1:5000");
        let hosts: toml::Table = toml::from_str(&text).unwrap();
        let server = hosts.get("server").and_then(toml::Value::as_str);
        let expected = match registry.as_str() {
            // containerd's own default for the fallback: https://<registry>.
            "_default" => None,
            "docker.io" => Some("https://registry-1.docker.io".to_string()),
            other => Some(format!("https://{other}")),
        };
        assert_eq!(server.map(str::to_string), expected, "{registry}");
        let mirror = &hosts["host"]["http://10.0.0.1:5000"];
        // Pull only: a push through berth is refused, and containerd must not try it there.
        assert_eq!(
            mirror["capabilities"],
            toml::Value::Array(vec!["pull".into(), "resolve".into()]),
            "{registry}"
        );
        registries.push(registry);
    }
    registries.sort();
    assert!(
        registries.len() >= 7 && registries[0] == "_default",
        "{registries:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn podman_pulls_by_original_name_through_berth_with_the_shipped_registries_conf() {
    let test = "podman_pulls_by_original_name_through_berth_with_the_shipped_registries_conf";
    if !have(test, &["podman", "docker-registry"]) {
        return;
    }
    let mut site = Site::start().await;
    let conf = with_address(&deploy("nodes/registries.conf"), &site.berth.addr);
    let podman = Podman::new(&conf).await;
    let policy = podman.policy().display().to_string();
    for reference in ["docker.io/library/nodes:v1", "ghcr.io/team/app:v1"] {
        output_ok(podman.command(&["pull", "--quiet", "--signature-policy", &policy, reference]))
            .await;
    }
    let listed =
        output_ok(podman.command(&["images", "--format", "{{.Repository}}:{{.Tag}}"])).await;
    let listed = String::from_utf8_lossy(&listed.stdout);
    for name in ["docker.io/library/nodes:v1", "ghcr.io/team/app:v1"] {
        assert!(
            listed.lines().any(|l| l == name),
            "{name} not in:\n{listed}"
        );
    }
    // The mirror location's path prefix chose the upstream.
    let line = site.logged("/v2/docker.io/library/nodes/manifests/v1");
    assert!(line.contains("upstream=\"docker.io\""), "{line}");
    let line = site.logged("/v2/ghcr.io/team/app/manifests/v1");
    assert!(line.contains("upstream=\"ghcr.io\""), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dockerd_pulls_docker_hub_images_through_berth_with_the_shipped_daemon_json() {
    let test = "dockerd_pulls_docker_hub_images_through_berth_with_the_shipped_daemon_json";
    if !have(
        test,
        &["dockerd", "docker", "containerd", "docker-registry"],
    ) {
        return;
    }
    let mut site = Site::start().await;
    let dockerd = Dockerd::start(&with_address(
        &deploy("nodes/daemon.json"),
        &site.berth.addr,
    ))
    .await;
    output_ok(dockerd.docker(&["pull", "--quiet", "docker.io/library/nodes:v1"])).await;
    let inspect = output_ok(dockerd.docker(&[
        "image",
        "inspect",
        "--format",
        "{{index .RepoDigests 0}}",
        "nodes:v1",
    ]))
    .await;
    let digest = String::from_utf8_lossy(&inspect.stdout);
    assert_eq!(digest.trim(), format!("nodes@{}", site.images[0].digest()));
    // Docker names no registry in the path: berth's default_upstream (docker.io) served it.
    let line = site.logged("/v2/library/nodes/manifests/v1");
    assert!(line.contains("upstream=\"docker.io\""), "{line}");
}

/// A private dockerd: its own socket, data root, exec root and pid file under a temp dir,
/// vfs storage, no bridge and no iptables, so it changes nothing on the host.
struct Dockerd {
    dir: tempfile::TempDir,
    child: Child,
    _refuser: Refuser,
}

/// dockerd starts its own containerd first; a loaded 2-core box gets slack.
const DOCKERD_BOOT: Duration = Duration::from_secs(60);

impl Dockerd {
    async fn start(daemon_json: &str) -> Dockerd {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("daemon.json"), daemon_json).unwrap();
        let refuser = Refuser::start().await;
        let socket = format!("unix://{}", root.join("docker.sock").display());
        let mut child = Command::new("dockerd")
            .arg("--config-file")
            .arg(root.join("daemon.json"))
            .args([
                "--storage-driver",
                "vfs",
                "--iptables=false",
                "--bridge=none",
            ])
            .args(["-H", &socket])
            .arg("--data-root")
            .arg(root.join("data"))
            .arg("--exec-root")
            .arg(root.join("exec"))
            .arg("--pidfile")
            .arg(root.join("docker.pid"))
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(refuser.proxy_env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dockerd (Debian package docker.io)");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut tail = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("API listen on") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
                tail.push(line);
            }
            if let Some(tx) = tx.take() {
                let _ = tx.send(Err(tail.join("\n")));
            }
        });
        let booted = tokio::task::spawn_blocking(move || rx.recv_timeout(DOCKERD_BOOT))
            .await
            .unwrap();
        let dockerd = Dockerd {
            dir,
            child,
            _refuser: refuser,
        };
        match booted {
            Ok(Ok(())) => dockerd,
            Ok(Err(log)) => panic!("dockerd exited before serving:\n{log}"),
            Err(_) => panic!("dockerd did not serve within {DOCKERD_BOOT:?}"),
        }
    }

    /// `docker -H unix://SOCK ARGS...` with a private config directory.
    fn docker(&self, args: &[&str]) -> Command {
        let root = self.dir.path();
        let mut command = Command::new("docker");
        command
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("DOCKER_CONFIG", root.join("client"))
            .arg("-H")
            .arg(format!("unix://{}", root.join("docker.sock").display()))
            .args(args)
            .stdin(Stdio::null());
        command
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: dockerd stops the containerd it started, which SIGKILL would
        // leave running.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}
