//! The streaming replication connection, spoken directly over TCP: startup with
//! `replication=database`, authentication (trust, cleartext, MD5, SCRAM-SHA-256) through
//! postgres-protocol, simple queries, and the CopyBoth stream of XLogData and keepalives.
//!
//! tokio-postgres cannot open replication connections, so the framing lives here; the
//! message bodies are parsed by small checked readers.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::{CdcError, ServerError};
use crate::lsn::Lsn;
use crate::names::quote_ident;
use crate::pgoutput::PG_EPOCH_OFFSET_MICROS;
use crate::tls::SslMode;

/// Where and as whom to connect.
#[derive(Clone)]
pub struct ConnectParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<Vec<u8>>,
    pub database: String,
    pub ssl_mode: SslMode,
    /// The TLS client, unless `sslmode=disable`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Either half of a plain or TLS connection.
type ReadStream = Box<dyn AsyncRead + Send + Unpin>;
type WriteStream = Box<dyn AsyncWrite + Send + Unpin>;

/// Session settings every ficus connection uses, so values come out in the text forms that
/// [`crate::value`] parses: `money` in the C locale's one fixed form, whatever the database's.
pub const SESSION_SETTINGS: [(&str, &str); 6] = [
    ("lc_monetary", "C"),
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

/// One backend message: its type byte and body.
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

/// The longest message PostgreSQL sends (its `PQ_LARGE_MESSAGE_LIMIT`, 1 GiB): a longer
/// announced length means the stream is garbled, and is refused before anything is allocated.
pub const MAX_FRAME: usize = 1 << 30;

/// How much more the receive buffer grows at a time while a long message arrives: memory
/// follows the bytes received, not the length announced.
const READ_CHUNK: usize = 64 * 1024;

/// Splits the next whole message off the front of `buf`, checking its announced length
/// first; `Ok(None)` while it has not all arrived.
pub fn split_frame(buf: &mut BytesMut) -> Result<Option<Frame>, CdcError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let announced = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let len = usize::try_from(announced).ok().filter(|len| (4..=MAX_FRAME).contains(len));
    let Some(len) = len else {
        return Err(protocol(&format!(
            "message {:?} announces {announced} bytes (a length is 4 to 1 GiB): the stream is garbled",
            char::from(buf[0])
        )));
    };
    if buf.len() <= len {
        return Ok(None);
    }
    let mut frame = buf.split_to(len + 1).freeze();
    let tag = frame[0];
    frame.advance(5);
    Ok(Some(Frame { tag, body: frame }))
}

/// A message of the replication stream.
#[derive(Debug)]
pub enum StreamMessage {
    /// WAL data: `start` is the LSN of this message's change.
    XLogData { start: Lsn, wal_end: Lsn, data: Bytes },
    /// The server's position; `reply` asks for a status update now.
    Keepalive { wal_end: Lsn, reply: bool },
}

/// The receiving half: reading is cancel-safe (partial frames stay buffered).
pub struct Receiver {
    stream: ReadStream,
    buf: BytesMut,
}

/// The sending half.
pub struct Sender {
    stream: WriteStream,
    buf: BytesMut,
}

/// A replication connection, before or after `START_REPLICATION`.
pub struct ReplicationConnection {
    pub rx: Receiver,
    pub tx: Sender,
    pub server_version: u32,
}

impl ReplicationConnection {
    /// Connects and authenticates with `replication=database`.
    pub async fn connect(params: &ConnectParams) -> Result<ReplicationConnection, CdcError> {
        let addr = format!("{}:{}", params.host, params.port);
        let mut stream = TcpStream::connect(&addr)
            .await
            .map_err(|source| CdcError::Connect { addr: addr.clone(), source })?;
        stream.set_nodelay(true)?;
        let (read, write): (ReadStream, WriteStream) = match &params.tls {
            Some(tls) if negotiate_tls(&mut stream, params.ssl_mode).await? => {
                let name = ServerName::try_from(params.host.clone()).map_err(|e| {
                    CdcError::Config(format!(
                        "source.url: host {} is not a TLS server name: {e}",
                        params.host
                    ))
                })?;
                let tls_stream = TlsConnector::from(tls.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| CdcError::Tls { addr: addr.clone(), message: e.to_string() })?;
                let (read, write) = tokio::io::split(tls_stream);
                (Box::new(read), Box::new(write))
            }
            _ => {
                let (read, write) = stream.into_split();
                (Box::new(read), Box::new(write))
            }
        };
        let mut conn = ReplicationConnection {
            rx: Receiver { stream: read, buf: BytesMut::with_capacity(64 * 1024) },
            tx: Sender { stream: write, buf: BytesMut::with_capacity(1024) },
            server_version: 0,
        };
        let mut startup = vec![
            ("user", params.user.as_str()),
            ("database", params.database.as_str()),
            ("replication", "database"),
            ("application_name", "ficus"),
            ("client_encoding", "UTF8"),
        ];
        startup.extend(SESSION_SETTINGS);
        frontend::startup_message(startup, &mut conn.tx.buf)?;
        conn.tx.flush().await?;
        let started = async {
            conn.authenticate(params).await?;
            conn.wait_ready().await
        };
        match started.await {
            Ok(()) => Ok(conn),
            Err(CdcError::Server(e)) => Err(CdcError::from_server(e, "")),
            Err(e) => Err(e),
        }
    }

    async fn authenticate(&mut self, params: &ConnectParams) -> Result<(), CdcError> {
        let password = || {
            params.password.clone().ok_or_else(|| {
                CdcError::Config(format!(
                    "PostgreSQL asks a password for user {} and source.url has none",
                    params.user
                ))
            })
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let frame = self.rx.frame().await?;
            match frame.tag {
                b'R' => {
                    let mut body = frame.body;
                    let code = read_i32(&mut body)?;
                    match code {
                        0 => return Ok(()),
                        3 => {
                            frontend::password_message(&password()?, &mut self.tx.buf)?;
                        }
                        5 => {
                            let salt: [u8; 4] = body
                                .get(..4)
                                .and_then(|s| s.try_into().ok())
                                .ok_or_else(|| protocol("short MD5 salt"))?;
                            let hash = md5_hash(params.user.as_bytes(), &password()?, salt);
                            frontend::password_message(hash.as_bytes(), &mut self.tx.buf)?;
                        }
                        10 => {
                            let mechanisms = String::from_utf8_lossy(&body).to_string();
                            if !mechanisms.split('\0').any(|m| m == sasl::SCRAM_SHA_256) {
                                return Err(protocol(&format!(
                                    "no supported SASL mechanism in {mechanisms:?}"
                                )));
                            }
                            let client = sasl::ScramSha256::new(
                                &password()?,
                                sasl::ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                sasl::SCRAM_SHA_256,
                                client.message(),
                                &mut self.tx.buf,
                            )?;
                            scram = Some(client);
                        }
                        11 => {
                            let client = scram
                                .as_mut()
                                .ok_or_else(|| protocol("SASL continue before start"))?;
                            client.update(&body)?;
                            frontend::sasl_response(client.message(), &mut self.tx.buf)?;
                        }
                        12 => {
                            let client = scram
                                .as_mut()
                                .ok_or_else(|| protocol("SASL final before start"))?;
                            client.finish(&body)?;
                            continue;
                        }
                        other => {
                            return Err(protocol(&format!(
                                "unsupported authentication method {other}"
                            )))
                        }
                    }
                    self.tx.flush().await?;
                }
                b'E' => return Err(CdcError::Server(parse_error(frame.body))),
                b'N' => {}
                other => {
                    return Err(protocol(&format!(
                        "unexpected message {:?} during authentication",
                        char::from(other)
                    )))
                }
            }
        }
    }

    /// Reads until ReadyForQuery, keeping the server version.
    async fn wait_ready(&mut self) -> Result<(), CdcError> {
        loop {
            let frame = self.rx.frame().await?;
            match frame.tag {
                b'Z' => return Ok(()),
                b'S' => {
                    let mut parts = frame.body.split(|&b| b == 0);
                    if parts.next() == Some(b"server_version") {
                        let version =
                            String::from_utf8_lossy(parts.next().unwrap_or_default()).to_string();
                        self.server_version = parse_server_version(&version);
                    }
                }
                b'E' => return Err(CdcError::Server(parse_error(frame.body))),
                _ => {}
            }
        }
    }

    /// Runs a simple-protocol command and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, CdcError> {
        frontend::query(sql, &mut self.tx.buf)?;
        self.tx.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.rx.frame().await?;
            match frame.tag {
                b'D' => rows.push(parse_data_row(frame.body)?),
                b'E' => error = Some(parse_error(frame.body)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(CdcError::Server(e)),
            None => Ok(rows),
        }
    }

    /// Starts streaming `slot` from `start` (0 means the slot's confirmed position).
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<(), CdcError> {
        let messages = if self.server_version >= 140_000 { ", \"messages\" 'true'" } else { "" };
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (\"proto_version\" '1', \"publication_names\" '{}'{messages})",
            quote_ident(slot),
            quote_ident(publication).replace('\'', "''"),
        );
        frontend::query(&sql, &mut self.tx.buf)?;
        self.tx.flush().await?;
        loop {
            let frame = self.rx.frame().await?;
            match frame.tag {
                b'W' => return Ok(()),
                b'E' => {
                    let error = parse_error(frame.body);
                    // Drain to ReadyForQuery so the error is the whole story.
                    return Err(CdcError::from_server(error, slot));
                }
                b'N' => {}
                other => {
                    return Err(protocol(&format!(
                        "expected CopyBothResponse, got {:?}",
                        char::from(other)
                    )))
                }
            }
        }
    }
}

/// Asks the server for TLS (SSLRequest); true when it agreed. Fails when the server refuses
/// and `mode` requires TLS.
async fn negotiate_tls(stream: &mut TcpStream, mode: SslMode) -> Result<bool, CdcError> {
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => Ok(true),
        b'N' if mode.requires_tls() => Err(CdcError::Tls {
            addr: stream.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            message:
                "the server does not accept TLS connections (ssl = off), but sslmode requires TLS"
                    .into(),
        }),
        b'N' => Ok(false),
        other => Err(protocol(&format!("unexpected answer {:?} to SSLRequest", char::from(other)))),
    }
}

impl Receiver {
    /// The next replication stream message. Cancel-safe.
    pub async fn recv(&mut self) -> Result<StreamMessage, CdcError> {
        loop {
            let frame = self.frame().await?;
            match frame.tag {
                b'd' => return parse_copy_data(frame.body),
                b'E' => return Err(CdcError::Server(parse_error(frame.body))),
                b'c' => return Err(protocol("the server ended the replication stream")),
                b'N' => {}
                other => {
                    return Err(protocol(&format!(
                        "unexpected message {:?} in the replication stream",
                        char::from(other)
                    )))
                }
            }
        }
    }

    async fn frame(&mut self) -> Result<Frame, CdcError> {
        loop {
            if let Some(frame) = split_frame(&mut self.buf)? {
                return Ok(frame);
            }
            if self.buf.len() == self.buf.capacity() {
                self.buf.reserve(READ_CHUNK);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(CdcError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "PostgreSQL closed the connection",
                )));
            }
        }
    }
}

impl Sender {
    async fn flush(&mut self) -> Result<(), CdcError> {
        self.stream.write_all(&self.buf).await?;
        self.buf.clear();
        Ok(())
    }

    /// Sends a standby status update: everything up to `flush` may be released by the slot.
    pub async fn status_update(
        &mut self,
        received: Lsn,
        flush: Lsn,
        reply: bool,
    ) -> Result<(), CdcError> {
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(b'r');
        payload.put_u64(received.0);
        payload.put_u64(flush.0);
        payload.put_u64(flush.0);
        payload.put_i64(pg_now());
        payload.put_u8(u8::from(reply));
        self.buf.put_u8(b'd');
        self.buf.put_i32(4 + payload.len() as i32);
        self.buf.put_slice(&payload);
        self.flush().await
    }
}

/// Microseconds since 2000-01-01, PostgreSQL's clock.
fn pg_now() -> i64 {
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    unix - PG_EPOCH_OFFSET_MICROS
}

/// A replication stream message from the body of a CopyData message.
pub fn parse_copy_data(mut body: Bytes) -> Result<StreamMessage, CdcError> {
    if body.is_empty() {
        return Err(protocol("empty CopyData"));
    }
    let kind = body.get_u8();
    match kind {
        b'w' if body.len() >= 24 => {
            let start = Lsn(body.get_u64());
            let wal_end = Lsn(body.get_u64());
            let _clock = body.get_i64();
            Ok(StreamMessage::XLogData { start, wal_end, data: body })
        }
        b'k' if body.len() >= 17 => {
            let wal_end = Lsn(body.get_u64());
            let _clock = body.get_i64();
            Ok(StreamMessage::Keepalive { wal_end, reply: body.get_u8() == 1 })
        }
        other => {
            Err(protocol(&format!("unknown or short CopyData message {:?}", char::from(other))))
        }
    }
}

fn parse_data_row(mut body: Bytes) -> Result<Vec<Option<String>>, CdcError> {
    if body.len() < 2 {
        return Err(protocol("short DataRow"));
    }
    let count = body.get_i16();
    let mut row = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count {
        let len = read_i32(&mut body)?;
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return Err(protocol("short DataRow value"));
        }
        row.push(Some(String::from_utf8_lossy(&body.split_to(len)).to_string()));
    }
    Ok(row)
}

/// Parses an ErrorResponse or NoticeResponse body.
fn parse_error(body: Bytes) -> ServerError {
    let mut error = ServerError {
        severity: "ERROR".into(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).to_string();
        match field[0] {
            b'V' => error.severity = value,
            b'C' => error.code = value,
            b'M' => error.message = value,
            b'D' => error.detail = Some(value),
            b'H' => error.hint = Some(value),
            _ => {}
        }
    }
    error
}

fn read_i32(body: &mut Bytes) -> Result<i32, CdcError> {
    if body.len() < 4 {
        return Err(protocol("short message"));
    }
    Ok(body.get_i32())
}

fn protocol(message: &str) -> CdcError {
    CdcError::Protocol(message.to_string())
}

/// `15.4 (Debian ...)` as 150004.
fn parse_server_version(version: &str) -> u32 {
    let mut parts = version.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    major * 10_000 + minor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_data_messages_parse() {
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_u64(10);
        w.put_u64(20);
        w.put_i64(0);
        w.put_slice(b"B...");
        match parse_copy_data(w.freeze()).expect("xlogdata") {
            StreamMessage::XLogData { start, wal_end, data } => {
                assert_eq!((start, wal_end, data.as_ref()), (Lsn(10), Lsn(20), b"B...".as_ref()));
            }
            other => panic!("{other:?}"),
        }
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(99);
        k.put_i64(0);
        k.put_u8(1);
        assert!(matches!(
            parse_copy_data(k.freeze()).expect("keepalive"),
            StreamMessage::Keepalive { wal_end: Lsn(99), reply: true }
        ));
        assert!(parse_copy_data(Bytes::from_static(b"k\0")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"x")).is_err());
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn frames_are_split_only_once_whole() {
        let mut stream = message(b'd', b"kabc");
        stream.extend(message(b'N', b""));
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        // Byte by byte, as a slow network delivers it.
        for byte in stream {
            buf.put_u8(byte);
            while let Some(frame) = split_frame(&mut buf).expect("valid framing") {
                frames.push((frame.tag, frame.body));
            }
        }
        assert_eq!(frames, [(b'd', Bytes::from_static(b"kabc")), (b'N', Bytes::new())]);
        assert!(buf.is_empty());
    }

    #[test]
    fn garbled_lengths_are_refused_before_anything_is_allocated() {
        for announced in [-1_i32, 0, 3, (MAX_FRAME + 1) as i32, i32::MAX] {
            let mut buf = BytesMut::from(&[b'd'][..]);
            buf.put_i32(announced);
            let error = split_frame(&mut buf).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                error.contains(&format!("announces {announced} bytes")),
                "{announced}: {error}"
            );
            assert!(buf.capacity() < 1024, "{announced}: {} bytes reserved", buf.capacity());
        }
        // The longest allowed length is only waited for.
        let mut buf = BytesMut::from(&[b'd'][..]);
        buf.put_i32(MAX_FRAME as i32);
        assert!(matches!(split_frame(&mut buf), Ok(None)));
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn errors_and_versions_parse() {
        let e = parse_error(Bytes::from_static(
            b"SERROR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 42\0\0",
        ));
        assert_eq!(e.code, "55006");
        assert!(
            matches!(CdcError::from_server(e, "s"), CdcError::SlotInUse { pid, .. } if pid == "42")
        );
        assert_eq!(parse_server_version("15.18 (Debian 15.18-0+deb12u1)"), 150_018);
    }
}
