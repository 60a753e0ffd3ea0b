//! `berth keys`: API keys, managed directly in the data dir's database so the
//! first admin key can be made before any server (or key) exists.

use crate::render::{self, cell, out, out_json};
use crate::Global;
use anyhow::{Context, Result};
use berth_core::{Role, TenantId, UserId};
use berth_log::{ApiKeyRecord, SqliteLog};
use berth_server::auth::sigv4;
use serde_json::{json, Value};

#[derive(clap::Subcommand)]
pub enum KeysCmd {
    /// Create a key; it is printed once and only its hash is stored. The
    /// output also gives the key's SigV4 pair (access key id and secret).
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        user: String,
        /// Roles to grant (repeatable).
        #[arg(long = "role", value_enum)]
        roles: Vec<RoleArg>,
    },
    /// List keys (never the keys themselves).
    Ls {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key by its id; it stops working at once.
    Revoke { id: String },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum RoleArg {
    /// Sees and stops the tenant's sessions, deploys agents.
    Admin,
    /// May name the user it acts for in the user-id header.
    ActForUsers,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Admin => Role::Admin,
            RoleArg::ActForUsers => Role::ActForUsers,
        }
    }
}

pub async fn run(g: &Global, cmd: KeysCmd) -> Result<()> {
    let log = open(g)?;
    match cmd {
        KeysCmd::Create {
            tenant,
            user,
            roles,
        } => create(g, &log, &tenant, &user, roles).await,
        KeysCmd::Ls { tenant } => list(g, &log, tenant.as_deref()).await,
        KeysCmd::Revoke { id } => revoke(&log, &id).await,
    }
}

fn open(g: &Global) -> Result<SqliteLog> {
    let dir = g.data_dir();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the data dir {}", dir.display()))?;
    let path = dir.join("berth.db");
    SqliteLog::open(&path).with_context(|| format!("opening {}", path.display()))
}

async fn create(
    g: &Global,
    log: &SqliteLog,
    tenant: &str,
    user: &str,
    roles: Vec<RoleArg>,
) -> Result<()> {
    let tenant = TenantId::parse(tenant).context("--tenant")?;
    let user = UserId::parse(user).context("--user")?;
    let roles: Vec<Role> = roles.into_iter().map(Role::from).collect();
    let (key, record) = berth_server::auth::new_api_key(tenant, user, roles);
    let dir = g.data_dir();
    let master = sigv4::load_or_create_master(&dir)
        .with_context(|| format!("reading the SigV4 master key in {}", dir.display()))?;
    let (access_key_id, secret_access_key) = sigv4::credentials(&master, &record.id);
    log.insert_api_key(&record)
        .await
        .context("storing the key")?;
    if g.json {
        return out_json(&json!({
            "key": key,
            "id": record.id,
            "tenant": record.tenant,
            "user": record.user,
            "roles": record.roles,
            "access_key_id": access_key_id,
            "secret_access_key": secret_access_key,
        }));
    }
    out(format!(
        "created key {} for {}/{}; it is shown only once:\n{key}\n\
         SigV4 (AWS SDK) credentials of the same key:\n\
         aws_access_key_id = {access_key_id}\naws_secret_access_key = {secret_access_key}",
        record.id, record.tenant, record.user
    ))
}

async fn list(g: &Global, log: &SqliteLog, tenant: Option<&str>) -> Result<()> {
    let tenant = tenant
        .map(TenantId::parse)
        .transpose()
        .context("--tenant")?;
    let keys = log
        .list_api_keys(tenant.as_ref())
        .await
        .context("listing keys")?;
    // The hash is a secret's derivative: never shown, not even with --json.
    let rows: Vec<Value> = keys.iter().map(public_view).collect();
    if g.json {
        return out_json(&json!({ "keys": rows }));
    }
    out(keys_table(&rows))
}

async fn revoke(log: &SqliteLog, id: &str) -> Result<()> {
    if !log.revoke_api_key(id).await.context("revoking the key")? {
        anyhow::bail!("no key with id {id}");
    }
    out(format!("revoked key {id}"))
}

fn public_view(k: &ApiKeyRecord) -> Value {
    json!({
        "id": k.id,
        "tenant": k.tenant,
        "user": k.user,
        "roles": k.roles,
        "created_at_ms": k.created_at_ms,
        "revoked": k.revoked,
    })
}

fn keys_table(rows: &[Value]) -> comfy_table::Table {
    let cols = ["id", "tenant", "user", "roles", "created_at_ms", "revoked"];
    render::table(
        &["id", "tenant", "user", "roles", "created", "revoked"],
        rows.iter().map(|r| {
            cols.iter()
                .map(|c| match r.get(*c) {
                    Some(Value::Array(a)) => {
                        a.iter().map(render::plain).collect::<Vec<_>>().join(",")
                    }
                    _ => cell(r, c),
                })
                .collect::<Vec<_>>()
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_table_joins_roles_and_formats_time() {
        let row = json!({"id": "k1", "tenant": "t", "user": "u", "roles": ["admin"],
                         "created_at_ms": 0, "revoked": false});
        let t = keys_table(&[row]).to_string();
        assert!(t.contains("admin") && t.contains("1970-01-01") && t.contains("false"));
        assert!(!t.contains('['));
    }
}
