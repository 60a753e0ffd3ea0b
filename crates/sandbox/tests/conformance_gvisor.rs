//! The conformance suite on the gVisor substrate (real runsc).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod conformance;

use std::path::{Path, PathBuf};

use berth_sandbox::process::{CGROUP_ROOT, CONTROLLERS};
use berth_sandbox::Driver;
use common::*;

struct Gvisor(GvisorEnv);

impl conformance::Harness for Gvisor {
    fn driver(&self) -> &dyn Driver {
        &self.0.driver
    }

    fn traces(&self, id: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = CONTROLLERS
            .iter()
            .map(|c| {
                Path::new(CGROUP_ROOT)
                    .join(c)
                    .join(&self.0.cfg.cgroup_name)
                    .join(id)
            })
            .collect();
        v.push(self.0.cfg.state_dir.join(id));
        v
    }

    fn t8_starts(&self) -> usize {
        25
    }
}

conformance_suite!(Gvisor(gvisor_env()));
