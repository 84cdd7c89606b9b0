//! The one table of metrics (docs/metrics.md), the Grafana dashboard and the alert rules
//! agree with what the broker exports (`midge::metrics::expose::ALL`): every family is
//! documented, and nothing references a metric that does not exist.
use std::collections::BTreeSet;
use std::path::Path;

use midge::metrics::expose::{Kind, ALL};

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `midge_...` identifier in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(p) = text[i..].find("midge_") {
        let start = i + p;
        let before_ok =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        if before_ok {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The series names a family's samples may use.
fn exported() -> BTreeSet<String> {
    let mut s = BTreeSet::new();
    for f in ALL {
        s.insert(f.name.to_string());
        if f.kind == Kind::Histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                s.insert(format!("{}{suffix}", f.name));
            }
        }
    }
    s
}

#[test]
fn every_family_is_in_the_table_and_the_table_has_no_others() {
    let doc = read("docs/metrics.md");
    let rows: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("midge_"))
        .map(str::to_string)
        .collect();
    let families: BTreeSet<String> = ALL.iter().map(|f| f.name.to_string()).collect();
    assert_eq!(rows, families, "docs/metrics.md rows vs expose::ALL");
    for f in ALL {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", f.name)))
            .unwrap();
        assert!(row.contains(&format!("| {} |", f.kind.as_str())), "{row}");
    }
}

#[test]
fn dashboard_and_alert_rules_use_only_exported_metrics() {
    let exported = exported();
    for file in [
        "tuning/grafana-dashboard.json",
        "tuning/prometheus-alerts.yml",
    ] {
        let text = read(file);
        let used = names_in(&text);
        assert!(used.len() >= 6, "{file}: {used:?}");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses unknown metrics {unknown:?}"
        );
    }
    // The dashboard is valid JSON with panels (python3's json module is the parser we did
    // not write); the rules pass promtool where it is installed.
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json,sys; d=json.load(open(sys.argv[1])); assert len(d['panels']) >= 8",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/grafana-dashboard.json"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Ok(out) = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/prometheus-alerts.yml"))
        .output()
    {
        assert!(
            out.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
