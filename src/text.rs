//! The lexical rules the wire and the files share: decimal numbers as
//! both spell them, and what a consumer id may be. Pure functions over
//! bytes; the bottom of the crate (it imports nothing from it), so that
//! neither `protocol` nor `store` borrows from the other.

/// Declares an error type that is one message, for failures whose only
/// useful content is what to tell the person (a bad token file, a refused
/// URL): `Display` prints the message, `std::error::Error` has no source.
#[macro_export]
macro_rules! message_error {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name(pub String);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::error::Error for $name {}
    };
}

/// Longest consumer id, in bytes.
pub const MAX_CONSUMER_ID: usize = 64;

/// A consumer id is 1 to 64 bytes of `A-Z a-z 0-9 . _ -`.
pub fn valid_consumer_id(id: &[u8]) -> bool {
    (1..=MAX_CONSUMER_ID).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses a decimal `u64` with no sign, no spaces and at most 20 digits.
pub fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    let mut value: u64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(value)
}

/// Appends `n` in decimal without allocating.
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}
