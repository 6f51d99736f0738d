//! `sluice dead-letters list | show | replay | discard`: the records the
//! route could not plan, kept in the control database (`control.sqlite` in
//! `data_dir`, or the `deliver.jobdb_url` database), found with `--config`
//! as `sluice replay` finds it. Replays run in the process that runs the
//! route (within a second); this tool files the request and waits.
//! The JSON of a dead letter here is the admin API's ([`sluice_admin::views::dead_letter_json`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use sluice_admin::views::dead_letter_json;
use sluice_core::config::Flags;
use sluice_core::Config;
use sluice_deliver::control::{ControlDb, DeadLetter, DeadLetterCounts};

use crate::ConfigArgs;

#[derive(Args)]
pub struct StoreArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Overrides `server.data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl StoreArgs {
    fn open(&self) -> Result<ControlDb> {
        let config = Config::load_with(self.config.config.as_deref(), Flags { data_dir: self.data_dir.clone(), ..Flags::default() })?;
        // control.sqlite in data_dir, or the control tables of deliver.jobdb_url (shared by every process).
        Ok(ControlDb::open_for(&config)?)
    }
}

#[derive(Subcommand)]
pub enum DeadLettersCommand {
    /// Dead letters, newest first, with the store's counts.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only ids below this one (the next page).
        #[arg(long)]
        before: Option<i64>,
        /// Print JSON ({"counts", "dead_letters"}) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter, whole: where it was, why, its key and payload, its replays.
    Show {
        id: i64,
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
    /// Ask the route to re-plan dead letters with its current planner and
    /// catalog; waits for the outcome (a failure keeps the dead letter, with
    /// its error).
    Replay {
        /// The dead letter (or --all).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Every dead letter neither replayed nor discarded.
        #[arg(long)]
        all: bool,
        /// Return once the request is filed.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Give up on dead letters (they stay listed as discarded until the
    /// store needs their room).
    Discard {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub fn run(cmd: DeadLettersCommand) -> Result<()> {
    match cmd {
        DeadLettersCommand::List { store, limit, before, json } => {
            let db = store.open()?;
            let counts = db.dead_letter_counts()?;
            let letters = db.dead_letters(before, limit)?;
            if json {
                let out = json!({"counts": counts, "dead_letters": letters.iter().map(|d| dead_letter_json(d, false)).collect::<Vec<_>>()});
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            println!("{}  ({})", describe(&counts), db.location());
            if letters.is_empty() {
                return Ok(());
            }
            println!("{:>8}  {:<24}  {:<6}  {:<16}  {:<18}  reason", "id", "stored", "stage", "state", "record");
            for d in &letters {
                println!(
                    "{:>8}  {:<24}  {:<6}  {:<16}  {:<18}  {}",
                    d.id,
                    fmt_ms(d.created_at_ms),
                    d.stage,
                    d.state(),
                    format!("{}/{}@{}", d.topic, d.partition, d.offset),
                    one_line(&d.reason, 100)
                );
                println!(
                    "{:>8}  key {}  payload {}",
                    "",
                    one_line(&String::from_utf8_lossy(&d.key), 60),
                    one_line(&String::from_utf8_lossy(&d.payload), 100)
                );
            }
            if letters.len() == limit.clamp(1, 1000) {
                println!("(more: --before {})", letters.last().map_or(0, |d| d.id));
            }
            Ok(())
        }
        DeadLettersCommand::Show { id, store, json } => {
            let db = store.open()?;
            let d = db.dead_letter(id)?.with_context(|| format!("no dead letter {id} in {}", db.location()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&dead_letter_json(&d, true))?);
                return Ok(());
            }
            println!("dead letter {}  state {}  stored {}  by the {}", d.id, d.state(), fmt_ms(d.created_at_ms), d.stage);
            println!("  record      {} partition {} offset {} (logged {})", d.topic, d.partition, d.offset, fmt_ms(d.record_ms));
            match (&d.destination, d.generation) {
                (Some(dest), g) => println!("  replays as replay {g} for destination {dest}"),
                (None, _) => println!("  replays as the route: generation 0, every connected destination"),
            }
            println!("  reason      {}", d.reason);
            if let Some(t) = d.replay_requested_at_ms {
                println!("  replay requested {}", fmt_ms(t));
            }
            if let Some(t) = d.replayed_at_ms {
                println!("  replayed    {} ({} jobs)", fmt_ms(t), d.replayed_jobs.unwrap_or(0));
            }
            if let Some(t) = d.discarded_at_ms {
                println!("  discarded   {}", fmt_ms(t));
            }
            if let Some(e) = &d.last_error {
                println!("  last replay failed ({} attempts): {e}", d.attempts);
            }
            println!("  key         {}", printable(&d.key));
            let cut = if d.truncated { " — cut to the store's limit: not replayable from here" } else { "" };
            println!("  payload     {} bytes{cut}", d.payload_size);
            println!("{}", printable(&d.payload));
            Ok(())
        }
        DeadLettersCommand::Replay { id, all, no_wait, store } => {
            let db = store.open()?;
            let target = if all { None } else { Some(open_one(&db, id.expect("clap requires an id without --all"))?.id) };
            let n = db.request_dead_letter_replay(target)?;
            eprintln!("replay requested for {n} dead letter(s)");
            if no_wait || n == 0 {
                return Ok(());
            }
            eprintln!("waiting for the route to run it (Ctrl-C leaves it requested; it runs when the route next runs)…");
            loop {
                std::thread::sleep(Duration::from_millis(300));
                match target {
                    Some(id) => {
                        let d = db.dead_letter(id)?.context("the dead letter vanished")?;
                        if d.replay_requested_at_ms.is_some() {
                            continue;
                        }
                        return match d.state() {
                            "replayed" => {
                                println!("dead letter {id} replayed: {} jobs", d.replayed_jobs.unwrap_or(0));
                                Ok(())
                            }
                            "discarded" => bail!("dead letter {id} was discarded meanwhile"),
                            _ => bail!("dead letter {id}: replay failed: {}", d.last_error.unwrap_or_default()),
                        };
                    }
                    None => {
                        let counts = db.dead_letter_counts()?;
                        if counts.replay_requested > 0 {
                            continue;
                        }
                        println!("{}", describe(&counts));
                        if counts.replay_failed > 0 {
                            bail!("{} dead letter(s) failed to replay (sluice dead-letters list)", counts.replay_failed);
                        }
                        return Ok(());
                    }
                }
            }
        }
        DeadLettersCommand::Discard { id, all, store } => {
            let db = store.open()?;
            let target = if all { None } else { Some(open_one(&db, id.expect("clap requires an id without --all"))?.id) };
            let n = db.discard_dead_letters(target)?;
            println!("{n} dead letter(s) discarded");
            Ok(())
        }
    }
}

/// Dead letter `id`, which must be open (neither replayed nor discarded).
fn open_one(db: &ControlDb, id: i64) -> Result<DeadLetter> {
    let d = db.dead_letter(id)?.with_context(|| format!("no dead letter {id} in {}", db.location()))?;
    if !d.is_open() {
        bail!("dead letter {id} is {} already", d.state());
    }
    Ok(d)
}

/// One line of counts.
fn describe(c: &DeadLetterCounts) -> String {
    format!(
        "dead letters: {} open ({} replay requested, {} replay failed), {} replayed, {} discarded; {} rows, {} bytes",
        c.open, c.replay_requested, c.replay_failed, c.replayed, c.discarded, c.rows, c.bytes
    )
}

fn fmt_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|d| d.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()).unwrap_or_else(|| ms.to_string())
}

/// `text` on one line, at most `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}

/// Bytes for a terminal: UTF-8 as is (control characters escaped), else hex.
fn printable(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.chars().map(|c| if c.is_control() && c != '\n' && c != '\t' { c.escape_default().to_string() } else { c.to_string() }).collect(),
        Err(_) => format!("(not UTF-8) hex {}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()),
    }
}
