//! What the soak measures of a process through /proc, and what it shows of a stuck one.

use std::fmt;

/// A process's footprint at a quiescent point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub fds: usize,
    pub threads: usize,
    /// `VmRSS`, `RssAnon`, `RssShmem` of /proc/PID/status, in KiB.
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub shmem_kib: u64,
}

impl Footprint {
    pub fn of(pid: u32) -> Footprint {
        let count = |what: &str| {
            std::fs::read_dir(format!("/proc/{pid}/{what}"))
                .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/{what}: {e}"))
                .count()
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        };
        Footprint {
            fds: count("fd"),
            threads: count("task"),
            rss_kib: kib("VmRSS:"),
            anon_kib: kib("RssAnon:"),
            shmem_kib: kib("RssShmem:"),
        }
    }
}

impl fmt::Display for Footprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} fds, {} threads, VmRSS {} KiB (RssAnon {} KiB, RssShmem {} KiB)",
            self.fds, self.threads, self.rss_kib, self.anon_kib, self.shmem_kib
        )
    }
}

/// Where each thread of `pid` is: its name, state, wait channel and kernel stack (as root).
pub fn stacks(pid: u32, what: &str) -> String {
    let mut out = format!("--- {what} (pid {pid})\n");
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        out.push_str("    (gone)\n");
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let stat = read("stat");
        // The state letter follows the parenthesised name.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?");
        out.push_str(&format!(
            "  tid {} {:?} state {} wchan {}\n",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            state,
            read("wchan").trim()
        ));
        for line in read("stack").lines() {
            out.push_str(&format!("      {line}\n"));
        }
    }
    out
}

/// The last `n` lines of a log file.
pub fn tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
