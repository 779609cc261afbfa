// raft's protobuf-2 messages are built field by field, as raft-rs's own examples do.
#![allow(clippy::field_reassign_with_default)]

//! A hand-made peer: speaks the peer protocol byte by byte (optionally over
//! TLS, optionally from another loopback address) so tests can send what a
//! hostile sender would, and measure a node's memory while they do.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kvraft::codec::{ByteStream, FrameReader};
use kvraft::proto::{PeerEnvelope, PeerRejection};
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{Entry, Message, MessageType};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// Credentials for a probe that speaks TLS.
pub struct ProbeTls<'a> {
    /// The CA the node's certificate must chain to.
    pub ca: &'a Path,
    /// The probe's client certificate and key, if it presents one.
    pub cert_and_key: Option<(&'a Path, &'a Path)>,
}

/// Opens a TCP connection to `addr` from `source_ip` (any loopback address).
pub async fn connect_from(source_ip: &str, addr: &str) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source_ip.parse().unwrap(), 0))?;
    socket.connect(addr.parse().unwrap()).await
}

/// Connects, with TLS if asked. A TLS failure is returned as an error.
pub async fn connect(addr: &str, source_ip: &str, tls: Option<ProbeTls<'_>>) -> std::io::Result<Box<dyn ByteStream>> {
    let tcp = connect_from(source_ip, addr).await?;
    let Some(tls) = tls else {
        return Ok(Box::new(tcp));
    };
    kvraft::tls::install_crypto_provider();
    let roots = kvraft::tls::files::load_roots(&kvraft::tls::files::Setting::new("test ca", tls.ca)).unwrap();
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match tls.cert_and_key {
        Some((cert, key)) => {
            let (chain, _) =
                kvraft::tls::files::load_chain(&kvraft::tls::files::Setting::new("test cert", cert)).unwrap();
            let key = kvraft::tls::files::load_key(&kvraft::tls::files::Setting::new("test key", key)).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = kvraft::tls::server_name_of(addr).unwrap();
    let stream = connector.connect(name, tcp).await?;
    Ok(Box::new(stream))
}

/// Envelopes and raft messages written by hand.
pub struct Probe {
    pub stream: Box<dyn ByteStream>,
    pub cluster_id: u64,
    pub from_id: u64,
}

impl Probe {
    /// Sends one frame with these bytes.
    pub async fn send_frame(&mut self, payload: Vec<u8>) -> std::io::Result<()> {
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend(payload);
        self.stream.write_all(&frame).await?;
        self.stream.flush().await
    }

    /// Sends the hello envelope.
    pub async fn hello(&mut self) -> std::io::Result<()> {
        let envelope = PeerEnvelope {
            cluster_id: self.cluster_id,
            from_id: self.from_id,
            from_peer_addr: String::new(),
            raft_message: Vec::new(),
            snapshot_stream: false,
            // Like a release before incarnations: not checked.
            from_incarnation: 0,
        };
        self.send_frame(envelope.encode_to_vec()).await
    }

    /// Sends a raft message inside an envelope.
    pub async fn send(&mut self, message: &Message) -> std::io::Result<()> {
        let envelope = PeerEnvelope {
            cluster_id: self.cluster_id,
            from_id: self.from_id,
            from_peer_addr: String::new(),
            raft_message: message.write_to_bytes().unwrap(),
            snapshot_stream: false,
            // Like a release before incarnations: not checked.
            from_incarnation: 0,
        };
        self.send_frame(envelope.encode_to_vec()).await
    }

    /// What the node says before closing: `Ok(Some(rejection))`, `Ok(None)`
    /// when it closes without a word, `Err` if it stays open for `wait`.
    pub async fn reply(&mut self, wait: Duration) -> Result<Option<PeerRejection>, String> {
        let (read, _write) = tokio::io::split(&mut self.stream);
        let mut frames = FrameReader::new(BufReader::new(read), 64 * 1024);
        match tokio::time::timeout(wait, frames.next_frame()).await {
            Ok(Ok(Some(frame))) => Ok(PeerRejection::decode(frame).ok()),
            Ok(_) => Ok(None),
            Err(_) => Err(format!("the connection stayed open for {wait:?}")),
        }
    }
}

/// A raft message of this type.
pub fn raft_message(kind: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(kind);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

/// An append carrying one normal entry whose data is `data`, committing it.
pub fn forged_append(from: u64, to: u64, term: u64, last_index: u64, data: Bytes) -> Message {
    let mut m = raft_message(MessageType::MsgAppend, from, to, term);
    m.index = last_index;
    m.log_term = term;
    m.commit = last_index + 1;
    let mut entry = Entry::default();
    entry.index = last_index + 1;
    entry.term = term;
    entry.data = data;
    m.entries = vec![entry].into();
    m
}

/// The encoded `Command` that sets `key` to `value`.
pub fn set_command(key: &str, value: &str) -> Bytes {
    use kvraft::proto::{command, Command, SetRequest};
    Command {
        op: Some(command::Op::Set(SetRequest {
            key: key.into(),
            value: value.into(),
            lease: 0,
        })),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

/// Resident and virtual memory of a process, in bytes.
pub fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmSize:"))
}

/// Sends raw bytes and leaves the connection open (for oversized headers).
pub async fn declare_frame(stream: &mut Box<dyn ByteStream>, declared: u32, body: &[u8]) -> std::io::Result<()> {
    stream.write_all(&declared.to_be_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await
}
