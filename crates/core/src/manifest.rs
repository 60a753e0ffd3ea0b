//! The agent manifest, `berth.toml`.
