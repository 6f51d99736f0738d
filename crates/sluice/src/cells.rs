//! Cells (issue 14): `sluice router`, the edge in front of the cells, and
//! `sluice cells`, the global store's tool (cells, workspaces, write keys,
//! overrides, placement) until the control plane's API exists.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use std::io::Read as _;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use sluice_cells::{Cell, CellState, GlobalStore, Tier, Workspace};
use sluice_core::Shutdown;
use sluice_ingest::server::{serve, ServeOptions};
use sluice_router::{CellRouter, RouterSettings};

use crate::ConfigArgs;

#[derive(Args)]
pub struct RouterArgs {
    /// The global store (default: `router.store` of the config).
    #[arg(long, env = "SLUICE_GLOBAL_STORE")]
    store: Option<String>,
    /// Where the router serves the Tracking API (default: `router.listen`).
    #[arg(long, value_parser = crate::listen_flag)]
    listen: Option<SocketAddr>,
    /// `[router]`, the request limits of `[ingest]`, the connection limits
    /// and TLS of `[server]`, and `admin.metrics_token` come from this
    /// config (default: the sample's).
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args)]
pub struct StoreArgs {
    /// The global store: a mysql://, mariadb://, postgres:// URL, or an SQLite file path.
    #[arg(long, env = "SLUICE_GLOBAL_STORE")]
    store: String,
}

/// `sluice router`: serve until a signal.
pub async fn router(args: RouterArgs) -> Result<()> {
    let config = sluice_core::Config::load(args.config.config.as_deref())?;
    let Some(location) = args.store.or_else(|| config.router.store.as_ref().map(|s| s.expose().to_owned())) else {
        bail!("no global store: give --store, SLUICE_GLOBAL_STORE or router.store (a mysql://, mariadb://, postgres:// URL or an SQLite file)");
    };
    let shown = sluice_sql::redact(&location);
    // Lookups share a few connections; the mapping-version poll has its own.
    let connections = config.router.store_connections.get();
    let (stores, version_store) = tokio::task::spawn_blocking(move || {
        let stores = (0..connections).map(|_| GlobalStore::open(&location)).collect::<Result<Vec<_>, _>>()?;
        Ok::<_, sluice_cells::CellsError>((stores, GlobalStore::open(&location)?))
    })
    .await?
    .with_context(|| format!("cannot open the global store {shown}"))?;
    let router = CellRouter::new(stores, version_store, RouterSettings::from_config(&config)).context("cannot start the router")?;
    let mut registry = sluice_core::metrics::Registry::default();
    router.metrics.register(&mut registry);
    let stop = Shutdown::new();
    let watch = router.spawn_mapping_watch(stop.clone());
    let listen = args.listen.unwrap_or(config.router.listen);
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen} (--listen or router.listen)"))?;
    let admin = match config.router.admin_listen {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.with_context(|| format!("cannot listen on {a} (router.admin_listen)"))?),
        None => None,
    };
    let mut options = ServeOptions::from_config(&config.server);
    // The admin port is not the edge: no proxy is trusted there.
    let mut admin_options = ServeOptions { same_origin: true, trusted: Vec::new(), ..options.clone() };
    options.tls = crate::server_tls("https router.listen", &config.server.tls_cert_file, &config.server.tls_key_file)?;
    admin_options.tls = crate::server_tls("https router.admin_listen", &config.admin.tls_cert_file, &config.admin.tls_key_file)?;
    let reloaders: Vec<_> =
        [&options.tls, &admin_options.tls].into_iter().flatten().map(|t| t.spawn_reloader(sluice_ingest::tls::RELOAD_EVERY)).collect();
    let scheme = if options.tls.is_some() { "https" } else { "http" };
    let addr = listener.local_addr()?;
    tracing::info!(
        listen = %addr,
        admin = %admin.as_ref().and_then(|a| a.local_addr().ok()).map_or_else(|| "off".to_owned(), |a| a.to_string()),
        store = %shown,
        "Sluice is ready (router): send Tracking API requests to {scheme}://{addr}"
    );
    let shutdown = crate::shutdown_signal()?;
    let stopped = || {
        let stop = stop.clone();
        async move { stop.wait().await }
    };
    let mut servers = vec![tokio::spawn(serve(listener, sluice_router::app(router.clone()), options, stopped()))];
    if let Some(l) = admin {
        let app = sluice_router::admin_app(router, Arc::new(registry), config.admin.metrics_token.clone(), config.admin.token.clone());
        servers.push(tokio::spawn(serve(l, app, admin_options, stopped())));
    }
    shutdown.await;
    tracing::info!("shutting down: finishing requests in flight");
    stop.trigger();
    for s in servers {
        let _ = s.await;
    }
    let _ = watch.await;
    for r in reloaders {
        r.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

#[derive(Args)]
pub struct ControlArgs {
    /// The global store (default: `control.store` of the config).
    #[arg(long, env = "SLUICE_GLOBAL_STORE")]
    store: Option<String>,
    /// Where the control plane serves (default: `control.listen`).
    #[arg(long, value_parser = crate::listen_flag)]
    listen: Option<SocketAddr>,
    /// `[control]` (token, thresholds, provisioner) and `admin.metrics_token` come from this config.
    #[command(flatten)]
    config: ConfigArgs,
}

/// Connections the control plane's calls share.
const CONTROL_STORE_CONNECTIONS: usize = 4;

/// `sluice control`: serve until a signal.
pub async fn control(args: ControlArgs) -> Result<()> {
    let config = sluice_core::Config::load(args.config.config.as_deref())?;
    let c = &config.control;
    let Some(token) = c.token.clone() else {
        bail!("control.token is not set: the control plane's API needs one (e.g. SLUICE_CONTROL__TOKEN=$(openssl rand -hex 24))");
    };
    let Some(location) = args.store.or_else(|| c.store.as_ref().map(|s| s.expose().to_owned())) else {
        bail!("no global store: give --store, SLUICE_GLOBAL_STORE or control.store");
    };
    let shown = sluice_sql::redact(&location);
    let stores =
        tokio::task::spawn_blocking(move || (0..CONTROL_STORE_CONNECTIONS).map(|_| GlobalStore::open(&location)).collect::<Result<Vec<_>, _>>())
            .await?
            .with_context(|| format!("cannot open the global store {shown}"))?;
    let listen = args.listen.unwrap_or(c.listen);
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen} (--listen or control.listen)"))?;
    let addr = listener.local_addr()?;
    let settings = sluice_control::ControlSettings {
        token,
        metrics_token: config.admin.metrics_token.clone(),
        cell_metrics_token: c.cell_metrics_token.clone(),
        scrape_every: c.scrape_interval,
        provision_command: c.provision_command.clone(),
        provision_timeout: c.provision_timeout,
        allow_private_network: c.allow_private_network_destinations,
        thresholds: c.thresholds.clone(),
        public_url: format!("{}://{addr}", if config.server.tls_cert_file.is_some() { "https" } else { "http" }),
    };
    let cp = sluice_control::ControlPlane::new(stores, settings).context("cannot start the control plane")?;
    let mut registry = sluice_core::metrics::Registry::default();
    cp.metrics.register(&mut registry);
    let stop = Shutdown::new();
    let capacity = sluice_control::capacity::spawn(cp.clone(), stop.clone());
    let driver = sluice_control::migrate::spawn_driver(cp.clone(), c.migration_step_interval, stop.clone());
    tracing::info!(
        listen = %addr,
        store = %shown,
        provisioner = if c.provision_command.is_empty() { "none".to_owned() } else { c.provision_command.join(" ") },
        "Sluice is ready (control): the API is at {}://{addr}/api",
        if config.server.tls_cert_file.is_some() { "https" } else { "http" }
    );
    let shutdown = crate::shutdown_signal()?;
    let server_stop = stop.clone();
    let mut options = ServeOptions { same_origin: true, ..ServeOptions::from_config(&config.server) };
    // HTTPS with server.tls_cert_file/tls_key_file, as the Tracking API.
    options.tls = crate::server_tls("https control.listen", &config.server.tls_cert_file, &config.server.tls_key_file)?;
    let reloader = options.tls.as_ref().map(|t| t.spawn_reloader(sluice_ingest::tls::RELOAD_EVERY));
    let server = tokio::spawn(serve(listener, sluice_control::app(cp, Arc::new(registry)), options, async move { server_stop.wait().await }));
    shutdown.await;
    tracing::info!("shutting down");
    stop.trigger();
    let _ = server.await;
    let _ = capacity.await;
    let _ = driver.await;
    if let Some(r) = reloader {
        r.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

#[derive(Args)]
pub struct UsageArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[arg(long)]
    workspace: String,
    /// From this long ago (e.g. 24h, 7d) or this time (RFC 3339, unix seconds).
    #[arg(long, default_value = "24h")]
    since: String,
    /// Up to this time (RFC 3339, unix seconds; default: now).
    #[arg(long)]
    until: Option<String>,
    /// Print the rows as JSON.
    #[arg(long)]
    json: bool,
}

/// `sluice usage`.
pub fn usage(args: UsageArgs) -> Result<()> {
    let now = sluice_core::clock::now_ms() / 1000;
    let since = match humantime::parse_duration(&args.since) {
        Ok(d) => now - d.as_secs() as i64,
        Err(_) => sluice_control::parse_time(&args.since).map_err(|e| anyhow::anyhow!("--since {e}"))?,
    };
    let until = args.until.as_deref().map(sluice_control::parse_time).transpose().map_err(|e| anyhow::anyhow!("--until {e}"))?.unwrap_or(now + 1);
    let from = since - since.rem_euclid(3600);
    let rows = open(&args.store)?.usage(&args.workspace, from, until)?;
    let out = sluice_control::usage_json(&args.workspace, from, until, &rows);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("workspace {} from {} to {}", args.workspace, hour_text(from), hour_text(until));
    if rows.is_empty() {
        println!("(no usage reported)");
    }
    for (metric, total) in out["totals"].as_object().into_iter().flatten() {
        println!("  {metric:<40} {total}");
    }
    Ok(())
}

fn hour_text(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0).map_or_else(|| unix.to_string(), |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

#[derive(Args)]
pub struct MigrateArgs {
    #[command(subcommand)]
    action: MigrateAction,
    /// The control plane's URL.
    #[arg(long, env = "SLUICE_CONTROL_URL", default_value = "http://127.0.0.1:8060", global = true)]
    control: String,
    /// The operators' token (control.token).
    #[arg(long, env = "SLUICE_CONTROL_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Print the control plane's JSON answer.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum MigrateAction {
    /// Start moving a workspace to another cell.
    Start {
        #[arg(long)]
        workspace: String,
        /// The cell to move it to.
        #[arg(long)]
        to: String,
        /// Cumulative percentages of its traffic moved at each step, e.g. 10,50,100 (default: 100, one step).
        #[arg(long, value_delimiter = ',')]
        steps: Option<Vec<u8>>,
        /// Wait until the migration is done (or aborted), printing its progress.
        #[arg(long)]
        wait: bool,
        /// Copy the workspace's keys now, cut nothing over until `sluice migrate resume`.
        #[arg(long)]
        paused: bool,
        /// Move even into a cell at or over 70% of a threshold, or whose load the control plane has not read yet.
        #[arg(long)]
        force: bool,
        /// The most dedup keys per second the snapshot copies (default: as fast as the cells go); spares
        /// the two cells' other workspaces.
        #[arg(long)]
        copy_rate: Option<u64>,
    },
    /// One migration, or the most recent ones.
    Status {
        id: Option<String>,
    },
    /// Start no further cutover (one under way finishes).
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Give up a migration that has moved nothing yet: the workspace stays where it is.
    Abort {
        id: String,
    },
}

/// `sluice migrate`: the control plane's migration API from a terminal.
pub fn migrate(args: MigrateArgs) -> Result<()> {
    let Some(token) = args.token.clone() else { bail!("give the operators' token: --token or SLUICE_CONTROL_TOKEN (control.token)") };
    let http = reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(30)).build()?;
    let base = args.control.trim_end_matches('/').to_owned();
    let call = |method: reqwest::Method, path: &str, body: Option<serde_json::Value>| -> Result<serde_json::Value> {
        let mut req = http.request(method, format!("{base}{path}")).bearer_auth(&token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().with_context(|| format!("the control plane at {base} did not answer"))?;
        let status = resp.status();
        let value: serde_json::Value = resp.json().unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            bail!("{status}: {}", value["message"].as_str().unwrap_or("(no message)"));
        }
        Ok(value)
    };
    let show = |m: &serde_json::Value| {
        if args.json {
            println!("{}", serde_json::to_string_pretty(m).unwrap_or_default());
        } else {
            println!("{}", migration_line(m));
        }
    };
    match &args.action {
        MigrateAction::Start { workspace, to, steps, wait, paused, force, copy_rate } => {
            let mut body = serde_json::json!({ "workspace": workspace, "to": to, "paused": paused, "force": force });
            if let Some(s) = steps {
                body["steps"] = serde_json::json!(s);
            }
            if let Some(r) = copy_rate {
                body["copy_rate"] = serde_json::json!(r);
            }
            let m = call(reqwest::Method::POST, "/api/migrations", Some(body))?;
            show(&m);
            if *wait {
                let id = m["id"].as_str().unwrap_or_default().to_owned();
                let mut last = String::new();
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    let m = call(reqwest::Method::GET, &format!("/api/migrations/{id}"), None)?;
                    let line = migration_line(&m);
                    if line != last {
                        println!("{line}");
                        last = line;
                    }
                    if matches!(m["phase"].as_str(), Some("done" | "aborted")) {
                        break;
                    }
                }
            }
        }
        MigrateAction::Status { id: Some(id) } => show(&call(reqwest::Method::GET, &format!("/api/migrations/{id}"), None)?),
        MigrateAction::Status { id: None } => {
            let all = call(reqwest::Method::GET, "/api/migrations", None)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                let list = all["migrations"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    println!("(no migrations)");
                }
                for m in list.iter().take(20) {
                    println!("{}", migration_line(m));
                }
            }
        }
        MigrateAction::Pause { id } | MigrateAction::Resume { id } | MigrateAction::Abort { id } => {
            let action = match &args.action {
                MigrateAction::Pause { .. } => "pause",
                MigrateAction::Resume { .. } => "resume",
                _ => "abort",
            };
            show(&call(reqwest::Method::POST, &format!("/api/migrations/{id}/{action}"), None)?);
        }
    }
    Ok(())
}

/// One line of a migration's state, for a terminal.
fn migration_line(m: &serde_json::Value) -> String {
    let text = |k: &str| m[k].as_str().map(str::to_owned).unwrap_or_else(|| m[k].to_string());
    format!(
        "{} {} {} -> {}: {}{} step {}/{} buckets moved {}/100 keys copied {} delta lag {} source jobs {}{}",
        text("id"),
        text("workspace"),
        text("from"),
        text("to"),
        text("phase"),
        if m["paused"].as_bool() == Some(true) { " (paused)" } else { "" },
        m["step"],
        m["steps"].as_array().map_or(0, |s| s.len()),
        m["buckets_moved"],
        m["keys_copied"],
        m["delta_lag"],
        m["source_jobs_draining"],
        match m["error"].as_str() {
            Some(e) if !e.is_empty() => format!(" error: {e}"),
            _ => String::new(),
        }
    )
}

#[derive(Args)]
pub struct ProvisionLocalArgs {
    /// Where the new cell's config, data and log go (a folder per cell).
    #[arg(long)]
    dir: std::path::PathBuf,
}

/// `sluice provision-local`: the bundled provisioner (docs/CELLS.md). Reads
/// `{"cell", "tier", "control_url", "cell_token"}` on stdin, starts a
/// `sluice serve` cell on this machine (free local ports, data under
/// `--dir`), and prints `{"ingest_url", "admin_url"}`. The cell runs on
/// after this command ends; its pid is in `<dir>/<cell>/sluice.pid`.
pub fn provision_local(args: ProvisionLocalArgs) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Request {
        cell: String,
        control_url: String,
        cell_token: String,
    }
    let mut input = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin().take(64 * 1024), &mut input)?;
    let req: Request = serde_json::from_str(input.trim()).context("stdin: the provisioning request ({\"cell\", \"control_url\", \"cell_token\"})")?;
    if !sluice_core::config::valid_id(&req.cell) {
        bail!("cell id {:?}: 1-64 of A-Z a-z 0-9 _ -", req.cell);
    }
    let free_port = || -> Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
    let (ingest_port, admin_port) = (free_port()?, free_port()?);
    let dir = args.dir.join(&req.cell);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let toml_str = |s: &str| serde_json::to_string(s).expect("a string");
    let config = format!(
        "# Written by `sluice provision-local` for cell {cell}.\n\
         [server]\nlisten = \"127.0.0.1:{ingest_port}\"\ndata_dir = {data}\ntrusted_proxies = [\"127.0.0.1\"]\n\
         [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
         [cell]\nid = {cell_q}\ncontrol_url = {url}\ntoken = {token}\n",
        cell = req.cell,
        data = toml_str(&dir.join("data").display().to_string()),
        cell_q = toml_str(&req.cell),
        url = toml_str(&req.control_url),
        token = toml_str(&req.cell_token),
    );
    let config_path = dir.join("sluice.toml");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&config_path)?;
        std::io::Write::write_all(&mut f, config.as_bytes())?;
    }
    let log = std::fs::File::create(dir.join("sluice.log"))?;
    let child = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(std::env::current_exe()?)
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: it outlives this command and the control plane's signals.
            .process_group(0)
            .spawn()
            .context("cannot start sluice serve")?
    };
    std::fs::write(dir.join("sluice.pid"), format!("{}\n", child.id()))?;
    println!(
        "{}",
        serde_json::json!({ "ingest_url": format!("http://127.0.0.1:{ingest_port}"), "admin_url": format!("http://127.0.0.1:{admin_port}") })
    );
    Ok(())
}

#[derive(Subcommand)]
pub enum CellsCommand {
    /// Add or replace a cell.
    PutCell {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
        /// enterprise, mid or smb.
        #[arg(long)]
        tier: String,
        /// The cell's Tracking API (http://host:port).
        #[arg(long)]
        ingest_url: String,
        #[arg(long, default_value = "")]
        admin_url: String,
        /// provisioning, active, full, draining or retired.
        #[arg(long, default_value = "active")]
        state: String,
        /// An attribute, KEY=VALUE (repeatable), e.g. data_residency=eu.
        #[arg(long = "attribute", value_name = "KEY=VALUE")]
        attributes: Vec<String>,
    },
    /// Move a cell to another state.
    SetCellState {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
        state: String,
    },
    /// Add or replace a workspace.
    PutWorkspace {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
        #[arg(long)]
        tier: String,
        #[arg(long, default_value = "")]
        name: String,
        /// A constraint, KEY=VALUE (repeatable), e.g. data_residency=eu or dedicated=true.
        #[arg(long = "constraint", value_name = "KEY=VALUE")]
        constraints: Vec<String>,
        #[arg(long)]
        disabled: bool,
    },
    /// Register a write key for a source of a workspace (stored hashed).
    AddKey {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        workspace: String,
        #[arg(long)]
        source: String,
        /// The key (from the environment, to keep it out of shell history).
        #[arg(long, env = "SLUICE_WRITE_KEY", hide_env_values = true)]
        key: String,
    },
    /// Forget a write key.
    RemoveKey {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, env = "SLUICE_WRITE_KEY", hide_env_values = true)]
        key: String,
    },
    /// Pin a workspace to a cell, whatever its assignment says.
    Override {
        #[command(flatten)]
        store: StoreArgs,
        workspace: String,
        cell: String,
        #[arg(long, default_value = "set by an operator")]
        reason: String,
    },
    /// Remove a workspace's override.
    ClearOverride {
        #[command(flatten)]
        store: StoreArgs,
        workspace: String,
    },
    /// Place a workspace now (as a router would on its first request) and print where.
    Place {
        #[command(flatten)]
        store: StoreArgs,
        workspace: String,
    },
    /// Print cells (with their workspace counts) and workspaces (with where they are served) as JSON.
    Show {
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn pairs(items: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("{what} {p:?}: write KEY=VALUE"),
        })
        .collect()
}

fn open(store: &StoreArgs) -> Result<GlobalStore> {
    GlobalStore::open(&store.store).with_context(|| format!("cannot open the global store {}", sluice_sql::redact(&store.store)))
}

/// `sluice cells …`.
pub fn run(cmd: CellsCommand) -> Result<()> {
    match cmd {
        CellsCommand::PutCell { store, id, tier, ingest_url, admin_url, state, attributes } => {
            let url = sluice_core::config::HttpUrl::parse(&ingest_url).map_err(|e| anyhow::anyhow!("--ingest-url: {e}"))?;
            let cell = Cell {
                id,
                tier: Tier::parse(&tier)?,
                ingest_url: url.as_str().trim_end_matches('/').to_owned(),
                admin_url,
                state: CellState::parse(&state)?,
                attributes: pairs(&attributes, "--attribute")?,
            };
            open(&store)?.put_cell(&cell)?;
            println!("cell {} is {} ({})", cell.id, cell.state.as_str(), cell.ingest_url);
        }
        CellsCommand::SetCellState { store, id, state } => {
            open(&store)?.set_cell_state(&id, CellState::parse(&state)?)?;
            println!("cell {id} is {state}");
        }
        CellsCommand::PutWorkspace { store, id, tier, name, constraints, disabled } => {
            let ws = Workspace { id, name, tier: Tier::parse(&tier)?, constraints: pairs(&constraints, "--constraint")?, disabled };
            open(&store)?.put_workspace(&ws)?;
            println!("workspace {} ({}{})", ws.id, ws.tier.as_str(), if ws.disabled { ", disabled" } else { "" });
        }
        CellsCommand::AddKey { store, workspace, source, key } => {
            if !open(&store)?.add_write_key(&key, &workspace, &source)? {
                bail!("that write key is registered already (a key names one source)");
            }
            println!("write key added for source {source} of workspace {workspace}");
        }
        CellsCommand::RemoveKey { store, key } => {
            if !open(&store)?.remove_write_key(&key)? {
                bail!("no such write key");
            }
            println!("write key removed");
        }
        CellsCommand::Override { store, workspace, cell, reason } => {
            open(&store)?.set_override(&workspace, &cell, &reason)?;
            println!("workspace {workspace} is pinned to cell {cell}");
        }
        CellsCommand::ClearOverride { store, workspace } => {
            let had = open(&store)?.clear_override(&workspace)?;
            println!(
                "{}",
                if had { format!("workspace {workspace}'s override is removed") } else { format!("workspace {workspace} had no override") }
            );
        }
        CellsCommand::Place { store, workspace } => {
            let placed = open(&store)?.place(&workspace)?;
            println!("{}", serde_json::to_string_pretty(&placed)?);
        }
        CellsCommand::Show { store } => {
            let store = open(&store)?;
            let counts = store.workspace_counts()?;
            let cells: Vec<_> = store
                .cells()?
                .into_iter()
                .map(|c| {
                    let n = counts.get(&c.id).copied().unwrap_or(0);
                    serde_json::json!({ "cell": c, "workspaces": n })
                })
                .collect();
            let workspaces: Vec<_> = store.placements()?.into_iter().map(|(w, at)| serde_json::json!({ "workspace": w, "served_by": at })).collect();
            let out = serde_json::json!({ "mapping_version": store.mapping_version()?, "cells": cells, "workspaces": workspaces });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
    }
    Ok(())
}
