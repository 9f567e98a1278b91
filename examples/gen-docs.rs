//! Generates the man pages and shell completions that the packages ship, from the binaries'
//! clap commands. Kept out of the shipped binaries: `cargo run --release --example gen-docs -- DIR`
//! (run by `make man completions`, and by the .deb and .rpm builds).
//!
//! Writes
//! - `DIR/man/taskrunner.8`, `DIR/man/taskrunner-ctl.1`, `DIR/man/datapipeline-local.1`
//! - `DIR/completions/{bash,zsh,fish}/` one file per binary, named as each shell looks them up.
//!
//! The commands come from [`commands`]: one function per binary. Until the modules that own the
//! real command lines are merged (`taskrunner::config::cli::command()` for the daemon, the
//! `taskrunner-ctl` and `datapipeline-local` commands from `control` and `local`), the functions
//! there describe the documented contract, so that the packages always carry a man page.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Command;
use clap_complete::Shell;

mod commands {
    //! One function per shipped binary. Each is the binary's real `clap::Command` once its owner's
    //! module provides one; until then the documented contract.
    use clap::{Arg, ArgAction, Command};

    /// `taskrunner(8)`.
    pub fn taskrunner() -> Command {
        Command::new("taskrunner")
            .version(env!("CARGO_PKG_VERSION"))
            .about("AWS Data Pipeline Task Runner: polls a worker group and runs its tasks")
            .long_about(
                "Polls AWS Data Pipeline (or datapipeline-local) for the tasks of one worker group, \
                 runs them, and reports their results. Accepts the command line of the Java \
                 TaskRunner-1.0.jar, plus /etc/taskrunner/config.toml. Under systemd it is started \
                 by taskrunner@WORKER_GROUP.service; it uses $STATE_DIRECTORY, $LOGS_DIRECTORY, \
                 $RUNTIME_DIRECTORY and $CREDENTIALS_DIRECTORY/credentials.json when set.\n\n\
                 Exit status: 0 normal (drained after SIGTERM, or an exit-after condition met), \
                 1 run-time failure, 2 usage error, 78 configuration or credentials error.",
            )
            .arg(opt(
                "workerGroup",
                "NAME",
                "Worker group whose tasks this runner takes",
            ))
            .arg(opt(
                "config",
                "FILE",
                "Credentials JSON file (access-id, private-key)",
            ))
            .arg(opt(
                "settings",
                "FILE",
                "Settings file [default: /etc/taskrunner/config.toml]",
            ))
            .arg(opt(
                "instance",
                "NAME",
                "Instance name (control socket, directories)",
            ))
            .arg(opt("region", "REGION", "AWS region, e.g. us-east-1"))
            .arg(opt("endpoint", "URL", "Data Pipeline endpoint"))
            .arg(opt("logUri", "S3_URI", "Where task logs are uploaded"))
            .arg(opt(
                "taskrunnerId",
                "ID",
                "Task Runner id; generated and kept when absent",
            ))
            .arg(opt("tasks", "N", "How many tasks run at once [default: 2]"))
            .arg(opt("output", "DIR", "Directory for logs"))
            .arg(opt("accessId", "KEY_ID", "AWS access key id (prefer --config)"))
            .arg(opt("secretKey", "SECRET", "AWS secret key (prefer --config)"))
    }

    /// `taskrunner-ctl(1)`.
    pub fn taskrunner_ctl() -> Command {
        let instance = || Arg::new("INSTANCE").help("Instance name; the only one when omitted");
        Command::new("taskrunner-ctl")
            .version(env!("CARGO_PKG_VERSION"))
            .about("Inspect and control running taskrunner instances over their control sockets")
            .long_about(
                "Talks to a running taskrunner over its control socket \
                 (/run/taskrunner/INSTANCE/control.sock). Exit status 3 when no daemon answers.",
            )
            .subcommand_required(true)
            .subcommand(
                Command::new("status")
                    .about("State, running tasks, counters, backoff, disk use")
                    .arg(instance())
                    .arg(flag("json", "Machine-readable output")),
            )
            .subcommand(Command::new("list").about("Every instance on this host and its state"))
            .subcommand(
                Command::new("drain")
                    .about("Stop taking new tasks; running ones finish")
                    .arg(instance())
                    .arg(flag("wait", "Wait until the running tasks finished")),
            )
            .subcommand(
                Command::new("resume")
                    .about("Take tasks again after drain")
                    .arg(instance()),
            )
            .subcommand(Command::new("validate").about("Check the configuration and credentials"))
    }

    /// `datapipeline-local(1)`.
    pub fn datapipeline_local() -> Command {
        Command::new("datapipeline-local")
            .version(env!("CARGO_PKG_VERSION"))
            .about("An offline endpoint that speaks the AWS Data Pipeline API (JSON 1.1, SigV4)")
            .subcommand_required(true)
            .subcommand(
                Command::new("serve")
                    .about("Serve the API; prints `listening on URL` as its first line")
                    .arg(opt("listen", "ADDR", "Address to bind [default: 127.0.0.1:8990]"))
                    .arg(opt("state", "DIR", "Where pipelines and runs are kept"))
                    .arg(
                        opt(
                            "credentials",
                            "FILE",
                            "Accepted key pair (credentials.json); repeatable",
                        )
                        .action(ArgAction::Append),
                    ),
            )
            .subcommand(
                Command::new("submit")
                    .about("Create, define and activate a pipeline from a definition file")
                    .arg(Arg::new("FILE").required(true)),
            )
            .subcommand(
                Command::new("runs")
                    .about("The runs of a pipeline and their states")
                    .arg(Arg::new("PIPELINE_ID").required(true)),
            )
    }

    fn opt(name: &'static str, value: &'static str, help: &'static str) -> Arg {
        Arg::new(name)
            .long(name)
            .value_name(value)
            .help(help)
            .action(ArgAction::Set)
    }

    fn flag(name: &'static str, help: &'static str) -> Arg {
        Arg::new(name).long(name).help(help).action(ArgAction::SetTrue)
    }
}

fn main() -> Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: gen-docs OUTPUT_DIR")?;
    let binaries: [(Command, &str); 3] = [
        (commands::taskrunner(), "8"),
        (commands::taskrunner_ctl(), "1"),
        (commands::datapipeline_local(), "1"),
    ];
    for (cmd, section) in binaries {
        write_man(&dir.join("man"), cmd.clone(), section)?;
        write_completions(&dir.join("completions"), cmd)?;
    }
    Ok(())
}

fn write_man(dir: &Path, cmd: Command, section: &str) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.{section}", cmd.get_name()));
    let mut out = Vec::new();
    // A fixed date keeps the pages (and so the packages) reproducible.
    clap_mangen::Man::new(cmd)
        .section(section)
        .date("2026-11")
        .manual("taskrunner")
        .source(concat!("taskrunner ", env!("CARGO_PKG_VERSION")))
        .render(&mut out)?;
    fs::write(&path, out).with_context(|| format!("writing {}", path.display()))
}

fn write_completions(dir: &Path, mut cmd: Command) -> Result<()> {
    let name = cmd.get_name().to_string();
    for (shell, file) in [
        (Shell::Bash, name.clone()),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let sub = dir.join(shell.to_string());
        fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
        let path = sub.join(file);
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, &name, &mut out);
        fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
