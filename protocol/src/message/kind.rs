//! Message kinds: the numbers in `Header.kind`.

/// Message kinds (`Header.kind`). `0` is reserved as invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Client → daemon: first message on a connection.
    Hello = 1,
    /// Daemon → client: answer to `Hello`.
    Welcome = 2,
    /// Client → daemon: create a VM and its memory.
    CreateVm = 3,
    /// Daemon → client: the VM's id and one memfd per region.
    VmCreated = 4,
    /// Client → daemon: the VMM's userfaultfd and its mapping addresses.
    AttachUffd = 5,
    /// Daemon → client: the daemon now serves the uffd (or the fault channel).
    Attached = 6,
    /// Client → daemon: stop serving and free a VM.
    Detach = 7,
    /// Daemon → client: the VM is gone.
    Detached = 8,
    /// Client → daemon: ask for a VM's counters.
    GetStats = 9,
    /// Daemon → client: a VM's counters and latency percentiles.
    Stats = 10,
    /// Daemon → client: a request failed.
    Error = 11,
    /// Client → daemon: create the VM's per-vCPU mailbox.
    OpenMailbox = 12,
    /// Daemon → client: the mailbox memfd and the doorbell eventfd.
    MailboxOpened = 13,
    /// Client → daemon: receive the VM's conversion events on this connection, which need not
    /// hold the VM; its peer must be of the uid that created the VM, or root.
    Subscribe = 14,
    /// Daemon → client: subscribed.
    Subscribed = 15,
    /// Daemon → subscriber (unsolicited, request id 0): a range changed between private and
    /// shared.
    ConversionEvent = 16,
    /// Client → daemon: serve a VMM's page requests on a stream socket (one fd).
    AttachChannel = 17,
    /// Client → daemon: pages to push into the VM ahead of its vCPUs.
    ReplayWorkingSet = 18,
    /// Daemon → client: the pages are queued.
    ReplayQueued = 19,
    /// Client → daemon: ask for the VM's recorded working set from an entry on.
    GetWorkingSet = 20,
    /// Daemon → client: a slice of the recorded working set.
    WorkingSet = 21,
    /// Client → daemon: stop serving the VM's uffd and keep the VM for a reattach.
    ReleaseVm = 22,
    /// Daemon → client: released; kept for the grace period.
    Released = 23,
    /// Client → daemon: take over a VM (by id and token) from a VMM that released it or died.
    ReattachVm = 24,
    /// Daemon → client: the VM and its fds.
    Reattached = 25,
    /// Client → daemon: serve this VM again (after a daemon restart or a lost connection).
    ReclaimVm = 26,
    /// Daemon → client: the VM is served again.
    Reclaimed = 27,
    /// Client → source daemon: serve a VM's memory to a destination daemon.
    MigrateOut = 28,
    /// Client → destination daemon: pull a VM's memory from a source daemon.
    MigrateIn = 29,
    /// Daemon → client: one side of a migration (the answer to every migration request).
    MigrationStatus = 30,
    /// Client → daemon: how is this VM's migration going.
    GetMigration = 31,
    /// Client → daemon: give up on the other side (the destination poisons missing pages).
    AbandonMigration = 32,
}

impl Kind {
    pub(super) fn from_wire(v: u16) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => Welcome,
            3 => CreateVm,
            4 => VmCreated,
            5 => AttachUffd,
            6 => Attached,
            7 => Detach,
            8 => Detached,
            9 => GetStats,
            10 => Stats,
            11 => Error,
            12 => OpenMailbox,
            13 => MailboxOpened,
            14 => Subscribe,
            15 => Subscribed,
            16 => ConversionEvent,
            17 => AttachChannel,
            18 => ReplayWorkingSet,
            19 => ReplayQueued,
            20 => GetWorkingSet,
            21 => WorkingSet,
            22 => ReleaseVm,
            23 => Released,
            24 => ReattachVm,
            25 => Reattached,
            26 => ReclaimVm,
            27 => Reclaimed,
            28 => MigrateOut,
            29 => MigrateIn,
            30 => MigrationStatus,
            31 => GetMigration,
            32 => AbandonMigration,
            _ => return None,
        })
    }
}
