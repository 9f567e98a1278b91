fn main() {
    std::process::exit(taskrunner::control::ctl::main());
}
