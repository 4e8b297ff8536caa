//! The source side on the network: `vmpagerd --migration-listen ADDR` accepts the destination
//! daemons' connections, authenticates them (`vmpager_migration`, docs/migration-protocol.md)
//! and serves each migration's two channels:
//!
//! * **urgent**: `Request`s of pages a fault waits for, answered at once and in order, each
//!   run of pages in one `Pages` frame (all-zero pages as `Zeros`, no bytes);
//! * **bulk**: after the destination's `Resume` (what it has), every other page is pushed, from
//!   the neighbourhood of its latest `Hint` on, in runs of up to [`PUSH_RUN`] pages; then
//!   `SentAll`. A `Done` (the destination has every page) is answered with `DoneAck`, and the
//!   migration (with its hold on the VM's memory) ends. A destination without an urgent channel
//!   (`--migration-one-channel`, for comparison) sends its `Request`s here: they are answered
//!   as on the urgent channel, between pushed runs, behind what the socket holds already.
//!
//! Each connection has its own thread; a new bulk connection of a migration supersedes the
//! previous one (a reconnect after a failure).

use super::outgoing::{Outgoing, Outgoings};
use super::reader::PageContent;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmpager_migration::{
    accept_and_authenticate, ChannelKind, Message, Reader, Timeouts, Writer, MAX_PAGES_PER_FRAME,
    PAGE_SIZE,
};
use vmpager_protocol::message::MigrationState;

/// Pages per bulk frame (256 KiB): small enough that an urgent reply on the other channel
/// never waits long behind one in the kernel's queues.
pub const PUSH_RUN: usize = 64;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 256;

/// Errors of the migration listener.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding or configuring the listening socket failed (fatal at start).
    #[error("cannot listen for migrations on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl ServeError {
    /// Fatal: the daemon cannot serve what its command line asks.
    pub fn is_fatal(&self) -> bool {
        true
    }
}

/// The running listener.
#[derive(Debug)]
pub struct MigrationListener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl MigrationListener {
    /// Listens on `addr` (`host:port`) and serves the migrations of `outgoings`.
    pub fn start(
        addr: &str,
        outgoings: Arc<Outgoings>,
        timeouts: Timeouts,
    ) -> Result<MigrationListener, ServeError> {
        let err = |source| ServeError::Listen {
            addr: addr.to_owned(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(err)?;
        let bound = listener.local_addr().map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::Builder::new()
            .name("vmpager-migr".into())
            .spawn(move || accept_loop(listener, outgoings, timeouts, s))
            .map_err(err)?;
        Ok(MigrationListener { addr: bound, stop })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MigrationListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

fn accept_loop(
    listener: TcpListener,
    outgoings: Arc<Outgoings>,
    timeouts: Timeouts,
    stop: Arc<AtomicBool>,
) {
    let live = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(stream) = conn else { continue };
        if live.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            outgoings.refused.fetch_add(1, Ordering::Relaxed);
            continue; // Dropped: closed.
        }
        live.fetch_add(1, Ordering::Relaxed);
        let (o, l, t) = (outgoings.clone(), live.clone(), timeouts);
        let spawned = std::thread::Builder::new()
            .name("vmpager-migr-c".into())
            .spawn(move || {
                serve_connection(stream, &o, &t);
                l.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Authenticates a connection and serves its channel until it ends.
fn serve_connection(stream: TcpStream, outgoings: &Outgoings, timeouts: &Timeouts) {
    let channel = match accept_and_authenticate(stream, |id| outgoings.key(id), timeouts) {
        Ok(c) => c,
        Err(e) => {
            // Garbage, a wrong key or an unknown migration: counted, never fatal.
            outgoings.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "migration connection refused");
            return;
        }
    };
    let Some(out) = outgoings.get(channel.migration_id()) else {
        return;
    };
    out.connections.fetch_add(1, Ordering::Relaxed);
    let kind = channel.kind();
    let (reader, writer) = channel.split();
    let ended = match kind {
        ChannelKind::Urgent => serve_urgent(&out, reader, writer),
        ChannelKind::Bulk => serve_bulk(&out, reader, writer),
    };
    if let Err(e) = ended {
        tracing::debug!(migration = out.migration_id, ?kind, error = %e, "migration channel ended");
    }
    if matches!(out.state(), MigrationState::Complete) {
        outgoings.finished(&out);
    }
}

/// Reads `pages` consecutive pages from `first` and sends them: runs of data as `Pages`, runs
/// of zero pages as `Zeros`. Counts them (`pulled` or `pushed`) and marks them sent.
fn send_run(
    out: &Outgoing,
    writer: &Mutex<Writer>,
    first: u64,
    pages: usize,
    buf: &mut Vec<u8>,
    urgent: bool,
) -> Result<(), vmpager_migration::ChannelError> {
    let ps = PAGE_SIZE as usize;
    buf.resize(pages * ps, 0);
    if let Some(t) = out.tracker.as_ref().filter(|t| !t.is_frozen()) {
        // Hybrid, the guest still runs: a write after this point is seen (and the page sent
        // again); one racing with the read below is seen too.
        if let Err(e) = t.protect(first, pages as u64) {
            // Writes there would go unseen: nothing is sent that could be stale unnoticed.
            // The VMM is gone or broke its registration; the migration cannot go on.
            tracing::warn!(
                migration = out.migration_id,
                error = %e,
                "cannot write-protect the guest's memory: the hybrid migration is abandoned"
            );
            out.set_abandoned();
            return Err(vmpager_migration::ChannelError::Broken);
        }
    }
    let mut kinds = Vec::with_capacity(pages);
    for i in 0..pages {
        let page = first + i as u64;
        match out.reader.read(page, &mut buf[i * ps..(i + 1) * ps]) {
            Ok(c) => kinds.push(Some(c)),
            Err(e) => {
                tracing::trace!(page, error = %e, "a page cannot be read for migration");
                kinds.push(None);
            }
        }
    }
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    let mut i = 0;
    while i < pages {
        let kind = kinds[i];
        let mut j = i + 1;
        while j < pages && kinds[j] == kind {
            j += 1;
        }
        let at = first + i as u64;
        match kind {
            Some(PageContent::Data) => {
                w.send_pages(at, &buf[i * ps..j * ps])?;
                out.bytes
                    .fetch_add(((j - i) * ps) as u64, Ordering::Relaxed);
            }
            Some(PageContent::Zero) => w.send(&Message::Zeros {
                first: at,
                count: (j - i) as u32,
            })?,
            None => {
                for page in at..first + j as u64 {
                    w.send(&Message::Missing {
                        page,
                        reason: vmpager_migration::MissingReason::ReadFailed,
                    })?;
                }
            }
        }
        if kind.is_some() {
            let counter = if urgent { &out.pulled } else { &out.pushed };
            let mut sent = 0;
            for page in at..first + j as u64 {
                sent += u64::from(out.sent.set(page));
            }
            counter.fetch_add(
                if urgent { (j - i) as u64 } else { sent },
                Ordering::Relaxed,
            );
        }
        i = j;
    }
    Ok(())
}

/// Answers a `Request` (on either channel): each contiguous run of `pages` in one frame, in
/// order, on `writer` (on the bulk channel, behind whatever the push has in the socket already).
fn answer(
    out: &Outgoing,
    writer: &Mutex<Writer>,
    mut pages: Vec<u64>,
    buf: &mut Vec<u8>,
) -> Result<(), vmpager_migration::ChannelError> {
    let total = out.reader.total_pages();
    if out.is_live() {
        // Hybrid before the switchover: an urgent answer could overtake an `Invalidate` of its
        // page on the bulk channel, so the push brings it (in order with the invalidations).
        // No vCPU runs at the destination yet.
        if let Some(&p) = pages.iter().min() {
            out.cursor.store(p.min(total), Ordering::Relaxed);
        }
        return Ok(());
    }
    pages.sort_unstable();
    pages.dedup();
    let mut i = 0;
    while i < pages.len() {
        let first = pages[i];
        if first >= total {
            writer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(&Message::Missing {
                    page: first,
                    reason: vmpager_migration::MissingReason::OutOfRange,
                })?;
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < pages.len()
            && pages[j] == pages[j - 1] + 1
            && pages[j] < total
            && j - i < MAX_PAGES_PER_FRAME
        {
            j += 1;
        }
        send_run(out, writer, first, j - i, buf, true)?;
        i = j;
    }
    Ok(())
}

/// The urgent channel: requests in, pages out, in order.
fn serve_urgent(
    out: &Outgoing,
    mut reader: Reader,
    writer: Writer,
) -> Result<(), vmpager_migration::ChannelError> {
    let writer = Mutex::new(writer);
    let mut buf = Vec::new();
    loop {
        let msg = reader.recv()?;
        if out.state() != MigrationState::Running {
            return Ok(());
        }
        match msg {
            Message::Request { pages } => answer(out, &writer, pages, &mut buf)?,
            Message::Ping { nonce } => writer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(&Message::Pong { nonce })?,
            Message::Pong { .. } => {}
            other => {
                tracing::trace!(kind = ?other.kind(), "unexpected message on the urgent channel");
                let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                let _ = w.send(&Message::Error {
                    code: vmpager_migration::ErrorCode::BadState,
                    text: format!("{:?} on the urgent channel", other.kind()),
                });
                return Ok(());
            }
        }
    }
}

/// The bulk channel: a reader thread for the destination's messages, and this thread pushing.
fn serve_bulk(
    out: &Arc<Outgoing>,
    mut reader: Reader,
    writer: Writer,
) -> Result<(), vmpager_migration::ChannelError> {
    let generation = out.bulk_generation.fetch_add(1, Ordering::AcqRel) + 1;
    // The first message says what the destination has.
    let total = out.reader.total_pages();
    out.sent.clear_all();
    let mut resumed = 0;
    loop {
        match reader.recv()? {
            Message::Resume {
                total_pages,
                first,
                received,
            } if total_pages == total => {
                for (start, count) in received.set_ranges() {
                    for p in first + start..(first + start + count).min(total) {
                        out.sent.set(p);
                    }
                }
                resumed += received.len();
                if first + received.len() >= total {
                    break;
                }
            }
            Message::Resume { .. } => {
                return Err(vmpager_migration::ChannelError::Broken);
            }
            Message::Switchover => {
                // A destination that switched over on an earlier connection.
                out.switch_acked.store(true, Ordering::Release);
            }
            Message::Ping { .. } | Message::Pong { .. } => {}
            _ => return Err(vmpager_migration::ChannelError::Broken),
        }
        if resumed >= total {
            break;
        }
    }
    out.resumed_with.store(out.sent.count(), Ordering::Relaxed);
    if let Some(t) = &out.tracker {
        // An `Invalidate` may have been lost with the previous connection: every page written
        // since tracking began that the destination has is invalidated again.
        for p in 0..total {
            if t.ever_dirty(p) && out.sent.get(p) {
                t.mark_page(p);
            }
        }
    }
    let mut marker_sent = false;
    let writer = Arc::new(Mutex::new(writer));
    let stop = Arc::new(AtomicBool::new(false));
    let listener = {
        let (out, writer, stop) = (out.clone(), writer.clone(), stop.clone());
        std::thread::Builder::new()
            .name("vmpager-migr-b".into())
            .spawn(move || bulk_messages(&out, reader, &writer, &stop))
            .map_err(vmpager_migration::ChannelError::Io)?
    };
    let mut buf = Vec::new();
    let mut sent_all = false;
    let result = loop {
        if stop.load(Ordering::Acquire)
            || out.bulk_generation.load(Ordering::Acquire) != generation
            || out.state() != MigrationState::Running
        {
            break Ok(());
        }
        if let Err(e) = invalidate(out, &writer, &mut marker_sent) {
            break Err(e);
        }
        let from = out.cursor.load(Ordering::Relaxed);
        match out.sent.next_unset(from) {
            Some(first) => {
                let mut n = 1;
                while n < PUSH_RUN && first + (n as u64) < total && !out.sent.get(first + n as u64)
                {
                    n += 1;
                }
                out.cursor.store(first + n as u64, Ordering::Relaxed);
                if let Err(e) = send_run(out, &writer, first, n, &mut buf, false) {
                    break Err(e);
                }
                sent_all = false;
            }
            None => {
                if !sent_all {
                    let r = writer
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .send(&Message::SentAll);
                    if let Err(e) = r {
                        break Err(e);
                    }
                    sent_all = true;
                }
                // Nothing to push: wait for Done (the listener thread), pinging while idle.
                let r = writer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .ping_if_idle();
                if let Err(e) = r {
                    break Err(e);
                }
                std::thread::park_timeout(Duration::from_millis(50));
            }
        }
    };
    stop.store(true, Ordering::Release);
    writer.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
    let _ = listener.join();
    result
}

/// Hybrid: sends an `Invalidate` for every dirty page the destination has (or was sent), which
/// makes it unsent again (pushed again later); once the VM is frozen, then the `Switchover`
/// marker (once per connection).
fn invalidate(
    out: &Outgoing,
    writer: &Mutex<Writer>,
    marker_sent: &mut bool,
) -> Result<(), vmpager_migration::ChannelError> {
    let Some(t) = &out.tracker else {
        return Ok(());
    };
    // Frozen is read before the pages are taken: every write before the freeze is in them.
    let frozen = t.is_frozen();
    let mut ranges: Vec<vmpager_migration::PageRange> = Vec::new();
    let mut count = 0;
    for p in t.take_dirty() {
        if !out.sent.clear(p) {
            continue; // Not sent (or invalidated already): it goes with what it holds then.
        }
        count += 1;
        match ranges.last_mut() {
            Some(r) if r.first + r.count == p => r.count += 1,
            _ => ranges.push(vmpager_migration::PageRange { first: p, count: 1 }),
        }
    }
    if !ranges.is_empty() {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        for chunk in ranges.chunks(vmpager_migration::MAX_INVALIDATE_RANGES) {
            w.send(&Message::Invalidate {
                ranges: chunk.to_vec(),
            })?;
        }
        t.invalidated.fetch_add(count, Ordering::Relaxed);
    }
    if frozen && !*marker_sent {
        writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(&Message::Switchover)?;
        *marker_sent = true;
    }
    Ok(())
}

/// The destination's messages on the bulk channel: hints move the push, `Done` ends it, and
/// the requests of a destination without an urgent channel are answered between pushed runs.
fn bulk_messages(out: &Outgoing, mut reader: Reader, writer: &Mutex<Writer>, stop: &AtomicBool) {
    let mut buf = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let msg = match reader.recv() {
            Ok(m) => m,
            Err(_) => break,
        };
        match msg {
            Message::Hint { page } if page < out.reader.total_pages() => {
                out.cursor.store(page, Ordering::Relaxed);
            }
            Message::Request { pages } => {
                let r = answer(out, writer, pages, &mut buf);
                if r.is_err() {
                    break;
                }
            }
            Message::Ping { nonce } => {
                let r = writer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send(&Message::Pong { nonce });
                if r.is_err() {
                    break;
                }
            }
            Message::Switchover => out.switch_acked.store(true, Ordering::Release),
            Message::Done if out.tracker.is_some() && !out.switch_acked.load(Ordering::Acquire) => {
                // Hybrid: every page is there, but the guest may still write; the destination
                // says `Done` again after the switchover.
            }
            Message::Done => {
                out.set_state(MigrationState::Complete);
                let _ = writer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send(&Message::DoneAck);
                break;
            }
            _ => {}
        }
    }
    stop.store(true, Ordering::Release);
}
