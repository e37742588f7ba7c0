//! The subcommands' bodies, for `main` to dispatch to: each reads its config through
//! `load_config` (the file or the embedded default, both checked the way start-up checks them)
//! and drives the library module it is about.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

use berth::config::{Config, LogFormat};

use crate::LoadArgs;

/// The config at `path` (the embedded default without one), with its name, after every check
/// `berth serve` makes before it binds: the plain ones and those needing domain knowledge.
fn load_config(path: Option<&Path>) -> anyhow::Result<(String, Config)> {
    let (source, config) = Config::load_or_default(path)?;
    berth::check_config(&config)?;
    Ok((source, config))
}

// `berth serve`'s arguments: the config and what the command line overrides in it.
#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides `listen` from the config.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Overrides `cache.dir` from the config.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Overrides `admin_listen` (metrics, health, admin API) from the config.
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (_, mut config) = load_config(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.cache_dir {
        config.cache.dir = dir;
    }
    if let Some(admin_listen) = args.admin_listen {
        config.admin_listen = admin_listen;
    }
    let _flush = init_logging(config.log_format);
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(serve_config(config))
}

pub fn resolve(config: Option<&Path>, references: &[String]) -> anyhow::Result<()> {
    let (_, config) = load_config(config)?;
    let upstreams = berth::upstream::Upstreams::new(&config)?;
    let mut failed = 0;
    for text in references {
        match berth::route::resolve_image_ref(&upstreams, text) {
            Ok((target, image)) => print_resolved(text, &target, &image),
            Err(err) => {
                failed += 1;
                println!("{text}\n  error:      {err}");
            }
        }
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} references did not resolve",
            references.len()
        );
    }
    Ok(())
}

// `berth warm`'s arguments.
#[derive(clap::Args)]
pub struct WarmArgs {
    /// The berth to warm.
    #[arg(long, default_value = "http://127.0.0.1:5000")]
    pub target: String,
    /// The platform to pull from multi-platform images.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: berth::oci::manifest::Platform,
    /// Blobs of one image fetched at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// A config to take `platform.org` (for `//image/...` references) and `[client]`
    /// settings (timeouts, `ca_file` for an https target) from.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Pull as this user (a principal of a berth in the policy access mode); the key is
    /// read from BERTH_WARM_PASSWORD, so it stays out of shell history and `ps`.
    #[arg(long)]
    pub user: Option<String>,
    #[arg(required = true)]
    pub references: Vec<String>,
}

pub fn warm(args: WarmArgs) -> anyhow::Result<()> {
    let (_, config) = load_config(args.config.as_deref())?;
    let credentials = match args.user {
        Some(username) => Some(berth::secrets::Credentials {
            username,
            password: berth::secret::Secret::new(
                std::env::var("BERTH_WARM_PASSWORD")
                    .context("--user needs the key in BERTH_WARM_PASSWORD")?,
            ),
            id: "warm".into(),
        }),
        None => None,
    };
    let options = berth::warm::Options {
        credentials,
        target: args.target,
        platform: args.platform,
        references: args.references,
        platform_config: config.platform,
        client: config.client,
        concurrency: args.concurrency,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let summary = runtime.block_on(berth::warm::warm(options))?;
    println!("{summary}");
    if !summary.failed.is_empty() {
        anyhow::bail!("{} image(s) failed to warm", summary.failed.len());
    }
    Ok(())
}

pub fn check_config(config: Option<&Path>) -> anyhow::Result<()> {
    let (source, config) = load_config(config)?;
    println!("# {source} is valid; effective configuration:\n{config:#?}");
    Ok(())
}

pub fn health(url: &str, timeout: std::time::Duration) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(berth::probe::check(url, timeout))?;
    Ok(())
}

pub fn access_report(config: Option<&Path>, json: bool, image: &str) -> anyhow::Result<()> {
    let (_, config) = load_config(config)?;
    let upstreams = berth::upstream::Upstreams::new(&config)?;
    let access = berth::access::Access::open(&config.access, &config.platform)
        .map_err(anyhow::Error::msg)?;
    let report = access.report(&upstreams, image)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

pub fn hash_key(generate: bool) -> anyhow::Result<()> {
    use berth::access::principals::{KeyHash, MIN_KEY_LEN};
    use std::io::BufRead as _;
    if generate {
        let key = berth::access::principals::generate_key();
        println!("key:  {key}");
        println!("hash: {}", KeyHash::generate(&key));
        return Ok(());
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the key from stdin")?;
    let key = line.trim_end_matches(['\r', '\n']);
    if key.len() < MIN_KEY_LEN {
        anyhow::bail!(
            "a key must be a random token of at least {MIN_KEY_LEN} characters (berth hash-key --generate makes one)"
        );
    }
    println!("{}", KeyHash::generate(key));
    Ok(())
}

fn print_resolved(
    text: &str,
    target: &berth::route::Target,
    image: &berth::oci::reference::ImageRef,
) {
    use berth::upstream::CredentialSource;
    let reference = &image.reference;
    let kind = if reference.digest().is_some() {
        "digest"
    } else {
        "tag"
    };
    let credentials = match target.upstream.credential_source(&target.repository) {
        CredentialSource::Anonymous => "anonymous".to_string(),
        CredentialSource::Configured { username } => format!("upstream username {username:?}"),
        CredentialSource::Secret(name) => format!("secret {name:?}"),
    };
    println!("{text}");
    println!("  upstream:   {}", target.upstream.name);
    println!("  endpoint:   {}", target.upstream.endpoint());
    println!("  repository: {}", target.repository);
    println!("  {:<11} {}", format!("{kind}:"), reference.as_str());
    if let Some(tag) = &image.pinned_tag {
        println!("  pinned tag: {tag} (shown only; the digest is pulled)");
    }
    println!("  secret:     {credentials}");
}

pub fn load(args: LoadArgs) -> anyhow::Result<()> {
    use berth::load::{ImageRef, Limit, LoadConfig};
    let images = args
        .images
        .iter()
        .map(|text| ImageRef::parse(text, None))
        .collect::<Result<Vec<_>, _>>()?;
    let limit = match (args.duration, args.count) {
        (Some(duration), _) => Limit::Duration(duration),
        (None, Some(count)) => Limit::Count(count),
        (None, None) => Limit::Count(args.concurrency as u64),
    };
    let credentials = match args.user {
        Some(username) => {
            let password = std::env::var("BERTH_LOAD_PASSWORD")
                .context("--user needs the password in BERTH_LOAD_PASSWORD")?;
            Some(berth::secrets::Credentials {
                username,
                password: berth::secret::Secret::new(password),
                id: "load".into(),
            })
        }
        None => None,
    };
    let config = LoadConfig {
        target: args.target,
        images,
        concurrency: args.concurrency,
        layer_concurrency: args.layer_concurrency,
        limit,
        platform: args.platform,
        request_timeout: args.timeout,
        metrics: args.metrics,
        credentials,
        ca_file: args.ca_file,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let report = runtime.block_on(berth::load::run(config))?;
    print!("{}", report.render());
    if report.total_errors() > 0 {
        anyhow::bail!("{} requests failed", report.total_errors());
    }
    Ok(())
}

async fn serve_config(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding listen address {}", config.listen))?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding admin_listen address {}", config.admin_listen))?;
    // The admin listener answers while the index is rebuilt: /readyz says "loading index".
    tracing::info!(admin = %admin_listener.local_addr()?, "loading the cache index");
    let (loaded, loading) = tokio::sync::oneshot::channel::<()>();
    let loading = tokio::spawn(berth::admin::serve_loading(admin_listener, async {
        let _ = loading.await;
    }));
    // A test seam, never set in production: the loading phase first waits to read this FIFO,
    // so a test sees the admin listener say "loading index" for exactly as long as it needs.
    if let Some(gate) = std::env::var_os("BERTH_TEST_LOADING_GATE") {
        let _ = tokio::task::spawn_blocking(move || std::fs::read(gate)).await;
    }
    let state = berth::AppState::open(config).await?;
    let _ = loaded.send(());
    let admin_listener = loading.await.context("admin listener task")?;
    tracing::info!(
        listen = %listener.local_addr()?,
        admin_listen = %admin_listener.local_addr()?,
        cache_dir = %state.config.cache.dir.display(),
        cached_objects = state.cache.index.len(),
        "berth is serving"
    );
    // The admin listener outlives the API's drain, so /readyz reports it and scrapes continue.
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(berth::admin::run(
        admin_listener,
        std::sync::Arc::clone(&state),
        async {
            let _ = admin_stopped.await;
        },
    ));
    berth::server::run(listener, state, shutdown_signal()).await?;
    let _ = admin_stop.send(());
    admin.await.context("admin listener task")??;
    tracing::info!("berth stopped");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

/// Installs the subscriber; the returned guard writes out queued lines when `serve` returns.
fn init_logging(format: LogFormat) -> berth::logs::Flush {
    let (logs, flush) = berth::logs::Logs::stderr();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal; log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if !ansi {
        logs.take_request_lines(match format {
            LogFormat::Json => berth::logs::Layout::Json,
            LogFormat::Text => berth::logs::Layout::Text,
        });
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(logs);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    flush
}
