//! `berth audit`: authentication failures, denied accesses and admin
//! actions. Over the API an admin sees its own tenant's events; with
//! `--offline` an operator reads the data dir's database directly and sees
//! every tenant's, and the failed authentications, which belong to none.

use crate::agents::items;
use crate::client::Client;
use crate::render::{self, cell, fmt_ms, out, out_json};
use crate::Global;
use anyhow::{bail, Context, Result};
use berth_core::TenantId;
use berth_log::{AuditFilter, SqliteLog};
use reqwest::Method;
use serde_json::Value;

#[derive(clap::Args)]
pub struct AuditArgs {
    /// Only this action, e.g. auth.refused, access.denied, agent.deploy.
    #[arg(long)]
    action: Option<String>,
    /// Only events with an id greater than this (to page on).
    #[arg(long)]
    after: Option<u64>,
    /// At most this many events.
    #[arg(long)]
    limit: Option<usize>,
    /// Read the database in the data dir instead of asking a server.
    #[arg(long)]
    offline: bool,
    /// With --offline: only this tenant's events.
    #[arg(long, requires = "offline")]
    tenant: Option<String>,
}

pub async fn run(g: &Global, args: AuditArgs) -> Result<()> {
    let v = if args.offline {
        offline(g, &args).await?
    } else {
        online(&g.client()?, &args).await?
    };
    if g.json {
        return out_json(&v);
    }
    out(table(&v))
}

async fn online(client: &Client, args: &AuditArgs) -> Result<Value> {
    let mut q: Vec<(&str, String)> = Vec::new();
    if let Some(a) = &args.action {
        q.push(("action", a.clone()));
    }
    if let Some(n) = args.after {
        q.push(("after", n.to_string()));
    }
    if let Some(n) = args.limit {
        q.push(("limit", n.to_string()));
    }
    client
        .json(client.request(Method::GET, "/v1/audit").query(&q))
        .await
}

async fn offline(g: &Global, args: &AuditArgs) -> Result<Value> {
    let path = g.data_dir().join("berth.db");
    // Opening would create an empty database; a wrong path should say so.
    if !path.is_file() {
        bail!("no berth database at {}", path.display());
    }
    let log = SqliteLog::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let filter = AuditFilter {
        tenant: args
            .tenant
            .as_deref()
            .map(TenantId::parse)
            .transpose()
            .context("--tenant")?,
        action: args.action.clone(),
        after: args.after.unwrap_or(0),
        limit: args.limit.unwrap_or(0),
    };
    let events = log
        .list_audit(filter)
        .await
        .context("reading the audit log")?;
    Ok(serde_json::json!({ "events": events }))
}

fn table(v: &Value) -> comfy_table::Table {
    let rows = items(v, "events").map(|e| {
        let at = e
            .get("at_ms")
            .and_then(Value::as_i64)
            .map_or_else(String::new, fmt_ms);
        let who = match (e["tenant"].as_str(), e["user"].as_str()) {
            (Some(t), Some(u)) => format!("{t}/{u}"),
            (Some(t), None) => t.to_owned(),
            _ => "-".to_owned(),
        };
        vec![
            cell(e, "id"),
            at,
            who,
            cell(e, "action"),
            cell(e, "target"),
            cell(e, "outcome"),
            cell(e, "reason"),
        ]
    });
    render::table(
        &[
            "id",
            "time",
            "tenant/user",
            "action",
            "target",
            "outcome",
            "reason",
        ],
        rows,
    )
}
