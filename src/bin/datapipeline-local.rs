//! `datapipeline-local`: see `taskrunner::local`.
fn main() -> std::process::ExitCode {
    taskrunner::local::cli::main()
}
