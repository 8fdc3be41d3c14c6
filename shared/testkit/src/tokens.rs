//! Minting access tokens with the keys a test mesh's auth signs with: no Argon2id, no round
//! trip, any claims a test needs.

use std::path::Path;

use mesh_proto::time::unix_now_ms;
use mesh_token::{Claims, DEFAULT_AUDIENCE, DEFAULT_ISSUER, KeyRing, SERVICE_SUBJECT_PREFIX};

/// The lifetime of minted tokens: auth's default.
pub const TOKEN_LIFETIME_SECS: i64 = 900;

/// Signs tokens with a key ring auth also uses.
#[derive(Debug, Clone)]
pub struct Minter {
    ring: KeyRing,
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    unix_now_ms() / 1000
}

/// The claims of a token for `sub` with the mesh's issuer and audience, no e-mail and no
/// session, valid for [`TOKEN_LIFETIME_SECS`] from now: for tests that change a claim (the
/// expiry, the audience, …) or sign with a key ring of their own.
pub fn claims(sub: &str) -> Claims {
    let now = unix_now();
    Claims {
        iss: DEFAULT_ISSUER.into(),
        aud: vec![DEFAULT_AUDIENCE.into()],
        sub: sub.into(),
        email: None,
        sid: None,
        iat: now,
        nbf: now,
        exp: now + TOKEN_LIFETIME_SECS,
        jti: uuid::Uuid::now_v7().to_string(),
    }
}

impl Minter {
    /// The development key of the auth whose data folder is `data` (made if missing, so that
    /// auth started there afterwards signs with it too).
    pub fn for_data_dir(data: &Path) -> Self {
        let (ring, _) =
            KeyRing::load_or_create_dev_key(&data.join("auth").join("dev-signing-key.pem"))
                .expect("signing key");
        Self { ring }
    }

    /// Signs with `ring`.
    pub fn new(ring: KeyRing) -> Self {
        Self { ring }
    }

    /// Signs with a fresh key of its own, which no test mesh trusts: forged tokens.
    pub fn stranger() -> Self {
        Self::new(KeyRing::generate().expect("signing key"))
    }

    /// The key ring.
    pub fn ring(&self) -> &KeyRing {
        &self.ring
    }

    /// The JWK Set that verifies these tokens.
    pub fn jwks_json(&self) -> String {
        self.ring.jwks().to_json()
    }

    /// The claims of a user token for `sub`, in a fresh session, valid for
    /// [`TOKEN_LIFETIME_SECS`] from now.
    pub fn user_claims(&self, sub: &str, email: &str) -> Claims {
        let now = unix_now();
        Claims {
            iss: DEFAULT_ISSUER.into(),
            aud: vec![DEFAULT_AUDIENCE.into()],
            sub: sub.into(),
            email: Some(email.into()),
            sid: Some(uuid::Uuid::now_v7().to_string()),
            iat: now,
            nbf: now,
            exp: now + TOKEN_LIFETIME_SECS,
            jti: uuid::Uuid::now_v7().to_string(),
        }
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        self.ring.sign(claims)
    }

    /// A user token for `sub` with `email`.
    pub fn user(&self, sub: &str, email: &str) -> String {
        self.sign(&self.user_claims(sub, email))
    }

    /// A token for a new user (a fresh UUIDv7, e-mail `<id>@example.com`) and its id.
    pub fn new_user(&self) -> (String, String) {
        let id = uuid::Uuid::now_v7().to_string();
        let token = self.user(&id, &format!("{id}@example.com"));
        (id, token)
    }

    /// A service token for `client_id`.
    pub fn service(&self, client_id: &str) -> String {
        let mut claims = self.user_claims(&format!("{SERVICE_SUBJECT_PREFIX}{client_id}"), "");
        claims.email = None;
        claims.sid = None;
        self.sign(&claims)
    }
}
