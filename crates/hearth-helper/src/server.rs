//! The helper's side of the socket: framing ([`read_frame`], [`encode`]), the dispatch of each
//! [`Request`] ([`Helper::handle`]), and the connection loop ([`serve_connection`]) that logs
//! every request with its peer's credentials and passes the TAP's descriptor as `SCM_RIGHTS`.
//!
//! Input that is not a request (a frame over [`MAX_MESSAGE_LEN`], bytes that are not JSON of a
//! known op) is answered with `Error { kind: invalid }` and the connection is closed: after
//! garbage the stream cannot be trusted to be in step. A request whose fields break a rule is
//! answered the same way but the connection stays open.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, getsockopt, sendmsg, sockopt};
use serde::Serialize;

use crate::net::{IP_FORWARD, Net, NetError, Ns, RP_FILTER};
use crate::nft::{self, Nft, NftError};
use crate::proto::{
    ErrorKind, INNER_PREFIX, MAX_MESSAGE_LEN, PROTOCOL_VERSION, Request, Response, SLOT_VETH,
    SlotId, SlotSpec, TAP_NAME,
};
use crate::validate::{self, Invalid};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;
/// How long the helper waits for a peer to take an answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The prefix length of a slot's veth addresses (one /30 per VM).
const SLOT_PREFIX: u8 = 30;
/// Slots are locked by stripe: requests for one slot are serialised, for others they run side
/// by side (a collision only serialises two unrelated slots).
const SLOT_STRIPES: usize = 64;

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the message is {len} bytes, over the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("the connection ended inside a message")]
    Truncated,
    #[error("could not encode the message")]
    Encode(#[source] serde_json::Error),
    #[error("the connection failed")]
    Io(#[source] io::Error),
}

/// The length a frame header announces, refused past [`MAX_MESSAGE_LEN`].
pub fn frame_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = usize::try_from(u32::from_be_bytes(header)).unwrap_or(usize::MAX);
    if len > MAX_MESSAGE_LEN {
        return Err(FrameError::TooLong {
            len,
            max: MAX_MESSAGE_LEN,
        });
    }
    Ok(len)
}

/// `message` as JSON behind its 4-byte big-endian length.
pub fn encode(message: &impl Serialize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0; HEADER_LEN];
    serde_json::to_writer(&mut out, message).map_err(FrameError::Encode)?;
    let len = out.len() - HEADER_LEN;
    let header = u32::try_from(len)
        .ok()
        .filter(|_| len <= MAX_MESSAGE_LEN)
        .ok_or(FrameError::TooLong {
            len,
            max: MAX_MESSAGE_LEN,
        })?;
    out[..HEADER_LEN].copy_from_slice(&header.to_be_bytes());
    Ok(out)
}

/// The next frame's body; `None` when the peer closed the connection between frames.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let mut body = vec![0; frame_len(header)?];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(Some(body))
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("slot {netns} does not exist (create it first)")]
    NoSlot { netns: String },
}

impl HandleError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            HandleError::Invalid(_) => ErrorKind::Invalid,
            HandleError::Net(_) | HandleError::Nft(_) | HandleError::NoSlot { .. } => {
                ErrorKind::Failed
            }
        }
    }

    /// The message and its causes, `: `-separated (each cause says only its own part).
    pub fn message(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        message
    }
}

/// An answer, with the descriptor that goes with it (a [`Response::Tap`]'s).
#[derive(Debug)]
pub struct Reply {
    pub response: Response,
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    fn done() -> Reply {
        Reply {
            response: Response::Done,
            fds: Vec::new(),
        }
    }
    fn error(kind: ErrorKind, message: String) -> Reply {
        Reply {
            response: Response::Error { kind, message },
            fds: Vec::new(),
        }
    }
}

/// The helper's work: every request validated, then done through a [`Net`] and an [`Nft`].
#[derive(Debug)]
pub struct Helper<N, F> {
    net: N,
    nft: F,
    /// Serialises the host-wide requests (Setup, the host rules).
    host: Mutex<()>,
    slots: [Mutex<()>; SLOT_STRIPES],
    busy: AtomicUsize,
}

fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts a request in flight while it lives.
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<N: Net, F: Nft> Helper<N, F> {
    pub fn new(net: N, nft: F) -> Helper<N, F> {
        Helper {
            net,
            nft,
            host: Mutex::new(()),
            slots: std::array::from_fn(|_| Mutex::new(())),
            busy: AtomicUsize::new(0),
        }
    }

    pub fn net(&self) -> &N {
        &self.net
    }

    pub fn nft(&self) -> &F {
        &self.nft
    }

    /// How many requests are being handled now.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// Validates and carries out one request.
    pub fn handle(&self, request: &Request) -> Reply {
        self.busy.fetch_add(1, Ordering::SeqCst);
        let _busy = Busy(&self.busy);
        match validate::request(request)
            .map_err(HandleError::from)
            .and_then(|()| self.run(request))
        {
            Ok(reply) => reply,
            Err(e) => Reply::error(e.kind(), e.message()),
        }
    }

    fn slot_lock(&self, slot: &SlotId) -> MutexGuard<'_, ()> {
        let mut hasher = DefaultHasher::new();
        slot.hash(&mut hasher);
        let stripe = usize::try_from(hasher.finish() % SLOT_STRIPES as u64).unwrap_or(0);
        lock(&self.slots[stripe])
    }

    /// Fails unless the slot's namespace exists.
    fn existing(&self, slot: &SlotId) -> Result<String, HandleError> {
        let netns = slot.netns();
        if self.net.netns_list()?.contains(&netns) {
            Ok(netns)
        } else {
            Err(HandleError::NoSlot { netns })
        }
    }

    fn run(&self, request: &Request) -> Result<Reply, HandleError> {
        match request {
            Request::Hello => Ok(Reply {
                response: Response::Hello {
                    version: PROTOCOL_VERSION,
                    pid: std::process::id(),
                    helper: env!("CARGO_PKG_VERSION").to_owned(),
                    nftables: self.nft.version()?,
                },
                fds: Vec::new(),
            }),
            Request::Setup { instance: _, cidr } => {
                let _host = lock(&self.host);
                validate::setup_routes("cidr", *cidr, &self.net.routes()?)?;
                self.net.sysctl(Ns::Host, IP_FORWARD, "1")?;
                Ok(Reply::done())
            }
            Request::ApplyHostRules { rules } => {
                let _host = lock(&self.host);
                self.nft.apply(Ns::Host, &nft::host_table(rules))?;
                Ok(Reply::done())
            }
            Request::RemoveHostRules { instance: _ } => {
                let _host = lock(&self.host);
                self.nft.apply(Ns::Host, &nft::remove_table())?;
                Ok(Reply::done())
            }
            Request::CreateSlot { spec } => {
                let _slot = self.slot_lock(&spec.slot);
                self.create_slot(spec)?;
                Ok(Reply::done())
            }
            Request::DeleteSlot { slot } => {
                let _slot = self.slot_lock(slot);
                // The host end goes with the slot's namespace, unless something (a VMM's TAP
                // descriptor) keeps that namespace alive: then it is deleted by name.
                self.net.netns_delete(&slot.netns())?;
                self.net.link_delete(Ns::Host, &slot.host_veth())?;
                Ok(Reply::done())
            }
            Request::OpenTap { slot } => {
                let _slot = self.slot_lock(slot);
                let netns = self.existing(slot)?;
                let fd = self.net.open_tap(&netns, TAP_NAME)?;
                Ok(Reply {
                    response: Response::Tap {
                        name: TAP_NAME.to_owned(),
                    },
                    fds: vec![fd],
                })
            }
            Request::OpenServices { slot } => {
                let _slot = self.slot_lock(slot);
                let netns = self.existing(slot)?;
                let fds = self.net.open_services(&netns)?;
                Ok(Reply {
                    response: Response::Services,
                    fds,
                })
            }
            Request::SetEgress { slot, egress } => {
                let _slot = self.slot_lock(slot);
                let netns = self.existing(slot)?;
                self.nft.apply(Ns::Slot(&netns), &nft::set_egress(egress))?;
                Ok(Reply::done())
            }
            Request::AllowResolved {
                slot,
                addrs,
                ttl_secs,
            } => {
                let _slot = self.slot_lock(slot);
                let netns = self.existing(slot)?;
                let script = nft::allow_resolved(addrs, *ttl_secs);
                if !script.is_empty() {
                    self.nft.apply(Ns::Slot(&netns), &script)?;
                }
                Ok(Reply::done())
            }
            Request::ListSlots { instance } => {
                let prefix = format!("hearth-{instance}-");
                let slots = self
                    .net
                    .netns_list()?
                    .iter()
                    .filter_map(|name| name.strip_prefix(&prefix))
                    .filter(|vm| validate::vm("vm", vm).is_ok())
                    .map(|vm| SlotId {
                        instance: instance.clone(),
                        vm: vm.to_owned(),
                    })
                    .collect();
                Ok(Reply {
                    response: Response::Slots { slots },
                    fds: Vec::new(),
                })
            }
        }
    }

    /// Brings the slot to `spec`, whatever part of it exists already.
    fn create_slot(&self, spec: &SlotSpec) -> Result<(), HandleError> {
        let netns = spec.slot.netns();
        let host_veth = spec.slot.host_veth();
        let slot = Ns::Slot(&netns);
        self.net.netns_add(&netns)?;
        self.net.link_up(slot, "lo")?;
        let paired =
            self.net.link_exists(slot, SLOT_VETH)? && self.net.link_exists(Ns::Host, &host_veth)?;
        if !paired {
            // Half a pair (or a namespace just made): start the pair over.
            self.net.link_delete(slot, SLOT_VETH)?;
            self.net.link_delete(Ns::Host, &host_veth)?;
            self.net.veth_add(&host_veth, SLOT_VETH, &netns)?;
        }
        self.set_address(Ns::Host, &host_veth, spec.host_addr)?;
        self.set_address(slot, SLOT_VETH, spec.vm_addr)?;
        self.net.link_up(Ns::Host, &host_veth)?;
        self.net.link_up(slot, SLOT_VETH)?;
        self.net.default_route(slot, spec.host_addr, SLOT_VETH)?;
        self.net.sysctl(slot, IP_FORWARD, "1")?;
        self.net.sysctl(slot, RP_FILTER, "1")?;
        self.nft.apply(slot, &nft::slot_table(spec))?;
        Ok(())
    }

    /// Makes `addr/30` the link's only IPv4 address, without removing it when it is there.
    fn set_address(
        &self,
        ns: Ns<'_>,
        link: &str,
        addr: std::net::Ipv4Addr,
    ) -> Result<(), HandleError> {
        let want = (addr, SLOT_PREFIX);
        let have = self.net.addrs(ns, link)?;
        for other in have.iter().filter(|a| **a != want) {
            self.net.addr_del(ns, link, other.0, other.1)?;
        }
        if !have.contains(&want) {
            self.net.addr_add(ns, link, addr, SLOT_PREFIX)?;
        }
        Ok(())
    }
}

// The veth /30 and the guest's inner /30 are the same size by design.
const _: () = assert!(SLOT_PREFIX == INNER_PREFIX);

/// The peer's uid and pid (SO_PEERCRED), for the log.
fn peer(stream: &UnixStream) -> (Option<u32>, Option<i32>) {
    match getsockopt(stream, sockopt::PeerCredentials) {
        Ok(cred) => (Some(cred.uid()), Some(cred.pid())),
        Err(_) => (None, None),
    }
}

/// Writes a frame, with `fd` attached to its first byte.
fn send(stream: &UnixStream, frame: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    if fds.is_empty() {
        return (&mut &*stream).write_all(frame);
    }
    let fds: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(frame)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    (&mut &*stream).write_all(&frame[sent..])
}

/// Answers with an error that ends the connection (the input was not a request).
fn refuse(stream: &UnixStream, message: String) {
    let reply = Response::Error {
        kind: ErrorKind::Invalid,
        message,
    };
    if let Ok(frame) = encode(&reply) {
        let _ = send(stream, &frame, &[]);
    }
}

/// Serves one connection until the peer closes it or sends something that is not a request.
/// Requests on it are handled one after the other; every one is logged on one line.
pub fn serve_connection<N: Net, F: Nft>(helper: &Helper<N, F>, stream: UnixStream) {
    let (uid, pid) = peer(&stream);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    loop {
        let frame = match read_frame(&mut &stream) {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e @ FrameError::TooLong { .. }) => {
                tracing::warn!(op = "?", uid, pid, result = "invalid", error = %e, "request");
                refuse(&stream, e.to_string());
                return;
            }
            Err(e) => {
                tracing::debug!(uid, pid, error = %e, "connection ended");
                return;
            }
        };
        let request: Request = match serde_json::from_slice(&frame) {
            Ok(request) => request,
            Err(e) => {
                let message = format!("the message is not a request: {e}");
                tracing::warn!(op = "?", uid, pid, result = "invalid", error = %message, "request");
                refuse(&stream, message);
                return;
            }
        };
        let reply = helper.handle(&request);
        let op = request.op();
        match &reply.response {
            Response::Error { kind, message } => {
                tracing::warn!(op, uid, pid, result = ?kind, error = %message, "request");
            }
            _ => tracing::info!(op, uid, pid, result = "ok", "request"),
        }
        let frame = match encode(&reply.response) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::error!(op, uid, pid, error = %e, "could not encode the answer");
                return;
            }
        };
        if let Err(e) = send(&stream, &frame, &reply.fds) {
            tracing::debug!(op, uid, pid, error = %e, "could not answer");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::net::{Link, NetCall, NetState, RecordingNet, Route};
    use crate::nft::RecordingNft;
    use crate::proto::{EgressMode, EgressRules, HostRules, HostSlot};

    type TestHelper = Helper<RecordingNet, RecordingNft>;

    fn helper() -> TestHelper {
        Helper::new(RecordingNet::default(), RecordingNft::default())
    }

    fn id() -> SlotId {
        SlotId {
            instance: "0123abcd".into(),
            vm: "fedcba9876543210".into(),
        }
    }

    fn spec() -> SlotSpec {
        SlotSpec {
            slot: id(),
            host_addr: Ipv4Addr::new(172, 28, 0, 5),
            vm_addr: Ipv4Addr::new(172, 28, 0, 6),
            peers: "172.28.0.0/16".parse().unwrap(),
            egress: EgressRules::default(),
        }
    }

    #[track_caller]
    fn done(h: &TestHelper, request: Request) {
        let reply = h.handle(&request);
        assert_eq!(reply.response, Response::Done, "{request:?}");
        assert!(reply.fds.is_empty());
    }

    #[track_caller]
    fn error(h: &TestHelper, request: Request) -> (ErrorKind, String) {
        match h.handle(&request).response {
            Response::Error { kind, message } => (kind, message),
            other => panic!("{request:?} answered {other:?}"),
        }
    }

    fn ns() -> Option<String> {
        Some(id().netns())
    }

    #[test]
    fn create_slot_builds_the_slot_and_a_second_time_changes_nothing() {
        let h = helper();
        done(&h, Request::CreateSlot { spec: spec() });
        let veth = id().host_veth();
        let link = |ns: Option<String>, link: &str| (ns, link.to_owned());
        let calls = h.net().take_calls();
        assert_eq!(calls[0], NetCall::NetnsAdd(id().netns()));
        assert!(calls.contains(&NetCall::VethAdd {
            host: veth.clone(),
            peer: "eth0".into(),
            peer_ns: id().netns(),
        }));
        let state = h.net().state();
        assert_eq!(
            state.links[&link(None, &veth)],
            Link {
                up: true,
                addrs: vec![(Ipv4Addr::new(172, 28, 0, 5), 30)],
                peer: Some(link(ns(), "eth0")),
            }
        );
        assert_eq!(
            state.links[&link(ns(), "eth0")].addrs,
            [(Ipv4Addr::new(172, 28, 0, 6), 30)]
        );
        assert!(state.links[&link(ns(), "lo")].up);
        assert_eq!(
            state.default_routes[&ns()],
            (Ipv4Addr::new(172, 28, 0, 5), "eth0".to_owned())
        );
        assert_eq!(state.sysctls[&(ns(), IP_FORWARD)], "1");
        assert_eq!(state.sysctls[&(ns(), RP_FILTER)], "1");
        let applied = h.nft().take_applied();
        assert_eq!(applied, [(ns(), nft::slot_table(&spec()))]);

        // Again: everything is there, so no link is made or deleted, and the rules are the same.
        done(&h, Request::CreateSlot { spec: spec() });
        let again = h.net().take_calls();
        assert!(
            !again.iter().any(|c| matches!(
                c,
                NetCall::VethAdd { .. }
                    | NetCall::LinkDelete { .. }
                    | NetCall::AddrAdd { .. }
                    | NetCall::AddrDel { .. }
            )),
            "{again:?}"
        );
        assert_eq!(h.net().state().links, state.links);
        assert_eq!(h.nft().take_applied(), [(ns(), nft::slot_table(&spec()))]);
    }

    #[test]
    fn create_slot_repairs_half_a_pair_and_moves_addresses() {
        let h = helper();
        done(&h, Request::CreateSlot { spec: spec() });
        let veth = id().host_veth();
        // The host end vanished; the slot end is left over on its own.
        h.net().with_state(|s| {
            s.links.remove(&(None, veth.clone()));
            if let Some(eth0) = s.links.get_mut(&(ns(), "eth0".to_owned())) {
                eth0.peer = None;
            }
        });
        h.net().take_calls();
        let mut moved = spec();
        moved.host_addr = Ipv4Addr::new(172, 28, 0, 9);
        moved.vm_addr = Ipv4Addr::new(172, 28, 0, 10);
        done(&h, Request::CreateSlot { spec: moved });
        let calls = h.net().take_calls();
        assert!(calls.contains(&NetCall::LinkDelete {
            ns: ns(),
            link: "eth0".into()
        }));
        assert!(calls.iter().any(|c| matches!(c, NetCall::VethAdd { .. })));
        let state = h.net().state();
        assert_eq!(
            state.links[&(None, veth)].addrs,
            [(Ipv4Addr::new(172, 28, 0, 9), 30)]
        );

        // An address that changed on an intact pair is replaced, the other kept.
        h.net().with_state(|s| {
            if let Some(eth0) = s.links.get_mut(&(ns(), "eth0".to_owned())) {
                eth0.addrs.push((Ipv4Addr::new(192, 0, 2, 1), 24));
            }
        });
        let mut moved = spec();
        moved.host_addr = Ipv4Addr::new(172, 28, 0, 9);
        moved.vm_addr = Ipv4Addr::new(172, 28, 0, 10);
        done(&h, Request::CreateSlot { spec: moved });
        let calls = h.net().take_calls();
        assert!(calls.contains(&NetCall::AddrDel {
            ns: ns(),
            link: "eth0".into(),
            addr: Ipv4Addr::new(192, 0, 2, 1),
            prefix: 24,
        }));
        assert!(!calls.iter().any(|c| matches!(c, NetCall::AddrAdd { .. })));
    }

    #[test]
    fn delete_slot_of_a_missing_slot_is_done() {
        let h = helper();
        done(&h, Request::DeleteSlot { slot: id() });
        assert_eq!(
            h.net().take_calls(),
            [
                NetCall::NetnsDelete(id().netns()),
                NetCall::LinkDelete {
                    ns: None,
                    link: id().host_veth()
                }
            ]
        );
        done(&h, Request::CreateSlot { spec: spec() });
        done(&h, Request::DeleteSlot { slot: id() });
        let state = h.net().state();
        assert!(state.namespaces.is_empty());
        assert!(state.links.is_empty(), "{:?}", state.links);
    }

    #[test]
    fn open_tap_hands_over_a_descriptor_and_refuses_a_busy_tap() {
        let h = helper();
        let (kind, message) = error(&h, Request::OpenTap { slot: id() });
        assert_eq!(kind, ErrorKind::Failed);
        assert_eq!(
            message,
            format!("slot {} does not exist (create it first)", id().netns())
        );
        done(&h, Request::CreateSlot { spec: spec() });
        let reply = h.handle(&Request::OpenTap { slot: id() });
        assert_eq!(
            reply.response,
            Response::Tap {
                name: "tap0".into()
            }
        );
        assert_eq!(reply.fds.len(), 1);
        let (kind, message) = error(&h, Request::OpenTap { slot: id() });
        assert_eq!(kind, ErrorKind::Failed);
        assert!(message.contains("still open"), "{message}");
    }

    #[test]
    fn setup_checks_routes_and_enables_forwarding() {
        let h = Helper::new(
            RecordingNet::new(NetState {
                routes: vec![
                    Route {
                        dst: "0.0.0.0/0".parse().unwrap(),
                        dev: Some("eth0".into()),
                    },
                    Route {
                        dst: "192.168.1.0/24".parse().unwrap(),
                        dev: Some("eth0".into()),
                    },
                ],
                ..NetState::default()
            }),
            RecordingNft::default(),
        );
        let setup = |cidr: &str| Request::Setup {
            instance: "0123abcd".into(),
            cidr: cidr.parse().unwrap(),
        };
        done(&h, setup("172.28.0.0/16"));
        assert_eq!(h.net().state().sysctls[&(None, IP_FORWARD)], "1");
        let (kind, message) = error(&h, setup("192.168.0.0/16"));
        assert_eq!(kind, ErrorKind::Invalid);
        assert!(
            message.starts_with(
                "cidr 192.168.0.0/16: must not overlap the host's route to 192.168.1.0/24 on eth0"
            ),
            "{message}"
        );
    }

    #[test]
    fn invalid_requests_touch_nothing() {
        let h = helper();
        let mut bad = spec();
        bad.slot.vm = "ABC".into();
        let (kind, message) = error(&h, Request::CreateSlot { spec: bad });
        assert_eq!(kind, ErrorKind::Invalid);
        assert_eq!(
            message,
            "spec.slot.vm \"ABC\": must be 16 lowercase hex digits"
        );
        let (kind, _) = error(
            &h,
            Request::AllowResolved {
                slot: id(),
                addrs: vec![],
                ttl_secs: 0,
            },
        );
        assert_eq!(kind, ErrorKind::Invalid);
        assert!(h.net().take_calls().is_empty());
        assert!(h.nft().take_applied().is_empty());
    }

    #[test]
    fn host_rules_egress_and_resolved_go_to_nft() {
        let h = helper();
        let rules = HostRules {
            instance: "0123abcd".into(),
            cidr: "172.28.0.0/16".parse().unwrap(),
            outbound: None,
            slots: vec![HostSlot {
                slot: id(),
                host_addr: spec().host_addr,
                vm_addr: spec().vm_addr,
            }],
            networks: vec![],
        };
        done(
            &h,
            Request::ApplyHostRules {
                rules: rules.clone(),
            },
        );
        done(
            &h,
            Request::RemoveHostRules {
                instance: "0123abcd".into(),
            },
        );
        assert_eq!(
            h.nft().take_applied(),
            [(None, nft::host_table(&rules)), (None, nft::remove_table())]
        );
        let egress = EgressRules {
            mode: EgressMode::DenyAll,
            ..EgressRules::default()
        };
        let set_egress = Request::SetEgress {
            slot: id(),
            egress: egress.clone(),
        };
        let (kind, _) = error(&h, set_egress.clone());
        assert_eq!(kind, ErrorKind::Failed);
        done(&h, Request::CreateSlot { spec: spec() });
        h.nft().take_applied();
        done(&h, set_egress);
        let addrs = vec![Ipv4Addr::new(93, 184, 216, 34)];
        done(
            &h,
            Request::AllowResolved {
                slot: id(),
                addrs: addrs.clone(),
                ttl_secs: 60,
            },
        );
        done(
            &h,
            Request::AllowResolved {
                slot: id(),
                addrs: vec![],
                ttl_secs: 60,
            },
        );
        assert_eq!(
            h.nft().take_applied(),
            [
                (ns(), nft::set_egress(&egress)),
                (ns(), nft::allow_resolved(&addrs, 60)),
            ]
        );
        h.nft().set_fail(Some("Error: No such file or directory"));
        let (kind, message) = error(
            &h,
            Request::RemoveHostRules {
                instance: "0123abcd".into(),
            },
        );
        assert_eq!(kind, ErrorKind::Failed);
        assert_eq!(
            message,
            "nftables refused the rule set for the host namespace: `recorded nft -f -` failed (exit status: 1): Error: No such file or directory"
        );
    }

    #[test]
    fn list_slots_parses_names_back_and_skips_others() {
        let h = Helper::new(
            RecordingNet::new(NetState {
                namespaces: [
                    "hearth-0123abcd-fedcba9876543210",
                    "hearth-0123abcd-0000000000000001",
                    "hearth-0123abcd-XYZ",
                    "hearth-0123abcd-00000000000000011",
                    "hearth-99999999-0000000000000002",
                    "hearth-test-1-host",
                    "other",
                ]
                .map(String::from)
                .into(),
                ..NetState::default()
            }),
            RecordingNft::default(),
        );
        let reply = h.handle(&Request::ListSlots {
            instance: "0123abcd".into(),
        });
        let vm = |vm: &str| SlotId {
            instance: "0123abcd".into(),
            vm: vm.into(),
        };
        assert_eq!(
            reply.response,
            Response::Slots {
                slots: vec![vm("0000000000000001"), vm("fedcba9876543210")]
            }
        );
    }

    #[test]
    fn hello_names_the_versions() {
        let reply = helper().handle(&Request::Hello);
        assert_eq!(
            reply.response,
            Response::Hello {
                version: PROTOCOL_VERSION,
                pid: std::process::id(),
                helper: env!("CARGO_PKG_VERSION").into(),
                nftables: "nftables v1.0.6 (recorded)".into(),
            }
        );
    }

    #[test]
    fn a_failing_command_is_failed_with_its_error_output() {
        let h = helper();
        h.net().with_state(|s| {
            s.fail = Some((
                "VethAdd",
                "RTNETLINK answers: Operation not permitted".into(),
            ))
        });
        let (kind, message) = error(&h, Request::CreateSlot { spec: spec() });
        assert_eq!(kind, ErrorKind::Failed);
        assert!(
            message.ends_with("RTNETLINK answers: Operation not permitted"),
            "{message}"
        );
        assert!(h.nft().take_applied().is_empty());
    }

    #[test]
    fn frames_round_trip_and_oversize_is_refused() {
        let request = Request::ListSlots {
            instance: "0123abcd".into(),
        };
        let frame = encode(&request).unwrap();
        assert_eq!(
            u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
            frame.len() - 4
        );
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        let mut r = &two[..];
        for _ in 0..2 {
            let body = read_frame(&mut r).unwrap().unwrap();
            assert_eq!(serde_json::from_slice::<Request>(&body).unwrap(), request);
        }
        assert!(read_frame(&mut r).unwrap().is_none());
        let mut cut = &frame[..frame.len() - 1];
        assert!(matches!(read_frame(&mut cut), Err(FrameError::Truncated)));
        let mut half_header = &frame[..2];
        assert!(matches!(
            read_frame(&mut half_header),
            Err(FrameError::Truncated)
        ));

        let over = u32::try_from(MAX_MESSAGE_LEN + 1).unwrap().to_be_bytes();
        let err = read_frame(&mut &over[..]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the message is {} bytes, over the limit of {MAX_MESSAGE_LEN}",
                MAX_MESSAGE_LEN + 1
            )
        );
        assert!(frame_len(u32::MAX.to_be_bytes()).is_err());
        assert_eq!(frame_len(16u32.to_be_bytes()).unwrap(), 16);
        let huge = "x".repeat(MAX_MESSAGE_LEN);
        assert!(matches!(encode(&huge), Err(FrameError::TooLong { .. })));
    }

    #[test]
    fn garbage_is_answered_invalid_and_the_connection_closed() {
        let h = helper();
        let (client, server) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| serve_connection(&h, server));
            let mut c = &client;
            c.write_all(&5u32.to_be_bytes()).unwrap();
            c.write_all(b"{nope").unwrap();
            let body = read_frame(&mut c).unwrap().unwrap();
            match serde_json::from_slice::<Response>(&body).unwrap() {
                Response::Error { kind, message } => {
                    assert_eq!(kind, ErrorKind::Invalid);
                    assert!(
                        message.starts_with("the message is not a request"),
                        "{message}"
                    );
                }
                other => panic!("{other:?}"),
            }
            assert!(read_frame(&mut c).unwrap().is_none(), "still open");
        });

        let (client, server) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| serve_connection(&h, server));
            let mut c = &client;
            let over = u32::try_from(MAX_MESSAGE_LEN + 1).unwrap();
            c.write_all(&over.to_be_bytes()).unwrap();
            let body = read_frame(&mut c).unwrap().unwrap();
            let response: Response = serde_json::from_slice(&body).unwrap();
            assert!(
                matches!(&response, Response::Error { kind: ErrorKind::Invalid, message } if message.contains("over the limit")),
                "{response:?}"
            );
            assert!(read_frame(&mut c).unwrap().is_none(), "still open");
        });

        // A known op with a field breaking a rule keeps the connection.
        let (client, server) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| serve_connection(&h, server));
            let mut c = &client;
            let bad = Request::ListSlots {
                instance: "x".into(),
            };
            for _ in 0..2 {
                c.write_all(&encode(&bad).unwrap()).unwrap();
                let body = read_frame(&mut c).unwrap().unwrap();
                let response: Response = serde_json::from_slice(&body).unwrap();
                assert!(
                    matches!(
                        response,
                        Response::Error {
                            kind: ErrorKind::Invalid,
                            ..
                        }
                    ),
                    "{response:?}"
                );
            }
            drop(client);
        });
    }
}
