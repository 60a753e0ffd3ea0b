//! The substrates one host runs, by name, and why the others are missing.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{Driver, DriverError, SubstrateReport, SweepReport};

/// Names every substrate may have, weakest first.
pub const SUBSTRATES: [&str; 3] = ["process", "gvisor", "microvm"];

/// The drivers a server runs. Built once at start-up; cheap to clone.
#[derive(Clone, Default)]
pub struct Substrates {
    drivers: BTreeMap<&'static str, Arc<dyn Driver>>,
    missing: BTreeMap<&'static str, String>,
}

impl Substrates {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a working driver under its substrate name.
    pub fn insert(&mut self, driver: Arc<dyn Driver>) {
        self.missing.remove(driver.substrate());
        self.drivers.insert(driver.substrate(), driver);
    }

    /// Records that `substrate` cannot run here, and why.
    pub fn unavailable(&mut self, substrate: &'static str, reason: impl Into<String>) {
        self.drivers.remove(substrate);
        self.missing.insert(substrate, reason.into());
    }

    /// The driver of `substrate`, or why there is none.
    pub fn get(&self, substrate: &str) -> Result<&Arc<dyn Driver>, DriverError> {
        if let Some(d) = self.drivers.get(substrate) {
            return Ok(d);
        }
        let name = SUBSTRATES
            .into_iter()
            .find(|s| *s == substrate)
            .unwrap_or("unknown");
        let reason = self
            .missing
            .get(name)
            .cloned()
            .unwrap_or_else(|| "not enabled on this server".to_owned());
        Err(DriverError::Unavailable {
            substrate: name,
            reason,
        })
    }

    /// One line per known substrate: available, or why not.
    pub fn reports(&self) -> Vec<SubstrateReport> {
        SUBSTRATES
            .into_iter()
            .map(|name| match self.drivers.get(name) {
                Some(_) => SubstrateReport {
                    substrate: name.to_owned(),
                    available: true,
                    detail: "enabled".to_owned(),
                },
                None => SubstrateReport {
                    substrate: name.to_owned(),
                    available: false,
                    detail: self
                        .missing
                        .get(name)
                        .cloned()
                        .unwrap_or_else(|| "not enabled on this server".to_owned()),
                },
            })
            .collect()
    }

    /// Sweeps every driver; the reports are added up.
    pub async fn sweep(&self) -> Result<SweepReport, DriverError> {
        let mut total = SweepReport::default();
        for driver in self.drivers.values() {
            let r = driver.sweep().await?;
            total.processes_killed += r.processes_killed;
            total.cgroups_removed += r.cgroups_removed;
            total.mounts_removed += r.mounts_removed;
            total.state_dirs_removed += r.state_dirs_removed;
        }
        Ok(total)
    }
}
