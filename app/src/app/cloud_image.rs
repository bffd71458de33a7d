//! The create wizard's *From a cloud image* mode: a qcow2 or raw image of the host's library as the base of the
//! VM's disk (a qcow2 overlay grown to the size asked), and a NoCloud seed with a user, an SSH public key (the
//! first of `~/.ssh/*.pub` by default) and a hostname. The details of such a VM show what its seed says.

use std::path::{Path, PathBuf};

use porthole_api::{CloudInitSpec, Image, ImageFormat};

use super::Wizard;
use super::clones::human_bytes;

/// The cloud-init part of the wizard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudForm {
    /// The user created in the guest.
    pub user: String,
    /// OpenSSH public keys, one a line.
    pub ssh_key: String,
    /// The file the key was read from when the wizard opened (None: none was found).
    pub key_source: Option<PathBuf>,
    /// Empty: made from the VM's name.
    pub hostname: String,
}

impl CloudForm {
    /// Defaults for a user whose home is `home`: the local user name and the first public key of `~/.ssh`.
    pub fn discover(home: Option<&Path>) -> Self {
        let found = home.and_then(find_ssh_key);
        let user = local_user().filter(|u| user_problem(u).is_none()).unwrap_or_else(|| "user".to_owned());
        CloudForm {
            user,
            ssh_key: found.as_ref().map(|(_, k)| k.clone()).unwrap_or_default(),
            key_source: found.map(|(p, _)| p),
            hostname: String::new(),
        }
    }

    /// The keys typed, one a line.
    fn keys(&self) -> Vec<String> {
        self.ssh_key.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
    }
}

/// The first (by file name) `*.pub` file of `home/.ssh` that holds an OpenSSH public key: its path and first
/// line.
pub fn find_ssh_key(home: &Path) -> Option<(PathBuf, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(home.join(".ssh"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pub") && p.is_file())
        .collect();
    files.sort();
    files.into_iter().find_map(|p| {
        // A public key is a line; anything large is not one.
        if std::fs::metadata(&p).ok()?.len() > 16 * 1024 {
            return None;
        }
        let text = std::fs::read_to_string(&p).ok()?;
        let line = text.lines().map(str::trim).find(|l| !l.is_empty())?.to_owned();
        looks_like_key(&line).then_some((p, line))
    })
}

/// `ssh-ed25519 AAAA…`, `ecdsa-sha2-nistp256 AAAA…`, `sk-ssh-ed25519@openssh.com AAAA…`.
fn looks_like_key(line: &str) -> bool {
    let mut parts = line.split_whitespace();
    let kind = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    (kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-")) && body.starts_with("AAAA")
}

/// The name of the user running the window.
fn local_user() -> Option<String> {
    for var in ["USER", "LOGNAME"] {
        if let Ok(u) = std::env::var(var)
            && !u.is_empty()
        {
            return Some(u);
        }
    }
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: `pwd` and `buf` outlive the call; getpwuid_r writes only into them and sets `result` to `&pwd`
    // or null.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result = std::ptr::null_mut();
        let rc = libc::getpwuid_r(libc::getuid(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        Some(std::ffi::CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned())
    }
}

/// Why cloud-init would not create `user`.
fn user_problem(user: &str) -> Option<String> {
    let ok = (1..=32).contains(&user.len())
        && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && user.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b));
    (!ok).then(|| "A user name is 1-32 lowercase letters, digits, '-' or '_', starting with a letter.".to_owned())
}

/// Why `name` is not a host name label.
fn hostname_problem(name: &str) -> Option<String> {
    let ok = (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    (!ok).then(|| format!("Hostname {name:?}: use 1-63 letters, digits or '-' (not at either end)."))
}

/// A hostname made from a VM name (its other characters become '-').
pub fn default_hostname(vm_name: &str) -> String {
    let mapped: String = vm_name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(63).collect();
    let trimmed = mapped.trim_matches('-');
    if trimmed.is_empty() { "vm".to_owned() } else { trimmed.to_owned() }
}

/// Library images a cloud VM can start from.
pub fn is_disk_image(i: &Image) -> bool {
    matches!(i.format, ImageFormat::Qcow2 | ImageFormat::Raw)
}

/// An image as the pickers show it: its name, format and sizes.
pub fn image_text(i: &Image) -> String {
    let format = match i.format {
        ImageFormat::Iso => "ISO",
        ImageFormat::Qcow2 => "qcow2",
        ImageFormat::Raw => "raw",
    };
    let virt = if i.virtual_bytes > 0 { i.virtual_bytes } else { i.size_bytes };
    let on_disk = if i.allocated_bytes > 0 { i.allocated_bytes } else { i.size_bytes };
    let text = format!("{} — {format}, {} virtual, {} on disk", i.name, human_bytes(virt), human_bytes(on_disk));
    match &i.os {
        Some(os) => format!("{text}, {}", os.name),
        None => text,
    }
}

/// The smallest disk (GiB) that holds `image`.
fn min_gib(image: &Image) -> u64 {
    let virt = if image.virtual_bytes > 0 { image.virtual_bytes } else { image.size_bytes };
    virt.div_ceil(1 << 30).max(1)
}

impl Wizard {
    /// The seed the wizard asks for (in cloud-image mode).
    pub fn cloud_init(&self) -> Option<CloudInitSpec> {
        let c = self.cloud.as_ref()?;
        let hostname = match c.hostname.trim() {
            "" => default_hostname(&self.name),
            h => h.to_owned(),
        };
        Some(CloudInitSpec { hostname, user: c.user.trim().to_owned(), ssh_authorized_keys: c.keys() })
    }

    /// What is wrong with the cloud-image fields (`images`: the host's library).
    pub(super) fn cloud_problems(&self, images: &[Image]) -> Vec<String> {
        let mut p = Vec::new();
        let (Some(spec), Some(c)) = (self.cloud_init(), self.cloud.as_ref()) else { return p };
        match self.disk_image.as_deref() {
            None | Some("") => p.push("Choose the cloud image (qcow2 or raw) from the library.".to_owned()),
            Some(name) => match images.iter().find(|i| i.name == name) {
                Some(i) if !is_disk_image(i) => p.push(format!("{name} is a CD/DVD image, not a disk image.")),
                Some(i) if self.disk_gib < min_gib(i) => {
                    p.push(format!("The disk must be at least {} GiB: the image is that large.", min_gib(i)))
                }
                _ => {}
            },
        }
        p.extend(user_problem(&spec.user));
        if !self.name.is_empty() || !c.hostname.trim().is_empty() {
            p.extend(hostname_problem(&spec.hostname));
        }
        if spec.ssh_authorized_keys.is_empty() {
            p.push(if c.key_source.is_none() {
                "No SSH public key was found in ~/.ssh (*.pub): paste one to log in with.".to_owned()
            } else {
                "Give an SSH public key to log in with.".to_owned()
            });
        } else if let Some(bad) = spec.ssh_authorized_keys.iter().find(|k| !looks_like_key(k)) {
            let short: String = bad.chars().take(24).collect();
            p.push(format!("\"{short}…\" is not an OpenSSH public key (ssh-ed25519 AAAA…)."));
        }
        p
    }
}

/// The cloud-image rows of the wizard's grid (the image itself is picked in the "Disk" row).
pub(super) fn wizard_rows(ui: &mut egui::Ui, w: &mut Wizard) {
    let name = w.name.clone();
    let Some(c) = w.cloud.as_mut() else { return };
    let l = ui.label("User name");
    ui.horizontal(|ui| {
        ui.add(egui::TextEdit::singleline(&mut c.user).desired_width(120.0)).labelled_by(l.id);
        ui.weak("created in the guest, with sudo");
    });
    ui.end_row();
    let l = ui.label("SSH public key");
    ui.vertical(|ui| {
        ui.add(
            egui::TextEdit::multiline(&mut c.ssh_key)
                .desired_rows(2)
                .desired_width(360.0)
                .hint_text("ssh-ed25519 AAAA…"),
        )
        .labelled_by(l.id);
        match &c.key_source {
            Some(p) => ui.weak(format!("from {}", p.display())),
            None => ui.weak("No key found in ~/.ssh (*.pub): paste one."),
        };
    });
    ui.end_row();
    let l = ui.label("Hostname");
    ui.add(egui::TextEdit::singleline(&mut c.hostname).hint_text(default_hostname(&name)).desired_width(160.0))
        .labelled_by(l.id);
    ui.end_row();
}

/// The image picker's entries: every image, or only disk images for a cloud VM. After a pick in cloud mode the
/// disk grows to hold the image.
pub(super) fn image_picker(ui: &mut egui::Ui, w: &mut Wizard, images: &[Image]) {
    let cloud = w.cloud.is_some();
    let Some(image) = w.disk_image.as_mut() else { return };
    let before = image.clone();
    let l = ui.label("Image");
    egui::ComboBox::from_id_salt("disk-image")
        .selected_text(if image.is_empty() { "choose…" } else { image.as_str() })
        .show_ui(ui, |ui| {
            let mut any = false;
            for i in images.iter().filter(|i| !cloud || is_disk_image(i)) {
                any = true;
                ui.selectable_value(image, i.name.clone(), image_text(i));
            }
            if !any {
                ui.label(if cloud {
                    "The library has no qcow2 or raw image: upload a cloud image first."
                } else {
                    "The library is empty: upload an image first (drop it on a VM)."
                });
            }
        })
        .response
        .labelled_by(l.id);
    if cloud
        && *image != before
        && let Some(i) = images.iter().find(|i| i.name == *image)
    {
        w.disk_gib = w.disk_gib.max(min_gib(i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7 me@laptop";

    fn temp_home(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("porthole-app-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(".ssh")).unwrap();
        dir
    }

    #[test]
    fn the_first_public_key_of_dot_ssh_is_found() {
        let home = temp_home("keys");
        assert_eq!(find_ssh_key(&home), None, "no key");
        std::fs::write(home.join(".ssh/id_rsa"), "-----BEGIN OPENSSH PRIVATE KEY-----").unwrap();
        std::fs::write(home.join(".ssh/a_broken.pub"), "not a key\n").unwrap();
        std::fs::write(home.join(".ssh/known_hosts"), "host ssh-ed25519 AAAA").unwrap();
        assert_eq!(find_ssh_key(&home), None, "private keys, other files and non-keys are skipped");
        std::fs::write(home.join(".ssh/id_rsa.pub"), "ssh-rsa AAAAB3Nza rsa@laptop\n").unwrap();
        std::fs::write(home.join(".ssh/id_ed25519.pub"), format!("\n{KEY}\n")).unwrap();
        let (path, key) = find_ssh_key(&home).unwrap();
        assert_eq!(path, home.join(".ssh/id_ed25519.pub"), "the first by name");
        assert_eq!(key, KEY);
        let form = CloudForm::discover(Some(&home));
        assert_eq!((form.ssh_key.as_str(), form.key_source.as_deref()), (KEY, Some(path.as_path())));
        assert!(user_problem(&form.user).is_none(), "{:?}", form.user);
        let _ = std::fs::remove_dir_all(&home);
        let none = CloudForm::discover(Some(Path::new("/nonexistent-porthole-home")));
        assert_eq!((none.ssh_key.as_str(), none.key_source), ("", None));
    }

    #[test]
    fn hostnames_default_to_the_vm_name() {
        assert_eq!(default_hostname("web-1"), "web-1");
        assert_eq!(default_hostname("db_main.v2"), "db-main-v2");
        assert_eq!(default_hostname("_x_"), "x");
        assert_eq!(default_hostname("..."), "vm");
        assert!(hostname_problem("web-1").is_none());
        assert!(hostname_problem("-web").is_some() && hostname_problem("a.b").is_some());
    }

    fn image(name: &str, format: ImageFormat, virtual_bytes: u64) -> Image {
        Image {
            name: name.into(),
            size_bytes: 300 << 20,
            sha256: String::new(),
            format,
            virtual_bytes,
            allocated_bytes: 280 << 20,
            ..Image::default()
        }
    }

    #[test]
    fn images_show_format_and_sizes() {
        assert_eq!(
            image_text(&image("debian.qcow2", ImageFormat::Qcow2, 2 << 30)),
            "debian.qcow2 — qcow2, 2.0 GiB virtual, 280.0 MiB on disk"
        );
        assert!(!is_disk_image(&image("d.iso", ImageFormat::Iso, 0)));
        assert!(is_disk_image(&image("d.img", ImageFormat::Raw, 0)));
    }

    #[test]
    fn the_cloud_wizard_checks_its_fields() {
        let images = [image("debian.qcow2", ImageFormat::Qcow2, (2 << 30) + 1), image("d.iso", ImageFormat::Iso, 0)];
        let mut w = Wizard::new(0);
        w.name = "web".into();
        w.cloud =
            Some(CloudForm { user: "me".into(), ssh_key: String::new(), key_source: None, hostname: String::new() });
        w.disk_image = Some(String::new());
        let p = w.cloud_problems(&images);
        assert!(p.iter().any(|p| p.contains("Choose the cloud image")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("No SSH public key was found")), "{p:?}");
        w.disk_image = Some("d.iso".into());
        assert!(w.cloud_problems(&images).iter().any(|p| p.contains("not a disk image")));
        w.disk_image = Some("debian.qcow2".into());
        w.disk_gib = 2;
        w.cloud.as_mut().unwrap().ssh_key = "hello".into();
        let p = w.cloud_problems(&images);
        assert!(p.iter().any(|p| p.contains("at least 3 GiB")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("not an OpenSSH public key")), "{p:?}");
        w.disk_gib = 3;
        w.cloud.as_mut().unwrap().ssh_key = KEY.into();
        w.cloud.as_mut().unwrap().user = "Bad User".into();
        assert!(w.cloud_problems(&images).iter().any(|p| p.contains("user name")));
        w.cloud.as_mut().unwrap().user = "me".into();
        assert_eq!(w.cloud_problems(&images), Vec::<String>::new());
        assert!(w.problems(None, &[]).is_empty(), "a cloud image is what the VM boots: {:?}", w.problems(None, &[]));
    }
}
