//! Who is making a request.

use crate::ids::{TenantId, UserId};
use serde::{Deserialize, Serialize};

/// A role a principal holds within its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sees and stops every session of its tenant, deploys agents, and may
    /// act for the tenant's users.
    Admin,
    /// May name the user it acts for with
    /// `X-Amzn-Bedrock-AgentCore-Runtime-User-Id` (a trusted front end).
    ActForUsers,
}

/// The authenticated caller: a user of a tenant, with roles.
///
/// Only the authentication layer should build one (`Principal::authenticated`),
/// after it has checked a credential; every other layer receives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Principal {
    tenant: TenantId,
    user: UserId,
    roles: Vec<Role>,
}

impl Principal {
    /// Built by the auth layer once a credential has been verified.
    pub fn authenticated(tenant: TenantId, user: UserId, roles: Vec<Role>) -> Self {
        Self {
            tenant,
            user,
            roles,
        }
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub fn user(&self) -> &UserId {
        &self.user
    }

    pub fn roles(&self) -> &[Role] {
        &self.roles
    }

    pub fn is_admin(&self) -> bool {
        self.roles.contains(&Role::Admin)
    }

    /// May this principal name another user of its tenant to act for?
    pub fn may_act_for_users(&self) -> bool {
        self.is_admin() || self.roles.contains(&Role::ActForUsers)
    }

    /// The principal of `user` in this principal's tenant, when this
    /// principal may act for users. The delegate keeps no roles of its own.
    pub fn act_for(&self, user: UserId) -> Option<Principal> {
        self.may_act_for_users()
            .then(|| Principal::authenticated(self.tenant.clone(), user, Vec::new()))
    }

    /// May this principal act on a session owned by `tenant`/`user`?
    /// The owner may; an admin may within its own tenant; nobody may across
    /// tenants.
    pub fn may_access(&self, tenant: &TenantId, user: &UserId) -> bool {
        &self.tenant == tenant && (&self.user == user || self.is_admin())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: &str, u: &str, admin: bool) -> Principal {
        let roles = if admin { vec![Role::Admin] } else { vec![] };
        Principal::authenticated(
            TenantId::parse(t).unwrap(),
            UserId::parse(u).unwrap(),
            roles,
        )
    }

    #[test]
    fn access_rules() {
        let t = TenantId::parse("a").unwrap();
        let u = UserId::parse("u1").unwrap();
        assert!(p("a", "u1", false).may_access(&t, &u));
        assert!(!p("a", "u2", false).may_access(&t, &u));
        assert!(p("a", "u2", true).may_access(&t, &u));
        assert!(!p("b", "u1", true).may_access(&t, &u));
    }
}
