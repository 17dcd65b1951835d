//! A reader of the Prometheus text exposition format (version 0.0.4): the sample lines
//! `name{label="value",…} value [timestamp]`, comments skipped. Enough for `coevo status
//! --metrics` and for tests to check counters the way Prometheus reads them; not a validator.

use std::collections::BTreeMap;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A malformed line, with its 1-based number.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// Every sample of a scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples(pub Vec<Sample>);

impl Samples {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The sample named `name` whose labels are exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// The sum over every sample named `name`, whatever its labels (0 when there is none).
    pub fn sum(&self, name: &str) -> f64 {
        self.with_name(name).map(|s| s.value).sum()
    }

    /// Every sample named `name`.
    pub fn with_name<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| s.name == name)
    }
}

/// Parses a scrape. Comment (`#`) and blank lines are skipped.
pub fn parse(text: &str) -> Result<Samples, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason: &str| ParseError {
            line: i + 1,
            reason: format!("{reason}: {line:?}"),
        };
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .ok_or_else(|| err("no value"))?;
        let name = &line[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(err("invalid metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let (parsed, after) = parse_labels(body).map_err(|r| err(&r))?;
            labels = parsed;
            rest = after;
        }
        let value = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| err("no value"))?;
        let value = match value {
            "+Inf" | "Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse::<f64>().map_err(|_| err("value is not a number"))?,
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(Samples(out))
}

/// Parses `k="v",…}` and returns the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = s.find('=').ok_or("label without '='")?;
        let key = s[..eq].trim().to_string();
        if key.is_empty() {
            return Err("empty label name".into());
        }
        s = s[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated escape".into()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.insert(key, value);
        s = s[end + 1..].trim_start();
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_labels_escapes_and_special_values() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total 3\n\
                    b{x=\"1\",y=\"q\\\"\\\\\\n\"} 0.5 1700000000\nc{} +Inf\nd NaN\n";
        let s = parse(text).unwrap();
        assert_eq!(s.value("a_total", &[]), Some(3.0));
        assert_eq!(s.value("b", &[("x", "1"), ("y", "q\"\\\n")]), Some(0.5));
        assert_eq!(
            s.value("b", &[("x", "1")]),
            None,
            "labels must match exactly"
        );
        assert_eq!(s.value("c", &[]), Some(f64::INFINITY));
        assert!(s.value("d", &[]).is_some_and(f64::is_nan));
        assert_eq!(s.sum("a_total"), 3.0);
        assert_eq!(s.sum("missing"), 0.0);
    }

    #[test]
    fn malformed_lines_are_errors_with_their_number() {
        for bad in [
            "x{a=\"1\" 2",
            "x{a=1} 2",
            "x two",
            "x",
            "bad-name 1",
            "x{a=\"1} 2",
        ] {
            let e = parse(&format!("# ok\n{bad}\n")).unwrap_err();
            assert_eq!(e.line, 2, "{bad}: {e}");
        }
    }
}
