//! The cloud-hypervisor receiver peer refusing what cloud-hypervisor refuses: a bad `Start`
//! version, prefault, an empty `common_cpuid`, no memory mode, a `MemoryFd` without an fd,
//! `State` without a fault connection.

mod ch_sender;

use std::io::Read;

use ch_sender::*;

/// A receiver and a sender that got as far as `Start` and `MemoryFd`s.
fn started(
    test: &str,
    opts: ReceiverOptions,
) -> (JoinHandle<Result<ChVm, PeerError>>, Sender, Guest) {
    let path = sock_path(test);
    let receiver = spawn_receiver(&path, opts);
    let guest = Guest::two_zones();
    let mut sender = Sender::connect(&path);
    sender.start();
    sender.memory_fds(&guest);
    (receiver, sender, guest)
}

fn refused(receiver: JoinHandle<Result<ChVm, PeerError>>) -> PeerError {
    match receiver.join().expect("receiver thread") {
        Ok(_) => panic!("the receiver accepted the migration"),
        Err(e) => e,
    }
}

fn assert_config_refused(test: &str, edit: impl FnOnce(&mut Value), expect: &str) {
    let (receiver, mut sender, guest) = started(test, ReceiverOptions::default());
    let mut config = guest.config();
    edit(&mut config);
    assert_eq!(sender.config(&config).status(), Status::Error);
    let err = refused(receiver);
    assert_eq!(err.kind(), PeerErrorKind::Refused, "{err}");
    assert!(err.to_string().contains(expect), "{err}");
}

#[test]
fn refuses_a_bad_start_version() {
    let path = sock_path("start-version");
    let receiver = spawn_receiver(&path, ReceiverOptions::default());
    let mut sender = Sender::connect(&path);
    let response = sender.request(Request::start_with_version(1), &[]);
    assert_eq!(response.status(), Status::Error);
    let err = refused(receiver);
    assert!(matches!(err, PeerError::Refused(_)), "{err}");
    assert!(err.to_string().contains("version 1"), "{err}");
}

#[test]
fn refuses_prefault() {
    assert_config_refused(
        "prefault",
        |c| c["vm_config"]["memory"]["prefault"] = json!(true),
        "prefault",
    );
    assert_config_refused(
        "zone-prefault",
        |c| c["vm_config"]["memory"]["zones"][1]["prefault"] = json!(true),
        "\"zone1\"",
    );
}

#[test]
fn refuses_an_empty_common_cpuid() {
    assert_config_refused(
        "cpuid",
        |c| c["common_cpuid"] = json!([]),
        "hypervisor signature",
    );
}

#[test]
fn refuses_a_config_without_memory_mode_unless_the_option_says_postcopy() {
    let strip = |c: &mut Value| {
        c.as_object_mut().expect("object").remove("memory_mode");
    };
    assert_config_refused("no-mode", strip, "memory_mode");

    // Before #8819, `memory_mode=postcopy` on receive-migration: the Config passes.
    let opts = ReceiverOptions {
        memory_mode_option: true,
        ..ReceiverOptions::default()
    };
    let (receiver, mut sender, guest) = started("mode-option", opts);
    let mut config = guest.config();
    strip(&mut config);
    assert_eq!(sender.config(&config).status(), Status::Ok);
    assert_eq!(sender.request(Request::abandon(), &[]).status(), Status::Ok);
    let err = refused(receiver);
    assert!(matches!(err, PeerError::Abandoned), "{err}");
}

#[test]
fn refuses_a_memory_fd_without_an_fd() {
    let path = sock_path("no-fd");
    let receiver = spawn_receiver(&path, ReceiverOptions::default());
    let mut sender = Sender::connect(&path);
    sender.start();
    wire::write_request(&mut sender.main, Request::memory_fd()).expect("header");
    sender.main.write_all(&0u32.to_le_bytes()).expect("slot");
    let response = wire::read_response(&mut sender.main).expect("response");
    assert_eq!(response.status(), Status::Error);
    let err = refused(receiver);
    assert_eq!(err.kind(), PeerErrorKind::Protocol, "{err}");
    assert!(err.to_string().contains("no file descriptor"), "{err}");
}

#[test]
fn refuses_state_without_a_fault_connection() {
    let opts = ReceiverOptions {
        fault_accept_timeout: Duration::from_millis(200),
        ..ReceiverOptions::default()
    };
    let (receiver, mut sender, guest) = started("no-fault-conn", opts);
    assert_eq!(sender.config(&guest.config()).status(), Status::Ok);
    assert_eq!(sender.state().status(), Status::Error);
    let err = refused(receiver);
    assert!(matches!(err, PeerError::NoFaultConnection(_)), "{err}");
    assert_eq!(err.kind(), PeerErrorKind::Timeout);
    // The receiver closed the main connection.
    let mut rest = Vec::new();
    sender.main.read_to_end(&mut rest).expect("read to EOF");
    assert!(rest.is_empty());
}
