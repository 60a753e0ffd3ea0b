//! `berth deploy` and `berth agents`.

use crate::client::{seg, ApiError, Client};
use crate::render::{self, cell, out, out_json};
use crate::stream::LineBuffer;
use crate::Global;
use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct DeployArgs {
    /// Agent directory (with its manifest).
    dir: PathBuf,
}

#[derive(clap::Subcommand)]
pub enum AgentsCmd {
    /// List agents.
    Ls,
    /// Show an agent and its versions.
    Show { name: String },
    /// Delete an agent, or only one of its versions.
    Rm {
        name: String,
        #[arg(long)]
        version: Option<u64>,
    },
}

pub async fn deploy(g: &Global, args: DeployArgs) -> Result<()> {
    let archive = berth_server::deploy::pack_dir(&args.dir)
        .with_context(|| format!("packing {}", args.dir.display()))?;
    let client = g.client()?;
    let rb = client
        .request(Method::POST, "/v1/agents")
        .header(reqwest::header::CONTENT_TYPE, "application/gzip")
        .body(archive);
    let resp = client.send(rb).await?;
    let version = read_deploy_stream(g, resp).await?;
    if g.json {
        return Ok(());
    }
    out(format!(
        "deployed {} version {}",
        render::plain(&version["agent"]),
        render::plain(&version["version"])
    ))
}

/// One line of the deploy stream.
#[derive(Debug, PartialEq)]
enum DeployLine {
    Progress(String),
    Version(Value),
    Failed {
        code: String,
        message: String,
    },
    /// Blank, or a kind a newer server added.
    Other,
}

/// Prints progress as it arrives (so a long `pip install` shows live) and
/// returns the final version record. With `--json` every line goes to stdout
/// as the server sent it; otherwise progress goes to stderr, keeping stdout
/// for the result.
async fn read_deploy_stream(g: &Global, resp: reqwest::Response) -> Result<Value> {
    let mut lines = LineBuffer::default();
    let mut body = resp.bytes_stream();
    let mut ended = false;
    while !ended {
        let batch = match body.next().await {
            Some(chunk) => lines.push(&chunk.context("reading the deploy stream")?)?,
            None => {
                ended = true;
                lines.finish().into_iter().collect()
            }
        };
        for line in batch {
            if let Some(version) = deploy_line(g, &line)? {
                return Ok(version);
            }
        }
    }
    bail!("the deploy stream ended without a result")
}

/// Prints one line as described on [`read_deploy_stream`]; returns the
/// version when the line is the final one.
fn deploy_line(g: &Global, line: &str) -> Result<Option<Value>> {
    if g.json && !line.trim().is_empty() {
        out(line)?;
    }
    match parse_deploy_line(line)? {
        DeployLine::Progress(p) if !g.json => eprintln!("{p}"),
        DeployLine::Version(v) => return Ok(Some(v)),
        DeployLine::Failed { code, message } => return Err(ApiError { code, message }.into()),
        _ => {}
    }
    Ok(None)
}

fn parse_deploy_line(line: &str) -> Result<DeployLine> {
    if line.trim().is_empty() {
        return Ok(DeployLine::Other);
    }
    let v: Value = serde_json::from_str(line).context("parsing the deploy stream")?;
    if let Some(p) = v.get("progress") {
        return Ok(DeployLine::Progress(render::plain(p)));
    }
    if let Some(e) = v.get("error") {
        let e = ApiError::from_body(200, serde_json::to_vec(e)?.as_slice());
        return Ok(DeployLine::Failed {
            code: e.code,
            message: e.message,
        });
    }
    Ok(match v.get("version") {
        Some(version) => DeployLine::Version(version.clone()),
        None => DeployLine::Other,
    })
}

pub async fn run(g: &Global, cmd: AgentsCmd) -> Result<()> {
    let client = g.client()?;
    match cmd {
        AgentsCmd::Ls => list(g, &client).await,
        AgentsCmd::Show { name } => show(g, &client, &name).await,
        AgentsCmd::Rm { name, version } => remove(g, &client, &name, version).await,
    }
}

async fn list(g: &Global, client: &Client) -> Result<()> {
    let v = client.get("/v1/agents").await?;
    if g.json {
        return out_json(&v);
    }
    out(agents_table(&v))
}

fn agents_table(v: &Value) -> comfy_table::Table {
    let cols = [
        "name",
        "latest_version",
        "versions",
        "created_at_ms",
        "updated_at_ms",
    ];
    render::table(
        &["name", "latest", "versions", "created", "updated"],
        items(v, "agents").map(|a| cols.iter().map(|c| cell(a, c)).collect()),
    )
}

async fn show(g: &Global, client: &Client, name: &str) -> Result<()> {
    let v = client.get(&format!("/v1/agents/{}", seg(name))).await?;
    if g.json {
        return out_json(&v);
    }
    out(render::kv_table(&v["agent"]))?;
    out("")?;
    out(versions_table(&v))
}

fn versions_table(v: &Value) -> comfy_table::Table {
    render::table(
        &["version", "created", "dir"],
        items(v, "versions").map(|ver| {
            vec![
                cell(ver, "version"),
                cell(ver, "created_at_ms"),
                cell(ver, "dir"),
            ]
        }),
    )
}

async fn remove(g: &Global, client: &Client, name: &str, version: Option<u64>) -> Result<()> {
    let path = match version {
        Some(n) => format!("/v1/agents/{}/versions/{n}", seg(name)),
        None => format!("/v1/agents/{}", seg(name)),
    };
    let v = client.delete(&path).await?;
    if g.json {
        return out_json(&v);
    }
    match version {
        Some(n) => out(format!("deleted {name} version {n}")),
        None => out(format!("deleted {name}")),
    }
}

/// The array `key` of a list response (empty when absent).
pub fn items<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter())
        .into_iter()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deploy_lines() -> Result<()> {
        assert_eq!(
            parse_deploy_line(r#"{"progress":"Collecting x"}"#)?,
            DeployLine::Progress("Collecting x".into())
        );
        assert_eq!(parse_deploy_line("")?, DeployLine::Other);
        assert_eq!(
            parse_deploy_line(r#"{"version":{"agent":"a","version":2}}"#)?,
            DeployLine::Version(json!({"agent":"a","version":2}))
        );
        assert_eq!(
            parse_deploy_line(r#"{"error":{"code":"build_failed","message":"pip failed"}}"#)?,
            DeployLine::Failed {
                code: "build_failed".into(),
                message: "pip failed".into()
            }
        );
        Ok(())
    }

    #[test]
    fn agents_table_rows() {
        let v = json!({"agents": [
            {"name": "echo", "latest_version": 2, "versions": 2, "created_at_ms": 0, "updated_at_ms": 0},
            {"name": "gone", "latest_version": null, "versions": 0, "created_at_ms": 0, "updated_at_ms": 0}
        ]});
        let t = agents_table(&v).to_string();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].contains("echo") && lines[1].contains("1970-01-01 00:00:00"));
        assert!(lines[2].contains("gone") && lines[2].contains('-'));
    }

    #[test]
    fn items_tolerates_missing_keys() {
        assert_eq!(items(&json!({}), "agents").count(), 0);
    }
}
