//! Who may talk to the broker: the shared token (`--auth-token-file`) and
//! protected mode (no token: loopback peers only, unless
//! `--no-protected-mode`).
//!
//! The decisions are pure functions ([`peer_allowed`], [`gate`],
//! [`tokens_equal`]) with table-driven tests; [`Access`] adds the one piece
//! of state, the bounded set of refused addresses already logged, so the
//! log says once per address how to let it in rather than once per
//! connection attempt. Nothing here touches a socket: the accept loop asks
//! [`Access::admit`] about the peer, the session asks [`gate`] about the
//! first line.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::protocol::{self, Request};
pub use crate::token::Token;

/// Refused addresses remembered for "logged once": past this many the set
/// is cleared (a scan from many addresses then logs again, boundedly).
const MAX_WARNED: usize = 1024;

/// Compares two byte strings in time that depends only on their lengths,
/// never on where they first differ, so a remote client cannot find the
/// token byte by byte by timing replies.
pub fn tokens_equal(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = (given.len() ^ expected.len()) as u64;
    // Walk the expected token whole whatever was given; a shorter guess
    // is compared against zeros.
    for (i, &want) in expected.iter().enumerate() {
        let got = given.get(i).copied().unwrap_or(0);
        diff |= u64::from(got ^ want);
    }
    // Keep the compiler from turning the loop into an early exit.
    std::hint::black_box(diff) == 0
}

/// Whether a connection from `peer` may be served at all, before any
/// line: with a token anyone may try (the token decides); without one,
/// protected mode admits loopback peers only.
pub fn peer_allowed(peer: IpAddr, has_token: bool, protected: bool) -> bool {
    if has_token || !protected {
        return true;
    }
    match peer {
        IpAddr::V4(v4) => v4.is_loopback(),
        // An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d.
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// What to do with a connection's first line when a token is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// No token is set: handle the line as usual.
    Open,
    /// `AUTH:<the token>`: answer `OK:AUTH`, serve what follows.
    Accepted,
    /// Anything else: answer `ERROR:Authentication failed` and close.
    Rejected,
}

/// Decides about a line that arrives before the connection authenticated
/// (`None`: a line too long to parse, which is no AUTH either).
pub fn gate(token: Option<&Token>, line: Option<&[u8]>) -> Gate {
    let Some(token) = token else {
        return Gate::Open;
    };
    match line.map(protocol::parse_request) {
        Some(Request::Auth(given)) if tokens_equal(given, token.bytes()) => Gate::Accepted,
        _ => Gate::Rejected,
    }
}

/// The broker's access policy and the memory of refused peers.
#[derive(Debug)]
pub struct Access {
    pub token: Option<Token>,
    pub protected: bool,
    warned: Mutex<HashSet<IpAddr>>,
}

/// What [`Access::admit`] decided about a peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Refuse; `Some(text)` the first time for this address: log it.
    Refuse(Option<String>),
}

impl Access {
    pub fn new(token: Option<Token>, protected: bool) -> Access {
        Access {
            token,
            protected,
            warned: Mutex::new(HashSet::new()),
        }
    }

    /// Decides about a new connection from `peer`.
    pub fn admit(&self, peer: IpAddr) -> Admission {
        if peer_allowed(peer, self.token.is_some(), self.protected) {
            return Admission::Admit;
        }
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.len() >= MAX_WARNED {
            warned.clear();
        }
        if !warned.insert(peer) {
            return Admission::Refuse(None);
        }
        Admission::Refuse(Some(format!(
            "protected mode: refused a connection from {peer}: without --auth-token-file \
             only loopback clients are served. To let other machines in, start the broker \
             with --auth-token-file FILE (clients then use --token-file), or with \
             --no-protected-mode to accept anyone who can reach the port"
        )))
    }

    /// The first-line decision for this broker.
    pub fn gate(&self, line: Option<&[u8]>) -> Gate {
        gate(self.token.as_ref(), line)
    }

    /// Whether an `AUTH:` after the first line is right (always, with no
    /// token: there is nothing to check).
    pub fn check(&self, given: &[u8]) -> bool {
        self.token
            .as_ref()
            .is_none_or(|token| tokens_equal(given, token.bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> Token {
        crate::token::parse_token(text.as_bytes()).unwrap()
    }

    #[test]
    fn equality_in_constant_time_is_still_equality() {
        for (given, expected, equal) in [
            (&b"abc"[..], &b"abc"[..], true),
            (b"abd", b"abc", false),
            (b"ab", b"abc", false),
            (b"abcd", b"abc", false),
            (b"", b"abc", false),
            (b"", b"", true),
            (b"\0\0\0", b"\0\0", false),
            (b"\0\0", b"\0\0\0", false),
        ] {
            assert_eq!(
                tokens_equal(given, expected),
                equal,
                "{given:?} {expected:?}"
            );
        }
    }

    #[test]
    fn protected_mode_admits_loopback_only() {
        let cases: [(&str, bool, bool, bool); 10] = [
            // peer, has_token, protected, allowed
            ("127.0.0.1", false, true, true),
            ("127.8.9.10", false, true, true),
            ("::1", false, true, true),
            ("::ffff:127.0.0.1", false, true, true),
            ("192.0.2.2", false, true, false),
            ("::ffff:192.0.2.2", false, true, false),
            ("fd00::2", false, true, false),
            ("192.0.2.2", true, true, true),
            ("192.0.2.2", false, false, true),
            ("0.0.0.0", false, true, false),
        ];
        for (peer, has_token, protected, allowed) in cases {
            let ip: IpAddr = peer.parse().unwrap();
            assert_eq!(
                peer_allowed(ip, has_token, protected),
                allowed,
                "{peer} token={has_token} protected={protected}"
            );
        }
    }

    #[test]
    fn refusals_are_logged_once_per_address() {
        let access = Access::new(None, true);
        let far: IpAddr = "192.0.2.2".parse().unwrap();
        let other: IpAddr = "192.0.2.3".parse().unwrap();
        assert_eq!(access.admit("127.0.0.1".parse().unwrap()), Admission::Admit);
        let Admission::Refuse(Some(text)) = access.admit(far) else {
            panic!("first refusal not logged")
        };
        assert!(text.contains("--auth-token-file") && text.contains("--no-protected-mode"));
        assert_eq!(access.admit(far), Admission::Refuse(None));
        assert!(matches!(access.admit(other), Admission::Refuse(Some(_))));
    }

    #[test]
    fn the_first_line_must_be_the_token() {
        let secret = token("0123456789abcdef");
        type Case<'a> = (Option<&'a Token>, Option<&'a [u8]>, Gate);
        let cases: [Case; 9] = [
            (None, Some(b"STATS"), Gate::Open),
            (None, Some(b"AUTH:whatever"), Gate::Open),
            (None, None, Gate::Open),
            (
                Some(&secret),
                Some(b"AUTH:0123456789abcdef"),
                Gate::Accepted,
            ),
            (
                Some(&secret),
                Some(b"AUTH:0123456789abcdeF"),
                Gate::Rejected,
            ),
            (
                Some(&secret),
                Some(b"AUTH:0123456789abcdef "),
                Gate::Rejected,
            ),
            (Some(&secret), Some(b"STATS"), Gate::Rejected),
            (Some(&secret), Some(b"REGISTER:PRODUCER"), Gate::Rejected),
            (Some(&secret), None, Gate::Rejected),
        ];
        for (token, line, expected) in cases {
            assert_eq!(gate(token, line), expected, "{line:?}");
        }
        let access = Access::new(Some(secret), true);
        assert!(access.check(b"0123456789abcdef") && !access.check(b"nope"));
        assert!(Access::new(None, true).check(b"anything"));
    }
}
