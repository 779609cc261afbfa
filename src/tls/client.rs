//! TLS for `kvraft::Client` and the CLI (`--cacert`, `--cert`, `--key`,
//! `--server-name`, etcdctl's names), and explanations of handshake failures
//! that say which common mistake it was and what to change.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError, ClientConfig};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::files::{load_chain, load_key, load_roots, Setting};
use super::{provider, server_name_of, TlsError};

/// TLS settings of a client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsOptions {
    /// `--cacert`: the CA that signed the servers' certificates. Setting it
    /// turns TLS on.
    pub ca_file: Option<PathBuf>,
    /// `--cert`: this client's certificate (its common name is its identity).
    pub cert_file: Option<PathBuf>,
    /// `--key`: the key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// `--server-name`: the name to verify every server's certificate against,
    /// instead of the host part of its endpoint.
    pub server_name: Option<String>,
}

impl ClientTlsOptions {
    /// True if any TLS setting is given.
    pub fn is_enabled(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some() || self.server_name.is_some()
    }
}

/// A ready client-side TLS configuration.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl ClientTls {
    /// Loads the files; `None` when TLS is off.
    pub fn new(options: &ClientTlsOptions) -> Result<Option<ClientTls>, TlsError> {
        if !options.is_enabled() {
            return Ok(None);
        }
        let Some(ca) = &options.ca_file else {
            return Err(TlsError::Config(
                "TLS settings need --cacert: the CA certificate that signed the servers' certificates".into(),
            ));
        };
        let roots = load_roots(&Setting::new("--cacert", ca))?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&options.cert_file, &options.key_file) {
            (Some(cert), Some(key)) => {
                let cert = Setting::new("--cert", cert);
                let (chain, _) = load_chain(&cert)?;
                let key = load_key(&Setting::new("--key", key))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::mismatch(&cert, "--key", &e))?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => {
                return Err(TlsError::Config(
                    "--cert needs --key: the certificate's private key".into(),
                ))
            }
            (None, Some(_)) => return Err(TlsError::Config("--key needs --cert: the client certificate".into())),
        };
        let server_name = match &options.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|e| TlsError::Config(format!("--server-name {name:?}: not a valid name ({e})")))?,
            ),
            None => None,
        };
        Ok(Some(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        }))
    }

    /// The name `endpoint`'s certificate is verified against.
    pub fn name_for(&self, endpoint: &str) -> Result<ServerName<'static>, String> {
        match &self.server_name {
            Some(name) => Ok(name.clone()),
            None => server_name_of(endpoint),
        }
    }

    /// Runs the handshake on a connected stream. A failure is explained, and
    /// says whether it is a settings problem (retrying can't help).
    pub async fn handshake(&self, endpoint: &str, tcp: TcpStream) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let name = self.name_for(endpoint).map_err(|e| HandshakeError {
            settings: true,
            message: format!("endpoint {endpoint}: {e}; pass --server-name NAME"),
        })?;
        let shown = name.to_str().into_owned();
        self.connector
            .connect(name, tcp)
            .await
            .map_err(|e| explain_client_error(&e, endpoint, &shown))
    }
}

/// A failed client handshake, explained.
#[derive(Debug, Clone)]
pub struct HandshakeError {
    /// True when the settings (files, names, server configuration) must
    /// change; false for a network failure worth retrying elsewhere.
    pub settings: bool,
    /// What happened and what to do.
    pub message: String,
}

/// The rustls error inside an I/O error, if there is one.
pub fn rustls_error(error: &std::io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

/// What went wrong in a TLS handshake (or in the alert read right after it,
/// which is how TLS 1.3 reports a refused client certificate), sorted by what
/// the user has to change. Clients and the peer transport word it each in
/// their own terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeProblem {
    /// The other end answered in plaintext.
    NotTls,
    /// The other end closed the connection mid-handshake.
    Closed,
    /// Its certificate is not signed by the CA we trust.
    UnknownIssuer,
    /// Its certificate does not name the host we dialled (with the names it
    /// does carry, when rustls says).
    WrongName(Vec<String>),
    /// Its certificate has expired.
    Expired,
    /// Its certificate is not valid yet.
    NotYetValid,
    /// It wants a certificate from us.
    CertificateRequired,
    /// It refused our certificate as not from a CA it trusts.
    RefusedOurCertificate,
    /// It refused our certificate as expired.
    OurCertificateExpired,
    /// Some other TLS failure.
    Other(String),
    /// Not TLS at all: the network failed (worth retrying elsewhere).
    Network(String),
}

/// Sorts a failed handshake's error into a [`HandshakeProblem`].
pub fn classify(error: &std::io::Error) -> HandshakeProblem {
    use HandshakeProblem as P;
    let Some(tls) = rustls_error(error) else {
        return match error.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => P::Closed,
            _ => P::Network(error.to_string()),
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => P::UnknownIssuer,
            CertificateError::NotValidForName => P::WrongName(Vec::new()),
            CertificateError::NotValidForNameContext { presented, .. } => P::WrongName(presented.clone()),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => P::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => P::NotYetValid,
            other => P::Other(format!("its certificate was refused: {other:?}")),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => P::NotTls,
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired | AlertDescription::HandshakeFailure) => {
            P::CertificateRequired
        }
        rustls::Error::AlertReceived(
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::DecryptError
            | AlertDescription::AccessDenied,
        ) => P::RefusedOurCertificate,
        rustls::Error::AlertReceived(AlertDescription::CertificateExpired) => P::OurCertificateExpired,
        other => P::Other(format!("TLS failed: {other}")),
    }
}

/// Explains a client-side TLS failure in the CLI's terms.
pub fn explain_client_error(error: &std::io::Error, endpoint: &str, name: &str) -> HandshakeError {
    use HandshakeProblem as P;
    let message = match classify(error) {
        P::Network(why) => {
            return HandshakeError {
                settings: false,
                message: format!("{endpoint}: {why}"),
            }
        }
        P::Closed => format!(
            "{endpoint} closed the connection during the TLS handshake: its client port may not speak TLS, or it refused this client's certificate"
        ),
        P::UnknownIssuer => format!(
            "{endpoint}'s certificate is not signed by the CA in --cacert: give the CA that issued the servers' certificates"
        ),
        P::WrongName(presented) if presented.is_empty() => format!(
            "{endpoint}'s certificate is not valid for the name {name}: connect by a name or address in its certificate, or pass --server-name"
        ),
        P::WrongName(presented) => format!(
            "{endpoint}'s certificate is not valid for the name {name} (it names {}): connect by one of those, or pass --server-name NAME",
            presented.join(", ")
        ),
        P::Expired => format!("{endpoint}'s certificate has expired: the server needs a new one"),
        P::NotYetValid => format!(
            "{endpoint}'s certificate is not valid yet: check the clocks of this machine and the server"
        ),
        P::NotTls => format!(
            "{endpoint} did not answer in TLS: its client port is plaintext; drop --cacert/--cert/--key, or turn TLS on at the server (cert_file, key_file)"
        ),
        P::CertificateRequired => {
            format!("{endpoint} requires a client certificate signed by a CA it trusts: pass --cert and --key")
        }
        P::RefusedOurCertificate => format!(
            "{endpoint} refused this client's certificate (--cert): it is not signed by a CA the server trusts (trusted_ca_file)"
        ),
        P::OurCertificateExpired => {
            format!("{endpoint} refused this client's certificate (--cert): it has expired")
        }
        P::Other(what) => format!("{endpoint}: {what}"),
    };
    HandshakeError {
        settings: true,
        message,
    }
}
