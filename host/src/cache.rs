//! Where vport keeps what it downloads and builds between runs.
//!
//! Resolution order: `$VPORT_CACHE_DIR`, then `$XDG_CACHE_HOME/vport`, then `$HOME/.cache/vport`,
//! then `/var/tmp/vport-cache` (a root shell in CI may have no `HOME`).

use std::path::PathBuf;

/// Environment variable that overrides the cache directory.
pub const CACHE_DIR_ENV: &str = "VPORT_CACHE_DIR";

/// `bytes` in lower-case hex: how the cache names what a digest keys (images, unpacked kernels,
/// the bench's plugin).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache directory vport uses (not created by this call).
pub fn cache_dir() -> PathBuf {
    resolve(std::env::var_os(CACHE_DIR_ENV), std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
}

fn resolve(
    explicit: Option<std::ffi::OsString>,
    xdg: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> PathBuf {
    let non_empty = |v: Option<std::ffi::OsString>| v.filter(|s| !s.is_empty());
    if let Some(dir) = non_empty(explicit) {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = non_empty(xdg) {
        return PathBuf::from(xdg).join("vport");
    }
    if let Some(home) = non_empty(home) {
        return PathBuf::from(home).join(".cache").join("vport");
    }
    PathBuf::from("/var/tmp/vport-cache")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_named_in_lower_case_hex() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn explicit_wins_then_xdg_then_home_then_fallback() {
        let s = |v: &str| Some(std::ffi::OsString::from(v));
        assert_eq!(resolve(s("/c"), s("/x"), s("/h")), PathBuf::from("/c"));
        assert_eq!(resolve(None, s("/x"), s("/h")), PathBuf::from("/x/vport"));
        assert_eq!(resolve(s(""), s(""), s("/h")), PathBuf::from("/h/.cache/vport"));
        assert_eq!(resolve(None, None, None), PathBuf::from("/var/tmp/vport-cache"));
    }
}
