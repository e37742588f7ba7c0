//! The pure side of `berth load`: per-class latency samples, percentiles, the report table, and
//! reading the upstream fetch count out of a Prometheus text exposition.
//!
//! No I/O here: the pullers record into `Recorder`s and `Report` renders what they saw.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// What a request fetched; the report has one row per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// The manifest named on the command line (by tag or digest); may be an index.
    Manifest,
    /// The platform manifest an index points at, fetched by digest.
    Child,
    /// The image config blob.
    Config,
    /// A layer blob.
    Layer,
}

impl Class {
    pub const ALL: [Class; 4] = [Class::Manifest, Class::Child, Class::Config, Class::Layer];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Manifest => "manifest",
            Class::Child => "child",
            Class::Config => "config",
            Class::Layer => "layer",
        }
    }
}

/// Samples of one class: durations of successful requests, bytes, errors.
#[derive(Debug, Default, Clone)]
pub struct ClassStats {
    /// Whole-request durations (request sent to last body byte verified).
    pub durations: Vec<Duration>,
    /// Time to the response head, which is where a cache shows its lookup cost.
    pub(crate) first_byte: Vec<Duration>,
    pub bytes: u64,
    pub errors: u64,
}

/// What one puller saw; merged into a `Report` at the end so the hot loop never shares a lock.
#[derive(Debug, Default, Clone)]
pub struct Recorder {
    pub classes: BTreeMap<Class, ClassStats>,
    pub pulls: u64,
    pub failed_pulls: u64,
    /// The first few error messages, for the person reading the report.
    pub error_samples: Vec<String>,
}

/// How many distinct error messages a report keeps.
const ERROR_SAMPLES: usize = 5;

impl Recorder {
    pub fn success(&mut self, class: Class, first_byte: Duration, total: Duration, bytes: u64) {
        let stats = self.classes.entry(class).or_default();
        stats.first_byte.push(first_byte);
        stats.durations.push(total);
        stats.bytes += bytes;
    }

    pub fn error(&mut self, class: Class, message: String) {
        self.classes.entry(class).or_default().errors += 1;
        if self.error_samples.len() < ERROR_SAMPLES && !self.error_samples.contains(&message) {
            self.error_samples.push(message);
        }
    }

    pub(crate) fn merge(&mut self, other: Recorder) {
        for (class, stats) in other.classes {
            let mine = self.classes.entry(class).or_default();
            mine.durations.extend(stats.durations);
            mine.first_byte.extend(stats.first_byte);
            mine.bytes += stats.bytes;
            mine.errors += stats.errors;
        }
        self.pulls += other.pulls;
        self.failed_pulls += other.failed_pulls;
        for message in other.error_samples {
            if self.error_samples.len() < ERROR_SAMPLES && !self.error_samples.contains(&message) {
                self.error_samples.push(message);
            }
        }
    }
}

/// The nearest-rank percentile (`p` in 0..=100) of `samples`, which must be sorted.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// p50, p90, p99 of unsorted samples.
pub(crate) fn quantiles(samples: &[Duration]) -> Option<[Duration; 3]> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    Some([
        percentile(&sorted, 50.0)?,
        percentile(&sorted, 90.0)?,
        percentile(&sorted, 99.0)?,
    ])
}

/// The sum of every sample of the families whose name ends in `suffix` (labels ignored), or
/// `None` if no such family is present. Tolerant by design: `berth_upstream_requests_total`
/// today, and a renamed or prefixed family tomorrow, are both found by `upstream_requests_total`.
pub(crate) fn sum_family(exposition: &str, suffix: &str) -> Option<f64> {
    let mut found = None;
    for line in exposition.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        if !line[..name_end].ends_with(suffix) {
            continue;
        }
        // `name{labels} value [timestamp]`: the value follows the closing brace if any.
        let after_labels = match line[name_end..].starts_with('{') {
            true => line[name_end..]
                .rfind('}')
                .map(|i| &line[name_end + i + 1..]),
            false => Some(&line[name_end..]),
        };
        let value = after_labels
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// Everything a run measured, ready to print.
pub struct Report {
    pub recorder: Recorder,
    pub elapsed: Duration,
    pub concurrency: usize,
    /// Upstream requests berth made during the run, from its metrics, if asked for.
    pub(crate) upstream_requests: Option<f64>,
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

impl Report {
    pub(crate) fn total_bytes(&self) -> u64 {
        self.recorder.classes.values().map(|c| c.bytes).sum()
    }

    pub fn total_errors(&self) -> u64 {
        self.recorder.classes.values().map(|c| c.errors).sum()
    }

    /// The human-readable report: totals, then one row per request class.
    pub fn render(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(f64::EPSILON);
        let bytes = self.total_bytes();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} pulls ({} failed) by {} pullers in {:.2} s: {:.1} pulls/s, {:.1} MiB/s, {} errors",
            self.recorder.pulls,
            self.recorder.failed_pulls,
            self.concurrency,
            secs,
            self.recorder.pulls as f64 / secs,
            bytes as f64 / 1048576.0 / secs,
            self.total_errors(),
        );
        if let Some(upstream) = self.upstream_requests {
            let _ = writeln!(out, "upstream requests during the run: {upstream}");
        }
        let _ = writeln!(
            out,
            "{:<9} {:>8} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9}",
            "class", "requests", "errors", "MiB", "p50 ms", "p90 ms", "p99 ms", "ttfb p50"
        );
        for class in Class::ALL {
            let Some(stats) = self.recorder.classes.get(&class) else {
                continue;
            };
            let [p50, p90, p99] = quantiles(&stats.durations).unwrap_or_default();
            let ttfb = quantiles(&stats.first_byte).unwrap_or_default()[0];
            let _ = writeln!(
                out,
                "{:<9} {:>8} {:>7} {:>10.1} {:>9} {:>9} {:>9} {:>9}",
                class.as_str(),
                stats.durations.len(),
                stats.errors,
                stats.bytes as f64 / 1048576.0,
                ms(p50),
                ms(p90),
                ms(p99),
                ms(ttfb),
            );
        }
        for message in &self.recorder.error_samples {
            let _ = writeln!(out, "error: {}", crate::warm::printable(message));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nearest_rank_percentiles_pick_real_samples() {
        let sorted: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&sorted, 50.0), Some(ms(50)));
        assert_eq!(percentile(&sorted, 90.0), Some(ms(90)));
        assert_eq!(percentile(&sorted, 99.0), Some(ms(99)));
        assert_eq!(percentile(&sorted, 100.0), Some(ms(100)));
        assert_eq!(percentile(&sorted, 0.0), Some(ms(1)));
        assert_eq!(percentile(&[ms(7)], 99.0), Some(ms(7)));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn quantiles_sort_their_input() {
        let samples = [ms(30), ms(10), ms(20)];
        assert_eq!(quantiles(&samples), Some([ms(20), ms(30), ms(30)]));
    }

    #[test]
    fn sums_a_family_across_labels_and_ignores_others() {
        let text = "\
# HELP berth_upstream_requests_total Requests sent to upstream registries
# TYPE berth_upstream_requests_total counter
berth_upstream_requests_total{kind=\"blob\",upstream=\"a\"} 3
berth_upstream_requests_total{kind=\"manifest\",upstream=\"a\"} 2
berth_upstream_requests_totally_else 100
berth_requests_total{route=\"blob\"} 40
";
        assert_eq!(sum_family(text, "upstream_requests_total"), Some(5.0));
        assert_eq!(sum_family(text, "absent_total"), None);
    }

    #[test]
    fn reads_unlabelled_samples_and_labels_with_braces_in_values() {
        let text =
            "x_upstream_requests_total 4\ny_upstream_requests_total{path=\"}{\"} 1.5 1700000000\n";
        assert_eq!(sum_family(text, "upstream_requests_total"), Some(5.5));
    }

    #[test]
    fn merging_recorders_adds_counts_and_keeps_few_distinct_errors() {
        let mut a = Recorder::default();
        a.success(Class::Layer, ms(1), ms(5), 100);
        a.pulls = 1;
        for _ in 0..3 {
            a.error(Class::Manifest, "same".into());
        }
        let mut b = Recorder::default();
        b.success(Class::Layer, ms(2), ms(6), 50);
        b.pulls = 2;
        for n in 0..10 {
            b.error(Class::Config, format!("error {n}"));
        }
        a.merge(b);
        let layer = &a.classes[&Class::Layer];
        assert_eq!((layer.durations.len(), layer.bytes), (2, 150));
        assert_eq!(a.classes[&Class::Manifest].errors, 3);
        assert_eq!(a.classes[&Class::Config].errors, 10);
        assert_eq!(a.pulls, 3);
        assert_eq!(a.error_samples.len(), ERROR_SAMPLES);
        assert_eq!(a.error_samples[0], "same");
    }

    #[test]
    fn report_has_a_row_per_class_seen() {
        let mut recorder = Recorder::default();
        recorder.success(Class::Manifest, ms(1), ms(2), 1024);
        recorder.success(Class::Layer, ms(3), ms(40), 1 << 20);
        recorder.pulls = 1;
        let report = Report {
            recorder,
            elapsed: Duration::from_secs(1),
            concurrency: 1,
            upstream_requests: Some(2.0),
        };
        let text = report.render();
        assert!(text.contains("upstream requests during the run: 2"));
        assert!(text.lines().any(|l| l.starts_with("manifest ")));
        assert!(text.lines().any(|l| l.starts_with("layer ")));
        assert!(!text.lines().any(|l| l.starts_with("config ")));
    }
}
