fn main() {
    std::process::exit(wg_namespace::cli::main());
}
