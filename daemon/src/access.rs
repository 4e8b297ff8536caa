//! Who may do what with the daemon (docs/operations.md, "Access control"). Three gates, each
//! checked by the kernel or by the daemon on every connection:
//!
//! 1. **The socket file** (`--socket-path`): `connect(2)` needs write permission on it. The
//!    daemon binds it mode 0600, or `--socket-mode`, with the group `--socket-group`
//!    ([`SocketAccess`]). An inherited socket (`--fd`, socket activation) keeps whatever its
//!    creator gave it.
//! 2. **The allowlist** ([`Allowlist`]): every accepted connection's peer is read with
//!    `SO_PEERCRED` (its effective uid and gid when it connected) and served only if its uid is
//!    on `--allow-uid` or its gid on `--allow-gid`; otherwise it is told `PermissionDenied`
//!    and closed.
//! 3. **Per VM**: a connection acts only on the VMs it holds (created, reattached or
//!    reclaimed on it); any other id is `UnknownVm`, the answer for an id that does not exist.
//!    The requests that name a VM the connection does not hold (`ReattachVm`, `ReclaimVm`,
//!    `Subscribe`) need the VM's secret token *and* a peer of the uid that created the VM, or
//!    root ([`may_act_for_creator`]); any refusal is `UnknownVm` too, so no answer tells
//!    whether an id exists, whose it is, or whether a token was right.

/// Errors in the access options (`--socket-mode`, `--socket-group`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// `--socket-mode` is not an octal permission mode.
    #[error(
        "--socket-mode {0}: not an octal permission mode of at most 0777, such as 0600 or 0660"
    )]
    BadMode(String),
    /// `--socket-mode` lets every user of the host connect.
    #[error(
        "--socket-mode {0:04o} lets every user of this host connect (connect(2) needs write \
         permission on the socket), leaving --allow-uid/--allow-gid as the only check: give the \
         clients a group instead (--socket-group GID --socket-mode 0660)"
    )]
    WorldWritable(u32),
    /// `--socket-group` with a mode that gives the group nothing.
    #[error(
        "--socket-group {group} gives that group no access with --socket-mode {mode:04o} \
         (connect(2) needs write permission on the socket): use e.g. --socket-mode 0660"
    )]
    GroupWithoutAccess {
        /// The group.
        group: u32,
        /// The mode.
        mode: u32,
    },
}

/// Root's uid: may present any VM's token (and, like anyone, acts only on the VMs its
/// connection holds).
pub const ROOT: u32 = 0;

/// Who may connect: a peer whose uid or whose gid is listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    /// Uids allowed (`--allow-uid`; by default root and the daemon's own uid).
    pub uids: Vec<u32>,
    /// Gids allowed (`--allow-gid`; none by default). Matched against the peer's gid as
    /// `SO_PEERCRED` reports it (its effective gid when it connected), never its
    /// supplementary groups.
    pub gids: Vec<u32>,
}

impl Default for Allowlist {
    fn default() -> Allowlist {
        Allowlist {
            uids: Allowlist::default_uids(),
            gids: Vec::new(),
        }
    }
}

impl Allowlist {
    /// Root and the daemon's own uid.
    pub fn default_uids() -> Vec<u32> {
        let own = rustix::process::getuid().as_raw();
        if own == ROOT {
            vec![ROOT]
        } else {
            vec![ROOT, own]
        }
    }

    /// Whether a peer of `uid` and `gid` may use the daemon.
    pub fn admits(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }

    /// Why a peer is turned away (`PermissionDenied`): `peer` is its `(uid, gid)`, `None` if
    /// its credentials could not be read.
    pub fn refusal(peer: Option<(u32, u32)>) -> String {
        match peer {
            Some((uid, gid)) => format!(
                "uid {uid} is not allowed to use this vmpagerd; see --allow-uid and --allow-gid \
                 (its gid {gid} is not allowed either)"
            ),
            None => {
                "the peer's credentials cannot be read (SO_PEERCRED); see --allow-uid".to_owned()
            }
        }
    }
}

/// Whether a peer of uid `peer` (`None`: unknown) may present the token of a VM created by
/// `creator`: the same uid, or root.
pub fn may_act_for_creator(peer: Option<u32>, creator: u32) -> bool {
    matches!(peer, Some(uid) if uid == creator || uid == ROOT)
}

/// The mode and group the daemon gives the socket it binds (`--socket-mode`,
/// `--socket-group`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    mode: u32,
    group: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> SocketAccess {
        SocketAccess {
            mode: SocketAccess::DEFAULT_MODE,
            group: None,
        }
    }
}

impl SocketAccess {
    /// Only the owner (the daemon's uid) and root can connect.
    pub const DEFAULT_MODE: u32 = 0o600;

    /// Checks a mode and group: only permission bits, never write access for "other" (every
    /// user of the host could connect), and a group only with a mode that gives it write
    /// access (otherwise it would change nothing).
    pub fn new(mode: u32, group: Option<u32>) -> Result<SocketAccess, AccessError> {
        if mode > 0o777 {
            return Err(AccessError::BadMode(format!("{mode:o}")));
        }
        if mode & 0o002 != 0 {
            return Err(AccessError::WorldWritable(mode));
        }
        if let Some(group) = group {
            if mode & 0o020 == 0 {
                return Err(AccessError::GroupWithoutAccess { group, mode });
            }
        }
        Ok(SocketAccess { mode, group })
    }

    /// Parses `--socket-mode`: octal digits, with an optional leading `0o` ("0660", "660",
    /// "0o660").
    pub fn parse_mode(text: &str) -> Result<u32, AccessError> {
        let digits = text.strip_prefix("0o").unwrap_or(text);
        let bad = || AccessError::BadMode(text.to_owned());
        if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let mode = u32::from_str_radix(digits, 8).map_err(|_| bad())?;
        if mode > 0o777 {
            return Err(bad());
        }
        Ok(mode)
    }

    /// The socket's permission bits.
    pub fn mode(&self) -> u32 {
        self.mode
    }

    /// The socket's group, if not the daemon's.
    pub fn group(&self) -> Option<u32> {
        self.group
    }

    /// Whether anyone but the socket's owner (and root) can connect.
    pub fn shared(&self) -> bool {
        self.mode & 0o022 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_admitted_by_its_uid_or_its_gid() {
        let list = Allowlist {
            uids: vec![0, 1000],
            gids: vec![300],
        };
        assert!(list.admits(0, 0));
        assert!(list.admits(1000, 1000));
        assert!(list.admits(2000, 300));
        assert!(!list.admits(2000, 2000));
        assert!(!list.admits(300, 1000));
        let text = Allowlist::refusal(Some((65534, 65533)));
        assert!(
            text.starts_with("uid 65534 is not allowed to use this vmpagerd; see --allow-uid"),
            "{text}"
        );
        assert!(text.contains("gid 65533"), "{text}");
    }

    #[test]
    fn only_the_creator_or_root_may_present_a_token() {
        assert!(may_act_for_creator(Some(1000), 1000));
        assert!(may_act_for_creator(Some(ROOT), 1000));
        assert!(!may_act_for_creator(Some(1001), 1000));
        assert!(!may_act_for_creator(None, 1000));
        assert!(!may_act_for_creator(None, u32::MAX));
    }

    #[test]
    fn socket_modes_are_octal_permission_bits() {
        for (text, mode) in [("0600", 0o600), ("600", 0o600), ("0o660", 0o660), ("0", 0)] {
            assert_eq!(SocketAccess::parse_mode(text), Ok(mode), "{text}");
        }
        for text in [
            "",
            "0o",
            "0800",
            "1777",
            "04755",
            "rw-rw----",
            "-600",
            "+600",
            "0x1b0",
        ] {
            assert!(
                matches!(SocketAccess::parse_mode(text), Err(AccessError::BadMode(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn world_writable_modes_and_useless_groups_are_refused() {
        assert_eq!(
            SocketAccess::new(0o666, None),
            Err(AccessError::WorldWritable(0o666))
        );
        assert_eq!(
            SocketAccess::new(0o662, Some(5)),
            Err(AccessError::WorldWritable(0o662))
        );
        assert_eq!(
            SocketAccess::new(0o640, Some(5)),
            Err(AccessError::GroupWithoutAccess {
                group: 5,
                mode: 0o640
            })
        );
        assert!(SocketAccess::new(0o1600, None).is_err());
        let shared = SocketAccess::new(0o664, Some(5)).unwrap();
        assert_eq!((shared.mode(), shared.group()), (0o664, Some(5)));
        assert!(shared.shared());
        assert!(!SocketAccess::default().shared());
        assert_eq!(SocketAccess::default().mode(), 0o600);
        // Read access for others is harmless (connecting needs write access).
        assert!(SocketAccess::new(0o604, None).is_ok());
    }
}
