//! The machine list's grid view, driven through egui_kittest against a real `portholed`: cards with each VM's
//! screen, name and state; a click on a name selects, a click on a running VM's screen opens its console;
//! with more VMs than fit, only the cards on screen are laid out.

use porthole_api::client::Action;
use porthole_api::{CreateVm, VmState};
use porthole_tests::Scratch;
use porthole_tests::daemon::Daemon;

mod common;
use common::*;

#[test]
fn the_grid_shows_screens_selects_and_opens_consoles() {
    let dir = Scratch::new("gui-grid");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = d.local();
    let demo = rt.block_on(c.create_vm(&CreateVm { disk_gib: 0, ..booting("a-demo", "demo") })).unwrap();
    rt.block_on(c.action(&demo.id, Action::Start)).unwrap();
    // Forty stopped VMs after it: more than a screenful of cards.
    for i in 0..40 {
        let req = CreateVm { disk_gib: 0, ..booting(&format!("vm-{i:02}"), "idle") };
        rt.block_on(c.create_vm(&req)).unwrap();
    }
    let mut h = window(&d.socket(), dir.path("settings.json"), 1000.0, 800.0);
    wait(&mut h, "the list", |h| has(h, "Local — 41 VMs"));
    click(&mut h, "Grid");
    wait(&mut h, "the demo's card", |h| has(h, "a-demo screen") && has(h, "vm-00"));
    // Only the cards in view exist: the last ones are far below.
    assert!(!has(&h, "vm-39"), "a card out of view was laid out");
    // The running demo's screen arrives, at the card's size (fetched at twice the width for HiDPI).
    wait(&mut h, "the demo's screen at the card's size", |h| h.state().thumbnail_size(0, &demo.id) == Some([384, 288]));

    // A click on a name selects the VM (the details show below); a click on the demo's screen opens its console.
    h.get_by_label("vm-01").click_accesskit();
    wait(&mut h, "the selection", |h| h.state().selection().1.is_some() && has(h, "Start"));
    use egui_kittest::kittest::Queryable;
    click(&mut h, "a-demo screen");
    wait(&mut h, "the demo's console", |h| h.state().console_titles() == ["a-demo"]);
    assert_eq!(rt.block_on(c.vm(&demo.id)).unwrap().state, VmState::Running);
    rt.block_on(c.action(&demo.id, Action::Poweroff)).unwrap();
}
