//! Entry point of the `neurectomy` binary; see the library docs.

/// mimalloc rather than glibc's allocator: a GraphQL request allocates and
/// frees many small objects across worker threads, where glibc's arenas
/// spent a fifth of the API's CPU (`malloc`, `_int_free`,
/// `malloc_consolidate` in a profile of `agent(id)` under load).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    neurectomy_api::main()
}
