//! The export format: one stopped VM as a tar stream, written and read in one pass.
//!
//! Members, in this order and no others:
//! 1. `manifest.json` — [`Manifest`]: `format` and `version` (a reader refuses a version newer
//!    than [`VERSION`]), the VM's name, creator and shape, and each file's size;
//! 2. `rootfs.ext4` — the root disk as a GNU sparse member (only its data extents are carried;
//!    `tar -xS` makes a sparse file of it again);
//! 3. `serial.log`, `vmm.log` when the VM has them, each the newest [`LOG_CAP`] bytes;
//! 4. `checksums.sha256` — the SHA-256 of each file's content (holes read as zeros), in
//!    `sha256sum` format, so `tar -xf x.tar && sha256sum -c checksums.sha256` checks an
//!    extracted copy. It comes last because it is computed while the files stream.
//!
//! [`Export`] plans and writes an archive (its exact length is known before the first byte);
//! [`read`] checks one as it arrives and writes its files into a directory, refusing anything
//! off this layout, sizes that disagree with the manifest, and checksum mismatches.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hearth_api::EgressRequest;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What `manifest.json` says it is.
pub const FORMAT: &str = "hearth-vm-export";
/// The manifest version this hearthd writes and the newest it reads.
pub const VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const ROOTFS: &str = "rootfs.ext4";
pub const CHECKSUMS: &str = "checksums.sha256";
/// The logs an export carries, when the VM has them.
pub const LOGS: [&str; 2] = ["serial.log", "vmm.log"];
/// Each log is cut to its newest this many bytes.
pub const LOG_CAP: u64 = 256 << 20;
/// The most a manifest or checksum list may take.
const MAX_TEXT: u64 = 1 << 20;
const BLOCK: u64 = 512;
/// [`BLOCK`] as a length.
const BLOCK_LEN: usize = 512;
/// Bytes read and sent at a time.
const CHUNK: usize = 1 << 20;
/// Runs of zeros at least this long (and aligned) are left as holes on import.
const ZERO_RUN: usize = 4096;

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// The hearthd that wrote it.
    pub hearth_version: String,
    /// RFC 3339, UTC.
    pub exported_at: String,
    pub exported_by: String,
    pub vm: ManifestVm,
    /// `rootfs.ext4` first, then the logs, in the order of their members.
    pub files: Vec<ManifestFile>,
}

/// What travels of a VM: what it is, never where it ran (paths, slot, MAC and /30 are the
/// destination's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestVm {
    pub name: String,
    pub created_at: String,
    pub created_by: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub rootfs_mib: u64,
    /// `None`: allow all (a host without networking takes such a VM).
    pub egress: Option<EgressRequest>,
    pub user_data: Option<String>,
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    pub name: String,
    /// The file's length (holes included).
    pub size: u64,
    /// The bytes the archive carries of it (its data extents).
    pub stored: u64,
}

/// Where an export's bytes go: a sink that can take a buffer without copying it.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()>;
    fn put_owned(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        self.put(&bytes)
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

/// One file of an export: the part of `file` from `offset` (a log's newest bytes), and its data
/// extents relative to that.
#[derive(Debug)]
struct Part {
    name: &'static str,
    file: File,
    offset: u64,
    size: u64,
    segments: Vec<(u64, u64)>,
    sparse: bool,
}

impl Part {
    fn stored(&self) -> u64 {
        self.segments.iter().map(|(_, len)| len).sum()
    }

    /// The sparse map as a GNU sparse member writes it: the extents, and a last empty one at
    /// the end when the file ends in a hole (so an extractor gives it its whole length).
    fn sparse_map(&self) -> Vec<(u64, u64)> {
        let mut map = self.segments.clone();
        if map.last().is_none_or(|(off, len)| off + len < self.size) {
            map.push((self.size, 0));
        }
        map
    }

    /// Extension header blocks after the member's header.
    fn ext_blocks(&self) -> u64 {
        if !self.sparse {
            return 0;
        }
        let n = self.sparse_map().len() as u64;
        n.saturating_sub(4).div_ceil(21)
    }
}

/// An archive, planned: every size is known, so [`Export::len`] is exact.
#[derive(Debug)]
pub struct Export {
    manifest: Vec<u8>,
    parts: Vec<Part>,
    mtime: u64,
}

/// The files of a VM, to export.
#[derive(Debug)]
pub struct Sources<'a> {
    pub rootfs: &'a Path,
    /// Log name (one of [`LOGS`]) and path; a missing or empty log is left out.
    pub logs: Vec<(&'static str, PathBuf)>,
}

impl Export {
    /// Plans the export of `vm`'s files; `manifest` is completed with their sizes.
    pub fn plan(sources: &Sources<'_>, mut manifest: Manifest, mtime: u64) -> io::Result<Export> {
        let rootfs = File::open(sources.rootfs)?;
        let size = rootfs.metadata()?.len();
        let segments = crate::disk::data_segments(&rootfs)?;
        let mut parts = vec![Part {
            name: ROOTFS,
            file: rootfs,
            offset: 0,
            size,
            segments,
            sparse: true,
        }];
        for (name, path) in &sources.logs {
            let file = match File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let len = file.metadata()?.len();
            if len == 0 {
                continue;
            }
            let offset = len.saturating_sub(LOG_CAP);
            parts.push(Part {
                name,
                file,
                offset,
                size: len - offset,
                segments: vec![(0, len - offset)],
                sparse: false,
            });
        }
        manifest.files = parts
            .iter()
            .map(|p| ManifestFile {
                name: p.name.to_owned(),
                size: p.size,
                stored: p.stored(),
            })
            .collect();
        let manifest = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
        Ok(Export {
            manifest,
            parts,
            mtime,
        })
    }

    /// The archive's length in bytes.
    pub fn len(&self) -> u64 {
        let member = |data: u64| BLOCK + data.next_multiple_of(BLOCK);
        let sums: u64 = self.parts.iter().map(|p| checksum_line_len(p.name)).sum();
        member(self.manifest.len() as u64)
            + self
                .parts
                .iter()
                .map(|p| member(p.stored()) + p.ext_blocks() * BLOCK)
                .sum::<u64>()
            + member(sums)
            + 2 * BLOCK
    }

    /// Writes the archive to `out`, reading each file once.
    pub fn write(self, out: &mut dyn Sink) -> io::Result<()> {
        write_member(out, MANIFEST, &self.manifest, self.mtime)?;
        let mut sums = String::new();
        for part in &self.parts {
            let digest = write_part(out, part, self.mtime)?;
            sums.push_str(&format!("{digest}  {}\n", part.name));
        }
        write_member(out, CHECKSUMS, sums.as_bytes(), self.mtime)?;
        out.put(&[0; 2 * BLOCK_LEN])
    }
}

fn checksum_line_len(name: &str) -> u64 {
    // "<64 hex digits>  <name>\n"
    (64 + 2 + name.len() + 1) as u64
}

fn header(name: &str, size: u64, mtime: u64) -> io::Result<tar::Header> {
    let mut h = tar::Header::new_gnu();
    h.set_path(name)?;
    h.set_mode(0o600);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_size(size);
    h.set_entry_type(tar::EntryType::Regular);
    Ok(h)
}

fn pad(out: &mut dyn Sink, len: u64) -> io::Result<()> {
    let rest = len.next_multiple_of(BLOCK) - len;
    let zeros = [0u8; BLOCK_LEN];
    out.put(&zeros[..usize::try_from(rest).unwrap_or(0)])
}

fn write_member(out: &mut dyn Sink, name: &str, data: &[u8], mtime: u64) -> io::Result<()> {
    let mut h = header(name, data.len() as u64, mtime)?;
    h.set_cksum();
    out.put(h.as_bytes())?;
    out.put(data)?;
    pad(out, data.len() as u64)
}

/// Feeds `len` zero bytes to `hash`.
fn hash_zeros(hash: &mut Sha256, mut len: u64) {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64);
        hash.update(&ZEROS[..usize::try_from(n).unwrap_or(0)]);
        len -= n;
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes one file's member; returns the SHA-256 of its content.
fn write_part(out: &mut dyn Sink, part: &Part, mtime: u64) -> io::Result<String> {
    let stored = part.stored();
    let mut h = header(part.name, stored, mtime)?;
    let map = part.sparse_map();
    if part.sparse {
        h.set_entry_type(tar::EntryType::GNUSparse);
        let gnu = h
            .as_gnu_mut()
            .ok_or_else(|| io::Error::other("not a GNU header"))?;
        gnu.set_real_size(part.size);
        for (slot, (off, len)) in gnu.sparse.iter_mut().zip(&map) {
            slot.set_offset(*off);
            slot.set_length(*len);
        }
        gnu.set_is_extended(map.len() > 4);
    }
    h.set_cksum();
    out.put(h.as_bytes())?;
    if part.sparse && map.len() > 4 {
        let chunks: Vec<_> = map[4..].chunks(21).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut ext = tar::GnuExtSparseHeader::new();
            for (slot, (off, len)) in ext.sparse.iter_mut().zip(chunk.iter()) {
                slot.set_offset(*off);
                slot.set_length(*len);
            }
            ext.set_is_extended(i + 1 < chunks.len());
            out.put(ext.as_bytes())?;
        }
    }
    let mut hash = Sha256::new();
    let mut at = 0;
    for &(off, len) in &part.segments {
        hash_zeros(&mut hash, off - at);
        let mut done = 0;
        while done < len {
            let n = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let mut buf = vec![0; n];
            part.file
                .read_exact_at(&mut buf, part.offset + off + done)?;
            hash.update(&buf);
            out.put_owned(buf)?;
            done += n as u64;
        }
        at = off + len;
    }
    hash_zeros(&mut hash, part.size - at);
    pad(out, stored)?;
    Ok(hex(&hash.finalize()))
}

/// Why an archive was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ReadError<E> {
    /// Not an export this hearthd reads, or damaged: the message says what and where.
    #[error("{0}")]
    Invalid(String),
    /// Writing the files failed (a full disk among others).
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The check of the manifest refused it.
    #[error(transparent)]
    Refused(E),
}

fn invalid<E>(message: impl Into<String>) -> ReadError<E> {
    ReadError::Invalid(message.into())
}

/// Reads an archive from `input` into the (existing, empty) directory `dir`: the manifest is
/// checked for this format and version, then handed to `check` before any file is written;
/// every file is checked against the manifest's size and the trailer's checksum. On an error
/// the files written so far are left for the caller to remove with `dir`.
pub fn read<E>(
    input: impl Read,
    dir: &Path,
    check: impl FnOnce(&Manifest) -> Result<(), E>,
) -> Result<Manifest, ReadError<E>> {
    let mut archive = tar::Archive::new(input);
    let mut entries = archive
        .entries()
        .map_err(|e| invalid(format!("cannot read the archive: {e}")))?;
    let mut first =
        next(&mut entries, "its start")?.ok_or_else(|| invalid("the archive is empty"))?;
    expect_name(&first, MANIFEST, "the first member")?;
    let text = read_text(&mut first, MANIFEST)?;
    drop(first);
    let manifest = parse_manifest(&text)?;
    check(&manifest).map_err(ReadError::Refused)?;

    let mut digests = Vec::new();
    for file in &manifest.files {
        let mut entry = next(&mut entries, MANIFEST)?
            .ok_or_else(|| invalid(format!("the archive ends before {}", file.name)))?;
        expect_name(&entry, &file.name, "the next member")?;
        let path = dir.join(&file.name);
        digests.push(read_file(&mut entry, file, &path)?);
    }
    let last = manifest.files.last().map_or(MANIFEST, |f| f.name.as_str());
    let mut trailer = next(&mut entries, last)?.ok_or_else(|| {
        invalid(format!(
            "the archive ends before {CHECKSUMS}: it is cut short"
        ))
    })?;
    expect_name(&trailer, CHECKSUMS, "the member after the files")?;
    let sums = read_text(&mut trailer, CHECKSUMS)?;
    drop(trailer);
    check_sums(&sums, &manifest.files, &digests)?;
    if let Some(extra) = next(&mut entries, CHECKSUMS)? {
        let name = String::from_utf8_lossy(&extra.path_bytes()).into_owned();
        return Err(invalid(format!(
            "unexpected member {name:?} after {CHECKSUMS}"
        )));
    }
    Ok(manifest)
}

/// The next member, read as far as its header.
fn next<'a, R: Read, E>(
    entries: &mut tar::Entries<'a, R>,
    after: &str,
) -> Result<Option<tar::Entry<'a, R>>, ReadError<E>> {
    match entries.next() {
        None => Ok(None),
        Some(Ok(entry)) => Ok(Some(entry)),
        Some(Err(e)) => Err(invalid(format!(
            "the archive is damaged or cut short after {after}: {e}"
        ))),
    }
}

fn expect_name<R: Read, E>(
    entry: &tar::Entry<'_, R>,
    want: &str,
    which: &str,
) -> Result<(), ReadError<E>> {
    let name = entry.path_bytes();
    if *name != *want.as_bytes() {
        return Err(invalid(format!(
            "{which} is {:?}, not {want}: this is not a Hearth export, or its members are out of order",
            String::from_utf8_lossy(&name)
        )));
    }
    let kind = entry.header().entry_type();
    let sparse_ok = want == ROOTFS && kind == tar::EntryType::GNUSparse;
    if !kind.is_file() && !sparse_ok {
        return Err(invalid(format!(
            "{want} is not a regular file in the archive"
        )));
    }
    Ok(())
}

fn read_text<R: Read, E>(
    entry: &mut tar::Entry<'_, R>,
    name: &str,
) -> Result<Vec<u8>, ReadError<E>> {
    let mut text = Vec::new();
    entry
        .take(MAX_TEXT + 1)
        .read_to_end(&mut text)
        .map_err(|e| invalid(format!("cannot read {name}: {e}")))?;
    if text.len() as u64 > MAX_TEXT {
        return Err(invalid(format!("{name} is larger than {MAX_TEXT} bytes")));
    }
    if text.len() as u64 != entry.size() {
        return Err(invalid(format!(
            "{name} has {} of its {} bytes: the archive is cut short",
            text.len(),
            entry.size()
        )));
    }
    Ok(text)
}

fn parse_manifest<E>(text: &[u8]) -> Result<Manifest, ReadError<E>> {
    #[derive(Deserialize)]
    struct Head {
        format: Option<String>,
        version: Option<serde_json::Value>,
    }
    let head: Head = serde_json::from_slice(text)
        .map_err(|e| invalid(format!("{MANIFEST} is not valid JSON: {e}")))?;
    if head.format.as_deref() != Some(FORMAT) {
        return Err(invalid(format!(
            "{MANIFEST}: format is {:?}, not {FORMAT:?}: this is not a Hearth export",
            head.format.unwrap_or_default()
        )));
    }
    match head.version.as_ref().and_then(serde_json::Value::as_u64) {
        Some(v) if v > u64::from(VERSION) => {
            return Err(invalid(format!(
                "{MANIFEST}: version {v} is newer than this hearthd reads (at most {VERSION}); import it with a newer hearthd"
            )));
        }
        Some(v) if v >= 1 => {}
        _ => {
            return Err(invalid(format!(
                "{MANIFEST}: version must be a whole number from 1 to {VERSION}"
            )));
        }
    }
    let manifest: Manifest = serde_json::from_slice(text)
        .map_err(|e| invalid(format!("{MANIFEST} (version {VERSION}): {e}")))?;
    let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    let logs_ok = names.iter().skip(1).all(|n| LOGS.contains(n))
        && (1..names.len()).all(|i| !names[..i].contains(&names[i]));
    if names.first() != Some(&ROOTFS) || !logs_ok {
        return Err(invalid(format!(
            "{MANIFEST}: files must be {ROOTFS} and then any of {LOGS:?}, each once; it lists {names:?}"
        )));
    }
    for f in &manifest.files {
        if f.stored > f.size {
            return Err(invalid(format!(
                "{MANIFEST}: {} stores {} bytes of a {}-byte file",
                f.name, f.stored, f.size
            )));
        }
        if f.name != ROOTFS && f.size > LOG_CAP {
            return Err(invalid(format!(
                "{MANIFEST}: {} is {} bytes; logs are at most {LOG_CAP}",
                f.name, f.size
            )));
        }
    }
    let rootfs = &manifest.files[0];
    if rootfs.size != manifest.vm.rootfs_mib << 20 {
        return Err(invalid(format!(
            "{MANIFEST}: {ROOTFS} is {} bytes, but vm.rootfs_mib says {} MiB",
            rootfs.size, manifest.vm.rootfs_mib
        )));
    }
    Ok(manifest)
}

/// Writes one member's content to `path` (sparse: runs of zeros stay holes); returns its
/// SHA-256 after checking its length against the manifest.
fn read_file<R: Read, E>(
    entry: &mut tar::Entry<'_, R>,
    file: &ManifestFile,
    path: &Path,
) -> Result<String, ReadError<E>> {
    let write_err = |source| ReadError::Write {
        path: path.display().to_string(),
        source,
    };
    let carried = entry
        .header()
        .entry_size()
        .map_err(|e| invalid(format!("{}: {e}", file.name)))?;
    if carried != file.stored {
        return Err(invalid(format!(
            "{} carries {carried} bytes, but the manifest says {}",
            file.name, file.stored
        )));
    }
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(write_err)?;
    let mut hash = Sha256::new();
    let mut at: u64 = 0;
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Whole chunks: a network read gives a few KiB, and each chunk costs a hash update and
        // a write.
        let n = fill(entry, &mut buf).map_err(|e| {
            invalid(format!(
                "{} is damaged or cut short after {at} of {} bytes: {e}",
                file.name, file.size
            ))
        })?;
        if n == 0 {
            break;
        }
        if at + n as u64 > file.size {
            return Err(invalid(format!(
                "{} is longer than the {} bytes the manifest gives it",
                file.name, file.size
            )));
        }
        hash.update(&buf[..n]);
        write_data(&out, &buf[..n], at).map_err(write_err)?;
        at += n as u64;
    }
    if at != file.size {
        return Err(invalid(format!(
            "{} ends after {at} of its {} bytes: the archive is cut short or damaged",
            file.name, file.size
        )));
    }
    out.set_len(file.size)
        .and_then(|()| out.sync_all())
        .map_err(write_err)?;
    Ok(hex(&hash.finalize()))
}

/// Reads into `buf` until it is full or the input ends; returns how much it read.
fn fill(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// True when `block` (at most [`ZERO_RUN`] bytes) is all zeros: a `memcmp`, fast in any build.
fn is_zero(block: &[u8]) -> bool {
    static ZEROS: [u8; ZERO_RUN] = [0; ZERO_RUN];
    block == &ZEROS[..block.len()]
}

/// Writes `data` at `offset`, leaving aligned runs of zeros unwritten (holes).
fn write_data(out: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let mut start = 0;
    while start < data.len() {
        let end = (start + ZERO_RUN).min(data.len());
        // Aligned zero blocks are skipped; everything else is written in runs.
        if is_zero(&data[start..end]) && (offset + start as u64).is_multiple_of(ZERO_RUN as u64) {
            start = end;
            continue;
        }
        let mut run_end = end;
        while run_end < data.len() {
            let next = (run_end + ZERO_RUN).min(data.len());
            if is_zero(&data[run_end..next]) {
                break;
            }
            run_end = next;
        }
        out.write_all_at(&data[start..run_end], offset + start as u64)?;
        start = run_end;
    }
    Ok(())
}

fn check_sums<E>(
    text: &[u8],
    files: &[ManifestFile],
    digests: &[String],
) -> Result<(), ReadError<E>> {
    let text =
        std::str::from_utf8(text).map_err(|_| invalid(format!("{CHECKSUMS} is not UTF-8")))?;
    let mut listed = std::collections::HashMap::new();
    for line in text.lines() {
        let (sum, name) = line
            .split_once("  ")
            .ok_or_else(|| invalid(format!("{CHECKSUMS}: {line:?} is not `<sha256>  <file>`")))?;
        if listed.insert(name, sum).is_some() {
            return Err(invalid(format!("{CHECKSUMS} lists {name} twice")));
        }
    }
    if listed.len() != files.len() {
        return Err(invalid(format!(
            "{CHECKSUMS} lists {} files; the manifest has {}",
            listed.len(),
            files.len()
        )));
    }
    for (file, digest) in files.iter().zip(digests) {
        match listed.get(file.name.as_str()) {
            None => {
                return Err(invalid(format!(
                    "{CHECKSUMS} has no line for {}",
                    file.name
                )));
            }
            Some(sum) if *sum != digest => {
                return Err(invalid(format!(
                    "{} does not match its checksum (sha256 {digest}, the archive says {sum}): the archive is damaged",
                    file.name
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
