//! AWS SigV4 signatures made with access key pairs berth issued.
//!
//! Berth never stores a SigV4 secret. Each API key record doubles as a SigV4
//! identity: its access key id is `BKIA` + the record id in upper case, and
//! its secret is `hex(HMAC-SHA256(master, "berth-sigv4:" + id))`, where the
//! 32-byte master key lives in `<data_dir>/sigv4-master.key` (mode 0600).
//! So the secret can be derived again by whoever holds the master key, and
//! revoking the API key revokes the pair with it.
//!
//! Verification rebuilds the canonical request exactly as the SigV4
//! specification defines it for services other than S3 (the path is
//! normalized and then URI-encoded once more, so an ARN that boto3 sent
//! percent-encoded is signed double-encoded), and refuses a signature that is
//! stale, from the future, for another service, made with an unknown or
//! revoked key, over a different body, or seen before within the window.
//!
//! The replay rule has a cost: boto3 does not sign a per-call nonce, so two
//! calls identical in every signed byte (same session, same payload) within
//! the same second carry the same signature, and the second is refused.

use berth_core::Principal;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

type HmacSha256 = Hmac<Sha256>;

/// The file in the data dir that holds the master key.
pub const MASTER_FILE: &str = "sigv4-master.key";
/// Access key ids berth issues start with this.
pub const KEY_PREFIX: &str = "BKIA";
/// The only service name berth answers to.
pub const SERVICE: &str = "bedrock-agentcore";
const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Longest Authorization header looked at; real ones are a few hundred bytes.
const MAX_AUTH_HEADER: usize = 4096;

/// Why a SigV4 request was refused: one variant per cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    #[error("the Authorization header is not a well-formed SigV4 header")]
    MalformedHeader,
    #[error("the credential scope is not DATE/REGION/bedrock-agentcore/aws4_request")]
    BadScope,
    #[error("host and x-amz-date must be signed headers")]
    UnsignedRequiredHeader,
    #[error("a signed header is missing from the request")]
    MissingSignedHeader,
    #[error("x-amz-date is missing or not YYYYMMDDTHHMMSSZ")]
    BadDate,
    #[error("the credential scope date is not the date of x-amz-date")]
    ScopeDateMismatch,
    #[error("x-amz-date is outside the allowed clock skew")]
    Expired,
    #[error("the access key id is not one berth issued")]
    UnknownKey,
    #[error("the access key has been revoked")]
    RevokedKey,
    #[error("x-amz-content-sha256 does not match the body")]
    PayloadHashMismatch,
    #[error("the signature does not match")]
    SignatureMismatch,
    #[error("this signature was already used")]
    Replayed,
    #[error("too many signatures inside the replay window")]
    ReplayCacheFull,
    #[error("the key store is unavailable")]
    Store,
}

impl SigV4Error {
    /// A short, stable reason for the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MalformedHeader => "sigv4: malformed authorization header",
            Self::BadScope => "sigv4: bad credential scope",
            Self::UnsignedRequiredHeader => "sigv4: host or x-amz-date not signed",
            Self::MissingSignedHeader => "sigv4: signed header missing",
            Self::BadDate => "sigv4: bad x-amz-date",
            Self::ScopeDateMismatch => "sigv4: scope date mismatch",
            Self::Expired => "sigv4: request time outside allowed skew",
            Self::UnknownKey => "sigv4: unknown access key",
            Self::RevokedKey => "sigv4: revoked access key",
            Self::PayloadHashMismatch => "sigv4: payload hash mismatch",
            Self::SignatureMismatch => "sigv4: signature mismatch",
            Self::Replayed => "sigv4: replayed signature",
            Self::ReplayCacheFull => "sigv4: replay cache full",
            Self::Store => "key store unavailable",
        }
    }
}

/// Limits of the verifier.
#[derive(Debug, Clone)]
pub struct SigV4Config {
    /// How far `x-amz-date` may be from the server's clock, either way, in
    /// seconds; also how long a used signature is remembered. Default 300.
    pub max_skew_s: u64,
    /// How many used signatures are remembered at most; when the window
    /// holds more, new requests are refused rather than risking a replay.
    /// Default 100 000.
    pub replay_capacity: usize,
}

impl Default for SigV4Config {
    fn default() -> Self {
        Self {
            max_skew_s: 300,
            replay_capacity: 100_000,
        }
    }
}

/// Reads the master key, creating it (0600, 32 random bytes) if absent.
/// Safe against a concurrent creator: the file appears whole or not at all.
pub fn load_or_create_master(data_dir: &Path) -> std::io::Result<[u8; 32]> {
    let path = data_dir.join(MASTER_FILE);
    match read_master(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    let tmp = data_dir.join(format!(".{MASTER_FILE}.{}", std::process::id()));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&key)?;
        f.sync_all()?;
    }
    // A hard link never replaces an existing file, so of two racing
    // creators exactly one wins and the other reads the winner's key.
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_master(&path),
        Err(e) => Err(e),
    }
}

fn read_master(path: &Path) -> std::io::Result<[u8; 32]> {
    let bytes = std::fs::read(path)?;
    bytes.try_into().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not 32 bytes long", path.display()),
        )
    })
}

/// The SigV4 pair of the API key record `key_id`: (access key id, secret).
pub fn credentials(master: &[u8; 32], key_id: &str) -> (String, String) {
    let akid = format!("{KEY_PREFIX}{}", key_id.to_ascii_uppercase());
    (akid, secret_for(master, key_id))
}

fn secret_for(master: &[u8; 32], key_id: &str) -> String {
    hex::encode(hmac(master, format!("berth-sigv4:{key_id}").as_bytes()))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Verifies SigV4-signed requests.
pub struct SigV4Verifier {
    store: Arc<berth_log::SqliteLog>,
    master: [u8; 32],
    cfg: SigV4Config,
    /// Signatures accepted within the window, with when they may be forgotten
    /// (unix ms).
    seen: Mutex<HashMap<[u8; 32], i64>>,
}

impl SigV4Verifier {
    pub fn new(store: Arc<berth_log::SqliteLog>, master: [u8; 32], cfg: SigV4Config) -> Self {
        Self {
            store,
            master,
            cfg,
            seen: Mutex::new(HashMap::new()),
        }
    }

    pub async fn verify(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
    ) -> Result<Principal, SigV4Error> {
        self.verify_at(parts, body, berth_core::now_ms()).await
    }

    async fn verify_at(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
        now_ms: i64,
    ) -> Result<Principal, SigV4Error> {
        let auth = AuthHeader::parse(&parts.headers)?;
        let date = header(&parts.headers, "x-amz-date").ok_or(SigV4Error::BadDate)?;
        let when = parse_amz_date(date).ok_or(SigV4Error::BadDate)?;
        if !date.starts_with(auth.date) {
            return Err(SigV4Error::ScopeDateMismatch);
        }
        let skew_ms = self.cfg.max_skew_s as i64 * 1000;
        if (now_ms - when).abs() > skew_ms {
            return Err(SigV4Error::Expired);
        }
        let key_id = key_id_of(auth.akid).ok_or(SigV4Error::UnknownKey)?;
        let rec = self
            .store
            .api_key_by_id(&key_id)
            .await
            .map_err(|_| SigV4Error::Store)?
            .ok_or(SigV4Error::UnknownKey)?;
        if rec.revoked {
            return Err(SigV4Error::RevokedKey);
        }
        let creq = canonical_request(parts, &auth.signed_headers, &payload_hash(parts, body)?)?;
        let sts = string_to_sign(date, &auth.scope(), &creq);
        let secret = secret_for(&self.master, &rec.id);
        let key = signing_key(&secret, auth.date, auth.region, SERVICE);
        let sig = check_signature(&key, &sts, auth.signature)?;
        self.remember(sig, when + skew_ms, now_ms)?;
        Ok(Principal::authenticated(rec.tenant, rec.user, rec.roles))
    }

    /// Records an accepted signature; refuses one already recorded.
    fn remember(&self, sig: [u8; 32], forget_at: i64, now_ms: i64) -> Result<(), SigV4Error> {
        // A poisoned lock only means another verifier panicked mid-insert;
        // the map itself is still a valid map.
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains_key(&sig) {
            return Err(SigV4Error::Replayed);
        }
        if seen.len() >= self.cfg.replay_capacity {
            seen.retain(|_, t| *t >= now_ms);
            if seen.len() >= self.cfg.replay_capacity {
                return Err(SigV4Error::ReplayCacheFull);
            }
        }
        seen.insert(sig, forget_at);
        Ok(())
    }
}

/// `BKIA<ID>` → the record id `<id>` (record ids are lower-case hex).
fn key_id_of(akid: &str) -> Option<String> {
    let id = akid.strip_prefix(KEY_PREFIX)?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some(id.to_ascii_lowercase())
}

/// The parsed `Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`.
#[derive(Debug)]
struct AuthHeader<'a> {
    akid: &'a str,
    date: &'a str,
    region: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

impl<'a> AuthHeader<'a> {
    fn parse(headers: &'a http::HeaderMap) -> Result<Self, SigV4Error> {
        let raw = header(headers, "authorization").ok_or(SigV4Error::MalformedHeader)?;
        if raw.len() > MAX_AUTH_HEADER {
            return Err(SigV4Error::MalformedHeader);
        }
        let rest = raw
            .strip_prefix(ALGORITHM)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or(SigV4Error::MalformedHeader)?;
        let (mut cred, mut signed, mut sig) = (None, None, None);
        for field in rest.split(',') {
            let (k, v) = field
                .trim()
                .split_once('=')
                .ok_or(SigV4Error::MalformedHeader)?;
            let slot = match k {
                "Credential" => &mut cred,
                "SignedHeaders" => &mut signed,
                "Signature" => &mut sig,
                _ => return Err(SigV4Error::MalformedHeader),
            };
            if slot.replace(v).is_some() {
                return Err(SigV4Error::MalformedHeader);
            }
        }
        let (cred, signed, signature) = match (cred, signed, sig) {
            (Some(c), Some(h), Some(s)) => (c, h, s),
            _ => return Err(SigV4Error::MalformedHeader),
        };
        let scope: Vec<&str> = cred.split('/').collect();
        let [akid, date, region, service, term] = scope.as_slice() else {
            return Err(SigV4Error::MalformedHeader);
        };
        if *service != SERVICE || *term != "aws4_request" || region.is_empty() || date.len() != 8 {
            return Err(SigV4Error::BadScope);
        }
        let signed_headers: Vec<&str> = signed.split(';').collect();
        // Names must be lower case, sorted and unique, as SigV4 defines them.
        let well_formed = signed_headers.windows(2).all(|w| w[0] < w[1])
            && signed_headers
                .iter()
                .all(|h| !h.is_empty() && !h.bytes().any(|b| b.is_ascii_uppercase()));
        if !well_formed {
            return Err(SigV4Error::MalformedHeader);
        }
        if !signed_headers.contains(&"host") || !signed_headers.contains(&"x-amz-date") {
            return Err(SigV4Error::UnsignedRequiredHeader);
        }
        Ok(Self {
            akid,
            date,
            region,
            signed_headers,
            signature,
        })
    }

    fn scope(&self) -> String {
        format!("{}/{}/{SERVICE}/aws4_request", self.date, self.region)
    }
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `YYYYMMDDTHHMMSSZ` → unix ms.
fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, sec) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    Some((days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec) * 1000)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The hex SHA-256 of the body. A client may state it in
/// `x-amz-content-sha256`; berth then insists it is right, and never
/// accepts an unsigned payload.
fn payload_hash(parts: &http::request::Parts, body: &[u8]) -> Result<String, SigV4Error> {
    let actual = hex::encode(Sha256::digest(body));
    match parts.headers.get("x-amz-content-sha256") {
        None => Ok(actual),
        Some(v) if v.as_bytes().eq_ignore_ascii_case(actual.as_bytes()) => Ok(actual),
        Some(_) => Err(SigV4Error::PayloadHashMismatch),
    }
}

fn canonical_request(
    parts: &http::request::Parts,
    signed_headers: &[&str],
    payload_hash: &str,
) -> Result<String, SigV4Error> {
    let mut headers = String::new();
    for name in signed_headers {
        headers.push_str(name);
        headers.push(':');
        headers.push_str(&header_value(parts, name)?);
        headers.push('\n');
    }
    Ok(format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        parts.method.as_str(),
        canonical_path(parts.uri.path()),
        canonical_query(parts.uri.query().unwrap_or("")),
        headers,
        signed_headers.join(";"),
        payload_hash
    ))
}

/// All values of a header, each trimmed with inner runs of spaces folded,
/// joined by commas. `host` falls back to the URI's authority (HTTP/2).
fn header_value(parts: &http::request::Parts, name: &str) -> Result<String, SigV4Error> {
    let mut values = parts.headers.get_all(name).iter().peekable();
    if values.peek().is_none() {
        if name == "host" {
            if let Some(a) = parts.uri.authority() {
                return Ok(a.as_str().to_owned());
            }
        }
        return Err(SigV4Error::MissingSignedHeader);
    }
    let mut out = Vec::new();
    for v in values {
        let v = std::str::from_utf8(v.as_bytes()).map_err(|_| SigV4Error::MissingSignedHeader)?;
        out.push(v.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    Ok(out.join(","))
}

/// The path as received, with dot segments and empty segments removed, then
/// every byte but the unreserved ones and `/` percent-encoded. Encoding the
/// already-encoded path again is what SigV4 prescribes for every service
/// but S3: boto3 sends an ARN as `arn%3Aaws%3A...` and signs
/// `arn%253Aaws%253A...`.
fn canonical_path(raw: &str) -> String {
    let mut segs: Vec<&str> = Vec::new();
    for seg in raw.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let mut path = format!("/{}", segs.join("/"));
    if raw.ends_with('/') && !segs.is_empty() {
        path.push('/');
    }
    uri_encode(&path, false)
}

/// Query pairs decoded, re-encoded the SigV4 way, sorted by key then value.
fn canonical_query(raw: &str) -> String {
    let mut pairs: Vec<(String, String)> = raw
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), true),
                uri_encode(&percent_decode(v), true),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes all but `A-Za-z0-9-_.~` (and `/` unless `slash`).
fn uri_encode(s: &str, slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (b == b'/' && !slash);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (and `+` as itself: SigV4 query strings are not
/// form-encoded). Invalid escapes are kept as they are.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    let hash = hex::encode(Sha256::digest(canonical_request.as_bytes()));
    format!("{ALGORITHM}\n{amz_date}\n{scope}\n{hash}")
}

fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac(&k, region.as_bytes());
    let k = hmac(&k, service.as_bytes());
    hmac(&k, b"aws4_request")
}

/// Compares in constant time; returns the signature's bytes for the replay
/// cache.
fn check_signature(key: &[u8; 32], sts: &str, given: &str) -> Result<[u8; 32], SigV4Error> {
    let given: [u8; 32] = hex::decode(given)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or(SigV4Error::SignatureMismatch)?;
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(sts.as_bytes());
    mac.verify_slice(&given)
        .map_err(|_| SigV4Error::SignatureMismatch)?;
    Ok(given)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::{TenantId, UserId};
    use berth_log::ApiKeyRecord;

    const MASTER: [u8; 32] = [7; 32];
    const KEY_ID: &str = "0123456789ab";
    const AKID: &str = "BKIA0123456789AB";
    const ARN_PATH: &str = "/runtimes/arn%3Aaws%3Abedrock-agentcore%3Aus-east-1%3A123456789012%3Aruntime%2Fecho/invocations";
    const BODY: &[u8] = br#"{"prompt":"hi"}"#;
    /// 2025-01-02T03:04:05Z, the time of the boto3 vector below.
    const T0: i64 = 1_735_787_045_000;
    const DATE: &str = "20250102T030405Z";

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    async fn verifier(revoked: bool) -> (SigV4Verifier, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = berth_log::SqliteLog::open(&dir.path().join("berth.db")).expect("open");
        let rec = ApiKeyRecord {
            id: KEY_ID.into(),
            hash: "h".into(),
            tenant: TenantId::parse("t1").expect("tenant"),
            user: UserId::parse("u1").expect("user"),
            roles: vec![],
            created_at_ms: 0,
            revoked: false,
        };
        store.insert_api_key(&rec).await.expect("insert");
        if revoked {
            store.revoke_api_key(KEY_ID).await.expect("revoke");
        }
        let v = SigV4Verifier::new(Arc::new(store), MASTER, SigV4Config::default());
        (v, dir)
    }

    /// The exact request boto3 1.44 signed (region eu-west-3) with the pair
    /// of `KEY_ID` under `MASTER`; computed with botocore, not with this code.
    fn boto3_request() -> http::request::Parts {
        parts(
            "POST",
            &format!("{ARN_PATH}?qualifier=DEFAULT"),
            &[
                ("host", "127.0.0.1:8080"),
                ("content-type", "application/json"),
                ("x-amzn-bedrock-agentcore-runtime-session-id", "sssssssssssssssssssssssssssssssss"),
                ("x-amz-date", DATE),
                ("authorization", "AWS4-HMAC-SHA256 Credential=BKIA0123456789AB/20250102/eu-west-3/bedrock-agentcore/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amzn-bedrock-agentcore-runtime-session-id, Signature=78fbd574c6d3c43bf66b99559a0126ff43f0e0f5bce83c64e9b53f68ad164b16"),
            ],
        )
    }

    /// Signs `p` with this module's own functions, for the rejection tests
    /// (acceptance is pinned by the independent vectors).
    fn sign(p: &mut http::request::Parts, body: &[u8], secret: &str, date: &str, scope: &str) {
        p.headers.insert("x-amz-date", date.parse().expect("date"));
        let mut names: Vec<String> = p.headers.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let hash = hex::encode(Sha256::digest(body));
        let creq = canonical_request(p, &names, &hash).expect("creq");
        let scope_parts: Vec<&str> = scope.split('/').collect();
        let sts = string_to_sign(date, scope, &creq);
        let key = signing_key(secret, scope_parts[0], scope_parts[1], scope_parts[2]);
        let sig = hex::encode(hmac(&key, sts.as_bytes()));
        let auth = format!(
            "{ALGORITHM} Credential={AKID}/{scope}, SignedHeaders={}, Signature={sig}",
            names.join(";")
        );
        p.headers
            .insert("authorization", auth.parse().expect("auth"));
    }

    fn fresh(date: &str) -> http::request::Parts {
        let mut p = parts(
            "POST",
            &format!("{ARN_PATH}?qualifier=DEFAULT"),
            &[
                ("host", "127.0.0.1:8080"),
                ("content-type", "application/json"),
            ],
        );
        let secret = credentials(&MASTER, KEY_ID).1;
        let scope = format!("{}/us-east-1/{SERVICE}/aws4_request", &date[..8]);
        sign(&mut p, BODY, &secret, date, &scope);
        p
    }

    #[test]
    fn aws_get_vanilla_vector() {
        // aws-sig-v4-test-suite "get-vanilla", as published by AWS.
        let p = parts(
            "GET",
            "/",
            &[
                ("host", "example.amazonaws.com"),
                ("x-amz-date", "20150830T123600Z"),
            ],
        );
        let creq = canonical_request(
            &p,
            &["host", "x-amz-date"],
            &hex::encode(Sha256::digest(b"")),
        )
        .expect("creq");
        assert_eq!(
            creq,
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let sts = string_to_sign(
            "20150830T123600Z",
            "20150830/us-east-1/service/aws4_request",
            &creq,
        );
        assert!(sts.ends_with("bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"));
        let key = signing_key(
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "20150830",
            "us-east-1",
            "service",
        );
        assert_eq!(
            hex::encode(hmac(&key, sts.as_bytes())),
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    #[test]
    fn aws_derived_signing_key_vector() {
        // "Deriving the signing key" example of the AWS documentation.
        let key = signing_key(
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "20120215",
            "us-east-1",
            "iam",
        );
        assert_eq!(
            hex::encode(key),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }

    #[test]
    fn canonical_path_double_encodes_like_boto3() {
        assert_eq!(
            canonical_path(ARN_PATH),
            "/runtimes/arn%253Aaws%253Abedrock-agentcore%253Aus-east-1%253A123456789012%253Aruntime%252Fecho/invocations"
        );
        assert_eq!(canonical_path(""), "/");
        assert_eq!(canonical_path("/a//b/./c/../d/"), "/a/b/d/");
        assert_eq!(canonical_query("b=2&a=%7e x&a=1"), "a=1&a=~%20x&b=2");
    }

    #[test]
    fn amz_dates_parse() {
        assert_eq!(parse_amz_date(DATE), Some(T0));
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        for bad in [
            "20250102T030405",
            "2025-01-02T03:04",
            "20251302T030405Z",
            "2025010xT030405Z",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn accepts_the_boto3_vector_once() {
        let (v, _d) = verifier(false).await;
        let p = boto3_request();
        let who = v.verify_at(&p, BODY, T0 + 1000).await.expect("accepted");
        assert_eq!(who.tenant().as_str(), "t1");
        assert_eq!(who.user().as_str(), "u1");
        assert_eq!(
            v.verify_at(&p, BODY, T0 + 2000).await.err(),
            Some(SigV4Error::Replayed)
        );
    }

    #[tokio::test]
    async fn refuses_an_altered_body_or_a_wrong_content_hash() {
        let (v, _d) = verifier(false).await;
        let p = boto3_request();
        let altered = br#"{"prompt":"ho"}"#;
        assert_eq!(
            v.verify_at(&p, altered, T0).await.err(),
            Some(SigV4Error::SignatureMismatch)
        );
        let mut p = fresh(DATE);
        let stated = hex::encode(Sha256::digest(BODY));
        p.headers
            .insert("x-amz-content-sha256", stated.parse().expect("hash"));
        assert_eq!(
            v.verify_at(&p, altered, T0).await.err(),
            Some(SigV4Error::PayloadHashMismatch)
        );
        p.headers.insert(
            "x-amz-content-sha256",
            "UNSIGNED-PAYLOAD".parse().expect("hash"),
        );
        assert_eq!(
            v.verify_at(&p, BODY, T0).await.err(),
            Some(SigV4Error::PayloadHashMismatch)
        );
    }

    #[tokio::test]
    async fn refuses_stale_and_future_requests() {
        let (v, _d) = verifier(false).await;
        let p = fresh(DATE);
        assert_eq!(
            v.verify_at(&p, BODY, T0 + 301_000).await.err(),
            Some(SigV4Error::Expired)
        );
        assert_eq!(
            v.verify_at(&p, BODY, T0 - 301_000).await.err(),
            Some(SigV4Error::Expired)
        );
        assert!(v.verify_at(&p, BODY, T0 + 299_000).await.is_ok());
    }

    #[tokio::test]
    async fn refuses_wrong_secret_unknown_and_revoked_keys() {
        let (v, _d) = verifier(false).await;
        let mut p = fresh(DATE);
        let scope = format!("20250102/us-east-1/{SERVICE}/aws4_request");
        sign(&mut p, BODY, &credentials(&[8; 32], KEY_ID).1, DATE, &scope);
        assert_eq!(
            v.verify_at(&p, BODY, T0).await.err(),
            Some(SigV4Error::SignatureMismatch)
        );

        let mut p = fresh(DATE);
        let auth = header(&p.headers, "authorization")
            .expect("auth")
            .replace(AKID, "BKIA0123456789AC");
        p.headers
            .insert("authorization", auth.parse().expect("auth"));
        assert_eq!(
            v.verify_at(&p, BODY, T0).await.err(),
            Some(SigV4Error::UnknownKey)
        );
        let auth = header(&p.headers, "authorization")
            .expect("auth")
            .replace("BKIA", "AKIA");
        p.headers
            .insert("authorization", auth.parse().expect("auth"));
        assert_eq!(
            v.verify_at(&p, BODY, T0).await.err(),
            Some(SigV4Error::UnknownKey)
        );

        let (v, _d) = verifier(true).await;
        assert_eq!(
            v.verify_at(&fresh(DATE), BODY, T0).await.err(),
            Some(SigV4Error::RevokedKey)
        );
    }

    #[tokio::test]
    async fn refuses_bad_scopes_headers_and_dates() {
        let (v, _d) = verifier(false).await;
        let secret = credentials(&MASTER, KEY_ID).1;
        let base = || {
            parts(
                "POST",
                ARN_PATH,
                &[
                    ("host", "127.0.0.1:8080"),
                    ("content-type", "application/json"),
                ],
            )
        };
        let mut p = base();
        sign(
            &mut p,
            BODY,
            &secret,
            DATE,
            "20250102/us-east-1/s3/aws4_request",
        );
        assert_eq!(
            v.verify_at(&p, BODY, T0).await.err(),
            Some(SigV4Error::BadScope)
        );
        let mut p = base();
        sign(
            &mut p,
            BODY,
            &secret,
            DATE,
            &format!("20250101/us-east-1/{SERVICE}/aws4_request"),
        );
        assert_eq!(
            v.verify_at(&p, BODY, T0).await.err(),
            Some(SigV4Error::ScopeDateMismatch)
        );

        // Signed without host: drop it from SignedHeaders after signing.
        let mut p = fresh(DATE);
        let auth = header(&p.headers, "authorization")
            .expect("auth")
            .replace("content-type;host;", "content-type;");
        p.headers
            .insert("authorization", auth.parse().expect("auth"));
        assert_eq!(
            v.verify_at(&p, BODY, T0).await.err(),
            Some(SigV4Error::UnsignedRequiredHeader)
        );

        let mut p = fresh(DATE);
        p.headers.remove("content-type");
        assert_eq!(
            v.verify_at(&p, BODY, T0).await.err(),
            Some(SigV4Error::MissingSignedHeader)
        );

        let mut p = fresh(DATE);
        p.headers
            .insert("x-amz-date", "yesterday".parse().expect("date"));
        assert_eq!(
            v.verify_at(&p, BODY, T0).await.err(),
            Some(SigV4Error::BadDate)
        );

        for bad in [
            "AWS4-HMAC-SHA256",
            "AWS4-HMAC-SHA256 Credential=a/b",
            "AWS4-HMAC-SHA256 Credential=BKIAX/20250102/r/bedrock-agentcore/aws4_request, SignedHeaders=x-amz-date;host, Signature=00",
        ] {
            let mut p = fresh(DATE);
            p.headers.insert("authorization", bad.parse().expect("auth"));
            assert_eq!(v.verify_at(&p, BODY, T0).await.err(), Some(SigV4Error::MalformedHeader), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_full_replay_window_refuses_rather_than_forgets() {
        let (mut v, _d) = verifier(false).await;
        v.cfg.replay_capacity = 1;
        assert!(v.verify_at(&fresh(DATE), BODY, T0).await.is_ok());
        assert_eq!(
            v.verify_at(&fresh("20250102T030406Z"), BODY, T0)
                .await
                .err(),
            Some(SigV4Error::ReplayCacheFull)
        );
        // Once the first signature is past the window, it may be forgotten.
        let later = "20250102T031000Z";
        assert!(v.verify_at(&fresh(later), BODY, T0 + 360_000).await.is_ok());
    }

    #[test]
    fn master_key_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create_master(dir.path()).expect("create");
        let b = load_or_create_master(dir.path()).expect("load");
        assert_eq!(a, b);
        let mode = std::fs::metadata(dir.path().join(MASTER_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (akid, secret) = credentials(&a, "abc123");
        assert_eq!(akid, "BKIAABC123");
        assert_ne!(secret, credentials(&a, "abc124").1);
        assert_eq!(key_id_of(&akid).as_deref(), Some("abc123"));
    }
}
