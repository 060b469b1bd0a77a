//! Real-VM tests of VM networking (harness in `common`). hearthd runs in the test's namespace,
//! which plays the host; an "outside world" namespace behind a veth pair holds two HTTP servers
//! and a DNS server (Debian's dnsmasq). Guests reach it only through their slots and the host's
//! NAT; no packet leaves the test's namespaces.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The host's end of the link to the outside namespace (in the test's namespace).
const HOST_SIDE: &str = "198.51.100.1";
/// The outside world's one address: HTTP on 8080 and 8081, DNS on 53.
const OUTSIDE: &str = "198.51.100.2";
const HELLO: &str = "hello from outside";

/// The outside namespace and what runs in it; all of it ends (by pid) and goes on drop.
struct Outside {
    ns: String,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Outside {
    /// Made from inside the test's namespace (the calling thread is in it).
    fn create() -> Outside {
        let ns = format!(
            "hearth-e2e-out-{}-{}",
            std::process::id(),
            NETNS_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &ns]));
        let dir = tempfile::tempdir().unwrap();
        let mut out = Outside {
            ns: ns.clone(),
            children: Vec::new(),
            _dir: dir,
        };
        for args in [
            &[
                "link", "add", "hout", "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ][..],
            &["addr", "add", &format!("{HOST_SIDE}/24"), "dev", "hout"],
            &["link", "set", "hout", "up"],
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{OUTSIDE}/24"),
                "dev",
                "eth0",
            ],
            &["-n", &ns, "link", "set", "eth0", "up"],
            &["-n", &ns, "link", "set", "lo", "up"],
        ] {
            run(Command::new("ip").args(args));
        }
        let www = out._dir.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("hello.txt"), format!("{HELLO}\n")).unwrap();
        for port in ["8080", "8081"] {
            out.spawn(
                Command::new("ip")
                    .args(["netns", "exec", &ns, "python3", "-m", "http.server", port])
                    .args(["--bind", OUTSIDE, "--directory"])
                    .arg(&www),
            );
        }
        let pid_file = out._dir.path().join("dnsmasq.pid");
        out.spawn(
            Command::new("ip")
                .args(["netns", "exec", &ns, "dnsmasq", "--keep-in-foreground"])
                .args([
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                ])
                .arg(format!("--listen-address={OUTSIDE}"))
                .arg(format!("--address=/allowed.test/{OUTSIDE}"))
                .arg(format!("--address=/denied.test/{OUTSIDE}"))
                .arg(format!("--pid-file={}", pid_file.display()))
                .arg("--user=root"),
        );
        // Ready when both servers answer (from the test's namespace, straight over the link).
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [8080, 8081] {
            while std::net::TcpStream::connect((OUTSIDE, port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "the outside server on {port} did not start"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        out
    }

    fn spawn(&mut self, cmd: &mut Command) {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        self.children.push(child);
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip").args(["link", "del", "hout"]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Runs `script` with bash in VM `vm`; exit code, stdout, stderr.
fn bash(w: &World, vm: &str, script: &str, args: &[&str]) -> (i32, String, String) {
    let mut argv = vec!["exec", vm, "--", "bash", "-c", script, "bash"];
    argv.extend_from_slice(args);
    let out = w.d().hearth(&argv);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An HTTP GET from inside VM `vm` with bash's /dev/tcp (the guest's own resolver and stack);
/// the body, or `None` when the connection could not be made within a few seconds.
fn fetch(w: &World, vm: &str, host: &str, port: u16, path: &str) -> Option<String> {
    let script = r#"timeout 8 bash -c '
        exec 3<>/dev/tcp/$0/$1 || exit 7
        printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$2" "$0" >&3
        cat <&3' "$@""#;
    let (code, out, _) = bash(w, vm, script, &[host, &port.to_string(), path]);
    if code != 0 {
        return None;
    }
    // The body follows the first empty line.
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

#[derive(Debug, PartialEq, Eq)]
enum Reach {
    /// Something accepted the connection.
    Open,
    /// The destination's kernel answered (nothing listens): the network let it through.
    Refused,
    /// No answer: dropped on the way.
    Dropped,
}

/// A TCP connection attempt to `$1:$2` within 3 s, with bash; its result for [`reach`].
const PROBE: &str = r#"timeout 3 bash -c 'exec 3<>/dev/tcp/$0/$1' "$@" 2>&1; echo "rc=$?""#;

/// Whether VM `vm` can open a TCP connection to `addr:port`.
fn probe(w: &World, vm: &str, addr: &str, port: u16) -> Reach {
    let (_, out, _) = bash(w, vm, PROBE, &[addr, &port.to_string()]);
    reach(&out, &format!("from {vm} to {addr}:{port}"))
}

/// What [`PROBE`]'s output says.
fn reach(out: &str, what: &str) -> Reach {
    if out.contains("rc=0") {
        Reach::Open
    } else if out.contains("refused") {
        Reach::Refused
    } else if out.contains("rc=124") {
        Reach::Dropped
    } else {
        panic!("unexpected probe result {what}: {out}")
    }
}

/// Whether this namespace (the host), as user `uid`, can open a TCP connection to `addr:port`.
fn probe_from_host(uid: Option<u32>, addr: &str, port: u16) -> Reach {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .args(["--clear-groups", "--", "bash"]);
            c
        }
        None => Command::new("bash"),
    };
    let out = run(cmd.args(["-c", PROBE, "bash", addr, &port.to_string()]));
    reach(
        &String::from_utf8_lossy(&out.stdout),
        &format!("from the host to {addr}:{port}"),
    )
}

/// A script run in VM `vm` in the background (`hearth exec`), while the test goes on.
struct Background(Option<Child>);

impl Background {
    fn start(vm: &str, script: &str, args: &[&str]) -> Background {
        let mut argv = vec!["exec", vm, "--", "bash", "-c", script, "bash"];
        argv.extend_from_slice(args);
        let child = hearth_cmd(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run hearth exec");
        Background(Some(child))
    }

    /// Its output, once it ends.
    fn output(mut self) -> String {
        let child = self.0.take().expect("a running script");
        let out = child.wait_with_output().expect("wait for hearth exec");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until `path` exists in VM `vm`.
fn wait_for_file(w: &World, vm: &str, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while bash(w, vm, "test -e \"$1\"", &[path]).0 != 0 {
        assert!(Instant::now() < deadline, "{path} did not appear in {vm}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// In VM `vm`: opens a connection to `addr:port`, sends `first` (and reads a line back when
/// `echoed`), then waits for the test (`go`), sends `second` and reads what comes within 4 s.
/// The test changes the network between the two halves; the output shows what got through
/// (`got:` lines).
fn two_halves(
    w: &World,
    vm: &str,
    addr: &str,
    port: u16,
    (first, echoed): (&str, bool),
    second: &str,
) -> Background {
    // The markers of an earlier run go before this one starts (else the test could take an old
    // `halfway` for this run's).
    bash(w, vm, "rm -f /tmp/halfway /tmp/go", &[]);
    let script = r#"
        exec 3<>/dev/tcp/$1/$2 || exit 7
        printf "$3" >&3
        if [ "$5" = 1 ]; then read -r -t 5 line <&3; echo "got:$line"; fi
        touch /tmp/halfway
        while [ ! -e /tmp/go ]; do sleep 0.1; done
        printf "$4" >&3
        timeout 4 cat <&3 | sed 's/^/got:/'
        echo end"#;
    let echoed = if echoed { "1" } else { "0" };
    Background::start(
        vm,
        script,
        &[addr, &port.to_string(), first, second, echoed],
    )
}

fn address(w: &World, vm: &str) -> (String, String) {
    let detail = json_of(&w.d().hearth_ok(&["--json", "vm", "inspect", vm]));
    let net = &detail["network"];
    (
        net["address"].as_str().expect("a VM address").to_owned(),
        net["host_address"]
            .as_str()
            .expect("a host address")
            .to_owned(),
    )
}

fn new_vm(w: &mut World, name: &str, extra: &[&str]) {
    let mut args = vec!["--json", "vm", "new", name];
    args.extend_from_slice(extra);
    let vm = json_of(&w.d().hearth_ok(&args));
    w.vm_ids.push(vm["id"].as_str().unwrap().to_owned());
}

#[test]
fn isolation_nat_private_networks_egress_metadata_and_dns() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut outside = None;
    let mut w = World::with_setup(&[("HEARTH_NETWORK_DNS_UPSTREAM", OUTSIDE)], || {
        outside = Some(Outside::create())
    });
    let _outside = outside;
    new_vm(&mut w, "net-a", &[]);
    new_vm(&mut w, "net-b", &[]);
    let (a_addr, a_host) = address(&w, "net-a");
    let (b_addr, b_host) = address(&w, "net-b");
    assert_ne!(a_addr, b_addr);

    // The guest side: its address, route and resolver as hearthd gave them.
    let (_, mac, _) = bash(&w, "net-a", "cat /sys/class/net/eth0/address", &[]);
    assert_eq!(mac.trim(), "06:00:0a:fe:fe:02");
    let (_, ips, _) = bash(&w, "net-a", "hostname -I", &[]);
    assert!(ips.contains("10.254.254.2"), "guest addresses: {ips}");
    let (_, route, _) = bash(&w, "net-a", "cat /proc/net/route", &[]);
    assert!(
        route.lines().any(|l| l.contains("00000000\t01FEFE0A")),
        "no default route via 10.254.254.1:\n{route}"
    );
    let (_, resolv, _) = bash(&w, "net-a", "cat /etc/resolv.conf", &[]);
    assert!(resolv.contains("nameserver 10.254.254.1"), "{resolv}");

    // Both reach the outside through NAT, by address and by name.
    for vm in ["net-a", "net-b"] {
        let body = fetch(&w, vm, OUTSIDE, 8080, "/hello.txt");
        assert_eq!(
            body.as_deref().map(str::trim),
            Some(HELLO),
            "{vm} by address"
        );
    }
    let body = fetch(&w, "net-a", "allowed.test", 8080, "/hello.txt");
    assert_eq!(body.as_deref().map(str::trim), Some(HELLO), "by name");

    // Neither reaches the other.
    assert_eq!(probe(&w, "net-a", &b_addr, 9), Reach::Dropped);
    assert_eq!(probe(&w, "net-b", &a_addr, 9), Reach::Dropped);

    // Metadata: each VM reads its own; another VM's metadata listener is out of reach.
    for vm in ["net-a", "net-b"] {
        let name = fetch(&w, vm, "169.254.169.254", 80, "/v1/instance/name");
        assert_eq!(name.as_deref().map(str::trim), Some(vm));
    }
    // The services live in each VM's own slot: nothing of them, nor anything else of the host,
    // is on the host addresses.
    for (vm, host) in [("net-a", &a_host), ("net-a", &b_host), ("net-b", &a_host)] {
        for port in [80, 53, 7070] {
            assert_eq!(
                probe(&w, vm, host, port),
                Reach::Dropped,
                "{vm} to {host}:{port}"
            );
        }
    }
    // A process of the host that takes port 80 everywhere (root even) gets nothing of the
    // guests' metadata requests: they are answered in the slot.
    let squat = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(squat.path().join("v1/instance")).unwrap();
    std::fs::write(squat.path().join("v1/instance/name"), "forged\n").unwrap();
    let mut squatter = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "80",
            "--bind",
            "0.0.0.0",
            "--directory",
        ])
        .arg(squat.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", 80)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the squatting server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let name = fetch(&w, "net-a", "169.254.169.254", 80, "/v1/instance/name");
    assert_eq!(name.as_deref().map(str::trim), Some("net-a"));
    assert_eq!(probe(&w, "net-a", &a_host, 80), Reach::Dropped);
    let _ = squatter.kill();
    let _ = squatter.wait();

    // From the host only root opens connections to a VM (no other local user, nor a web page
    // in an operator's browser).
    assert_eq!(probe_from_host(None, &a_addr, 9), Reach::Refused);
    assert_eq!(probe_from_host(Some(65534), &a_addr, 9), Reach::Dropped);

    // A private network joins them; a third VM outside it still reaches neither.
    w.d().hearth_ok(&["network", "create", "backend"]);
    w.d().hearth_ok(&["network", "connect", "backend", "net-a"]);
    w.d().hearth_ok(&["network", "connect", "backend", "net-b"]);
    assert_eq!(probe(&w, "net-a", &b_addr, 9), Reach::Refused);
    assert_eq!(probe(&w, "net-b", &a_addr, 9), Reach::Refused);
    new_vm(&mut w, "net-c", &[]);
    let (c_addr, _) = address(&w, "net-c");
    assert_eq!(probe(&w, "net-c", &a_addr, 9), Reach::Dropped);
    assert_eq!(probe(&w, "net-a", &c_addr, 9), Reach::Dropped);

    // Leaving the network cuts an open connection between its members at once. (A line echo
    // server in net-b, in perl, which every Debian has.)
    let echo = Background::start(
        "net-b",
        r#"exec perl -MIO::Socket::INET -e '
            my $l = IO::Socket::INET->new(LocalPort => 5000, Listen => 1, ReuseAddr => 1) or die;
            open(my $f, ">", "/tmp/listening"); close($f);
            my $c = $l->accept or die;
            while (my $line = <$c>) { print $c $line; }'"#,
        &[],
    );
    wait_for_file(&w, "net-b", "/tmp/listening");
    let talk = two_halves(&w, "net-a", &b_addr, 5000, ("one\n", true), "two\n");
    wait_for_file(&w, "net-a", "/tmp/halfway");
    w.d()
        .hearth_ok(&["network", "disconnect", "backend", "net-b"]);
    bash(&w, "net-a", "touch /tmp/go", &[]);
    let out = talk.output();
    assert!(
        out.contains("got:one"),
        "the connection did not work: {out}"
    );
    assert!(
        !out.contains("got:two"),
        "the connection outlived the network: {out}"
    );
    drop(echo);
    w.d().hearth_ok(&["network", "connect", "backend", "net-b"]);

    // Egress: deny_all blocks the outside; allowing its network and one port lets that port
    // through, and no other. Metadata stays reachable.
    w.d()
        .hearth_ok(&["vm", "egress", "net-c", "--egress-mode", "deny_all"]);
    assert_eq!(probe(&w, "net-c", OUTSIDE, 8080), Reach::Dropped);
    let name = fetch(&w, "net-c", "169.254.169.254", 80, "/v1/instance/name");
    assert_eq!(name.as_deref().map(str::trim), Some("net-c"));
    w.d().hearth_ok(&[
        "vm",
        "egress",
        "net-c",
        "--egress-allow-cidr",
        "198.51.100.0/24",
        "--egress-allow-port",
        "8080",
    ]);
    let body = fetch(&w, "net-c", OUTSIDE, 8080, "/hello.txt");
    assert_eq!(body.as_deref().map(str::trim), Some(HELLO));
    assert_eq!(probe(&w, "net-c", OUTSIDE, 8081), Reach::Dropped);
    // An open connection is held to a new policy: a request begun before the change to
    // deny_all gets no answer after it. (The same request without a change is answered.)
    let request = (("GET /hello.txt HTTP/1.0\r\n", false), "\r\n");
    let talk = two_halves(&w, "net-c", OUTSIDE, 8080, request.0, request.1);
    wait_for_file(&w, "net-c", "/tmp/halfway");
    bash(&w, "net-c", "touch /tmp/go", &[]);
    let out = talk.output();
    assert!(
        out.contains(HELLO),
        "the two-part request failed unchanged: {out}"
    );
    let talk = two_halves(&w, "net-c", OUTSIDE, 8080, request.0, request.1);
    wait_for_file(&w, "net-c", "/tmp/halfway");
    w.d()
        .hearth_ok(&["vm", "egress", "net-c", "--egress-mode", "deny_all"]);
    bash(&w, "net-c", "touch /tmp/go", &[]);
    let out = talk.output();
    assert!(out.contains("end"), "{out}");
    assert!(
        !out.contains(HELLO),
        "the connection outlived the policy: {out}"
    );
    w.d().hearth_ok(&["vm", "delete", "net-c"]);

    // Egress by name: only allowed names resolve, and only what they resolved to is reachable.
    new_vm(&mut w, "net-d", &["--egress-allow-domain", "allowed.test"]);
    assert_eq!(
        probe(&w, "net-d", OUTSIDE, 8080),
        Reach::Dropped,
        "no allowed name resolved to the address yet"
    );
    let (code, out, _) = bash(&w, "net-d", "getent hosts denied.test", &[]);
    assert_ne!(code, 0, "denied.test resolved: {out}");
    let (code, out, _) = bash(&w, "net-d", "getent hosts allowed.test", &[]);
    assert_eq!(code, 0, "allowed.test did not resolve");
    assert!(out.contains(OUTSIDE), "{out}");
    let body = fetch(&w, "net-d", "allowed.test", 8080, "/hello.txt");
    assert_eq!(body.as_deref().map(str::trim), Some(HELLO));

    // Deleting VMs leaves nothing of their network.
    for vm in ["net-a", "net-b", "net-d"] {
        w.d().hearth_ok(&["vm", "delete", vm]);
    }
    w.d().hearth_ok(&["network", "delete", "backend"]);
    assert_eq!(slots(&w.data()), Vec::<String>::new());
    assert_eq!(host_veths(), Vec::<String>::new());
}

/// The host ends of slots' veth pairs in the test's namespace.
fn host_veths() -> Vec<String> {
    let out = run(Command::new("ip").args(["-o", "link", "show"]));
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("hv"))
        .collect();
    names.sort();
    names
}

/// The VM addresses in the host rule set's anti-spoofing set: one per attached VM.
fn host_rule_vms() -> usize {
    let out = Command::new("nft")
        .args(["list", "set", "ip", "hearth", "vm_src"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // `elements = { "hv…" . 172.28.0.2, … }`, after the `type ifname . ipv4_addr` line.
    text.split_once("elements = {")
        .map_or(0, |(_, elements)| elements.matches(" . ").count())
}

#[test]
fn kill9_during_creates_and_deletes_leaks_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut w = World::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut live: Vec<String> = Vec::new();
    for i in 0..20 {
        // At most three VMs at once; otherwise create or delete at random.
        let create = live.len() < 3 && (live.is_empty() || next(2) == 0);
        let mut args: Vec<String> = if create {
            let name = format!("leak-{i}");
            let mut a = vec!["vm".into(), "new".into(), name.clone()];
            if next(3) == 0 {
                a.push("--no-start".into());
            }
            live.push(name);
            a
        } else {
            let victim = live.remove(usize::try_from(next(live.len() as u64)).unwrap());
            vec!["vm".into(), "delete".into(), victim]
        };
        args.insert(0, "--json".into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        if next(3) == 0 {
            // hearthd dies somewhere in the middle of it.
            let mut op = hearth_cmd(&argv)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(next(2500)));
            w.restart_after_kill9();
            let _ = op.wait();
        } else {
            let _ = w.d().hearth(&argv);
        }
    }
    // Once more, and let recovery settle everything.
    w.restart_after_kill9();
    let vms: Vec<serde_json::Value> =
        serde_json::from_str(&w.d().hearth_ok(&["--json", "vm", "list"])).unwrap();
    let mut running: Vec<String> = Vec::new();
    let mut addresses: Vec<String> = Vec::new();
    for vm in &vms {
        let name = vm["name"].as_str().unwrap();
        let detail = json_of(&w.d().hearth_ok(&["--json", "vm", "inspect", name]));
        addresses.push(detail["network"]["address"].as_str().unwrap().to_owned());
        if vm["state"] == "running" {
            running.push(format!(
                "hearth-{}-{}",
                instance(&w.data()),
                vm["id"].as_str().unwrap()
            ));
        }
    }
    running.sort();
    let mut unique = addresses.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        addresses.len(),
        "an address is held twice: {addresses:?}"
    );
    assert_eq!(slots(&w.data()), running, "slots vs running VMs");
    assert_eq!(host_veths().len(), running.len(), "veths vs running VMs");
    assert_eq!(host_rule_vms(), running.len(), "host rules vs running VMs");
    // And deleting all of them leaves nothing.
    for vm in &vms {
        w.d()
            .hearth_ok(&["vm", "delete", vm["name"].as_str().unwrap()]);
    }
    assert_eq!(slots(&w.data()), Vec::<String>::new());
    assert_eq!(host_veths(), Vec::<String>::new());
    assert_eq!(host_rule_vms(), 0);
}
