//! Generates the man pages and shell completions that the packages ship, from the binaries'
//! clap commands. Kept out of the shipped binaries: `cargo run --release --example gen-docs -- DIR`
//! (run by `make man completions`, and by the .deb and .rpm builds).
//!
//! Writes
//! - `DIR/man/taskrunner.8`, `DIR/man/taskrunner-ctl.1`, `DIR/man/datapipeline-local.1`
//! - `DIR/completions/{bash,zsh,fish}/` one file per binary, named as each shell looks them up.
//!
//! The commands come from [`commands`]: one function per binary, calling
//! `taskrunner::config::cli::command()` (daemon), `taskrunner::control::ctl::command()`
//! (`taskrunner-ctl`) and `taskrunner::local::cli::Cli::command()` (`datapipeline-local`).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Command;
use clap_complete::Shell;

mod commands {
    //! One function per shipped binary: its real `clap::Command`.
    use clap::{Command, CommandFactory};

    /// `taskrunner(8)`: the daemon's own command (`taskrunner::config::cli::command`), with the
    /// service facts a man page reader needs.
    pub fn taskrunner() -> Command {
        taskrunner::config::cli::command().after_long_help(
            "Under systemd it runs as taskrunner@WORKER_GROUP.service and uses $STATE_DIRECTORY, \
             $LOGS_DIRECTORY, $RUNTIME_DIRECTORY and $CREDENTIALS_DIRECTORY/credentials.json. \
             Settings: /etc/taskrunner/config.toml. Control socket: \
             /run/taskrunner/INSTANCE/control.sock (see taskrunner-ctl(1)).\n\n\
             Exit status: 0 normal (drained after SIGTERM, or an exit-after condition met), \
             1 run-time failure, 78 configuration, credentials or command-line error.",
        )
    }

    /// `datapipeline-local(1)`: `taskrunner::local::cli::Cli`.
    pub fn datapipeline_local() -> Command {
        taskrunner::local::cli::Cli::command()
    }

    /// `taskrunner-ctl(1)`: `taskrunner::control::ctl::command`.
    pub fn taskrunner_ctl() -> Command {
        taskrunner::control::ctl::command()
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
