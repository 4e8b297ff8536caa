//! Firecracker's UFFD protocol, measured side by side in one run: per-fault latency and rate of
//! host threads faulting on Firecracker-style memory (private anonymous, its uffd handed over
//! the socket) served by Firecracker's example handler, by `vmpager firecracker-handler` on a
//! vmpagerd and in its own process; and the restore benchmark: real vCPUs reading a fixed,
//! scattered 20 % of a snapshot, restored as Firecracker's example handler serves it, with
//! vmpager's fault-around and prefetch, and with a recorded working set replayed.
//!
//! Firecracker's side is `vmpager_client::peers::firecracker` (its protocol byte for byte).
//! Firecracker's example handler (`src/firecracker/examples/uffd/on_demand_handler.rs` and
//! `uffd_utils.rs` at main 81b38b9) is reproduced in [`example_handler`]: it receives the
//! handshake, maps the memory file privately, reads one uffd event at a time, copies exactly the
//! faulting page (`UFFDIO_COPY` of the region's page size), answers pages of removed ranges with
//! zero pages, and retries a copy refused with `EAGAIN` after reading the events that caused it.
//! `vmpager fc-example-handler SOCKET MEM_FILE` runs it as a process of its own.

use crate::row::Row;
use crate::touch::{self, PAGE};
use crate::BenchError;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};
use vmpager_client::peers::firecracker::{FirecrackerRegion, FirecrackerVm};
use vmpager_compat::firecracker::PAGE_4K;
use vmpagerd::uffd::{Event, Uffd, UffdError, MSG_SIZE};

/// Firecracker's example page-fault handler: serves one Firecracker connecting on `socket` from
/// `mem_file` until that Firecracker goes away. Prints `{"event": "listening"}` once bound and
/// `{"event": "exit", "faults": N, "bytes": B}` at the end, on stdout (the example prints
/// nothing; the bench needs its readiness and its figures).
pub fn example_handler(socket: &Path, mem_file: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = std::os::unix::net::UnixListener::bind(socket)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{{\"event\": \"listening\"}}")?;
        out.flush()?;
    }
    let (stream, _) = listener.accept()?;
    let hs = vmpager_compat::firecracker::recv_handshake(
        stream.as_fd(),
        Instant::now() + Duration::from_secs(10),
    )
    .map_err(std::io::Error::other)?;
    let file = File::open(mem_file)?;
    let len = file.metadata()?.len() as usize;
    // SAFETY: a new private read-only mapping of the file at a kernel-chosen address; nothing
    // else refers to it and it is only read, through raw pointers handed to the kernel.
    let backing = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ,
            rustix::mm::MapFlags::PRIVATE,
            &file,
            0,
        )
    }?
    .cast::<u8>();
    let uffd = Uffd::from_received(hs.uffd).map_err(std::io::Error::from)?;
    let regions = hs.regions;
    let mut removed: Vec<(u64, u64)> = Vec::new();
    let mut deferred: Vec<u64> = Vec::new();
    let (mut faults, mut bytes) = (0u64, 0u64);
    let mut event = [[0u8; MSG_SIZE]; 1];
    loop {
        let mut fds = [
            rustix::event::PollFd::new(&uffd, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(&stream, rustix::event::PollFlags::RDHUP),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        if !fds[1].revents().is_empty() {
            break;
        }
        // One event per read, as the example's `read_event` does.
        while let Ok(1) = uffd.read_events(&mut event) {
            match Event::parse(&event[0]) {
                Event::PageFault { address, .. } => {
                    faults += 1;
                    deferred.push(address);
                }
                Event::Remove { start, end } => removed.push((start, end)),
                _ => {}
            }
        }
        // Serve what was read; a copy refused with EAGAIN (a remove in progress) waits for the
        // next round of events.
        let mut again = Vec::new();
        for address in deferred.drain(..) {
            let Some(r) = regions.iter().find(|r| {
                address >= r.base_host_virt_addr && address - r.base_host_virt_addr < r.size
            }) else {
                continue;
            };
            let page = address & !(r.page_size - 1);
            let offset = r.offset + (page - r.base_host_virt_addr);
            let result = if removed.iter().any(|&(s, e)| page >= s && page < e) {
                uffd.zeropage(page, r.page_size)
            } else {
                // SAFETY: `offset + page_size` lies inside the file (the region is checked
                // below against the mapping's length), so the slice is inside the live,
                // read-only mapping, which nothing writes.
                let src = (offset as usize)
                    .checked_add(r.page_size as usize)
                    .filter(|&end| end <= len)
                    .map(|_| unsafe {
                        std::slice::from_raw_parts(
                            backing.add(offset as usize),
                            r.page_size as usize,
                        )
                    });
                match src {
                    Some(src) => {
                        bytes += r.page_size;
                        uffd.copy(page, src)
                    }
                    None => Err(UffdError::Failed(rustix::io::Errno::INVAL)),
                }
            };
            match result {
                Ok(()) | Err(UffdError::Exists) => {
                    let _ = uffd.wake(page, r.page_size);
                }
                Err(UffdError::Again) => again.push(address),
                Err(_) => {}
            }
        }
        deferred = again;
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{{\"event\": \"exit\", \"faults\": {faults}, \"bytes\": {bytes}}}"
    )?;
    Ok(())
}

/// A page-fault handler process for Firecracker: the example handler or
/// `vmpager firecracker-handler`, optionally pinned to one CPU with everything it starts.
pub struct HandlerProcess {
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// Where Firecracker connects.
    pub socket: PathBuf,
}

impl HandlerProcess {
    /// Starts `vmpager <args>`, serving `socket`, on CPU `pin` if given, and waits until it
    /// listens.
    pub fn start(
        vmpager: &Path,
        args: &[&str],
        socket: &Path,
        pin: Option<usize>,
    ) -> Result<HandlerProcess, BenchError> {
        let mut cmd = Command::new(vmpager);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped());
        if std::env::var_os("VMPAGER_LOG").is_none() {
            cmd.env("VMPAGER_LOG", "warn");
        }
        if let Some(cpu) = pin {
            // SAFETY: runs in the child between fork and exec and only calls
            // sched_setaffinity, which is async-signal-safe, on a set built on the stack.
            unsafe {
                cmd.pre_exec(move || {
                    let mut set = rustix::thread::CpuSet::new();
                    set.set(cpu);
                    let _ = rustix::thread::sched_setaffinity(None, &set);
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| BenchError::io("start the Firecracker handler", e))?;
        let stdout = BufReader::new(
            child
                .stdout
                .take()
                .ok_or_else(|| BenchError::Setup("the handler has no stdout".into()))?,
        );
        let mut h = HandlerProcess {
            child,
            stdout,
            socket: socket.to_owned(),
        };
        h.event("listening")?;
        Ok(h)
    }

    /// The next line the handler prints (a JSON event), or `None` at its end.
    pub fn next_line(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => serde_json::from_str(&line).ok(),
        }
    }

    /// The next event of `kind` (skipping others).
    pub fn event(&mut self, kind: &str) -> Result<serde_json::Value, BenchError> {
        while let Some(e) = self.next_line() {
            if e["event"] == kind {
                return Ok(e);
            }
        }
        Err(BenchError::Setup(format!(
            "the handler ended before {kind}"
        )))
    }

    /// The event a handler prints when a VM ends: `vm-end` (vmpager) or `exit` (the
    /// example handler).
    pub fn vm_end(&mut self) -> Result<serde_json::Value, BenchError> {
        while let Some(e) = self.next_line() {
            if e["event"] == "vm-end" || e["event"] == "exit" {
                return Ok(e);
            }
        }
        Err(BenchError::Setup(
            "the handler ended before the VM did".into(),
        ))
    }

    /// Stops it (SIGTERM) and waits.
    pub fn stop(mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.child.wait();
    }
}

impl Drop for HandlerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The run of median time (with its own counters).
fn median(mut runs: Vec<Restore>) -> Restore {
    runs.sort_by_key(|r| r.elapsed);
    runs.swap_remove(runs.len() / 2)
}

/// What one served VM cost: faults the handler read and bytes it read from the memory file.
#[derive(Debug, Clone, Copy, Default)]
pub struct Served {
    /// Page faults read from the uffd.
    pub faults: u64,
    /// Bytes read from the memory file.
    pub bytes: u64,
    /// Pages pushed from a working set.
    pub replayed: u64,
}

impl Served {
    /// The figures a handler printed when the VM ended.
    pub fn from_event(e: &serde_json::Value) -> Served {
        let get = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        if e["event"] == "exit" {
            // The example handler's own line.
            return Served {
                faults: get(&e["faults"]),
                bytes: get(&e["bytes"]),
                replayed: 0,
            };
        }
        let s = &e["stats"];
        Served {
            faults: get(&s["faults"]),
            bytes: get(&s["source_bytes_read"]),
            replayed: get(&s["pages_replayed"]),
        }
    }
}

/// Host-thread faults on `pages` pages of Firecracker memory served by `handler`, from one
/// thread on CPU 1 (the handler on CPU 0): per-fault latency and the row.
fn host_fault_row(
    name: &str,
    handler: &mut HandlerProcess,
    pages: usize,
) -> Result<Row, BenchError> {
    let vm = FirecrackerVm::restore(
        &handler.socket,
        &[FirecrackerRegion {
            size: (pages * PAGE) as u64,
            page_size: PAGE_4K,
        }],
    )
    .map_err(|e| BenchError::Setup(format!("Firecracker peer: {e}")))?;
    let region = vm.regions()[0];
    // SAFETY: the region stays mapped while `vm` lives (past the call), and the handler serves
    // its faults; no reference to its bytes exists.
    let t = unsafe {
        touch::touch(
            touch::Target {
                base: region.host_addr(),
                pages,
            },
            1,
            Some(&[1]),
        )
    };
    drop(vm);
    handler.vm_end()?;
    Ok(Row::new(
        "firecracker",
        name,
        Some(&t.latency),
        t.rate(),
        "faults/s",
    ))
}

/// The handlers of Firecracker's protocol, measured with one host thread faulting 4 KiB pages
/// on the other CPU: Firecracker's example handler, `vmpager firecracker-handler` on a vmpagerd
/// serving 4 KiB per fault (the same per-fault work), and `vmpager firecracker-handler` as it
/// starts (fault-around and prefetch); `baseline` is the in-process handler of the same
/// placement.
pub fn host_fault_rows(
    vmpager: &Path,
    vmpagerd: &Path,
    dir: &Path,
    image: &Path,
    pages: usize,
    baseline: Option<&Row>,
) -> Result<Vec<Row>, BenchError> {
    let mem = image.to_str().unwrap_or_default();
    let sock = dir.join("fc-faults.sock");
    let s = sock.to_str().unwrap_or_default();
    let mut example =
        HandlerProcess::start(vmpager, &["fc-example-handler", s, mem], &sock, Some(0))?;
    let mut a = host_fault_row(
        "Firecracker's example handler (process), 4 KiB per fault",
        &mut example,
        pages,
    )?;
    example.stop();
    if let Some(b) = baseline {
        a = a.compare(b, crate::RatioOf::P50);
    }
    let d = crate::daemon::Daemon::start(
        vmpagerd,
        dir,
        &[
            "--workers",
            "1",
            "--worker-cpus",
            "0",
            "--wait-mode",
            "blocking",
            "--fault-around",
            "1",
            "--prefetch-max",
            "1",
        ],
    )?;
    let daemon_sock = d.socket_path().to_str().unwrap_or_default().to_string();
    let mut h = HandlerProcess::start(
        vmpager,
        &["firecracker-handler", s, mem, "--daemon", &daemon_sock],
        &sock,
        Some(0),
    )?;
    let b = host_fault_row(
        "vmpager firecracker-handler --daemon (vmpagerd blocking, 4 KiB per fault)",
        &mut h,
        pages,
    )?
    .compare(&a, crate::RatioOf::P50);
    h.stop();
    d.stop()?;
    let mut h = HandlerProcess::start(vmpager, &["firecracker-handler", s, mem], &sock, Some(0))?;
    let c = host_fault_row(
        "vmpager firecracker-handler, in-process vmpagerd defaults (fault-around + prefetch)",
        &mut h,
        pages,
    )?
    .compare(&a, crate::RatioOf::Rate);
    h.stop();
    Ok(vec![a, b, c])
}

/// The restore benchmark: a `len`-byte snapshot whose guest (`vcpus` real vCPUs) reads a
/// fixed, scattered `percent` % of its pages, restored (a) as Firecracker's example handler
/// serves it, (b) by `vmpager firecracker-handler` as it starts (fault-around + prefetch),
/// (c) by it replaying the working set recorded in a first restore (r). (a), (b) and (c) run
/// `runs` times, interleaved, and report their medians. Three rows per restore: time until the
/// workload is done, faults taken, bytes read from the snapshot; the ratios are to (a).
pub fn restore_rows(
    vmpager: &Path,
    dir: &Path,
    image: &Path,
    len: u64,
    vcpus: usize,
    percent: u32,
    runs: usize,
) -> Result<Vec<Row>, BenchError> {
    let file = File::open(image).map_err(|e| BenchError::io("open the snapshot", e))?;
    let mem = image.to_str().unwrap_or_default();
    let sock = dir.join("fc-restore.sock");
    let s = sock.to_str().unwrap_or_default();
    let ws = dir.join("restore.ws");
    let w = ws.to_str().unwrap_or_default();
    let run = |args: &[&str]| -> Result<Restore, BenchError> {
        // Nothing pinned: handlers and vCPUs where the scheduler puts them.
        let mut h = HandlerProcess::start(vmpager, args, &sock, None)?;
        let r = restore_once(&mut h, &file, len, vcpus, percent)?;
        h.stop();
        Ok(r)
    };
    let rec = run(&["firecracker-handler", s, mem, "--record-working-set", w])?;
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        a.push(run(&["fc-example-handler", s, mem])?);
        b.push(run(&["firecracker-handler", s, mem])?);
        c.push(run(&["firecracker-handler", s, mem, "--working-set", w])?);
    }
    let (a, b, c) = (median(a), median(b), median(c));
    let mut rows = Vec::new();
    let mut base: Vec<Row> = Vec::new();
    for (tag, r) in [
        ("(a) Firecracker's example handler", &a),
        ("(b) vmpager, fault-around + prefetch", &b),
        ("(r) vmpager recording the working set", &rec),
        ("(c) vmpager replaying the working set", &c),
    ] {
        let mut three = vec![
            Row::new(
                "restore",
                &format!("{tag}: until the workload is done"),
                None,
                r.elapsed.as_secs_f64() * 1e3,
                "ms",
            ),
            Row::new(
                "restore",
                &format!("{tag}: faults"),
                None,
                r.served.faults as f64,
                "faults",
            ),
            Row::new(
                "restore",
                &format!("{tag}: bytes read"),
                None,
                r.served.bytes as f64,
                "bytes",
            ),
        ];
        if base.is_empty() {
            base = three.clone();
        } else {
            three = three
                .into_iter()
                .zip(&base)
                .map(|(row, b)| row.compare(b, crate::RatioOf::Rate))
                .collect();
        }
        rows.extend(three);
    }
    Ok(rows)
}

/// One restore of the restore benchmark.
#[derive(Debug, Clone)]
pub struct Restore {
    /// From Firecracker's handshake to the last vCPU finishing its share.
    pub elapsed: Duration,
    /// What the handler reported.
    pub served: Served,
}

/// Restores a Firecracker VM of `len` bytes from `mem_file` through `handler`, runs `vcpus`
/// real vCPUs each reading `percent` % of its share of the pages in a scattered order, checks
/// every word read against the file, and times it from the handshake to the last vCPU done.
pub fn restore_once(
    handler: &mut HandlerProcess,
    mem_file: &File,
    len: u64,
    vcpus: usize,
    percent: u32,
) -> Result<Restore, BenchError> {
    use vmpager_client::refvmm::{GuestRegion, RefVm, Task, Workload};
    let gpa = 4u64 << 30;
    let t0 = Instant::now();
    let vm = FirecrackerVm::restore(
        &handler.socket,
        &[FirecrackerRegion {
            size: len,
            page_size: PAGE_4K,
        }],
    )
    .map_err(|e| BenchError::Setup(format!("Firecracker peer: {e}")))?;
    let r = vm.regions()[0];
    let region = GuestRegion {
        gpa,
        host_addr: r.host_addr(),
        size: len,
    };
    // SAFETY: the region is mapped by `vm`, which outlives `kvm` (dropped below first).
    let kvm = unsafe { RefVm::new(&[region], vcpus)? };
    let share = len / vcpus as u64;
    let pages = share / PAGE as u64;
    let (stride, count) = vmpager_client::demo::scatter_plan(pages, percent);
    let plans: Vec<Vec<Task>> = (0..vcpus as u64)
        .map(|i| {
            vec![Task {
                workload: Workload::Scatter { stride, count },
                gpa_start: gpa + i * share,
                gpa_end: gpa + (i + 1) * share,
            }]
        })
        .collect();
    let reports = kvm.run(&plans)?;
    let elapsed = t0.elapsed();
    for (i, report) in reports.iter().enumerate() {
        let want = vmpager_client::demo::expected_scatter(
            mem_file,
            i as u64 * share,
            pages,
            stride,
            count,
        )?;
        if report.results.first().map(|r| r.value) != Some(want) {
            return Err(BenchError::Setup(format!(
                "vCPU {i} read other bytes than the snapshot's"
            )));
        }
    }
    drop(kvm);
    drop(vm);
    let e = handler.vm_end()?;
    Ok(Restore {
        elapsed,
        served: Served::from_event(&e),
    })
}
