//! A real upstream: the Debian `docker-registry` (distribution 2.8) as a child process on
//! 127.0.0.1, with filesystem storage and deletes enabled in a private temp dir.
//!
//! Owns: the registry's config file, its htpasswd file, its process (killed on drop) and the tail
//! of its log for failure messages. Learns its port from the registry's own
//! "listening on 127.0.0.1:NNNNN" log line after binding `127.0.0.1:0`, so no port is guessed.
//! Does not own: content (see `push`), faults a real registry cannot produce (see `tap`), or
//! the token server and its key (`token`): `Auth::Token` only renders the `auth.token` section
//! that trusts them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng as _;
use tokio::sync::oneshot;

use super::process::LogTail;

use super::client::{self, Creds};

/// How long the registry gets to bind and answer `GET /v2/`; it needs well under a second.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How the registry authenticates clients.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Anonymous pull and push.
    None,
    /// `auth.htpasswd`: every request needs these Basic credentials.
    Basic { user: String, password: String },
    /// `auth.token`: every request needs a bearer token from `realm`, signed by the key in
    /// `root_cert_pem`, issued by `issuer` for `service`. Made by `token::TokenServer::auth`.
    Token {
        realm: String,
        service: String,
        issuer: String,
        /// PEM certificate(s) for `rootcertbundle`; the registry trusts the keys inside.
        root_cert_pem: String,
    },
}

impl Auth {
    pub fn basic(user: &str, password: &str) -> Auth {
        Auth::Basic {
            user: user.to_owned(),
            password: password.to_owned(),
        }
    }

    /// The `auth:` section of the registry config, writing any file it refers to into `dir`.
    fn config_section(&self, dir: &Path) -> String {
        match self {
            Auth::None => String::new(),
            Auth::Basic { user, password } => {
                let path = dir.join("htpasswd");
                std::fs::write(&path, format!("{user}:{}\n", bcrypt_hash(password)))
                    .expect("write htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                    path.display()
                )
            }
            Auth::Token {
                realm,
                service,
                issuer,
                root_cert_pem,
            } => {
                let path = dir.join("token-root.pem");
                std::fs::write(&path, root_cert_pem).expect("write token root certificate");
                format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    \
                     issuer: {issuer}\n    rootcertbundle: {}\n",
                    path.display()
                )
            }
        }
    }
}

/// A running `docker-registry serve`, killed when dropped.
pub struct Registry {
    auth: Auth,
    /// Holds config, htpasswd and storage; outlives restarts so content survives them.
    dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Option<Child>,
    log: LogTail,
}

impl Registry {
    /// Starts a registry on a fresh port and waits until it answers `GET /v2/`.
    pub async fn start(auth: Auth) -> Registry {
        let dir = tempfile::tempdir().expect("registry temp dir");
        let log = LogTail::default();
        let (child, addr) = spawn(&auth, dir.path(), "127.0.0.1:0", &log).await;
        let registry = Registry {
            auth,
            dir,
            addr,
            child: Some(child),
            log,
        };
        registry.wait_ready().await;
        registry
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`, the host part of an image reference (`HOST/repo:tag`).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The Basic credentials this registry demands, if any (none for token auth: there the
    /// credentials belong to the token server's users).
    pub fn creds(&self) -> Creds<'_> {
        match &self.auth {
            Auth::None | Auth::Token { .. } => None,
            Auth::Basic { user, password } => Some((user.as_str(), password.as_str())),
        }
    }

    /// Where blobs and manifests live on disk, for tests that tamper behind the API's back.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The last log lines, for assertion messages.
    pub fn log_tail(&self) -> String {
        self.log.text()
    }

    /// Kills the registry (upstream down). Connections to its port are refused until `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL: an "upstream down" test wants the port dead now, not after a graceful drain.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the registry again on the same port with the same storage.
    pub async fn restart(&mut self) {
        self.stop();
        // Go listeners set SO_REUSEADDR, so the port rebinds despite TIME_WAIT connections.
        let listen = self.addr.to_string();
        let (child, addr) = spawn(&self.auth, self.dir.path(), &listen, &self.log).await;
        assert_eq!(addr, self.addr, "registry came back on another address");
        self.child = Some(child);
        self.wait_ready().await;
    }

    /// Polls `GET /v2/` until the registry answers (200, or 401 with auth on).
    async fn wait_ready(&self) {
        let url = format!("{}/v2/", self.url());
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            match client::get(&url, None).await {
                Ok(r) if r.status.is_success() || r.status == 401 => return,
                _ if tokio::time::Instant::now() >= deadline => panic!(
                    "registry at {} not ready after {READY_TIMEOUT:?}; log tail:\n{}",
                    self.addr,
                    self.log_tail()
                ),
                // Polling is bounded by the deadline; it orders nothing, it only waits for readiness.
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes the config, starts the process and returns it with the address it reports binding.
async fn spawn(auth: &Auth, dir: &Path, listen: &str, log: &LogTail) -> (Child, SocketAddr) {
    let config = dir.join("config.yml");
    std::fs::write(&config, config_yaml(auth, dir, listen)).expect("write registry config");
    let mut child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        // REGISTRY_* variables override the config file; a developer's shell must not leak in.
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn docker-registry (Debian package docker-registry)");
    let (tx, rx) = oneshot::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    let tail = log.clone();
    std::thread::spawn(move || tail.follow(stderr, listening_addr, tx));
    match tokio::time::timeout(READY_TIMEOUT, rx).await {
        Ok(Ok(addr)) => (child, addr),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "docker-registry did not report its address; log tail:\n{}",
                log.text()
            )
        }
    }
}

fn config_yaml(auth: &Auth, dir: &Path, listen: &str) -> String {
    // Info level is needed for the "listening on" line; the access log would double every line.
    // Upload purging is off so no background job touches the storage mid-test.
    format!(
        "version: 0.1\n\
         log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
         \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: {listen}\n  secret: berth-test-secret\n\
         {auth}",
        storage = dir.join("storage").display(),
        auth = auth.config_section(dir),
    )
}

/// A bcrypt hash for htpasswd: distribution accepts only bcrypt entries there.
///
/// Uses Perl's `crypt`, which is glibc's libxcrypt and knows `$2b$`; perl-base is Essential in
/// Debian, so this needs no package and no new crate. Cost 4 (the minimum) because the registry
/// verifies the hash on every request.
fn bcrypt_hash(password: &str) -> String {
    const ALPHABET: &[u8] = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let mut salt: String = (0..21)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    // The 22nd salt character carries only 2 bits; these four leave the unused bits zero.
    salt.push(b".Oeu"[rng.random_range(0..4)] as char);
    let out = Command::new("perl")
        .args(["-e", "print crypt($ARGV[0], $ARGV[1])", password])
        .arg(format!("$2b$04${salt}"))
        .output()
        .expect("run perl for bcrypt");
    let hash = String::from_utf8(out.stdout).expect("crypt output is ASCII");
    assert!(
        hash.starts_with("$2b$04$") && hash.len() == 60,
        "libcrypt has no bcrypt support: got {hash:?}"
    );
    hash
}

/// Parses distribution's `msg="listening on 127.0.0.1:40187"` (registry.go logs `ln.Addr()`,
/// the bound address, so port 0 comes back resolved).
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let end = rest.find(|c: char| c == '"' || c.is_whitespace());
    rest[..end.unwrap_or(rest.len())].parse().ok()
}
