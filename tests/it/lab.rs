//! docs/lab.md still runs: `./build.sh lab` runs every command of the
//! lab with this build's binaries and SysV keys of the test's own, into a
//! temporary file, and must exit 0 with a fresh output under every
//! command, leaving no IPC object under its keys. A command that fails
//! must fail the generator, named. The tools the lab needs are checked
//! first, and a missing one fails the test naming its Debian package
//! (`./build.sh test` installs them); nothing is skipped.
//!
//! The generator runs in a process group of its own: if it runs past its
//! bound, the whole group (brokers, nc, strace) is killed and the keys'
//! objects removed, so a hung lab fails the test instead of leaking.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::util::{TestDir, bin, ipc_exists, remove_ipc, wait_child};

/// How long the whole lab may take: it sleeps about 12 s on purpose
/// (idle timeouts, a held MUTEX); the rest is slack for a loaded machine.
const LAB_LIMIT: Duration = Duration::from_secs(240);

/// The tools docs/lab.md uses, with the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("nc", "netcat-openbsd"),
    ("strace", "strace"),
    ("perl", "perl"),
    ("ipcs", "util-linux"),
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn require_tools() {
    for (tool, package) in TOOLS {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "docs/lab.md needs {tool}: install the Debian package {package} \
             (apt-get install -y {package}; ./build.sh test does it when run as root)"
        );
    }
}

/// Eight SysV keys (four pairs) of this test's own: the lab's range, away
/// from `util::fresh_keys` (0x30xxxxxx) and from `./build.sh lab`'s own.
struct LabKeys(i32);

impl LabKeys {
    fn new(salt: i32) -> LabKeys {
        let pid = (std::process::id() & 0x3fff) as i32;
        LabKeys(0x4c40_0000 + (pid << 5) + salt * 8)
    }

    fn pairs(&self) -> impl Iterator<Item = (i32, i32)> {
        let base = self.0;
        (0..4).map(move |k| (base + 2 * k, base + 2 * k + 1))
    }
}

impl Drop for LabKeys {
    fn drop(&mut self) {
        for (shm_key, sem_key) in self.pairs() {
            remove_ipc(shm_key, sem_key);
            // The lab's keys are plain numbers: each may hold either kind.
            remove_ipc(sem_key, shm_key);
        }
    }
}

/// What one run of the generator left.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `./build.sh lab` on `input` into `output`, with the binaries of
/// this build, in a process group of its own, bounded by [`LAB_LIMIT`].
fn run_lab(dir: &TestDir, input: &Path, output: &Path, keys: &LabKeys) -> Run {
    let bin_dir = bin("broker").parent().unwrap().to_path_buf();
    let (out_path, err_path) = (dir.join("lab.stdout"), dir.join("lab.stderr"));
    let mut child = Command::new(root().join("build.sh"))
        .arg("lab")
        .args(["--in".as_ref(), input.as_os_str()])
        .args(["--out".as_ref(), output.as_os_str()])
        .args(["--bin".as_ref(), bin_dir.as_os_str()])
        .args(["--key", &keys.0.to_string()])
        .env("TMPDIR", &dir.path)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .process_group(0)
        .spawn()
        .expect("run ./build.sh lab");
    let status = match wait_child(&mut child, LAB_LIMIT) {
        Some(status) => status,
        None => {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            panic!("./build.sh lab ran past {LAB_LIMIT:?}; its stderr:\n{stderr}");
        }
    };
    Run {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap(),
        stderr: std::fs::read_to_string(&err_path).unwrap(),
    }
}

/// The commands of a lab file: the `$ ` lines (with their continuation
/// lines) of every block after a `<!-- lab -->` line.
fn commands(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut marked = false;
    let mut in_block = false;
    for line in text.lines() {
        if !in_block {
            if marked && line.starts_with("```") {
                in_block = true;
            }
            marked = line == "<!-- lab -->";
            continue;
        }
        if line == "```" {
            in_block = false;
        } else if let Some(command) = line.strip_prefix("$ ") {
            found.push(command.to_string());
        }
    }
    found
}

/// What the lab's outputs must show, as its prose says they do.
const EXPECTED: &[&str] = &[
    "sem_flg=SEM_UNDO",
    "sem_flg=IPC_NOWAIT",
    "MQRING01",
    "exit status 137",
    "WARN removed an orphaned shared memory segment",
    "WARN removed an orphaned semaphore set",
    "ERROR:Idle timeout",
    "ERROR:Message too large",
    "ERROR:Persistence failure",
    "serving from the log",
    "is not this broker's",
    "exit status 1",
    "(nothing under the lab's keys)",
];

#[test]
fn every_command_of_docs_lab_md_runs_and_gets_a_fresh_output() {
    require_tools();
    let dir = TestDir::new("lab");
    let keys = LabKeys::new(0);
    let input = root().join("docs/lab.md");
    let output = dir.join("lab.md");
    let run = run_lab(&dir, &input, &output, &keys);
    assert!(
        run.status.success(),
        "./build.sh lab failed ({}):\n{}\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    let source = std::fs::read_to_string(&input).unwrap();
    let written = std::fs::read_to_string(&output).unwrap();
    let wanted = commands(&source);
    assert!(
        wanted.len() > 50,
        "{} commands in docs/lab.md",
        wanted.len()
    );
    assert_eq!(
        commands(&written),
        wanted,
        "the commands were kept as they are"
    );
    let summary = format!("lab: {} commands in ", wanted.len());
    assert!(run.stdout.contains(&summary), "{}", run.stdout);
    // Fresh: the outputs show this run's keys, not the committed ones.
    let key = format!("0x{:08x}", keys.0);
    let sysv = format!("/SYSV{:08x}", keys.0);
    for fresh in [key.as_str(), sysv.as_str()].iter().chain(EXPECTED) {
        assert!(written.contains(fresh), "no {fresh:?} in the lab's output");
    }
    for (shm_key, sem_key) in keys.pairs() {
        assert!(
            !ipc_exists(shm_key, sem_key) && !ipc_exists(sem_key, shm_key),
            "IPC objects left under 0x{shm_key:x}/0x{sem_key:x}"
        );
    }
    let left: Vec<PathBuf> = std::fs::read_dir(&dir.path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("mq-lab")
        })
        .collect();
    assert!(left.is_empty(), "temporary directories left: {left:?}");
}

#[test]
fn a_failing_lab_command_fails_the_generator_naming_it() {
    require_tools();
    let dir = TestDir::new("lab-fails");
    let keys = LabKeys::new(1);
    let input = dir.join("in.md");
    let doc = "# a lab\n\n<!-- lab -->\n```console\n$ echo before\nold output\n\
               $ ls /nonexistent-lab-path\n```\n";
    std::fs::write(&input, doc).unwrap();
    let output = dir.join("out.md");
    let run = run_lab(&dir, &input, &output, &keys);
    assert!(!run.status.success(), "{}", run.stdout);
    for named in ["ls /nonexistent-lab-path", "line 7", "No such file"] {
        assert!(
            run.stderr.contains(named),
            "{named:?} not in:\n{}",
            run.stderr
        );
    }
    assert!(!output.exists(), "nothing is written when a command fails");
}
