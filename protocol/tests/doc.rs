//! docs/protocol.md against the crate: every example byte dump is what the crate sends, every
//! statement of the protocol version is `PROTOCOL_VERSION`, and the version history reaches it.

use vmpager_protocol::*;

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The byte dumps of the doc's code blocks: lines of two-digit hex bytes (a comment after three
/// spaces), one message per run of such lines.
fn hex_dumps(doc: &str) -> Vec<Vec<u8>> {
    let mut dumps = Vec::new();
    let mut current = Vec::new();
    let mut in_code = false;
    for line in doc.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        let bytes: Option<Vec<u8>> = in_code
            .then(|| line.split("   ").next().unwrap_or(""))
            .filter(|hex| !hex.trim().is_empty())
            .and_then(|hex| {
                hex.split_whitespace()
                    .map(|t| (t.len() == 2).then(|| u8::from_str_radix(t, 16).ok())?)
                    .collect()
            });
        match bytes {
            Some(b) => current.extend(b),
            None if !current.is_empty() => dumps.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    dumps
}

/// The example bytes of docs/protocol.md ("Example exchange"), byte for byte: every dump
/// decodes and encodes back to itself, and the messages the examples describe are in it as the
/// crate encodes them.
#[test]
fn the_documented_example_bytes_are_what_the_crate_sends() {
    let dumps = hex_dumps(&doc());
    assert!(dumps.len() >= 6, "{} byte dumps in the doc", dumps.len());
    for d in &dumps {
        assert!(d.len() >= HEADER_LEN, "{d:02x?}");
        let fds = u32::from_le_bytes([d[12], d[13], d[14], d[15]]) as usize;
        let (header, message) = Message::decode(d, fds)
            .unwrap_or_else(|e| panic!("a dump in the doc does not decode ({e}): {d:02x?}"));
        assert_eq!(message.encode(header.request_id.get()), *d);
    }
    let expected = [
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            features: features::ALL,
        })
        .encode(1),
        Message::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            features: features::ALL,
            max_regions: MAX_REGIONS as u32,
            max_payload: MAX_PAYLOAD as u32,
            max_vm_memory: 1 << 40,
        })
        .encode(1),
        Message::CreateVm(CreateVm {
            vm_type: VmType::Default,
            policy: None,
            source_url: None,
            source: PageSourceKind::File,
            populate: PopulateMethod::Default,
            flags: 0,
            regions: vec![RegionSpec::new(0, 256 << 20, 0)],
        })
        .encode(2),
        Message::WorkingSet(WorkingSet {
            vm_id: 3,
            total: 2,
            from: 0,
            entries: vec![
                WorkingSetEntry::new(0x600, 50_000_000),
                WorkingSetEntry::new(0, 1_000_000_000),
            ],
        })
        .encode(4),
        Message::ReplayWorkingSet(ReplayWorkingSet {
            vm_id: 4,
            pages: vec![0x600, 0],
        })
        .encode(4),
        Message::AttachChannel(AttachChannel {
            vm_id: 5,
            protocol: ChannelProtocol::CloudHypervisor,
        })
        .encode(3),
    ];
    for want in expected {
        assert!(
            dumps.contains(&want),
            "the doc lacks the bytes the crate sends: {want:02x?}"
        );
    }
}

/// Every number the text gives as the protocol version, with its line: `version N`,
/// `version == N`, `PROTOCOL_VERSION` = N / is N, `Hello.version` < N, `version-N`, `vN`.
/// The version history and the mailbox's own layout version are left out.
fn stated_versions(doc: &str) -> Vec<(usize, u64)> {
    let mut found = Vec::new();
    let mut in_history = false;
    for (n, line) in doc.lines().enumerate() {
        if line.starts_with('#') {
            in_history = line.starts_with("### Version history");
        }
        let lower = line.to_ascii_lowercase();
        if in_history || lower.contains("mailbox_version") || lower.contains("layout (version") {
            continue;
        }
        for (at, _) in lower.match_indices("version") {
            let rest = lower[at + "version".len()..].trim_start_matches(|c| " `=<>(-:".contains(c));
            let rest = rest.strip_prefix("is ").unwrap_or(rest);
            if let Some(v) = leading_number(rest) {
                found.push((n + 1, v));
            }
        }
        for (at, _) in lower.match_indices('v') {
            let word_start = at == 0 || !lower.as_bytes()[at - 1].is_ascii_alphanumeric();
            if word_start {
                if let Some(v) = leading_number(&lower[at + 1..]) {
                    found.push((n + 1, v));
                }
            }
        }
    }
    found
}

/// The number a string starts with, if a word ends there.
fn leading_number(s: &str) -> Option<u64> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let after = s[end..].chars().next();
    if end == 0 || after.is_some_and(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    s[..end].parse().ok()
}

#[test]
fn the_doc_states_protocol_version_everywhere() {
    let doc = doc();
    let want = u64::from(PROTOCOL_VERSION);
    assert!(
        doc.starts_with(&format!("# vmpager control protocol\n\nVersion {want}.")),
        "docs/protocol.md does not open with \"Version {want}.\""
    );
    let stated = stated_versions(&doc);
    assert!(stated.len() >= 15, "only {} statements found", stated.len());
    let wrong: Vec<_> = stated.iter().filter(|&&(_, v)| v != want).collect();
    assert!(
        wrong.is_empty(),
        "docs/protocol.md states another version than {want} at (line, version) {wrong:?}"
    );
    // The scanner sees each form the doc uses.
    for line in [
        "Version 4.",
        "`PROTOCOL_VERSION` = 4",
        "`version == 4`",
        "`Hello.version` < 4",
        "version >= 4",
        "VMPG v4 Hello",
        "the v4 daemon",
        "version-4 message",
        "`PROTOCOL_VERSION` is 4",
    ] {
        assert_eq!(stated_versions(line), [(1, 4)], "{line}");
    }
    assert!(stated_versions("layout version (1); MAILBOX_VERSION = 1").is_empty());
}

#[test]
fn the_version_history_reaches_protocol_version() {
    let doc = doc();
    let history = doc
        .split("\n### Version history\n")
        .nth(1)
        .expect("docs/protocol.md has a \"### Version history\" section");
    let history = history.split("\n#").next().unwrap_or(history);
    let versions: Vec<u64> = history
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    let want: Vec<u64> = (1..=u64::from(PROTOCOL_VERSION)).collect();
    assert_eq!(versions, want, "one row per version, in order");
}
