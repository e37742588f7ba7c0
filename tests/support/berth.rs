//! Starting berth in-process for a test: a config on `127.0.0.1:0`, a cache directory, the
//! server task and the admin listener (also on port 0), and graceful shutdown so a test can
//! restart berth on the same cache; or berth on a tokio runtime of its own, so a test can kill
//! it as a crash would (`start_on_own_runtime`, `kill`).
//!
//! Does not own: upstream registries or clients; tests wire those (usually a `Tap` in front of a
//! `Registry`) into the config they pass.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth::config::Config;
use berth::AppState;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Berth {
    pub addr: SocketAddr,
    /// The admin listener: `/metrics`, `/healthz`, `/readyz`, `/admin/...`.
    pub admin_addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// With `start_on_own_runtime`: the runtime every task of this berth runs on.
    own_runtime: Option<tokio::runtime::Runtime>,
}

/// A config with one upstream, `host` served from `endpoint`, which is also the default.
pub fn single_upstream_config(host: &str, endpoint: &str, cache_dir: &Path, extra: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
default_upstream = "{host}"
[cache]
dir = "{dir}"
{extra}
[[upstream]]
host = "{host}"
endpoint = "{endpoint}"
"#,
        dir = cache_dir.display()
    )
}

impl Berth {
    /// Starts berth on the given TOML config (its `listen` is ignored: berth binds port 0).
    pub async fn start(config_toml: &str) -> Berth {
        Berth::start_with_resolver(config_toml, berth::net::connect::system_resolver()).await
    }

    /// `start`, with upstream names resolved by `resolver`: how a test makes a name resolve
    /// to a loopback server (the address rule still judges the address).
    pub async fn start_with_resolver(
        config_toml: &str,
        resolver: berth::net::connect::Resolver,
    ) -> Berth {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Berth::start_on(listener, config_toml, resolver).await
    }

    /// `start_with_resolver` on a listener the test bound first: how replicas of one location
    /// learn each other's addresses before any of them starts.
    pub async fn start_on(
        listener: tokio::net::TcpListener,
        config_toml: &str,
        resolver: berth::net::connect::Resolver,
    ) -> Berth {
        let config = Config::from_toml(config_toml).expect("test config is valid");
        let state = AppState::open_with_resolver(config, resolver)
            .await
            .expect("berth starts");
        let addr = listener.local_addr().unwrap();
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin_listener.local_addr().unwrap();
        let (shutdown, signal) = oneshot::channel::<()>();
        let server_state = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let signal = async {
                let _ = signal.await;
            };
            let (admin_stop, admin_stopped) = oneshot::channel::<()>();
            let admin = tokio::spawn(berth::admin::run(
                admin_listener,
                Arc::clone(&server_state),
                async {
                    let _ = admin_stopped.await;
                },
            ));
            berth::server::run(listener, server_state, signal)
                .await
                .unwrap();
            let _ = admin_stop.send(());
            let _ = admin.await;
        });
        state.readiness.wait_serving().await;
        Berth {
            addr,
            admin_addr,
            state,
            shutdown: Some(shutdown),
            task: Some(task),
            own_runtime: None,
        }
    }

    /// `start_on`, with berth on a multi-thread tokio runtime of its own: its listeners, its
    /// connections, its fills and its background tasks all run there, so `kill` stops them all
    /// at once.
    pub async fn start_on_own_runtime(
        listener: tokio::net::TcpListener,
        config_toml: &str,
        resolver: berth::net::connect::Resolver,
    ) -> Berth {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("killable-berth")
            // Idle blocking threads stay, so a test summing these threads' CPU time
            // (`soak_hostile`) loses none to a thread that exited.
            .thread_keep_alive(Duration::from_secs(3600))
            .enable_all()
            .build()
            .expect("a runtime for berth");
        // The listener moves to the new runtime's reactor.
        let listener = listener.into_std().unwrap();
        let config = config_toml.to_owned();
        let start = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            Berth::start_on(listener, &config, resolver).await
        });
        let mut berth = start.await.expect("berth starts on its own runtime");
        berth.own_runtime = Some(runtime);
        berth
    }

    /// Kills a berth started with `start_on_own_runtime` as a crash would: its runtime is shut
    /// down without waiting, which drops every task at once (listeners closed, connections cut
    /// mid-body, fills abandoned). Nothing is drained and nothing is committed.
    pub fn kill(&mut self) {
        let runtime = self
            .own_runtime
            .take()
            .expect("only a berth on its own runtime can be killed");
        runtime.shutdown_background();
    }

    /// Starts berth with one upstream (the default) and the cache in `cache_dir`.
    pub async fn with_upstream(host: &str, endpoint: &str, cache_dir: &Path) -> Berth {
        Berth::start(&single_upstream_config(host, endpoint, cache_dir, "")).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// `host:port`, as image references through berth spell it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.state.config.cache.dir.clone()
    }

    /// Stops accepting and waits for connections to finish.
    pub async fn stop(mut self) {
        self.shutdown_now().await;
    }

    async fn shutdown_now(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // Dropping a runtime blocks, which an async test may not do; this does not.
        if let Some(runtime) = self.own_runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The `[cache]` and `[access]` tables of berth in the policy mode, with everything in `dir`:
/// the cache in `cache/`, principals in `principals.json`, policies in `policies/`. The
/// `[access]` table stays open, so a caller may add keys to it.
pub fn policy_mode_tables(dir: &Path) -> String {
    format!(
        "[cache]\ndir = \"{}\"\n[access]\nmode = \"policy\"\nprincipals = \"{}\"\npolicies = \"{}\"\n",
        dir.join("cache").display(),
        dir.join("principals.json").display(),
        dir.join("policies").display()
    )
}
