//! OS detection in the create wizard, driven through the window's accessibility tree against a real
//! `portholed` and the host's osinfo-db (Debian's `osinfo-db` package; `./x test` installs it): ISOs built
//! with xorriso carrying real distributions' volume ids are dropped on the window, typed into the ISO field
//! or picked from the library (whose host page lists it too); the wizard names the OS, pre-fills its recommended memory and disk where the
//! user has not changed them, warns below the minimum and for a UEFI-only ISO, and says "Unknown OS" for an
//! ISO the db does not know. (Not Debian 12: bookworm's osinfo-db predates it, so it would be unknown.)

use std::path::{Path, PathBuf};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use porthole::PortholeApp;
use porthole::app::Wizard;
use porthole_tests::daemon::Daemon;
use porthole_tests::{IsoBoot, Scratch, xorriso_iso};

mod common;
use common::*;

/// A file dropped on the window, as a desktop would hand it over.
#[derive(Debug)]
struct Dropped(PathBuf);

impl egui::DroppedFile for Dropped {
    fn path(&self) -> &Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

/// The wizard's (vCPUs, memory MiB, disk GiB).
fn shape(h: &Harness<'static, PortholeApp>) -> (u32, u64, u64) {
    let w: &Wizard = h.state().wizard.as_ref().expect("the wizard is open");
    (w.vcpus, w.memory_mib, w.disk_gib)
}

#[test]
fn the_wizard_names_the_os_and_suggests_its_resources() {
    let dir = Scratch::new("gui-osinfo");
    let d = Daemon::start(&dir, false, &[]);
    let ubuntu = xorriso_iso(&dir, "ubuntu-22.04.iso", "Ubuntu 22.04.1 LTS amd64", IsoBoot::UefiOnly);
    let debian = xorriso_iso(&dir, "debian-11.iso", "Debian 11.5.0 amd64 n", IsoBoot::Bios);
    let unknown = xorriso_iso(&dir, "installer.iso", "PORTHOLE_DEBIAN_INSTALLER", IsoBoot::Bios);
    let fedora = xorriso_iso(&dir, "fedora.iso", "Fedora-WS-Live-37-1-7", IsoBoot::Bios);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(d.local().upload_image("fedora.iso", &fedora, |_, _| {})).unwrap();

    let mut h = window(&d.socket(), dir.path("settings.json"), 1400.0, 1200.0);
    wait(&mut h, "the local host", |h| has(h, "Local — 0 VMs"));

    // Dropped on the window away from every VM: the wizard opens with it and names the OS.
    h.get_by_label("Add host…").hover();
    h.step();
    h.input_mut().dropped_files.push(std::sync::Arc::new(Dropped(ubuntu)));
    wait(&mut h, "Ubuntu detected", |h| has(h, "Ubuntu 22.04 LTS (ubuntu22.04)"));
    assert_eq!(shape(&h), (1, 4096, 25), "osinfo-db's recommended 4 GiB and 25 GiB; it recommends no vCPU count");
    assert!(has_contains(&h, "boots only with UEFI"), "the ISO has only a UEFI boot entry");
    assert!(!has_contains(&h, "needs at least"));

    // Below the OS's minimum: a warning, and Create stays possible.
    h.state_mut().wizard.as_mut().unwrap().memory_mib = 1024;
    h.step();
    h.step();
    assert!(has_contains(&h, "Ubuntu 22.04 LTS needs at least 2048 MiB of memory"));
    assert!(!disabled(&h, "Create"), "a warning, not an error");

    // Another ISO typed in: the memory the user chose stays, the untouched disk follows the new OS.
    replace_text(&mut h, "ISO", &debian.display().to_string());
    wait(&mut h, "Debian detected", |h| has(h, "Debian 11 (debian11)"));
    assert_eq!(shape(&h), (1, 1024, 20));
    assert!(!has_contains(&h, "boots only with UEFI") && !has_contains(&h, "needs at least"));

    // One the db does not know: Unknown OS, the fields as they are.
    replace_text(&mut h, "ISO", &unknown.display().to_string());
    wait(&mut h, "Unknown OS", |h| has(h, "Unknown OS"));
    assert_eq!(shape(&h), (1, 1024, 20));

    // A library image: what the host detected at upload comes with it.
    click(&mut h, "Cancel");
    click(&mut h, "New VM…");
    wait(&mut h, "the library", |h| h.state().backend.model().images.get(&0).is_some_and(|i| !i.is_empty()));
    let image = h.state().backend.model().images[&0].iter().find(|i| i.name == "fedora.iso").unwrap().clone();
    assert_eq!(image.os.as_ref().map(|o| o.short_id.as_str()), Some("fedora37"));
    combo(&mut h, "Disk", "copy of a library image");
    let entry = porthole::app::image_text(&image);
    assert!(entry.ends_with(", Fedora Linux 37"), "the picker names the OS: {entry}");
    combo(&mut h, "Image", &entry);
    wait(&mut h, "Fedora detected", |h| has(h, "Fedora Linux 37 (fedora37)"));
    assert_eq!(shape(&h).1, 2048, "osinfo-db's recommended 2 GiB");

    // The host page's library says it too.
    click(&mut h, "Cancel");
    click(&mut h, "Host");
    wait(&mut h, "the library on the host page", |h| has(h, "Delete fedora.iso"));
    assert!(has(&h, "Fedora Linux 37 (fedora37)"));
}
