//! The destination's connections to the source: each channel's thread connects, serves and
//! reconnects (with back-off) until the migration ends or the source is lost; a reader thread per
//! connection takes what the source sends.

use super::{Remote, RemoteParams, RESUME_CHUNK};
use crate::source::{Arrival, Payload, SourceError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmpager_migration::{
    connect, Backoff, ChannelError, ChannelKind, Message, Reader, Writer, PAGE_SIZE,
};
use vmpager_protocol::message::MigrationState;

impl Remote {
    /// Connects, serves, reconnects, until the migration ends or the source is lost.
    pub(super) fn run_channel(self: Arc<Remote>, kind: ChannelKind, p: &RemoteParams) {
        if kind == ChannelKind::Bulk && !p.push && !self.wait_until_full() {
            return;
        }
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        let mut unreachable_since = Instant::now();
        let mut connected_before = false;
        while !self.stopped() {
            match connect(p.addr.as_str(), kind, p.migration_id, &p.key, &p.timeouts) {
                Ok(channel) => {
                    if connected_before {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    connected_before = true;
                    backoff.reset();
                    let (reader, writer) = channel.split();
                    let r = match kind {
                        ChannelKind::Urgent => self.serve_urgent(reader, writer),
                        ChannelKind::Bulk => self.serve_bulk(reader, writer),
                    };
                    if let Err(e) = r {
                        if e.is_bad_input() {
                            self.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::debug!(?kind, error = %e, "migration channel broke");
                    }
                    unreachable_since = Instant::now();
                }
                Err(e) => {
                    if e.is_bad_input() {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::trace!(?kind, error = %e, "cannot reach the migration source");
                }
            }
            if self.stopped() || self.state() != MigrationState::Running {
                return;
            }
            if unreachable_since.elapsed() > p.deadline {
                tracing::warn!(
                    migration = p.migration_id,
                    "the migration source is lost: pages not here are poisoned"
                );
                self.abandon();
                return;
            }
            let delay = backoff.next_delay();
            let r = self.requests();
            let _ = self.wake.wait_timeout(r, delay);
        }
    }

    /// Pull only: the bulk channel is opened once every page is here, only to say so
    /// (`Resume` with nothing missing, then `Done`). `false` if the migration stopped first.
    fn wait_until_full(&self) -> bool {
        let mut r = self.requests();
        while !self.received.is_full() && !self.stopped() {
            r = self
                .wake
                .wait_timeout(r, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        !self.stopped()
    }

    /// The urgent channel: a reader thread takes pages in; this thread sends requests.
    fn serve_urgent(
        self: &Arc<Remote>,
        reader: Reader,
        mut writer: Writer,
    ) -> Result<(), ChannelError> {
        // Everything still awaited is asked again on a new connection.
        {
            let mut r = self.requests();
            let again: Vec<u64> = r.pending.iter().copied().collect();
            r.queue = again;
        }
        let broken = Arc::new(AtomicBool::new(false));
        let reading = {
            let (me, broken) = (self.clone(), broken.clone());
            std::thread::Builder::new()
                .name("vmpager-pull-ur".into())
                .spawn(move || {
                    let r = me.read_pages(reader, true);
                    broken.store(true, Ordering::Release);
                    me.wake.notify_all();
                    r
                })
                .map_err(ChannelError::Io)?
        };
        let result = loop {
            let batch = {
                let mut r = self.requests();
                while r.queue.is_empty() && !self.stopped() && !broken.load(Ordering::Acquire) {
                    let (guard, _) = self
                        .wake
                        .wait_timeout(r, Duration::from_millis(500))
                        .unwrap_or_else(|p| p.into_inner());
                    r = guard;
                    if r.queue.is_empty() {
                        break;
                    }
                }
                std::mem::take(&mut r.queue)
            };
            if self.stopped()
                || broken.load(Ordering::Acquire)
                || self.state() != MigrationState::Running
            {
                break Ok(());
            }
            if !batch.is_empty() {
                if let Err(e) = writer.send_requests(&batch) {
                    break Err(e);
                }
            }
            if let Err(e) = writer.ping_if_idle() {
                break Err(e);
            }
        };
        writer.shutdown();
        let read = reading.join().unwrap_or(Ok(()));
        result.and(read)
    }

    /// The bulk channel: says what is here, then takes pushed pages in; this thread sends
    /// hints and pings, and `Done` once every page is here. One channel: it sends the requests
    /// too (every page still awaited again on a new connection), and its reader takes their
    /// answers.
    fn serve_bulk(self: &Arc<Remote>, reader: Reader, writer: Writer) -> Result<(), ChannelError> {
        let mut writer = writer;
        let total = self.received.total();
        let one_channel = self.one_channel.load(Ordering::Relaxed);
        if one_channel {
            let mut r = self.requests();
            let again: Vec<u64> = r.pending.iter().copied().collect();
            r.queue = again;
        }
        if self.marker_seen.load(Ordering::Acquire) {
            // Hybrid, switched over on an earlier connection: the source must not invalidate
            // (and may believe our `Done`).
            writer.send(&Message::Switchover)?;
        }
        let mut first = 0;
        loop {
            let len = RESUME_CHUNK.min(total - first);
            writer.send(&Message::Resume {
                total_pages: total,
                first,
                received: self.received.to_rle(first, len),
            })?;
            first += len;
            if first >= total {
                break;
            }
        }
        let broken = Arc::new(AtomicBool::new(false));
        let reading = {
            let (me, broken) = (self.clone(), broken.clone());
            std::thread::Builder::new()
                .name("vmpager-pull-br".into())
                .spawn(move || {
                    let r = me.read_pages(reader, false);
                    broken.store(true, Ordering::Release);
                    me.wake.notify_all();
                    r
                })
                .map_err(ChannelError::Io)?
        };
        let mut done_sent = false;
        let result = loop {
            if self.stopped() || broken.load(Ordering::Acquire) {
                break Ok(());
            }
            if self.state() == MigrationState::Complete {
                break Ok(());
            }
            if one_channel {
                let batch = std::mem::take(&mut self.requests().queue);
                if !batch.is_empty() {
                    if let Err(e) = writer.send_requests(&batch) {
                        break Err(e);
                    }
                }
            }
            if self.ack_pending.swap(false, Ordering::AcqRel) {
                if let Err(e) = writer.send(&Message::Switchover) {
                    break Err(e);
                }
                // A `Done` sent before the switchover was not believed: sent again.
                done_sent = false;
            }
            if !self.received.is_full() {
                done_sent = false; // Invalidated pages (hybrid) are missing again.
            }
            if self.received.is_full() && !done_sent {
                if let Err(e) = writer.send(&Message::Done) {
                    break Err(e);
                }
                done_sent = true;
            }
            let hint = self.hint.load(Ordering::Relaxed);
            if hint != u64::MAX && hint != self.hint_sent.swap(hint, Ordering::Relaxed) {
                if let Err(e) = writer.send(&Message::Hint { page: hint }) {
                    break Err(e);
                }
            }
            if let Err(e) = writer.ping_if_idle() {
                break Err(e);
            }
            let r = self.requests();
            // A request queued since the batch was taken is sent at once (`fetch` queues it
            // under this lock and wakes us after).
            if !one_channel || r.queue.is_empty() {
                let _ = self.wake.wait_timeout(r, Duration::from_millis(20));
            }
        };
        writer.shutdown();
        let read = reading.join().unwrap_or(Ok(()));
        result.and(read)
    }

    /// Reads pages (and the source's other messages) until the connection ends.
    fn read_pages(&self, mut reader: Reader, urgent: bool) -> Result<(), ChannelError> {
        loop {
            let msg = reader.recv()?;
            if self.stopped() {
                return Ok(());
            }
            match msg {
                Message::Pages { first, data } => {
                    let count = data.len() as u64 / PAGE_SIZE;
                    self.arrived(first, count, urgent, Payload::Data(data));
                }
                Message::Zeros { first, count } => {
                    let len = u64::from(count) * PAGE_SIZE;
                    self.arrived(first, u64::from(count), urgent, Payload::Zero { len });
                }
                Message::Missing { page, reason } => {
                    self.poisoned.fetch_add(1, Ordering::Relaxed);
                    let failed = Arrival {
                        offset: page.saturating_mul(PAGE_SIZE),
                        data: Payload::Failed {
                            len: PAGE_SIZE,
                            error: SourceError::Unusable(format!(
                                "the migration source cannot send page {page}: {reason:?}"
                            )),
                        },
                    };
                    if urgent {
                        self.completions.deliver_urgent(failed);
                    } else {
                        self.completions.deliver(failed);
                    }
                    let mut r = self.requests();
                    r.pending.remove(&page);
                    r.asked.remove(&page);
                }
                Message::DoneAck => {
                    self.set_state(MigrationState::Complete);
                    self.stop.store(true, Ordering::Release);
                    self.wake.notify_all();
                    return Ok(());
                }
                Message::Invalidate { ranges } if !urgent => self.invalidate(&ranges),
                Message::Switchover if !urgent => self.switchover(),
                Message::SentAll | Message::Pong { .. } | Message::Ping { .. } => {}
                Message::Error { code, text } => {
                    tracing::debug!(?code, %text, "the migration source refused");
                    return Err(ChannelError::Broken);
                }
                _ => return Err(ChannelError::Broken),
            }
        }
    }
}
