//! The one writer of keyswap's `/metrics` page: Prometheus text format 0.0.4, the format
//! `/metrics` declares. Every family goes through [`Page::family`], so `# HELP` and `# TYPE` name
//! exactly what the samples are called (`keyswap_requests_total` for a counter, the base name of
//! a histogram's `_bucket`/`_sum`/`_count`), label values are escaped one way, and a family is
//! never declared twice.

use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Where metric families are written: the `/metrics` page ([`Page`]), or an OTLP metrics export
/// ([`super::otlp_metrics::Collect`]). Every family of keyswap's registry is written through
/// this, so the two always carry the same families, samples and labels.
pub trait Families {
    /// Declares family `name` (Prometheus spelling; a counter's ends in `_total`). A second
    /// declaration of the same name adds nothing: its samples join the first.
    fn family(&mut self, name: &str, help: &str, kind: Kind);
    /// One sample of the family `name` with `labels`.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64);
    /// One histogram series of family `name`: per-bucket counts (not cumulative, `+Inf` last)
    /// over `bounds`, and the sum.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], bounds: &[f64], counts: &[u64], sum: f64);

    /// A family of one unlabelled sample.
    fn single(&mut self, name: &str, help: &str, kind: Kind, value: f64) {
        self.family(name, help, kind);
        self.sample(name, &[], value);
    }
}

/// A `/metrics` page being written.
#[derive(Default)]
pub struct Page {
    out: String,
    declared: Vec<String>,
}

impl Page {
    pub fn new() -> Page {
        Page { out: String::with_capacity(8192), declared: Vec::new() }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

impl Families for Page {
    fn family(&mut self, name: &str, help: &str, kind: Kind) {
        debug_assert!(kind != Kind::Counter || name.ends_with("_total"), "counter {name} must end in _total");
        if !self.declared.iter().any(|d| d == name) {
            self.declared.push(name.to_owned());
            let _ = writeln!(self.out, "# HELP {name} {}\n# TYPE {name} {}", help.replace('\n', " "), kind.as_str());
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                escape_into(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], bounds: &[f64], counts: &[u64], sum: f64) {
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        for (i, c) in counts.iter().enumerate() {
            cumulative += c;
            let le = bounds.get(i).map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative as f64);
        }
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, cumulative as f64);
    }
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
fn escape_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Checks a page the way a strict parser reads it: every sample belongs to a family declared
/// before it with `# TYPE` (its name, or for a histogram the name plus `_bucket`, `_sum` or
/// `_count`), every family is declared once, counters end in `_total`. The problems, one per line.
pub fn lint(page: &str) -> Vec<String> {
    let mut types: Vec<(String, String)> = Vec::new();
    let mut problems = Vec::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            if types.iter().any(|(n, _)| n == name) {
                problems.push(format!("{name}: declared twice"));
            }
            if kind == "counter" && !name.ends_with("_total") {
                problems.push(format!("{name}: a counter whose name does not end in _total"));
            }
            types.push((name.to_owned(), kind.to_owned()));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or("");
        let ok = types.iter().any(|(n, kind)| {
            n == name
                || (kind == "histogram"
                    && [("_bucket"), ("_sum"), ("_count")].iter().any(|s| format!("{n}{s}") == name))
        });
        if !ok {
            problems.push(format!("{name}: sample without a matching # TYPE before it"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_named_as_their_samples_and_values_escaped() {
        let mut p = Page::new();
        p.family("keyswap_x_total", "X.", Kind::Counter);
        p.sample("keyswap_x_total", &[("tenant", "a\"b\\c\nd")], 3.0);
        p.single("keyswap_x_total", "X again.", Kind::Counter, 1.0);
        p.family("keyswap_h_seconds", "H.", Kind::Histogram);
        p.histogram("keyswap_h_seconds", &[("phase", "a")], &[0.1, 1.0], &[1, 2, 3], 4.5);
        let page = p.finish();
        assert!(page.contains("keyswap_x_total{tenant=\"a\\\"b\\\\c\\nd\"} 3\n"), "{page}");
        assert_eq!(page.matches("# TYPE keyswap_x_total counter").count(), 1);
        assert!(page.contains("keyswap_h_seconds_bucket{phase=\"a\",le=\"1\"} 3\n"), "{page}");
        assert!(page.contains("keyswap_h_seconds_bucket{phase=\"a\",le=\"+Inf\"} 6\n"), "{page}");
        assert!(page.contains("keyswap_h_seconds_count{phase=\"a\"} 6\n"), "{page}");
        assert_eq!(lint(&page), Vec::<String>::new());
    }

    #[test]
    fn lint_finds_what_a_strict_parser_refuses() {
        let bad = "# TYPE keyswap_a counter\nkeyswap_a_total 1\n# TYPE keyswap_b gauge\n# TYPE keyswap_b gauge\n";
        let problems = lint(bad);
        assert!(problems.iter().any(|p| p.contains("does not end in _total")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("keyswap_a_total: sample without")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("declared twice")), "{problems:?}");
    }
}
