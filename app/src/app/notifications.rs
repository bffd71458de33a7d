//! Notifications: each new notice (a finished task, an error) pops up as a toast in the window's corner for
//! a few seconds without blocking anything (`egui-notify`), and the notices bar at the bottom keeps running
//! uploads with their progress and cancel, and the last notice (an error in the error colour), for screen
//! readers too (toasts are painted, not widgets).

use std::time::Duration;

use super::PortholeApp;
use super::theme;

/// How long a toast stays: errors longer, so they can be read.
const DONE_FOR: Duration = Duration::from_secs(4);
const ERROR_FOR: Duration = Duration::from_secs(10);

/// The toasts on screen and how many notices have been toasted.
pub struct Notifications {
    toasts: egui_notify::Toasts,
    seen: u64,
}

impl Default for Notifications {
    fn default() -> Self {
        Notifications { toasts: egui_notify::Toasts::new().with_anchor(egui_notify::Anchor::BottomRight), seen: 0 }
    }
}

impl Notifications {
    /// Toasts on screen now.
    pub fn showing(&self) -> usize {
        self.toasts.len()
    }
}

impl PortholeApp {
    /// Toasts the notices given since the last frame, and draws the toasts.
    pub(super) fn toasts(&mut self, ctx: &egui::Context) {
        let new = {
            let m = self.backend.model();
            let fresh = (m.notices_total - self.notifications.seen).min(m.notices.len() as u64) as usize;
            self.notifications.seen = m.notices_total;
            m.notices[m.notices.len() - fresh..].to_vec()
        };
        for n in new {
            // The level's mark is one of our icons (the crate's own marks are glyphs egui's fonts lack).
            let (icon, color, time) = if n.error {
                (theme::ERROR, ctx.global_style().visuals.error_fg_color, ERROR_FOR)
            } else {
                (
                    theme::DONE,
                    theme::state_color(porthole_api::VmState::Running, false, &ctx.global_style().visuals)
                        .unwrap_or_default(),
                    DONE_FOR,
                )
            };
            self.notifications
                .toasts
                .custom(n.text, icon.codepoint.to_owned(), color)
                .duration(Some(time))
                .closable(false)
                .width(360.0);
        }
        self.notifications.toasts.show(ctx);
    }

    pub(super) fn notices(&mut self, ui: &mut egui::Ui) {
        let (notice, progress) = {
            let m = self.backend.model();
            (m.notices.last().cloned(), m.progress.clone())
        };
        for p in progress {
            ui.horizontal(|ui| {
                if theme::button(ui, true, theme::CLOSE, "Cancel upload")
                    .on_hover_text(format!("Stop: {}", p.what))
                    .clicked()
                {
                    self.backend.cancel_upload(&p.what);
                }
                ui.add(egui::ProgressBar::new(p.fraction).text(format!("{} {:.0}%", p.what, p.fraction * 100.0)));
            });
        }
        ui.horizontal(|ui| match notice {
            Some(n) if n.error => {
                let color = ui.visuals().error_fg_color;
                theme::paint_icon(ui, theme::ERROR, color);
                ui.colored_label(color, n.text);
            }
            Some(n) => {
                theme::paint_icon(ui, theme::DONE, ui.visuals().weak_text_color());
                ui.label(n.text);
            }
            None => {
                ui.label("Ready.");
            }
        });
    }
}
