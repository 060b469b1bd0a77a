//! Naming and sizing rules for VMs (srv-handbook §5): one place, used by the API and the config.

use hearth_api::{ErrorCode, Size};

/// A rule a user-supplied value broke. The message names the field, the value and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RuleError {
    pub code: ErrorCode,
    pub message: String,
}

impl RuleError {
    fn new(code: ErrorCode, message: String) -> Self {
        Self { code, message }
    }
}

pub const MIN_RAM_MIB: u64 = 128;
pub const MAX_CPUS: u32 = 32;
/// Guest RAM is bounded by what a host could reasonably give one VM (1 TiB).
pub const MAX_RAM_MIB: u64 = 1024 * 1024;
/// Root disks are bounded at 16 TiB (ext4 with 4 KiB blocks and our mkfs options).
pub const MAX_ROOTFS_MIB: u64 = 16 * 1024 * 1024;

/// `name`: 1-63 characters, lowercase ASCII letters, digits and hyphens, starting with a letter.
pub fn validate_name(name: &str) -> Result<(), RuleError> {
    let rule = "1-63 characters: lowercase letters, digits and hyphens, starting with a letter";
    let bad = |why: &str| {
        Err(RuleError::new(
            ErrorCode::InvalidName,
            format!("invalid name {name:?}: {why}; names are {rule}"),
        ))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 63 {
        return bad(&format!("it is {} characters long", name.len()));
    }
    if !name.as_bytes()[0].is_ascii_lowercase() {
        return bad("it does not start with a lowercase letter");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return bad(&format!("{c:?} is not allowed"));
    }
    Ok(())
}

/// A volume's `name`: the VM naming rule, in messages about volumes.
pub fn validate_volume_name(name: &str) -> Result<(), RuleError> {
    validate_name(name).map_err(|e| RuleError::new(e.code, format!("volume {}", e.message)))
}

/// The smallest volume: room for an ext4 filesystem's journal and metadata.
pub const MIN_VOLUME_MIB: u64 = 16;
/// Longest mount path of a volume.
pub const MAX_MOUNT_PATH: usize = 128;

/// A volume's `size`: from [`MIN_VOLUME_MIB`] to `max_mib` (`volumes.max_size`).
pub fn validate_volume_size(size: &Size, max_mib: u64) -> Result<u64, RuleError> {
    let err = |why: String| {
        RuleError::new(
            ErrorCode::InvalidSize,
            format!("invalid size {}: {why}", describe(size)),
        )
    };
    let mib = size_mib(size).map_err(|e| err(format!("{e}; {SIZE_FORMS}")))?;
    if mib < MIN_VOLUME_MIB {
        return Err(err(format!("must be at least {MIN_VOLUME_MIB} MiB")));
    }
    if mib > max_mib {
        return Err(err(format!(
            "must be at most {max_mib} MiB (volumes.max_size)"
        )));
    }
    Ok(mib)
}

/// A volume's mount `path` in the guest: absolute, at most [`MAX_MOUNT_PATH`] bytes of
/// `A-Z a-z 0-9 . _ / -`, no `..` component, not `/`, not under `/proc`, `/sys` or `/dev`.
/// The character set keeps the kernel command line (which carries the path) unambiguous.
pub fn validate_mount_path(path: &str) -> Result<(), RuleError> {
    let rule = "mount paths are absolute, at most 128 bytes of A-Z a-z 0-9 . _ / -, with no .. component, and neither / nor under /proc, /sys or /dev";
    let bad = |why: &str| {
        Err(RuleError::new(
            ErrorCode::InvalidPath,
            format!("invalid path {path:?}: {why}; {rule}"),
        ))
    };
    if !path.starts_with('/') {
        return bad("it is not absolute");
    }
    if path.len() > MAX_MOUNT_PATH {
        return bad(&format!("it is {} bytes long", path.len()));
    }
    if let Some(c) = path
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')))
    {
        return bad(&format!("{c:?} is not allowed"));
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return bad("it has a .. component");
    }
    match parts.first().copied() {
        None => bad("it is the root directory"),
        Some(top @ ("proc" | "sys" | "dev")) => bad(&format!("it is under /{top}")),
        Some(_) => Ok(()),
    }
}

/// The form a valid mount path is kept in: no empty or `.` components, no trailing `/`.
pub fn normal_mount_path(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// `cpus`: 1, or an even number up to 32.
pub fn validate_cpus(cpus: u32) -> Result<(), RuleError> {
    if cpus == 1 || ((2..=MAX_CPUS).contains(&cpus) && cpus.is_multiple_of(2)) {
        Ok(())
    } else {
        Err(RuleError::new(
            ErrorCode::InvalidCpus,
            format!("invalid cpus {cpus}: must be 1 or an even number from 2 to {MAX_CPUS}"),
        ))
    }
}

/// Parses a size as users type it: a MiB integer (`512`), or a number with a unit `M`/`MiB`,
/// `G`/`GiB`, `T`/`TiB` (`512M`, `2G`, `1.5G`). Units are binary. Returns MiB.
pub fn parse_size_mib(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("{text:?} is not a size"));
    }
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" => 1024 * 1024,
        _ => return Err(format!("{text:?} has an unknown unit {:?}", unit.trim())),
    };
    if let Some((whole, frac)) = num.split_once('.') {
        let whole: u64 = whole
            .parse()
            .map_err(|_| format!("{text:?} is not a size"))?;
        if frac.is_empty() || frac.contains('.') || frac.len() > 3 {
            return Err(format!("{text:?} is not a size"));
        }
        let frac_val: u64 = frac
            .parse()
            .map_err(|_| format!("{text:?} is not a size"))?;
        let scale = 10u64.pow(u32::try_from(frac.len()).unwrap_or(3));
        let mib_frac = frac_val * factor;
        if !mib_frac.is_multiple_of(scale) {
            return Err(format!("{text:?} is not a whole number of MiB"));
        }
        whole
            .checked_mul(factor)
            .and_then(|w| w.checked_add(mib_frac / scale))
            .ok_or_else(|| format!("{text:?} is too large"))
    } else {
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(factor))
            .ok_or_else(|| format!("{text:?} is too large or not a size"))
    }
}

fn size_mib(size: &Size) -> Result<u64, String> {
    match size {
        Size::Mib(n) => Ok(*n),
        Size::Text(t) => parse_size_mib(t),
    }
}

fn describe(size: &Size) -> String {
    match size {
        Size::Mib(n) => n.to_string(),
        Size::Text(t) => format!("{t:?}"),
    }
}

const SIZE_FORMS: &str = "write it as 2G, 512M or an integer number of MiB";

/// `ram`: at least 128 MiB.
pub fn validate_ram(size: &Size) -> Result<u64, RuleError> {
    let err = |why: String| {
        RuleError::new(
            ErrorCode::InvalidRam,
            format!("invalid ram {}: {why}", describe(size)),
        )
    };
    let mib = size_mib(size).map_err(|e| err(format!("{e}; {SIZE_FORMS}")))?;
    if mib < MIN_RAM_MIB {
        return Err(err(format!("must be at least {MIN_RAM_MIB} MiB")));
    }
    if mib > MAX_RAM_MIB {
        return Err(err(format!("must be at most {MAX_RAM_MIB} MiB")));
    }
    Ok(mib)
}

/// `rootfs_size`: at least the guest image's size (`min_mib`).
pub fn validate_rootfs(size: &Size, min_mib: u64) -> Result<u64, RuleError> {
    let err = |why: String| {
        RuleError::new(
            ErrorCode::InvalidRootfsSize,
            format!("invalid rootfs_size {}: {why}", describe(size)),
        )
    };
    let mib = size_mib(size).map_err(|e| err(format!("{e}; {SIZE_FORMS}")))?;
    if mib < min_mib {
        return Err(err(format!(
            "must be at least {min_mib} MiB, the size of the guest image"
        )));
    }
    if mib > MAX_ROOTFS_MIB {
        return Err(err(format!("must be at most {MAX_ROOTFS_MIB} MiB")));
    }
    Ok(mib)
}

/// `rootfs_size` of a resize: at least the disk's size now (`current_mib`), since a disk and its
/// filesystem only grow.
pub fn validate_rootfs_growth(size: &Size, current_mib: u64) -> Result<u64, RuleError> {
    let mib = validate_rootfs(size, 0)?;
    if mib < current_mib {
        return Err(RuleError::new(
            ErrorCode::InvalidRootfsSize,
            format!(
                "invalid rootfs_size {}: the root disk only grows: it is {current_mib} MiB now, and shrinking its filesystem could lose data",
                describe(size)
            ),
        ));
    }
    Ok(mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_disk_only_grows() {
        assert_eq!(
            validate_rootfs_growth(&Size::Text("2G".into()), 1024),
            Ok(2048)
        );
        assert_eq!(validate_rootfs_growth(&Size::Mib(1024), 1024), Ok(1024));
        let e = validate_rootfs_growth(&Size::Text("1G".into()), 2048).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRootfsSize);
        assert!(
            e.message.contains("only grows") && e.message.contains("2048 MiB"),
            "{e:?}"
        );
        let e = validate_rootfs_growth(&Size::Text("lots".into()), 1).unwrap_err();
        assert!(e.message.contains("rootfs_size"), "{e:?}");
    }

    #[test]
    fn volume_rules() {
        assert_eq!(
            validate_volume_size(&Size::Text("10G".into()), 51200),
            Ok(10240)
        );
        let e = validate_volume_size(&Size::Text("51G".into()), 51200).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidSize);
        assert!(
            e.message.starts_with("invalid size \"51G\"")
                && e.message.contains("at most 51200 MiB (volumes.max_size)"),
            "{e:?}"
        );
        let e = validate_volume_size(&Size::Mib(1), 51200).unwrap_err();
        assert!(e.message.contains("at least 16 MiB"), "{e:?}");
        let e = validate_volume_name("Data").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidName);
        assert!(e.message.starts_with("volume invalid name"), "{e:?}");
        for ok in [
            "/data",
            "/srv/my-app_1.d",
            "/data/",
            "/mnt/./x",
            "/devices",
            "/a/proc",
        ] {
            assert_eq!(validate_mount_path(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("data", "not absolute"),
            ("/", "root directory"),
            ("//", "root directory"),
            ("/./", "root directory"),
            ("/data/../etc", ".. component"),
            ("/..", ".. component"),
            ("/proc", "under /proc"),
            ("/sys/fs", "under /sys"),
            ("//dev/x", "under /dev"),
            ("/a b", "' ' is not allowed"),
            ("/a:b", "':' is not allowed"),
            ("/a=b", "'=' is not allowed"),
            ("/é", "'é' is not allowed"),
        ] {
            let e = validate_mount_path(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidPath, "{bad}");
            assert!(
                e.message.starts_with("invalid path") && e.message.contains(why),
                "{bad}: {}",
                e.message
            );
        }
        let long = format!("/{}", "a".repeat(128));
        assert!(
            validate_mount_path(&long)
                .unwrap_err()
                .message
                .contains("129 bytes")
        );
        assert_eq!(normal_mount_path("//srv/./data/"), "/srv/data");
    }

    #[test]
    fn names() {
        for ok in ["a", "web-1", "a1b2", &"a".repeat(63)] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "-a",
            "Abc",
            "a_b",
            "a.b",
            "héllo",
            &"a".repeat(64),
        ] {
            let e = validate_name(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidName);
            assert!(
                e.message.contains("starting with a letter"),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn cpus() {
        for ok in [1, 2, 4, 16, 32] {
            validate_cpus(ok).unwrap();
        }
        for bad in [0, 3, 5, 31, 33, 34, 64] {
            let e = validate_cpus(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidCpus);
            assert!(e.message.contains("1 or an even number"));
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("512"), Ok(512));
        assert_eq!(parse_size_mib("512M"), Ok(512));
        assert_eq!(parse_size_mib("2G"), Ok(2048));
        assert_eq!(parse_size_mib("2g"), Ok(2048));
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        assert_eq!(parse_size_mib("1.5G"), Ok(1536));
        assert_eq!(parse_size_mib("1T"), Ok(1024 * 1024));
        for bad in [
            "",
            "G",
            "2X",
            "1.2.3G",
            "-1",
            "1.0001G",
            "99999999999999999999",
        ] {
            assert!(parse_size_mib(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ram_rule() {
        assert_eq!(validate_ram(&Size::Text("2G".into())), Ok(2048));
        assert_eq!(validate_ram(&Size::Mib(128)), Ok(128));
        let e = validate_ram(&Size::Text("64M".into())).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRam);
        assert_eq!(e.message, "invalid ram \"64M\": must be at least 128 MiB");
        let e = validate_ram(&Size::Text("lots".into())).unwrap_err();
        assert!(e.message.contains("2G, 512M"), "{}", e.message);
    }

    #[test]
    fn rootfs_rule() {
        assert_eq!(validate_rootfs(&Size::Text("10G".into()), 1024), Ok(10240));
        let e = validate_rootfs(&Size::Mib(512), 1024).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRootfsSize);
        assert!(e.message.contains("at least 1024 MiB"));
    }
}
