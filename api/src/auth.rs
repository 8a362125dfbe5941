//! Authentication: JWT bearer tokens (HS256 with a shared secret; RS256
//! with a public key, optionally) carrying a tenant and roles.
//!
//! Claims: `sub` (who), `tenant` (whose data), `roles` (a list of
//! `viewer`, `operator`, `auditor`, `eraser`; a single `role` string is
//! accepted too), `exp` (required), `iat`. Roles add up: `viewer` may query
//! and subscribe, `operator` may also run mutations, `auditor` may also run
//! the audit queries (history, time travel, the event log), `eraser` may
//! erase personal data (`erasePersonalData`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// A role a token can grant.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Queries and subscriptions.
    Viewer,
    /// Plus mutations (commands).
    Operator,
    /// Plus audit queries (history, time travel, the event log).
    Auditor,
    /// May erase personal data (`erasePersonalData`); grants nothing else
    /// (add `viewer` to read).
    Eraser,
}

impl Role {
    /// The name used in tokens and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::Eraser => "eraser",
        }
    }
}

/// Who is calling: the verified claims of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Subject (user, service or agent name); recorded as the actor of commands.
    pub subject: String,
    /// The tenant whose data this caller sees and writes.
    pub tenant: String,
    /// Roles granted.
    pub roles: BTreeSet<Role>,
    /// When the token stops being accepted (its `exp` plus the leeway),
    /// seconds since the Unix epoch: a WebSocket opened with it is closed
    /// then.
    pub expires_at: u64,
}

impl Principal {
    /// Whether the caller may do what `role` allows. Every role may read.
    pub fn may(&self, role: Role) -> bool {
        match role {
            Role::Viewer => !self.roles.is_empty(),
            other => self.roles.contains(&other),
        }
    }
}

/// The claims of a Neurectomy token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Subject.
    pub sub: String,
    /// Tenant.
    pub tenant: String,
    /// Roles.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<Role>,
    /// A single role (accepted from other issuers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    #[serde(default)]
    pub iat: u64,
}

/// Why a request is not authenticated (`UNAUTHENTICATED`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("no bearer token: send `Authorization: Bearer <token>` (on WebSockets, `{{\"authorization\": \"Bearer <token>\"}}` in connection_init); `neurectomy token` mints one")]
    Missing,
    /// The header is not `Bearer <token>`.
    #[error("the Authorization header must be `Bearer <token>`")]
    Malformed,
    /// The token has expired.
    #[error("the token has expired; mint a new one")]
    Expired,
    /// The token is invalid (signature, algorithm, claims).
    #[error("the token is invalid: {0}")]
    Invalid(String),
}

/// Verifies and mints tokens.
#[derive(Clone)]
pub struct Authenticator {
    hs256: Option<(EncodingKey, DecodingKey)>,
    rs256: Option<DecodingKey>,
    validation_hs: Validation,
    validation_rs: Validation,
    verified: Arc<Verified>,
}

/// Seconds a token is accepted after its `exp`.
pub const LEEWAY: u64 = 5;

/// Tokens verified recently, by their text: a client sends the same token
/// with every request, and checking its signature and claims again each
/// time is a large part of a small query's cost. A hit is the very token
/// verified before; only its expiry is checked again. Bounded: starts over
/// at [`Verified::ENTRIES`] tokens.
#[derive(Default)]
struct Verified {
    tokens: Mutex<HashMap<String, (Principal, u64)>>,
}

impl Verified {
    const ENTRIES: usize = 4_096;

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Principal, u64)>> {
        // Held for a lookup or an insert only; a panic leaves a usable map.
        crate::sync::lock(&self.tokens)
    }

    /// The principal of `token` if verified before and not expired by `now`.
    fn get(&self, token: &str, now: u64) -> Option<Principal> {
        let mut tokens = self.lock();
        match tokens.get(token) {
            Some((principal, until)) if now <= *until => Some(principal.clone()),
            Some(_) => {
                tokens.remove(token);
                None
            }
            None => None,
        }
    }

    fn insert(&self, token: &str, principal: Principal, until: u64) {
        let mut tokens = self.lock();
        if tokens.len() >= Self::ENTRIES {
            tokens.clear();
        }
        tokens.insert(token.to_owned(), (principal, until));
    }
}

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("hs256", &self.hs256.is_some())
            .field("rs256", &self.rs256.is_some())
            .finish()
    }
}

/// A configuration problem with the keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Neither a secret nor a public key.
    #[error("no JWT key configured: set NEURECTOMY_JWT_SECRET (HS256, at least 32 bytes) or NEURECTOMY_JWT_PUBLIC_KEY (RS256 PEM file)")]
    None,
    /// The secret is too short to be safe.
    #[error("NEURECTOMY_JWT_SECRET is {0} bytes; use at least 32")]
    ShortSecret(usize),
    /// The public key cannot be read or parsed.
    #[error("NEURECTOMY_JWT_PUBLIC_KEY: {0}")]
    PublicKey(String),
}

fn validation(algorithm: Algorithm) -> Validation {
    let mut v = Validation::new(algorithm);
    v.leeway = LEEWAY;
    v.validate_exp = true;
    v.set_required_spec_claims(&["exp", "sub"]);
    v
}

impl Authenticator {
    /// From an HS256 secret and/or an RS256 public key in PEM.
    pub fn new(secret: Option<&str>, public_key_pem: Option<&[u8]>) -> Result<Self, KeyError> {
        let hs256 = match secret {
            Some(secret) if secret.len() < 32 => return Err(KeyError::ShortSecret(secret.len())),
            Some(secret) => Some((
                EncodingKey::from_secret(secret.as_bytes()),
                DecodingKey::from_secret(secret.as_bytes()),
            )),
            None => None,
        };
        let rs256 = public_key_pem
            .map(|pem| {
                DecodingKey::from_rsa_pem(pem).map_err(|e| KeyError::PublicKey(e.to_string()))
            })
            .transpose()?;
        if hs256.is_none() && rs256.is_none() {
            return Err(KeyError::None);
        }
        Ok(Self {
            hs256,
            rs256,
            validation_hs: validation(Algorithm::HS256),
            validation_rs: validation(Algorithm::RS256),
            verified: Arc::default(),
        })
    }

    /// Verifies a token and returns who it names.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let now = now_seconds();
        if let Some(principal) = self.verified.get(token, now) {
            return Ok(principal);
        }
        let (principal, exp) = self.check(token)?;
        self.verified
            .insert(token, principal.clone(), exp.saturating_add(LEEWAY));
        Ok(principal)
    }

    /// Checks a token's signature and claims: who it names, and its `exp`.
    fn check(&self, token: &str) -> Result<(Principal, u64), AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("not a JWT ({e})")))?;
        let (key, validation) = match header.alg {
            Algorithm::HS256 => match &self.hs256 {
                Some((_, key)) => (key, &self.validation_hs),
                None => return Err(AuthError::Invalid("HS256 tokens are not accepted".into())),
            },
            Algorithm::RS256 => match &self.rs256 {
                Some(key) => (key, &self.validation_rs),
                None => return Err(AuthError::Invalid("RS256 tokens are not accepted".into())),
            },
            other => {
                return Err(AuthError::Invalid(format!(
                    "algorithm {other:?} is not accepted (HS256 or RS256)"
                )))
            }
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        let claims = data.claims;
        if claims.tenant.trim().is_empty() {
            return Err(AuthError::Invalid("the `tenant` claim is empty".into()));
        }
        let mut roles: BTreeSet<Role> = claims.roles.into_iter().collect();
        roles.extend(claims.role);
        if roles.is_empty() {
            return Err(AuthError::Invalid(
                "the token grants no role (`roles`: viewer, operator, auditor, eraser)".into(),
            ));
        }
        // The tenant and subject are stored with every event (text
        // columns, which refuse NUL) and scope every key: a token naming
        // them with control characters is refused here, not by the store.
        for (claim, value) in [("tenant", &claims.tenant), ("sub", &claims.sub)] {
            if value.chars().any(char::is_control) || value.len() > 256 {
                return Err(AuthError::Invalid(format!(
                    "the `{claim}` claim must be at most 256 bytes without control characters"
                )));
            }
        }
        let principal = Principal {
            subject: claims.sub,
            tenant: claims.tenant,
            roles,
            expires_at: claims.exp.saturating_add(LEEWAY),
        };
        Ok((principal, claims.exp))
    }

    /// Verifies the value of an `Authorization` header.
    pub fn verify_header(&self, value: Option<&str>) -> Result<Principal, AuthError> {
        let value = value.ok_or(AuthError::Missing)?.trim();
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(AuthError::Malformed)?;
        self.verify(token.trim())
    }

    /// Mints an HS256 token valid for `ttl_seconds`.
    pub fn mint(
        &self,
        subject: &str,
        tenant: &str,
        roles: &[Role],
        ttl_seconds: u64,
    ) -> Result<String, AuthError> {
        let exp = now_seconds().saturating_add(ttl_seconds);
        self.mint_expiring_at(subject, tenant, roles, exp)
    }

    /// Mints an HS256 token whose `exp` is `exp` (seconds since the Unix
    /// epoch; it is accepted until [`LEEWAY`] seconds after).
    pub fn mint_expiring_at(
        &self,
        subject: &str,
        tenant: &str,
        roles: &[Role],
        exp: u64,
    ) -> Result<String, AuthError> {
        let Some((key, _)) = &self.hs256 else {
            return Err(AuthError::Invalid(
                "minting needs NEURECTOMY_JWT_SECRET (HS256)".into(),
            ));
        };
        let claims = Claims {
            sub: subject.to_owned(),
            tenant: tenant.to_owned(),
            roles: roles.to_vec(),
            role: None,
            exp,
            iat: now_seconds(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verified_token_is_remembered_until_it_expires() {
        let verified = Verified::default();
        let principal = Principal {
            subject: "s".into(),
            tenant: "t".into(),
            roles: BTreeSet::from([Role::Viewer]),
            expires_at: 100,
        };
        verified.insert("token", principal.clone(), 100);
        assert_eq!(verified.get("token", 100), Some(principal));
        assert_eq!(verified.get("token", 101), None, "expired");
        assert_eq!(verified.get("token", 50), None, "dropped once expired");
        assert_eq!(verified.get("other", 50), None);
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn minted_tokens_verify_and_carry_tenant_and_roles() {
        let auth = Authenticator::new(Some(SECRET), None).unwrap();
        let token = auth
            .mint("ada", "acme", &[Role::Operator, Role::Auditor], 60)
            .unwrap();
        let who = auth
            .verify_header(Some(&format!("Bearer {token}")))
            .unwrap();
        assert_eq!(who.tenant, "acme");
        assert!(who.may(Role::Viewer) && who.may(Role::Operator) && who.may(Role::Auditor));
        let viewer = auth
            .verify(&auth.mint("bob", "acme", &[Role::Viewer], 60).unwrap())
            .unwrap();
        assert!(viewer.may(Role::Viewer) && !viewer.may(Role::Operator));
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let auth = Authenticator::new(Some(SECRET), None).unwrap();
        let other = Authenticator::new(Some(&SECRET.replace('0', "x")), None).unwrap();
        let forged = other.mint("eve", "acme", &[Role::Operator], 60).unwrap();
        assert!(matches!(auth.verify(&forged), Err(AuthError::Invalid(_))));
        assert_eq!(auth.verify_header(None), Err(AuthError::Missing));
        assert_eq!(
            auth.verify_header(Some("Basic abc")),
            Err(AuthError::Malformed)
        );
        assert!(matches!(auth.verify("garbage"), Err(AuthError::Invalid(_))));
        let expired = {
            let claims = Claims {
                sub: "ada".into(),
                tenant: "acme".into(),
                roles: vec![Role::Viewer],
                role: None,
                exp: 1,
                iat: 0,
            };
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap()
        };
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
        assert!(matches!(
            Authenticator::new(Some("short"), None),
            Err(KeyError::ShortSecret(5))
        ));
    }
}
