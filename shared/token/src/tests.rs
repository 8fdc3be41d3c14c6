//! Signing, publishing and verifying, and every hostile token the verifier must refuse.

use super::*;

const NOW: i64 = 1_800_000_000;
const ISS: &str = DEFAULT_ISSUER;
const AUD: &str = DEFAULT_AUDIENCE;

fn claims() -> Claims {
    Claims {
        iss: ISS.into(),
        aud: vec![AUD.into()],
        sub: "0190f5c6-1234-7000-8000-000000000001".into(),
        email: Some("ada@example.com".into()),
        sid: Some("session-1".into()),
        iat: NOW,
        nbf: NOW,
        exp: NOW + 900,
        jti: "jti-1".into(),
    }
}

fn ring() -> KeyRing {
    KeyRing::generate().expect("key")
}

fn verifier(ring: &KeyRing) -> Verifier {
    Verifier::new(&ring.jwks(), ISS, AUD, 30).expect("verifier")
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// A token with any header and payload JSON, signed by `key` (or carrying `signature`).
fn forge(header: &str, payload: &str, sign_with: Option<&ed25519_dalek::SigningKey>) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let signature = match sign_with {
        Some(key) => b64(&key.sign(input.as_bytes()).to_bytes()),
        None => String::new(),
    };
    format!("{input}.{signature}")
}

fn payload(c: &Claims) -> String {
    serde_json::to_string(c).expect("json")
}

/// A signed token verifies and gives back its claims.
#[test]
fn round_trip() {
    let ring = ring();
    let token = ring.sign(&claims());
    assert_eq!(verifier(&ring).verify(&token, NOW + 1), Ok(claims()));
    assert_eq!(peek_kid(&token).as_deref(), Some(ring.signing_kid()));
}

/// `aud` as an array containing the audience is accepted (RFC 7519).
#[test]
fn audience_array_is_accepted() {
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let ring = KeyRing::new(vec![key.clone()]).expect("ring");
    let mut c = claims();
    c.aud = vec!["other".into(), AUD.into()];
    let header = format!(r#"{{"alg":"EdDSA","kid":"{}"}}"#, ring.signing_kid());
    let token = forge(&header, &payload(&c), Some(&key));
    assert!(verifier(&ring).verify(&token, NOW).is_ok());
}

/// `alg: none` with no signature is refused.
#[test]
fn alg_none_is_refused() {
    let ring = ring();
    let header = format!(r#"{{"alg":"none","kid":"{}"}}"#, ring.signing_kid());
    let token = forge(&header, &payload(&claims()), None);
    assert_eq!(
        verifier(&ring).verify(&token, NOW),
        Err(TokenError::Algorithm("none".into()))
    );
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use hmac::{Hmac, Mac as _};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// HS256 "signed" with the public key's bytes (the algorithm-confusion attack) is refused.
#[test]
fn hs256_with_public_key_is_refused() {
    let ring = ring();
    let jwk = &ring.jwks().keys[0];
    let public = B64.decode(&jwk.x).expect("x");
    let header = format!(r#"{{"alg":"HS256","kid":"{}"}}"#, jwk.kid);
    let input = format!(
        "{}.{}",
        b64(header.as_bytes()),
        b64(payload(&claims()).as_bytes())
    );
    let token = format!("{input}.{}", b64(&hmac_sha256(&public, input.as_bytes())));
    assert_eq!(
        verifier(&ring).verify(&token, NOW),
        Err(TokenError::Algorithm("HS256".into()))
    );
}

/// A valid signature by another key, under a known `kid`, is refused.
#[test]
fn signature_by_another_key_is_refused() {
    let ring = ring();
    let attacker = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let header = format!(r#"{{"alg":"EdDSA","kid":"{}"}}"#, ring.signing_kid());
    let token = forge(&header, &payload(&claims()), Some(&attacker));
    assert_eq!(
        verifier(&ring).verify(&token, NOW),
        Err(TokenError::Signature)
    );
}

/// A token whose payload was changed after signing is refused.
#[test]
fn tampered_payload_is_refused() {
    let ring = ring();
    let token = ring.sign(&claims());
    let mut parts: Vec<&str> = token.split('.').collect();
    let mut evil = claims();
    evil.sub = "someone-else".into();
    let evil_payload = b64(payload(&evil).as_bytes());
    parts[1] = &evil_payload;
    assert_eq!(
        verifier(&ring).verify(&parts.join("."), NOW),
        Err(TokenError::Signature)
    );
}

/// An unknown `kid` is refused with the error that tells a cache to refetch; a missing one too.
#[test]
fn unknown_or_missing_kid_is_refused() {
    let ring = ring();
    let other = KeyRing::generate().expect("key");
    let token = other.sign(&claims());
    assert_eq!(
        verifier(&ring).verify(&token, NOW),
        Err(TokenError::UnknownKey(other.signing_kid().into()))
    );
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let token = forge(r#"{"alg":"EdDSA"}"#, &payload(&claims()), Some(&key));
    assert_eq!(
        verifier(&ring).verify(&token, NOW),
        Err(TokenError::MissingKeyId)
    );
}

/// Expiry and not-before are enforced, with the leeway and no more.
#[test]
fn time_claims_are_enforced() {
    let ring = ring();
    let v = verifier(&ring);
    let token = ring.sign(&claims());
    assert!(
        v.verify(&token, NOW + 900 + 29).is_ok(),
        "inside the leeway"
    );
    assert_eq!(v.verify(&token, NOW + 900 + 30), Err(TokenError::Expired));
    let mut future = claims();
    future.nbf = NOW + 600;
    let token = ring.sign(&future);
    assert_eq!(v.verify(&token, NOW), Err(TokenError::NotYetValid));
    assert!(v.verify(&token, NOW + 571).is_ok());
}

/// A token issued in the future, or living longer than the verifier accepts, is refused —
/// even with a valid signature (a leaked key or a broken issuer clock must not mint tokens
/// good for centuries).
#[test]
fn issue_time_and_lifetime_are_bounded() {
    let ring = ring();
    let v = verifier(&ring);
    let mut ahead = claims();
    ahead.iat = NOW + 5 * 365 * 86_400;
    ahead.nbf = NOW;
    ahead.exp = ahead.iat + 900;
    assert_eq!(
        v.verify(&ring.sign(&ahead), NOW),
        Err(TokenError::IssuedInFuture)
    );
    let mut ancient = claims();
    ancient.exp = NOW + 300 * 365 * 86_400;
    assert_eq!(
        v.verify(&ring.sign(&ancient), NOW),
        Err(TokenError::Lifetime)
    );
    let mut backwards = claims();
    backwards.exp = NOW - 1;
    backwards.iat = NOW;
    assert_eq!(
        v.verify(&ring.sign(&backwards), NOW - 10),
        Err(TokenError::Lifetime)
    );
    let mut hour = claims();
    hour.exp = NOW + DEFAULT_MAX_LIFETIME_SECS;
    assert!(v.verify(&ring.sign(&hour), NOW).is_ok(), "an hour is fine");
    let strict = verifier(&ring).with_max_lifetime(900);
    assert_eq!(
        strict.verify(&ring.sign(&hour), NOW),
        Err(TokenError::Lifetime)
    );
    assert!(strict.verify(&ring.sign(&claims()), NOW).is_ok());
}

/// A wrong issuer or audience is refused.
#[test]
fn issuer_and_audience_are_enforced() {
    let ring = ring();
    let v = verifier(&ring);
    let mut c = claims();
    c.iss = "someone".into();
    assert_eq!(v.verify(&ring.sign(&c), NOW), Err(TokenError::Issuer));
    let mut c = claims();
    c.aud = vec!["elsewhere".into()];
    assert_eq!(v.verify(&ring.sign(&c), NOW), Err(TokenError::Audience));
}

/// Garbage of every shape is `Malformed` (or a signature failure), never a panic.
#[test]
fn garbage_is_refused_without_panic() {
    let ring = ring();
    let v = verifier(&ring);
    let good = ring.sign(&claims());
    let (head, rest) = good.split_once('.').expect("dot");
    let huge = "a".repeat(MAX_TOKEN_LEN + 1);
    let cases = [
        String::new(),
        ".".into(),
        "..".into(),
        "a.b".into(),
        "a.b.c".into(),
        "a.b.c.d".into(),
        "!!!.???.***".into(),
        format!("{good}.extra"),
        format!("{head}.{rest}x"),
        format!("{head}..{}", rest.split_once('.').expect("dot").1),
        format!("{}.e30.AAAA", b64(br#"{"alg":"EdDSA","kid":"k"}"#)),
        format!("{}.e30.", b64(b"[1,2,3]")),
        format!("{}.e30.AAAA", b64("\u{0}\u{ffff}".as_bytes())),
        huge,
        "é.é.é".into(),
    ];
    for case in &cases {
        let result = v.verify(case, NOW);
        assert!(result.is_err(), "accepted {case:?}");
        let _ = peek_kid(case);
    }
}

/// A token signed by an older key of the ring still verifies after rotation; the newest signs.
#[test]
fn rotation_keeps_old_tokens_valid() {
    let old = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let new = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
    let before = KeyRing::new(vec![old.clone()]).expect("ring");
    let token = before.sign(&claims());
    let after = KeyRing::new(vec![old, new]).expect("ring");
    assert_ne!(after.signing_kid(), before.signing_kid());
    assert_eq!(after.jwks().keys.len(), 2);
    assert!(verifier(&after).verify(&token, NOW).is_ok());
    assert_eq!(
        peek_kid(&after.sign(&claims())).as_deref(),
        Some(after.signing_kid())
    );
}

/// The JWKS document round-trips and has the contract's fields.
#[test]
fn jwks_document() {
    let ring = ring();
    let json = ring.jwks().to_json();
    let value: serde_json::Value = serde_json::from_str(&json).expect("json");
    let key = &value["keys"][0];
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["crv"], "Ed25519");
    assert_eq!(key["alg"], "EdDSA");
    assert_eq!(key["use"], "sig");
    assert_eq!(key["kid"], ring.signing_kid());
    assert_eq!(Jwks::from_json(&json).expect("parse"), ring.jwks());
}

/// The RFC 8037 test key has the RFC 7638 thumbprint the RFC gives (appendix A.3).
#[test]
fn kid_is_the_rfc_7638_thumbprint() {
    let x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
    let bytes: [u8; 32] = B64.decode(x).expect("x").try_into().expect("32 bytes");
    let key = VerifyingKey::from_bytes(&bytes).expect("key");
    assert_eq!(
        Jwk::from_verifying_key(&key).kid,
        "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    );
}

/// The development key is created once, owner-only, and loaded again the next time.
#[test]
fn dev_key_is_created_once_and_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keys/dev-signing-key.pem");
    let (first, created) = KeyRing::load_or_create_dev_key(&path).expect("create");
    assert!(created);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&path).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let (second, created) = KeyRing::load_or_create_dev_key(&path).expect("load");
    assert!(!created);
    assert_eq!(first.signing_kid(), second.signing_kid());
    assert!(!format!("{first:?}").contains("BEGIN"));
}

/// A file that is not an Ed25519 PKCS#8 key is refused with its path.
#[test]
fn bad_pem_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.pem");
    std::fs::write(
        &path,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let err = KeyRing::load_pem_files(std::slice::from_ref(&path)).expect_err("bad key");
    assert!(err.to_string().contains("bad.pem"), "{err}");
    assert!(matches!(KeyRing::new(vec![]), Err(KeyError::Empty)));
}
