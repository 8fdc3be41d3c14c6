//! The contract's field rules, in one place for every service that checks them: users applies
//! them to what it stores, the aggregator to what it passes on (and refuses before any work).
//! Plain Rust; every refusal names the field and shows at most a little of the value.

/// The longest display name, in characters (Unicode code points) after trimming.
pub const MAX_DISPLAY_NAME_CHARS: usize = 64;
/// The longest bio, in characters after trimming.
pub const MAX_BIO_CHARS: usize = 512;
/// How much of a refused value an error message shows, in characters.
pub const SHOWN_CHARS: usize = 40;
/// How much of a malformed id a per-item result shows (a real id has 36 characters): an error
/// names the bad value, it does not echo a request back.
pub const SHOWN_ID_CHARS: usize = 64;

/// Why an input was refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

/// At most `max` characters of `raw`, with `…` when cut: what an error may show of a value.
pub fn shown(raw: &str, max: usize) -> String {
    let mut chars = raw.chars();
    let mut head: String = chars.by_ref().take(max).collect();
    if chars.next().is_some() {
        head.push('…');
    }
    head
}

/// Whether `raw` (trimmed) is a UUID in the 8-4-4-4-12 hex form, either case.
fn looks_like_uuid(raw: &str) -> bool {
    raw.len() == 36
        && raw.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// A user id: a UUID, accepted in either case, rendered lower-case with hyphens.
pub fn parse_user_id(field: &str, raw: &str) -> Result<String, Invalid> {
    let trimmed = raw.trim();
    if looks_like_uuid(trimmed) {
        Ok(trimmed.to_ascii_lowercase())
    } else {
        Err(Invalid(format!(
            "{field} `{}` is not a UUID",
            shown(raw, SHOWN_CHARS)
        )))
    }
}

/// A display name: 1 to 64 characters after trimming; stored trimmed.
pub fn parse_display_name(raw: &str) -> Result<String, Invalid> {
    let name = raw.trim();
    let chars = name.chars().count();
    if chars == 0 {
        return Err(Invalid("display_name must not be empty".into()));
    }
    if chars > MAX_DISPLAY_NAME_CHARS {
        return Err(Invalid(format!(
            "display_name must be at most {MAX_DISPLAY_NAME_CHARS} characters (got {chars})"
        )));
    }
    Ok(name.to_owned())
}

/// A bio: at most 512 characters after trimming; stored trimmed.
pub fn parse_bio(raw: &str) -> Result<String, Invalid> {
    let bio = raw.trim();
    let chars = bio.chars().count();
    if chars > MAX_BIO_CHARS {
        return Err(Invalid(format!(
            "bio must be at most {MAX_BIO_CHARS} characters (got {chars})"
        )));
    }
    Ok(bio.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids in either case become lower-case; anything else is refused naming the field and
    /// showing at most 40 characters.
    #[test]
    fn user_ids() {
        assert_eq!(
            parse_user_id("id", " 0190F5C6-1234-7000-8000-00000000000A "),
            Ok("0190f5c6-1234-7000-8000-00000000000a".into())
        );
        for bad in [
            "",
            "x",
            "0190f5c6123470008000000000000000000a",
            "0190f5c6-1234-7000-8000-00000000000g",
        ] {
            let err = parse_user_id("ids[3]", bad).expect_err(bad);
            assert!(err.0.starts_with("ids[3]"), "{err}");
        }
        let err = parse_user_id("id", &"z".repeat(10_000)).expect_err("long");
        assert!(err.0.len() < 80, "{err}");
    }

    /// Names are 1–64 characters and bios at most 512, counted after trimming.
    #[test]
    fn texts() {
        assert_eq!(parse_display_name("  Ada "), Ok("Ada".into()));
        assert!(parse_display_name("   ").is_err());
        assert!(parse_display_name(&"é".repeat(64)).is_ok());
        assert!(parse_display_name(&"é".repeat(65)).is_err());
        assert!(parse_bio(&format!(" {} ", "x".repeat(512))).is_ok());
        assert!(parse_bio(&"x".repeat(513)).is_err());
        assert_eq!(shown("abcdef", 3), "abc…");
        assert_eq!(shown("abc", 3), "abc");
    }
}
