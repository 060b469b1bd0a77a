//! Hearth's privileged helper. `hearthd` asks it, over a unix socket, for the few things that
//! need root: per-VM network slots, their TAPs and service sockets, and the nftables rule sets
//! around them. The protocol ([`proto`]) is shared by both sides; the helper validates every
//! field of every request ([`validate`]) before it does anything, and serves one hearthd only:
//! the first `Setup` binds it to that instance and its network ([`validate::served`]).
//!
//! - [`client`]: the blocking client `hearthd` uses.
//! - [`server`]: framing, the dispatch of each request ([`server::Helper`]), the connection loop.
//! - [`net`]: namespaces, links, addresses, routes, sysctls, the TAP and the service sockets,
//!   behind the [`net::Net`] trait (`ip -batch` and system calls in a thread inside the slot
//!   for real, a recording double for tests).
//! - [`nft`]: the host and slot rule sets as text, applied through the [`nft::Nft`] trait.
//!
//! The README next to this crate says what the rules enforce and why the slot setup is fast.

mod cmd;

pub mod client;
pub mod net;
pub mod nft;
pub mod proto;
pub mod server;
pub mod validate;

pub use cmd::CommandError;
