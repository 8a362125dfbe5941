//! The `neurectomy` binary, built inside the end-to-end test package so its
//! tests can spawn and kill the real process (`CARGO_BIN_EXE_neurectomy-e2e`).

fn main() -> std::process::ExitCode {
    api::main()
}
