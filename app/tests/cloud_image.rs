//! The wizard's *From a cloud image* mode, driven through the window's accessibility tree against a real
//! `portholed`: the SSH key found in `~/.ssh` (of a HOME made for the test), the local user, the library's disk
//! images only (with their format and sizes), the request the daemon gets, and the details of the VM made.
//! (One test in this file: it sets HOME and USER for the whole process.)

use std::process::Command;

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use porthole::PortholeApp;
use porthole_api::{DiskFormat, Vm};
use porthole_tests::Scratch;
use porthole_tests::daemon::Daemon;

mod common;
use common::*;

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHd0ZXN0LWtleS1mb3ItcG9ydGhvbGU tester@porthole";

fn vm_named(h: &Harness<'static, PortholeApp>, name: &str) -> Option<Vm> {
    h.state().backend.model().hosts.first().and_then(|host| host.vms.iter().find(|v| v.name == name).cloned())
}

/// The text in the SSH key field.
fn key_field(h: &Harness<'static, PortholeApp>) -> String {
    h.get_by_role_and_label(Role::MultilineTextInput, "SSH public key").accesskit_node().value().unwrap_or_default()
}

#[test]
fn a_vm_from_a_cloud_image_gets_the_users_key_and_name() {
    let dir = Scratch::new("gui-cloud");
    let home = dir.path("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    // SAFETY: the only test of this binary, before it starts any thread.
    unsafe {
        std::env::set_var("HOME", &home);
        std::env::set_var("USER", "tester");
    }
    let d = Daemon::start(&dir, false, &[]);
    // The library: a qcow2 cloud image (made by qemu-img, the outside peer) and an ISO, which is not offered.
    let image = dir.path("cloud.qcow2");
    let made = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("9728M").status();
    assert!(made.is_ok_and(|s| s.success()), "qemu-img (Debian's qemu-utils) makes the test image");
    let iso = dir.path("tools.iso");
    let mut bytes = vec![0u8; 40 * 1024];
    bytes[32_769..32_774].copy_from_slice(b"CD001");
    std::fs::write(&iso, bytes).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = d.local();
    rt.block_on(c.upload_image("cloud.qcow2", &image, |_, _| {})).unwrap();
    rt.block_on(c.upload_image("tools.iso", &iso, |_, _| {})).unwrap();
    let images = rt.block_on(c.images()).unwrap();
    let cloud = images.iter().find(|i| i.name == "cloud.qcow2").unwrap().clone();
    assert_eq!((cloud.format, cloud.virtual_bytes), (porthole_api::ImageFormat::Qcow2, 9728 << 20));

    let mut h = window(&d.socket(), dir.path("settings.json"), 1400.0, 1200.0);
    wait(&mut h, "the local host", |h| has(h, "Local — 0 VMs"));

    // Without a key in ~/.ssh (read when the wizard opens): the wizard says so and waits for one.
    click(&mut h, "New VM…");
    type_into(&mut h, "Name", "nokey");
    combo(&mut h, "Disk", "from a cloud image");
    assert_eq!(key_field(&h), "");
    assert!(has(&h, "No key found in ~/.ssh (*.pub): paste one."));
    assert!(has_contains(&h, "No SSH public key was found in ~/.ssh"));
    assert!(disabled(&h, "Create"));
    click(&mut h, "Cancel");

    // With one: it is the default.
    std::fs::write(home.join(".ssh/id_ed25519.pub"), format!("{KEY}\n")).unwrap();
    click(&mut h, "New VM…");
    type_into(&mut h, "Name", "cloudy");
    combo(&mut h, "Disk", "from a cloud image");
    // The seed's defaults: the local user, the key of ~/.ssh, the hostname from the VM's name.
    assert_eq!(key_field(&h), KEY);
    assert!(has(&h, &format!("from {}", home.join(".ssh/id_ed25519.pub").display())));
    assert_eq!(
        h.get_by_role_and_label(Role::TextInput, "User name").accesskit_node().value().as_deref(),
        Some("tester")
    );
    assert!(has_contains(&h, "Choose the cloud image"), "no image yet");
    // The picker lists disk images with their format and sizes, not the ISO.
    let entry = porthole::app::image_text(&cloud);
    assert!(entry.contains("qcow2, 9.5 GiB virtual"), "{entry}");
    h.get_by_role_and_label(Role::ComboBox, "Image").click();
    h.step();
    h.step();
    assert!(has(&h, &entry) && !has_contains(&h, "tools.iso"), "only disk images are offered");
    h.get_all_by_label(&entry).last().unwrap().click();
    h.step();
    h.step();
    // The disk grew to hold the image (the default 8 GiB → 10 GiB).
    assert_eq!(h.state().wizard.as_ref().unwrap().disk_gib, 10);
    assert!(has_contains(&h, "qcow2: an overlay on the image"));
    wait(&mut h, "a valid wizard", |h| !disabled(h, "Create"));
    assert!(has_contains(&h, "over cloud image cloud.qcow2 (user tester, hostname cloudy)"));
    click(&mut h, "Create");
    wait(&mut h, "the new VM", |h| vm_named(h, "cloudy").is_some());

    // What the daemon made of the request.
    let vm = vm_named(&h, "cloudy").unwrap();
    let seed = vm.cloud_init.clone().expect("a cloud-init VM");
    assert_eq!((seed.user.as_str(), seed.hostname.as_str()), ("tester", "cloudy"));
    assert_eq!(vm.disk_format, Some(DiskFormat::Qcow2));
    assert_eq!(vm.disk_bytes, 10 << 30);
    // Its details: the seed's user and hostname, and the SSH line logs in as that user.
    wait(&mut h, "the new VM's row", |h| h.get_all_by_label("cloudy").next().is_some());
    h.get_all_by_label("cloudy").next().unwrap().click();
    h.step();
    h.step();
    wait(&mut h, "the details", |h| has(h, "user tester, hostname cloudy"));
    let port = vm.nics[0].forwards.iter().find(|f| f.guest_port == 22).expect("the SSH forward").host_port;
    assert!(has(&h, &format!("ssh -p {port} tester@localhost")));
    assert!(has_contains(&h, "10 GiB qcow2, "), "the disk's format and allocation");
}
