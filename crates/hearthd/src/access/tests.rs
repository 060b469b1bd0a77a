use std::process::Command;

use super::*;

/// A key made by the real ssh-keygen, and the fingerprint ssh-keygen prints for it.
fn keygen(kind: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("id");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", "alice@laptop", "-f"])
        .arg(&path)
        .status()
        .expect("ssh-keygen runs (openssh-client is installed by make)");
    assert!(made.success());
    let line = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    let out = Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(path.with_extension("pub"))
        .output()
        .unwrap();
    let printed = String::from_utf8(out.stdout).unwrap();
    let fingerprint = printed.split_whitespace().nth(1).unwrap().to_owned();
    (line, fingerprint)
}

#[test]
fn public_keys_parse_with_ssh_keygens_fingerprint() {
    for kind in ["ed25519", "ecdsa", "rsa"] {
        let (line, fingerprint) = keygen(kind);
        let key = parse_public_key(&line).unwrap();
        assert_eq!(key.fingerprint, fingerprint, "{kind}");
        assert_eq!(key.comment, "alice@laptop");
        assert!(line.starts_with(&key.openssh));
        assert!(!key.openssh.contains("alice"));
    }
}

#[test]
fn bad_public_keys_are_refused_naming_why() {
    let (line, _) = keygen("ed25519");
    let data = line.split_whitespace().nth(1).unwrap();
    for (bad, why) in [
        ("", "no key data"),
        ("ssh-ed25519", "no key data"),
        ("ssh-dss AAAA", "type \"ssh-dss\""),
        ("ssh-ed25519 !!!notbase64", "not base64"),
        (
            &format!("ssh-rsa {data}"),
            "does not hold a key of its type",
        ),
        (&format!("{line}\nssh-ed25519 {data}"), "more than one line"),
    ] {
        let e = parse_public_key(bad).unwrap_err().message();
        assert!(e.contains(why), "{bad:?}: {e}");
        assert!(
            e.starts_with("public_key is not an OpenSSH public key"),
            "{e}"
        );
    }
}

#[test]
fn keys_have_our_shape_and_others_do_not() {
    let (id, key) = new_api_key();
    assert_eq!(split_key(&key), Some(("hk_", id.as_str())));
    assert_ne!(new_api_key().1, key);
    for other in [
        "",
        "hk_",
        "Bearer x",
        &key[..key.len() - 1],
        &key.replace("hk_", "hx_"),
        &format!("{key}0"),
    ] {
        assert_eq!(split_key(other), None, "{other:?}");
    }
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"abcd"));
}

#[test]
fn failed_logins_are_limited_per_address_for_a_window() {
    let mut limiter = Limiter::default();
    let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
    let t0 = Instant::now();
    for i in 1..MAX_FAILURES {
        assert!(!limiter.fail(a, t0), "failure {i}");
        assert_eq!(limiter.blocked(a, t0), None);
    }
    assert!(limiter.fail(a, t0));
    assert_eq!(limiter.blocked(a, t0), Some(FAILURE_WINDOW));
    assert_eq!(limiter.blocked(b, t0), None);
    let later = t0 + FAILURE_WINDOW;
    assert_eq!(limiter.blocked(a, later), None);
    // The map does not grow past its bound however many addresses fail.
    for i in 0..u32::try_from(MAX_TRACKED + 100).unwrap() {
        limiter.fail(IpAddr::from(i.to_be_bytes()), later);
    }
    assert!(limiter.windows.len() <= MAX_TRACKED);
}

#[test]
fn names_follow_the_rule() {
    for good in ["alice", "a", "dev-team_2", &"a".repeat(32)] {
        check_user_name(good).unwrap();
    }
    for bad in ["", "Alice", "1abc", "a b", "a.b", &"a".repeat(33)] {
        let e = check_user_name(bad).unwrap_err().message();
        assert!(e.contains("1-32 characters"), "{e}");
    }
    assert!(
        check_user_name("operator")
            .unwrap_err()
            .message()
            .contains("reserved")
    );
}
