//! The consumer in a pipeline, through the real binaries: `--exec` acks
//! only what its command finished (a failure is redelivered after the ack
//! wait), and a consumer whose stdout reader goes away exits at once.

use std::io::{BufRead, BufReader};

use crate::util::*;

#[test]
fn exec_acks_only_what_the_command_finished() {
    let dir = TestDir::new("exec-ack");
    let broker = Broker::start(&dir, &["--ack-wait", "1"]);
    let port = broker.port.to_string();
    let out = dir.join("out");
    let marker = dir.join("failed-once");
    // Fails once for the second message, then takes it.
    let script = format!(
        "c=$(cat); if [ \"$c\" = second ] && [ ! -e '{marker}' ]; then : > '{marker}'; exit 3; fi; \
         printf '%s %s\\n' \"$MSG_ID\" \"$c\" >> '{out}'",
        marker = marker.display(),
        out = out.display()
    );
    let sent = run(
        "producer",
        &["--port", &port],
        &[],
        b"first\nsecond\nthird: with a colon\n",
    );
    assert!(sent.status.success(), "{}", show(&sent));
    let output = run(
        "consumer",
        &[
            "--port", &port, "--id", "worker", "--ack", "--count", "3", "--exec", &script,
        ],
        &[],
        b"",
    );
    assert!(output.status.success(), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--exec failed for message 2: exit status 3; not acknowledged"),
        "{stderr}"
    );
    let done = std::fs::read_to_string(&out).unwrap();
    let mut lines: Vec<&str> = done.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        ["1 first", "2 second", "3 third: with a colon"],
        "{done}"
    );
    assert!(broker.stat("redelivered") >= 1);
    // Everything acknowledged: a new consumer of the id gets nothing.
    let mut client = broker.connect();
    client.expect("REGISTER:CONSUMER:worker:ACK", "OK:CONSUMER:worker");
    client.expect("GET", "ERROR:No messages available");
}

#[test]
fn a_consumer_whose_reader_goes_away_exits_at_once() {
    let dir = TestDir::new("stdout-gone");
    let broker = Broker::start(&dir, &[]);
    let port = broker.port.to_string();
    let mut child = client_command("consumer", &["--port", &port, "--id", "h"], &[])
        .spawn()
        .unwrap();
    let sent = run(
        "producer",
        &["--port", &port, "-n", "5", "-i", "0"],
        &[],
        b"",
    );
    assert!(sent.status.success(), "{}", show(&sent));
    // `consumer | head -3`: read three lines, then close the pipe.
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    for _ in 0..3 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("msg-"), "{line:?}");
    }
    drop(reader);
    // No further message comes: the consumer must notice by itself.
    let status = wait_child(&mut child, WAIT).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("the consumer kept running after its reader went away")
    });
    assert_eq!(status.code(), Some(141), "{status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("the reader of stdout went away"),
        "{stderr}"
    );
}
