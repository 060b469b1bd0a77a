//! Diagnostics on stderr, which is the serial console in a VM.
//!
//! Writes never panic: a broken console must not take PID 1 (and with it the kernel) down.

use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Turns on per-request messages (`--debug`, or `hearth.debug` on the kernel command line).
pub fn enable_debug() {
    DEBUG.store(true, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Writes one line to stderr, ignoring failures.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "hearth-guest: {args}");
}

/// Logs a line at the default level: boot steps, failures, anything an operator should see.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::write_line(format_args!($($arg)*))
    };
}

/// Logs a line only when debugging is on: per-request chatter.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::write_line(format_args!($($arg)*))
        }
    };
}
