//! The crate's shape, checked from its source: which module may import
//! which (docs/architecture.md, "Dependency rules"), that the state
//! machine does no I/O, that every wire text is spelled in protocol.rs
//! alone, and that no function is longer than the house limit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each module of `src/` and the modules it may import (`use crate::…`).
/// Layers point one way: bins → broker and the clients → protocol, store,
/// queue → sys. A new module needs a line here, with its reason in
/// docs/architecture.md.
const ALLOWED: &[(&str, &[&str])] = &[
    // The bottom: no imports from the crate at all.
    ("sys", &[]),
    ("text", &[]),
    ("disk", &[]),
    ("cli", &[]),
    ("pool", &[]),
    ("token", &[]),
    ("notify", &[]),
    ("exec", &[]),
    ("log", &["sys"]),
    // The middle: the wire, the files, the ring.
    ("protocol", &["text"]),
    ("store", &["disk", "text"]),
    ("segments", &["disk", "store", "text"]),
    ("queue", &["sys", "log"]),
    // The broker's side.
    (
        "config",
        &[
            "cli", "protocol", "store", "log", "queue", "segments", "token",
        ],
    ),
    // broker --inspect: reads the ring's layout, attaches through sys.
    ("inspect", &["queue", "sys", "log"]),
    (
        "broker",
        &[
            "config", "protocol", "store", "segments", "queue", "pool", "log", "disk", "sys",
            "text", "cli", "token", "notify",
        ],
    ),
    // The clients' side: never the store, the ring or the broker.
    ("client", &["cli", "protocol", "sys", "text", "token"]),
    ("producer", &["client", "cli", "protocol", "sys", "text"]),
    (
        "consumer",
        &["client", "cli", "protocol", "sys", "text", "exec"],
    ),
    // NATS's wire (pure), and the forwarder that joins it to our broker.
    ("nats", &["text"]),
    ("forward", &["client", "nats", "protocol", "sys", "text"]),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, with its path relative to it.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let name = path.strip_prefix(base).unwrap().display().to_string();
                out.push((name, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&src(), &src(), &mut out);
    out.sort();
    out
}

/// The top-level module a file of `src/` belongs to (`None` for lib.rs
/// and the binaries).
fn module_of(file: &str) -> Option<String> {
    if file == "lib.rs" || file.starts_with("bin/") {
        return None;
    }
    let first = file.split('/').next().unwrap();
    Some(first.trim_end_matches(".rs").to_string())
}

/// The modules named by `use crate::…` lines (also `pub use`).
fn imports(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        let line = line.strip_prefix("pub ").unwrap_or(line);
        let Some(rest) = line.strip_prefix("use crate::") else {
            continue;
        };
        if let Some(group) = rest.strip_prefix('{') {
            for part in group.split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push(name);
                }
            }
        } else {
            found.push(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    found
}

#[test]
fn layers_point_one_way() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for (file, text) in sources() {
        let Some(module) = module_of(&file) else {
            continue;
        };
        let Some(may) = allowed.get(module.as_str()) else {
            wrong.push(format!(
                "{file}: module {module} is not in the table of ALLOWED"
            ));
            continue;
        };
        for import in imports(&text) {
            if import != module && !may.contains(&import.as_str()) {
                wrong.push(format!("{file}: {module} must not import crate::{import}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "dependency rules broken:\n{}",
        wrong.join("\n")
    );
}

/// The part of a file that is not its test module (the house puts it
/// last, behind `#[cfg(test)]`).
fn without_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    }
}

/// Code lines, comments dropped (`//` to the end of the line, outside
/// string literals).
fn code_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| strip_comment(&line.replace("'\\\"'", "'_'").replace("'\"'", "'_'")))
        .collect()
}

fn strip_comment(line: &str) -> String {
    let mut out = String::new();
    let mut in_string = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if c == '\\' {
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '/' && chars.peek() == Some(&'/') {
            break;
        } else {
            if c == '"' {
                in_string = true;
            }
            out.push(c);
        }
    }
    out
}

/// The string literals on a code line (byte strings included).
fn literals(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut current: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match &mut current {
            Some(text) => match c {
                '\\' => {
                    chars.next();
                }
                '"' => found.push(current.take().unwrap()),
                _ => text.push(c),
            },
            None if c == '"' => current = Some(String::new()),
            None => {}
        }
    }
    found
}

#[test]
fn the_state_machine_does_no_io() {
    let text = std::fs::read_to_string(src().join("broker/state.rs")).unwrap();
    for line in code_lines(&text) {
        for banned in [
            "std::net",
            "std::fs",
            "crate::sys",
            "crate::queue",
            "crate::store",
            "crate::log",
        ] {
            assert!(!line.contains(banned), "state.rs uses {banned}: {line}");
        }
    }
}

#[test]
fn every_wire_text_is_spelled_in_protocol_rs() {
    const PREFIXES: [&str; 8] = [
        "OK:",
        "ERROR:",
        "MSG:",
        "NOTIFY:",
        "REGISTER:",
        "SEND:",
        "ACK:",
        "HEARTBEAT:",
    ];
    const WORDS: [&str; 3] = ["GET", "STATS", "QUIT"];
    let mut wrong = Vec::new();
    for (file, text) in sources() {
        // nats.rs spells NATS's wire (its MSG, its $JS.API...GET), not ours;
        // broker/http.rs speaks HTTP (`--http`), whose GET is not ours.
        if file == "protocol.rs"
            || file == "nats.rs"
            || file == "broker/http.rs"
            || file.ends_with("/tests.rs")
        {
            continue;
        }
        for (n, line) in code_lines(without_tests(&text)).iter().enumerate() {
            for literal in literals(line) {
                let word = |w: &str| {
                    literal
                        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                        .any(|part| part == w)
                };
                if PREFIXES.iter().any(|p| literal.contains(p)) || WORDS.iter().any(|w| word(w)) {
                    wrong.push(format!("{file}:{}: \"{literal}\"", n + 1));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "wire texts outside protocol.rs:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_check() {
    assert_eq!(
        imports("use crate::a::b;\npub use crate::{c, d::e};\n"),
        ["a", "c", "d"]
    );
    assert_eq!(
        strip_comment(r#"let a = "x // y"; // z"#),
        r#"let a = "x // y"; "#
    );
    assert_eq!(literals(r#"f(b"OK:BYE", "a\"b")"#), ["OK:BYE", "ab"]);
}

/// The longest a function of `src/` may be, in lines from its `fn` line to
/// its closing brace (TigerBeetle keeps 70).
const MAX_FUNCTION_LINES: usize = 80;

/// Functions as (first line, length), found by indentation: a line that
/// starts a `fn` with a body, up to the `}` at the same indentation.
fn functions(text: &str) -> Vec<(usize, usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        let indent = &lines[i][..lines[i].len() - trimmed.len()];
        let starts_fn = [
            "fn ",
            "pub fn ",
            "pub(crate) fn ",
            "pub(super) fn ",
            "const fn ",
            "unsafe fn ",
            "pub unsafe fn ",
        ]
        .iter()
        .any(|p| trimmed.starts_with(p));
        if !starts_fn {
            i += 1;
            continue;
        }
        let mut open = i;
        while open < lines.len() && !lines[open].trim_end().ends_with('{') {
            if lines[open].trim_end().ends_with(';') {
                break;
            }
            open += 1;
        }
        if open >= lines.len() || lines[open].trim_end().ends_with(';') {
            i = open + 1;
            continue;
        }
        let close = (open + 1..lines.len())
            .find(|&k| lines[k] == format!("{indent}}}"))
            .unwrap_or(lines.len() - 1);
        found.push((i + 1, close - i + 1, trimmed.to_string()));
        i += 1;
    }
    found
}

#[test]
fn no_function_is_longer_than_the_limit() {
    let mut long = Vec::new();
    for (file, text) in sources() {
        for (line, len, head) in functions(&text) {
            if len > MAX_FUNCTION_LINES {
                long.push(format!("{file}:{line}: {len} lines: {head}"));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines:\n{}",
        long.join("\n")
    );
    // The check sees functions: a long one in a sample is found.
    let sample = format!("fn long() {{\n{}}}\n", "    x();\n".repeat(90));
    assert_eq!(functions(&sample)[0].1, 92);
}
