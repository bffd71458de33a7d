//! ACPI tables: RSDP → XSDT → FADT (+ FACS, DSDT with `\_S5`, the PCI root and the CPUs) and MADT.
//!
//! They describe what a guest needs to power off, reboot and find every vCPU: PM1a event and control
//! blocks and the GPE0 block (see `devices::acpi_pm`), the 0xCF9 reset register, the IOAPIC, one local APIC
//! per possible vCPU (enabled for those present), and the CPU hotplug methods (`devices::cpu_hotplug`).
//! The tables live in the BIOS area (`layout::ACPI_START`), where Linux scans for the RSDP, and PVH guests
//! get the RSDP address in `hvm_start_info`.

use acpi_tables::{Aml, aml, fadt, gas, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::acpi_pm::{GPE0_LEN, GPE0_PORT, PM1A_CNT_PORT, PM1A_EVT_PORT, SCI_IRQ, SLP_TYP_S5};
use crate::devices::cpu_hotplug::{CPU_HOTPLUG_LEN, CPU_HOTPLUG_PORT, GPE_CPU_HOTPLUG};
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

/// The vCPUs a machine has now (`present`, APIC ids `0..present`) and can have (`max`, the rest
/// hot-pluggable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpus {
    pub present: u8,
    pub max: u8,
}

impl Cpus {
    /// `present` of `max` (at least `present`) vCPUs, each at most 255.
    pub fn new(present: u32, max: u32) -> Self {
        let present = present.min(255) as u8;
        Cpus { present, max: (max.min(255) as u8).max(present) }
    }
}

/// The DSDT: `\_S5` (soft-off, sleep type 0 as QEMU's PIIX4 uses), so that a guest OS can power off, the PCI
/// root bridge, and the CPUs with their hotplug methods.
fn dsdt(cpus: Cpus) -> Vec<u8> {
    let mut table = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, OEM_REVISION);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&(SLP_TYP_S5 as u8), &(SLP_TYP_S5 as u8), &aml::ZERO, &aml::ZERO]),
    );
    let mut bytes = Vec::new();
    s5.to_aml_bytes(&mut bytes);
    pci_root().to_aml_bytes(&mut bytes);
    cpu_devices(cpus.max, &mut bytes);
    table.append_slice(&bytes);
    table.as_slice().to_vec()
}

/// `\_SB.CPUS`, a processor container with one processor device (`ACPI0007`, `_UID` = APIC id = index) per
/// possible vCPU, and `\_GPE._E02`, which the CPU hotplug event runs:
///
/// ```text
/// Device (\_SB.CPUS) {
///     Name (_HID, "ACPI0010")  Name (_CID, EisaId ("PNP0A05"))
///     Mutex (CPLK, 0)
///     OperationRegion (PRST, SystemIO, 0x0CD8, 8)
///     Field (PRST, DWordAcc, NoLock, WriteAsZeros) { CSEL, 32, CPEN, 1, CINS, 1, , 30 }
///     Method (CSTA, 1, Serialized) {          // _STA of CPU Arg0: 0xF present, 0 absent
///         Acquire (CPLK, 0xFFFF)  CSEL = Arg0  Local0 = Zero
///         If (CPEN == One) { Local0 = 0x0F }
///         Release (CPLK)  Return (Local0)
///     }
///     Method (CTFY, 2) { If (Arg0 == 0) { Notify (C000, Arg1) } ... }
///     Method (CSCN, 0, Serialized) {          // notify (device check) and acknowledge every inserting CPU
///         Acquire (CPLK, 0xFFFF)  Local0 = Zero
///         While (Local0 < MAX) {
///             CSEL = Local0
///             If (CINS == One) { CTFY (Local0, One)  CINS = One }
///             Local0++
///         }
///         Release (CPLK)
///     }
///     Device (C000) { Name (_HID, "ACPI0007") Name (_UID, 0) Method (_STA) { Return (CSTA (0)) }
///                     Name (_MAT, Buffer () { 0, 8, 0, 0, 1, 0, 0, 0 }) }   // its MADT entry, enabled
///     ...
/// }
/// Scope (\_GPE) { Method (_E02) { \_SB.CPUS.CSCN () } }
/// ```
fn cpu_devices(max: u8, sink: &mut Vec<u8>) {
    let (port, len) = (usize::from(CPU_HOTPLUG_PORT), CPU_HOTPLUG_LEN as usize);
    let region = aml::OpRegion::new("PRST".into(), aml::OpRegionSpace::SystemIO, &port, &len);
    let field = aml::Field::new(
        "PRST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"CSEL", 32),
            aml::FieldEntry::Named(*b"CPEN", 1),
            aml::FieldEntry::Named(*b"CINS", 1),
            aml::FieldEntry::Reserved(30),
        ],
    );
    let (csel, cpen, cins) = (aml::Path::new("CSEL"), aml::Path::new("CPEN"), aml::Path::new("CINS"));
    let (arg0, arg1, local0) = (aml::Arg(0), aml::Arg(1), aml::Local(0));
    let (acquire, release) = (aml::Acquire::new("CPLK".into(), 0xFFFF), aml::Release::new("CPLK".into()));
    let present = 0x0Fusize;

    // CSTA (cpu): 0x0F when the CPU is present, else 0.
    let select_arg = aml::Store::new(&csel, &arg0);
    let clear_local = aml::Store::new(&local0, &aml::ZERO);
    let is_present = aml::Equal::new(&cpen, &aml::ONE);
    let set_present = aml::Store::new(&local0, &present);
    let if_present = aml::If::new(&is_present, vec![&set_present]);
    let return_local = aml::Return::new(&local0);
    let csta = aml::Method::new(
        "CSTA".into(),
        1,
        true,
        vec![&acquire, &select_arg, &clear_local, &if_present, &release, &return_local],
    );

    // CTFY (cpu, event): Notify the CPU's device.
    let indices: Vec<usize> = (0..usize::from(max)).collect();
    let paths: Vec<aml::Path> = (0..max).map(|i| aml::Path::new(&format!("C{i:03X}"))).collect();
    let notifies: Vec<aml::Notify> = paths.iter().map(|p| aml::Notify::new(p, &arg1)).collect();
    let matches: Vec<aml::Equal> = indices.iter().map(|i| aml::Equal::new(&arg0, i)).collect();
    let ifs: Vec<aml::If> = matches.iter().zip(&notifies).map(|(m, n)| aml::If::new(m, vec![n])).collect();
    let ctfy = aml::Method::new("CTFY".into(), 2, false, ifs.iter().map(|i| i as &dyn Aml).collect());

    // CSCN (): notify and acknowledge every inserting CPU.
    let max_cpus = usize::from(max);
    let select_local = aml::Store::new(&csel, &local0);
    let is_inserting = aml::Equal::new(&cins, &aml::ONE);
    let notify = aml::MethodCall::new("CTFY".into(), vec![&local0, &aml::ONE]);
    let acknowledge = aml::Store::new(&cins, &aml::ONE);
    let if_inserting = aml::If::new(&is_inserting, vec![&notify, &acknowledge]);
    let next = aml::Add::new(&local0, &local0, &aml::ONE);
    let more = aml::LessThan::new(&local0, &max_cpus);
    let each = aml::While::new(&more, vec![&select_local, &if_inserting, &next]);
    let cscn = aml::Method::new("CSCN".into(), 0, true, vec![&acquire, &clear_local, &each, &release]);

    // One processor device per possible CPU.
    let stas: Vec<aml::MethodCall> =
        indices.iter().map(|i| aml::MethodCall::new("CSTA".into(), vec![i as &dyn Aml])).collect();
    let returns: Vec<aml::Return> = stas.iter().map(|c| aml::Return::new(c)).collect();
    let sta_methods: Vec<aml::Method> =
        returns.iter().map(|r| aml::Method::new("_STA".into(), 0, false, vec![r as &dyn Aml])).collect();
    let mats: Vec<aml::BufferData> = (0..max).map(|i| aml::BufferData::new(vec![0, 8, i, i, 1, 0, 0, 0])).collect();
    let mat_names: Vec<aml::Name> = mats.iter().map(|m| aml::Name::new("_MAT".into(), m)).collect();
    let uid_names: Vec<aml::Name> = indices.iter().map(|i| aml::Name::new("_UID".into(), i)).collect();
    let processor_hid = aml::Name::new("_HID".into(), &"ACPI0007");
    let processors: Vec<aml::Device> = (0..max)
        .zip(uid_names.iter().zip(&sta_methods).zip(&mat_names))
        .map(|(i, ((uid, sta), mat))| {
            aml::Device::new(aml::Path::new(&format!("C{i:03X}")), vec![&processor_hid, uid, sta, mat])
        })
        .collect();

    let hid = aml::Name::new("_HID".into(), &"ACPI0010");
    let cid_id = aml::EISAName::new("PNP0A05");
    let cid = aml::Name::new("_CID".into(), &cid_id);
    let mutex = aml::Mutex::new("CPLK".into(), 0);
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &mutex, &region, &field, &csta, &ctfy, &cscn];
    children.extend(processors.iter().map(|p| p as &dyn Aml));
    aml::Device::new("\\_SB_.CPUS".into(), children).to_aml_bytes(sink);

    let scan = aml::MethodCall::new("\\_SB_.CPUS.CSCN".into(), vec![]);
    let gpe_method = aml::Method::new(format!("_E{GPE_CPU_HOTPLUG:02X}").as_str().into(), 0, false, vec![&scan]);
    aml::Scope::new("\\_GPE".into(), vec![&gpe_method]).to_aml_bytes(sink);
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
    b.gpe0_blk = u32::from(GPE0_PORT).into();
    b.gpe0_blk_len = GPE0_LEN as u8;
    b.x_gpe0_blk = gas::GAS::new(gas::AddressSpace::SystemIo, 32, 0, gas::AccessSize::ByteAccess, GPE0_PORT.into());
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

/// The MADT: PC-AT compatible 8259s, one IOAPIC, one local APIC per possible vCPU (APIC id = processor
/// UID = index; enabled for those present, "online capable" for those that can be hot-added), the SCI as a
/// level-triggered, active-high interrupt (as QEMU declares it) and LINT1 as NMI on every CPU.
///
/// Revision 5 (ACPI 6.3) for the online-capable flag: Linux since 5.17 counts a disabled local APIC as a
/// possible (hot-pluggable) CPU only when the table says it is online capable (Debian 12's 6.1 ignored the
/// disabled entries of a revision 3 table: "Allowing 1 CPUs, 0 hotplug CPUs").
fn madt(cpus: Cpus) -> Vec<u8> {
    let mut table = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE, OEM_REVISION);
    table.write_u32(36, LAPIC_BASE as u32);
    table.write_u32(40, 1); // PCAT_COMPAT: dual 8259s present
    for id in 0..cpus.max {
        let flags = if id < cpus.present { MADT_ENABLED } else { MADT_ONLINE_CAPABLE };
        table.append_slice(&[0, 8, id, id, flags, 0, 0, 0]); // Processor Local APIC
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

/// Local APIC flags: usable now, or can be enabled at run time (hot-added).
const MADT_ENABLED: u8 = 1 << 0;
const MADT_ONLINE_CAPABLE: u8 = 1 << 1;

/// Writes every table into guest memory and returns the RSDP's guest address.
pub fn write_tables(mem: &GuestMemoryMmap, cpus: Cpus) -> Result<u64, AcpiError> {
    let mut next = ACPI_START;
    let mut place = |len: usize, align: u64| {
        let addr = next.next_multiple_of(align);
        next = addr + len as u64;
        addr
    };
    let rsdp_addr = place(Rsdp::len(), 16);
    let dsdt = dsdt(cpus);
    let dsdt_addr = place(dsdt.len(), 16);
    let facs = facs();
    let facs_addr = place(facs.len(), 64);
    let fadt = fadt(dsdt_addr, facs_addr);
    let fadt_addr = place(fadt.len(), 16);
    let madt = madt(cpus);
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

/// Offsets of the 64-bit FACS and DSDT addresses in the FADT (ACPI 6).
const FADT_X_FIRMWARE_CTRL: usize = 132;
const FADT_X_DSDT: usize = 140;
/// XSDT entries start after the 36-byte header.
const XSDT_ENTRIES: usize = 36;
/// RSDP fields: XSDT address, checksum (first 20 bytes), extended checksum (all 36).
const RSDP_XSDT: usize = 24;
const RSDP_CHECKSUM: usize = 8;
const RSDP_EXT_CHECKSUM: usize = 32;
/// An SDT's checksum byte.
const SDT_CHECKSUM: usize = 9;

/// The same tables for firmware to install (QEMU's "linker/loader" fw_cfg files, which SeaBIOS executes):
/// `etc/acpi/tables` (FACS, DSDT, FADT, MADT, XSDT, with addresses relative to the file's start),
/// `etc/acpi/rsdp`, and `etc/table-loader`, the commands that place both files in guest memory, add the
/// tables' address to every pointer and fix the checksums.
pub struct FirmwareTables {
    pub rsdp: Vec<u8>,
    pub tables: Vec<u8>,
    pub loader: Vec<u8>,
}

pub const TABLES_FILE: &str = "etc/acpi/tables";
pub const RSDP_FILE: &str = "etc/acpi/rsdp";
pub const LOADER_FILE: &str = "etc/table-loader";

/// A 128-byte loader command.
fn loader_command(command: u32, fields: &[&[u8]]) -> Vec<u8> {
    let mut entry = command.to_le_bytes().to_vec();
    for f in fields {
        entry.extend_from_slice(f);
    }
    entry.resize(128, 0);
    entry
}

/// A file name in the loader's fixed 56-byte field.
fn loader_name(name: &str) -> Vec<u8> {
    let mut field = name.as_bytes().to_vec();
    field.resize(56, 0);
    field
}

pub fn firmware_tables(cpus: Cpus) -> FirmwareTables {
    let mut tables: Vec<u8> = Vec::new();
    let place = |tables: &mut Vec<u8>, bytes: &[u8], align: usize| {
        tables.resize(tables.len().next_multiple_of(align), 0);
        let at = tables.len();
        tables.extend_from_slice(bytes);
        at
    };
    // The FACS first: the allocation is 64-byte aligned, so it is too.
    let facs_at = place(&mut tables, &facs(), 64);
    let dsdt_at = place(&mut tables, &dsdt(cpus), 16);
    let fadt = fadt(dsdt_at as u64, facs_at as u64);
    let fadt_at = place(&mut tables, &fadt, 16);
    let madt = madt(cpus);
    let madt_at = place(&mut tables, &madt, 16);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(fadt_at as u64);
    xsdt.add_entry(madt_at as u64);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_at = place(&mut tables, &xsdt_bytes, 16);
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_at as u64).to_aml_bytes(&mut rsdp);

    let (t, r) = (loader_name(TABLES_FILE), loader_name(RSDP_FILE));
    let u32le = |v: usize| (v as u32).to_le_bytes().to_vec();
    let mut loader = Vec::new();
    loader.extend(loader_command(1, &[&t, &64u32.to_le_bytes(), &[1]])); // ALLOCATE tables, HIGH
    loader.extend(loader_command(1, &[&r, &16u32.to_le_bytes(), &[2]])); // ALLOCATE rsdp, FSEG
    let mut pointer = |dest: &[u8], offset: usize| {
        loader.extend(loader_command(2, &[dest, &t, &u32le(offset), &[8]])); // ADD_POINTER, 8 bytes
    };
    pointer(&t, fadt_at + FADT_X_FIRMWARE_CTRL);
    pointer(&t, fadt_at + FADT_X_DSDT);
    pointer(&t, xsdt_at + XSDT_ENTRIES);
    pointer(&t, xsdt_at + XSDT_ENTRIES + 8);
    pointer(&r, RSDP_XSDT);
    for (at, len) in [(fadt_at, fadt.len()), (xsdt_at, xsdt_bytes.len())] {
        loader.extend(loader_command(3, &[&t, &u32le(at + SDT_CHECKSUM), &u32le(at), &u32le(len)]));
    }
    loader.extend(loader_command(3, &[&r, &u32le(RSDP_CHECKSUM), &u32le(0), &u32le(20)]));
    loader.extend(loader_command(3, &[&r, &u32le(RSDP_EXT_CHECKSUM), &u32le(0), &u32le(rsdp.len())]));
    FirmwareTables { rsdp, tables, loader }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    /// Runs the loader the way firmware does, with the tables at `base` and the RSDP at `rsdp_base`.
    fn run_loader(t: &FirmwareTables, base: u64, rsdp_base: u64) -> (Vec<u8>, Vec<u8>) {
        let (mut tables, mut rsdp) = (t.tables.clone(), t.rsdp.clone());
        for cmd in t.loader.chunks_exact(128) {
            let name = |at: usize| String::from_utf8_lossy(&cmd[at..at + 56]).trim_end_matches('\0').to_owned();
            let u32at = |at: usize| u32::from_le_bytes(cmd[at..at + 4].try_into().unwrap()) as usize;
            match u32at(0) {
                1 => {}
                2 => {
                    let (dest, src, offset) = (name(4), name(60), u32at(116));
                    assert_eq!((src.as_str(), cmd[120]), (TABLES_FILE, 8));
                    let file = if dest == TABLES_FILE { &mut tables } else { &mut rsdp };
                    let v = u64::from_le_bytes(file[offset..offset + 8].try_into().unwrap()) + base;
                    file[offset..offset + 8].copy_from_slice(&v.to_le_bytes());
                }
                3 => {
                    let file = if name(4) == TABLES_FILE { &mut tables } else { &mut rsdp };
                    let (at, start, len) = (u32at(60), u32at(64), u32at(68));
                    let sum = file[start..start + len].iter().fold(0u8, |a, b| a.wrapping_add(*b));
                    file[at] = file[at].wrapping_sub(sum);
                }
                other => panic!("unknown loader command {other}"),
            }
        }
        let _ = rsdp_base;
        (tables, rsdp)
    }

    #[test]
    fn firmware_tables_relocate_with_the_loader() {
        let t = firmware_tables(Cpus::new(2, 2));
        assert_eq!(t.loader.len() % 128, 0);
        let base = 0x3FF0_0000u64;
        let (tables, rsdp) = run_loader(&t, base, 0xF_5000);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt = (u64::from_le_bytes(rsdp[24..32].try_into().unwrap()) - base) as usize;
        assert_eq!(&tables[xsdt..xsdt + 4], b"XSDT");
        let len = u32::from_le_bytes(tables[xsdt + 4..xsdt + 8].try_into().unwrap()) as usize;
        assert!(checksum_ok(&tables[xsdt..xsdt + len]));
        let fadt = (u64::from_le_bytes(tables[xsdt + 36..xsdt + 44].try_into().unwrap()) - base) as usize;
        assert_eq!(&tables[fadt..fadt + 4], b"FACP");
        let flen = u32::from_le_bytes(tables[fadt + 4..fadt + 8].try_into().unwrap()) as usize;
        assert!(checksum_ok(&tables[fadt..fadt + flen]));
        let dsdt = (u64::from_le_bytes(tables[fadt + 140..fadt + 148].try_into().unwrap()) - base) as usize;
        assert_eq!(&tables[dsdt..dsdt + 4], b"DSDT");
        let facs = (u64::from_le_bytes(tables[fadt + 132..fadt + 140].try_into().unwrap()) - base) as usize;
        assert_eq!(&tables[facs..facs + 4], b"FACS");
        let madt = (u64::from_le_bytes(tables[xsdt + 44..xsdt + 52].try_into().unwrap()) - base) as usize;
        assert_eq!(&tables[madt..madt + 4], b"APIC");
    }

    #[test]
    fn tables_are_well_formed() {
        for table in [dsdt(Cpus::new(2, 4)), fadt(0x1000, 0x2000), madt(Cpus::new(4, 4))] {
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert!(checksum_ok(&table), "{:?}", &table[0..4]);
        }
        // The DSDT carries `Name(_S5_, Package(){0, 0, 0, 0})`.
        let dsdt = dsdt(Cpus::new(1, 1));
        assert_eq!(&dsdt[36..41], &[0x08, b'_', b'S', b'5', b'_']);
    }

    #[test]
    fn madt_lists_every_possible_cpu_enabled_if_present() {
        let madt = madt(Cpus::new(3, 5));
        let mut cpus = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            if kind == 0 {
                cpus.push((madt[at + 2], madt[at + 3], madt[at + 4]));
            }
            at += len;
        }
        assert_eq!(at, madt.len());
        assert_eq!(cpus, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 2), (4, 4, 2)]);
        assert_eq!(madt[8], 5, "revision 5: the online-capable flag counts");
        assert_eq!(Cpus::new(4, 2), Cpus { present: 4, max: 4 }, "never fewer possible than present");
        assert_eq!(Cpus::new(300, 999), Cpus { present: 255, max: 255 });
    }

    /// Counts `needle` in `haystack`.
    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack.windows(needle.len()).filter(|w| *w == needle).count()
    }

    #[test]
    fn the_dsdt_has_a_processor_device_per_possible_cpu_and_the_hotplug_event() {
        let dsdt = dsdt(Cpus::new(1, 3));
        assert_eq!(count(&dsdt, b"ACPI0007"), 3, "a processor device per possible CPU");
        for name in [b"C000", b"C001", b"C002"] {
            // Declared once, notified once from CTFY.
            assert_eq!(count(&dsdt, name), 2, "{}", String::from_utf8_lossy(name));
        }
        assert_eq!(count(&dsdt, b"C003"), 0);
        assert_eq!(count(&dsdt, b"_E02"), 1);
        assert_eq!(count(&dsdt, b"CSCN"), 2, "declared, and called from _E02");
        // The FADT points at the GPE0 block the device's event is in.
        let fadt = fadt(0x1000, 0x2000);
        assert_eq!(u32::from_le_bytes(fadt[80..84].try_into().unwrap()), u32::from(GPE0_PORT));
        assert_eq!(fadt[92], GPE0_LEN as u8);
    }

    /// The DSDT is valid AML: ACPICA's disassembler (Debian's acpica-tools, which `./x test` installs) reads
    /// it back with the CPU hotplug methods. Skipped, saying so, where `iasl` is not installed.
    #[test]
    fn acpica_disassembles_the_dsdt() {
        let dir = std::env::temp_dir().join(format!("porthole-dsdt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dsdt.aml");
        std::fs::write(&path, dsdt(Cpus::new(2, 4))).unwrap();
        let out = match std::process::Command::new("iasl").arg("-d").arg(&path).current_dir(&dir).output() {
            Ok(out) => out,
            Err(e) => {
                eprintln!("SKIPPED: iasl (acpica-tools) cannot run here: {e}");
                return;
            }
        };
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{log}");
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl"));
        let _ = std::fs::remove_dir_all(&dir);
        let dsl = dsl.unwrap();
        for want in [
            "Device (\\_SB.CPUS)",
            "OperationRegion (PRST, SystemIO, 0x0CD8, 0x08)",
            "Method (CSCN, 0, Serialized)",
            "Device (C003)",
            "Notify (C003, Arg1)",
            "Method (_E02, 0, NotSerialized)",
            "\\_SB.CPUS.CSCN ()",
            "Device (_SB.PCI0)",
        ] {
            assert!(dsl.contains(want), "{want:?} not in the disassembly:\n{dsl}");
        }
    }

    #[test]
    fn rsdp_points_at_the_tables_in_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp = write_tables(&mem, Cpus::new(2, 2)).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let xsdt: u64 = mem.read_obj(GuestAddress(rsdp + 24)).unwrap();
        let mut xsig = [0u8; 4];
        mem.read_slice(&mut xsig, GuestAddress(xsdt)).unwrap();
        assert_eq!(&xsig, b"XSDT");
    }
}
