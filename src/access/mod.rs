//! Who may read and write what: the one place `http` asks (the hub never knows).
//!
//! - [`auth`] — tokens (JWT, API keys) into a [`Principal`].
//! - [`policy`] — a principal and a table into an [`Access`]: rights, a row filter bound to
//!   the claims, visible columns.

pub mod auth;
pub mod policy;

use std::sync::Arc;

pub use auth::{AuthConfig, AuthError, Authenticator, Principal};
pub use policy::{Access, Policies};

use crate::sql::TableInfo;

/// Authentication and policies together.
#[derive(Debug)]
pub struct Gate {
    /// Verifies tokens.
    pub auth: Arc<Authenticator>,
    /// Decides per table.
    pub policies: Policies,
}

impl Gate {
    /// The principal for a request carrying `token` (or none).
    pub fn principal(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        self.auth.authenticate(token)
    }

    /// What `principal` may do with `table`.
    pub fn access(&self, table: &TableInfo, principal: &Principal) -> Access {
        self.policies
            .access(&table.name, &table.key_columns, principal)
    }
}
