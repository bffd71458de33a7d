//! Assembles every micro-guest in `asm/` with the machine's GNU `as` and links it with `ld` into a PVH ELF
//! file in OUT_DIR. `start.S` and `lib.S` are linked into every guest; every other `NAME.S` is one guest.
//! The special guests in `asm/special/` test the kernel loaders themselves: each `NAME.S` there is a
//! self-contained 32-bit guest (`as --32`, `ld -m elf_i386` with `special/guest32.ld`, no `start.S`), listed
//! in the same table under its NAME.

use std::path::{Path, PathBuf};
use std::process::Command;

const SHARED: [&str; 2] = ["start", "lib"];

fn run(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {shown}: {e}\nthe micro-guests need GNU binutils (as, ld): apt-get install binutils")
    });
    if !out.status.success() {
        panic!("{shown} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
}

fn assemble(source: &Path, object: &Path, include: &Path, bits: &str) {
    run(Command::new("as").arg(bits).arg("-I").arg(include).arg("-o").arg(object).arg(source));
}

/// The stems of the `NAME.S` files in `dir`, sorted, without `skip`.
fn sources(dir: &Path, skip: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let stem = path.file_stem()?.to_str()?.to_owned();
            (path.extension()? == "S" && !skip.contains(&stem.as_str())).then_some(stem)
        })
        .collect();
    names.sort();
    names
}

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("asm");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    println!("cargo::rerun-if-changed={}", dir.display());

    let shared: Vec<PathBuf> = SHARED
        .iter()
        .map(|name| {
            let object = out.join(format!("{name}.o"));
            assemble(&dir.join(format!("{name}.S")), &object, &dir, "--64");
            object
        })
        .collect();

    let mut table = String::new();
    for name in &sources(&dir, &SHARED) {
        let object = out.join(format!("{name}.o"));
        let elf = out.join(format!("{name}.elf"));
        assemble(&dir.join(format!("{name}.S")), &object, &dir, "--64");
        run(Command::new("ld")
            .args(["-m", "elf_x86_64", "-z", "noexecstack", "--no-warn-rwx-segments", "-T"])
            .arg(dir.join("guest.ld"))
            .arg("-o")
            .arg(&elf)
            .args(&shared)
            .arg(&object));
        table.push_str(&format!("    ({name:?}, {:?}),\n", elf.display().to_string()));
    }
    let special = dir.join("special");
    let normal = sources(&dir, &SHARED);
    for name in &sources(&special, &[]) {
        assert!(!normal.contains(name), "asm/special/{name}.S and asm/{name}.S would both be the guest {name:?}");
        let object = out.join(format!("special-{name}.o"));
        let elf = out.join(format!("{name}.elf"));
        assemble(&special.join(format!("{name}.S")), &object, &special, "--32");
        run(Command::new("ld")
            .args(["-m", "elf_i386", "-z", "noexecstack", "--no-warn-rwx-segments", "-T"])
            .arg(special.join("guest32.ld"))
            .arg("-o")
            .arg(&elf)
            .arg(&object));
        table.push_str(&format!("    ({name:?}, {:?}),\n", elf.display().to_string()));
    }
    std::fs::write(out.join("guests.rs"), format!("pub const GUESTS: &[(&str, &str)] = &[\n{table}];\n"))
        .expect("write guests.rs");
}
