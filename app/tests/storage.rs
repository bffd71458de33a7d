//! The window's disks, driven through its accessibility tree (egui_kittest) against a real `portholed`: a VM's
//! snapshot tree (take, revert with confirmation, delete), snapshots of a running VM with its memory, suspend
//! to disk and resume, clones (full and linked) and templates. Each step is checked in the window and in what
//! the daemon reports.

use std::time::Duration;

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use porthole::PortholeApp;
use porthole_api::{SnapshotTree, TaskState, Vm, VmState};
use porthole_tests::Scratch;
use porthole_tests::daemon::Daemon;

mod common;
use common::*;

/// Steps the UI until `cond` holds (snapshots of a running VM save its memory: slow on emulated hardware).
fn wait(h: &mut Harness<'static, PortholeApp>, what: &str, cond: impl Fn(&Harness<'static, PortholeApp>) -> bool) {
    wait_within(h, what, Duration::from_secs(180), cond)
}

/// Clicks the first of the buttons labelled `name` (a VM has one in the list and its heading in the details).
fn select(h: &mut Harness<'static, PortholeApp>, name: &str) {
    wait(h, "the VM in the list", |h| has(h, name));
    h.get_all_by_label(name).next().expect("the VM's button").click();
    h.step();
    h.step();
}

fn vm_named(h: &Harness<'static, PortholeApp>, name: &str) -> Option<Vm> {
    h.state().backend.model().hosts.first().and_then(|host| host.vms.iter().find(|v| v.name == name).cloned())
}

/// A VM running the idle micro-guest, with the default disk (made through the API: the wizard has tests of its
/// own).
fn create_vm(d: &Daemon, rt: &tokio::runtime::Runtime, name: &str) -> Vm {
    rt.block_on(d.local().create_vm(&booting(name, "idle"))).unwrap()
}

fn tree(d: &Daemon, rt: &tokio::runtime::Runtime, id: &str) -> SnapshotTree {
    rt.block_on(d.local().snapshots(id)).unwrap()
}

/// Opens the "Take a snapshot" dialog, names the snapshot and takes it; waits for it in the tree.
fn take(h: &mut Harness<'static, PortholeApp>, name: &str, description: &str) {
    press(h, "Take snapshot…");
    wait(h, "the take dialog", |h| has(h, "Take a snapshot"));
    replace_text(h, "Snapshot name", name);
    if !description.is_empty() {
        h.get_by_role_and_label(Role::MultilineTextInput, "Description").focus();
        h.step();
        h.get_by_role_and_label(Role::MultilineTextInput, "Description").type_text(description);
        h.step();
    }
    assert!(!disabled(h, "Take snapshot"));
    press(h, "Take snapshot");
    // The tree may list it before the task ends (the daemon records it first): wait for the end too, which
    // enables the buttons again.
    wait(h, "the new snapshot in the tree", |h| has(h, &format!("Revert to {name}")) && !busy(h));
}

/// Whether a task of the selected VM runs (its buttons are disabled meanwhile).
fn busy(h: &Harness<'static, PortholeApp>) -> bool {
    let vm = h.state().selection().1;
    h.state().backend.model().tasks.iter().any(|t| Some(&t.vm) == vm.as_ref() && t.task.state == TaskState::Running)
}

#[test]
fn snapshots_are_taken_reverted_and_deleted_in_the_window() {
    let dir = Scratch::new("gui-snapshots");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vm = create_vm(&d, &rt, "snappy");
    let mut h = window(&d.socket(), dir.path("settings.json"), 1400.0, 1200.0);
    wait(&mut h, "the local host", |h| has(h, "Local — 1 VMs"));
    select(&mut h, "snappy");
    press(&mut h, "Snapshots");
    wait(&mut h, "the empty tree", |h| has_contains(h, "No snapshots yet") && has(h, "Now"));

    // A stopped VM: disks only, no memory choice.
    press(&mut h, "Take snapshot…");
    wait(&mut h, "the take dialog", |h| has(h, "Take a snapshot"));
    assert!(!has(&h, "Include memory (VM keeps running)"), "a stopped VM has no memory to keep");
    assert!(has_contains(&h, "holds its disks"));
    // A name the daemon would refuse is refused here first.
    replace_text(&mut h, "Snapshot name", "a/b");
    assert!(has_contains(&h, "no '/'") && disabled(&h, "Take snapshot"));
    press(&mut h, "Cancel");
    take(&mut h, "before upgrade", "clean install");
    assert!(has(&h, "clean install"), "the description is shown");
    assert!(has(&h, "disks"), "a disk-only snapshot");
    let t = tree(&d, &rt, &vm.id);
    assert_eq!(t.snapshots.len(), 1);
    let before = t.snapshots[0].clone();
    assert_eq!(
        (before.name.as_str(), before.description.as_str(), before.with_state),
        ("before upgrade", "clean install", false)
    );
    assert_eq!(t.current.as_deref(), Some(before.id.as_str()));
    take(&mut h, "after upgrade", "");
    let t = tree(&d, &rt, &vm.id);
    let after = t.snapshots.iter().find(|s| s.name == "after upgrade").unwrap().clone();
    assert_eq!(after.parent.as_deref(), Some(before.id.as_str()), "taken on top of the first");
    assert_eq!(t.current.as_deref(), Some(after.id.as_str()));
    // The size each holds, in human units.
    assert!(has_contains(&h, " KiB") || has_contains(&h, " MiB") || has_contains(&h, " B"));

    // Revert: a confirmation first; cancelling it sends nothing.
    press(&mut h, "Revert to before upgrade");
    wait(&mut h, "the revert confirmation", |h| has(h, "Revert to a snapshot"));
    assert!(has_contains(&h, "changes made since are lost"));
    press(&mut h, "Cancel");
    assert!(!has(&h, "Revert to a snapshot"));
    assert_eq!(tree(&d, &rt, &vm.id).current.as_deref(), Some(after.id.as_str()), "nothing was reverted");
    press(&mut h, "Revert to before upgrade");
    press(&mut h, "Revert now");
    wait(&mut h, "the revert done", |h| has_contains(h, "Revert snappy to before upgrade: done"));
    assert_eq!(tree(&d, &rt, &vm.id).current.as_deref(), Some(before.id.as_str()), "Now hangs from the first");

    // Delete the second, after a confirmation.
    press(&mut h, "Delete snapshot after upgrade");
    wait(&mut h, "the delete confirmation", |h| has(h, "Delete a snapshot"));
    press(&mut h, "Delete snapshot");
    wait(&mut h, "the snapshot gone", |h| !has(h, "Revert to after upgrade"));
    let t = tree(&d, &rt, &vm.id);
    assert_eq!(t.snapshots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["before upgrade"]);
    assert!(has(&h, "Revert to before upgrade") && has(&h, "Now"));
}

/// A new bare VM named `name` in the window, its snapshot section open.
fn bare_vm(name: &str, tag: &str) -> (Scratch, Daemon, tokio::runtime::Runtime, Vm, Harness<'static, PortholeApp>) {
    let dir = Scratch::new(tag);
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vm = create_bare_vm(&d, &rt, name);
    let mut h = window(&d.socket(), dir.path("settings.json"), 1400.0, 1200.0);
    select(&mut h, name);
    press(&mut h, "Snapshots");
    wait(&mut h, "the tree", |h| has(h, "Now"));
    (dir, d, rt, vm, h)
}

#[test]
fn a_running_vm_is_reverted_only_after_confirmation() {
    let (_dir, d, rt, vm, mut h) = bare_vm("runner", "gui-snapshots-running");
    // Two disk snapshots of the stopped VM, then it runs.
    take(&mut h, "first", "");
    take(&mut h, "second", "");
    let t = tree(&d, &rt, &vm.id);
    let first = t.snapshots.iter().find(|s| s.name == "first").unwrap().id.clone();
    let second = t.snapshots.iter().find(|s| s.name == "second").unwrap().id.clone();
    assert_eq!(t.current.as_deref(), Some(second.as_str()));
    press(&mut h, "Start");
    wait(&mut h, "running", |h| vm_named(h, "runner").is_some_and(|v| v.state == VmState::Running));

    // The dialog says the running VM's present state is lost; cancelled, nothing is sent.
    press(&mut h, "Revert to first");
    wait(&mut h, "the revert confirmation", |h| has(h, "Revert to a snapshot"));
    assert!(has_contains(&h, "runner is running: its present state is lost"));
    assert!(has_contains(&h, "The snapshot holds the disks only."));
    press(&mut h, "Cancel");
    assert!(!has(&h, "Revert to a snapshot"));
    assert_eq!(tree(&d, &rt, &vm.id).current.as_deref(), Some(second.as_str()), "nothing was reverted");
    // Confirmed: `confirm` is sent (the daemon refuses a running VM's revert without it).
    press(&mut h, "Revert to first");
    press(&mut h, "Revert now");
    wait(&mut h, "the revert done", |h| has_contains(h, "Revert runner to first: done"));
    assert_eq!(tree(&d, &rt, &vm.id).current.as_deref(), Some(first.as_str()));
}

/// Needs an engine that saves the running state of a VM with a disk (virtio) and a CD/DVD drive.
#[test]
fn a_running_vm_is_snapshotted_with_its_memory_and_suspended() {
    let (_dir, d, rt, vm, mut h) = bare_vm("live", "gui-snapshots-live");
    press(&mut h, "Start");
    wait(&mut h, "running", |h| vm_named(h, "live").is_some_and(|v| v.state == VmState::Running));
    // The memory choice is offered for a running VM, ticked.
    press(&mut h, "Take snapshot…");
    wait(&mut h, "the take dialog", |h| has(h, "Take a snapshot"));
    assert!(has_contains(&h, "reverting resumes the VM exactly where it is now"));
    press(&mut h, "Include memory (VM keeps running)");
    assert!(has_contains(&h, "The disks only, as after a power cut"));
    press(&mut h, "Cancel");
    // With memory: the VM keeps running.
    take(&mut h, "live one", "");
    assert!(has(&h, "disks + RAM"));
    let t = tree(&d, &rt, &vm.id);
    assert!(t.snapshots[0].with_state, "{t:?}");
    assert_eq!(vm_named(&h, "live").unwrap().state, VmState::Running, "it kept running");

    // Reverting the running VM to it: confirmed, it continues from the snapshot.
    press(&mut h, "Revert to live one");
    wait(&mut h, "the revert confirmation", |h| has(h, "Revert to a snapshot"));
    assert!(has_contains(&h, "live is running: its present state is lost"));
    assert!(has_contains(&h, "the VM continues where it was then"));
    press(&mut h, "Revert now");
    wait(&mut h, "the revert done", |h| has_contains(h, "Revert live to live one: done"));
    wait(&mut h, "running again", |h| vm_named(h, "live").is_some_and(|v| v.state == VmState::Running));

    // Suspend to disk, then resume from it.
    assert!(!disabled(&h, "Suspend"));
    press(&mut h, "Suspend");
    wait(&mut h, "suspended", |h| has(h, "suspended"));
    assert_eq!(vm_named(&h, "live").unwrap().state, VmState::Suspended);
    assert!(disabled(&h, "Suspend"), "only a running VM suspends");
    press(&mut h, "Resume from disk");
    wait(&mut h, "running after the resume", |h| vm_named(h, "live").is_some_and(|v| v.state == VmState::Running));
    // A frame drawn from the model as it is now (the wait may have seen the change after its last frame).
    h.step();
    assert!(has(&h, "Start"), "the button is Start again");
    press(&mut h, "Force off");
    wait(&mut h, "stopped", |h| vm_named(h, "live").is_some_and(|v| v.state == VmState::Stopped));
}

#[test]
fn clones_and_templates_in_the_window() {
    let dir = Scratch::new("gui-clones");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let base = create_vm(&d, &rt, "base");
    let mut h = window(&d.socket(), dir.path("settings.json"), 1400.0, 1200.0);
    select(&mut h, "base");

    // A template: badge in the list and the details, cannot start.
    assert!(!has(&h, "template"));
    press(&mut h, "Convert to template");
    wait(&mut h, "the template", |h| vm_named(h, "base").is_some_and(|v| v.template) && has(h, "template"));
    assert!(disabled(&h, "Start"), "templates cannot start");
    assert!(has(&h, "Convert to VM"));

    // A full copy.
    press(&mut h, "Clone…");
    wait(&mut h, "the clone dialog", |h| has(h, "Clone base"));
    assert!(has_contains(&h, "own copy of the disk") && has_contains(&h, "only its own changes"));
    press(&mut h, "Full copy");
    replace_text(&mut h, "Clone name", "full1");
    press(&mut h, "Clone");
    wait(&mut h, "the full copy", |h| vm_named(h, "full1").is_some() && has_contains(h, "as full1 (full copy): done"));
    let full = vm_named(&h, "full1").unwrap();
    assert_eq!((full.linked_to.as_deref(), full.template), (None, false));

    // A linked clone: "linked to base" in the list and its details.
    select(&mut h, "base");
    press(&mut h, "Clone…");
    press(&mut h, "Linked clone");
    replace_text(&mut h, "Clone name", "linked1");
    // A name in use is refused before sending.
    replace_text(&mut h, "Clone name", "full1");
    assert!(has_contains(&h, "There is a VM named \"full1\" already") && disabled(&h, "Clone"));
    replace_text(&mut h, "Clone name", "linked1");
    press(&mut h, "Clone");
    wait(&mut h, "the linked clone", |h| {
        vm_named(h, "linked1").is_some() && has_contains(h, "as linked1 (linked clone): done")
    });
    assert_eq!(vm_named(&h, "linked1").unwrap().linked_to.as_deref(), Some(base.id.as_str()));
    select(&mut h, "linked1");
    wait(&mut h, "the link shown", |h| has(h, "linked to base"));
    assert!(!disabled(&h, "Start"), "a clone is a VM");

    // The base cannot become a VM again while a clone uses it: the daemon's reason is shown.
    select(&mut h, "base");
    press(&mut h, "Convert to VM");
    wait(&mut h, "the refusal", |h| has_contains(h, "Convert to VM base failed"));
    assert!(vm_named(&h, "base").unwrap().template);
}
