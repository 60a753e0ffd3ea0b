//! An in-memory cache of API keys by hash: the lookup runs on every request.

use crate::ApiKeyRecord;
use std::collections::HashMap;
use std::sync::Mutex;

/// More keys than this and the cache starts over, so a flood of distinct
/// keys cannot grow it without bound.
const MAX_CACHED_KEYS: usize = 10_000;

/// Only keys found in the database are cached (unknown hashes are not, so
/// guessing cannot fill it). The writer invalidates it after every commit that
/// changed a key; the generation stops a read that started before that commit
/// from putting the old record back afterwards.
#[derive(Default)]
pub(super) struct KeyCache {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    generation: u64,
    by_hash: HashMap<String, ApiKeyRecord>,
}

impl KeyCache {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic while holding it; the map is still a
        // valid cache, at worst missing an entry.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached record, or the generation to pass to `put` after reading
    /// the database.
    pub(super) fn get(&self, hash: &str) -> Result<ApiKeyRecord, u64> {
        let state = self.state();
        state.by_hash.get(hash).cloned().ok_or(state.generation)
    }

    pub(super) fn put(&self, generation: u64, key: ApiKeyRecord) {
        let mut state = self.state();
        if state.generation != generation {
            return;
        }
        if state.by_hash.len() >= MAX_CACHED_KEYS {
            state.by_hash.clear();
        }
        state.by_hash.insert(key.hash.clone(), key);
    }

    pub(super) fn invalidate(&self) {
        let mut state = self.state();
        state.generation += 1;
        state.by_hash.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::{TenantId, UserId};

    fn key(hash: &str) -> ApiKeyRecord {
        ApiKeyRecord {
            id: format!("id-{hash}"),
            hash: hash.to_owned(),
            tenant: TenantId::parse("t").unwrap(),
            user: UserId::parse("u").unwrap(),
            roles: vec![],
            created_at_ms: 0,
            revoked: false,
        }
    }

    #[test]
    fn a_read_from_before_an_invalidation_is_not_cached() {
        let cache = KeyCache::default();
        let generation = cache.get("h").unwrap_err();
        cache.invalidate();
        cache.put(generation, key("h"));
        assert!(cache.get("h").is_err());
        let generation = cache.get("h").unwrap_err();
        cache.put(generation, key("h"));
        assert_eq!(cache.get("h").unwrap(), key("h"));
    }
}
