//! The node's TLS: the client port (server certificate, optionally requiring
//! client certificates from a trusted CA) and the peer port (mutual TLS
//! always: the same node certificate serves inbound connections and
//! authenticates outbound ones, and every peer must present one from the peer
//! CA whose common name is `kvraft-node-<id>`).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};

use super::files::{load_chain, load_key, load_roots, Setting};
use super::reload::Reloading;
use super::{node_common_name, provider, TlsError};

/// Files for the client port.
#[derive(Debug, Clone)]
pub struct ClientPortFiles {
    /// `cert_file`.
    pub cert: PathBuf,
    /// `key_file`.
    pub key: PathBuf,
    /// `trusted_ca_file`, required with `client_cert_auth`.
    pub trusted_ca: Option<PathBuf>,
    /// `client_cert_auth`: every client must present a certificate signed by
    /// the trusted CA.
    pub client_cert_auth: bool,
}

/// Files for the peer port.
#[derive(Debug, Clone)]
pub struct PeerFiles {
    /// `peer_cert_file`: names this node (`kvraft-node-<id>`).
    pub cert: PathBuf,
    /// `peer_key_file`.
    pub key: PathBuf,
    /// `peer_trusted_ca_file`.
    pub trusted_ca: PathBuf,
}

/// The client port's TLS, following its files.
pub struct ClientPortTls {
    config: Reloading<ServerConfig>,
}

impl ClientPortTls {
    /// Loads and checks the files; errors name the setting and the file.
    pub fn load(files: ClientPortFiles) -> Result<Self, TlsError> {
        let watched = [
            Some(files.cert.clone()),
            Some(files.key.clone()),
            files.trusted_ca.clone(),
        ]
        .into_iter()
        .flatten()
        .collect();
        let config = Reloading::new("client port", watched, move || build_client_port(&files))?;
        Ok(ClientPortTls { config })
    }

    /// The configuration for a new connection.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.config.current()
    }

    /// Re-reads the files now.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.config.reload()
    }
}

fn build_client_port(files: &ClientPortFiles) -> Result<ServerConfig, TlsError> {
    let cert = Setting::new("cert_file", &files.cert);
    let (chain, summary) = load_chain(&cert)?;
    if !summary.server_auth {
        return Err(TlsError::file(
            &cert,
            "the certificate is not for server authentication (its extended key usage lacks serverAuth)",
        ));
    }
    let key = load_key(&Setting::new("key_file", &files.key))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (&files.trusted_ca, files.client_cert_auth) {
        (Some(ca), true) => {
            let roots = load_roots(&Setting::new("trusted_ca_file", ca))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Config(format!("trusted_ca_file {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        (None, true) => {
            return Err(TlsError::Config(
                "client_cert_auth needs trusted_ca_file: the CA that signs client certificates".into(),
            ))
        }
        (_, false) => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::mismatch(&cert, "key_file", &e))
}

/// The two halves of peer TLS, built from the same files.
pub struct PeerConfigs {
    /// For inbound peer connections.
    pub server: Arc<ServerConfig>,
    /// For outbound peer connections.
    pub client: Arc<ClientConfig>,
}

/// The peer port's TLS, following its files.
pub struct PeerTls {
    configs: Reloading<PeerConfigs>,
}

impl PeerTls {
    /// Loads and checks the files for node `node_id`: the certificate must be
    /// valid for both server and client authentication and name this node.
    pub fn load(files: PeerFiles, node_id: u64) -> Result<Self, TlsError> {
        let watched = vec![files.cert.clone(), files.key.clone(), files.trusted_ca.clone()];
        let configs = Reloading::new("peer port", watched, move || build_peer(&files, node_id))?;
        Ok(PeerTls { configs })
    }

    /// The current configurations.
    pub fn configs(&self) -> Arc<PeerConfigs> {
        self.configs.current()
    }

    /// Re-reads the files now.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.configs.reload()
    }
}

fn build_peer(files: &PeerFiles, node_id: u64) -> Result<PeerConfigs, TlsError> {
    let cert = Setting::new("peer_cert_file", &files.cert);
    let (chain, summary) = load_chain(&cert)?;
    let expected = node_common_name(node_id);
    if summary.common_name.as_deref() != Some(expected.as_str()) {
        return Err(TlsError::file(
            &cert,
            format!(
                "the certificate's common name is {:?} but this is node {node_id}: peers accept a node only with the common name {expected:?}",
                summary.common_name.unwrap_or_default()
            ),
        ));
    }
    if !(summary.server_auth && summary.client_auth) {
        return Err(TlsError::file(
            &cert,
            "a peer certificate serves both ends of peer connections: its extended key usage needs serverAuth and clientAuth",
        ));
    }
    let key = load_key(&Setting::new("peer_key_file", &files.key))?;
    let roots = Arc::new(load_roots(&Setting::new("peer_trusted_ca_file", &files.trusted_ca))?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Config(format!("peer_trusted_ca_file {}: {e}", files.trusted_ca.display())))?;
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| TlsError::mismatch(&cert, "peer_key_file", &e))?;
    let client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::mismatch(&cert, "peer_key_file", &e))?;
    Ok(PeerConfigs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}
