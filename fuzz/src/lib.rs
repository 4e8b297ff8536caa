//! What the fuzz targets share: structured inputs that reach deep into the decoders (regions,
//! policy rules), and reference implementations written independently of the code under test,
//! so a target can check that both agree (a differential property), not only that nothing
//! panics. See docs/fuzzing.md.

use arbitrary::Arbitrary;
use vmpager_protocol::{HUGE_PAGE_SIZE, PAGE_SIZE};
use vmpagerd::policy::{Denial, Mode, Policy};

pub mod regions;

pub use regions::{build_regions, regions_are_valid, ArbRegion};

/// A 64-bit quantity that is usually a plausible size or address (whole 4 KiB or 2 MiB pages)
/// and sometimes any value at all, so both the accepting and the refusing paths are reached.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Num {
    /// This many 4 KiB pages.
    Pages(u16),
    /// This many 2 MiB pages.
    HugePages(u8),
    /// A high address: this many 4 KiB pages below 2^64.
    Top(u16),
    /// Any value.
    Raw(u64),
}

impl Num {
    /// The value.
    pub fn get(self) -> u64 {
        match self {
            Num::Pages(n) => u64::from(n) * PAGE_SIZE,
            Num::HugePages(n) => u64::from(n) * HUGE_PAGE_SIZE,
            Num::Top(n) => 0u64.wrapping_sub(u64::from(n) * PAGE_SIZE),
            Num::Raw(v) => v,
        }
    }
}

/// One policy rule as a fuzz input.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct ArbRule {
    /// First GPA.
    pub start: Num,
    /// Length.
    pub size: Num,
    /// 0: shared-only, 1: private-only, else convertible.
    pub mode: u8,
}

fn mode_name(m: u8) -> &'static str {
    match m % 3 {
        0 => "shared-only",
        1 => "private-only",
        _ => "convertible",
    }
}

/// The TOML text of a policy with these settings (what a config file or `CreateVm` carries).
pub fn policy_text(
    default: u8,
    implicit: Option<bool>,
    rate: Option<u64>,
    rules: &[ArbRule],
) -> String {
    let mut t = format!("[policy]\ndefault = \"{}\"\n", mode_name(default));
    if let Some(i) = implicit {
        t.push_str(&format!("implicit_conversions = {i}\n"));
    }
    if let Some(r) = rate {
        // TOML integers are i64.
        t.push_str(&format!(
            "max_conversions_per_sec = {}\n",
            r & (i64::MAX as u64)
        ));
    }
    for r in rules {
        t.push_str(&format!(
            "\n[[policy.rule]]\nstart = {}\nsize = {}\nmode = \"{}\"\n",
            r.start.get() & (i64::MAX as u64),
            r.size.get() & (i64::MAX as u64),
            mode_name(r.mode)
        ));
    }
    t
}

/// What a parsed policy must satisfy: every rule non-empty, page aligned, not overflowing.
pub fn check_policy_invariants(p: &Policy) {
    for (i, r) in p.rules.iter().enumerate() {
        assert!(r.size > 0, "rule {i} is empty: {r:?}");
        assert_eq!(
            (r.start | r.size) % PAGE_SIZE,
            0,
            "rule {i} unaligned: {r:?}"
        );
        assert!(r.start.checked_add(r.size).is_some(), "rule {i} overflows");
    }
}

/// The mode the first matching rule (or the default) gives `gpa`.
fn reference_mode(p: &Policy, gpa: u64) -> Mode {
    p.rules
        .iter()
        .find(|r| gpa >= r.start && gpa - r.start < r.size)
        .map_or(p.default, |r| r.mode)
}

/// `Policy::check` written another way: the range is cut at every rule boundary inside it,
/// the mode is constant on each piece, and the first refused piece (in address order) decides.
pub fn reference_check(
    p: &Policy,
    gpa: u64,
    size: u64,
    to_private: bool,
    explicit: bool,
) -> Result<(), Denial> {
    if !explicit && !p.implicit_conversions {
        return Err(Denial::ImplicitNotAllowed);
    }
    let end = gpa.saturating_add(size);
    let mut cuts: Vec<u64> = vec![gpa];
    for r in &p.rules {
        for b in [r.start, r.start + r.size] {
            if b > gpa && b < end {
                cuts.push(b);
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    if gpa >= end {
        return Ok(());
    }
    for at in cuts {
        let mode = reference_mode(p, at);
        let refused = match mode {
            Mode::Convertible => false,
            Mode::SharedOnly => to_private,
            Mode::PrivateOnly => !to_private,
        };
        if refused {
            return Err(Denial::Rule(mode));
        }
    }
    Ok(())
}

/// Checks `p.check` against [`reference_check`] for this range, both directions and both
/// kinds of exit.
pub fn check_policy_decisions(p: &Policy, gpa: u64, size: u64) {
    for to_private in [false, true] {
        for explicit in [false, true] {
            assert_eq!(
                p.check(gpa, size, to_private, explicit),
                reference_check(p, gpa, size, to_private, explicit),
                "policy {p:?} range {gpa:#x}+{size:#x} to_private {to_private} explicit {explicit}"
            );
        }
    }
}
