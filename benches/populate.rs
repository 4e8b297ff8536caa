//! Populate method: UFFDIO_COPY (source → bounce buffer → COPY) against writing the daemon's
//! memfd mapping + UFFDIO_CONTINUE, measured side by side in one run against vmpagerd running
//! as a separate process, with a kernel first-touch baseline. Reports medians over rounds and
//! the continue/copy ratio; asserts nothing (see docs/populate.md for the decision).
//!
//! Run: `cargo build --release --workspace --all-features && cargo bench --bench populate`
//! (env ROUNDS, PAGES, VCPU_MIB to change the sizes).

use hdrhistogram::Histogram;
use std::time::Instant;
use vmpager_client::demo::{self, run_scenario, DaemonProcess, ScenarioConfig};
use vmpager_client::{Client, PageSource, PopulateMethod, RegionSpec, VmSpec};

const PAGE: usize = 4096;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Touches every page once from one thread; returns (p50 ns, p99 ns, pages/s).
fn touch_all(base: *const u8, pages: usize) -> (f64, f64, f64) {
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("histogram");
    let start = Instant::now();
    for p in 0..pages {
        let t = Instant::now();
        // SAFETY: `base` maps `pages` pages for the duration of the call (caller's contract).
        unsafe { base.add(p * PAGE).read_volatile() };
        h.saturating_record(t.elapsed().as_nanos() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    (
        h.value_at_quantile(0.5) as f64,
        h.value_at_quantile(0.99) as f64,
        pages as f64 / secs,
    )
}

fn kernel_first_touch(pages: usize) -> (f64, f64, f64) {
    let mfd = memfd_file(pages * PAGE);
    // SAFETY: a fresh shared mapping of our memfd; unmapped below, never aliased by a reference.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            &mfd,
            0,
        )
    }
    .expect("mmap");
    let r = touch_all(ptr.cast(), pages);
    // SAFETY: the mapping made above, no longer used.
    unsafe { rustix::mm::munmap(ptr, pages * PAGE) }.expect("munmap");
    r
}

fn memfd_file(len: usize) -> std::fs::File {
    let fd = rustix::fs::memfd_create("bench", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
    let f = std::fs::File::from(fd);
    f.set_len(len as u64).expect("set_len");
    f
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let rounds = env("ROUNDS", 7);
    let pages = env("PAGES", 8192);
    let vcpu_mib = env("VCPU_MIB", 64) as u64;
    let Some(bin) = demo::find_vmpagerd() else {
        eprintln!("vmpagerd not found: cargo build --release --workspace --all-features first");
        std::process::exit(1);
    };
    let dir = std::env::temp_dir().join(format!("vmpager-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let daemon = DaemonProcess::spawn(&bin, &dir.join("d.sock"), &[]).expect("start vmpagerd");
    let image_path = dir.join("img");
    let image_len = (pages * PAGE) as u64;
    demo::write_image(&image_path, image_len.max(vcpu_mib << 20), 9).expect("image");
    let image = std::fs::File::open(&image_path).expect("open image");
    let client = Client::connect(daemon.socket_path()).expect("connect");

    let methods = [
        ("copy", PopulateMethod::Copy),
        ("continue", PopulateMethod::Continue),
    ];
    let sources = ["file", "zero"];
    // [method][source] -> per-round p50, p99, pages/s
    let mut host = vec![vec![(Vec::new(), Vec::new(), Vec::new()); 2]; 2];
    let mut vcpu = vec![Vec::new(); 2];
    let mut base = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (p50, p99, rate) = kernel_first_touch(pages);
        base.0.push(p50);
        base.1.push(p99);
        base.2.push(rate);
        // Alternate the order every round so neither method always runs first.
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        for &m in &order {
            for (s, source) in sources.iter().enumerate() {
                let vm = client
                    .create_mapped_vm(VmSpec {
                        regions: vec![RegionSpec::new(1 << 32, image_len, 0)],
                        source: if *source == "file" {
                            PageSource::File(image.try_clone().expect("dup"))
                        } else {
                            PageSource::Zero
                        },
                        populate: methods[m].1,
                        ..Default::default()
                    })
                    .expect("create vm");
                let (p50, p99, rate) = touch_all(vm.regions()[0].host_addr().as_ptr(), pages);
                host[m][s].0.push(p50);
                host[m][s].1.push(p99);
                host[m][s].2.push(rate);
                client.detach(vm.vm_id()).expect("detach");
            }
            if vmpager_client::refvmm::RefVm::kvm_available() {
                let cfg = ScenarioConfig {
                    memory: vcpu_mib << 20,
                    vcpus: 1,
                    populate: methods[m].1,
                    write_pattern: false,
                };
                let (vm, report) =
                    run_scenario(&client, Some(&image), &cfg).expect("vcpu scenario");
                vcpu[m].push(report.pages_per_sec);
                client.detach(vm.vm_id()).expect("detach");
            }
        }
    }
    println!("populate-method benchmark: {rounds} rounds, medians over rounds; one host thread touching {pages} pages (4 KiB) of a fresh VM; vmpagerd in a separate process");
    println!(
        "{:<34} {:>10} {:>10} {:>12}",
        "path", "p50 us", "p99 us", "pages/s"
    );
    println!(
        "{:<34} {:>10.2} {:>10.2} {:>12.0}",
        "kernel first touch (memfd, no uffd)",
        median(&mut base.0) / 1e3,
        median(&mut base.1) / 1e3,
        median(&mut base.2)
    );
    let mut p50s = [[0.0; 2]; 2];
    for (m, (name, _)) in methods.iter().enumerate() {
        for (s, source) in sources.iter().enumerate() {
            let (a, b, c) = &mut host[m][s];
            p50s[m][s] = median(a);
            println!(
                "{:<34} {:>10.2} {:>10.2} {:>12.0}",
                format!("vmpagerd {name}, {source} source"),
                p50s[m][s] / 1e3,
                median(b) / 1e3,
                median(c)
            );
        }
    }
    for (s, source) in sources.iter().enumerate() {
        println!(
            "ratio continue/copy p50, {source} source: {:.3}",
            p50s[1][s] / p50s[0][s]
        );
    }
    if !vcpu[0].is_empty() {
        let copy = median(&mut vcpu[0]);
        let cont = median(&mut vcpu[1]);
        println!("real vCPU (ring-3 guest, 1 vCPU, {vcpu_mib} MiB from the snapshot): copy {copy:.0} pages/s, continue {cont:.0} pages/s, ratio continue/copy {:.3}", cont / copy);
    }
    drop(client);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
