//! The per-VM DNS forwarder: egress by domain name.
//!
//! Each VM's resolver is `10.254.254.1:53`; its slot DNATs that to the VM's host address, where
//! one [`Forwarder`] per VM listens on UDP and TCP. Without an allow-list ([`DnsPolicy`] with
//! `allowed: None`) it is a plain forwarder. With one:
//!
//! - a query for a name outside the list is answered NXDOMAIN at once and never forwarded;
//! - an A query for an allowed name is forwarded, and the IPv4 addresses of its answer
//!   (following CNAMEs inside the answer section) go to the [`ResolvedSink`] — which lets the
//!   VM reach them — *before* the answer is relayed, so the guest's connect right after it is
//!   not dropped;
//! - an AAAA query for an allowed name is answered NOERROR with no records (the VM has no IPv6
//!   route), other query types are forwarded and relayed unchanged.
//!
//! The guest is root and hostile: queries are bounded (UDP ≤ 512 bytes, TCP ≤ 65535, at most
//! [`Limits::max_in_flight`] forwarded at once, [`Limits::max_tcp_conns`] connections, an idle
//! timeout), names are parsed with compression pointers that must point strictly backwards
//! (so a pointer loop is refused, never followed), and what goes upstream is rebuilt from the
//! parsed question rather than copied, so the upstream resolves exactly the name the policy
//! checked. Every upstream query gets a fresh socket and a fresh random id, and an answer counts
//! only when it comes from that server and matches the id and the question.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

// ---------------------------------------------------------------------------------------------
// Allowed domains and the policy
// ---------------------------------------------------------------------------------------------

/// What an allowed domain may look like, quoted by every [`DomainPatternError`].
const PATTERN_RULE: &str = "an allowed domain is a name like api.example.com, or *.example.com \
     for every name below example.com: labels of 1-63 letters, digits and '-', not starting or \
     ending with '-', at least two labels (besides a leading '*'), at most 253 characters";

/// `api.example.com` or `*.example.com` (any name below example.com, not example.com itself).
///
/// Parsed with [`FromStr`]: lowercased, one trailing `.` stripped, then validated. Serialized as
/// the string it displays as.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainPattern {
    /// True for `*.base`: names below `base`, not `base` itself.
    wildcard: bool,
    /// The name (lowercase, no trailing dot), or what follows `*.`.
    base: String,
}

impl DomainPattern {
    /// Whether `name` (already normalized: lowercase, no trailing dot) is one this pattern
    /// allows.
    fn matches(&self, name: &str) -> bool {
        if !self.wildcard {
            return name == self.base;
        }
        name.len() > self.base.len() + 1
            && name.ends_with(self.base.as_str())
            && name.as_bytes()[name.len() - self.base.len() - 1] == b'.'
    }
}

/// Why a string is not a [`DomainPattern`]: names the value, what is wrong and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid allowed domain {value:?}: {reason}; {rule}", rule = PATTERN_RULE)]
pub struct DomainPatternError {
    pub value: String,
    pub reason: String,
}

impl FromStr for DomainPattern {
    type Err = DomainPatternError;
    fn from_str(s: &str) -> Result<DomainPattern, DomainPatternError> {
        let bad = |reason: String| DomainPatternError {
            value: s.to_owned(),
            reason,
        };
        let lower = s.to_ascii_lowercase();
        let text = lower.strip_suffix('.').unwrap_or(&lower);
        if text.is_empty() {
            return Err(bad("it is empty".to_owned()));
        }
        if text.len() > 253 {
            return Err(bad(format!("it is {} characters long", text.len())));
        }
        let (wildcard, base) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        if base.contains('*') {
            return Err(bad(
                "'*' may only be the whole first label, as in *.example.com".to_owned(),
            ));
        }
        let labels: Vec<&str> = base.split('.').collect();
        for label in &labels {
            if label.is_empty() {
                return Err(bad(
                    "it has an empty label (two dots in a row, or a leading dot)".to_owned(),
                ));
            }
            if label.len() > 63 {
                return Err(bad(format!(
                    "label {label:?} is {} characters long",
                    label.len()
                )));
            }
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
            {
                return Err(bad(format!(
                    "{c:?} is not allowed (write international names in their xn-- form)"
                )));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(bad(format!("label {label:?} starts or ends with '-'")));
            }
        }
        if labels.len() < 2 {
            return Err(bad(if wildcard {
                format!("*.{base} would allow a whole top-level domain")
            } else {
                "it has only one label".to_owned()
            }));
        }
        Ok(DomainPattern {
            wildcard,
            base: base.to_owned(),
        })
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.base)
        } else {
            f.write_str(&self.base)
        }
    }
}

impl Serialize for DomainPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DomainPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DomainPattern, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which names a VM may resolve.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsPolicy {
    /// `None`: every name resolves (a plain forwarder). `Some(list)`: only names a pattern of
    /// the list matches (an empty list allows none).
    pub allowed: Option<Vec<DomainPattern>>,
}

impl DnsPolicy {
    /// Whether `name` may be resolved. Case-insensitive; one trailing `.` is ignored. With an
    /// allow-list, a name that is not a plain host name (labels of letters, digits, `-` and `_`)
    /// is never allowed.
    pub fn allows(&self, name: &str) -> bool {
        let Some(allowed) = &self.allowed else {
            return true;
        };
        normalize_name(name).is_some_and(|n| allowed.iter().any(|p| p.matches(&n)))
    }
}

/// `name` lowercased without one trailing dot, when every label is 1-63 of `[a-z0-9_-]` and the
/// whole at most 253 characters; otherwise `None`.
fn normalize_name(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    let text = lower.strip_suffix('.').unwrap_or(&lower);
    let ok = !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        });
    ok.then(|| text.to_owned())
}

// ---------------------------------------------------------------------------------------------
// The sink and TTLs
// ---------------------------------------------------------------------------------------------

/// Where the addresses of allowed names go (hearthd: the VM's nftables allow set).
#[async_trait::async_trait]
pub trait ResolvedSink: Send + Sync + 'static {
    /// Let the VM reach `addrs` for `ttl_secs` (already clamped to 30..=86400).
    async fn allow(&self, addrs: Vec<std::net::Ipv4Addr>, ttl_secs: u32);
}

/// The shortest time resolved addresses stay reachable, so a guest that caches an answer for a
/// few seconds longer than its TTL (or connects a little late) is not cut off.
pub const MIN_ALLOW_TTL_SECS: u32 = 30;
/// The longest time resolved addresses stay reachable without a new lookup (one day).
pub const MAX_ALLOW_TTL_SECS: u32 = 86_400;

/// The TTL an allow gets for a record TTL: values with the top bit set count as 0 (RFC 2181
/// §8), then the result is clamped to [`MIN_ALLOW_TTL_SECS`]..=[`MAX_ALLOW_TTL_SECS`].
fn clamp_ttl(ttl: u32) -> u32 {
    let ttl = if ttl > 0x7FFF_FFFF { 0 } else { ttl };
    ttl.clamp(MIN_ALLOW_TTL_SECS, MAX_ALLOW_TTL_SECS)
}

// ---------------------------------------------------------------------------------------------
// Wire format (RFC 1035), sans I/O
// ---------------------------------------------------------------------------------------------

const HEADER_LEN: usize = 12;
/// The longest name in wire form, length bytes and the root label included (RFC 1035 §3.1).
const MAX_NAME_WIRE_LEN: usize = 255;
/// How many CNAMEs of an answer are followed from the queried name.
const MAX_CNAME_HOPS: usize = 16;
/// The UDP payload size asked of upstreams for a guest that speaks EDNS (the DNS flag day 2020
/// value, which avoids IP fragmentation).
const MAX_EDNS_UDP: u16 = 1232;
/// The size of a UDP message without EDNS.
const PLAIN_UDP: u16 = 512;

const FLAG_QR: u16 = 0x8000;
const OPCODE_MASK: u16 = 0x7800;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const FLAG_AD: u16 = 0x0020;
const FLAG_CD: u16 = 0x0010;
const RCODE_MASK: u16 = 0x000F;

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// The DO ("DNSSEC OK") bit of an OPT record's TTL field.
const EDNS_DO: u32 = 0x8000;

/// Why bytes are not a DNS message we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the message ends inside {what} at offset {at} ({len} bytes in all)")]
    Truncated {
        what: &'static str,
        at: usize,
        len: usize,
    },
    #[error(
        "the name at offset {at} has a label of type {kind:#04x}; only lengths and compression pointers are allowed"
    )]
    LabelType { at: usize, kind: u8 },
    #[error(
        "the name at offset {at} has a compression pointer to {target}, which is not before {limit}: pointers must point strictly backwards (a loop or a forward pointer)"
    )]
    Pointer {
        at: usize,
        target: usize,
        limit: usize,
    },
    #[error("the name at offset {at} is longer than {MAX_NAME_WIRE_LEN} bytes")]
    NameTooLong { at: usize },
    #[error("the message is a response (QR set), not a query")]
    NotAQuery,
    #[error("opcode {opcode} is not a standard query (0)")]
    Opcode { opcode: u16 },
    #[error("the header counts {count} questions; a query has exactly one")]
    QuestionCount { count: u16 },
    #[error("the query has more than one OPT record (RFC 6891 allows one)")]
    DuplicateOpt,
    #[error("the {what} record at offset {at} has {rdlen} bytes of data; {rule}")]
    Rdata {
        what: &'static str,
        at: usize,
        rdlen: u16,
        rule: &'static str,
    },
}

/// A response code this forwarder answers with itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
}

/// A query type, displayed by its mnemonic for the common ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QType(u16);

impl fmt::Display for QType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            1 => "A",
            2 => "NS",
            5 => "CNAME",
            6 => "SOA",
            12 => "PTR",
            15 => "MX",
            16 => "TXT",
            28 => "AAAA",
            33 => "SRV",
            64 => "SVCB",
            65 => "HTTPS",
            255 => "ANY",
            n => return write!(f, "TYPE{n}"),
        };
        f.write_str(name)
    }
}

/// A domain name in uncompressed wire form (length-prefixed labels, then the root's 0), exactly
/// as the message spelled it (case kept).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Name {
    wire: Vec<u8>,
}

impl Name {
    fn labels(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = self.wire.as_slice();
        std::iter::from_fn(move || {
            let (&len, tail) = rest.split_first()?;
            let len = usize::from(len);
            if len == 0 || tail.len() < len {
                return None;
            }
            let (label, tail) = tail.split_at(len);
            rest = tail;
            Some(label)
        })
    }

    /// DNS names compare case-insensitively (length bytes are below 64, never letters).
    fn same(&self, other: &Name) -> bool {
        self.wire.eq_ignore_ascii_case(&other.wire)
    }

    /// The name as a policy checks it (lowercase, dotted, no trailing dot), when every label
    /// holds only letters, digits, `-` and `_`: a label with a dot or a control byte in it has
    /// no unambiguous dotted spelling and is never allowed.
    fn to_dotted(&self) -> Option<String> {
        let mut out = String::with_capacity(self.wire.len());
        for label in self.labels() {
            if !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            {
                return None;
            }
            if !out.is_empty() {
                out.push('.');
            }
            out.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
        }
        Some(out)
    }
}

/// Presentation form for logs: bytes other than letters, digits, `-` and `_` are escaped
/// (`\.`, `\DDD`), so a hostile name cannot forge a log line.
impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for label in self.labels() {
            if !first {
                f.write_str(".")?;
            }
            first = false;
            for &b in label {
                match b {
                    b'.' | b'\\' => write!(f, "\\{}", char::from(b))?,
                    b if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' => {
                        write!(f, "{}", char::from(b))?
                    }
                    b => write!(f, "\\{b:03}")?,
                }
            }
        }
        if first {
            f.write_str(".")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    id: u16,
    flags: u16,
    qdcount: u16,
    ancount: u16,
    nscount: u16,
    arcount: u16,
}

impl Header {
    fn rcode(&self) -> u16 {
        self.flags & RCODE_MASK
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Question {
    name: Name,
    qtype: u16,
    qclass: u16,
}

/// What a query's OPT record asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Edns {
    udp_size: u16,
    dnssec_ok: bool,
}

/// A query from the guest, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Query {
    header: Header,
    question: Question,
    edns: Option<Edns>,
}

impl Query {
    /// The largest response the guest takes over UDP.
    fn udp_limit(&self) -> usize {
        usize::from(self.edns.map_or(PLAIN_UDP, |e| e.udp_size.max(PLAIN_UDP)))
    }
}

/// Why a guest's message gets no forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rejected {
    /// Not even a query header (or a response): dropped without a word.
    Drop(WireError),
    /// The header parsed: answered with `rcode`, echoing the id and opcode.
    Answer {
        header: Header,
        rcode: Rcode,
        why: WireError,
    },
}

/// An answer-section record, as far as the forwarder reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    name: Name,
    rtype: u16,
    class: u16,
    ttl: u32,
    data: RData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RData {
    A(Ipv4Addr),
    Cname(Name),
    Other,
}

/// A cursor over one message. Every read is bounds-checked.
struct Reader<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(msg: &'a [u8]) -> Self {
        Reader { msg, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let bytes = self
            .pos
            .checked_add(n)
            .and_then(|end| self.msg.get(self.pos..end))
            .ok_or(WireError::Truncated {
                what,
                at: self.pos,
                len: self.msg.len(),
            })?;
        self.pos += n;
        Ok(bytes)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn header(&mut self) -> Result<Header, WireError> {
        if self.msg.len() < HEADER_LEN {
            return Err(WireError::Truncated {
                what: "the header",
                at: self.msg.len(),
                len: self.msg.len(),
            });
        }
        Ok(Header {
            id: self.u16("the header")?,
            flags: self.u16("the header")?,
            qdcount: self.u16("the header")?,
            ancount: self.u16("the header")?,
            nscount: self.u16("the header")?,
            arcount: self.u16("the header")?,
        })
    }

    fn name(&mut self) -> Result<Name, WireError> {
        let (name, end) = read_name(self.msg, self.pos)?;
        self.pos = end;
        Ok(name)
    }

    fn question(&mut self) -> Result<Question, WireError> {
        Ok(Question {
            name: self.name()?,
            qtype: self.u16("a question")?,
            qclass: self.u16("a question")?,
        })
    }

    /// One resource record; the data of A and CNAME records is read, other data skipped.
    fn record(&mut self) -> Result<Record, WireError> {
        let name = self.name()?;
        let rtype = self.u16("a record")?;
        let class = self.u16("a record")?;
        let ttl = self.u32("a record")?;
        let rdlen = self.u16("a record")?;
        let at = self.pos;
        let rdata = self.take(usize::from(rdlen), "a record's data")?;
        let data = match (rtype, class) {
            (TYPE_A, CLASS_IN) => {
                let b: [u8; 4] = rdata.try_into().map_err(|_| WireError::Rdata {
                    what: "A",
                    at,
                    rdlen,
                    rule: "an A record holds exactly 4",
                })?;
                RData::A(Ipv4Addr::from(b))
            }
            (TYPE_CNAME, _) => {
                let (target, end) = read_name(self.msg, at)?;
                if end != self.pos {
                    return Err(WireError::Rdata {
                        what: "CNAME",
                        at,
                        rdlen,
                        rule: "a CNAME record holds exactly one name",
                    });
                }
                RData::Cname(target)
            }
            _ => RData::Other,
        };
        Ok(Record {
            name,
            rtype,
            class,
            ttl,
            data,
        })
    }
}

/// Reads the name at `start` of `msg`, following compression pointers. Returns the name and
/// the offset just past it in place (after its first pointer, if any).
///
/// A pointer must point before the start of the stretch of labels it ends (the name's start,
/// or the previous pointer's target), so targets strictly decrease and a loop cannot be
/// followed: it is refused at its first backward-failing jump.
fn read_name(msg: &[u8], start: usize) -> Result<(Name, usize), WireError> {
    let truncated = |at| WireError::Truncated {
        what: "a name",
        at,
        len: msg.len(),
    };
    let mut wire = Vec::with_capacity(32);
    let mut pos = start;
    let mut limit = start;
    let mut end = None;
    loop {
        let len = *msg.get(pos).ok_or_else(|| truncated(pos))?;
        match len & 0xC0 {
            0x00 if len == 0 => {
                wire.push(0);
                return Ok((Name { wire }, end.unwrap_or(pos + 1)));
            }
            0x00 => {
                let n = usize::from(len);
                let label = msg
                    .get(pos + 1..pos + 1 + n)
                    .ok_or_else(|| truncated(pos))?;
                // This label, its length byte and the root's 0 must still fit.
                if wire.len() + 1 + n + 1 > MAX_NAME_WIRE_LEN {
                    return Err(WireError::NameTooLong { at: start });
                }
                wire.push(len);
                wire.extend_from_slice(label);
                pos += 1 + n;
            }
            0xC0 => {
                let low = *msg.get(pos + 1).ok_or_else(|| truncated(pos))?;
                let target = (usize::from(len & 0x3F) << 8) | usize::from(low);
                if target >= limit {
                    return Err(WireError::Pointer {
                        at: pos,
                        target,
                        limit,
                    });
                }
                end.get_or_insert(pos + 2);
                limit = target;
                pos = target;
            }
            kind => return Err(WireError::LabelType { at: pos, kind }),
        }
    }
}

/// Parses a query from the guest. A message whose header parses is answered when refused
/// (FORMERR, NOTIMP); one without a header, or a response, is dropped.
fn parse_query(msg: &[u8]) -> Result<Query, Rejected> {
    let mut r = Reader::new(msg);
    let header = r.header().map_err(Rejected::Drop)?;
    if header.flags & FLAG_QR != 0 {
        return Err(Rejected::Drop(WireError::NotAQuery));
    }
    let formerr = |why| Rejected::Answer {
        header,
        rcode: Rcode::FormErr,
        why,
    };
    let opcode = (header.flags & OPCODE_MASK) >> 11;
    if opcode != 0 {
        return Err(Rejected::Answer {
            header,
            rcode: Rcode::NotImp,
            why: WireError::Opcode { opcode },
        });
    }
    if header.qdcount != 1 {
        return Err(formerr(WireError::QuestionCount {
            count: header.qdcount,
        }));
    }
    let question = r.question().map_err(formerr)?;
    for _ in 0..u32::from(header.ancount) + u32::from(header.nscount) {
        r.record().map_err(formerr)?;
    }
    let mut edns = None;
    for _ in 0..header.arcount {
        let rec = r.record().map_err(formerr)?;
        if rec.rtype == TYPE_OPT {
            if edns.is_some() {
                return Err(formerr(WireError::DuplicateOpt));
            }
            edns = Some(Edns {
                udp_size: rec.class,
                dnssec_ok: rec.ttl & EDNS_DO != 0,
            });
        }
    }
    Ok(Query {
        header,
        question,
        edns,
    })
}

fn push_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn push_question(out: &mut Vec<u8>, q: &Question) {
    out.extend_from_slice(&q.name.wire);
    push_u16(out, q.qtype);
    push_u16(out, q.qclass);
}

/// A message of a header (no records but the question) and, when given, the question.
fn message(id: u16, flags: u16, question: Option<&Question>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + question.map_or(0, |q| q.name.wire.len() + 4));
    push_u16(&mut out, id);
    push_u16(&mut out, flags);
    push_u16(&mut out, u16::from(question.is_some()));
    for _ in 0..3 {
        push_u16(&mut out, 0);
    }
    if let Some(q) = question {
        push_question(&mut out, q);
    }
    out
}

/// The forwarder's own answer to a query: its id, opcode, RD and CD, RA set, `rcode`, the
/// question echoed when given, no records (NXDOMAIN, NODATA, SERVFAIL, REFUSED, FORMERR).
fn reply(header: &Header, question: Option<&Question>, rcode: Rcode) -> Vec<u8> {
    let flags =
        FLAG_QR | (header.flags & (OPCODE_MASK | FLAG_RD | FLAG_CD)) | FLAG_RA | rcode as u16;
    message(header.id, flags, question)
}

/// The query sent upstream, rebuilt from what was parsed (never the guest's bytes): `id`, the
/// guest's RD, AD and CD bits, its question, and an OPT record when the guest sent one (its
/// payload size clamped to 512..=1232, its DO bit, no options).
fn upstream_query(id: u16, query: &Query) -> Vec<u8> {
    let flags = query.header.flags & (FLAG_RD | FLAG_AD | FLAG_CD);
    let mut out = message(id, flags, Some(&query.question));
    if let Some(edns) = query.edns {
        out[11] = 1; // ARCOUNT
        out.push(0); // the root name
        push_u16(&mut out, TYPE_OPT);
        push_u16(&mut out, edns.udp_size.clamp(PLAIN_UDP, MAX_EDNS_UDP));
        let ttl = if edns.dnssec_ok { EDNS_DO } else { 0 };
        out.extend_from_slice(&ttl.to_be_bytes());
        push_u16(&mut out, 0);
    }
    out
}

/// The header of `msg` when it is a response with `id` to exactly `question`.
fn matching_response(msg: &[u8], id: u16, question: &Question) -> Option<Header> {
    let mut r = Reader::new(msg);
    let header = r.header().ok()?;
    if header.flags & FLAG_QR == 0 || header.id != id || header.qdcount != 1 {
        return None;
    }
    let q = r.question().ok()?;
    (q.name.same(&question.name) && q.qtype == question.qtype && q.qclass == question.qclass)
        .then_some(header)
}

/// The records of a response's answer section.
fn answer_records(msg: &[u8]) -> Result<Vec<Record>, WireError> {
    let mut r = Reader::new(msg);
    let header = r.header()?;
    for _ in 0..header.qdcount {
        r.question()?;
    }
    (0..header.ancount).map(|_| r.record()).collect()
}

/// The IPv4 addresses an answer gives for `question`'s name: A records of the name, or of the
/// names its CNAMEs lead to within the answer (at most [`MAX_CNAME_HOPS`], loops cut), and the
/// TTL to allow them for (the longest of those A records', clamped). `None` without any.
fn resolved_addrs(question: &Question, answers: &[Record]) -> Option<(Vec<Ipv4Addr>, u32)> {
    let mut chain = vec![&question.name];
    for _ in 0..MAX_CNAME_HOPS {
        let current = chain[chain.len() - 1];
        let next = answers.iter().find_map(|r| match &r.data {
            RData::Cname(target) if r.class == CLASS_IN && r.name.same(current) => Some(target),
            _ => None,
        });
        match next {
            Some(target) if !chain.iter().any(|n| n.same(target)) => chain.push(target),
            _ => break,
        }
    }
    let mut addrs = Vec::new();
    let mut ttl = 0;
    for r in answers {
        if let RData::A(addr) = r.data
            && chain.iter().any(|n| n.same(&r.name))
        {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
            ttl = ttl.max(clamp_ttl(r.ttl));
        }
    }
    (!addrs.is_empty()).then_some((addrs, ttl))
}

// ---------------------------------------------------------------------------------------------
// Deciding about a query
// ---------------------------------------------------------------------------------------------

/// What the policy says about one question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Outside the allow-list: NXDOMAIN, not forwarded.
    Deny,
    /// AAAA for an allowed name: NOERROR without records.
    NoData,
    /// An allowed name in a class other than IN: REFUSED.
    Refuse,
    /// Forwarded; with `take_addrs`, the answer's IPv4 addresses go to the sink first.
    Forward { take_addrs: bool },
}

fn decide(policy: &DnsPolicy, q: &Question) -> Decision {
    if policy.allowed.is_none() {
        return Decision::Forward { take_addrs: false };
    }
    if !q.name.to_dotted().is_some_and(|n| policy.allows(&n)) {
        return Decision::Deny;
    }
    match (q.qclass, q.qtype) {
        (CLASS_IN, TYPE_A) => Decision::Forward { take_addrs: true },
        (CLASS_IN, TYPE_AAAA) => Decision::NoData,
        (CLASS_IN, _) => Decision::Forward { take_addrs: false },
        _ => Decision::Refuse,
    }
}

// ---------------------------------------------------------------------------------------------
// The forwarder
// ---------------------------------------------------------------------------------------------

/// The bounds a forwarder keeps (the guest is root and hostile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    /// Bigger UDP queries are dropped.
    max_udp_query: usize,
    /// Queries being forwarded at once; beyond, REFUSED.
    max_in_flight: usize,
    /// Open TCP connections; beyond, a new one is closed at once.
    max_tcp_conns: usize,
    /// A TCP connection with no complete message for this long is closed.
    tcp_idle: Duration,
    /// How long each upstream has to answer before the next is asked.
    upstream_timeout: Duration,
    /// How long the sink has to allow the addresses before the guest gets SERVFAIL.
    sink_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_udp_query: 512,
            max_in_flight: 64,
            max_tcp_conns: 8,
            tcp_idle: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(2),
            sink_timeout: Duration::from_secs(5),
        }
    }
}

/// How many denied queries a forwarder logs a second; more are counted, and the count logged.
const DENY_LOGS_PER_SEC: u32 = 20;

/// Rate-limits the log line of denied queries, so a guest cannot flood the host's log.
#[derive(Debug, Default)]
struct DenyLog {
    state: Mutex<DenyLogState>,
}

#[derive(Debug, Default)]
struct DenyLogState {
    window: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl DenyLog {
    fn note(&self, vm: &str, name: &Name, qtype: QType) {
        let now = Instant::now();
        let (log, suppressed) = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let mut suppressed = 0;
            if s.window
                .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
            {
                suppressed = std::mem::take(&mut s.suppressed);
                s.window = Some(now);
                s.logged = 0;
            }
            let log = s.logged < DENY_LOGS_PER_SEC;
            if log {
                s.logged += 1;
            } else {
                s.suppressed += 1;
            }
            (log, suppressed)
        };
        if suppressed > 0 {
            tracing::info!(
                vm,
                suppressed,
                "more DNS queries outside the allow-list were answered NXDOMAIN than were logged"
            );
        }
        if log {
            tracing::info!(
                vm,
                name = %name,
                qtype = %qtype,
                "DNS query outside the allow-list answered NXDOMAIN"
            );
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// What one forwarder's tasks share.
struct Shared {
    vm: String,
    upstreams: Vec<SocketAddr>,
    policy: watch::Receiver<DnsPolicy>,
    sink: Arc<dyn ResolvedSink>,
    in_flight: Arc<Semaphore>,
    limits: Limits,
    deny_log: DenyLog,
}

/// What to do with one message from the guest, decided without waiting.
enum Triage {
    Drop,
    Reply(Vec<u8>),
    Forward {
        query: Query,
        take_addrs: bool,
        permit: OwnedSemaphorePermit,
    },
}

impl Shared {
    fn triage(&self, msg: &[u8]) -> Triage {
        let query = match parse_query(msg) {
            Ok(q) => q,
            Err(Rejected::Drop(why)) => {
                tracing::debug!(vm = self.vm, %why, "dropped a DNS message");
                return Triage::Drop;
            }
            Err(Rejected::Answer { header, rcode, why }) => {
                tracing::debug!(vm = self.vm, %why, ?rcode, "refused a DNS query");
                return Triage::Reply(reply(&header, None, rcode));
            }
        };
        let decision = decide(&self.policy.borrow(), &query.question);
        let q = &query.question;
        match decision {
            Decision::Deny => {
                self.deny_log.note(&self.vm, &q.name, QType(q.qtype));
                Triage::Reply(reply(&query.header, Some(q), Rcode::NxDomain))
            }
            Decision::NoData => Triage::Reply(reply(&query.header, Some(q), Rcode::NoError)),
            Decision::Refuse => Triage::Reply(reply(&query.header, Some(q), Rcode::Refused)),
            Decision::Forward { take_addrs } => {
                match Arc::clone(&self.in_flight).try_acquire_owned() {
                    Ok(permit) => Triage::Forward {
                        query,
                        take_addrs,
                        permit,
                    },
                    Err(_) => {
                        tracing::debug!(vm = self.vm, "too many DNS queries in flight; REFUSED");
                        Triage::Reply(reply(&query.header, Some(q), Rcode::Refused))
                    }
                }
            }
        }
    }

    /// Forwards `query`, hands the addresses to the sink when asked, and returns what the guest
    /// gets.
    async fn forward(&self, query: &Query, take_addrs: bool, transport: Transport) -> Vec<u8> {
        let servfail = || reply(&query.header, Some(&query.question), Rcode::ServFail);
        let Some((header, mut answer)) = self.ask_upstreams(query, transport).await else {
            return servfail();
        };
        if take_addrs && header.rcode() == 0 && header.flags & FLAG_TC == 0 {
            match answer_records(&answer) {
                Ok(records) => {
                    if let Some((addrs, ttl)) = resolved_addrs(&query.question, &records) {
                        tracing::debug!(
                            vm = self.vm,
                            name = %query.question.name,
                            ?addrs,
                            ttl,
                            "allowing resolved addresses"
                        );
                        let allow = self.sink.allow(addrs, ttl);
                        if tokio::time::timeout(self.limits.sink_timeout, allow)
                            .await
                            .is_err()
                        {
                            tracing::warn!(
                                vm = self.vm,
                                name = %query.question.name,
                                "resolved addresses were not allowed in time; answering SERVFAIL"
                            );
                            return servfail();
                        }
                    }
                }
                Err(why) => {
                    tracing::warn!(
                        vm = self.vm,
                        name = %query.question.name,
                        %why,
                        "an upstream answer could not be read; answering SERVFAIL"
                    );
                    return servfail();
                }
            }
        }
        answer[..2].copy_from_slice(&query.header.id.to_be_bytes());
        if transport == Transport::Udp && answer.len() > query.udp_limit() {
            let flags = (header.flags & !RCODE_MASK) | FLAG_TC | header.rcode();
            return message(query.header.id, flags, Some(&query.question));
        }
        answer
    }

    /// Asks each upstream in turn (each within [`Limits::upstream_timeout`]); a TCP guest's
    /// truncated answer is asked again over TCP. SERVFAIL and REFUSED move on to the next
    /// server and are returned only when no server answers better. `None`: no answer at all.
    async fn ask_upstreams(
        &self,
        query: &Query,
        transport: Transport,
    ) -> Option<(Header, Vec<u8>)> {
        let mut fallback = None;
        for &server in &self.upstreams {
            let within = self.limits.upstream_timeout;
            let mut got = exchange(server, query, Transport::Udp, within).await;
            if transport == Transport::Tcp
                && let Ok((header, _)) = &got
                && header.flags & FLAG_TC != 0
            {
                got = exchange(server, query, Transport::Tcp, within).await;
            }
            match got {
                Ok((header, answer))
                    if header.rcode() == Rcode::ServFail as u16
                        || header.rcode() == Rcode::Refused as u16 =>
                {
                    fallback = Some((header, answer));
                }
                Ok(got) => return Some(got),
                Err(e) => {
                    tracing::debug!(vm = self.vm, %server, error = %e, "upstream DNS server did not answer");
                }
            }
        }
        fallback
    }
}

/// A fresh random query id. `RandomState` keys SipHash with a secret the process took from the
/// OS; hashing a counter with it gives ids the guest cannot predict (with a fresh source port
/// per query besides).
fn random_id() -> u16 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let b = h.finish().to_le_bytes();
    u16::from_le_bytes([b[0], b[1]])
}

/// One question to one server over a fresh socket with a fresh id, within `within`. Only an
/// answer from `server` (the socket is connected) with that id and question counts; others are
/// ignored while the time lasts.
async fn exchange(
    server: SocketAddr,
    query: &Query,
    transport: Transport,
    within: Duration,
) -> std::io::Result<(Header, Vec<u8>)> {
    let id = random_id();
    let wire = upstream_query(id, query);
    let attempt = async {
        match transport {
            Transport::Udp => {
                let local: SocketAddr = match server {
                    SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                    SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
                };
                let sock = UdpSocket::bind(local).await?;
                sock.connect(server).await?;
                sock.send(&wire).await?;
                let mut buf = vec![0u8; 65_535];
                loop {
                    let n = sock.recv(&mut buf).await?;
                    if let Some(header) = matching_response(&buf[..n], id, &query.question) {
                        buf.truncate(n);
                        return Ok((header, buf));
                    }
                }
            }
            Transport::Tcp => {
                let mut stream = TcpStream::connect(server).await?;
                write_framed(&mut stream, &wire).await?;
                let answer = read_framed(&mut stream).await?;
                let header = matching_response(&answer, id, &query.question).ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the TCP answer does not match the query's id and question",
                    )
                })?;
                Ok((header, answer))
            }
        }
    };
    tokio::time::timeout(within, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {within:?}"),
            ))
        })
}

/// Writes one length-prefixed DNS message (RFC 1035 §4.2.2).
async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a DNS message over TCP is at most 65535 bytes",
        )
    })?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    stream.write_all(&framed).await
}

/// Reads one length-prefixed DNS message (at most 65535 bytes by its framing).
async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

/// A running forwarder for one VM (UDP and TCP on one address). It stops when dropped: its
/// tasks, and every query and connection they serve, are aborted.
pub struct Forwarder {
    local_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forwarder")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Forwarder {
    /// Serves the VM `vm` (named in logs) on `udp` and `tcp` (the sockets `hearth-helper`
    /// made inside its slot), asking `upstreams` in order, under the policy `policy` holds at
    /// each query, handing addresses of allowed names to `sink`.
    pub fn serve_sockets(
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        vm: String,
        upstreams: Vec<std::net::SocketAddr>,
        policy: tokio::sync::watch::Receiver<DnsPolicy>,
        sink: std::sync::Arc<dyn ResolvedSink>,
    ) -> std::io::Result<Forwarder> {
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        let udp = UdpSocket::from_std(udp)?;
        let tcp = TcpListener::from_std(tcp)?;
        Ok(Self::serve(
            udp,
            tcp,
            vm,
            upstreams,
            policy,
            sink,
            Limits::default(),
        ))
    }

    /// Binds UDP and TCP on `bind` (port 0: one free port for both) and serves as
    /// [`Forwarder::serve_sockets`] does (tests, on loopback).
    #[cfg(test)]
    async fn start_with(
        bind: SocketAddr,
        vm: String,
        upstreams: Vec<SocketAddr>,
        policy: watch::Receiver<DnsPolicy>,
        sink: Arc<dyn ResolvedSink>,
        limits: Limits,
    ) -> std::io::Result<Forwarder> {
        let (udp, tcp) = bind_both(bind).await?;
        Ok(Self::serve(udp, tcp, vm, upstreams, policy, sink, limits))
    }

    fn serve(
        udp: UdpSocket,
        tcp: TcpListener,
        vm: String,
        upstreams: Vec<SocketAddr>,
        policy: watch::Receiver<DnsPolicy>,
        sink: Arc<dyn ResolvedSink>,
        limits: Limits,
    ) -> Forwarder {
        let local_addr = udp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let shared = Arc::new(Shared {
            vm,
            upstreams,
            policy,
            sink,
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            limits,
            deny_log: DenyLog::default(),
        });
        let tasks = vec![
            tokio::spawn(serve_udp(Arc::clone(&shared), udp)),
            tokio::spawn(serve_tcp(shared, tcp)),
        ];
        Forwarder { local_addr, tasks }
    }

    /// The address it serves on, UDP and TCP.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }
}

/// UDP and TCP on one address; for port 0, a port free for both (a few tries).
#[cfg(test)]
async fn bind_both(bind: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut tries = if bind.port() == 0 { 8 } else { 1 };
    loop {
        let udp = UdpSocket::bind(bind).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if tries > 1 && e.kind() == std::io::ErrorKind::AddrInUse => tries -= 1,
            Err(e) => return Err(e),
        }
    }
}

async fn serve_udp(shared: Arc<Shared>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    // One more byte than a query may have, so a bigger one is seen (and dropped).
    let mut buf = vec![0u8; shared.limits.max_udp_query + 1];
    // Dropping the set (when this task is aborted) aborts the queries in flight.
    let mut queries = JoinSet::new();
    loop {
        let received = tokio::select! {
            r = socket.recv_from(&mut buf) => r,
            Some(_) = queries.join_next(), if !queries.is_empty() => continue,
        };
        let (n, peer) = match received {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from earlier replies surface here; the socket is still good.
                tracing::debug!(vm = shared.vm, error = %e, "DNS UDP receive failed");
                continue;
            }
        };
        if n > shared.limits.max_udp_query {
            tracing::debug!(vm = shared.vm, "dropped a DNS UDP query over 512 bytes");
            continue;
        }
        match shared.triage(&buf[..n]) {
            Triage::Drop => {}
            Triage::Reply(answer) => {
                let _ = socket.send_to(&answer, peer).await;
            }
            Triage::Forward {
                query,
                take_addrs,
                permit,
            } => {
                let shared = Arc::clone(&shared);
                let socket = Arc::clone(&socket);
                queries.spawn(async move {
                    let answer = shared.forward(&query, take_addrs, Transport::Udp).await;
                    let _ = socket.send_to(&answer, peer).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn serve_tcp(shared: Arc<Shared>, listener: TcpListener) {
    let conns = Arc::new(Semaphore::new(shared.limits.max_tcp_conns));
    // Dropping the set (when this task is aborted) closes every connection.
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(vm = shared.vm, error = %e, "DNS TCP accept failed");
                // Out of descriptors, say: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&conns).try_acquire_owned() else {
            tracing::debug!(
                vm = shared.vm,
                "too many DNS TCP connections; closed a new one"
            );
            continue;
        };
        tasks.spawn(serve_tcp_conn(Arc::clone(&shared), stream, permit));
    }
}

/// Serves one connection's queries in turn until it closes, errs or stays idle.
async fn serve_tcp_conn(shared: Arc<Shared>, mut stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let idle = shared.limits.tcp_idle;
    loop {
        let Ok(Ok(msg)) = tokio::time::timeout(idle, read_framed(&mut stream)).await else {
            return;
        };
        let answer = match shared.triage(&msg) {
            Triage::Drop => return,
            Triage::Reply(answer) => answer,
            Triage::Forward {
                query,
                take_addrs,
                permit,
            } => {
                let answer = shared.forward(&query, take_addrs, Transport::Tcp).await;
                drop(permit);
                answer
            }
        };
        if !matches!(
            tokio::time::timeout(idle, write_framed(&mut stream, &answer)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// The host's resolvers from /etc/resolv.conf text (`nameserver` lines, IPv4 only, port 53).
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<std::net::SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        if let Some(Ok(addr)) = words.next().map(str::parse::<Ipv4Addr>) {
            let addr = SocketAddr::from((addr, 53));
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE_TXT: u16 = 16;

    // -----------------------------------------------------------------------------------------
    // Hand-built messages
    // -----------------------------------------------------------------------------------------

    /// Writes the labels of `dotted` without the root's 0 (so a pointer may follow).
    fn labels(out: &mut Vec<u8>, dotted: &str) {
        for label in dotted.split('.').filter(|l| !l.is_empty()) {
            out.push(u8::try_from(label.len()).unwrap());
            out.extend_from_slice(label.as_bytes());
        }
    }

    fn full_name(out: &mut Vec<u8>, dotted: &str) {
        labels(out, dotted);
        out.push(0);
    }

    fn ptr(out: &mut Vec<u8>, offset: usize) {
        let offset = u16::try_from(offset).unwrap();
        out.extend_from_slice(&(0xC000 | offset).to_be_bytes());
    }

    fn name(dotted: &str) -> Name {
        let mut wire = Vec::new();
        full_name(&mut wire, dotted);
        Name { wire }
    }

    fn question(dotted: &str, qtype: u16) -> Question {
        Question {
            name: name(dotted),
            qtype,
            qclass: CLASS_IN,
        }
    }

    fn header(out: &mut Vec<u8>, id: u16, flags: u16, counts: [u16; 4]) {
        push_u16(out, id);
        push_u16(out, flags);
        for c in counts {
            push_u16(out, c);
        }
    }

    /// A query as a stub resolver sends it: RD set, one question, no EDNS.
    fn query_msg(id: u16, dotted: &str, qtype: u16) -> Vec<u8> {
        let mut out = Vec::new();
        header(&mut out, id, FLAG_RD, [1, 0, 0, 0]);
        full_name(&mut out, dotted);
        push_u16(&mut out, qtype);
        push_u16(&mut out, CLASS_IN);
        out
    }

    /// The same with an OPT record advertising `size` and, when `dnssec_ok`, the DO bit.
    fn query_msg_edns(id: u16, dotted: &str, qtype: u16, size: u16, dnssec_ok: bool) -> Vec<u8> {
        let mut out = query_msg(id, dotted, qtype);
        out[11] = 1;
        out.push(0);
        push_u16(&mut out, TYPE_OPT);
        push_u16(&mut out, size);
        out.extend_from_slice(&(if dnssec_ok { EDNS_DO } else { 0 }).to_be_bytes());
        // One option (a cookie) the forwarder must not pass on.
        push_u16(&mut out, 12);
        push_u16(&mut out, 10);
        push_u16(&mut out, 8);
        out.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        out
    }

    /// One record: `owner` writes the owner name, `rdata` the data; RDLENGTH is filled in.
    /// Returns the offset of the data.
    fn rr(
        out: &mut Vec<u8>,
        owner: impl FnOnce(&mut Vec<u8>),
        rtype: u16,
        ttl: u32,
        rdata: impl FnOnce(&mut Vec<u8>),
    ) -> usize {
        owner(out);
        push_u16(out, rtype);
        push_u16(out, CLASS_IN);
        out.extend_from_slice(&ttl.to_be_bytes());
        let len_at = out.len();
        push_u16(out, 0);
        let start = out.len();
        rdata(out);
        let len = u16::try_from(out.len() - start).unwrap();
        out[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
        start
    }

    /// The start of a response to `query` (its id and question echoed) with `ancount` answers.
    fn response_start(query: &[u8], rcode: Rcode, ancount: u16) -> Vec<u8> {
        let q = parse_query(query).unwrap();
        let mut out = Vec::new();
        let flags = FLAG_QR | FLAG_RD | FLAG_RA | rcode as u16;
        header(&mut out, q.header.id, flags, [1, ancount, 0, 0]);
        push_question(&mut out, &q.question);
        out
    }

    /// The answer to `query` (for the name at offset 12): a CNAME to edge.cdn.example.net, a
    /// compressed CNAME from there to e1.cdn.example.net, two A records of e1 (TTL 300), and an
    /// A record of an unrelated name that must not be taken.
    fn chain_answer(query: &[u8]) -> Vec<u8> {
        let mut out = response_start(query, Rcode::NoError, 5);
        let edge = rr(
            &mut out,
            |o| ptr(o, 12),
            TYPE_CNAME,
            300,
            |o| full_name(o, "edge.cdn.example.net"),
        );
        let e1 = rr(
            &mut out,
            |o| ptr(o, edge),
            TYPE_CNAME,
            300,
            |o| {
                labels(o, "e1");
                ptr(o, edge + 5); // "cdn.example.net" inside edge's name
            },
        );
        for last in [10, 11] {
            rr(
                &mut out,
                |o| ptr(o, e1),
                TYPE_A,
                300,
                |o| o.extend_from_slice(&[192, 0, 2, last]),
            );
        }
        rr(
            &mut out,
            |o| full_name(o, "other.example.org"),
            TYPE_A,
            300,
            |o| o.extend_from_slice(&[198, 51, 100, 7]),
        );
        out
    }

    /// One A record of the queried name.
    fn a_answer(query: &[u8], addr: [u8; 4], ttl: u32) -> Vec<u8> {
        let mut out = response_start(query, Rcode::NoError, 1);
        rr(
            &mut out,
            |o| ptr(o, 12),
            TYPE_A,
            ttl,
            |o| o.extend_from_slice(&addr),
        );
        out
    }

    fn header_of(msg: &[u8]) -> Header {
        Reader::new(msg).header().unwrap()
    }

    fn question_of(msg: &[u8]) -> Option<Question> {
        let mut r = Reader::new(msg);
        let h = r.header().unwrap();
        (h.qdcount == 1).then(|| r.question().unwrap())
    }

    // -----------------------------------------------------------------------------------------
    // Names and compression
    // -----------------------------------------------------------------------------------------

    #[test]
    fn names_are_read_through_backward_pointers() {
        let mut msg = vec![0; 12];
        full_name(&mut msg, "www.Example.com"); // at 12
        let second = msg.len();
        labels(&mut msg, "api");
        ptr(&mut msg, 16); // "Example.com"
        let third = msg.len();
        labels(&mut msg, "v1");
        ptr(&mut msg, second); // "api" + pointer: two hops
        msg.push(0xAA); // whatever follows

        let (n, end) = read_name(&msg, 12).unwrap();
        assert_eq!(n.to_dotted().as_deref(), Some("www.example.com"));
        assert_eq!(end, second);
        let (n, end) = read_name(&msg, second).unwrap();
        assert_eq!(n.to_dotted().as_deref(), Some("api.example.com"));
        assert_eq!(end, third);
        let (n, end) = read_name(&msg, third).unwrap();
        assert_eq!(n.to_dotted().as_deref(), Some("v1.api.example.com"));
        assert_eq!(
            end,
            msg.len() - 1,
            "the end is just after the first pointer"
        );
        assert_eq!(n, name("v1.api.Example.com"), "the case is kept");
        assert!(n.same(&name("V1.API.EXAMPLE.COM")));
        assert!(!n.same(&name("v1.api.example.org")));
    }

    #[test]
    fn pointer_loops_and_forward_pointers_are_refused() {
        // A pointer to itself.
        let mut msg = vec![0; 12];
        ptr(&mut msg, 12);
        assert_eq!(
            read_name(&msg, 12),
            Err(WireError::Pointer {
                at: 12,
                target: 12,
                limit: 12
            })
        );
        // A label, then a pointer back to the start of its own name.
        let mut msg = vec![0; 12];
        labels(&mut msg, "a");
        ptr(&mut msg, 12);
        assert!(matches!(
            read_name(&msg, 12),
            Err(WireError::Pointer { target: 12, .. })
        ));
        // Two pointers to each other: from either end, the second jump is refused.
        let mut msg = vec![0; 12];
        labels(&mut msg, "x");
        ptr(&mut msg, 16); // 12: "x" -> 16
        labels(&mut msg, "y");
        ptr(&mut msg, 12); // 16: "y" -> 12
        assert!(matches!(
            read_name(&msg, 12),
            Err(WireError::Pointer { .. })
        ));
        assert!(matches!(
            read_name(&msg, 16),
            Err(WireError::Pointer {
                target: 16,
                limit: 12,
                ..
            })
        ));
        // A forward pointer.
        let mut msg = vec![0; 12];
        ptr(&mut msg, 20);
        msg.resize(20, 0);
        full_name(&mut msg, "example.com");
        assert!(matches!(
            read_name(&msg, 12),
            Err(WireError::Pointer { .. })
        ));
        // A long but legal chain of backward pointers ends.
        let mut msg = vec![0; 12];
        full_name(&mut msg, "com");
        let mut prev = 12;
        for _ in 0..100 {
            let at = msg.len();
            labels(&mut msg, "a");
            ptr(&mut msg, prev);
            prev = at;
        }
        let (n, _) = read_name(&msg, prev).unwrap();
        assert_eq!(n.labels().count(), 101);
    }

    #[test]
    fn bad_labels_and_truncated_names_are_refused() {
        let mut msg = vec![0; 12];
        msg.push(0x40);
        assert_eq!(
            read_name(&msg, 12),
            Err(WireError::LabelType { at: 12, kind: 0x40 })
        );
        let mut msg = vec![0; 12];
        msg.push(0x80);
        assert!(matches!(
            read_name(&msg, 12),
            Err(WireError::LabelType { .. })
        ));
        let mut msg = vec![0; 12];
        msg.push(0xC0); // half a pointer
        assert!(matches!(
            read_name(&msg, 12),
            Err(WireError::Truncated { .. })
        ));
        let mut msg = vec![0; 12];
        msg.extend_from_slice(&[5, b'a', b'b']); // label runs past the end
        assert!(matches!(
            read_name(&msg, 12),
            Err(WireError::Truncated { .. })
        ));
        let mut msg = vec![0; 12];
        labels(&mut msg, "example"); // no root label
        assert!(matches!(
            read_name(&msg, 12),
            Err(WireError::Truncated { .. })
        ));
        assert!(matches!(
            read_name(&msg, 100),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn names_are_at_most_255_bytes() {
        // 127 one-byte labels: 254 bytes + the root = 255.
        let mut msg = Vec::new();
        for _ in 0..127 {
            msg.extend_from_slice(&[1, b'a']);
        }
        msg.push(0);
        assert_eq!(read_name(&msg, 0).unwrap().0.wire.len(), 255);
        let mut msg = vec![1, b'b'];
        for _ in 0..127 {
            msg.extend_from_slice(&[1, b'a']);
        }
        msg.push(0);
        assert_eq!(read_name(&msg, 0), Err(WireError::NameTooLong { at: 0 }));
    }

    #[test]
    fn names_display_escaped_and_only_plain_names_are_dotted() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&[5, b'a', b'.', b'b', b'\n', b'\\']);
        full_name(&mut wire, "Example.com");
        let n = Name { wire };
        assert_eq!(n.to_string(), "a\\.b\\010\\\\.Example.com");
        assert_eq!(n.to_dotted(), None);
        assert_eq!(Name { wire: vec![0] }.to_string(), ".");
        assert_eq!(
            name("_dmarc.Example.COM").to_dotted().as_deref(),
            Some("_dmarc.example.com")
        );
    }

    // -----------------------------------------------------------------------------------------
    // Queries
    // -----------------------------------------------------------------------------------------

    #[test]
    fn queries_parse() {
        let q = parse_query(&query_msg(0x1234, "Api.Example.com", TYPE_A)).unwrap();
        assert_eq!(q.header.id, 0x1234);
        assert_eq!(q.question, question("Api.Example.com", TYPE_A));
        assert_eq!(q.edns, None);
        assert_eq!(q.udp_limit(), 512);

        let q = parse_query(&query_msg_edns(7, "example.com", TYPE_TXT, 4096, true)).unwrap();
        assert_eq!(
            q.edns,
            Some(Edns {
                udp_size: 4096,
                dnssec_ok: true
            })
        );
        assert_eq!(q.udp_limit(), 4096);
        let q = parse_query(&query_msg_edns(7, "example.com", TYPE_A, 100, false)).unwrap();
        assert_eq!(q.udp_limit(), 512, "an advertised size below 512 means 512");
    }

    #[test]
    fn bad_queries_are_dropped_or_answered_formerr() {
        // No header: dropped.
        assert!(matches!(
            parse_query(&[0x12, 0x34, 0, 0, 0]),
            Err(Rejected::Drop(WireError::Truncated { .. }))
        ));
        assert!(matches!(parse_query(&[]), Err(Rejected::Drop(_))));
        // A response: dropped (answering it could start a loop).
        let mut msg = query_msg(1, "example.com", TYPE_A);
        msg[2] |= 0x80;
        assert_eq!(parse_query(&msg), Err(Rejected::Drop(WireError::NotAQuery)));

        let formerr = |msg: &[u8]| match parse_query(msg) {
            Err(Rejected::Answer { header, rcode, why }) => {
                assert_eq!(rcode, Rcode::FormErr, "{why}");
                header.id
            }
            other => panic!("not FORMERR: {other:?}"),
        };
        // A header alone, with a question it does not hold.
        let mut msg = Vec::new();
        header(&mut msg, 0xBEEF, FLAG_RD, [1, 0, 0, 0]);
        assert_eq!(formerr(&msg), 0xBEEF);
        // No question, or two.
        let mut msg = query_msg(2, "example.com", TYPE_A);
        msg[5] = 0;
        assert_eq!(formerr(&msg), 2);
        msg[5] = 2;
        assert_eq!(formerr(&msg), 2);
        // A pointer loop in the question.
        let mut msg = Vec::new();
        header(&mut msg, 3, 0, [1, 0, 0, 0]);
        ptr(&mut msg, 12);
        push_u16(&mut msg, TYPE_A);
        push_u16(&mut msg, CLASS_IN);
        assert_eq!(formerr(&msg), 3);
        // Additional records counted but missing, and two OPT records.
        let mut msg = query_msg(4, "example.com", TYPE_A);
        msg[11] = 1;
        assert_eq!(formerr(&msg), 4);
        let mut msg = query_msg_edns(5, "example.com", TYPE_A, 1232, false);
        let opt = msg[msg.len() - 23..].to_vec();
        msg.extend_from_slice(&opt);
        msg[11] = 2;
        assert!(matches!(
            parse_query(&msg),
            Err(Rejected::Answer {
                why: WireError::DuplicateOpt,
                ..
            })
        ));
        // Another opcode (NOTIFY): NOTIMP.
        let mut msg = query_msg(6, "example.com", TYPE_A);
        msg[2] |= 4 << 3;
        assert!(matches!(
            parse_query(&msg),
            Err(Rejected::Answer {
                rcode: Rcode::NotImp,
                why: WireError::Opcode { opcode: 4 },
                ..
            })
        ));
    }

    #[test]
    fn the_upstream_query_is_rebuilt_not_copied() {
        // The guest's cookie option and an answer record smuggled into the query stay behind.
        let mut msg = query_msg(9, "API.example.com", TYPE_A);
        msg[7] = 1; // ANCOUNT
        rr(
            &mut msg,
            |o| ptr(o, 12),
            TYPE_A,
            60,
            |o| o.extend_from_slice(&[203, 0, 113, 1]),
        );
        let edns = query_msg_edns(9, "API.example.com", TYPE_A, 65_000, true);
        msg[11] = 1; // ARCOUNT
        msg.extend_from_slice(&edns[query_msg(9, "API.example.com", TYPE_A).len()..]);
        msg[2] |= 0x04 | 0x02; // AA and TC: not ours to pass on
        msg[3] |= 0x30; // AD, CD
        let q = parse_query(&msg).unwrap();
        let up = upstream_query(0x4242, &q);
        let mut expected = Vec::new();
        header(
            &mut expected,
            0x4242,
            FLAG_RD | FLAG_AD | FLAG_CD,
            [1, 0, 0, 1],
        );
        full_name(&mut expected, "API.example.com");
        push_u16(&mut expected, TYPE_A);
        push_u16(&mut expected, CLASS_IN);
        expected.push(0);
        push_u16(&mut expected, TYPE_OPT);
        push_u16(&mut expected, MAX_EDNS_UDP);
        expected.extend_from_slice(&EDNS_DO.to_be_bytes());
        push_u16(&mut expected, 0);
        assert_eq!(up, expected);

        let q = parse_query(&query_msg(9, "example.com", TYPE_A)).unwrap();
        assert_eq!(
            upstream_query(1, &q)[11],
            0,
            "no OPT when the guest sent none"
        );
    }

    // -----------------------------------------------------------------------------------------
    // Answers
    // -----------------------------------------------------------------------------------------

    #[test]
    fn answers_give_the_addresses_at_the_end_of_the_cname_chain() {
        let query = query_msg(1, "api.example.com", TYPE_A);
        let answer = chain_answer(&query);
        let records = answer_records(&answer).unwrap();
        assert_eq!(records.len(), 5);
        assert_eq!(records[0].data, RData::Cname(name("edge.cdn.example.net")));
        assert_eq!(records[1].data, RData::Cname(name("e1.cdn.example.net")));
        assert_eq!(records[2].name, name("e1.cdn.example.net"));
        let q = question("API.EXAMPLE.COM", TYPE_A);
        assert_eq!(
            resolved_addrs(&q, &records),
            Some((
                vec![Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11)],
                300
            ))
        );
        // Another name's answer gives nothing.
        assert_eq!(
            resolved_addrs(&question("x.example.com", TYPE_A), &records),
            None
        );
    }

    #[test]
    fn answer_ttls_are_the_longest_clamped_and_cname_loops_end() {
        let query = query_msg(1, "a.example.com", TYPE_A);
        let mut msg = response_start(&query, Rcode::NoError, 6);
        let b = rr(
            &mut msg,
            |o| ptr(o, 12),
            TYPE_CNAME,
            60,
            |o| full_name(o, "b.example.com"),
        );
        rr(&mut msg, |o| ptr(o, b), TYPE_CNAME, 60, |o| ptr(o, 12)); // b -> a: a loop
        rr(
            &mut msg,
            |o| ptr(o, 12),
            TYPE_A,
            5,
            |o| o.extend_from_slice(&[192, 0, 2, 1]),
        );
        rr(
            &mut msg,
            |o| ptr(o, b),
            TYPE_A,
            600,
            |o| o.extend_from_slice(&[192, 0, 2, 2]),
        );
        rr(
            &mut msg,
            |o| ptr(o, b),
            TYPE_A,
            100,
            |o| o.extend_from_slice(&[192, 0, 2, 2]),
        );
        rr(
            &mut msg,
            |o| ptr(o, b),
            TYPE_AAAA,
            100,
            |o| o.extend_from_slice(&[0; 16]),
        );
        let records = answer_records(&msg).unwrap();
        assert_eq!(
            resolved_addrs(&question("a.example.com", TYPE_A), &records),
            Some((
                vec![Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)],
                600
            ))
        );
    }

    #[test]
    fn malformed_answer_records_are_refused() {
        let query = query_msg(1, "a.example.com", TYPE_A);
        let mut msg = response_start(&query, Rcode::NoError, 1);
        rr(
            &mut msg,
            |o| ptr(o, 12),
            TYPE_A,
            5,
            |o| o.extend_from_slice(&[1, 2, 3]),
        );
        assert!(matches!(
            answer_records(&msg),
            Err(WireError::Rdata {
                what: "A",
                rdlen: 3,
                ..
            })
        ));
        let mut msg = response_start(&query, Rcode::NoError, 1);
        rr(
            &mut msg,
            |o| ptr(o, 12),
            TYPE_CNAME,
            5,
            |o| {
                full_name(o, "b.example.com");
                o.push(0);
            },
        );
        assert!(matches!(
            answer_records(&msg),
            Err(WireError::Rdata { what: "CNAME", .. })
        ));
        let mut msg = response_start(&query, Rcode::NoError, 2);
        rr(
            &mut msg,
            |o| ptr(o, 12),
            TYPE_A,
            5,
            |o| o.extend_from_slice(&[1, 2, 3, 4]),
        );
        assert!(matches!(
            answer_records(&msg),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn responses_count_only_with_our_id_and_question() {
        let query = query_msg(0x5555, "api.example.com", TYPE_A);
        let answer = a_answer(&query, [192, 0, 2, 1], 60);
        let q = question("API.example.com", TYPE_A);
        assert!(matching_response(&answer, 0x5555, &q).is_some());
        assert!(matching_response(&answer, 0x5556, &q).is_none());
        assert!(matching_response(&answer, 0x5555, &question("api.example.org", TYPE_A)).is_none());
        assert!(
            matching_response(&answer, 0x5555, &question("api.example.com", TYPE_AAAA)).is_none()
        );
        assert!(
            matching_response(&query, 0x5555, &q).is_none(),
            "a query is no answer"
        );
        assert!(matching_response(&answer[..11], 0x5555, &q).is_none());
    }

    #[test]
    fn ttls_are_clamped() {
        for (ttl, allowed) in [
            (0, 30),
            (29, 30),
            (30, 30),
            (300, 300),
            (86_400, 86_400),
            (86_401, 86_400),
            (0x7FFF_FFFF, 86_400),
            (0x8000_0000, 30),
            (u32::MAX, 30),
        ] {
            assert_eq!(clamp_ttl(ttl), allowed, "ttl {ttl}");
        }
    }

    #[test]
    fn own_replies_echo_id_flags_and_question() {
        let mut msg = query_msg(0xABCD, "Evil.Example.net", TYPE_AAAA);
        msg[3] |= 0x10; // CD
        let q = parse_query(&msg).unwrap();
        for (rcode, value) in [
            (Rcode::NxDomain, 3),
            (Rcode::NoError, 0),
            (Rcode::ServFail, 2),
        ] {
            let r = reply(&q.header, Some(&q.question), rcode);
            let h = header_of(&r);
            assert_eq!(h.id, 0xABCD);
            assert_eq!(h.flags, FLAG_QR | FLAG_RD | FLAG_RA | FLAG_CD | value);
            assert_eq!((h.qdcount, h.ancount, h.nscount, h.arcount), (1, 0, 0, 0));
            assert_eq!(
                question_of(&r),
                Some(q.question.clone()),
                "the case is kept too"
            );
            assert_eq!(r.len(), msg.len());
        }
        // FORMERR has no question to echo; the opcode is kept.
        let mut h = q.header;
        h.flags |= 2 << 11;
        let r = reply(&h, None, Rcode::FormErr);
        assert_eq!(
            header_of(&r).flags,
            FLAG_QR | (2 << 11) | FLAG_RD | FLAG_RA | FLAG_CD | 1
        );
        assert_eq!(r.len(), HEADER_LEN);
        assert_eq!(header_of(&r).qdcount, 0);
    }

    // -----------------------------------------------------------------------------------------
    // Patterns and policy
    // -----------------------------------------------------------------------------------------

    #[test]
    fn domain_patterns_validate() {
        let label63 = "a".repeat(63);
        let long = format!("{label63}.{label63}.{label63}.{}.com", "b".repeat(57));
        assert_eq!(long.len(), 253);
        for (text, shown) in [
            ("api.example.com", "api.example.com"),
            ("API.Example.COM.", "api.example.com"),
            ("*.example.com", "*.example.com"),
            ("*.Example.com.", "*.example.com"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("a-b.c0.io", "a-b.c0.io"),
            ("1.2.3.4", "1.2.3.4"),
            (&format!("{label63}.com"), &format!("{label63}.com")),
            (&long, &long),
        ] {
            let p: DomainPattern = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(p.to_string(), shown);
        }
        for (text, reason) in [
            ("", "it is empty"),
            (".", "it is empty"),
            ("com", "it has only one label"),
            ("com.", "it has only one label"),
            ("*.com", "*.com would allow a whole top-level domain"),
            ("*", "'*' may only be the whole first label"),
            ("*.*.example.com", "'*' may only be the whole first label"),
            ("a.*.example.com", "'*' may only be the whole first label"),
            ("api*.example.com", "'*' may only be the whole first label"),
            ("a..example.com", "it has an empty label"),
            (".example.com", "it has an empty label"),
            ("example.com..", "it has an empty label"),
            ("-a.example.com", "label \"-a\" starts or ends with '-'"),
            ("a-.example.com", "label \"a-\" starts or ends with '-'"),
            ("a_b.example.com", "'_' is not allowed"),
            ("ex ample.com", "' ' is not allowed"),
            (
                "bücher.de",
                "'ü' is not allowed (write international names in their xn-- form)",
            ),
            (&format!("{label63}a.com"), "is 64 characters long"),
            (&format!("a{long}"), "it is 254 characters long"),
        ] {
            let e = text.parse::<DomainPattern>().unwrap_err();
            assert_eq!(e.value, text);
            assert!(e.reason.contains(reason), "{text:?}: {e}");
            let message = e.to_string();
            assert!(
                message.starts_with(&format!("invalid allowed domain {text:?}: ")),
                "{message}"
            );
            assert!(message.ends_with(PATTERN_RULE), "{message}");
        }
    }

    #[test]
    fn domain_patterns_are_strings_in_serde() {
        let p: DomainPattern = "*.Example.com".parse().unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), r#""*.example.com""#);
        let back: DomainPattern = serde_json::from_str(r#""*.example.com""#).unwrap();
        assert_eq!(back, p);
        let e = serde_json::from_str::<DomainPattern>(r#""*.com""#).unwrap_err();
        assert!(
            e.to_string().contains("invalid allowed domain \"*.com\""),
            "{e}"
        );
        let policy = DnsPolicy {
            allowed: Some(vec![p, "api.example.org".parse().unwrap()]),
        };
        let json = serde_json::to_string(&policy).unwrap();
        assert_eq!(json, r#"{"allowed":["*.example.com","api.example.org"]}"#);
        assert_eq!(serde_json::from_str::<DnsPolicy>(&json).unwrap(), policy);
    }

    fn policy(patterns: &[&str]) -> DnsPolicy {
        DnsPolicy {
            allowed: Some(patterns.iter().map(|p| p.parse().unwrap()).collect()),
        }
    }

    #[test]
    fn policies_match_names() {
        let p = policy(&["*.example.com", "api.example.org"]);
        for (name, allowed) in [
            ("example.com", false),
            ("example.com.", false),
            ("a.example.com", true),
            ("a.b.example.com", true),
            ("A.B.EXAMPLE.COM.", true),
            ("_dmarc.example.com", true),
            ("xexample.com", false),
            ("example.com.evil.net", false),
            ("a.example.com.evil.net", false),
            ("api.example.org", true),
            ("API.Example.Org.", true),
            ("x.api.example.org", false),
            ("example.org", false),
            ("a..example.com", false),
            ("a b.example.com", false),
            (".example.com", false),
            ("a.example.com..", false),
            ("", false),
            (".", false),
        ] {
            assert_eq!(p.allows(name), allowed, "{name:?}");
        }
        assert!(DnsPolicy::default().allows("anything.at.all"));
        assert!(DnsPolicy { allowed: None }.allows("a..b"));
        assert!(
            !policy(&[]).allows("example.com"),
            "an empty list allows nothing"
        );
    }

    #[test]
    fn decisions_follow_the_policy_and_the_type() {
        let p = policy(&["api.example.com"]);
        let q = |n: &str, t: u16| question(n, t);
        assert_eq!(
            decide(&p, &q("API.example.com.", TYPE_A)),
            Decision::Forward { take_addrs: true }
        );
        assert_eq!(
            decide(&p, &q("api.example.com", TYPE_AAAA)),
            Decision::NoData
        );
        assert_eq!(
            decide(&p, &q("api.example.com", TYPE_TXT)),
            Decision::Forward { take_addrs: false }
        );
        assert_eq!(
            decide(&p, &q("api.example.com", 255)),
            Decision::Forward { take_addrs: false }
        );
        assert_eq!(decide(&p, &q("evil.example.net", TYPE_A)), Decision::Deny);
        assert_eq!(
            decide(&p, &q("evil.example.net", TYPE_AAAA)),
            Decision::Deny
        );
        let mut chaos = q("api.example.com", TYPE_TXT);
        chaos.qclass = 3;
        assert_eq!(decide(&p, &chaos), Decision::Refuse);
        // "api.example" + "com" as one label with a dot in it is not api.example.com.
        let mut wire = vec![11];
        wire.extend_from_slice(b"api.example");
        full_name(&mut wire, "com");
        let sneaky = Question {
            name: Name { wire },
            qtype: TYPE_A,
            qclass: CLASS_IN,
        };
        assert_eq!(decide(&p, &sneaky), Decision::Deny);
        // No list: everything is forwarded, no addresses taken.
        let open = DnsPolicy::default();
        for t in [TYPE_A, TYPE_AAAA, TYPE_TXT] {
            assert_eq!(
                decide(&open, &q("x.y", t)),
                Decision::Forward { take_addrs: false }
            );
        }
        assert_eq!(
            decide(&open, &sneaky),
            Decision::Forward { take_addrs: false }
        );
    }

    #[test]
    fn resolv_conf_gives_ipv4_nameservers_on_port_53() {
        let text = "\
# generated
search example.com
nameserver 127.0.0.53
nameserver 10.0.0.1 # office
nameserver ::1
nameserver fe80::1%eth0
  nameserver   192.0.2.53;comment
nameserver 127.0.0.53
nameserver not-an-address
nameserver
#nameserver 192.0.2.99
options edns0 trust-ad
";
        assert_eq!(
            upstreams_from_resolv_conf(text),
            vec![
                SocketAddr::from(([127, 0, 0, 53], 53)),
                SocketAddr::from(([10, 0, 0, 1], 53)),
                SocketAddr::from(([192, 0, 2, 53], 53)),
            ]
        );
        assert!(upstreams_from_resolv_conf("").is_empty());
    }

    #[test]
    fn limits_are_the_documented_bounds() {
        let l = Limits::default();
        assert_eq!(l.max_udp_query, 512);
        assert_eq!(l.max_in_flight, 64);
        assert_eq!(l.max_tcp_conns, 8);
        assert_eq!(l.tcp_idle, Duration::from_secs(5));
        assert_eq!(l.upstream_timeout, Duration::from_secs(2));
    }

    // -----------------------------------------------------------------------------------------
    // No input panics
    // -----------------------------------------------------------------------------------------

    /// xorshift64*: enough randomness to shake a parser, no crate needed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
        }
        fn byte(&mut self) -> u8 {
            self.next().to_le_bytes()[0]
        }
    }

    /// Every parser on `msg`; a query that parses must survive its own rebuilding.
    fn shake(msg: &[u8], rng: &mut Rng) -> bool {
        let q = question("api.example.com", TYPE_A);
        let id = u16::from_le_bytes([
            msg.first().copied().unwrap_or(0),
            msg.get(1).copied().unwrap_or(0),
        ]);
        let _ = matching_response(msg, id, &q);
        if let Ok(records) = answer_records(msg) {
            let _ = resolved_addrs(&q, &records);
        }
        let _ = read_name(msg, rng.below(msg.len() + 2));
        let Ok(query) = parse_query(msg) else {
            return false;
        };
        let _ = query.question.name.to_string();
        let _ = decide(&policy(&["*.example.com"]), &query.question);
        let again = parse_query(&upstream_query(7, &query)).expect("a rebuilt query parses");
        assert_eq!(again.question, query.question);
        assert_eq!(again.edns.is_some(), query.edns.is_some());
        true
    }

    #[test]
    fn random_and_mangled_bytes_never_panic() {
        let seeds = [
            query_msg(1, "api.example.com", TYPE_A),
            query_msg_edns(2, "a.b.example.com", TYPE_AAAA, 1232, true),
            chain_answer(&query_msg(3, "api.example.com", TYPE_A)),
        ];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        // Every truncation of a valid message: a truncated query never parses.
        for seed in &seeds {
            for len in 0..seed.len() {
                let parsed = shake(&seed[..len], &mut rng);
                if seed == &seeds[0] {
                    assert!(!parsed, "a query cut at {len} of {} parsed", seed.len());
                }
            }
            assert_eq!(shake(seed, &mut rng), parse_query(seed).is_ok());
        }
        let mut parsed = 0;
        for _ in 0..30_000 {
            let msg = if rng.below(3) == 0 {
                let len = rng.below(600);
                (0..len).map(|_| rng.byte()).collect::<Vec<u8>>()
            } else {
                let mut msg = seeds[rng.below(seeds.len())].clone();
                for _ in 0..=rng.below(6) {
                    let at = rng.below(msg.len());
                    match rng.below(4) {
                        0 => msg[at] = rng.byte(),
                        1 => msg.truncate(at),
                        // A compression pointer anywhere, often backwards or to itself.
                        2 if at + 1 < msg.len() => {
                            let target = rng.below(at + 2);
                            msg[at] = 0xC0 | u8::try_from(target >> 8).unwrap();
                            msg[at + 1] = u8::try_from(target & 0xFF).unwrap();
                        }
                        _ => msg.insert(at, rng.byte()),
                    }
                    if msg.is_empty() {
                        break;
                    }
                }
                msg
            };
            parsed += usize::from(shake(&msg, &mut rng));
        }
        assert!(
            parsed > 100,
            "only {parsed} mangled queries parsed: the test shakes too hard"
        );
    }

    // -----------------------------------------------------------------------------------------
    // A forwarder, a fake upstream, a recording sink
    // -----------------------------------------------------------------------------------------

    /// A resolver on 127.0.0.1 (UDP and TCP, one port) answering by name, and recording every
    /// question it is asked.
    struct FakeUpstream {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<(String, u16)>>>,
        tasks: Vec<JoinHandle<()>>,
    }

    impl Drop for FakeUpstream {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    /// What the fake sends for `msg` (none, one, or several datagrams).
    fn fake_answers(msg: &[u8], tcp: bool) -> Vec<Vec<u8>> {
        let Ok(q) = parse_query(msg) else {
            return Vec::new();
        };
        let dotted = q.question.name.to_dotted().unwrap_or_default();
        match (dotted.as_str(), q.question.qtype) {
            ("silent.example.com", _) => Vec::new(),
            ("big.example.com", _) if !tcp => {
                let mut tc = response_start(msg, Rcode::NoError, 0);
                tc[2] |= 0x02;
                vec![tc]
            }
            ("big.example.com", _) => vec![a_answer(msg, [192, 0, 2, 30], 300)],
            ("spoof.example.com", _) => {
                let mut wrong_id = a_answer(msg, [203, 0, 113, 66], 300);
                wrong_id[1] ^= 1;
                let mut wrong_question = a_answer(msg, [203, 0, 113, 67], 300);
                wrong_question[14] = b't'; // "spoof" -> "stoof"
                vec![
                    wrong_id,
                    wrong_question,
                    a_answer(msg, [192, 0, 2, 20], 300),
                ]
            }
            ("nx.example.com", _) => vec![response_start(msg, Rcode::NxDomain, 0)],
            ("short.example.com", TYPE_A) => vec![a_answer(msg, [192, 0, 2, 40], 5)],
            (_, TYPE_A) if dotted.starts_with("api.") => vec![chain_answer(msg)],
            (_, TYPE_A) => vec![a_answer(msg, [192, 0, 2, 99], 300)],
            (_, TYPE_AAAA) => {
                let mut out = response_start(msg, Rcode::NoError, 1);
                rr(
                    &mut out,
                    |o| ptr(o, 12),
                    TYPE_AAAA,
                    300,
                    |o| o.extend_from_slice(&[0x20; 16]),
                );
                vec![out]
            }
            (_, TYPE_TXT) => {
                let mut out = response_start(msg, Rcode::NoError, 1);
                rr(
                    &mut out,
                    |o| ptr(o, 12),
                    TYPE_TXT,
                    300,
                    |o| {
                        o.push(5);
                        o.extend_from_slice(b"hello");
                    },
                );
                vec![out]
            }
            _ => vec![response_start(msg, Rcode::NoError, 0)],
        }
    }

    fn note_seen(seen: &Mutex<Vec<(String, u16)>>, msg: &[u8]) {
        if let Ok(q) = parse_query(msg) {
            seen.lock().unwrap().push((
                q.question.name.to_dotted().unwrap_or_default(),
                q.question.qtype,
            ));
        }
    }

    impl FakeUpstream {
        async fn start() -> FakeUpstream {
            let (udp, tcp) = bind_both("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = udp.local_addr().unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let udp_seen = Arc::clone(&seen);
            let udp_task = tokio::spawn(async move {
                let mut buf = vec![0u8; 65_535];
                loop {
                    let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                        continue;
                    };
                    note_seen(&udp_seen, &buf[..n]);
                    for answer in fake_answers(&buf[..n], false) {
                        let _ = udp.send_to(&answer, peer).await;
                    }
                }
            });
            let tcp_seen = Arc::clone(&seen);
            let tcp_task = tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = tcp.accept().await else {
                        continue;
                    };
                    let Ok(msg) = read_framed(&mut stream).await else {
                        continue;
                    };
                    note_seen(&tcp_seen, &msg);
                    for answer in fake_answers(&msg, true) {
                        let _ = write_framed(&mut stream, &answer).await;
                    }
                }
            });
            FakeUpstream {
                addr,
                seen,
                tasks: vec![udp_task, tcp_task],
            }
        }

        fn saw(&self, name: &str) -> bool {
            self.seen.lock().unwrap().iter().any(|(n, _)| n == name)
        }
    }

    /// Records what it was asked to allow, after a pause: a forwarder that relayed before the
    /// sink finished would be caught with an empty record.
    struct RecordingSink {
        delay: Duration,
        calls: Mutex<Vec<(Vec<Ipv4Addr>, u32)>>,
    }

    #[async_trait::async_trait]
    impl ResolvedSink for RecordingSink {
        async fn allow(&self, addrs: Vec<Ipv4Addr>, ttl_secs: u32) {
            tokio::time::sleep(self.delay).await;
            self.calls.lock().unwrap().push((addrs, ttl_secs));
        }
    }

    impl RecordingSink {
        fn calls(&self) -> Vec<(Vec<Ipv4Addr>, u32)> {
            self.calls.lock().unwrap().clone()
        }
    }

    struct Setup {
        forwarder: Forwarder,
        upstream: FakeUpstream,
        sink: Arc<RecordingSink>,
        policy: watch::Sender<DnsPolicy>,
    }

    fn fast_limits() -> Limits {
        Limits {
            upstream_timeout: Duration::from_millis(300),
            ..Limits::default()
        }
    }

    async fn setup(policy: DnsPolicy, limits: Limits) -> Setup {
        let upstream = FakeUpstream::start().await;
        let sink = Arc::new(RecordingSink {
            delay: Duration::from_millis(150),
            calls: Mutex::new(Vec::new()),
        });
        let (tx, rx) = watch::channel(policy);
        let forwarder = Forwarder::start_with(
            "127.0.0.1:0".parse().unwrap(),
            "test-vm".to_owned(),
            vec![upstream.addr],
            rx,
            Arc::clone(&sink) as Arc<dyn ResolvedSink>,
            limits,
        )
        .await
        .unwrap();
        Setup {
            forwarder,
            upstream,
            sink,
            policy: tx,
        }
    }

    /// Sends `msg` over UDP; the answer, or `None` after `wait`.
    async fn udp_ask_within(addr: SocketAddr, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(msg, addr).await.unwrap();
        let mut buf = vec![0u8; 65_535];
        let (n, _) = tokio::time::timeout(wait, sock.recv_from(&mut buf))
            .await
            .ok()?
            .unwrap();
        buf.truncate(n);
        Some(buf)
    }

    async fn udp_ask(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
        udp_ask_within(addr, msg, Duration::from_secs(10))
            .await
            .expect("an answer over UDP")
    }

    async fn tcp_ask(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        write_framed(&mut stream, msg).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), read_framed(&mut stream))
            .await
            .expect("an answer over TCP in time")
            .unwrap()
    }

    async fn ask(t: Transport, addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
        match t {
            Transport::Udp => udp_ask(addr, msg).await,
            Transport::Tcp => tcp_ask(addr, msg).await,
        }
    }

    fn rcode_of(msg: &[u8]) -> u16 {
        header_of(msg).rcode()
    }

    fn chain_addrs() -> Vec<Ipv4Addr> {
        vec![Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11)]
    }

    #[tokio::test]
    async fn allowed_names_reach_the_sink_before_the_answer() {
        let s = setup(
            policy(&["api.example.com", "*.svc.example.org"]),
            fast_limits(),
        )
        .await;
        let addr = s.forwarder.local_addr();
        for (i, t) in [Transport::Udp, Transport::Tcp].into_iter().enumerate() {
            let query = query_msg(0x100, "API.example.com", TYPE_A);
            let answer = ask(t, addr, &query).await;
            // Recorded as the answer arrives: the sink (which pauses first) was done.
            let calls = s.sink.calls();
            assert_eq!(calls.len(), i + 1, "{t:?}: the sink had not finished");
            assert_eq!(calls[i], (chain_addrs(), 300));
            assert_eq!(
                answer,
                chain_answer(&query),
                "{t:?}: relayed unchanged but for the id"
            );
        }
        // A wildcard match, with EDNS: its answer is relayed too.
        let query = query_msg_edns(0x101, "db.svc.example.org", TYPE_A, 1232, false);
        let answer = udp_ask(addr, &query).await;
        assert_eq!(header_of(&answer).id, 0x101);
        assert_eq!(s.sink.calls()[2], (vec![Ipv4Addr::new(192, 0, 2, 99)], 300));
        assert!(s.upstream.saw("db.svc.example.org"));
    }

    #[tokio::test]
    async fn denied_names_get_nxdomain_and_never_go_upstream() {
        let s = setup(policy(&["api.example.com"]), fast_limits()).await;
        let addr = s.forwarder.local_addr();
        for t in [Transport::Udp, Transport::Tcp] {
            for qtype in [TYPE_A, TYPE_AAAA, TYPE_TXT] {
                let query = query_msg(0x200, "Evil.Example.net", qtype);
                let answer = ask(t, addr, &query).await;
                let q = parse_query(&query).unwrap();
                assert_eq!(answer, reply(&q.header, Some(&q.question), Rcode::NxDomain));
                assert_eq!(rcode_of(&answer), 3);
            }
        }
        assert!(s.upstream.seen.lock().unwrap().is_empty());
        assert!(s.sink.calls().is_empty());
    }

    #[tokio::test]
    async fn aaaa_for_allowed_names_is_nodata_and_other_types_are_relayed() {
        let s = setup(
            policy(&["api.example.com", "txt.example.com"]),
            fast_limits(),
        )
        .await;
        let addr = s.forwarder.local_addr();
        for t in [Transport::Udp, Transport::Tcp] {
            let query = query_msg(0x300, "api.example.com", TYPE_AAAA);
            let answer = ask(t, addr, &query).await;
            let h = header_of(&answer);
            assert_eq!((h.id, h.rcode(), h.ancount), (0x300, 0, 0));
            assert_eq!(
                question_of(&answer).unwrap(),
                question("api.example.com", TYPE_AAAA)
            );

            let query = query_msg(0x301, "txt.example.com", TYPE_TXT);
            let answer = ask(t, addr, &query).await;
            assert_eq!(answer, fake_answers(&query, false)[0]);
        }
        assert!(
            !s.upstream.saw("api.example.com"),
            "AAAA is answered without asking"
        );
        assert!(s.upstream.saw("txt.example.com"));
        assert!(s.sink.calls().is_empty(), "no addresses from TXT answers");
    }

    #[tokio::test]
    async fn without_an_allow_list_it_forwards_everything_and_allows_nothing() {
        let s = setup(DnsPolicy::default(), fast_limits()).await;
        let addr = s.forwarder.local_addr();
        let query = query_msg(0x400, "api.anything.test", TYPE_A);
        assert_eq!(udp_ask(addr, &query).await, chain_answer(&query));
        let query = query_msg(0x401, "anything.test", TYPE_AAAA);
        assert_eq!(tcp_ask(addr, &query).await, fake_answers(&query, true)[0]);
        let query = query_msg(0x402, "nx.example.com", TYPE_A);
        assert_eq!(rcode_of(&udp_ask(addr, &query).await), 3);
        assert!(s.upstream.saw("anything.test"));
        assert!(s.sink.calls().is_empty());
    }

    #[tokio::test]
    async fn a_silent_upstream_means_servfail_after_the_timeout() {
        let upstream = FakeUpstream::start().await;
        let sink = Arc::new(RecordingSink {
            delay: Duration::ZERO,
            calls: Mutex::new(Vec::new()),
        });
        let (_tx, rx) = watch::channel(policy(&["*.example.com"]));
        // The public constructor (on sockets made as the helper hands them over), with the
        // real 2 s per server.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind(udp.local_addr().unwrap()).unwrap();
        let forwarder = Forwarder::serve_sockets(
            udp,
            tcp,
            "test-vm".to_owned(),
            vec![upstream.addr],
            rx,
            sink.clone(),
        )
        .unwrap();
        let query = query_msg(0x500, "silent.example.com", TYPE_A);
        let started = Instant::now();
        let answer = udp_ask(forwarder.local_addr(), &query).await;
        let waited = started.elapsed();
        let q = parse_query(&query).unwrap();
        assert_eq!(answer, reply(&q.header, Some(&q.question), Rcode::ServFail));
        assert!(
            waited >= Duration::from_secs(2),
            "answered after {waited:?}"
        );
        assert!(waited < Duration::from_secs(4), "answered after {waited:?}");
        assert!(upstream.saw("silent.example.com"));
        assert!(sink.calls().is_empty());
    }

    #[tokio::test]
    async fn the_next_upstream_is_asked_after_a_silent_one() {
        let upstream = FakeUpstream::start().await;
        // Bound, never read: a resolver that does not answer.
        let mute = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sink = Arc::new(RecordingSink {
            delay: Duration::ZERO,
            calls: Mutex::new(Vec::new()),
        });
        let (_tx, rx) = watch::channel(policy(&["*.example.com"]));
        let forwarder = Forwarder::start_with(
            "127.0.0.1:0".parse().unwrap(),
            "test-vm".to_owned(),
            vec![mute.local_addr().unwrap(), upstream.addr],
            rx,
            sink.clone(),
            fast_limits(),
        )
        .await
        .unwrap();
        let started = Instant::now();
        let answer = udp_ask(
            forwarder.local_addr(),
            &query_msg(0x600, "x.example.com", TYPE_A),
        )
        .await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(rcode_of(&answer), 0);
        assert_eq!(
            sink.calls(),
            vec![(vec![Ipv4Addr::new(192, 0, 2, 99)], 300)]
        );
    }

    #[tokio::test]
    async fn answers_with_another_id_or_question_are_ignored() {
        let s = setup(policy(&["*.example.com"]), fast_limits()).await;
        let answer = udp_ask(
            s.forwarder.local_addr(),
            &query_msg(0x700, "spoof.example.com", TYPE_A),
        )
        .await;
        let records = answer_records(&answer).unwrap();
        assert_eq!(records[0].data, RData::A(Ipv4Addr::new(192, 0, 2, 20)));
        assert_eq!(
            s.sink.calls(),
            vec![(vec![Ipv4Addr::new(192, 0, 2, 20)], 300)]
        );
    }

    #[tokio::test]
    async fn policy_changes_apply_to_the_next_query() {
        let s = setup(policy(&["api.example.com"]), fast_limits()).await;
        let addr = s.forwarder.local_addr();
        let query = query_msg(0x800, "other.example.net", TYPE_A);
        assert_eq!(rcode_of(&udp_ask(addr, &query).await), 3);
        s.policy
            .send_replace(policy(&["api.example.com", "*.example.net"]));
        let answer = udp_ask(addr, &query).await;
        assert_eq!(rcode_of(&answer), 0);
        assert_eq!(
            s.sink.calls(),
            vec![(vec![Ipv4Addr::new(192, 0, 2, 99)], 300)]
        );
        s.policy.send_replace(policy(&["*.example.net"]));
        let query = query_msg(0x801, "api.example.com", TYPE_A);
        assert_eq!(rcode_of(&tcp_ask(addr, &query).await), 3);
        s.policy.send_replace(DnsPolicy::default());
        assert_eq!(tcp_ask(addr, &query).await, chain_answer(&query));
        assert_eq!(s.sink.calls().len(), 1, "no allow-list, no sink calls");
    }

    #[tokio::test]
    async fn short_ttls_are_allowed_for_30_seconds() {
        let s = setup(policy(&["short.example.com"]), fast_limits()).await;
        let answer = udp_ask(
            s.forwarder.local_addr(),
            &query_msg(1, "short.example.com", TYPE_A),
        )
        .await;
        assert_eq!(
            answer_records(&answer).unwrap()[0].ttl,
            5,
            "the answer itself is unchanged"
        );
        assert_eq!(
            s.sink.calls(),
            vec![(vec![Ipv4Addr::new(192, 0, 2, 40)], 30)]
        );
    }

    #[tokio::test]
    async fn truncated_answers_go_to_tcp_for_tcp_guests() {
        let s = setup(policy(&["big.example.com"]), fast_limits()).await;
        let addr = s.forwarder.local_addr();
        let query = query_msg(0x900, "big.example.com", TYPE_A);
        let answer = udp_ask(addr, &query).await;
        assert_ne!(header_of(&answer).flags & FLAG_TC, 0, "a UDP guest gets TC");
        assert!(
            s.sink.calls().is_empty(),
            "nothing taken from a truncated answer"
        );
        let answer = tcp_ask(addr, &query).await;
        assert_eq!(header_of(&answer).flags & FLAG_TC, 0);
        assert_eq!(answer, a_answer(&query, [192, 0, 2, 30], 300));
        assert_eq!(
            s.sink.calls(),
            vec![(vec![Ipv4Addr::new(192, 0, 2, 30)], 300)]
        );
    }

    #[tokio::test]
    async fn bad_udp_messages_are_dropped_or_refused() {
        let s = setup(policy(&["*.example.com"]), fast_limits()).await;
        let addr = s.forwarder.local_addr();
        let quiet = Duration::from_millis(300);
        // Over 512 bytes (a valid query padded with an unknown additional record): dropped.
        let mut big = query_msg(1, "a.example.com", TYPE_A);
        big[11] = 1;
        big.push(0);
        push_u16(&mut big, 99);
        push_u16(&mut big, CLASS_IN);
        big.extend_from_slice(&0u32.to_be_bytes());
        let pad = 513 - big.len() - 2;
        push_u16(&mut big, u16::try_from(pad).unwrap());
        big.resize(513, 0);
        assert!(parse_query(&big).is_ok());
        assert_eq!(udp_ask_within(addr, &big, quiet).await, None);
        // The same at 512 bytes is answered.
        let mut fits = big.clone();
        fits.truncate(512);
        let len_at = fits.len() - (pad - 1) - 2;
        fits[len_at..len_at + 2].copy_from_slice(&u16::try_from(pad - 1).unwrap().to_be_bytes());
        assert_eq!(rcode_of(&udp_ask(addr, &fits).await), 0);
        // No header: dropped. A header without its question: FORMERR.
        assert_eq!(udp_ask_within(addr, &[1, 2, 3], quiet).await, None);
        let mut msg = Vec::new();
        header(&mut msg, 0xF00D, FLAG_RD, [1, 0, 0, 0]);
        let answer = udp_ask(addr, &msg).await;
        assert_eq!(header_of(&answer).id, 0xF00D);
        assert_eq!(rcode_of(&answer), 1);
        // A response sent to the forwarder: dropped.
        let response = a_answer(&query_msg(2, "a.example.com", TYPE_A), [1, 1, 1, 1], 60);
        assert_eq!(udp_ask_within(addr, &response, quiet).await, None);
        assert!(
            s.sink
                .calls()
                .iter()
                .all(|(a, _)| !a.contains(&Ipv4Addr::new(1, 1, 1, 1)))
        );
    }

    #[tokio::test]
    async fn queries_beyond_the_in_flight_limit_are_refused() {
        let limits = Limits {
            max_in_flight: 2,
            upstream_timeout: Duration::from_millis(800),
            ..Limits::default()
        };
        let s = setup(policy(&["*.example.com"]), limits).await;
        let addr = s.forwarder.local_addr();
        let slow: Vec<_> = (0..2)
            .map(|i| {
                let query = query_msg(i, "silent.example.com", TYPE_A);
                tokio::spawn(async move { udp_ask(addr, &query).await })
            })
            .collect();
        // Wait until both are upstream, then one more is refused at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.upstream.seen.lock().unwrap().len() < 2 {
            assert!(
                Instant::now() < deadline,
                "the slow queries did not go upstream"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = Instant::now();
        let answer = udp_ask(addr, &query_msg(9, "x.example.com", TYPE_A)).await;
        assert_eq!(rcode_of(&answer), Rcode::Refused as u16);
        assert!(started.elapsed() < Duration::from_millis(500));
        // Denied names are answered at once all the same.
        let answer = udp_ask(addr, &query_msg(10, "x.example.net", TYPE_A)).await;
        assert_eq!(rcode_of(&answer), 3);
        for task in slow {
            assert_eq!(rcode_of(&task.await.unwrap()), 2);
        }
        // Once they are done, queries are forwarded again.
        assert_eq!(
            rcode_of(&udp_ask(addr, &query_msg(11, "x.example.com", TYPE_A)).await),
            0
        );
    }

    /// Whether the peer closed `stream` within `wait`.
    async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(wait, stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn tcp_connections_are_bounded_in_number_and_idle_time() {
        let limits = Limits {
            tcp_idle: Duration::from_millis(700),
            ..fast_limits()
        };
        let s = setup(DnsPolicy::default(), limits).await;
        let addr = s.forwarder.local_addr();
        let mut open = Vec::new();
        for _ in 0..8 {
            open.push(TcpStream::connect(addr).await.unwrap());
        }
        // The ninth is closed at once.
        let mut ninth = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut ninth, Duration::from_millis(400)).await);
        // An open one serves several queries in turn.
        let stream = &mut open[0];
        for id in 0..3 {
            write_framed(stream, &query_msg(id, "a.example.com", TYPE_A))
                .await
                .unwrap();
            let answer = read_framed(stream).await.unwrap();
            assert_eq!(header_of(&answer).id, id);
        }
        // Idle ones are closed after the idle time, and then new ones are served.
        for stream in &mut open {
            assert!(closed_within(stream, Duration::from_secs(3)).await);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            write_framed(&mut stream, &query_msg(5, "a.example.com", TYPE_A))
                .await
                .unwrap();
            if let Ok(Ok(answer)) =
                tokio::time::timeout(Duration::from_millis(300), read_framed(&mut stream)).await
            {
                assert_eq!(header_of(&answer).id, 5);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no connection served after the idle ones closed"
            );
        }
    }

    #[tokio::test]
    async fn a_hanging_sink_means_servfail() {
        let upstream = FakeUpstream::start().await;
        let sink = Arc::new(RecordingSink {
            delay: Duration::from_secs(60),
            calls: Mutex::new(Vec::new()),
        });
        let (_tx, rx) = watch::channel(policy(&["*.example.com"]));
        let limits = Limits {
            sink_timeout: Duration::from_millis(200),
            ..fast_limits()
        };
        let forwarder = Forwarder::start_with(
            "127.0.0.1:0".parse().unwrap(),
            "test-vm".to_owned(),
            vec![upstream.addr],
            rx,
            sink,
            limits,
        )
        .await
        .unwrap();
        let answer = udp_ask(
            forwarder.local_addr(),
            &query_msg(1, "a.example.com", TYPE_A),
        )
        .await;
        assert_eq!(rcode_of(&answer), 2);
    }

    #[tokio::test]
    async fn a_dropped_forwarder_lets_go_of_its_address() {
        let s = setup(DnsPolicy::default(), fast_limits()).await;
        let addr = s.forwarder.local_addr();
        let mut conn = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            rcode_of(&udp_ask(addr, &query_msg(1, "a.test", TYPE_A)).await),
            0
        );
        drop(s.forwarder);
        assert!(
            closed_within(&mut conn, Duration::from_secs(2)).await,
            "its connections close"
        );
        let deadline = Instant::now() + Duration::from_secs(2);
        while UdpSocket::bind(addr).await.is_err() || TcpListener::bind(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "{addr} still bound after the drop"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
