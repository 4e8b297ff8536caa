//! Creating a VM: its memory, page source, policy and the uffd settings the VMM must use.

use super::*;
use vmpager_protocol::RegionSpec;

/// Checks that `fd` is a guest_memfd of at least `size` bytes.
fn check_guest_memfd(fd: OwnedFd, size: u64) -> Result<File, String> {
    let link = rustix::fs::readlinkat(
        rustix::fs::CWD,
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        Vec::new(),
    )
    .map_err(|e| e.to_string())?;
    if !link.to_string_lossy().starts_with("anon_inode:[kvm-gmem]") {
        return Err("the fd is not a guest_memfd".into());
    }
    let len = rustix::fs::fstat(&fd).map_err(|e| e.to_string())?.st_size as u64;
    if len < size {
        return Err(format!(
            "the guest_memfd has {len} bytes, the region {size}"
        ));
    }
    Ok(File::from(fd))
}

/// What a VM is made of, besides its memory.
pub(super) struct VmParts {
    populate: Populate,
    policy: crate::policy::Policy,
    source: Source,
    private: Option<PrivateMemory>,
}

/// One guest_memfd per private region, created by the VMM (only the process that created a
/// KVM VM may issue its ioctls), taken from `fds` and checked.
pub(super) fn guest_memfds(
    create: &CreateVm,
    fds: &mut impl Iterator<Item = OwnedFd>,
) -> Result<Vec<Option<File>>, Refusal> {
    let mut gmems = Vec::with_capacity(create.regions.len());
    for (i, r) in create.regions.iter().enumerate() {
        gmems.push(match r.is_private() {
            false => None,
            true => {
                let fd = fds.next().ok_or_else(|| {
                    refuse(
                        ErrorCode::BadMessage,
                        "private region without its guest_memfd",
                    )
                })?;
                Some(
                    check_guest_memfd(fd, r.size()).map_err(|why| {
                        refuse(ErrorCode::BadMessage, format!("region {i}: {why}"))
                    })?,
                )
            }
        });
    }
    Ok(gmems)
}

/// A random 64-bit secret (0 never).
fn random_token() -> u64 {
    let mut b = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
    u64::from_ne_bytes(b).max(1)
}

/// The `UFFD_FEATURE_*` bits the VMM must enable for a VM: the events that keep the page
/// state true, POISON (`serve` refused to start without it), and the fault kinds of its memory;
/// and, where the host has them, write-protect on shared memory (a hybrid migration's dirty
/// tracking: `VmMemory::track_writes`), which changes nothing until the VMM registers for it.
fn uffd_features(create: &CreateVm, populate: Populate, host: &HostFeatures) -> u64 {
    let mut f = k::UFFD_FEATURE_EVENT_REMOVE
        | k::UFFD_FEATURE_EVENT_UNMAP
        | k::UFFD_FEATURE_EVENT_REMAP
        | k::UFFD_FEATURE_POISON;
    let owned = !create.memory_in_vmm();
    for r in &create.regions {
        f |= match (r.is_huge(), owned) {
            (true, _) => k::UFFD_FEATURE_MISSING_HUGETLBFS,
            (false, true) => k::UFFD_FEATURE_MISSING_SHMEM,
            (false, false) => 0,
        };
        if populate == Populate::Continue {
            f |= match r.is_huge() {
                true => k::UFFD_FEATURE_MINOR_HUGETLBFS,
                false => k::UFFD_FEATURE_MINOR_SHMEM,
            };
        }
    }
    if owned && host.has(k::UFFD_FEATURE_WP_HUGETLBFS_SHMEM) {
        f |= k::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        if host.has(k::UFFD_FEATURE_WP_UNPOPULATED) {
            f |= k::UFFD_FEATURE_WP_UNPOPULATED;
        }
    }
    u64::from(f)
}

/// Checks what a `CreateVm` asks for against the negotiated `features` and the `host`, and
/// decides the populate method (`default_populate`: the daemon's `--populate`). Pure: the
/// regions were validated by the decoder; this adds what depends on the connection and host.
pub fn check_create(
    create: &CreateVm,
    features: u64,
    default_populate: Populate,
    host: &HostFeatures,
) -> Result<Populate, Refusal> {
    let need = |feature: u64, what: &str| {
        if features & feature == 0 {
            Err(refuse(
                ErrorCode::Unsupported,
                format!("{what} was not negotiated"),
            ))
        } else {
            Ok(())
        }
    };
    let populate = match create.populate {
        PopulateMethod::Copy => Populate::Copy,
        PopulateMethod::Continue => {
            need(features::POPULATE_CONTINUE, "populate method continue")?;
            Populate::Continue
        }
        PopulateMethod::Default
            if default_populate == Populate::Continue
                && features & features::POPULATE_CONTINUE != 0
                && !create.memory_in_vmm() =>
        {
            Populate::Continue
        }
        PopulateMethod::Default => Populate::Copy,
    };
    if create.vm_type != VmType::Default {
        need(features::PRIVATE_MEMORY, "a VM type other than default")?;
    }
    if create.flags & VM_RECORD_WORKING_SET != 0 {
        need(features::WORKING_SET, "recording a working set")?;
    }
    if create.regions.iter().any(|r| r.is_huge()) {
        need(features::HUGE_PAGES, "a 2 MiB region")?;
        if !host.has(k::UFFD_FEATURE_MISSING_HUGETLBFS) {
            return Err(refuse(
                ErrorCode::Unsupported,
                "this host's userfaultfd cannot serve huge pages (UFFD_FEATURE_MISSING_HUGETLBFS)",
            ));
        }
        if populate == Populate::Continue && !host.has(k::UFFD_FEATURE_MINOR_HUGETLBFS) {
            return Err(refuse(
                ErrorCode::Unsupported,
                "populate method continue on huge pages needs UFFD_FEATURE_MINOR_HUGETLBFS",
            ));
        }
        if create.regions.iter().any(|r| r.is_huge() && r.is_private()) {
            return Err(refuse(
                ErrorCode::InvalidRegions,
                "private regions use 4 KiB pages",
            ));
        }
    }
    if create.memory_in_vmm() {
        need(features::VMM_MEMORY, "serving the VMM's own memory")?;
        if populate == Populate::Continue {
            return Err(refuse(
                ErrorCode::Unsupported,
                "the VMM's own private memory can only be populated with copy",
            ));
        }
        if create.vm_type != VmType::Default || create.regions.iter().any(|r| r.is_private()) {
            return Err(refuse(
                ErrorCode::InvalidRegions,
                "private memory needs memory the daemon owns",
            ));
        }
        if create
            .regions
            .iter()
            .any(|r| r.memfd_group() != 0 || r.file_offset() != 0)
        {
            return Err(refuse(
                ErrorCode::InvalidRegions,
                "the VMM's own memory has no memfd to place regions in",
            ));
        }
    }
    if !create.vm_type.has_private_memory() && create.regions.iter().any(|r| r.is_private()) {
        return Err(refuse(
            ErrorCode::InvalidRegions,
            format!(
                "VM type {} has no private memory: no region may be private",
                create.vm_type.name()
            ),
        ));
    }
    Ok(populate)
}

/// The guest memory of `regions` and the bytes of the memfds that hold it (a memfd is as long
/// as the furthest region in it, so regions at large file offsets make files larger than the
/// memory they hold). For regions that passed `validate_regions`, neither sum overflows and
/// the memfd bytes are at least the guest memory.
pub fn memory_needed(regions: &[RegionSpec]) -> (u64, u64) {
    let total: u64 = regions.iter().map(|r| r.size()).sum();
    let mut files: HashMap<u32, u64> = HashMap::new();
    let mut own_files = 0u64;
    for r in regions {
        let end = r.file_offset().saturating_add(r.size());
        match r.memfd_group() {
            0 => own_files = own_files.saturating_add(end),
            g => {
                let e = files.entry(g).or_insert(0);
                *e = (*e).max(end);
            }
        }
    }
    let file_bytes = files.values().fold(own_files, |a, &b| a.saturating_add(b));
    (total, file_bytes)
}

impl Reactor {
    pub(super) fn create_vm(
        &mut self,
        token: usize,
        features: u64,
        create: CreateVm,
        fds: Vec<OwnedFd>,
    ) -> Result<(Message, Vec<OwnedFd>), Refusal> {
        if self.held_by(token).len() >= self.config.max_vms_per_connection {
            return Err(refuse(
                ErrorCode::LimitExceeded,
                "too many VMs on this connection",
            ));
        }
        // The decoder checked the fd count: [snapshot if file source][one guest_memfd per
        // private region].
        let mut fds = fds.into_iter();
        let parts = self.vm_parts(features, &create, &mut fds)?;
        let gmems = guest_memfds(&create, &mut fds)?;
        let id = self.next_vm.fetch_add(1, Ordering::Relaxed);
        let memory =
            GuestMemory::new(id, &create.regions, gmems, create.memory_in_vmm()).map_err(|e| {
                let hint = if create.regions.iter().any(|r| r.is_huge()) {
                    " (2 MiB regions need free huge pages: /proc/sys/vm/nr_hugepages)"
                } else {
                    ""
                };
                refuse(ErrorCode::Internal, format!("{}{hint}", error_chain(&e)))
            })?;
        let mut out_fds = memory
            .regions()
            .iter()
            .filter_map(|r| r.memfd())
            .map(|fd| fd.try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                refuse(
                    ErrorCode::Internal,
                    format!("cannot duplicate a memfd: {e}"),
                )
            })?;
        let region_count = out_fds.len() as u32;
        out_fds.push(memory.state_file().try_clone_to_owned().map_err(|e| {
            refuse(
                ErrorCode::Internal,
                format!("cannot duplicate the state file: {e}"),
            )
        })?);
        let entry = self.assemble_vm(id, random_token(), create, parts, memory, token)?;
        let reply = VmCreated {
            vm_id: id,
            uffd_modes: entry.uffd_modes,
            uffd_features: entry.uffd_features,
            region_count,
            flags: entry.created_flags,
            token: entry.vm.token,
        };
        tracing::debug!(
            vm = id,
            bytes = entry.vm.memory.total_size(),
            populate = ?entry.vm.populate,
            source = entry.vm.source.name(),
            vm_type = entry.vm.vm_type.name(),
            "VM created"
        );
        self.live.insert(&entry.vm);
        self.vms.insert(id, entry);
        Ok((Message::VmCreated(reply), out_fds))
    }

    /// Checks a VM's description (limits, features, host) and builds its populate method,
    /// policy and page source (taking the snapshot's fd from `fds` for a file source).
    pub(super) fn vm_parts(
        &self,
        features: u64,
        create: &CreateVm,
        fds: &mut impl Iterator<Item = OwnedFd>,
    ) -> Result<VmParts, Refusal> {
        let (total, file_bytes) = memory_needed(&create.regions);
        if total.max(file_bytes) > self.config.max_vm_memory {
            return Err(refuse(
                ErrorCode::LimitExceeded,
                format!(
                    "{} bytes of guest memory (memfds of {file_bytes}) exceed the limit of {}",
                    total, self.config.max_vm_memory
                ),
            ));
        }
        let populate = check_create(create, features, self.config.populate, &self.host)?;
        let policy = match &create.policy {
            Some(text) => self
                .config
                .policy
                .overridden_by(text)
                .map_err(|e| refuse(ErrorCode::BadMessage, error_chain(&e)))?,
            None => self.config.policy.clone(),
        };
        let source: Box<dyn PageSource> = match create.source {
            PageSourceKind::Zero => match self.async_source()? {
                Some(fetcher) => {
                    return Ok(VmParts {
                        populate,
                        policy,
                        source: Source::Async(fetcher),
                        private: self.private_parts(create)?,
                    })
                }
                None => Box::new(ZeroSource),
            },
            PageSourceKind::File => {
                if features & features::FILE_SOURCE == 0 {
                    return Err(refuse(
                        ErrorCode::Unsupported,
                        "file source was not negotiated",
                    ));
                }
                let fd = fds
                    .next()
                    .ok_or_else(|| refuse(ErrorCode::BadMessage, "file source without its fd"))?;
                Box::new(
                    FileSource::new(File::from(fd))
                        .map_err(|e| refuse(ErrorCode::BadSource, error_chain(&e)))?,
                )
            }
            PageSourceKind::Remote => {
                if features & features::MIGRATION == 0 {
                    return Err(refuse(
                        ErrorCode::Unsupported,
                        "migration was not negotiated",
                    ));
                }
                if create.memory_in_vmm() {
                    return Err(refuse(
                        ErrorCode::Unsupported,
                        "a VM pulled from a source daemon needs memory the daemon owns",
                    ));
                }
                return Ok(VmParts {
                    populate,
                    policy,
                    source: Source::Async(remote_source(create)?),
                    private: self.private_parts(create)?,
                });
            }
            PageSourceKind::Snapshot => {
                if features & features::SNAPSHOT_URL == 0 {
                    return Err(refuse(
                        ErrorCode::Unsupported,
                        "snapshot URLs were not negotiated",
                    ));
                }
                let url = create.source_url.as_deref().ok_or_else(|| {
                    refuse(ErrorCode::BadMessage, "a snapshot source without its URL")
                })?;
                let completions =
                    Completions::new().map_err(|e| refuse(ErrorCode::Internal, error_chain(&e)))?;
                let source = self
                    .objects
                    .open(url, completions.clone())
                    .map_err(|e| refuse(ErrorCode::BadSource, e))?;
                return Ok(VmParts {
                    populate,
                    policy,
                    source: Source::Async(Fetcher {
                        source: Arc::new(source),
                        completions,
                    }),
                    private: self.private_parts(create)?,
                });
            }
        };
        Ok(VmParts {
            populate,
            policy,
            source: Source::Sync(source),
            private: self.private_parts(create)?,
        })
    }

    fn private_parts(&self, create: &CreateVm) -> Result<Option<PrivateMemory>, Refusal> {
        Ok(match create.vm_type.has_private_memory() {
            false => None,
            true => Some(self.private_memory(create.vm_type)?),
        })
    }

    /// The embedder's asynchronous source for a new VM with a zero source
    /// ([`crate::Config::async_source`]), if it gives one.
    fn async_source(&self) -> Result<Option<Fetcher>, Refusal> {
        let Some(factory) = &self.config.async_source else {
            return Ok(None);
        };
        let completions =
            Completions::new().map_err(|e| refuse(ErrorCode::Internal, error_chain(&e)))?;
        Ok(factory.make(completions.clone()).map(|source| Fetcher {
            source,
            completions,
        }))
    }

    /// The VM `id` with secret `secret` over `memory`, held by connection `owner`.
    pub(super) fn assemble_vm(
        &self,
        id: u64,
        secret: u64,
        mut create: CreateVm,
        parts: VmParts,
        memory: GuestMemory,
        owner: usize,
    ) -> Result<VmEntry, Refusal> {
        let VmParts {
            populate,
            policy,
            source,
            private,
        } = parts;
        let created_flags = match &private {
            Some(p) if p.attributes == AttributeKeeper::Kvm => VMCREATED_VMM_SETS_ATTRIBUTES,
            _ => 0,
        };
        let uffd_features = uffd_features(&create, populate, &self.host);
        let metrics = VmMetrics::new();
        if private
            .as_ref()
            .is_some_and(|p| p.attributes == AttributeKeeper::Emulated)
        {
            metrics.attributes_emulated.store(1, Ordering::Relaxed);
        }
        let recording = create.flags & VM_RECORD_WORKING_SET != 0;
        let events = self.events.clone();
        let recorder = recording.then(|| Recorder::new(&memory));
        let vm = Arc::new(Vm {
            id,
            memory,
            source,
            populate,
            metrics,
            vm_type: create.vm_type,
            private,
            rate: std::sync::Mutex::new(RateLimit::new(policy.max_conversions_per_sec)),
            policy,
            listener: Box::new(move |e| events.send(e)),
            token: secret,
            readahead: if recording {
                Readahead::OFF
            } else {
                self.config.readahead
            },
            recorder,
            replay: ReplayQueue::default(),
            hybrid: Default::default(),
        });
        create.populate = populate.wire();
        let uid = self
            .conns
            .get(&owner)
            .and_then(|c| c.peer)
            .map_or(u32::MAX, |p| p.uid.as_raw());
        Ok(VmEntry {
            vm,
            worker: None,
            attached: false,
            channel: None,
            mailbox: None,
            owner: Owner::Conn(owner),
            uid,
            description: create,
            uffd_modes: populate.register_modes(),
            uffd_features,
            created_flags,
        })
    }

    /// Private memory of a new VM: who keeps the attributes.
    pub(super) fn private_memory(&self, vm_type: VmType) -> Result<PrivateMemory, Refusal> {
        let attributes = if self.host.memory_attributes
            & u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE)
            != 0
        {
            AttributeKeeper::Kvm
        } else if self.config.emulate_attributes {
            AttributeKeeper::Emulated
        } else {
            return Err(refuse(
                ErrorCode::Unsupported,
                format!(
                    "this host has no KVM memory attributes (KVM_CAP_MEMORY_ATTRIBUTES), so VM type {} cannot have private memory; run vmpagerd --emulate-attributes to keep them in the daemon (for testing)",
                    vm_type.name()
                ),
            ));
        };
        Ok(PrivateMemory { attributes })
    }
}

/// The source of a VM pulled from a source daemon: idle until `MigrateIn` names the source.
/// Its pages are the remote address space up to the end of the furthest region.
fn remote_source(create: &CreateVm) -> Result<Fetcher, Refusal> {
    let end = create
        .regions
        .iter()
        .map(|r| r.source_offset().saturating_add(r.size()))
        .max()
        .unwrap_or(0);
    let completions =
        Completions::new().map_err(|e| refuse(ErrorCode::Internal, error_chain(&e)))?;
    let remote = crate::migration::remote::Remote::new(
        completions.clone(),
        end.div_ceil(vmpager_protocol::PAGE_SIZE),
    );
    Ok(Fetcher {
        source: Arc::new(crate::migration::remote::RemoteSource(remote)),
        completions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn memfds_are_as_long_as_their_furthest_region() {
        let regions = [
            RegionSpec::new(0, M, 0).in_memfd(0, 4 * M),
            RegionSpec::new(M, M, 0).in_memfd(7, 0),
            RegionSpec::new(4 * M, 2 * M, 0).in_memfd(7, 8 * M),
        ];
        assert_eq!(memory_needed(&regions), (4 * M, 5 * M + 10 * M));
        assert_eq!(memory_needed(&[]), (0, 0));
    }

    #[test]
    fn create_vm_needs_the_features_it_uses() {
        let host = HostFeatures {
            uffd: u64::from(k::UFFD_FEATURE_MISSING_HUGETLBFS),
            memory_attributes: 0,
        };
        let mut create = CreateVm {
            vm_type: VmType::Default,
            policy: None,
            source_url: None,
            source: PageSourceKind::Zero,
            populate: PopulateMethod::Default,
            flags: 0,
            regions: vec![RegionSpec::new(0, 2 * M, 0).huge_2m()],
        };
        let check = |c: &CreateVm, f| check_create(c, f, Populate::Continue, &host);
        assert!(check(&create, 0).is_err(), "2 MiB pages not negotiated");
        assert!(matches!(
            check(&create, features::HUGE_PAGES),
            Ok(Populate::Copy)
        ));
        // Continue by default only when negotiated, and never on huge pages without MINOR.
        assert!(
            check(&create, features::HUGE_PAGES | features::POPULATE_CONTINUE).is_err(),
            "no UFFD_FEATURE_MINOR_HUGETLBFS"
        );
        create.regions = vec![RegionSpec::new(0, M, 0)];
        assert!(matches!(
            check(&create, features::POPULATE_CONTINUE),
            Ok(Populate::Continue)
        ));
        create.flags = vmpager_protocol::VM_MEMORY_IN_VMM;
        assert!(matches!(
            check(&create, features::POPULATE_CONTINUE | features::VMM_MEMORY),
            Ok(Populate::Copy)
        ));
        create.regions = vec![RegionSpec::new(0, M, 0).private()];
        create.flags = 0;
        assert_eq!(
            check(&create, features::ALL).map_err(|r| r.0).err(),
            Some(ErrorCode::InvalidRegions)
        );
    }
}
