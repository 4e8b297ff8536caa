//! Conversion throughput: a vCPU thread's `KVM_HC_MAP_GPA_RANGE` exits forwarded over the
//! mailbox, the daemon converting (policy, discard of the other side, page state, listeners)
//! and the VMM's side of it (`VmMemory::forward_exit`: attributes, zap of the shared range).
//! Host-side work only: this host has no memory attributes, so the daemon keeps them
//! (`--emulate-attributes`).

use crate::row::{histogram, record};
use crate::BenchError;
use hdrhistogram::Histogram;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};
use vmpager_client::{Client, PageSource, RegionSpec, VmMemory, VmSpec};
use vmpager_protocol::mailbox::{Request, RequestKind, Status, WaitPolicy};
use vmpager_protocol::VmType;

fn vm_fd() -> Result<OwnedFd, BenchError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| BenchError::Setup(format!("/dev/kvm: {e}")))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| BenchError::Setup(format!("KVM_CREATE_VM: {e}")))?;
    // SAFETY: `vm` owns the fd and keeps it open for this call; we keep a duplicate.
    let fd = rustix::io::dup(unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) })
        .map_err(|e| BenchError::io("dup VM fd", e.into()))?;
    Ok(fd)
}

/// `rounds` conversions of `pages` pages to private and back (each direction one sample) on
/// a daemon started with `--emulate-attributes`. Returns the per-conversion latency and the
/// total time.
pub fn convert(
    client: &Client,
    pages: u64,
    rounds: usize,
) -> Result<(Histogram<u64>, Duration), BenchError> {
    const PAGE: u64 = 4096;
    let size = (pages * PAGE).max(2 << 20);
    let created = client.create_vm(VmSpec {
        regions: vec![RegionSpec::new(1 << 32, size, 0).private()],
        source: PageSource::Zero,
        vm_type: VmType::SwProtected,
        vm_fd: Some(vm_fd()?),
        ..Default::default()
    })?;
    let vm_id = created.vm_id;
    let vm = VmMemory::map(created).map_err(vmpager_client::ClientError::from)?;
    client.attach_uffd(vm_id, vm.uffd(), &vm.host_addrs())?;
    let exits = client.open_mailbox(vm_id, 1)?;
    let mut ch = exits.channel(0, WaitPolicy::default())?;
    let (h, elapsed) = crate::touch::on_cpu(1, || {
        let mut h = histogram();
        let start = Instant::now();
        for i in 0..rounds * 2 {
            let req = Request {
                kind: RequestKind::MapGpaRange,
                gpa: 1 << 32,
                size: pages * PAGE,
                private: i % 2 == 0,
            };
            let t = Instant::now();
            let r = vm
                .forward_exit(&mut ch, req)
                .map_err(vmpager_client::ClientError::from)?;
            record(&mut h, t.elapsed());
            if r.status != Status::Retry {
                return Err(BenchError::Setup(format!("conversion refused: {r:?}")));
            }
        }
        Ok((h, start.elapsed()))
    })?;
    drop(ch);
    drop(exits);
    drop(vm);
    client.detach(vm_id)?;
    Ok((h, elapsed))
}
