//! Pure text rendering for human output: sizes, tables, key/value blocks, times.

/// Text from hearthd (and so possibly from a guest) made safe for a terminal: control
/// characters other than newline and tab become visible escapes (`\x1b`, `\u{9b}`), so a guest
/// cannot move the cursor, retitle the window or hide text. `\r\n` line ends become `\n`;
/// bidirectional overrides are escaped too. `--json` output does not pass through here: JSON
/// escapes control characters itself.
pub fn terminal_safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape_into(&mut out, text);
    out
}

fn escape_into(out: &mut String, text: &str) {
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' | '\t' => out.push(c),
            '\r' if chars.peek() == Some(&'\n') => {}
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", u32::from(c)));
            }
            '\u{80}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
}

/// [`terminal_safe`] for a byte stream that arrives in chunks (a log): a UTF-8 sequence or a
/// `\r\n` split between two chunks is kept whole; bytes that are not UTF-8 become `\xNN`.
#[derive(Debug, Default)]
pub struct TerminalStream {
    pending: Vec<u8>,
}

impl TerminalStream {
    /// The printable text of `chunk` (and of what was held back from the last one).
    pub fn push(&mut self, chunk: &[u8]) -> String {
        self.pending.extend_from_slice(chunk);
        let bytes = std::mem::take(&mut self.pending);
        let mut out = String::with_capacity(bytes.len());
        let mut rest = &bytes[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    let (text, held) = match text.strip_suffix('\r') {
                        Some(head) => (head, true),
                        None => (text, false),
                    };
                    escape_into(&mut out, text);
                    if held {
                        self.pending.push(b'\r');
                    }
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    escape_into(&mut out, std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            for b in &after[..n] {
                                out.push_str(&format!("\\x{b:02x}"));
                            }
                            rest = &after[n..];
                        }
                        None => {
                            // An incomplete sequence at the end: wait for the rest of it.
                            self.pending.extend_from_slice(after);
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// What is still held back at the end of the stream.
    pub fn finish(&mut self) -> String {
        let bytes = std::mem::take(&mut self.pending);
        let mut out = String::new();
        for chunk in bytes.utf8_chunks() {
            escape_into(&mut out, chunk.valid());
            for b in chunk.invalid() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
        out
    }
}

/// Items from hearthd as `a, b, c`, made safe for a terminal; `-` for none.
pub fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        terminal_safe(&items.join(", "))
    }
}

/// A size in MiB as people write it: `512M`, `1G`, `1.5G`, `2T`.
/// A byte count as people read it: `812B`, `3.4M`, `1.2G`.
pub fn size_bytes(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M")];
    for (size, unit) in UNITS {
        if bytes >= size {
            let whole = bytes / size;
            let tenth = (bytes % size) * 10 / size;
            return format!("{whole}.{tenth}{unit}");
        }
    }
    if bytes >= 1 << 10 {
        return format!("{}K", bytes >> 10);
    }
    format!("{bytes}B")
}

pub fn size_mib(mib: u64) -> String {
    const GIB: u64 = 1024;
    const TIB: u64 = 1024 * 1024;
    let (unit_mib, unit) = if mib >= TIB {
        (TIB, "T")
    } else if mib >= GIB {
        (GIB, "G")
    } else {
        return format!("{mib}M");
    };
    if mib.is_multiple_of(unit_mib) {
        return format!("{}{unit}", mib / unit_mib);
    }
    #[allow(clippy::cast_precision_loss)]
    let value = mib as f64 / unit_mib as f64;
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text}{unit}")
}

/// Columns padded to their widest cell, separated by three spaces; no trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| width(h)).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(width(cell));
            } else {
                widths.push(width(cell));
            }
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("   ");
            }
            line.push_str(cell);
            let pad = widths[i] - width(cell);
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `key:` lines with the values aligned.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let key_width = pairs.iter().map(|(k, _)| width(k)).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        let pad = key_width - width(key);
        let line = format!("{key}:{} {value}", " ".repeat(pad));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn width(s: &str) -> usize {
    s.chars().count()
}

/// Seconds since the Unix epoch of an RFC 3339 time such as `2024-05-01T12:00:00.123Z` or
/// `2024-05-01T14:00:00+02:00`; `None` when it is not one.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(range)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(rest.as_bytes()[0], b'+' | b'-') => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let hours: i64 = rest.get(1..3)?.parse().ok()?;
            let minutes: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (hours * 3600 + minutes * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `5 seconds ago`, `3 minutes ago`, … relative to `now` (Unix seconds); the text itself when
/// it is not an RFC 3339 time.
pub fn relative_time(rfc3339: &str, now: i64) -> String {
    let Some(then) = parse_rfc3339(rfc3339) else {
        return rfc3339.to_owned();
    };
    let secs = now - then;
    if secs < 0 {
        return "just now".to_owned();
    }
    let (n, unit) = match secs {
        0..60 => (secs, "second"),
        60..3_600 => (secs / 60, "minute"),
        3_600..86_400 => (secs / 3_600, "hour"),
        _ => (secs / 86_400, "day"),
    };
    if unit == "second" && n < 2 {
        return "just now".to_owned();
    }
    let plural = if n == 1 { "" } else { "s" };
    format!("{n} {unit}{plural} ago")
}

/// The current time in Unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_for_terminals() {
        assert_eq!(
            terminal_safe("plain text\n\tindented"),
            "plain text\n\tindented"
        );
        assert_eq!(
            terminal_safe("\x1b]0;pwned\x07\x1b[2Jcleared"),
            "\\x1b]0;pwned\\x07\\x1b[2Jcleared"
        );
        assert_eq!(
            terminal_safe("ok\r\nover\rwritten\x7f"),
            "ok\nover\\x0dwritten\\x7f"
        );
        assert_eq!(
            terminal_safe("c1 \u{9b}31m bidi \u{202e}x"),
            "c1 \\u{9b}31m bidi \\u{202e}x"
        );
        assert_eq!(terminal_safe("é → ü"), "é → ü");
    }

    #[test]
    fn streams_keep_split_sequences_whole() {
        let mut t = TerminalStream::default();
        let text = "boot ok\r\n\x1b[31mé\n".as_bytes();
        // Split inside "\r\n" and inside the two bytes of "é".
        let split_cr = text.iter().position(|&b| b == b'\n').unwrap();
        let split_e = text.len() - 2;
        let mut out = t.push(&text[..split_cr]);
        out += &t.push(&text[split_cr..split_e]);
        out += &t.push(&text[split_e..]);
        out += &t.finish();
        assert_eq!(out, "boot ok\n\\x1b[31mé\n");
        let mut t = TerminalStream::default();
        let out = t.push(b"bad \xff\xfe bytes\r") + &t.finish();
        assert_eq!(out, "bad \\xff\\xfe bytes\\x0d");
    }

    #[test]
    fn lists_join_escaped_or_dash() {
        assert_eq!(list_or_dash(&[]), "-");
        assert_eq!(
            list_or_dash(&["a".into(), "b\x1b[2J".into()]),
            "a, b\\x1b[2J"
        );
    }

    #[test]
    fn sizes_render_with_units() {
        assert_eq!(size_mib(0), "0M");
        assert_eq!(size_mib(128), "128M");
        assert_eq!(size_mib(512), "512M");
        assert_eq!(size_mib(1023), "1023M");
        assert_eq!(size_mib(1024), "1G");
        assert_eq!(size_mib(1536), "1.5G");
        assert_eq!(size_mib(2047), "2G");
        assert_eq!(size_mib(10 * 1024), "10G");
        assert_eq!(size_mib(1100), "1.1G");
        assert_eq!(size_mib(1024 * 1024), "1T");
        assert_eq!(size_mib(3 * 512 * 1024), "1.5T");
    }

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec!["demo".into(), "running".into(), "2".into()],
            vec!["a-much-longer-name".into(), "stopped".into(), "16".into()],
        ];
        let text = table(&["NAME", "STATE", "CPUS"], &rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "NAME                 STATE     CPUS",
                "demo                 running   2",
                "a-much-longer-name   stopped   16",
            ]
        );
        // The second and third columns start at the same offset on every line.
        for line in &lines {
            let b = line.as_bytes();
            assert!(b[20] == b' ' && b[21] != b' ', "{line:?}");
            assert!(b[30] == b' ' && b[31] != b' ', "{line:?}");
        }
    }

    #[test]
    fn tables_count_characters_not_bytes_and_trim_trailing_blanks() {
        let rows = vec![
            vec!["stopped→starting".into(), String::new()],
            vec!["x".into(), "msg".into()],
        ];
        let text = table(&["FROM→TO", "MESSAGE"], &rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "FROM→TO            MESSAGE");
        assert_eq!(lines[1], "stopped→starting");
        assert_eq!(lines[2], "x                  msg");
    }

    #[test]
    fn key_values_align() {
        let text = key_values(&[("name", "demo".into()), ("state", "running".into())]);
        assert_eq!(text, "name:  demo\nstate: running\n");
    }

    #[test]
    fn rfc3339_parses_zones_and_fractions() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(
            parse_rfc3339("2024-05-01T12:00:00.123Z"),
            Some(1_714_564_800)
        );
        assert_eq!(
            parse_rfc3339("2024-05-01T14:00:00+02:00"),
            Some(1_714_564_800)
        );
        assert_eq!(parse_rfc3339("2024-05-01"), None);
        assert_eq!(parse_rfc3339("2024-05-01T12:00:00"), None);
        assert_eq!(parse_rfc3339("2024-13-01T12:00:00Z"), None);
    }

    #[test]
    fn relative_times() {
        let t = "2024-05-01T12:00:00Z";
        let base = 1_714_564_800;
        assert_eq!(relative_time(t, base), "just now");
        assert_eq!(relative_time(t, base + 30), "30 seconds ago");
        assert_eq!(relative_time(t, base + 60), "1 minute ago");
        assert_eq!(relative_time(t, base + 7_200), "2 hours ago");
        assert_eq!(relative_time(t, base + 3 * 86_400), "3 days ago");
        assert_eq!(relative_time("yesterday", base), "yesterday");
    }
}
