//! `broker [OPTIONS] <messages_file>`: parses the command line and runs the
//! broker (all the work is in `mensajeria::broker`). Exit status: 0 after a
//! clean shutdown, 1 when it cannot start or stop cleanly, 2 for a bad
//! command line.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use mensajeria::config::{BROKER_USAGE, Parsed, parse_broker_args};

fn main() -> ExitCode {
    let config = match parse_broker_args(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(config)) => config,
        Ok(Parsed::Help) => {
            print!("{BROKER_USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("broker {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("broker: {err}\n\n{BROKER_USAGE}");
            return ExitCode::from(2);
        }
    };
    match mensajeria::broker::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("broker: {err}");
            ExitCode::from(1)
        }
    }
}
