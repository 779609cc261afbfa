//! `kvraft certs init`: writes a CA, node and client certificates for a
//! first try with TLS, and says how to use them.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use super::output::Printer;
use crate::error::Error;
use crate::tls::generate::{init, parse_nodes, Plan};

/// `kvraft certs ...`.
#[derive(Subcommand)]
pub enum CertsCommand {
    /// Write ca.pem, node-ID.pem and client-NAME.pem (with their .key files)
    /// into DIR. An existing CA is reused and existing files are kept, so
    /// running it again with a new node adds that node's certificate.
    Init(InitArgs),
}

/// Arguments of `kvraft certs init`.
#[derive(Args)]
pub struct InitArgs {
    /// Directory for the files (created 0700 if missing).
    dir: PathBuf,
    /// Nodes, ID=HOST[+HOST...],...: each HOST (a DNS name or an IP address)
    /// goes into the node's certificate, with localhost and 127.0.0.1.
    #[arg(long, default_value = "")]
    nodes: String,
    /// Client identities to make certificates for (their common names).
    #[arg(long, value_delimiter = ',', default_value = "admin,reader")]
    clients: Vec<String>,
    /// Validity of node and client certificates, in days (the CA gets ten years).
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
}

/// Runs `kvraft certs ...`.
pub fn run(command: CertsCommand, printer: &Printer) -> Result<i32, Error> {
    let CertsCommand::Init(args) = command;
    let nodes = parse_nodes(&args.nodes).map_err(Error::InvalidArgument)?;
    let clients: Vec<String> = args
        .clients
        .iter()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    let plan = Plan {
        dir: args.dir.clone(),
        nodes,
        clients,
        days: args.days,
    };
    let outcomes = init(&plan).map_err(Error::InvalidArgument)?;
    let files: Vec<_> = outcomes
        .iter()
        .map(|o| {
            json!({"common_name": o.common_name, "cert": o.cert, "key": o.key,
                   "written": o.written})
        })
        .collect();
    let text = || {
        let mut lines: Vec<String> = outcomes
            .iter()
            .map(|o| {
                format!(
                    "{} {} ({}) and {}",
                    if o.written { "wrote" } else { "kept " },
                    o.cert.display(),
                    o.common_name,
                    o.key.display()
                )
            })
            .collect();
        let dir = args.dir.display();
        lines.push(String::new());
        lines.push(format!(
            "Each node N: --cert-file {dir}/node-N.pem --key-file {dir}/node-N.key --trusted-ca-file {dir}/ca.pem --client-cert-auth \\"
        ));
        lines.push(format!(
            "             --peer-cert-file {dir}/node-N.pem --peer-key-file {dir}/node-N.key --peer-trusted-ca-file {dir}/ca.pem"
        ));
        lines.push(format!(
            "Clients:     kvraft --cacert {dir}/ca.pem --cert {dir}/client-admin.pem --key {dir}/client-admin.key ..."
        ));
        lines.push("These are for a first try: production should issue certificates from its own PKI.".into());
        lines.join("\n")
    };
    printer.certs(json!({"dir": args.dir, "files": files}), text());
    Ok(0)
}
