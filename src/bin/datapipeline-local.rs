//! `datapipeline-local`: see `taskrunner::local`.
fn main() -> std::process::ExitCode {
    taskrunner::exit::abort_on_panic();
    taskrunner::local::cli::main()
}
