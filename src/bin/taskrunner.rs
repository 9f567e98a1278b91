//! `taskrunner`: the Task Runner daemon. All of it lives in the library ([`taskrunner::daemon`]).

fn main() {
    taskrunner::exit::abort_on_panic();
    std::process::exit(taskrunner::daemon::main());
}
