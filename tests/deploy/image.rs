//! `deploy/Dockerfile`: hadolint passes on it, and its runtime stage, built by podman around
//! the binary this test run built, runs with a read-only root filesystem and serves a pull.
//!
//! No base image can be downloaded here, so the test makes one the way distroless is made:
//! the shared libraries `ldd` names for the binary, `/etc/passwd` with the `nonroot` user
//! (65532) and nothing else: no shell, so `HEALTHCHECK` and the probe must work without one.
//! The build stage (rustc in a rust image) is not built here: it needs that image.

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use super::podman::Podman;
use super::support::image::append;
use super::support::process::{stderr_lines, wait_line};
use super::support::{push_image, read_oci_layout, skopeo_copy_ok, Auth, Flavor, Image, Registry};
use super::tools::{assert_ok, berth_binary, deploy, have, output, output_ok, tool};

const IMAGE: &str = "localhost/berth:test";
const BASE: &str = "localhost/berth-test-base:latest";
const SOURCE: &str = "https://example.test/berth.git";
/// How long the container gets to log that it serves (it needs well under a second).
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn hadolint_passes_on_the_dockerfile() {
    if !have("hadolint_passes_on_the_dockerfile", &["hadolint"]) {
        return;
    }
    let output = tool("hadolint")
        .arg(deploy("Dockerfile"))
        .output()
        .expect("run hadolint");
    assert_ok("hadolint deploy/Dockerfile", &output);
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_image_serves_pulls_from_a_read_only_root_as_nonroot() {
    let test = "runtime_image_serves_pulls_from_a_read_only_root_as_nonroot";
    if !have(
        test,
        &[
            "podman",
            "runc",
            "conmon",
            "skopeo",
            "docker-registry",
            "ldd",
        ],
    ) {
        return;
    }
    let podman = Podman::new("").await;
    import_base_image(&podman).await;
    build_runtime_stage(&podman).await;
    check_image_config(&podman).await;

    let registry = Registry::start(Auth::None).await;
    let image = Image::random(Flavor::Oci, 1601, &[40_000, 9_000]);
    push_image(&registry.url(), "library/app", "v1", &image, None)
        .await
        .unwrap();
    let config_dir = podman.path("etc-berth");
    std::fs::create_dir(&config_dir).unwrap();
    std::fs::write(
        config_dir.join("berth.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             default_upstream = \"docker.io\"\n[cache]\ndir = \"/var/cache/berth\"\n\
             [[upstream]]\nhost = \"docker.io\"\nendpoint = \"{}\"\n",
            registry.url()
        ),
    )
    .unwrap();

    let mut container = Container::run(&podman, &config_dir);
    let serving = container.wait_line("berth is serving");
    let listen = field(&serving, "listen=");
    let admin = field(&serving, "admin_listen=");

    // A pull through the container. The miss is filled into /var/cache/berth, the only
    // writable path: an anonymous volume podman made from the image's VOLUME, owned by
    // 65532 because the image's directory is, so berth (65532, no capabilities) can write.
    let layout = tempfile::tempdir().unwrap();
    skopeo_copy_ok(&format!("{listen}/library/app:v1"), layout.path(), &[]).await;
    let pulled = read_oci_layout(layout.path()).unwrap();
    assert_eq!(pulled.manifest_digest, image.digest());
    let request = container.wait_line("/v2/library/app/blobs/");
    assert!(request.contains("status=200"), "{request}");

    // The health probe inside the image: 0 on /healthz, 1 with the reason on anything else.
    let url = format!("http://{admin}/healthz");
    let healthy =
        output(podman.command(&["exec", "berth-test", "berth", "health", "--url", &url])).await;
    assert_ok("berth health in the container", &healthy);
    let wrong = format!("http://{listen}/healthz");
    let sick =
        output(podman.command(&["exec", "berth-test", "berth", "health", "--url", &wrong])).await;
    assert_eq!(sick.status.code(), Some(1), "{sick:?}");
    assert!(
        String::from_utf8_lossy(&sick.stderr).contains("answered 404"),
        "{sick:?}"
    );

    // SIGTERM to PID 1 (berth itself: no shell, no init) drains and exits 0.
    output_ok(podman.command(&["stop", "--time", "30", "berth-test"])).await;
    let status = container.wait();
    assert!(status.success(), "container exited with {status}");
}

/// `podman import` of a rootfs tarball: the binary's shared libraries (as `ldd` lists them),
/// /etc/passwd and /etc/group with `nonroot` (65532), /tmp and /var/cache.
async fn import_base_image(podman: &Podman) {
    let ldd = output_ok({
        let mut command = Command::new("ldd");
        command.arg(berth_binary());
        command
    })
    .await;
    let libraries: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
        .map(str::to_owned)
        .collect();
    assert!(
        libraries.iter().any(|l| l.contains("libc.so")),
        "ldd names no libc: {libraries:?}"
    );
    let mut tar = tar::Builder::new(Vec::new());
    let mut dirs = vec![
        "etc".to_string(),
        "tmp".to_string(),
        "var/cache".to_string(),
    ];
    for library in &libraries {
        let path = std::path::Path::new(library.trim_start_matches('/'));
        let mut parent = path.parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.push(dir.display().to_string());
            parent = dir.parent();
        }
    }
    dirs.sort();
    dirs.dedup();
    for dir in &dirs {
        let mode = if dir == "tmp" { 0o1777 } else { 0o755 };
        append(
            &mut tar,
            tar::EntryType::Directory,
            &format!("{dir}/"),
            mode,
            &[],
        );
    }
    for library in &libraries {
        // Symlinks (ld-linux in /lib64) are followed: the image holds the file at that path.
        let bytes = std::fs::read(library).unwrap_or_else(|e| panic!("read {library}: {e}"));
        append(
            &mut tar,
            tar::EntryType::Regular,
            library.trim_start_matches('/'),
            0o755,
            &bytes,
        );
    }
    let passwd = b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
    append(
        &mut tar,
        tar::EntryType::Regular,
        "etc/passwd",
        0o644,
        passwd,
    );
    append(
        &mut tar,
        tar::EntryType::Regular,
        "etc/group",
        0o644,
        b"root:x:0:\nnonroot:x:65532:\n",
    );
    let tarball = podman.path("base.tar");
    std::fs::write(&tarball, tar.into_inner().unwrap()).unwrap();
    let tarball = tarball.display().to_string();
    output_ok(podman.command(&["import", "--quiet", &tarball, BASE])).await;
}

/// `podman build --target runtime-prebuilt` with a context holding only the binary.
async fn build_runtime_stage(podman: &Podman) {
    let context = podman.path("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::copy(berth_binary(), context.join("berth")).unwrap();
    let dockerfile = deploy("Dockerfile").display().to_string();
    let policy = podman.policy().display().to_string();
    let context = context.display().to_string();
    output_ok(podman.command(&[
        "build",
        "--quiet",
        "--format",
        "docker",
        "--pull=never",
        "--signature-policy",
        &policy,
        "--target",
        "runtime-prebuilt",
        "--build-arg",
        &format!("RUNTIME_BASE={BASE}"),
        "--build-arg",
        &format!("SOURCE={SOURCE}"),
        "--file",
        &dockerfile,
        "--tag",
        IMAGE,
        &context,
    ]))
    .await;
}

/// The image's metadata as the Dockerfile promises it.
async fn check_image_config(podman: &Podman) {
    let inspect = output_ok(podman.command(&["image", "inspect", IMAGE])).await;
    let inspected: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let config = &inspected[0]["Config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["berth"]),
        "{config}"
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!([
            "serve",
            "--cache-dir",
            "/var/cache/berth",
            "--admin-listen",
            "0.0.0.0:9090"
        ]),
    );
    assert!(
        config["Volumes"].get("/var/cache/berth").is_some(),
        "{config}"
    );
    for port in ["5000/tcp", "9090/tcp"] {
        assert!(
            config["ExposedPorts"].get(port).is_some(),
            "{port}: {config}"
        );
    }
    let labels = &config["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        labels["org.opencontainers.image.licenses"],
        env!("CARGO_PKG_LICENSE")
    );
    assert_eq!(labels["org.opencontainers.image.source"], SOURCE);
    // Kept only because the image is in the docker format (`--format docker`).
    let health = &inspected[0]["Healthcheck"];
    assert_eq!(
        health["Test"],
        serde_json::json!(["CMD", "berth", "health"]),
        "{inspected}"
    );
}

/// `podman run` of the image, attached, its log lines readable; removed when dropped.
struct Container {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Container {
    fn run(podman: &Podman, config_dir: &std::path::Path) -> Container {
        let mount = format!("{}:/etc/berth:ro", config_dir.display());
        let mut child = podman
            .command(&[
                "run",
                "--name",
                "berth-test",
                "--runtime",
                "runc",
                "--net",
                "host",
                "--read-only",
                "--no-healthcheck",
                "--volume",
                &mount,
                IMAGE,
                "serve",
                "--config",
                "/etc/berth/berth.toml",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn podman run");
        let lines = stderr_lines(&mut child);
        Container { child, lines }
    }

    /// Blocks until the container logs a line containing `needle`.
    fn wait_line(&mut self, needle: &str) -> String {
        wait_line(&self.lines, needle, START_TIMEOUT, "the container")
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait for podman run")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value after `name` in a log line: `listen=127.0.0.1:5000 ...`.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
}
