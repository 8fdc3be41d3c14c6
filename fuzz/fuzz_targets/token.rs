//! Bearer tokens as a hostile client sends them: any bytes as the token, and any header and
//! payload bytes inside a well-formed `header.payload.signature` shape (so the JSON parsing of
//! the claims is reached). Verification must answer, never panic, and accept nothing unsigned.
#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use mesh_token::{KeyRing, Verifier};

const NOW: i64 = 1_800_000_000;

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let ring = KeyRing::generate().expect("key");
        Verifier::new(
            &ring.jwks(),
            mesh_token::DEFAULT_ISSUER,
            mesh_token::DEFAULT_AUDIENCE,
            mesh_token::DEFAULT_LEEWAY_SECS,
        )
        .expect("verifier")
    })
}

fuzz_target!(|data: &[u8]| {
    let v = verifier();
    // The raw bytes as a token.
    if let Ok(token) = std::str::from_utf8(data) {
        assert!(
            v.verify(token, NOW).is_err(),
            "a token nobody signed verified"
        );
        let _ = mesh_token::peek_kid(token);
    }
    // Header and payload chosen by the input, signature garbage: reaches the JSON decoding.
    let mut parts = data.splitn(3, |b| *b == 0xff);
    let (header, payload, signature) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let token = format!(
        "{}.{}.{}",
        b64.encode(header),
        b64.encode(payload),
        b64.encode(signature)
    );
    assert!(v.verify(&token, NOW).is_err(), "a forged token verified");
    let _ = mesh_token::peek_kid(&token);
});
