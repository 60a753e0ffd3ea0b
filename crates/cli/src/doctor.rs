//! `berth doctor`: what this host offers for sandboxing.
//!
//! The probe's report is rendered from its JSON form rather than its fields,
//! so checks the sandbox crate adds show up here without a CLI change.

use crate::render::{self, out, out_json};
use crate::Global;
use anyhow::{Context, Result};
use serde_json::Value;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// The server's configuration file: substrates are probed with its
    /// `[gvisor]` and `[microvm]` settings (default: built-in defaults).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

pub async fn run(g: &Global, args: &DoctorArgs) -> Result<()> {
    let report = berth_sandbox::probe::probe();
    let cfg = berth_server::Config::load(args.config.as_deref()).context("reading the config")?;
    let substrates = berth_server::substrates::probe_all(&cfg).await;
    let mut v = serde_json::to_value(&report).context("encoding the host report")?;
    if g.json {
        v["substrates"] = serde_json::to_value(&substrates).context("encoding substrates")?;
        return out_json(&v);
    }
    out(checks_table(&v))?;
    let rows = substrates.iter().map(|s| {
        vec![
            s.substrate.clone(),
            if s.available { "yes" } else { "no" }.to_owned(),
            s.detail.clone(),
        ]
    });
    out(render::table(&["substrate", "works here", "detail"], rows))
}

/// One row per top-level field: `check`, `ok`, `detail`.
fn checks_table(v: &Value) -> comfy_table::Table {
    let rows = v.as_object().into_iter().flatten().map(|(name, value)| {
        let (ok, detail) = check(value);
        vec![
            name.clone(),
            if ok { "yes" } else { "no" }.to_owned(),
            detail,
        ]
    });
    render::table(&["check", "ok", "detail"], rows)
}

/// Whether a check passed, and what to say about it. An object with an `ok`
/// (or `available`/`supported`) flag uses that flag and shows its other
/// fields; anything else passes when it is truthy (a Landlock ABI of 0, an
/// empty controller list, or null is a no).
fn check(value: &Value) -> (bool, String) {
    match value {
        Value::Object(map) => {
            let flag = ["ok", "available", "supported", "enabled"]
                .iter()
                .find_map(|k| map.get(*k).and_then(Value::as_bool));
            let detail = map
                .iter()
                .filter(|(k, v)| !(v.is_boolean() && flag.is_some() && is_flag(k)))
                .map(|(k, v)| format!("{k}={}", render::plain(v)))
                .collect::<Vec<_>>()
                .join(" ");
            (flag.unwrap_or(!map.is_empty()), detail)
        }
        Value::Array(items) => (
            !items.is_empty(),
            items
                .iter()
                .map(render::plain)
                .collect::<Vec<_>>()
                .join(","),
        ),
        Value::Bool(b) => (*b, String::new()),
        Value::Number(n) => (n.as_f64().is_some_and(|f| f != 0.0), n.to_string()),
        Value::String(s) => (!s.is_empty(), s.clone()),
        Value::Null => (false, "not available".to_owned()),
    }
}

fn is_flag(key: &str) -> bool {
    matches!(key, "ok" | "available" | "supported" | "enabled")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn checks_are_read_generically() {
        assert_eq!(check(&json!(true)), (true, String::new()));
        assert_eq!(check(&json!(0)), (false, "0".to_owned()));
        assert_eq!(check(&json!(3)), (true, "3".to_owned()));
        assert_eq!(check(&json!(null)), (false, "not available".to_owned()));
        assert_eq!(
            check(&json!(["cpu", "memory"])),
            (true, "cpu,memory".to_owned())
        );
        let (ok, detail) = check(&json!({"ok": false, "reason": "no /dev/kvm"}));
        assert!(!ok);
        assert_eq!(detail, "reason=no /dev/kvm");
    }

    #[test]
    fn table_has_a_row_per_field() {
        let v = json!({"kvm": false, "landlock_abi": 4, "seccomp": true});
        let t = checks_table(&v).to_string();
        assert_eq!(t.lines().count(), 4);
        assert!(t.lines().any(|l| l.contains("kvm") && l.contains("no")));
    }
}
