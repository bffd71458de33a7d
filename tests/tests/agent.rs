//! The SPICE agent channel (`porthole-vmm --agent spice`: a virtio-console port named com.redhat.spice.0
//! whose host end speaks vd_agent.h and shares the clipboard with the VNC console), driven by the
//! `virtio-console` micro-guest (tests/guests/asm/virtio-console.S) playing spice-vdagent, side by side with
//! QEMU's own `-chardev qemu-vdagent,clipboard=on` behind a virtserialport of the same name: the same driver
//! gets the same port handshake, and the clipboard crosses both ways between the guest and an RFB client
//! speaking the extended clipboard, as Porthole's console does (notify, request, provide). A client's
//! SetDesktopSize reaches porthole-vmm's guest agent as a monitors configuration.
//!
//! Differences seen with QEMU 7.2 (the reference), asserted below:
//! - its virtio-serial-pci is a transitional device (1AF4:1003) unless `disable-legacy=on` (then 1AF4:1043,
//!   porthole-vmm's ID, which the guest looks for);
//! - the host's capabilities: porthole-vmm announces MONITORS_CONFIG, REPLY and CLIPBOARD_BY_DEMAND (0x26);
//!   QEMU MOUSE_STATE, CLIPBOARD_BY_DEMAND, CLIPBOARD_SELECTION and CLIPBOARD_GRAB_SERIAL (0x20061);
//! - text a client provides reaches the guest with the extended clipboard message's NUL on QEMU (one byte
//!   more), without it on porthole-vmm;
//! - when the guest copies, porthole-vmm's host end asks for the text at once (the console keeps it for any
//!   client); QEMU asks only when a VNC client asks for it, so a client must be connected before the guest
//!   grabs the clipboard (the guest pastes first for that reason);
//! - a client without the extended clipboard: its plain cut text reaches the guest on both; the guest's text
//!   reaches it as plain ServerCutText from porthole-vmm only (QEMU 7.2 shares the clipboard with extended
//!   clients only; checked by hand: the guest's GRAB is never asked for, `AGENT timeout copy-request`);
//! - porthole-vmm sends clipboard messages to a client only once it asked for an update; QEMU at once;
//! - a client's SetDesktopSize with a std VGA: porthole-vmm takes the size to a connected agent that
//!   announced MONITORS_CONFIG (a monitors-config message: one monitor, depth 32) and answers 0, without an
//!   agent it answers 1 (refused); QEMU 7.2 answers 3 (invalid screen layout) and its qemu-vdagent sends the
//!   guest no MONITORS_CONFIG, with `clipboard=on` as with `mouse=off,clipboard=on` (checked by hand: the
//!   guest's `monitor` ends in `AGENT timeout monitor`; `mouse=off` only drops MOUSE_STATE from its
//!   capabilities, 0x20060), so only porthole-vmm is tested for it.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use porthole_tests::rfb::{self, RfbClient};
use porthole_tests::{Killed, Scratch, text, wait_until, workspace_bin};

/// Generous: the guest's instructions are emulated here; a run takes seconds.
const LIMIT: Duration = Duration::from_secs(60);
/// What the RFB client puts on its clipboard (twice), and what the guest copies (the command line has no
/// spaces).
const PASTE: &str = "hello-from-the-client";
const PASTE_AGAIN: &str = "and-once-more";
const COPY: &str = "hello-from-the-guest";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Porthole,
    Qemu,
}

/// The guest running on one engine, its serial in a file, its console on a VNC Unix socket and (porthole-vmm)
/// its control socket.
struct Guest {
    engine: Engine,
    child: Killed,
    serial: PathBuf,
    vnc: PathBuf,
    control: PathBuf,
    dir: Scratch,
}

impl Guest {
    fn start(engine: Engine, cmdline: &str) -> Guest {
        let dir = Scratch::new(&format!("agent-{engine:?}").to_lowercase());
        let (serial, vnc, control) = (dir.path("serial.log"), dir.path("vnc.sock"), dir.path("control.sock"));
        let guest = porthole_guests::path("virtio-console");
        let mut cmd = match engine {
            Engine::Porthole => {
                let mut c = Command::new(workspace_bin("porthole-vmm"));
                c.arg("--kernel")
                    .arg(&guest)
                    .args(["--memory", "64", "--vga", "std", "--agent", "spice", "--cmdline", cmdline])
                    .arg("--serial")
                    .arg(format!("file:{}", serial.display()))
                    .arg("--vnc")
                    .arg(format!("unix:{}", vnc.display()))
                    .arg("--control")
                    .arg(format!("unix:{}", control.display()));
                c
            }
            Engine::Qemu => {
                let mut c = Command::new("qemu-system-x86_64");
                c.args(["-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64"])
                    .args(["-nodefaults", "-no-reboot", "-display", "none", "-vga", "std"])
                    .args(["-chardev", "qemu-vdagent,id=vda,clipboard=on"])
                    .args(["-device", "virtio-serial-pci,max_ports=2,disable-legacy=on"])
                    .args(["-device", "virtserialport,chardev=vda,name=com.redhat.spice.0"])
                    .arg("-vnc")
                    .arg(format!("unix:{}", vnc.display()))
                    .arg("-serial")
                    .arg(format!("file:{}", serial.display()))
                    .arg("-kernel")
                    .arg(&guest)
                    .args(["-append", cmdline]);
                c
            }
        };
        let stderr = std::fs::File::create(dir.path("stderr.log")).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {engine:?}: {e}"));
        Guest { engine, child: Killed(child), serial, vnc, control, dir }
    }

    fn output(&self) -> String {
        text(&std::fs::read(&self.serial).unwrap_or_default())
    }

    /// How often the guest printed `what`.
    fn count(&self, what: &str) -> usize {
        self.output().matches(what).count()
    }

    /// Waits for the guest to power off (the engine exits with status 0); its serial output.
    fn finish(mut self) -> String {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{:?} exited with {status}: {}\n{}",
                    self.engine,
                    self.stderr(),
                    self.output()
                );
                return self.output();
            }
            assert!(start.elapsed() < LIMIT, "{:?} still running; serial:\n{}", self.engine, self.output());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> String {
        text(&std::fs::read(self.dir.path("stderr.log")).unwrap_or_default())
    }

    /// A client of the console announcing `encodings`, once it has a whole frame (porthole-vmm sends
    /// clipboard messages only to a client that asked for an update).
    fn client(&self, encodings: &[i32]) -> RfbClient {
        wait_until(LIMIT, || self.vnc.exists(), || format!("{:?}: no VNC socket", self.engine));
        let mut c = RfbClient::connect(&self.vnc, None).unwrap_or_else(|e| panic!("{:?}: connect: {e:?}", self.engine));
        c.set_encodings(encodings).unwrap();
        c.full_frame().unwrap_or_else(|e| panic!("{:?}: first frame: {e}", self.engine));
        c
    }

    /// porthole-vmm's control socket: whether the guest's agent is connected (None: no agent port).
    fn agent_connected(&self) -> Option<bool> {
        use vmm_core::control::{ControlClient, Request};
        let answer = ControlClient::connect(&self.control).unwrap().request(&Request::Status).unwrap();
        answer.status.expect("a status").agent_connected
    }
}

/// Reads what the server sends and answers its extended-clipboard messages (offering `ours` when asked)
/// until `done` holds.
fn pump(c: &mut RfbClient, guest: &Guest, ours: &str, what: &str, mut done: impl FnMut(&RfbClient) -> bool) {
    let engine = guest.engine;
    c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let deadline = Instant::now() + LIMIT;
    while !done(c) {
        match c.read_update() {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) if done(c) => return,
            Err(e) => panic!("{engine:?}: waiting for {what}: {e}; serial:\n{}", guest.output()),
        }
        c.answer_clipboard(Some(ours)).unwrap_or_else(|e| panic!("{engine:?}: answer the clipboard: {e}"));
        assert!(Instant::now() < deadline, "{engine:?}: gave up waiting for {what}; serial:\n{}", guest.output());
    }
}

/// What a run of `paste copy=COPY paste` on either engine shows.
struct Run {
    serial: String,
    /// The text the RFB client got from the guest.
    copied: Option<String>,
    /// porthole-vmm's control socket while the guest waited to paste.
    agent_connected: Option<bool>,
}

/// The guest pastes the client's text, copies its own (which the client fetches), and pastes again.
fn clipboard_both_ways(engine: Engine) -> Run {
    let guest = Guest::start(engine, &format!("paste copy={COPY} paste"));
    let mut c = guest.client(&[rfb::RAW, rfb::EXTENDED_CLIPBOARD]);
    pump(&mut c, &guest, PASTE, "the guest's agent", |_| guest.count("AGENT paste waiting") == 1);
    let agent_connected = (engine == Engine::Porthole).then(|| guest.agent_connected()).flatten();

    // The client copies: it offers text, the server fetches it when the guest's agent asks to paste.
    c.stream.write_all(&rfb::clipboard_notify_message()).unwrap();
    pump(&mut c, &guest, PASTE, "the guest's paste", |_| guest.count("AGENT paste text=") == 1);
    // The guest copies: the client is told, asks, and gets the text.
    pump(&mut c, &guest, PASTE, "the guest's text", |c| c.cut_text.as_deref() == Some(COPY));
    let copied = c.cut_text.clone();
    // The client copies again: the guest, waiting in its second paste, gets the new text.
    pump(&mut c, &guest, PASTE, "the second paste to wait", |_| guest.count("AGENT paste waiting") == 2);
    c.stream.write_all(&rfb::clipboard_notify_message()).unwrap();
    pump(&mut c, &guest, PASTE_AGAIN, "the second paste", |_| guest.count("AGENT paste text=") == 2);
    let serial = guest.finish();
    drop(c);
    Run { serial, copied, agent_connected }
}

fn assert_in_order(engine: Engine, out: &str, lines: &[String]) {
    let mut rest = out;
    for line in lines {
        match rest.find(line.as_str()) {
            Some(at) => rest = &rest[at + line.len()..],
            None => panic!("{engine:?}: {line:?} missing (in this order); serial:\n{out}"),
        }
    }
    assert!(!out.contains("bad-word") && !out.contains("timeout") && !out.contains("error="), "{engine:?}:\n{out}");
}

/// The guest's lines on either engine. `caps`: the host's capabilities; `nul`: whether the client's text
/// arrives with its NUL.
fn expected_lines(caps: &str, nul: bool) -> Vec<String> {
    let bytes = |text: &str| text.len() + usize::from(nul);
    vec![
        "AGENT found max-ports=2\n".into(),
        "AGENT port id=1 name=com.redhat.spice.0 host-open=1\n".into(),
        format!("AGENT connected by-demand=1 host-caps=0x{caps}\n"),
        "AGENT paste waiting\n".into(),
        format!("AGENT paste-data type=1 bytes={}\n", bytes(PASTE)),
        format!("AGENT paste text={PASTE}\n"),
        format!("AGENT copy request=1 sent={}\n", COPY.len()),
        "AGENT paste waiting\n".into(),
        format!("AGENT paste-data type=1 bytes={}\n", bytes(PASTE_AGAIN)),
        format!("AGENT paste text={PASTE_AGAIN}\n"),
        "AGENT done\n".into(),
    ]
}

/// The same agent, the same handshake and the same clipboard traffic with porthole-vmm's agent port and
/// QEMU's qemu-vdagent: the client's text reaches the guest, the guest's reaches the client.
#[test]
fn the_clipboard_crosses_both_ways_through_porthole_vmm_and_qemu() {
    let vmm = clipboard_both_ways(Engine::Porthole);
    eprintln!("porthole-vmm:\n{}", vmm.serial);
    assert_in_order(Engine::Porthole, &vmm.serial, &expected_lines("00000026", false));
    assert_eq!(vmm.copied.as_deref(), Some(COPY), "porthole-vmm: the client got the guest's text");
    assert_eq!(vmm.agent_connected, Some(true), "porthole-vmm's status once the agent announced itself");

    let qemu = clipboard_both_ways(Engine::Qemu);
    eprintln!("QEMU:\n{}", qemu.serial);
    assert_in_order(Engine::Qemu, &qemu.serial, &expected_lines("00020061", true));
    assert_eq!(qemu.copied.as_deref(), Some(COPY), "QEMU: the client got the guest's text");

    // Line for line the same, but for the host's capabilities and the NUL.
    let comparable = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| {
                l.starts_with("AGENT ") && !l.starts_with("AGENT connected") && !l.starts_with("AGENT paste-data")
            })
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        comparable(&vmm.serial),
        comparable(&qemu.serial),
        "porthole-vmm:\n{}\nQEMU:\n{}",
        vmm.serial,
        qemu.serial
    );
}

/// A client without the extended clipboard: its plain (Latin-1) cut text reaches the guest on both engines;
/// the guest's text reaches it as plain ServerCutText on porthole-vmm only. QEMU 7.2 shares its clipboard
/// only with clients of the extended clipboard, so there the guest's GRAB is never asked for (not tried:
/// the guest would wait 20 s).
#[test]
fn plain_cut_text_reaches_the_guest_on_both_engines_and_the_client_on_porthole_vmm() {
    for engine in [Engine::Porthole, Engine::Qemu] {
        let cmdline = match engine {
            Engine::Porthole => format!("paste copy={COPY} paste"),
            Engine::Qemu => "paste".to_owned(),
        };
        let guest = Guest::start(engine, &cmdline);
        let mut c = guest.client(&[rfb::RAW]);
        pump(&mut c, &guest, PASTE, "the guest's agent", |_| guest.count("AGENT paste waiting") == 1);
        c.cut_text(PASTE).unwrap();
        pump(&mut c, &guest, PASTE, "the guest's paste", |_| guest.count("AGENT paste text=") == 1);
        if engine == Engine::Porthole {
            pump(&mut c, &guest, PASTE, "the guest's text", |c| c.cut_text.as_deref() == Some(COPY));
            // The guest pastes again, so that it is still there while its text goes out.
            pump(&mut c, &guest, PASTE, "the second paste to wait", |_| guest.count("AGENT paste waiting") == 2);
            c.cut_text(PASTE_AGAIN).unwrap();
            pump(&mut c, &guest, PASTE, "the second paste", |_| guest.count("AGENT paste text=") == 2);
        }
        let out = guest.finish();
        drop(c);
        eprintln!("{engine:?}:\n{out}");
        // Plain cut text has no NUL on either engine.
        let mut lines = vec![
            "AGENT paste waiting\n".to_owned(),
            format!("AGENT paste-data type=1 bytes={}\n", PASTE.len()),
            format!("AGENT paste text={PASTE}\n"),
        ];
        if engine == Engine::Porthole {
            lines.push(format!("AGENT copy request=1 sent={}\n", COPY.len()));
            lines.push(format!("AGENT paste text={PASTE_AGAIN}\n"));
        }
        lines.push("AGENT done\n".into());
        assert_in_order(engine, &out, &lines);
    }
}

/// Without `--agent spice` porthole-vmm has no console device: the guest finds none.
#[test]
fn without_the_agent_option_there_is_no_agent_port() {
    let dir = Scratch::new("agent-none");
    let serial = dir.path("serial.log");
    let out = porthole_tests::run(
        Command::new(workspace_bin("porthole-vmm"))
            .arg("--kernel")
            .arg(porthole_guests::path("virtio-console"))
            .args(["--memory", "64", "--cmdline", "paste"])
            .arg("--serial")
            .arg(format!("file:{}", serial.display())),
        LIMIT,
    );
    let serial = text(&std::fs::read(&serial).unwrap_or_default());
    assert!(out.status.success(), "{out:?}\n{serial}");
    assert_eq!(serial, "AGENT none\nAGENT done\n");
}

/// The sizes the RFB client asks for with SetDesktopSize, one after the other.
const MONITOR: (u16, u16) = (1024, 768);
const MONITOR_AGAIN: (u16, u16) = (800, 600);

/// Asks the server for `size` (SetDesktopSize) and returns its answer's status, reading whole frames until
/// it comes (the server answers with an update).
fn ask_for_size(c: &mut RfbClient, engine: Engine, size: (u16, u16), serial: impl Fn() -> String) -> u32 {
    assert!(c.acknowledged.contains(&rfb::EXTENDED_DESKTOP_SIZE), "{engine:?}: {:?}", c.acknowledged);
    c.resize_status = None;
    c.set_desktop_size(size.0, size.1).unwrap();
    let deadline = Instant::now() + LIMIT;
    loop {
        c.full_frame().unwrap_or_else(|e| {
            panic!("{engine:?}: waiting for the answer to SetDesktopSize: {e}; serial:\n{}", serial())
        });
        if let Some(status) = c.resize_status {
            return status;
        }
        assert!(Instant::now() < deadline, "{engine:?}: no answer to SetDesktopSize; serial:\n{}", serial());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A std VGA cannot follow SetDesktopSize, but with `--agent spice` the size goes to the guest's agent as
/// MONITORS_CONFIG (one monitor, depth 32) and porthole-vmm accepts it (status 0). The guest waits twice,
/// so that it is still there while the server answers the first request.
#[test]
fn set_desktop_size_reaches_the_agent_as_a_monitors_config() {
    let guest = Guest::start(Engine::Porthole, "monitor monitor");
    let mut c = guest.client(&[rfb::RAW, rfb::DESKTOP_SIZE, rfb::EXTENDED_DESKTOP_SIZE]);
    let serial = || guest.output();
    wait_until(LIMIT, || guest.count("AGENT monitor waiting") == 1, || format!("the agent; serial:\n{}", serial()));
    let status = ask_for_size(&mut c, Engine::Porthole, MONITOR, serial);
    assert_eq!(status, 0, "porthole-vmm takes the size to the agent; serial:\n{}", serial());
    wait_until(
        LIMIT,
        || guest.count("AGENT monitor waiting") == 2,
        || format!("the second wait; serial:\n{}", serial()),
    );
    c.set_desktop_size(MONITOR_AGAIN.0, MONITOR_AGAIN.1).unwrap();
    let out = guest.finish();
    drop(c);
    eprintln!("porthole-vmm:\n{out}");
    let line = |(w, h): (u16, u16)| format!("AGENT monitor count=1 width={w} height={h} depth=32\n");
    let lines = [
        "AGENT connected by-demand=1 host-caps=0x00000026\n".to_owned(),
        "AGENT monitor waiting\n".into(),
        line(MONITOR),
        "AGENT monitor waiting\n".into(),
        line(MONITOR_AGAIN),
        "AGENT done\n".into(),
    ];
    assert_in_order(Engine::Porthole, &out, &lines);
}

/// Without an agent a std VGA cannot follow SetDesktopSize: porthole-vmm refuses it (status 1). The
/// virtio-console guest finds no port there (`AGENT none`) and powers off at once (in about 0.2 s, before a
/// client could ask), so the VM that answers runs the `idle` micro-guest, which stays until it is stopped.
#[test]
fn without_an_agent_a_std_vga_refuses_set_desktop_size() {
    let dir = Scratch::new("agent-no-monitor");
    let (serial, vnc) = (dir.path("serial.log"), dir.path("vnc.sock"));
    let child = Command::new(workspace_bin("porthole-vmm"))
        .arg("--kernel")
        .arg(porthole_guests::path("idle"))
        .args(["--memory", "64", "--vga", "std"])
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .arg("--vnc")
        .arg(format!("unix:{}", vnc.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _vm = Killed(child);
    wait_until(LIMIT, || vnc.exists(), || "no VNC socket".into());
    let mut c = RfbClient::connect(&vnc, None).unwrap();
    c.set_encodings(&[rfb::RAW, rfb::DESKTOP_SIZE, rfb::EXTENDED_DESKTOP_SIZE]).unwrap();
    c.full_frame().unwrap();
    let output = || text(&std::fs::read(&serial).unwrap_or_default());
    assert_eq!(ask_for_size(&mut c, Engine::Porthole, MONITOR, output), 1, "porthole-vmm refuses the size");
}
