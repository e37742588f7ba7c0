//! `berth health` and `berth check-config`, run as the binary an image or a unit runs.

use std::process::Command;

use super::support::{Auth, Berth, Registry};
use super::tools::{berth_binary, output};

#[tokio::test]
async fn health_exits_0_when_healthz_answers_200_and_1_otherwise() {
    let cache = tempfile::tempdir().unwrap();
    let registry = Registry::start(Auth::None).await;
    let berth = Berth::with_upstream("docker.io", &registry.url(), cache.path()).await;

    let healthz = format!("{}/healthz", berth.admin_url());
    let ok = output(health(&healthz)).await;
    assert!(ok.status.success(), "{ok:?}");

    // The API listener has no /healthz: 404, exit 1, and the reason on stderr.
    let wrong = format!("{}/healthz", berth.url());
    let refused = output(health(&wrong)).await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("answered 404"),
        "{refused:?}"
    );

    // Nothing listening any more: exit 1, naming the URL.
    let admin = berth.admin_url();
    berth.stop().await;
    let down = output(health(&format!("{admin}/healthz"))).await;
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("no answer from"),
        "{down:?}"
    );
}

fn health(url: &str) -> Command {
    let mut command = Command::new(berth_binary());
    command.args(["health", "--url", url, "--timeout", "10s"]);
    command
}

fn check_config(path: &std::path::Path) -> Command {
    let mut command = Command::new(berth_binary());
    command.arg("check-config").arg("--config").arg(path);
    command
}

#[tokio::test]
async fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    std::fs::write(
        &path,
        "admin_token = \"admin-token-0123456789-SECRET\"\n\
         [cache]\nmax_size = \"2GiB\"\n\
         [access]\ntoken_key = \"token-key-0123456789abcdef0123456789-SECRET\"\n\
         [[upstream]]\nhost = \"ghcr.io\"\nusername = \"bot\"\npassword = \"hunter2-SECRET\"\n",
    )
    .unwrap();
    let checked = output(check_config(&path)).await;
    assert!(checked.status.success(), "{checked:?}");
    let printed = String::from_utf8_lossy(&checked.stdout);
    assert!(
        !printed.contains("SECRET"),
        "a secret was printed:\n{printed}"
    );
    assert_eq!(printed.matches("<redacted>").count(), 3, "{printed}");
    // Effective: the file's values and the defaults it left out.
    assert!(printed.contains("max_size: 2147483648"), "{printed}");
    assert!(printed.contains("shutdown_grace: 30s"), "{printed}");
    assert!(printed.contains("\"ghcr.io\""), "{printed}");

    let embedded = output({
        let mut command = Command::new(berth_binary());
        command.arg("check-config");
        command
    })
    .await;
    assert!(embedded.status.success(), "{embedded:?}");
    assert!(String::from_utf8_lossy(&embedded.stdout).contains("registry-1.docker.io"));
}

#[tokio::test]
async fn check_config_exits_1_naming_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[limits]\nshutdown_grace = \"soon\"\n", "shutdown_grace"),
        ("default_upstream = \"nowhere.io\"\n", "default_upstream"),
        ("[cache]\nmax_size = 0\n", "cache.max_size"),
        // What start-up refuses in `[cluster]` (`Cluster::from_config`), refused here too.
        (
            "[cluster]\npeers = [\"http://10.0.0.1:5000\"]\nself = \"http://10.0.0.2:5000\"\ntoken_file = \"/t\"\n",
            "cluster.self",
        ),
        (
            "[cluster]\npeers = [\"http://10.0.0.1:5000\"]\nself = \"http://10.0.0.1:5000\"\n",
            "cluster.token_file",
        ),
        ("[cluster]\npeer_fill_share = 101\nparent = \"https://p.example\"\n", "cluster.peer_fill_share"),
        ("[cluster]\ndns = \"berth\"\nself_ip_env = \"POD_IP\"\nresolver = \"dns\"\ntoken_file = \"/t\"\n", "cluster.resolver"),
        // A parent key over plain http to a host that may be anywhere would go in clear.
        (
            "[cluster]\nparent = \"http://berth.eu-west.example.com\"\nparent_key_file = \"/k\"\n",
            "cluster.parent",
        ),
    ];
    for (text, key) in cases {
        let path = dir.path().join("berth.toml");
        std::fs::write(&path, text).unwrap();
        let checked = output(check_config(&path)).await;
        assert_eq!(checked.status.code(), Some(1), "{text}: {checked:?}");
        let stderr = String::from_utf8_lossy(&checked.stderr);
        assert!(
            stderr.contains(key),
            "{text}: error should name {key}: {stderr}"
        );
        assert!(checked.stdout.is_empty(), "{text}: printed a config anyway");
    }
    let missing = output(check_config(&dir.path().join("absent.toml"))).await;
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
}
