//! The catalog: the in-memory snapshot of the control database shared by
//! route and directors, refreshed every [`REFRESH_INTERVAL`](super::REFRESH_INTERVAL),
//! and the per-destination gates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sluice_core::config::{DeliverConfig, DestinationConfig, SourceConfig};
use sluice_core::Config;
use tokio::sync::Notify;

use super::ControlDb;
use crate::executor::Target;
use crate::gate::{Destination, DestinationSettings, Qos};
use crate::DeliverError;

/// What the control database says, at one moment.
#[derive(Debug, Clone, Default)]
pub struct CatalogSnapshot {
    /// Every source, with whether it is disabled.
    pub sources: Vec<(SourceConfig, bool)>,
    pub destinations: HashMap<String, DestinationConfig>,
    /// source id → destination ids.
    pub connections: HashMap<String, Vec<String>>,
    pub qos: HashMap<String, Qos>,
    /// source id → its tracking plan, as stored (the route compiles it).
    pub plans: HashMap<String, StoredPlan>,
    /// function id → its live version's code.
    pub functions: HashMap<String, LiveFunction>,
}

/// The version of a function that runs, with its code.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveFunction {
    pub version: i64,
    pub code: Arc<str>,
}

/// One deployed version of a function.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionVersion {
    pub version: i64,
    pub created_at_ms: i64,
    pub code: String,
}

/// A source's tracking plan as the control database holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPlan {
    pub doc: serde_json::Value,
    /// 1 when made, one more on each change.
    pub version: i64,
    pub updated_at_ms: i64,
}

/// The live view of the control database shared by route and directors,
/// and the per-destination gates.
pub struct Catalog {
    control: Mutex<ControlDb>,
    snapshot: RwLock<Arc<CatalogSnapshot>>,
    gates: Mutex<HashMap<String, Arc<Destination>>>,
    defaults: DeliverConfig,
    /// Woken on every permit release and settings change (directors wait on it).
    pub wake: Arc<Notify>,
}

impl Catalog {
    /// Open the control database, seed it from `config`, read it.
    pub fn open(config: &Config) -> Result<Arc<Catalog>, DeliverError> {
        let mut control = ControlDb::open_for(config)?;
        control.seed(config)?;
        let catalog = Arc::new(Catalog {
            control: Mutex::new(control),
            snapshot: RwLock::new(Arc::new(CatalogSnapshot::default())),
            gates: Mutex::new(HashMap::new()),
            defaults: config.deliver.clone(),
            wake: Arc::new(Notify::new()),
        });
        catalog.refresh()?;
        Ok(catalog)
    }

    pub fn snapshot(&self) -> Arc<CatalogSnapshot> {
        self.snapshot.read().expect("snapshot lock").clone()
    }

    /// Seed the control database from `config` again (its config-made rows
    /// replaced, as at start), then re-read it. Blocks.
    pub fn reseed(&self, config: &Config) -> Result<(), DeliverError> {
        self.control.lock().expect("control lock").seed(config)?;
        self.refresh()
    }

    pub fn with_control<T>(&self, f: impl FnOnce(&ControlDb) -> Result<T, DeliverError>) -> Result<T, DeliverError> {
        f(&self.control.lock().expect("control lock"))
    }

    /// Re-read the control database (blocking: call from a blocking thread).
    pub fn refresh(&self) -> Result<(), DeliverError> {
        // Held until the snapshot is installed: two refreshes (the timer, an
        // admin change) cannot interleave and install an older view last.
        let control = self.control.lock().expect("control lock");
        let snap = control.read()?;
        {
            let mut gates = self.gates.lock().expect("gates lock");
            for (id, d) in &snap.destinations {
                let settings = self.settings_for(d, &snap);
                let qos = snap.qos.get(id).cloned().unwrap_or_default();
                match gates.get(id) {
                    Some(g) => g.update(settings, &qos),
                    None => {
                        let g = Destination::new(
                            id.clone(),
                            settings.clone(),
                            self.defaults.circuit_failures.get(),
                            self.defaults.circuit_cooldown,
                            self.wake.clone(),
                        );
                        g.update(settings, &qos);
                        gates.insert(id.clone(), g);
                    }
                }
            }
            // A destination removed from the control database: its jobs wait (paused) until it returns or they expire.
            for (id, g) in gates.iter() {
                if !snap.destinations.contains_key(id) {
                    g.update((*g.settings()).clone(), &Qos { paused: true, ..Qos::default() });
                }
            }
        }
        *self.snapshot.write().expect("snapshot lock") = Arc::new(snap);
        Ok(())
    }

    fn settings_for(&self, d: &DestinationConfig, snap: &CatalogSnapshot) -> DestinationSettings {
        let policy = d.retry_policy(self.defaults.retry_policy());
        DestinationSettings {
            target: Target {
                url: d.url.clone(),
                secret: d.secret.clone(),
                allow_private_network: d.allow_private_network || self.defaults.allow_private_network,
                request_timeout: policy.request_timeout,
            },
            policy,
            max_in_flight: d.max_in_flight.unwrap_or(self.defaults.max_in_flight.get()),
            rate_limit: d.rate_limit.unwrap_or(self.defaults.rate_limit),
            function: d.function.as_ref().map(|f| crate::function::Attached::new(f, &snap.functions)),
            batch: d.batch_limits(),
            native: d.native_target(),
        }
    }

    /// The gate of destination `id`; an unknown id gets a paused placeholder.
    pub fn destination(&self, id: &str) -> Arc<Destination> {
        let mut gates = self.gates.lock().expect("gates lock");
        gates
            .entry(id.to_owned())
            .or_insert_with(|| {
                tracing::warn!(destination = %id, "jobs for a destination that is not configured wait, paused");
                let settings = DestinationSettings {
                    target: Target { url: String::new(), secret: None, allow_private_network: false, request_timeout: Duration::from_secs(10) },
                    policy: self.defaults.retry_policy(),
                    max_in_flight: 1,
                    rate_limit: 0,
                    function: None,
                    batch: None,
                    native: None,
                };
                let g = Destination::new(id.to_owned(), settings.clone(), 1, Duration::from_secs(1), self.wake.clone());
                g.update(settings, &Qos { paused: true, ..Qos::default() });
                g
            })
            .clone()
    }

    /// The global retry policy (`[deliver]`).
    pub fn retry_policy(&self) -> sluice_core::config::RetryPolicy {
        self.defaults.retry_policy()
    }
}
