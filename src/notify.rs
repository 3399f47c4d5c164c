//! systemd's readiness protocol (`sd_notify`), written over std's Unix
//! datagram socket: when the service manager sets `$NOTIFY_SOCKET`, the
//! broker sends `READY=1` once it accepts connections, `STOPPING=1` when
//! it begins to shut down, and `STATUS=` lines a person reads in
//! `systemctl status`.
//!
//! The address is a file system path or, starting with `@`, a Linux
//! abstract socket name. Without the variable nothing is sent. Sending is
//! best effort: a lost notification must never stop the broker (systemd
//! then times the start out, which is the right failure), so errors are
//! returned for logging only. No libsystemd, no dependency.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;

/// Where `$NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Path(PathBuf),
    /// The name after the `@`, without a leading NUL.
    Abstract(Vec<u8>),
}

/// Parses a `$NOTIFY_SOCKET` value: `/path`, or `@name` for an abstract
/// socket. Anything else (empty, relative, `vsock:`) is not for us.
pub fn parse_target(value: &str) -> Option<Target> {
    if let Some(name) = value.strip_prefix('@') {
        return (!name.is_empty()).then(|| Target::Abstract(name.as_bytes().to_vec()));
    }
    value
        .starts_with('/')
        .then(|| Target::Path(PathBuf::from(value)))
}

/// A connection to the service manager, or nothing.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, Target)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a notifier that sends nothing when it is
    /// unset or not understood.
    pub fn from_env() -> Notifier {
        let target = std::env::var("NOTIFY_SOCKET")
            .ok()
            .and_then(|value| parse_target(&value))
            .and_then(|target| Some((UnixDatagram::unbound().ok()?, target)));
        Notifier { target }
    }

    /// Whether a service manager listens.
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one datagram of `KEY=VALUE` lines.
    pub fn send(&self, state: &str) -> io::Result<()> {
        let Some((socket, target)) = &self.target else {
            return Ok(());
        };
        match target {
            Target::Path(path) => socket.send_to(state.as_bytes(), path)?,
            Target::Abstract(name) => {
                let address = SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &address)?
            }
        };
        Ok(())
    }

    /// `READY=1` with the address and our pid.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.send(&format!(
            "READY=1\nSTATUS={}\nMAINPID={}\n",
            one_line(status),
            std::process::id()
        ))
    }

    /// `STOPPING=1`: the shutdown has begun.
    pub fn stopping(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STOPPING=1\nSTATUS={}\n", one_line(status)))
    }

    /// A `STATUS=` line alone.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STATUS={}\n", one_line(status)))
    }
}

/// A status is one line: a newline would start another assignment.
fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("/run/systemd/notify"),
            Some(Target::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            parse_target("@/org/freedesktop/systemd1/notify/123"),
            Some(Target::Abstract(
                b"/org/freedesktop/systemd1/notify/123".to_vec()
            ))
        );
        for bad in ["", "@", "relative/path", "vsock:2:1234"] {
            assert_eq!(parse_target(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn datagrams_reach_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("notify-unit-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let notifier = Notifier {
            target: Some((UnixDatagram::unbound().unwrap(), Target::Path(path.clone()))),
        };
        notifier.ready("listening on\n127.0.0.1:1").unwrap();
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.starts_with("READY=1\nSTATUS=listening on 127.0.0.1:1\nMAINPID="),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(Notifier { target: None }.send("READY=1").is_ok());
    }
}
