//! The users service's request validation with any input: ids, display names, bios and page
//! tokens. Each must give a value or a validation error, never panic; a page token is only
//! accepted if the service itself issued it.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_users::domain::{PageTokens, parse_bio, parse_display_name, parse_user_id};

fn tokens() -> &'static PageTokens {
    static TOKENS: OnceLock<PageTokens> = OnceLock::new();
    TOKENS.get_or_init(|| PageTokens::new(&[7u8; 32]).expect("key"))
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.splitn(4, '\n');
    let (id, name, bio, page) = (
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
    );
    if let Ok(parsed) = parse_user_id("id", id) {
        // A valid id is canonical: parsing it again gives it back.
        assert_eq!(
            parse_user_id("id", &parsed).ok().as_deref(),
            Some(parsed.as_str())
        );
    }
    let _ = parse_display_name(name);
    let _ = parse_bio(bio);
    let tokens = tokens();
    if let Ok(after) = tokens.resume_after(page) {
        // Only tokens this key issued are accepted, and they round-trip.
        assert_eq!(tokens.issue(&after), page);
    }
});
