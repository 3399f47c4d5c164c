//! The broker as a Unix service, through the real binary: signals that
//! must not kill it (SIGHUP reopens the log, SIGUSR1 logs STATS, SIGUSR2
//! and SIGPIPE are ignored), systemd's readiness protocol over
//! `$NOTIFY_SOCKET`, and the man pages against `--help`.

use std::os::unix::net::UnixDatagram;
use std::path::Path;

use mensajeria::sys::service::send_signal;

use crate::util::*;

#[test]
fn hup_usr1_usr2_and_pipe_do_not_kill_and_hup_reopens_the_log() {
    let dir = TestDir::new("signals");
    let mut broker = Broker::start(&dir, &[]);
    broker
        .producer()
        .expect("SEND:before rotation", "OK:MSG_ID:1");
    // logrotate without copytruncate: rename, then SIGHUP.
    let rotated = dir.join("broker.log.1");
    std::fs::rename(&broker.log, &rotated).unwrap();
    send_signal(broker.pid(), libc::SIGHUP).unwrap();
    eventually("a new log file", || broker.log_text().contains("reopened"));
    send_signal(broker.pid(), libc::SIGUSR1).unwrap();
    eventually("STATS in the log", || {
        broker
            .log_text()
            .contains("received SIGUSR1: OK:STATS:messages=1")
    });
    for signal in [libc::SIGUSR2, libc::SIGPIPE, libc::SIGHUP] {
        send_signal(broker.pid(), signal).unwrap();
    }
    eventually("SIGUSR2 logged", || {
        broker.log_text().contains("SIGUSR2: ignored")
    });
    // Still serving, and the old file got nothing after the rename.
    broker
        .producer()
        .expect("SEND:after rotation", "OK:MSG_ID:2");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        !old.contains("reopened") && old.contains("starting broker"),
        "{old}"
    );
    assert!(broker.log_text().contains("connection"));
    let status = broker.terminate();
    assert!(status.success(), "{status}");
    assert!(!ipc_exists(broker.shm_key, broker.sem_key));
}

/// Reads datagrams from `socket` until one contains `what` (bounded).
fn until_datagram(socket: &UnixDatagram, what: &str, seen: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    while !seen.iter().any(|d| d.contains(what)) {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|err| panic!("no {what:?} datagram: {err}; got {seen:?}"));
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
}

/// Kills the broker it holds and removes its IPC objects, even when the
/// test fails.
struct Guard {
    child: std::process::Child,
    keys: (i32, i32),
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_ipc(self.keys.0, self.keys.1);
    }
}

/// `program` (a broker binary) on port 0 with fresh keys, its log and
/// messages in `dir`, stdin closed; the caller sets the rest and spawns.
fn broker_command(program: &Path, dir: &TestDir, keys: (i32, i32)) -> std::process::Command {
    let mut command = std::process::Command::new(program);
    command
        .args(["--port", "0", "--bind", "127.0.0.1"])
        .args([
            "--shm-key",
            &keys.0.to_string(),
            "--sem-key",
            &keys.1.to_string(),
        ])
        .arg("--log-file")
        .arg(dir.join("broker.log"))
        .arg(dir.join("messages.dat"))
        .stdin(std::process::Stdio::null());
    command
}

fn notify_round(dir: &TestDir, socket: UnixDatagram, address: &str) {
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let keys = fresh_keys();
    let child = broker_command(&bin("broker"), dir, keys)
        .env("NOTIFY_SOCKET", address)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Guard { child, keys };
    let pid = guard.child.id();
    let mut seen = Vec::new();
    until_datagram(&socket, "READY=1", &mut seen);
    let ready = seen.iter().find(|d| d.contains("READY=1")).unwrap();
    assert!(ready.contains("STATUS=listening on"), "{ready}");
    assert!(ready.contains(&format!("MAINPID={pid}")), "{ready}");
    mensajeria::sys::os::request_stop(pid, false).unwrap();
    until_datagram(&socket, "STOPPING=1", &mut seen);
    let status = wait_child(&mut guard.child, WAIT).expect("broker exits after SIGTERM");
    assert!(status.success(), "{status}; datagrams {seen:?}");
    until_datagram(&socket, "STATUS=stopped", &mut seen);
    assert!(!ipc_exists(keys.0, keys.1));
}

#[test]
fn notify_socket_gets_ready_status_and_stopping() {
    let dir = TestDir::new("notify");
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    notify_round(&dir, socket, path.to_str().unwrap());
}

#[test]
fn notify_socket_may_be_abstract() {
    use std::os::linux::net::SocketAddrExt;
    let dir = TestDir::new("notify-abstract");
    let leaf = dir.path.file_name().unwrap().to_string_lossy().into_owned();
    let name = format!("mensajeria-test-{leaf}");
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&address).unwrap();
    notify_round(&dir, socket, &format!("@{name}"));
}

/// The long options (`--name`) a `--help` text lists.
fn options_in(help: &str) -> Vec<String> {
    let mut options = Vec::new();
    for word in help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']') {
        let Some(name) = word.strip_prefix("--") else {
            continue;
        };
        let name: String = name
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if !name.is_empty() && !options.contains(&name) {
            options.push(name);
        }
    }
    options
}

#[test]
fn man_pages_document_every_option_of_help() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/man");
    for program in ["broker", "producer", "consumer"] {
        let help = run(program, &["--help"], &[], b"");
        assert!(help.status.success(), "{}", show(&help));
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let page_path = docs.join(format!("{program}.1"));
        let page = std::fs::read_to_string(&page_path)
            .unwrap_or_else(|err| panic!("{}: {err}", page_path.display()));
        assert!(
            page.starts_with(".TH ") || page.contains("\n.TH "),
            "{program}.1 is no man page"
        );
        // roff writes a dash in an option as \- ; compare without the escapes.
        let plain = page
            .replace("\\-", "-")
            .replace("\\fB", "")
            .replace("\\fR", "")
            .replace("\\fI", "");
        let options = options_in(&help);
        assert!(options.len() >= 5, "{program}: {options:?}");
        for option in options {
            assert!(
                plain.contains(&format!("--{option}")),
                "docs/man/{program}.1 does not document --{option}"
            );
        }
    }
}

#[test]
fn build_sh_installs_over_a_running_broker() {
    let dir = TestDir::new("install");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = bin("broker");
    let from = built.parent().unwrap();
    let to = dir.join("bin");
    let install = || {
        std::process::Command::new(root.join("build.sh"))
            .arg("install")
            .arg(from)
            .arg(&to)
            .output()
            .unwrap()
    };
    let first = install();
    assert!(first.status.success(), "{}", show(&first));
    // A broker running from bin/, then a rebuild installs over it.
    let keys = fresh_keys();
    let child = broker_command(&to.join("broker"), &dir, keys)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Guard { child, keys };
    let mut first_line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(guard.child.stdout.as_mut().unwrap()),
        &mut first_line,
    )
    .unwrap();
    assert!(first_line.starts_with("listening on"), "{first_line:?}");
    let second = install();
    assert!(second.status.success(), "{}", show(&second));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!stderr.contains("Text file busy"), "{stderr}");
    // The running broker is unharmed; no temporary file is left.
    assert_eq!(guard.child.try_wait().unwrap(), None);
    let left: Vec<_> = std::fs::read_dir(&to)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut sorted = left.clone();
    sorted.sort();
    assert_eq!(sorted, ["broker", "consumer", "producer"], "{left:?}");
    let version = std::process::Command::new(to.join("broker"))
        .arg("-V")
        .output()
        .unwrap();
    assert!(version.status.success());
    mensajeria::sys::os::request_stop(guard.child.id(), false).unwrap();
    let status = wait_child(&mut guard.child, WAIT).expect("stops");
    assert!(status.success(), "{status}");
}

/// The shipped unit and logrotate file say what docs/operations.md
/// promises; where `systemd-analyze` is installed, it verifies the unit
/// (with `ExecStart` pointing at the binary under test, and no man page
/// lookup, since neither is installed on a build machine).
#[test]
fn the_systemd_unit_and_logrotate_file_are_complete_and_verify() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("docs/systemd/mensajeria.service")).unwrap();
    for line in [
        "Type=notify",
        "User=mensajeria",
        "StateDirectory=mensajeria",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ] {
        assert!(unit.contains(line), "the unit lacks {line:?}");
    }
    let rotate = std::fs::read_to_string(root.join("docs/logrotate/mensajeria")).unwrap();
    assert!(
        rotate.contains("HUP") && !rotate.contains("\n    copytruncate"),
        "{rotate}"
    );
    let operations = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    for needed in [
        "### The threat model in a paragraph",
        "stunnel",
        "ssh -N -L",
        "WireGuard",
        "docs/systemd/mensajeria.service",
        "/etc/logrotate.d/",
    ] {
        assert!(
            operations.contains(needed),
            "docs/operations.md lacks {needed:?}"
        );
    }
    let dir = TestDir::new("unit");
    let copy = dir.join("mensajeria.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/broker", bin("broker").to_str().unwrap()),
    )
    .unwrap();
    match std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
    {
        Ok(output) => assert!(
            output.status.success() && output.stderr.is_empty(),
            "systemd-analyze verify: {}",
            show(&output)
        ),
        Err(err) => eprintln!(
            "systemd-analyze is not installed ({err}): the unit was checked by content only \
             (install the package systemd to verify it)"
        ),
    }
}
