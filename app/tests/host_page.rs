//! The *Host* tab, driven through its accessibility tree (egui_kittest) against a real `portholed`: the host's
//! capacity and use, its image library (an image a VM uses cannot be deleted; a free one is, after a
//! confirmation; a file dropped on the page is uploaded into the library) and its tasks (a shutdown the
//! guest ignores, cancelled from the page: the VM keeps running).

use porthole_api::{CreateVm, TaskState, VmState};
use porthole_tests::Scratch;
use porthole_tests::daemon::Daemon;

mod common;
use common::*;

#[test]
fn the_host_page_shows_capacity_library_and_tasks() {
    let dir = Scratch::new("gui-host-page");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = d.local();
    for name in ["cd.iso", "spare.iso"] {
        let file = dir.path(name);
        std::fs::write(&file, vec![1u8; 32 << 10]).unwrap();
        rt.block_on(c.upload_image(name, &file, |_, _| {})).unwrap();
    }
    let vm = rt
        .block_on(c.create_vm(&CreateVm { media: Some("cd.iso".into()), disk_gib: 0, ..booting("ticking", "ticker") }))
        .unwrap();
    rt.block_on(c.action(&vm.id, porthole_api::client::Action::Start)).unwrap();

    let mut h = window(&d.socket(), dir.path("settings.json"), 1200.0, 900.0);
    wait(&mut h, "the host", |h| has(h, "Local — 1 VMs"));
    click(&mut h, "Host");
    wait(&mut h, "the host page", |h| has(h, "Host Local") && has_contains(h, "vCPUs given to 1 running VMs"));
    assert!(has_contains(&h, "of") && has_contains(&h, "in use"), "memory and disk bars");
    wait(&mut h, "the host's graphs", |h| has_contains(h, "CPU %"));

    // The library: the ISO in the VM's drive names its user and cannot be deleted; the spare one can.
    wait(&mut h, "the library", |h| has(h, "Delete spare.iso"));
    assert!(has(&h, "ticking"), "the ISO's user");
    assert!(disabled(&h, "Delete cd.iso"), "an image in use cannot be deleted");
    click(&mut h, "Delete spare.iso");
    click(&mut h, "Confirm deleting spare.iso");
    wait(&mut h, "the deletion", |h| !has(h, "Delete spare.iso"));
    let names: Vec<String> = rt.block_on(c.images()).unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["cd.iso"]);

    // A file dropped on the page goes into the library.
    let kernel = dir.path("vmlinuz-test");
    std::fs::write(&kernel, vec![9u8; 100 << 10]).unwrap();
    h.input_mut().dropped_files.push(std::sync::Arc::new(Dropped(kernel)));
    wait(&mut h, "the dropped file in the library", |h| has(h, "Delete vmlinuz-test"));
    let image = rt.block_on(c.images()).unwrap().into_iter().find(|i| i.name == "vmlinuz-test");
    assert_eq!(image.map(|i| i.size_bytes), Some(100 << 10));

    // A shutdown the ticker ignores, cancelled on the page: the task ends cancelled and the VM runs on.
    let task = rt.block_on(c.shutdown(&vm.id, 120)).unwrap();
    let label = format!("Cancel shut down {}", vm.id);
    wait(&mut h, "the shutdown task", |h| has(h, &label));
    click(&mut h, &label);
    wait(&mut h, "the cancelled task", |h| has_contains(h, &format!("shut down {}: cancelled", vm.id)));
    assert_eq!(rt.block_on(c.task(&task.id)).unwrap().state, TaskState::Cancelled);
    assert_eq!(rt.block_on(c.vm(&vm.id)).unwrap().state, VmState::Running);
    rt.block_on(c.action(&vm.id, porthole_api::client::Action::Poweroff)).unwrap();
}
