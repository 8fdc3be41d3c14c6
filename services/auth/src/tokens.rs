//! Issuing access tokens: claims, lifetimes and the signing key ring.

use std::time::Duration;

use mesh_token::{Claims, Jwks, KeyError, KeyRing, SERVICE_SUBJECT_PREFIX, TokenError, Verifier};

/// An issued access token and when it expires (Unix seconds).
#[derive(Debug, Clone)]
pub(crate) struct IssuedToken {
    pub(crate) token: String,
    pub(crate) expires_at: i64,
}

/// Signs the mesh's access tokens.
#[derive(Debug, Clone)]
pub(crate) struct TokenIssuer {
    keys: KeyRing,
    verifier: Verifier,
    issuer: String,
    audience: String,
    ttl: Duration,
}

pub(crate) use mesh_proto::time::unix_now;

impl TokenIssuer {
    pub(crate) fn new(
        keys: KeyRing,
        issuer: String,
        audience: String,
        ttl: Duration,
    ) -> Result<Self, KeyError> {
        // auth issues every token with exactly `ttl`: none it accepts may live longer.
        let verifier = Verifier::new(
            &keys.jwks(),
            issuer.clone(),
            audience.clone(),
            mesh_token::DEFAULT_LEEWAY_SECS,
        )?
        .with_max_lifetime(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        Ok(Self {
            keys,
            verifier,
            issuer,
            audience,
            ttl,
        })
    }

    /// A token for user `user_id` in session `session_id`.
    pub(crate) fn issue_user(
        &self,
        user_id: &str,
        email: &str,
        session_id: &str,
        now: i64,
    ) -> IssuedToken {
        self.issue(
            user_id.to_owned(),
            Some(email.to_owned()),
            Some(session_id.to_owned()),
            now,
        )
    }

    /// Verifies a token signed by this ring (signature and claims only).
    pub(crate) fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        self.verifier.verify(token, now)
    }

    /// A token for service `client_id`: `sub` = `service:<client_id>`, no e-mail, no session.
    pub(crate) fn issue_service(&self, client_id: &str, now: i64) -> IssuedToken {
        self.issue(
            format!("{SERVICE_SUBJECT_PREFIX}{client_id}"),
            None,
            None,
            now,
        )
    }

    fn issue(
        &self,
        sub: String,
        email: Option<String>,
        sid: Option<String>,
        now: i64,
    ) -> IssuedToken {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let expires_at = now.saturating_add(ttl);
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: vec![self.audience.clone()],
            sub,
            email,
            sid,
            iat: now,
            nbf: now,
            exp: expires_at,
            jti: uuid::Uuid::now_v7().to_string(),
        };
        IssuedToken {
            token: self.keys.sign(&claims),
            expires_at,
        }
    }

    /// The public keys of every signing key.
    pub(crate) fn jwks(&self) -> Jwks {
        self.keys.jwks()
    }

    /// How long access tokens live.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }
}
