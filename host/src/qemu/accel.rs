//! The accelerator QEMU runs a guest with: what the user asks for ([`AccelChoice`], `--accel
//! auto|kvm|tcg`) and what QEMU is told ([`Accel`]). Pure names; choosing one for `auto` is
//! the probe's job ([`super::probe::resolve`]).

use serde::{Deserialize, Serialize};

/// A resolved accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl Accel {
    /// QEMU's name (`kvm`, `tcg`).
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The user's accelerator choice (`--accel auto|kvm|tcg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM if the probe passes, else TCG.
    #[default]
    Auto,
    /// KVM, unconditionally.
    Kvm,
    /// TCG, unconditionally.
    Tcg,
}

/// An `--accel` value other than `auto`, `kvm` or `tcg`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown accelerator {0:?} (expected auto, kvm or tcg)")]
pub struct ParseAccelError(pub String);

impl std::str::FromStr for AccelChoice {
    type Err = ParseAccelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(ParseAccelError(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_choice() {
        assert_eq!("auto".parse::<AccelChoice>(), Ok(AccelChoice::Auto));
        assert_eq!("kvm".parse::<AccelChoice>(), Ok(AccelChoice::Kvm));
        assert_eq!("tcg".parse::<AccelChoice>(), Ok(AccelChoice::Tcg));
        assert!("hvf".parse::<AccelChoice>().unwrap_err().to_string().contains("hvf"));
    }

    #[test]
    fn qemu_names() {
        assert_eq!(Accel::Kvm.as_str(), "kvm");
        assert_eq!(Accel::Tcg.to_string(), "tcg");
        assert_eq!(AccelChoice::default(), AccelChoice::Auto);
    }
}
