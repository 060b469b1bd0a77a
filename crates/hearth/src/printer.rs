//! All of the CLI's own output goes through [`Printer`], which decides in one place between
//! `--json` (the API's JSON on stdout, nothing else) and text for people (results on stdout,
//! progress and errors on stderr).

use std::io::{IsTerminal, Write};
use std::time::Instant;

use serde_json::Value;

use crate::client::Json;
use crate::error::{self, CliError, HintContext};

#[derive(Debug, Clone, Copy)]
pub struct Printer {
    json: bool,
    stderr_tty: bool,
    stderr_color: bool,
    stdout_color: bool,
}

impl Printer {
    pub fn new(json: bool) -> Printer {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let stderr_tty = std::io::stderr().is_terminal();
        Printer {
            json,
            stderr_tty,
            stderr_color: stderr_tty && !no_color,
            stdout_color: std::io::stdout().is_terminal() && !no_color,
        }
    }

    /// A command's result: the API's JSON with `--json`, otherwise the text `human` makes of it.
    pub fn result<T>(&self, out: &Json<T>, human: impl FnOnce(&T) -> String) {
        if self.json {
            self.print_json(&out.raw);
        } else {
            write_stdout(human(&out.data).as_bytes());
        }
    }

    /// Whether `--json` is on.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Text for people on stdout; nothing with `--json`.
    pub fn text(&self, text: &str) {
        if !self.json {
            write_stdout(text.as_bytes());
        }
    }

    /// A note for people on stderr; nothing with `--json`.
    pub fn note(&self, text: &str) {
        if !self.json {
            eprintln!("{text}");
        }
    }

    /// Shows `message…` on stderr while something long runs, when stderr is a terminal.
    pub fn progress(&self, message: &str) -> Progress {
        let shown = !self.json && self.stderr_tty;
        if shown {
            eprint!("{message}… ");
            let _ = std::io::stderr().flush();
        }
        Progress {
            start: Instant::now(),
            shown,
            done: false,
        }
    }

    /// A byte counter for a long transfer, shown on stderr (redrawn at most every 200 ms) when
    /// stderr is a terminal: `label: 120M of 1.0G (11%), 85 MB/s`.
    pub fn transfer(&self, label: &str, total: Option<u64>) -> Transfer {
        Transfer {
            label: label.to_owned(),
            total,
            done: 0,
            start: Instant::now(),
            drawn: None,
            shown: !self.json && self.stderr_tty,
        }
    }

    /// Prints a failure: the error body as JSON on stdout with `--json`, else `error:`/`hint:`.
    pub fn error(&self, err: &CliError, ctx: &HintContext) {
        if self.json {
            self.print_json(&err.json());
        } else {
            eprint!("{}", error::render(err, ctx, self.stderr_color));
        }
    }

    /// Text made to stand out on stdout (red and bold on a colour terminal).
    pub fn alert(&self, text: &str) -> String {
        if self.stdout_color {
            format!("\x1b[1;31m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn print_json(&self, value: &Value) {
        let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
        let mut text = json_for_terminal(&text);
        text.push('\n');
        write_stdout(text.as_bytes());
    }
}

/// JSON text with the control characters JSON lets through raw (DEL, C1, bidirectional
/// overrides; serde escapes the rest) written as `\u` escapes: the same JSON, safe to print.
fn json_for_terminal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{7f}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out
}

/// Writes to stdout; a closed pipe (`hearth vm list | head -1`) is not an error worth reporting.
fn write_stdout(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes).and_then(|()| out.flush());
}

/// A progress line started by [`Printer::progress`].
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    shown: bool,
    done: bool,
}

impl Progress {
    /// Ends the line with e.g. `ready in 4.2s`.
    pub fn finish(mut self, outcome: &str) {
        if self.shown {
            eprintln!("{outcome} in {:.1}s", self.start.elapsed().as_secs_f64());
        }
        self.done = true;
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // Unfinished (the operation failed): end the line so the error starts on its own.
        if self.shown && !self.done {
            eprintln!("failed");
        }
    }
}

/// See [`Printer::transfer`].
#[derive(Debug)]
pub struct Transfer {
    label: String,
    total: Option<u64>,
    done: u64,
    start: Instant,
    drawn: Option<Instant>,
    shown: bool,
}

impl Transfer {
    pub fn add(&mut self, bytes: u64) {
        self.done += bytes;
        let due = self
            .drawn
            .is_none_or(|at| at.elapsed() >= std::time::Duration::from_millis(200));
        if self.shown && due {
            self.drawn = Some(Instant::now());
            eprint!("\r{}\x1b[K", self.line());
            let _ = std::io::stderr().flush();
        }
    }

    /// Ends the line with the final count.
    pub fn finish(&mut self) {
        if self.shown {
            eprintln!("\r{}\x1b[K", self.line());
            self.shown = false;
        }
    }

    fn line(&self) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let rate = self.done as f64 / secs / 1e6;
        let done = crate::render::size_bytes(self.done);
        match self.total {
            Some(total) if total > 0 => format!(
                "{}: {done} of {} ({}%), {rate:.0} MB/s",
                self.label,
                crate::render::size_bytes(total),
                self.done.saturating_mul(100) / total
            ),
            _ => format!("{}: {done}, {rate:.0} MB/s", self.label),
        }
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        // Unfinished (it failed): end the line so the error starts on its own.
        if self.shown {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_escapes_what_json_lets_through() {
        let value = serde_json::json!({"message": "esc \u{1b} del \u{7f} csi \u{9b} rlo \u{202e}"});
        let text = json_for_terminal(&serde_json::to_string(&value).unwrap());
        assert!(
            !text.chars().any(|c| c.is_control()) && !text.contains('\u{202e}'),
            "{text:?}"
        );
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
    }
}
