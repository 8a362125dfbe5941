//! Link options of the `neurectomy` binary in release builds for Linux
//! (glibc), which keep what the process maps small:
//!
//! - `-z pack-relative-relocs`: the ~65,000 relative relocations of a
//!   position-independent binary packed (RELR) instead of 1.5 MiB of
//!   `.rela.dyn` that the loader reads, and keeps resident, at every start.
//!   Needs glibc ≥ 2.36 where it runs (Debian 12, Ubuntu 22.10, RHEL 10).
//! - `link/neurectomy.order` (x86_64, where rustc links with its own lld):
//!   the functions that run at start-up and on the request path, laid out
//!   together, so the pages of code the process touches are mostly code it
//!   runs. Without it they are spread over nearly every 64 KiB of the 14
//!   MiB of code, and the kernel maps each such block whole (fault-around).
//!   `scripts/link-order.sh` makes the file from a run under callgrind; a
//!   stale file costs only locality (names it lacks are ignored).
//!
//! `NEURECTOMY_LINK_DEFAULTS=1` turns both off (another linker, an older
//! glibc).

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link/neurectomy.order");
    println!("cargo:rerun-if-env-changed=NEURECTOMY_LINK_DEFAULTS");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let target = var("TARGET");
    if var("PROFILE") != "release"
        || !target.ends_with("-linux-gnu")
        || !var("NEURECTOMY_LINK_DEFAULTS").is_empty()
    {
        return;
    }
    println!("cargo:rustc-link-arg-bin=neurectomy=-Wl,-z,pack-relative-relocs");
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join("link/neurectomy.order");
    if target == "x86_64-unknown-linux-gnu" && order.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=neurectomy=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=neurectomy=-Wl,--no-warn-symbol-ordering");
    }
}
