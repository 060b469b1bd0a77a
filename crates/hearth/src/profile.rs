//! Profiles: the hearthd URL and API key `hearth login` keeps, in
//! `$HEARTH_CONFIG` or `$XDG_CONFIG_HOME/hearth/config.toml` (`~/.config/hearth/config.toml`),
//! written with mode 0600 in a 0700 directory:
//!
//! ```toml
//! [profiles.default]
//! url = "http://127.0.0.1:7070"
//! api_key = "hk_…"
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hearth_api::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::error::{CliError, Result};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

/// Where profiles are kept.
pub fn path() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(p) = var("HEARTH_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("hearth").join("config.toml"))
}

fn read(path: &Path) -> Result<File> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| {
            CliError::input(
                ErrorCode::InvalidRequest,
                format!("{} is not a hearth config file: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(File::default()),
        Err(e) => Err(CliError::io(format!("cannot read {}", path.display()), &e)),
    }
}

/// Profile `name`, if the file has it (an empty one when there is no file).
pub fn load(name: &str) -> Result<Profile> {
    let Some(path) = path() else {
        return Ok(Profile::default());
    };
    Ok(read(&path)?.profiles.remove(name).unwrap_or_default())
}

/// Writes profile `name` (`None` removes it), keeping the others; returns the file's path.
pub fn store(name: &str, profile: Option<Profile>) -> Result<PathBuf> {
    let path = path().ok_or_else(|| {
        CliError::input(
            ErrorCode::InvalidRequest,
            "no place for the config file: set HOME, XDG_CONFIG_HOME or HEARTH_CONFIG",
        )
    })?;
    let mut file = read(&path)?;
    match profile {
        Some(p) => file.profiles.insert(name.to_owned(), p),
        None => file.profiles.remove(name),
    };
    let text = toml::to_string(&file)
        .map_err(|e| CliError::protocol(format!("cannot write the profiles: {e}")))?;
    let io = |what: &str, e: &std::io::Error| CliError::io(what, e);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(&format!("cannot make {}", dir.display()), &e))?;
    // A new file, 0600 from its first byte, renamed over the old one.
    let tmp = dir.join(format!(".config.toml.{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&format!("cannot write {}", path.display()), &e));
    }
    Ok(path)
}
