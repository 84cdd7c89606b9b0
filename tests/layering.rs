//! The sans-IO layers must stay free of the runtime and TLS stacks, so they can be unit-tested,
//! fuzzed and benchmarked without sockets (DESIGN.md). This reads the sources and fails on any
//! mention of the forbidden crates in code (comments may explain why they are absent).
use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("source dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn offenders(paths: &[&str], forbidden: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for p in paths {
        let p = root.join(p);
        if p.is_dir() {
            rust_files(&p, &mut files);
        } else {
            files.push(p);
        }
    }
    assert!(!files.is_empty());
    let mut bad = Vec::new();
    for f in files {
        let text = fs::read_to_string(&f).expect("read source");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in forbidden {
                if code.contains(word) {
                    bad.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
    }
    bad
}

#[test]
fn sans_io_layers_do_not_import_glommio_or_rustls() {
    let bad = offenders(
        &[
            "src/codec",
            "src/session",
            "src/routing",
            "src/auth",
            "src/message.rs",
        ],
        &["glommio", "rustls", "futures_rustls", "std::net", "socket2"],
    );
    assert!(
        bad.is_empty(),
        "sans-IO modules import I/O crates:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_shard_core_has_no_io_no_rc_and_no_clock() {
    // The simulator runs it in one thread with simulated time: anything that reads the clock,
    // wakes a task or touches a socket would make runs unrepeatable or untestable.
    let bad: Vec<String> = offenders(
        &["src/shardcore", "src/metrics"],
        &[
            "glommio",
            "rustls",
            "std::net",
            "socket2",
            "std::rc",
            "Rc<",
            "Waker",
            "Instant::now",
            "SystemTime",
            "thread_local",
        ],
    )
    .into_iter()
    // Its unit tests take one base instant to simulate time from.
    .filter(|l| !l.contains("src/shardcore/tests.rs") || !l.contains("Instant::now"))
    .collect();
    assert!(
        bad.is_empty(),
        "the shard core must stay sans-IO:\n{}",
        bad.join("\n")
    );
}

#[test]
fn only_the_shard_module_imports_glommio() {
    let bad = offenders(
        &[
            "src/codec",
            "src/session",
            "src/routing",
            "src/auth",
            "src/shardcore",
            "src/metrics",
            "src/config",
            "src/tls",
            "src/broker.rs",
            "src/message.rs",
            "src/main.rs",
        ],
        &["glommio"],
    );
    assert!(
        bad.is_empty(),
        "glommio outside src/shard:\n{}",
        bad.join("\n")
    );
}
