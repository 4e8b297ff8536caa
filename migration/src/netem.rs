//! A faulty link for tests and benchmarks: a TCP proxy on loopback between two daemons that
//! adds latency, cuts every connection once, or turns into a black hole (bytes read and
//! dropped, nothing closed: what a silently failing network path looks like to both ends).
//!
//! `tc netem` needs a network namespace and root; this needs neither and behaves the same for
//! the two daemons: each direction's bytes are delivered `rtt / 2` after they were read.
//!
//! Two rate limits: [`FaultyLink::set_rate`] limits each connection on its own (no shared
//! bottleneck: a bulk connection never delays another connection's bytes), and
//! [`FaultyLink::set_shared_rate`] makes every connection share one link per direction, a FIFO
//! bottleneck with a small queue: a chunk waits behind the chunks other connections reserved
//! before it (at most one each), never behind a whole socket buffer of theirs.

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
    /// Bytes per second all connections share per direction (0: no shared limit).
    shared_rate: AtomicU64,
    /// When each direction's shared link is next free (towards the target, back).
    next_free: [Mutex<Option<Instant>>; 2],
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

    /// Makes every connection share one link of `bytes_per_sec` per direction (towards the
    /// target, and back; 0: no shared limit): each chunk is delivered at the end of the
    /// transmission slot it reserved on its direction's timeline, after the chunks other
    /// connections reserved before it. Applies with [`FaultyLink::set_rate`], if both are set.
    pub fn set_shared_rate(&self, bytes_per_sec: u64) {
        self.control
            .shared_rate
            .store(bytes_per_sec, Ordering::Relaxed);
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
        for (dir, from, to) in [(TOWARDS, &client, &server), (BACK, &server, &client)] {
            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                continue;
            };
            let c = control.clone();
            let _ = std::thread::Builder::new()
                .name("faulty-link-io".into())
                .spawn(move || pump(from, to, dir, c));
        }
    }
}

/// The direction towards the target (index of [`Control::next_free`]).
const TOWARDS: usize = 0;
/// The direction back from the target.
const BACK: usize = 1;

impl Control {
    /// Reserves the transmission of `len` bytes on direction `dir`'s shared link (if it has a
    /// rate): it starts when the link is free (now, or after the chunks reserved before it)
    /// and ends `len / rate` later. When the chunk may be delivered: the end of its slot.
    fn reserve(&self, dir: usize, len: usize) -> Option<Instant> {
        let rate = self.shared_rate.load(Ordering::Relaxed);
        if rate == 0 {
            return None;
        }
        let mut next = self.next_free[dir]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let start = next.map_or(now, |n| n.max(now));
        let end = start + Duration::from_secs_f64(len as f64 / rate as f64);
        *next = Some(end);
        Some(end)
    }
}

fn swallow(mut s: TcpStream) {
    let mut buf = [0u8; 64 * 1024];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

/// Forwards `from` → `to` (direction `dir`): each chunk is delivered `one_way` after it was
/// read (and after its slot on the shared link, if any), in order, by a second thread; in a
/// black hole it is dropped.
fn pump(mut from: TcpStream, to: TcpStream, dir: usize, control: Arc<Control>) {
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
                if let Some(end) = c.reserve(dir, bytes.len()) {
                    let now = Instant::now();
                    if end > now {
                        std::thread::sleep(end - now);
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A target that reads every connection to its end, in accept order: each one's bytes, and
    /// what every connection had received when it ended.
    #[derive(Default)]
    struct Sink {
        conns: Mutex<Vec<Arc<Conn>>>,
    }

    #[derive(Default)]
    struct Conn {
        received: AtomicUsize,
        bytes: Mutex<Vec<u8>>,
        /// Every connection's `received` when this one ended.
        others_at_end: Mutex<Option<Vec<usize>>>,
    }

    impl Sink {
        fn start() -> (SocketAddr, Arc<Sink>) {
            let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
            let addr = listener.local_addr().unwrap();
            let sink = Arc::new(Sink::default());
            let s = sink.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { return };
                    let c = Arc::new(Conn::default());
                    s.conns.lock().unwrap().push(c.clone());
                    let s = s.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = conn.read(&mut buf) {
                            c.bytes.lock().unwrap().extend_from_slice(&buf[..n]);
                            c.received.fetch_add(n, Ordering::SeqCst);
                        }
                        let all = s.received();
                        *c.others_at_end.lock().unwrap() = Some(all);
                    });
                }
            });
            (addr, sink)
        }

        fn received(&self) -> Vec<usize> {
            let conns = self.conns.lock().unwrap();
            conns
                .iter()
                .map(|c| c.received.load(Ordering::SeqCst))
                .collect()
        }

        fn conn(&self, i: usize) -> Arc<Conn> {
            self.conns.lock().unwrap()[i].clone()
        }

        /// Waits until connection `i` has ended.
        fn wait_end(&self, i: usize) -> Arc<Conn> {
            loop {
                if let Some(c) = self.conns.lock().unwrap().get(i) {
                    if c.others_at_end.lock().unwrap().is_some() {
                        return c.clone();
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Sends `data` through a new connection to `addr` and closes its sending side.
    fn send(addr: SocketAddr, data: Vec<u8>) -> std::thread::JoinHandle<()> {
        let mut s = TcpStream::connect(addr).unwrap();
        std::thread::spawn(move || {
            s.write_all(&data).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            // Held open until the proxy closes it (after forwarding everything).
            let _ = s.read(&mut [0u8; 1]);
        })
    }

    #[test]
    fn connections_share_the_link_rate() {
        const RATE: u64 = 8_000_000;
        const LEN: usize = 1 << 20;
        let (target, sink) = Sink::start();
        let link = FaultyLink::start(target, Duration::ZERO).unwrap();
        link.set_shared_rate(RATE);
        let started = Instant::now();
        let a = send(link.addr(), pattern(LEN, 0xa5));
        let b = send(link.addr(), pattern(LEN, 0x5a));
        let (ca, cb) = (sink.wait_end(0), sink.wait_end(1));
        let took = started.elapsed();
        a.join().unwrap();
        b.join().unwrap();
        // Every byte, in order, on its own connection (which is which: by their pattern).
        let mut got = [
            ca.bytes.lock().unwrap().clone(),
            cb.bytes.lock().unwrap().clone(),
        ];
        got.sort_by_key(|g| g.first().copied());
        let mut want = [pattern(LEN, 0xa5), pattern(LEN, 0x5a)];
        want.sort_by_key(|w| w.first().copied());
        assert!(got == want, "bytes lost or reordered");
        // One shared link: both took about their combined time (each alone at this rate would
        // take half of it).
        let combined = Duration::from_secs_f64(2.0 * LEN as f64 / RATE as f64);
        assert!(
            took >= combined.mul_f64(0.8),
            "{took:?} for {combined:?} of bytes on the shared link"
        );
    }

    #[test]
    fn a_small_message_waits_behind_a_chunk_not_behind_another_connections_backlog() {
        const RATE: u64 = 8_000_000;
        const BULK: usize = 4 << 20;
        const SMALL: usize = 4096;
        let (target, sink) = Sink::start();
        let link = FaultyLink::start(target, Duration::ZERO).unwrap();
        link.set_shared_rate(RATE);
        // A bulk connection fills the link (about half a second of bytes, most of them queued
        // in its socket buffers and the proxy)...
        let bulk = send(link.addr(), pattern(BULK, 1));
        while sink.received().first().copied().unwrap_or(0) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // ... and a small message on a second connection overtakes its backlog.
        let small = send(link.addr(), pattern(SMALL, 2));
        let s = sink.wait_end(1);
        let at_end = s.others_at_end.lock().unwrap().clone().unwrap();
        assert_eq!(*s.bytes.lock().unwrap(), pattern(SMALL, 2));
        assert!(
            at_end[0] < BULK,
            "the small message arrived only after the whole bulk backlog: {at_end:?}"
        );
        sink.wait_end(0);
        assert_eq!(*sink.conn(0).bytes.lock().unwrap(), pattern(BULK, 1));
        bulk.join().unwrap();
        small.join().unwrap();
    }
}
