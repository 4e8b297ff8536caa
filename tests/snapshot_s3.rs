//! `vmpager snapshot pack|verify|unpack` against a real S3 protocol server: `moto_server` on
//! loopback (installed by scripts/install-deps), credentials and region from the standard AWS
//! environment variables, the endpoint from `--endpoint`. The image comes back byte for byte;
//! a snapshot that is not there fails with a clear message.

mod common;

use common::moto::Moto;
use common::*;
use std::path::Path;
use std::process::Command;

/// Runs `vmpager snapshot ARGS` with test credentials: (success, stdout + stderr).
fn snapshot(moto: &Moto, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(vmpager_binary());
    cmd.arg("snapshot").args(args);
    moto.configure(&mut cmd);
    output(cmd)
}

/// Runs `cmd`: (success, stdout + stderr).
fn output(mut cmd: Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn write_image(path: &Path, chunks: usize, chunk: usize) -> Vec<u8> {
    let mut data = vec![0u8; chunks * chunk];
    let mut x = 0x5eed_u64;
    for (i, c) in data.chunks_mut(chunk).enumerate() {
        if i % 4 == 3 {
            continue; // all zeros: not stored
        }
        for b in c.iter_mut().step_by(7) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8;
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn pack_verify_unpack_through_s3() {
    let dir = TestDir::new("snapshot-s3");
    let moto = Moto::start();
    moto.create_bucket("vmpager");
    let img = dir.join("image");
    let data = write_image(&img, 12, 1 << 20);
    let url = "s3://vmpager/snapshots/demo";
    let (ok, out) = snapshot(
        &moto,
        &["pack", img.to_str().unwrap(), url, "--chunk-size", "1M"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("12 chunks of 1024 KiB, 3 all zeros"), "{out}");
    let (ok, out) = snapshot(&moto, &["verify", url]);
    assert!(ok, "{out}");
    assert!(
        out.contains("verified s3://vmpager/snapshots/demo: 12 chunks (3 all zeros)"),
        "{out}"
    );
    let back = dir.join("back");
    let (ok, out) = snapshot(&moto, &["unpack", url, back.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(
        std::fs::read(&back).unwrap() == data,
        "unpacked image differs"
    );
    // The endpoint can also come from --endpoint (the variable is then overridden).
    let (ok, out) = snapshot(
        &moto,
        &[
            "verify",
            url,
            "--endpoint",
            &moto.endpoint(),
            "--allow-http",
        ],
    );
    assert!(ok, "{out}");
    // Nothing there: a clear failure, no output claiming success.
    let (ok, out) = snapshot(&moto, &["verify", "s3://vmpager/snapshots/none"]);
    assert!(!ok, "{out}");
    assert!(out.contains("does not verify"), "{out}");
    assert!(!out.contains("verified"), "{out}");
}

/// Runs `vmpager demo ARGS` with moto's credentials (when given) in `dir`.
fn demo(dir: &TestDir, moto: Option<&Moto>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(vmpager_binary());
    cmd.arg("demo").args(args).arg("--workdir").arg(dir.path());
    match moto {
        Some(m) => m.configure(&mut cmd),
        None => {
            for (k, _) in std::env::vars() {
                if k.starts_with("AWS_") {
                    cmd.env_remove(k);
                }
            }
        }
    }
    output(cmd)
}

#[test]
fn the_demo_guest_restores_from_a_packed_snapshot_on_file_and_s3() {
    if !have_kvm() {
        return;
    }
    let dir = TestDir::new("demo-snapshot-url");
    let moto = Moto::start();
    moto.create_bucket("demo");
    let file_url = format!("file://{}", dir.join("store").display());
    for (url, m) in [
        (file_url.as_str(), None),
        ("s3://demo/snapshots/a", Some(&moto)),
    ] {
        // Pack the demo's image and restore from it, then restore again (a second host).
        for extra in [&["--pack"][..], &[]] {
            let mut args = vec!["--memory", "32M", "--snapshot-url", url];
            args.extend_from_slice(extra);
            let (ok, out) = demo(&dir, m, &args);
            assert!(ok, "{url} {extra:?}: {out}");
            assert!(out.contains(&format!("restoring from {url}")), "{out}");
            assert!(
                out.contains("verified: guest saw every byte of the snapshot"),
                "{out}"
            );
        }
        // Another seed is another image: the packed snapshot is not it, and the demo says so.
        let (ok, out) = demo(
            &dir,
            m,
            &["--memory", "32M", "--seed", "9", "--snapshot-url", url],
        );
        assert!(!ok, "{url}: a mismatched snapshot verified: {out}");
        assert!(!out.contains("verified"), "{out}");
    }
}
