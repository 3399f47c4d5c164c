//! Test helpers: a unique temporary directory per test, a broker process
//! started on port 0 with its own SysV keys (read from its `listening on`
//! line, never a sleep), raw protocol clients with read timeouts, and
//! guards that kill what they started and remove its IPC objects even when
//! the test fails.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mensajeria::sys::{os, sem, shm};

/// Longest any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn bin(name: &str) -> PathBuf {
    match name {
        "broker" => PathBuf::from(env!("CARGO_BIN_EXE_broker")),
        "producer" => PathBuf::from(env!("CARGO_BIN_EXE_producer")),
        "consumer" => PathBuf::from(env!("CARGO_BIN_EXE_consumer")),
        _ => panic!("no binary {name}"),
    }
}

/// A directory of the test's own, removed at the end unless the test
/// failed (then it is kept for a look, and its path is printed).
pub struct TestDir {
    pub path: PathBuf,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let path = base.join(format!("{name}-{}-{}", std::process::id(), unique()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TestDir { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A pair of SysV keys no other test (or broker) uses.
pub fn fresh_keys() -> (i32, i32) {
    let n = unique() & 0x7ff;
    let pid = std::process::id() & 0xfff;
    let base = 0x3000_0000 | (pid << 12) as i32 | (n << 1) as i32;
    (base, base + 1)
}

/// Removes the IPC objects with these keys, whoever left them.
pub fn remove_ipc(shm_key: i32, sem_key: i32) {
    if let Ok(shm::Existing::Orphan { id, .. } | shm::Existing::InUse { id, .. }) =
        shm::inspect(shm_key)
    {
        let _ = shm::remove(id);
    }
    if let Ok(sem::Existing::Orphan { id, .. } | sem::Existing::InUse { id, .. }) =
        sem::inspect(sem_key)
    {
        let _ = sem::remove(id);
    }
}

/// Whether any IPC object with these keys exists.
pub fn ipc_exists(shm_key: i32, sem_key: i32) -> bool {
    shm::inspect(shm_key).unwrap() != shm::Existing::None
        || sem::inspect(sem_key).unwrap() != sem::Existing::None
}

/// A broker under test.
pub struct Broker {
    pub child: Option<Child>,
    pub port: u16,
    pub shm_key: i32,
    pub sem_key: i32,
    pub messages: PathBuf,
    pub log: PathBuf,
    pub extra: Vec<String>,
    /// Run the broker under `ulimit -f` (KiB): writes past it fail.
    pub file_size_limit_kib: Option<u64>,
    stderr_path: PathBuf,
}

impl Broker {
    /// Starts a broker with files in `dir` and `extra` options.
    pub fn start(dir: &TestDir, extra: &[&str]) -> Broker {
        Broker::start_with(dir, extra, |_| {})
    }

    /// Like [`start`](Self::start), with `adjust` applied before launching.
    pub fn start_with(dir: &TestDir, extra: &[&str], adjust: impl FnOnce(&mut Broker)) -> Broker {
        let (shm_key, sem_key) = fresh_keys();
        let mut broker = Broker {
            child: None,
            port: 0,
            shm_key,
            sem_key,
            messages: dir.join("messages.dat"),
            log: dir.join("broker.log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            file_size_limit_kib: None,
            stderr_path: dir.join(&format!("broker-{}.stderr", unique())),
        };
        adjust(&mut broker);
        broker
            .launch(0)
            .unwrap_or_else(|output| panic!("broker did not start:\n{output}"));
        broker
    }

    /// The command line, for a given port.
    pub fn command(&self, port: u16) -> Command {
        let mut command = match self.file_size_limit_kib {
            None => Command::new(bin("broker")),
            Some(kib) => {
                // bash counts `ulimit -f` in KiB; exec keeps the pid.
                let mut command = Command::new("bash");
                command
                    .arg("-c")
                    .arg(format!("ulimit -f {kib} && exec \"$0\" \"$@\""))
                    .arg(bin("broker"));
                command
            }
        };
        command
            .arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--shm-key")
            .arg(self.shm_key.to_string())
            .arg("--sem-key")
            .arg(self.sem_key.to_string())
            .arg("--log-file")
            .arg(&self.log)
            .args(&self.extra)
            .arg(&self.messages);
        command
    }

    /// Starts the process and waits for `listening on`. On failure returns
    /// what it printed and its exit status.
    pub fn launch(&mut self, port: u16) -> Result<(), String> {
        let stderr = std::fs::File::create(&self.stderr_path).unwrap();
        let mut child = self
            .command(port)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn broker");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the broker never blocks on a full pipe.
            for _ in lines {}
        });
        match rx.recv_timeout(WAIT) {
            Ok(line) => {
                let port = line
                    .strip_prefix("listening on ")
                    .and_then(|addr| addr.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
                self.port = port;
                self.child = Some(child);
                Ok(())
            }
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().unwrap();
                Err(format!("status {status}\nstderr:\n{}", self.stderr()))
            }
        }
    }

    /// What the broker wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The log file's contents.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        os::request_stop(child.id(), false).unwrap();
        wait_child(&mut child, WAIT).unwrap_or_else(|| {
            let _ = child.kill();
            panic!(
                "broker did not exit within {WAIT:?} of SIGTERM\n{}",
                self.stderr()
            )
        })
    }

    /// Starts again on the same files, keys and port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        let port = self.port;
        self.launch(port)
            .unwrap_or_else(|output| panic!("broker did not restart:\n{output}"));
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.port)
    }

    /// A connection registered as a producer.
    pub fn producer(&self) -> Client {
        let mut client = self.connect();
        client.expect("REGISTER:PRODUCER", "OK:PRODUCER");
        client
    }

    /// A connection registered as consumer `id`.
    pub fn consumer(&self, id: &str) -> Client {
        let mut client = self.connect();
        client.send(&format!("REGISTER:CONSUMER:{id}"));
        assert_eq!(client.line(), format!("OK:CONSUMER:{id}"));
        client
    }

    /// The broker's resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// One STATS value.
    pub fn stat(&self, key: &str) -> u64 {
        let mut client = self.connect();
        client.send("STATS");
        let line = client.line();
        stat_value(&line, key)
    }
}

/// The value of `key` in a `OK:STATS:` line.
pub fn stat_value(line: &str, key: &str) -> u64 {
    let body = line
        .strip_prefix("OK:STATS:")
        .unwrap_or_else(|| panic!("not a STATS line: {line}"));
    body.split(' ')
        .find_map(|pair| {
            pair.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
        })
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        remove_ipc(self.shm_key, self.sem_key);
        if std::thread::panicking() {
            eprintln!(
                "broker stderr:\n{}\nbroker log:\n{}",
                self.stderr(),
                self.log_text()
            );
        }
    }
}

/// Waits for `child` to exit, at most `limit`.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A command for one of the programs with piped stdout and stderr, and no
/// broker address from the test's own environment: only `env`.
pub fn client_command(
    program: &str,
    args: &[impl AsRef<std::ffi::OsStr>],
    env: &[(&str, &str)],
) -> Command {
    let mut command = Command::new(bin(program));
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in ["BROKER_HOST", "BROKER_PORT", "SERVER_IP", "SERVER_PORT"] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    command
}

/// Runs a program to completion (bounded by [`WAIT`]) with `stdin` as input.
pub fn run(program: &str, args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Output {
    let mut command = client_command(program, args, env);
    command.stdin(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let output = wait_output(child, WAIT);
    writer.join().unwrap();
    output
}

/// Collects a child's output, killing it if it runs past `limit`.
pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let status = match wait_child(&mut child, limit) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let status = child.wait().unwrap();
            let output = Output {
                status,
                stdout: out.join().unwrap(),
                stderr: err.join().unwrap(),
            };
            panic!("process ran past {limit:?}:\n{}", show(&output));
        }
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// A readable account of a process's output, for failure messages.
pub fn show(output: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A raw protocol client with read timeouts, so a broken broker fails a
/// test instead of hanging it.
pub struct Client {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to broker");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    pub fn send(&mut self, line: &str) {
        self.send_bytes(format!("{line}\n").as_bytes());
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to broker");
    }

    /// The next line as bytes, without its `\n`.
    pub fn line_bytes(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        self.reader
            .read_until(b'\n', &mut line)
            .expect("read from broker");
        assert_eq!(
            line.pop(),
            Some(b'\n'),
            "connection closed; got {:?}",
            String::from_utf8_lossy(&line)
        );
        line
    }

    /// The next line, or `None` once the connection is closed or broken
    /// (for tests that kill the broker under a client).
    pub fn try_line(&mut self) -> Option<String> {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(_) if line.pop() == Some(b'\n') => Some(String::from_utf8_lossy(&line).into_owned()),
            _ => None,
        }
    }

    /// The next line, which must be UTF-8.
    pub fn line(&mut self) -> String {
        String::from_utf8(self.line_bytes()).unwrap()
    }

    /// The next line that is not a NOTIFY.
    pub fn reply(&mut self) -> String {
        loop {
            let line = self.line();
            if !line.starts_with("NOTIFY:") {
                return line;
            }
        }
    }

    /// Sends `request` and checks the reply.
    pub fn expect(&mut self, request: &str, reply: &str) {
        self.send(request);
        assert_eq!(self.reply(), reply, "reply to {request:?}");
    }

    /// Reads until the broker closes the connection; returns what came.
    pub fn rest(&mut self) -> String {
        let mut text = String::new();
        let _ = self.reader.read_to_string(&mut text);
        text
    }

    /// Whether the broker closed the connection (end of file or reset)
    /// within the read timeout. A read timeout means the connection is
    /// still open: `false`, never "closed". A byte that arrives instead is
    /// a protocol surprise and fails the test.
    pub fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.reader.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => panic!(
                "expected the connection to close, got more data: {:?}",
                byte[0] as char
            ),
            Err(err) if is_timeout(&err) => false,
            Err(_) => true,
        }
    }

    /// The buffered reading side, for tests that read in their own way.
    pub fn reader(&mut self) -> &mut BufReader<TcpStream> {
        &mut self.reader
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
    }
}

/// Whether an I/O error is a read timeout (`WouldBlock` on Unix).
pub fn is_timeout(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Polls `check` until it returns true or [`WAIT`] passes.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The messages file's size.
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}
