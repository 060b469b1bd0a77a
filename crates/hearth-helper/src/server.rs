//! The helper's side of the socket: framing ([`read_frame`], [`encode`]), the dispatch of each
//! [`Request`] ([`Helper::handle`]), and the connection loop ([`serve_connection`]) that logs
//! every request with its peer's credentials and passes descriptors (the TAP's, the service
//! sockets) as `SCM_RIGHTS`.
//!
//! Input that is not a request (a frame over [`MAX_MESSAGE_LEN`], bytes that are not JSON of a
//! known op) is answered with `Error { kind: invalid }` and the connection is closed: after
//! garbage the stream cannot be trusted to be in step. A request whose fields break a rule, or
//! that goes beyond what the helper serves (another instance, another network, anything before
//! a `Setup`), is answered the same way but the connection stays open.

use std::collections::hash_map::{DefaultHasher, RandomState};
use std::hash::{BuildHasher, Hash, Hasher};
use std::io::{self, IoSlice, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, getsockopt, sendmsg, sockopt};
use serde::Serialize;

use crate::net::{
    Change, DISABLE_IPV6_ALL, DISABLE_IPV6_DEFAULT, IP_FORWARD, LinkState, Net, NetError, Ns,
    RP_FILTER, TCP_LOOSE,
};
use crate::nft::{self, Install, Nft, NftError};
use crate::proto::{
    ErrorKind, HostRules, INNER_PREFIX, MAX_MESSAGE_LEN, METADATA_ADDR, PROTOCOL_VERSION, Request,
    Response, SLOT_VETH, SlotId, SlotSpec, TAP_NAME,
};
use crate::validate::{self, Binding, Invalid};

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

/// An answer, with the descriptors that go with it (a [`Response::Tap`]'s one, a
/// [`Response::Services`]' three).
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

/// The sysctls of every slot, written in one visit after its table (TCP_LOOSE exists only
/// once conntrack runs in the namespace; forwarding comes on when the rules are there).
pub const SLOT_SYSCTLS: [(&str, &str); 5] = [
    (IP_FORWARD, "1"),
    (RP_FILTER, "1"),
    (DISABLE_IPV6_ALL, "1"),
    (DISABLE_IPV6_DEFAULT, "1"),
    (TCP_LOOSE, "0"),
];

/// The helper's work: every request validated, then done through a [`Net`] and an [`Nft`].
#[derive(Debug)]
pub struct Helper<N, F> {
    net: N,
    nft: F,
    /// What the first Setup bound the helper to ([`validate::served`]); held while a first
    /// Setup checks the routes, so two first Setups do not both bind it.
    binding: Mutex<Option<Binding>>,
    /// Serialises the host rules, and holds the rule set last applied in the host namespace
    /// (`None`: not known, so the next one replaces the whole table).
    host: Mutex<Option<HostRules>>,
    slots: [Mutex<()>; SLOT_STRIPES],
    busy: AtomicUsize,
    /// The generation the next slot table or egress policy takes (see [`nft::slot_table`]).
    generation: AtomicU32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts a request in flight while it lives.
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A random u32 (std's hash keys come from the kernel's random numbers): where a helper's
/// generations start, so a restarted helper does not hand out its predecessor's again.
fn random_u32() -> u32 {
    let bits = RandomState::new()
        .hash_one(std::process::id())
        .to_le_bytes();
    u32::from_le_bytes([bits[0], bits[1], bits[2], bits[3]])
}

impl<N: Net, F: Nft> Helper<N, F> {
    pub fn new(net: N, nft: F) -> Helper<N, F> {
        Helper {
            net,
            nft,
            binding: Mutex::new(None),
            host: Mutex::new(None),
            slots: std::array::from_fn(|_| Mutex::new(())),
            busy: AtomicUsize::new(0),
            generation: AtomicU32::new(random_u32()),
        }
    }

    /// Fixes the generation the next CreateSlot or SetEgress takes (the ones after it count
    /// up, skipping 0), so a test knows the rule sets it makes.
    pub fn with_generation(self, next: u32) -> Helper<N, F> {
        self.generation.store(next, Ordering::SeqCst);
        self
    }

    pub fn net(&self) -> &N {
        &self.net
    }

    pub fn nft(&self) -> &F {
        &self.nft
    }

    /// What the helper serves, once a Setup has bound it.
    pub fn binding(&self) -> Option<Binding> {
        lock(&self.binding).clone()
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
            .and_then(|()| validate::served(request, self.binding().as_ref()))
            .map_err(HandleError::from)
            .and_then(|()| self.run(request))
        {
            Ok(reply) => reply,
            Err(e) => Reply::error(e.kind(), e.message()),
        }
    }

    /// A new nonzero generation.
    fn next_generation(&self) -> u32 {
        loop {
            let generation = self.generation.fetch_add(1, Ordering::SeqCst);
            if generation != 0 {
                return generation;
            }
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
            Request::Setup { instance, cidr } => {
                let mut binding = lock(&self.binding);
                // Again under the lock: another first Setup may have bound the helper since.
                validate::served(request, binding.as_ref())?;
                if binding.is_none() {
                    validate::setup_routes("cidr", *cidr, &self.net.routes()?)?;
                }
                // One write, cheap enough for every connection's Setup, and it turns
                // forwarding back on if something turned it off.
                self.net.sysctls(Ns::Host, &[(IP_FORWARD, "1")])?;
                *binding = Some(Binding {
                    instance: instance.clone(),
                    cidr: *cidr,
                });
                Ok(Reply::done())
            }
            Request::ApplyHostRules { rules } => {
                let mut applied = lock(&self.host);
                // Unknown until it is known again.
                let last = applied.take();
                self.apply_host_rules(last.as_ref(), rules)?;
                *applied = Some(rules.clone());
                Ok(Reply::done())
            }
            Request::RemoveHostRules { instance: _ } => {
                let mut applied = lock(&self.host);
                *applied = None;
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
                self.net.netns_delete(&slot.netns())?;
                // The host end goes with the slot's namespace, but only once the kernel has
                // cleaned that up (later), and not at all while something (a VMM's TAP
                // descriptor) keeps the namespace alive: it is deleted by name. That cleanup may
                // take it between `ip`'s lookup of the name and the delete ("No such device"):
                // gone either way.
                let host_end = Change::LinkDelete {
                    link: slot.host_veth(),
                };
                match self.net.apply(Ns::Host, &[host_end]) {
                    Err(e)
                        if !e.stderr_contains("Cannot find device")
                            && !e.stderr_contains("No such device") =>
                    {
                        return Err(e.into());
                    }
                    _ => {}
                }
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
                let script = nft::set_egress(egress, self.next_generation());
                self.nft.apply(Ns::Slot(&netns), &script)?;
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

    /// Applies `rules` to the host: as the elements that differ from `last` when only those
    /// do (a VM's coming is one element added; nothing at all when nothing differs), else, or
    /// when that fails (the table was changed or flushed behind the helper's back), as the
    /// whole table.
    fn apply_host_rules(
        &self,
        last: Option<&HostRules>,
        rules: &HostRules,
    ) -> Result<(), NftError> {
        if let Some(changes) = last.and_then(|last| nft::host_table_changes(last, rules)) {
            if changes.is_empty() {
                return Ok(());
            }
            match self.nft.apply(Ns::Host, &changes) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let error = HandleError::from(e).message();
                    tracing::info!(
                        error,
                        "could not change the host rules in place; replacing them"
                    );
                }
            }
        }
        self.nft.apply(Ns::Host, &nft::host_table(rules))
    }

    /// Brings the slot to `spec`, then writes its table (with a new generation) and its
    /// sysctls. A slot whose namespace does not exist yet is made in one go, asking nothing
    /// (everything is known): one `ip -batch` in the host, one in the slot. An existing one is
    /// repaired: what is there is asked for, and only what differs is changed. If the one go
    /// fails halfway (a leftover host veth of that name, say), the repair takes over.
    fn create_slot(&self, spec: &SlotSpec) -> Result<(), HandleError> {
        let netns = spec.slot.netns();
        let slot = Ns::Slot(&netns);
        let made = !self.net.netns_list()?.contains(&netns)
            && match self.new_slot(spec) {
                Ok(()) => true,
                Err(e) => {
                    let error = HandleError::from(e).message();
                    tracing::info!(netns, error, "could not make the slot in one go; repairing");
                    false
                }
            };
        let install = if made {
            // A namespace made just now has no table.
            Install::New
        } else {
            self.repair_slot(spec)?;
            Install::Replace
        };
        let table = nft::slot_table(spec, self.next_generation(), install);
        self.nft.apply(slot, &table)?;
        self.net.sysctls(slot, &SLOT_SYSCTLS)?;
        Ok(())
    }

    /// The slot, made from nothing.
    fn new_slot(&self, spec: &SlotSpec) -> Result<(), NetError> {
        let netns = spec.slot.netns();
        let host_veth = spec.slot.host_veth();
        self.net.apply(
            Ns::Host,
            &[
                Change::NetnsAdd {
                    name: netns.clone(),
                },
                Change::VethAdd {
                    link: host_veth.clone(),
                    peer: SLOT_VETH.to_owned(),
                    peer_ns: netns.clone(),
                },
                Change::AddrAdd {
                    link: host_veth.clone(),
                    addr: spec.host_addr,
                    prefix: SLOT_PREFIX,
                },
                Change::LinkUp { link: host_veth },
            ],
        )?;
        self.net
            .apply(Ns::Slot(&netns), &slot_side(spec, &LinkState::default()))
    }

    /// The slot, from whatever part of it exists: a namespace that is no namespace is replaced,
    /// half a veth pair started over, other addresses on the pair removed.
    fn repair_slot(&self, spec: &SlotSpec) -> Result<(), HandleError> {
        let netns = spec.slot.netns();
        let host_veth = spec.slot.host_veth();
        let slot = Ns::Slot(&netns);
        self.net.netns_add(&netns)?;
        let mut host = Vec::new();
        let (eth0, hv) = match (
            self.net.link(slot, SLOT_VETH)?,
            self.net.link(Ns::Host, &host_veth)?,
        ) {
            (Some(eth0), Some(hv)) => (eth0, hv),
            (eth0, hv) => {
                // Half a pair (or none): start the pair over.
                if eth0.is_some() {
                    let eth0 = Change::LinkDelete {
                        link: SLOT_VETH.to_owned(),
                    };
                    self.net.apply(slot, &[eth0])?;
                }
                if hv.is_some() {
                    host.push(Change::LinkDelete {
                        link: host_veth.clone(),
                    });
                }
                host.push(Change::VethAdd {
                    link: host_veth.clone(),
                    peer: SLOT_VETH.to_owned(),
                    peer_ns: netns.clone(),
                });
                (LinkState::default(), LinkState::default())
            }
        };
        host.extend(link_changes(&host_veth, &hv, spec.host_addr));
        self.net.apply(Ns::Host, &host)?;
        self.net.apply(slot, &slot_side(spec, &eth0))?;
        Ok(())
    }
}

/// What makes `link` carry `addr`/30 as its only IPv4 address and be up, given its `state`:
/// only what differs.
fn link_changes(link: &str, state: &LinkState, addr: Ipv4Addr) -> Vec<Change> {
    let want = (addr, SLOT_PREFIX);
    let mut changes: Vec<Change> = state
        .addrs
        .iter()
        .filter(|a| **a != want)
        .map(|&(addr, prefix)| Change::AddrDel {
            link: link.to_owned(),
            addr,
            prefix,
        })
        .collect();
    if !state.addrs.contains(&want) {
        changes.push(Change::AddrAdd {
            link: link.to_owned(),
            addr,
            prefix: SLOT_PREFIX,
        });
    }
    if !state.up {
        changes.push(Change::LinkUp {
            link: link.to_owned(),
        });
    }
    changes
}

/// The slot's side, its `eth0` being in `eth0` state: `lo` up with the metadata address (the
/// listener of [`Request::OpenServices`] is bound there), `eth0` with the VM's address and up,
/// and the default route through the host's end. The changes to `lo` and the route hold when
/// made already, so they are not asked for.
fn slot_side(spec: &SlotSpec, eth0: &LinkState) -> Vec<Change> {
    let mut changes = vec![
        Change::LinkUp {
            link: "lo".to_owned(),
        },
        Change::AddrAdd {
            link: "lo".to_owned(),
            addr: METADATA_ADDR,
            prefix: 32,
        },
    ];
    changes.extend(link_changes(SLOT_VETH, eth0, spec.vm_addr));
    changes.push(Change::DefaultRoute {
        via: spec.host_addr,
        link: SLOT_VETH.to_owned(),
    });
    changes
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
    use crate::proto::{EgressMode, EgressRules, HostSlot, PrivateNetwork};

    type TestHelper = Helper<RecordingNet, RecordingNft>;

    /// The generation the first table of a test helper gets.
    const GENERATION: u32 = 7;

    fn setup() -> Request {
        Request::Setup {
            instance: "0123abcd".into(),
            cidr: "172.28.0.0/16".parse().unwrap(),
        }
    }

    /// A helper on `state`, bound by a Setup, its calls so far forgotten.
    fn helper_with(state: NetState) -> TestHelper {
        let h = Helper::new(RecordingNet::new(state), RecordingNft::default())
            .with_generation(GENERATION);
        done(&h, setup());
        h.net().take_calls();
        h
    }

    fn helper() -> TestHelper {
        helper_with(NetState::default())
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

    fn key(ns: Option<String>, link: &str) -> (Option<String>, String) {
        (ns, link.to_owned())
    }

    /// The slot side's batch for a new `eth0`.
    fn slot_batch(spec: &SlotSpec) -> Vec<Change> {
        vec![
            Change::LinkUp { link: "lo".into() },
            Change::AddrAdd {
                link: "lo".into(),
                addr: METADATA_ADDR,
                prefix: 32,
            },
            Change::AddrAdd {
                link: "eth0".into(),
                addr: spec.vm_addr,
                prefix: 30,
            },
            Change::LinkUp {
                link: "eth0".into(),
            },
            Change::DefaultRoute {
                via: spec.host_addr,
                link: "eth0".into(),
            },
        ]
    }

    #[test]
    fn a_new_slot_is_made_in_two_batches_without_a_question() {
        let h = helper();
        done(&h, Request::CreateSlot { spec: spec() });
        let veth = id().host_veth();
        let calls = h.net().take_calls();
        assert_eq!(
            calls,
            [
                NetCall::NetnsList,
                NetCall::Apply {
                    ns: None,
                    changes: vec![
                        Change::NetnsAdd { name: id().netns() },
                        Change::VethAdd {
                            link: veth.clone(),
                            peer: "eth0".into(),
                            peer_ns: id().netns(),
                        },
                        Change::AddrAdd {
                            link: veth.clone(),
                            addr: Ipv4Addr::new(172, 28, 0, 5),
                            prefix: 30,
                        },
                        Change::LinkUp { link: veth.clone() },
                    ],
                },
                NetCall::Apply {
                    ns: ns(),
                    changes: slot_batch(&spec()),
                },
                NetCall::Sysctls {
                    ns: ns(),
                    values: SLOT_SYSCTLS.to_vec(),
                },
            ]
        );
        // Two programs for the links (and one nft): the same with any number of slots.
        assert_eq!(calls.iter().filter(|c| c.runs_a_program()).count(), 2);
        assert_eq!(
            h.nft().take_applied(),
            [(ns(), nft::slot_table(&spec(), GENERATION, Install::New))]
        );
        let state = h.net().state();
        assert_eq!(
            state.links[&key(None, &veth)],
            Link {
                up: true,
                addrs: vec![(Ipv4Addr::new(172, 28, 0, 5), 30)],
                peer: Some(key(ns(), "eth0")),
            }
        );
        assert_eq!(
            state.links[&key(ns(), "eth0")].addrs,
            [(Ipv4Addr::new(172, 28, 0, 6), 30)]
        );
        assert_eq!(
            state.links[&key(ns(), "lo")],
            Link {
                up: true,
                addrs: vec![(METADATA_ADDR, 32)],
                peer: None
            }
        );
        assert_eq!(
            state.default_routes[&ns()],
            (Ipv4Addr::new(172, 28, 0, 5), "eth0".to_owned())
        );
        for (key, value) in SLOT_SYSCTLS {
            assert_eq!(state.sysctls[&(ns(), key)], value, "{key}");
        }
        assert_eq!(state.sysctls[&(ns(), TCP_LOOSE)], "0");
        assert_eq!(state.sysctls[&(ns(), DISABLE_IPV6_ALL)], "1");
    }

    #[test]
    fn an_existing_slot_is_asked_for_and_only_what_differs_changed() {
        let h = helper();
        done(&h, Request::CreateSlot { spec: spec() });
        h.net().take_calls();
        h.nft().take_applied();
        let before = h.net().state().links;

        // Again: everything is there. No link is made or deleted; what holds when made
        // already (lo, the route) is said again; the table is written with a new generation.
        done(&h, Request::CreateSlot { spec: spec() });
        let veth = id().host_veth();
        assert_eq!(
            h.net().take_calls(),
            [
                NetCall::NetnsList,
                NetCall::NetnsAdd(id().netns()),
                NetCall::Link {
                    ns: ns(),
                    link: "eth0".into()
                },
                NetCall::Link {
                    ns: None,
                    link: veth.clone()
                },
                NetCall::Apply {
                    ns: ns(),
                    changes: vec![
                        Change::LinkUp { link: "lo".into() },
                        Change::AddrAdd {
                            link: "lo".into(),
                            addr: METADATA_ADDR,
                            prefix: 32,
                        },
                        Change::DefaultRoute {
                            via: Ipv4Addr::new(172, 28, 0, 5),
                            link: "eth0".into(),
                        },
                    ],
                },
                NetCall::Sysctls {
                    ns: ns(),
                    values: SLOT_SYSCTLS.to_vec(),
                },
            ]
        );
        assert_eq!(h.net().state().links, before);
        assert_eq!(
            h.nft().take_applied(),
            [(
                ns(),
                nft::slot_table(&spec(), GENERATION + 1, Install::Replace)
            )]
        );
    }

    #[test]
    fn create_slot_repairs_half_a_pair_and_moves_addresses() {
        let h = helper();
        done(&h, Request::CreateSlot { spec: spec() });
        let veth = id().host_veth();
        // The host end vanished; the slot end is left over on its own.
        h.net().with_state(|s| {
            s.links.remove(&key(None, &veth));
            if let Some(eth0) = s.links.get_mut(&key(ns(), "eth0")) {
                eth0.peer = None;
            }
        });
        h.net().take_calls();
        let mut moved = spec();
        moved.host_addr = Ipv4Addr::new(172, 28, 0, 9);
        moved.vm_addr = Ipv4Addr::new(172, 28, 0, 10);
        done(
            &h,
            Request::CreateSlot {
                spec: moved.clone(),
            },
        );
        let calls = h.net().take_calls();
        assert!(calls.contains(&NetCall::Apply {
            ns: ns(),
            changes: vec![Change::LinkDelete {
                link: "eth0".into()
            }]
        }));
        assert!(calls.contains(&NetCall::Apply {
            ns: None,
            changes: vec![
                Change::VethAdd {
                    link: veth.clone(),
                    peer: "eth0".into(),
                    peer_ns: id().netns(),
                },
                Change::AddrAdd {
                    link: veth.clone(),
                    addr: moved.host_addr,
                    prefix: 30,
                },
                Change::LinkUp { link: veth.clone() },
            ]
        }));
        let state = h.net().state();
        assert_eq!(
            state.links[&key(None, &veth)].addrs,
            [(moved.host_addr, 30)]
        );
        assert_eq!(state.links[&key(ns(), "eth0")].addrs, [(moved.vm_addr, 30)]);

        // An address that changed on an intact pair is replaced, the other kept.
        h.net().with_state(|s| {
            if let Some(eth0) = s.links.get_mut(&key(ns(), "eth0")) {
                eth0.addrs.push((Ipv4Addr::new(192, 0, 2, 1), 24));
            }
        });
        done(&h, Request::CreateSlot { spec: moved });
        let applied: Vec<Change> = h
            .net()
            .take_calls()
            .into_iter()
            .filter_map(|c| match c {
                NetCall::Apply { changes, .. } => Some(changes),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(applied.contains(&Change::AddrDel {
            link: "eth0".into(),
            addr: Ipv4Addr::new(192, 0, 2, 1),
            prefix: 24,
        }));
        assert!(
            !applied.iter().any(|c| matches!(
                c,
                Change::AddrAdd { link, .. } | Change::LinkUp { link } if link != "lo"
            )),
            "{applied:?}"
        );
        assert_eq!(
            h.net().state().links[&key(ns(), "eth0")].addrs,
            [(Ipv4Addr::new(172, 28, 0, 10), 30)]
        );
    }

    #[test]
    fn a_new_slot_that_fails_halfway_is_repaired() {
        // A host veth of the slot's name is left over (its namespace went without it).
        let veth = id().host_veth();
        let h = helper_with(NetState {
            links: [(key(None, &veth), Link::default())].into(),
            ..NetState::default()
        });
        done(&h, Request::CreateSlot { spec: spec() });
        let calls = h.net().take_calls();
        assert!(
            calls.contains(&NetCall::Apply {
                ns: None,
                changes: vec![
                    Change::LinkDelete { link: veth.clone() },
                    Change::VethAdd {
                        link: veth.clone(),
                        peer: "eth0".into(),
                        peer_ns: id().netns(),
                    },
                    Change::AddrAdd {
                        link: veth.clone(),
                        addr: Ipv4Addr::new(172, 28, 0, 5),
                        prefix: 30,
                    },
                    Change::LinkUp { link: veth.clone() },
                ]
            }),
            "{calls:?}"
        );
        let state = h.net().state();
        assert_eq!(state.links[&key(None, &veth)].peer, Some(key(ns(), "eth0")));
        assert!(state.links[&key(ns(), "eth0")].up);
    }

    #[test]
    fn delete_slot_of_a_missing_slot_is_done() {
        let h = helper();
        done(&h, Request::DeleteSlot { slot: id() });
        assert_eq!(
            h.net().take_calls(),
            [
                NetCall::NetnsDelete(id().netns()),
                NetCall::Apply {
                    ns: None,
                    changes: vec![Change::LinkDelete {
                        link: id().host_veth()
                    }]
                }
            ]
        );
        done(&h, Request::CreateSlot { spec: spec() });
        done(&h, Request::DeleteSlot { slot: id() });
        let state = h.net().state();
        assert!(state.namespaces.is_empty());
        assert!(state.links.is_empty(), "{:?}", state.links);
        // The kernel's cleanup of the namespace taking the host end while `ip` deletes it.
        done(&h, Request::CreateSlot { spec: spec() });
        h.net().with_state(|s| {
            s.fail = Some(("LinkDelete", "RTNETLINK answers: No such device".into()))
        });
        done(&h, Request::DeleteSlot { slot: id() });
        // Anything else deleting the host end fails the request.
        h.net()
            .with_state(|s| s.fail = Some(("LinkDelete", "RTNETLINK answers: Busy".into())));
        let (kind, message) = error(&h, Request::DeleteSlot { slot: id() });
        assert_eq!(kind, ErrorKind::Failed);
        assert!(message.ends_with("RTNETLINK answers: Busy"), "{message}");
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
        h.net().take_calls();
        let reply = h.handle(&Request::OpenTap { slot: id() });
        assert_eq!(
            reply.response,
            Response::Tap {
                name: "tap0".into()
            }
        );
        assert_eq!(reply.fds.len(), 1);
        // No program runs for a TAP: it is made, addressed and brought up by system calls.
        let calls = h.net().take_calls();
        assert!(!calls.iter().any(NetCall::runs_a_program), "{calls:?}");
        let (kind, message) = error(&h, Request::OpenTap { slot: id() });
        assert_eq!(kind, ErrorKind::Failed);
        assert!(message.contains("still open"), "{message}");
    }

    #[test]
    fn open_services_hands_over_three_sockets_once_at_a_time() {
        let h = helper();
        let (kind, _) = error(&h, Request::OpenServices { slot: id() });
        assert_eq!(kind, ErrorKind::Failed);
        done(&h, Request::CreateSlot { spec: spec() });
        h.net().take_calls();
        let reply = h.handle(&Request::OpenServices { slot: id() });
        assert_eq!(reply.response, Response::Services);
        assert_eq!(reply.fds.len(), SERVICE_SOCKETS_LEN);
        assert_eq!(
            h.net().take_calls(),
            [
                NetCall::NetnsList,
                NetCall::OpenServices {
                    netns: id().netns()
                }
            ]
        );
        let (kind, message) = error(&h, Request::OpenServices { slot: id() });
        assert_eq!(kind, ErrorKind::Failed);
        assert!(message.contains("in use"), "{message}");
        // Closed (the model is told), they can be made again.
        h.net().with_state(|s| {
            s.services.remove(&id().netns());
        });
        assert_eq!(
            h.handle(&Request::OpenServices { slot: id() }).fds.len(),
            SERVICE_SOCKETS_LEN
        );
    }

    const SERVICE_SOCKETS_LEN: usize = crate::proto::SERVICE_SOCKETS.len();

    #[test]
    fn setup_checks_routes_enables_forwarding_and_binds_the_helper() {
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
        let setup = |instance: &str, cidr: &str| Request::Setup {
            instance: instance.into(),
            cidr: cidr.parse().unwrap(),
        };
        // Nothing but Hello and Setup before a Setup.
        let (kind, message) = error(&h, Request::CreateSlot { spec: spec() });
        assert_eq!(kind, ErrorKind::Invalid);
        assert!(message.contains("send setup first"), "{message}");
        let (kind, message) = error(
            &h,
            Request::ListSlots {
                instance: "0123abcd".into(),
            },
        );
        assert_eq!(kind, ErrorKind::Invalid);
        assert!(
            message.starts_with("list_slots: send setup first"),
            "{message}"
        );
        assert!(h.net().take_calls().is_empty());

        // A refused Setup binds nothing.
        let (kind, message) = error(&h, setup("0123abcd", "192.168.0.0/16"));
        assert_eq!(kind, ErrorKind::Invalid);
        assert!(
            message.starts_with(
                "cidr 192.168.0.0/16: must not overlap the host's route to 192.168.1.0/24 on eth0"
            ),
            "{message}"
        );
        assert_eq!(h.binding(), None);

        done(&h, setup("0123abcd", "172.28.0.0/16"));
        assert_eq!(h.net().state().sysctls[&(None, IP_FORWARD)], "1");
        assert_eq!(
            h.binding(),
            Some(Binding {
                instance: "0123abcd".into(),
                cidr: "172.28.0.0/16".parse().unwrap()
            })
        );
        h.net().take_calls();
        // The same again (every connection of hearthd starts with it): no routes read.
        done(&h, setup("0123abcd", "172.28.0.0/16"));
        assert_eq!(
            h.net().take_calls(),
            [NetCall::Sysctls {
                ns: None,
                values: vec![(IP_FORWARD, "1")]
            }]
        );
        // Another hearthd's, or another network, is refused.
        for (instance, cidr) in [("0123abce", "172.28.0.0/16"), ("0123abcd", "10.20.0.0/16")] {
            let (kind, message) = error(&h, setup(instance, cidr));
            assert_eq!(kind, ErrorKind::Invalid);
            assert!(
                message.contains(
                    "this helper serves instance \"0123abcd\" with cidr 172.28.0.0/16; restart hearth-helper to serve another"
                ),
                "{message}"
            );
        }
        assert!(h.net().take_calls().is_empty());
        // And so is every request for another instance.
        let mut foreign = spec();
        foreign.slot.instance = "0123abce".into();
        let (kind, message) = error(&h, Request::CreateSlot { spec: foreign });
        assert_eq!(kind, ErrorKind::Invalid);
        assert!(
            message.starts_with(
                "spec.slot.instance \"0123abce\": must be the instance this helper serves"
            ),
            "{message}"
        );
        assert!(h.net().take_calls().is_empty());
        assert!(h.nft().take_applied().is_empty());
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
            domains: true,
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
        // Each policy has a generation of its own.
        done(&h, set_egress.clone());
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
                (ns(), nft::set_egress(&egress, GENERATION + 1)),
                (ns(), nft::set_egress(&egress, GENERATION + 2)),
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
    fn host_rules_change_in_place_when_only_their_vms_differ() {
        let h = helper();
        let host_slot = |vm: &str, host_addr: [u8; 4]| HostSlot {
            slot: SlotId {
                instance: "0123abcd".into(),
                vm: vm.into(),
            },
            host_addr: host_addr.into(),
            vm_addr: Ipv4Addr::from(u32::from(Ipv4Addr::from(host_addr)) + 1),
        };
        let one = HostRules {
            instance: "0123abcd".into(),
            cidr: "172.28.0.0/16".parse().unwrap(),
            outbound: None,
            slots: vec![host_slot("fedcba9876543210", [172, 28, 0, 5])],
            networks: vec![PrivateNetwork {
                name: "db-tier".into(),
                members: vec![],
            }],
        };
        let two = HostRules {
            slots: vec![
                host_slot("fedcba9876543210", [172, 28, 0, 5]),
                host_slot("0000000000000001", [172, 28, 0, 9]),
            ],
            ..one.clone()
        };
        let apply = |rules: &HostRules| {
            done(
                &h,
                Request::ApplyHostRules {
                    rules: rules.clone(),
                },
            );
        };
        // The first rule set of a helper replaces the table; the next, one VM more, adds the
        // elements; the same again adds them again (nothing changes, unless they went).
        apply(&one);
        apply(&two);
        apply(&two);
        assert_eq!(
            h.nft().take_applied(),
            [
                (None, nft::host_table(&one)),
                (None, nft::host_table_changes(&one, &two).unwrap()),
                (None, nft::host_table_changes(&two, &two).unwrap()),
            ]
        );
        // With no element at all, nothing is applied.
        let none = HostRules {
            slots: vec![],
            ..one.clone()
        };
        apply(&none);
        h.nft().take_applied();
        apply(&none);
        assert!(h.nft().take_applied().is_empty());
        apply(&two);
        // Another shape (no private network) takes the whole table.
        let plain = HostRules {
            networks: vec![],
            ..two.clone()
        };
        h.nft().take_applied();
        apply(&plain);
        assert_eq!(h.nft().take_applied(), [(None, nft::host_table(&plain))]);
        // When the change is refused (the table went behind the helper's back), the whole
        // table is made again.
        h.nft().set_refuse(Some("add element ip hearth vm_src"));
        let back = HostRules {
            slots: one.slots.clone(),
            ..plain.clone()
        };
        apply(&back);
        assert_eq!(
            h.nft().take_applied(),
            [
                (None, nft::host_table_changes(&plain, &back).unwrap()),
                (None, nft::host_table(&back)),
            ]
        );
        h.nft().set_refuse(None);
        // After a removal, or a failure, nothing is assumed.
        done(
            &h,
            Request::RemoveHostRules {
                instance: "0123abcd".into(),
            },
        );
        apply(&back);
        h.nft().set_fail(Some("Error: out of memory"));
        let (kind, _) = error(
            &h,
            Request::ApplyHostRules {
                rules: plain.clone(),
            },
        );
        assert_eq!(kind, ErrorKind::Failed);
        h.nft().set_fail(None);
        apply(&plain);
        assert_eq!(
            h.nft().take_applied(),
            [
                (None, nft::remove_table()),
                (None, nft::host_table(&back)),
                // Refused, in place and whole:
                (None, nft::host_table_changes(&back, &plain).unwrap()),
                (None, nft::host_table(&plain)),
                // so the next one is whole.
                (None, nft::host_table(&plain)),
            ]
        );
    }

    #[test]
    fn generations_are_never_zero() {
        let h =
            Helper::new(RecordingNet::default(), RecordingNft::default()).with_generation(u32::MAX);
        assert_eq!(h.next_generation(), u32::MAX);
        assert_eq!(h.next_generation(), 1);
        assert_ne!(
            Helper::new(RecordingNet::default(), RecordingNft::default()).next_generation(),
            0
        );
    }

    #[test]
    fn list_slots_parses_names_back_and_skips_others() {
        let h = helper_with(NetState {
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
        });
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
