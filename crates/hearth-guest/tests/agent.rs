//! Runs the real agent binary with `--unix` against a socket this test listens on, and drives it
//! through the wire protocol the way `hearthd` does.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use hearth_guest_proto::{
    CHUNK_LEN, DATA_WINDOW, Decoder, ErrorCode, Event, FEATURE_CREDIT, Frame, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION, PtySize, Request, RequestId, ShutdownAction, Stream, encode,
};

/// Upper bound for any single answer; generous because the machine may be busy building.
const ANSWER: Duration = Duration::from_secs(20);

/// The agent process and our end of its connection. Dropping it closes the connection, which
/// makes the agent kill its execs and exit; it is killed if it does not.
struct Agent {
    child: Child,
    stream: Option<UnixStream>,
    events: mpsc::Receiver<Frame<Event>>,
    /// Events read while waiting for another exchange's.
    pending: VecDeque<Frame<Event>>,
    /// Credit granted per exchange and not yet taken by [`Agent::credit`]; `credit` events never
    /// reach `pending`.
    credits: HashMap<RequestId, u64>,
    dir: tempfile::TempDir,
}

/// Everything an exec exchange produced.
#[derive(Debug, Default)]
struct ExecResult {
    pid: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    error: Option<(ErrorCode, String)>,
    largest_chunk: usize,
}

impl ExecResult {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

fn exec(id: RequestId, argv: &[&str]) -> Request {
    Request::Exec {
        id,
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        env: Vec::new(),
        cwd: None,
        stdin: false,
        pty: None,
        timeout_ms: None,
    }
}

fn sh(id: RequestId, script: &str) -> Request {
    exec(id, &["sh", "-c", script])
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_hearth-guest"))
            .arg("--unix")
            .arg(&socket)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + ANSWER;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        panic!("the agent did not connect");
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                Err(err) => panic!("accept: {err}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        let (tx, events) = mpsc::channel();
        let mut reader = stream.try_clone().unwrap();
        thread::spawn(move || {
            let mut decoder = Decoder::<Event>::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                decoder.extend(&buf[..n]);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => {
                            if tx.send(frame).is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(err) => panic!("the agent sent a bad frame: {err}"),
                    }
                }
            }
        });
        Agent {
            child,
            stream: Some(stream),
            events,
            pending: VecDeque::new(),
            credits: HashMap::new(),
            dir,
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn send(&mut self, request: &Request, payload: &[u8]) {
        self.send_raw(&encode(request, payload).unwrap());
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.as_mut().unwrap().write_all(bytes).unwrap();
    }

    /// The next event of exchange `id` (`None`: the hello), within [`ANSWER`].
    fn recv(&mut self, id: Option<RequestId>) -> Frame<Event> {
        self.try_recv(id, ANSWER)
            .unwrap_or_else(|| panic!("no event for {id:?} within {ANSWER:?}"))
    }

    fn try_recv(&mut self, id: Option<RequestId>, timeout: Duration) -> Option<Frame<Event>> {
        if let Some(at) = self.pending.iter().position(|f| f.message.id() == id) {
            return self.pending.remove(at);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Frame {
                    message: Event::Credit { id, bytes },
                    ..
                }) => *self.credits.entry(id).or_default() += bytes,
                Ok(frame) if frame.message.id() == id => return Some(frame),
                Ok(frame) => self.pending.push_back(frame),
                Err(_) => return None,
            }
        }
    }

    /// Collects an exec exchange until `exited` or `error`.
    fn collect(&mut self, id: RequestId) -> ExecResult {
        let mut result = ExecResult::default();
        loop {
            let frame = self.recv(Some(id));
            match frame.message {
                Event::Started { pid, .. } => result.pid = Some(pid),
                Event::Output { stream, .. } => {
                    result.largest_chunk = result.largest_chunk.max(frame.payload.len());
                    match stream {
                        Stream::Stdout => result.stdout.extend(&frame.payload),
                        Stream::Stderr => result.stderr.extend(&frame.payload),
                    }
                }
                Event::Exited {
                    code,
                    signal,
                    timed_out,
                    ..
                } => {
                    result.code = code;
                    result.signal = signal;
                    result.timed_out = timed_out;
                    return result;
                }
                Event::Error { code, message, .. } => {
                    result.error = Some((code, message));
                    return result;
                }
                other => panic!("unexpected event in an exec: {other:?}"),
            }
        }
    }

    /// Says hello as a host with every feature (credit windows included) and waits for the answer.
    fn hello(&mut self) {
        self.send(&Request::hello(), &[]);
        assert!(matches!(self.recv(None).message, Event::Hello { .. }));
    }

    /// Credit granted for exchange `id` since the last call, waiting up to `timeout` for some
    /// (0 if none came). Other events wait in `pending`.
    fn credit(&mut self, id: RequestId, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(granted) = self.credits.remove(&id) {
                return granted;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Frame {
                    message: Event::Credit { id, bytes },
                    ..
                }) => *self.credits.entry(id).or_default() += bytes,
                Ok(frame) => self.pending.push_back(frame),
                Err(_) => return 0,
            }
        }
    }

    /// Sends `data` for exchange `id` as a host that honours credit windows: never more than it
    /// was granted. Returns the credit left over.
    fn send_within_credit(&mut self, id: RequestId, data: &[u8], mut credit: u64) -> u64 {
        let mut rest = data;
        while !rest.is_empty() {
            if credit == 0 {
                credit += self.credit(id, ANSWER);
                assert!(credit > 0, "no credit for {id} within {ANSWER:?}");
            }
            let n = rest
                .len()
                .min(CHUNK_LEN)
                .min(usize::try_from(credit).unwrap());
            self.send(&Request::Data { id }, &rest[..n]);
            credit -= n as u64;
            rest = &rest[n..];
        }
        credit
    }

    fn run(&mut self, request: Request) -> ExecResult {
        let id = request.id().unwrap();
        self.send(&request, &[]);
        self.collect(id)
    }

    /// Waits for `started` of exec `id`; returns its pid.
    fn started(&mut self, id: RequestId) -> u32 {
        match self.recv(Some(id)).message {
            Event::Started { pid, .. } => pid,
            other => panic!("expected started, got {other:?}"),
        }
    }

    fn expect_error(&mut self, id: RequestId) -> (ErrorCode, String) {
        match self.recv(Some(id)).message {
            Event::Error { code, message, .. } => (code, message),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// Closes our end and waits for the agent to exit on its own.
    fn close(mut self) -> ExitStatus {
        // The reader thread holds a clone of the socket: shut it down rather than drop it.
        let stream = self.stream.take().unwrap();
        stream.shutdown(std::net::Shutdown::Both).unwrap();
        self.wait_exit()
            .expect("the agent did not exit after the peer closed")
    }

    fn wait_exit(&mut self) -> Option<ExitStatus> {
        let deadline = Instant::now() + ANSWER;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `pid` is gone (or a zombie waiting for its reaper).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn wait_gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if process_gone(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn hello_is_answered_every_time() {
    let mut agent = Agent::start();
    agent.send(&Request::hello(), &[]);
    // A version-1 host's hello: no range, no features.
    agent.send_raw(&raw_frame(r#"{"type":"hello","protocol":1}"#, &[]));
    let mut boot_ids = Vec::new();
    for _ in 0..2 {
        match agent.recv(None).message {
            Event::Hello {
                protocol,
                protocol_min,
                features,
                agent_version,
                boot_id,
                instance,
            } => {
                assert_eq!(protocol, PROTOCOL_VERSION);
                assert_eq!(protocol_min, Some(MIN_PROTOCOL_VERSION));
                assert_eq!(features, vec![FEATURE_CREDIT.to_owned()]);
                assert_eq!(agent_version, env!("CARGO_PKG_VERSION"));
                assert!(!boot_id.is_empty());
                assert!(!instance.is_empty());
                boot_ids.push(boot_id);
            }
            other => panic!("expected hello, got {other:?}"),
        }
    }
    assert_eq!(boot_ids[0], boot_ids[1]);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(boot_ids[0], kernel.trim());
}

#[test]
fn exec_streams_stdout_stderr_and_the_exit_code() {
    let mut agent = Agent::start();
    let result = agent.run(sh(1, "echo out; echo err >&2; exit 3"));
    assert_eq!(result.error, None);
    assert!(result.pid.is_some());
    assert_eq!(result.stdout(), "out\n");
    assert_eq!(result.stderr, b"err\n");
    assert_eq!(
        (result.code, result.signal, result.timed_out),
        (Some(3), None, false)
    );
}

#[test]
fn exec_gets_its_env_and_cwd() {
    let mut agent = Agent::start();
    let dir = agent.dir().canonicalize().unwrap();
    let request = Request::Exec {
        id: 1,
        argv: vec![
            "sh".into(),
            "-c".into(),
            r#"echo "$FOO|$HOME|${TERM-unset}|$PATH"; pwd"#.into(),
        ],
        env: vec![("FOO".into(), "bar baz".into())],
        cwd: Some(dir.to_str().unwrap().into()),
        stdin: false,
        pty: None,
        timeout_ms: None,
    };
    let result = agent.run(request);
    assert_eq!(
        result.stdout(),
        format!(
            "bar baz|/root|unset|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n{}\n",
            dir.display()
        )
    );
    assert_eq!(result.code, Some(0));

    // The default working directory is /.
    assert_eq!(agent.run(exec(2, &["pwd"])).stdout(), "/\n");
}

#[test]
fn exec_reads_stdin_from_data_frames() {
    let mut agent = Agent::start();
    let request = Request::Exec {
        id: 5,
        argv: vec!["cat".into()],
        env: Vec::new(),
        cwd: None,
        stdin: true,
        pty: None,
        timeout_ms: None,
    };
    agent.send(&request, &[]);
    agent.send(&Request::Data { id: 5 }, b"hello ");
    agent.send(&Request::Data { id: 5 }, b"world");
    agent.send(&Request::Data { id: 5 }, b"");
    let result = agent.collect(5);
    assert_eq!(result.stdout(), "hello world");
    assert_eq!(result.code, Some(0));

    // Without `stdin: true` the process reads /dev/null.
    let result = agent.run(exec(6, &["cat"]));
    assert_eq!((result.stdout(), result.code), (String::new(), Some(0)));
}

#[test]
fn large_output_arrives_whole_in_bounded_chunks() {
    let mut agent = Agent::start();
    let result = agent.run(exec(1, &["head", "-c", "1000000", "/dev/zero"]));
    assert_eq!(result.code, Some(0));
    assert_eq!(result.stdout.len(), 1_000_000);
    assert!(
        result.largest_chunk <= CHUNK_LEN,
        "{}",
        result.largest_chunk
    );
}

#[test]
fn timeout_kills_the_process_group() {
    let mut agent = Agent::start();
    let start = Instant::now();
    let request = Request::Exec {
        id: 1,
        argv: vec!["sh".into(), "-c".into(), "sleep 30; echo never".into()],
        env: Vec::new(),
        cwd: None,
        stdin: false,
        pty: None,
        timeout_ms: Some(300),
    };
    let result = agent.run(request);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(result.timed_out);
    assert_eq!((result.code, result.signal), (None, Some(9)));
    assert_eq!(result.stdout(), "");
}

#[test]
fn pty_exec_has_a_terminal_of_the_requested_size() {
    let mut agent = Agent::start();
    let request = Request::Exec {
        id: 1,
        argv: vec![
            "sh".into(),
            "-c".into(),
            "tty; stty size; echo $TERM; echo err >&2".into(),
        ],
        env: Vec::new(),
        cwd: None,
        stdin: false,
        pty: Some(PtySize {
            rows: 33,
            cols: 101,
        }),
        timeout_ms: Some(15_000),
    };
    let result = agent.run(request);
    let out = result.stdout().replace('\r', "");
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert!(out.contains("\n33 101\n"), "{out:?}");
    assert!(out.contains("\nxterm-256color\n"), "{out:?}");
    // A PTY has one stream: stderr arrives as stdout.
    assert!(out.ends_with("err\n"), "{out:?}");
    assert!(result.stderr.is_empty());
    assert_eq!(result.code, Some(0));
}

#[test]
fn pty_resize_and_stdin() {
    let mut agent = Agent::start();
    let request = Request::Exec {
        id: 1,
        argv: vec![
            "sh".into(),
            "-c".into(),
            "stty size; read line; echo got $line; stty size".into(),
        ],
        env: Vec::new(),
        cwd: None,
        stdin: true,
        pty: Some(PtySize { rows: 24, cols: 80 }),
        timeout_ms: Some(15_000),
    };
    agent.send(&request, &[]);
    agent.started(1);
    // Wait for the first size, so the resize surely comes after it.
    let mut first = Vec::new();
    while !String::from_utf8_lossy(&first).contains("24 80") {
        let frame = agent.recv(Some(1));
        match frame.message {
            Event::Output { .. } => first.extend(frame.payload),
            other => panic!("expected output, got {other:?}"),
        }
    }
    agent.send(
        &Request::Resize {
            id: 1,
            size: PtySize {
                rows: 40,
                cols: 120,
            },
        },
        &[],
    );
    agent.send(&Request::Data { id: 1 }, b"hi\n");
    let rest = agent.collect(1);
    let text = rest.stdout().replace('\r', "");
    assert!(text.contains("got hi\n40 120\n"), "{text:?}");
    assert_eq!(rest.code, Some(0));
}

#[test]
fn exec_errors() {
    let mut agent = Agent::start();
    let result = agent.run(exec(1, &["no-such-program-hearth"]));
    let (code, message) = result.error.unwrap();
    assert_eq!(code, ErrorCode::NotFound);
    assert!(message.contains("no-such-program-hearth"), "{message}");

    let result = agent.run(exec(2, &["/nonexistent/prog"]));
    assert_eq!(result.error.unwrap().0, ErrorCode::NotFound);

    let result = agent.run(exec(3, &[]));
    assert_eq!(result.error.unwrap().0, ErrorCode::InvalidRequest);

    let mut request = exec(4, &["true"]);
    if let Request::Exec { cwd, .. } = &mut request {
        *cwd = Some("/nonexistent-dir-hearth".into());
    }
    let result = agent.run(request);
    assert_eq!(result.error.unwrap().0, ErrorCode::NotFound);

    // A second exec with an id that is still running is refused; the first goes on.
    agent.send(&exec(5, &["sleep", "30"]), &[]);
    let pid = agent.started(5);
    agent.send(&exec(5, &["true"]), &[]);
    assert_eq!(agent.expect_error(5).0, ErrorCode::DuplicateId);
    assert!(!process_gone(pid));
    agent.send(&Request::Cancel { id: 5 }, &[]);
    let result = agent.collect(5);
    assert_eq!(result.signal, Some(9));

    // Once an exchange ended, its id may be used again.
    let result = agent.run(exec(5, &["true"]));
    assert_eq!(result.code, Some(0));
}

#[test]
fn a_slow_exec_does_not_block_a_quick_one_and_cancel_kills_it() {
    let mut agent = Agent::start();
    agent.send(&exec(1, &["sleep", "30"]), &[]);
    let slow = agent.started(1);
    let start = Instant::now();
    let quick = agent.run(exec(2, &["echo", "quick"]));
    assert_eq!(quick.stdout(), "quick\n");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(!process_gone(slow), "the slow exec must still run");

    agent.send(&Request::Cancel { id: 1 }, &[]);
    let result = agent.collect(1);
    assert_eq!(
        (result.code, result.signal, result.timed_out),
        (None, Some(9), false)
    );
    assert!(wait_gone(slow, Duration::from_secs(5)));
}

#[test]
fn signal_reaches_the_process_group() {
    let mut agent = Agent::start();
    // The shell waits for its child; both are in the group, and SIGTERM ends both.
    agent.send(&sh(1, "sleep 30; echo survived"), &[]);
    agent.started(1);
    agent.send(&Request::Signal { id: 1, signal: 15 }, &[]);
    let result = agent.collect(1);
    assert_eq!(result.signal, Some(15));
    assert_eq!(result.stdout(), "");
}

#[test]
fn a_background_child_holding_stdout_does_not_hang_the_exec() {
    let mut agent = Agent::start();
    let start = Instant::now();
    let result = agent.run(sh(1, "sleep 30 & echo started"));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(result.stdout(), "started\n");
    assert_eq!(result.code, Some(0));
    // The group outlives the shell; clean it up.
    let pgid = i32::try_from(result.pid.unwrap()).unwrap();
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[test]
fn put_then_get_ten_mebibytes() {
    let mut agent = Agent::start();
    let path = agent.dir().join("sub/dir/blob.bin");
    let data = pseudo_random(10 * 1024 * 1024 + 123, 0x1234_5678_9abc_def0);
    let put = Request::PutFile {
        id: 1,
        path: path.to_str().unwrap().into(),
        mode: 0o640,
    };
    agent.send(&put, &[]);
    for chunk in data.chunks(CHUNK_LEN) {
        agent.send(&Request::Data { id: 1 }, chunk);
    }
    agent.send(&Request::Data { id: 1 }, &[]);
    match agent.recv(Some(1)).message {
        Event::Done { id: 1 } => {}
        other => panic!("expected done, got {other:?}"),
    }
    assert!(
        std::fs::read(&path).unwrap() == data,
        "file on disk differs"
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o640);
    // Only the file itself: no temporary file is left behind.
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1
    );

    agent.send(
        &Request::GetFile {
            id: 2,
            path: path.to_str().unwrap().into(),
            window: None,
        },
        &[],
    );
    match agent.recv(Some(2)).message {
        Event::FileInfo { size, mode, .. } => {
            assert_eq!(size, data.len() as u64);
            assert_eq!(mode, 0o640);
        }
        other => panic!("expected file_info, got {other:?}"),
    }
    let mut got = Vec::with_capacity(data.len());
    loop {
        let frame = agent.recv(Some(2));
        match frame.message {
            Event::Data { .. } if frame.payload.is_empty() => break,
            Event::Data { .. } => {
                assert!(frame.payload.len() <= CHUNK_LEN);
                got.extend(frame.payload);
            }
            other => panic!("expected data, got {other:?}"),
        }
    }
    assert!(got == data, "got {} bytes, not the same", got.len());
}

#[test]
fn put_replaces_an_existing_file() {
    let mut agent = Agent::start();
    let path = agent.dir().join("file");
    std::fs::write(&path, "old contents").unwrap();
    let put = Request::PutFile {
        id: 1,
        path: path.to_str().unwrap().into(),
        mode: 0o755,
    };
    agent.send(&put, &[]);
    agent.send(&Request::Data { id: 1 }, b"new");
    agent.send(&Request::Data { id: 1 }, &[]);
    assert!(matches!(agent.recv(Some(1)).message, Event::Done { .. }));
    assert_eq!(std::fs::read(&path).unwrap(), b"new");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o755);
}

#[test]
fn file_errors() {
    let mut agent = Agent::start();
    let missing = agent.dir().join("missing");
    agent.send(
        &Request::GetFile {
            id: 1,
            path: missing.to_str().unwrap().into(),
            window: None,
        },
        &[],
    );
    assert_eq!(agent.expect_error(1).0, ErrorCode::NotFound);

    let dir = agent.dir().to_str().unwrap().to_owned();
    agent.send(
        &Request::GetFile {
            id: 2,
            path: dir,
            window: None,
        },
        &[],
    );
    assert_eq!(agent.expect_error(2).0, ErrorCode::InvalidRequest);

    agent.send(
        &Request::GetFile {
            id: 3,
            path: "relative/path".into(),
            window: None,
        },
        &[],
    );
    assert_eq!(agent.expect_error(3).0, ErrorCode::InvalidRequest);

    agent.send(
        &Request::PutFile {
            id: 4,
            path: "relative".into(),
            mode: 0o644,
        },
        &[],
    );
    assert_eq!(agent.expect_error(4).0, ErrorCode::InvalidRequest);
    // Data for an exchange that already failed is ignored.
    agent.send(&Request::Data { id: 4 }, b"ignored");
    agent.send(&Request::Data { id: 4 }, &[]);

    // A parent that is a regular file.
    let file = agent.dir().join("plain");
    std::fs::write(&file, "x").unwrap();
    agent.send(
        &Request::PutFile {
            id: 5,
            path: file.join("child").to_str().unwrap().into(),
            mode: 0o644,
        },
        &[],
    );
    agent.send(&Request::Data { id: 5 }, &[]);
    let (code, _) = agent.expect_error(5);
    assert_ne!(code, ErrorCode::DuplicateId);

    agent.send(&Request::Ping { id: 6 }, &[]);
    assert!(matches!(agent.recv(Some(6)).message, Event::Done { .. }));
    assert!(agent.pending.is_empty(), "{:?}", agent.pending);
}

#[test]
fn cancelled_put_leaves_nothing_behind() {
    let mut agent = Agent::start();
    let path = agent.dir().join("out/file");
    agent.send(
        &Request::PutFile {
            id: 1,
            path: path.to_str().unwrap().into(),
            mode: 0o644,
        },
        &[],
    );
    agent.send(&Request::Data { id: 1 }, b"partial");
    agent.send(&Request::Cancel { id: 1 }, &[]);
    // Ping is answered after the cancel was handled.
    agent.send(&Request::Ping { id: 2 }, &[]);
    assert!(matches!(agent.recv(Some(2)).message, Event::Done { .. }));
    let deadline = Instant::now() + Duration::from_secs(5);
    let dir = path.parent().unwrap();
    while std::fs::read_dir(dir).map_or(0, Iterator::count) > 0 {
        assert!(
            Instant::now() < deadline,
            "a temporary file was left behind"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        agent
            .try_recv(Some(1), Duration::from_millis(300))
            .is_none()
    );
}

#[test]
fn garbage_is_skipped_and_ping_is_answered() {
    let mut agent = Agent::start();
    agent.send_raw(b"this is not a frame HRT");
    // A frame whose header is not a request.
    let mut bogus = b"HRTH".to_vec();
    bogus.extend_from_slice(&2u32.to_le_bytes());
    bogus.extend_from_slice(&0u32.to_le_bytes());
    bogus.extend_from_slice(b"{}");
    agent.send_raw(&bogus);
    agent.send(&Request::Ping { id: 9 }, &[]);
    match agent.recv(Some(9)).message {
        Event::Done { id: 9 } => {}
        other => panic!("expected done, got {other:?}"),
    }
}

#[test]
fn shutdown_answers_done_and_exits() {
    let mut agent = Agent::start();
    agent.send(
        &Request::Shutdown {
            id: 3,
            action: ShutdownAction::Poweroff,
        },
        &[],
    );
    assert!(matches!(agent.recv(Some(3)).message, Event::Done { id: 3 }));
    let status = agent
        .wait_exit()
        .expect("the agent did not exit after shutdown");
    assert!(status.success(), "{status:?}");
}

#[test]
fn closing_the_connection_kills_running_execs() {
    let mut agent = Agent::start();
    agent.send(&exec(1, &["sleep", "30"]), &[]);
    let pid = agent.started(1);
    assert!(!process_gone(pid));
    let status = agent.close();
    assert!(status.success(), "{status:?}");
    assert!(
        wait_gone(pid, Duration::from_secs(5)),
        "exec {pid} survived"
    );
}

#[test]
fn version_and_bad_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth-guest"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    assert!(
        text.contains(&format!("protocol {PROTOCOL_VERSION}")),
        "{text}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_hearth-guest"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
}

#[test]
fn an_unrepresentable_timeout_means_none() {
    let mut agent = Agent::start();
    let mut request = exec(1, &["true"]);
    if let Request::Exec { timeout_ms, .. } = &mut request {
        *timeout_ms = Some(u64::MAX);
    }
    let result = agent.run(request);
    assert_eq!((result.code, result.timed_out), (Some(0), false));
}

/// An exec that never reads its stdin, fed from an endless source by a host that keeps to its
/// windows: the agent lets in one window (plus what the pipe holds) and no more, however long the
/// host keeps trying. A host that then sends beyond the window is refused at once.
#[test]
fn endless_stdin_into_a_process_that_does_not_read_stays_bounded() {
    let mut agent = Agent::start();
    agent.hello();
    let mut request = exec(1, &["sleep", "30"]);
    if let Request::Exec { stdin, .. } = &mut request {
        *stdin = true;
    }
    agent.send(&request, &[]);
    let pid = agent.started(1);
    let rss_before = rss_kib(agent.child.id());
    let zeros = vec![0u8; CHUNK_LEN];
    let (mut granted, mut sent) = (0u64, 0u64);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        granted += agent.credit(1, Duration::from_millis(20));
        while sent < granted {
            let n = usize::try_from(granted - sent).unwrap().min(CHUNK_LEN);
            agent.send(&Request::Data { id: 1 }, &zeros[..n]);
            sent += n as u64;
        }
    }
    assert!(
        granted >= DATA_WINDOW,
        "the first window was {granted} bytes"
    );
    // The window, plus what the pipe to `sleep` took (64 KiB by default, one chunk in flight).
    let bound = DATA_WINDOW + 4 * CHUNK_LEN as u64;
    assert!(
        granted <= bound,
        "{granted} bytes let in, more than {bound}"
    );
    let grown = rss_kib(agent.child.id()).saturating_sub(rss_before);
    assert!(grown < 8 * 1024, "the agent grew by {grown} KiB");

    // Beyond the window: the exchange ends with an error, and its process with it.
    agent.send(&Request::Data { id: 1 }, &zeros);
    let (code, message) = agent.expect_error(1);
    assert_eq!(code, ErrorCode::InvalidRequest);
    assert!(message.contains("credit"), "{message}");
    assert!(
        wait_gone(pid, Duration::from_secs(5)),
        "exec {pid} survived"
    );
}

/// Data keeps flowing through the windows: to a process that reads its stdin, and into a file.
#[test]
fn stdin_and_uploads_flow_through_credit_windows() {
    let mut agent = Agent::start();
    agent.hello();
    let data = pseudo_random(4 * 1024 * 1024 + 7, 0x0bad_cafe);
    let mut request = exec(1, &["wc", "-c"]);
    if let Request::Exec { stdin, .. } = &mut request {
        *stdin = true;
    }
    agent.send(&request, &[]);
    agent.started(1);
    agent.send_within_credit(1, &data, 0);
    agent.send(&Request::Data { id: 1 }, &[]);
    let result = agent.collect(1);
    assert_eq!(result.stdout().trim(), data.len().to_string());
    assert_eq!(result.code, Some(0));

    let path = agent.dir().join("upload.bin");
    let put = Request::PutFile {
        id: 2,
        path: path.to_str().unwrap().into(),
        mode: 0o600,
    };
    agent.send(&put, &[]);
    agent.send_within_credit(2, &data, 0);
    agent.send(&Request::Data { id: 2 }, &[]);
    match agent.recv(Some(2)).message {
        Event::Done { .. } => {}
        other => panic!("expected done, got {other:?}"),
    }
    assert!(
        std::fs::read(&path).unwrap() == data,
        "the uploaded file differs"
    );
}

/// A host that did not announce credit windows (a version-1 host) is served as before: it may
/// send without waiting for credit.
#[test]
fn a_host_without_credit_windows_is_not_held_to_them() {
    let mut agent = Agent::start();
    agent.send_raw(&raw_frame(r#"{"type":"hello","protocol":1}"#, &[]));
    assert!(matches!(agent.recv(None).message, Event::Hello { .. }));
    let mut request = exec(1, &["wc", "-c"]);
    if let Request::Exec { stdin, .. } = &mut request {
        *stdin = true;
    }
    agent.send(&request, &[]);
    agent.started(1);
    let data = vec![7u8; 3 * usize::try_from(DATA_WINDOW).unwrap()];
    for chunk in data.chunks(CHUNK_LEN) {
        agent.send(&Request::Data { id: 1 }, chunk);
    }
    agent.send(&Request::Data { id: 1 }, &[]);
    let result = agent.collect(1);
    assert_eq!(result.error, None);
    assert_eq!(result.stdout().trim(), data.len().to_string());
}

/// A request of a type the agent does not know is answered at once with `unknown_request`, the
/// frames after it are read normally, and an open exchange it names ends.
#[test]
fn unknown_requests_are_answered_with_a_typed_error() {
    let mut agent = Agent::start();
    let unknown = |id: u64| {
        // The payload holds the magic: framing must not be lost inside it.
        raw_frame(
            &format!(r#"{{"type":"teleport","id":{id},"to":"mars"}}"#),
            b"HRTH and more",
        )
    };
    agent.send_raw(&unknown(7));
    agent.send(&Request::Ping { id: 8 }, &[]);
    let (code, message) = agent.expect_error(7);
    assert_eq!(code, ErrorCode::UnknownRequest);
    assert!(message.contains("teleport"), "{message}");
    assert!(matches!(agent.recv(Some(8)).message, Event::Done { id: 8 }));

    agent.send(&exec(9, &["sleep", "30"]), &[]);
    let pid = agent.started(9);
    agent.send_raw(&unknown(9));
    assert_eq!(agent.expect_error(9).0, ErrorCode::UnknownRequest);
    assert!(
        wait_gone(pid, Duration::from_secs(5)),
        "exec {pid} survived"
    );

    // A known type with wrong fields: `invalid_request`, at once.
    agent.send_raw(&raw_frame(r#"{"type":"exec","id":10}"#, &[]));
    assert_eq!(agent.expect_error(10).0, ErrorCode::InvalidRequest);
    agent.send(&Request::Ping { id: 11 }, &[]);
    assert!(matches!(agent.recv(Some(11)).message, Event::Done { .. }));
    assert!(agent.pending.is_empty(), "{:?}", agent.pending);
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A frame with a hand-written JSON header: messages this crate's enums cannot express.
fn raw_frame(header: &str, payload: &[u8]) -> Vec<u8> {
    let mut frame = b"HRTH".to_vec();
    frame.extend_from_slice(&u32::try_from(header.len()).unwrap().to_le_bytes());
    frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
    frame.extend_from_slice(header.as_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A windowed download sends no more than the host granted, waits, and goes on as credit comes.
#[test]
fn a_windowed_download_keeps_to_its_credit() {
    let mut agent = Agent::start();
    let path = agent.dir().join("big.bin");
    let data = pseudo_random(1024 * 1024 + 5, 0x5eed);
    std::fs::write(&path, &data).unwrap();
    let window = 2 * CHUNK_LEN;
    agent.send(
        &Request::GetFile {
            id: 1,
            path: path.to_str().unwrap().into(),
            window: Some(window as u64),
        },
        &[],
    );
    assert!(matches!(
        agent.recv(Some(1)).message,
        Event::FileInfo { .. }
    ));
    let mut got = Vec::new();
    while got.len() < window {
        let frame = agent.recv(Some(1));
        assert!(
            matches!(frame.message, Event::Data { .. }) && !frame.payload.is_empty(),
            "expected data, got {:?}",
            frame.message
        );
        got.extend(frame.payload);
    }
    assert_eq!(got.len(), window);
    // The window is used up: nothing more comes until the host grants more.
    let more = agent.try_recv(Some(1), Duration::from_millis(300));
    assert!(more.is_none(), "sent beyond the window: {more:?}");
    agent.send(
        &Request::Credit {
            id: 1,
            bytes: data.len() as u64,
        },
        &[],
    );
    loop {
        let frame = agent.recv(Some(1));
        match frame.message {
            Event::Data { .. } if frame.payload.is_empty() => break,
            Event::Data { .. } => got.extend(frame.payload),
            other => panic!("expected data, got {other:?}"),
        }
    }
    assert!(got == data, "got {} bytes, not the file", got.len());
}
