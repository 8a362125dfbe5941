//! Entry point of the `neurectomy-bench` binary; see the library docs.

/// mimalloc, as in the `neurectomy` binary (`api/src/main.rs`): the handler,
/// relay and projectors measured here allocate as they do there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    neurectomy_bench::main()
}
