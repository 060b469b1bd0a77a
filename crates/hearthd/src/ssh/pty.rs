//! A PTY for a command the command account runs under `ssh -t`: the master, non-blocking and
//! driven by the runtime, and the slave the child gets as its stdio and controlling terminal.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use hearth_guest_proto::PtySize;
use tokio::io::unix::AsyncFd;

/// The master side of a PTY.
#[derive(Debug)]
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    /// Reads output; 0 once every slave descriptor is closed (the kernel says EIO then).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }

    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// Sets the terminal's size; the kernel tells the foreground process group (SIGWINCH).
    pub fn resize(&self, size: PtySize) -> io::Result<()> {
        let winsize = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which points at a live
        // local for the duration of the call; the descriptor is owned by `self`.
        if unsafe {
            libc::ioctl(
                self.fd.get_ref().as_raw_fd(),
                libc::TIOCSWINSZ,
                &raw const winsize,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Opens a new PTY of `size`: the master (non-blocking) and the slave. Both are close-on-exec,
/// so the slave reaches a child only as the stdio it is given.
pub fn open(size: PtySize) -> io::Result<(PtyMaster, OwnedFd)> {
    // std opens with O_CLOEXEC.
    let master = OwnedFd::from(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open("/dev/ptmx")?,
    );
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one c_int through the pointer, which is valid for the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &raw const unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor or -1; no
    // memory is passed.
    let peer = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if peer < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `peer` is a descriptor the kernel just opened for us and nothing else owns.
    let slave = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(peer) };
    // SAFETY: the `OwnedFd` keeps its descriptor open and unchanged until it is dropped, which
    // happens only when the `AsyncFd` is.
    let fd = unsafe { AsyncFd::register(master) }?;
    let master = PtyMaster { fd };
    master.resize(size)?;
    Ok((master, slave))
}

/// Makes the child a session leader whose controlling terminal is its stdin (the PTY slave).
pub fn controlling_terminal(command: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and makes only two
    // async-signal-safe system calls (setsid, ioctl); it touches no memory of the parent and
    // allocates nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // fd 0 is the PTY slave: make it the controlling terminal of the new session.
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_gets_the_pty_as_its_terminal_and_sees_resizes() {
        let (master, slave) = open(PtySize {
            rows: 30,
            cols: 100,
        })
        .unwrap();
        let mut command = tokio::process::Command::new("sh");
        command.args([
            "-c",
            "tty >/dev/null && stty size; read x; stty size; echo got:$x",
        ]);
        let stdio = |fd: &OwnedFd| std::process::Stdio::from(fd.try_clone().unwrap());
        command
            .stdin(stdio(&slave))
            .stdout(stdio(&slave))
            .stderr(std::process::Stdio::from(slave));
        controlling_terminal(&mut command);
        let mut child = command.spawn().unwrap();
        drop(command);
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&out).contains("30 100") {
            let n = master.read(&mut buf).await.unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
        }
        master
            .resize(PtySize {
                rows: 40,
                cols: 120,
            })
            .unwrap();
        master.write_all(b"hi\n").await.unwrap();
        loop {
            let n = master.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("40 120"), "{text}");
        assert!(text.contains("got:hi"), "{text}");
        assert!(child.wait().await.unwrap().success());
    }
}
