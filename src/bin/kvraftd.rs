//! `kvraftd`: one kvraft node. With no flags it runs a single-node cluster on
//! 127.0.0.1 (clients 7379, peers 7380) with its data in ./kvraft-data.

fn main() {
    std::process::exit(kvraft::daemon::main());
}
