//! Links the helper as a position-dependent executable.
//!
//! The helper's long-lived processes (refresh, port-forward, each relay: three or more per
//! namespace) all map the same binary. As a position-independent executable, the loader
//! rewrites about 230 KiB of its data at every start (`.data.rel.ro` and the GOT: vtables,
//! string tables, panic locations hold absolute addresses), which makes those pages private to
//! each process. At a fixed address the linker fills them in once, and every process shares
//! them with the page cache: about 0.2 MiB less per process (BENCHMARKS.md, `bench/idle`).
//! The libraries, heap, stacks and mappings are still placed at random; only the binary's own
//! image is not. Test and build-script binaries keep cargo's default.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg-bins=-no-pie");
}
