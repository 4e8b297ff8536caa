//! The private/shared policy of a VM (DESIGN.md §5): which guest-physical ranges may be private,
//! shared or converted, whether implicit conversions (memory-fault exits) are honoured or only
//! explicit ones (hypercalls), and a conversion rate limit.
//!
//! Configured in TOML, daemon-wide with `--config` and overridden per VM in `CreateVm`:
//!
//! ```toml
//! [policy]
//! default = "convertible"          # mode of GPAs no rule covers
//! implicit_conversions = true      # honour KVM_EXIT_MEMORY_FAULT, not only KVM_HC_MAP_GPA_RANGE
//! max_conversions_per_sec = 10000  # 0: unlimited (token bucket, burst = one second's worth)
//!
//! [[policy.rule]]                  # first matching rule wins
//! start = 0xfee00000
//! size = 0x100000
//! mode = "shared-only"             # or "private-only", "convertible"
//! ```
//!
//! A per-VM override replaces each key it sets (its `rule` list replaces the daemon's).

use serde::Deserialize;
use std::time::Instant;

/// Errors reading a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not valid TOML for this schema.
    #[error("invalid policy: {0}")]
    Parse(String),
    /// A rule's range is empty, unaligned or overflows.
    #[error("policy rule {0} has an empty, unaligned or overflowing range")]
    BadRange(usize),
}

impl PolicyError {
    /// Bad input from a config file or a client.
    pub fn is_bad_input(&self) -> bool {
        true
    }
}

/// What a range may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Always shared (MMIO windows, firmware, bounce buffers): conversions to private refused.
    SharedOnly,
    /// Private once converted; conversions back to shared refused.
    PrivateOnly,
    /// Both ways.
    Convertible,
}

/// One rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// First GPA.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// Mode of the range.
    pub mode: Mode,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    policy: PolicyOverride,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyOverride {
    default: Option<Mode>,
    implicit_conversions: Option<bool>,
    max_conversions_per_sec: Option<u64>,
    rule: Option<Vec<Rule>>,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Mode of GPAs no rule covers.
    pub default: Mode,
    /// Honour memory-fault exits (implicit conversions).
    pub implicit_conversions: bool,
    /// Conversions per second (0: unlimited).
    pub max_conversions_per_sec: u64,
    /// Rules, first match wins.
    pub rules: Vec<Rule>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            default: Mode::Convertible,
            implicit_conversions: true,
            max_conversions_per_sec: 0,
            rules: Vec::new(),
        }
    }
}

/// Why a conversion is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// A rule (or the default) forbids this direction for part of the range.
    Rule(Mode),
    /// An implicit conversion and the policy honours only explicit ones.
    ImplicitNotAllowed,
    /// Over the rate limit.
    RateLimited,
}

impl Policy {
    /// Parses a policy file (`[policy]` table).
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::default().overridden_by(text)
    }

    /// This policy with the keys set in `text` replaced.
    pub fn overridden_by(&self, text: &str) -> Result<Policy, PolicyError> {
        let file: PolicyFile =
            toml::from_str(text).map_err(|e| PolicyError::Parse(e.to_string()))?;
        let o = file.policy;
        let policy = Policy {
            default: o.default.unwrap_or(self.default),
            implicit_conversions: o.implicit_conversions.unwrap_or(self.implicit_conversions),
            max_conversions_per_sec: o
                .max_conversions_per_sec
                .unwrap_or(self.max_conversions_per_sec),
            rules: o.rule.unwrap_or_else(|| self.rules.clone()),
        };
        for (i, r) in policy.rules.iter().enumerate() {
            if r.size == 0
                || (r.start | r.size) % vmpager_protocol::PAGE_SIZE != 0
                || r.start.checked_add(r.size).is_none()
            {
                return Err(PolicyError::BadRange(i));
            }
        }
        Ok(policy)
    }

    /// The mode of one page-aligned GPA.
    fn mode_at(&self, gpa: u64) -> (Mode, u64) {
        // Returns the mode and the end of the stretch that has it (to walk ranges quickly). A
        // stretch ends where any rule starts or the matching one ends: past that point a rule
        // earlier in the list may take over.
        let next_start = self
            .rules
            .iter()
            .map(|r| r.start)
            .filter(|&s| s > gpa)
            .min()
            .unwrap_or(u64::MAX);
        for r in &self.rules {
            let r_end = r.start + r.size;
            if (r.start..r_end).contains(&gpa) {
                return (r.mode, r_end.min(next_start));
            }
        }
        (self.default, next_start)
    }

    /// Whether converting `[gpa, gpa + size)` to private (or shared) is allowed by the rules.
    /// `explicit`: a hypercall (else a memory-fault exit).
    pub fn check(
        &self,
        gpa: u64,
        size: u64,
        to_private: bool,
        explicit: bool,
    ) -> Result<(), Denial> {
        if !explicit && !self.implicit_conversions {
            return Err(Denial::ImplicitNotAllowed);
        }
        let end = gpa.saturating_add(size);
        let mut at = gpa;
        while at < end {
            let (mode, stretch_end) = self.mode_at(at);
            let refused = match mode {
                Mode::Convertible => false,
                Mode::SharedOnly => to_private,
                Mode::PrivateOnly => !to_private,
            };
            if refused {
                return Err(Denial::Rule(mode));
            }
            at = stretch_end;
        }
        Ok(())
    }
}

/// A token bucket: `rate` conversions per second, bursts up to one second's worth.
#[derive(Debug)]
pub struct RateLimit {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// `rate` per second (0: unlimited).
    pub fn new(rate: u64) -> RateLimit {
        RateLimit {
            rate,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub fn allow(&mut self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate as f64;
        self.tokens = (self.tokens + refill).min(self.rate as f64);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const POLICY: &str = r#"
[policy]
default = "convertible"
implicit_conversions = false
max_conversions_per_sec = 100

[[policy.rule]]
start = 0xfee00000
size = 0x100000
mode = "shared-only"

[[policy.rule]]
start = 0x100000000
size = 0x40000000
mode = "private-only"
"#;

    #[test]
    fn decisions_follow_rules_and_direction() {
        let p = Policy::parse(POLICY).unwrap();
        assert_eq!(p.rules.len(), 2);
        // Explicit conversions: the rules decide per direction.
        assert_eq!(p.check(0x1000, 0x2000, true, true), Ok(()));
        assert_eq!(p.check(0x1000, 0x2000, false, true), Ok(()));
        assert_eq!(
            p.check(0xfee00000, 0x1000, true, true),
            Err(Denial::Rule(Mode::SharedOnly))
        );
        assert_eq!(p.check(0xfee00000, 0x1000, false, true), Ok(()));
        assert_eq!(
            p.check(0x1_0000_0000, 0x1000, false, true),
            Err(Denial::Rule(Mode::PrivateOnly))
        );
        // A range that only partly overlaps a rule is refused as a whole.
        assert_eq!(
            p.check(0xfed00000, 0x200000, true, true),
            Err(Denial::Rule(Mode::SharedOnly))
        );
        // Implicit conversions are off here.
        assert_eq!(
            p.check(0x1000, 0x1000, true, false),
            Err(Denial::ImplicitNotAllowed)
        );
    }

    #[test]
    fn first_matching_rule_wins_even_inside_a_later_rule() {
        let p = Policy::parse(
            "[[policy.rule]]\nstart = 0x2000\nsize = 0x1000\nmode = \"shared-only\"\n\n[[policy.rule]]\nstart = 0\nsize = 0x10000\nmode = \"convertible\"\n",
        )
        .unwrap();
        assert_eq!(
            p.check(0, 0x10000, true, true),
            Err(Denial::Rule(Mode::SharedOnly))
        );
        assert_eq!(p.check(0, 0x2000, true, true), Ok(()));
        assert_eq!(p.check(0x3000, 0x1000, true, true), Ok(()));
    }

    #[test]
    fn per_vm_override_replaces_only_what_it_sets() {
        let daemon = Policy::parse(POLICY).unwrap();
        let vm = daemon
            .overridden_by("[policy]\nimplicit_conversions = true\n")
            .unwrap();
        assert!(vm.implicit_conversions);
        assert_eq!(vm.rules, daemon.rules);
        assert_eq!(vm.max_conversions_per_sec, 100);
        let vm = daemon
            .overridden_by("[policy]\nrule = []\ndefault = \"shared-only\"\n")
            .unwrap();
        assert!(vm.rules.is_empty());
        assert_eq!(
            vm.check(0, 4096, true, true),
            Err(Denial::Rule(Mode::SharedOnly))
        );
    }

    #[test]
    fn bad_policies_are_refused() {
        for text in [
            "[policy]\nfoo = 1\n",
            "[policy]\ndefault = \"sometimes\"\n",
            "[[policy.rule]]\nstart = 0\nsize = 0\nmode = \"convertible\"\n",
            "[[policy.rule]]\nstart = 1\nsize = 4096\nmode = \"convertible\"\n",
            "[[policy.rule]]\nstart = 0xfffffffffffff000\nsize = 0x2000\nmode = \"convertible\"\n",
            "not toml at all [",
        ] {
            assert!(Policy::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn rate_limit_is_a_token_bucket() {
        let mut r = RateLimit::new(10);
        let t0 = r.last;
        assert_eq!((0..20).filter(|_| r.allow_at(t0)).count(), 10);
        assert!(!r.allow_at(t0));
        assert!(r.allow_at(t0 + Duration::from_millis(150)));
        assert!(RateLimit::new(0).allow());
    }
}
