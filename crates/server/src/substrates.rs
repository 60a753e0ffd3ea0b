//! Which substrates this server runs: each enabled one is started here, and
//! one the host cannot run is recorded with the reason, for `berth doctor`
//! and for the `substrate_unavailable` errors.

use crate::config::Config;
use crate::serve::ServerError;
use berth_core::manifest::Isolation;
use berth_sandbox::process::{ProcessConfig, ProcessDriver};
use berth_sandbox::Substrates;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The guest binary ships beside `berth`.
pub fn guest_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("berth-guest")))
        .unwrap_or_else(|| PathBuf::from("berth-guest"))
}

/// Starts every enabled substrate. The process substrate failing is fatal
/// when it is the default; any other failure only makes it unavailable.
pub async fn build(cfg: &Config, data: &Path) -> Result<Substrates, ServerError> {
    let mut all = Substrates::new();
    for iso in Isolation::ALL {
        if !cfg.substrates.contains(&iso) {
            all.unavailable(iso.as_str(), "disabled in the server's configuration");
            continue;
        }
        let started = match iso {
            Isolation::Process => process(cfg, data),
            Isolation::Gvisor | Isolation::Microvm => Err(berth_sandbox::DriverError::Unavailable {
                substrate: iso.as_str(),
                reason: "not wired yet".into(),
            }),
        };
        match started {
            Ok(driver) => all.insert(driver),
            Err(e) if iso == cfg.isolation.default => return Err(e.into()),
            Err(e) => {
                tracing::warn!(substrate = iso.as_str(), error = %e, "substrate unavailable");
                all.unavailable(iso.as_str(), e.to_string());
            }
        }
    }
    Ok(all)
}

fn process(
    cfg: &Config,
    data: &Path,
) -> Result<Arc<dyn berth_sandbox::Driver>, berth_sandbox::DriverError> {
    let mut pcfg = ProcessConfig::new(data.join("sandboxes"), guest_binary());
    pcfg.uid_base = cfg.sandbox_uid_base;
    pcfg.uid_count = cfg.sandbox_uid_count;
    pcfg.tmp_size_mb = cfg.sandbox_tmp_mb;
    pcfg.cgroup_name = cfg.sandbox_cgroup.clone();
    Ok(Arc::new(ProcessDriver::new(pcfg)?))
}
