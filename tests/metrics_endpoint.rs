//! The Prometheus endpoint (`--metrics-listen`): a scrape shows every family with the VMs'
//! own counters (the same numbers a `Stats` reply gives), bad HTTP clients get errors and never
//! stop it, and a daemon that cannot listen there refuses to start.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;
use vmpager_client::{Client, PageSource, PopulateMethod, RegionSpec, VmSpec};
use vmpagerd::Config;

const PAGE: usize = 4096;

/// Sends `request` and returns the whole answer (the server closes the connection).
fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    // Bounds on a broken server, not timing assertions.
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn scrape(addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    let answer = exchange(
        addr,
        format!("GET /metrics HTTP/1.1\r\nHost: test\r\n{accept}\r\n").as_bytes(),
    );
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(length, body.len());
    (head.to_string(), body.to_string())
}

fn daemon(dir: &TestDir) -> vmpagerd::DaemonHandle {
    vmpagerd::spawn(
        Config {
            workers: 1,
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Config::default()
        },
        &dir.join("d.sock"),
    )
    .unwrap()
}

fn has_sample(body: &str, sample: &str) -> bool {
    body.lines().any(|l| l == sample)
}

#[test]
fn a_scrape_shows_each_vms_counters_as_the_stats_reply_does() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("metrics-scrape");
    let d = daemon(&dir);
    let addr = d.metrics_addr().unwrap();
    let img = image(&dir, "img", 256 * PAGE as u64, 5);
    let client = Client::connect(d.socket_path()).unwrap();
    let vm = client
        .create_mapped_vm(VmSpec {
            regions: vec![RegionSpec::new(1 << 32, 256 * PAGE as u64, 0)],
            source: PageSource::File(img),
            populate: PopulateMethod::Copy,
            ..Default::default()
        })
        .unwrap();
    let base = vm.regions()[0].host_addr().as_ptr();
    for page in [0, 100, 200] {
        // SAFETY: inside the live mapping of the VM's region, which vmpagerd serves.
        let _ = unsafe { base.add(page * PAGE).read_volatile() };
    }
    // The stats reply waits for the worker to account for every fault it answered.
    let s = client.stats(vm.vm_id()).unwrap();
    assert!(s.faults >= 1 && s.pages_from_source >= 3, "{s:?}");
    let id = vm.vm_id();
    let (head, body) = scrape(addr, None);
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    for sample in [
        format!("vmpager_faults_total{{vm=\"{id}\"}} {}", s.faults),
        format!(
            "vmpager_pages_by_source_total{{vm=\"{id}\",source=\"file\"}} {}",
            s.pages_from_source
        ),
        format!(
            "vmpager_pages_by_source_total{{vm=\"{id}\",source=\"zero\"}} {}",
            s.pages_zero
        ),
        // Copy is the only way this VM's pages arrive.
        format!(
            "vmpager_pages_by_method_total{{vm=\"{id}\",method=\"copy\"}} {}",
            s.pages_from_source + s.pages_zero
        ),
        format!("vmpager_pages_by_method_total{{vm=\"{id}\",method=\"write\"}} 0"),
        format!(
            "vmpager_pages_prefetched_total{{vm=\"{id}\"}} {}",
            s.pages_prefetched
        ),
        format!(
            "vmpager_source_read_bytes_total{{vm=\"{id}\"}} {}",
            s.source_bytes_read
        ),
        format!(
            "vmpager_fault_latency_seconds_count{{vm=\"{id}\"}} {}",
            s.latency_samples
        ),
        format!(
            "vmpager_fault_latency_seconds_bucket{{vm=\"{id}\",le=\"+Inf\"}} {}",
            s.latency_samples
        ),
        format!("vmpager_guest_memory_bytes{{vm=\"{id}\"}} {}", 256 * PAGE),
        format!(
            "vmpager_vm_info{{vm=\"{id}\",vm_type=\"default\",populate=\"copy\",source=\"file\",attributes=\"none\"}} 1"
        ),
        format!("vmpager_pages_poisoned_total{{vm=\"{id}\",reason=\"stray\"}} 0"),
        format!("vmpager_uffd_events_total{{vm=\"{id}\",event=\"remove\"}} 0"),
        format!("vmpager_conversions_total{{vm=\"{id}\",to=\"private\"}} 0"),
        "vmpager_vms 1".to_string(),
        "vmpager_vms_created_total 1".to_string(),
        "vmpager_vms_freed_total 0".to_string(),
        "vmpager_connections 1".to_string(),
        "vmpager_vms_restored_total 0".to_string(),
        "vmpager_daemon_starts_total 1".to_string(),
    ] {
        assert!(has_sample(&body, &sample), "no {sample:?} in\n{body}");
    }
    for family in [
        "vmpager_faults_coalesced_total",
        "vmpager_pages_replayed_total",
        "vmpager_populate_eexist_total",
        "vmpager_populate_eagain_total",
        "vmpager_exits_total",
        "vmpager_conversions_denied_total",
        "vmpager_channel_requests_total",
        "vmpager_channel_errors_total",
        "vmpager_start_time_seconds",
        "vmpager_vms_reattached_total",
        "vmpager_vms_orphaned_total",
        "vmpager_vms_expired_total",
        "vmpager_connections_accepted_total",
        "vmpager_build_info",
    ] {
        assert!(
            body.contains(&format!("# TYPE {family} ")),
            "no {family} in\n{body}"
        );
    }

    // OpenMetrics when asked for; the same numbers.
    let (head, om) = scrape(addr, Some("application/openmetrics-text;version=1.0.0"));
    assert!(
        head.contains("application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"));
    assert!(has_sample(
        &om,
        &format!("vmpager_faults_total{{vm=\"{id}\"}} {}", s.faults)
    ));

    // A freed VM leaves the per-VM families; the daemon counts it.
    client.detach(id).unwrap();
    drop(vm);
    drop(client);
    assert!(d.live_vms().wait_for(0, Duration::from_secs(30)));
    let (_, body) = scrape(addr, None);
    assert!(!body.contains(&format!("vm=\"{id}\"")), "{body}");
    assert!(has_sample(&body, "vmpager_vms 0"));
    assert!(has_sample(&body, "vmpager_vms_freed_total 1"));
}

#[test]
fn bad_http_clients_get_errors_and_the_endpoint_keeps_serving() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("metrics-bad");
    let d = daemon(&dir);
    let addr = d.metrics_addr().unwrap();
    let status = |answer: String| answer.lines().next().unwrap_or("").to_string();
    for (request, expected) in [
        (&b"GET / HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 404 Not Found"),
        (
            b"POST /metrics HTTP/1.1\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (b"\x00\x01\x02 garbage\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (
            b"GET /metrics SPDY/3\r\n\r\n",
            "HTTP/1.1 505 HTTP Version Not Supported",
        ),
    ] {
        assert_eq!(status(exchange(addr, request)), expected);
        scrape(addr, None);
    }
    // A head that never ends is cut off.
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    huge.extend(vec![b'a'; 16 * 1024]);
    assert_eq!(
        status(exchange(addr, &huge)),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    // Clients that vanish mid-request.
    for partial in [&b""[..], b"GET /met", b"GET /metrics HTTP/1.1\r\n"] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(partial).unwrap();
        drop(s);
    }
    // A client that sends nothing is dropped after the request timeout; scrapes then go on.
    let silent = TcpStream::connect(addr).unwrap();
    scrape(addr, None);
    drop(silent);
    d.shutdown().unwrap();
    // The endpoint stops with the daemon.
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn vmpagerd_refuses_to_start_without_its_metrics_address() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("metrics-taken");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for (arg, expected) in [
        (addr.as_str(), "cannot listen for metrics on"),
        ("not-an-address", "--metrics-listen not-an-address"),
    ] {
        let out = Command::new(vmpagerd_binary())
            .args(["--workers", "1", "--metrics-listen", arg, "--socket-path"])
            .arg(dir.join("d.sock"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(expected), "{err}");
    }
}

#[test]
fn a_snapshot_url_vm_shows_its_object_source_counters() {
    if !have_uffd() {
        return;
    }
    let dir = TestDir::new("metrics-snapshot");
    let d = daemon(&dir);
    let addr = d.metrics_addr().unwrap();
    let _img = image(&dir, "img", 4 << 20, 6);
    let s = vmpager_snapshot::Snapshots::new(Default::default()).unwrap();
    // memory:// is this process's: the in-process daemon opens the same store.
    let url = "memory://metrics-snapshot/s";
    s.pack(&dir.join("img"), url, 256 << 10).unwrap();
    let client = Client::connect(d.socket_path()).unwrap();
    let vm = client
        .create_mapped_vm(VmSpec {
            regions: vec![RegionSpec::new(1 << 32, 4 << 20, 0)],
            source: PageSource::Snapshot(url.into()),
            populate: PopulateMethod::Copy,
            ..Default::default()
        })
        .unwrap();
    let r = &vm.regions()[0];
    assert!(read_page(r, 0) == std::fs::read(dir.join("img")).unwrap()[..PAGE]);
    let _ = read_page(r, 600);
    let id = vm.vm_id();
    let (_, body) = scrape(addr, None);
    let value = |event: &str| -> u64 {
        let prefix = format!("vmpager_snapshot_source_total{{vm=\"{id}\",event=\"{event}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in\n{body}"))
            .parse()
            .unwrap()
    };
    assert!(value("chunks_fetched") >= 2, "{body}");
    assert!(value("bytes_delivered") >= 2 * (256 << 10), "{body}");
    for zero in ["corrupt", "failed", "changed", "cache_hits"] {
        assert_eq!(value(zero), 0, "{zero}");
    }
    // A VM of another source has no such family rows.
    assert!(!body.contains("vmpager_snapshot_source_total{vm=\"0\""));
}
