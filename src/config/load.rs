//! Reading a config file: text in, a validated [`Config`] or every problem
//! out.
//!
//! This file owns the outer steps: read the file, parse the TOML (syntax
//! errors end the run here), hand the document to `validate.rs`, then turn
//! the byte spans of the problems it found into sorted file:line:column
//! [`ConfigError`]s.

use std::path::{Path, PathBuf};

use toml::de::DeTable;

use super::schema::{Problem, Problems};
use super::validate;
use super::{Config, ConfigError, ConfigErrors, ConfigSource};

/// Reads and validates the config file at `path`.
///
/// An unreadable file is one [`ConfigError`] with line 0; otherwise see
/// [`from_str`]. Errors name the file as `path` was written.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let text = read_file(path)?;
    from_str(&text, &path.display().to_string())
}

/// Reads the text of the config file at `path`; an unreadable file is one
/// [`ConfigError`] with line 0.
pub fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read config file: {e}"),
        }])
    })
}

/// The hash [`ConfigSource::hash`] holds for a file with this text.
pub fn content_hash(text: &str) -> String {
    fnv1a_64_hex(text.as_bytes())
}

/// Validates config `text`; `file` is the name errors print and becomes
/// [`ConfigSource::path`].
///
/// On failure every problem in the text is returned, sorted by position. A
/// TOML syntax error stops before validation, so only syntax errors are
/// returned then.
pub fn from_str(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    let lines = LineIndex::new(text);
    let to_error = |problem: Problem| {
        let (line, column) = lines.position(problem.span.start);
        ConfigError {
            file: file.to_owned(),
            line,
            column,
            path: problem.path,
            message: problem.message,
        }
    };

    let (document, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        // Recovery can report one mistake more than once; keep the first
        // report at each position.
        let mut errors: Vec<ConfigError> = syntax_errors
            .iter()
            .map(|e| {
                to_error(Problem {
                    span: e.span().unwrap_or(0..0),
                    path: String::new(),
                    message: format!("invalid toml: {}", e.message().trim_end()),
                })
            })
            .collect();
        errors.sort_by_key(|e| (e.line, e.column));
        errors.dedup_by_key(|e| (e.line, e.column));
        return Err(ConfigErrors(errors));
    }

    let source = ConfigSource {
        path: PathBuf::from(file),
        hash: fnv1a_64_hex(text.as_bytes()),
    };
    let mut problems = Problems::default();
    let config = validate::config(&document, source, &mut problems);
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => {
            let mut errors: Vec<ConfigError> = problems.0.into_iter().map(to_error).collect();
            // Stable, so problems at one position keep the order found.
            errors.sort_by_key(|e| (e.line, e.column));
            if errors.is_empty() {
                // validate returns None only after reporting why; this is a
                // guard against that promise breaking, not an expected path.
                errors.push(to_error(Problem {
                    span: 0..0,
                    path: String::new(),
                    message: "invalid config".to_owned(),
                }));
            }
            Err(ConfigErrors(errors))
        }
    }
}

/// FNV-1a 64 of `bytes`, as 16 lower-case hex digits.
pub(super) fn fnv1a_64_hex(bytes: &[u8]) -> String {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(PRIME)
    });
    format!("{hash:016x}")
}

/// Byte offset -> 1-based line and column (columns counted in chars).
pub(super) struct LineIndex<'t> {
    text: &'t str,
    /// Byte offset where each line starts.
    starts: Vec<usize>,
}

impl<'t> LineIndex<'t> {
    pub fn new(text: &'t str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex { text, starts }
    }

    pub fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        // The last line starting at or before `offset`.
        let line = self.starts.partition_point(|&start| start <= offset);
        let start = self.starts[line - 1];
        let column = self.text[start..offset].chars().count() + 1;
        (line, column)
    }
}
