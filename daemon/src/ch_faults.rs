//! Serving cloud-hypervisor's postcopy fault connection (`AttachChannel` with
//! `ChannelProtocol::CloudHypervisor`): cloud-hypervisor owns the uffd of its mapping of the
//! daemon's memfds and asks for each page it needs — demand faults, and its own background pull
//! of every page — with a `PageFault` request (a GPA and the page size of its memory zone). The
//! daemon writes the page into the memfd and answers `Ok` with length 0; cloud-hypervisor then
//! maps it with `UFFDIO_CONTINUE`. EOF on the connection is cloud-hypervisor's "every page is
//! in" (docs/cloud-hypervisor.md).
//!
//! Requests come one at a time (cloud-hypervisor waits for each answer), so the socket's send
//! buffer never fills; a peer that pipelines without reading its answers is dropped.

use crate::ahead::{without_resident, Planner, AHEAD_CHUNK};
use crate::fault::Drained;
use crate::metrics::{Install, VmMetrics};
use crate::session::Vm;
use crate::source::Fill;
use crate::working_set::locate_source_page;
use rustix::io::Errno;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmpager_compat::cloud_hypervisor::wire::{
    Command, MemoryRange, Request, Response, MEMORY_RANGE_LEN, REQUEST_LEN,
};

/// Errors setting up a channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The fd is not a connected stream socket.
    #[error("the fault channel must be a connected stream socket")]
    NotAStream(#[source] std::io::Error),
}

impl ChannelError {
    /// The client sent something unusable.
    pub fn is_bad_input(&self) -> bool {
        true
    }
}

/// Why a `PageFault` request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No region holds the GPA.
    Outside,
    /// The length is not the page size of the region, or the GPA not aligned to it.
    BadPage,
    /// The page source failed.
    Source,
}

/// What the bytes at the head of the fault connection amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framed {
    /// Part of a request: wait for more.
    Partial,
    /// A complete `PageFault` request for this range (32 bytes).
    PageFault(MemoryRange),
    /// A complete header (16 bytes) that is not a `PageFault` with a 16-byte range (`None`: not
    /// a valid header at all): the session ends.
    Other(Option<Request>),
}

impl Framed {
    /// Bytes of the connection the request takes (consumed once it is answered).
    pub fn len(&self) -> usize {
        match self {
            Framed::Partial => 0,
            Framed::PageFault(_) => REQUEST_LEN + MEMORY_RANGE_LEN,
            Framed::Other(_) => REQUEST_LEN,
        }
    }

    /// No complete request.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Frames the request at the head of `bytes` (what the connection holds, as peeked): a
/// 16-byte request header, then, for a `PageFault` of length 16, its [`MemoryRange`]. Bytes
/// past the first request are left for the next call.
pub fn frame(bytes: &[u8]) -> Framed {
    let Some(h) = bytes.first_chunk::<REQUEST_LEN>() else {
        return Framed::Partial;
    };
    let header = Request::decode(h).ok();
    let wants_range = header.is_some_and(|r| {
        r.command() == Command::PageFault && r.length() == MEMORY_RANGE_LEN as u64
    });
    if !wants_range {
        return Framed::Other(header);
    }
    match bytes[REQUEST_LEN..].first_chunk::<MEMORY_RANGE_LEN>() {
        Some(r) => Framed::PageFault(MemoryRange::decode(r)),
        None => Framed::Partial,
    }
}

/// The page a `PageFault` asks for: the index of the region holding its GPA (regions given as
/// `(gpa, size, page_size)`, validated) and the page's index in it. The length must be the
/// region's page size and the GPA aligned to it.
pub fn locate_page(
    regions: impl IntoIterator<Item = (u64, u64, u64)>,
    range: MemoryRange,
) -> Result<(usize, usize), Refused> {
    let (ri, (start, _, ps)) = regions
        .into_iter()
        .enumerate()
        .find(|(_, (start, size, _))| range.gpa >= *start && range.gpa - *start < *size)
        .ok_or(Refused::Outside)?;
    let off = range.gpa - start;
    if range.length != ps || !off.is_multiple_of(ps) {
        return Err(Refused::BadPage);
    }
    Ok((ri, (off / ps) as usize))
}

/// Pages cloud-hypervisor has asked for, and where its background pull will ask next (to tell
/// its demand faults from its background pulls when recording a working set).
#[derive(Debug)]
struct Requested {
    /// One bit per page of each region.
    bits: Vec<Vec<u64>>,
    /// Region indices in the order of cloud-hypervisor's walk: its memory range table's order,
    /// which is the order of the ranges in the snapshot, so of the regions' source offsets.
    order: Vec<usize>,
    /// The first page not asked for at or after the background pull's position: (position
    /// in `order`, page).
    cursor: (usize, usize),
}

impl Requested {
    fn new(vm: &Vm) -> Requested {
        let regions = vm.memory.regions();
        let mut order: Vec<usize> = (0..regions.len()).collect();
        order.sort_by_key(|&i| regions[i].spec.source_offset());
        Requested {
            bits: regions
                .iter()
                .map(|r| vec![0; r.pages().div_ceil(64)])
                .collect(),
            order,
            cursor: (0, 0),
        }
    }

    fn test_and_set(&mut self, ri: usize, page: usize) -> bool {
        let Some(w) = self.bits.get_mut(ri).and_then(|b| b.get_mut(page / 64)) else {
            return true;
        };
        let bit = 1u64 << (page % 64);
        let was = *w & bit != 0;
        *w |= bit;
        was
    }

    /// Notes a request; true if it is the page the background pull asks for next.
    fn note(&mut self, vm: &Vm, ri: usize, page: usize) -> bool {
        let background = self.order.get(self.cursor.0) == Some(&ri) && self.cursor.1 == page;
        self.test_and_set(ri, page);
        // Move the cursor past every page already asked for.
        let regions = vm.memory.regions();
        while let Some(&r) = self.order.get(self.cursor.0) {
            let pages = regions[r].pages();
            while self.cursor.1 < pages
                && self.bits[r][self.cursor.1 / 64] & (1 << (self.cursor.1 % 64)) != 0
            {
                self.cursor.1 += 1;
            }
            if self.cursor.1 < pages {
                break;
            }
            self.cursor = (self.cursor.0 + 1, 0);
        }
        background
    }
}

/// Serves one VM's cloud-hypervisor fault connection.
#[derive(Debug)]
pub struct ChFaultServer {
    vm: Arc<Vm>,
    socket: OwnedFd,
    /// The head of the connection, as peeked: a request header and its range.
    buf: [u8; REQUEST_LEN + MEMORY_RANGE_LEN],
    /// Bytes of an incomplete request at the head of the connection.
    have: usize,
    plan: Planner,
    residency: Vec<u8>,
    /// Pages on their way into the memfd (grown to the largest run on first use).
    bounce: Vec<u8>,
    latencies: Vec<Duration>,
    requested: Option<Requested>,
    replay: Vec<u64>,
    refused: Option<Instant>,
}

impl ChFaultServer {
    /// A server of `vm`'s channel on `socket`, made non-blocking.
    pub fn new(vm: Arc<Vm>, socket: OwnedFd) -> Result<ChFaultServer, ChannelError> {
        let kind = rustix::net::sockopt::socket_type(&socket)
            .map_err(|e| ChannelError::NotAStream(e.into()))?;
        if kind != rustix::net::SocketType::STREAM {
            return Err(ChannelError::NotAStream(std::io::Error::other(
                "not SOCK_STREAM",
            )));
        }
        let flags =
            rustix::fs::fcntl_getfl(&socket).map_err(|e| ChannelError::NotAStream(e.into()))?;
        rustix::fs::fcntl_setfl(&socket, flags | rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| ChannelError::NotAStream(e.into()))?;
        Ok(ChFaultServer {
            requested: vm.recorder.is_some().then(|| Requested::new(&vm)),
            plan: Planner::new(&vm),
            vm,
            socket,
            buf: [0; REQUEST_LEN + MEMORY_RANGE_LEN],
            have: 0,
            residency: Vec::new(),
            bounce: Vec::new(),
            latencies: Vec::new(),
            replay: Vec::new(),
            refused: None,
        })
    }

    /// The VM served.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The socket (for registration with a poller).
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Answers every complete request received, then installs a chunk ahead (of a stream, or
    /// from the replay queue) if no request is waiting. `Closed` at EOF (cloud-hypervisor has
    /// every page), on `Abandon`, and on a protocol violation.
    pub fn drain(&mut self) -> Drained {
        loop {
            // Peek, and consume a request only once it is answered: a request the daemon
            // read but did not answer when it was killed stays in the socket for the next
            // daemon (the client keeps a copy of the socket, `ReclaimVm`).
            let peeked = rustix::net::recv(
                &self.socket,
                &mut self.buf,
                rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
            )
            .map(|(n, _)| n);
            match peeked {
                Ok(0) => {
                    self.flush_latencies();
                    tracing::debug!(
                        vm = self.vm.id,
                        "cloud-hypervisor closed its fault connection"
                    );
                    return Drained::Closed;
                }
                Ok(n) => match frame(&self.buf[..n]) {
                    Framed::Partial => {
                        // Half a request: the rest comes with the next readiness.
                        self.have = n;
                        break;
                    }
                    f @ Framed::Other(header) => {
                        self.consume(f.len());
                        let d = self.end_of_session(header);
                        return self.finish(d);
                    }
                    f @ Framed::PageFault(range) => {
                        let ok = self.serve(range);
                        self.consume(f.len());
                        self.have = 0;
                        if !ok {
                            return self.finish(Drained::Closed);
                        }
                    }
                },
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => {
                    self.have = 0;
                    break;
                }
                Err(_) => return self.finish(Drained::Closed),
            }
        }
        self.flush_latencies();
        if self.have != 0 {
            // Half a request: the rest comes with the next readiness.
            return Drained::Idle;
        }
        if self.plan.has_ahead() {
            if let Some((ri, chunk)) = self.plan.next_ahead(&self.vm) {
                let start = chunk.start;
                let run = without_resident(&self.vm, ri, chunk, start, &mut self.residency);
                if let Some(done) = self.fill(ri, run) {
                    VmMetrics::add(&self.vm.metrics.pages_prefetched, done.len() as u64);
                }
            }
            return Drained::More;
        }
        if !self.vm.replay.is_empty() {
            self.replay_chunk();
            return Drained::More;
        }
        Drained::Idle
    }

    /// Ends the session on the daemon's side: the socket is shut down, so cloud-hypervisor
    /// sees EOF although the VMM's front end keeps a copy of it.
    fn finish(&mut self, d: Drained) -> Drained {
        self.flush_latencies();
        if d == Drained::Closed {
            let _ = rustix::net::shutdown(&self.socket, rustix::net::Shutdown::Both);
        }
        d
    }

    /// Removes `n` bytes (an answered request) from the socket.
    fn consume(&mut self, n: usize) {
        let mut sink = [0u8; REQUEST_LEN + MEMORY_RANGE_LEN];
        let mut left = n.min(sink.len());
        while left > 0 {
            match rustix::io::read(&self.socket, &mut sink[..left]) {
                Ok(0) => return,
                Ok(k) => left -= k,
                Err(Errno::INTR) => {}
                Err(_) => return,
            }
        }
    }

    fn flush_latencies(&mut self) {
        if !self.latencies.is_empty() {
            self.vm.metrics.record_latencies(&self.latencies);
            self.latencies.clear();
        }
    }

    /// Any other request ends the session: `Abandon` is answered `Ok` (as cloud-hypervisor's
    /// own sender does), anything else `Error`.
    fn end_of_session(&mut self, header: Option<Request>) -> Drained {
        let response = match header.map(|r| r.command()) {
            Some(Command::Abandon) => Response::ok(),
            other => {
                VmMetrics::bump(&self.vm.metrics.channel_errors);
                tracing::warn!(
                    vm = self.vm.id,
                    request = ?other,
                    "cloud-hypervisor fault connection: not a PageFault request, closing"
                );
                Response::error()
            }
        };
        let _ = self.respond(response);
        Drained::Closed
    }

    /// Answers a `PageFault` for `range`. False if the connection must close.
    fn serve(&mut self, range: MemoryRange) -> bool {
        let start = Instant::now();
        VmMetrics::bump(&self.vm.metrics.channel_requests);
        let response = match self.page(range) {
            Ok(()) => Response::ok(),
            Err(why) => {
                self.note_refusal(range, why);
                Response::error()
            }
        };
        let sent = self.respond(response);
        self.latencies.push(start.elapsed());
        sent
    }

    fn respond(&self, response: Response) -> bool {
        // One 16-byte answer per request: it always fits an empty send buffer.
        matches!(rustix::io::write(&self.socket, &response.encode()), Ok(16))
    }

    fn note_refusal(&mut self, range: MemoryRange, why: Refused) {
        VmMetrics::bump(&self.vm.metrics.channel_errors);
        let now = Instant::now();
        if self
            .refused
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.refused = Some(now);
        let why = match why {
            Refused::Outside => "its GPA lies outside every memory slot",
            Refused::BadPage => {
                "its length is not the page size of its slot (or the GPA is not aligned to it)"
            }
            Refused::Source => "the page source could not deliver it",
        };
        tracing::warn!(
            vm = self.vm.id,
            gpa = format_args!("{:#x}", range.gpa),
            len = range.length,
            "cloud-hypervisor PageFault refused: {why}"
        );
    }

    /// Puts the page of `range` into the memfd (with its readahead run), unless it is there.
    fn page(&mut self, range: MemoryRange) -> Result<(), Refused> {
        let regions = self.vm.memory.regions();
        let (ri, page) = locate_page(
            regions
                .iter()
                .map(|r| (r.spec.gpa(), r.size(), r.page_size())),
            range,
        )?;
        let region = &regions[ri];
        let off = page as u64 * region.page_size();
        let vm = self.vm.clone();
        if let Some(req) = &mut self.requested {
            if !req.note(&vm, ri, page) {
                if let Some(rec) = &vm.recorder {
                    rec.note(ri, page, region.spec.source_offset() + off);
                }
            }
        }
        if region.state.is_populated(page) {
            if region.is_resident(off) {
                return Ok(());
            }
            // Installed once and gone since: cloud-hypervisor removed it (a balloon). It is
            // zeros now, never the snapshot's bytes again.
            region.state.discard(page, page + 1);
        }
        let run = self.plan.run_around(&vm, ri, page);
        let run = without_resident(&vm, ri, run, page, &mut self.residency);
        if run.is_empty() {
            // Already in the memfd (written through another mapping): leave it.
            region.state.mark_populated(page);
            return Ok(());
        }
        let mut done = self.fill(ri, run.clone()).filter(|d| d.contains(&page));
        if done.is_none() && run.len() > 1 {
            // The run failed or stopped short: the requested page alone gets its own try.
            done = self.fill(ri, page..page + 1);
        }
        let Some(done) = done.filter(|d| d.contains(&page)) else {
            VmMetrics::bump(&vm.metrics.source_errors);
            return Err(Refused::Source);
        };
        VmMetrics::add(&vm.metrics.pages_prefetched, done.len() as u64 - 1);
        Ok(())
    }

    /// Fills `run` of region `ri` into the memfd from the source (a removed page: zeros);
    /// returns the pages filled, marked populated and counted.
    fn fill(&mut self, ri: usize, run: Range<usize>) -> Option<Range<usize>> {
        if run.is_empty() {
            return None;
        }
        let vm = &*self.vm;
        let region = &vm.memory.regions()[ri];
        let ps = region.page_size();
        let need = (run.len() as u64 * ps) as usize;
        if self.bounce.len() < need {
            self.bounce.resize(need, 0);
        }
        let (fill, done) = if run.len() == 1 && region.state.is_discarded(run.start) {
            let off = run.start as u64 * ps;
            match region.install_zeros(off, ps, &mut self.bounce) {
                Ok(n) => (Fill::Zero, run.start..run.start + (n / ps) as usize),
                Err(e) => {
                    tracing::trace!(error = %e, "cannot install a zero page for a channel request");
                    return None;
                }
            }
        } else {
            match vm.fill_owned(ri, run.clone(), &mut self.bounce) {
                Ok(r) => r,
                Err(e) => {
                    tracing::trace!(error = %e, "page source failed on a channel request");
                    return None;
                }
            }
        };
        let counter = match fill {
            Fill::Data => &vm.metrics.pages_from_source,
            Fill::Zero => &vm.metrics.pages_zero,
        };
        VmMetrics::add(counter, done.len() as u64);
        vm.metrics
            .count_installed(Install::Write, done.len() as u64);
        for q in done.clone() {
            region.state.mark_populated(q);
        }
        // A page that raced in (someone else wrote it) stopped the run: it is there, which is
        // all a request needs.
        if done.end < run.end && region.is_resident(done.end as u64 * ps) {
            region.state.mark_populated(done.end);
            return Some(run.start..done.end + 1);
        }
        (!done.is_empty()).then_some(done)
    }

    /// Pushes the next chunk of the replay queue into the memfds.
    fn replay_chunk(&mut self) {
        let mut pages = std::mem::take(&mut self.replay);
        self.vm.replay.take(AHEAD_CHUNK, &mut pages);
        for &source_page in &pages {
            let Some((ri, page)) = locate_source_page(&self.vm.memory, source_page) else {
                continue;
            };
            if !self.vm.memory.regions()[ri].state.is_untouched(page) {
                continue;
            }
            let run = without_resident(&self.vm, ri, page..page + 1, page, &mut self.residency);
            if let Some(done) = self.fill(ri, run) {
                VmMetrics::add(&self.vm.metrics.pages_replayed, done.len() as u64);
            }
        }
        self.replay = pages;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_fault(gpa: u64, length: u64) -> Vec<u8> {
        let mut bytes = Request::page_fault().encode().to_vec();
        bytes.extend_from_slice(&MemoryRange { gpa, length }.encode());
        bytes
    }

    /// Lets `bytes` arrive in pieces of at most `piece` bytes into a connection that the
    /// server peeks at after each piece, consuming each request once framed (as `drain` does).
    fn feed(queued: &mut Vec<u8>, bytes: &[u8], piece: usize) -> Vec<Framed> {
        let mut out = Vec::new();
        for chunk in bytes.chunks(piece) {
            queued.extend_from_slice(chunk);
            loop {
                let head = &queued[..queued.len().min(REQUEST_LEN + MEMORY_RANGE_LEN)];
                match frame(head) {
                    Framed::Partial => break,
                    f => {
                        queued.drain(..f.len());
                        out.push(f);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn requests_are_framed_from_pieces_of_any_size() {
        let mut stream = page_fault(0x1000, 4096);
        stream.extend(page_fault(1 << 32, 2 << 20));
        stream.extend(Request::abandon().encode());
        for piece in [1, 3, 16, 100] {
            let mut queued = Vec::new();
            assert_eq!(
                feed(&mut queued, &stream, piece),
                vec![
                    Framed::PageFault(MemoryRange {
                        gpa: 0x1000,
                        length: 4096
                    }),
                    Framed::PageFault(MemoryRange {
                        gpa: 1 << 32,
                        length: 2 << 20
                    }),
                    Framed::Other(Some(Request::abandon())),
                ],
                "pieces of {piece}"
            );
            assert!(queued.is_empty());
        }
        // A PageFault header with another length, and garbage, end the session at the header.
        let mut queued = Vec::new();
        let odd = Request::new(Command::PageFault, 8).encode();
        assert_eq!(
            feed(&mut queued, &odd, 16),
            vec![Framed::Other(Some(Request::new(Command::PageFault, 8)))]
        );
        assert_eq!(feed(&mut queued, &[0xff; 16], 5), vec![Framed::Other(None)]);
        // Half a request stays in the connection.
        assert!(feed(&mut queued, &page_fault(0, 4096)[..20], 7).is_empty());
        assert_eq!(queued.len(), 20);
    }

    #[test]
    fn a_page_fault_must_name_one_aligned_page_of_a_region() {
        let regions = [(0u64, 1u64 << 20, 4096u64), (1 << 32, 4 << 20, 2 << 20)];
        let at = |gpa, length| locate_page(regions, MemoryRange { gpa, length });
        assert_eq!(at(0x3000, 4096), Ok((0, 3)));
        assert_eq!(at((1 << 32) + (2 << 20), 2 << 20), Ok((1, 1)));
        assert_eq!(at(1 << 20, 4096), Err(Refused::Outside));
        assert_eq!(at(u64::MAX, 4096), Err(Refused::Outside));
        assert_eq!(at(0x3000, 8192), Err(Refused::BadPage));
        assert_eq!(at(0x3001, 4096), Err(Refused::BadPage));
        assert_eq!(at((1 << 32) + 4096, 2 << 20), Err(Refused::BadPage));
    }
}
