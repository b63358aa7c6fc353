//! Walking the spanned TOML document.
//!
//! serde stops at the first problem, so instead of deriving `Raw*` types we
//! walk the `toml::de::DeTable` tree, which keeps a byte span on every key
//! and value. This file holds the small, generic helpers for that walk:
//! [`Problems`] (every problem found, with its span and key path) and
//! [`TableReader`] (read one table's keys by type, reject unknown ones).
//! What the keys mean (ranges, defaults, references) lives in
//! `validate.rs`; turning spans into line:column lives in `load.rs`.

use std::ops::Range;

use serde_spanned::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

/// A value in the document, with the byte span it was written at.
pub(super) type Value<'i> = Spanned<DeValue<'i>>;

/// One problem, before its span is turned into line:column.
#[derive(Debug, Clone)]
pub(super) struct Problem {
    pub span: Range<usize>,
    pub path: String,
    pub message: String,
}

/// Every problem found while walking one document.
#[derive(Debug, Default)]
pub(super) struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(&mut self, span: Range<usize>, path: &str, message: impl Into<String>) {
        self.0.push(Problem {
            span,
            path: path.to_owned(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `path.key`, or just `key` at the root; keys that are not bare TOML keys
/// are quoted.
pub(super) fn join_key(path: &str, key: &str) -> String {
    let is_bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if is_bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

/// `path[index]`.
pub(super) fn join_index(path: &str, index: usize) -> String {
    format!("{path}[{index}]")
}

/// "a string", "an integer", ...: the name of a TOML type with its article.
fn with_article(type_name: &str) -> String {
    match type_name.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("an {type_name}"),
        _ => format!("a {type_name}"),
    }
}

/// Reports "expected a string, found integer" at `value`.
pub(super) fn wrong_type(problems: &mut Problems, value: &Value<'_>, path: &str, expected: &str) {
    problems.push(
        value.span(),
        path,
        format!(
            "expected {}, found {}",
            with_article(expected),
            value.get_ref().type_str()
        ),
    );
}

/// Reads `value` as a string, or reports the wrong type.
pub(super) fn expect_str<'a>(
    problems: &mut Problems,
    value: &'a Value<'_>,
    path: &str,
) -> Option<&'a str> {
    match value.get_ref() {
        DeValue::String(s) => Some(s.as_ref()),
        _ => {
            wrong_type(problems, value, path, "string");
            None
        }
    }
}

/// Reads `value` as an integer that fits in an `i64`, or reports why not.
pub(super) fn expect_int(problems: &mut Problems, value: &Value<'_>, path: &str) -> Option<i64> {
    match value.get_ref() {
        DeValue::Integer(int) => match i64::from_str_radix(int.as_str(), int.radix()) {
            Ok(n) => Some(n),
            Err(_) => {
                problems.push(value.span(), path, "integer is out of range");
                None
            }
        },
        _ => {
            wrong_type(problems, value, path, "integer");
            None
        }
    }
}

/// Reads `value` as a boolean, or reports the wrong type.
pub(super) fn expect_bool(problems: &mut Problems, value: &Value<'_>, path: &str) -> Option<bool> {
    match value.get_ref() {
        DeValue::Boolean(b) => Some(*b),
        _ => {
            wrong_type(problems, value, path, "boolean");
            None
        }
    }
}

/// Reads `value` as an array, or reports the wrong type.
pub(super) fn expect_array<'a, 'i>(
    problems: &mut Problems,
    value: &'a Value<'i>,
    path: &str,
) -> Option<&'a DeArray<'i>> {
    match value.get_ref() {
        DeValue::Array(array) => Some(array),
        _ => {
            wrong_type(problems, value, path, "array");
            None
        }
    }
}

/// Reads `value` as a table, or reports the wrong type.
pub(super) fn expect_table<'a, 'i>(
    problems: &mut Problems,
    value: &'a Value<'i>,
    path: String,
) -> Option<TableReader<'a, 'i>> {
    match value.get_ref() {
        DeValue::Table(table) => Some(TableReader {
            table: Some(table),
            span: value.span(),
            path,
        }),
        _ => {
            wrong_type(problems, value, &path, "table");
            None
        }
    }
}

/// One table of the document, with its key path, read key by key.
///
/// The typed getters (`str`, `int`, ...) return `None` both when the key is
/// absent and when it has the wrong type; in the second case they have
/// already reported the problem, so callers just fall back to the default.
pub(super) struct TableReader<'a, 'i> {
    /// `None` for an optional section that is absent: it reads as empty.
    table: Option<&'a DeTable<'i>>,
    span: Range<usize>,
    path: String,
}

impl<'a, 'i> TableReader<'a, 'i> {
    /// The document root.
    pub fn root(root: &'a Spanned<DeTable<'i>>) -> Self {
        TableReader {
            table: Some(root.get_ref()),
            span: root.span(),
            path: String::new(),
        }
    }

    /// This table's key path, e.g. `listener[0]`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Where the table was written (its `[header]` or `{ ... }`).
    pub fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    /// The key path of one of this table's keys.
    pub fn key_path(&self, key: &str) -> String {
        join_key(&self.path, key)
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&'a Value<'i>> {
        self.table?.get(key)
    }

    /// Where `key` itself was written (not its value).
    pub fn key_span(&self, key: &str) -> Option<Range<usize>> {
        self.table?.get_key_value(key).map(|(k, _)| k.span())
    }

    /// Every key with its value, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (&'a str, &'a Value<'i>)> + 'a {
        self.table
            .into_iter()
            .flat_map(|table| table.iter())
            .map(|(k, v)| (k.get_ref().as_ref(), v))
    }

    /// Reports every key that is not in `allowed`. Keys in `unsupported`
    /// are left alone (the caller rejects them with a better message) but
    /// count as close matches for the did-you-mean hint.
    pub fn reject_unknown_keys(
        &self,
        problems: &mut Problems,
        allowed: &[&str],
        unsupported: &[&str],
    ) {
        let Some(table) = self.table else {
            return;
        };
        for (key, _) in table.iter() {
            let name: &str = key.get_ref();
            if allowed.contains(&name) || unsupported.contains(&name) {
                continue;
            }
            let mut message = format!("unknown key {name:?} (allowed: {})", allowed.join(", "));
            let candidates = allowed.iter().chain(unsupported.iter()).copied();
            if let Some(hint) = did_you_mean(name, candidates) {
                message.push_str(&format!("; did you mean {hint:?}?"));
            }
            problems.push(key.span(), &self.path, message);
        }
    }

    /// Reports `key` as "not supported yet" if it is present at all.
    pub fn reject_unsupported(&self, problems: &mut Problems, key: &str) {
        if let Some(span) = self.key_span(key) {
            problems.push(
                span,
                &self.key_path(key),
                format!("{key:?} is not supported yet; remove it"),
            );
        }
    }

    /// Reports a missing required key at the table itself.
    pub fn missing(&self, problems: &mut Problems, key: &str) {
        problems.push(
            self.span(),
            &self.path,
            format!("missing required key {key:?}"),
        );
    }

    // The getters build the key path only to report a problem: a large
    // file has tens of thousands of keys, and reloads read them all.

    pub fn str(&self, problems: &mut Problems, key: &str) -> Option<Spanned<&'a str>> {
        let value = self.get(key)?;
        if let DeValue::String(s) = value.get_ref() {
            return Some(Spanned::new(value.span(), s.as_ref()));
        }
        expect_str(problems, value, &self.key_path(key)).map(|s| Spanned::new(value.span(), s))
    }

    /// Like [`TableReader::str`], but reports the key as missing when absent.
    pub fn required_str(&self, problems: &mut Problems, key: &str) -> Option<Spanned<&'a str>> {
        if self.get(key).is_none() {
            self.missing(problems, key);
            return None;
        }
        self.str(problems, key)
    }

    pub fn int(&self, problems: &mut Problems, key: &str) -> Option<Spanned<i64>> {
        let value = self.get(key)?;
        if let DeValue::Integer(int) = value.get_ref() {
            if let Ok(n) = i64::from_str_radix(int.as_str(), int.radix()) {
                return Some(Spanned::new(value.span(), n));
            }
        }
        expect_int(problems, value, &self.key_path(key)).map(|n| Spanned::new(value.span(), n))
    }

    /// A number: a TOML float, or an integer read as one.
    pub fn float(&self, problems: &mut Problems, key: &str) -> Option<Spanned<f64>> {
        let value = self.get(key)?;
        let n = match value.get_ref() {
            DeValue::Float(f) => f.as_str().replace('_', "").parse::<f64>().ok(),
            DeValue::Integer(_) => {
                expect_int(problems, value, &self.key_path(key)).map(|n| n as f64)
            }
            _ => {
                wrong_type(problems, value, &self.key_path(key), "number");
                return None;
            }
        };
        n.map(|n| Spanned::new(value.span(), n))
    }

    pub fn bool(&self, problems: &mut Problems, key: &str) -> Option<Spanned<bool>> {
        let value = self.get(key)?;
        if let DeValue::Boolean(b) = value.get_ref() {
            return Some(Spanned::new(value.span(), *b));
        }
        expect_bool(problems, value, &self.key_path(key)).map(|b| Spanned::new(value.span(), b))
    }

    pub fn array(&self, problems: &mut Problems, key: &str) -> Option<&'a DeArray<'i>> {
        let value = self.get(key)?;
        if let DeValue::Array(array) = value.get_ref() {
            return Some(array);
        }
        expect_array(problems, value, &self.key_path(key))
    }

    pub fn table(&self, problems: &mut Problems, key: &str) -> Option<TableReader<'a, 'i>> {
        let value = self.get(key)?;
        expect_table(problems, value, self.key_path(key))
    }

    /// An optional sub-table such as `[admin]`. When it is absent (or not a
    /// table, which is reported) it reads as empty, so every key in it
    /// takes its default.
    pub fn section(&self, problems: &mut Problems, key: &str) -> TableReader<'a, 'i> {
        self.table(problems, key).unwrap_or_else(|| TableReader {
            table: None,
            span: self.span(),
            path: self.key_path(key),
        })
    }

    /// The tables of an array of tables (`[[key]]`, or an array of inline
    /// tables), each with its indexed path. Items that are not tables are
    /// reported and skipped.
    pub fn tables(&self, problems: &mut Problems, key: &str) -> Vec<TableReader<'a, 'i>> {
        let Some(array) = self.array(problems, key) else {
            return Vec::new();
        };
        let path = self.key_path(key);
        array
            .iter()
            .enumerate()
            .filter_map(|(i, item)| expect_table(problems, item, join_index(&path, i)))
            .collect()
    }
}

/// The candidate closest to `word`, when it is close enough to be a typo.
pub(super) fn did_you_mean<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(&word.to_lowercase(), c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance counted in chars, where swapping two neighbours counts as
/// one edit (so "jsno" is one typo away from "json").
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: distance between the first i chars of a and first j of b.
    // The first row and column are the distances to an empty prefix; the
    // rest is filled in below.
    let mut d: Vec<Vec<usize>> = (0..=a.len())
        .map(|i| (0..=b.len()).map(|j| if i == 0 { j } else { i }).collect())
        .collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}
