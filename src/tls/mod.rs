//! TLS for both ports, with rustls and its `ring` provider (no cmake or C
//! toolchain beyond what `ring` needs, so static and Nix builds stay simple).
//!
//! - [`files`]: PEM loading and the checks made before a file is used.
//! - [`reload`]: configurations that follow their files (new connections get
//!   the new certificate; a bad file keeps the old one in use).
//! - [`server`]: the client port's and the peer port's configurations.
//! - [`client`]: what `kvraft::Client` uses, and plain-language explanations of
//!   handshake failures.
//! - [`generate`]: `kvraft certs init`: a CA, node and client certificates for
//!   a first try.
//!
//! A node's peer certificate names it: its common name is `kvraft-node-<id>`,
//! and a peer connection may only speak for the node its certificate names.

pub mod client;
pub mod files;
pub mod generate;
pub mod reload;
pub mod server;

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;

/// What went wrong with TLS settings or files.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    /// A file named by a setting can't be used.
    #[error("{key} {}: {problem}", path.display())]
    File {
        /// The setting (config key or flag).
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// Settings that don't fit together.
    #[error("{0}")]
    Config(String),
}

impl TlsError {
    fn file(setting: &files::Setting, problem: impl Into<String>) -> Self {
        TlsError::File {
            key: setting.key,
            path: setting.path.clone(),
            problem: problem.into(),
        }
    }

    /// rustls refused a certificate and key pair.
    fn mismatch(cert: &files::Setting, key_setting: &str, error: &rustls::Error) -> Self {
        let problem = match error {
            rustls::Error::InconsistentKeys(_) => {
                format!("the certificate does not belong to the private key in {key_setting}; give the key it was issued for")
            }
            other => format!("can't be used with the key in {key_setting} ({other})"),
        };
        TlsError::file(cert, problem)
    }
}

/// The crypto provider every TLS configuration here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs `ring` as the process-wide default provider. rustls panics at
/// first use if more than one provider is compiled in and none is installed;
/// installing it explicitly at start removes that trap. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The certificate the other end of a finished handshake presented, if any
/// (client and server connections alike).
pub fn leaf_certificate(connection: &rustls::CommonState) -> Option<&[u8]> {
    connection.peer_certificates()?.first().map(|leaf| leaf.as_ref())
}

/// The common name a node's peer certificate must carry.
pub fn node_common_name(node_id: u64) -> String {
    format!("kvraft-node-{node_id}")
}

/// The node a peer certificate's common name speaks for, if it names one.
pub fn node_id_of_common_name(common_name: &str) -> Option<u64> {
    common_name
        .strip_prefix("kvraft-node-")?
        .parse()
        .ok()
        .filter(|id| *id > 0)
}

/// The name to verify a server's certificate against: the host part of
/// `HOST:PORT` (an IP address or a DNS name).
pub fn server_name_of(addr: &str) -> Result<ServerName<'static>, String> {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?} is not a valid server name ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_round_trip_and_nothing_else_names_a_node() {
        assert_eq!(node_id_of_common_name(&node_common_name(7)), Some(7));
        assert_eq!(node_id_of_common_name("kvraft-node-0"), None);
        assert_eq!(node_id_of_common_name("kvraft-node-"), None);
        assert_eq!(node_id_of_common_name("kvraft-node-2x"), None);
        assert_eq!(node_id_of_common_name("admin"), None);
    }

    #[test]
    fn server_names_come_from_the_host_part() {
        assert!(matches!(
            server_name_of("10.0.0.1:7379").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name_of("[::1]:7379").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name_of("node1.example:7379").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name_of("bad host:1").is_err());
    }
}
