//! The local terminal: its size, and raw mode that is always undone.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use hearth_api::TtySize;
use nix::sys::termios::{self, SetArg, Termios};

nix::ioctl_read_bad!(tiocgwinsz, libc::TIOCGWINSZ, libc::winsize);

/// The size of the terminal on `fd`, when it is one and knows its size.
pub fn size_of(fd: impl AsFd) -> Option<TtySize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` to the pointer, which points at a live local; the
    // descriptor is borrowed for the duration of the call.
    unsafe { tiocgwinsz(fd.as_fd().as_raw_fd(), &mut ws) }.ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some(TtySize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// The size of the first of stdin, stdout and stderr that is a terminal.
pub fn local_size() -> Option<TtySize> {
    let (stdin, stdout, stderr) = (io::stdin(), io::stdout(), io::stderr());
    [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()]
        .into_iter()
        .find_map(size_of)
}

/// Raw mode on a terminal while this lives; dropping it (also while unwinding from a panic)
/// puts the saved settings back.
#[derive(Debug)]
pub struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    pub fn enable(fd: impl AsFd) -> io::Result<RawMode> {
        let fd = fd.as_fd().try_clone_to_owned()?;
        let saved = termios::tcgetattr(&fd)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&fd, SetArg::TCSANOW, &raw)?;
        Ok(RawMode { fd, saved })
    }
}

impl RawMode {
    /// Key-at-a-time input without echo (no line editing), output and signals as they were:
    /// for a program that reads single keys while it draws lines (`hearth top`'s `q`).
    pub fn keys(fd: impl AsFd) -> io::Result<RawMode> {
        use nix::sys::termios::{LocalFlags, SpecialCharacterIndices as C};
        let fd = fd.as_fd().try_clone_to_owned()?;
        let saved = termios::tcgetattr(&fd)?;
        let mut keys = saved.clone();
        keys.local_flags
            .remove(LocalFlags::ICANON | LocalFlags::ECHO);
        keys.control_chars[C::VMIN as usize] = 1;
        keys.control_chars[C::VTIME as usize] = 0;
        termios::tcsetattr(&fd, SetArg::TCSANOW, &keys)?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(&self.fd, SetArg::TCSADRAIN, &self.saved);
    }
}

/// Echo off on stdin while this lives, when stdin is a terminal (for reading a secret).
#[derive(Debug)]
pub struct Hidden(Option<RawMode>);

impl Hidden {
    pub fn new() -> Hidden {
        let stdin = io::stdin();
        let hidden = (|| {
            let fd = stdin.as_fd().try_clone_to_owned().ok()?;
            let saved = termios::tcgetattr(&fd).ok()?;
            let mut quiet = saved.clone();
            quiet.local_flags.remove(termios::LocalFlags::ECHO);
            termios::tcsetattr(&fd, SetArg::TCSANOW, &quiet).ok()?;
            Some(RawMode { fd, saved })
        })();
        Hidden(hidden)
    }
}

impl Drop for Hidden {
    fn drop(&mut self) {
        if self.0.take().is_some() {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use nix::pty::openpty;
    use nix::sys::termios::LocalFlags;

    use super::*;

    fn canonical(fd: &OwnedFd) -> bool {
        termios::tcgetattr(fd)
            .unwrap()
            .local_flags
            .contains(LocalFlags::ICANON)
    }

    #[test]
    fn size_comes_from_the_terminal() {
        let ws = libc::winsize {
            ws_row: 42,
            ws_col: 137,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&ws), None).unwrap();
        assert_eq!(
            size_of(&pty.slave),
            Some(TtySize {
                rows: 42,
                cols: 137
            })
        );
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(size_of(&file), None);
    }

    #[test]
    fn raw_mode_is_undone_on_drop_and_on_panic() {
        let pty = openpty(None, None).unwrap();
        assert!(canonical(&pty.slave));
        {
            let _raw = RawMode::enable(&pty.slave).unwrap();
            assert!(!canonical(&pty.slave));
        }
        assert!(canonical(&pty.slave));

        let slave = &pty.slave;
        let result = std::panic::catch_unwind(|| {
            let _raw = RawMode::enable(slave).unwrap();
            assert!(!canonical(slave));
            panic!("boom");
        });
        assert!(result.is_err());
        assert!(canonical(&pty.slave));
    }

    #[test]
    fn key_mode_reads_keys_and_keeps_output_processing() {
        use nix::sys::termios::OutputFlags;
        let pty = openpty(None, None).unwrap();
        {
            let _keys = RawMode::keys(&pty.slave).unwrap();
            let t = termios::tcgetattr(&pty.slave).unwrap();
            assert!(
                !t.local_flags
                    .contains(LocalFlags::ICANON | LocalFlags::ECHO)
            );
            assert!(t.local_flags.contains(LocalFlags::ISIG));
            assert!(t.output_flags.contains(OutputFlags::OPOST));
        }
        assert!(canonical(&pty.slave));
    }

    #[test]
    fn raw_mode_needs_a_terminal() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(RawMode::enable(&file).is_err());
    }
}
