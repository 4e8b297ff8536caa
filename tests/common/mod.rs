//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

pub mod moto;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use vmpager_client::demo::{self, DaemonProcess};
use vmpager_client::refvmm::RefVm;

/// True when the host has `what`; otherwise prints why the test is skipped, or panics when
/// `VMPAGER_REQUIRE_KVM=1` (CI on a host that must have every feature).
pub fn have(what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    if std::env::var("VMPAGER_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{what} is not available on this host but VMPAGER_REQUIRE_KVM=1");
    }
    eprintln!(
        "SKIPPED: {what} is not available on this host (set VMPAGER_REQUIRE_KVM=1 to fail instead)"
    );
    false
}

/// userfaultfd usable here.
pub fn have_uffd() -> bool {
    have("userfaultfd", vmpagerd::uffd::Uffd::probe().is_ok())
}

/// userfaultfd and /dev/kvm usable here.
pub fn have_kvm() -> bool {
    have_uffd() && have("/dev/kvm", RefVm::kvm_available())
}

/// A temporary directory removed on drop.
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let dir = std::env::temp_dir().join(format!("vmpager-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        TestDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The vmpagerd binary built by `cargo build --workspace` (the README's test command builds it).
pub fn vmpagerd_binary() -> PathBuf {
    demo::find_vmpagerd().expect(
        "vmpagerd binary not found next to the test binary: run `cargo build --workspace --all-features` first (the README's test command does)",
    )
}

/// vmpagerd as a separate process, serving a socket in `dir`.
pub fn daemon_process(dir: &TestDir, extra_args: &[&str]) -> DaemonProcess {
    DaemonProcess::spawn(&vmpagerd_binary(), &dir.join("vmpagerd.sock"), extra_args)
        .expect("start vmpagerd")
}

/// A snapshot image of `size` bytes in `dir`, opened for reading.
pub fn image(dir: &TestDir, name: &str, size: u64, seed: u64) -> std::fs::File {
    let path = dir.join(name);
    demo::write_image(&path, size, seed).expect("write image");
    std::fs::File::open(path).expect("open image")
}

/// Number of open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Free 2 MiB huge pages of this host.
pub fn free_hugepages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("HugePages_Free:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// At least `n` free 2 MiB huge pages, reserving more (as root) if needed; otherwise skips (or
/// fails under `VMPAGER_REQUIRE_KVM=1`) with the reason.
pub fn have_hugepages(n: u64) -> bool {
    let free = free_hugepages();
    if free < n {
        let path = "/proc/sys/vm/nr_hugepages";
        let total: u64 = std::fs::read_to_string(path)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let _ = std::fs::write(path, (total + n - free).to_string());
    }
    have(
        &format!("{n} free 2 MiB huge pages (/proc/sys/vm/nr_hugepages)"),
        free_hugepages() >= n,
    )
}

/// The vmpager binary built next to vmpagerd.
pub fn vmpager_binary() -> PathBuf {
    let bin = vmpagerd_binary().with_file_name("vmpager");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build --workspace --all-features` first",
        bin.display()
    );
    bin
}

/// The number after `prefix` on the line that has it.
pub fn number_after(text: &str, prefix: &str) -> u64 {
    let at = text
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
        + prefix.len();
    text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {prefix:?} in {text}"))
}

/// A bound datagram socket standing in for systemd's notification socket.
pub struct NotifySocket {
    fd: std::os::fd::OwnedFd,
    pub path: PathBuf,
}

impl NotifySocket {
    pub fn new(path: PathBuf) -> NotifySocket {
        let fd = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        rustix::net::bind(&fd, &rustix::net::SocketAddrUnix::new(&path).unwrap()).unwrap();
        // A bound on how long a broken daemon can make the test wait, not a timing assertion.
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(std::time::Duration::from_secs(60)),
        )
        .unwrap();
        NotifySocket { fd, path }
    }

    /// The next datagram.
    pub fn next(&self) -> String {
        let mut buf = [0u8; 1024];
        let n = rustix::io::read(&self.fd, &mut buf).expect("a notification from vmpagerd");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    /// Datagrams until one contains `line`; returns that one.
    pub fn until(&self, line: &str) -> String {
        loop {
            let m = self.next();
            if m.lines().any(|l| l == line) {
                return m;
            }
        }
    }
}

/// `vmpagerd --socket-path PATH ...`, as a supervisor would run it (again and again), ready
/// once it says `READY=1`.
pub struct SocketDaemon {
    child: Child,
}

impl SocketDaemon {
    pub fn start(socket: &Path, extra: &[&str]) -> SocketDaemon {
        let mut notify_path = socket.as_os_str().to_owned();
        notify_path.push(".notify");
        let notify_path = PathBuf::from(notify_path);
        let _ = std::fs::remove_file(&notify_path);
        let notify = NotifySocket::new(notify_path);
        let child = Command::new(vmpagerd_binary())
            .arg("--socket-path")
            .arg(socket)
            .args(["--workers", "1"])
            .args(extra)
            .env("VMPAGER_LOG", "warn")
            .env("NOTIFY_SOCKET", &notify.path)
            .stdin(Stdio::null())
            .spawn()
            .expect("start vmpagerd");
        notify.until("READY=1");
        let _ = std::fs::remove_file(&notify.path);
        SocketDaemon { child }
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// SIGKILL, and reap it.
    pub fn kill9(mut self) {
        self.signal(rustix::process::Signal::KILL);
        self.child.wait().unwrap();
    }
}

impl Drop for SocketDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes of a guest page in the tests' helpers.
const GUEST_PAGE: usize = 4096;

/// Page `page` (4 KiB) of `r` as the guest sees it: a first touch waits in the fault until the
/// daemon installs the page.
pub fn read_page(r: &vmpager_client::MappedRegion, page: usize) -> Vec<u8> {
    let mut out = vec![0u8; GUEST_PAGE];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: inside the live mapping of `r` (callers pass pages of the region); a read of
        // shared memory that the daemon populates on first touch.
        *b = unsafe {
            r.host_addr()
                .as_ptr()
                .add(page * GUEST_PAGE + i)
                .read_volatile()
        };
    }
    out
}

/// Writes `word` at the start of page `page` of `r`, as a guest store would.
pub fn write_word(r: &vmpager_client::MappedRegion, page: usize, word: u64) {
    // SAFETY: inside the live mapping of `r`, 8-byte aligned; nothing else borrows it.
    unsafe {
        r.host_addr()
            .as_ptr()
            .add(page * GUEST_PAGE)
            .cast::<u64>()
            .write_volatile(word)
    };
}

/// Reads the first byte of page `page` of `r` with process_vm_readv: the kernel's own access,
/// which a poisoned page fails with EFAULT instead of raising SIGBUS in the test.
pub fn probe(r: &vmpager_client::MappedRegion, page: usize) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    let local = libc::iovec {
        iov_base: b.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let remote = libc::iovec {
        // SAFETY: only an address computed inside the mapping; the kernel validates it.
        iov_base: unsafe { r.host_addr().as_ptr().add(page * GUEST_PAGE) }.cast(),
        iov_len: 1,
    };
    // SAFETY: `local` points at a live 1-byte buffer; the remote side is only read by the
    // kernel, which validates it.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n == 1 {
        Ok(b[0])
    } else {
        Err(std::io::Error::last_os_error())
    }
}
