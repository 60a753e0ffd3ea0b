//! Which substrates this server runs: each enabled one is started here, and
//! one the host cannot run is recorded with the reason, for `berth doctor`
//! and for the `substrate_unavailable` errors.

use crate::config::Config;
use crate::serve::ServerError;
use berth_core::manifest::Isolation;
use berth_sandbox::gvisor::{GvisorConfig, GvisorDriver};
use berth_sandbox::microvm::{Accel, MicrovmConfig, MicrovmDriver};
use berth_sandbox::process::{ProcessConfig, ProcessDriver};
use berth_sandbox::{SubstrateReport, Substrates};
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
            Isolation::Gvisor => gvisor(cfg, data).await,
            Isolation::Microvm => microvm(cfg, data),
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

/// The gVisor driver's settings: its own cgroup parent beside the
/// process substrate's, state under the data directory.
pub fn gvisor_config(cfg: &Config, data: &Path) -> GvisorConfig {
    let mut g = GvisorConfig::new(data.join("gvisor"), guest_binary());
    g.runsc = cfg.gvisor.runsc.clone();
    g.platforms = cfg.gvisor.platforms.clone();
    g.cgroup_name = format!("{}-gvisor", cfg.sandbox_cgroup);
    g.tmp_size_mb = cfg.sandbox_tmp_mb;
    g
}

/// The microVM driver's settings.
pub fn microvm_config(cfg: &Config, data: &Path) -> MicrovmConfig {
    let mut m = MicrovmConfig::new(data.join("microvm"), guest_binary(), &cfg.microvm.kernel);
    m.qemu = cfg.microvm.qemu.clone();
    m.python = cfg.python.clone();
    m.accel = match cfg.microvm.accel.as_str() {
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        _ => Accel::Auto,
    };
    m.cgroup_name = format!("{}-vm", cfg.sandbox_cgroup);
    m.uid_base = cfg.microvm.uid_base;
    m.uid_count = cfg.microvm.uid_count;
    m
}

/// What `berth doctor` prints: each substrate's own probe, with this
/// configuration, without starting a server.
pub async fn probe_all(cfg: &Config) -> Vec<SubstrateReport> {
    let data = cfg.data_dir.clone();
    let gvisor_cfg = gvisor_config(cfg, &data);
    let gvisor = tokio::task::spawn_blocking(move || berth_sandbox::gvisor::probe(&gvisor_cfg));
    let microvm = berth_sandbox::microvm::probe(&microvm_config(cfg, &data)).await;
    let gvisor = gvisor.await.unwrap_or_else(|e| SubstrateReport {
        substrate: "gvisor".into(),
        available: false,
        detail: format!("probe failed: {e}"),
    });
    let process = berth_sandbox::probe::probe();
    let process_ok = process.running_as_root && process.cgroup_v1.iter().all(|c| c.present);
    vec![
        SubstrateReport {
            substrate: "process".into(),
            available: process_ok,
            detail: if process_ok {
                "namespaces, seccomp, cgroup v1 limits".into()
            } else {
                "needs root and the cgroup v1 memory, pids and cpu controllers".into()
            },
        },
        gvisor,
        microvm,
    ]
}

async fn gvisor(
    cfg: &Config,
    data: &Path,
) -> Result<Arc<dyn berth_sandbox::Driver>, berth_sandbox::DriverError> {
    let g = gvisor_config(cfg, data);
    // The platform probe runs a container: keep it off the runtime threads.
    let driver = tokio::task::spawn_blocking(move || GvisorDriver::new(g))
        .await
        .map_err(|e| berth_sandbox::DriverError::Unavailable {
            substrate: "gvisor",
            reason: e.to_string(),
        })??;
    Ok(Arc::new(driver))
}

fn microvm(
    cfg: &Config,
    data: &Path,
) -> Result<Arc<dyn berth_sandbox::Driver>, berth_sandbox::DriverError> {
    Ok(Arc::new(MicrovmDriver::new(microvm_config(cfg, data))?))
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

/// `GET /v1/substrates`: what this server runs, its default, and the
/// weakest substrate the caller's tenant may use.
pub async fn list(
    axum::extract::State(s): axum::extract::State<crate::AppState>,
    auth: crate::auth::Auth,
) -> axum::Json<serde_json::Value> {
    let policy = &s.cfg.isolation;
    axum::Json(serde_json::json!({
        "substrates": s.sessions.substrates().reports(),
        "default": policy.default.as_str(),
        "tenant_requires": policy.required(auth.0.tenant()).as_str(),
    }))
}
