//! Latency histograms and their summaries.
//!
//! Owns: the HDR histogram shape every core records into (nanoseconds, 1 ns .. 60 s, 3
//! significant digits), merging per-core histograms, percentile summaries and the `.hgrm`
//! percentile-distribution text format. Must not touch: I/O (callers write the text).

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency recorded (values above are clamped, and counted in `clamped`).
pub const MAX_NS: u64 = 60_000_000_000;

/// A latency histogram in nanoseconds.
#[derive(Clone)]
pub struct Lat {
    pub h: Histogram<u64>,
    /// Samples above [`MAX_NS`] (recorded as MAX_NS).
    pub clamped: u64,
}

impl Default for Lat {
    fn default() -> Self {
        Self::new()
    }
}

impl Lat {
    pub fn new() -> Self {
        Lat {
            // Cannot fail: the bounds are constants within the crate's limits.
            h: Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds"),
            clamped: 0,
        }
    }

    #[inline]
    pub fn record(&mut self, ns: u64) {
        let v = if ns > MAX_NS {
            self.clamped += 1;
            MAX_NS
        } else {
            ns.max(1)
        };
        // Cannot fail: v is within bounds, and auto-resize is not needed.
        let _ = self.h.record(v);
    }

    /// Add `other` into `self` (same bounds, so this cannot fail).
    pub fn merge(&mut self, other: &Lat) {
        let _ = self.h.add(&other.h);
        self.clamped += other.clamped;
    }

    pub fn is_empty(&self) -> bool {
        self.h.is_empty()
    }

    pub fn summary(&self) -> Summary {
        let q = |p: f64| {
            if self.h.is_empty() {
                0.0
            } else {
                self.h.value_at_quantile(p) as f64 / 1000.0
            }
        };
        Summary {
            count: self.h.len(),
            min_us: if self.h.is_empty() {
                0.0
            } else {
                self.h.min() as f64 / 1000.0
            },
            mean_us: if self.h.is_empty() {
                0.0
            } else {
                self.h.mean() / 1000.0
            },
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            p9999_us: q(0.9999),
            max_us: if self.h.is_empty() {
                0.0
            } else {
                self.h.max() as f64 / 1000.0
            },
        }
    }

    /// The `.hgrm` percentile distribution (HdrHistogram's text format, values in µs), as
    /// plotted by HdrHistogram's online plotter and `hdr-plot`.
    pub fn hgrm(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:>12} {:>14} {:>10} {:>14}\n",
            "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
        );
        if self.h.is_empty() {
            return s;
        }
        let mut total = 0u64;
        for v in self.h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let p = v.quantile_iterated_to();
            let inv = if p < 1.0 {
                format!("{:>14.2}", 1.0 / (1.0 - p))
            } else {
                format!("{:>14}", "inf")
            };
            let _ = writeln!(
                s,
                "{:>12.3} {:>2.12} {:>10} {}",
                v.value_iterated_to() as f64 / 1000.0,
                p,
                total,
                inv
            );
        }
        let sm = self.summary();
        let _ = writeln!(
            s,
            "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
            sm.mean_us,
            self.h.stdev() / 1000.0
        );
        let _ = writeln!(
            s,
            "#[Max     = {:>12.3}, Total count    = {:>12}]",
            sm.max_us,
            self.h.len()
        );
        let _ = writeln!(
            s,
            "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
            self.h.buckets(),
            self.h.distinct_values()
        );
        s
    }

    /// (percentile, µs) points for a percentile chart, log-spaced towards the tail.
    pub fn percentile_curve(&self) -> Vec<(f64, f64)> {
        if self.h.is_empty() {
            return Vec::new();
        }
        self.h
            .iter_quantiles(5)
            .map(|v| {
                (
                    v.quantile_iterated_to() * 100.0,
                    v.value_iterated_to() as f64 / 1000.0,
                )
            })
            .collect()
    }
}

/// Percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub p9999_us: f64,
    pub max_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_per_core_histograms_equals_recording_into_one() {
        let mut a = Lat::new();
        let mut b = Lat::new();
        let mut all = Lat::new();
        for i in 1..=1000u64 {
            let v = i * 1000; // 1 µs .. 1 ms
            if i % 3 == 0 {
                a.record(v)
            } else {
                b.record(v)
            }
            all.record(v);
        }
        a.merge(&b);
        assert_eq!(a.h.len(), 1000);
        assert_eq!(a.summary(), all.summary());
        let s = a.summary();
        // 3 significant digits: p50 of 1..1000 µs is 500 µs within 0.1%.
        assert!((s.p50_us - 500.0).abs() <= 0.5, "{s:?}");
        assert!((s.max_us - 1000.0).abs() <= 1.0, "{s:?}");
        assert!((s.min_us - 1.0).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn values_beyond_range_are_clamped_and_counted() {
        let mut a = Lat::new();
        a.record(MAX_NS * 2);
        a.record(0);
        assert_eq!(a.h.len(), 2);
        assert_eq!(a.clamped, 1);
        let mut b = Lat::new();
        b.merge(&a);
        assert_eq!(b.clamped, 1);
    }

    #[test]
    fn hgrm_ends_at_total_count() {
        let mut a = Lat::new();
        for v in [10_000, 20_000, 30_000, 40_000] {
            a.record(v);
        }
        let text = a.hgrm();
        assert!(text.contains("Total count    =            4"), "{text}");
        let last_row = text
            .lines()
            .rfind(|l| !l.starts_with('#') && !l.trim().is_empty())
            .unwrap();
        assert!(last_row.contains(" 4 "), "{last_row}");
    }

    #[test]
    fn empty_summary_is_zero() {
        assert_eq!(Lat::new().summary().count, 0);
        assert_eq!(Lat::new().summary().p99_us, 0.0);
    }
}
