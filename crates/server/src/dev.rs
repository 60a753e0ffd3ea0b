//! `berth serve --dev`: a dev tenant, user and admin key, and the example
//! agents deployed, so a new user can invoke an agent at once.

use crate::AppState;
use berth_core::{AgentName, Role, TenantId, UserId};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

const KEY_FILE: &str = "dev-api-key";

fn examples_dir(state: &AppState) -> Option<PathBuf> {
    if let Some(d) = &state.cfg.examples_dir {
        return Some(d.clone());
    }
    let mut candidates = vec![PathBuf::from("examples/agents")];
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}/berth -> the checkout's examples.
        for up in exe.ancestors().skip(1).take(4) {
            candidates.push(up.join("examples/agents"));
        }
    }
    candidates.into_iter().find(|p| p.is_dir())
}

/// The dev key: reused from the data dir when still valid, else new.
async fn dev_key(state: &AppState) -> Result<String, String> {
    let path = state.cfg.data_dir.join(KEY_FILE);
    if let Ok(key) = std::fs::read_to_string(&path) {
        let key = key.trim().to_owned();
        let hash = crate::auth::hash_key(&key);
        if let Ok(Some(rec)) = state.store.api_key_by_hash(&hash).await {
            if !rec.revoked {
                return Ok(key);
            }
        }
    }
    let tenant = TenantId::parse("dev").map_err(|e| e.to_string())?;
    let user = UserId::parse("dev").map_err(|e| e.to_string())?;
    let (key, rec) = crate::auth::new_api_key(tenant, user, vec![Role::Admin]);
    state
        .store
        .insert_api_key(&rec)
        .await
        .map_err(|e| e.to_string())?;
    write_private(&path, &key).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(key)
}

fn write_private(path: &Path, key: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(key.as_bytes())?;
    f.write_all(b"\n")
}

pub async fn setup(state: &AppState, addr: SocketAddr) -> Result<(), String> {
    let _key = dev_key(state).await?;
    let key_path = state.cfg.data_dir.join(KEY_FILE);
    println!("dev API key written to {}", key_path.display());
    let Some(dir) = examples_dir(state) else {
        eprintln!("warning: no examples/agents directory found; nothing deployed");
        return Ok(());
    };
    let state = state.clone();
    tokio::spawn(async move {
        deploy_examples(&state, &dir).await;
        println!(
            "ready: curl -s -X POST http://{addr}/v1/agents/echo/invocations \
             -H \"Authorization: Bearer $(cat {})\" -H 'Content-Type: application/json' \
             -d '{{\"prompt\": \"hello\"}}'",
            key_path.display()
        );
    });
    Ok(())
}

/// Deploys each example not yet deployed, `echo` first so the invoke line
/// works as early as possible.
async fn deploy_examples(state: &AppState, dir: &Path) {
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => {
            eprintln!("warning: cannot read {}: {e}", dir.display());
            return;
        }
    };
    dirs.sort_by_key(|p| (p.file_name().is_none_or(|n| n != "echo"), p.clone()));
    for d in dirs.into_iter().filter(|d| d.join("berth.toml").is_file()) {
        let name = d.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Ok(agent) = AgentName::parse(name) {
            if matches!(state.store.agent(&agent).await, Ok(Some(a)) if a.latest_version.is_some())
            {
                continue;
            }
        }
        if let Err(e) = deploy_one(state, &d).await {
            eprintln!("warning: deploying {}: {e}", d.display());
        }
    }
}

async fn deploy_one(state: &AppState, dir: &Path) -> Result<(), String> {
    let archive = crate::deploy::pack_dir(dir).map_err(|e| e.to_string())?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
    let name = dir.display().to_string();
    let printer = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            eprintln!("deploy {name}: {line}");
        }
    });
    let v = crate::agents::install(state, None, &archive, tx)
        .await
        .map_err(|e| e.message)?;
    let _ = printer.await;
    println!("deployed {} version {}", v.agent, v.version);
    Ok(())
}
