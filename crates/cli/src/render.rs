//! Turning API values into text: tables, times, sizes.
//!
//! Tables use comfy-table without borders so their lines stay greppable and
//! `awk`-able; `--json` is there for anything more structured.

use comfy_table::{presets, ContentArrangement, Table};
use serde_json::Value;
use std::io::Write;

/// A borderless table with upper-case headers.
pub fn table<S: AsRef<str>>(headers: &[&str], rows: impl IntoIterator<Item = Vec<S>>) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        // Never wrap: a wrapped id is a broken id when copied.
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers.iter().map(|h| h.to_uppercase()));
    for row in rows {
        t.add_row(
            row.iter()
                .map(|c| c.as_ref().to_owned())
                .collect::<Vec<_>>(),
        );
    }
    t
}

/// A two-column table of every field of a JSON object; nested objects are
/// flattened as `parent.child`, so fields the server adds later still show.
pub fn kv_table(v: &Value) -> Table {
    let mut rows = Vec::new();
    flatten("", v, &mut rows);
    table(
        &["field", "value"],
        rows.into_iter().map(|(k, v)| vec![k, v]),
    )
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, child, out);
            }
        }
        other => out.push((prefix.to_owned(), field_text(prefix, other))),
    }
}

/// How one field reads in a table: times by name (`*_ms` suffix on an
/// `*_at_ms` field), sizes by name (`*_bytes`), everything else plainly.
pub fn field_text(name: &str, v: &Value) -> String {
    if name.ends_with("at_ms") {
        if let Some(ms) = v.as_i64() {
            return fmt_ms(ms);
        }
    }
    if name.ends_with("_bytes") {
        if let Some(b) = v.as_u64() {
            return fmt_bytes(b);
        }
    }
    if name.ends_with("_seconds") {
        if let Some(s) = v.as_f64() {
            return fmt_secs(s);
        }
    }
    plain(v)
}

/// A JSON value as a user would write it: strings unquoted, null as `-`.
pub fn plain(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The field `k` of `v`, as [`field_text`] renders it.
pub fn cell(v: &Value, k: &str) -> String {
    field_text(k, v.get(k).unwrap_or(&Value::Null))
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS` in UTC.
pub fn fmt_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Like [`fmt_ms`] with milliseconds, for event logs where order matters.
pub fn fmt_ms_precise(ms: i64) -> String {
    format!("{}.{:03}", fmt_ms(ms), ms.rem_euclid(1000))
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`), so the CLI needs no date crate.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Bytes in binary units with one decimal, e.g. `12.5 MiB`.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = b as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Seconds with one decimal, e.g. `3.2s`.
pub fn fmt_secs(s: f64) -> String {
    format!("{s:.1}s")
}

/// Writes to stdout; errors (a closed pipe) go back to the caller instead of
/// panicking as `println!` would.
pub fn out(text: impl std::fmt::Display) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()?;
    Ok(())
}

/// Pretty JSON to stdout, for `--json`.
pub fn out_json(v: &Value) -> anyhow::Result<()> {
    out(serde_json::to_string_pretty(v)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats_times_in_utc() {
        assert_eq!(fmt_ms(0), "1970-01-01 00:00:00");
        assert_eq!(fmt_ms(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(fmt_ms(1_700_000_000_123), "2023-11-14 22:13:20");
        assert_eq!(fmt_ms_precise(1_700_000_000_123), "2023-11-14 22:13:20.123");
        assert_eq!(fmt_ms(-1000), "1969-12-31 23:59:59");
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(fmt_bytes(0), "0 B");
        assert_eq!(fmt_bytes(1023), "1023 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }

    #[test]
    fn table_has_headers_and_cells() {
        let t = table(&["id", "status"], vec![vec!["s1", "ready"]]).to_string();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains("ID") && lines[0].contains("STATUS"));
        assert!(lines[1].contains("s1") && lines[1].contains("ready"));
    }

    #[test]
    fn kv_table_flattens_and_formats_by_name() {
        let v = json!({
            "id": "s1",
            "created_at_ms": 0,
            "termination_reason": null,
            "usage": {"peak_memory_bytes": 2048, "cpu_seconds": 1.5}
        });
        let t = kv_table(&v).to_string();
        assert!(t.contains("1970-01-01 00:00:00"));
        assert!(t.contains("usage.peak_memory_bytes") && t.contains("2.0 KiB"));
        assert!(t.contains("usage.cpu_seconds") && t.contains("1.5s"));
        let reason = t.lines().find(|l| l.contains("termination_reason"));
        assert!(reason.is_some_and(|l| l.trim_end().ends_with('-')));
    }

    #[test]
    fn cell_reads_missing_fields_as_dash() {
        let v = json!({"name": "a", "latest_version": 3});
        assert_eq!(cell(&v, "name"), "a");
        assert_eq!(cell(&v, "latest_version"), "3");
        assert_eq!(cell(&v, "nope"), "-");
    }
}
