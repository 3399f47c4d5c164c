//! The NATS client protocol and the bits of the JetStream API the
//! forwarder needs, as pure functions over bytes: the `nats://` URL, the
//! `CONNECT` line, the server's operations (`INFO`, `MSG`, `HMSG`, `PING`,
//! `PONG`, `+OK`, `-ERR`), the client's (`SUB`, `PUB`, `HPUB`), header
//! blocks, subjects and their wildcards, a small JSON reader and writer,
//! and base64 (JetStream returns stored headers base64-encoded).
//!
//! Invariants: nothing here touches a socket or a clock; every parser
//! takes any bytes without panicking and bounds what it accepts (a control
//! line is at most [`MAX_CONTROL_LINE`] bytes, a payload at most
//! [`MAX_PAYLOAD`], JSON nests at most [`MAX_JSON_DEPTH`] deep), as NATS's
//! own `parser.go` caps its control line against memory exhaustion. It
//! deliberately knows nothing of our broker: `forward.rs` joins the two.

/// Longest control line (`MSG ...`, `INFO {...}`) accepted from a server.
/// INFO carries the server's whole description (cluster URLs and all), so
/// this is generous; NATS's own default is 4 KiB for clients.
pub const MAX_CONTROL_LINE: usize = 64 * 1024;
/// Largest message payload accepted from a server: NATS's own hard
/// maximum is 64 MiB; JetStream API replies are far smaller.
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;
/// JSON nesting accepted: JetStream replies nest three or four levels.
pub const MAX_JSON_DEPTH: usize = 32;
/// The NATS default port.
pub const DEFAULT_PORT: u16 = 4222;

/// Where the NATS server is and who we are to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub pass: Option<String>,
}

/// Parses `nats://[USER:PASS@]HOST[:PORT]` (the scheme may be left out).
/// User and password may be percent-encoded, so they may hold `:` or `@`.
pub fn parse_url(text: &str) -> Result<Url, UrlError> {
    parse_url_text(text).map_err(UrlError)
}

fn parse_url_text(text: &str) -> Result<Url, String> {
    let rest = text.strip_prefix("nats://").unwrap_or(text);
    if rest.contains("://") {
        return Err(format!(
            "'{text}': only nats:// is supported (for TLS, run a leaf node on this host)"
        ));
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (auth, hostport) = match rest.rsplit_once('@') {
        Some((auth, hostport)) => (Some(auth), hostport),
        None => (None, rest),
    };
    let (user, pass) = match auth {
        None => (None, None),
        Some(auth) => {
            let (user, pass) = auth
                .split_once(':')
                .ok_or_else(|| format!("'{text}': expected USER:PASS before '@'"))?;
            (Some(percent_decode(user)?), Some(percent_decode(pass)?))
        }
    };
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, tail) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("'{text}': unclosed '[' in the host"))?;
        (host, tail.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("'{text}': expected nats://[USER:PASS@]HOST:PORT"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("'{text}': bad port '{port}'"))?,
    };
    Ok(Url {
        host: host.to_string(),
        port,
        user,
        pass,
    })
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in '{text}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{text}' is not UTF-8"))
}

/// How we authenticate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Auth {
    #[default]
    None,
    Token(String),
    UserPass(String, String),
}

/// The `CONNECT` line (with its `\r\n`). `verbose` off: no `+OK` per
/// operation; `pedantic` off; `headers` on, for `HPUB` and status replies;
/// `no_responders` on, so a request nobody serves (JetStream disabled, a
/// stream gone) is answered at once with a 503 status instead of timing out.
pub fn connect_line(auth: &Auth, name: &str) -> Vec<u8> {
    let mut json = String::from("{\"verbose\":false,\"pedantic\":false,\"headers\":true,");
    json.push_str("\"no_responders\":true,\"lang\":\"rust\",\"version\":\"");
    json.push_str(env!("CARGO_PKG_VERSION"));
    json.push_str("\",\"protocol\":1,\"name\":");
    push_json_string(&mut json, name);
    match auth {
        Auth::None => {}
        Auth::Token(token) => {
            json.push_str(",\"auth_token\":");
            push_json_string(&mut json, token);
        }
        Auth::UserPass(user, pass) => {
            json.push_str(",\"user\":");
            push_json_string(&mut json, user);
            json.push_str(",\"pass\":");
            push_json_string(&mut json, pass);
        }
    }
    json.push('}');
    format!("CONNECT {json}\r\n").into_bytes()
}

/// A message from the server (`MSG` or `HMSG`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub subject: Vec<u8>,
    pub sid: u64,
    pub reply: Option<Vec<u8>>,
    /// The header block of an `HMSG` (starting `NATS/1.0`), else `None`.
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// One operation from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Info(Vec<u8>),
    Msg(Msg),
    Ping,
    Pong,
    Ok,
    /// `-ERR 'text'`, the quotes removed.
    Err(String),
}

/// The server said something that is not the protocol; the connection
/// cannot be trusted any further.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NATS protocol error: {}", self.0)
    }
}

impl std::error::Error for ProtocolError {}

fn bad(what: &str, line: &[u8]) -> ProtocolError {
    let shown = &line[..line.len().min(120)];
    ProtocolError(format!("{what}: '{}'", String::from_utf8_lossy(shown)))
}

/// Parses the first operation in `buf`: `Ok(None)` if it is not complete
/// yet, else the operation and how many bytes it took.
pub fn parse_op(buf: &[u8]) -> Result<Option<(Op, usize)>, ProtocolError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > MAX_CONTROL_LINE {
            return Err(bad("control line too long", buf));
        }
        return Ok(None);
    };
    if end > MAX_CONTROL_LINE {
        return Err(bad("control line too long", buf));
    }
    let line = &buf[..end];
    let after = end + 2;
    let (verb, args) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(i) => (&line[..i], trim(&line[i + 1..])),
        None => (line, &b""[..]),
    };
    let op = match verb.to_ascii_uppercase().as_slice() {
        b"PING" => Op::Ping,
        b"PONG" => Op::Pong,
        b"+OK" => Op::Ok,
        b"-ERR" => Op::Err(String::from_utf8_lossy(strip_quotes(args)).into_owned()),
        b"INFO" => Op::Info(args.to_vec()),
        b"MSG" => return parse_msg(buf, args, after, false),
        b"HMSG" => return parse_msg(buf, args, after, true),
        _ => return Err(bad("unknown operation", line)),
    };
    Ok(Some((op, after)))
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end.max(start)]
}

fn strip_quotes(bytes: &[u8]) -> &[u8] {
    bytes
        .strip_prefix(b"'")
        .and_then(|b| b.strip_suffix(b"'"))
        .unwrap_or(bytes)
}

/// `MSG <subject> <sid> [reply] <size>` or `HMSG <subject> <sid> [reply]
/// <header size> <total size>`, then the bytes and `\r\n`.
fn parse_msg(
    buf: &[u8],
    args: &[u8],
    start: usize,
    with_headers: bool,
) -> Result<Option<(Op, usize)>, ProtocolError> {
    let fields: Vec<&[u8]> = args
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
        .collect();
    let sizes = if with_headers { 2 } else { 1 };
    if fields.len() != 2 + sizes && fields.len() != 3 + sizes {
        return Err(bad("bad MSG line", args));
    }
    let number = |f: &[u8]| {
        std::str::from_utf8(f)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| bad("bad number in MSG line", args))
    };
    let sid = number(fields[1])? as u64;
    let reply = (fields.len() == 3 + sizes).then(|| fields[2].to_vec());
    let total = number(fields[fields.len() - 1])?;
    let header_len = if with_headers {
        number(fields[fields.len() - 2])?
    } else {
        0
    };
    if total > MAX_PAYLOAD || header_len > total {
        return Err(bad("bad sizes in MSG line", args));
    }
    let end = start + total;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(bad("message not followed by CRLF", args));
    }
    let body = &buf[start..end];
    let msg = Msg {
        subject: fields[0].to_vec(),
        sid,
        reply,
        headers: with_headers.then(|| body[..header_len].to_vec()),
        payload: body[header_len..].to_vec(),
    };
    Ok(Some((Op::Msg(msg), end + 2)))
}

/// The status code of a header block (`NATS/1.0 503` -> 503), if any.
pub fn header_status(headers: &[u8]) -> Option<u16> {
    let first = headers.split(|&b| b == b'\n').next()?;
    let rest = first.strip_prefix(b"NATS/1.0")?;
    let code = trim(rest).split(|&b| b == b' ').next()?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// The value of header `name` (case-insensitive) in a header block.
pub fn header_value<'a>(headers: &'a [u8], name: &str) -> Option<&'a [u8]> {
    headers.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        trim(&line[..colon])
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| trim(&line[colon + 1..]))
    })
}

/// `SUB <subject> <sid>`.
pub fn push_sub(out: &mut Vec<u8>, subject: &str, sid: u64) {
    out.extend_from_slice(format!("SUB {subject} {sid}\r\n").as_bytes());
}

/// `PUB <subject> <reply> <size>` and the payload.
pub fn push_pub(out: &mut Vec<u8>, subject: &str, reply: &str, payload: &[u8]) {
    out.extend_from_slice(format!("PUB {subject} {reply} {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// `HPUB <subject> <reply> <header size> <total size>` with one header,
/// `Nats-Msg-Id: <msg_id>`, and the payload.
pub fn push_hpub_with_id(
    out: &mut Vec<u8>,
    subject: &str,
    reply: &[u8],
    msg_id: &[u8],
    payload: &[u8],
) {
    const HEAD: &[u8] = b"NATS/1.0\r\nNats-Msg-Id: ";
    const TAIL: &[u8] = b"\r\n\r\n";
    let header_len = HEAD.len() + msg_id.len() + TAIL.len();
    out.extend_from_slice(b"HPUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(reply);
    // Digits by hand: this runs once per message forwarded.
    out.push(b' ');
    crate::text::push_u64(out, header_len as u64);
    out.push(b' ');
    crate::text::push_u64(out, (header_len + payload.len()) as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(HEAD);
    out.extend_from_slice(msg_id);
    out.extend_from_slice(TAIL);
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// A PubAck read without building a JSON tree, for the common case:
/// `{"stream":…,"seq":…}` with no `error`; `Some(duplicate)`. Anything
/// else (`None`) is left to [`Json::parse`].
pub fn quick_puback(payload: &[u8]) -> Option<bool> {
    let contains = |needle: &[u8]| payload.windows(needle.len()).any(|w| w == needle);
    let plain =
        payload.starts_with(b"{\"stream\":") && payload.ends_with(b"}") && !contains(b"\"error\"");
    plain.then(|| contains(b"\"duplicate\":true"))
}

/// A JetStream stream API subject: `$JS.API.STREAM.<verb>.<stream>`
/// (`INFO`, `CREATE`, ...).
pub fn stream_api_subject(verb: &str, stream: &str) -> String {
    format!("$JS.API.STREAM.{verb}.{stream}")
}

/// The subject that reads one stored message of a stream (by sequence or
/// `last_by_subj`).
pub fn msg_get_subject(stream: &str) -> String {
    format!("$JS.API.STREAM.MSG.GET.{stream}")
}

/// Whether `subject` is a valid subject: dot-separated non-empty tokens of
/// printable ASCII without spaces; with `wildcards`, a token may be `*`,
/// and the last may be `>`.
pub fn valid_subject(subject: &str, wildcards: bool) -> bool {
    let tokens: Vec<&str> = subject.split('.').collect();
    !subject.is_empty()
        && tokens.iter().enumerate().all(|(i, token)| {
            let wild = *token == "*" || (*token == ">" && i == tokens.len() - 1);
            !token.is_empty()
                && if wild {
                    wildcards
                } else {
                    token
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
                }
        })
}

/// Whether the (possibly wildcard) `pattern` covers the literal `subject`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in pattern.split('.') {
        match (token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (literal, Some(s)) if literal == s => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// The default stream name for a subject: stream names may not hold `.`,
/// `*`, `>` or whitespace, so those become `_` (`edge.site1` ->
/// `edge_site1`).
pub fn stream_name_for(subject: &str) -> String {
    subject
        .chars()
        .map(|c| match c {
            '.' | '*' | '>' | '/' | '\\' => '_',
            c if c.is_ascii_graphic() => c,
            _ => '_',
        })
        .collect()
}

/// Whether `name` is a valid stream name.
pub fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>' | b'/' | b'\\'))
}

/// Decodes standard base64 (padding optional); `None` on any bad byte.
pub fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    };
    let text = text
        .strip_suffix(b"==")
        .or_else(|| text.strip_suffix(b"="))
        .unwrap_or(text);
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut bits = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            bits |= u32::from(value(c)?) << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// Appends `text` as a JSON string literal.
pub fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON value, as much as the forwarder needs: numbers are kept as the
/// text they were written in, read with [`Json::as_u64`] or
/// [`Json::as_i64`].
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(String),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// Parses a whole document; `None` if it is not JSON.
    pub fn parse(bytes: &[u8]) -> Option<Json> {
        let mut reader = JsonReader { bytes, at: 0 };
        let value = reader.value(0)?;
        reader.skip_space();
        (reader.at == bytes.len()).then_some(value)
    }

    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Follows a path of object keys (`"error.code"`).
    pub fn path(&self, path: &str) -> Option<&Json> {
        path.split('.').try_fold(self, |value, key| value.get(key))
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) => n.parse().ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Json::Number(n) => n.parse().ok(),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Array(items) => Some(items),
            _ => None,
        }
    }
}

struct JsonReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl JsonReader<'_> {
    fn skip_space(&mut self) {
        while self
            .bytes
            .get(self.at)
            .is_some_and(|b| b.is_ascii_whitespace())
        {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        self.skip_space();
        let found = self.bytes.get(self.at) == Some(&byte);
        if found {
            self.at += 1;
        }
        found
    }

    fn literal(&mut self, word: &[u8], value: Json) -> Option<Json> {
        let found = self.bytes[self.at..].starts_with(word);
        self.at += word.len();
        found.then_some(value)
    }

    fn value(&mut self, depth: usize) -> Option<Json> {
        if depth > MAX_JSON_DEPTH {
            return None;
        }
        self.skip_space();
        match *self.bytes.get(self.at)? {
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'"' => self.string().map(Json::String),
            b't' => self.literal(b"true", Json::Bool(true)),
            b'f' => self.literal(b"false", Json::Bool(false)),
            b'n' => self.literal(b"null", Json::Null),
            _ => self.number(),
        }
    }

    fn object(&mut self, depth: usize) -> Option<Json> {
        self.at += 1;
        let mut members = Vec::new();
        if self.eat(b'}') {
            return Some(Json::Object(members));
        }
        loop {
            self.skip_space();
            let key = self.string()?;
            if !self.eat(b':') {
                return None;
            }
            members.push((key, self.value(depth + 1)?));
            if self.eat(b'}') {
                return Some(Json::Object(members));
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }

    fn array(&mut self, depth: usize) -> Option<Json> {
        self.at += 1;
        let mut items = Vec::new();
        if self.eat(b']') {
            return Some(Json::Array(items));
        }
        loop {
            items.push(self.value(depth + 1)?);
            if self.eat(b']') {
                return Some(Json::Array(items));
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }

    fn number(&mut self) -> Option<Json> {
        let start = self.at;
        while self
            .bytes
            .get(self.at)
            .is_some_and(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
        {
            self.at += 1;
        }
        let text = std::str::from_utf8(&self.bytes[start..self.at]).ok()?;
        text.parse::<f64>().ok()?;
        Some(Json::Number(text.to_string()))
    }

    fn string(&mut self) -> Option<String> {
        if self.bytes.get(self.at) != Some(&b'"') {
            return None;
        }
        self.at += 1;
        let mut out = Vec::new();
        loop {
            let byte = *self.bytes.get(self.at)?;
            self.at += 1;
            match byte {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    let escaped = *self.bytes.get(self.at)?;
                    self.at += 1;
                    let c = match escaped {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'u' => {
                            let hex = self.bytes.get(self.at..self.at + 4)?;
                            self.at += 4;
                            let code =
                                u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                            // Surrogate pairs are not needed by JetStream's
                            // replies; one becomes U+FFFD.
                            char::from_u32(code).unwrap_or('\u{fffd}')
                        }
                        other => other as char,
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                other => out.push(other),
            }
        }
    }
}

crate::message_error!(
    /// Why a `nats://` URL is refused.
    UrlError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let url = parse_url("nats://127.0.0.1:4223").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.user),
            ("127.0.0.1", 4223, None)
        );
        let url = parse_url("nats://al%40ce:p%3Ass@host").unwrap();
        assert_eq!(url.user.as_deref(), Some("al@ce"));
        assert_eq!(url.pass.as_deref(), Some("p:ss"));
        assert_eq!(url.port, DEFAULT_PORT);
        let url = parse_url("u:p:q@[::1]:5/").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 5));
        assert_eq!(url.pass.as_deref(), Some("p:q"));
        for bad in [
            "tls://h:1",
            "nats://",
            "nats://h:0",
            "nats://h:x",
            "nats://user@h:1",
            "nats://[::1:4",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn connect_carries_the_credentials_as_json() {
        let line = connect_line(&Auth::UserPass("a\"b".into(), "p".into()), "fwd");
        let text = String::from_utf8(line).unwrap();
        assert!(text.starts_with("CONNECT {") && text.ends_with("}\r\n"));
        let json = Json::parse(text["CONNECT ".len()..].trim_end().as_bytes()).unwrap();
        assert_eq!(json.path("user").and_then(Json::as_str), Some("a\"b"));
        assert_eq!(json.path("headers").and_then(Json::as_bool), Some(true));
        assert_eq!(json.path("verbose").and_then(Json::as_bool), Some(false));
        let token = connect_line(&Auth::Token("t0k".into()), "fwd");
        let json = Json::parse(&token[8..token.len() - 2]).unwrap();
        assert_eq!(json.path("auth_token").and_then(Json::as_str), Some("t0k"));
        assert!(json.get("user").is_none());
    }

    #[test]
    fn server_operations() {
        let cases: &[(&[u8], Option<Op>, usize)] = &[
            (b"PING\r\n", Some(Op::Ping), 6),
            (b"pong\r\nPING", Some(Op::Pong), 6),
            (b"+OK\r\n", Some(Op::Ok), 5),
            (
                b"-ERR 'Authorization Violation'\r\n",
                Some(Op::Err("Authorization Violation".into())),
                32,
            ),
            (
                b"INFO {\"a\":1}\r\n",
                Some(Op::Info(b"{\"a\":1}".to_vec())),
                14,
            ),
            (b"PIN", None, 0),
            (b"MSG a.b 1 5\r\nhel", None, 0),
        ];
        for (input, op, used) in cases {
            let got = parse_op(input).unwrap();
            assert_eq!(
                got.clone().map(|(op, _)| op),
                *op,
                "{:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(got.map_or(0, |(_, n)| n), *used);
        }
        for bad in [
            &b"HELLO\r\n"[..],
            b"MSG a\r\n",
            b"MSG a 1 3\r\nabcXY",
            b"MSG a 1 x\r\n",
            b"HMSG a 1 9 3\r\n",
        ] {
            assert!(parse_op(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(parse_op(&vec![b'x'; MAX_CONTROL_LINE + 1]).is_err());
    }

    #[test]
    fn msg_and_hmsg() {
        let (op, used) = parse_op(b"MSG _INBOX.x.7 1 5\r\nhello\r\nPING\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(used, 27);
        let Op::Msg(msg) = op else { panic!() };
        assert_eq!(
            (
                msg.subject.as_slice(),
                msg.sid,
                msg.reply,
                msg.payload.as_slice()
            ),
            (&b"_INBOX.x.7"[..], 1, None, &b"hello"[..])
        );
        let input = b"HMSG s 2 r.1 16 18\r\nNATS/1.0 503\r\n\r\nhi\r\n";
        let (op, used) = parse_op(input).unwrap().unwrap();
        assert_eq!(used, input.len());
        let Op::Msg(msg) = op else { panic!() };
        assert_eq!(msg.reply.as_deref(), Some(&b"r.1"[..]));
        assert_eq!(header_status(msg.headers.as_deref().unwrap()), Some(503));
        assert_eq!(msg.payload, b"hi");
    }

    #[test]
    fn headers() {
        let block = b"NATS/1.0\r\nnats-msg-id:  abc-12 \r\nOther: x\r\n\r\n";
        assert_eq!(header_value(block, "Nats-Msg-Id"), Some(&b"abc-12"[..]));
        assert_eq!(header_value(block, "Missing"), None);
        assert_eq!(header_status(block), None);
        assert_eq!(
            header_status(b"NATS/1.0 404 No Messages\r\n\r\n"),
            Some(404)
        );
    }

    #[test]
    fn hpub_sizes_add_up() {
        let mut out = Vec::new();
        push_hpub_with_id(&mut out, "edge.a", b"_INBOX.z.1", b"00ff-7", b"body");
        let text = String::from_utf8(out).unwrap();
        let (line, rest) = text.split_once("\r\n").unwrap();
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(&fields[..3], ["HPUB", "edge.a", "_INBOX.z.1"]);
        let header_len: usize = fields[3].parse().unwrap();
        let total: usize = fields[4].parse().unwrap();
        assert_eq!(
            &rest[..header_len],
            "NATS/1.0\r\nNats-Msg-Id: 00ff-7\r\n\r\n"
        );
        assert_eq!(&rest[header_len..total], "body");
        assert_eq!(&rest[total..], "\r\n");
    }

    #[test]
    fn quick_pubacks() {
        let cases: &[(&[u8], Option<bool>)] = &[
            (br#"{"stream":"S","seq":5}"#, Some(false)),
            (br#"{"stream":"S","seq":5,"duplicate":true}"#, Some(true)),
            (br#"{"stream":"S","seq":5,"duplicate":false}"#, Some(false)),
            (br#"{"error":{"code":503}}"#, None),
            (br#"{"stream":"S","error":{"code":400}}"#, None),
            (br#"{"stream":"S""#, None),
        ];
        for (payload, want) in cases {
            assert_eq!(
                quick_puback(payload),
                *want,
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn subjects_and_wildcards() {
        let cases = [
            ("edge.a", "edge.a", true),
            ("edge.*", "edge.a", true),
            ("edge.*", "edge.a.b", false),
            ("edge.>", "edge.a.b", true),
            ("edge.>", "edge", false),
            (">", "x", true),
            ("*.a", "b.a", true),
            ("edge.b", "edge.a", false),
            ("edge", "edge.a", false),
        ];
        for (pattern, subject, matches) in cases {
            assert_eq!(
                subject_matches(pattern, subject),
                matches,
                "{pattern} {subject}"
            );
        }
        assert!(valid_subject("edge.site-1", false));
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>"] {
            assert!(!valid_subject(bad, false), "{bad}");
        }
        assert!(valid_subject("a.*.>", true) && !valid_subject("a.>.b", true));
        assert_eq!(stream_name_for("edge.site1"), "edge_site1");
        assert!(valid_stream_name("edge_site1") && !valid_stream_name("a.b"));
    }

    #[test]
    fn base64() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"Zg==", b"f"),
            (b"Zm8=", b"fo"),
            (b"Zm9v", b"foo"),
            (
                b"TkFUUy8xLjANCk5hdHMtTXNnLUlkOiBhYmMNCg0K",
                b"NATS/1.0\r\nNats-Msg-Id: abc\r\n\r\n",
            ),
        ];
        for (text, bytes) in cases {
            assert_eq!(base64_decode(text).as_deref(), Some(*bytes));
        }
        assert_eq!(base64_decode(b"Z"), None);
        assert_eq!(base64_decode(b"Zm9!"), None);
    }

    #[test]
    fn json() {
        let doc = br#"{"error":{"code":404,"err_code":10059,"description":"stream not found"},
                      "config":{"subjects":["a.>","b"],"duplicate_window":120000000000},
                      "ok":true,"n":null,"s":"q\"\u0041\n","neg":-1.5e3}"#;
        let json = Json::parse(doc).unwrap();
        assert_eq!(
            json.path("error.err_code").and_then(Json::as_u64),
            Some(10059)
        );
        assert_eq!(
            json.path("config.duplicate_window").and_then(Json::as_u64),
            Some(120_000_000_000)
        );
        let subjects: Vec<&str> = json
            .path("config.subjects")
            .and_then(Json::as_array)
            .unwrap()
            .iter()
            .filter_map(Json::as_str)
            .collect();
        assert_eq!(subjects, ["a.>", "b"]);
        assert_eq!(json.path("ok").and_then(Json::as_bool), Some(true));
        assert_eq!(json.path("s").and_then(Json::as_str), Some("q\"A\n"));
        assert_eq!(json.path("neg").and_then(Json::as_u64), None);
        assert_eq!(json.path("missing.x"), None);
        for bad in [
            &b""[..],
            b"{",
            b"{\"a\"}",
            b"[1,]",
            b"tru",
            b"{} x",
            b"\"open",
        ] {
            assert_eq!(Json::parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(Json::parse(deep.as_bytes()), None);
        let mut out = String::new();
        push_json_string(&mut out, "a\"\\\u{1}");
        assert_eq!(out, r#""a\"\\\u0001""#);
    }

    #[test]
    fn parsers_never_panic_on_short_hostile_input() {
        let words: &[&[u8]] = &[
            b"MSG",
            b"HMSG",
            b" ",
            b"a",
            b"1",
            b"99999999999999999999",
            b"\r\n",
            b"{",
            b"\"",
            b"-ERR",
            b"\\u",
            b"[",
        ];
        let mut input = Vec::new();
        for a in words {
            for b in words {
                for c in words {
                    input.clear();
                    input.extend_from_slice(a);
                    input.extend_from_slice(b);
                    input.extend_from_slice(c);
                    let _ = parse_op(&input);
                    let _ = Json::parse(&input);
                    let _ = base64_decode(&input);
                    let _ = header_status(&input);
                }
            }
        }
    }
}
