//! The fault paths measured in interleaved rounds and merged: host threads faulting on memory
//! served by the kernel, an in-process handler, a child-process handler and vmpagerd in every
//! waiting mode and placement; real vCPUs demand-paging through vmpagerd.

use crate::daemon::Daemon;
use crate::handler::{self, Handler, HandlerWait, Method, UffdMemory};
use crate::row::{histogram, Latency, RatioOf, Row};
use crate::touch::{touch, Target, PAGE};
use crate::{vcpu, BenchError, Sizes};
use hdrhistogram::Histogram;
use std::fs::File;
use std::path::Path;
use std::time::Duration;
use vmpager_client::PopulateMethod;

/// One path accumulated over rounds: merged latency histogram, total events and time.
pub(crate) struct Acc {
    group: String,
    name: String,
    unit: String,
    latency: Option<Histogram<u64>>,
    /// Percentiles reported by vmpagerd (vCPU rows), from the latest round.
    reported: Option<Latency>,
    events: f64,
    secs: f64,
}

/// Rows in the order first measured.
#[derive(Default)]
pub(crate) struct Accs(Vec<Acc>);

impl Accs {
    fn add(
        &mut self,
        group: &str,
        name: &str,
        unit: &str,
        h: Option<&Histogram<u64>>,
        events: usize,
        d: Duration,
    ) {
        let i = match self
            .0
            .iter()
            .position(|a| a.group == group && a.name == name)
        {
            Some(i) => i,
            None => {
                self.0.push(Acc {
                    group: group.into(),
                    name: name.into(),
                    unit: unit.into(),
                    latency: None,
                    reported: None,
                    events: 0.0,
                    secs: 0.0,
                });
                self.0.len() - 1
            }
        };
        let a = &mut self.0[i];
        if let Some(h) = h {
            a.latency
                .get_or_insert_with(histogram)
                .add(h)
                .expect("same bounds");
        }
        a.events += events as f64;
        a.secs += d.as_secs_f64();
    }

    fn report(&mut self, group: &str, name: &str, l: Latency) {
        if let Some(a) = self
            .0
            .iter_mut()
            .find(|a| a.group == group && a.name == name)
        {
            a.reported = Some(l);
        }
    }

    pub(crate) fn rows(self) -> Vec<Row> {
        self.0
            .into_iter()
            .map(|a| {
                let mut r = Row::new(
                    &a.group,
                    &a.name,
                    a.latency.as_ref(),
                    a.events / a.secs.max(1e-9),
                    &a.unit,
                );
                if r.latency.is_none() {
                    r.latency = a.reported;
                }
                r
            })
            .collect()
    }
}

const METHODS: [(Method, PopulateMethod, bool); 3] = [
    (Method::Copy, PopulateMethod::Copy, true),
    (Method::Continue, PopulateMethod::Continue, true),
    (Method::Zero, PopulateMethod::Copy, false),
];

/// `len` bytes of fresh shared memory (a memfd and a mapping of it), no userfaultfd: the
/// kernel's own first touch of shmem.
fn shared_memory(
    len: usize,
) -> Result<
    (
        std::os::fd::OwnedFd,
        vmpager_protocol::mapping::SharedMapping,
    ),
    BenchError,
> {
    let memfd = rustix::fs::memfd_create("bench", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| BenchError::io("memfd", e.into()))?;
    rustix::fs::ftruncate(&memfd, len as u64).map_err(|e| BenchError::io("ftruncate", e.into()))?;
    let map = vmpager_protocol::mapping::SharedMapping::new(std::os::fd::AsFd::as_fd(&memfd), len)
        .map_err(|e| BenchError::io("mmap", e))?;
    Ok((memfd, map))
}

/// One round of every host-thread fault path.
pub(crate) fn fault_round(
    accs: &mut Accs,
    sizes: Sizes,
    image: &File,
    vmpagerd: &Path,
    dir: &Path,
) -> Result<(), BenchError> {
    let pages = sizes.fault_pages;
    let len = pages * PAGE;
    for placement in [Placement::OtherCpu, Placement::TwoThreads] {
        let (threads, cpus, tname) = (
            placement.threads(),
            Some(placement.cpus()),
            placement.name(),
        );
        let anon = vcpu::AnonMemory::new(len).map_err(|e| BenchError::io("anon", e))?;
        // SAFETY: fresh anonymous memory, alive for the call, no references into it.
        let t = unsafe {
            touch(
                Target {
                    base: anon.base(),
                    pages,
                },
                threads,
                cpus,
            )
        };
        accs.add(
            "kernel",
            &format!("first touch, anon, {tname}"),
            "faults/s",
            Some(&t.latency),
            t.pages,
            t.elapsed,
        );
        let (_memfd, map) = shared_memory(len)?;
        // SAFETY: a fresh shared mapping, alive for the call, no references into it.
        let t = unsafe {
            touch(
                Target {
                    base: map.as_ptr(),
                    pages,
                },
                threads,
                cpus,
            )
        };
        accs.add(
            "kernel",
            &format!("first touch, shmem, {tname}"),
            "faults/s",
            Some(&t.latency),
            t.pages,
            t.elapsed,
        );
    }
    // The in-process handler and vmpagerd in each waiting mode and placement.
    for (wait, wname) in [
        (HandlerWait::Blocking, "blocking"),
        (HandlerWait::BusyPoll, "busy-poll"),
    ] {
        for placement in Placement::ALL {
            if wait == HandlerWait::BusyPoll && placement == Placement::SameCpu {
                continue; // a spinner sharing the faulting thread's CPU: not a sane setup
            }
            for (method, _, _) in METHODS {
                let mem =
                    UffdMemory::new(pages, method).map_err(|e| BenchError::io("uffd memory", e))?;
                let h = Handler::start(&mem, image, method, wait, Some(0))
                    .map_err(|e| BenchError::io("handler", e))?;
                // SAFETY: `mem` stays mapped for the call and the handler serves its faults.
                let t = unsafe {
                    touch(
                        Target {
                            base: mem.base(),
                            pages,
                        },
                        placement.threads(),
                        Some(placement.cpus()),
                    )
                };
                drop(h.stop());
                let name = format!("{} {wname}, {}", method.name(), placement.name());
                accs.add(
                    "in-process handler",
                    &name,
                    "faults/s",
                    Some(&t.latency),
                    t.pages,
                    t.elapsed,
                );
            }
        }
    }
    // The floor of any handler in another process: a bare copy loop in a forked child.
    for placement in [Placement::OtherCpu, Placement::SameCpu] {
        let mem =
            UffdMemory::new(pages, Method::Copy).map_err(|e| BenchError::io("uffd memory", e))?;
        let child =
            handler::ChildHandler::start(&mem, image, 0).map_err(|e| BenchError::io("fork", e))?;
        // SAFETY: `mem` stays mapped for the call and the child serves its faults.
        let t = unsafe {
            touch(
                Target {
                    base: mem.base(),
                    pages,
                },
                1,
                Some(placement.cpus()),
            )
        };
        drop(child);
        let name = format!("copy blocking, {}", placement.name());
        accs.add(
            "child-process handler",
            &name,
            "faults/s",
            Some(&t.latency),
            t.pages,
            t.elapsed,
        );
    }
    // vmpagerd, one worker pinned to CPU 0, 4 KiB per fault.
    for mode in ["blocking", "busy-poll", "adaptive"] {
        let d = Daemon::start(
            vmpagerd,
            dir,
            &[
                "--workers",
                "1",
                "--worker-cpus",
                "0",
                "--wait-mode",
                mode,
                "--fault-around",
                "1",
                "--prefetch-max",
                "1",
            ],
        )?;
        for placement in Placement::ALL {
            if mode == "busy-poll" && placement == Placement::SameCpu {
                continue;
            }
            for (method, populate, file) in METHODS {
                let vm = d.vm(pages, file.then_some(image), populate)?;
                // SAFETY: the VM's region stays mapped for the call; vmpagerd serves it.
                let t = unsafe {
                    touch(
                        Target {
                            base: vm.regions()[0].host_addr(),
                            pages,
                        },
                        placement.threads(),
                        Some(placement.cpus()),
                    )
                };
                d.client.detach(vm.vm_id())?;
                drop(vm);
                let name = format!("{} {mode}, {}", method.name(), placement.name());
                accs.add(
                    "vmpagerd",
                    &name,
                    "faults/s",
                    Some(&t.latency),
                    t.pages,
                    t.elapsed,
                );
            }
        }
        d.stop()?;
    }
    // vmpagerd as it starts by default (adaptive, worker not pinned; readahead off so that
    // every touch is a 4 KiB fault), faulting thread not pinned either.
    let d = Daemon::start(
        vmpagerd,
        dir,
        &["--fault-around", "1", "--prefetch-max", "1"],
    )?;
    let vm = d.vm(pages, Some(image), PopulateMethod::Copy)?;
    // SAFETY: the VM's region stays mapped for the call; vmpagerd serves it.
    let t = unsafe {
        touch(
            Target {
                base: vm.regions()[0].host_addr(),
                pages,
            },
            1,
            None,
        )
    };
    d.client.detach(vm.vm_id())?;
    drop(vm);
    d.stop()?;
    accs.add(
        "vmpagerd",
        DEFAULT_ROW,
        "faults/s",
        Some(&t.latency),
        t.pages,
        t.elapsed,
    );
    Ok(())
}

/// The row of vmpagerd in its default configuration.
pub(crate) const DEFAULT_ROW: &str =
    "copy, daemon defaults (adaptive, not pinned), 1 thread not pinned";

/// Where the faulting threads run relative to the thread serving their faults (always CPU 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// One faulting thread on CPU 1: every wakeup crosses CPUs.
    OtherCpu,
    /// One faulting thread on CPU 0, sharing it with the handler.
    SameCpu,
    /// Two faulting threads, on CPUs 0 and 1.
    TwoThreads,
}

impl Placement {
    const ALL: [Placement; 3] = [
        Placement::OtherCpu,
        Placement::SameCpu,
        Placement::TwoThreads,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Placement::OtherCpu => "1 thread on the other CPU",
            Placement::SameCpu => "1 thread on the same CPU",
            Placement::TwoThreads => "2 threads on 2 CPUs",
        }
    }

    fn threads(self) -> usize {
        if self == Placement::TwoThreads {
            2
        } else {
            1
        }
    }

    fn cpus(self) -> &'static [usize] {
        match self {
            Placement::OtherCpu => &[1],
            Placement::SameCpu => &[0],
            Placement::TwoThreads => &[0, 1],
        }
    }
}

/// The vCPU rows: no uffd (anon and shmem), the in-process handler, vmpagerd 4 KiB, with
/// fault-around, with fault-around and sequential prefetch.
pub(crate) fn vcpu_round(
    accs: &mut Accs,
    sizes: Sizes,
    image: &File,
    vmpagerd: &Path,
    dir: &Path,
) -> Result<(), BenchError> {
    let pages = sizes.vcpu_pages;
    let len = pages * PAGE;
    let anon = vcpu::AnonMemory::new(len).map_err(|e| BenchError::io("anon", e))?;
    // SAFETY: `anon` stays mapped for the call.
    let d = unsafe { vcpu::touch_all(anon.base(), len as u64, 1)? };
    accs.add(
        "vcpu",
        "kernel first touch, anon",
        "pages/s",
        None,
        pages,
        d,
    );
    drop(anon);
    let (_memfd, map) = shared_memory(len)?;
    // SAFETY: `map` stays mapped for the call.
    let d = unsafe { vcpu::touch_all(map.as_ptr(), len as u64, 1)? };
    accs.add(
        "vcpu",
        "kernel first touch, shmem",
        "pages/s",
        None,
        pages,
        d,
    );
    drop(map);
    for (wait, name) in [
        (
            HandlerWait::Blocking,
            "in-process handler, copy 4 KiB, blocking",
        ),
        (
            HandlerWait::BusyPoll,
            "in-process handler, copy 4 KiB, busy-poll",
        ),
    ] {
        let mem =
            UffdMemory::new(pages, Method::Copy).map_err(|e| BenchError::io("uffd memory", e))?;
        let h = Handler::start(&mem, image, Method::Copy, wait, None)
            .map_err(|e| BenchError::io("handler", e))?;
        // SAFETY: `mem` stays mapped for the call and the handler serves its faults.
        let d = unsafe { vcpu::touch_all(mem.base(), len as u64, 1)? };
        let service = h.stop();
        accs.add("vcpu", name, "pages/s", Some(&service), pages, d);
    }
    let copy = PopulateMethod::Copy;
    for (name, args, populate) in [
        (
            "vmpagerd, 4 KiB per fault",
            ["--fault-around", "1", "--prefetch-max", "1"],
            copy,
        ),
        (
            "vmpagerd, fault-around 64 KiB",
            ["--fault-around", "16", "--prefetch-max", "16"],
            copy,
        ),
        (
            "vmpagerd, fault-around + prefetch (default)",
            ["--fault-around", "16", "--prefetch-max", "512"],
            copy,
        ),
        (
            "vmpagerd, fault-around + prefetch, continue",
            ["--fault-around", "16", "--prefetch-max", "512"],
            PopulateMethod::Continue,
        ),
    ] {
        let mut all = vec!["--workers", "1"];
        all.extend(args);
        let daemon = Daemon::start(vmpagerd, dir, &all)?;
        let vm = daemon.vm(pages, Some(image), populate)?;
        // SAFETY: the VM's region stays mapped for the call; vmpagerd serves it.
        let d = unsafe { vcpu::touch_all(vm.regions()[0].host_addr(), len as u64, 1)? };
        let s = daemon.client.stats(vm.vm_id())?;
        daemon.client.detach(vm.vm_id())?;
        drop(vm);
        daemon.stop()?;
        accs.add("vcpu", name, "pages/s", None, pages, d);
        if s.latency_samples > 0 {
            accs.report(
                "vcpu",
                name,
                Latency {
                    samples: s.latency_samples,
                    p50_ns: s.latency_p50_ns as f64,
                    p99_ns: s.latency_p99_ns as f64,
                    p999_ns: s.latency_p999_ns as f64,
                    max_ns: s.latency_max_ns as f64,
                    cdf: Vec::new(),
                },
            );
        }
    }
    Ok(())
}

/// Ratios for the fault rows: in-process handler to the kernel's first touch of shmem,
/// vmpagerd to the in-process handler in the same waiting mode (adaptive to busy-poll: what it
/// spins like while faults arrive), vCPU rows to the kernel's anon first touch.
pub(crate) fn compare_fault_rows(rows: Vec<Row>) -> Vec<Row> {
    let find = |id: &str| rows.iter().find(|r| r.id == id).cloned();
    rows.iter()
        .cloned()
        .map(|r| {
            let two = r.name.contains(Placement::TwoThreads.name());
            let kernel = if two {
                Placement::TwoThreads
            } else {
                Placement::OtherCpu
            }
            .name();
            let base = match r.group.as_str() {
                "in-process handler" => find(&format!("kernel/first touch, shmem, {kernel}")),
                "child-process handler" => find(&format!("in-process handler/{}", r.name)),
                "vmpagerd" if r.name == DEFAULT_ROW => find(&format!(
                    "in-process handler/copy blocking, {}",
                    Placement::SameCpu.name()
                )),
                "vmpagerd" => [
                    r.name.clone(),
                    r.name.replace("adaptive", "busy-poll"),
                    r.name.replace("adaptive", "blocking"),
                ]
                .iter()
                .find_map(|n| find(&format!("in-process handler/{n}"))),
                "vcpu" if r.name != "kernel first touch, anon" => {
                    find("vcpu/kernel first touch, anon")
                }
                _ => None,
            };
            match base {
                Some(b) if r.group == "vcpu" => r.compare(&b, RatioOf::Rate),
                Some(b) => r.compare(&b, RatioOf::P50),
                None => r,
            }
        })
        .collect()
}
