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
    // A panic is a defect. Inside a step it becomes that step's journaled
    // failure, which says so; here it is one line with where it happened,
    // and a backtrace only when RUST_BACKTRACE asks for one.
    if std::env::var_os("RUST_BACKTRACE").is_none() {
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            tracing::error!("defect{at}: {}", panic_text(info.payload()));
        }));
    }
    match cli::run(cli) {
        Ok(exit) => exit.into(),
        Err(e) => {
            // The error and each cause, once: messages do not repeat their causes.
            eprintln!("reentry: {}", reentry::diag::chain(&e));
            e.exit().into()
        }
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}
