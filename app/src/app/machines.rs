//! The VM list: search, grouping by host or tag, as a list with live thumbnails of the visible rows or as a
//! grid of large live screens (only the cells on screen are drawn and fetched), multi-select with start/stop
//! for the selection, and the selected VM's details below.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use porthole_api::client::Action;
use porthole_api::{Vm, VmState};

use super::graphs::sparkline;
use super::theme;
use super::{PortholeApp, clones};
use theme::{state_label, state_text};

/// How the list is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupBy {
    /// The selected host's VMs, one list.
    #[default]
    Nothing,
    /// Every host's VMs, under a heading per host.
    Host,
    /// The selected host's VMs under a heading per tag (a VM with two tags is under both).
    Tag,
}

impl GroupBy {
    fn text(self) -> &'static str {
        match self {
            GroupBy::Nothing => "nothing",
            GroupBy::Host => "host",
            GroupBy::Tag => "tag",
        }
    }
}

/// How the machines are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MachineView {
    /// Rows with small thumbnails, vCPUs, memory, CPU use and tags.
    #[default]
    List,
    /// Cards with large live screens (GNOME Boxes-style).
    Grid,
}

/// Thumbnails are this wide on screen (fetched at twice that for sharp HiDPI rendering).
const THUMB_WIDTH: f32 = 64.0;
/// A grid card's screen is this wide (fetched at twice that).
const CARD_WIDTH: f32 = 192.0;
/// A grid card: its screen and two lines of text below, with spacing.
const CARD_SIZE: egui::Vec2 = egui::vec2(CARD_WIDTH + 16.0, CARD_WIDTH * 0.75 + 56.0);
/// A group's heading in the grid.
const GRID_HEADING: f32 = 26.0;
/// How often a visible running VM's thumbnail is refreshed.
const THUMB_EVERY: Duration = Duration::from_secs(3);

/// A row's thumbnail: the last picture and when the next was asked for.
#[derive(Default)]
pub struct Thumbnails {
    textures: HashMap<(usize, String), egui::TextureHandle>,
    requested: HashMap<(usize, String), Instant>,
}

impl Thumbnails {
    /// Turns fetched pictures into textures.
    fn take_new(&mut self, ctx: &egui::Context, fresh: Vec<((usize, String), egui::ColorImage)>) {
        for (key, image) in fresh {
            match self.textures.get_mut(&key) {
                Some(t) => t.set(image, egui::TextureOptions::LINEAR),
                None => {
                    let name = format!("thumbnail-{}-{}", key.0, key.1);
                    self.textures.insert(key, ctx.load_texture(name, image, egui::TextureOptions::LINEAR));
                }
            }
        }
    }

    /// Whether a row's thumbnail is due (and notes that it is being fetched); one of `width` pixels is, at
    /// once, when the last is narrower (the view changed from the list to the grid).
    fn due(&mut self, key: &(usize, String), width: usize) -> bool {
        let narrower = self.textures.get(key).is_some_and(|t| t.size()[0] < width);
        let every = if narrower { THUMB_EVERY / 10 } else { THUMB_EVERY };
        let due = self.requested.get(key).is_none_or(|t| t.elapsed() >= every);
        if due {
            self.requested.insert(key.clone(), Instant::now());
        }
        due
    }
}

/// Whether `vm` matches the search text (name, state or a tag, case-insensitive).
pub fn matches(vm: &Vm, needle: &str) -> bool {
    let needle = needle.trim().to_lowercase();
    needle.is_empty()
        || vm.name.to_lowercase().contains(&needle)
        || state_text(vm.state).contains(&needle)
        || vm.tags.iter().any(|t| t.to_lowercase().contains(&needle))
}

/// The groups to show: (heading, rows of (host, VM)); one group without a heading when not grouping.
pub fn groups(by: GroupBy, rows: Vec<(usize, String, Vm)>) -> Vec<(String, Vec<(usize, Vm)>)> {
    match by {
        GroupBy::Nothing => vec![(String::new(), rows.into_iter().map(|(h, _, v)| (h, v)).collect())],
        GroupBy::Host => {
            let mut out: Vec<(String, Vec<(usize, Vm)>)> = Vec::new();
            for (host, name, vm) in rows {
                match out.last_mut() {
                    Some((n, list)) if *n == name => list.push((host, vm)),
                    _ => out.push((name, vec![(host, vm)])),
                }
            }
            out
        }
        GroupBy::Tag => {
            let mut by_tag: BTreeMap<String, Vec<(usize, Vm)>> = BTreeMap::new();
            let mut untagged = Vec::new();
            for (host, _, vm) in rows {
                if vm.tags.is_empty() {
                    untagged.push((host, vm));
                } else {
                    for t in &vm.tags {
                        by_tag.entry(t.clone()).or_default().push((host, vm.clone()));
                    }
                }
            }
            let mut out: Vec<_> = by_tag.into_iter().collect();
            if !untagged.is_empty() {
                out.push(("untagged".into(), untagged));
            }
            out
        }
    }
}

fn is_running(vm: &Vm) -> bool {
    matches!(vm.state, VmState::Running | VmState::Paused | VmState::Stopping | VmState::Starting) || vm.crash.is_some()
}

impl PortholeApp {
    /// The size of the thumbnail shown for a VM's row, if one arrived (for tests).
    pub fn thumbnail_size(&self, host: usize, id: &str) -> Option<[usize; 2]> {
        self.thumbnails.textures.get(&(host, id.to_owned())).map(|t| t.size())
    }

    pub(super) fn machines(&mut self, ui: &mut egui::Ui) {
        let host = self.selected_host;
        self.drop_zones.clear();
        let fresh = std::mem::take(&mut self.backend.model().thumbnails);
        self.thumbnails.take_new(ui.ctx(), fresh);
        // (host index, host name, error, VMs, CPU histories) of the hosts shown.
        let shown_hosts: Vec<usize> = if self.group_by == GroupBy::Host {
            let m = self.backend.model();
            m.hosts.iter().enumerate().filter(|(_, h)| !h.name.is_empty()).map(|(i, _)| i).collect()
        } else {
            vec![host]
        };
        let (errors, rows, cpu) = {
            let m = self.backend.model();
            let mut errors = Vec::new();
            let mut rows = Vec::new();
            let mut cpu = HashMap::new();
            for &i in &shown_hosts {
                let Some(h) = m.hosts.get(i) else { continue };
                if let Some(e) = &h.error {
                    errors.push((h.name.clone(), e.clone()));
                }
                for v in &h.vms {
                    rows.push((i, h.name.clone(), v.clone()));
                }
                for (id, history) in &h.cpu {
                    cpu.insert((i, id.clone()), history.clone());
                }
            }
            // A stable order whatever order the hosts list them in: by host, then name.
            rows.sort_by(|a, b| (a.0, &a.2.name).cmp(&(b.0, &b.2.name)));
            (errors, rows, cpu)
        };
        let total = rows.len();
        ui.horizontal_wrapped(|ui| {
            theme::paint_icon(ui, theme::SEARCH, ui.visuals().weak_text_color());
            let label = ui.label("Search");
            let search =
                egui::TextEdit::singleline(&mut self.search).id_salt("machine search").hint_text("name, state or tag");
            let search = ui.add(search).labelled_by(label.id);
            if std::mem::take(&mut self.help.focus_search) {
                search.request_focus();
            }
            let label = ui.label("Group by");
            egui::ComboBox::from_id_salt("group-by")
                .selected_text(self.group_by.text())
                .show_ui(ui, |ui| {
                    for g in [GroupBy::Nothing, GroupBy::Host, GroupBy::Tag] {
                        ui.selectable_value(&mut self.group_by, g, g.text());
                    }
                })
                .response
                .labelled_by(label.id);
            let label = ui.label("View");
            ui.horizontal(|ui| {
                for (view, icon, text) in
                    [(MachineView::List, theme::LIST, "List"), (MachineView::Grid, theme::GRID, "Grid")]
                {
                    if theme::selectable(ui, self.view == view, icon, text).clicked() {
                        self.view = view;
                    }
                }
            })
            .response
            .labelled_by(label.id);
            if theme::button(ui, true, theme::ADD, "New VM…").on_hover_text("Ctrl+N").clicked() {
                self.open_wizard();
            }
        });
        for (name, e) in &errors {
            ui.colored_label(ui.visuals().error_fg_color, format!("{name} cannot be reached: {e}"));
        }
        if !errors.is_empty() && total == 0 && self.group_by != GroupBy::Host {
            return;
        }
        if total == 0 {
            ui.add_space(20.0);
            ui.vertical_centered(|ui| {
                ui.label("No virtual machines on this host yet.");
                ui.label("Create one with “New VM…”, or drop an ISO onto this window.");
                if host == 0
                    && let Some(demo) = crate::demo_guest()
                    && theme::button(ui, true, theme::START, "Create a demo VM")
                        .on_hover_text("A tiny VM with an animated screen that echoes your keys")
                        .clicked()
                {
                    self.create_demo(demo);
                }
            });
            return;
        }
        // The multi-selection only holds VMs that still exist.
        let present: BTreeSet<(usize, String)> = rows.iter().map(|(h, _, v)| (*h, v.id.clone())).collect();
        self.checked.retain(|k| present.contains(k));
        self.selection_actions(ui, &rows);

        let shown: Vec<_> = rows.iter().filter(|(_, _, v)| matches(v, &self.search)).cloned().collect();
        if shown.is_empty() {
            ui.label(format!("No VM matches “{}”.", self.search.trim()));
        }
        let groups = groups(self.group_by, shown);
        let mut clicked: Option<(usize, String)> = None;
        let mut thumbs_wanted = Vec::new();
        // The list shares the height with the selected VM's details; without a selection it has it all.
        let has_details = self
            .selected_vm
            .as_ref()
            .is_some_and(|id| rows.iter().any(|(h, _, v)| *h == self.selected_host && &v.id == id));
        // (The grid shows at least one whole line of cards.)
        let least = if self.view == MachineView::Grid { CARD_SIZE.y } else { 120.0 };
        let list_height = if has_details { (ui.available_height() * 0.45).max(least) } else { ui.available_height() };
        if self.view == MachineView::Grid {
            self.grid(ui, &groups, list_height, &mut clicked, &mut thumbs_wanted);
        } else {
            egui::ScrollArea::both().id_salt("vm-list").max_height(list_height).auto_shrink([false, true]).show(
                ui,
                |ui| {
                    let group_by = self.group_by.text();
                    for (gi, (heading, members)) in groups.iter().enumerate() {
                        let mut grid = |ui: &mut egui::Ui| {
                            egui::Grid::new(("vms", gi)).striped(true).num_columns(8).show(ui, |ui| {
                                ui.label("");
                                ui.label("");
                                ui.strong("Name");
                                ui.strong("State");
                                ui.strong("vCPUs");
                                ui.strong("Memory");
                                ui.strong("CPU");
                                ui.strong("Tags");
                                ui.end_row();
                                for (h, v) in members {
                                    let key = (*h, v.id.clone());
                                    let mut on = self.checked.contains(&key);
                                    let r = ui.checkbox(&mut on, "");
                                    r.widget_info(|| {
                                        egui::WidgetInfo::selected(
                                            egui::Role::CheckBox,
                                            true,
                                            on,
                                            format!("Select {}", v.name),
                                        )
                                    });
                                    if r.changed() {
                                        if on {
                                            self.checked.insert(key.clone());
                                        } else {
                                            self.checked.remove(&key);
                                        }
                                    }
                                    self.thumbnail_cell(ui, &key, v, &mut thumbs_wanted);
                                    let selected =
                                        self.selected_host == *h && self.selected_vm.as_deref() == Some(v.id.as_str());
                                    ui.horizontal(|ui| {
                                        if ui.selectable_label(selected, &v.name).clicked() {
                                            clicked = Some(key.clone());
                                        }
                                        if v.template {
                                            ui.label(egui::RichText::new("template").small().strong())
                                                .on_hover_text(clones::TEMPLATE_START);
                                        }
                                        let linked = if v.linked_to.is_some() {
                                            let all: Vec<Vm> =
                                                rows.iter().filter(|r| r.0 == *h).map(|r| r.2.clone()).collect();
                                            clones::linked_text(v, &all)
                                        } else {
                                            None
                                        };
                                        if let Some(text) = linked {
                                            ui.weak(egui::RichText::new(text).small());
                                        }
                                    });
                                    state_label(ui, v);
                                    ui.label(v.vcpus.to_string());
                                    ui.label(format!("{} MiB", v.memory_mib));
                                    match cpu.get(&key) {
                                        Some(history) if !history.is_empty() => sparkline(ui, history, &v.name),
                                        _ => {
                                            ui.label("");
                                        }
                                    }
                                    let last = ui.label(v.tags.join(", "));
                                    // The whole row takes dropped ISOs for this VM.
                                    self.drop_zones.push((r.rect.union(last.rect), *h, v.id.clone()));
                                    ui.end_row();
                                }
                            });
                        };
                        if heading.is_empty() {
                            grid(ui);
                        } else {
                            egui::CollapsingHeader::new(format!("{heading} ({})", members.len()))
                                .id_salt(("group", group_by, heading))
                                .default_open(true)
                                .show(ui, grid);
                        }
                    }
                },
            );
        }
        let width = if self.view == MachineView::Grid { CARD_WIDTH } else { THUMB_WIDTH };
        for (h, id) in thumbs_wanted {
            self.backend.fetch_thumbnail(h, id, (width * 2.0) as u32);
        }
        if let Some((h, id)) = clicked {
            self.selected_host = h;
            self.selected_vm = Some(id.clone());
            self.backend.load_serial(h, id);
        }
        let selected = self.selected_vm.as_ref().and_then(|id| {
            rows.iter().find(|(h, _, v)| *h == self.selected_host && &v.id == id).map(|(_, _, v)| v.clone())
        });
        if let Some(vm) = selected {
            ui.separator();
            let host = self.selected_host;
            let area = egui::ScrollArea::vertical().id_salt("vm-details").show(ui, |ui| self.details(ui, host, &vm));
            self.drop_zones.push((area.inner_rect, host, vm.id.clone()));
        }
    }

    /// The thumbnail cell of a row: the last picture of a running VM; a new one is asked for every few
    /// seconds while the row is on screen.
    fn thumbnail_cell(&mut self, ui: &mut egui::Ui, key: &(usize, String), vm: &Vm, wanted: &mut Vec<(usize, String)>) {
        let size = egui::vec2(THUMB_WIDTH, THUMB_WIDTH * 0.75);
        self.screen(ui, key, vm, size, wanted);
    }

    /// A VM's last screen in `size`; a new one is asked for every few seconds while it is on screen.
    fn screen(
        &mut self,
        ui: &mut egui::Ui,
        key: &(usize, String),
        vm: &Vm,
        size: egui::Vec2,
        wanted: &mut Vec<(usize, String)>,
    ) -> egui::Response {
        // A crashed VM that is kept shows its last screen.
        let running = matches!(vm.state, VmState::Running | VmState::Paused) || vm.crash.is_some();
        let (rect, response) = ui.allocate_exact_size(size, egui::Sense::hover());
        response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Image, true, format!("{} screen", vm.name)));
        if !running {
            self.thumbnails.textures.remove(key);
            ui.painter().rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
            return response;
        }
        match self.thumbnails.textures.get(key) {
            Some(t) => {
                let ts = t.size_vec2();
                let fit = (size.x / ts.x).min(size.y / ts.y);
                let shown = egui::Rect::from_center_size(rect.center(), ts * fit);
                ui.painter().image(
                    t.id(),
                    shown,
                    egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                    egui::Color32::WHITE,
                );
            }
            None => {
                ui.painter().rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
            }
        }
        if ui.is_rect_visible(rect) {
            if self.thumbnails.due(key, (size.x * 2.0) as usize) {
                wanted.push(key.clone());
            }
            // Come back when the next picture is due (only while thumbnails are on screen).
            ui.ctx().request_repaint_after(THUMB_EVERY);
        }
        response
    }

    /// The grid view: a heading per group and cards with large screens; only the rows of cards in view are
    /// laid out (and their screens fetched), so thousands of VMs scroll as fast as a screenful.
    fn grid(
        &mut self,
        ui: &mut egui::Ui,
        groups: &[(String, Vec<(usize, Vm)>)],
        height: f32,
        clicked: &mut Option<(usize, String)>,
        wanted: &mut Vec<(usize, String)>,
    ) {
        let per_row = ((ui.available_width() / CARD_SIZE.x).floor() as usize).max(1);
        // Each line of the grid: a heading, or a row of cards; with its top (y from the start).
        enum Line<'a> {
            Heading(&'a str, usize),
            Cards(&'a [(usize, Vm)]),
        }
        let mut lines = Vec::new();
        let mut total = 0.0;
        for (heading, members) in groups {
            if !heading.is_empty() {
                lines.push((total, Line::Heading(heading, members.len())));
                total += GRID_HEADING;
            }
            for chunk in members.chunks(per_row) {
                lines.push((total, Line::Cards(chunk)));
                total += CARD_SIZE.y;
            }
        }
        let scroll = egui::ScrollArea::vertical().id_salt("vm-grid").max_height(height).auto_shrink([false, true]);
        scroll.show_viewport(ui, |ui, viewport| {
            ui.set_height(total);
            let top = ui.min_rect().top();
            let first = lines.partition_point(|(y, _)| *y + CARD_SIZE.y < viewport.min.y);
            for (y, line) in &lines[first..] {
                if *y > viewport.max.y {
                    break;
                }
                let at = egui::pos2(ui.min_rect().left(), top + y);
                match line {
                    Line::Heading(text, n) => {
                        let rect = egui::Rect::from_min_size(at, egui::vec2(ui.available_width(), GRID_HEADING));
                        ui.put(rect, egui::Label::new(egui::RichText::new(format!("{text} ({n})")).strong()));
                    }
                    Line::Cards(cards) => {
                        for (i, (h, vm)) in cards.iter().enumerate() {
                            let rect =
                                egui::Rect::from_min_size(at + egui::vec2(i as f32 * CARD_SIZE.x, 0.0), CARD_SIZE);
                            let mut card = ui.new_child(egui::UiBuilder::new().max_rect(rect.shrink(4.0)));
                            self.card(&mut card, *h, vm, clicked, wanted);
                        }
                    }
                }
            }
        });
    }

    /// One card of the grid: the VM's screen, its name and its state; a click on the name selects the VM, a
    /// click on the screen of a running VM opens its console (as in GNOME Boxes).
    fn card(
        &mut self,
        ui: &mut egui::Ui,
        host: usize,
        vm: &Vm,
        clicked: &mut Option<(usize, String)>,
        wanted: &mut Vec<(usize, String)>,
    ) {
        let key = (host, vm.id.clone());
        let selected = self.selected_host == host && self.selected_vm.as_deref() == Some(vm.id.as_str());
        let frame = egui::Frame::group(ui.style()).fill(if selected {
            ui.visuals().selection.bg_fill.gamma_multiply(0.4)
        } else {
            ui.visuals().faint_bg_color
        });
        frame.show(ui, |ui| {
            ui.vertical_centered(|ui| {
                let screen = self.screen(ui, &key, vm, egui::vec2(CARD_WIDTH, CARD_WIDTH * 0.75), wanted);
                let running = is_running(vm);
                let screen = screen.interact(egui::Sense::click());
                let screen = if running { screen.on_hover_text("Open the console") } else { screen };
                let name = ui.selectable_label(selected, &vm.name);
                ui.horizontal(|ui| {
                    state_label(ui, vm);
                    ui.weak(format!("{} vCPU · {} MiB", vm.vcpus, vm.memory_mib));
                });
                if name.clicked() || screen.clicked() {
                    *clicked = Some(key.clone());
                }
                if screen.clicked() && running {
                    self.backend.model().open_console = Some(key.clone());
                }
                self.drop_zones.push((name.rect.union(screen.rect), host, vm.id.clone()));
            });
        });
    }

    /// "Start selected", "Shut down selected", … for the ticked VMs.
    fn selection_actions(&mut self, ui: &mut egui::Ui, rows: &[(usize, String, Vm)]) {
        if self.checked.is_empty() {
            return;
        }
        let picked: Vec<(usize, Vm)> = rows
            .iter()
            .filter(|(h, _, v)| self.checked.contains(&(*h, v.id.clone())))
            .map(|(h, _, v)| (*h, v.clone()))
            .collect();
        let startable: Vec<_> = picked.iter().filter(|(_, v)| !is_running(v) && !v.template).cloned().collect();
        let running: Vec<_> = picked.iter().filter(|(_, v)| is_running(v)).cloned().collect();
        ui.horizontal(|ui| {
            ui.label(format!("{} selected:", picked.len()));
            if theme::button(ui, !startable.is_empty(), theme::START, &format!("Start selected ({})", startable.len()))
                .clicked()
            {
                for (h, v) in &startable {
                    let id = v.id.clone();
                    self.backend.act(*h, format!("Start {}", v.name), None, move |c| async move {
                        c.action(&id, Action::Start).await
                    });
                }
            }
            if theme::button(
                ui,
                !running.is_empty(),
                theme::SHUT_DOWN,
                &format!("Shut down selected ({})", running.len()),
            )
            .clicked()
            {
                for (h, v) in &running {
                    let id = v.id.clone();
                    self.backend.act(*h, format!("Shut down {}", v.name), None, move |c| async move {
                        c.shutdown(&id, 60).await
                    });
                }
            }
            if theme::button(
                ui,
                !running.is_empty(),
                theme::FORCE_OFF,
                &format!("Force off selected ({})", running.len()),
            )
            .clicked()
            {
                for (h, v) in &running {
                    let id = v.id.clone();
                    self.backend.act(*h, format!("Force off {}", v.name), None, move |c| async move {
                        c.action(&id, Action::Poweroff).await
                    });
                }
            }
            if theme::button(ui, true, theme::CLOSE, "Clear selection").clicked() {
                self.checked.clear();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, tags: &[&str]) -> Vm {
        Vm {
            id: name.into(),
            name: name.into(),
            vcpus: 1,
            max_vcpus: None,
            memory_mib: 64,
            disk_bytes: 0,
            boot: None,
            media: None,
            state: VmState::Stopped,
            last_exit: None,
            uptime_s: None,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            boot_status: None,
            input: porthole_api::InputMode::Ps2,
            vga: porthole_api::VgaMode::Std,
            agent: porthole_api::AgentMode::None,
            sound: porthole_api::SoundMode::None,
            agent_connected: None,
            display_follows: None,
            absolute_pointer: None,
            virtio_keyboard: None,
            keyboard_leds: None,
            balloon: false,
            memory_balloon: None,
            cpu_cap_percent: None,
            cpu_weight: None,
            cpu_limits: None,
            crash: None,
            nics: Vec::new(),
            nic_status: Vec::new(),
            nic_status_error: None,
            disk_format: None,
            disk_allocated_bytes: 0,
            template: false,
            linked_to: None,
            cloud_init: None,
            description: String::new(),
            autostart: false,
            boot_order: porthole_api::default_boot_order(),
            boot_menu: false,
            display: None,
            drives: Vec::new(),
            pending_changes: Vec::new(),
            pending: None,
        }
    }

    #[test]
    fn grouping_by_tag_lists_a_vm_under_each_of_its_tags() {
        let rows = vec![
            (0, "Local".to_owned(), vm("a", &["web", "prod"])),
            (0, "Local".to_owned(), vm("b", &[])),
            (1, "lab".to_owned(), vm("c", &["web"])),
        ];
        let g = groups(GroupBy::Tag, rows.clone());
        let names: Vec<(String, Vec<String>)> =
            g.iter().map(|(t, m)| (t.clone(), m.iter().map(|(_, v)| v.name.clone()).collect())).collect();
        assert_eq!(
            names,
            [
                ("prod".to_owned(), vec!["a".to_owned()]),
                ("web".to_owned(), vec!["a".to_owned(), "c".to_owned()]),
                ("untagged".to_owned(), vec!["b".to_owned()])
            ]
        );
        let by_host = groups(GroupBy::Host, rows.clone());
        assert_eq!(by_host.iter().map(|(h, m)| (h.as_str(), m.len())).collect::<Vec<_>>(), [("Local", 2), ("lab", 1)]);
        assert_eq!(groups(GroupBy::Nothing, rows)[0].1.len(), 3);
    }

    #[test]
    fn search_matches_names_states_and_tags() {
        let v = vm("web-1", &["Production"]);
        assert!(matches(&v, "WEB"));
        assert!(matches(&v, "stopped"));
        assert!(matches(&v, "product"));
        assert!(matches(&v, "  "));
        assert!(!matches(&v, "db"));
    }
}
