//! A test and benchmark helper: an asynchronous source that serves a byte buffer from its own
//! thread, after a configurable delay, and can be told to hold requests until released, fail
//! them, answer twice, push pages nobody asked for, or be lost. Not a production source.

use super::fetch::{Arrival, AsyncSource, Completions, Payload};
use super::SourceError;
use crossbeam::channel::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;
use vmpager_protocol::PAGE_SIZE;

/// A request the source received, as the worker made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Byte offset in the source.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// A fault waits on it.
    pub urgent: bool,
}

impl Request {
    /// The request covers byte `offset`.
    pub fn covers(&self, offset: u64) -> bool {
        offset >= self.offset && offset - self.offset < self.len
    }
}

/// How a [`DelayedSource`] answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct DelayedOptions {
    /// Waited before each answer.
    pub delay: Duration,
    /// Every answer is delivered twice.
    pub duplicates: bool,
}

#[derive(Debug)]
enum Command {
    Fetch(Request),
    Hold(u64),
    Release(u64),
    Fail(u64),
    Heal(u64),
    Flush(Sender<()>),
    Push { offset: u64, len: u64 },
    Deliver(Arrival),
    Lose,
}

/// Serves `data` (zeros past its end) asynchronously, from its own thread.
#[derive(Debug)]
pub struct DelayedSource {
    commands: Sender<Command>,
    requests: Receiver<Request>,
}

impl DelayedSource {
    /// A source of `data` answering into `completions`.
    pub fn new(
        data: Vec<u8>,
        completions: Completions,
        options: DelayedOptions,
    ) -> std::io::Result<Arc<DelayedSource>> {
        let (commands, rx) = crossbeam::channel::unbounded();
        let (seen, requests) = crossbeam::channel::unbounded();
        let server = Server {
            data,
            completions,
            options,
            seen,
            held: Vec::new(),
            failing: Vec::new(),
            stash: Vec::new(),
        };
        std::thread::Builder::new()
            .name("delayed-source".into())
            .spawn(move || server.run(rx))?;
        Ok(Arc::new(DelayedSource { commands, requests }))
    }

    /// Every request received, in order (each is handed to one receiver).
    pub fn requests(&self) -> &Receiver<Request> {
        &self.requests
    }

    /// Requests covering byte `offset` are held (not answered) until [`Self::release`].
    pub fn hold(&self, offset: u64) {
        self.send(Command::Hold(offset));
    }

    /// Stops holding `offset` and answers the held requests that cover it.
    pub fn release(&self, offset: u64) {
        self.send(Command::Release(offset));
    }

    /// Requests covering byte `offset` are answered with `Failed`.
    pub fn fail(&self, offset: u64) {
        self.send(Command::Fail(offset));
    }

    /// Stops failing requests covering `offset`.
    pub fn heal(&self, offset: u64) {
        self.send(Command::Heal(offset));
    }

    /// Waits until every command sent before (fetches, pushes, releases) was answered: their
    /// arrivals are in the VM's queue.
    pub fn flush(&self) {
        let (done, wait) = crossbeam::channel::bounded(1);
        self.send(Command::Flush(done));
        let _ = wait.recv();
    }

    /// Waits (up to `patience`) until the VM's worker has handled every arrival of the commands
    /// sent before: a [`Payload::Marker`] queued behind them is reached. `false` on timeout.
    pub fn settle(&self, patience: Duration) -> bool {
        let reached = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.deliver(Arrival {
            offset: 0,
            data: Payload::Marker {
                reached: reached.clone(),
            },
        });
        self.flush();
        let deadline = std::time::Instant::now() + patience;
        while !reached.load(std::sync::atomic::Ordering::Acquire) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    /// Delivers `len` bytes at `offset` that nobody asked for (a bulk push).
    pub fn push(&self, offset: u64, len: u64) {
        self.send(Command::Push { offset, len });
    }

    /// Delivers `arrival` as it is (after the pending commands).
    pub fn deliver(&self, arrival: Arrival) {
        self.send(Command::Deliver(arrival));
    }

    /// Declares the source lost ([`Completions::lost`]) after the pending commands.
    pub fn lose(&self) {
        self.send(Command::Lose);
    }

    fn send(&self, c: Command) {
        // The thread lives as long as the sender.
        let _ = self.commands.send(c);
    }
}

impl AsyncSource for DelayedSource {
    fn name(&self) -> &'static str {
        "delayed"
    }

    fn fetch(&self, offset: u64, len: u64, urgent: bool) {
        self.send(Command::Fetch(Request {
            offset,
            len,
            urgent,
        }));
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

struct Server {
    data: Vec<u8>,
    completions: Completions,
    options: DelayedOptions,
    seen: Sender<Request>,
    held: Vec<u64>,
    failing: Vec<u64>,
    stash: Vec<Request>,
}

impl Server {
    fn run(mut self, commands: Receiver<Command>) {
        while let Ok(c) = commands.recv() {
            match c {
                Command::Fetch(r) => {
                    let _ = self.seen.send(r);
                    if self.held.iter().any(|&o| r.covers(o)) {
                        self.stash.push(r);
                    } else {
                        self.answer(r.offset, r.len);
                    }
                }
                Command::Hold(o) => self.held.push(o),
                Command::Release(o) => {
                    self.held.retain(|&h| h != o);
                    let (ready, kept): (Vec<Request>, Vec<Request>) =
                        std::mem::take(&mut self.stash)
                            .into_iter()
                            .partition(|r| r.covers(o) && !self.held.iter().any(|&h| r.covers(h)));
                    self.stash = kept;
                    for r in ready {
                        self.answer(r.offset, r.len);
                    }
                }
                Command::Fail(o) => self.failing.push(o),
                Command::Heal(o) => self.failing.retain(|&f| f != o),
                Command::Flush(done) => {
                    let _ = done.send(());
                }
                Command::Push { offset, len } => self.answer(offset, len),
                Command::Deliver(a) => self.completions.deliver(a),
                Command::Lose => self.completions.lost(),
            }
        }
    }

    fn answer(&self, offset: u64, len: u64) {
        if !self.options.delay.is_zero() {
            std::thread::sleep(self.options.delay);
        }
        let times = if self.options.duplicates { 2 } else { 1 };
        for _ in 0..times {
            self.completions.deliver(self.arrival(offset, len));
        }
    }

    fn arrival(&self, offset: u64, len: u64) -> Arrival {
        if self
            .failing
            .iter()
            .any(|&o| o >= offset && o - offset < len)
        {
            return Arrival {
                offset,
                data: Payload::Failed {
                    len,
                    error: SourceError::Unusable("told to fail".into()),
                },
            };
        }
        if offset >= self.data.len() as u64 {
            return Arrival {
                offset,
                data: Payload::Zero { len },
            };
        }
        let mut bytes = vec![0u8; len.div_ceil(PAGE_SIZE) as usize * PAGE_SIZE as usize];
        let start = offset as usize;
        let end = (start + bytes.len()).min(self.data.len());
        bytes[..end - start].copy_from_slice(&self.data[start..end]);
        Arrival {
            offset,
            data: Payload::Data(bytes),
        }
    }
}
