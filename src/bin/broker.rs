//! `broker [OPTIONS] <messages_file>`: parses the command line and runs the
//! broker (all the work is in `mensajeria::broker`). Exit status: 0 after a
//! clean shutdown, 1 when it cannot start or stop cleanly, 2 for a bad
//! command line or an unusable `--auth-token-file`. With `--inspect`
//! it prints the live queue instead (exit 1 when there is none).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use mensajeria::broker::auth::Token;
use mensajeria::config::{BROKER_USAGE, Parsed, parse_broker_args};

fn main() -> ExitCode {
    let mut config = match parse_broker_args(std::env::args_os().skip(1)) {
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
    if config.inspect {
        return match mensajeria::inspect::run(config.shm_key, config.sem_key) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("broker: {err}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(path) = &config.auth_token_file {
        // A token file others may read is a configuration error: exit 2.
        match Token::load(path, true) {
            Ok(token) => config.auth_token = Some(token),
            Err(err) => {
                eprintln!("broker: {err}");
                return ExitCode::from(2);
            }
        }
    }
    match mensajeria::broker::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("broker: {err}");
            ExitCode::from(1)
        }
    }
}
