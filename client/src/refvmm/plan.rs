//! Region layout checks, task checks and [`split_evenly`].

use super::guest::{PAGE_SIZE, SEL_CHECKSUM, SEL_PATTERN, SEL_SCATTER, SEL_TOUCH};
use super::{GuestRegion, RefVmError, Task, Workload};

/// A caller region as the VM remembers it (without the host pointer, so the VM stays `Send`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Span {
    pub gpa: u64,
    pub size: u64,
}

impl Span {
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

impl Workload {
    /// The `rbx` selector, `rdx` key and `r8` count the guest program expects.
    pub(crate) fn guest_inputs(&self) -> (u64, u64, u64) {
        match *self {
            Workload::Checksum => (SEL_CHECKSUM, 0, 0),
            Workload::WritePattern { key } => (SEL_PATTERN, key, 0),
            Workload::Touch => (SEL_TOUCH, 0, 0),
            Workload::Scatter { stride, count } => {
                (SEL_SCATTER, stride.wrapping_mul(PAGE_SIZE), count)
            }
        }
    }
}

fn bad(index: usize, reason: String) -> RefVmError {
    RefVmError::BadRegion { index, reason }
}

/// Checks the structural layout rules (see [`super::RefVm::check_layout`]); `max_end` is the
/// highest GPA (exclusive) the guest can address.
pub(crate) fn check_regions(
    regions: &[GuestRegion],
    min_gpa: u64,
    max_end: u64,
) -> Result<Vec<Span>, RefVmError> {
    if regions.is_empty() {
        return Err(RefVmError::NoRegions);
    }
    let mut spans = Vec::with_capacity(regions.len());
    for (index, r) in regions.iter().enumerate() {
        if r.size == 0 {
            return Err(bad(index, "its size is zero".into()));
        }
        if (r.gpa | r.size) & (PAGE_SIZE - 1) != 0 {
            return Err(bad(
                index,
                format!(
                    "GPA {:#x} or size {:#x} is not a multiple of 4 KiB",
                    r.gpa, r.size
                ),
            ));
        }
        if (r.host_addr.as_ptr() as u64) & (PAGE_SIZE - 1) != 0 {
            return Err(bad(
                index,
                format!(
                    "host address {:p} is not 4 KiB aligned",
                    r.host_addr.as_ptr()
                ),
            ));
        }
        if r.gpa < min_gpa {
            return Err(bad(
                index,
                format!(
                    "GPA {:#x} is below the lowest allowed region GPA {min_gpa:#x} \
                     (the VMM-private low slot lives below it)",
                    r.gpa
                ),
            ));
        }
        let end = match r.gpa.checked_add(r.size) {
            Some(end) if end <= max_end => end,
            _ => {
                return Err(bad(
                    index,
                    format!(
                        "range {:#x}+{:#x} ends beyond the guest address limit {max_end:#x}",
                        r.gpa, r.size
                    ),
                ))
            }
        };
        if (r.host_addr.as_ptr() as usize)
            .checked_add(r.size as usize)
            .is_none()
        {
            return Err(bad(index, "host range wraps the address space".into()));
        }
        for (other, s) in spans.iter().enumerate() {
            let s: &Span = s;
            if r.gpa < s.end() && s.gpa < end {
                return Err(bad(
                    index,
                    format!(
                        "GPA range {:#x}..{end:#x} overlaps region {other} ({:#x}..{:#x})",
                        r.gpa,
                        s.gpa,
                        s.end()
                    ),
                ));
            }
        }
        spans.push(Span {
            gpa: r.gpa,
            size: r.size,
        });
    }
    Ok(spans)
}

/// Checks one task against the VM's regions.
pub(crate) fn check_task(
    spans: &[Span],
    vcpu: usize,
    task: usize,
    t: &Task,
) -> Result<(), RefVmError> {
    let reject = |reason: String| RefVmError::BadTask { vcpu, task, reason };
    if (t.gpa_start | t.gpa_end) & (PAGE_SIZE - 1) != 0 {
        return Err(reject(format!(
            "range {:#x}..{:#x} is not 4 KiB aligned",
            t.gpa_start, t.gpa_end
        )));
    }
    if t.gpa_start >= t.gpa_end {
        return Err(reject(format!(
            "range {:#x}..{:#x} is empty or reversed",
            t.gpa_start, t.gpa_end
        )));
    }
    if let Workload::Scatter { stride, count } = t.workload {
        let pages = (t.gpa_end - t.gpa_start) / PAGE_SIZE;
        if !pages.is_power_of_two() || stride % 2 == 0 || count > pages {
            return Err(reject(format!(
                "a scatter needs a power-of-two number of pages ({pages} given), an odd stride ({stride}) and at most that many visits ({count})"
            )));
        }
    }
    if !spans
        .iter()
        .any(|s| s.gpa <= t.gpa_start && t.gpa_end <= s.end())
    {
        return Err(reject(format!(
            "range {:#x}..{:#x} does not lie inside one region",
            t.gpa_start, t.gpa_end
        )));
    }
    Ok(())
}

/// Splits all regions into `n` contiguous page ranges of nearly equal size (page counts differ by
/// at most one), in GPA order: one `Vec<Task>` per vCPU, a new task wherever a range crosses from
/// one region into the next. A vCPU whose share is empty (more vCPUs than pages) gets an empty
/// list. Regions with a size that is not a whole number of pages contribute their whole pages only.
pub fn split_evenly(regions: &[GuestRegion], n: usize, workload: Workload) -> Vec<Vec<Task>> {
    let mut spans: Vec<(u64, u64)> = regions
        .iter()
        .map(|r| (r.gpa, r.size / PAGE_SIZE))
        .filter(|&(_, pages)| pages > 0)
        .collect();
    spans.sort_unstable_by_key(|&(gpa, _)| gpa);
    let total: u64 = spans.iter().map(|&(_, pages)| pages).sum();
    let n64 = n as u64;
    let mut plans = Vec::with_capacity(n);
    for i in 0..n64 {
        // Page indices [lo, hi) over the concatenation of all regions.
        let lo = (u128::from(total) * u128::from(i) / u128::from(n64)) as u64;
        let hi = (u128::from(total) * u128::from(i + 1) / u128::from(n64)) as u64;
        let mut tasks = Vec::new();
        let mut base = 0u64; // index of the first page of the current region
        for &(gpa, pages) in &spans {
            let (s, e) = (lo.max(base), hi.min(base + pages));
            if s < e {
                tasks.push(Task {
                    workload,
                    gpa_start: gpa + (s - base) * PAGE_SIZE,
                    gpa_end: gpa + (e - base) * PAGE_SIZE,
                });
            }
            base += pages;
        }
        plans.push(tasks);
    }
    plans
}
