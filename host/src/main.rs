//! The `warden` binary: everything is in the library ([`warden::cli`]), so that tests
//! drive the same code.

fn main() -> std::process::ExitCode {
    warden::cli::main()
}
