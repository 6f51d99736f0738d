//! The metrics registry each role exposes as Prometheus text on its admin
//! port. Stages register their own families into one shared [`Registry`].

pub use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram};
pub use prometheus_client::registry::Registry;

/// Render a registry in the Prometheus text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String cannot fail");
    out
}

/// Latency buckets in seconds, from 100 µs to 10 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0].into_iter()
}

/// One sample of a Prometheus/OpenMetrics text page: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The samples of a text page (comments and lines that do not parse are
/// skipped; a label value's escapes `\"`, `\\`, `\n` are undone). Linear in
/// the text's length.
pub fn parse_text(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = Vec::new();
    let rest = if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches([',', ' ']);
            if let Some(after) = r.strip_prefix('}') {
                break after;
            }
            let (key, after) = r.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break i,
                    c => value.push(c),
                }
            };
            labels.push((key.trim().to_owned(), value));
            r = &after[end + 1..];
        }
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name: name.to_owned(), labels, value })
}

/// A cumulative histogram read from samples: (upper bound, count at or below it), sorted.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Buckets(pub Vec<(f64, f64)>);

impl Buckets {
    /// The `<name>_bucket` samples whose labels include all of `with`.
    pub fn of(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Buckets {
        let bucket = format!("{name}_bucket");
        let mut merged: std::collections::BTreeMap<u64, f64> = std::collections::BTreeMap::new();
        for s in samples.iter().filter(|s| s.name == bucket && with.iter().all(|(k, v)| s.label(k) == Some(v))) {
            let Some(le) = s.label("le").and_then(|l| if l == "+Inf" { Some(f64::INFINITY) } else { l.parse::<f64>().ok() }) else { continue };
            // Several series (other labels) of one histogram add up bucket by bucket.
            *merged.entry(le.to_bits()).or_default() += s.value;
        }
        let mut out: Vec<(f64, f64)> = merged.into_iter().map(|(b, n)| (f64::from_bits(b), n)).collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        Buckets(out)
    }

    /// The observations since `earlier` (a scrape of the same histogram before).
    pub fn minus(&self, earlier: &Buckets) -> Buckets {
        Buckets(self.0.iter().map(|&(le, n)| (le, n - earlier.0.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, m)| *m))).collect())
    }

    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |(_, n)| *n)
    }

    /// The upper bound of the bucket holding quantile `q`; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = (q * total).ceil().max(1.0);
        self.0.iter().find(|(_, n)| *n >= rank).map(|(le, _)| *le)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_pages_parse_into_samples_and_histograms() {
        let text = "# HELP x y\n\
                    a_total 3\n\
                    b{path=\"hit\",le=\"0.00001\"} 90\n\
                    h_bucket{path=\"hit\",le=\"0.00001\"} 90\n\
                    h_bucket{path=\"hit\",le=\"0.00002\"} 99\n\
                    h_bucket{path=\"hit\",le=\"+Inf\"} 100\n\
                    h_bucket{path=\"miss\",le=\"+Inf\"} 7\n\
                    q{v=\"a \\\"quoted\\\" \\\\ {x=1}\"} 1.5\n\
                    broken{ 1\n";
        let s = parse_text(text);
        assert_eq!(s[0], Sample { name: "a_total".into(), labels: vec![], value: 3.0 });
        assert_eq!(s.iter().find(|x| x.name == "q").unwrap().label("v"), Some("a \"quoted\" \\ {x=1}"));
        assert!(!s.iter().any(|x| x.name.starts_with("broken")));
        let h = Buckets::of(&s, "h", &[("path", "hit")]);
        assert_eq!(h.count(), 100.0);
        assert_eq!(h.quantile(0.5), Some(0.00001));
        assert_eq!(h.quantile(0.99), Some(0.00002));
        assert_eq!(h.quantile(1.0), Some(f64::INFINITY));
        let earlier = Buckets(vec![(0.00001, 0.0), (0.00002, 9.0), (f64::INFINITY, 10.0)]);
        assert_eq!(h.minus(&earlier).count(), 90.0);
        assert_eq!(Buckets::of(&s, "h", &[]).count(), 107.0, "series add up");
        assert_eq!(Buckets::default().quantile(0.99), None);
    }
}
