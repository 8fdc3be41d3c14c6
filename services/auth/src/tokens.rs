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
    /// The tokens this process has verified (its keys never change while it runs): every
    /// `ListSessions`, `ValidateToken` and account call checks the caller's token, and a
    /// client sends the same one for its whole life.
    verified: std::sync::Arc<mesh_authn::VerifiedTokens>,
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
            verified: std::sync::Arc::default(),
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

    /// Verifies a token signed by this ring (signature and claims only), once per token: a
    /// token seen before has only its times checked again.
    pub(crate) fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        self.verified.verify(&self.verifier, token, now)
    }

    /// How many verifications were answered without checking a signature.
    #[cfg(test)]
    pub(crate) fn verified_hits(&self) -> u64 {
        self.verified.hits()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> TokenIssuer {
        TokenIssuer::new(
            KeyRing::generate().expect("a key"),
            "https://auth.test".into(),
            "mesh".into(),
            Duration::from_secs(900),
        )
        .expect("issuer")
    }

    /// A token's signature is checked once; its times on every use, so it still expires; a
    /// token that fails is never taken as verified, however often it comes.
    #[test]
    fn tokens_are_verified_once() {
        let issuer = issuer();
        let now = unix_now();
        let token = issuer.issue_user("u1", "u1@example.com", "s1", now).token;
        assert_eq!(issuer.verify(&token, now).expect("valid").sub, "u1");
        assert_eq!(issuer.verified_hits(), 0);
        for _ in 0..3 {
            assert_eq!(
                issuer.verify(&token, now).expect("valid").sid.as_deref(),
                Some("s1")
            );
        }
        assert_eq!(
            issuer.verified_hits(),
            3,
            "answered without a signature check"
        );
        assert!(matches!(
            issuer.verify(&token, now + 3600),
            Err(TokenError::Expired)
        ));
        // The same header and claims under a signature changed in its middle: well-formed,
        // a known key, the wrong signature — refused every time, never cached.
        let signature_start = token.rfind('.').expect("three parts") + 1;
        let middle = signature_start + (token.len() - signature_start) / 2;
        let mut forged = token.clone().into_bytes();
        forged[middle] = if forged[middle] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).expect("ASCII");
        for _ in 0..2 {
            assert!(matches!(
                issuer.verify(&forged, now),
                Err(TokenError::Signature)
            ));
        }
        assert_eq!(issuer.verified_hits(), 3);
        // Another ring's token with the same claims is not this ring's.
        let other = self::issuer()
            .issue_user("u1", "u1@example.com", "s1", now)
            .token;
        assert!(issuer.verify(&other, now).is_err());
    }
}
