//! Round-trip property tests and malformed-input tests for the wire format and the socket layer.

use proptest::prelude::*;
use std::os::fd::AsFd;
use vmpager_protocol::message::{Kind, Stats, MAX_REPLAY_PAGES, MAX_WORKING_SET_ENTRIES};
use vmpager_protocol::*;

const VM_FLAGS_ALL: u32 = vmpager_protocol::message::VM_FLAGS;

fn region_strategy() -> impl Strategy<Value = Vec<RegionSpec>> {
    // Disjoint regions: consecutive 4 GiB slots; some of 2 MiB pages, some in memfd groups
    // (each region in a group of its own index, so no two overlap in a file).
    prop::collection::vec(
        (
            1u64..1024,
            0u64..1024,
            0u64..1 << 20,
            any::<bool>(),
            0u32..3,
        ),
        1..MAX_REGIONS,
    )
    .prop_map(|v| {
        v.iter()
            .enumerate()
            .map(|(i, &(pages, gap, off, huge, group))| {
                let r = RegionSpec::new((i as u64) << 32 | gap << 21, pages << 21, off << 21);
                let r = if huge { r.huge_2m() } else { r };
                let group = if group == 0 { 0 } else { i as u32 + 1 };
                r.in_memfd(group, off << 21)
            })
            .collect()
    })
}

fn message_strategy() -> impl Strategy<Value = Message> {
    let id = 1u64..;
    prop_oneof![
        (any::<u16>(), any::<u64>())
            .prop_map(|(version, features)| Message::Hello(Hello { version, features })),
        (
            any::<u16>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(
                |(version, features, max_regions, max_payload, max_vm_memory)| {
                    Message::Welcome(Welcome {
                        version,
                        features,
                        max_regions,
                        max_payload,
                        max_vm_memory,
                    })
                }
            ),
        (
            region_strategy(),
            0u32..4,
            0u32..3,
            0u32..6,
            prop::option::of("[a-z =\"\n]{1,200}"),
            0u32..=VM_FLAGS_ALL,
            "[a-z0-9:/._-]{1,300}",
        )
            .prop_map(|(regions, file, p, t, policy, flags, url)| {
                let source = [
                    PageSourceKind::Zero,
                    PageSourceKind::File,
                    PageSourceKind::Remote,
                    PageSourceKind::Snapshot,
                ][file as usize];
                Message::CreateVm(CreateVm {
                    vm_type: VmType::from_wire(t).unwrap(),
                    policy,
                    source_url: (source == PageSourceKind::Snapshot).then_some(url),
                    flags,
                    source,
                    populate: [
                        PopulateMethod::Default,
                        PopulateMethod::Copy,
                        PopulateMethod::Continue,
                    ][p as usize],
                    regions,
                })
            }),
        (
            id.clone(),
            any::<u64>(),
            any::<u64>(),
            0u32..=MAX_REGIONS as u32,
            any::<u64>(),
        )
            .prop_map(|(vm_id, uffd_modes, uffd_features, region_count, token)| {
                Message::VmCreated(VmCreated {
                    vm_id,
                    uffd_modes,
                    uffd_features,
                    flags: (token & 1) as u32,
                    token,
                    region_count,
                })
            }),
        (
            id.clone(),
            prop::collection::vec(any::<u64>(), 1..=MAX_REGIONS)
        )
            .prop_map(|(vm_id, host_addrs)| {
                Message::AttachUffd(AttachUffd { vm_id, host_addrs })
            }),
        id.clone().prop_map(|vm_id| Message::Attached { vm_id }),
        id.clone().prop_map(|vm_id| Message::Detach { vm_id }),
        id.clone().prop_map(|vm_id| Message::Detached { vm_id }),
        id.clone().prop_map(|vm_id| Message::GetStats { vm_id }),
        (id.clone(), 1u32..=MAX_VCPUS)
            .prop_map(|(vm_id, vcpus)| Message::OpenMailbox { vm_id, vcpus }),
        (id.clone(), 1u32..=MAX_VCPUS)
            .prop_map(|(vm_id, vcpus)| Message::MailboxOpened { vm_id, vcpus }),
        (id.clone(), any::<u64>()).prop_map(|(vm_id, token)| Message::Subscribe { vm_id, token }),
        id.clone().prop_map(|vm_id| Message::Subscribed { vm_id }),
        (id.clone(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
            |(vm_id, gpa, size, to_private)| {
                Message::ConversionEvent(ConversionEvent {
                    vm_id,
                    gpa,
                    size,
                    to_private,
                })
            }
        ),
        (1u64.., any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| Message::Stats(Stats {
            vm_id: a,
            faults: b,
            latency_max_ns: c,
            ..Stats::default()
        })),
        (id.clone(), any::<bool>()).prop_map(|(vm_id, _)| {
            Message::AttachChannel(AttachChannel {
                vm_id,
                protocol: ChannelProtocol::CloudHypervisor,
            })
        }),
        (
            id.clone(),
            prop::collection::vec(any::<u64>(), 0..=MAX_REPLAY_PAGES)
        )
            .prop_map(|(vm_id, pages)| {
                Message::ReplayWorkingSet(ReplayWorkingSet { vm_id, pages })
            }),
        (id.clone(), any::<u64>())
            .prop_map(|(vm_id, queued)| Message::ReplayQueued { vm_id, queued }),
        (id.clone(), any::<u64>()).prop_map(|(vm_id, from)| Message::GetWorkingSet { vm_id, from }),
        (
            id.clone(),
            0u64..1 << 40,
            prop::collection::vec((any::<u64>(), any::<u64>()), 0..=MAX_WORKING_SET_ENTRIES),
            0u64..100
        )
            .prop_map(|(vm_id, from, e, more)| {
                let entries: Vec<_> = e
                    .into_iter()
                    .map(|(p, t)| WorkingSetEntry::new(p, t))
                    .collect();
                Message::WorkingSet(WorkingSet {
                    vm_id,
                    total: from + entries.len() as u64 + more,
                    from,
                    entries,
                })
            }),
        (id.clone(), 1u64.., any::<[u8; 32]>(), 0..=MIGRATE_HYBRID).prop_map(
            |(vm_id, migration_id, key, flags)| Message::MigrateOut(MigrateOut {
                vm_id,
                migration_id,
                key: MigrationKey(key),
                flags,
            })
        ),
        (
            id.clone(),
            1u64..,
            any::<[u8; 32]>(),
            "[a-z0-9.:\\[\\]]{1,255}"
        )
            .prop_map(
                |(vm_id, migration_id, key, addr)| Message::MigrateIn(MigrateIn {
                    vm_id,
                    migration_id,
                    key: MigrationKey(key),
                    addr,
                })
            ),
        (id.clone(), any::<u64>(), 0usize..4, any::<[u64; 11]>()).prop_map(
            |(vm_id, migration_id, st, c)| Message::MigrationStatus(MigrationStatus {
                vm_id,
                migration_id,
                state: [
                    MigrationState::None,
                    MigrationState::Running,
                    MigrationState::Complete,
                    MigrationState::Abandoned
                ][st],
                counters: MigrationCounters {
                    total_pages: c[0],
                    pages_done: c[1],
                    pages_pulled: c[2],
                    pages_pushed: c[3],
                    pages_invalidated: c[4],
                    pages_poisoned: c[5],
                    reconnects: c[6],
                    refused: c[7],
                    bytes: c[8],
                    fault_p50_ns: c[9],
                    fault_p99_ns: c[10],
                },
            })
        ),
        id.clone().prop_map(|vm_id| Message::GetMigration { vm_id }),
        id.clone()
            .prop_map(|vm_id| Message::AbandonMigration { vm_id }),
        ("[a-zA-Z0-9 é]{0,300}", 0usize..10).prop_map(|(text, c)| {
            let code = [
                ErrorCode::BadMessage,
                ErrorCode::UnsupportedVersion,
                ErrorCode::BadState,
                ErrorCode::InvalidRegions,
                ErrorCode::UnknownVm,
                ErrorCode::LimitExceeded,
                ErrorCode::BadSource,
                ErrorCode::Unsupported,
                ErrorCode::Internal,
                ErrorCode::PermissionDenied,
            ][c];
            Message::Error(ErrorReply { code, text })
        }),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(msg in message_strategy(), request_id in any::<u64>()) {
        let bytes = msg.encode(request_id);
        let (header, back) = Message::decode(&bytes, msg.fd_count()).unwrap();
        prop_assert_eq!(header.request_id.get(), request_id);
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), fds in 0usize..4) {
        let _ = Message::decode(&bytes, fds);
    }

    #[test]
    fn mutated_messages_never_panic(msg in message_strategy(), at in any::<prop::sample::Index>(), val in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut bytes = msg.encode(7);
        let i = at.index(bytes.len());
        bytes[i] = val;
        let _ = Message::decode(&bytes, msg.fd_count());
        let n = cut.index(bytes.len());
        let _ = Message::decode(&bytes[..n], msg.fd_count());
    }

    #[test]
    fn truncated_or_extended_is_refused(msg in message_strategy(), cut in 1usize..16) {
        let bytes = msg.encode(1);
        let short = &bytes[..bytes.len().saturating_sub(cut)];
        prop_assert!(Message::decode(short, msg.fd_count()).is_err());
        let mut long = bytes.clone();
        long.extend(std::iter::repeat_n(0, cut));
        prop_assert!(Message::decode(&long, msg.fd_count()).is_err());
    }
}

fn hello() -> Message {
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        features: features::ALL,
    })
}

#[test]
fn refuses_bad_headers() {
    let good = hello().encode(1);
    assert!(Message::decode(&good, 0).is_ok());
    assert_eq!(Message::decode(&good[..10], 0), Err(DecodeError::Short(10)));

    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(matches!(
        Message::decode(&bad, 0),
        Err(DecodeError::BadMagic(_))
    ));

    let mut bad = good.clone();
    bad[4] = 9;
    assert_eq!(Message::decode(&bad, 0), Err(DecodeError::BadVersion(9)));

    let mut bad = good.clone();
    bad[6] = 200;
    assert_eq!(Message::decode(&bad, 0), Err(DecodeError::UnknownKind(200)));
    bad[6] = 0;
    assert_eq!(Message::decode(&bad, 0), Err(DecodeError::UnknownKind(0)));

    let mut bad = good.clone();
    bad[8..12].copy_from_slice(&(u32::MAX).to_le_bytes());
    assert_eq!(
        Message::decode(&bad, 0),
        Err(DecodeError::TooLarge(u32::MAX as usize))
    );

    let mut bad = good.clone();
    bad[8..12].copy_from_slice(&8u32.to_le_bytes());
    assert!(matches!(
        Message::decode(&bad, 0),
        Err(DecodeError::LengthMismatch { declared: 8, .. })
    ));

    // Declared fd count must match what arrived, and what the kind carries.
    assert!(matches!(
        Message::decode(&good, 1),
        Err(DecodeError::FdCount { .. })
    ));
    let mut bad = good.clone();
    bad[12..16].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        Message::decode(&bad, 1),
        Err(DecodeError::FdCount {
            expected: 0,
            received: 1
        })
    ));
}

#[test]
fn refuses_bad_create_vm() {
    let create = |regions: Vec<RegionSpec>| {
        Message::CreateVm(CreateVm {
            vm_type: VmType::Default,
            policy: None,
            source_url: None,
            source: PageSourceKind::Zero,
            populate: PopulateMethod::Default,
            flags: 0,
            regions,
        })
        .encode(1)
    };
    let cases = [
        vec![RegionSpec::new(0, 0, 0)],
        vec![RegionSpec::new(4095, 4096, 0)],
        vec![
            RegionSpec::new(0, 1 << 20, 0),
            RegionSpec::new(1 << 19, 1 << 20, 0),
        ],
        vec![RegionSpec::new(!4095, 8192, 0)],
        vec![],
    ];
    for regions in cases {
        assert!(
            matches!(
                Message::decode(&create(regions.clone()), 0),
                Err(DecodeError::Regions(_))
            ),
            "{regions:?}"
        );
    }
    // A region count larger than the regions present.
    let mut bytes = create(vec![RegionSpec::new(0, 4096, 0)]);
    bytes[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        Message::decode(&bytes, 0),
        Err(DecodeError::Malformed {
            kind: Kind::CreateVm,
            ..
        })
    ));
    // Over the region limit.
    bytes[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&100_000u32.to_le_bytes());
    assert!(matches!(
        Message::decode(&bytes, 0),
        Err(DecodeError::Limit { .. })
    ));
    // Unknown source kind, unknown populate method.
    let mut bytes = create(vec![RegionSpec::new(0, 4096, 0)]);
    bytes[HEADER_LEN] = 9;
    assert!(matches!(
        Message::decode(&bytes, 0),
        Err(DecodeError::BadValue {
            field: "source_kind",
            ..
        })
    ));
    let mut bytes = create(vec![RegionSpec::new(0, 4096, 0)]);
    bytes[HEADER_LEN + 8] = 9;
    assert!(matches!(
        Message::decode(&bytes, 0),
        Err(DecodeError::BadValue {
            field: "populate",
            ..
        })
    ));
    // Unknown CreateVm flags.
    let mut bytes = create(vec![RegionSpec::new(0, 4096, 0)]);
    bytes[HEADER_LEN + 20] = 0x80;
    assert!(matches!(
        Message::decode(&bytes, 0),
        Err(DecodeError::Reserved(Kind::CreateVm))
    ));
    // A file source must come with its fd.
    let file = Message::CreateVm(CreateVm {
        vm_type: VmType::Default,
        policy: None,
        source_url: None,
        source: PageSourceKind::File,
        populate: PopulateMethod::Copy,
        flags: 0,
        regions: vec![RegionSpec::new(0, 4096, 0)],
    });
    let mut bytes = file.encode(1);
    bytes[12..16].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        Message::decode(&bytes, 0),
        Err(DecodeError::FdCount {
            expected: 1,
            received: 0
        })
    ));
}

#[test]
fn a_snapshot_source_carries_its_url_and_bad_ones_are_refused() {
    let create = |url: &str| {
        Message::CreateVm(CreateVm {
            vm_type: VmType::Default,
            policy: Some("[policy]".into()),
            source_url: Some(url.into()),
            source: PageSourceKind::Snapshot,
            populate: PopulateMethod::Default,
            flags: 0,
            regions: vec![RegionSpec::new(0, 1 << 20, 0)],
        })
    };
    let m = create("s3://bucket/snapshots/a");
    let bytes = m.encode(1);
    assert_eq!(Message::decode(&bytes, 0).unwrap().1, m);
    // The URL is the trailer: its length, then its bytes.
    assert!(bytes.ends_with(b"\x17\0\0\0s3://bucket/snapshots/a"));
    for bad in [String::new(), "x".repeat(MAX_SOURCE_URL + 1)] {
        let b = create(&bad).encode(1);
        assert!(
            Message::decode(&b, 0).is_err(),
            "url of {} bytes",
            bad.len()
        );
    }
    // A trailer cut short, one byte too many, or not UTF-8.
    let mut cut = bytes.clone();
    cut.truncate(cut.len() - 1);
    let mut long = bytes.clone();
    long.push(b'x');
    let mut latin = bytes.clone();
    let n = latin.len();
    latin[n - 1] = 0xff;
    for mut b in [cut, long, latin] {
        // The header's payload length (bytes 8..12) made to agree: the payload itself is bad.
        let len = (b.len() - HEADER_LEN) as u32;
        b[8..12].copy_from_slice(&len.to_le_bytes());
        assert!(Message::decode(&b, 0).is_err());
    }
}

#[test]
fn zero_vm_id_is_invalid() {
    let bytes = Message::Detach { vm_id: 0 }.encode(1);
    assert!(matches!(
        Message::decode(&bytes, 0),
        Err(DecodeError::BadValue { field: "vm_id", .. })
    ));
}

#[test]
fn socket_passes_fds_and_refuses_too_many() {
    let (a, b) = Connection::pair().unwrap();
    // A well-formed message with its fd.
    let (r, _w) = rustix::pipe::pipe().unwrap();
    let msg = Message::AttachUffd(AttachUffd {
        vm_id: 3,
        host_addrs: vec![0x1000],
    });
    a.send(&msg, 5, &[r.as_fd()]).unwrap();
    let got = b.recv().unwrap();
    assert_eq!(got.message, msg);
    assert_eq!(got.fds.len(), 1);
    assert_eq!(got.header.request_id.get(), 5);

    // The wrong number of fds is refused at send.
    assert!(matches!(
        a.send(&msg, 6, &[]),
        Err(SocketError::FdArity {
            declared: 1,
            given: 0
        })
    ));

    // 200 fds in one record: refused, every fd closed, the connection still usable.
    let fds: Vec<_> = (0..200).map(|_| rustix::pipe::pipe().unwrap().0).collect();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    a.send_raw(&hello().encode(9), &borrowed).unwrap();
    let err = b.recv().unwrap_err();
    assert!(err.is_bad_input(), "{err:?}");
    a.send(&hello(), 10, &[]).unwrap();
    assert_eq!(b.recv().unwrap().message, hello());

    // A record over the size limit.
    a.send_raw(&vec![0u8; MAX_PAYLOAD + HEADER_LEN + 100], &[])
        .unwrap();
    assert!(matches!(b.recv(), Err(SocketError::Truncated)));

    // Peer gone.
    drop(a);
    let err = b.recv().unwrap_err();
    assert!(err.is_peer_gone(), "{err:?}");
}
