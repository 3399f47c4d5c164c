//! A shared secret read from a token file: the broker's
//! `--auth-token-file` and the clients' `--token-file` /
//! `BROKER_TOKEN_FILE`. At the bottom of the crate (std only), so the
//! broker and the clients read the same format without the clients
//! reaching into the broker.
//!
//! The token is the file's first line, 16 to 512 bytes of text that can
//! follow `AUTH:` on one protocol line. `Debug` never shows it. Comparing
//! tokens is the broker's business (`broker::auth`, in constant time).

use std::fmt;
use std::io::Read;
use std::path::Path;

/// The shortest token accepted: 16 bytes make guessing over the network
/// hopeless even at a million tries a second.
pub const MIN_TOKEN_LEN: usize = 16;
/// The longest: a token is one protocol line after `AUTH:`.
pub const MAX_TOKEN_LEN: usize = 512;

/// A shared secret. `Debug` never shows it, so a config dump or a panic
/// message cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Vec<u8>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<{} bytes, redacted>)", self.0.len())
    }
}

impl Token {
    /// The secret's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Reads a token file: its first line (without `\r\n`), which must be
    /// [`MIN_TOKEN_LEN`] to [`MAX_TOKEN_LEN`] bytes of protocol-safe text.
    /// With `private`, a file that group or others may read is refused:
    /// the broker's token must not be readable by other local users.
    pub fn load(path: &Path, private: bool) -> Result<Token, TokenError> {
        Token::load_text(path, private).map_err(TokenError)
    }

    fn load_text(path: &Path, private: bool) -> Result<Token, String> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display();
        let mut file =
            std::fs::File::open(path).map_err(|err| format!("token file {shown}: {err}"))?;
        let mode = file
            .metadata()
            .map_err(|err| format!("token file {shown}: {err}"))?
            .permissions()
            .mode();
        if private && mode & 0o077 != 0 {
            return Err(format!(
                "token file {shown} has mode {:04o}: group or others may read it; run chmod 600 {shown}",
                mode & 0o7777
            ));
        }
        // Read a little more than a token may be, so a huge file is not
        // read whole and an over-long first line is still detected.
        let mut text = Vec::new();
        let limit = (MAX_TOKEN_LEN + 2) as u64;
        file.by_ref()
            .take(limit)
            .read_to_end(&mut text)
            .map_err(|err| format!("token file {shown}: {err}"))?;
        parse_token_text(&text).map_err(|why| format!("token file {shown}: {why}"))
    }
}

/// The token in a token file's bytes: the first line, `\r` tolerated.
pub fn parse_token(text: &[u8]) -> Result<Token, TokenError> {
    parse_token_text(text).map_err(TokenError)
}

fn parse_token_text(text: &[u8]) -> Result<Token, String> {
    let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token (first line) has {} bytes; at least {MIN_TOKEN_LEN} are needed",
            line.len()
        ));
    }
    if line.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "the token (first line) is longer than {MAX_TOKEN_LEN} bytes"
        ));
    }
    if line.iter().any(|&b| b == b'\r' || b == 0) {
        return Err("the token contains a carriage return or a NUL byte".into());
    }
    Ok(Token(line.to_vec()))
}

crate::message_error!(
    /// Why a token file or token cannot be used.
    TokenError
);

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> Token {
        parse_token(text.as_bytes()).unwrap()
    }

    #[test]
    fn token_files() {
        assert_eq!(token("0123456789abcdef\n").bytes(), b"0123456789abcdef");
        assert_eq!(
            token("0123456789abcdef\r\nrest").bytes(),
            b"0123456789abcdef"
        );
        assert_eq!(token("0123456789abcdef").bytes(), b"0123456789abcdef");
        for bad in ["", "\n", "short\n", "0123456789abcde\n"] {
            assert!(parse_token(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(parse_token(&[b'x'; MAX_TOKEN_LEN + 1]).is_err());
        assert!(parse_token(b"0123456789abcdef\0x").is_err());
        let debug = format!("{:?}", token("0123456789abcdef"));
        assert!(!debug.contains("0123"), "{debug}");
    }
}
