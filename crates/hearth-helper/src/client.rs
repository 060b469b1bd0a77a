//! A small blocking client for `hearthd` (call it from `spawn_blocking`). One [`Client`] is
//! one connection; its calls are sequential (`&mut self`). Every read and write has a timeout
//! ([`DEFAULT_TIMEOUT`]), so a stuck helper fails a call instead of hanging it; after a
//! timeout or any other transport error the connection is out of step and refuses further
//! calls ([`ClientError::Broken`]): connect again.
//!
//! The descriptors of a [`Response::Tap`] (one) and a [`Response::Services`] (three) arrive as
//! `SCM_RIGHTS` and are received close-on-exec: clear that flag (or `dup2` it) in the child
//! that is to inherit one.

use std::io::{self, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use crate::proto::{ErrorKind, Request, Response};
use crate::server::{self, FrameError, HEADER_LEN};

/// How long one read or write may take before the call fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A call that did not get an answer, or (from [`Client::call_ok`]) got an error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not connect to the helper at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the helper did not answer {op} within {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("the connection to the helper failed during {op}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the helper closed the connection during {op}")]
    Closed { op: &'static str },
    #[error("could not frame {op}")]
    Frame {
        op: &'static str,
        #[source]
        source: FrameError,
    },
    #[error("the helper's answer to {op} is not a response")]
    Decode {
        op: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the helper answered {op} with {got} descriptors instead of {wanted}")]
    MissingFds {
        op: &'static str,
        got: usize,
        wanted: usize,
    },
    #[error("the connection to the helper broke in an earlier call; connect again")]
    Broken,
    #[error("the helper refused {op} ({kind:?}): {message}")]
    Helper {
        op: &'static str,
        kind: ErrorKind,
        message: String,
    },
}

/// A connection to the helper.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    timeout: Duration,
    broken: bool,
}

impl Client {
    /// Connects to the helper's socket, with [`DEFAULT_TIMEOUT`] on reads and writes.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Client::from_stream(stream).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })
    }

    /// A client on a connected stream (a socketpair in tests).
    pub fn from_stream(stream: UnixStream) -> io::Result<Client> {
        let mut client = Client {
            stream,
            timeout: DEFAULT_TIMEOUT,
            broken: false,
        };
        client.set_timeout(DEFAULT_TIMEOUT)?;
        Ok(client)
    }

    /// Changes the timeout of each read and write.
    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))?;
        self.timeout = timeout;
        Ok(())
    }

    /// Sends `request` and returns the answer, with the descriptors that came with it (a
    /// [`Response::Tap`]'s one, a [`Response::Services`]' three; none for the others). A
    /// [`Response::Error`] is an answer like any other here.
    pub fn call(&mut self, request: &Request) -> Result<(Response, Vec<OwnedFd>), ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let result = self.exchange(request);
        // Whatever failed in the transport leaves the stream out of step.
        self.broken = result.is_err();
        result
    }

    /// Like [`Client::call`], with a [`Response::Error`] turned into [`ClientError::Helper`].
    pub fn call_ok(&mut self, request: &Request) -> Result<(Response, Vec<OwnedFd>), ClientError> {
        match self.call(request)? {
            (Response::Error { kind, message }, _) => Err(ClientError::Helper {
                op: request.op(),
                kind,
                message,
            }),
            answer => Ok(answer),
        }
    }

    fn exchange(&mut self, request: &Request) -> Result<(Response, Vec<OwnedFd>), ClientError> {
        let op = request.op();
        let frame = server::encode(request).map_err(|source| ClientError::Frame { op, source })?;
        self.stream
            .write_all(&frame)
            .map_err(|e| self.io_error(op, e))?;
        let mut fds = Vec::new();
        let mut header = [0u8; HEADER_LEN];
        self.receive(op, &mut header, &mut fds)?;
        let len = server::frame_len(header).map_err(|source| ClientError::Frame { op, source })?;
        let mut body = vec![0u8; len];
        self.receive(op, &mut body, &mut fds)?;
        let response: Response =
            serde_json::from_slice(&body).map_err(|source| ClientError::Decode { op, source })?;
        // Descriptors come with a TAP and with the services only; any others are closed here.
        let wanted = match &response {
            Response::Tap { .. } => 1,
            Response::Services => crate::proto::SERVICE_SOCKETS.len(),
            _ => 0,
        };
        if fds.len() < wanted {
            return Err(ClientError::MissingFds {
                op,
                got: fds.len(),
                wanted,
            });
        }
        fds.truncate(wanted);
        Ok((response, fds))
    }

    fn io_error(&self, op: &'static str, e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
                op,
                timeout: self.timeout,
            },
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                ClientError::Closed { op }
            }
            _ => ClientError::Io { op, source: e },
        }
    }

    /// Fills `buf` from the stream, keeping every descriptor that arrives on the way.
    fn receive(
        &self,
        op: &'static str,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
    ) -> Result<(), ClientError> {
        let mut filled = 0;
        while filled < buf.len() {
            let mut space = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [IoSliceMut::new(&mut buf[filled..])];
            let received = recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let (bytes, raw) = match received {
                Ok(msg) => {
                    let mut raw: Vec<RawFd> = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for cmsg in cmsgs {
                            if let ControlMessageOwned::ScmRights(list) = cmsg {
                                raw.extend(list);
                            }
                        }
                    }
                    (msg.bytes, raw)
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(self.io_error(op, e.into())),
            };
            for fd in raw {
                // SAFETY: the kernel installed this descriptor in our table for this message
                // (SCM_RIGHTS); nothing else knows of it, so it is ours to own and close.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if bytes == 0 {
                return Err(ClientError::Closed { op });
            }
            filled += bytes;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::Ipv4Addr;
    use std::os::fd::AsFd;

    use super::*;
    use crate::net::RecordingNet;
    use crate::nft::RecordingNft;
    use crate::proto::{EgressRules, PROTOCOL_VERSION, SlotId, SlotSpec};
    use crate::server::{Helper, serve_connection};

    fn id() -> SlotId {
        SlotId {
            instance: "0123abcd".into(),
            vm: "fedcba9876543210".into(),
        }
    }

    #[test]
    fn client_and_server_talk_over_a_socketpair_and_pass_descriptors() {
        let helper = Helper::new(RecordingNet::default(), RecordingNft::default());
        let (ours, theirs) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| serve_connection(&helper, theirs));
            let mut client = Client::from_stream(ours).unwrap();
            let (hello, fds) = client.call(&Request::Hello).unwrap();
            assert!(
                matches!(
                    hello,
                    Response::Hello {
                        version: PROTOCOL_VERSION,
                        ..
                    }
                ),
                "{hello:?}"
            );
            assert!(fds.is_empty());
            let setup = Request::Setup {
                instance: "0123abcd".into(),
                cidr: "172.28.0.0/16".parse().unwrap(),
            };
            assert_eq!(client.call(&setup).unwrap().0, Response::Done);
            let spec = SlotSpec {
                slot: id(),
                host_addr: Ipv4Addr::new(172, 28, 0, 5),
                vm_addr: Ipv4Addr::new(172, 28, 0, 6),
                peers: "172.28.0.0/16".parse().unwrap(),
                egress: EgressRules::default(),
            };
            let (done, _) = client.call(&Request::CreateSlot { spec }).unwrap();
            assert_eq!(done, Response::Done);
            let (tap, mut fds) = client.call(&Request::OpenTap { slot: id() }).unwrap();
            assert_eq!(
                tap,
                Response::Tap {
                    name: "tap0".into()
                }
            );
            // The recording double hands over /dev/null: reading it gives end of file.
            assert_eq!(fds.len(), 1, "one descriptor with the TAP");
            let fd = fds.remove(0);
            let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "received close-on-exec");
            let mut file = std::fs::File::from(fd);
            let mut buf = Vec::new();
            assert_eq!(file.read_to_end(&mut buf).unwrap(), 0);

            let refused = client
                .call_ok(&Request::OpenTap { slot: id() })
                .unwrap_err();
            assert!(
                matches!(&refused, ClientError::Helper { op: "open_tap", kind: ErrorKind::Failed, message } if message.contains("still open")),
                "{refused}"
            );
            // The service sockets come as three descriptors.
            let (services, fds) = client.call(&Request::OpenServices { slot: id() }).unwrap();
            assert_eq!(services, Response::Services);
            assert_eq!(fds.len(), crate::proto::SERVICE_SOCKETS.len());
            // An error answer leaves the connection usable.
            let (slots, _) = client
                .call_ok(&Request::ListSlots {
                    instance: "0123abcd".into(),
                })
                .unwrap();
            assert_eq!(slots, Response::Slots { slots: vec![id()] });
        });
    }

    #[test]
    fn a_silent_helper_times_out_and_the_connection_is_then_refused() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut client = Client::from_stream(ours).unwrap();
        client.set_timeout(Duration::from_millis(50)).unwrap();
        let err = client.call(&Request::Hello).unwrap_err();
        assert!(
            matches!(err, ClientError::Timeout { op: "hello", .. }),
            "{err}"
        );
        assert!(matches!(
            client.call(&Request::Hello).unwrap_err(),
            ClientError::Broken
        ));
        drop(theirs);
    }

    #[test]
    fn a_closed_helper_and_an_oversize_answer_are_errors() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let mut client = Client::from_stream(ours).unwrap();
        let err = client.call(&Request::Hello).unwrap_err();
        assert!(matches!(err, ClientError::Closed { .. }), "{err:?}");

        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut client = Client::from_stream(ours).unwrap();
        let over = u32::try_from(crate::proto::MAX_MESSAGE_LEN + 1).unwrap();
        (&theirs).write_all(&over.to_be_bytes()).unwrap();
        let err = client.call(&Request::Hello).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Frame {
                    source: FrameError::TooLong { .. },
                    ..
                }
            ),
            "{err:?}"
        );

        let missing = Client::connect("/nonexistent/hearth-helper.sock").unwrap_err();
        assert_eq!(
            missing.to_string(),
            "could not connect to the helper at /nonexistent/hearth-helper.sock"
        );
    }
}
