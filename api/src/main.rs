//! Entry point of the `neurectomy` binary; see the library docs.

fn main() -> std::process::ExitCode {
    neurectomy_api::main()
}
