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
            // The error and each cause, once: messages do not repeat their causes.
            eprintln!("reentry: {}", reentry::diag::chain(&e));
            e.exit().into()
        }
    }
}
