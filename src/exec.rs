//! `consumer --exec CMD`: hands each message to a program instead of
//! printing it. CMD runs through `sh -c`, one message at a time, with the
//! content on its stdin (byte for byte, no newline added) and the message
//! id in `$MSG_ID`; its stdout and stderr are the consumer's.
//!
//! Only an exit status of 0 counts as done: in ack mode the consumer
//! acknowledges the message only then, so a program that fails or is
//! killed gets the message again (after the broker's ack wait). This is
//! what a pipe cannot do: `consumer --ack | program` acknowledges what
//! reached the pipe, not what the program finished.
//!
//! There is no time limit on CMD: a command slower than the broker's
//! `--ack-wait` gets its message delivered again meanwhile (at least
//! once), and one slower than `--idle-timeout` costs a reconnection.

use std::io::{self, Write};
use std::process::{Command, ExitStatus, Stdio};

/// Runs `command` for message `id` with `content` on its stdin; `Err` says
/// why it did not succeed.
pub fn run(command: &str, id: u64, content: &[u8]) -> Result<(), ExecError> {
    run_text(command, id, content).map_err(ExecError)
}

fn run_text(command: &str, id: u64, content: &[u8]) -> Result<(), String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("MSG_ID", id.to_string())
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot run sh -c {command:?}: {err}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its stdin may exit first: EPIPE is
        // its business, and its exit status says whether it succeeded.
        match stdin.write_all(content) {
            Err(err) if err.kind() != io::ErrorKind::BrokenPipe => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("writing the message to its stdin: {err}"));
            }
            _ => {}
        }
    }
    let status = child
        .wait()
        .map_err(|err| format!("waiting for it: {err}"))?;
    describe_failure(status).map_or(Ok(()), Err)
}

/// `None` for success, else what went wrong in words.
fn describe_failure(status: ExitStatus) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    if status.success() {
        return None;
    }
    Some(match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    })
}

crate::message_error!(
    /// Why `--exec` did not take a message: the command failed, or could not run.
    ExecError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_on_stdin_id_in_env_status_decides() {
        assert_eq!(
            run(
                "test \"$(cat)\" = 'a:b c' && test \"$MSG_ID\" = 7",
                7,
                b"a:b c"
            ),
            Ok(())
        );
        assert_eq!(
            run("exit 3", 1, b"x"),
            Err(ExecError("exit status 3".into()))
        );
        assert_eq!(
            run("kill -9 $$", 1, b""),
            Err(ExecError("killed by signal 9".into()))
        );
        // Not reading stdin is fine; a large message does not deadlock.
        assert_eq!(run("true", 1, &vec![b'x'; 1 << 20]), Ok(()));
    }
}
