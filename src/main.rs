//! The `berth` command: parse the command line and dispatch. Each subcommand's body is in
//! `cli`; everything else lives in the library.

mod cli;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    Serve(cli::ServeArgs),
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
    Warm(cli::WarmArgs),
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
pub struct LoadArgs {
    /// Registry to pull from, e.g. http://127.0.0.1:5000 (berth or any registry).
    #[arg(long)]
    pub target: String,
    /// Concurrent pullers.
    #[arg(long, short = 'c', default_value_t = 8)]
    pub concurrency: usize,
    /// Blobs (config and layers) each puller fetches at once; containerd's default is 3.
    #[arg(long, default_value_t = 3)]
    pub layer_concurrency: usize,
    /// Run this long (e.g. 30s); without it, run --count pulls.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "count")]
    pub duration: Option<std::time::Duration>,
    /// Total pulls across all pullers (default: one per puller).
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
    /// Platform chosen from an index.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Per-request limit, response head to last byte.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub timeout: std::time::Duration,
    /// The target's Prometheus text endpoint (berth's /metrics); reports the upstream requests
    /// (`*upstream_requests_total`) made during the run.
    #[arg(long)]
    pub metrics: Option<String>,
    /// Pull as this user; the password (or key) is read from BERTH_LOAD_PASSWORD, so it is
    /// not in the process list.
    #[arg(long)]
    pub user: Option<String>,
    /// Extra PEM CA bundle for an https:// target signed by a private CA.
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Images: repository:tag or repository@sha256:..., pulled in rotation.
    #[arg(required = true)]
    pub images: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => cli::serve(args),
        Command::Resolve { config, references } => cli::resolve(config.as_deref(), &references),
        Command::Warm(args) => cli::warm(args),
        Command::Load(args) => cli::load(args),
        Command::DefaultConfig => {
            print!("{}", berth::config::EMBEDDED_DEFAULT);
            Ok(())
        }
        Command::CheckConfig { config } => cli::check_config(config.as_deref()),
        Command::Health { url, timeout } => cli::health(&url, timeout),
        Command::HashKey { generate } => cli::hash_key(generate),
        Command::AccessReport {
            config,
            json,
            image,
        } => cli::access_report(config.as_deref(), json, &image),
    }
}
