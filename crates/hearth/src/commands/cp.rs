//! `hearth vm cp SRC DST`: exactly one side is `NAME:/abs/path`, the other a local path or `-`.
//! Bodies are streamed both ways; uploads keep the local file's permission bits.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use futures_util::{Stream, StreamExt};
use hearth_api::ErrorCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::cli::CpArgs;
use crate::client::Client;
use crate::error::{CliError, Result};

const CHUNK: usize = 64 * 1024;

/// The local side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// `-`: stdin as the source, stdout as the destination.
    Stdio,
    Path(PathBuf),
}

/// One argument of `cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Local(Local),
    Guest { vm: String, path: String },
}

impl Endpoint {
    pub fn vm(&self) -> Option<&str> {
        match self {
            Endpoint::Guest { vm, .. } => Some(vm),
            Endpoint::Local(_) => None,
        }
    }
}

/// Which way the bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Upload {
        from: Local,
        vm: String,
        path: String,
    },
    Download {
        vm: String,
        path: String,
        to: Local,
    },
}

/// `-` is stdio; a path starting with `/` or `.` is local; `NAME:PATH` is in a VM (like
/// `docker cp`, write `./a:b` for a local file whose name has a colon); anything else is local.
pub fn parse_endpoint(arg: &str) -> Result<Endpoint> {
    if arg.is_empty() {
        return Err(CliError::input(
            ErrorCode::InvalidRequest,
            "an empty argument is neither a local path nor NAME:/path",
        ));
    }
    if arg == "-" {
        return Ok(Endpoint::Local(Local::Stdio));
    }
    let Some((vm, path)) = arg.split_once(':').filter(|_| !arg.starts_with(['/', '.'])) else {
        return Ok(Endpoint::Local(Local::Path(PathBuf::from(arg))));
    };
    if !is_vm_name(vm) {
        return Err(CliError::input(
            ErrorCode::InvalidName,
            format!(
                "`{vm}` in `{arg}` is not a VM name (for a local path with a colon, write `./{arg}`)"
            ),
        ));
    }
    if path.is_empty() {
        return Err(CliError::input(
            ErrorCode::InvalidPath,
            format!("`{arg}` names no path in the VM; write e.g. `{vm}:/root/file`"),
        ));
    }
    if !path.starts_with('/') {
        return Err(CliError::input(
            ErrorCode::InvalidPath,
            format!("the path in the VM must be absolute: `{arg}` (write `{vm}:/{path}`?)"),
        ));
    }
    Ok(Endpoint::Guest {
        vm: vm.to_owned(),
        path: path.to_owned(),
    })
}

/// Lowercase letters, digits and hyphens, starting with a letter, at most 63 characters.
fn is_vm_name(name: &str) -> bool {
    name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub fn plan(src: &str, dst: &str) -> Result<Plan> {
    match (parse_endpoint(src)?, parse_endpoint(dst)?) {
        (Endpoint::Local(from), Endpoint::Guest { vm, path }) => {
            Ok(Plan::Upload { from, vm, path })
        }
        (Endpoint::Guest { vm, path }, Endpoint::Local(to)) => Ok(Plan::Download { vm, path, to }),
        (Endpoint::Guest { .. }, Endpoint::Guest { .. }) => Err(CliError::input(
            ErrorCode::InvalidRequest,
            "cannot copy from one VM to another; copy to a local file first",
        )),
        (Endpoint::Local(_), Endpoint::Local(_)) => Err(CliError::input(
            ErrorCode::InvalidRequest,
            "one side of `cp` must be in a VM, written NAME:/abs/path",
        )),
    }
}

pub async fn run(client: &Client, args: &CpArgs) -> Result<()> {
    match plan(&args.src, &args.dst)? {
        Plan::Upload { from, vm, path } => upload(client, from, &vm, path).await,
        Plan::Download { vm, path, to } => download(client, &vm, &path, to).await,
    }
}

async fn upload(client: &Client, from: Local, vm: &str, path: String) -> Result<()> {
    match from {
        Local::Stdio => {
            if path.ends_with('/') {
                return Err(CliError::input(
                    ErrorCode::InvalidPath,
                    format!("stdin has no file name; give the whole path in the VM, not `{path}`"),
                ));
            }
            let body = reqwest::Body::wrap_stream(chunks(tokio::io::stdin()));
            client.put_file(vm, &path, None, body).await
        }
        Local::Path(local) => {
            let meta = std::fs::metadata(&local)
                .map_err(|e| CliError::io(format_args!("cannot read {}", local.display()), &e))?;
            if meta.is_dir() {
                return Err(CliError::input(
                    ErrorCode::InvalidRequest,
                    format!(
                        "{} is a directory; `cp` copies single files",
                        local.display()
                    ),
                ));
            }
            let path = guest_target(path, &local)?;
            let file = tokio::fs::File::open(&local)
                .await
                .map_err(|e| CliError::io(format_args!("cannot read {}", local.display()), &e))?;
            let mode = meta.permissions().mode() & 0o7777;
            let body = reqwest::Body::wrap_stream(chunks(file));
            client.put_file(vm, &path, Some(mode), body).await
        }
    }
}

/// `vm:/dir/` receives the local file under its own name.
fn guest_target(path: String, local: &Path) -> Result<String> {
    if !path.ends_with('/') {
        return Ok(path);
    }
    match local.file_name().and_then(|n| n.to_str()) {
        Some(name) => Ok(format!("{path}{name}")),
        None => Err(CliError::input(
            ErrorCode::InvalidPath,
            format!("{} has no file name to use in `{path}`", local.display()),
        )),
    }
}

/// The local file a download writes: `dst`, or `dst/<name>` when `dst` is a directory.
fn local_target(dst: &Path, guest_path: &str) -> Result<PathBuf> {
    let is_dir = dst.is_dir() || dst.as_os_str().to_string_lossy().ends_with('/');
    if !is_dir {
        return Ok(dst.to_owned());
    }
    match guest_path.rsplit('/').next().filter(|n| !n.is_empty()) {
        Some(name) => Ok(dst.join(name)),
        None => Err(CliError::input(
            ErrorCode::InvalidPath,
            format!(
                "`{guest_path}` names no file to copy into {}",
                dst.display()
            ),
        )),
    }
}

async fn download(client: &Client, vm: &str, path: &str, to: Local) -> Result<()> {
    let target = match &to {
        Local::Stdio => None,
        Local::Path(dst) => Some(local_target(dst, path)?),
    };
    let (mode, resp) = client.get_file(vm, path).await?;
    let body = resp.bytes_stream();
    let Some(target) = target else {
        return match copy_body(client, body, &mut tokio::io::stdout(), |_| {}).await {
            Err(CliError::Local {
                kind: "broken_pipe",
                ..
            }) => Ok(()),
            other => other,
        };
    };
    // A regular file (or none yet) is replaced only once the whole download is in: the bytes
    // go to a temporary file beside it, renamed over it at the end, so a failed download leaves
    // the old file as it was. Anything else (a device, a pipe) is written to directly.
    let target = match std::fs::symlink_metadata(&target) {
        Ok(meta) if meta.file_type().is_symlink() => std::fs::canonicalize(&target)
            .map_err(|e| CliError::io(format_args!("cannot resolve {}", target.display()), &e))?,
        _ => target,
    };
    let existing = std::fs::metadata(&target).ok();
    if existing.as_ref().is_some_and(|m| !m.is_file()) {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .map_err(|e| CliError::io(format_args!("cannot write {}", target.display()), &e))?;
        return copy_body(client, body, &mut tokio::fs::File::from_std(file), |_| {}).await;
    }
    let (file, temp) = temp_beside(&target)?;
    // An existing file keeps its own permission bits; a new one gets the guest's (less the
    // umask, as `cp` does).
    let mode = match &existing {
        Some(meta) => meta.permissions().mode() & 0o7777,
        None => mode.unwrap_or(0o666) & 0o777 & !current_umask(),
    };
    let mut file = tokio::fs::File::from_std(file);
    let written = async {
        copy_body(client, body, &mut file, |_| {}).await?;
        let io =
            |e: std::io::Error| CliError::io(format_args!("cannot write {}", target.display()), &e);
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .await
            .map_err(io)?;
        file.sync_all().await.map_err(io)?;
        std::fs::rename(&temp, &target).map_err(io)
    };
    let result = written.await;
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// A new, empty, private file in `target`'s directory, named after it.
fn temp_beside(target: &Path) -> Result<(std::fs::File, PathBuf)> {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = target
        .file_name()
        .map_or_else(|| "download".into(), |n| n.to_string_lossy().into_owned());
    let mut last = None;
    for attempt in 0..100u32 {
        let temp = dir.join(format!(
            ".{name}.hearth-{}-{attempt}.part",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
        {
            Ok(file) => return Ok((file, temp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                return Err(CliError::io(
                    format_args!("cannot write in {}", dir.display()),
                    &e,
                ));
            }
        }
    }
    let e = last.unwrap_or_else(|| std::io::Error::other("no free temporary name"));
    Err(CliError::io(
        format_args!("cannot write in {}", dir.display()),
        &e,
    ))
}

/// The process's umask (read by setting it and putting it back).
fn current_umask() -> u32 {
    use nix::sys::stat::{Mode, umask};
    let old = umask(Mode::from_bits_truncate(0o077));
    umask(old);
    old.bits()
}

/// Writes a response body to `out`, telling `written` each chunk's length.
pub(crate) async fn copy_body(
    client: &Client,
    body: impl Stream<Item = reqwest::Result<impl AsRef<[u8]>>>,
    out: &mut (impl AsyncWrite + Unpin),
    mut written: impl FnMut(u64),
) -> Result<()> {
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| client.transport_error(&e))?;
        out.write_all(chunk.as_ref()).await.map_err(write_error)?;
        written(chunk.as_ref().len() as u64);
    }
    out.flush().await.map_err(write_error)
}

pub(crate) fn write_error(err: std::io::Error) -> CliError {
    if err.kind() == std::io::ErrorKind::BrokenPipe {
        return CliError::Local {
            kind: "broken_pipe",
            message: "the output was closed".into(),
            hint: None,
        };
    }
    CliError::io("writing the copy failed", &err)
}

/// A reader as a stream of chunks for a streamed request body; ends after the first error.
pub(crate) fn chunks<R: AsyncRead + Send + Unpin + 'static>(
    reader: R,
) -> impl Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    futures_util::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        let mut buf = vec![0; CHUNK];
        match reader.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), Some(reader)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(vm: &str, path: &str) -> Endpoint {
        Endpoint::Guest {
            vm: vm.into(),
            path: path.into(),
        }
    }

    fn local(path: &str) -> Endpoint {
        Endpoint::Local(Local::Path(path.into()))
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            parse_endpoint("demo:/etc/hosts").unwrap(),
            guest("demo", "/etc/hosts")
        );
        assert_eq!(parse_endpoint("a-1:/x:y").unwrap(), guest("a-1", "/x:y"));
        assert_eq!(parse_endpoint("-").unwrap(), Endpoint::Local(Local::Stdio));
        assert_eq!(parse_endpoint("file.txt").unwrap(), local("file.txt"));
        assert_eq!(parse_endpoint("./demo:/x").unwrap(), local("./demo:/x"));
        assert_eq!(parse_endpoint("/tmp/a:b").unwrap(), local("/tmp/a:b"));
        assert_eq!(parse_endpoint("demo:/x").unwrap().vm(), Some("demo"));
        assert_eq!(parse_endpoint("x").unwrap().vm(), None);
    }

    #[test]
    fn endpoint_errors_say_what_to_write() {
        let err = parse_endpoint("demo:etc/hosts").unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidPath));
        assert!(
            err.message().contains("must be absolute"),
            "{}",
            err.message()
        );
        assert!(
            err.message().contains("`demo:/etc/hosts`"),
            "{}",
            err.message()
        );
        let err = parse_endpoint("demo:").unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidPath));
        let err = parse_endpoint("Demo:/x").unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidName));
        assert!(err.message().contains("`./Demo:/x`"), "{}", err.message());
        assert!(parse_endpoint("").is_err());
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn exactly_one_side_is_in_a_vm() {
        assert_eq!(
            plan("./a", "demo:/tmp/a").unwrap(),
            Plan::Upload {
                from: Local::Path("./a".into()),
                vm: "demo".into(),
                path: "/tmp/a".into()
            }
        );
        assert_eq!(
            plan("demo:/tmp/a", "-").unwrap(),
            Plan::Download {
                vm: "demo".into(),
                path: "/tmp/a".into(),
                to: Local::Stdio
            }
        );
        let err = plan("a:/x", "b:/y").unwrap_err();
        assert!(
            err.message().contains("one VM to another"),
            "{}",
            err.message()
        );
        let err = plan("a", "-").unwrap_err();
        assert!(
            err.message().contains("NAME:/abs/path"),
            "{}",
            err.message()
        );
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn directories_receive_the_file_under_its_name() {
        assert_eq!(
            guest_target("/tmp/".into(), Path::new("dir/f.txt")).unwrap(),
            "/tmp/f.txt"
        );
        assert_eq!(
            guest_target("/tmp/g".into(), Path::new("f.txt")).unwrap(),
            "/tmp/g"
        );
        let dir = std::env::temp_dir();
        assert_eq!(local_target(&dir, "/etc/hosts").unwrap(), dir.join("hosts"));
        assert_eq!(
            local_target(Path::new("out/"), "/etc/hosts").unwrap(),
            Path::new("out/hosts")
        );
        assert_eq!(
            local_target(Path::new("x.txt"), "/etc/hosts").unwrap(),
            Path::new("x.txt")
        );
        assert!(local_target(&dir, "/").is_err());
    }

    #[tokio::test]
    async fn chunks_stream_the_whole_reader() {
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let got: Vec<Vec<u8>> = chunks(std::io::Cursor::new(data.clone()))
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert!(got.len() >= 4 && got.iter().all(|c| c.len() <= CHUNK));
        assert_eq!(got.concat(), data);
    }
}
