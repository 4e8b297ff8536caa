//! Blocking TCP transport: connect or accept, authenticate, then send and receive MAC'd
//! frames, with every wait bounded (DESIGN.md §9).
//!
//! Liveness: after the handshake each socket has `SO_RCVTIMEO` and `SO_SNDTIMEO` of
//! [`Timeouts::liveness`], `TCP_USER_TIMEOUT` of the same (the kernel aborts a connection
//! whose sent data stays unacknowledged that long) and TCP keepalive probes. A peer that
//! sends nothing for `liveness` is declared dead ([`ChannelError::Dead`]), so each side must
//! send something (a `Ping` when idle, [`Writer::ping_if_idle`]) at least every
//! `Timeouts::ping_interval`.

use crate::auth::{self, AuthError, ChannelKind, Key, Session};
use crate::frame::{seal_message, FrameError, FrameHeader, MacState, FRAME_HEADER_LEN, MAC_LEN};
use crate::message::{self, Kind, Message};
use crate::{MAX_PAYLOAD, MAX_REQUEST_PAGES};
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};
use zerocopy::IntoBytes;

/// Transport errors, classified by [`ChannelError::is_retryable`],
/// [`ChannelError::peer_gone`], [`ChannelError::is_bad_input`] and [`ChannelError::is_fatal`].
/// After any error but `Connect` the connection is unusable and should be dropped.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// No address could be connected to (refused, unreachable, timed out, unresolvable).
    #[error("cannot connect to the migration peer")]
    Connect(#[source] io::Error),
    /// The handshake failed.
    #[error("migration handshake failed")]
    Auth(#[from] AuthError),
    /// A frame failed authentication or decoding, or a message could not be encoded.
    #[error("bad migration frame")]
    Frame(#[from] FrameError),
    /// The peer closed the connection between two frames.
    #[error("the migration peer closed the connection")]
    Closed,
    /// The connection ended inside a frame.
    #[error("the connection ended inside a frame")]
    Truncated,
    /// Nothing arrived, or nothing could be sent, within the liveness deadline: the peer or
    /// the path to it is gone (a blackholed connection ends here).
    #[error("no progress within the liveness deadline of {0:?}")]
    Dead(Duration),
    /// An earlier error left this half unusable.
    #[error("the connection already failed")]
    Broken,
    /// Another system call failure.
    #[error("migration socket I/O failed")]
    Io(#[source] io::Error),
}

impl ChannelError {
    /// Reconnecting (with [`crate::Backoff`]) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ChannelError::Connect(_)
            | ChannelError::Closed
            | ChannelError::Truncated
            | ChannelError::Dead(_)
            | ChannelError::Io(_) => true,
            ChannelError::Auth(e) => e.is_retryable(),
            ChannelError::Frame(_) | ChannelError::Broken => false,
        }
    }

    /// The connection ended or stalled because of the peer or the network.
    pub fn peer_gone(&self) -> bool {
        match self {
            ChannelError::Closed | ChannelError::Truncated | ChannelError::Dead(_) => true,
            ChannelError::Io(e) => matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }

    /// The peer sent something invalid: a handshake that fails, a frame whose MAC does not
    /// verify (altered, replayed, forged) or that does not decode. Count it.
    pub fn is_bad_input(&self) -> bool {
        match self {
            ChannelError::Auth(e) => e.is_bad_input(),
            ChannelError::Frame(e) => e.is_bad_input(),
            _ => false,
        }
    }

    /// Retrying cannot help: a wrong key or unknown migration, a rejected handshake, or a
    /// message this side could not encode (a caller bug).
    pub fn is_fatal(&self) -> bool {
        match self {
            ChannelError::Auth(e) => !e.is_retryable(),
            ChannelError::Frame(e) => !e.is_bad_input(),
            _ => false,
        }
    }
}

/// The deadlines of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect, per address. Default 5 s.
    pub connect: Duration,
    /// The whole handshake's reads and writes, each. Default 5 s.
    pub handshake: Duration,
    /// Longest silence from the peer, and longest stall of a send, before the connection is
    /// declared dead; also `TCP_USER_TIMEOUT`. Default 10 s.
    pub liveness: Duration,
    /// How long a side may stay silent before [`Writer::ping_if_idle`] sends a `Ping`;
    /// keep it well under the peer's `liveness`. Default 2.5 s (a quarter of 10 s).
    pub ping_interval: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(5),
            liveness: Duration::from_secs(10),
            ping_interval: Duration::from_millis(2500),
        }
    }
}

/// Connects to a source at `addr`, authenticates as destination (client) of `migration_id`
/// on `channel`, and returns the ready channel.
pub fn connect(
    addr: impl ToSocketAddrs,
    channel: ChannelKind,
    migration_id: u64,
    key: &Key,
    timeouts: &Timeouts,
) -> Result<Channel, ChannelError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(ChannelError::Connect)?
        .collect();
    let mut last = io::Error::new(ErrorKind::InvalidInput, "no address to connect to");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeouts.connect) {
            Ok(mut stream) => {
                set_deadline(&stream, timeouts.handshake).map_err(ChannelError::Io)?;
                if channel == ChannelKind::Urgent {
                    stream.set_nodelay(true).map_err(ChannelError::Io)?;
                }
                let session = auth::client_handshake(&mut stream, channel, migration_id, key)?;
                return Channel::new(stream, session, timeouts);
            }
            Err(e) => last = e,
        }
    }
    Err(ChannelError::Connect(last))
}

/// Authenticates an accepted connection as its source (server); `lookup` gives the key of a
/// migration id. The handshake is bounded by `timeouts.handshake`.
pub fn accept_and_authenticate(
    mut stream: TcpStream,
    lookup: impl Fn(u64) -> Option<Key>,
    timeouts: &Timeouts,
) -> Result<Channel, ChannelError> {
    set_deadline(&stream, timeouts.handshake).map_err(ChannelError::Io)?;
    let session = auth::server_handshake(&mut stream, lookup)?;
    if session.channel == ChannelKind::Urgent {
        stream.set_nodelay(true).map_err(ChannelError::Io)?;
    }
    Channel::new(stream, session, timeouts)
}

fn set_deadline(s: &TcpStream, d: Duration) -> io::Result<()> {
    let d = d.max(Duration::from_millis(1));
    s.set_read_timeout(Some(d))?;
    s.set_write_timeout(Some(d))
}

fn set_liveness(s: &TcpStream, liveness: Duration) -> io::Result<()> {
    use rustix::net::sockopt;
    set_deadline(s, liveness)?;
    let secs = |d: Duration| d.max(Duration::from_secs(1));
    sockopt::set_socket_keepalive(s, true)?;
    sockopt::set_tcp_keepidle(s, secs(liveness / 2))?;
    sockopt::set_tcp_keepintvl(s, secs(liveness / 6))?;
    sockopt::set_tcp_keepcnt(s, 3)?;
    let ms = u32::try_from(liveness.as_millis())
        .unwrap_or(u32::MAX)
        .max(1);
    sockopt::set_tcp_user_timeout(s, ms)?;
    Ok(())
}

/// An authenticated connection. Use it from one thread, or [`Channel::split`] it.
#[derive(Debug)]
pub struct Channel {
    reader: Reader,
    writer: Writer,
}

impl Channel {
    fn new(stream: TcpStream, s: Session, t: &Timeouts) -> Result<Channel, ChannelError> {
        set_liveness(&stream, t.liveness).map_err(ChannelError::Io)?;
        let clone = stream.try_clone().map_err(ChannelError::Io)?;
        Ok(Channel {
            reader: Reader {
                stream,
                mac: s.recv,
                buf: Vec::new(),
                broken: false,
                liveness: t.liveness,
                kind: s.channel,
                migration_id: s.migration_id,
                features: s.features,
            },
            writer: Writer {
                stream: clone,
                mac: s.send,
                buf: Vec::new(),
                broken: false,
                liveness: t.liveness,
                ping_interval: t.ping_interval,
                last_send: Instant::now(),
                next_nonce: 1,
            },
        })
    }

    /// Which channel this is.
    pub fn kind(&self) -> ChannelKind {
        self.reader.kind
    }

    /// The migration it belongs to.
    pub fn migration_id(&self) -> u64 {
        self.reader.migration_id
    }

    /// The features negotiated at handshake.
    pub fn features(&self) -> u64 {
        self.reader.features
    }

    /// Sends one message ([`Writer::send`]).
    pub fn send(&mut self, msg: &Message) -> Result<(), ChannelError> {
        self.writer.send(msg)
    }

    /// Sends a `Pages` frame without copying `data` ([`Writer::send_pages`]).
    pub fn send_pages(&mut self, first: u64, data: &[u8]) -> Result<(), ChannelError> {
        self.writer.send_pages(first, data)
    }

    /// Receives one message ([`Reader::recv`]).
    pub fn recv(&mut self) -> Result<Message, ChannelError> {
        self.reader.recv()
    }

    /// The two halves, for a receiving and a sending thread.
    pub fn split(self) -> (Reader, Writer) {
        (self.reader, self.writer)
    }
}

/// The receiving half.
#[derive(Debug)]
pub struct Reader {
    stream: TcpStream,
    mac: MacState,
    buf: Vec<u8>,
    broken: bool,
    liveness: Duration,
    kind: ChannelKind,
    migration_id: u64,
    features: u64,
}

impl AsFd for Reader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl Reader {
    /// Which channel this is.
    pub fn kind(&self) -> ChannelKind {
        self.kind
    }

    /// Waits for the next frame (at most the liveness deadline), verifies its MAC and decodes
    /// it. Any error leaves the reader broken; a MAC or decode failure is
    /// [`ChannelError::is_bad_input`].
    pub fn recv(&mut self) -> Result<Message, ChannelError> {
        if self.broken {
            return Err(ChannelError::Broken);
        }
        let r = self.recv_inner();
        self.broken = r.is_err();
        r
    }

    fn recv_inner(&mut self) -> Result<Message, ChannelError> {
        let mut head = [0; FRAME_HEADER_LEN];
        read_exact(&mut self.stream, &mut head, true, self.liveness)?;
        let (h, len) = FrameHeader::parse(&head)?;
        debug_assert!(len <= MAX_PAYLOAD);
        self.buf.resize(len + MAC_LEN, 0);
        read_exact(&mut self.stream, &mut self.buf, false, self.liveness)?;
        let (payload, tag) = self.buf.split_at(len);
        self.mac.open(&head, payload, tag)?;
        let msg = Message::decode(h.kind.get(), payload).map_err(FrameError::Decode)?;
        if self.buf.capacity() > 64 * 1024 && len < 64 * 1024 {
            // Do not keep a 4 MiB buffer for a stream of small frames.
            self.buf = Vec::new();
        }
        Ok(msg)
    }
}

fn read_exact(
    s: &mut TcpStream,
    mut buf: &mut [u8],
    at_boundary: bool,
    liveness: Duration,
) -> Result<(), ChannelError> {
    let mut first = true;
    while !buf.is_empty() {
        match s.read(buf) {
            Ok(0) if first && at_boundary => return Err(ChannelError::Closed),
            Ok(0) => return Err(ChannelError::Truncated),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(e, liveness)),
        }
        first = false;
    }
    Ok(())
}

fn io_error(e: io::Error, liveness: Duration) -> ChannelError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ChannelError::Dead(liveness),
        _ => ChannelError::Io(e),
    }
}

/// The sending half.
#[derive(Debug)]
pub struct Writer {
    stream: TcpStream,
    mac: MacState,
    buf: Vec<u8>,
    broken: bool,
    liveness: Duration,
    ping_interval: Duration,
    last_send: Instant,
    next_nonce: u64,
}

impl AsFd for Writer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl Writer {
    /// Sends one message as one frame. Blocks at most the liveness deadline for room in the
    /// socket; an error leaves the writer broken (a frame may be half sent).
    pub fn send(&mut self, msg: &Message) -> Result<(), ChannelError> {
        if self.broken {
            return Err(ChannelError::Broken);
        }
        self.buf.clear();
        // An unencodable message is refused before anything is sent: the writer stays usable.
        seal_message(&mut self.mac, msg, &mut self.buf)?;
        let buf = std::mem::take(&mut self.buf);
        let r = self.write(&[&buf]);
        self.buf = buf;
        if self.buf.capacity() > 64 * 1024 {
            self.buf = Vec::new();
        }
        r
    }

    /// Sends `data` (a whole number of pages, 1..=`MAX_PAGES_PER_FRAME` of them) as a
    /// `Pages` frame starting at page `first`, without copying it.
    pub fn send_pages(&mut self, first: u64, data: &[u8]) -> Result<(), ChannelError> {
        if self.broken {
            return Err(ChannelError::Broken);
        }
        let count =
            message::pages_header(first, data.len()).ok_or(FrameError::Unencodable(Kind::Pages))?;
        let head = message::pages_head_bytes(first, count);
        let mut header = [0; FRAME_HEADER_LEN];
        header.copy_from_slice(FrameHeader::new(Kind::Pages as u16, 16 + data.len()).as_bytes());
        let tag = self.mac.seal(&header, &[&head, data])?;
        self.write(&[&header, &head, data, &tag])
    }

    /// Sends `pages` as `Request` frames of at most [`MAX_REQUEST_PAGES`] pages each.
    pub fn send_requests(&mut self, pages: &[u64]) -> Result<(), ChannelError> {
        for batch in pages.chunks(MAX_REQUEST_PAGES) {
            self.send(&Message::Request {
                pages: batch.to_vec(),
            })?;
        }
        Ok(())
    }

    /// Sends a `Ping` if nothing was sent for `Timeouts::ping_interval`; returns its nonce.
    /// Call it at least that often on a channel that may be idle.
    pub fn ping_if_idle(&mut self) -> Result<Option<u64>, ChannelError> {
        if self.last_send.elapsed() < self.ping_interval {
            return Ok(None);
        }
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        self.send(&Message::Ping { nonce })?;
        Ok(Some(nonce))
    }

    /// Shuts the connection down both ways: the peer sees it closed and a thread blocked in
    /// this connection's [`Reader::recv`] returns.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn write(&mut self, parts: &[&[u8]]) -> Result<(), ChannelError> {
        let r = write_parts(&mut self.stream, parts).map_err(|e| io_error(e, self.liveness));
        self.broken = r.is_err();
        if r.is_ok() {
            self.last_send = Instant::now();
        }
        r
    }
}

/// `write_all` of several buffers with as few system calls as the socket allows.
fn write_parts(s: &mut TcpStream, parts: &[&[u8]]) -> io::Result<()> {
    let (mut idx, mut off) = (0, 0);
    while idx < parts.len() {
        let mut slices = Vec::with_capacity(parts.len() - idx);
        slices.push(IoSlice::new(&parts[idx][off..]));
        slices.extend(parts[idx + 1..].iter().map(|p| IoSlice::new(p)));
        let mut n = match s.write_vectored(&slices) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while idx < parts.len() && n >= parts[idx].len() - off {
            n -= parts[idx].len() - off;
            idx += 1;
            off = 0;
        }
        off += n;
    }
    Ok(())
}
