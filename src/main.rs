use std::error::Error as _;
use std::process::ExitCode;

use clap::Parser;
use reentry::cli::{self, Cli};
use reentry::exit::Exit;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Ok
            }
            .into();
        }
    };
    cli::init_logging(&cli.global);
    match cli::run(cli) {
        Ok(exit) => exit.into(),
        Err(e) => {
            // One line per cause, each said once.
            let mut message = e.to_string();
            let mut source = e.source();
            while let Some(cause) = source {
                let text = cause.to_string();
                if !message.contains(&text) {
                    message.push_str(": ");
                    message.push_str(&text);
                }
                source = cause.source();
            }
            eprintln!("reentry: {message}");
            e.exit().into()
        }
    }
}
