//! Egress policies: the API's request checked and turned into what the store keeps, and what is
//! stored turned into the helper's rules and the DNS forwarder's policy.

use std::str::FromStr;

use hearth_api::{EgressMode, EgressPolicy, EgressRequest};
use hearth_helper::proto::{self, Cidr};

use super::dns::{DnsPolicy, DomainPattern};
use crate::store::EgressRecord;

const MAX_CIDRS: usize = 256;
const MAX_PORTS: usize = 64;
const MAX_DOMAINS: usize = 64;

/// A field of an egress request that breaks a rule; the message names both.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("egress.{field}: {message}")]
pub struct EgressError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> EgressError {
    EgressError {
        field,
        message: message.into(),
    }
}

/// `10.0.0.0/8`, or a bare address for its /32.
fn parse_cidr(field: &'static str, text: &str) -> Result<Cidr, EgressError> {
    let text = text.trim();
    let full = if text.contains('/') {
        text.to_owned()
    } else {
        format!("{text}/32")
    };
    Cidr::from_str(&full).map_err(|e| bad(field, e.to_string()))
}

/// Checks `req` and gives the policy to store. Allow lists without a mode mean `deny_all`.
pub fn validate(req: &EgressRequest) -> Result<EgressRecord, EgressError> {
    if req.allow_cidrs.len() > MAX_CIDRS {
        return Err(bad("allow_cidrs", format!("at most {MAX_CIDRS} entries")));
    }
    if req.deny_cidrs.len() > MAX_CIDRS {
        return Err(bad("deny_cidrs", format!("at most {MAX_CIDRS} entries")));
    }
    if req.allow_ports.len() > MAX_PORTS {
        return Err(bad("allow_ports", format!("at most {MAX_PORTS} entries")));
    }
    if req.allow_domains.len() > MAX_DOMAINS {
        return Err(bad(
            "allow_domains",
            format!("at most {MAX_DOMAINS} entries"),
        ));
    }
    let mut allow_cidrs = Vec::new();
    for c in &req.allow_cidrs {
        let cidr = parse_cidr("allow_cidrs", c)?.to_string();
        if !allow_cidrs.contains(&cidr) {
            allow_cidrs.push(cidr);
        }
    }
    let mut deny_cidrs = Vec::new();
    for c in &req.deny_cidrs {
        let cidr = parse_cidr("deny_cidrs", c)?.to_string();
        if !deny_cidrs.contains(&cidr) {
            deny_cidrs.push(cidr);
        }
    }
    let mut allow_ports = Vec::new();
    for p in &req.allow_ports {
        if *p == 0 {
            return Err(bad("allow_ports", "0 is not a port: use 1 to 65535"));
        }
        if !allow_ports.contains(p) {
            allow_ports.push(*p);
        }
    }
    let mut allow_domains = Vec::new();
    for d in &req.allow_domains {
        let pattern =
            DomainPattern::from_str(d).map_err(|e| bad("allow_domains", e.to_string()))?;
        let pattern = pattern.to_string();
        if !allow_domains.contains(&pattern) {
            allow_domains.push(pattern);
        }
    }
    let allows = !allow_cidrs.is_empty() || !allow_domains.is_empty();
    let mode = req.mode.unwrap_or(if allows {
        EgressMode::DenyAll
    } else {
        EgressMode::AllowAll
    });
    if mode == EgressMode::AllowAll && allows {
        let field = if allow_cidrs.is_empty() {
            "allow_domains"
        } else {
            "allow_cidrs"
        };
        return Err(bad(
            field,
            "allow lists need mode deny_all (under allow_all everything not denied is allowed already)",
        ));
    }
    if !allow_ports.is_empty() && !allows {
        return Err(bad(
            "allow_ports",
            "ports limit allow_cidrs or allow_domains: give one of them too",
        ));
    }
    Ok(EgressRecord {
        deny_all: mode == EgressMode::DenyAll,
        allow_cidrs,
        deny_cidrs,
        allow_ports,
        allow_domains,
    })
}

/// The policy as a request that sets it again (an export carries it so).
pub fn to_request(r: &EgressRecord) -> EgressRequest {
    let p = to_api(r);
    EgressRequest {
        mode: Some(p.mode),
        allow_cidrs: p.allow_cidrs,
        deny_cidrs: p.deny_cidrs,
        allow_ports: p.allow_ports,
        allow_domains: p.allow_domains,
    }
}

/// The policy as the API shows it.
pub fn to_api(r: &EgressRecord) -> EgressPolicy {
    EgressPolicy {
        mode: if r.deny_all {
            EgressMode::DenyAll
        } else {
            EgressMode::AllowAll
        },
        allow_cidrs: r.allow_cidrs.clone(),
        deny_cidrs: r.deny_cidrs.clone(),
        allow_ports: r.allow_ports.clone(),
        allow_domains: r.allow_domains.clone(),
    }
}

/// One line for the VM's events, e.g. `egress: deny_all, allow 10.0.0.0/8 ports 443`.
pub fn describe(r: &EgressRecord) -> String {
    let mut out = format!(
        "egress: {}",
        if r.deny_all { "deny_all" } else { "allow_all" }
    );
    let list = |v: &[String]| v.join(" ");
    if !r.allow_cidrs.is_empty() {
        out.push_str(&format!(", allow {}", list(&r.allow_cidrs)));
    }
    if !r.allow_domains.is_empty() {
        out.push_str(&format!(", allow domains {}", list(&r.allow_domains)));
    }
    if !r.allow_ports.is_empty() {
        let ports: Vec<String> = r.allow_ports.iter().map(u16::to_string).collect();
        out.push_str(&format!(" ports {}", ports.join(" ")));
    }
    if !r.deny_cidrs.is_empty() {
        out.push_str(&format!(", deny {}", list(&r.deny_cidrs)));
    }
    out
}

/// The helper's rules for a stored policy. What was stored was validated; an entry that no
/// longer parses (a hand-edited row) is left out, and logged.
pub fn to_rules(r: &EgressRecord) -> proto::EgressRules {
    let cidrs = |v: &[String]| -> Vec<Cidr> {
        v.iter()
            .filter_map(|c| match parse_cidr("cidr", c) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a stored egress entry");
                    None
                }
            })
            .collect()
    };
    proto::EgressRules {
        mode: if r.deny_all {
            proto::EgressMode::DenyAll
        } else {
            proto::EgressMode::AllowAll
        },
        allow_cidrs: cidrs(&r.allow_cidrs),
        deny_cidrs: cidrs(&r.deny_cidrs),
        allow_ports: r.allow_ports.clone(),
        domains: r.deny_all && !r.allow_domains.is_empty(),
    }
}

/// What the VM's DNS forwarder answers: every name under `allow_all`; under `deny_all` only
/// the allowed domains — none when there are none, or the forwarder would be a way out (a DNS
/// tunnel through the host's resolvers) for a VM that may reach nothing.
pub fn dns_policy(r: &EgressRecord) -> DnsPolicy {
    if !r.deny_all {
        return DnsPolicy { allowed: None };
    }
    DnsPolicy {
        allowed: Some(
            r.allow_domains
                .iter()
                .filter_map(|d| DomainPattern::from_str(d).ok())
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(f: impl FnOnce(&mut EgressRequest)) -> EgressRequest {
        let mut r = EgressRequest::default();
        f(&mut r);
        r
    }

    #[test]
    fn allow_lists_imply_deny_all() {
        let r = validate(&req(|r| {
            r.allow_cidrs = vec!["10.1.0.0/16".into(), "192.0.2.7".into()]
        }))
        .unwrap();
        assert!(r.deny_all);
        assert_eq!(r.allow_cidrs, ["10.1.0.0/16", "192.0.2.7/32"]);
        let r = validate(&req(|r| r.allow_domains = vec!["API.Example.com.".into()])).unwrap();
        assert!(r.deny_all);
        assert_eq!(r.allow_domains, ["api.example.com"]);
        assert!(!validate(&EgressRequest::default()).unwrap().deny_all);
        let r = validate(&req(|r| r.deny_cidrs = vec!["10.0.0.0/8".into()])).unwrap();
        assert!(!r.deny_all);
    }

    #[test]
    fn bad_input_names_the_field_and_rule() {
        let cases: Vec<(EgressRequest, &str)> = vec![
            (
                req(|r| r.allow_cidrs = vec!["10.0.0.1/8".into()]),
                "egress.allow_cidrs",
            ),
            (
                req(|r| r.deny_cidrs = vec!["nope".into()]),
                "egress.deny_cidrs",
            ),
            (
                req(|r| {
                    r.allow_cidrs = vec!["10.0.0.0/8".into()];
                    r.allow_ports = vec![0];
                }),
                "egress.allow_ports: 0 is not a port",
            ),
            (
                req(|r| r.allow_ports = vec![443]),
                "egress.allow_ports: ports limit",
            ),
            (
                req(|r| {
                    r.mode = Some(EgressMode::AllowAll);
                    r.allow_cidrs = vec!["10.0.0.0/8".into()];
                }),
                "egress.allow_cidrs: allow lists need mode deny_all",
            ),
            (
                req(|r| r.allow_domains = vec!["-x.example.com".into()]),
                "egress.allow_domains",
            ),
            (
                req(|r| {
                    r.deny_cidrs = (0..300).map(|i| format!("10.0.{}.0/24", i % 256)).collect()
                }),
                "at most 256",
            ),
        ];
        for (r, want) in cases {
            let e = validate(&r).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
    }

    #[test]
    fn stored_policies_become_rules_and_dns_policies() {
        let r = validate(&req(|r| {
            r.allow_cidrs = vec!["10.1.0.0/16".into()];
            r.allow_ports = vec![443, 443, 80];
            r.allow_domains = vec!["*.example.com".into()];
            r.deny_cidrs = vec!["10.1.2.0/24".into()];
        }))
        .unwrap();
        let rules = to_rules(&r);
        assert_eq!(rules.mode, proto::EgressMode::DenyAll);
        assert_eq!(rules.allow_ports, [443, 80]);
        assert!(rules.domains);
        assert_eq!(rules.deny_cidrs[0].to_string(), "10.1.2.0/24");
        assert!(dns_policy(&r).allows("a.example.com"));
        assert!(!dns_policy(&r).allows("example.org"));
        assert!(dns_policy(&EgressRecord::default()).allows("anything.test"));
        let locked = EgressRecord {
            deny_all: true,
            allow_cidrs: vec!["10.1.0.0/16".into()],
            ..EgressRecord::default()
        };
        assert!(
            !dns_policy(&locked).allows("anything.test"),
            "deny_all resolves nothing"
        );
        assert_eq!(
            describe(&r),
            "egress: deny_all, allow 10.1.0.0/16, allow domains *.example.com ports 443 80, deny 10.1.2.0/24"
        );
        assert_eq!(to_api(&r).mode, EgressMode::DenyAll);
    }
}
