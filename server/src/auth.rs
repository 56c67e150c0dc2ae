//! API keys → who is calling. Every `/v1/*` route runs behind [`require_key`], which puts a
//! [`Principal`] into the request's extensions; handlers read the tenant from it and never look
//! at headers themselves.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::config::Config;
use crate::error::ApiError;

/// Header an admin key uses to act on a tenant.
pub const TENANT_HEADER: &str = "x-tenant";

/// The caller of a request, resolved once from its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The tenant the request acts on; `None` for an admin key without `X-Tenant`.
    pub tenant: Option<String>,
    /// Whether the key is an admin key.
    pub admin: bool,
}

impl Principal {
    /// The tenant name for logs, records and metrics.
    pub fn tenant_label(&self) -> &str {
        self.tenant.as_deref().unwrap_or("admin")
    }

    /// The tenant a tenant-scoped route acts on: 400 for an admin key without `X-Tenant`.
    pub fn require_tenant(&self) -> Result<String, ApiError> {
        self.tenant.clone().ok_or_else(|| {
            ApiError::invalid_body("admin keys must name the tenant with the X-Tenant header")
        })
    }
}

/// Who a key belongs to.
#[derive(Debug, Clone)]
enum KeyOwner {
    Tenant(String),
    Admin,
}

/// The key table built from `config.toml`. Keys are held and looked up by their sha256, so
/// neither the lookup nor the comparison that ends it takes a time that depends on how many
/// leading bytes of a guess match a real key.
#[derive(Debug, Clone, Default)]
pub struct KeyTable {
    keys: HashMap<[u8; 32], KeyOwner>,
    tenants: Vec<String>,
}

impl KeyTable {
    /// Builds the table from `[[tenants]]` and `[admin]`.
    pub fn from_config(cfg: &Config) -> Self {
        let mut keys = HashMap::new();
        for t in &cfg.tenants {
            for k in &t.api_keys {
                keys.insert(Sha256::digest(k).into(), KeyOwner::Tenant(t.id.clone()));
            }
        }
        for k in &cfg.admin.api_keys {
            keys.insert(Sha256::digest(k).into(), KeyOwner::Admin);
        }
        KeyTable {
            keys,
            tenants: cfg.tenants.iter().map(|t| t.id.clone()).collect(),
        }
    }

    /// Resolves the request's `Authorization` and `X-Tenant` headers.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let raw = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::Unauthenticated(
                    "missing API key: send `Authorization: Bearer <key>`".into(),
                )
            })?;
        let key = raw
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthenticated(
                    "malformed Authorization header: expected `Bearer <key>`".into(),
                )
            })?;
        let owner = self
            .keys
            .get(&<[u8; 32]>::from(Sha256::digest(key)))
            .ok_or_else(|| ApiError::Unauthenticated("incorrect API key provided".into()))?;
        let asked = match headers.get(TENANT_HEADER) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| ApiError::invalid("X-Tenant", "X-Tenant is not valid text"))?
                    .trim()
                    .to_string(),
            ),
        };
        match owner {
            KeyOwner::Tenant(own) => match asked {
                Some(other) if &other != own => Err(ApiError::Forbidden(
                    "a tenant key cannot act on another tenant (X-Tenant)".into(),
                )),
                _ => Ok(Principal {
                    tenant: Some(own.clone()),
                    admin: false,
                }),
            },
            KeyOwner::Admin => match asked {
                None => Ok(Principal {
                    tenant: None,
                    admin: true,
                }),
                Some(t) if self.tenants.contains(&t) => Ok(Principal {
                    tenant: Some(t),
                    admin: true,
                }),
                Some(t) => Err(ApiError::NotFound(format!("tenant `{t}` does not exist"))),
            },
        }
    }
}

/// Middleware for `/v1/*`: 401 unless the key is known; otherwise stores the [`Principal`].
pub async fn require_key(
    State(keys): State<Arc<KeyTable>>,
    mut req: Request,
    next: Next,
) -> Response {
    match keys.authenticate(req.headers()) {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn table() -> KeyTable {
        KeyTable::from_config(&Config::load(None).expect("embedded config"))
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn tenant_key_acts_as_its_tenant() {
        let p = table()
            .authenticate(&headers(&[("authorization", "Bearer sk-acme-demo")]))
            .expect("ok");
        assert_eq!(
            p,
            Principal {
                tenant: Some("acme".into()),
                admin: false
            }
        );
    }

    #[test]
    fn missing_and_wrong_keys_are_401() {
        let t = table();
        for h in [
            headers(&[]),
            headers(&[("authorization", "Bearer sk-nope")]),
            headers(&[("authorization", "sk-acme-demo")]),
        ] {
            let e = t.authenticate(&h).expect_err("must fail");
            assert_eq!(e.status(), axum::http::StatusCode::UNAUTHORIZED);
            assert_eq!(e.object().kind, "authentication_error");
        }
    }

    #[test]
    fn admin_key_selects_a_tenant_with_x_tenant() {
        let p = table()
            .authenticate(&headers(&[
                ("authorization", "Bearer sk-admin-demo"),
                ("x-tenant", "globex"),
            ]))
            .expect("ok");
        assert_eq!(
            p,
            Principal {
                tenant: Some("globex".into()),
                admin: true
            }
        );
    }

    #[test]
    fn tenant_key_cannot_switch_tenant() {
        let e = table()
            .authenticate(&headers(&[
                ("authorization", "Bearer sk-acme-demo"),
                ("x-tenant", "globex"),
            ]))
            .expect_err("must fail");
        assert_eq!(e.status(), axum::http::StatusCode::FORBIDDEN);
    }
}
