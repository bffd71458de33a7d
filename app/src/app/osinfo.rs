//! The create wizard's OS detection: the ISO chosen or dropped is read here (its ISO 9660 volume ids and
//! boot catalog, with `porthole_api::iso`) and the host identifies it with its osinfo-db
//! (`POST /osinfo/identify`); a library image comes with what the host detected (`GET /images`). The wizard
//! shows the OS, pre-fills its recommended vCPUs, memory and disk where the user has not changed them, and
//! warns below the OS's minimum and for an ISO that boots only with UEFI (Porthole's firmware is SeaBIOS).

use std::sync::{Arc, Mutex};

use porthole_api::{DetectedOs, Identified, Image, IsoFacts};

use super::Wizard;
use crate::backend::Backend;

/// What is known about the wizard's ISO.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum OsGuess {
    /// No ISO chosen.
    #[default]
    Nothing,
    /// Being read and identified.
    Reading,
    /// Read: its facts (None for a library image that is not an ISO) and the host's answer.
    Known { facts: Option<IsoFacts>, identified: Box<Identified> },
    /// It could not be read or the host did not answer.
    Failed(String),
}

/// The wizard's OS detection state.
#[derive(Debug, Clone, Default)]
pub struct WizardOs {
    /// What the guess is for: a local path, or `library:NAME`.
    source: String,
    /// Where the answer for `source` lands (off the UI thread).
    incoming: Arc<Mutex<OsGuess>>,
    /// What the wizard shows: `incoming` as it was at the start of the frame, with the fields filled in.
    current: OsGuess,
    /// Whether the current guess's resources were put in the fields yet.
    applied: bool,
    /// The (vCPUs, memory, disk) the wizard itself last put in the fields: a field that differs was edited by
    /// the user and is left alone.
    auto: Option<(u32, u64, u64)>,
}

impl WizardOs {
    /// The current guess.
    pub fn guess(&self) -> OsGuess {
        self.current.clone()
    }

    fn set(&mut self, guess: OsGuess) {
        *self.incoming.lock().unwrap_or_else(|p| p.into_inner()) = guess.clone();
        self.current = guess;
    }

    /// The OS detected, if any.
    pub fn os(&self) -> Option<DetectedOs> {
        match self.guess() {
            OsGuess::Known { identified, .. } => identified.os,
            _ => None,
        }
    }
}

/// What the row shows for `guess`.
pub fn describe(guess: &OsGuess) -> String {
    match guess {
        OsGuess::Nothing => "choose an ISO to detect its OS".to_owned(),
        OsGuess::Reading => "Reading the ISO…".to_owned(),
        OsGuess::Known { identified, .. } => match (&identified.os, &identified.note) {
            (Some(os), _) => format!("{} ({})", os.name, os.short_id),
            (None, Some(note)) => format!("Unknown OS: {note}"),
            (None, None) => "Unknown OS".to_owned(),
        },
        OsGuess::Failed(why) => format!("Unknown OS ({why})"),
    }
}

/// Starts detection when the wizard's ISO changed, and pre-fills the fields once the answer is in. Called
/// every frame the wizard is open.
pub(super) fn update(w: &mut Wizard, backend: &Backend, images: &[Image], host_memory_mib: Option<u64>) {
    let iso = w.iso.trim().to_owned();
    let library = if iso.is_empty() {
        w.disk_image.as_ref().filter(|_| w.cloud.is_none()).and_then(|n| images.iter().find(|i| i.name == *n))
    } else {
        None
    };
    let source = match library {
        Some(i) => format!("library:{}", i.name),
        None if std::path::Path::new(&iso).is_file() => iso.clone(),
        None => String::new(),
    };
    if source != w.os.source {
        w.os.source = source.clone();
        w.os.applied = false;
        // A new slot: an answer still coming for the previous ISO lands in the old one.
        w.os.incoming = Arc::default();
        w.os.current = OsGuess::Nothing;
        if let Some(image) = library {
            let db_version = backend.model().hosts.get(w.host).and_then(|h| h.info.as_ref()?.osinfo_db.clone());
            let note = (image.iso.is_some() && db_version.is_none()).then(|| "no osinfo-db on the host".to_owned());
            w.os.set(OsGuess::Known {
                facts: image.iso.clone(),
                identified: Box::new(Identified { os: image.os.clone(), db_version, note }),
            });
        } else if !source.is_empty() {
            w.os.set(OsGuess::Reading);
            identify(backend, w.host, std::path::PathBuf::from(&source), w.os.incoming.clone());
        }
    }
    w.os.current = w.os.incoming.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if !w.os.applied
        && let OsGuess::Known { identified, .. } = w.os.guess()
    {
        w.os.applied = true;
        if let Some(os) = identified.os {
            prefill(w, &os, host_memory_mib);
        }
    }
}

/// Reads the ISO at `path` and asks host `host` what it is, off the UI thread; the answer lands in `into`.
fn identify(backend: &Backend, host: usize, path: std::path::PathBuf, into: Arc<Mutex<OsGuess>>) {
    let client = backend.model().hosts.get(host).and_then(|h| h.connection.clone());
    let b = backend.clone();
    backend.runtime().spawn(async move {
        let read = tokio::task::spawn_blocking(move || porthole_api::iso::read_file(&path)).await;
        let guess = match read {
            Ok(Ok(facts)) => match client {
                Some(c) => match c.identify_os(&facts).await {
                    Ok(identified) => OsGuess::Known { facts: Some(facts), identified: Box::new(identified) },
                    Err(e) => OsGuess::Failed(format!("the host did not answer: {e}")),
                },
                None => OsGuess::Failed("the host is not connected".to_owned()),
            },
            Ok(Err(e)) => OsGuess::Failed(e.to_string()),
            Err(e) => OsGuess::Failed(e.to_string()),
        };
        *into.lock().unwrap_or_else(|p| p.into_inner()) = guess;
        b.repaint();
    });
}

/// Puts `os`'s recommended resources (else its minimum) in the fields the user has not changed.
fn prefill(w: &mut Wizard, os: &DetectedOs, host_memory_mib: Option<u64>) {
    let (auto_cpus, auto_mem, auto_disk) = w.os.auto.unwrap_or((w.vcpus, w.memory_mib, w.disk_gib));
    let (rec, min) = (&os.recommended, &os.minimum);
    if w.vcpus == auto_cpus
        && let Some(n) = rec.vcpus.or(min.vcpus)
    {
        w.vcpus = n.clamp(1, 64);
    }
    if w.memory_mib == auto_mem
        && let Some(m) = rec.memory_mib.or(min.memory_mib)
    {
        w.memory_mib = host_memory_mib.map_or(m, |h| m.min(h)).max(4);
    }
    // Only a new empty disk (or a cloud image's overlay) has a size to choose.
    let sized = w.cloud.is_some() || (w.disk_image.is_none() && w.disk_gib > 0);
    if sized
        && w.disk_gib == auto_disk
        && let Some(b) = rec.disk_bytes.or(min.disk_bytes)
    {
        w.disk_gib = b.div_ceil(1 << 30).clamp(1, 65536);
    }
    w.os.auto = Some((w.vcpus, w.memory_mib, w.disk_gib));
}

/// Warnings (not errors: Create stays allowed): below the OS's minimum, and an ISO only UEFI boots.
pub fn warnings(w: &Wizard) -> Vec<String> {
    let mut out = Vec::new();
    let OsGuess::Known { facts, identified } = w.os.guess() else { return out };
    if let Some(os) = identified.os {
        let min = &os.minimum;
        if let Some(n) = min.vcpus.filter(|&n| w.vcpus < n) {
            out.push(format!("{} needs at least {n} vCPUs.", os.name));
        }
        if let Some(m) = min.memory_mib.filter(|&m| w.memory_mib < m) {
            out.push(format!("{} needs at least {m} MiB of memory: below that it may not install or run.", os.name));
        }
        let new_disk = w.cloud.is_some() || (w.disk_image.is_none() && w.disk_gib > 0);
        if let Some(b) = min.disk_bytes.filter(|&b| new_disk && w.disk_gib.saturating_mul(1 << 30) < b) {
            out.push(format!("{} needs a disk of at least {} GiB.", os.name, b.div_ceil(1 << 30)));
        }
    }
    if facts.as_ref().is_some_and(IsoFacts::uefi_only) {
        out.push(
            "This ISO boots only with UEFI: Porthole's firmware is a PC BIOS (SeaBIOS), which cannot start it."
                .to_owned(),
        );
    }
    out
}

/// The wizard's "Operating system" row.
pub(super) fn wizard_row(ui: &mut egui::Ui, w: &Wizard) {
    ui.label("Operating system");
    let guess = w.os.guess();
    let os = match &guess {
        OsGuess::Known { identified, .. } => identified.os.clone(),
        _ => None,
    };
    ui.horizontal(|ui| {
        match (&guess, os) {
            (_, Some(os)) => {
                ui.strong(describe(&guess));
                let mut more = Vec::new();
                more.extend(os.vendor.clone());
                if let Some(r) = os.recommended.memory_mib {
                    more.push(format!("recommended {r} MiB"));
                }
                if let Some(m) = os.minimum.memory_mib {
                    more.push(format!("minimum {m} MiB"));
                }
                if !more.is_empty() {
                    ui.weak(more.join(", "));
                }
            }
            (OsGuess::Nothing, _) => {
                ui.weak(describe(&guess));
            }
            _ => {
                ui.label(describe(&guess));
            }
        };
    });
    ui.end_row();
}

#[cfg(test)]
mod tests {
    use super::*;
    use porthole_api::OsResources;

    fn ubuntu() -> DetectedOs {
        DetectedOs {
            id: "http://ubuntu.com/ubuntu/22.04".into(),
            short_id: "ubuntu22.04".into(),
            name: "Ubuntu 22.04 LTS".into(),
            minimum: OsResources { vcpus: Some(1), memory_mib: Some(2048), disk_bytes: Some(10 << 30) },
            recommended: OsResources { vcpus: None, memory_mib: Some(4096), disk_bytes: Some(25 << 30) },
            ..DetectedOs::default()
        }
    }

    fn known(w: &mut Wizard, os: Option<DetectedOs>, uefi_only: bool) {
        let facts = IsoFacts { volume_id: Some("V".into()), uefi_bootable: uefi_only, ..IsoFacts::default() };
        let identified = Box::new(Identified { os, ..Identified::default() });
        w.os.set(OsGuess::Known { facts: Some(facts), identified });
        w.os.applied = false;
    }

    fn apply(w: &mut Wizard, host_memory: Option<u64>) {
        if let Some(os) = w.os.os() {
            prefill(w, &os, host_memory);
        }
    }

    #[test]
    fn recommended_resources_fill_only_untouched_fields() {
        let mut w = Wizard::new(0);
        w.memory_mib = 512; // the user's
        w.os.auto = Some((1, 1024, w.disk_gib));
        known(&mut w, Some(ubuntu()), false);
        apply(&mut w, None);
        assert_eq!((w.vcpus, w.memory_mib, w.disk_gib), (1, 512, 25), "memory was edited, the disk was not");
        assert!(warnings(&w).iter().any(|m| m.contains("at least 2048 MiB")), "{:?}", warnings(&w));
        w.memory_mib = 2048;
        assert!(warnings(&w).is_empty(), "{:?}", warnings(&w));
        w.disk_gib = 9;
        assert!(warnings(&w).iter().any(|m| m.contains("at least 10 GiB")));
    }

    #[test]
    fn memory_stays_within_the_host_and_minimums_are_the_fallback() {
        let mut w = Wizard::new(0);
        known(&mut w, Some(ubuntu()), false);
        apply(&mut w, Some(3000));
        assert_eq!(w.memory_mib, 3000);
        let mut only_min = ubuntu();
        only_min.recommended = OsResources::default();
        let mut w = Wizard::new(0);
        known(&mut w, Some(only_min), false);
        apply(&mut w, None);
        assert_eq!((w.vcpus, w.memory_mib, w.disk_gib), (1, 2048, 10));
        // No disk chosen: no disk size is made up.
        let mut w = Wizard::new(0);
        w.disk_gib = 0;
        known(&mut w, Some(ubuntu()), false);
        apply(&mut w, None);
        assert_eq!(w.disk_gib, 0);
    }

    #[test]
    fn unknown_and_uefi_only_isos_say_so() {
        let mut w = Wizard::new(0);
        known(&mut w, None, true);
        assert_eq!(describe(&w.os.guess()), "Unknown OS");
        let (cpus, mem, disk) = (w.vcpus, w.memory_mib, w.disk_gib);
        apply(&mut w, None);
        assert_eq!((w.vcpus, w.memory_mib, w.disk_gib), (cpus, mem, disk), "the defaults stay");
        let warn = warnings(&w);
        assert!(warn.len() == 1 && warn[0].contains("only with UEFI"), "{warn:?}");
        let none = OsGuess::Known {
            facts: None,
            identified: Box::new(Identified {
                note: Some("no osinfo-db on this host".into()),
                ..Identified::default()
            }),
        };
        assert_eq!(describe(&none), "Unknown OS: no osinfo-db on this host");
        assert_eq!(describe(&OsGuess::Failed("not an ISO".into())), "Unknown OS (not an ISO)");
    }
}
