//! The users domain: the contract's input rules (ids, display names, bios: from
//! [`mesh_proto::rules`]) and page tokens. Plain Rust, no gRPC types; every refusal names the
//! field.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

// The field rules are the contract's, shared with the aggregator.
pub use mesh_proto::rules::{
    Invalid, MAX_BIO_CHARS, MAX_DISPLAY_NAME_CHARS, parse_bio, parse_display_name, parse_user_id,
};

/// Opaque, tamper-evident `ListUsers` page tokens: the last id of a page, MAC'd with a key
/// only the users service knows, so a client can neither forge nor alter one.
#[derive(Clone)]
pub struct PageTokens {
    /// The keyed MAC, ready to be cloned for each token.
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens(..)")
    }
}

const PAGE_TOKEN_VERSION: &str = "v1";

impl PageTokens {
    /// Tokens MAC'd with `key` (at least 32 bytes of secret); an empty key is refused.
    pub fn new(key: &[u8]) -> Result<Self, Invalid> {
        if key.is_empty() {
            return Err(Invalid("page token key must not be empty".into()));
        }
        let mac = Hmac::<Sha256>::new_from_slice(key)
            .map_err(|_| Invalid("page token key is not usable".into()))?;
        Ok(Self { mac })
    }

    fn mac(&self, payload: &str) -> Vec<u8> {
        let mut mac = self.mac.clone();
        mac.update(payload.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// The token that resumes after `last_id`.
    pub fn issue(&self, last_id: &str) -> String {
        let payload = format!("{PAGE_TOKEN_VERSION}.{last_id}");
        format!(
            "{}.{}",
            B64.encode(&payload),
            B64.encode(self.mac(&payload))
        )
    }

    /// The id a token resumes after; a forged, altered or malformed token is refused.
    pub fn resume_after(&self, token: &str) -> Result<String, Invalid> {
        let invalid = || Invalid("page_token is not a token this service issued".into());
        let (payload, mac) = token.split_once('.').ok_or_else(invalid)?;
        let payload = String::from_utf8(B64.decode(payload).map_err(|_| invalid())?)
            .map_err(|_| invalid())?;
        let mac = B64.decode(mac).map_err(|_| invalid())?;
        let mut check = self.mac.clone();
        check.update(payload.as_bytes());
        check.verify_slice(&mac).map_err(|_| invalid())?;
        let last_id = payload
            .strip_prefix(PAGE_TOKEN_VERSION)
            .and_then(|rest| rest.strip_prefix('.'))
            .ok_or_else(invalid)?;
        Ok(last_id.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// UUIDs in either case come back lower-case; anything else is refused naming the field.
    #[test]
    fn user_ids() {
        let upper = "0190F5C6-1234-7ABC-8DEF-000000000001";
        assert_eq!(
            parse_user_id("id", upper).unwrap(),
            "0190f5c6-1234-7abc-8def-000000000001"
        );
        for bad in [
            "",
            "nope",
            "0190f5c612347abc8def000000000001",
            "{0190f5c6-1234-7abc-8def-000000000001}",
        ] {
            let err = parse_user_id("ids[3]", bad).unwrap_err();
            assert!(err.0.starts_with("ids[3]"), "{bad}: {err}");
        }
    }

    /// Names are trimmed and counted in code points: 64 accented letters pass, 65 do not.
    #[test]
    fn display_names() {
        assert_eq!(parse_display_name("  Ada  ").unwrap(), "Ada");
        assert!(parse_display_name(&"é".repeat(64)).is_ok());
        assert!(
            parse_display_name(&"é".repeat(65))
                .unwrap_err()
                .0
                .contains("display_name")
        );
        assert!(
            parse_display_name("   ")
                .unwrap_err()
                .0
                .contains("display_name")
        );
    }

    /// Bios may be empty and hold up to 512 characters after trimming.
    #[test]
    fn bios() {
        assert_eq!(parse_bio("  ").unwrap(), "");
        assert!(parse_bio(&format!(" {} ", "x".repeat(512))).is_ok());
        assert!(parse_bio(&"x".repeat(513)).unwrap_err().0.contains("bio"));
    }

    /// Tokens round-trip; altered, forged or other-key tokens are refused.
    #[test]
    fn page_tokens() {
        let tokens = PageTokens::new(&[7; 32]).unwrap();
        let token = tokens.issue("0190f5c6-1234-7abc-8def-000000000001");
        assert_eq!(
            tokens.resume_after(&token).unwrap(),
            "0190f5c6-1234-7abc-8def-000000000001"
        );
        let other = PageTokens::new(&[8; 32]).unwrap();
        assert!(PageTokens::new(&[]).is_err());
        assert!(other.resume_after(&token).is_err());
        let (payload, mac) = token.split_once('.').unwrap();
        let altered = format!(
            "{}.{mac}",
            B64.encode("v1.0190f5c6-1234-7abc-8def-000000000002")
        );
        assert!(tokens.resume_after(&altered).is_err());
        assert!(tokens.resume_after(payload).is_err());
        for junk in ["", ".", "a.b", "!!.??", &format!("{payload}.")] {
            assert!(tokens.resume_after(junk).is_err(), "{junk}");
        }
    }
}
