//! The `nodetune` binary: argument parsing and wiring only.
mod cli;
mod commands;

use tracing_subscriber::EnvFilter;

use cli::{Cli, Command};

fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour only for a person at a terminal; pod logs and files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// As a kubectl plugin (`kubectl-nodetune` on the PATH), kubectl runs this binary under that
/// name with the arguments after `kubectl nodetune`: the same commands, named as invoked.
fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let plugin = std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n == "kubectl-nodetune")
        })
        .unwrap_or(false);
    let mut command = Cli::command();
    if plugin {
        command = command.bin_name("kubectl nodetune");
    }
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn main() {
    let cli = parse();
    init_logging(cli.log_json);
    // A user error is one line (with its causes), never anyhow's Debug form: that one prints a
    // stack trace whenever RUST_BACKTRACE is set, which reads like a crash.
    let code = match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let runtime = if matches!(cli.command, Command::Agent(_)) {
        // Its memory while idle is what an agent costs a node: see `agent::memory`.
        nodetune::agent::memory::runtime()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    runtime.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let code = match cli.command {
        Command::Controller(args) => {
            nodetune::controller::run(*args).await?;
            0
        }
        Command::Agent(args) => {
            nodetune::agent::run(args).await?;
            0
        }
        Command::Tcpstat(args) => commands::tcpstat(args).await?,
        Command::Plan(args) => commands::plan(args)?,
        Command::Apply(args) => commands::apply(args)?,
        Command::Restore(args) => commands::restore(args)?,
        Command::Convert(args) => commands::convert(args)?,
        Command::Crd(args) => commands::crd(args)?,
        Command::Top(args) => {
            print!("{}", nodetune::top::run(&args).await?);
            0
        }
        Command::Rollout(args) => nodetune::rollout_cmd::run(&args).await?,
        Command::Uninstall(args) => {
            nodetune::uninstall::run(args).await?;
            0
        }
        Command::TestWorkload(args) => {
            // Blocking by design: it only holds sockets until killed.
            tokio::task::spawn_blocking(move || nodetune::podnet::workload::run(&args)).await??;
            0
        }
    };
    Ok(code)
}
