//! `taskrunner`: the Task Runner daemon. All of it lives in the library ([`taskrunner::daemon`]).

fn main() {
    std::process::exit(taskrunner::daemon::main());
}
