//! `consumer`: receives messages from the broker and prints each one's
//! content on stdout. All the work is in `mensajeria::consumer`; this
//! parses the command line.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use mensajeria::cli::{UsageError, number, string};
use mensajeria::client::{CommonArgs, Endpoint};
use mensajeria::consumer::{self, ConsumerOptions, DEFAULT_WINDOW};
use mensajeria::forward::{self, ForwardOptions};
use mensajeria::nats;
use mensajeria::protocol::valid_consumer_id;

const USAGE: &str = "\
usage: consumer [--id ID [--ack]] [OPTIONS]
       consumer --id ID --to-nats nats://[USER:PASS@]HOST:PORT --subject SUBJECT
                [--stream NAME] [--window N] [--nats-token-file FILE] [OPTIONS]

Registers with the broker (resuming consumer ID's position with --id),
then prints each message's content on stdout, one per line. With
--to-nats it forwards them into a NATS JetStream stream instead, exactly
once: each is acknowledged to the broker only once JetStream stored it.

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
  -c, --count N           exit after N distinct messages printed (with --to-nats:
                          after N messages are in the stream and acknowledged)
  -t, --timeout S         exit after S seconds without a message
  -v, --verbose           print '<id><TAB><content>' and a final count
  -w, --window N          GETs in flight at most                   [64]
      --host HOST         broker host  [$BROKER_HOST, $SERVER_IP or localhost]
      --port PORT         broker port  [$BROKER_PORT, $SERVER_PORT or 8080]
      --retries N         reconnection attempts before giving up   [no limit]
      --heartbeat S       heartbeat after S idle seconds           [20]
                          (keep it well under the broker's --idle-timeout)
      --to-nats URL       forward into NATS JetStream at URL (ack mode, needs --id);
                          see docs/scale-out.md
      --subject SUBJECT   NATS subject to publish on (one per broker)
      --stream NAME       JetStream stream, created if missing with SUBJECT
                          [SUBJECT with . * > as _]
      --nats-token-file F NATS token (instead of USER:PASS in the URL)
                          (with --to-nats, --window is the publishes in flight [256])
      --token-file FILE   send AUTH with the token in FILE's first line first
                          (the broker's --auth-token-file)  [$BROKER_TOKEN_FILE]
  -h, --help              print this help
  -V, --version           print the version
";

/// What to run.
enum Mode {
    Print(ConsumerOptions),
    Forward(ForwardOptions),
}

/// The `--to-nats` options, gathered before they are checked together.
#[derive(Default)]
struct NatsArgs {
    url: Option<String>,
    subject: Option<String>,
    stream: Option<String>,
    token_file: Option<std::path::PathBuf>,
    window: Option<usize>,
}

impl NatsArgs {
    /// The long options (without `--`) that [`take`](Self::take) knows.
    const OPTIONS: [&'static str; 4] = ["to-nats", "subject", "stream", "nats-token-file"];

    fn take(&mut self, name: &str, parser: &mut lexopt::Parser) -> Result<(), UsageError> {
        let value = Some(string(parser, &format!("--{name}"))?);
        match name {
            "to-nats" => self.url = value,
            "subject" => self.subject = value,
            "stream" => self.stream = value,
            _ => self.token_file = value.map(Into::into),
        }
        Ok(())
    }

    /// The forwarder's options, if `--to-nats` was given.
    fn into_forward(self, options: &ConsumerOptions) -> Result<Option<ForwardOptions>, UsageError> {
        let Some(url) = self.url else {
            if self.subject.is_some() || self.stream.is_some() || self.token_file.is_some() {
                return Err(UsageError(
                    "--subject, --stream and --nats-token-file need --to-nats".into(),
                ));
            }
            return Ok(None);
        };
        let nats = nats::parse_url(&url)
            .map_err(|e| UsageError(format!("invalid value for --to-nats: {e}")))?;
        let id = options.id.clone().ok_or_else(|| {
            UsageError("--to-nats needs --id: the forwarder's progress is kept under it".into())
        })?;
        let subject = self
            .subject
            .ok_or_else(|| UsageError("--to-nats needs --subject".into()))?;
        if !nats::valid_subject(&subject, false) {
            return Err(UsageError(format!(
                "invalid value '{subject}' for --subject: dot-separated tokens, no spaces or wildcards"
            )));
        }
        let stream = self
            .stream
            .unwrap_or_else(|| nats::stream_name_for(&subject));
        if !nats::valid_stream_name(&stream) {
            return Err(UsageError(format!(
                "invalid value '{stream}' for --stream: no . * > / \\ or spaces"
            )));
        }
        if options.timeout.is_some() || options.verbose || options.exec.is_some() {
            return Err(UsageError(
                "--timeout, --verbose and --exec do not apply to --to-nats".into(),
            ));
        }
        Ok(Some(ForwardOptions {
            endpoint: options.endpoint.clone(),
            id,
            nats,
            token_file: self.token_file,
            subject,
            stream,
            window: self.window.unwrap_or(forward::DEFAULT_WINDOW),
            retries: options.retries,
            heartbeat: options.heartbeat,
            count: options.count,
        }))
    }
}

fn parse() -> Result<Option<Mode>, UsageError> {
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
    let mut to_nats = NatsArgs::default();
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
                options.window = number(&mut parser, "--window", 1, 4096)?;
                to_nats.window = Some(options.window);
            }
            Long(name) if NatsArgs::OPTIONS.contains(&name) => {
                let name = name.to_owned();
                to_nats.take(&name, &mut parser)?;
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
    finish(options, common, to_nats).map(Some)
}

/// Checks what only the whole command line can tell, and picks the mode.
fn finish(
    mut options: ConsumerOptions,
    common: CommonArgs,
    to_nats: NatsArgs,
) -> Result<Mode, UsageError> {
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
    Ok(match to_nats.into_forward(&options)? {
        Some(forward) => Mode::Forward(forward),
        None => Mode::Print(options),
    })
}

fn main() -> ExitCode {
    match parse() {
        Ok(Some(Mode::Print(options))) => ExitCode::from(consumer::run(&options) as u8),
        Ok(Some(Mode::Forward(options))) => ExitCode::from(forward::run(&options) as u8),
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("consumer: {err}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
