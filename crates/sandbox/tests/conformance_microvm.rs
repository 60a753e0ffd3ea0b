//! The conformance suite on the microVM substrate: real QEMU (TCG here),
//! the kernel from scripts/build-kernel, sessions cloned from a template.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod conformance;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use berth_sandbox::microvm::{Accel, MicrovmConfig, MicrovmDriver};
use berth_sandbox::process::{CGROUP_ROOT, CONTROLLERS};
use berth_sandbox::Driver;
use common::*;

static N: AtomicU32 = AtomicU32::new(0);

struct Microvm {
    driver: MicrovmDriver,
    cfg: MicrovmConfig,
    _state: tempfile::TempDir,
}

impl Drop for Microvm {
    fn drop(&mut self) {
        for c in CONTROLLERS {
            let _ = std::fs::remove_dir(Path::new(CGROUP_ROOT).join(c).join(&self.cfg.cgroup_name));
        }
    }
}

fn kernel() -> PathBuf {
    let path = std::env::var("BERTH_TEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/cache/berth-ci/kernel/vmlinux"));
    assert!(
        path.is_file(),
        "guest kernel {path:?} missing: build it with `scripts/build-kernel /var/cache/berth-ci/kernel`"
    );
    path
}

fn microvm() -> Microvm {
    require_host();
    let n = N.fetch_add(1, Ordering::SeqCst);
    let state = tempfile::Builder::new()
        .prefix("berth-vm-conf")
        .tempdir()
        .unwrap();
    let mut cfg = MicrovmConfig::new(state.path(), guest_binary(), kernel());
    cfg.images_dir = Some(PathBuf::from("/var/tmp/berth-test-vm-images"));
    cfg.cgroup_name = format!("berth-vm-conf-{}-{n}", std::process::id());
    cfg.uid_base = 700_000 + n * 100 + (std::process::id() % 1000) * 2_000;
    cfg.uid_count = 100;
    cfg.accel = Accel::Tcg;
    let driver = MicrovmDriver::new(cfg.clone()).unwrap();
    Microvm {
        driver,
        cfg,
        _state: state,
    }
}

impl conformance::Harness for Microvm {
    fn driver(&self) -> &dyn Driver {
        &self.driver
    }

    fn traces(&self, id: &str) -> Vec<PathBuf> {
        conformance::cgroup_traces(
            &self.cfg.cgroup_name,
            id,
            self.cfg.state_dir.join("vms").join(id),
        )
    }

    fn t8_starts(&self) -> usize {
        20
    }
}

conformance_suite!(microvm());
