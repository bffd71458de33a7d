//! NoCloud seeds for VMs made from cloud images: a small ISO 9660 volume labelled `cidata` holding
//! `user-data` (a `#cloud-config` with the user, their SSH keys and the hostname) and `meta-data` (the
//! instance id and hostname), which cloud-init finds by its label.
//!
//! Why ISO 9660 with Rock Ridge, written here: the image is a few sectors of fixed structures (no crate, no
//! outside tool at run time); its ISO names stay within the standard (`USER_DATA.;1`) while the Rock Ridge
//! `NM` entries give Linux (and every Rock Ridge reader: xorriso, 7z, libarchive) the exact names cloud-init
//! reads. FAT would need long-file-name entries for the same names.
//!
//! Everything that goes into the YAML is checked strictly first (a host name label, a POSIX user name, OpenSSH
//! public keys) and then written as a JSON string (a valid YAML double-quoted scalar), so no input can add
//! YAML of its own.

use std::path::Path;

use crate::store::CloudInitRecord;

const SECTOR: usize = 2048;

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
    let files = [("meta-data", "META_DATA.;1", meta_data(c)), ("user-data", "USER_DATA.;1", user_data(c))];
    crate::store::write_atomic(path, &iso9660("cidata", &files))
}

fn both16(v: u16) -> [u8; 4] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], b[0], b[1]]
}

fn both32(v: u32) -> [u8; 8] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

/// A Rock Ridge `PX` entry (POSIX mode, links, owner root, serial number).
fn px(mode: u32, links: u32, serial: u32) -> Vec<u8> {
    let mut e = vec![b'P', b'X', 44, 1];
    for v in [mode, links, 0, 0, serial] {
        e.extend(both32(v));
    }
    e
}

/// A directory record (dates left unspecified: zeros).
fn record(name: &[u8], extent: u32, size: u32, dir: bool, system_use: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8; 33];
    r[2..10].copy_from_slice(&both32(extent));
    r[10..18].copy_from_slice(&both32(size));
    r[25] = if dir { 2 } else { 0 };
    r[28..32].copy_from_slice(&both16(1));
    r[32] = name.len() as u8;
    r.extend_from_slice(name);
    if name.len().is_multiple_of(2) {
        r.push(0);
    }
    r.extend_from_slice(system_use);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r[0] = r.len() as u8;
    r
}

fn padded(text: &str, len: usize) -> Vec<u8> {
    let mut v = text.as_bytes().to_vec();
    v.resize(len, b' ');
    v
}

/// An ISO 9660 image labelled `label` with `files` (exact name, ISO name, contents; sorted by ISO name) in
/// its root directory, with Rock Ridge names and modes.
fn iso9660(label: &str, files: &[(&str, &str, String)]) -> Vec<u8> {
    const PVD: usize = 16;
    const L_TABLE: usize = 18;
    const M_TABLE: usize = 19;
    const ROOT: usize = 20;
    let mut extents = Vec::new();
    let mut next = ROOT + 1;
    for (_, _, data) in files {
        extents.push(next);
        next += data.len().div_ceil(SECTOR).max(1);
    }
    let total = next;
    let mut img = vec![0u8; total * SECTOR];

    // The root directory: ".", "..", then the files.
    let mut root = Vec::new();
    let mut dot_su = vec![b'S', b'P', 7, 1, 0xBE, 0xEF, 0];
    dot_su.extend(px(0o40555, 2, 1));
    let (id, des, src) = (b"RRIP_1991A", b"ROCK RIDGE", b"PORTHOLE");
    dot_su.extend([b'E', b'R', (8 + id.len() + des.len() + src.len()) as u8, 1, id.len() as u8]);
    dot_su.extend([des.len() as u8, src.len() as u8, 1]);
    dot_su.extend(id.iter().chain(des).chain(src));
    root.extend(record(&[0], ROOT as u32, SECTOR as u32, true, &dot_su));
    root.extend(record(&[1], ROOT as u32, SECTOR as u32, true, &px(0o40555, 2, 1)));
    for (i, (name, iso_name, data)) in files.iter().enumerate() {
        let mut su = vec![b'R', b'R', 5, 1, 0x09];
        su.extend(px(0o100444, 1, 2 + i as u32));
        su.extend([b'N', b'M', 5 + name.len() as u8, 1, 0]);
        su.extend(name.as_bytes());
        root.extend(record(iso_name.as_bytes(), extents[i] as u32, data.len() as u32, false, &su));
    }
    img[ROOT * SECTOR..ROOT * SECTOR + root.len()].copy_from_slice(&root);
    for (i, (_, _, data)) in files.iter().enumerate() {
        img[extents[i] * SECTOR..extents[i] * SECTOR + data.len()].copy_from_slice(data.as_bytes());
    }

    // The path tables: the root alone.
    let mut l = vec![1u8, 0];
    l.extend((ROOT as u32).to_le_bytes());
    l.extend(1u16.to_le_bytes());
    l.extend([0, 0]);
    let mut m = vec![1u8, 0];
    m.extend((ROOT as u32).to_be_bytes());
    m.extend(1u16.to_be_bytes());
    m.extend([0, 0]);
    img[L_TABLE * SECTOR..L_TABLE * SECTOR + l.len()].copy_from_slice(&l);
    img[M_TABLE * SECTOR..M_TABLE * SECTOR + m.len()].copy_from_slice(&m);

    // The primary volume descriptor and the terminator.
    let p = &mut img[PVD * SECTOR..(PVD + 1) * SECTOR];
    p[0] = 1;
    p[1..6].copy_from_slice(b"CD001");
    p[6] = 1;
    p[8..40].copy_from_slice(&padded("LINUX", 32));
    p[40..72].copy_from_slice(&padded(label, 32));
    p[80..88].copy_from_slice(&both32(total as u32));
    p[120..124].copy_from_slice(&both16(1));
    p[124..128].copy_from_slice(&both16(1));
    p[128..132].copy_from_slice(&both16(SECTOR as u16));
    p[132..140].copy_from_slice(&both32(10));
    p[140..144].copy_from_slice(&(L_TABLE as u32).to_le_bytes());
    p[148..152].copy_from_slice(&(M_TABLE as u32).to_be_bytes());
    p[156..190].copy_from_slice(&record(&[0], ROOT as u32, SECTOR as u32, true, &[]));
    for (at, len) in [(190, 128), (318, 128), (446, 128), (574, 128), (702, 37), (739, 37), (776, 37)] {
        p[at..at + len].copy_from_slice(&padded("", len));
    }
    for at in [813, 830, 847, 864] {
        p[at..at + 16].copy_from_slice(b"0000000000000000");
    }
    p[881] = 1;
    let t = &mut img[(PVD + 1) * SECTOR..(PVD + 2) * SECTOR];
    t[0] = 255;
    t[1..6].copy_from_slice(b"CD001");
    t[6] = 1;
    img
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
