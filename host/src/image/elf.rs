//! Just enough ELF64 little-endian parsing for the image builder: "is this executable
//! statically linked?" (no `PT_INTERP` program header) and "what does this kernel module's
//! `.modinfo` section say?" (its `key=value` entries). What the entries mean to the module
//! loader is [`super::modules`]' business.

/// Why an ELF file could not be inspected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// The bytes do not start with the ELF magic.
    #[error("not an ELF file")]
    NotElf,
    /// Only 64-bit little-endian ELF files are supported (x86_64 guests).
    #[error("not a 64-bit little-endian ELF file")]
    Unsupported,
    /// A header or table points outside the file.
    #[error("truncated or corrupt ELF file ({0} out of bounds)")]
    Truncated(&'static str),
}

const PT_INTERP: u32 = 3;

fn u16_at(b: &[u8], off: usize, what: &'static str) -> Result<u16, ElfError> {
    b.get(off..off + 2).map(|s| u16::from_le_bytes([s[0], s[1]])).ok_or(ElfError::Truncated(what))
}

fn u32_at(b: &[u8], off: usize, what: &'static str) -> Result<u32, ElfError> {
    b.get(off..off + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]])).ok_or(ElfError::Truncated(what))
}

fn u64_at(b: &[u8], off: usize, what: &'static str) -> Result<u64, ElfError> {
    let s = b.get(off..off + 8).ok_or(ElfError::Truncated(what))?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

fn usize_of(v: u64, what: &'static str) -> Result<usize, ElfError> {
    usize::try_from(v).map_err(|_| ElfError::Truncated(what))
}

fn check_header(b: &[u8]) -> Result<(), ElfError> {
    if b.len() < 4 || &b[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    // EI_CLASS = 2 (64-bit), EI_DATA = 1 (little endian).
    if b.len() < 0x40 || b[4] != 2 || b[5] != 1 {
        return Err(ElfError::Unsupported);
    }
    Ok(())
}

/// Whether the ELF executable `bytes` needs a dynamic loader (has a `PT_INTERP` program
/// header). Static and static-PIE executables return `false`.
pub fn has_interpreter(bytes: &[u8]) -> Result<bool, ElfError> {
    check_header(bytes)?;
    let phoff = usize_of(u64_at(bytes, 0x20, "e_phoff")?, "e_phoff")?;
    let phentsize = usize::from(u16_at(bytes, 0x36, "e_phentsize")?);
    let phnum = usize::from(u16_at(bytes, 0x38, "e_phnum")?);
    for i in 0..phnum {
        let off = phoff.checked_add(i * phentsize).ok_or(ElfError::Truncated("program header"))?;
        if u32_at(bytes, off, "program header")? == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The contents of the section called `name`, if the file has one.
fn section<'a>(bytes: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, ElfError> {
    check_header(bytes)?;
    let shoff = usize_of(u64_at(bytes, 0x28, "e_shoff")?, "e_shoff")?;
    let shentsize = usize::from(u16_at(bytes, 0x3A, "e_shentsize")?);
    let shnum = usize::from(u16_at(bytes, 0x3C, "e_shnum")?);
    let shstrndx = usize::from(u16_at(bytes, 0x3E, "e_shstrndx")?);
    let sh = |i: usize| -> Result<(u32, &'a [u8]), ElfError> {
        let base = shoff.checked_add(i * shentsize).ok_or(ElfError::Truncated("section header"))?;
        let name_off = u32_at(bytes, base, "section header")?;
        let off = usize_of(u64_at(bytes, base + 0x18, "section header")?, "sh_offset")?;
        let size = usize_of(u64_at(bytes, base + 0x20, "section header")?, "sh_size")?;
        let data =
            off.checked_add(size).and_then(|end| bytes.get(off..end)).ok_or(ElfError::Truncated("section data"))?;
        Ok((name_off, data))
    };
    if shnum == 0 || shstrndx >= shnum {
        return Ok(None);
    }
    let (_, strtab) = sh(shstrndx)?;
    for i in 0..shnum {
        let (name_off, data) = sh(i)?;
        let rest = strtab.get(name_off as usize..).ok_or(ElfError::Truncated("section name"))?;
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        if &rest[..end] == name.as_bytes() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// The value of the first `key=` entry of a kernel module's `.modinfo` section (a list of
/// NUL-terminated `key=value` strings), lossily decoded as UTF-8; `None` when the module has no
/// such entry or no `.modinfo` section.
pub fn modinfo(ko: &[u8], key: &str) -> Result<Option<String>, ElfError> {
    let Some(section) = section(ko, ".modinfo")? else {
        return Ok(None);
    };
    Ok(section.split(|&c| c == 0).find_map(|entry| {
        let value = entry.strip_prefix(key.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(value).into_owned())
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 with the given program header types and one named section.
    pub(crate) fn fake_elf(ph_types: &[u32], section_name: &str, section_data: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 0x40];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        let phoff = b.len();
        for &t in ph_types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend(ph);
        }
        let strtab_off = b.len();
        let mut strtab = vec![0u8];
        strtab.extend(b".shstrtab\0");
        let name_idx = strtab.len();
        strtab.extend(section_name.as_bytes());
        strtab.push(0);
        b.extend(&strtab);
        let data_off = b.len();
        b.extend(section_data);
        let shoff = b.len();
        let mut shdr = |name: u32, off: usize, size: usize| {
            let mut s = vec![0u8; 64];
            s[..4].copy_from_slice(&name.to_le_bytes());
            s[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            s[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            b.extend(s);
        };
        shdr(0, 0, 0);
        shdr(1, strtab_off, strtab.len());
        shdr(name_idx as u32, data_off, section_data.len());
        b[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        b[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3A].copy_from_slice(&(ph_types.len() as u16).to_le_bytes());
        b[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        b[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        b[0x3E..0x40].copy_from_slice(&1u16.to_le_bytes());
        b
    }

    #[test]
    fn detects_interpreter() {
        assert!(has_interpreter(&fake_elf(&[6, 3, 1], ".x", b"")).unwrap());
        assert!(!has_interpreter(&fake_elf(&[6, 1, 2], ".x", b"")).unwrap());
        assert_eq!(has_interpreter(b"#!/bin/sh\n"), Err(ElfError::NotElf));
        let mut short = fake_elf(&[1, 3], ".x", b"");
        short.truncate(0x50);
        assert!(matches!(has_interpreter(&short), Err(ElfError::Truncated(_))));
    }

    #[test]
    fn reads_modinfo_entries() {
        let ko = fake_elf(&[], ".modinfo", b"license=GPL\0depends=virtio,virtio-ring\0name=x\0");
        assert_eq!(modinfo(&ko, "depends").unwrap().as_deref(), Some("virtio,virtio-ring"));
        assert_eq!(modinfo(&ko, "name").unwrap().as_deref(), Some("x"));
        assert_eq!(modinfo(&ko, "dep").unwrap(), None, "a key is matched whole");
        assert_eq!(modinfo(&ko, "vermagic").unwrap(), None);
        let empty = fake_elf(&[], ".modinfo", b"license=GPL\0depends=\0");
        assert_eq!(modinfo(&empty, "depends").unwrap().as_deref(), Some(""));
        let other = fake_elf(&[], ".text", b"depends=virtio\0");
        assert_eq!(modinfo(&other, "depends").unwrap(), None);
        assert_eq!(modinfo(b"MZ", "depends"), Err(ElfError::NotElf));
    }

    #[test]
    fn host_busybox_is_static_if_present() {
        let Ok(bytes) = std::fs::read("/bin/busybox") else {
            println!("skipped: /bin/busybox not present");
            return;
        };
        assert!(!has_interpreter(&bytes).unwrap(), "busybox-static should have no PT_INTERP");
        let Ok(sh) = std::fs::read("/bin/ls") else { return };
        assert!(has_interpreter(&sh).unwrap(), "/bin/ls should be dynamically linked");
    }
}
