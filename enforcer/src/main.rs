//! The `enforcer` binary: everything is in the library (`enforcer::cmd`).
fn main() -> std::process::ExitCode {
    enforcer::cmd::main()
}
