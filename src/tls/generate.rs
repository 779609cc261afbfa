//! `kvraft certs init`: a CA, one certificate per node (common name
//! `kvraft-node-<id>`, usable for both ports and both ends of peer
//! connections) and client certificates (common name = identity), for a first
//! try. Production should use its own PKI.
//!
//! Run again on the same directory, it reuses the CA and keeps every file
//! that exists, so a node added later gets its certificate the same way.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use super::node_common_name;

/// How long the CA is valid.
const CA_DAYS: i64 = 3650;
/// Names every node certificate also carries, so one machine can try a
/// cluster on loopback.
const LOCAL_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// A node and the host names / addresses others reach it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// The node id.
    pub id: u64,
    /// DNS names or IP addresses for its certificate.
    pub hosts: Vec<String>,
}

/// Parses `ID=HOST[+HOST...],...`.
pub fn parse_nodes(spec: &str) -> Result<Vec<NodeSpec>, String> {
    let mut nodes: Vec<NodeSpec> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, hosts) = part
            .split_once('=')
            .ok_or_else(|| format!("--nodes entry {part:?} is not ID=HOST"))?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| format!("--nodes entry {part:?}: the id must be a positive integer"))?;
        let hosts: Vec<String> = hosts
            .split('+')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect();
        if hosts.is_empty() {
            return Err(format!(
                "--nodes entry {part:?}: give the host name or address of the node"
            ));
        }
        if nodes.iter().any(|n| n.id == id) {
            return Err(format!("--nodes names node {id} twice"));
        }
        nodes.push(NodeSpec { id, hosts });
    }
    Ok(nodes)
}

/// What to write.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where the files go (created 0700 if missing).
    pub dir: PathBuf,
    /// Node certificates.
    pub nodes: Vec<NodeSpec>,
    /// Client certificates, by identity.
    pub clients: Vec<String>,
    /// Validity of node and client certificates.
    pub days: u32,
}

/// What happened to one file pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The certificate file.
    pub cert: PathBuf,
    /// The key file.
    pub key: PathBuf,
    /// Its common name.
    pub common_name: String,
    /// False if both files existed and were kept.
    pub written: bool,
}

/// Writes what the plan asks for, reusing and keeping what exists.
pub fn init(plan: &Plan) -> Result<Vec<Outcome>, String> {
    if plan.nodes.is_empty() && plan.clients.is_empty() {
        return Err("nothing to write: give --nodes ID=HOST,... and/or --clients NAME,...".into());
    }
    if !plan.dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&plan.dir)
            .map_err(|e| format!("cannot create {}: {e}", plan.dir.display()))?;
    }
    let mut outcomes = Vec::new();
    let (issuer, ca) = ca(&plan.dir)?;
    outcomes.push(ca);
    for node in &plan.nodes {
        let mut names = node.hosts.clone();
        names.extend(
            LOCAL_NAMES
                .iter()
                .map(|s| s.to_string())
                .filter(|n| !node.hosts.contains(n)),
        );
        let common_name = node_common_name(node.id);
        let purposes = [ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        outcomes.push(leaf(
            &plan.dir,
            &format!("node-{}", node.id),
            &common_name,
            names,
            &purposes,
            plan.days,
            &issuer,
        )?);
    }
    for client in &plan.clients {
        if client.is_empty() || client.contains(|c: char| c == '/' || c == ',' || c == '=' || c.is_whitespace()) {
            return Err(format!(
                "client name {client:?}: use letters, digits, '-', '_' or '.' (it becomes a file name and an identity)"
            ));
        }
        if client.starts_with("kvraft-node-") {
            return Err(format!(
                "client name {client:?}: names starting with kvraft-node- are for node certificates (use --nodes)"
            ));
        }
        let purposes = [ExtendedKeyUsagePurpose::ClientAuth];
        outcomes.push(leaf(
            &plan.dir,
            &format!("client-{client}"),
            client,
            Vec::new(),
            &purposes,
            plan.days,
            &issuer,
        )?);
    }
    Ok(outcomes)
}

/// Loads `ca.pem`/`ca.key` if both exist, or makes a new CA.
fn ca(dir: &Path) -> Result<(Issuer<'static, KeyPair>, Outcome), String> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let outcome = |written| Outcome {
        cert: cert.clone(),
        key: key.clone(),
        common_name: "kvraft CA".into(),
        written,
    };
    match (cert.exists(), key.exists()) {
        (true, true) => {
            let read = |p: &Path| fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
            let key_pair = KeyPair::from_pem(&read(&key)?)
                .map_err(|e| format!("{}: not a PEM private key ({e})", key.display()))?;
            let issuer = Issuer::from_ca_cert_pem(&read(&cert)?, key_pair)
                .map_err(|e| format!("{}: not a PEM CA certificate ({e})", cert.display()))?;
            Ok((issuer, outcome(false)))
        }
        (false, false) => {
            let mut params = CertificateParams::default();
            params.distinguished_name = name("kvraft CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - Duration::hours(1);
            params.not_after = now + Duration::days(CA_DAYS);
            let key_pair = KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
            let certificate = params
                .self_signed(&key_pair)
                .map_err(|e| format!("cannot make the CA certificate: {e}"))?;
            write_new(&key, key_pair.serialize_pem().as_bytes(), 0o600)?;
            write_new(&cert, certificate.pem().as_bytes(), 0o644)?;
            Ok((Issuer::new(params, key_pair), outcome(true)))
        }
        _ => Err(format!(
            "{} has only one of ca.pem and ca.key: restore the other, or move both away to start a new CA",
            dir.display()
        )),
    }
}

fn leaf(
    dir: &Path,
    stem: &str,
    common_name: &str,
    names: Vec<String>,
    purposes: &[ExtendedKeyUsagePurpose],
    days: u32,
    issuer: &Issuer<'static, KeyPair>,
) -> Result<Outcome, String> {
    let (cert, key) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
    let outcome = |written| Outcome {
        cert: cert.clone(),
        key: key.clone(),
        common_name: common_name.to_string(),
        written,
    };
    match (cert.exists(), key.exists()) {
        (true, true) => return Ok(outcome(false)),
        (false, false) => {}
        _ => {
            return Err(format!(
                "only one of {} and {} exists: remove it to have both written anew",
                cert.display(),
                key.display()
            ))
        }
    }
    let mut params = CertificateParams::new(names).map_err(|e| format!("{stem}: bad host name ({e})"))?;
    params.distinguished_name = name(common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = purposes.to_vec();
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
    let key_pair = KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
    let certificate = params
        .signed_by(&key_pair, issuer)
        .map_err(|e| format!("cannot sign {stem}: {e}"))?;
    write_new(&key, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert, certificate.pem().as_bytes(), 0o644)?;
    Ok(outcome(true))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// Writes a file that must not exist yet, with `mode` from the start (a key
/// is never readable by others, not even for a moment).
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::files::{load_chain, load_roots, summarize, Setting};

    #[test]
    fn parses_node_specs_and_names_bad_ones() {
        let nodes = parse_nodes("1=10.0.0.1,2=node2+10.0.0.2").unwrap();
        assert_eq!(nodes[1].hosts, vec!["node2".to_string(), "10.0.0.2".to_string()]);
        assert!(parse_nodes("1=a,1=b").unwrap_err().contains("twice"));
        assert!(parse_nodes("0=a").unwrap_err().contains("positive"));
        assert!(parse_nodes("1=").unwrap_err().contains("host"));
        assert!(parse_nodes("1").unwrap_err().contains("ID=HOST"));
    }

    #[test]
    fn a_client_may_not_take_a_nodes_name() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Plan {
            dir: dir.path().join("certs"),
            nodes: vec![],
            clients: vec!["kvraft-node-1".into()],
            days: 1,
        };
        assert!(init(&plan).unwrap_err().contains("are for node certificates"));
    }

    #[test]
    fn writes_a_ca_nodes_and_clients_and_keeps_them_on_a_second_run() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Plan {
            dir: dir.path().join("certs"),
            nodes: parse_nodes("1=10.0.0.1,2=node2.example").unwrap(),
            clients: vec!["admin".into(), "reader".into()],
            days: 30,
        };
        let first = init(&plan).unwrap();
        assert_eq!(first.len(), 5);
        assert!(first.iter().all(|o| o.written));
        let (_, node1) = load_chain(&Setting::new("t", plan.dir.join("node-1.pem"))).unwrap();
        assert_eq!(node1.common_name.as_deref(), Some("kvraft-node-1"));
        assert!(node1.server_auth && node1.client_auth);
        let (_, admin) = load_chain(&Setting::new("t", plan.dir.join("client-admin.pem"))).unwrap();
        assert_eq!(admin.common_name.as_deref(), Some("admin"));
        assert!(admin.client_auth && !admin.server_auth);
        assert_eq!(
            load_roots(&Setting::new("t", plan.dir.join("ca.pem"))).unwrap().len(),
            1
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(plan.dir.join("node-1.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A second run adds node 3 with the same CA and keeps the rest.
        let ca_before = fs::read(plan.dir.join("ca.pem")).unwrap();
        let node1_before = fs::read(plan.dir.join("node-1.pem")).unwrap();
        let again = Plan {
            nodes: parse_nodes("1=10.0.0.1,3=10.0.0.3").unwrap(),
            clients: vec![],
            ..plan.clone()
        };
        let second = init(&again).unwrap();
        let written: Vec<_> = second
            .iter()
            .filter(|o| o.written)
            .map(|o| o.common_name.clone())
            .collect();
        assert_eq!(written, vec!["kvraft-node-3".to_string()]);
        assert_eq!(fs::read(plan.dir.join("ca.pem")).unwrap(), ca_before);
        assert_eq!(fs::read(plan.dir.join("node-1.pem")).unwrap(), node1_before);
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_file(plan.dir.join("node-3.pem")).unwrap();
        assert_eq!(summarize(&der).unwrap().common_name.as_deref(), Some("kvraft-node-3"));
    }
}
