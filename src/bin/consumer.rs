//! `consumer`: receives messages from the broker and prints each one's
//! content on stdout. All the work is in `mensajeria::consumer`; this
//! parses the command line.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use mensajeria::cli::{UsageError, number, string};
use mensajeria::client::{CommonArgs, Endpoint};
use mensajeria::consumer::{self, ConsumerOptions, DEFAULT_WINDOW};
use mensajeria::protocol::valid_consumer_id;

const USAGE: &str = "\
usage: consumer [--id ID [--ack]] [OPTIONS]

Registers with the broker (resuming consumer ID's position with --id),
then prints each message's content on stdout, one per line.

options:
      --id ID             consumer id to resume (1-64 of A-Z a-z 0-9 . _ -)
      --ack               acknowledge each message once written to stdout and
                          flushed; what is not acknowledged (the consumer was
                          killed first) is delivered again to ID: at least once.
                          Needs --id; an id keeps the mode it was created in.
                          Through a pipe this protects what reached the pipe,
                          not what the program behind it finished: use --exec
      --exec CMD          run 'sh -c CMD' per message, one at a time, content
                          on its stdin, $MSG_ID in its environment; with --ack
                          only a message whose CMD exits 0 is acknowledged
                          (a failure is logged and redelivered after the ack wait)
  -c, --count N           exit after N distinct messages printed
  -t, --timeout S         exit after S seconds without a message
  -v, --verbose           print '<id><TAB><content>' and a final count
  -w, --window N          GETs in flight at most                   [64]
      --host HOST         broker host  [$BROKER_HOST, $SERVER_IP or localhost]
      --port PORT         broker port  [$BROKER_PORT, $SERVER_PORT or 8080]
      --retries N         reconnection attempts before giving up   [no limit]
      --heartbeat S       heartbeat after S idle seconds           [20]
                          (keep it well under the broker's --idle-timeout)
      --token-file FILE   send AUTH with the token in FILE's first line first
                          (the broker's --auth-token-file)  [$BROKER_TOKEN_FILE]
  -h, --help              print this help
  -V, --version           print the version
";

fn parse() -> Result<Option<ConsumerOptions>, UsageError> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut common = CommonArgs::default();
    let mut options = ConsumerOptions {
        endpoint: Endpoint {
            host: String::new(),
            port: 0,
            token: None,
        },
        id: None,
        count: None,
        timeout: None,
        verbose: false,
        window: DEFAULT_WINDOW,
        retries: None,
        heartbeat: Default::default(),
        ack: false,
        exec: None,
    };
    while let Some(arg) = parser.next()? {
        match arg {
            Long(name) if CommonArgs::OPTIONS.contains(&name) => {
                let name = name.to_owned();
                common.take(&name, &mut parser)?;
            }
            Long("id") => {
                let id = string(&mut parser, "--id")?;
                if !valid_consumer_id(id.as_bytes()) {
                    return Err(UsageError(format!(
                        "invalid value '{id}' for --id: expected 1 to 64 of A-Z a-z 0-9 . _ -"
                    )));
                }
                options.id = Some(id);
            }
            Short('c') | Long("count") => {
                options.count = Some(number(&mut parser, "--count", 1, u64::MAX)?)
            }
            Short('t') | Long("timeout") => {
                options.timeout = Some(Duration::from_secs(number(
                    &mut parser,
                    "--timeout",
                    1,
                    31_536_000,
                )?))
            }
            Long("ack") => options.ack = true,
            Long("exec") => options.exec = Some(string(&mut parser, "--exec")?),
            Short('v') | Long("verbose") => options.verbose = true,
            Short('w') | Long("window") => {
                options.window = number(&mut parser, "--window", 1, 4096)?
            }
            Short('h') | Long("help") => {
                print!("{USAGE}");
                return Ok(None);
            }
            Short('V') | Long("version") => {
                println!("consumer {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
    if options.ack && options.id.is_none() {
        return Err(UsageError(
            "--ack needs --id: acknowledged progress is kept under a consumer id".into(),
        ));
    }
    options.endpoint =
        Endpoint::resolve(common.host, common.port, Some(("SERVER_IP", "SERVER_PORT")))?
            .with_token_file(common.token_file)?;
    options.retries = common.retries;
    options.heartbeat = common.heartbeat;
    Ok(Some(options))
}

fn main() -> ExitCode {
    match parse() {
        Ok(Some(options)) => ExitCode::from(consumer::run(&options) as u8),
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("consumer: {err}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
