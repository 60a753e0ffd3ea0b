//! Per-tenant and per-user quotas: live sessions (a count: 402 when full),
//! session creations per minute and invocations per second (rates: 429).
//! Every check runs before a sandbox is started.

use berth_core::{Principal, TenantId, UserId};
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::time::Instant;

/// Quota settings. `None` means unlimited. Each field's doc gives its default.
#[derive(Debug, Clone)]
pub struct QuotaConfig {
    /// Live sessions per tenant (default 1000).
    pub tenant_sessions: Option<u32>,
    /// Live sessions per user (default 1000).
    pub user_sessions: Option<u32>,
    /// New sessions per minute per tenant (default 6000).
    pub tenant_creations_per_minute: Option<u32>,
    /// New sessions per minute per user (default 6000).
    pub user_creations_per_minute: Option<u32>,
    /// Invocations per second per tenant (default 50000).
    pub tenant_invocations_per_second: Option<u32>,
    /// Invocations per second per user (default 20000).
    pub user_invocations_per_second: Option<u32>,
    /// Whether idle sessions hold a slot in the session counts (default
    /// true); false lets a user keep idle sessions without using quota.
    pub idle_sessions_count: bool,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            tenant_sessions: Some(1000),
            user_sessions: Some(1000),
            tenant_creations_per_minute: Some(6000),
            user_creations_per_minute: Some(6000),
            tenant_invocations_per_second: Some(50_000),
            user_invocations_per_second: Some(20_000),
            idle_sessions_count: true,
        }
    }
}

/// Which quota refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("the {scope}'s live-session quota of {limit} is used up")]
    Sessions { scope: &'static str, limit: u32 },
    #[error("the {scope} is over its rate of {limit} {what}")]
    Rate {
        scope: &'static str,
        limit: u32,
        what: &'static str,
    },
}

/// A token bucket refilled at `per_second`, holding at most `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant, per_second: f64, burst: f64) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * per_second;
        self.tokens = (self.tokens + refill).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Buckets by key. Bounded: past `MAX_KEYS` the oldest-refilled entries go
/// (they are full again by then or nearly so).
struct Buckets<K> {
    map: HashMap<K, Bucket>,
}

const MAX_KEYS: usize = 100_000;

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
        }
    }

    fn take(&mut self, key: &K, now: Instant, per_second: f64, burst: f64) -> bool {
        if self.map.len() >= MAX_KEYS && !self.map.contains_key(key) {
            let horizon = now - std::time::Duration::from_secs(60);
            self.map.retain(|_, b| b.last > horizon);
            if self.map.len() >= MAX_KEYS {
                self.map.clear();
            }
        }
        let b = self.map.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        b.take(now, per_second, burst)
    }

    /// Gives back a token taken by mistake (another check refused).
    fn refund(&mut self, key: &K) {
        if let Some(b) = self.map.get_mut(key) {
            b.tokens += 1.0;
        }
    }
}

struct Rates {
    tenant_creations: Buckets<TenantId>,
    user_creations: Buckets<(TenantId, UserId)>,
    tenant_invocations: Buckets<TenantId>,
    user_invocations: Buckets<(TenantId, UserId)>,
}

pub(crate) struct Quotas {
    cfg: QuotaConfig,
    rates: Mutex<Rates>,
}

/// Live sessions of a tenant and of one of its users, as the registry counts them.
pub(crate) struct LiveCounts {
    pub tenant: usize,
    pub user: usize,
}

impl Quotas {
    pub(crate) fn new(cfg: QuotaConfig) -> Self {
        Self {
            cfg,
            rates: Mutex::new(Rates {
                tenant_creations: Buckets::new(),
                user_creations: Buckets::new(),
                tenant_invocations: Buckets::new(),
                user_invocations: Buckets::new(),
            }),
        }
    }

    pub(crate) fn idle_sessions_count(&self) -> bool {
        self.cfg.idle_sessions_count
    }

    fn rates(&self) -> std::sync::MutexGuard<'_, Rates> {
        // Buckets stay valid whatever a panicking holder did.
        self.rates.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One invocation by `who`.
    pub(crate) fn invocation(&self, who: &Principal) -> Result<(), QuotaError> {
        let now = Instant::now();
        let t = who.tenant().clone();
        let u = (t.clone(), who.user().clone());
        let mut r = self.rates();
        check_rate(
            &mut r.tenant_invocations,
            &t,
            self.cfg.tenant_invocations_per_second,
            1.0,
            now,
            "tenant",
            "invocations per second",
        )?;
        if let Err(e) = check_rate(
            &mut r.user_invocations,
            &u,
            self.cfg.user_invocations_per_second,
            1.0,
            now,
            "user",
            "invocations per second",
        ) {
            r.tenant_invocations.refund(&t);
            return Err(e);
        }
        Ok(())
    }

    /// One new session by `who`, which already has `live` sessions.
    pub(crate) fn creation(&self, who: &Principal, live: LiveCounts) -> Result<(), QuotaError> {
        if let Some(limit) = self.cfg.tenant_sessions {
            if live.tenant >= limit as usize {
                return Err(QuotaError::Sessions {
                    scope: "tenant",
                    limit,
                });
            }
        }
        if let Some(limit) = self.cfg.user_sessions {
            if live.user >= limit as usize {
                return Err(QuotaError::Sessions {
                    scope: "user",
                    limit,
                });
            }
        }
        let now = Instant::now();
        let t = who.tenant().clone();
        let u = (t.clone(), who.user().clone());
        let mut r = self.rates();
        check_rate(
            &mut r.tenant_creations,
            &t,
            self.cfg.tenant_creations_per_minute,
            60.0,
            now,
            "tenant",
            "new sessions per minute",
        )?;
        if let Err(e) = check_rate(
            &mut r.user_creations,
            &u,
            self.cfg.user_creations_per_minute,
            60.0,
            now,
            "user",
            "new sessions per minute",
        ) {
            r.tenant_creations.refund(&t);
            return Err(e);
        }
        Ok(())
    }
}

/// `limit` events per `period_s` seconds, with a burst of `limit`.
fn check_rate<K: std::hash::Hash + Eq + Clone>(
    buckets: &mut Buckets<K>,
    key: &K,
    limit: Option<u32>,
    period_s: f64,
    now: Instant,
    scope: &'static str,
    what: &'static str,
) -> Result<(), QuotaError> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let per_second = f64::from(limit) / period_s;
    if buckets.take(key, now, per_second, f64::from(limit.max(1))) {
        Ok(())
    } else {
        Err(QuotaError::Rate { scope, limit, what })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::Role;
    use std::time::Duration;

    fn who(t: &str, u: &str) -> Principal {
        Principal::authenticated(
            TenantId::parse(t).unwrap(),
            UserId::parse(u).unwrap(),
            Vec::<Role>::new(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn invocation_rates_refill_over_time() {
        let q = Quotas::new(QuotaConfig {
            user_invocations_per_second: Some(5),
            ..QuotaConfig::default()
        });
        let a = who("t", "a");
        for _ in 0..5 {
            assert!(q.invocation(&a).is_ok());
        }
        assert!(matches!(
            q.invocation(&a),
            Err(QuotaError::Rate { scope: "user", .. })
        ));
        // Another user of the same tenant is not affected.
        assert!(q.invocation(&who("t", "b")).is_ok());
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(q.invocation(&a).is_ok());
        assert!(q.invocation(&a).is_ok());
        assert!(q.invocation(&a).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn session_counts_and_creation_rates() {
        let q = Quotas::new(QuotaConfig {
            user_sessions: Some(2),
            tenant_creations_per_minute: Some(3),
            ..QuotaConfig::default()
        });
        let a = who("t", "a");
        let live = |t, u| LiveCounts { tenant: t, user: u };
        assert!(q.creation(&a, live(0, 0)).is_ok());
        assert_eq!(
            q.creation(&a, live(2, 2)),
            Err(QuotaError::Sessions {
                scope: "user",
                limit: 2
            })
        );
        assert!(q.creation(&a, live(1, 1)).is_ok());
        assert!(q.creation(&who("t", "b"), live(2, 0)).is_ok());
        assert!(matches!(
            q.creation(&who("t", "c"), live(3, 0)),
            Err(QuotaError::Rate {
                scope: "tenant",
                ..
            })
        ));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(q.creation(&who("t", "c"), live(3, 0)).is_ok());
    }
}
