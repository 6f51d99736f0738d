//! `sluice`: the single binary. Subcommands run a role (`serve` runs every
//! stage in one process) or a tool (`log tail`, `bench ingest`,
//! `config check`). `anyhow` lives here only, at the edge.

mod bench;
mod bench_dedup;
mod bench_deliver;
mod bench_hostile;
mod bench_kafka;
mod bench_lake;
mod bench_migrate;
mod bench_postgres;
mod bench_router;
mod cell;
mod cells;
mod dead_letters;
mod dedup;
mod deliver;
mod function;
#[cfg(feature = "otel")]
mod otel;
mod sink;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use sluice_core::config::{Flags, LogBackend};
use sluice_core::metrics::Registry;
use sluice_core::{Config, Shutdown};
use sluice_dedup::{DedupMetrics, OUTPUT_TOPIC};
use sluice_ingest::server::{serve, ServeOptions};
use sluice_ingest::spool::{Spool, SpoolMetrics, SpoolSettings};
use sluice_ingest::{Ingest, IngestSettings, INPUT_TOPIC};
use sluice_log::{EmbeddedLog, FailoverLog, KafkaLog, KafkaOptions, Log, LogMetrics, LogOptions};

/// mimalloc: the pipeline allocates many small, short-lived buffers across
/// threads (events, jobs, HTTP requests); glibc malloc spent ~15% of the
/// delivery benchmark's CPU (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sluice", version, about = "A Segment-compatible event pipeline")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text", env = "SLUICE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run every stage in one process (embedded log by default, or Kafka).
    Serve(ServeArgs),
    /// Run only the Tracking API (log.backend = "kafka"); scale by running more.
    Ingest(ServeArgs),
    /// Run only the route: output → jobs handed to the directors over RPC.
    Route(ServeArgs),
    /// Run only a director: JobDBs in deliver.jobdb_url, deliveries, the RPC endpoint.
    Director(ServeArgs),
    /// Inspect the embedded log.
    #[command(subcommand)]
    Log(LogCommand),
    /// Validate a configuration file and print the result.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run only the dedup stage (log.backend = "kafka": partitions are shared
    /// among the dedup processes), or one of its tools.
    Dedup(DedupArgs),
    /// Look at delivery jobs (works while `sluice serve` runs).
    #[command(subcommand)]
    Jobs(deliver::JobsCommand),
    /// Re-deliver events still in `output` to one destination.
    Replay(deliver::ReplayArgs),
    /// Records the route could not plan: list, show, replay or discard them.
    #[command(subcommand)]
    DeadLetters(dead_letters::DeadLettersCommand),
    /// A local webhook endpoint that prints what it receives (for trying destinations out).
    Sink(sink::SinkArgs),
    /// Benchmarks (see docs/BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The cell router: the Tracking API in front of several cells (see README, "Cells").
    Router(cells::RouterArgs),
    /// The cells' global store: cells, workspaces, write keys, overrides, placement.
    #[command(subcommand)]
    Cells(cells::CellsCommand),
    /// The control plane of the cells: registry, workspaces' configuration, capacity, provisioning, usage.
    Control(cells::ControlArgs),
    /// A workspace's usage (events accepted, duplicates, deliveries) per hour, from the global store.
    Usage(cells::UsageArgs),
    /// The bundled local provisioner: starts a `sluice serve` cell on this machine (see docs/CELLS.md).
    ProvisionLocal(cells::ProvisionLocalArgs),
    /// Move a workspace to another cell, live (start, status, pause, resume, abort; through the control plane).
    Migrate(cells::MigrateArgs),
    /// Functions (JavaScript transforms with Segment's handlers): `test` runs one locally.
    #[command(subcommand)]
    Function(function::FunctionCommand),
}

#[derive(Args)]
struct ConfigArgs {
    /// TOML config file; without it the built-in sample (config/sluice.toml) is used.
    #[arg(long, short, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct DedupArgs {
    #[command(subcommand)]
    tool: Option<dedup::DedupCommand>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Overrides `server.listen` (IP:PORT).
    #[arg(long, value_parser = listen_flag)]
    listen: Option<SocketAddr>,
    /// Overrides `server.data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides `admin.listen` (IP:PORT; "" disables the admin port).
    #[arg(long, value_parser = admin_listen_flag)]
    admin_listen: Option<AdminListen>,
}

/// `--admin-listen`: an address, or `None` for `""` (the admin port off).
#[derive(Clone, Copy)]
struct AdminListen(Option<SocketAddr>);

/// `--listen`, read like `server.listen` (same message).
fn listen_flag(text: &str) -> Result<SocketAddr, String> {
    sluice_core::config::parse_addr(text)
}

fn admin_listen_flag(text: &str) -> Result<AdminListen, String> {
    Ok(AdminListen(if text.is_empty() { None } else { Some(sluice_core::config::parse_addr(text)?) }))
}

#[derive(Subcommand)]
enum LogCommand {
    /// Print records as JSON lines, one event per line.
    Tail {
        /// The data directory (`server.data_dir`); the log is in its `log/`.
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = INPUT_TOPIC)]
        topic: String,
        /// Only this partition (every partition, in order, when absent).
        #[arg(long)]
        partition: Option<u32>,
        /// First offset to print (the oldest held when absent).
        #[arg(long)]
        from: Option<u64>,
        /// Wrap each event as {"partition","offset","timestamp","key","event"}.
        #[arg(long)]
        envelope: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate the config; print it as JSON-ish debug on success.
    Check(ConfigArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let kind = cli.command.kind();
    match kind {
        Kind::Server => {}
        Kind::NetworkTool => stdout_errors_end_the_tool(),
        Kind::Tool => {
            default_sigpipe();
            stdout_errors_end_the_tool();
        }
    }
    let _tracing_guard = init_tracing(cli.log_format);
    let result = run(cli.command);
    if !matches!(kind, Kind::Server) {
        // What is still buffered: std would drop a failure to write it at exit.
        use std::io::Write;
        if let Err(e) = std::io::stdout().flush() {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return result.and(Err(stdout_error(e)));
            }
        }
    }
    result
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve(args) => runtime()?.block_on(run_serve(args, Roles::ALL)),
        Command::Ingest(args) => runtime()?.block_on(run_serve(args, Roles::INGEST)),
        Command::Route(args) => runtime()?.block_on(run_serve(args, Roles::ROUTE)),
        Command::Director(args) => runtime()?.block_on(run_serve(args, Roles::DIRECTOR)),
        Command::Log(LogCommand::Tail { data_dir, topic, partition, from, envelope }) => log_tail(&data_dir, &topic, partition, from, envelope),
        Command::Config(ConfigCommand::Check(args)) => {
            let config = Config::load(args.config.as_deref())?;
            check_tls_files(&config)?;
            check_destination_urls(&config)?;
            println!("config OK: {} source(s), Tracking API on {}", config.sources.len(), config.server.listen);
            Ok(())
        }
        Command::Dedup(DedupArgs { tool: Some(cmd), .. }) => dedup::run(cmd),
        Command::Dedup(DedupArgs { tool: None, serve }) => runtime()?.block_on(run_serve(serve, Roles::DEDUP)),
        Command::Jobs(cmd) => deliver::jobs(cmd),
        Command::Replay(args) => deliver::replay(args),
        Command::DeadLetters(cmd) => dead_letters::run(cmd),
        Command::Sink(args) => runtime()?.block_on(sink::sink(args)),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Router(args) => runtime()?.block_on(cells::router(args)),
        Command::Cells(cmd) => cells::run(cmd),
        Command::Control(args) => runtime()?.block_on(cells::control(args)),
        Command::Usage(args) => cells::usage(args),
        Command::Migrate(args) => cells::migrate(args),
        Command::ProvisionLocal(args) => cells::provision_local(args),
        Command::Function(cmd) => function::run(cmd),
    }
}

/// How a subcommand treats a closed stdout (SIGPIPE).
enum Kind {
    /// The long-running roles keep Rust's default of ignoring SIGPIPE: a
    /// write to a closed socket or log pipe is an error to handle, not a
    /// reason to die.
    Server,
    /// Tools that serve or send HTTP (`sink`, `bench`) keep SIGPIPE
    /// ignored too (hyper's vectored writes to a reset connection would
    /// raise it), and end quietly when stdout is closed.
    NetworkTool,
    /// Every other tool (its output may go to `head`): SIGPIPE's default.
    Tool,
}

impl Command {
    fn kind(&self) -> Kind {
        match self {
            Command::Serve(_)
            | Command::Ingest(_)
            | Command::Route(_)
            | Command::Director(_)
            | Command::Router(_)
            | Command::Control(_)
            | Command::Dedup(DedupArgs { tool: None, .. }) => Kind::Server,
            Command::Sink(_) | Command::Bench(_) => Kind::NetworkTool,
            Command::Log(_)
            | Command::Config(_)
            | Command::Dedup(_)
            | Command::Jobs(_)
            | Command::Replay(_)
            | Command::DeadLetters(_)
            | Command::Cells(_)
            | Command::Usage(_)
            | Command::Migrate(_)
            | Command::ProvisionLocal(_)
            | Command::Function(_) => Kind::Tool,
        }
    }
}

/// Give SIGPIPE its default action back, as in any Unix tool: a tool whose
/// reader went away (`sluice jobs inspect … | head -1`) ends quietly, killed
/// by SIGPIPE (exit status 141 in a shell), where Rust's default (SIGPIPE
/// ignored) made `println!` panic with "failed printing to stdout: Broken pipe".
#[allow(unsafe_code)] // one libc call, SAFETY below
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called at the start of main, before any thread is started;
    // SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// For the tools: `println!` that fails ends the process at once, without
/// a panic message and without running exit handlers (threads may still
/// be at work: see `run_serve` on RocksDB at exit). A closed stdout (only
/// seen by the tools that keep SIGPIPE ignored) ends it with status 141,
/// quietly, as SIGPIPE would; any other failure (`> /dev/full`) with
/// "cannot write to stdout: <why>" on stderr and status 1, where std's
/// `println!` panicked ("failed printing to stdout", status 101).
fn stdout_errors_end_the_tool() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied()).unwrap_or("");
        if let Some(why) = msg.strip_prefix("failed printing to stdout: ") {
            if why.contains("Broken pipe") {
                exit_now(141);
            }
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "Error: cannot write to stdout: {why}");
            exit_now(1);
        }
        default(info)
    }));
}

/// A failed write to stdout, as the tools report it (one line).
pub(crate) fn stdout_error(e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!("cannot write to stdout: {e}")
}

/// Ends the process with `code` at once: no exit handlers, no unwinding.
#[allow(unsafe_code)] // one libc call, SAFETY below
fn exit_now(code: i32) -> ! {
    #[cfg(unix)]
    // SAFETY: _exit ends the process; nothing runs after it.
    unsafe {
        libc::_exit(code)
    }
    #[cfg(not(unix))]
    std::process::exit(code)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Logs on stderr (text or JSON, filtered by `RUST_LOG`, default `info`);
/// with the `otel` feature and `SLUICE_OTLP_ENDPOINT` set, trace spans are
/// also exported over OTLP/HTTP. The guard flushes them at exit.
fn init_tracing(format: LogFormat) -> Option<Box<dyn std::any::Any>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // sqlx logs an unknown PostgreSQL URL parameter with its value (a
    // mistyped `password=` would land in the log): `SqlLink::new` warns by name instead.
    let filter = filter.add_directive("sqlx_postgres::options::parse=off".parse().expect("a valid directive"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    #[cfg(feature = "otel")]
    if let Some((layer, guard)) = otel::layer() {
        registry.with(layer).init();
        return Some(Box::new(guard));
    }
    registry.init();
    None
}

fn load_config(args: &ServeArgs) -> Result<Config> {
    let flags = Flags { listen: args.listen, data_dir: args.data_dir.clone(), admin_listen: args.admin_listen.map(|a| a.0) };
    let config = Config::load_with(args.config.config.as_deref(), flags)?;
    check_destination_urls(&config)?;
    if args.config.config.is_none() {
        tracing::info!("no --config given: using the built-in sample config (config/sluice.toml)");
    }
    Ok(config)
}

/// The checks of destinations' URLs that need the delivery stage's parsers
/// (a `postgres` destination's TLS mode and parameters).
fn check_destination_urls(config: &Config) -> Result<()> {
    for (i, d) in config.destinations.iter().enumerate() {
        sluice_deliver::warehouse::check_destination(d).map_err(|e| anyhow::anyhow!("invalid config: destinations[{i}].url: {e}"))?;
    }
    Ok(())
}

async fn bind(addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// The stages one process runs. `sluice serve` runs them all; `sluice
/// ingest|dedup|route|director` one each, sharing one Kafka and one SQL
/// database with the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Roles {
    ingest: bool,
    dedup: bool,
    route: bool,
    director: bool,
}

impl Roles {
    const ALL: Roles = Roles { ingest: true, dedup: true, route: true, director: true };
    const INGEST: Roles = Roles { ingest: true, dedup: false, route: false, director: false };
    const DEDUP: Roles = Roles { ingest: false, dedup: true, route: false, director: false };
    const ROUTE: Roles = Roles { ingest: false, dedup: false, route: true, director: false };
    const DIRECTOR: Roles = Roles { ingest: false, dedup: false, route: false, director: true };

    fn names(self) -> Vec<&'static str> {
        [(self.ingest, "ingest"), (self.dedup, "dedup"), (self.route, "route"), (self.director, "director")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect()
    }
}

async fn run_serve(args: ServeArgs, roles: Roles) -> Result<()> {
    let config = load_config(&args)?;
    check_tls_files(&config)?;
    if roles != Roles::ALL && config.log.backend != LogBackend::Kafka {
        bail!(
            "`sluice {}` runs one stage and shares the log with the other stages' processes: \
             set log.backend = \"kafka\" (the embedded log belongs to one `sluice serve`)",
            roles.names().join(",")
        );
    }
    if roles != Roles::ALL && (roles.route || roles.director) {
        // Refuse before connecting to anything: the RPC between them is signed with it.
        sluice_deliver::cluster::rpc_secret(&config)?;
    }
    // Signal handlers go in before anything starts: "ready" is logged (and
    // the ports answer) inside start_roles, and a SIGTERM that arrived before
    // the handler existed killed the process by the default action.
    let shutdown = shutdown_signal()?;
    let mut started = Started::default();
    if let Err(e) = start_roles(&config, roles, &mut started).await {
        // What started before the failure is stopped in order, as on a
        // signal: dedup's threads (RocksDB) and the log's writers must not
        // outlive `main` (they did, and the process could crash in exit()).
        tracing::info!("start failed; stopping what was started");
        started.stop().await;
        return Err(e);
    }
    let mut fatal = started.fatal_rx.take().expect("taken once");
    let failed = tokio::select! {
        _ = shutdown => None,
        e = fatal.recv() => e,
    };
    match &failed {
        None => tracing::info!("shutting down: finishing requests in flight"),
        Some(e) => tracing::error!(error = format!("{e:#}"), "stopping: this process cannot go on"),
    }
    started.stop().await;
    tracing::info!("stopped");
    match failed {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// What [`start_roles`] has started so far, stopped by [`Started::stop`]
/// in order: servers, housekeeping tasks, the Tracking API and its spool,
/// dedup's threads, delivery, then the log. Filled step by step, so a start
/// that fails half-way stops exactly what it started.
struct Started {
    log: Option<Arc<dyn Log>>,
    embedded: Option<Arc<EmbeddedLog>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    dedup_stop: Shutdown,
    dedup_workers: Vec<std::thread::JoinHandle<()>>,
    delivery: Option<deliver::Running>,
    spool: Option<Arc<Spool>>,
    ingest: Option<Arc<Ingest>>,
    admin_state: Option<Arc<sluice_admin::AdminState>>,
    /// The Tracking API and admin servers; they stop when `servers_stop` is triggered.
    servers: Vec<tokio::task::JoinHandle<()>>,
    servers_stop: Shutdown,
    /// With `deliver.jobdb_url`: this process's claim on its JobDB scope
    /// (`deliver::claim_scope`), until its watch starts.
    scope_claim: Option<deliver::ScopeClaim>,
    /// The watch that keeps the claim (`deliver::watch_scope`); stopped last.
    scope_watch: Option<tokio::task::JoinHandle<()>>,
    /// This process's link to the control plane (`[cell]`); stopped after delivery.
    cell: Option<cell::CellLink>,
    /// An error that stops the process (a task found it cannot go on).
    fatal: tokio::sync::mpsc::UnboundedSender<anyhow::Error>,
    fatal_rx: Option<tokio::sync::mpsc::UnboundedReceiver<anyhow::Error>>,
}

impl Default for Started {
    fn default() -> Self {
        let (fatal, fatal_rx) = tokio::sync::mpsc::unbounded_channel();
        Started {
            log: None,
            embedded: None,
            tasks: Vec::new(),
            dedup_stop: Shutdown::new(),
            dedup_workers: Vec::new(),
            delivery: None,
            spool: None,
            ingest: None,
            admin_state: None,
            servers: Vec::new(),
            servers_stop: Shutdown::new(),
            scope_claim: None,
            scope_watch: None,
            cell: None,
            fatal,
            fatal_rx: Some(fatal_rx),
        }
    }
}

impl Started {
    async fn stop(self) {
        self.servers_stop.trigger();
        for server in self.servers {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "server task failed");
            }
        }
        // Aborted tasks are awaited so the log handles they hold are gone before `close`.
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        drop(self.admin_state);
        drop(self.ingest);
        if let Some(s) = self.spool {
            s.stop().await;
        }
        self.dedup_stop.trigger();
        let workers = self.dedup_workers;
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
        if let Some(d) = self.delivery {
            d.stop().await;
        }
        if let Some(c) = self.cell {
            c.stop().await;
        }
        // The scope lock goes after the JobDBs are closed.
        if let Some(w) = self.scope_watch {
            w.abort();
            let _ = w.await;
        }
        drop(self.scope_claim);
        // Closing Kafka clients flushes and leaves groups: not on an async thread.
        if let Some(log) = self.log {
            let _ = tokio::task::spawn_blocking(move || drop(log)).await;
        }
        if let Some(embedded) = self.embedded {
            match Arc::try_unwrap(embedded) {
                Ok(log) => {
                    let _ = tokio::task::spawn_blocking(move || log.close()).await;
                }
                Err(_) => tracing::warn!("log still referenced at exit; its writers stop with the process"),
            }
        }
    }
}

/// Open and start every stage of `roles`, recording each in `st` as soon as
/// it runs.
async fn start_roles(config: &Config, roles: Roles, st: &mut Started) -> Result<()> {
    // First: a process that would be refused its JobDBs must change nothing shared (the control tables' seed below).
    st.scope_claim = deliver::claim_scope(config, roles.route, roles.director).await?;
    let mut registry = Registry::default();
    registry.register(
        "sluice_tls_reloads",
        "Certificate reloads of the HTTPS listeners (server, admin, director RPC), by listener and result",
        sluice_ingest::tls::reloads_total().clone(),
    );
    let log_metrics = LogMetrics::default();
    log_metrics.register(&mut registry);
    let (log, embedded) = open_log(config, log_metrics).await?;
    st.log = Some(log.clone());
    if let Some(e) = &embedded {
        st.tasks.push(e.spawn_retention(Duration::from_secs(60)));
    }
    st.embedded = embedded;

    if !roles.dedup {
    } else if config.dedup.enabled {
        let metrics = DedupMetrics::default();
        metrics.register(&mut registry);
        st.dedup_workers = dedup::spawn_workers(config, log.clone(), metrics, st.dedup_stop.clone())?;
    } else {
        tracing::warn!("dedup is disabled (dedup.enabled = false): nothing reads the input topic");
    }

    // The control database: sources, destinations, connections, QoS (seeded from the config).
    let catalog = {
        let c = config.clone();
        tokio::task::spawn_blocking(move || sluice_deliver::Catalog::open(&c)).await?
    }
    .with_context(|| match &config.deliver.jobdb_url {
        Some(_) => "cannot open the control database (the sluice_control_* tables of deliver.jobdb_url)".to_owned(),
        None => format!("cannot open the control database {}", sluice_deliver::control::control_path(&config.server.data_dir).display()),
    })?;
    if let Some(claim) = st.scope_claim.take() {
        st.scope_watch = Some(deliver::watch_scope(claim, config.clone(), catalog.clone(), st.fatal.clone()));
    }

    {
        // Source functions run in the route, destination functions in the directors; the admin API
        // loads a deploy with the same limits (docs/FUNCTIONS.md).
        let f = &config.functions;
        let limits = sluice_transform::function::Limits {
            time_per_call: f.time_per_call,
            memory_bytes: f.memory_bytes,
            ..sluice_transform::function::Limits::default()
        };
        let fetcher = sluice_deliver::function::GuardedFetch::new(config.deliver.allow_private_network, config.deliver.connect_timeout)
            .context("cannot build the HTTP client of functions' fetch")?;
        sluice_transform::pool::FunctionPool::configure(f.threads.get(), limits, Some(fetcher)).register(&mut registry);
    }
    if (roles.route || roles.director) && config.deliver.enabled && config.dedup.enabled {
        st.delivery = Some(deliver::start(config, log.clone(), catalog.clone(), &mut registry, roles.route, roles.director).await?);
    } else if config.deliver.enabled {
        tracing::warn!("delivery needs dedup (dedup.enabled = false): nothing is delivered");
    } else if roles == Roles::ALL && config.dedup.enabled && !config.connections.is_empty() {
        tracing::warn!(
            connections = config.connections.len(),
            "delivery is off (deliver.enabled = false) with connections configured: output is kept, whatever its retention, \
             until delivery is on again and has routed it; the disk use of data_dir/log/output grows meanwhile"
        );
    }

    st.tasks.push(spawn_lag_monitor(log.clone(), config, roles, &mut registry));
    st.tasks.push(cell::spawn_process_metrics(&mut registry));
    st.tasks.extend(cell::spawn_db_connections(config, &mut registry)?);

    // With Kafka, ingest keeps acknowledging into an on-disk spool while
    // Kafka is slow or down (the embedded log is local disk already).
    // Its metrics exist in every mode (depth 0 without a spool), so alert
    // rules and dashboards work unchanged.
    let spool_metrics = SpoolMetrics::default();
    spool_metrics.register(&mut registry);
    if config.log.backend == LogBackend::Kafka && roles.ingest {
        let settings =
            SpoolSettings { spool_after: config.ingest.spool_after, max_events: config.ingest.spool_max_events.get(), ..SpoolSettings::default() };
        let dir = config.server.data_dir.join("spool");
        st.spool = Some(
            Spool::open(log.clone(), INPUT_TOPIC, &dir, settings, spool_metrics)
                .await
                .with_context(|| format!("cannot open the ingest spool in {}", dir.display()))?,
        );
    }
    if roles.ingest {
        let ingest_log: Arc<dyn Log> = match &st.spool {
            Some(s) => s.clone(),
            None => log.clone(),
        };
        let ingest = Ingest::new(ingest_log, IngestSettings::from_config(config), &config.sources, config.ingest.default_rate_limit)?;
        ingest.metrics.register(&mut registry);
        st.ingest = Some(Arc::new(ingest));
    }

    let listener = match &st.ingest {
        Some(_) => Some(bind(config.server.listen, "server.listen").await?),
        None => None,
    };
    let admin = match config.admin.listen {
        Some(addr) => Some(bind(addr, "admin.listen").await?),
        None => None,
    };
    let mut serve_options = ServeOptions::from_config(&config.server);
    let mut admin_options = ServeOptions { same_origin: true, trusted: Vec::new(), ..serve_options.clone() };
    serve_options.tls = server_tls("https server.listen", &config.server.tls_cert_file, &config.server.tls_key_file)?;
    admin_options.tls = server_tls("https admin.listen", &config.admin.tls_cert_file, &config.admin.tls_key_file)?;
    for tls in [&serve_options.tls, &admin_options.tls].into_iter().flatten() {
        st.tasks.push(tls.spawn_reloader(sluice_ingest::tls::RELOAD_EVERY));
    }
    let scheme = if serve_options.tls.is_some() { "https" } else { "http" };
    let sources: Vec<String> = catalog.snapshot().sources.iter().filter(|(_, off)| !off).map(|(s, _)| s.id.clone()).collect();
    let listen = match &listener {
        Some(l) => l.local_addr()?.to_string(),
        None => "off".to_owned(),
    };
    tracing::info!(
        roles = ?roles.names(),
        listen = %listen,
        admin = %admin.as_ref().and_then(|a| a.local_addr().ok()).map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        data_dir = %config.server.data_dir.display(),
        partitions = config.log.partitions,
        sources = ?sources,
        "Sluice is ready: point a Segment SDK at {}",
        if listener.is_some() { format!("{scheme}://{listen}") } else { "a `sluice ingest` process".to_owned() }
    );

    let servers_stop = st.servers_stop.clone();
    let stopped = move || {
        let stop = servers_stop.clone();
        async move { stop.wait().await }
    };
    let admin_state = Arc::new(sluice_admin::AdminState {
        registry: Arc::new(registry),
        log: log.clone(),
        jobdbs: deliver::jobdbs_of(config)?,
        catalog: catalog.clone(),
        ingest: st.ingest.clone(),
        token: config.admin.token.clone(),
        metrics_token: config.admin.metrics_token.clone(),
        default_rate_limit: config.ingest.default_rate_limit,
        retry_policy: config.deliver.retry_policy(),
        body_read_timeout: config.server.body_read_timeout,
    });
    st.admin_state = Some(admin_state.clone());
    // Sources come from the control database (seeded from the config, changed by the admin API).
    sluice_admin::apply_sources(&admin_state);
    st.tasks.push(sluice_admin::spawn_catalog_refresher(admin_state.clone()));
    let history = st.delivery.as_ref().map(|d| d.history.clone());
    st.cell = cell::start(config, &admin_state, roles.dedup && config.dedup.enabled, st.spool.clone(), history).await?;
    let migration_routes = st.cell.as_mut().and_then(|c| c.routes.take());
    if let (Some(l), Some(i)) = (listener, &st.ingest) {
        st.servers.push(tokio::spawn(serve(l, sluice_ingest::router(i.clone()), serve_options.clone(), stopped())));
    }
    if let Some(l) = admin {
        let mut app = sluice_admin::router(admin_state);
        if let Some(routes) = migration_routes {
            app = app.merge(routes);
        }
        st.servers.push(tokio::spawn(serve(l, app, admin_options, stopped())));
    }
    Ok(())
}

/// Every certificate, key and CA file the config names parses as PEM (and
/// each certificate matches its key), so `config check` catches a bad file
/// and `serve` refuses it before connecting to anything. (The config's own
/// validation has checked that they exist.)
fn check_tls_files(config: &Config) -> Result<()> {
    use sluice_ingest::tls::{check_pair, load_certs};
    let pair = |link: &str, cert: &Option<PathBuf>, key: &Option<PathBuf>| -> Result<()> {
        if let (Some(c), Some(k)) = (cert, key) {
            check_pair(link, c, k)?;
        }
        Ok(())
    };
    pair("server.tls_cert_file/tls_key_file", &config.server.tls_cert_file, &config.server.tls_key_file)?;
    pair("admin.tls_cert_file/tls_key_file", &config.admin.tls_cert_file, &config.admin.tls_key_file)?;
    pair("director.tls_cert_file/tls_key_file", &config.director.tls_cert_file, &config.director.tls_key_file)?;
    let k = &config.log.kafka;
    let kafka = [("log.kafka.primary", Some(&k.primary)), ("log.kafka.secondary", k.secondary.as_ref())];
    for (prefix, cluster) in kafka.into_iter().filter_map(|(p, c)| Some((p, c?))) {
        pair(&format!("{prefix}.tls_cert_file/tls_key_file"), &cluster.tls_cert_file, &cluster.tls_key_file)?;
        if let Some(ca) = &cluster.tls_ca_file {
            load_certs(&format!("{prefix}.tls_ca_file"), ca)?;
        }
    }
    if let Some(ca) = &config.director.tls_ca_file {
        sluice_ingest::tls::load_roots("director.tls_ca_file", ca)?;
    }
    if let Some(ca) = &config.deliver.archive_s3_ca_file {
        load_certs("deliver.archive_s3_ca_file", ca)?;
    }
    Ok(())
}

/// HTTPS for a listener (`link` names it in errors) when its certificate
/// and key are configured (both or neither: validated).
fn server_tls(link: &str, cert: &Option<PathBuf>, key: &Option<PathBuf>) -> Result<Option<sluice_ingest::tls::ServerTls>> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(sluice_ingest::tls::ServerTls::new(link, cert, key, None, &[b"http/1.1"])?)),
        _ => Ok(None),
    }
}

/// Consumer lag per group, topic and partition (end offset − committed
/// offset), refreshed every 2 s: `sluice_consumer_lag`.
fn spawn_lag_monitor(log: Arc<dyn Log>, config: &Config, roles: Roles, registry: &mut Registry) -> tokio::task::JoinHandle<()> {
    let lag: sluice_core::metrics::Family<Vec<(&'static str, String)>, sluice_core::metrics::Gauge> = Default::default();
    registry.register("sluice_consumer_lag", "Records not yet consumed, per group, topic and partition", lag.clone());
    let lag_seconds: sluice_core::metrics::Family<Vec<(&'static str, String)>, sluice_core::metrics::Gauge<f64, std::sync::atomic::AtomicU64>> =
        Default::default();
    registry.register(
        "sluice_consumer_lag_seconds",
        "How far behind each group is, in time: its records not yet consumed over its recent rate (or, stalled, how long since it last moved)",
        lag_seconds.clone(),
    );
    let mut groups = Vec::new();
    if config.dedup.enabled {
        if roles.dedup {
            groups.push((sluice_dedup::GROUP, INPUT_TOPIC));
            if config.log.kafka.secondary.is_some() && config.log.backend == LogBackend::Kafka {
                groups.push((sluice_dedup::GROUP, sluice_log::failover::SECONDARY_INPUT));
            }
        }
        if config.deliver.enabled && roles.route {
            groups.push((sluice_route::GROUP, OUTPUT_TOPIC));
        }
    }
    tokio::spawn(async move {
        // Per group, topic and partition: (position, when it last moved, recent records/s, when read).
        let mut seen: HashMap<(&str, &str, u32), (u64, Instant, f64, Instant)> = HashMap::new();
        loop {
            let mut behind_s: HashMap<&str, f64> = HashMap::new();
            for (group, topic) in &groups {
                let Ok(partitions) = log.partitions(topic) else { continue };
                for p in 0..partitions {
                    let (Ok(range), Ok(committed)) = (log.offsets(topic, p).await, log.committed(group, topic, p).await) else { continue };
                    let position = committed.unwrap_or(range.start).max(range.start);
                    let behind = range.end.saturating_sub(position);
                    let labels = vec![("group", (*group).to_owned()), ("topic", (*topic).to_owned()), ("partition", p.to_string())];
                    lag.get_or_create(&labels).set(behind as i64);
                    let now = Instant::now();
                    let (last, moved_at, rate, read_at) = seen.get(&(*group, *topic, p)).copied().unwrap_or((position, now, 0.0, now));
                    let dt = now.duration_since(read_at).as_secs_f64();
                    let rate = if dt > 0.0 { 0.5 * rate + 0.5 * (position.saturating_sub(last) as f64 / dt) } else { rate };
                    let moved_at = if position > last { now } else { moved_at };
                    seen.insert((*group, *topic, p), (position, moved_at, rate, now));
                    let seconds = match behind {
                        0 => 0.0,
                        _ if rate > 0.5 => behind as f64 / rate,
                        _ => now.duration_since(moved_at).as_secs_f64(),
                    };
                    let g = behind_s.entry(group).or_default();
                    *g = g.max(seconds);
                }
            }
            for (group, seconds) in behind_s {
                lag_seconds.get_or_create(&vec![("group", group.to_owned())]).set(seconds);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

/// Open the configured log: the embedded one (returned twice: as a `Log`
/// and for its retention and close) or Kafka.
async fn open_log(config: &Config, metrics: LogMetrics) -> Result<(Arc<dyn Log>, Option<Arc<EmbeddedLog>>)> {
    match config.log.backend {
        LogBackend::Embedded => {
            let dir = config.server.data_dir.join("log");
            let options = log_options(config, metrics);
            let log = {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || EmbeddedLog::open(&dir, options)).await?
            }
            .with_context(|| format!("cannot open the log in {}", dir.display()))?;
            let log = Arc::new(log);
            Ok((log.clone() as Arc<dyn Log>, Some(log)))
        }
        LogBackend::Kafka => {
            let connect = |options: KafkaOptions, which: &'static str| async move {
                let servers = options.bootstrap_servers.clone();
                let log = tokio::task::spawn_blocking(move || KafkaLog::connect(options))
                    .await?
                    .with_context(|| format!("cannot use Kafka at {servers} (log.kafka.{which}.bootstrap_servers)"))?;
                tracing::info!(bootstrap_servers = %servers, cluster = which, "log: Apache Kafka");
                anyhow::Ok(log)
            };
            let primary = connect(kafka_options(config, &config.log.kafka.primary, true), "primary").await?;
            match &config.log.kafka.secondary {
                None => Ok((Arc::new(primary), None)),
                Some(cluster) => {
                    let secondary = connect(kafka_options(config, cluster, false), "secondary").await?;
                    let log = FailoverLog::new(primary, secondary, config.log.kafka.failover_slow_after)?;
                    Ok((log, None))
                }
            }
        }
    }
}

/// `[log.kafka]` as one cluster's options: topics `input` and (on the
/// primary) `output`.
fn kafka_options(config: &Config, cluster: &sluice_core::config::KafkaCluster, primary: bool) -> KafkaOptions {
    let k = &config.log.kafka;
    let partitions = config.log.partitions;
    let mut topics = vec![(INPUT_TOPIC.into(), partitions)];
    if primary {
        topics.push((OUTPUT_TOPIC.into(), partitions));
    }
    let mut o = KafkaOptions::new(cluster.bootstrap_servers.clone(), topics);
    // Unread events must outlive an outage; output is dedup's memory.
    o.retention = vec![(INPUT_TOPIC.into(), config.log.retention), (OUTPUT_TOPIC.into(), config.output_retention())];
    o.replication_factor = k.replication_factor as i32;
    o.produce_timeout = k.produce_timeout;
    o.request_timeout = k.request_timeout;
    o.client_id = k.client_id.clone();
    o.topic_prefix = k.topic_prefix.clone();
    o.settings = k.settings.iter().map(|(a, b)| (a.clone(), b.clone())).collect();
    o.link = kafka_link(cluster, if primary { "kafka primary" } else { "kafka secondary" });
    if !primary && k.primary.security_protocol != cluster.security_protocol {
        tracing::warn!(
            primary = k.primary.security_protocol.as_librdkafka(),
            secondary = cluster.security_protocol.as_librdkafka(),
            "the secondary Kafka cluster's link is not protected like the primary's: events written there during a failover travel as it says"
        );
    }
    o
}

/// librdkafka's security settings for `cluster` (validated: the keys fit
/// the protocol). Nothing is left to librdkafka's defaults that could
/// weaken the link: the protocol is always set, and certificate checks stay on.
fn kafka_link(cluster: &sluice_core::config::KafkaCluster, name: &str) -> sluice_log::KafkaLink {
    let mut settings = vec![("security.protocol".to_owned(), cluster.security_protocol.as_librdkafka().to_owned())];
    let mut set = |k: &str, v: String| settings.push((k.to_owned(), v));
    let path = |p: &std::path::Path| p.display().to_string();
    if cluster.security_protocol.uses_tls() {
        set("enable.ssl.certificate.verification", "true".into());
        if let Some(ca) = &cluster.tls_ca_file {
            set("ssl.ca.location", path(ca));
        }
        if let (Some(cert), Some(key)) = (&cluster.tls_cert_file, &cluster.tls_key_file) {
            set("ssl.certificate.location", path(cert));
            set("ssl.key.location", path(key));
        }
        if cluster.tls_verify_hostname {
            set("ssl.endpoint.identification.algorithm", "https".into());
        } else {
            tracing::warn!(
                link = name,
                "tls_verify_hostname = false: the brokers' certificates are checked, but not the host names they are reached at"
            );
            set("ssl.endpoint.identification.algorithm", "none".into());
        }
    }
    if cluster.security_protocol.uses_sasl() {
        if let Some(m) = cluster.sasl_mechanism {
            set("sasl.mechanisms", m.as_librdkafka().into());
            if m == sluice_core::config::SaslMechanism::Plain && !cluster.security_protocol.uses_tls() {
                tracing::warn!(link = name, "SASL PLAIN over sasl_plaintext sends the password in clear text; use sasl_ssl");
            }
        }
        set("sasl.username", cluster.sasl_username.clone().unwrap_or_default());
        set("sasl.password", cluster.sasl_password.as_ref().map(|p| p.expose().to_owned()).unwrap_or_default());
    }
    sluice_log::KafkaLink { name: name.to_owned(), settings }
}

/// The embedded log's options for `config`: topics `input` and `output`
/// with the same partition count, `output` kept for the dedup window, and
/// `input` kept until dedup has read it.
fn log_options(config: &Config, metrics: LogMetrics) -> LogOptions {
    let partitions = config.log.partitions;
    LogOptions {
        topics: vec![(INPUT_TOPIC.into(), partitions), (OUTPUT_TOPIC.into(), partitions)],
        segment_bytes: config.log.segment_bytes,
        retention: config.log.retention,
        retention_by_topic: [(OUTPUT_TOPIC.to_owned(), config.output_retention())].into(),
        // Acknowledged events are never deleted before dedup has read them.
        retention_guard: {
            let mut guard = HashMap::new();
            if config.dedup.enabled {
                guard.insert(INPUT_TOPIC.to_owned(), sluice_dedup::GROUP.to_owned());
                if config.deliver.enabled || !config.connections.is_empty() {
                    // Events are not deleted before the route has made their
                    // jobs, also while delivery is switched off with
                    // connections configured: they are delivered once it is
                    // back on (a route that never ran holds everything).
                    guard.insert(OUTPUT_TOPIC.to_owned(), sluice_route::GROUP.to_owned());
                }
            }
            guard
        },
        fsync: config.log.fsync,
        metrics,
    }
}

/// Installs the SIGINT/SIGTERM/SIGHUP handlers now and returns a future
/// that resolves on the first of them. SIGHUP (the terminal that ran
/// `scripts/run.sh` closed) stops as gracefully as the others: its default
/// action killed the process without the shutdown.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
        let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

fn log_tail(data_dir: &std::path::Path, topic: &str, partition: Option<u32>, from: Option<u64>, envelope: bool) -> Result<()> {
    use std::io::Write;
    let root = data_dir.join("log");
    if !root.is_dir() {
        bail!("no log at {} (is --data-dir the server's data_dir?)", root.display());
    }
    let log = EmbeddedLog::open_read_only(&root).with_context(|| format!("cannot open the log at {}", root.display()))?;
    let partitions = log.partitions(topic)?;
    let selected: Vec<u32> = match partition {
        Some(p) if p >= partitions => bail!("topic {topic:?} has {partitions} partitions; there is no partition {p}"),
        Some(p) => vec![p],
        None => (0..partitions).collect(),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for p in selected {
        let range = log.offsets_blocking(topic, p)?;
        let mut next = from.unwrap_or(range.start);
        loop {
            let batch = log.read_blocking(topic, p, next, 1000)?;
            let Some(last) = batch.last() else { break };
            next = last.offset + 1;
            for rec in batch {
                if envelope {
                    let event: serde_json::Value = serde_json::from_slice(&rec.value).unwrap_or(serde_json::Value::Null);
                    let line = serde_json::json!({
                        "partition": p,
                        "offset": rec.offset,
                        "timestamp": rec.timestamp_ms,
                        "key": String::from_utf8_lossy(&rec.key),
                        "event": event,
                    });
                    writeln!(out, "{line}").map_err(stdout_error)?;
                } else if rec.value.contains(&b'\n') {
                    // A client's pretty-printed nested value: compact it to keep one event per line.
                    let event: serde_json::Value = serde_json::from_slice(&rec.value)?;
                    writeln!(out, "{event}").map_err(stdout_error)?;
                } else {
                    out.write_all(&rec.value).map_err(stdout_error)?;
                    out.write_all(b"\n").map_err(stdout_error)?;
                }
            }
        }
    }
    out.flush().map_err(stdout_error)?;
    Ok(())
}
