//! The agent manifest, `berth.toml`.
//!
//! An agent is a directory with this file and its code. Parsing checks the
//! shape (unknown fields are errors, so a typo never silently takes a
//! default); [`Manifest::validate`] checks the values against the operator's
//! [`ManifestPolicy`]. Every error names the field, the value and what is
//! allowed, so the person deploying can fix it without reading this code.

use crate::ids::AgentName;
use crate::limits::{Lifecycle, Resources, MAX_LIFETIME_LIMIT_S};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// At most this many environment variables per agent (AgentCore's limit).
pub const MAX_ENV_VARS: usize = 50;
/// At most this many bytes in one environment variable's value.
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// At most this many custom headers in `headers.allow` (AgentCore's limit).
pub const MAX_ALLOWED_HEADERS: usize = 20;
/// At most this many bytes in one allowed header name.
pub const MAX_HEADER_NAME_BYTES: usize = 256;
/// At most this many entrypoint arguments, the program included.
pub const MAX_ENTRYPOINT_ARGS: usize = 256;
/// At most this many bytes in one entrypoint argument.
pub const MAX_ENTRYPOINT_ARG_BYTES: usize = 4096;
/// Start timeout bounds in seconds (AgentCore gives agents 120 s by default).
pub const START_TIMEOUT_RANGE_S: (u64, u64) = (1, 600);
/// Smallest memory limit in MiB: below this Python does not start.
pub const MIN_MEMORY_MB: u64 = 32;
/// Process count bounds.
pub const PIDS_RANGE: (u64, u64) = (8, 32_768);

/// Headers a caller may send that the agent always receives, whatever the
/// allowlist says (case-insensitive prefix).
pub const ALWAYS_ALLOWED_HEADER_PREFIX: &str = "x-amzn-bedrock-agentcore-runtime-custom-";

/// Header names that may not appear in `headers.allow`: berth sets them
/// itself, or they describe the connection rather than the request, so
/// passing a caller's value through would let the caller forge identity or
/// smuggle requests. `authorization` has its own switch.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "workloadaccesstoken",
    "x-amzn-bedrock-agentcore-runtime-session-id",
    "x-amzn-bedrock-agentcore-runtime-request-id",
    "x-amzn-bedrock-agentcore-runtime-user-id",
];

/// How berth talks to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `POST /invocations` and `GET /ping` on port 8080.
    Http,
    /// Streamable HTTP on port 8000, `POST /mcp`. Parsed, not yet served.
    Mcp,
    /// JSON-RPC on port 9000. Parsed, not yet served.
    A2a,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Mcp => "mcp",
            Protocol::A2a => "a2a",
        }
    }

    /// The port the agent listens on inside its sandbox.
    pub fn port(self) -> u16 {
        match self {
            Protocol::Http => 8080,
            Protocol::Mcp => 8000,
            Protocol::A2a => 9000,
        }
    }

    /// Whether berth can serve agents of this protocol today.
    pub fn is_supported(self) -> bool {
        matches!(self, Protocol::Http)
    }
}

/// Which substrate a session runs on: the agent's choice or the server's
/// default, and the weakest substrate each tenant's sessions may use.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IsolationPolicy {
    /// Substrate of agents whose `berth.toml` names none (default process).
    pub default: Isolation,
    /// Weakest substrate allowed, per tenant (default: any).
    pub require: BTreeMap<crate::TenantId, Isolation>,
}

impl IsolationPolicy {
    /// The substrate sessions of an agent with this manifest run on.
    pub fn effective(&self, manifest: &Manifest) -> Isolation {
        manifest.isolation.unwrap_or(self.default)
    }

    /// The weakest substrate `tenant`'s sessions may run on.
    pub fn required(&self, tenant: &crate::TenantId) -> Isolation {
        self.require.get(tenant).copied().unwrap_or_default()
    }

    /// Whether `tenant` may run sessions on `isolation`.
    pub fn allows(&self, tenant: &crate::TenantId, isolation: Isolation) -> bool {
        isolation >= self.required(tenant)
    }
}

/// Which substrate runs the agent's sandboxes. The server may refuse one
/// that is not available on its host. Ordered from the weakest boundary to
/// the strongest, so a policy can name the weakest one it accepts.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Linux namespaces, seccomp, cgroups and Landlock (the default).
    #[default]
    Process,
    /// gVisor's `runsc`.
    Gvisor,
    /// A KVM microVM.
    Microvm,
}

impl Isolation {
    /// Every substrate, weakest first.
    pub const ALL: [Isolation; 3] = [Isolation::Process, Isolation::Gvisor, Isolation::Microvm];

    /// The substrate of this name (`process`, `gvisor`, `microvm`).
    pub fn parse(name: &str) -> Option<Isolation> {
        Isolation::ALL.into_iter().find(|i| i.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Process => "process",
            Isolation::Gvisor => "gvisor",
            Isolation::Microvm => "microvm",
        }
    }
}

/// Which of the caller's headers reach the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderPolicy {
    /// Extra header names passed through (default none, at most 20).
    /// `X-Amzn-Bedrock-AgentCore-Runtime-Custom-*` is always passed.
    pub allow: Vec<String>,
    /// Whether the agent receives the caller's `Authorization` header
    /// (default false).
    pub authorization: bool,
}

impl HeaderPolicy {
    /// Whether a caller's header of this name is passed to the agent.
    pub fn allows(&self, name: &str) -> bool {
        if name.eq_ignore_ascii_case("authorization") {
            return self.authorization;
        }
        if name.len() > ALWAYS_ALLOWED_HEADER_PREFIX.len()
            && name.as_bytes()[..ALWAYS_ALLOWED_HEADER_PREFIX.len()]
                .eq_ignore_ascii_case(ALWAYS_ALLOWED_HEADER_PREFIX.as_bytes())
        {
            return true;
        }
        self.allow.iter().any(|a| a.eq_ignore_ascii_case(name))
    }
}

fn default_protocol() -> Protocol {
    Protocol::Http
}
fn default_true() -> bool {
    true
}

/// The contents of `berth.toml`. Stored as JSON in the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The agent's name (required).
    pub name: AgentName,
    /// Program and arguments, run with the agent's directory as cwd (required).
    pub entrypoint: Vec<String>,
    /// Default `http`.
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// The substrate; absent means the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
    /// Whether a substrate that can snapshot a started agent may do so and
    /// clone sessions from it (default true).
    #[serde(default = "default_true")]
    pub snapshot: bool,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// Environment variables of the agent (default none, at most 50).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub headers: HeaderPolicy,
}

/// The operator's bounds on what a manifest may ask for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManifestPolicy {
    /// Smallest idle timeout and max lifetime in seconds (default 60).
    pub min_lifetime_s: u64,
    /// Largest idle timeout and max lifetime in seconds (default 30 days).
    pub max_lifetime_s: u64,
    /// Largest vCPU share (default 2.0).
    pub max_vcpus: f64,
    /// Largest memory limit in MiB (default 8192).
    pub max_memory_mb: u64,
}

impl Default for ManifestPolicy {
    fn default() -> Self {
        Self {
            min_lifetime_s: 60,
            max_lifetime_s: MAX_LIFETIME_LIMIT_S,
            max_vcpus: 2.0,
            max_memory_mb: 8192,
        }
    }
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    /// Bad TOML, a missing required field, an unknown field or a value of the
    /// wrong type. The message names the field and the line.
    #[error("berth.toml: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("protocol \"{protocol}\" is not supported yet; use \"http\"")]
    UnsupportedProtocol { protocol: &'static str },
    #[error("entrypoint must name a program to run, e.g. [\"python3\", \"main.py\"]")]
    EmptyEntrypoint,
    #[error("entrypoint has {count} arguments, at most {max} are allowed")]
    EntrypointTooLong { count: usize, max: usize },
    #[error("entrypoint[{index}] is {len} bytes long, at most {max} are allowed")]
    EntrypointArgTooLong {
        index: usize,
        len: usize,
        max: usize,
    },
    #[error("entrypoint[{index}] contains a NUL byte")]
    EntrypointNul { index: usize },
    #[error("{field} is {value}, it must be between {min} and {max}")]
    OutOfRange {
        field: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("resources.vcpus is {value}, it must be greater than 0 and at most {max}")]
    VcpusOutOfRange { value: f64, max: f64 },
    #[error(
        "lifecycle.idle_timeout_s ({idle}) must not exceed lifecycle.max_lifetime_s ({max_lifetime})"
    )]
    IdleExceedsLifetime { idle: u64, max_lifetime: u64 },
    #[error("env has {count} variables, at most {max} are allowed")]
    TooManyEnvVars { count: usize, max: usize },
    #[error(
        "env name {name:?} is not valid: use letters, digits and '_', not starting with a digit"
    )]
    InvalidEnvName { name: String },
    #[error("env.{name} contains a NUL byte")]
    EnvValueNul { name: String },
    #[error("env.{name} is {len} bytes long, at most {max} are allowed")]
    EnvValueTooLong {
        name: String,
        len: usize,
        max: usize,
    },
    #[error("headers.allow has {count} names, at most {max} are allowed")]
    TooManyHeaders { count: usize, max: usize },
    #[error("headers.allow: {name:?} is not a valid header name")]
    InvalidHeaderName { name: String },
    #[error("headers.allow: {name:?} cannot be passed through (berth sets it, or it describes the connection){hint}",
        hint = if name.eq_ignore_ascii_case("authorization") { "; set headers.authorization = true instead" } else { "" })]
    ReservedHeader { name: String },
}

impl Manifest {
    /// Parses `berth.toml`. Checks shape only; call [`Manifest::validate`]
    /// before using the values.
    pub fn parse_toml(s: &str) -> Result<Manifest, ManifestError> {
        Ok(toml::from_str(s)?)
    }

    /// Checks every value against its limit and the operator's policy.
    pub fn validate(&self, policy: &ManifestPolicy) -> Result<(), ManifestError> {
        if !self.protocol.is_supported() {
            return Err(ManifestError::UnsupportedProtocol {
                protocol: self.protocol.as_str(),
            });
        }
        validate_entrypoint(&self.entrypoint)?;
        validate_resources(&self.resources, policy)?;
        validate_lifecycle(&self.lifecycle, policy)?;
        validate_env(&self.env)?;
        validate_headers(&self.headers)
    }
}

fn validate_entrypoint(args: &[String]) -> Result<(), ManifestError> {
    if args.first().is_none_or(|a| a.is_empty()) {
        return Err(ManifestError::EmptyEntrypoint);
    }
    if args.len() > MAX_ENTRYPOINT_ARGS {
        return Err(ManifestError::EntrypointTooLong {
            count: args.len(),
            max: MAX_ENTRYPOINT_ARGS,
        });
    }
    for (index, arg) in args.iter().enumerate() {
        if arg.len() > MAX_ENTRYPOINT_ARG_BYTES {
            return Err(ManifestError::EntrypointArgTooLong {
                index,
                len: arg.len(),
                max: MAX_ENTRYPOINT_ARG_BYTES,
            });
        }
        if arg.contains('\0') {
            return Err(ManifestError::EntrypointNul { index });
        }
    }
    Ok(())
}

fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), ManifestError> {
    if value < min || value > max {
        return Err(ManifestError::OutOfRange {
            field,
            value,
            min,
            max,
        });
    }
    Ok(())
}

fn validate_resources(r: &Resources, policy: &ManifestPolicy) -> Result<(), ManifestError> {
    // Written so that NaN fails too.
    if !(r.vcpus > 0.0 && r.vcpus <= policy.max_vcpus) {
        return Err(ManifestError::VcpusOutOfRange {
            value: r.vcpus,
            max: policy.max_vcpus,
        });
    }
    range(
        "resources.memory_mb",
        r.memory_mb,
        MIN_MEMORY_MB,
        policy.max_memory_mb,
    )?;
    range("resources.pids", r.pids, PIDS_RANGE.0, PIDS_RANGE.1)
}

fn validate_lifecycle(l: &Lifecycle, policy: &ManifestPolicy) -> Result<(), ManifestError> {
    let (min, max) = (policy.min_lifetime_s, policy.max_lifetime_s);
    range("lifecycle.idle_timeout_s", l.idle_timeout_s, min, max)?;
    range("lifecycle.max_lifetime_s", l.max_lifetime_s, min, max)?;
    if l.idle_timeout_s > l.max_lifetime_s {
        return Err(ManifestError::IdleExceedsLifetime {
            idle: l.idle_timeout_s,
            max_lifetime: l.max_lifetime_s,
        });
    }
    range(
        "lifecycle.start_timeout_s",
        l.start_timeout_s,
        START_TIMEOUT_RANGE_S.0,
        START_TIMEOUT_RANGE_S.1,
    )
}

fn is_env_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

fn validate_env(env: &BTreeMap<String, String>) -> Result<(), ManifestError> {
    if env.len() > MAX_ENV_VARS {
        return Err(ManifestError::TooManyEnvVars {
            count: env.len(),
            max: MAX_ENV_VARS,
        });
    }
    for (name, value) in env {
        if !is_env_name(name) {
            return Err(ManifestError::InvalidEnvName { name: name.clone() });
        }
        if value.contains('\0') {
            return Err(ManifestError::EnvValueNul { name: name.clone() });
        }
        if value.len() > MAX_ENV_VALUE_BYTES {
            return Err(ManifestError::EnvValueTooLong {
                name: name.clone(),
                len: value.len(),
                max: MAX_ENV_VALUE_BYTES,
            });
        }
    }
    Ok(())
}

/// An HTTP token (RFC 9110 section 5.6.2), which is what a header name is.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HEADER_NAME_BYTES
        && name.bytes().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

fn validate_headers(h: &HeaderPolicy) -> Result<(), ManifestError> {
    if h.allow.len() > MAX_ALLOWED_HEADERS {
        return Err(ManifestError::TooManyHeaders {
            count: h.allow.len(),
            max: MAX_ALLOWED_HEADERS,
        });
    }
    for name in &h.allow {
        if !is_token(name) {
            return Err(ManifestError::InvalidHeaderName { name: name.clone() });
        }
        if RESERVED_HEADERS
            .iter()
            .any(|r| r.eq_ignore_ascii_case(name))
        {
            return Err(ManifestError::ReservedHeader { name: name.clone() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALLEST: &str = "name = \"x\"\nentrypoint = [\"python3\", \"main.py\"]\n";

    fn parse(extra: &str) -> Manifest {
        Manifest::parse_toml(&format!("{SMALLEST}{extra}")).expect("parses")
    }

    fn check(extra: &str) -> Result<(), ManifestError> {
        parse(extra).validate(&ManifestPolicy::default())
    }

    #[test]
    fn smallest_manifest_takes_every_default() {
        let m = Manifest::parse_toml(SMALLEST).expect("parses");
        assert_eq!(m.name.as_str(), "x");
        assert_eq!(m.entrypoint, vec!["python3", "main.py"]);
        assert_eq!(m.protocol, Protocol::Http);
        assert_eq!(m.protocol.port(), 8080);
        assert_eq!(m.isolation, None);
        assert!(m.snapshot);
        assert_eq!(m.resources, Resources::default());
        assert_eq!(m.lifecycle, Lifecycle::default());
        assert!(m.env.is_empty());
        assert_eq!(m.headers, HeaderPolicy::default());
        assert!(!m.headers.authorization);
        m.validate(&ManifestPolicy::default()).expect("valid");
    }

    #[test]
    fn full_manifest_parses_and_round_trips_through_json() {
        let m = parse(
            "protocol = \"http\"\nisolation = \"gvisor\"\nsnapshot = false\n\
             [resources]\nvcpus = 0.5\nmemory_mb = 256\npids = 64\n\
             [lifecycle]\nidle_timeout_s = 60\nmax_lifetime_s = 3600\nstart_timeout_s = 30\n\
             [env]\nKEY = \"value\"\n_X1 = \"\"\n\
             [headers]\nallow = [\"X-My-Header\"]\nauthorization = true\n",
        );
        m.validate(&ManifestPolicy::default()).expect("valid");
        assert_eq!(m.isolation, Some(Isolation::Gvisor));
        assert!(!m.snapshot);
        assert_eq!(m.resources.memory_mb, 256);
        assert_eq!(m.lifecycle.idle_timeout_s, 60);
        assert_eq!(m.env["KEY"], "value");
        let json = serde_json::to_string(&m).expect("serializes");
        let back: Manifest = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, m);
    }

    #[test]
    fn missing_required_fields_are_named() {
        let e = Manifest::parse_toml("name = \"x\"\n").expect_err("must be refused");
        assert!(e.to_string().contains("entrypoint"), "{e}");
        let e = Manifest::parse_toml("entrypoint = [\"a\"]\n").expect_err("must be refused");
        assert!(e.to_string().contains("name"), "{e}");
    }

    #[test]
    fn unknown_fields_are_rejected_and_named() {
        for (extra, field) in [
            ("entrypont = [\"x\"]\n", "entrypont"),
            ("[resources]\nmemory = 5\n", "memory"),
            ("[lifecycle]\nidle = 5\n", "idle"),
            ("[headers]\nallowed = []\n", "allowed"),
        ] {
            let e =
                Manifest::parse_toml(&format!("{SMALLEST}{extra}")).expect_err("must be refused");
            assert!(
                e.to_string().contains(&format!("unknown field `{field}`")),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_names_and_types_are_parse_errors() {
        let e = Manifest::parse_toml("name = \"Bad Name\"\nentrypoint = [\"a\"]\n")
            .expect_err("must be refused");
        assert!(e.to_string().contains("agent name"), "{e}");
        let e = Manifest::parse_toml(&format!("{SMALLEST}isolation = \"docker\"\n"))
            .expect_err("must be refused");
        assert!(e.to_string().contains("docker"), "{e}");
        let e = Manifest::parse_toml(&format!("{SMALLEST}snapshot = \"yes\"\n"))
            .expect_err("must be refused");
        assert!(e.to_string().contains("snapshot"), "{e}");
    }

    #[test]
    fn only_http_is_served() {
        for p in ["mcp", "a2a"] {
            let e = check(&format!("protocol = \"{p}\"\n")).expect_err("must be refused");
            assert!(matches!(e, ManifestError::UnsupportedProtocol { .. }));
            assert!(e.to_string().contains(p) && e.to_string().contains("http"));
        }
        assert!(Manifest::parse_toml(&format!("{SMALLEST}protocol = \"grpc\"\n")).is_err());
    }

    #[test]
    fn isolation_policy_orders_substrates() {
        let t = |s: &str| crate::TenantId::parse(s).unwrap();
        let mut p = IsolationPolicy::default();
        p.require.insert(t("acme"), Isolation::Gvisor);
        assert!(p.allows(&t("other"), Isolation::Process));
        assert!(!p.allows(&t("acme"), Isolation::Process));
        assert!(p.allows(&t("acme"), Isolation::Gvisor));
        assert!(p.allows(&t("acme"), Isolation::Microvm));
        let m = parse("");
        assert_eq!(p.effective(&m), Isolation::Process);
        p.default = Isolation::Microvm;
        assert_eq!(p.effective(&m), Isolation::Microvm);
        let m = parse("isolation = \"gvisor\"\n");
        assert_eq!(p.effective(&m), Isolation::Gvisor);
    }

    #[test]
    fn isolation_kinds_parse() {
        for i in ["process", "gvisor", "microvm"] {
            let m = parse(&format!("isolation = \"{i}\"\n"));
            assert_eq!(m.isolation.map(Isolation::as_str), Some(i));
            assert_eq!(Isolation::parse(i), m.isolation);
        }
    }

    #[test]
    fn entrypoint_rules() {
        let base = "name = \"x\"\n";
        let p = ManifestPolicy::default();
        let m = Manifest::parse_toml(&format!("{base}entrypoint = []\n")).expect("parses");
        assert_eq!(m.validate(&p), Err(ManifestError::EmptyEntrypoint));
        let m = Manifest::parse_toml(&format!("{base}entrypoint = [\"\"]\n")).expect("parses");
        assert_eq!(m.validate(&p), Err(ManifestError::EmptyEntrypoint));
        let m = Manifest::parse_toml(&format!("{base}entrypoint = [\"a\", \"b\\u0000\"]\n"))
            .expect("parses");
        assert_eq!(
            m.validate(&p),
            Err(ManifestError::EntrypointNul { index: 1 })
        );
        let mut m = parse("");
        m.entrypoint = vec!["a".into(); MAX_ENTRYPOINT_ARGS + 1];
        assert!(matches!(
            m.validate(&p),
            Err(ManifestError::EntrypointTooLong { .. })
        ));
        m.entrypoint = vec!["a".repeat(MAX_ENTRYPOINT_ARG_BYTES + 1)];
        assert!(matches!(
            m.validate(&p),
            Err(ManifestError::EntrypointArgTooLong { index: 0, .. })
        ));
    }

    fn out_of_range(extra: &str, field: &str) {
        match check(extra) {
            Err(e @ ManifestError::OutOfRange { field: f, .. }) if f == field => {
                assert!(e.to_string().contains(field), "{e}");
            }
            other => panic!("{extra}: expected {field} out of range, got {other:?}"),
        }
    }

    #[test]
    fn lifecycle_rules() {
        out_of_range(
            "[lifecycle]\nidle_timeout_s = 59\n",
            "lifecycle.idle_timeout_s",
        );
        out_of_range(
            "[lifecycle]\nmax_lifetime_s = 2592001\nidle_timeout_s = 60\n",
            "lifecycle.max_lifetime_s",
        );
        out_of_range(
            "[lifecycle]\nstart_timeout_s = 0\n",
            "lifecycle.start_timeout_s",
        );
        out_of_range(
            "[lifecycle]\nstart_timeout_s = 601\n",
            "lifecycle.start_timeout_s",
        );
        assert_eq!(
            check("[lifecycle]\nidle_timeout_s = 600\nmax_lifetime_s = 300\n"),
            Err(ManifestError::IdleExceedsLifetime {
                idle: 600,
                max_lifetime: 300
            })
        );
        check("[lifecycle]\nidle_timeout_s = 60\nmax_lifetime_s = 60\nstart_timeout_s = 600\n")
            .expect("bounds are inclusive");
        check("[lifecycle]\nmax_lifetime_s = 2592000\n").expect("30 days is allowed");
        let strict = ManifestPolicy {
            min_lifetime_s: 120,
            max_lifetime_s: 28_800,
            ..ManifestPolicy::default()
        };
        let m = parse("[lifecycle]\nidle_timeout_s = 90\n");
        assert!(matches!(
            m.validate(&strict),
            Err(ManifestError::OutOfRange { min: 120, .. })
        ));
        let m = parse("[lifecycle]\nmax_lifetime_s = 28801\n");
        assert!(matches!(
            m.validate(&strict),
            Err(ManifestError::OutOfRange { max: 28_800, .. })
        ));
    }

    #[test]
    fn resource_rules() {
        for v in ["0.0", "-1.0", "2.5", "nan", "inf"] {
            let e = check(&format!("[resources]\nvcpus = {v}\n")).expect_err("must be refused");
            assert!(matches!(e, ManifestError::VcpusOutOfRange { .. }), "{v}");
        }
        check("[resources]\nvcpus = 2.0\n").expect("max is inclusive");
        check("[resources]\nvcpus = 0.1\n").expect("fractions are fine");
        out_of_range("[resources]\nmemory_mb = 31\n", "resources.memory_mb");
        out_of_range("[resources]\nmemory_mb = 8193\n", "resources.memory_mb");
        check("[resources]\nmemory_mb = 32\n").expect("min is inclusive");
        out_of_range("[resources]\npids = 7\n", "resources.pids");
        out_of_range("[resources]\npids = 32769\n", "resources.pids");
        let m = parse("[resources]\nvcpus = 1.5\nmemory_mb = 4096\n");
        let small = ManifestPolicy {
            max_vcpus: 1.0,
            max_memory_mb: 1024,
            ..ManifestPolicy::default()
        };
        assert!(matches!(
            m.validate(&small),
            Err(ManifestError::VcpusOutOfRange { .. })
        ));
        let e = check("[resources]\nmemory_mb = 9000\n").expect_err("must be refused");
        assert!(e.to_string().contains("9000") && e.to_string().contains("8192"));
    }

    #[test]
    fn env_rules() {
        let e = check("[env]\n\"1X\" = \"a\"\n").expect_err("must be refused");
        assert!(matches!(e, ManifestError::InvalidEnvName { .. }));
        let e = check("[env]\n\"A-B\" = \"a\"\n").expect_err("must be refused");
        assert!(matches!(e, ManifestError::InvalidEnvName { .. }));
        let e = check("[env]\n\"A=B\" = \"a\"\n").expect_err("must be refused");
        assert!(matches!(e, ManifestError::InvalidEnvName { .. }));
        let e = check("[env]\n\"\" = \"a\"\n").expect_err("must be refused");
        assert!(matches!(e, ManifestError::InvalidEnvName { .. }));
        let e = check("[env]\nA = \"x\\u0000y\"\n").expect_err("must be refused");
        assert_eq!(e, ManifestError::EnvValueNul { name: "A".into() });
        let mut m = parse("");
        m.env
            .insert("A".into(), "v".repeat(MAX_ENV_VALUE_BYTES + 1));
        assert!(matches!(
            m.validate(&ManifestPolicy::default()),
            Err(ManifestError::EnvValueTooLong { .. })
        ));
        let mut m = parse("");
        for i in 0..MAX_ENV_VARS {
            m.env.insert(format!("V{i}"), "x".into());
        }
        m.validate(&ManifestPolicy::default()).expect("50 is fine");
        m.env.insert("ONE_MORE".into(), "x".into());
        assert_eq!(
            m.validate(&ManifestPolicy::default()),
            Err(ManifestError::TooManyEnvVars { count: 51, max: 50 })
        );
    }

    #[test]
    fn header_rules() {
        for bad in ["X My", "X:Y", "", "X\r\nY", "Ä"] {
            let mut m = parse("");
            m.headers.allow = vec![bad.into()];
            assert!(
                matches!(
                    m.validate(&ManifestPolicy::default()),
                    Err(ManifestError::InvalidHeaderName { .. })
                ),
                "{bad:?}"
            );
        }
        for reserved in [
            "Authorization",
            "host",
            "Content-Length",
            "Transfer-Encoding",
            "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id",
            "WorkloadAccessToken",
        ] {
            let e = check(&format!("[headers]\nallow = [\"{reserved}\"]\n"))
                .expect_err("must be refused");
            assert!(
                matches!(e, ManifestError::ReservedHeader { .. }),
                "{reserved}"
            );
        }
        let e = check("[headers]\nallow = [\"authorization\"]\n").expect_err("must be refused");
        assert!(
            e.to_string().contains("headers.authorization = true"),
            "{e}"
        );
        let mut m = parse("");
        m.headers.allow = (0..=MAX_ALLOWED_HEADERS)
            .map(|i| format!("X-H{i}"))
            .collect();
        assert!(matches!(
            m.validate(&ManifestPolicy::default()),
            Err(ManifestError::TooManyHeaders { count: 21, max: 20 })
        ));
        m.headers.allow.pop();
        m.validate(&ManifestPolicy::default()).expect("20 is fine");
    }

    #[test]
    fn header_policy_allows() {
        let h = parse("[headers]\nallow = [\"X-My-Header\"]\n").headers;
        assert!(h.allows("x-my-header"));
        assert!(h.allows("X-Amzn-Bedrock-AgentCore-Runtime-Custom-Anything"));
        assert!(!h.allows("X-Amzn-Bedrock-AgentCore-Runtime-Custom-"));
        assert!(!h.allows("X-Other"));
        assert!(!h.allows("Authorization"));
        let h = parse("[headers]\nauthorization = true\n").headers;
        assert!(h.allows("authorization"));
    }

    #[test]
    fn policy_defaults() {
        let p = ManifestPolicy::default();
        assert_eq!(p.min_lifetime_s, 60);
        assert_eq!(p.max_lifetime_s, MAX_LIFETIME_LIMIT_S);
        assert_eq!(p.max_vcpus, 2.0);
        assert_eq!(p.max_memory_mb, 8192);
    }
}
