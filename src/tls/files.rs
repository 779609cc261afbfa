//! Loading certificates, keys and CA bundles from PEM files, and checking
//! them before they are used: a file that is missing, holds no PEM block of the
//! right kind, or holds a certificate that has expired (or is not valid yet)
//! is refused with an error naming the setting, the file and what to do.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::TlsError;

/// A setting that names a file, for error messages: the config key (or CLI
/// flag) and the path.
#[derive(Debug, Clone)]
pub struct Setting {
    /// `cert_file`, `--cacert`, ...
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
}

impl Setting {
    /// `key` set to `path`.
    pub fn new(key: &'static str, path: impl Into<PathBuf>) -> Self {
        Setting { key, path: path.into() }
    }

    fn error(&self, problem: impl Into<String>) -> TlsError {
        TlsError::File {
            key: self.key,
            path: self.path.clone(),
            problem: problem.into(),
        }
    }

    fn read(&self) -> Result<Vec<u8>, TlsError> {
        std::fs::read(&self.path).map_err(|e| self.error(format!("cannot read it ({e})")))
    }
}

/// What a certificate says about itself, for checks and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The subject's common name, if it has one.
    pub common_name: Option<String>,
    /// Seconds since the epoch after which it is no longer valid.
    pub not_after_unix: i64,
    /// Extended key usages: (server auth, client auth); both true when the
    /// certificate has no EKU extension (any use).
    pub server_auth: bool,
    /// See `server_auth`.
    pub client_auth: bool,
}

/// Parses a DER certificate's subject CN, validity and key usages.
pub fn summarize(der: &[u8]) -> Result<CertSummary, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate ({e})"))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let (server_auth, client_auth) = match cert.extended_key_usage() {
        Ok(Some(eku)) => (
            eku.value.any || eku.value.server_auth,
            eku.value.any || eku.value.client_auth,
        ),
        Ok(None) => (true, true),
        Err(e) => return Err(format!("unreadable extended key usage ({e})")),
    };
    let validity = cert.validity();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if validity.not_before.timestamp() > now {
        return Err(format!(
            "not valid until {} (is this machine's clock right?)",
            validity.not_before
        ));
    }
    if validity.not_after.timestamp() < now {
        return Err(format!(
            "expired on {}; issue a new one (`kvraft certs init` can, for a first try)",
            validity.not_after
        ));
    }
    Ok(CertSummary {
        common_name,
        not_after_unix: validity.not_after.timestamp(),
        server_auth,
        client_auth,
    })
}

/// The subject CN of a DER certificate a handshake has already verified, if
/// it has exactly one (CAs differ on which of several would count).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut names = cert.subject().iter_common_name();
    let name = names.next()?.as_str().ok()?.to_string();
    names.next().is_none().then_some(name)
}

/// The node a verified peer certificate speaks for: exactly one common name
/// `kvraft-node-<id>`, and usable for both server and client authentication,
/// as node certificates are (a client-only certificate that happens to carry
/// a node's name does not speak for it).
pub fn node_identity(der: &[u8]) -> Result<u64, String> {
    let name = common_name(der).ok_or("a certificate without exactly one common name")?;
    let id = super::node_id_of_common_name(&name)
        .ok_or_else(|| format!("a certificate with common name {name:?}, not kvraft-node-<id>"))?;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let usable = match cert.extended_key_usage() {
        Ok(Some(eku)) => eku.value.any || (eku.value.server_auth && eku.value.client_auth),
        Ok(None) => true,
        Err(_) => false,
    };
    if !usable {
        return Err(format!(
            "a certificate for {name:?} that is not valid for both server and client authentication (a client certificate?)"
        ));
    }
    Ok(id)
}

/// A certificate chain: the leaf first, then intermediates. The leaf must be
/// valid now.
pub fn load_chain(setting: &Setting) -> Result<(Vec<CertificateDer<'static>>, CertSummary), TlsError> {
    let pem = setting.read()?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setting.error(format!("not a PEM certificate file ({e})")))?;
    let Some(leaf) = chain.first() else {
        return Err(setting.error("holds no -----BEGIN CERTIFICATE----- block; give a PEM certificate"));
    };
    let summary = summarize(leaf).map_err(|problem| setting.error(format!("the certificate is {problem}")))?;
    Ok((chain, summary))
}

/// A private key (PKCS#8, PKCS#1 or SEC1 PEM).
pub fn load_key(setting: &Setting) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = setting.read()?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        setting.error(format!(
            "holds no PEM private key ({e}); give the key that belongs to the certificate"
        ))
    })
}

/// The trusted CA certificates in a bundle; every one must be valid now.
pub fn load_roots(setting: &Setting) -> Result<rustls::RootCertStore, TlsError> {
    let pem = setting.read()?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setting.error(format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(setting.error("holds no -----BEGIN CERTIFICATE----- block; give the CA certificate in PEM"));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        summarize(&cert).map_err(|problem| setting.error(format!("a CA certificate is {problem}")))?;
        roots
            .add(cert)
            .map_err(|e| setting.error(format!("a CA certificate can't be used as a trust anchor ({e})")))?;
    }
    Ok(roots)
}

/// What identifies a file's version: a changed file gets a new stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// The stamp of `path`, or `None` if it can't be read.
pub fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}
