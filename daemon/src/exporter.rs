//! The metrics endpoint (`--metrics-listen ADDR`): a small HTTP/1.1 server on a thread of its
//! own that answers `GET /metrics` with the families of [`crate::prometheus`].
//!
//! One request per connection, one connection at a time: a scrape reads relaxed atomics and
//! briefly locks each VM's latency histogram (one pass over it), so it never waits on the
//! control thread or a worker, nor they on it. Untrusted clients are bounded: a request head
//! of at most [`MAX_REQUEST`] bytes, read within [`REQUEST_TIMEOUT`], the answer written within
//! [`WRITE_TIMEOUT`]; anything else gets a 4xx answer and the connection is closed. Every wait
//! also watches the daemon's stop, so a client never delays its exit.

use crate::prometheus::{self, Format};
use crate::LiveVms;
use prometheus_client::registry::Registry;
use rustix::event::{PollFd, PollFlags};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest request head read (request line and headers).
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a client has to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors starting the endpoint (fatal at start-up).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The address cannot be bound.
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The stop eventfd or the thread could not be created.
    #[error("cannot start the metrics endpoint")]
    Start(#[source] std::io::Error),
}

/// The running endpoint; dropping it stops its thread.
#[derive(Debug)]
pub struct Exporter {
    addr: SocketAddr,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl Exporter {
    /// Binds `addr` and serves the metrics of `live`'s VMs there.
    pub fn start(addr: SocketAddr, live: Arc<LiveVms>) -> Result<Exporter, ExportError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| ExportError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ExportError::Bind { addr, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ExportError::Bind { addr, source })?;
        let stop = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
            .map_err(|e| ExportError::Start(e.into()))?;
        let stop_reader = stop.try_clone().map_err(ExportError::Start)?;
        let registry = prometheus::registry(live);
        let thread = std::thread::Builder::new()
            .name("vmpager-metrics".into())
            .spawn(move || run(listener, stop_reader, registry))
            .map_err(ExportError::Start)?;
        Ok(Exporter {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(listener: TcpListener, stop: OwnedFd, registry: Registry) {
    loop {
        let mut fds = [
            PollFd::new(&listener, PollFlags::IN),
            PollFd::new(&stop, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "metrics endpoint poll failed; endpoint stopped");
                return;
            }
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => serve(stream, &stop, &registry),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: wait a little (or for the stop) instead of spinning.
                tracing::debug!(error = %e, "metrics endpoint accept failed");
                let mut stop_only = [PollFd::new(&stop, PollFlags::IN)];
                let pause = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                let _ = rustix::event::poll(&mut stop_only, Some(&pause));
                if !stop_only[0].revents().is_empty() {
                    return;
                }
            }
        }
    }
}

/// Answers one connection. Errors (a client gone, too slow) only end the connection; the
/// daemon stopping ends it at once.
fn serve(mut stream: TcpStream, stop: &OwnedFd, registry: &Registry) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let answer = match read_head(&mut stream, stop) {
        Ok(head) => respond(&head, registry),
        Err(HeadError::TooLarge) => Answer::error(431, "Request Header Fields Too Large"),
        Err(HeadError::Gone) => return,
    };
    let bytes = answer.bytes();
    let deadline = Instant::now() + WRITE_TIMEOUT;
    let mut sent = 0;
    while sent < bytes.len() {
        match stream.write(&bytes[sent..]) {
            Ok(0) => return,
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !wait(&stream, PollFlags::OUT, stop, deadline) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Waits until `stream` is ready for `flags`: false at `deadline`, on the daemon's stop, or
/// when the poll fails.
fn wait(stream: &TcpStream, flags: PollFlags, stop: &OwnedFd, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let timeout = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(stream, flags), PollFd::new(stop, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) if !fds[1].revents().is_empty() => return false,
            Ok(_) if !fds[0].revents().is_empty() => return true,
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
}

enum HeadError {
    TooLarge,
    /// Closed, reset, too slow, or the daemon stops.
    Gone,
}

/// Reads up to the blank line that ends the request head.
fn read_head(stream: &mut TcpStream, stop: &OwnedFd) -> Result<Vec<u8>, HeadError> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Err(HeadError::Gone),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !wait(stream, PollFlags::IN, stop, deadline) {
                    return Err(HeadError::Gone);
                }
                continue;
            }
            Err(_) => return Err(HeadError::Gone),
        };
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find(&head[from..], b"\r\n\r\n") {
            head.truncate(from + end);
            return Ok(head);
        }
        if head.len() > MAX_REQUEST {
            return Err(HeadError::TooLarge);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An HTTP answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body (not sent for `HEAD`).
    pub body: String,
    /// The request was `HEAD`.
    pub head_only: bool,
}

impl Answer {
    fn error(status: u16, reason: &'static str) -> Answer {
        Answer {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: format!("{reason}\n"),
            head_only: false,
        }
    }

    /// The bytes on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// The answer to a request head (request line and headers, without the final blank line).
pub fn respond(head: &[u8], registry: &Registry) -> Answer {
    let Ok(text) = std::str::from_utf8(head) else {
        return Answer::error(400, "Bad Request");
    };
    let mut lines = text.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Answer::error(400, "Bad Request");
    };
    if !version.starts_with("HTTP/1.") {
        return Answer::error(505, "HTTP Version Not Supported");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Answer::error(405, "Method Not Allowed"),
    };
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" {
        return Answer {
            head_only,
            ..Answer::error(404, "Not Found")
        };
    }
    let accept = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("accept")
            .then(|| value.trim())
    });
    let format = Format::from_accept(accept);
    match prometheus::encode(registry, format) {
        Ok(body) => Answer {
            status: 200,
            reason: "OK",
            content_type: format.content_type(),
            body,
            head_only,
        },
        Err(_) => Answer::error(500, "Internal Server Error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        prometheus::registry(Arc::new(LiveVms::default()))
    }

    #[test]
    fn get_metrics_answers_in_the_format_asked_for() {
        let r = registry();
        let a = respond(b"GET /metrics HTTP/1.1\r\nHost: x", &r);
        assert_eq!(
            (a.status, a.content_type),
            (200, prometheus::PROMETHEUS_CONTENT_TYPE)
        );
        assert!(a.body.contains("\nvmpager_vms 0\n"), "{}", a.body);
        assert!(
            a.body.contains("vmpager_vms_created_total 0\n"),
            "{}",
            a.body
        );
        assert!(!a.body.contains("# EOF"));
        let a = respond(
            b"GET /metrics?x=1 HTTP/1.1\r\nACCEPT: application/openmetrics-text;version=1.0.0",
            &r,
        );
        assert_eq!(
            (a.status, a.content_type),
            (200, prometheus::OPENMETRICS_CONTENT_TYPE)
        );
        assert!(a.body.ends_with("# EOF\n"), "{}", a.body);
        let head = respond(b"HEAD /metrics HTTP/1.0", &r);
        assert!(head.head_only && head.status == 200);
        let bytes = head.bytes();
        assert!(bytes.ends_with(b"\r\n\r\n"));
        assert!(String::from_utf8(bytes)
            .unwrap()
            .contains(&format!("Content-Length: {}\r\n", head.body.len())));
    }

    #[test]
    fn anything_else_gets_a_client_error() {
        let r = registry();
        for (req, status) in [
            (&b"GET / HTTP/1.1"[..], 404),
            (b"GET /metricsx HTTP/1.1", 404),
            (b"POST /metrics HTTP/1.1", 405),
            (b"GET /metrics HTTP/2.0", 505),
            (b"GET /metrics", 400),
            (b"GET  /metrics HTTP/1.1", 400),
            (b"", 400),
            (b"\xff\xfe /metrics HTTP/1.1", 400),
        ] {
            assert_eq!(
                respond(req, &r).status,
                status,
                "{:?}",
                String::from_utf8_lossy(req)
            );
        }
        assert!(
            String::from_utf8(respond(b"PUT /metrics HTTP/1.1", &r).bytes())
                .unwrap()
                .contains("Allow: GET, HEAD\r\n")
        );
    }
}
