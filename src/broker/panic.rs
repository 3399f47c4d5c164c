//! The broker's panic policy: fail fast. A panic in any thread is a bug;
//! the hook logs it and aborts the whole process at once, before any
//! unwinding, so no lock is ever used again in the state the panic left
//! it in, and no pool slot, connection entry or cursor can leak.
//!
//! Why not guards that clean up and carry on: a panic can strike between
//! two statements that must go together (a record appended to the file
//! but not yet counted, a ring slot taken but not yet filled), and no guard
//! can tell which. An abort leaves exactly what a SIGKILL leaves, and that
//! case is already the one recovery is built and tortured for: the files
//! are re-read, nothing acknowledged is lost, and the next start removes
//! the orphaned IPC objects. Under systemd `Restart=on-failure` brings the
//! broker back.

use std::sync::Arc;

use crate::log::Logger;

/// Makes every later panic of this process log to `log` and abort.
pub fn install(log: Arc<Logger>) {
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        log.error(format_args!(
            "thread {name} panicked: {info}; aborting (the next start recovers from the files)"
        ));
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    const CHILD: &str = "MQ_PANIC_POLICY_CHILD";

    /// In the child: install the policy, then panic in a worker thread.
    fn child(log_path: &str) {
        let log = Logger::open(log_path.as_ref(), crate::log::Level::Info).unwrap();
        install(Arc::new(log));
        let worker = std::thread::Builder::new()
            .name("conn".into())
            .spawn(|| panic!("a bug in a session"))
            .unwrap();
        let _ = worker.join();
        // Unreachable if the policy holds: the join would return Err and
        // the process would carry on.
        std::process::exit(0);
    }

    #[test]
    fn a_panic_in_any_thread_aborts_the_process_and_is_logged() {
        if let Ok(log_path) = std::env::var(CHILD) {
            child(&log_path);
        }
        let dir = std::env::temp_dir().join(format!("mq-panic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log_path = dir.join("broker.log");
        let output = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "broker::panic::tests::a_panic_in_any_thread_aborts_the_process_and_is_logged",
                "--nocapture",
            ])
            .env(CHILD, &log_path)
            .output()
            .unwrap();
        assert_eq!(
            output.status.signal(),
            Some(libc::SIGABRT),
            "the child should abort: {output:?}"
        );
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(
            log.contains("thread conn panicked") && log.contains("a bug in a session"),
            "{log}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
