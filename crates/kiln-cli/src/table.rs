//! Plain-text tables and the formats of times and durations.

use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

/// `text` safe to print on a terminal: control characters (an escape sequence that would
/// clear the reader's screen or move the cursor, a carriage return that would overwrite
/// the line) are shown escaped (`\x{1b}`, `\r`); line breaks and tabs too unless `lines`.
pub(crate) fn clean(text: &str, lines: bool) -> std::borrow::Cow<'_, str> {
    let keep = |c: char| !c.is_control() || (lines && (c == '\n' || c == '\t'));
    if text.chars().all(keep) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if keep(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push_str(&format!("\\x{{{:02x}}}", c as u32)),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Columns padded to their widest cell; the last column is not padded. Cells are printed
/// [`clean`].
pub(crate) fn print(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c, false).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: &mut dyn Iterator<Item = &str>| -> std::io::Result<()> {
        let cells: Vec<&str> = cells.collect();
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(out, &mut header.iter().copied())?;
    for row in &rows {
        line(out, &mut row.iter().map(String::as_str))?;
    }
    Ok(())
}

/// `2026-11-25 19:20:46` (UTC).
pub(crate) fn time(micros: Option<i64>) -> String {
    let Some(micros) = micros else { return "-".into() };
    let t = UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_owned()
}

/// `850µs`, `12.3ms`, `4.51s`, `2m 5s`; `-` when it has not started, `…` while running.
pub(crate) fn duration(start: Option<i64>, end: Option<i64>) -> String {
    match (start, end) {
        (None, _) => "-".into(),
        (Some(_), None) => "…".into(),
        (Some(s), Some(e)) => human(Duration::from_micros((e - s).max(0) as u64)),
    }
}

pub(crate) fn human(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else if us < 60_000_000 {
        format!("{:.2}s", us as f64 / 1e6)
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(Some(0), Some(850)), "850µs");
        assert_eq!(duration(Some(0), Some(12_345)), "12.3ms");
        assert_eq!(duration(Some(0), Some(4_510_000)), "4.51s");
        assert_eq!(duration(Some(0), Some(125_000_000)), "2m 5s");
        assert_eq!(duration(Some(5), None), "…");
        assert_eq!(duration(None, None), "-");
    }

    #[test]
    fn times_are_utc_seconds() {
        assert_eq!(time(Some(1_764_098_446_000_000)), "2025-11-25 19:20:46");
        assert_eq!(time(None), "-");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(clean("plain ünïcode", false), "plain ünïcode");
        assert_eq!(clean("\x1b[2Jgone\rover", false), "\\x{1b}[2Jgone\\rover");
        assert_eq!(clean("a\nb\tc\x07", true), "a\nb\tc\\x{07}");
        assert_eq!(clean("a\nb", false), "a\\nb");
        assert_eq!(clean("\u{9b}2J", true), "\\x{9b}2J", "a C1 control (CSI) too");
        let mut out = Vec::new();
        print(&mut out, &["NAME"], &[vec!["\x1b[31mred".into()]]).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "NAME\n\\x{1b}[31mred\n");
    }

    #[test]
    fn columns_align() {
        let mut out = Vec::new();
        print(&mut out, &["A", "BB"], &[vec!["long".into(), "x".into()]]).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "A     BB\nlong  x\n");
    }
}
