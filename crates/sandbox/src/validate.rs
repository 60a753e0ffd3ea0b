//! Checks of a [`SandboxSpec`] every substrate makes before it starts one.

use crate::{DriverError, SandboxSpec};

/// Sandbox ids name cgroups and directories: `[a-z0-9-]{1,64}`.
pub(crate) fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The version's directories, the entrypoint and the limits. `max_vcpus`
/// and `min_memory` are the substrate's own bounds.
pub(crate) fn version(
    spec: &SandboxSpec,
    max_vcpus: f64,
    min_memory: u64,
) -> Result<(), DriverError> {
    if !spec.app_dir.is_absolute() || !spec.app_dir.is_dir() {
        return Err(DriverError::InvalidSpec {
            field: "app_dir",
            reason: "is not an absolute directory",
        });
    }
    if let Some(venv) = &spec.venv_dir {
        if !venv.is_absolute() || !venv.is_dir() {
            return Err(DriverError::InvalidSpec {
                field: "venv_dir",
                reason: "is not an absolute directory",
            });
        }
    }
    if spec.entrypoint.is_empty() {
        return Err(DriverError::InvalidSpec {
            field: "entrypoint",
            reason: "is empty",
        });
    }
    let l = &spec.limits;
    if !(l.vcpus > 0.0 && l.vcpus <= max_vcpus) || l.memory_bytes < min_memory || l.pids < 2 {
        return Err(DriverError::InvalidSpec {
            field: "limits",
            reason: "need 0 < vcpus <= the substrate's maximum, memory at its minimum, pids >= 2",
        });
    }
    Ok(())
}

/// The guest executable exists and is a file (and, when asked, is named
/// by an absolute path: it is bind-mounted into gVisor sandboxes).
pub(crate) fn guest_binary(path: &std::path::Path, absolute: bool) -> Result<(), DriverError> {
    let meta = std::fs::metadata(path).map_err(|source| DriverError::GuestBinary {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() || (absolute && !path.is_absolute()) {
        return Err(DriverError::GuestBinary {
            path: path.to_owned(),
            source: std::io::ErrorKind::InvalidInput.into(),
        });
    }
    Ok(())
}

/// The id, then [`version`].
pub(crate) fn spec(spec: &SandboxSpec, max_vcpus: f64, min_memory: u64) -> Result<(), DriverError> {
    if !valid_id(&spec.sandbox_id) {
        return Err(DriverError::InvalidId(spec.sandbox_id.clone()));
    }
    version(spec, max_vcpus, min_memory)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids() {
        assert!(super::valid_id("abc-123"));
        assert!(!super::valid_id(""));
        assert!(!super::valid_id("Abc"));
        assert!(!super::valid_id("a/b"));
        assert!(!super::valid_id(&"a".repeat(65)));
    }
}
