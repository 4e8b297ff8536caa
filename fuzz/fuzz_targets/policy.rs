//! The daemon's policy TOML: `Policy::parse` (the `--config` file, whose only table is
//! `[policy]`) and `Policy::overridden_by` (the per-VM override a client sends in `CreateVm`).
//!
//! Input: a control byte, then the TOML text (UTF-8; both callers refuse anything else before
//! parsing). Control bit 0: parse it as an override of a daemon policy that has rules, rather
//! than as a config file.
//!
//! Properties: an accepted policy has only non-empty, page-aligned, non-overflowing rules; an
//! empty override changes nothing; an override that sets no rules keeps the daemon's; and
//! `check` decides like the reference on each rule's range and around its edges.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmpager_fuzz::{check_policy_decisions, check_policy_invariants};
use vmpagerd::policy::Policy;

const DAEMON: &str = "[policy]\ndefault = \"shared-only\"\nimplicit_conversions = false\n\
    max_conversions_per_sec = 100\n\n[[policy.rule]]\nstart = 0xfee00000\nsize = 0x100000\n\
    mode = \"private-only\"\n";

fuzz_target!(|data: &[u8]| {
    let Some((&control, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let base = if control & 1 != 0 {
        Policy::parse(DAEMON).expect("the daemon policy of this target parses")
    } else {
        Policy::default()
    };
    let Ok(policy) = base.overridden_by(text) else {
        return;
    };
    check_policy_invariants(&policy);
    assert_eq!(policy.overridden_by("").ok().as_ref(), Some(&policy));
    if !text.contains("rule") && !text.contains('\\') {
        assert_eq!(policy.rules, base.rules);
    }
    for r in policy.rules.iter().take(16) {
        check_policy_decisions(&policy, r.start, r.size);
        check_policy_decisions(&policy, r.start.saturating_sub(4096), 8192);
        check_policy_decisions(&policy, (r.start + r.size).saturating_sub(4096), 8192);
    }
    check_policy_decisions(&policy, 0, u64::MAX);
});
