//! NoCloud seeds for VMs made from cloud images: a small ISO 9660 volume labelled `cidata` holding
//! `user-data` (a `#cloud-config` with the user, their SSH keys and the hostname) and `meta-data` (the
//! instance id and hostname), which cloud-init finds by its label.
//!
//! The volume is made by `hadris-iso` with Rock Ridge: its ISO names stay within the standard while the
//! Rock Ridge `NM` entries give Linux (and every Rock Ridge reader: xorriso, 7z, libarchive) the exact names
//! cloud-init reads. (FAT, the other label cloud-init accepts, would need long-file-name entries.)
//!
//! Everything that goes into the YAML is checked strictly first (a host name label, a POSIX user name, OpenSSH
//! public keys) and then written as a JSON string (a valid YAML double-quoted scalar), so no input can add
//! YAML of its own.

use std::path::Path;

use crate::store::CloudInitRecord;

/// A new cloud-init instance id (each VM and each clone gets its own, so cloud-init runs once in each).
pub fn new_instance_id() -> String {
    format!("iid-porthole-{}", crate::store::random_hex(8))
}

/// Whether `name` is a host name label: 1–63 of lowercase letters, digits, `-`, not starting or ending
/// with `-`.
fn valid_hostname(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Whether `name` is a user name for the guest: 1–32 of lowercase letters, digits, `_`, `-`, starting with a
/// letter or `_`; not `root`.
fn valid_user(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name != "root"
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Checks an OpenSSH public key line: `TYPE BASE64 [comment]`, one line of printable ASCII without quotes or
/// backslashes, at most 16 KiB.
fn check_key(key: &str) -> Result<(), String> {
    let shown: String = key.chars().take(40).collect();
    if key.len() > 16 * 1024 {
        return Err(format!("SSH key {shown:?}…: longer than 16 KiB"));
    }
    if !key.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\') {
        return Err(format!("SSH key {shown:?}: only one line of printable ASCII without '\"' or '\\' is accepted"));
    }
    let mut parts = key.split(' ');
    let kind = parts.next().unwrap_or_default();
    let blob = parts.next().unwrap_or_default();
    if !KEY_TYPES.contains(&kind) {
        return Err(format!("SSH key {shown:?}: its type {kind:?} is not one of {}", KEY_TYPES.join(", ")));
    }
    if blob.len() < 16 || !blob.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)) {
        return Err(format!("SSH key {shown:?}: the key itself (after the type) is not base64"));
    }
    Ok(())
}

/// Checks what a seed will say.
pub fn check(hostname: &str, user: &str, keys: &[String]) -> Result<(), String> {
    if !valid_hostname(hostname) {
        return Err(format!(
            "hostname {hostname:?} is invalid: use 1-63 lowercase letters, digits or '-', not at either end"
        ));
    }
    if !valid_user(user) {
        return Err(format!(
            "user {user:?} is invalid: use 1-32 lowercase letters, digits, '_' or '-', starting with a letter or \
             '_' (and not root)"
        ));
    }
    if keys.is_empty() || keys.len() > 16 {
        return Err("give 1-16 SSH public keys (ssh_authorized_keys): the user logs in with them".into());
    }
    keys.iter().try_for_each(|k| check_key(k.trim()))
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The seed's `user-data`.
pub fn user_data(c: &CloudInitRecord) -> String {
    let mut out = String::from("#cloud-config\n");
    out += &format!("hostname: {}\n", quoted(&c.hostname));
    out += "users:\n";
    out += &format!("  - name: {}\n", quoted(&c.user));
    out += "    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n";
    out += "    shell: /bin/bash\n";
    out += "    lock_passwd: true\n";
    out += "    ssh_authorized_keys:\n";
    for k in &c.ssh_authorized_keys {
        out += &format!("      - {}\n", quoted(k.trim()));
    }
    out
}

/// The seed's `meta-data`.
pub fn meta_data(c: &CloudInitRecord) -> String {
    format!("instance-id: {}\nlocal-hostname: {}\n", quoted(&c.instance_id), quoted(&c.hostname))
}

/// Writes the seed of `c` to `path` (atomically).
pub fn write_seed(path: &Path, c: &CloudInitRecord) -> std::io::Result<()> {
    check(&c.hostname, &c.user, &c.ssh_authorized_keys).map_err(std::io::Error::other)?;
    let files = [("meta-data", meta_data(c)), ("user-data", user_data(c))];
    crate::store::write_atomic(path, &iso9660("cidata", &files)?)
}

/// An ISO 9660 volume labelled `label` with `files` (name, contents) in its root, named by Rock Ridge.
fn iso9660(label: &str, files: &[(&str, String)]) -> std::io::Result<Vec<u8>> {
    use hadris_iso::read::PathSeparator;
    use hadris_iso::rrip::RripOptions;
    use hadris_iso::write::options::{BaseIsoLevel, CreationFeatures, IsoFormatOptions};
    use hadris_iso::write::{File, InputFiles, IsoImageWriter};
    let files = InputFiles {
        path_separator: PathSeparator::ForwardSlash,
        files: files
            .iter()
            .map(|(name, text)| File::File { name: (*name).to_owned().into(), contents: text.clone().into_bytes() })
            .collect(),
    };
    let options = IsoFormatOptions {
        volume_name: label.to_owned(),
        system_id: None,
        volume_set_id: None,
        publisher_id: None,
        preparer_id: None,
        application_id: Some("PORTHOLE".to_owned()),
        sector_size: 2048,
        features: CreationFeatures {
            filenames: BaseIsoLevel::Level1 { supports_lowercase: false, supports_rrip: true },
            rock_ridge: Some(RripOptions::default()),
            ..CreationFeatures::default()
        },
        path_separator: PathSeparator::ForwardSlash,
        strict_charset: false,
    };
    let mut image = std::io::Cursor::new(Vec::new());
    IsoImageWriter::create(&mut image, files, options)
        .map_err(|e| std::io::Error::other(format!("cannot make the cloud-init seed volume: {e}")))?;
    Ok(image.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2k8Lm8b3yqQyF7o8ZzXb1mY0m6mQ2F8pTqB3zD6wBv alice@laptop";

    fn seed() -> CloudInitRecord {
        CloudInitRecord {
            hostname: "web1".into(),
            user: "alice".into(),
            ssh_authorized_keys: vec![KEY.into()],
            instance_id: "iid-porthole-0011223344556677".into(),
        }
    }

    #[test]
    fn input_that_could_inject_yaml_is_refused() {
        assert!(check("web1", "alice", &[KEY.into()]).is_ok());
        for (h, u, k) in [
            ("Web1", "alice", KEY),
            ("web1\nusers: []", "alice", KEY),
            ("-web", "alice", KEY),
            ("web1", "root", KEY),
            ("web1", "al ice", KEY),
            ("web1", "alice\"", KEY),
            ("web1", "alice", "ssh-ed25519 AAAA\" \n- evil"),
            ("web1", "alice", "ssh-dss AAAAB3NzaC1kc3MAAACBAP"),
            ("web1", "alice", "ssh-ed25519 not!base64!at!all"),
        ] {
            assert!(check(h, u, &[k.into()]).is_err(), "{h:?} {u:?} {k:?}");
        }
        assert!(check("web1", "alice", &[]).is_err(), "a user without a key could not log in");
    }

    #[test]
    fn the_yaml_says_exactly_what_was_asked() {
        let c = seed();
        let user = user_data(&c);
        assert!(user.starts_with("#cloud-config\n"));
        assert!(user.contains("hostname: \"web1\"\n"));
        assert!(user.contains("  - name: \"alice\"\n"));
        assert!(user.contains(&format!("      - \"{KEY}\"\n")));
        assert_eq!(meta_data(&c), "instance-id: \"iid-porthole-0011223344556677\"\nlocal-hostname: \"web1\"\n");
    }

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("portholed-seed-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_seed_is_an_iso_labelled_cidata_with_exactly_the_two_files() {
        let dir = scratch("iso");
        let iso = dir.join("seed.iso");
        write_seed(&iso, &seed()).unwrap();
        // blkid (util-linux) sees what cloud-init looks for: an iso9660 file system labelled cidata.
        let out = Command::new("blkid").args(["-p", "-o", "export"]).arg(&iso).output().expect("blkid runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("TYPE=iso9660") && text.contains("LABEL=cidata"), "{text}");
        // xorriso (another ISO 9660 + Rock Ridge reader) extracts exactly the two files, by their names.
        let out_dir = dir.join("x");
        let out = Command::new("osirrox")
            .args(["-indev"])
            .arg(&iso)
            .args(["-extract", "/"])
            .arg(&out_dir)
            .output()
            .expect("osirrox (xorriso) runs: apt-get install xorriso");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut names: Vec<String> =
            std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["meta-data", "user-data"]);
        assert_eq!(std::fs::read_to_string(out_dir.join("user-data")).unwrap(), user_data(&seed()));
        assert_eq!(std::fs::read_to_string(out_dir.join("meta-data")).unwrap(), meta_data(&seed()));
        // The Linux kernel's reader, when a loop device can be had.
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let mounted = Command::new("mount").args(["-o", "loop,ro", "-t", "iso9660"]).arg(&iso).arg(&mnt).output();
        match mounted {
            Ok(o) if o.status.success() => {
                let mut names: Vec<String> =
                    std::fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
                names.sort();
                let user = std::fs::read_to_string(mnt.join("user-data"));
                let _ = Command::new("umount").arg(&mnt).status();
                assert_eq!(names, ["meta-data", "user-data"]);
                assert_eq!(user.unwrap(), user_data(&seed()));
            }
            Ok(o) => eprintln!("skipped the kernel mount: {}", String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => eprintln!("skipped the kernel mount: {e}"),
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
