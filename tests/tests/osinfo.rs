//! OS detection through the real daemon: ISOs built with xorriso carrying real distributions' volume ids,
//! uploaded to the library (`GET /images` says what they hold) or only described (`POST /osinfo/identify`,
//! what the wizard asks for an ISO not uploaded yet), against the host's osinfo-db (Debian's `osinfo-db`
//! package; `./x test` installs it). Not Debian 12: bookworm's osinfo-db (20221203) predates it and knows
//! Debian up to 11, so a Debian 12 netinst is an "Unknown OS" there.

use porthole_api::{IsoFacts, iso};
use porthole_tests::daemon::Daemon;
use porthole_tests::{IsoBoot, Scratch, xorriso_iso};

fn db_version() -> String {
    let dir = std::env::var("OSINFO_SYSTEM_DIR").unwrap_or_else(|_| "/usr/share/osinfo".into());
    std::fs::read_to_string(format!("{dir}/VERSION"))
        .expect("osinfo-db is not installed (apt-get install osinfo-db)")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_isos_and_local_ones_are_identified() {
    let dir = Scratch::new("osinfo");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let version = db_version();
    assert_eq!(c.host().await.unwrap().osinfo_db.as_deref(), Some(version.as_str()));

    let debian = xorriso_iso(&dir, "debian-11.iso", "Debian 11.5.0 amd64 n", IsoBoot::Bios);
    let ubuntu = xorriso_iso(&dir, "ubuntu.iso", "Ubuntu 22.04.1 LTS amd64", IsoBoot::UefiOnly);
    let unknown = xorriso_iso(&dir, "installer.iso", "PORTHOLE_DEBIAN_INSTALLER", IsoBoot::None);
    let up = c.upload_image("debian-11.iso", &debian, |_, _| {}).await.unwrap();
    let os = up.os.as_ref().expect("the upload's reply says what it holds");
    assert_eq!((os.short_id.as_str(), os.name.as_str()), ("debian11", "Debian 11"));
    c.upload_image("ubuntu.iso", &ubuntu, |_, _| {}).await.unwrap();
    c.upload_image("installer.iso", &unknown, |_, _| {}).await.unwrap();

    let images = c.images().await.unwrap();
    let find = |name: &str| images.iter().find(|i| i.name == name).unwrap();
    let deb = find("debian-11.iso");
    let facts = deb.iso.as_ref().expect("ISO facts");
    assert_eq!(facts.volume_id.as_deref(), Some("Debian 11.5.0 amd64 n"));
    assert_eq!(facts.volume_bytes, std::fs::metadata(&debian).unwrap().len(), "xorriso's volume is the file");
    assert!(facts.bios_bootable && !facts.uefi_bootable);
    let os = deb.os.as_ref().unwrap();
    assert_eq!((os.version.as_deref(), os.vendor.as_deref()), (Some("11"), Some("Debian Project")));
    assert_eq!((os.recommended.memory_mib, os.recommended.disk_bytes), (Some(1024), Some(20 << 30)));

    let ubu = find("ubuntu.iso");
    assert!(ubu.iso.as_ref().unwrap().uefi_only());
    let os = ubu.os.as_ref().unwrap();
    assert_eq!(os.short_id, "ubuntu22.04");
    assert_eq!((os.minimum.memory_mib, os.recommended.memory_mib), (Some(2048), Some(4096)));
    assert_eq!(os.recommended.disk_bytes, Some(25 << 30));

    let inst = find("installer.iso");
    assert_eq!(inst.os, None, "Unknown OS");
    assert_eq!(inst.iso.as_ref().unwrap().volume_id.as_deref(), Some("PORTHOLE_DEBIAN_INSTALLER"));
    assert!(find("debian-11.iso").iso.is_some());

    // Cached next to the image, keyed by its size, mtime and the db's version; the entry goes with it.
    let sidecar = d.data.join("images/.debian-11.iso.osinfo.json");
    let cached = std::fs::read_to_string(&sidecar).unwrap();
    assert!(cached.contains(&version) && cached.contains("debian11"), "{cached}");
    assert_eq!(c.images().await.unwrap(), images, "the same answer from the cache");
    c.delete_image("debian-11.iso").await.unwrap();
    assert!(!sidecar.exists());

    // An ISO the window has not uploaded: it reads the facts itself and asks.
    let local = xorriso_iso(&dir, "fedora.iso", "Fedora-WS-Live-37-1-7", IsoBoot::None);
    let facts = iso::read_file(&local).unwrap();
    let id = c.identify_os(&facts).await.unwrap();
    assert_eq!(id.os.map(|o| o.short_id).as_deref(), Some("fedora37"));
    assert_eq!((id.db_version.as_deref(), id.note), (Some(version.as_str()), None));
    let none = c.identify_os(&IsoFacts { volume_id: Some("MT86PLUS_64".into()), ..IsoFacts::default() }).await.unwrap();
    assert_eq!(none.os, None);
    let e = c.identify_os(&IsoFacts { volume_id: Some("x".repeat(129)), ..IsoFacts::default() }).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    // The OpenAPI document lists it.
    let doc = c.openapi().await.unwrap();
    assert!(doc["paths"]["/osinfo/identify"]["post"].is_object());
    assert!(doc["components"]["schemas"]["IsoFacts"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_osinfo_db_detection_says_so_and_the_rest_works() {
    let dir = Scratch::new("osinfo-none");
    let empty = dir.path("no-db");
    std::fs::create_dir_all(&empty).unwrap();
    let d = Daemon::start_with_env(&dir, false, &[], &[("OSINFO_SYSTEM_DIR", empty.to_str().unwrap())]);
    let c = d.local();
    assert_eq!(c.host().await.unwrap().osinfo_db, None);
    let debian = xorriso_iso(&dir, "debian-11.iso", "Debian 11.5.0 amd64 n", IsoBoot::None);
    let up = c.upload_image("debian-11.iso", &debian, |_, _| {}).await.unwrap();
    assert_eq!(up.os, None);
    assert_eq!(up.iso.and_then(|f| f.volume_id).as_deref(), Some("Debian 11.5.0 amd64 n"), "the facts still");
    let id = c.identify_os(&iso::read_file(&debian).unwrap()).await.unwrap();
    assert_eq!((id.os, id.db_version), (None, None));
    assert!(id.note.unwrap().contains("no osinfo-db on this host"));
}
