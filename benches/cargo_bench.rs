//! `cargo bench`: the full harness (`vmpager-bench`), report in
//! `target/vmpager-bench/bench.json` with its pictures next to it. `QUICK=1` for the quick run.
//! Needs release binaries: `cargo build --release --workspace` first (or set `VMPAGERD`; the
//! `vmpager` binary is taken from next to vmpagerd).

fn main() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let opts = vmpager_bench::Options {
        quick: std::env::var_os("QUICK").is_some(),
        json: Some(target.join("vmpager-bench").join("bench.json")),
        vmpagerd: None,
        vmpager: None,
        only: Vec::new(),
    };
    match vmpager_bench::run(&opts, &mut |s| eprintln!("bench: {s}")) {
        Ok(report) => {
            println!("{}", report.table());
            println!(
                "wrote {}",
                opts.json
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string())
            );
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg += &format!(": {s}");
                src = s.source();
            }
            eprintln!("bench failed: {msg}");
            std::process::exit(1);
        }
    }
}
