//! ACPI tables: RSDP → XSDT → FADT (+ FACS, DSDT with `\_S5`) and MADT.
//!
//! They describe what a guest needs to power off, reboot and find every vCPU: PM1a event and control
//! blocks (see `devices::acpi_pm`), the 0xCF9 reset register, the IOAPIC, one enabled local APIC per vCPU.
//! The tables live in the BIOS area (`layout::ACPI_START`), where Linux scans for the RSDP, and PVH guests
//! get the RSDP address in `hvm_start_info`.

use acpi_tables::{Aml, aml, fadt, gas, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::acpi_pm::{PM1A_CNT_PORT, PM1A_EVT_PORT, SCI_IRQ, SLP_TYP_S5};
use crate::devices::reset_control::{RESET_PORT, RESET_VALUE};
use crate::layout::{ACPI_END, ACPI_START, IOAPIC_BASE, LAPIC_BASE};

const OEM_ID: [u8; 6] = *b"PRTHLE";
const OEM_TABLE: [u8; 8] = *b"PORTHOLE";
const OEM_REVISION: u32 = 1;

/// Why the ACPI tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables need {0} bytes, more than the BIOS area holds")]
    TooLarge(u64),
    #[error("cannot write the ACPI tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// The DSDT: only `\_S5` (soft-off, sleep type 0 as QEMU's PIIX4 uses), so that a guest OS can power off.
fn dsdt() -> Vec<u8> {
    let mut table = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, OEM_REVISION);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&(SLP_TYP_S5 as u8), &(SLP_TYP_S5 as u8), &aml::ZERO, &aml::ZERO]),
    );
    let mut bytes = Vec::new();
    s5.to_aml_bytes(&mut bytes);
    pci_root().to_aml_bytes(&mut bytes);
    table.append_slice(&bytes);
    table.as_slice().to_vec()
}

/// `\_SB.PCI0`: the PCI root bridge (configuration mechanism #1, bus 0, the I/O ports outside 0xCF8–0xCFF
/// and the MMIO hole as windows) and its `_PRT`, which wires INTA# of every slot to the GSI the VMM uses
/// ([`crate::pci::slot_gsi`]; level-triggered, active-low as ACPI defaults GSI routing).
fn pci_root() -> impl Aml {
    struct PciRoot;
    impl Aml for PciRoot {
        fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
            let bus = aml::AddressSpace::new_bus_number(0u16, 0xFFu16);
            let config_ports = aml::IO::new(0xCF8, 0xCF8, 1, 8);
            let low_ports = aml::AddressSpace::new_io(0u16, 0xCF7u16, None);
            let high_ports = aml::AddressSpace::new_io(0xD00u16, 0xFFFFu16, None);
            let legacy_vga = aml::AddressSpace::new_memory(
                aml::AddressSpaceCacheable::NotCacheable,
                true,
                0xA_0000u32,
                0xB_FFFFu32,
                None,
            );
            let window = aml::AddressSpace::new_memory(
                aml::AddressSpaceCacheable::NotCacheable,
                true,
                crate::pci::MMIO_WINDOW_START as u32,
                (crate::pci::MMIO_WINDOW_END - 1) as u32,
                None,
            );
            let crs =
                aml::ResourceTemplate::new(vec![&bus, &config_ports, &low_ports, &high_ports, &legacy_vga, &window]);
            let routes: Vec<(u32, u32)> = (0..crate::pci::SLOTS)
                .map(|slot| (((slot as u32) << 16) | 0xFFFF, crate::pci::slot_gsi(slot)))
                .collect();
            let entries: Vec<aml::Package> = routes
                .iter()
                .map(|(address, gsi)| aml::Package::new(vec![address, &aml::ZERO, &aml::ZERO, gsi]))
                .collect();
            let prt = aml::Package::new(entries.iter().map(|p| p as &dyn Aml).collect());
            aml::Device::new(
                "_SB_.PCI0".into(),
                vec![
                    &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A03")),
                    &aml::Name::new("_ADR".into(), &aml::ZERO),
                    &aml::Name::new("_SEG".into(), &aml::ZERO),
                    &aml::Name::new("_UID".into(), &aml::ZERO),
                    &aml::Name::new("_BBN".into(), &aml::ZERO),
                    &aml::Name::new("_CRS".into(), &crs),
                    &aml::Name::new("_PRT".into(), &prt),
                ],
            )
            .to_aml_bytes(sink);
        }
    }
    PciRoot
}

/// The FACS (firmware control structure): required by non-hardware-reduced ACPI; nothing in it is used.
fn facs() -> Vec<u8> {
    let mut facs = vec![0u8; 64];
    facs[0..4].copy_from_slice(b"FACS");
    facs[4..8].copy_from_slice(&64u32.to_le_bytes());
    facs[32] = 2; // version
    facs
}

fn fadt(dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let mut b = fadt::FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        .flag(fadt::Flags::Wbinvd)
        .flag(fadt::Flags::ProcC1)
        .flag(fadt::Flags::SlpButton)
        .flag(fadt::Flags::ResetRegSup);
    b.sci_int = (SCI_IRQ as u16).into();
    b.pm1a_evt_blk = u32::from(PM1A_EVT_PORT).into();
    b.pm1_evt_len = 4;
    b.pm1a_cnt_blk = u32::from(PM1A_CNT_PORT).into();
    b.pm1_cnt_len = 2;
    b.x_pm1a_evt_blk =
        gas::GAS::new(gas::AddressSpace::SystemIo, 32, 0, gas::AccessSize::WordAccess, PM1A_EVT_PORT.into());
    b.x_pm1a_cnt_blk =
        gas::GAS::new(gas::AddressSpace::SystemIo, 16, 0, gas::AccessSize::WordAccess, PM1A_CNT_PORT.into());
    b.reset_reg = gas::GAS::new(gas::AddressSpace::SystemIo, 8, 0, gas::AccessSize::ByteAccess, RESET_PORT.into());
    b.reset_value = RESET_VALUE;
    // IA-PC boot architecture: legacy devices and an 8042 are present; no VGA probing restrictions.
    b.iapc_boot_arch = 0x0003u16.into();
    b.century = crate::devices::rtc::CENTURY_REGISTER;
    let mut bytes = Vec::new();
    b.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// The MADT: PC-AT compatible 8259s, one IOAPIC, one enabled local APIC per vCPU (APIC id = index), the
/// SCI as a level-triggered, active-high interrupt (as QEMU declares it) and LINT1 as NMI on every CPU.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut table = Sdt::new(*b"APIC", 44, 3, OEM_ID, OEM_TABLE, OEM_REVISION);
    table.write_u32(36, LAPIC_BASE as u32);
    table.write_u32(40, 1); // PCAT_COMPAT: dual 8259s present
    for id in 0..vcpus {
        table.append_slice(&[0, 8, id, id, 1, 0, 0, 0]); // Processor Local APIC, enabled
    }
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    table.append_slice(&ioapic);
    let mut sci = vec![2, 10, 0, SCI_IRQ as u8];
    sci.extend_from_slice(&SCI_IRQ.to_le_bytes()); // GSI
    sci.extend_from_slice(&0x000Du16.to_le_bytes()); // active high, level triggered
    table.append_slice(&sci);
    table.append_slice(&[4, 6, 0xFF, 0, 0, 1]); // Local APIC NMI: all processors, LINT1
    table.update_checksum();
    table.as_slice().to_vec()
}

/// Writes every table into guest memory and returns the RSDP's guest address.
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: u8) -> Result<u64, AcpiError> {
    let mut next = ACPI_START;
    let mut place = |len: usize, align: u64| {
        let addr = next.next_multiple_of(align);
        next = addr + len as u64;
        addr
    };
    let rsdp_addr = place(Rsdp::len(), 16);
    let dsdt = dsdt();
    let dsdt_addr = place(dsdt.len(), 16);
    let facs = facs();
    let facs_addr = place(facs.len(), 64);
    let fadt = fadt(dsdt_addr, facs_addr);
    let fadt_addr = place(fadt.len(), 16);
    let madt = madt(vcpus);
    let madt_addr = place(madt.len(), 16);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(xsdt_bytes.len(), 16);
    if next > ACPI_END {
        return Err(AcpiError::TooLarge(next - ACPI_START));
    }
    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp_bytes);

    for (addr, bytes) in [
        (rsdp_addr, &rsdp_bytes),
        (dsdt_addr, &dsdt),
        (facs_addr, &facs),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (xsdt_addr, &xsdt_bytes),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_well_formed() {
        for table in [dsdt(), fadt(0x1000, 0x2000), madt(4)] {
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert!(checksum_ok(&table), "{:?}", &table[0..4]);
        }
        // The DSDT carries `Name(_S5_, Package(){0, 0, 0, 0})`.
        let dsdt = dsdt();
        assert_eq!(&dsdt[36..41], &[0x08, b'_', b'S', b'5', b'_']);
    }

    #[test]
    fn madt_lists_every_cpu() {
        let madt = madt(3);
        let mut cpus = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            if kind == 0 {
                cpus.push(madt[at + 3]);
            }
            at += len;
        }
        assert_eq!(at, madt.len());
        assert_eq!(cpus, vec![0, 1, 2]);
    }

    #[test]
    fn rsdp_points_at_the_tables_in_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp = write_tables(&mem, 2).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let xsdt: u64 = mem.read_obj(GuestAddress(rsdp + 24)).unwrap();
        let mut xsig = [0u8; 4];
        mem.read_slice(&mut xsig, GuestAddress(xsdt)).unwrap();
        assert_eq!(&xsig, b"XSDT");
    }
}
