//! The virtio devices other than the disk (virtio_blk has its own target) as a hostile guest driver sees
//! them, through `vmm_core::virtio::host_driver`: virtio-scsi (on a CD image: CDBs, chains, task
//! management and event queues), virtio-input (tablet and keyboard: event and status queues), the balloon
//! (inflate, deflate, statistics and free-page reporting queues, its configuration), virtio-net (on a
//! socket speaking passt's protocol, whose far end the input also writes frames into) and virtio-gpu
//! (control and cursor queues: resources, backing lists, transfers, scanouts and flushes onto a screen,
//! EDID, display events from the configuration) and virtio-console with the SPICE agent's port (the
//! multiport control handshake, port data carrying agent messages both ways) and virtio-sound (control
//! requests, played and recorded buffers on a stream clock, onto a screen's sound output). A device of each
//! kind serves 1000 inputs of that kind, reset at the start of each (memory zeroed), every queue of 16
//! entries; then operations from the input, and after a publish a short wait (3 ms) for what the device
//! completes or a NEEDS_RESET.
//!
//! Input: byte 0 picks the device (mod 8: scsi, tablet, keyboard, balloon, net, gpu, console, sound), then
//! operations, each a kind byte and its bytes:
//! - 0: a descriptor: queue, index, addr (u32), len (u32), flags (u16), next (u16)
//! - 1: 16 bytes of guest memory at 0x1_0000 + 16 × offset (offset: u16)
//! - 2: publish: queue, head (u16), advance (u16)
//! - 3: a configuration write: offset, length (1, 2, 4), 4 value bytes; 4: a configuration read: offset,
//!   length
//! - 5: a frame from the network (net): length (u16, at most 2048), then that many bytes
//! - 6: wait up to 1 ms for completions on a queue; 7: reset and bring the device up again
//!
//! Memory: the rings below 0x1_0000 (the driver's; the console's six queues reach 0x1_3000, into the data),
//! data 0x1_0000-0x4_0000 (descriptors may point anywhere).
#![no_main]

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::LocalKey;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_core::disk::Drive;
use vmm_core::display::Screen;
use vmm_core::net::{MacAddr, Nic, Passt};
use vmm_core::virtio::balloon::{BalloonShared, VirtioBalloon};
use vmm_core::virtio::console::VirtioConsole;
use vmm_core::virtio::gpu::{GpuShared, VirtioGpu};
use vmm_core::virtio::host_driver::{Desc, HostDriver};
use vmm_core::virtio::input::{Profile, VirtioInput};
use vmm_core::virtio::net::VirtioNet;
use vmm_core::virtio::scsi::VirtioScsi;
use vmm_core::virtio::sound::VirtioSound;
use vmm_core::virtio::{VirtioDevice, VirtioInterrupt};

const MEM: usize = 0x4_0000;
const QUEUE: u16 = 16;

#[path = "common.rs"]
mod common;
use common::{clear, le, scratch_image, take};

/// Runs the operations in `data` against `d`; `peer` is the network's end of a net card.
fn exercise<D: VirtioDevice>(d: &mut HostDriver<D>, queues: usize, mut data: &[u8], mut peer: Option<&mut UnixStream>) {
    let mut sink = vec![0u8; 64 * 1024];
    let mut published = false;
    while let Some(&[kind]) = take(&mut data, 1) {
        published |= kind % 8 == 2;
        let ok = match kind % 8 {
            0 => take(&mut data, 14).map(|b| {
                let desc = Desc {
                    addr: le(&b[2..6]),
                    len: le(&b[6..10]) as u32,
                    flags: le(&b[10..12]) as u16,
                    next: le(&b[12..14]) as u16,
                };
                d.write_desc(usize::from(b[0]) % queues, u16::from(b[1]) % QUEUE, desc);
            }),
            1 => take(&mut data, 18).map(|b| {
                let _ = d.mem.write_slice(&b[2..], GuestAddress(0x1_0000 + 16 * (le(&b[..2]) % 0x3000)));
            }),
            2 => take(&mut data, 5)
                .map(|b| d.publish(usize::from(b[0]) % queues, le(&b[1..3]) as u16, le(&b[3..5]) as u16)),
            3 => take(&mut data, 6).map(|b| {
                let len = [1, 2, 4, 4][usize::from(b[1] & 3)];
                d.write_config(u64::from(b[0]), &b[2..2 + len]);
            }),
            4 => take(&mut data, 2).map(|b| {
                let mut v = [0u8; 4];
                d.read_config(u64::from(b[0]), &mut v[..[1, 2, 4, 4][usize::from(b[1] & 3)]]);
            }),
            5 => take(&mut data, 2).and_then(|b| {
                let len = (le(b) as usize).min(2048);
                let frame = take(&mut data, len)?;
                if let Some(p) = peer.as_mut() {
                    let _ = p.write_all(&(len as u32).to_be_bytes());
                    let _ = p.write_all(frame);
                }
                Some(())
            }),
            6 => take(&mut data, 1).map(|b| {
                let _ = d.completions(usize::from(b[0]) % queues, Duration::from_millis(1));
            }),
            _ => {
                d.init();
                Some(())
            }
        };
        if ok.is_none() {
            break;
        }
        // What the card sent to the network is read and dropped, so it never waits on a full socket.
        if let Some(p) = peer.as_mut() {
            while let Ok(n) = p.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        }
    }
    // After a publish, a short wait for what the device completes: until every entry published came back,
    // the device marked itself broken, or 3 ms (buffers a device holds for later, a network card's receive
    // buffers, a sound stream's, stay with it).
    let start = Instant::now();
    while published && d.status() & 0x40 == 0 && start.elapsed() < Duration::from_millis(3) {
        for q in 0..queues {
            let _ = d.completions(q, Duration::ZERO);
        }
        if (0..queues).all(|q| d.outstanding(q) == 0) {
            break;
        }
        // Any queue's completion raises the one interrupt this waits on.
        let _ = d.completions(0, Duration::from_micros(500));
    }
}

/// How many inputs one device serves before it is dropped and made anew (so its teardown is fuzzed too).
const INPUTS_PER_DEVICE: u32 = 1000;

/// A device kept for [`INPUTS_PER_DEVICE`] inputs of its kind: reset at the start of each, as a guest
/// driver resets it, with its memory zeroed. (Made per input, the devices' threads alone grew a sanitized
/// run without end: the runtime keeps memory for every thread started.)
struct Kept<D: VirtioDevice> {
    driver: HostDriver<D>,
    queues: usize,
    served: u32,
    /// The network's end of a network card.
    peer: Option<UnixStream>,
    /// The SPICE agent behind a console.
    agent: Option<Arc<vmm_core::vdagent::Agent>>,
}

impl<D: VirtioDevice> Kept<D> {
    /// The device `make` builds on a new interrupt, brought up with `queues` queues.
    fn new<E>(queues: usize, make: impl FnOnce(Arc<VirtioInterrupt>) -> Result<D, E>) -> Option<Kept<D>> {
        let interrupt = VirtioInterrupt::new().map(Arc::new).ok()?;
        let device = make(interrupt.clone()).ok()?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).ok()?;
        let driver = HostDriver::new(device, interrupt, mem, &[QUEUE; 8][..queues]);
        Some(Kept { driver, queues, served: 0, peer: None, agent: None })
    }
}

type Slot<D> = RefCell<Option<Kept<D>>>;

thread_local! {
    static SCSI: Slot<VirtioScsi> = const { RefCell::new(None) };
    static TABLET: Slot<VirtioInput> = const { RefCell::new(None) };
    static KEYBOARD: Slot<VirtioInput> = const { RefCell::new(None) };
    static BALLOON: Slot<VirtioBalloon> = const { RefCell::new(None) };
    static NET: Slot<VirtioNet> = const { RefCell::new(None) };
    static GPU: Slot<VirtioGpu> = const { RefCell::new(None) };
    static CONSOLE: Slot<VirtioConsole> = const { RefCell::new(None) };
    static SOUND: Slot<VirtioSound> = const { RefCell::new(None) };
}

/// Runs `ops` on the device kept in `slot`, made by `make` at first and after every [`INPUTS_PER_DEVICE`].
fn run<D: VirtioDevice>(slot: &'static LocalKey<Slot<D>>, make: impl FnOnce() -> Option<Kept<D>>, ops: &[u8]) {
    slot.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.as_ref().is_none_or(|k| k.served >= INPUTS_PER_DEVICE) {
            *slot = None;
            *slot = make();
        }
        let Some(k) = slot.as_mut() else { return };
        k.served += 1;
        clear(&k.driver.mem);
        k.driver.init();
        exercise(&mut k.driver, k.queues, ops, k.peer.as_mut());
        if let Some(agent) = &k.agent {
            agent.request_monitor(1024, 768);
        }
    });
}

fuzz_target!(|input: &[u8]| {
    let Some((&which, ops)) = input.split_first() else { return };
    match which % 8 {
        0 => run(
            &SCSI,
            || {
                let path = scratch_image("scsi")?;
                let media = Drive::open_media(path, true).ok()?;
                let drive = Arc::new(Drive::new("cd0".into(), true, true, "FUZZ".into(), Some(media)));
                // Control, event, request.
                Kept::new(3, |irq| VirtioScsi::new(drive, irq))
            },
            ops,
        ),
        1 => run(&TABLET, || Kept::new(2, |irq| VirtioInput::new(Profile::Tablet, irq)), ops),
        2 => run(&KEYBOARD, || Kept::new(2, |irq| VirtioInput::new(Profile::Keyboard, irq)), ops),
        // Inflate, deflate, statistics, free-page reporting.
        3 => run(&BALLOON, || Kept::new(4, |irq| VirtioBalloon::new(BalloonShared::new(4), irq)), ops),
        // Control, cursor.
        5 => run(&GPU, || Kept::new(2, |irq| VirtioGpu::new(GpuShared::new(Screen::new(), 640, 480), irq)), ops),
        6 => run(
            &CONSOLE,
            || {
                // The agent hands the guest's clipboard text on (dropped here); the console sets it too.
                let agent = vmm_core::vdagent::Agent::new(Box::new(|_| {})).map(Arc::new).ok()?;
                agent.set_clipboard("fuzz".into());
                // Port 0's receive and transmit, control receive and transmit, the agent port's.
                let mut k = Kept::new(6, |irq| VirtioConsole::new(agent.clone(), irq))?;
                k.agent = Some(agent);
                Some(k)
            },
            ops,
        ),
        // Control, event, tx, rx.
        7 => run(&SOUND, || Kept::new(4, |irq| VirtioSound::new(Screen::new(), irq)), ops),
        _ => run(
            &NET,
            || {
                let (ours, peer) = UnixStream::pair().ok()?;
                let backend = Passt::connected(ours, "net0").ok()?;
                peer.set_nonblocking(true).ok()?;
                let nic =
                    Arc::new(Nic::with_backend("net0", MacAddr([2, 0, 0, 0x12, 0x34, 0x56]), 1500, Box::new(backend)));
                // Receive, transmit.
                let mut k = Kept::new(2, |irq| VirtioNet::new(nic, irq))?;
                k.peer = Some(peer);
                Some(k)
            },
            ops,
        ),
    }
});
