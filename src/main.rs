//! The `berth` command: parse the command line, load the config, bind, run. Everything else
//! lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use berth::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "A pull-through caching edge proxy for container images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry API (the embedded default config if no --config is given).
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides `listen` from the config.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Overrides `cache.dir` from the config.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Overrides `admin_listen` (metrics, health, admin API) from the config.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Show where image references go: upstream, endpoint, repository, tag or digest, and the
    /// credentials a pull would use. Any reference form: `nginx:latest`, `ghcr.io/o/a@sha256:..`,
    /// pinned `nginx:1.27@sha256:..` (the digest wins),
    /// `//image/app:v1`, `/org/ORG/image/app:v1`.
    Resolve {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Pre-pull images through a running berth (manifest, the platform's image of an index,
    /// config, every layer), with progress, so a location has them before its pods start.
    Warm {
        /// The berth to warm.
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        target: String,
        /// The platform to pull from multi-platform images.
        #[arg(long, default_value = "linux/amd64")]
        platform: berth::warm::Platform,
        /// Blobs of one image fetched at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// A config to take `platform.org` (for `//image/...` references) and `[client]`
        /// settings (timeouts, `ca_file` for an https target) from.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Pull as this user (a principal of a berth in the policy access mode); the key is
        /// read from BERTH_WARM_PASSWORD, so it stays out of shell history and `ps`.
        #[arg(long)]
        user: Option<String>,
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Validate a config (the embedded default without --config) and print the effective
    /// configuration, defaults filled in and secrets redacted; exit 1 naming the bad key.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Exit 0 when a berth's `/healthz` answers 200, else 1: a HEALTHCHECK or exec probe that
    /// needs no shell or curl in the image.
    Health {
        #[arg(long, default_value = berth::probe::DEFAULT_URL)]
        url: String,
        /// Give up after this long, connecting included.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        timeout: std::time::Duration,
    },
    /// Print the hash of a key for the principals file. The key is read from stdin (one line),
    /// so it stays out of shell history and `ps`.
    HashKey {
        /// Make a new random key instead, and print it with its hash.
        #[arg(long)]
        generate: bool,
    },
    /// List the principals with permissions on an image: each permission, the policy that
    /// grants it, directly or through a group, and which permissions are implied.
    AccessReport {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The image, in any reference form (`//image/app:v1`, `nginx:1.27`, `ghcr.io/o/a:v1`).
        image: String,
    },
    /// Pull whole images (manifest, index child, config, layers) with N concurrent pullers,
    /// verifying every digest, and report throughput and p50/p90/p99 per request class.
    Load(LoadArgs),
}

#[derive(clap::Args)]
struct LoadArgs {
    /// Registry to pull from, e.g. http://127.0.0.1:5000 (berth or any registry).
    #[arg(long)]
    target: String,
    /// Concurrent pullers.
    #[arg(long, short = 'c', default_value_t = 8)]
    concurrency: usize,
    /// Blobs (config and layers) each puller fetches at once; containerd's default is 3.
    #[arg(long, default_value_t = 3)]
    layer_concurrency: usize,
    /// Run this long (e.g. 30s); without it, run --count pulls.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "count")]
    duration: Option<std::time::Duration>,
    /// Total pulls across all pullers (default: one per puller).
    #[arg(long, short = 'n')]
    count: Option<u64>,
    /// Platform chosen from an index.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Per-request limit, response head to last byte.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    timeout: std::time::Duration,
    /// The target's Prometheus text endpoint (berth's /metrics); reports the upstream requests
    /// (`*upstream_requests_total`) made during the run.
    #[arg(long)]
    metrics: Option<String>,
    /// Pull as this user; the password (or key) is read from BERTH_LOAD_PASSWORD, so it is
    /// not in the process list.
    #[arg(long)]
    user: Option<String>,
    /// Extra PEM CA bundle for an https:// target signed by a private CA.
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// Images: repository:tag or repository@sha256:..., pulled in rotation.
    #[arg(required = true)]
    images: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            cache_dir,
            admin_listen,
        } => {
            let mut config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::embedded_default(),
            };
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if let Some(dir) = cache_dir {
                config.cache.dir = dir;
            }
            if let Some(admin_listen) = admin_listen {
                config.admin_listen = admin_listen;
            }
            init_logging(config.log_format);
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(serve(config))
        }
        Command::Resolve { config, references } => {
            let config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::embedded_default(),
            };
            let upstreams = berth::upstream::Upstreams::new(&config).map_err(anyhow::Error::msg)?;
            let mut failed = 0;
            for text in &references {
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
        Command::Warm {
            target,
            platform,
            concurrency,
            config,
            user,
            references,
        } => {
            let config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::embedded_default(),
            };
            let credentials = match user {
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
                target,
                platform,
                references,
                platform_config: config.platform,
                client: config.client,
                concurrency,
            };
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let summary = runtime
                .block_on(berth::warm::warm(options))
                .map_err(anyhow::Error::msg)?;
            println!("{summary}");
            if !summary.failed.is_empty() {
                anyhow::bail!("{} image(s) failed to warm", summary.failed.len());
            }
            Ok(())
        }
        Command::Load(args) => load(args),
        Command::DefaultConfig => {
            print!("{}", berth::config::EMBEDDED_DEFAULT);
            Ok(())
        }
        Command::CheckConfig { config } => {
            let (source, config) = match config {
                Some(path) => (path.display().to_string(), Config::load(&path)?),
                None => ("the embedded default".into(), Config::embedded_default()),
            };
            println!("# {source} is valid; effective configuration:\n{config:#?}");
            Ok(())
        }
        Command::Health { url, timeout } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            runtime.block_on(berth::probe::check(&url, timeout))?;
            Ok(())
        }
        Command::HashKey { generate } => hash_key(generate),
        Command::AccessReport {
            config,
            json,
            image,
        } => {
            let config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::embedded_default(),
            };
            let upstreams = berth::upstream::Upstreams::new(&config).map_err(anyhow::Error::msg)?;
            let access = berth::access::Access::open(&config.access, &config.platform)
                .map_err(anyhow::Error::msg)?;
            let report = access.report(&upstreams, &image)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
    }
}

fn hash_key(generate: bool) -> anyhow::Result<()> {
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

fn print_resolved(text: &str, target: &berth::route::Target, image: &berth::route::ImageRef) {
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

fn load(args: LoadArgs) -> anyhow::Result<()> {
    use berth::load::{ImageRef, Limit, LoadConfig};
    let images = args
        .images
        .iter()
        .map(|text| ImageRef::parse(text))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
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
    let report = runtime
        .block_on(berth::load::run(config))
        .map_err(anyhow::Error::msg)?;
    print!("{}", report.render());
    if report.total_errors() > 0 {
        anyhow::bail!("{} requests failed", report.total_errors());
    }
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal; log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
