//! `taskrunner-ctl`: talks to a running daemon over its control socket. See `taskrunner::control::ctl`.
fn main() {
    taskrunner::exit::abort_on_panic();
    std::process::exit(taskrunner::control::ctl::main());
}
