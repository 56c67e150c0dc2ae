//! Per-tenant admission limits, so one tenant flooding the server cannot take every batch slot
//! and queue place from the others: each tenant (the admin key counts as one) may have at most
//! `[limits] tenant_max_sequences` sequences and `tenant_max_tokens` tokens (prompt plus
//! `max_tokens`, per sequence) admitted at once. A request over either gets 429 with
//! `Retry-After`; the shared queue (`max_queue`) still bounds everyone together.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What one tenant has admitted now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct InUse {
    sequences: usize,
    tokens: usize,
}

/// The limits and every tenant's use of them.
#[derive(Debug)]
pub struct TenantQuotas {
    max_sequences: usize,
    max_tokens: usize,
    in_use: Mutex<HashMap<String, InUse>>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tenant `{tenant}` has {in_use} {what} in flight and this request needs {asked} more; the limit is {limit}")]
pub struct QuotaExceeded {
    /// The tenant.
    pub tenant: String,
    /// `sequences` or `tokens`.
    pub what: &'static str,
    /// In flight before this request.
    pub in_use: usize,
    /// What this request needs.
    pub asked: usize,
    /// The configured limit.
    pub limit: usize,
}

/// Admitted use, given back when dropped (the response finished or the client went away).
#[derive(Debug)]
pub struct QuotaLease {
    quotas: Arc<TenantQuotas>,
    tenant: String,
    held: InUse,
}

impl TenantQuotas {
    /// Limits per tenant.
    pub fn new(max_sequences: usize, max_tokens: usize) -> Arc<TenantQuotas> {
        Arc::new(TenantQuotas {
            max_sequences,
            max_tokens,
            in_use: Mutex::new(HashMap::new()),
        })
    }

    /// Admits `sequences` sequences of `tokens` tokens in all for `tenant`, or says which limit
    /// it would pass. A request larger than a limit by itself is refused the same way (the
    /// request validation bounds `n` and tokens well below the defaults).
    pub fn try_admit(
        self: &Arc<Self>,
        tenant: &str,
        sequences: usize,
        tokens: usize,
    ) -> Result<QuotaLease, QuotaExceeded> {
        let mut map = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        let now = map.get(tenant).copied().unwrap_or_default();
        let refuse = |what, in_use, asked, limit| QuotaExceeded {
            tenant: tenant.to_string(),
            what,
            in_use,
            asked,
            limit,
        };
        if now.sequences + sequences > self.max_sequences {
            return Err(refuse(
                "sequences",
                now.sequences,
                sequences,
                self.max_sequences,
            ));
        }
        if now.tokens + tokens > self.max_tokens {
            return Err(refuse("tokens", now.tokens, tokens, self.max_tokens));
        }
        let entry = map.entry(tenant.to_string()).or_default();
        entry.sequences += sequences;
        entry.tokens += tokens;
        Ok(QuotaLease {
            quotas: Arc::clone(self),
            tenant: tenant.to_string(),
            held: InUse { sequences, tokens },
        })
    }

    /// Sequences `tenant` has in flight.
    pub fn sequences_of(&self, tenant: &str) -> usize {
        let map = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        map.get(tenant).map_or(0, |u| u.sequences)
    }
}

impl Drop for QuotaLease {
    fn drop(&mut self) {
        let mut map = self.quotas.in_use.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = map.get_mut(&self.tenant) {
            u.sequences = u.sequences.saturating_sub(self.held.sequences);
            u.tokens = u.tokens.saturating_sub(self.held.tokens);
            if *u == InUse::default() {
                map.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tenant_has_its_own_budget_given_back_on_drop() {
        let q = TenantQuotas::new(4, 1000);
        let a = q.try_admit("acme", 3, 300).expect("fits");
        let e = q.try_admit("acme", 2, 10).expect_err("5 sequences > 4");
        assert_eq!((e.what, e.in_use, e.asked, e.limit), ("sequences", 3, 2, 4));
        let b = q
            .try_admit("globex", 4, 900)
            .expect("another tenant is unaffected");
        assert_eq!(
            q.try_admit("acme", 1, 800).expect_err("tokens").what,
            "tokens"
        );
        let one = q.try_admit("acme", 1, 700).expect("fits exactly");
        drop(a);
        assert_eq!(q.sequences_of("acme"), 1);
        drop(one);
        drop(b);
        assert_eq!(q.sequences_of("acme"), 0);
        assert!(q.in_use.lock().unwrap().is_empty(), "no entry left behind");
    }
}
