//! Machine types and the transport their virtio devices sit on: PCI on `pc` and `q35`,
//! virtio-mmio on `microvm` (which has no PCI bus). Pure, no I/O.

/// The machine types vport builds a command line for.
pub const MACHINES: [&str; 3] = ["pc", "q35", "microvm"];

/// The `-machine` options of `microvm`, each named rather than left to QEMU's defaults:
/// `acpi=on`, so the guest finds the virtio-mmio transports in the ACPI tables (`LNRO0005`
/// devices, which a modular `virtio_mmio` loaded by `insmod` binds to: a module gets no
/// `virtio_mmio.device=` from the kernel command line unless modprobe passes it);
/// `auto-kernel-cmdline=off`, so QEMU does not also list them on the command line (a guest
/// whose modprobe passed them on would register each transport twice); `isa-serial=on` for
/// the console log (guest `ttyS0`); `rtc=on`. The i8259 PIC and the i8254 PIT stay at QEMU's
/// `auto` (created under TCG; the Debian kernel calibrates its clocks with them).
pub const MICROVM_OPTIONS: &str = "acpi=on,auto-kernel-cmdline=off,isa-serial=on,rtc=on";

/// How a machine's virtio devices attach to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// virtio-pci: the `*-pci` devices, which PCI hot-plug can add and remove.
    Pci,
    /// virtio-mmio: the `*-device` devices, on a fixed set of transports the machine creates at
    /// startup; a device cannot be hot-plugged onto one (ports on an existing virtio-serial bus
    /// still can).
    Mmio,
}

impl Transport {
    /// The transport of machine type `machine` (virtio-mmio for `microvm`, PCI otherwise).
    pub fn of(machine: &str) -> Transport {
        if machine == "microvm" {
            Transport::Mmio
        } else {
            Transport::Pci
        }
    }

    /// QEMU's virtio-serial controller on this transport.
    pub fn serial_controller(self) -> &'static str {
        match self {
            Transport::Pci => "virtio-serial-pci",
            Transport::Mmio => "virtio-serial-device",
        }
    }

    /// QEMU's vhost-user vsock device on this transport.
    pub fn vhost_user_vsock(self) -> &'static str {
        match self {
            Transport::Pci => "vhost-user-vsock-pci",
            Transport::Mmio => "vhost-user-vsock-device",
        }
    }
}

/// The value of `-machine` for `machine`: `microvm` with [`MICROVM_OPTIONS`], other types as
/// named.
pub fn machine_value(machine: &str) -> String {
    match Transport::of(machine) {
        Transport::Mmio => format!("{machine},{MICROVM_OPTIONS}"),
        Transport::Pci => machine.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microvm_is_virtio_mmio_with_its_options_named() {
        assert_eq!(Transport::of("microvm"), Transport::Mmio);
        assert_eq!((Transport::of("pc"), Transport::of("q35")), (Transport::Pci, Transport::Pci));
        assert_eq!(machine_value("microvm"), "microvm,acpi=on,auto-kernel-cmdline=off,isa-serial=on,rtc=on");
        assert_eq!(machine_value("q35"), "q35");
        assert_eq!(Transport::Mmio.serial_controller(), "virtio-serial-device");
        assert_eq!(Transport::Pci.serial_controller(), "virtio-serial-pci");
        assert_eq!(Transport::Mmio.vhost_user_vsock(), "vhost-user-vsock-device");
        assert_eq!(Transport::Pci.vhost_user_vsock(), "vhost-user-vsock-pci");
        assert!(MACHINES.iter().all(|m| !machine_value(m).is_empty()));
    }
}
