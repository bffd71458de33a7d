//! HiDPI layout check: every main screen (the machine list, the grid, a VM's details, its settings, the
//! wizard, the host page, the shortcuts and preferences dialogs, a console tab) is laid out at 1.0, 1.5 and
//! 2.0 pixels per point in a window of the app's default size (1100 × 700 points), against a real
//! `portholed`, and its accessibility tree (egui_kittest) is checked with these rules:
//!
//! - A *named* node is one with an accessibility label, or a `Label` whose text runs carry text; only those
//!   are checked (text runs, title bars and unnamed containers are parts of a named node or hold one).
//! - **Window**: a named node's bounds (physical pixels) lie wholly inside the window.
//! - **Container**: they lie inside the bounds of the nearest container around it that has bounds: an egui
//!   window or dialog (its accessibility bounds) or a panel (the rect egui recorded for the panel's `Ui`,
//!   cut to its clip rect).
//! - **Not clipped**: egui records for every widget its rect and its rect cut to the clip rect of the `Ui`
//!   that holds it (panel, window, scroll area, ...); the two must agree, i.e. nothing of it is cut off.
//! - **Scroll areas**: content below (or beside) the visible part of a scroll area is clipped by design, and
//!   egui leaves text that is wholly out of view out of the tree. So each screen is looked at in several
//!   scroll positions: as first shown; then page by page down (mouse wheel over the main panel) until
//!   nothing moves; then each node that has not yet satisfied every rule is asked to scroll into view
//!   (AccessKit `ScrollIntoView`, as a screen reader does). A node passes if it satisfies every rule in
//!   one of those positions; a node in no scroll area never moves and fails. A node the list no longer
//!   lays out after another one was scrolled to (only visible rows and cards are laid out) is not checked
//!   further.
//! - **No overlap**: no two controls or labels of the same window, dialog, menu or panel (the nearest one
//!   around each in the tree; neither inside the other) overlap in their visible parts by more than a pixel
//!   in both directions. (Siblings in the strict sense are too few: egui puts a widget placed at a given
//!   rect, `Ui::put`, in a `Ui` of its own.)
//!
//! One physical pixel is tolerated everywhere, for rounding at fractional scales. Every problem of every
//! screen at every scale is collected and reported together.

use std::collections::{BTreeSet, HashMap, HashSet};

use egui::accesskit::Role;
use egui::{Key, Modifiers, Rect};
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use porthole::PortholeApp;
use porthole_api::VmState;
use porthole_api::client::Action;
use porthole_tests::Scratch;
use porthole_tests::daemon::Daemon;

mod common;
use common::*;

/// The window's size in points (the app's default inner size, app/src/main.rs).
const WINDOW: egui::Vec2 = egui::vec2(1100.0, 700.0);

/// A 1920 × 1080 screen at 200%: 960 × 540 points for the whole screen (less than the default window).
const SMALL_HIDPI_SCREEN: egui::Vec2 = egui::vec2(960.0, 540.0);

/// A named node as the checks see it.
#[derive(Debug, Clone)]
struct Named {
    id: u64,
    /// Its ancestors' ids, nearest first.
    ancestors: Vec<u64>,
    role: Role,
    name: String,
    /// Bounds in physical pixels.
    bounds: Rect,
    /// The nearest container around it that has bounds (physical pixels), and what it is.
    container: Option<(Rect, String)>,
    /// The id of the nearest window, dialog, menu, tooltip or panel around it.
    area: u64,
}

/// What egui recorded for the last frame's widgets: (rect, rect cut to the clip rect), in points, by id.
fn widget_rects(h: &Harness<'static, PortholeApp>) -> HashMap<u64, (Rect, Rect)> {
    h.ctx.viewport(|v| {
        v.prev_pass
            .widgets
            .layers()
            .flat_map(|(_, rects)| rects.iter())
            .map(|w| (w.id.value(), (w.rect, w.interact_rect)))
            .collect()
    })
}

fn rect_of(r: egui::accesskit::Rect) -> Rect {
    Rect::from_min_max(egui::pos2(r.x0 as f32, r.y0 as f32), egui::pos2(r.x1 as f32, r.y1 as f32))
}

/// The text a node shows: its label, or for a `Label` the text of its runs.
fn name_of(n: &egui_kittest::Node<'_>) -> Option<String> {
    let a = n.accesskit_node();
    if matches!(a.role(), Role::TextRun | Role::Unknown | Role::GenericContainer | Role::Pane) {
        return None;
    }
    let name = match a.label() {
        Some(l) => l,
        None if a.role() == Role::Label => n.children().filter_map(|c| c.accesskit_node().value()).collect::<String>(),
        None => String::new(),
    };
    let name = name.trim().to_owned();
    (!name.is_empty()).then_some(name)
}

/// Every named node with bounds, with its nearest container.
fn named_nodes(h: &Harness<'static, PortholeApp>, rects: &HashMap<u64, (Rect, Rect)>, ppp: f32) -> Vec<Named> {
    struct Around {
        ancestors: Vec<u64>,
        container: Option<(Rect, String)>,
        area: u64,
    }
    fn walk(
        n: egui_kittest::Node<'_>,
        around: &Around,
        rects: &HashMap<u64, (Rect, Rect)>,
        ppp: f32,
        out: &mut Vec<Named>,
    ) {
        let a = n.accesskit_node();
        let id = a.locate().0.0;
        let own_bounds = a.bounding_box().map(rect_of);
        if let (Some(name), Some(bounds)) = (name_of(&n), own_bounds) {
            out.push(Named {
                id,
                ancestors: around.ancestors.clone(),
                role: a.role(),
                name,
                bounds,
                container: around.container.clone(),
                area: around.area,
            });
        }
        // What the children are inside.
        let here = match a.role() {
            Role::Window | Role::Dialog | Role::Menu | Role::Tooltip if !a.is_root() => {
                own_bounds.map(|b| (b, format!("{:?} {:?}", a.role(), a.label().unwrap_or_default())))
            }
            Role::Pane => rects.get(&id).map(|(_, visible)| (*visible * ppp, "panel".to_owned())),
            _ => None,
        };
        let is_area = matches!(a.role(), Role::Window | Role::Dialog | Role::Menu | Role::Tooltip | Role::Pane);
        let inner = Around {
            ancestors: std::iter::once(id).chain(around.ancestors.iter().copied()).collect(),
            area: if is_area { id } else { around.area },
            container: here.or(around.container.clone()),
        };
        for c in n.children() {
            walk(c, &inner, rects, ppp, out);
        }
    }
    let mut out = Vec::new();
    walk(h.root(), &Around { ancestors: Vec::new(), container: None, area: 0 }, rects, ppp, &mut out);
    out
}

/// Whether `inner` lies inside `outer`, give or take `slack`.
fn inside(inner: Rect, outer: Rect, slack: f32) -> bool {
    outer.expand(slack).contains_rect(inner)
}

/// What is wrong with one node: outside the window, outside its container, clipped.
fn placement_problems(n: &Named, rects: &HashMap<u64, (Rect, Rect)>, ppp: f32, size: egui::Vec2) -> Vec<String> {
    let mut problems = Vec::new();
    let window = Rect::from_min_size(egui::Pos2::ZERO, size * ppp);
    // (A window's resize handles straddle its edge by design.)
    if n.role != Role::Splitter && !inside(n.bounds, window, 1.0) {
        problems.push(format!("outside the window {window:?}"));
    }
    if let Some((container, what)) = &n.container
        && n.role != Role::Splitter
        && !inside(n.bounds, *container, 1.0)
    {
        problems.push(format!("outside its container ({what} at {container:?})"));
    }
    if let Some((rect, visible)) = rects.get(&n.id)
        && rect.is_positive()
        && !inside(*rect, *visible, 1.0 / ppp)
    {
        problems.push(format!("clipped: only {visible:?} of {rect:?} (points) shows"));
    }
    problems
}

/// Roles of the things that must not overlap their siblings.
fn is_control_or_text(role: Role) -> bool {
    matches!(
        role,
        Role::Button
            | Role::CheckBox
            | Role::RadioButton
            | Role::ComboBox
            | Role::TextInput
            | Role::MultilineTextInput
            | Role::Link
            | Role::Slider
            | Role::SpinButton
            | Role::Tab
            | Role::MenuItem
            | Role::Label
            | Role::Image
            | Role::ProgressIndicator
    )
}

fn describe(n: &Named) -> String {
    format!("{:?} {:?} at {:?}", n.role, n.name, n.bounds)
}

/// What the checks of one screen found so far, over the scroll positions looked at.
#[derive(Default)]
struct Findings {
    /// Nodes seen satisfying every placement rule (in some scroll position).
    fine: HashSet<u64>,
    /// Nodes seen breaking one: what and how, the first time.
    failing: HashMap<u64, String>,
    /// Overlapping pairs.
    overlaps: BTreeSet<String>,
    /// Named nodes seen.
    seen: HashSet<u64>,
}

/// Lets animations (fades, collapsing headers, scrolling) settle.
fn settle(h: &mut Harness<'static, PortholeApp>) {
    for _ in 0..10 {
        h.step();
    }
}

/// Checks the nodes laid out now; returns their ids and bounds.
fn examine(
    h: &Harness<'static, PortholeApp>,
    ppp: f32,
    size: egui::Vec2,
    found: &mut Findings,
) -> Vec<(u64, [i32; 4])> {
    let rects = widget_rects(h);
    let nodes = named_nodes(h, &rects, ppp);
    if std::env::var_os("PORTHOLE_HIDPI_DUMP").is_some() {
        for n in &nodes {
            eprintln!("  @ {ppp}: {}", describe(n));
        }
    }
    // Overlaps, among the controls and texts of one window or panel (neither inside the other), in what each
    // shows (its rect cut to its clip rect).
    let visible = |n: &Named| rects.get(&n.id).map_or(n.bounds, |(_, v)| *v * ppp);
    let controls: Vec<&Named> = nodes.iter().filter(|n| is_control_or_text(n.role)).collect();
    for (i, a) in controls.iter().enumerate() {
        for b in &controls[i + 1..] {
            if a.area != b.area || a.ancestors.contains(&b.id) || b.ancestors.contains(&a.id) {
                continue;
            }
            let overlap = visible(a).intersect(visible(b));
            if overlap.width() > 1.0 && overlap.height() > 1.0 {
                found.overlaps.insert(format!("{} overlaps {} by {:?}", describe(a), describe(b), overlap.size()));
            }
        }
    }
    for n in &nodes {
        found.seen.insert(n.id);
        let problems = placement_problems(n, &rects, ppp, size);
        if problems.is_empty() {
            found.fine.insert(n.id);
        } else {
            found.failing.entry(n.id).or_insert_with(|| format!("{}: {}", describe(n), problems.join("; ")));
        }
    }
    nodes
        .iter()
        .map(|n| (n.id, [n.bounds.min.x, n.bounds.min.y, n.bounds.max.x, n.bounds.max.y].map(|v| v as i32)))
        .collect()
}

/// Checks the screen now shown, at its scroll positions (see the module's rules); returns its problems, each
/// prefixed with `screen` and the scale.
fn check_screen(h: &mut Harness<'static, PortholeApp>, ppp: f32, screen: &str) -> Vec<String> {
    let size = h.ctx.content_rect().size();
    settle(h);
    let mut found = Findings::default();
    let mut layout = examine(h, ppp, size, &mut found);
    assert!(layout.len() > 5, "{screen} at {ppp}: only {} named nodes", layout.len());
    // Page down through what scrolls under the pointer (the main panel), until nothing moves.
    let at = egui::pos2(size.x * 0.6, size.y * 0.6);
    h.event(egui::Event::PointerMoved(at));
    let mut pages = 0;
    for _ in 0..20 {
        h.event(egui::Event::MouseWheel {
            unit: egui::MouseWheelUnit::Point,
            delta: egui::vec2(0.0, -size.y * 0.4),
            phase: egui::TouchPhase::Move,
            source: egui::MouseWheelSource::Wheel,
            modifiers: Modifiers::NONE,
        });
        settle(h);
        let now = examine(h, ppp, size, &mut found);
        if now == layout {
            break;
        }
        layout = now;
        pages += 1;
    }
    // Each node not yet seen fine is scrolled into view (an inner scroll area, a dialog's) and looked at again.
    let (mut tried, mut gone) = (HashSet::new(), 0);
    while let Some(id) = found.failing.keys().copied().find(|id| !found.fine.contains(id) && !tried.contains(id)) {
        tried.insert(id);
        let Some(node) = find(h, id) else {
            gone += 1; // no longer laid out (a virtual list scrolled)
            continue;
        };
        node.scroll_to_me();
        settle(h);
        examine(h, ppp, size, &mut found);
    }
    let scrolled = found.failing.keys().filter(|id| found.fine.contains(id)).count();
    let mut problems: Vec<String> =
        found.failing.iter().filter(|(id, _)| !found.fine.contains(id)).map(|(_, p)| p.clone()).collect();
    problems.sort();
    problems.extend(found.overlaps);
    eprintln!(
        "{screen} @ {ppp}: {} named nodes; {pages} pages scrolled; {scrolled} fine only once scrolled into view; \
         {gone} no longer laid out; {} problems",
        found.seen.len(),
        problems.len()
    );
    // Said now too: a later screen may not come (a wait that fails) and the report at the end with it.
    for p in &problems {
        eprintln!("  {p}");
    }
    problems.into_iter().map(|p| format!("[{screen} @ {ppp}] {p}")).collect()
}

/// The node with accessibility id `id`, if it is in the tree.
fn find<'h>(h: &'h Harness<'static, PortholeApp>, id: u64) -> Option<egui_kittest::Node<'h>> {
    fn walk<'t>(n: egui_kittest::Node<'t>, id: u64) -> Option<egui_kittest::Node<'t>> {
        if n.accesskit_node().locate().0.0 == id {
            return Some(n);
        }
        n.children().find_map(|c| walk(c, id))
    }
    walk(h.root(), id)
}

fn state_of(h: &Harness<'static, PortholeApp>, name: &str) -> Option<VmState> {
    h.state().backend.model().hosts.first()?.vms.iter().find(|v| v.name == name).map(|v| v.state)
}

/// Clicks the widget labelled `label` through AccessKit (as a screen reader does: a misplaced widget is what
/// the test looks for, not a reason to miss it).
fn press(h: &mut Harness<'static, PortholeApp>, label: &str) {
    h.get_by_label(label).click_accesskit();
    h.step();
    h.step();
}

/// The window at `ppp` pixels per point on the daemon at `socket`.
fn window_at(
    socket: &std::path::Path,
    settings: std::path::PathBuf,
    size: egui::Vec2,
    ppp: f32,
) -> Harness<'static, PortholeApp> {
    let backend = porthole::backend::Backend::new(|| {}).unwrap();
    let app = PortholeApp::new(backend, porthole::local_host(socket.to_owned()), Some(settings));
    Harness::builder()
        .with_size(size)
        .with_pixels_per_point(ppp)
        .build_ui_state(|ui, app: &mut PortholeApp| app.ui(ui), app)
}

/// A VM named `name` booting micro-guest `guest` from the library (a host path would be as long as the
/// checkout's path, and the details show it).
fn library_boot(name: &str, guest: &str) -> porthole_api::CreateVm {
    let boot = porthole_api::BootSpec { kernel: format!("{guest}.elf"), initrd: None, cmdline: String::new() };
    porthole_api::CreateVm { disk_gib: 0, boot: Some(boot), ..porthole_api::CreateVm::new(name, 1, 64) }
}

/// Checks every main screen in a window of `size` points at each of `scales` (see the module's rules);
/// returns the problems.
fn check_every_screen(tag: &str, size: egui::Vec2, scales: &[f32]) -> Vec<String> {
    let dir = Scratch::new(tag);
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = d.local();
    for guest in ["idle", "fb-pattern"] {
        rt.block_on(c.upload_image(&format!("{guest}.elf"), &porthole_guests::path(guest), |_, _| {})).unwrap();
    }
    // A library with long names, one image in use (the host page's table).
    for name in ["debian-12.8.0-amd64-netinst.iso", "Fedora-Workstation-Live-x86_64-41-1.4.iso"] {
        let file = dir.path(name);
        std::fs::write(&file, vec![1u8; 32 << 10]).unwrap();
        rt.block_on(c.upload_image(name, &file, |_, _| {})).unwrap();
    }
    for (name, tags) in [("build-server", vec!["ci"]), ("web-1", vec!["prod", "web"])] {
        let req = porthole_api::CreateVm {
            tags: tags.into_iter().map(str::to_owned).collect(),
            media: (name == "web-1").then(|| "debian-12.8.0-amd64-netinst.iso".into()),
            ..library_boot(name, "idle")
        };
        rt.block_on(c.create_vm(&req)).unwrap();
    }
    let pattern = rt.block_on(c.create_vm(&library_boot("pattern", "fb-pattern"))).unwrap();
    rt.block_on(c.action(&pattern.id, Action::Start)).unwrap();

    let mut problems = Vec::new();
    for &ppp in scales {
        let mut h = window_at(&d.socket(), dir.path(&format!("settings-{ppp}.json")), size, ppp);
        wait(&mut h, "the list", |h| has(h, "Local — 3 VMs") && state_of(h, "pattern") == Some(VmState::Running));
        problems.extend(check_screen(&mut h, ppp, "machine list"));

        h.get_by_label("web-1").click_accesskit();
        wait(&mut h, "the details", |h| has(h, "Insert ISO…"));
        problems.extend(check_screen(&mut h, ppp, "VM details"));

        press(&mut h, "Settings…");
        wait(&mut h, "the settings", |h| has(h, "Settings of web-1"));
        problems.extend(check_screen(&mut h, ppp, "VM settings"));
        h.get_by_label("Back to details").click_accesskit();
        wait(&mut h, "the details again", |h| has(h, "Insert ISO…"));

        press(&mut h, "Grid");
        // (In a small window only the first line of cards is laid out: a card, whichever VM it shows.)
        wait(&mut h, "the grid", |h| {
            h.state().view == porthole::app::MachineView::Grid
                && h.query_all_by_label_contains(" screen").next().is_some()
        });
        problems.extend(check_screen(&mut h, ppp, "machine grid"));
        press(&mut h, "List");

        press(&mut h, "Host");
        wait(&mut h, "the host page", |h| {
            has(h, "Host Local") && has_contains(h, "CPU %") && has(h, "Delete debian-12.8.0-amd64-netinst.iso")
        });
        problems.extend(check_screen(&mut h, ppp, "host page"));
        press(&mut h, "Machines");

        press(&mut h, "New VM…");
        wait(&mut h, "the wizard", |h| has(h, "New virtual machine"));
        problems.extend(check_screen(&mut h, ppp, "wizard"));
        h.state_mut().wizard = None;
        h.step();

        h.key_press(Key::F1);
        wait(&mut h, "the shortcuts", |h| has(h, "Keyboard shortcuts") && has(h, "Shut down the selected VM"));
        problems.extend(check_screen(&mut h, ppp, "keyboard shortcuts"));
        h.get_by_label("Close window").click_accesskit();
        wait(&mut h, "the shortcuts closed", |h| !has(h, "Shut down the selected VM"));

        press(&mut h, "Menu");
        press(&mut h, "Preferences…");
        wait(&mut h, "the preferences", |h| has(h, "Preferences") && has(h, "Dark"));
        problems.extend(check_screen(&mut h, ppp, "preferences"));
        h.get_by_label("Close window").click_accesskit();
        wait(&mut h, "the preferences closed", |h| !has(h, "Dark"));

        h.get_by_label("pattern").click_accesskit();
        wait(&mut h, "the selection", |h| h.state().selection().1.as_deref() == Some(pattern.id.as_str()));
        h.key_press_modifiers(Modifiers::COMMAND, Key::O);
        wait(&mut h, "the console", |h| {
            h.state().console_titles() == ["pattern"] && has_contains(h, "click the screen to type")
        });
        problems.extend(check_screen(&mut h, ppp, "console tab"));
    }
    rt.block_on(c.action(&pattern.id, Action::Poweroff)).unwrap();
    problems
}

/// Every main screen in the default window (1100 × 700 points) at 1.0, 1.5 and 2.0.
#[test]
fn every_screen_fits_at_each_scale() {
    let problems = check_every_screen("gui-hidpi", WINDOW, &[1.0, 1.5, 2.0]);
    assert!(problems.is_empty(), "{} layout problems:\n{}", problems.len(), problems.join("\n"));
}

/// Every main screen filling a 1920 × 1080 screen at 200% (960 × 540 points): toolbars and button rows
/// wrap.
#[test]
fn every_screen_fits_a_small_hidpi_screen() {
    let problems = check_every_screen("gui-hidpi-small", SMALL_HIDPI_SCREEN, &[2.0]);
    assert!(problems.is_empty(), "{} layout problems:\n{}", problems.len(), problems.join("\n"));
}

/// Every main screen in the smallest window Porthole allows (640 × 400 points; a 1280 × 800 screen at 200%).
#[test]
fn every_screen_fits_the_smallest_window() {
    let problems = check_every_screen("gui-hidpi-smallest", egui::vec2(640.0, 400.0), &[1.0]);
    assert!(problems.is_empty(), "{} layout problems:\n{}", problems.len(), problems.join("\n"));
}
