//! `kvraft`: the command line client. See `kvraft --help`.

fn main() {
    std::process::exit(kvraft::cli::main());
}
