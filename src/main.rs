//! The `lithe` command line: one subcommand per job, each in its own module under `cli/`.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(err) = cli::run(args) {
        // One line per cause, so a malformed file gets a short, complete message.
        let mut msg = format!("error: {err}");
        for cause in err.chain().skip(1) {
            let c = cause.to_string();
            if !msg.contains(&c) {
                msg.push_str(": ");
                msg.push_str(&c);
            }
        }
        eprintln!("{}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}
