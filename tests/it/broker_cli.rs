//! The broker's command line: options, errors (exit 2), help, version, and
//! the `listening on` line with `--port 0`.

use crate::util::*;

#[test]
fn help_and_version_go_to_stdout_and_exit_0() {
    let help = run("broker", &["--help"], &[], b"");
    assert!(help.status.success(), "{}", show(&help));
    let text = String::from_utf8_lossy(&help.stdout);
    for option in [
        "--port",
        "--bind",
        "--capacity",
        "--max-msg-size",
        "--max-clients",
        "--idle-timeout",
        "--consumer-ttl",
        "--ack-wait",
        "--send-timeout",
        "--shm-key",
        "--sem-key",
        "--fsync",
        "--fsync-interval",
        "--log-file",
        "--log-level",
        "--repair",
        "--help",
        "--version",
    ] {
        assert!(text.contains(option), "help lacks {option}:\n{text}");
    }
    let version = run("broker", &["-V"], &[], b"");
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("broker "));
}

#[test]
fn bad_options_exit_2_with_one_line_and_the_usage() {
    let dir = TestDir::new("cli-bad");
    let file = dir.join("m.dat");
    let file = file.to_str().unwrap();
    for (args, quoted) in [
        (vec!["--port", "99999", file], "'99999'"),
        (vec!["--capacity", "0", file], "'0'"),
        (vec!["--capacity", "many", file], "'many'"),
        (vec!["--fsync", "sometimes", file], "'sometimes'"),
        (vec!["--log-level", "loud", file], "'loud'"),
        (vec!["--shm-key", "0", file], "'0'"),
        (vec!["--bind", "nowhere", file], "'nowhere'"),
        (vec!["--frobnicate", file], "--frobnicate"),
        (vec![file, "extra"], "extra"),
        (vec![], "missing <messages_file>"),
    ] {
        let output = run("broker", &args, &[], b"");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}\n{}", show(&output));
        let first = stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("broker: ") && first.contains(quoted),
            "{args:?}: {first}"
        );
        assert!(
            stderr.contains("usage: broker"),
            "{args:?}: no usage\n{stderr}"
        );
        assert!(output.stdout.is_empty());
    }
}

#[test]
fn port_0_prints_the_bound_address_once_ready() {
    let dir = TestDir::new("cli-port0");
    let mut broker = Broker::start(&dir, &[]);
    assert_ne!(broker.port, 0);
    let mut client = broker.connect();
    client.expect("HEARTBEAT:1", "OK:HEARTBEAT");
    assert!(broker.terminate().success());
}

#[test]
fn sigint_stops_the_broker_cleanly_too() {
    let dir = TestDir::new("cli-sigint");
    let mut broker = Broker::start(&dir, &[]);
    let mut client = broker.producer();
    client.expect("SEND:kept", "OK:MSG_ID:1");
    let mut child = broker.child.take().unwrap();
    mensajeria::sys::os::request_stop(child.id(), true).unwrap();
    let status = wait_child(&mut child, WAIT).expect("exit after SIGINT");
    assert!(status.success(), "{status}");
    assert_eq!(client.rest(), "ERROR:Shutting down\n");
    assert!(!ipc_exists(broker.shm_key, broker.sem_key));
    assert!(broker.log_text().contains("received SIGINT"));
    broker.restart();
    broker.consumer("c").expect("GET", "MSG:1:kept");
}
