//! `berth sessions` and `berth usage`.

use crate::agents::items;
use crate::client::{seg, Client};
use crate::render::{self, cell, out, out_json};
use crate::Global;
use anyhow::Result;
use reqwest::Method;
use serde_json::Value;

#[derive(clap::Subcommand)]
pub enum SessionsCmd {
    /// List sessions, newest first.
    Ls {
        #[arg(long)]
        agent: Option<String>,
        /// provisioning, active, idle or terminated.
        #[arg(long)]
        status: Option<String>,
        /// Only this user's sessions (admins see the whole tenant).
        #[arg(long)]
        user: Option<String>,
    },
    /// Show one session.
    Show { id: String },
    /// Stop a session's activation.
    Stop { id: String },
}

#[derive(clap::Args)]
pub struct UsageArgs {
    /// How to group [server default: session].
    #[arg(long, value_parser = ["session", "agent", "user", "tenant"])]
    by: Option<String>,
    #[arg(long)]
    agent: Option<String>,
    #[arg(long)]
    session: Option<String>,
}

pub async fn run(g: &Global, cmd: SessionsCmd) -> Result<()> {
    let client = g.client()?;
    match cmd {
        SessionsCmd::Ls {
            agent,
            status,
            user,
        } => {
            let q = query(&[("agent", agent), ("status", status), ("user", user)]);
            list(g, &client, &q).await
        }
        SessionsCmd::Show { id } => {
            let v = client.get(&format!("/v1/sessions/{}", seg(&id))).await?;
            one(g, &v)
        }
        SessionsCmd::Stop { id } => {
            let v = client.delete(&format!("/v1/sessions/{}", seg(&id))).await?;
            one(g, &v)
        }
    }
}

/// Prints one session; the server may wrap it as `{"session": {...}}`.
fn one(g: &Global, v: &Value) -> Result<()> {
    if g.json {
        return out_json(v);
    }
    out(render::kv_table(v.get("session").unwrap_or(v)))
}

/// Only the filters that were given go in the query string.
fn query(pairs: &[(&'static str, Option<String>)]) -> Vec<(&'static str, String)> {
    pairs
        .iter()
        .filter_map(|(k, v)| v.clone().map(|v| (*k, v)))
        .collect()
}

async fn list(g: &Global, client: &Client, q: &[(&str, String)]) -> Result<()> {
    let v = client
        .json(client.request(Method::GET, "/v1/sessions").query(q))
        .await?;
    if g.json {
        return out_json(&v);
    }
    out(sessions_table(&v))
}

fn sessions_table(v: &Value) -> comfy_table::Table {
    let cols = [
        "id",
        "agent",
        "user",
        "status",
        "agent_version",
        "epoch",
        "invocations",
        "created_at_ms",
        "updated_at_ms",
    ];
    render::table(
        &[
            "id",
            "agent",
            "user",
            "status",
            "version",
            "epoch",
            "invocations",
            "created",
            "updated",
        ],
        items(v, "sessions").map(|s| cols.iter().map(|c| cell(s, c)).collect()),
    )
}

pub async fn usage(g: &Global, args: UsageArgs) -> Result<()> {
    let client = g.client()?;
    let key_header = args.by.clone().unwrap_or_else(|| "key".to_owned());
    let q = query(&[
        ("group_by", args.by),
        ("agent", args.agent),
        ("session", args.session),
    ]);
    let v = client
        .json(client.request(Method::GET, "/v1/usage").query(&q))
        .await?;
    if g.json {
        return out_json(&v);
    }
    out(usage_table(&key_header, &v))
}

fn usage_table(key_header: &str, v: &Value) -> comfy_table::Table {
    let cols = [
        "key",
        "tenant",
        "sessions",
        "invocations",
        "active_seconds",
        "idle_seconds",
        "cpu_seconds",
        "peak_memory_bytes",
    ];
    render::table(
        &[
            key_header,
            "tenant",
            "sessions",
            "invocations",
            "active",
            "idle",
            "cpu",
            "peak memory",
        ],
        items(v, "usage").map(|u| cols.iter().map(|c| cell(u, c)).collect()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_drops_unset_filters() {
        let q = query(&[("agent", Some("a".into())), ("status", None)]);
        assert_eq!(q, vec![("agent", "a".to_owned())]);
    }

    #[test]
    fn sessions_table_rows() {
        let v = json!({"sessions": [{
            "id": "sess-1", "agent": "echo", "tenant": "t", "user": "u",
            "status": "ready", "epoch": 1, "activations": 1, "agent_version": 3,
            "created_at_ms": 0, "updated_at_ms": 1000, "invocations": 4
        }]});
        let t = sessions_table(&v).to_string();
        let row = t.lines().nth(1).unwrap_or_default();
        for want in ["sess-1", "echo", "ready", "3", "4", "1970-01-01 00:00:01"] {
            assert!(row.contains(want), "{want} missing in {row}");
        }
    }

    #[test]
    fn usage_table_formats_units() {
        let v = json!({"usage": [{
            "key": "echo", "tenant": "t", "sessions": 2, "invocations": 5,
            "active_seconds": 1.5, "idle_seconds": 10.0, "cpu_seconds": 0.25,
            "peak_memory_bytes": 1048576
        }]});
        let t = usage_table("agent", &v).to_string();
        assert!(t.lines().next().is_some_and(|h| h.contains("AGENT")));
        assert!(t.contains("1.5s") && t.contains("10.0s") && t.contains("1.0 MiB"));
    }
}
