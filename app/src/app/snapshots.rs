//! The snapshots of a VM in its details: the tree (parent → children, ending in "Now" under the snapshot the
//! present state hangs from), each snapshot's date, description, whether it holds the machine's RAM and the
//! size it holds; taking one (with or without memory), reverting (with a confirmation that says what is lost)
//! and deleting (with a confirmation). These are tasks on the host: their progress and their errors show here.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use porthole_api::{Snapshot, SnapshotTree, TakeSnapshot, TaskState, Vm, VmState};

use super::PortholeApp;
use super::clones::human_bytes;
use super::theme;
use crate::backend::VmTask;

/// One row of the drawn tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeRow {
    /// `tree.snapshots[index]`, indented `depth` steps.
    Snapshot { index: usize, depth: usize },
    /// The VM's present state, under the current snapshot (or at the top when there is none).
    Now { depth: usize },
}

/// The rows of `tree` in drawing order: each snapshot followed by its children (oldest first), "Now" as the
/// last child of the current snapshot. A snapshot whose parent is unknown is drawn as a root, and every
/// snapshot is drawn once even if the parents were to form a loop.
pub fn tree_rows(tree: &SnapshotTree) -> Vec<TreeRow> {
    let snaps = &tree.snapshots;
    let ids: HashMap<&str, usize> = snaps.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (i, s) in snaps.iter().enumerate() {
        match s.parent.as_deref().and_then(|p| ids.get(p)) {
            Some(&p) if p != i => children.entry(p).or_default().push(i),
            _ => roots.push(i),
        }
    }
    let order = |list: &mut Vec<usize>| {
        list.sort_by(|&a, &b| (snaps[a].created_ms, &snaps[a].name).cmp(&(snaps[b].created_ms, &snaps[b].name)))
    };
    order(&mut roots);
    for list in children.values_mut() {
        order(list);
    }
    let current = tree.current.as_deref().and_then(|c| ids.get(c)).copied();
    let mut rows = Vec::new();
    let mut seen = HashSet::new();
    // Roots first; then whatever a loop kept unreachable, as roots of their own.
    let mut starts = roots;
    let mut rest: Vec<usize> = (0..snaps.len()).collect();
    order(&mut rest);
    starts.extend(rest);
    for start in starts {
        // Depth-first with an explicit stack: (snapshot, depth), or "Now" at a depth.
        let mut stack = vec![(Some(start), 0usize)];
        while let Some((node, depth)) = stack.pop() {
            let Some(i) = node else {
                rows.push(TreeRow::Now { depth });
                continue;
            };
            if !seen.insert(i) {
                continue;
            }
            rows.push(TreeRow::Snapshot { index: i, depth });
            if current == Some(i) {
                stack.push((None, depth + 1));
            }
            for &c in children.get(&i).map(Vec::as_slice).unwrap_or_default().iter().rev() {
                stack.push((Some(c), depth + 1));
            }
        }
    }
    if current.is_none() {
        rows.push(TreeRow::Now { depth: 0 });
    }
    rows
}

/// Milliseconds since 1970 as `YYYY-MM-DD HH:MM` UTC.
pub fn utc_text(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar, in 400-year eras).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// Why the daemon would refuse `name` as a new snapshot's name of a VM that has `existing`.
pub fn snapshot_name_problem(name: &str, existing: &[Snapshot]) -> Option<String> {
    if name.is_empty() {
        return Some("Give the snapshot a name.".to_owned());
    }
    let ok = name.chars().count() <= 63 && name.chars().all(|c| c.is_ascii_alphanumeric() || " -_.".contains(c));
    if !ok {
        return Some("A snapshot name is 1-63 letters, digits, spaces, '-', '_' or '.' (no '/').".to_owned());
    }
    existing.iter().any(|s| s.name == name).then(|| format!("There is a snapshot named {name:?} already."))
}

/// The VM's present state can be snapshotted: stopped, or running (paused included).
fn can_snapshot(vm: &Vm) -> bool {
    vm.crash.is_none() && matches!(vm.state, VmState::Stopped | VmState::Running | VmState::Paused)
}

/// Whether the VM is running (its present state includes memory).
fn live(vm: &Vm) -> bool {
    matches!(vm.state, VmState::Running | VmState::Paused)
}

/// The "Take a snapshot" dialog's fields.
#[derive(Debug, Clone)]
pub struct TakeForm {
    host: usize,
    vm: String,
    vm_name: String,
    /// The VM ran when the dialog opened: the memory choice is offered.
    running: bool,
    existing: Vec<Snapshot>,
    pub name: String,
    pub description: String,
    pub with_state: bool,
}

impl TakeForm {
    /// The request the dialog sends.
    pub fn request(&self) -> TakeSnapshot {
        TakeSnapshot {
            name: self.name.trim().to_owned(),
            description: self.description.trim().to_owned(),
            with_state: self.running.then_some(self.with_state),
        }
    }
}

/// What a confirmation dialog is about.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Confirm {
    /// Reverting; `running`: the VM ran when asked (its present state is lost).
    Revert {
        running: bool,
        with_state: bool,
    },
    Delete,
}

#[derive(Debug, Clone)]
struct Confirmation {
    host: usize,
    vm: String,
    vm_name: String,
    snapshot: String,
    snapshot_name: String,
    what: Confirm,
}

/// The snapshot section's state in the window.
#[derive(Default)]
pub struct SnapshotUi {
    take: Option<TakeForm>,
    confirm: Option<Confirmation>,
    /// When the tree of (host, VM) was last asked for.
    fetched: Option<(usize, String, Instant)>,
}

/// How often an open tree is read again (the sizes change as the VM writes).
const REFRESH: Duration = Duration::from_secs(5);

impl PortholeApp {
    /// The "Snapshots" section of a VM's details.
    pub(super) fn snapshots_section(&mut self, ui: &mut egui::Ui, host: usize, vm: &Vm) {
        egui::CollapsingHeader::new("Snapshots").default_open(false).show(ui, |ui| {
            if let Some(why) = self.lacks(host, porthole_api::Feature::Snapshots) {
                ui.weak(format!("Not available on this host: {why}"));
                return;
            }
            let due = match &self.snapshot_ui.fetched {
                Some((h, id, t)) => *h != host || *id != vm.id || t.elapsed() >= REFRESH,
                None => true,
            };
            if due {
                self.backend.load_snapshots(host, vm.id.clone());
                self.snapshot_ui.fetched = Some((host, vm.id.clone(), Instant::now()));
            }
            ui.ctx().request_repaint_after(REFRESH);
            let (tree, tasks) = {
                let m = self.backend.model();
                let tree = match &m.snapshots {
                    Some((h, id, t)) if *h == host && *id == vm.id => Some(t.clone()),
                    _ => None,
                };
                let tasks: Vec<VmTask> = m.tasks.iter().filter(|t| t.host == host && t.vm == vm.id).cloned().collect();
                (tree, tasks)
            };
            // In a scope of their own: lines coming and going do not change the identity of the widgets after.
            let busy = ui.push_id("tasks", |ui| self.task_lines(ui, &tasks)).inner;
            let existing = match &tree {
                Some(Ok(t)) => t.snapshots.clone(),
                _ => Vec::new(),
            };
            ui.horizontal(|ui| {
                let why = if busy {
                    Some("An operation on this VM is in progress.")
                } else if !can_snapshot(vm) {
                    Some("Snapshots are taken of a stopped or running VM.")
                } else {
                    None
                };
                let r = theme::button(ui, why.is_none(), theme::SNAPSHOT, "Take snapshot…");
                if r.on_disabled_hover_text(why.unwrap_or_default()).clicked() {
                    let n = existing.len() + 1;
                    self.snapshot_ui.take = Some(TakeForm {
                        host,
                        vm: vm.id.clone(),
                        vm_name: vm.name.clone(),
                        running: live(vm),
                        existing: existing.clone(),
                        name: format!("snapshot {n}"),
                        description: String::new(),
                        with_state: true,
                    });
                }
            });
            match tree {
                None => {
                    ui.weak("Reading the snapshots…");
                }
                Some(Err(e)) => {
                    ui.colored_label(ui.visuals().error_fg_color, format!("Cannot read the snapshots: {e}"));
                }
                Some(Ok(tree)) => self.tree(ui, host, vm, &tree, busy),
            }
        });
    }

    /// The progress of the VM's running tasks and the error of its last failed one; whether one runs.
    fn task_lines(&mut self, ui: &mut egui::Ui, tasks: &[VmTask]) -> bool {
        let mut busy = false;
        for t in tasks {
            match t.task.state {
                TaskState::Running => {
                    busy = true;
                    let (done, total) = (t.task.done, t.task.total);
                    let fraction = if total > 0 { done.min(total) as f32 / total as f32 } else { 0.0 };
                    let text = if total > 0 { format!("{}: {done}/{total}", t.what) } else { format!("{}…", t.what) };
                    ui.add(egui::ProgressBar::new(fraction).text(text));
                    ui.ctx().request_repaint_after(Duration::from_millis(250));
                }
                TaskState::Failed => {
                    ui.horizontal(|ui| {
                        let why = t.task.error.as_deref().unwrap_or("the host gave no reason");
                        ui.colored_label(ui.visuals().error_fg_color, format!("{} failed: {why}", t.what));
                        if theme::button(ui, true, theme::CLOSE, "Dismiss").clicked() {
                            self.backend.model().tasks.retain(|x| x != t);
                        }
                    });
                }
                TaskState::Done | TaskState::Cancelled => {}
            }
        }
        busy
    }

    fn tree(&mut self, ui: &mut egui::Ui, host: usize, vm: &Vm, tree: &SnapshotTree, busy: bool) {
        if tree.snapshots.is_empty() {
            ui.weak("No snapshots yet: a snapshot keeps the VM as it is now, to come back to later.");
        }
        let can = !busy && can_snapshot(vm);
        egui::Grid::new(("snapshot-tree", host, &vm.id)).striped(true).num_columns(6).show(ui, |ui| {
            for title in ["Name", "Taken", "Description", "Holds", "Size", ""] {
                ui.strong(title);
            }
            ui.end_row();
            for row in tree_rows(tree) {
                let depth = match row {
                    TreeRow::Snapshot { depth, .. } | TreeRow::Now { depth } => depth,
                };
                let indent = |ui: &mut egui::Ui| {
                    if depth > 0 {
                        // A branch line from the parent: "└" drawn, as the default fonts lack box characters.
                        ui.add_space((depth - 1) as f32 * 16.0 + 4.0);
                        let (rect, _) = ui.allocate_exact_size(egui::vec2(12.0, 14.0), egui::Sense::hover());
                        let stroke = egui::Stroke::new(1.0, ui.visuals().weak_text_color());
                        let corner = egui::pos2(rect.left() + 2.0, rect.center().y);
                        ui.painter().line_segment([egui::pos2(corner.x, rect.top()), corner], stroke);
                        ui.painter().line_segment([corner, egui::pos2(rect.right(), corner.y)], stroke);
                    }
                };
                let TreeRow::Snapshot { index, .. } = row else {
                    ui.horizontal(|ui| {
                        indent(ui);
                        ui.strong("Now");
                    });
                    ui.weak(if live(vm) { "running" } else { "the VM's present state" });
                    for _ in 0..4 {
                        ui.label("");
                    }
                    ui.end_row();
                    continue;
                };
                let s = &tree.snapshots[index];
                ui.horizontal(|ui| {
                    indent(ui);
                    if tree.current.as_deref() == Some(s.id.as_str()) {
                        ui.strong(&s.name);
                    } else {
                        ui.label(&s.name);
                    }
                });
                ui.label(utc_text(s.created_ms));
                ui.label(&s.description);
                ui.label(if s.with_state { "disks + RAM" } else { "disks" }).on_hover_text(if s.with_state {
                    "Taken while the VM ran: its memory and devices too; reverting resumes it where it was"
                } else {
                    "The disks only"
                });
                ui.label(human_bytes(s.size_bytes));
                ui.horizontal(|ui| {
                    let label = format!("Revert to {}", s.name);
                    let r = theme::button(ui, can, theme::REVERT, "Revert");
                    r.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, can, &label));
                    if r.clicked() {
                        self.snapshot_ui.confirm = Some(Confirmation {
                            host,
                            vm: vm.id.clone(),
                            vm_name: vm.name.clone(),
                            snapshot: s.id.clone(),
                            snapshot_name: s.name.clone(),
                            what: Confirm::Revert { running: live(vm), with_state: s.with_state },
                        });
                    }
                    let label = format!("Delete snapshot {}", s.name);
                    let r = theme::button(ui, !busy, theme::DELETE, "Delete");
                    r.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, !busy, &label));
                    if r.clicked() {
                        self.snapshot_ui.confirm = Some(Confirmation {
                            host,
                            vm: vm.id.clone(),
                            vm_name: vm.name.clone(),
                            snapshot: s.id.clone(),
                            snapshot_name: s.name.clone(),
                            what: Confirm::Delete,
                        });
                    }
                });
                ui.end_row();
            }
        });
    }

    /// The take dialog and the revert/delete confirmations.
    pub(super) fn snapshot_windows(&mut self, ctx: &egui::Context) {
        self.take_window(ctx);
        self.confirm_window(ctx);
    }

    fn take_window(&mut self, ctx: &egui::Context) {
        let Some(f) = self.snapshot_ui.take.as_mut() else { return };
        let mut open = true;
        let (mut take, mut cancel) = (false, false);
        theme::dialog(ctx, "Take a snapshot").open(&mut open).show(ctx, |ui| {
            ui.label(format!("Of {}", f.vm_name));
            egui::Grid::new("take-snapshot").num_columns(2).show(ui, |ui| {
                let l = ui.label("Snapshot name");
                ui.text_edit_singleline(&mut f.name).labelled_by(l.id);
                ui.end_row();
                let l = ui.label("Description");
                ui.add(egui::TextEdit::multiline(&mut f.description).desired_rows(2).hint_text("before the upgrade"))
                    .labelled_by(l.id);
                ui.end_row();
            });
            if f.running {
                ui.checkbox(&mut f.with_state, "Include memory (VM keeps running)");
                ui.weak(if f.with_state {
                    "RAM and devices are saved too: reverting resumes the VM exactly where it is now."
                } else {
                    "The disks only, as after a power cut: reverting to it needs the VM to boot again."
                });
            } else {
                ui.weak("The VM is stopped: the snapshot holds its disks.");
            }
            let problem = snapshot_name_problem(f.name.trim(), &f.existing);
            if let Some(p) = &problem {
                ui.colored_label(ui.visuals().warn_fg_color, p);
            }
            ui.horizontal(|ui| {
                take = theme::button(ui, problem.is_none(), theme::SNAPSHOT, "Take snapshot").clicked();
                cancel = theme::button(ui, true, theme::CLOSE, "Cancel").clicked();
            });
        });
        if take {
            let f = self.snapshot_ui.take.take().expect("open");
            let request = f.request();
            let what = format!("Take snapshot {} of {}", request.name, f.vm_name);
            let id = f.vm.clone();
            self.backend.run_task(
                f.host,
                f.vm.clone(),
                what,
                move |c| async move { c.take_snapshot(&id, &request).await },
                |_, _| {},
            );
            self.snapshot_ui.fetched = None;
        } else if cancel || !open {
            self.snapshot_ui.take = None;
        }
    }

    fn confirm_window(&mut self, ctx: &egui::Context) {
        let Some(c) = self.snapshot_ui.confirm.clone() else { return };
        let mut answer = None;
        let (title, text, yes) = match c.what {
            Confirm::Revert { running, with_state } => {
                let mut text = if running {
                    format!(
                        "{} is running: its present state is lost — what it did since {} was taken, and what is in \
                         its memory now.",
                        c.vm_name, c.snapshot_name
                    )
                } else {
                    format!(
                        "The disks of {} go back to {}: the changes made since are lost (take a snapshot first to \
                         keep them).",
                        c.vm_name, c.snapshot_name
                    )
                };
                text.push_str(if with_state {
                    " The snapshot holds the running machine: the VM continues where it was then."
                } else {
                    " The snapshot holds the disks only."
                });
                ("Revert to a snapshot", text, "Revert now")
            }
            Confirm::Delete => (
                "Delete a snapshot",
                format!(
                    "Delete snapshot {} of {}? Its disk layer is merged where the tree needs it; the VM's present \
                     state does not change. This cannot be undone.",
                    c.snapshot_name, c.vm_name
                ),
                "Delete snapshot",
            ),
        };
        theme::dialog(ctx, title).show(ctx, |ui| {
            ui.set_max_width(420.0);
            ui.label(text);
            ui.horizontal(|ui| {
                if theme::button(ui, true, theme::CONFIRM, yes).clicked() {
                    answer = Some(true);
                }
                if theme::button(ui, true, theme::CLOSE, "Cancel").clicked() {
                    answer = Some(false);
                }
            });
        });
        match answer {
            Some(true) => {
                self.snapshot_ui.confirm = None;
                let (id, snapshot) = (c.vm.clone(), c.snapshot.clone());
                match c.what {
                    Confirm::Revert { .. } => self.backend.run_task(
                        c.host,
                        c.vm.clone(),
                        format!("Revert {} to {}", c.vm_name, c.snapshot_name),
                        // Confirmed by the user just now.
                        move |cl| async move { cl.revert_snapshot(&id, &snapshot, true).await },
                        |_, _| {},
                    ),
                    Confirm::Delete => self.backend.run_task(
                        c.host,
                        c.vm.clone(),
                        format!("Delete snapshot {} of {}", c.snapshot_name, c.vm_name),
                        move |cl| async move { cl.delete_snapshot(&id, &snapshot).await },
                        |_, _| {},
                    ),
                }
            }
            Some(false) => self.snapshot_ui.confirm = None,
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, parent: Option<&str>, t: u64) -> Snapshot {
        Snapshot {
            id: id.into(),
            name: format!("n-{id}"),
            description: String::new(),
            created_ms: t,
            parent: parent.map(str::to_owned),
            with_state: false,
            size_bytes: 0,
        }
    }

    /// The rows as "name@depth", "Now@depth".
    fn drawn(tree: &SnapshotTree) -> Vec<String> {
        tree_rows(tree)
            .into_iter()
            .map(|r| match r {
                TreeRow::Snapshot { index, depth } => format!("{}@{depth}", tree.snapshots[index].id),
                TreeRow::Now { depth } => format!("Now@{depth}"),
            })
            .collect()
    }

    #[test]
    fn the_tree_lists_children_under_parents_and_now_under_the_current_snapshot() {
        // a → b → c, a → d (newer than b); the VM was reverted to d.
        let tree = SnapshotTree {
            snapshots: vec![
                snap("c", Some("b"), 3),
                snap("d", Some("a"), 4),
                snap("a", None, 1),
                snap("b", Some("a"), 2),
            ],
            current: Some("d".into()),
        };
        assert_eq!(drawn(&tree), ["a@0", "b@1", "c@2", "d@1", "Now@2"]);
        // Now after the current snapshot's own children.
        let tree = SnapshotTree { current: Some("b".into()), ..tree };
        assert_eq!(drawn(&tree), ["a@0", "b@1", "c@2", "Now@2", "d@1"]);
    }

    #[test]
    fn a_tree_without_snapshots_is_just_now() {
        assert_eq!(drawn(&SnapshotTree::default()), ["Now@0"]);
        // An unknown current snapshot: Now at the top level, at the end.
        let tree = SnapshotTree { snapshots: vec![snap("a", None, 1)], current: Some("gone".into()) };
        assert_eq!(drawn(&tree), ["a@0", "Now@0"]);
    }

    #[test]
    fn orphans_and_loops_are_drawn_once_each() {
        let tree = SnapshotTree {
            snapshots: vec![
                snap("x", Some("y"), 1),
                snap("y", Some("x"), 2),
                snap("o", Some("missing"), 3),
                snap("s", Some("s"), 4),
            ],
            current: Some("x".into()),
        };
        let rows = drawn(&tree);
        assert_eq!(rows.len(), 5, "{rows:?}");
        assert_eq!(rows[0], "o@0", "an orphan is a root");
        assert_eq!(rows[1], "s@0", "its own parent: a root");
        assert_eq!(&rows[2..], ["x@0", "y@1", "Now@1"], "a loop is cut where it was entered");
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc_text(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_text(951_782_400_000 + 3_600_000 * 13 + 60_000 * 5), "2000-02-29 13:05 UTC");
        assert_eq!(utc_text(1_798_761_599_000), "2026-12-31 23:59 UTC");
    }

    #[test]
    fn snapshot_names_are_checked_before_sending() {
        let existing = [snap("a", None, 1)];
        assert_eq!(snapshot_name_problem("before upgrade", &existing), None);
        assert!(snapshot_name_problem("", &existing).unwrap().contains("Give the snapshot a name"));
        assert!(snapshot_name_problem("a/b", &existing).unwrap().contains("no '/'"));
        assert!(snapshot_name_problem(&"x".repeat(64), &existing).is_some());
        assert!(snapshot_name_problem("n-a", &existing).unwrap().contains("already"));
    }

    #[test]
    fn the_memory_choice_is_sent_for_running_vms_only() {
        let mut f = TakeForm {
            host: 0,
            vm: "v".into(),
            vm_name: "v".into(),
            running: true,
            existing: Vec::new(),
            name: " s1 ".into(),
            description: "why".into(),
            with_state: false,
        };
        assert_eq!(f.request(), TakeSnapshot { name: "s1".into(), description: "why".into(), with_state: Some(false) });
        f.running = false;
        assert_eq!(f.request().with_state, None);
    }
}
