//! The command line of `datapipeline-local`: `serve` (the endpoint), `submit` and `runs` (a
//! shorthand client for people without awscli).

use super::client::{self, Client, DEFAULT_ENDPOINT};
use super::engine::{Engine, EngineOptions};
use super::server::{self, AppState};
use super::store::Store;
use anyhow::Context;
use chrono::TimeDelta;
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "datapipeline-local",
    version,
    about = "An offline AWS Data Pipeline endpoint"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the Data Pipeline API.
    Serve(ServeArgs),
    /// Create, put and activate a pipeline from a definition file; print its id.
    Submit {
        #[command(flatten)]
        conn: ConnArgs,
        /// A definition file as `aws datapipeline put-pipeline-definition` reads it.
        file: PathBuf,
    },
    /// Print the instances and attempts of a pipeline with their status.
    Runs {
        #[command(flatten)]
        conn: ConnArgs,
        pipeline_id: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to bind (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8990")]
    pub listen: String,
    /// Keep pipelines in DIR (SQLite) so that they survive a restart; in memory otherwise.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Key pairs to accept (`{"access-id": .., "private-key": ..}`); may repeat. Without it any
    /// well-formed SigV4 request is accepted (signatures are not checked).
    #[arg(long, value_name = "FILE")]
    pub credentials: Vec<PathBuf>,
    /// How long PollForTask waits for a task.
    #[arg(long, default_value_t = 90)]
    pub long_poll_seconds: u64,
    /// A task not acknowledged by ReportTaskProgress within this is handed out again.
    #[arg(long, default_value_t = 120)]
    pub ack_timeout_seconds: u64,
    /// Default reportProgressTimeout: a task without progress for this long is handed out again.
    #[arg(long, default_value_t = 300)]
    pub progress_timeout_seconds: u64,
    /// Divide the periods of objects (retryDelay, attemptTimeout, reportProgressTimeout) by N, so
    /// that definitions valid on the service (minimum 2-minute retryDelay) run fast in tests.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub period_divisor: u32,
    /// Answer heartbeats of this task runner id with `terminate: true`; may repeat.
    #[arg(long, value_name = "ID")]
    pub terminate_runner: Vec<String>,
    /// PollForTask returns the attempt object alone, as the API reference's example shows.
    #[arg(long)]
    pub attempt_only: bool,
    /// Accepted for the runner's S3 tests; this server does not talk to S3 itself.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct ConnArgs {
    #[arg(long, default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// `{"access-id": .., "private-key": ..}`; else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    #[arg(long, value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
}

impl ConnArgs {
    fn client(&self) -> anyhow::Result<Client> {
        let (ak, sk) = match &self.credentials {
            Some(p) => client::read_credentials(p)?,
            None => (
                std::env::var("AWS_ACCESS_KEY_ID")
                    .context("no --credentials FILE and AWS_ACCESS_KEY_ID is not set")?,
                std::env::var("AWS_SECRET_ACCESS_KEY")
                    .context("no --credentials FILE and AWS_SECRET_ACCESS_KEY is not set")?,
            ),
        };
        Client::new(&self.endpoint, &self.region, ak, sk)
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("datapipeline-local: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Submit { conn, file } => {
                let id = client::submit(&conn.client()?, &file).await?;
                println!("{id}");
                Ok(())
            }
            Command::Runs { conn, pipeline_id } => {
                print!("{}", client::runs(&conn.client()?, &pipeline_id).await?);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("datapipeline-local: {e:#}");
            if e.chain().any(|c| c.downcast_ref::<ConfigError>().is_some()) {
                ExitCode::from(crate_exit_config())
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn crate_exit_config() -> u8 {
    78
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConfigError(String);

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DATAPIPELINE_LOCAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let keys = if args.credentials.is_empty() {
        tracing::warn!(
            "no --credentials: accepting any well-formed SigV4 request without checking signatures"
        );
        None
    } else {
        let mut ring = BTreeMap::new();
        for p in &args.credentials {
            let (ak, sk) = client::read_credentials(p).map_err(|e| ConfigError(format!("{e:#}")))?;
            ring.insert(ak, sk);
        }
        tracing::info!("checking SigV4 signatures against {} access key(s)", ring.len());
        Some(ring)
    };
    if args.period_divisor == 0 {
        return Err(ConfigError("--period-divisor must be at least 1".into()).into());
    }
    let store = match &args.state {
        Some(dir) => Some(Store::open(dir).map_err(|e| ConfigError(format!("--state: {e:#}")))?),
        None => None,
    };
    let pipelines = match &store {
        Some(s) => s.load().context("loading state")?,
        None => vec![],
    };
    let opts = EngineOptions {
        ack_timeout: TimeDelta::seconds(args.ack_timeout_seconds as i64),
        progress_timeout: TimeDelta::seconds(args.progress_timeout_seconds as i64),
        period_divisor: args.period_divisor,
        terminate_runners: args.terminate_runner.iter().cloned().collect(),
        attempt_only: args.attempt_only,
    };
    let shutdown = CancellationToken::new();
    let state = Arc::new(AppState {
        engine: Mutex::new(Engine::new(opts, pipelines)),
        store: store.map(Mutex::new),
        keys,
        long_poll: Duration::from_secs(args.long_poll_seconds),
        ready: Notify::new(),
        shutdown: shutdown.clone(),
    });
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| ConfigError(format!("--listen {}: {e}", args.listen)))?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
    }
    tracing::info!("listening on http://{addr}");
    let ticker = tokio::spawn(server::run_ticker(state.clone()));
    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("installing the SIGTERM handler: {e}");
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        }
        signal_token.cancel();
    });
    axum::serve(listener, server::router(state.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .context("serving")?;
    shutdown.cancel();
    let _ = ticker.await;
    state.tick();
    tracing::info!("stopped");
    Ok(())
}
