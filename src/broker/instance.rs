//! The broker's instance id: a random 64-bit value, written as 16 hex
//! digits to `<messages file>.instance` (mode 0600) on the first start and
//! read back on every later one. It names this broker's message ids to the
//! outside world: the NATS forwarder publishes message `n` with the
//! header `Nats-Msg-Id: <instance>-<n>`, so two brokers that both count
//! from 1 never look like duplicates of each other, and a broker that
//! restarts on its files keeps its name.
//!
//! Invariants: the file is written atomically (temporary file, fsync,
//! rename) so a crash leaves either no id or a whole one; an existing file
//! that does not hold exactly 16 hex digits stops the start, because
//! silently minting a new id would let the forwarder publish old ids as new
//! ones. The id comes from `/dev/urandom`; nothing here touches the network.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Hex digits in an instance id (64 bits).
pub const INSTANCE_HEX_LEN: usize = 16;

/// The instance file that goes with `messages`.
pub fn instance_path(messages: &Path) -> PathBuf {
    let mut name = messages.as_os_str().to_owned();
    name.push(".instance");
    PathBuf::from(name)
}

/// Reads the id kept beside `messages`, or creates one. Returns the id and
/// whether it was created now.
pub fn load_or_create(messages: &Path) -> io::Result<(String, bool)> {
    let path = instance_path(messages);
    match fs::read(&path) {
        Ok(bytes) => parse(&bytes).map(|id| (id, false)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: expected {INSTANCE_HEX_LEN} hex digits (the broker's instance id); \
                     remove the file only if this broker's messages were never forwarded",
                    path.display()
                ),
            )
        }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let id = random_id()?;
            crate::store::replace_file(
                &crate::disk::Disk::real(),
                &path,
                format!("{id}\n").as_bytes(),
            )?;
            Ok((id, true))
        }
        Err(err) => Err(io::Error::new(
            err.kind(),
            format!("read {}: {err}", path.display()),
        )),
    }
}

/// The id in a file's bytes (one trailing newline allowed).
fn parse(bytes: &[u8]) -> Option<String> {
    let text = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let valid = text.len() == INSTANCE_HEX_LEN
        && text
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    valid.then(|| String::from_utf8_lossy(text).into_owned())
}

/// 64 random bits as hex. Never all zeros, so an id is never mistaken for
/// an unset one.
fn random_id() -> io::Result<String> {
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|err| io::Error::new(err.kind(), format!("read /dev/urandom: {err}")))?;
    let value = u64::from_le_bytes(bytes).max(1);
    Ok(format!("{value:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_exactly_sixteen_lowercase_hex_digits() {
        assert_eq!(
            parse(b"0123456789abcdef\n").as_deref(),
            Some("0123456789abcdef")
        );
        assert_eq!(
            parse(b"0123456789abcdef").as_deref(),
            Some("0123456789abcdef")
        );
        for bad in [
            &b""[..],
            b"\n",
            b"0123456789abcde",
            b"0123456789ABCDEF",
            b"0123456789abcdef0",
            b"0123456789abcdeg\n",
            b"0123456789abcdef\n\n",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn created_once_then_kept() {
        let dir = std::env::temp_dir().join(format!("mq-instance-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let messages = dir.join("messages.dat");
        let (first, created) = load_or_create(&messages).unwrap();
        assert!(created && parse(first.as_bytes()).is_some());
        let (again, created) = load_or_create(&messages).unwrap();
        assert!(!created);
        assert_eq!(first, again);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(instance_path(&messages))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(instance_path(&messages), b"junk\n").unwrap();
        assert!(load_or_create(&messages).is_err(), "damage stops the start");
        fs::remove_dir_all(&dir).unwrap();
    }
}
