//! The TCP transport over loopback: handshake with right and wrong keys, tampered, replayed
//! and truncated frames through a proxy, garbage instead of a Hello, and blackholed peers.
//! No sleeps: every wait is on a socket or a channel, bounded by the timeouts under test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;
use vmpager_migration::auth::{AuthError, RejectCode};
use vmpager_migration::frame::FrameError;
use vmpager_migration::{
    accept_and_authenticate, connect, Channel, ChannelError, ChannelKind, Key, Message, Timeouts,
};

const MIGRATION: u64 = 42;
/// A `Ping` frame: header 8, nonce 8, MAC 16.
const PING_FRAME: usize = 32;

fn key(b: u8) -> Key {
    Key::from_bytes([b; 32])
}

fn short() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(5),
        handshake: Duration::from_millis(500),
        liveness: Duration::from_millis(400),
        ping_interval: Duration::from_millis(100),
    }
}

/// A source that accepts one connection, authenticates it with `server_key` and reports
/// every message (or the error that ended it).
fn source(
    server_key: Key,
    timeouts: Timeouts,
) -> (SocketAddr, mpsc::Receiver<Result<Message, ChannelError>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let lookup = |id| (id == MIGRATION).then(|| server_key.clone());
        let mut ch = match accept_and_authenticate(s, lookup, &timeouts) {
            Ok(ch) => ch,
            Err(e) => return tx.send(Err(e)).unwrap(),
        };
        loop {
            let r = ch.recv();
            let end = r.is_err();
            if let Ok(Message::Ping { nonce }) = r {
                let _ = ch.send(&Message::Pong { nonce });
            }
            if tx.send(r).is_err() || end {
                return;
            }
        }
    });
    (addr, rx)
}

#[test]
fn handshake_and_exchange_with_the_right_key() {
    let (addr, rx) = source(key(1), Timeouts::default());
    let ch = connect(
        addr,
        ChannelKind::Urgent,
        MIGRATION,
        &key(1),
        &Timeouts::default(),
    )
    .unwrap();
    assert_eq!(
        (ch.kind(), ch.migration_id()),
        (ChannelKind::Urgent, MIGRATION)
    );
    let (mut r, mut w) = ch.split();
    let sender = thread::spawn(move || {
        w.send(&Message::Ping { nonce: 7 }).unwrap();
        w.send_requests(&(0..1000).collect::<Vec<_>>()).unwrap();
        let data: Vec<u8> = (0..1024 * 4096).map(|i| (i % 253) as u8).collect();
        w.send_pages(3, &data).unwrap();
        w.send(&Message::Pages {
            first: 9,
            data: data[..8192].to_vec(),
        })
        .unwrap();
        w.send(&Message::Done).unwrap();
        (w, data)
    });
    assert_eq!(r.recv().unwrap(), Message::Pong { nonce: 7 });
    assert_eq!(rx.recv().unwrap().unwrap(), Message::Ping { nonce: 7 });
    let Message::Request { pages } = rx.recv().unwrap().unwrap() else {
        panic!()
    };
    assert_eq!(pages, (0..512).collect::<Vec<_>>());
    let Message::Request { pages } = rx.recv().unwrap().unwrap() else {
        panic!()
    };
    assert_eq!(pages, (512..1000).collect::<Vec<_>>());
    let (w, data) = sender.join().unwrap();
    assert_eq!(
        rx.recv().unwrap().unwrap(),
        Message::Pages {
            first: 3,
            data: data.clone()
        }
    );
    assert_eq!(
        rx.recv().unwrap().unwrap(),
        Message::Pages {
            first: 9,
            data: data[..8192].to_vec()
        }
    );
    assert_eq!(rx.recv().unwrap().unwrap(), Message::Done);
    w.shutdown();
    let e = rx.recv().unwrap().unwrap_err();
    assert!(e.peer_gone() && e.is_retryable(), "{e:?}");
}

#[test]
fn a_source_with_another_key_is_refused_by_the_destination() {
    let (addr, rx) = source(key(2), short());
    let e = connect(addr, ChannelKind::Bulk, MIGRATION, &key(1), &short()).unwrap_err();
    assert!(
        matches!(e, ChannelError::Auth(AuthError::BadProof)),
        "{e:?}"
    );
    assert!(e.is_bad_input() && e.is_fatal());
    // The source never gets a message: its handshake fails (the destination hung up).
    assert!(rx.recv().unwrap().is_err());
    assert!(rx.recv().is_err());
}

fn record(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut r = b"VMPM".to_vec();
    r.extend_from_slice(&1u16.to_le_bytes());
    r.extend_from_slice(&[kind, 0]);
    r.extend_from_slice(body);
    r
}

fn hello(migration: u64) -> Vec<u8> {
    let mut b = vec![ChannelKind::Urgent as u8, 0, 0, 0, 0, 0, 0, 0];
    b.extend_from_slice(&migration.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&[5; 32]);
    record(1, &b)
}

#[test]
fn a_destination_without_the_key_is_refused_by_the_source() {
    // A client that cannot verify the challenge and answers with a made-up proof.
    let (addr, rx) = source(key(1), short());
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&hello(MIGRATION)).unwrap();
    let mut challenge = [0; 80];
    s.read_exact(&mut challenge).unwrap();
    s.write_all(&record(3, &[0xaa; 32])).unwrap();
    let mut rejected = [0; 16];
    s.read_exact(&mut rejected).unwrap();
    assert_eq!(rejected[6], 5, "a Rejected record");
    assert_eq!(rejected[8], RejectCode::BadProof as u8);
    let e = rx.recv().unwrap().unwrap_err();
    assert!(
        matches!(e, ChannelError::Auth(AuthError::BadProof)),
        "{e:?}"
    );
    assert!(e.is_bad_input());
    assert!(rx.recv().is_err(), "no message delivered");
}

#[test]
fn an_unknown_migration_is_rejected() {
    let (addr, rx) = source(key(1), short());
    let e = connect(addr, ChannelKind::Urgent, 7, &key(1), &short()).unwrap_err();
    assert!(
        matches!(
            e,
            ChannelError::Auth(AuthError::Rejected(RejectCode::UnknownMigration))
        ),
        "{e:?}"
    );
    assert!(e.is_fatal());
    assert!(matches!(
        rx.recv().unwrap(),
        Err(ChannelError::Auth(AuthError::UnknownMigration(7)))
    ));
}

#[test]
fn garbage_instead_of_a_hello_is_bad_input() {
    let (addr, rx) = source(key(1), short());
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let e = rx.recv().unwrap().unwrap_err();
    assert!(
        matches!(e, ChannelError::Auth(AuthError::BadMagic(_))),
        "{e:?}"
    );
    assert!(e.is_bad_input());
}

#[test]
fn a_silent_client_times_out_in_the_handshake() {
    let (addr, rx) = source(key(1), short());
    let _s = TcpStream::connect(addr).unwrap();
    let e = rx.recv().unwrap().unwrap_err();
    assert!(e.is_retryable() && !e.is_bad_input(), "{e:?}");
}

#[derive(Clone, Copy)]
enum Tamper {
    /// Flip the byte at this offset of the first frame after the handshake.
    Flip(usize),
    /// Send the first frame twice.
    Replay,
    /// Send only this many bytes of the first frame, then close.
    Truncate(usize),
    /// Forward the handshake, then nothing either way (sockets stay open).
    Blackhole,
}

/// A proxy in front of `upstream` that tampers with the client's first frame; returns its
/// address and a sender whose drop ends a blackhole.
fn proxy(upstream: SocketAddr, t: Tamper) -> (SocketAddr, mpsc::Sender<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (hold_tx, hold_rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut s = TcpStream::connect(upstream).unwrap();
        // Hello, Challenge, Proof, Accepted.
        for (from_client, n) in [(true, 64), (false, 80), (true, 40), (false, 8)] {
            let mut b = vec![0; n];
            let (from, to) = if from_client {
                (&mut c, &mut s)
            } else {
                (&mut s, &mut c)
            };
            from.read_exact(&mut b).unwrap();
            to.write_all(&b).unwrap();
        }
        if let Tamper::Blackhole = t {
            let _ = hold_rx.recv();
            return;
        }
        let (mut s2, mut c2) = (s.try_clone().unwrap(), c.try_clone().unwrap());
        thread::spawn(move || std::io::copy(&mut s2, &mut c2));
        let mut f = [0; PING_FRAME];
        c.read_exact(&mut f).unwrap();
        match t {
            Tamper::Flip(i) => {
                f[i] ^= 0x40;
                s.write_all(&f).unwrap();
            }
            Tamper::Replay => {
                s.write_all(&f).unwrap();
                s.write_all(&f).unwrap();
            }
            Tamper::Truncate(n) => {
                s.write_all(&f[..n]).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                return;
            }
            Tamper::Blackhole => unreachable!(),
        }
        let _ = std::io::copy(&mut c, &mut s);
    });
    (addr, hold_tx)
}

fn through_proxy(
    t: Tamper,
) -> (
    Channel,
    mpsc::Receiver<Result<Message, ChannelError>>,
    mpsc::Sender<()>,
) {
    let (addr, rx) = source(key(1), short());
    let (paddr, hold) = proxy(addr, t);
    let ch = connect(paddr, ChannelKind::Urgent, MIGRATION, &key(1), &short()).unwrap();
    (ch, rx, hold)
}

#[test]
fn a_flipped_byte_fails_the_mac() {
    // The kind, the payload, the MAC.
    for at in [0, 9, 20, 31] {
        let (mut ch, rx, _hold) = through_proxy(Tamper::Flip(at));
        ch.send(&Message::Ping { nonce: 1 }).unwrap();
        let e = rx.recv().unwrap().unwrap_err();
        assert!(
            matches!(e, ChannelError::Frame(FrameError::BadMac { seq: 0 })),
            "{at}: {e:?}"
        );
        assert!(e.is_bad_input() && !e.is_retryable());
        // The connection is closed: nothing after it is delivered.
        let _ = ch.send(&Message::Ping { nonce: 2 });
        assert!(rx.recv().is_err());
    }
}

#[test]
fn a_flipped_reserved_header_byte_is_refused() {
    let (mut ch, rx, _hold) = through_proxy(Tamper::Flip(2));
    ch.send(&Message::Ping { nonce: 1 }).unwrap();
    let e = rx.recv().unwrap().unwrap_err();
    assert!(
        matches!(e, ChannelError::Frame(FrameError::Reserved)),
        "{e:?}"
    );
    assert!(e.is_bad_input());
}

#[test]
fn a_replayed_frame_fails_the_mac() {
    let (mut ch, rx, _hold) = through_proxy(Tamper::Replay);
    ch.send(&Message::Ping { nonce: 1 }).unwrap();
    assert_eq!(rx.recv().unwrap().unwrap(), Message::Ping { nonce: 1 });
    let e = rx.recv().unwrap().unwrap_err();
    assert!(
        matches!(e, ChannelError::Frame(FrameError::BadMac { seq: 1 })),
        "{e:?}"
    );
    assert!(e.is_bad_input());
}

#[test]
fn a_truncated_frame_is_a_clean_error() {
    for n in [0, 5, 8, 20] {
        let (mut ch, rx, _hold) = through_proxy(Tamper::Truncate(n));
        ch.send(&Message::Ping { nonce: 1 }).unwrap();
        let e = rx.recv().unwrap().unwrap_err();
        let want = if n == 0 { "Closed" } else { "Truncated" };
        assert_eq!(format!("{e:?}"), want, "{n} bytes");
        assert!(e.peer_gone() && e.is_retryable());
    }
}

#[test]
fn a_blackholed_connection_is_declared_dead() {
    let (mut ch, _rx, _hold) = through_proxy(Tamper::Blackhole);
    // Waiting for a frame: errors once the liveness deadline passes.
    let e = ch.recv().unwrap_err();
    assert!(matches!(e, ChannelError::Dead(_)), "{e:?}");
    assert!(e.peer_gone() && e.is_retryable());
    assert!(matches!(ch.recv(), Err(ChannelError::Broken)));

    // Sending into it: the socket buffers fill, then the send stalls past the deadline.
    let (ch, _rx, _hold) = through_proxy(Tamper::Blackhole);
    let (_r, mut w) = ch.split();
    let data = vec![1u8; 1024 * 4096];
    let e = (0..1024u64)
        .find_map(|i| w.send_pages(i * 1024, &data).err())
        .expect("4 GiB never fit in the socket buffers");
    assert!(e.peer_gone(), "{e:?}");
}

#[test]
fn ping_if_idle_keeps_an_idle_channel_alive() {
    let (addr, rx) = source(key(1), Timeouts::default());
    let t = Timeouts {
        ping_interval: Duration::ZERO,
        ..Timeouts::default()
    };
    let ch = connect(addr, ChannelKind::Bulk, MIGRATION, &key(1), &t).unwrap();
    let (_r, mut w) = ch.split();
    // A zero ping interval: every call pings.
    assert_eq!(w.ping_if_idle().unwrap(), Some(1));
    assert_eq!(w.ping_if_idle().unwrap(), Some(2));
    assert_eq!(rx.recv().unwrap().unwrap(), Message::Ping { nonce: 1 });
    assert_eq!(rx.recv().unwrap().unwrap(), Message::Ping { nonce: 2 });
}
