//! The daemon's own memory: what a VM costs it (page-state bitmaps, histograms, buffers, its
//! mapping's page tables) beyond the guest memory itself, which lives in the memfds (shmem)
//! and is the guest's, not overhead.

/// Anonymous memory plus page tables of process `pid`, bytes (`RssAnon + VmPTE` of
/// `/proc/PID/status`).
pub fn overhead_bytes(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok(field("RssAnon:") + field("VmPTE:"))
}
