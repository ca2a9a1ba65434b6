//! TLS for devices (wss://): rustls' unbuffered (sans-IO) connections,
//! wrapped so that the shard (and the load client's fleet) hook it in at
//! two points: ciphertext in before [`c1m_proto::conn::Conn::receive`]
//! ([`Session::feed`]), plaintext out before the driver's send
//! ([`Session::seal`]).
//!
//! Why the unbuffered API and not `rustls::ServerConnection`: the buffered
//! connection keeps a 4 KiB deframer buffer for as long as it lives
//! (rustls 0.23.46 `DeframerVecBuffer::prepare_read` resizes it to 4096
//! bytes on every read and never frees it), which alone is over the budget
//! of an idle wss connection. Here an idle session holds no record buffer:
//! ciphertext is read (and decrypted) in the driver's buffer, only a record
//! that straddles two reads is copied into `carry`, and output goes into
//! the caller's per-shard buffer.
//!
//! kTLS would move the record work into the kernel after the handshake; the
//! machines this was built on have no kTLS (CONFIG_TLS unset), so nothing
//! here depends on it.

use c1m_proto::carry::Carry;
use std::path::Path;
use std::sync::Arc;

use rustls::client::{Resumption, UnbufferedClientConnection};
use rustls::crypto::ring as provider;
use rustls::server::{NoServerSessionStorage, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
    WriteTraffic,
};
use rustls::{CipherSuite, ClientConfig, HandshakeKind, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The only application protocol spoken: WebSocket upgrades over HTTP/1.1.
pub const ALPN: &[u8] = b"http/1.1";

/// The first byte of a TLS record carrying a handshake (a ClientHello).
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// ring, with the cipher suites that hash with SHA-256 first. The handshake
/// is mostly X25519 and the key schedule's HMACs; with SHA-384 (ring's
/// first choice, AES-256-GCM) SHA-512 blocks were 12-17% of the server's
/// CPU during a handshake storm (perf, 2026-12-03), and SHA-256 has
/// instructions of its own on current x86 and ARM cores. AES-128-GCM is
/// what a device's 128-bit security needs.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = provider::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        matches!(
            s.suite(),
            CipherSuite::TLS13_AES_256_GCM_SHA384
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        )
    });
    Arc::new(p)
}

/// Reads the certificate chain and private key in PEM files into a server
/// config: TLS 1.3 and 1.2, ALPN `http/1.1`, stateless resumption tickets
/// (TLS 1.3 and 1.2) sealed by `tickets` (one key for every process of the
/// server: see [`crate::tls_tickets`]), no session cache shared between
/// shards. Built once per process and shared by every shard. The error is
/// one sentence.
pub fn server_config(
    cert: &Path,
    key: &Path,
    tickets: Arc<crate::tls_tickets::Ticketer>,
) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs(cert, "--tls-cert")?;
    let key_pem =
        std::fs::read(key).map_err(|e| format!("cannot read --tls-key {}: {e}", key.display()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        format!(
            "--tls-key {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        )
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("cannot enable TLS 1.3 and 1.2: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
            format!(
                "--tls-key {} does not fit --tls-cert {} ({e})",
                key.display(),
                cert.display()
            )
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Our order of cipher suites, not the device's (see `provider`).
    config.ignore_client_order = true;
    // Stateless tickets, for TLS 1.2 too; no stateful cache (a lock shared
    // by the shards, and memory per session).
    config.ticketer = tickets;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    // One ticket per TLS 1.3 handshake: a device reconnects with it and
    // gets the next one then; each ticket costs an encryption and ~200 B.
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}

fn read_certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{flag} {} is not valid PEM ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// How a fleet's devices keep their TLS session tickets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// None: every handshake is a full one.
    Off,
    /// As devices do: a device's first connection has no ticket; each
    /// connection's ticket goes into a pool (one per device, at most this
    /// many), and a device's reconnect resumes with the oldest there.
    PerDevice(usize),
    /// Every connection, a first one too, resumes with the newest ticket
    /// any device of the process got: not what devices do, but it makes a
    /// ramp of resumed handshakes to measure (bench/tls.sh).
    Shared(usize),
}

/// A fleet's client configs (one pair per process): both trust the CA
/// certificates in `ca` (PEM) and offer TLS 1.3 and 1.2 and ALPN
/// `http/1.1`; `first` is for a device's first connection, `again` for its
/// reconnects, sharing one [`TicketPool`] as `resume` says. The error is
/// one sentence.
pub fn fleet_configs(ca: &Path, resume: Resume) -> Result<FleetConfigs, String> {
    let base = client_config(ca)?;
    let with = |pool: Option<TicketPool>| {
        let mut c = ClientConfig::clone(&base);
        if let Some(p) = pool {
            c.resumption = Resumption::store(Arc::new(p));
        }
        Arc::new(c)
    };
    let (first, again) = match resume {
        Resume::Off => (None, None),
        Resume::PerDevice(n) => {
            let pool = TicketPool::new(n);
            (Some(pool.view(Take::Never)), Some(pool.view(Take::Oldest)))
        }
        Resume::Shared(n) => {
            let pool = TicketPool::new(n);
            (Some(pool.view(Take::Newest)), Some(pool.view(Take::Newest)))
        }
    };
    Ok(FleetConfigs {
        first: with(first),
        again: with(again),
    })
}

/// See [`fleet_configs`].
#[derive(Debug, Clone)]
pub struct FleetConfigs {
    pub first: Arc<ClientConfig>,
    pub again: Arc<ClientConfig>,
}

/// A client config that trusts the CA certificates in `ca` (PEM), offers
/// TLS 1.3 and 1.2 and ALPN `http/1.1`, and keeps no session tickets
/// ([`fleet_configs`] gives it a pool). The error is one sentence.
fn client_config(ca: &Path) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca, "--tls-ca")? {
        roots
            .add(cert)
            .map_err(|e| format!("--tls-ca {}: a certificate is unusable ({e})", ca.display()))?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("cannot enable TLS 1.3 and 1.2: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// Which ticket a view of a [`TicketPool`] hands to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// None (a device's first connection): it only adds the one it gets.
    Never,
    Oldest,
    Newest,
}

/// The TLS 1.3 tickets of a fleet of devices, as the devices would hold
/// them: one each. rustls' own store keeps 8 tickets per server name
/// (newest first), which a fleet of thousands of devices behind one name
/// exhausts at once, so that its reconnects did full handshakes that real
/// devices (each with the ticket of its last connection) would not; and
/// its newest-first order resumed a reconnect after a hot upgrade with a
/// ticket the new process had just issued, where a real device holds one
/// from the old process. Here the tickets of a process's connections go
/// into one pool (at most `devices`, the oldest dropped first) and a
/// reconnect takes the oldest: a fleet that reconnects once each uses the
/// ticket each device got last. TLS 1.2 sessions are kept as rustls keeps
/// them, and not offered by a [`Take::Never`] view. A ticket costs the
/// client about 840 bytes (the server's certificate chain comes with it:
/// bench/client-tickets.sh).
#[derive(Debug, Clone)]
pub struct TicketPool {
    shared: Arc<PoolShared>,
    take: Take,
}

#[derive(Debug)]
struct PoolShared {
    tls13: std::sync::Mutex<std::collections::VecDeque<rustls::client::Tls13ClientSessionValue>>,
    devices: usize,
    rest: rustls::client::ClientSessionMemoryCache,
}

impl TicketPool {
    /// An empty pool for `devices` tickets; its views hand them out.
    pub fn new(devices: usize) -> TicketPool {
        TicketPool {
            shared: Arc::new(PoolShared {
                tls13: Default::default(),
                devices: devices.max(1),
                rest: rustls::client::ClientSessionMemoryCache::new(16),
            }),
            take: Take::Oldest,
        }
    }

    /// The same pool, handing tickets out as `take` says.
    pub fn view(&self, take: Take) -> TicketPool {
        TicketPool {
            shared: self.shared.clone(),
            take,
        }
    }

    fn tickets(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::VecDeque<rustls::client::Tls13ClientSessionValue>,
    > {
        // A panic while holding it left whole tickets behind.
        self.shared.tls13.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl rustls::client::ClientSessionStore for TicketPool {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        self.shared.rest.set_kx_hint(name, group)
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.shared.rest.kx_hint(name)
    }

    fn set_tls12_session(
        &self,
        name: ServerName<'static>,
        v: rustls::client::Tls12ClientSessionValue,
    ) {
        self.shared.rest.set_tls12_session(name, v)
    }

    fn tls12_session(
        &self,
        name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        match self.take {
            Take::Never => None,
            _ => self.shared.rest.tls12_session(name),
        }
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.shared.rest.remove_tls12_session(name)
    }

    // One server name per fleet (the client dials one name): the pool is
    // not keyed by it.
    fn insert_tls13_ticket(
        &self,
        _: ServerName<'static>,
        v: rustls::client::Tls13ClientSessionValue,
    ) {
        let mut t = self.tickets();
        if t.len() >= self.shared.devices {
            t.pop_front();
        }
        t.push_back(v);
    }

    fn take_tls13_ticket(
        &self,
        _: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        match self.take {
            Take::Never => None,
            Take::Oldest => self.tickets().pop_front(),
            Take::Newest => self.tickets().pop_back(),
        }
    }
}

/// The name a client checks the server's certificate against (and sends as SNI).
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string())
        .map_err(|_| format!("--tls-server-name {name:?} is not a DNS name or IP address"))
}

/// Why a session failed.
#[derive(Debug)]
pub enum TlsError {
    /// The peer's first bytes are not a TLS handshake record (e.g. a
    /// plaintext HTTP request on a TLS port).
    NotTls,
    /// rustls refused the peer (bad record, alert received, certificate
    /// rejected, no common version or cipher suite...).
    Tls(rustls::Error),
    /// The record layer cannot encrypt any more (key exhausted).
    Exhausted,
    /// The session failed before: it takes no more bytes.
    Failed,
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::NotTls => f.write_str("not a TLS handshake (plaintext on a TLS port?)"),
            TlsError::Tls(e) => write!(f, "{e}"),
            TlsError::Exhausted => f.write_str("TLS record keys exhausted"),
            TlsError::Failed => f.write_str("the TLS session failed earlier"),
        }
    }
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> TlsError {
        TlsError::Tls(e)
    }
}

/// What [`Session::feed`] found besides plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fed {
    /// The peer sent close_notify: no more data comes.
    pub peer_closed: bool,
}

/// A rustls unbuffered connection of either side.
pub trait Endpoint {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &rustls::CommonState;
}

impl Endpoint for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &rustls::CommonState {
        self
    }
}

impl Endpoint for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &rustls::CommonState {
        self
    }
}

/// One connection's TLS state. Idle, it holds rustls' connection state
/// (keys, handshake state) and no buffer: `carry` and `early` are empty
/// and unallocated.
pub struct Session<E> {
    conn: E,
    /// Ciphertext of a record that straddles two reads.
    carry: Carry,
    /// Plaintext sealed before the handshake allowed application data (the
    /// client's upgrade request): sent as soon as it does.
    early: Vec<u8>,
    /// Bytes were fed already (the first ones are checked for a handshake).
    fed: bool,
    /// An error ended the session: rustls' state may point into bytes that
    /// are gone, so it is never driven again.
    failed: bool,
}

/// The server side of a device's TLS connection.
pub type ServerSession = Session<UnbufferedServerConnection>;
/// The client side (the load client's devices).
pub type ClientSession = Session<UnbufferedClientConnection>;

impl ServerSession {
    pub fn server(config: &Arc<ServerConfig>) -> Result<ServerSession, TlsError> {
        Ok(Session::new(UnbufferedServerConnection::new(
            config.clone(),
        )?))
    }
}

impl ClientSession {
    /// A client session; its ClientHello is appended to `out`.
    pub fn client(
        config: &Arc<ClientConfig>,
        name: ServerName<'static>,
        out: &mut Vec<u8>,
    ) -> Result<ClientSession, TlsError> {
        let mut s = Session::new(UnbufferedClientConnection::new(config.clone(), name)?);
        s.fed = true;
        s.run_empty(out)?;
        Ok(s)
    }
}

impl<E: Endpoint> Session<E> {
    fn new(conn: E) -> Session<E> {
        Session {
            conn,
            carry: Carry::default(),
            early: Vec::new(),
            fed: false,
            failed: false,
        }
    }

    /// The handshake is complete.
    pub fn is_established(&self) -> bool {
        !self.conn.common().is_handshaking()
    }

    /// Full or resumed, once the handshake is complete.
    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        self.conn.common().handshake_kind()
    }

    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.common().protocol_version()
    }

    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.common().alpn_protocol()
    }

    /// Bytes held between calls (a record straddling reads, early plaintext).
    pub fn buffered(&self) -> usize {
        self.carry.len() + self.early.len()
    }

    /// Processes ciphertext just read (decrypted in place where rustls
    /// can): application data is appended to `plain`, handshake records
    /// and alerts to send to `out` (which the caller sends before anything
    /// it seals after this). On an error, `out` may hold an alert for the
    /// peer; the connection is over.
    pub fn feed(
        &mut self,
        incoming: &mut [u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<Fed, TlsError> {
        if self.failed {
            return Err(TlsError::Failed);
        }
        let r = self.feed_inner(incoming, plain, out);
        self.failed = r.is_err();
        r
    }

    fn feed_inner(
        &mut self,
        incoming: &mut [u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<Fed, TlsError> {
        if !self.fed {
            self.fed = true;
            if incoming.first().is_some_and(|&b| b != HANDSHAKE_RECORD) {
                return Err(TlsError::NotTls);
            }
        }
        let mut fed = Fed::default();
        let mut carry = std::mem::take(&mut self.carry);
        let ran = carry.consume(incoming, |buf| self.run(buf, plain, out, &mut fed));
        self.carry = carry;
        ran.map(|()| fed)
    }

    /// Encrypts `plaintext` into records appended to `out`; before the
    /// handshake allows application data, keeps it and sends it then.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        if plaintext.is_empty() {
            return Ok(());
        }
        if self.failed {
            return Err(TlsError::Failed);
        }
        let r = self.seal_inner(plaintext, out);
        self.failed = r.is_err();
        r
    }

    fn seal_inner(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        if !self.early.is_empty() {
            self.early.extend_from_slice(plaintext);
            return Ok(());
        }
        // Bounded: each pass either encrypts or moves the state on.
        for _ in 0..16 {
            let UnbufferedStatus { discard, state } = self.conn.process(self.carry.as_mut_slice());
            debug_assert_eq!(discard, 0, "a partial record was processed twice");
            match state {
                Ok(ConnectionState::WriteTraffic(mut w)) => return encrypt(&mut w, plaintext, out),
                Ok(ConnectionState::EncodeTlsData(mut e)) => encode(&mut e, out)?,
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                Ok(ConnectionState::BlockedHandshake) => {
                    self.early.extend_from_slice(plaintext);
                    return Ok(());
                }
                Ok(_) => return Err(TlsError::Tls(rustls::Error::HandshakeNotComplete)),
                Err(e) => return Err(e.into()),
            }
        }
        Err(TlsError::Tls(rustls::Error::HandshakeNotComplete))
    }

    /// Runs the state machine with no new bytes (to emit the ClientHello).
    fn run_empty(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        let mut none = Vec::new();
        let mut fed = Fed::default();
        self.run(&mut [], &mut none, out, &mut fed)?;
        Ok(())
    }

    /// Processes the records in `buf`; returns how many bytes of it were
    /// used (the rest is a partial record).
    fn run(
        &mut self,
        buf: &mut [u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
        fed: &mut Fed,
    ) -> Result<usize, TlsError> {
        let mut pos = 0;
        loop {
            let UnbufferedStatus { mut discard, state } = self.conn.process(&mut buf[pos..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    let at = (pos + discard).min(buf.len());
                    let rest = &mut buf[at..];
                    self.alerts(rest, out);
                    return Err(e.into());
                }
            };
            let mut done = false;
            match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec?;
                        discard += rec.discard;
                        plain.extend_from_slice(rec.payload);
                    }
                }
                // Early data is off (the server's max_early_data_size is 0).
                ConnectionState::ReadEarlyData(_) => {
                    return Err(TlsError::Tls(rustls::Error::General(
                        "unexpected early data".into(),
                    )))
                }
                ConnectionState::EncodeTlsData(mut e) => encode(&mut e, out)?,
                ConnectionState::TransmitTlsData(mut t) => {
                    if !self.early.is_empty() {
                        if let Some(mut w) = t.may_encrypt_app_data() {
                            encrypt(&mut w, &self.early, out)?;
                            self.early = Vec::new();
                        }
                    }
                    t.done();
                }
                ConnectionState::WriteTraffic(mut w) => {
                    if !self.early.is_empty() {
                        encrypt(&mut w, &self.early, out)?;
                        self.early = Vec::new();
                    }
                    done = true;
                }
                ConnectionState::BlockedHandshake => done = true,
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    fed.peer_closed = true;
                    done = true;
                }
                _ => done = true,
            }
            pos += discard;
            if done {
                return Ok(pos);
            }
        }
    }

    /// After an error: the fatal alert rustls queued, if any, into `out`.
    /// Only while rustls has output queued (then it hands that out before
    /// looking at `rest`, the unprocessed bytes, again).
    fn alerts(&mut self, rest: &mut [u8], out: &mut Vec<u8>) {
        for _ in 0..4 {
            if !self.conn.common().wants_write() {
                return;
            }
            match self.conn.process(rest).state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    if encode(&mut e, out).is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                _ => return,
            }
        }
    }
}

/// Appends a handshake record rustls has ready to `out`.
fn encode<D>(
    e: &mut rustls::unbuffered::EncodeTlsData<'_, D>,
    out: &mut Vec<u8>,
) -> Result<(), TlsError> {
    let start = out.len();
    let need = match e.encode(&mut []) {
        Ok(_) => return Ok(()),
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            required_size
        }
        Err(_) => return Ok(()), // already encoded
    };
    out.resize(start + need, 0);
    match e.encode(&mut out[start..]) {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(_) => {
            out.truncate(start);
            Err(TlsError::Tls(rustls::Error::General(
                "cannot encode a TLS record".into(),
            )))
        }
    }
}

/// Appends `plaintext` as application-data records to `out`.
fn encrypt<D>(
    w: &mut WriteTraffic<'_, D>,
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), TlsError> {
    let start = out.len();
    // Header, explicit nonce (TLS 1.2), content type (1.3) and tag, per 16 KiB record.
    let mut need = plaintext.len() + (plaintext.len() / 16384 + 1) * 40;
    for _ in 0..2 {
        out.resize(start + need, 0);
        match w.encrypt(plaintext, &mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                need = required_size;
            }
            Err(_) => {
                out.truncate(start);
                return Err(TlsError::Exhausted);
            }
        }
    }
    out.truncate(start);
    Err(TlsError::Exhausted)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A CA and a certificate for "localhost" it signed, as PEM files in a
    /// new directory: (ca.pem, cert.pem, key.pem). Made at test time.
    pub(crate) fn make_certs(tag: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!("c1m-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let paths = (
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem"),
        );
        std::fs::write(&paths.0, ca.pem()).unwrap();
        std::fs::write(&paths.1, cert.pem()).unwrap();
        std::fs::write(&paths.2, key.serialize_pem()).unwrap();
        Certs { dir, paths }
    }

    pub(crate) struct Certs {
        dir: PathBuf,
        paths: (PathBuf, PathBuf, PathBuf),
    }

    impl Certs {
        /// (ca.pem, cert.pem, key.pem)
        pub(crate) fn paths(&self) -> (PathBuf, PathBuf, PathBuf) {
            self.paths.clone()
        }
    }

    impl Drop for Certs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn client_only(
        ca: &Path,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for c in read_certs(ca, "ca").unwrap() {
            roots.add(c).unwrap();
        }
        let mut c = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![ALPN.to_vec()];
        Arc::new(c)
    }

    /// Moves bytes both ways until neither side has anything to say; what
    /// each side received in plaintext, or the first error (client, server).
    fn pump(
        c: &mut ClientSession,
        s: &mut ServerSession,
        mut to_server: Vec<u8>,
    ) -> (Vec<u8>, Vec<u8>, Result<(), String>) {
        let (mut c_plain, mut s_plain) = (Vec::new(), Vec::new());
        let mut to_client = Vec::new();
        for _ in 0..20 {
            if to_server.is_empty() && to_client.is_empty() {
                break;
            }
            if !to_server.is_empty() {
                let mut bytes = std::mem::take(&mut to_server);
                if let Err(e) = s.feed(&mut bytes, &mut s_plain, &mut to_client) {
                    return (c_plain, s_plain, Err(format!("server: {e}")));
                }
            }
            if !to_client.is_empty() {
                let mut bytes = std::mem::take(&mut to_client);
                if let Err(e) = c.feed(&mut bytes, &mut c_plain, &mut to_server) {
                    // The client's alert still reaches the server.
                    let mut none = Vec::new();
                    let mut alert = std::mem::take(&mut to_server);
                    let srv = s.feed(&mut alert, &mut none, &mut Vec::new());
                    return (
                        c_plain,
                        s_plain,
                        Err(format!("client: {e}; server: {srv:?}")),
                    );
                }
            }
        }
        (c_plain, s_plain, Ok(()))
    }

    fn connect(
        server: &Arc<ServerConfig>,
        client: &Arc<ClientConfig>,
    ) -> (ClientSession, ServerSession, Vec<u8>) {
        let mut hello = Vec::new();
        let mut c =
            ClientSession::client(client, server_name("localhost").unwrap(), &mut hello).unwrap();
        let mut s = ServerSession::server(server).unwrap();
        // Sealed before the handshake allows it: sent once it does.
        c.seal(b"GET /ws", &mut hello).unwrap();
        let (_, got, r) = pump(&mut c, &mut s, hello);
        r.unwrap();
        (c, s, got)
    }

    #[test]
    fn both_versions_negotiate_with_alpn_and_carry_data_both_ways() {
        let certs_versions = make_certs("versions");
        let (ca, cert, key) = certs_versions.paths();
        let server =
            server_config(&cert, &key, crate::tls_tickets::Ticketer::random().unwrap()).unwrap();
        for (version, want) in [
            (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
            (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        ] {
            let client = client_only(&ca, version);
            let (mut c, mut s, got) = connect(&server, &client);
            assert_eq!(got, b"GET /ws", "{want:?}");
            assert_eq!(s.protocol_version(), Some(want));
            assert_eq!(c.protocol_version(), Some(want));
            assert_eq!(s.alpn_protocol(), Some(ALPN));
            let suite = s.conn.common().negotiated_cipher_suite().map(|c| c.suite());
            assert!(
                matches!(
                    suite,
                    Some(CipherSuite::TLS13_AES_128_GCM_SHA256)
                        | Some(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
                ),
                "{suite:?}"
            );
            assert!(s.is_established() && c.is_established());
            let mut out = Vec::new();
            s.seal(b"HTTP/1.1 101", &mut out).unwrap();
            // Split mid-record: the server keeps the partial record only.
            let (mut c_plain, mut none) = (Vec::new(), Vec::new());
            let (a, b) = out.split_at_mut(7);
            c.feed(a, &mut c_plain, &mut none).unwrap();
            assert!(c_plain.is_empty() && c.buffered() == 7);
            c.feed(b, &mut c_plain, &mut none).unwrap();
            assert_eq!(c_plain, b"HTTP/1.1 101");
            assert_eq!(
                (c.buffered(), s.buffered()),
                (0, 0),
                "idle sessions hold no bytes"
            );
            assert!(c.carry.is_empty() && s.carry.is_empty(), "nor buffers");
        }
    }

    /// A connection of `client` to `server` resumes on both sides, and
    /// carries the request.
    fn resumes(
        server: &Arc<ServerConfig>,
        client: &Arc<ClientConfig>,
        version: &rustls::SupportedProtocolVersion,
    ) {
        let (c, s, got) = connect(server, client);
        assert_eq!(got, b"GET /ws");
        let kinds = (c.handshake_kind(), s.handshake_kind());
        let resumed = Some(HandshakeKind::Resumed);
        assert_eq!(kinds, (resumed, resumed), "{version:?}");
    }

    #[test]
    fn a_reconnect_resumes_with_a_ticket_on_both_versions() {
        let certs_resume = make_certs("resume");
        let (ca, cert, key) = certs_resume.paths();
        let server =
            server_config(&cert, &key, crate::tls_tickets::Ticketer::random().unwrap()).unwrap();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let client = client_only(&ca, version);
            let (c, s, _) = connect(&server, &client);
            assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
            assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
            resumes(&server, &client, version);
        }
        // The fleet's configs (resumption on) resume too; off, never.
        for (resume, want) in [
            (Resume::Shared(16), HandshakeKind::Resumed),
            (Resume::Off, HandshakeKind::Full),
        ] {
            let client = fleet_configs(&ca, resume).unwrap().first;
            connect(&server, &client);
            let (c, _, _) = connect(&server, &client);
            assert_eq!(c.handshake_kind(), Some(want));
        }
    }

    /// `n` devices of the fleet `client` begin their handshakes with
    /// `server` at once (each takes its ticket, if any, as it says hello),
    /// then finish them: the kinds.
    fn at_once(
        server: &Arc<ServerConfig>,
        client: &Arc<ClientConfig>,
        n: usize,
    ) -> Vec<HandshakeKind> {
        let hellos: Vec<_> = (0..n)
            .map(|_| {
                let mut hello = Vec::new();
                let c =
                    ClientSession::client(client, server_name("localhost").unwrap(), &mut hello)
                        .unwrap();
                (c, hello)
            })
            .collect();
        hellos
            .into_iter()
            .map(|(mut c, hello)| {
                let mut s = ServerSession::server(server).unwrap();
                pump(&mut c, &mut s, hello).2.unwrap();
                c.handshake_kind().unwrap()
            })
            .collect()
    }

    #[test]
    fn a_fleet_keeps_a_ticket_per_device_and_uses_the_oldest_first() {
        use crate::tls_tickets::Ticketer;
        use HandshakeKind::{Full, Resumed};
        let certs = make_certs("pool");
        let (ca, cert, key) = certs.paths();
        let old = server_config(&cert, &key, Ticketer::random().unwrap()).unwrap();
        // A new process with keys of its own (a build before the shared
        // keys): the tickets of the old one open nothing there.
        let new = server_config(&cert, &key, Ticketer::random().unwrap()).unwrap();
        // TLS 1.3 only: its tickets are the pool's.
        let tls13 = |devices| {
            let mut c = (*client_only(&ca, &rustls::version::TLS13)).clone();
            c.resumption = Resumption::store(Arc::new(TicketPool::new(devices)));
            Arc::new(c)
        };
        // Three devices connect, then reconnect one by one to a new
        // process: each offers the ticket of its own last connection (the
        // old process's) first; a newest-first store (rustls' own) would
        // offer the new process's at the second reconnect.
        let fleet = tls13(8);
        assert_eq!(at_once(&old, &fleet, 3), [Full, Full, Full]);
        assert_eq!(at_once(&new, &fleet, 1), [Full]);
        assert_eq!(at_once(&new, &fleet, 1), [Full]);
        assert_eq!(at_once(&new, &fleet, 1), [Full]);
        assert_eq!(at_once(&new, &fleet, 1), [Resumed]);
        // At most one ticket per device: the oldest go first.
        let two = tls13(2);
        assert_eq!(at_once(&old, &two, 3), [Full, Full, Full]);
        assert_eq!(at_once(&old, &two, 3), [Resumed, Resumed, Full]);
        // Twelve devices reconnecting at once all resume (rustls' store
        // keeps 8 per server name).
        let many = tls13(12);
        at_once(&old, &many, 12);
        assert_eq!(at_once(&old, &many, 12), [Resumed; 12]);
        // A fleet's pair: a device's first connection has no ticket (its
        // ticket goes into the pool), its reconnect has one.
        let f = fleet_configs(&ca, Resume::PerDevice(4)).unwrap();
        assert_eq!(at_once(&old, &f.first, 2), [Full, Full]);
        assert_eq!(at_once(&old, &f.first, 1), [Full]);
        assert_eq!(at_once(&old, &f.again, 3), [Resumed; 3]);
        // Shared: a first connection resumes with another's ticket.
        let f = fleet_configs(&ca, Resume::Shared(4)).unwrap();
        assert_eq!(at_once(&old, &f.first, 1), [Full]);
        assert_eq!(at_once(&old, &f.first, 1), [Resumed]);
        let f = fleet_configs(&ca, Resume::Off).unwrap();
        at_once(&old, &f.first, 1);
        assert_eq!(at_once(&old, &f.again, 1), [Full]);
    }

    #[test]
    fn a_reconnect_to_another_process_resumes_when_they_share_the_ticket_keys() {
        use crate::tls_tickets::{TicketKeys, Ticketer};
        let certs = make_certs("shared-tickets");
        let (ca, cert, key) = certs.paths();
        // Two processes of one server: the second given the first's state,
        // as a --procs worker is given its parent's.
        let first = Ticketer::random().unwrap();
        let second = Ticketer::new(TicketKeys::from_bytes(&first.state().to_bytes()).unwrap());
        let a = server_config(&cert, &key, first).unwrap();
        let b = server_config(&cert, &key, second).unwrap();
        // A process of another server (its own keys): a full handshake.
        let stranger = server_config(&cert, &key, Ticketer::random().unwrap()).unwrap();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let client = client_only(&ca, version);
            connect(&a, &client);
            resumes(&b, &client, version);
            // And back: b's ticket opens at a.
            let (c, _, _) = connect(&a, &client);
            assert_eq!(
                c.handshake_kind(),
                Some(HandshakeKind::Resumed),
                "{version:?}"
            );
            let (c, _, _) = connect(&stranger, &client);
            assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full), "{version:?}");
        }
    }

    #[test]
    fn plaintext_on_a_tls_session_is_refused_at_once() {
        let certs_plain = make_certs("plain");
        let (_, cert, key) = certs_plain.paths();
        let server =
            server_config(&cert, &key, crate::tls_tickets::Ticketer::random().unwrap()).unwrap();
        let mut s = ServerSession::server(&server).unwrap();
        let mut req = b"GET /ws?id=a HTTP/1.1\r\n\r\n".to_vec();
        let r = s.feed(&mut req, &mut Vec::new(), &mut Vec::new());
        assert!(matches!(r, Err(TlsError::NotTls)), "{r:?}");
        // Garbage that starts like a handshake record fails in rustls.
        let mut s = ServerSession::server(&server).unwrap();
        let mut junk = vec![0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
        let mut out = Vec::new();
        let r = s.feed(&mut junk, &mut Vec::new(), &mut out);
        assert!(matches!(r, Err(TlsError::Tls(_))), "{r:?}");
    }

    #[test]
    fn a_client_that_rejects_the_certificate_fails_both_sides() {
        let certs_badcert_a = make_certs("badcert-a");
        let (_, cert, key) = certs_badcert_a.paths();
        let certs_badcert_b = make_certs("badcert-b");
        let (other_ca, _, _) = certs_badcert_b.paths();
        let server =
            server_config(&cert, &key, crate::tls_tickets::Ticketer::random().unwrap()).unwrap();
        let client = Arc::new(client_config(&other_ca).unwrap());
        let mut hello = Vec::new();
        let mut c =
            ClientSession::client(&client, server_name("localhost").unwrap(), &mut hello).unwrap();
        let mut s = ServerSession::server(&server).unwrap();
        let (_, _, r) = pump(&mut c, &mut s, hello);
        let e = r.unwrap_err();
        assert!(e.starts_with("client: invalid peer certificate"), "{e}");
        assert!(e.contains("server: Err(Tls(AlertReceived("), "{e}");
    }

    #[test]
    fn config_errors_are_one_sentence() {
        let certs_config = make_certs("config");
        let (ca, cert, key) = certs_config.paths();
        let missing = Path::new("/nonexistent/cert.pem");
        let e = server_config(
            missing,
            &key,
            crate::tls_tickets::Ticketer::random().unwrap(),
        )
        .unwrap_err();
        assert!(
            e.starts_with("cannot read --tls-cert /nonexistent/cert.pem"),
            "{e}"
        );
        let e =
            server_config(&key, &key, crate::tls_tickets::Ticketer::random().unwrap()).unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = server_config(
            &cert,
            &cert,
            crate::tls_tickets::Ticketer::random().unwrap(),
        )
        .unwrap_err();
        assert!(e.contains("holds no PEM private key"), "{e}");
        let certs_config_other = make_certs("config-other");
        let (_, _, other_key) = certs_config_other.paths();
        let e = server_config(
            &cert,
            &other_key,
            crate::tls_tickets::Ticketer::random().unwrap(),
        )
        .unwrap_err();
        assert!(e.contains("does not fit --tls-cert"), "{e}");
        assert!(fleet_configs(&ca, Resume::Off).is_ok());
        let e = fleet_configs(&key, Resume::Off).unwrap_err();
        assert!(
            e.contains("--tls-ca") && e.contains("holds no PEM certificate"),
            "{e}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
        /// Bytes from a hostile peer, split anywhere, never panic a server
        /// session: after a real ClientHello too, and with records made of
        /// a real client's output with bytes flipped.
        #[test]
        fn hostile_bytes_never_panic(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            cut in 0usize..600,
            flip in 0usize..2000,
        ) {
            let config = hostile_server();
            let mut hello = Vec::new();
            let client = client_only_cached();
            let _c = ClientSession::client(&client, server_name("localhost").unwrap(), &mut hello).unwrap();
            for prefix in [Vec::new(), vec![HANDSHAKE_RECORD, 3, 1], hello.clone()] {
                let mut s = ServerSession::server(&config).unwrap();
                let mut bytes = prefix;
                bytes.extend_from_slice(&junk);
                if !bytes.is_empty() {
                    let i = flip % bytes.len();
                    if i >= 5 { bytes[i] ^= 0x5a; }
                }
                let at = cut.min(bytes.len());
                let (a, b) = bytes.split_at_mut(at);
                let (mut plain, mut out) = (Vec::new(), Vec::new());
                if s.feed(a, &mut plain, &mut out).is_ok() {
                    let _ = s.feed(b, &mut plain, &mut out);
                }
                let _ = s.seal(b"x", &mut out);
            }
        }
    }

    fn hostile_server() -> Arc<ServerConfig> {
        static CONFIG: std::sync::OnceLock<(Arc<ServerConfig>, Arc<ClientConfig>)> =
            std::sync::OnceLock::new();
        CONFIG.get_or_init(hostile_configs).0.clone()
    }

    fn client_only_cached() -> Arc<ClientConfig> {
        static CONFIG: std::sync::OnceLock<(Arc<ServerConfig>, Arc<ClientConfig>)> =
            std::sync::OnceLock::new();
        CONFIG.get_or_init(hostile_configs).1.clone()
    }

    fn hostile_configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let certs_hostile = make_certs("hostile");
        let (ca, cert, key) = certs_hostile.paths();
        (
            server_config(&cert, &key, crate::tls_tickets::Ticketer::random().unwrap()).unwrap(),
            Arc::new(client_config(&ca).unwrap()),
        )
    }

    #[test]
    fn sizes() {
        eprintln!(
            "ServerSession {} B, ClientSession {} B",
            std::mem::size_of::<ServerSession>(),
            std::mem::size_of::<ClientSession>()
        );
    }
}
