//! Host capability probe: what this kernel offers vmpager (`vmpagerd --print-capabilities`).

use kvm_ioctls::Kvm;
use linux_raw_sys::general as k;
use serde::Serialize;

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (Linux 6.18; not yet in kvm-bindings 0.14).
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u64 = 244;
/// `GUEST_MEMFD_FLAG_MMAP`.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// Everything `--print-capabilities` reports.
#[derive(Debug, Serialize)]
pub struct Capabilities {
    /// vmpager version.
    pub version: &'static str,
    /// Control protocol.
    pub protocol: ProtocolCaps,
    /// userfaultfd.
    pub userfaultfd: UffdCaps,
    /// KVM.
    pub kvm: KvmCaps,
}

/// Protocol version and features.
#[derive(Debug, Serialize)]
pub struct ProtocolCaps {
    /// Version spoken.
    pub version: u16,
    /// Feature names the daemon can offer on this host.
    pub features: Vec<&'static str>,
    /// Populate methods usable on this host.
    pub populate_methods: Vec<&'static str>,
}

/// userfaultfd support.
#[derive(Debug, Serialize)]
pub struct UffdCaps {
    /// A userfaultfd could be created.
    pub available: bool,
    /// Why not, if not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Raw `UFFD_FEATURE_*` bits.
    pub feature_bits: u64,
    /// Named features.
    pub features: Vec<&'static str>,
    /// A feature vmpagerd requires that this host lacks (the daemon will not start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing_required: Option<&'static str>,
}

/// KVM support.
#[derive(Debug, Serialize)]
pub struct KvmCaps {
    /// `/dev/kvm` opened.
    pub available: bool,
    /// Why not, if not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `KVM_GET_API_VERSION`.
    pub api_version: i32,
    /// `KVM_CAP_USER_MEMORY2`.
    pub user_memory2: bool,
    /// `KVM_CAP_MEMORY_FAULT_INFO`.
    pub memory_fault_info: bool,
    /// `KVM_CAP_MEMORY_ATTRIBUTES`: supported attribute bits (0: none; private memory
    /// conversions are impossible on this host).
    pub memory_attributes: u64,
    /// `KVM_CAP_GUEST_MEMFD`.
    pub guest_memfd: bool,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` on a default VM, named.
    pub guest_memfd_flags: Vec<&'static str>,
    /// `KVM_CAP_VM_TYPES`, named.
    pub vm_types: Vec<&'static str>,
    /// `KVM_CAP_EXIT_HYPERCALL` bitmap.
    pub exit_hypercall: u64,
    /// Whether private VM types can be served here, and why not.
    pub private_memory: String,
}

const UFFD_FEATURES: &[(u32, &str)] = &[
    (k::UFFD_FEATURE_PAGEFAULT_FLAG_WP, "pagefault_flag_wp"),
    (k::UFFD_FEATURE_EVENT_FORK, "event_fork"),
    (k::UFFD_FEATURE_EVENT_REMAP, "event_remap"),
    (k::UFFD_FEATURE_EVENT_REMOVE, "event_remove"),
    (k::UFFD_FEATURE_MISSING_HUGETLBFS, "missing_hugetlbfs"),
    (k::UFFD_FEATURE_MISSING_SHMEM, "missing_shmem"),
    (k::UFFD_FEATURE_EVENT_UNMAP, "event_unmap"),
    (k::UFFD_FEATURE_SIGBUS, "sigbus"),
    (k::UFFD_FEATURE_THREAD_ID, "thread_id"),
    (k::UFFD_FEATURE_MINOR_HUGETLBFS, "minor_hugetlbfs"),
    (k::UFFD_FEATURE_MINOR_SHMEM, "minor_shmem"),
    (k::UFFD_FEATURE_EXACT_ADDRESS, "exact_address"),
    (k::UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "wp_hugetlbfs_shmem"),
    (k::UFFD_FEATURE_WP_UNPOPULATED, "wp_unpopulated"),
    (k::UFFD_FEATURE_POISON, "poison"),
    (k::UFFD_FEATURE_WP_ASYNC, "wp_async"),
    (k::UFFD_FEATURE_MOVE, "move"),
];

const VM_TYPES: &[(u32, &str)] = &[
    (0, "default"),
    (1, "sw-protected"),
    (2, "sev"),
    (3, "sev-es"),
    (4, "snp"),
    (5, "tdx"),
];

/// Named `UFFD_FEATURE_*` bits.
pub fn uffd_feature_names(bits: u64) -> Vec<&'static str> {
    UFFD_FEATURES
        .iter()
        .filter(|(b, _)| bits & u64::from(*b) != 0)
        .map(|&(_, n)| n)
        .collect()
}

/// `KVM_CAP_MEMORY_ATTRIBUTES` of `/dev/kvm` (a system ioctl, so any process may ask; 0 when
/// there is no KVM).
pub fn memory_attributes() -> u64 {
    Kvm::new().map_or(0, |kvm| {
        kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MEMORY_ATTRIBUTES))
            .max(0) as u64
    })
}

/// Probes the host.
pub fn probe() -> Capabilities {
    let (uffd_bits, uffd_err) = match crate::uffd::Uffd::probe() {
        Ok(p) => (p.features, None),
        Err(e) => (0, Some(e.to_string())),
    };
    let mut populate_methods = Vec::new();
    let mut features = Vec::new();
    let missing = crate::uffd::missing_required(uffd_bits);
    if uffd_err.is_none() && missing.is_none() {
        populate_methods.push("copy");
        features.extend([
            "file_source",
            "stats",
            "private_memory",
            "mailbox",
            "conversion_events",
        ]);
        if uffd_bits & u64::from(k::UFFD_FEATURE_MINOR_SHMEM) != 0 {
            populate_methods.push("continue");
            features.push("populate_continue");
        }
    }
    Capabilities {
        version: env!("CARGO_PKG_VERSION"),
        protocol: ProtocolCaps {
            version: vmpager_protocol::PROTOCOL_VERSION,
            features,
            populate_methods,
        },
        userfaultfd: UffdCaps {
            available: uffd_err.is_none(),
            error: uffd_err,
            feature_bits: uffd_bits,
            features: uffd_feature_names(uffd_bits),
            missing_required: missing,
        },
        kvm: probe_kvm(),
    }
}

fn probe_kvm() -> KvmCaps {
    use kvm_bindings as kb;
    let mut caps = KvmCaps {
        available: false,
        error: None,
        api_version: 0,
        user_memory2: false,
        memory_fault_info: false,
        memory_attributes: 0,
        guest_memfd: false,
        guest_memfd_flags: vec![],
        vm_types: vec![],
        exit_hypercall: 0,
        private_memory: String::new(),
    };
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            caps.error = Some(format!("cannot open /dev/kvm: {e}"));
            return caps;
        }
    };
    caps.available = true;
    caps.api_version = kvm.get_api_version();
    let sys = |cap: u32| kvm.check_extension_raw(u64::from(cap)).max(0) as u64;
    caps.user_memory2 = sys(kb::KVM_CAP_USER_MEMORY2) > 0;
    caps.memory_fault_info = sys(kb::KVM_CAP_MEMORY_FAULT_INFO) > 0;
    caps.memory_attributes = sys(kb::KVM_CAP_MEMORY_ATTRIBUTES);
    caps.guest_memfd = sys(kb::KVM_CAP_GUEST_MEMFD) > 0;
    caps.exit_hypercall = sys(kb::KVM_CAP_EXIT_HYPERCALL);
    let types = sys(kb::KVM_CAP_VM_TYPES);
    caps.vm_types = VM_TYPES
        .iter()
        .filter(|(t, _)| types & (1 << t) != 0)
        .map(|&(_, n)| n)
        .collect();
    match kvm.create_vm() {
        Ok(vm) => {
            let flags = vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS).max(0) as u64;
            if flags & GUEST_MEMFD_FLAG_MMAP != 0 {
                caps.guest_memfd_flags.push("mmap");
            }
            if flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
                caps.guest_memfd_flags.push("init_shared");
            }
            // Attributes are a VM capability too (per VM type); report the larger answer.
            caps.memory_attributes = caps.memory_attributes.max(
                vm.check_extension_raw(u64::from(kb::KVM_CAP_MEMORY_ATTRIBUTES))
                    .max(0) as u64,
            );
        }
        Err(e) => caps.error = Some(format!("cannot create a VM: {e}")),
    }
    caps.private_memory = if !caps.guest_memfd {
        "unavailable: no guest_memfd".into()
    } else if caps.memory_attributes & u64::from(kb::KVM_MEMORY_ATTRIBUTE_PRIVATE) == 0 {
        "unavailable: no KVM_CAP_MEMORY_ATTRIBUTES; vmpagerd refuses private VM types unless run with --emulate-attributes (testing only)".into()
    } else {
        "available".into()
    };
    caps
}
