//! Printing: aligned tables for people, the API's JSON for scripts.

use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for reading.
    Table,
    /// The API's JSON, for scripts.
    Json,
}

/// Pretty-print a JSON value on stdout.
pub fn json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// A table with a header row.
pub fn table<S: AsRef<str>>(header: &[&str], rows: impl IntoIterator<Item = Vec<S>>) {
    let mut t = base();
    t.set_header(header.iter().copied());
    for row in rows {
        t.add_row(row.iter().map(AsRef::as_ref));
    }
    println!("{}", trim_lines(&t.to_string()));
}

/// `key  value` lines.
pub fn fields(rows: &[(&str, String)]) {
    let mut t = base();
    for (k, v) in rows {
        t.add_row(vec![format!("{k}:"), v.clone()]);
    }
    println!("{}", trim_lines(&t.to_string()));
}

fn base() -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    t
}

/// Remove the table's left padding column and trailing spaces.
fn trim_lines(s: &str) -> String {
    s.lines()
        .map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A field of a JSON object for a table cell: strings as-is, `null`/missing as `-`.
pub fn cell(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.into(),
        Some(other) => other.to_string(),
    }
}

/// A timestamp field, shortened to `YYYY-MM-DD HH:MM:SS UTC`.
pub fn when(v: &Value, key: &str) -> String {
    match v.get(key).and_then(Value::as_str) {
        Some(s) => human_time(s),
        None => "-".into(),
    }
}

pub fn human_time(s: &str) -> String {
    let fmt = format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .and_then(|t| t.to_offset(time::UtcOffset::UTC).format(&fmt).ok())
        .unwrap_or_else(|| s.to_owned())
}
