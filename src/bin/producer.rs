//! `producer`: sends messages to the broker, typed at a prompt, piped in,
//! or generated (`-n COUNT -i INTERVAL_MS`). All the work is in
//! `mensajeria::producer`; this parses the command line.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use mensajeria::cli::{UsageError, number};
use mensajeria::client::{CommonArgs, Endpoint};
use mensajeria::producer::{self, DEFAULT_WINDOW, MAX_WINDOW, ProducerOptions};

const USAGE: &str = "\
usage: producer [-n COUNT] [-i INTERVAL_MS] [OPTIONS]

Without -n: reads messages from stdin, one per line ('q' alone quits); at a
terminal it prompts and prints each stored message's id. With -n: sends
COUNT numbered messages, INTERVAL_MS apart (0: as fast as the window allows).

options:
  -n, --count COUNT       automatic mode: send COUNT messages
  -i, --interval MS       automatic mode: pause between messages   [1000]
  -w, --window N          messages in flight at most                [64]
  -s, --size BYTES        automatic mode: pad each message to BYTES
      --print-ids         print each stored message's id on stdout
      --host HOST         broker host  [$BROKER_HOST or localhost]
      --port PORT         broker port  [$BROKER_PORT or 8080]
      --retries N         reconnection attempts before giving up   [no limit]
      --heartbeat S       heartbeat after S idle seconds           [20]
                          (keep it well under the broker's --idle-timeout)
      --token-file FILE   send AUTH with the token in FILE's first line first
                          (the broker's --auth-token-file)  [$BROKER_TOKEN_FILE]
  -h, --help              print this help
  -V, --version           print the version
";

fn parse() -> Result<Option<ProducerOptions>, UsageError> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut common = CommonArgs::default();
    let mut options = ProducerOptions {
        endpoint: Endpoint {
            host: String::new(),
            port: 0,
            token: None,
        },
        count: None,
        interval: Duration::from_millis(1000),
        window: DEFAULT_WINDOW,
        size: 0,
        retries: None,
        heartbeat: Default::default(),
        print_ids: false,
    };
    while let Some(arg) = parser.next()? {
        match arg {
            Long(name) if CommonArgs::OPTIONS.contains(&name) => {
                let name = name.to_owned();
                common.take(&name, &mut parser)?;
            }
            Short('n') | Long("count") => {
                options.count = Some(number(&mut parser, "--count", 1, u64::MAX)?)
            }
            Short('i') | Long("interval") => {
                options.interval =
                    Duration::from_millis(number(&mut parser, "--interval", 0, 86_400_000)?)
            }
            Short('w') | Long("window") => {
                options.window = number(&mut parser, "--window", 1, MAX_WINDOW)?
            }
            Short('s') | Long("size") => {
                options.size = number(
                    &mut parser,
                    "--size",
                    1,
                    mensajeria::protocol::MAX_MSG_SIZE_LIMIT,
                )?
            }
            Long("print-ids") => options.print_ids = true,
            Short('h') | Long("help") => {
                print!("{USAGE}");
                return Ok(None);
            }
            Short('V') | Long("version") => {
                println!("producer {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
    options.endpoint =
        Endpoint::resolve(common.host, common.port, None)?.with_token_file(common.token_file)?;
    options.retries = common.retries;
    options.heartbeat = common.heartbeat;
    Ok(Some(options))
}

fn main() -> ExitCode {
    let options = match parse() {
        Ok(Some(options)) => options,
        Ok(None) => return ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("producer: {err}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let status = match options.count {
        Some(count) => producer::run_automatic(&options, count),
        None => producer::run_lines(&options),
    };
    ExitCode::from(status as u8)
}
