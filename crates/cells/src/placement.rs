//! Which cell a new workspace goes to (the seed's third routing step):
//! among the active cells of the workspace's tier whose attributes satisfy
//! its constraints, the least loaded (fewest workspaces; ties by cell id,
//! so every router computes the same answer from the same rows). When no
//! cell can take it, the answer says why, cell by cell.
//!
//! Constraints are `key = value` pairs a cell's attributes must carry
//! (`data_residency = "eu"`, `hipaa = "true"`). `dedicated = "true"` also
//! needs a cell that holds no other workspace; a cell whose attributes say
//! `dedicated = "true"` takes only workspaces that ask for one.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::CellsError;

/// A cell's (and a workspace's) size class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Enterprise,
    Mid,
    Smb,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Enterprise, Tier::Mid, Tier::Smb];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Enterprise => "enterprise",
            Tier::Mid => "mid",
            Tier::Smb => "smb",
        }
    }

    pub fn parse(s: &str) -> Result<Tier, CellsError> {
        Tier::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| CellsError::Invalid { what: "tier", why: format!("{s:?} is not one of enterprise, mid, smb") })
    }
}

/// Where a cell is in its life: provisioning → active → full → draining → retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellState {
    /// Being set up; not in the rotation until its health checks pass.
    Provisioning,
    /// Serves its workspaces and takes new ones.
    Active,
    /// Serves its workspaces, takes no new ones (a threshold was crossed).
    Full,
    /// Its workspaces are being moved away; takes no new ones.
    Draining,
    /// Gone.
    Retired,
}

impl CellState {
    pub const ALL: [CellState; 5] = [CellState::Provisioning, CellState::Active, CellState::Full, CellState::Draining, CellState::Retired];

    pub fn as_str(self) -> &'static str {
        match self {
            CellState::Provisioning => "provisioning",
            CellState::Active => "active",
            CellState::Full => "full",
            CellState::Draining => "draining",
            CellState::Retired => "retired",
        }
    }

    pub fn parse(s: &str) -> Result<CellState, CellsError> {
        CellState::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| CellsError::Invalid {
            what: "cell state",
            why: format!("{s:?} is not one of provisioning, active, full, draining, retired"),
        })
    }
}

/// A workspace: a customer, owning sources, destinations and connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workspace {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub tier: Tier,
    /// What a cell must satisfy to serve it (see the module docs).
    #[serde(default)]
    pub constraints: BTreeMap<String, String>,
    /// A disabled workspace's write keys are refused.
    #[serde(default)]
    pub disabled: bool,
}

/// A cell: one whole Sluice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    pub id: String,
    pub tier: Tier,
    /// Its Tracking API, where routers forward (`http://host:port`).
    pub ingest_url: String,
    /// Its admin port (metrics, config), for the control plane.
    #[serde(default)]
    pub admin_url: String,
    pub state: CellState,
    /// Region, `hipaa`, `dedicated`, …: matched against workspaces' constraints.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// Where a workspace is served, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub cell: String,
    pub reason: String,
    /// This call made the assignment (false: it was there, or an override).
    pub new: bool,
}

/// Ids of workspaces and cells: 1–64 of `A-Z a-z 0-9 _ -`, as a cell's
/// source and destination ids (a workspace id travels into a cell's config).
pub fn check_id(what: &'static str, id: &str) -> Result<(), CellsError> {
    if sluice_core::config::valid_id(id) {
        Ok(())
    } else {
        Err(CellsError::Invalid { what, why: format!("{id:?}: use 1 to 64 of A-Z, a-z, 0-9, '_', '-'") })
    }
}

/// Why `cell` cannot take `workspace` (`load`: its workspaces now); `None` if it can.
fn refusal(workspace: &Workspace, cell: &Cell, load: u64) -> Option<String> {
    if cell.state != CellState::Active {
        return Some(format!("state {}", cell.state.as_str()));
    }
    if cell.tier != workspace.tier {
        return Some(format!("tier {}", cell.tier.as_str()));
    }
    let wants_dedicated = workspace.constraints.get("dedicated").is_some_and(|v| v == "true");
    let is_dedicated = cell.attributes.get("dedicated").is_some_and(|v| v == "true");
    if is_dedicated && !wants_dedicated {
        return Some("dedicated to workspaces that ask for one".to_owned());
    }
    for (key, want) in &workspace.constraints {
        match cell.attributes.get(key) {
            Some(have) if have == want => {}
            Some(have) => return Some(format!("{key} = {have:?}, not {want:?}")),
            None => return Some(format!("no {key} attribute (wants {want:?})")),
        }
    }
    if wants_dedicated && load > 0 {
        return Some(format!("dedicated, and holds {load} workspace(s) already"));
    }
    None
}

/// The cell `workspace` goes to: the least loaded of those that can take
/// it (`load`: workspaces per cell; missing = 0), with the reason; or why
/// none can.
pub fn choose(workspace: &Workspace, cells: &[Cell], load: &HashMap<String, u64>) -> Result<(String, String), String> {
    let mut best: Option<(&Cell, u64)> = None;
    let mut refused = Vec::new();
    for cell in cells {
        let n = load.get(&cell.id).copied().unwrap_or(0);
        match refusal(workspace, cell, n) {
            Some(why) => refused.push(format!("{}: {why}", cell.id)),
            None if best.is_none_or(|(b, bn)| (n, &cell.id) < (bn, &b.id)) => best = Some((cell, n)),
            None => {}
        }
    }
    if let Some((cell, n)) = best {
        let mut reason = format!("least-loaded active {} cell ({n} workspaces)", cell.tier.as_str());
        if !workspace.constraints.is_empty() {
            let c: Vec<String> = workspace.constraints.iter().map(|(k, v)| format!("{k}={v}")).collect();
            reason.push_str(&format!(" satisfying {}", c.join(", ")));
        }
        return Ok((cell.id.clone(), reason));
    }
    if cells.is_empty() {
        return Err("there are no cells".to_owned());
    }
    // Bounded: a registry of many cells must not make an unbounded message.
    const SHOWN: usize = 20;
    let more = refused.len().saturating_sub(SHOWN);
    refused.truncate(SHOWN);
    let mut why = format!("no cell can take it ({})", refused.join("; "));
    if more > 0 {
        why.push_str(&format!(" and {more} more"));
    }
    Err(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(id: &str, tier: Tier, state: CellState, attrs: &[(&str, &str)]) -> Cell {
        Cell {
            id: id.into(),
            tier,
            ingest_url: format!("http://{id}"),
            admin_url: String::new(),
            state,
            attributes: attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn ws(tier: Tier, constraints: &[(&str, &str)]) -> Workspace {
        Workspace {
            id: "w".into(),
            name: String::new(),
            tier,
            constraints: constraints.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            disabled: false,
        }
    }

    #[test]
    fn the_least_loaded_active_cell_of_the_tier_ties_broken_by_id() {
        let cells = [
            cell("c3", Tier::Smb, CellState::Active, &[]),
            cell("c1", Tier::Smb, CellState::Active, &[]),
            cell("c2", Tier::Smb, CellState::Full, &[]),
            cell("c0", Tier::Mid, CellState::Active, &[]),
        ];
        let load: HashMap<String, u64> = [("c1".to_owned(), 5), ("c3".to_owned(), 5), ("c2".to_owned(), 0)].into();
        assert_eq!(choose(&ws(Tier::Smb, &[]), &cells, &load).unwrap().0, "c1");
        let load: HashMap<String, u64> = [("c1".to_owned(), 6), ("c3".to_owned(), 5)].into();
        let (cell, reason) = choose(&ws(Tier::Smb, &[]), &cells, &load).unwrap();
        assert_eq!(cell, "c3");
        assert!(reason.contains("least-loaded active smb cell (5 workspaces)"), "{reason}");
    }

    #[test]
    fn constraints_and_dedicated_cells_are_honoured_and_refusals_say_why() {
        let cells = [
            cell("us1", Tier::Enterprise, CellState::Active, &[("data_residency", "us")]),
            cell("eu1", Tier::Enterprise, CellState::Active, &[("data_residency", "eu")]),
            cell("ded", Tier::Enterprise, CellState::Active, &[("data_residency", "eu"), ("dedicated", "true")]),
        ];
        let none = HashMap::new();
        assert_eq!(choose(&ws(Tier::Enterprise, &[("data_residency", "eu")]), &cells, &none).unwrap().0, "eu1", "not the dedicated cell");
        let dedicated = ws(Tier::Enterprise, &[("data_residency", "eu"), ("dedicated", "true")]);
        assert_eq!(choose(&dedicated, &cells, &none).unwrap().0, "ded");
        let busy: HashMap<String, u64> = [("ded".to_owned(), 1)].into();
        let why = choose(&dedicated, &cells, &busy).unwrap_err();
        assert!(why.contains("ded: dedicated, and holds 1 workspace(s) already"), "{why}");
        assert!(why.contains("us1: data_residency = \"us\", not \"eu\""), "{why}");
        assert!(why.contains("eu1: no dedicated attribute"), "{why}");
        let why = choose(&ws(Tier::Smb, &[]), &cells, &none).unwrap_err();
        assert!(why.contains("us1: tier enterprise"), "{why}");
        assert_eq!(choose(&ws(Tier::Smb, &[]), &[], &none).unwrap_err(), "there are no cells");
    }

    #[test]
    fn a_long_refusal_is_bounded() {
        let cells: Vec<Cell> = (0..500).map(|i| cell(&format!("c{i}"), Tier::Mid, CellState::Full, &[])).collect();
        let why = choose(&ws(Tier::Mid, &[]), &cells, &HashMap::new()).unwrap_err();
        assert!(why.ends_with("and 480 more"), "{why}");
        assert!(why.len() < 1000, "{}", why.len());
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("workspace id", "acme-eu_1").is_ok());
        // No '.': a workspace id is written into cells' configs, whose ids have none.
        for bad in ["", "a.b", "a b", "x'; DROP TABLE", &"a".repeat(65), "é"] {
            assert!(check_id("workspace id", bad).is_err(), "{bad:?}");
        }
    }
}
