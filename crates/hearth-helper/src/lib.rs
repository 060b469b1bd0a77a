//! Hearth's privileged helper. `hearthd` asks it, over a unix socket, for the few things that
//! need root: per-VM network slots and the nftables rule sets around them. The protocol
//! ([`proto`]) is shared by both sides; the helper validates every field of every request.

pub mod proto;
