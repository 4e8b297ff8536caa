//! The daemon's own memory: what a VM costs it (page-state tables, histograms, buffers, its
//! mapping's page tables) beyond the guest memory itself, which lives in the memfds (shmem)
//! and is the guest's, not overhead.

/// Anonymous memory plus page tables of process `pid`, plus its page-state files (shmem the
/// daemon maps, `memfd:vmpager-vmN-state`: two bits per guest page), bytes.
pub fn overhead_bytes(pid: u32) -> std::io::Result<u64> {
    Ok(anon_and_page_tables(pid)? + state_files(pid)?)
}

/// Resident bytes of the page-state files mapped by `pid` (`Rss` of their `smaps` entries).
fn state_files(pid: u32) -> std::io::Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut total = 0;
    let mut in_state = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            // A mapping's header line: address range, perms, offset, dev, inode, name.
            in_state = line.contains("memfd:vmpager-vm") && line.contains("-state");
        } else if in_state && first == "Rss:" {
            total += words
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024;
        }
    }
    Ok(total)
}

/// `RssAnon + VmPTE` of `/proc/PID/status`, bytes.
fn anon_and_page_tables(pid: u32) -> std::io::Result<u64> {
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
