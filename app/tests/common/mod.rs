//! What the window tests share: a window on a daemon's socket, and stepping, querying and driving it by
//! accessibility label.
#![allow(dead_code)] // each test file uses its own part

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use porthole::PortholeApp;

pub fn disabled(h: &Harness<'static, PortholeApp>, label: &str) -> bool {
    use egui_kittest::kittest::NodeT;
    h.get_by_label(label).accesskit_node().is_disabled()
}

pub fn has(h: &Harness<'static, PortholeApp>, label: &str) -> bool {
    h.query_all_by_label(label).next().is_some()
}

pub fn has_contains(h: &Harness<'static, PortholeApp>, part: &str) -> bool {
    h.query_all_by_label_contains(part).next().is_some()
}

pub fn type_into(h: &mut Harness<'static, PortholeApp>, label: &str, text: &str) {
    h.get_by_role_and_label(Role::TextInput, label).focus();
    h.step();
    h.get_by_role_and_label(Role::TextInput, label).type_text(text);
    h.step();
}

pub fn click(h: &mut Harness<'static, PortholeApp>, label: &str) {
    h.get_by_label(label).click();
    h.step();
    h.step();
}

/// Opens the combo box labelled `label` and picks `choice`.
pub fn combo(h: &mut Harness<'static, PortholeApp>, label: &str, choice: &str) {
    h.get_by_role_and_label(Role::ComboBox, label).click();
    h.step();
    h.step();
    h.get_all_by_label(choice).last().expect("the choice").click();
    h.step();
    h.step();
}

/// Replaces the text of the text field labelled `label` (select all, then type).
pub fn replace_text(h: &mut Harness<'static, PortholeApp>, label: &str, text: &str) {
    h.get_by_role_and_label(Role::TextInput, label).focus();
    h.step();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.step();
    h.get_by_role_and_label(Role::TextInput, label).type_text(text);
    h.step();
}
