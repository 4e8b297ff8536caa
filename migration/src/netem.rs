//! A faulty link for tests and benchmarks: a TCP proxy on loopback between two daemons that
//! adds latency, cuts every connection once, or turns into a black hole (bytes read and
//! dropped, nothing closed: what a silently failing network path looks like to both ends).
//!
//! `tc netem` needs a network namespace and root; this needs neither and behaves the same for
//! the two daemons: each direction's bytes are delivered `rtt / 2` after they were read.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors starting a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Binding the proxy's port failed.
    #[error("cannot listen on {addr}")]
    Listen {
        /// Where.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default)]
struct Control {
    /// Each direction's delay, in microseconds.
    one_way_us: AtomicU64,
    /// Bytes per second each connection's direction may carry (0: no limit).
    rate: AtomicU64,
    /// Bytes read are dropped, nothing is forwarded or closed.
    blackhole: AtomicBool,
    /// Connections accepted (both ends of each), to cut them.
    live: Mutex<Vec<(TcpStream, TcpStream)>>,
    /// Connections accepted so far.
    accepted: AtomicU64,
    /// Connections cut.
    cut: AtomicU64,
}

/// A running faulty link: connect to [`FaultyLink::addr`] to reach the target.
#[derive(Debug)]
pub struct FaultyLink {
    addr: SocketAddr,
    control: Arc<Control>,
    stop: Arc<AtomicBool>,
}

impl FaultyLink {
    /// A proxy on an ephemeral loopback port that forwards each connection to `target`, adding
    /// `rtt` of round-trip latency (half each way).
    pub fn start(target: SocketAddr, rtt: Duration) -> Result<FaultyLink, LinkError> {
        let bind: SocketAddr = ([127, 0, 0, 1], 0).into();
        let listener =
            TcpListener::bind(bind).map_err(|source| LinkError::Listen { addr: bind, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| LinkError::Listen { addr: bind, source })?;
        let control = Arc::new(Control::default());
        control
            .one_way_us
            .store(rtt.as_micros() as u64 / 2, Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (control.clone(), stop.clone());
        std::thread::Builder::new()
            .name("faulty-link".into())
            .spawn(move || accept_loop(listener, target, c, s))
            .map_err(|source| LinkError::Listen { addr, source })?;
        Ok(FaultyLink {
            addr,
            control,
            stop,
        })
    }

    /// Where to connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection open now (both ends see a reset or an end of stream). New
    /// connections go through as before.
    pub fn cut(&self) {
        let live =
            std::mem::take(&mut *self.control.live.lock().unwrap_or_else(|p| p.into_inner()));
        for (a, b) in live {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
            self.control.cut.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// From now on (or no longer), bytes are read and dropped: nothing arrives, nothing is
    /// closed, and new connections are accepted but lead nowhere.
    pub fn set_blackhole(&self, on: bool) {
        self.control.blackhole.store(on, Ordering::Relaxed);
    }

    /// Limits each direction of each connection to `bytes_per_sec` (0: no limit): a slow
    /// link, which a bulk push fills.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.control.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.control.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
        self.cut();
    }
}

fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    control: Arc<Control>,
    stop: Arc<AtomicBool>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(client) = conn else { continue };
        control.accepted.fetch_add(1, Ordering::Relaxed);
        let server = if control.blackhole.load(Ordering::Relaxed) {
            None
        } else {
            TcpStream::connect_timeout(&target, Duration::from_secs(5)).ok()
        };
        let Some(server) = server else {
            // A black hole (or a target that is not there): keep the client's connection open
            // and read what it sends into nothing, or close it if the target refused.
            if control.blackhole.load(Ordering::Relaxed) {
                let _ = std::thread::Builder::new()
                    .name("faulty-link-hole".into())
                    .spawn(move || swallow(client));
            }
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
            control
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((c2, s2));
        }
        for (from, to) in [(&client, &server), (&server, &client)] {
            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                continue;
            };
            let c = control.clone();
            let _ = std::thread::Builder::new()
                .name("faulty-link-io".into())
                .spawn(move || pump(from, to, c));
        }
    }
}

fn swallow(mut s: TcpStream) {
    let mut buf = [0u8; 64 * 1024];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

/// Forwards `from` → `to`: each chunk is delivered `one_way` after it was read, in order, by a
/// second thread; in a black hole it is dropped.
fn pump(mut from: TcpStream, to: TcpStream, control: Arc<Control>) {
    // Bounded: a slow link pushes back on its sender, as TCP does.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(16);
    let c = control.clone();
    let writer = std::thread::Builder::new()
        .name("faulty-link-out".into())
        .spawn(move || {
            let mut to = to;
            for (due, bytes) in rx {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if c.blackhole.load(Ordering::Relaxed) {
                    continue;
                }
                if to.write_all(&bytes).is_err() {
                    break;
                }
                let rate = c.rate.load(Ordering::Relaxed);
                if rate > 0 {
                    std::thread::sleep(Duration::from_secs_f64(bytes.len() as f64 / rate as f64));
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if control.blackhole.load(Ordering::Relaxed) {
                    continue;
                }
                let delay = Duration::from_micros(control.one_way_us.load(Ordering::Relaxed));
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    if let Ok(w) = writer {
        let _ = w.join();
    }
}
