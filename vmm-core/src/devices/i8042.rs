//! The i8042 PS/2 controller at ports 0x60 (data) and 0x64 (status/command), with a keyboard on its first
//! port (IRQ 1) and a mouse on its auxiliary port (IRQ 12).
//!
//! vm-superio's i8042 only models the reset line, so the controller, keyboard and mouse are ours: the
//! controller commands firmware and Linux use (configuration byte, self-tests, port enable/disable, output
//! port with the reset line, 0xD2-0xD4 writes, 0xFE pulse reset), the keyboard's and mouse's command
//! protocols (reset with self-test result, identify, LEDs, scan-code set, typematic, enable/disable, mouse
//! rates, resolution, status, IntelliMouse wheel detection), and bounded output queues so nothing a guest
//! or a client sends can grow memory.

use std::collections::VecDeque;

use super::{BusDevice, IrqLine, MachineControl, MachineRequest};

pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const KEYBOARD_IRQ: u32 = 1;
pub const MOUSE_IRQ: u32 = 12;

const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;
const STATUS_AUX_OBF: u8 = 0x20;

const CFG_KBD_INT: u8 = 0x01;
const CFG_AUX_INT: u8 = 0x02;
const CFG_SYS: u8 = 0x04;
const CFG_KBD_DISABLED: u8 = 0x10;
const CFG_AUX_DISABLED: u8 = 0x20;
const CFG_TRANSLATE: u8 = 0x40;

const ACK: u8 = 0xFA;
const RESEND: u8 = 0xFE;
const SELF_TEST_OK: u8 = 0xAA;
/// Most bytes a device queues for the guest; more are dropped (a real device overruns too).
const QUEUE_LIMIT: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Controller,
    Keyboard,
    Mouse,
}

/// A controller command waiting for its data byte on port 0x60.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingWrite {
    Config,
    OutputPort,
    KeyboardOutput,
    MouseOutput,
    ToMouse,
}

#[derive(Debug, Default)]
struct Keyboard {
    scanning: bool,
    scancode_set: u8,
    /// The command whose parameter byte comes next.
    awaiting: Option<u8>,
    leds: u8,
}

impl Keyboard {
    fn reset(&mut self) {
        *self = Keyboard { scanning: true, scancode_set: 2, awaiting: None, leds: 0 };
    }

    /// Answers one byte the guest sent to the keyboard.
    fn command(&mut self, byte: u8) -> Vec<u8> {
        if let Some(cmd) = self.awaiting.take() {
            return match cmd {
                0xED => {
                    self.leds = byte & 7;
                    vec![ACK]
                }
                0xF0 if byte == 0 => vec![ACK, self.scancode_set],
                0xF0 if (1..=3).contains(&byte) => {
                    self.scancode_set = byte;
                    vec![ACK]
                }
                0xF0 => vec![RESEND],
                _ => vec![ACK], // 0xF3 typematic rate: accepted, not modelled
            };
        }
        match byte {
            0xED | 0xF0 | 0xF3 => {
                self.awaiting = Some(byte);
                vec![ACK]
            }
            0xEE => vec![0xEE],            // echo
            0xF2 => vec![ACK, 0xAB, 0x83], // identify: MF2 keyboard
            0xF4 => {
                self.scanning = true;
                vec![ACK]
            }
            0xF5 => {
                let set = self.scancode_set;
                self.reset();
                self.scancode_set = set;
                self.scanning = false;
                vec![ACK]
            }
            0xF6 => {
                let set = self.scancode_set;
                self.reset();
                self.scancode_set = set;
                vec![ACK]
            }
            0xFF => {
                self.reset();
                vec![ACK, SELF_TEST_OK]
            }
            0xF7..=0xFD => vec![ACK],
            _ => vec![RESEND],
        }
    }
}

#[derive(Debug, Default)]
struct Mouse {
    streaming: bool,
    sample_rate: u8,
    resolution: u8,
    scaling_2to1: bool,
    /// 0 = standard PS/2 mouse, 3 = IntelliMouse (wheel).
    id: u8,
    awaiting: Option<u8>,
    /// The last three sample rates set, to detect the IntelliMouse knock (200, 100, 80).
    rates: [u8; 3],
    buttons: u8,
}

impl Mouse {
    fn reset(&mut self) {
        *self = Mouse { sample_rate: 100, resolution: 2, ..Mouse::default() };
    }

    fn command(&mut self, byte: u8) -> Vec<u8> {
        if let Some(cmd) = self.awaiting.take() {
            match cmd {
                0xE8 => self.resolution = byte & 3,
                0xF3 => {
                    self.sample_rate = byte;
                    self.rates = [self.rates[1], self.rates[2], byte];
                    if self.rates == [200, 100, 80] {
                        self.id = 3;
                    }
                }
                _ => {}
            }
            return vec![ACK];
        }
        match byte {
            0xE6 => {
                self.scaling_2to1 = false;
                vec![ACK]
            }
            0xE7 => {
                self.scaling_2to1 = true;
                vec![ACK]
            }
            0xE8 | 0xF3 => {
                self.awaiting = Some(byte);
                vec![ACK]
            }
            0xE9 => {
                let status = (u8::from(self.streaming) << 5) | (u8::from(self.scaling_2to1) << 4) | (self.buttons & 7);
                vec![ACK, status, self.resolution, self.sample_rate]
            }
            0xEA | 0xF0 | 0xEC | 0xEE => vec![ACK],
            0xEB => vec![ACK, 0x08, 0, 0],
            0xF2 => vec![ACK, self.id],
            0xF4 => {
                self.streaming = true;
                vec![ACK]
            }
            0xF5 => {
                self.streaming = false;
                vec![ACK]
            }
            0xF6 => {
                let id = self.id;
                self.reset();
                self.id = id;
                vec![ACK]
            }
            0xFF => {
                self.reset();
                vec![ACK, SELF_TEST_OK, 0x00]
            }
            _ => vec![RESEND],
        }
    }

    /// A movement packet (3 bytes, or 4 with a wheel).
    fn packet(&mut self, dx: i32, dy: i32, dz: i32, buttons: u8) -> Vec<u8> {
        self.buttons = buttons & 7;
        let dx = dx.clamp(-256, 255);
        let dy = (-dy).clamp(-256, 255); // PS/2 y grows upwards
        let mut first = 0x08 | self.buttons;
        if dx < 0 {
            first |= 0x10;
        }
        if dy < 0 {
            first |= 0x20;
        }
        let mut p = vec![first, dx as u8, dy as u8];
        if self.id == 3 {
            p.push(dz.clamp(-8, 7) as u8);
        }
        p
    }
}

/// The controller.
pub struct I8042 {
    config: u8,
    output_port: u8,
    last_was_command: bool,
    pending: Option<PendingWrite>,
    /// The byte in the output buffer, and where it came from.
    output: Option<(u8, Source)>,
    /// Bytes waiting for the output buffer: (byte, source, written by the controller's 0xD2/0xD3 loopback).
    queue: VecDeque<(u8, Source, bool)>,
    keyboard: Keyboard,
    mouse: Mouse,
    keyboard_irq: IrqLine,
    mouse_irq: IrqLine,
    machine: MachineControl,
}

impl I8042 {
    pub fn new(keyboard_irq: IrqLine, mouse_irq: IrqLine, machine: MachineControl) -> Self {
        let mut dev = I8042 {
            config: CFG_KBD_INT | CFG_AUX_INT | CFG_SYS | CFG_TRANSLATE,
            output_port: 0x03, // reset line high (not in reset), A20 on
            last_was_command: false,
            pending: None,
            output: None,
            queue: VecDeque::new(),
            keyboard: Keyboard::default(),
            mouse: Mouse::default(),
            keyboard_irq,
            mouse_irq,
            machine,
        };
        dev.keyboard.reset();
        dev.mouse.reset();
        dev
    }

    fn push(&mut self, bytes: &[u8], source: Source) {
        for &b in bytes {
            if self.queue.len() < QUEUE_LIMIT {
                self.queue.push_back((b, source, false));
            }
        }
        self.fill_output();
    }

    /// A byte the controller writes into its output buffer as if `source` had sent it (commands 0xD2 and
    /// 0xD3). The controller writes it itself, so a disabled port does not hold it back: Linux tests the
    /// AUX loopback with the port disabled (its multiplexer probe) and, without an answer, polls the status
    /// register 10,000 times before giving up.
    fn push_looped(&mut self, byte: u8, source: Source) {
        if self.queue.len() < QUEUE_LIMIT {
            self.queue.push_back((byte, source, true));
        }
        self.fill_output();
    }

    /// Moves the next queued byte into the empty output buffer and raises its interrupt.
    fn fill_output(&mut self) {
        if self.output.is_some() {
            return;
        }
        let Some(&(_, source, looped)) = self.queue.front() else {
            return;
        };
        // A disabled port holds its bytes back.
        let blocked = !looped
            && match source {
                Source::Keyboard => self.config & CFG_KBD_DISABLED != 0,
                Source::Mouse => self.config & CFG_AUX_DISABLED != 0,
                Source::Controller => false,
            };
        if blocked {
            return;
        }
        let (byte, source, _) = self.queue.pop_front().expect("front exists");
        self.output = Some((byte, source));
        match source {
            Source::Mouse if self.config & CFG_AUX_INT != 0 => self.mouse_irq.trigger(),
            Source::Keyboard | Source::Controller if self.config & CFG_KBD_INT != 0 => self.keyboard_irq.trigger(),
            _ => {}
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if self.config & CFG_SYS != 0 {
            s |= STATUS_SYS;
        }
        if self.last_was_command {
            s |= STATUS_CMD;
        }
        if let Some((_, source)) = self.output {
            s |= STATUS_OBF;
            if source == Source::Mouse {
                s |= STATUS_AUX_OBF;
            }
        }
        s
    }

    fn controller_command(&mut self, cmd: u8) {
        match cmd {
            0x20 => self.push(&[self.config], Source::Controller),
            0x21..=0x3F => self.push(&[0], Source::Controller), // internal RAM
            0x60 => self.pending = Some(PendingWrite::Config),
            0xA7 => self.config |= CFG_AUX_DISABLED,
            0xA8 => {
                self.config &= !CFG_AUX_DISABLED;
                self.fill_output();
            }
            0xA9 | 0xAB => self.push(&[0x00], Source::Controller), // port tests pass
            0xAA => {
                self.config |= CFG_SYS;
                self.push(&[0x55], Source::Controller); // self-test passed
            }
            0xAD => self.config |= CFG_KBD_DISABLED,
            0xAE => {
                self.config &= !CFG_KBD_DISABLED;
                self.fill_output();
            }
            0xC0 => self.push(&[0x80], Source::Controller), // input port: keyboard not inhibited
            0xD0 => self.push(&[self.output_port], Source::Controller),
            0xD1 => self.pending = Some(PendingWrite::OutputPort),
            0xD2 => self.pending = Some(PendingWrite::KeyboardOutput),
            0xD3 => self.pending = Some(PendingWrite::MouseOutput),
            0xD4 => self.pending = Some(PendingWrite::ToMouse),
            // Pulse output lines; bit 0 low pulses the CPU reset line.
            0xF0..=0xFF if cmd & 1 == 0 => self.machine.request(MachineRequest::Reset),
            _ => {}
        }
    }

    fn data_write(&mut self, byte: u8) {
        match self.pending.take() {
            Some(PendingWrite::Config) => {
                self.config = byte;
                self.fill_output();
            }
            Some(PendingWrite::OutputPort) => {
                self.output_port = byte;
                if byte & 1 == 0 {
                    self.machine.request(MachineRequest::Reset);
                }
            }
            Some(PendingWrite::KeyboardOutput) => self.push_looped(byte, Source::Keyboard),
            Some(PendingWrite::MouseOutput) => self.push_looped(byte, Source::Mouse),
            Some(PendingWrite::ToMouse) => {
                let reply = self.mouse.command(byte);
                self.push(&reply, Source::Mouse);
            }
            None => {
                // Writing to the keyboard also re-enables its port, as real controllers do.
                self.config &= !CFG_KBD_DISABLED;
                let reply = self.keyboard.command(byte);
                self.push(&reply, Source::Keyboard);
            }
        }
    }

    /// Queues bytes from the keyboard (scan codes in the keyboard's current set), if it is scanning.
    pub fn keyboard_input(&mut self, bytes: &[u8]) {
        if self.keyboard.scanning {
            self.push(bytes, Source::Keyboard);
        }
    }

    /// Queues the scan codes of a key press or release, in the keyboard's scan code set as the guest sees
    /// it: set 1 when the controller translates (the default) or the keyboard is in set 1, else set 2.
    pub fn key(&mut self, key: crate::rfb::keymap::Key, down: bool) {
        use crate::rfb::keymap::{set1_bytes, set2_bytes};
        let bytes = if self.config & CFG_TRANSLATE != 0 || self.keyboard.scancode_set == 1 {
            Some(set1_bytes(key, down))
        } else {
            set2_bytes(key, down)
        };
        if let Some(bytes) = bytes {
            self.keyboard_input(&bytes);
        }
    }

    /// Queues a mouse movement/button report, if the mouse is streaming.
    pub fn mouse_input(&mut self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        if self.mouse.streaming {
            let packet = self.mouse.packet(dx, dy, dz, buttons);
            // Never queue half a packet.
            if self.queue.len() + packet.len() <= QUEUE_LIMIT {
                self.push(&packet, Source::Mouse);
            }
        }
    }

    /// The keyboard's LED state (bit 0 scroll, 1 num, 2 caps lock).
    pub fn keyboard_leds(&self) -> u8 {
        self.keyboard.leds
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
        if data.len() != 1 {
            return;
        }
        match offset {
            0 => {
                // Reading an empty buffer returns the last byte again on hardware; 0 is close enough.
                data[0] = self.output.take().map(|(b, _)| b).unwrap_or(0);
                self.fill_output();
            }
            4 => data[0] = self.status(),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            0 => {
                self.last_was_command = false;
                self.data_write(data[0]);
            }
            4 => {
                self.last_was_command = true;
                self.pending = None;
                self.controller_command(data[0]);
            }
            _ => {}
        }
    }
}

fn save_option(w: &mut crate::snapshot::Writer, v: Option<u8>) {
    w.bool(v.is_some());
    w.u8(v.unwrap_or(0));
}

fn restore_option(r: &mut crate::snapshot::Reader) -> Result<Option<u8>, crate::snapshot::StateError> {
    let some = r.bool()?;
    let v = r.u8()?;
    Ok(some.then_some(v))
}

impl Source {
    fn code(self) -> u8 {
        match self {
            Source::Controller => 0,
            Source::Keyboard => 1,
            Source::Mouse => 2,
        }
    }
    fn from_code(code: u8) -> Result<Self, crate::snapshot::StateError> {
        Ok(match code {
            0 => Source::Controller,
            1 => Source::Keyboard,
            2 => Source::Mouse,
            _ => return Err(crate::snapshot::StateError::Damaged(format!("section i8042: source {code}"))),
        })
    }
}

impl PendingWrite {
    fn code(self) -> u8 {
        match self {
            PendingWrite::Config => 0,
            PendingWrite::OutputPort => 1,
            PendingWrite::KeyboardOutput => 2,
            PendingWrite::MouseOutput => 3,
            PendingWrite::ToMouse => 4,
        }
    }
    fn from_code(code: u8) -> Result<Option<Self>, crate::snapshot::StateError> {
        Ok(Some(match code {
            0 => PendingWrite::Config,
            1 => PendingWrite::OutputPort,
            2 => PendingWrite::KeyboardOutput,
            3 => PendingWrite::MouseOutput,
            4 => PendingWrite::ToMouse,
            0xFF => return Ok(None),
            _ => return Err(crate::snapshot::StateError::Damaged(format!("section i8042: pending write {code}"))),
        }))
    }
}

/// Most bytes the output queue is restored with (it only ever holds a few replies and input bytes).
const SAVED_QUEUE_MAX: usize = 4096;

impl crate::snapshot::DeviceState for I8042 {
    fn save(&self, w: &mut crate::snapshot::Writer) {
        w.u8(self.config);
        w.u8(self.output_port);
        w.bool(self.last_was_command);
        w.u8(self.pending.map(PendingWrite::code).unwrap_or(0xFF));
        w.bool(self.output.is_some());
        let (byte, source) = self.output.unwrap_or((0, Source::Controller));
        w.u8(byte);
        w.u8(source.code());
        let queue: Vec<_> = self.queue.iter().take(SAVED_QUEUE_MAX).collect();
        w.u32(queue.len() as u32);
        for &&(byte, source, looped) in &queue {
            w.u8(byte);
            w.u8(source.code());
            w.bool(looped);
        }
        let k = &self.keyboard;
        w.bool(k.scanning);
        w.u8(k.scancode_set);
        save_option(w, k.awaiting);
        w.u8(k.leds);
        let m = &self.mouse;
        w.bool(m.streaming);
        w.u8(m.sample_rate);
        w.u8(m.resolution);
        w.bool(m.scaling_2to1);
        w.u8(m.id);
        save_option(w, m.awaiting);
        for rate in m.rates {
            w.u8(rate);
        }
        w.u8(m.buttons);
    }

    fn restore(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let config = r.u8()?;
        let output_port = r.u8()?;
        let last_was_command = r.bool()?;
        let pending = PendingWrite::from_code(r.u8()?)?;
        let has_output = r.bool()?;
        let (byte, source) = (r.u8()?, Source::from_code(r.u8()?)?);
        let output = has_output.then_some((byte, source));
        let n = r.u32()? as usize;
        if n > SAVED_QUEUE_MAX {
            return Err(crate::snapshot::StateError::Damaged(format!("section i8042: a queue of {n} bytes")));
        }
        let mut queue = VecDeque::with_capacity(n);
        for _ in 0..n {
            queue.push_back((r.u8()?, Source::from_code(r.u8()?)?, r.bool()?));
        }
        let keyboard =
            Keyboard { scanning: r.bool()?, scancode_set: r.u8()?, awaiting: restore_option(r)?, leds: r.u8()? };
        let mouse = Mouse {
            streaming: r.bool()?,
            sample_rate: r.u8()?,
            resolution: r.u8()?,
            scaling_2to1: r.bool()?,
            id: r.u8()?,
            awaiting: restore_option(r)?,
            rates: [r.u8()?, r.u8()?, r.u8()?],
            buttons: r.u8()?,
        };
        self.config = config;
        self.output_port = output_port;
        self.last_was_command = last_was_command;
        self.pending = pending;
        self.output = output;
        self.queue = queue;
        self.keyboard = keyboard;
        self.mouse = mouse;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    struct Rig {
        dev: I8042,
        kbd_irq: IrqLine,
        mouse_irq: IrqLine,
        machine: MachineControl,
    }

    fn rig() -> Rig {
        let kbd_irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mouse_irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let machine = MachineControl::new().unwrap();
        Rig { dev: I8042::new(kbd_irq.clone(), mouse_irq.clone(), machine.clone()), kbd_irq, mouse_irq, machine }
    }

    /// A saved controller (a command waiting for its data byte, bytes queued for the guest, keyboard and
    /// mouse settings) restored into a new one answers the same; garbage is refused or ignored, never a panic.
    #[test]
    fn the_state_round_trips() {
        use crate::snapshot::{DeviceState, Reader, Writer};
        let mut a = rig();
        data(&mut a.dev, 0xF0); // keyboard: set scan code set, waiting for its argument
        a.dev.keyboard_input(&[0x1C, 0xF0, 0x1C, 0x32]);
        a.dev.mouse_input(3, -2, 0, 1);
        let mut w = Writer::new();
        a.dev.save(&mut w);
        let mut b = rig();
        let mut r = Reader::new("i8042", &w.buf);
        b.dev.restore(&mut r).unwrap();
        r.finish().unwrap();
        let mut again = Writer::new();
        b.dev.save(&mut again);
        assert_eq!(again.buf, w.buf);
        for _ in 0..12 {
            let (mut x, mut y) = ([0u8], [0u8]);
            assert_eq!(status(&mut a.dev), status(&mut b.dev));
            a.dev.read(0, &mut x);
            b.dev.read(0, &mut y);
            assert_eq!(x, y);
        }
        let mut seed = 7u32;
        for len in 0..200 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) as u8
                })
                .collect();
            let _ = rig().dev.restore(&mut Reader::new("i8042", &junk));
        }
    }

    fn cmd(dev: &mut I8042, c: u8) {
        dev.write(4, &[c]);
    }
    fn data(dev: &mut I8042, d: u8) {
        dev.write(0, &[d]);
    }
    fn status(dev: &mut I8042) -> u8 {
        let mut s = [0];
        dev.read(4, &mut s);
        s[0]
    }
    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut out = Vec::new();
        while status(dev) & STATUS_OBF != 0 {
            let mut b = [0];
            dev.read(0, &mut b);
            out.push(b[0]);
        }
        out
    }

    #[test]
    fn controller_self_test_and_config_byte() {
        let mut r = rig();
        cmd(&mut r.dev, 0xAA);
        assert_eq!(drain(&mut r.dev), vec![0x55]);
        cmd(&mut r.dev, 0x60);
        data(&mut r.dev, 0x65);
        cmd(&mut r.dev, 0x20);
        assert_eq!(drain(&mut r.dev), vec![0x65]);
        cmd(&mut r.dev, 0xAB);
        assert_eq!(drain(&mut r.dev), vec![0x00]);
    }

    #[test]
    fn keyboard_reset_identify_and_leds() {
        let mut r = rig();
        data(&mut r.dev, 0xFF);
        assert_eq!(drain(&mut r.dev), vec![ACK, SELF_TEST_OK]);
        assert!(r.kbd_irq.eventfd().read().is_ok(), "IRQ 1 raised");
        data(&mut r.dev, 0xF2);
        assert_eq!(drain(&mut r.dev), vec![ACK, 0xAB, 0x83]);
        data(&mut r.dev, 0xED);
        data(&mut r.dev, 0x04);
        assert_eq!(drain(&mut r.dev), vec![ACK, ACK]);
        assert_eq!(r.dev.keyboard_leds(), 4);
        data(&mut r.dev, 0xF0);
        data(&mut r.dev, 0x00);
        assert_eq!(drain(&mut r.dev), vec![ACK, ACK, 2]);
    }

    #[test]
    fn mouse_through_d4_with_wheel_detection_and_packets() {
        let mut r = rig();
        cmd(&mut r.dev, 0xA8);
        cmd(&mut r.dev, 0xD4);
        data(&mut r.dev, 0xFF);
        let reply = drain(&mut r.dev);
        assert_eq!(reply, vec![ACK, SELF_TEST_OK, 0x00]);
        assert!(r.mouse_irq.eventfd().read().is_ok(), "IRQ 12 raised");
        for rate in [200, 100, 80] {
            cmd(&mut r.dev, 0xD4);
            data(&mut r.dev, 0xF3);
            cmd(&mut r.dev, 0xD4);
            data(&mut r.dev, rate);
        }
        drain(&mut r.dev);
        cmd(&mut r.dev, 0xD4);
        data(&mut r.dev, 0xF2);
        assert_eq!(drain(&mut r.dev), vec![ACK, 3]);
        cmd(&mut r.dev, 0xD4);
        data(&mut r.dev, 0xF4);
        assert_eq!(drain(&mut r.dev), vec![ACK]);
        r.dev.mouse_input(5, 3, -1, 1);
        assert_ne!(status(&mut r.dev) & STATUS_AUX_OBF, 0);
        assert_eq!(drain(&mut r.dev), vec![0x08 | 0x20 | 1, 5, (-3i8) as u8, 0xFF]);
    }

    #[test]
    fn keys_arrive_in_set_1_when_translated_and_set_2_when_not() {
        let mut r = rig();
        r.dev.key(0x1E, true);
        r.dev.key(0xE048, false);
        assert_eq!(drain(&mut r.dev), vec![0x1E, 0xE0, 0xC8]);
        cmd(&mut r.dev, 0x60);
        data(&mut r.dev, CFG_KBD_INT | CFG_SYS); // translation off
        r.dev.key(0x1E, false);
        assert_eq!(drain(&mut r.dev), vec![0xF0, 0x1C]);
        data(&mut r.dev, 0xF5); // disable scanning
        drain(&mut r.dev);
        r.dev.key(0x1E, true);
        assert!(drain(&mut r.dev).is_empty(), "a disabled keyboard sends nothing");
    }

    #[test]
    fn reset_line() {
        let mut r = rig();
        cmd(&mut r.dev, 0xFE);
        assert_eq!(r.machine.take(), MachineRequest::Reset);
        cmd(&mut r.dev, 0xD1);
        data(&mut r.dev, 0x02);
        assert_eq!(r.machine.take(), MachineRequest::Reset);
        cmd(&mut r.dev, 0xFF); // pulse nothing
        assert_eq!(r.machine.take(), MachineRequest::None);
    }

    #[test]
    fn queues_are_bounded_and_disabled_ports_hold_bytes() {
        let mut r = rig();
        cmd(&mut r.dev, 0xAD);
        r.dev.keyboard_input(&[0x1C; 10_000]);
        assert_eq!(status(&mut r.dev) & STATUS_OBF, 0, "keyboard port disabled");
        cmd(&mut r.dev, 0xAE);
        assert_eq!(drain(&mut r.dev).len(), QUEUE_LIMIT);
    }

    #[test]
    fn loopback_answers_with_the_port_disabled() {
        // Linux's multiplexer probe (after its AUX test left the port disabled): 0xA7, then 0xD3 0xF0 must
        // come back at once from the AUX side, or it polls the status register 10,000 times.
        let mut r = rig();
        cmd(&mut r.dev, 0xA7);
        cmd(&mut r.dev, 0xD3);
        data(&mut r.dev, 0xF0);
        assert_eq!(status(&mut r.dev) & (STATUS_OBF | STATUS_AUX_OBF), STATUS_OBF | STATUS_AUX_OBF);
        assert_eq!(drain(&mut r.dev), vec![0xF0]);
        // The same for the keyboard side (0xD2) with the keyboard port disabled, from the keyboard.
        cmd(&mut r.dev, 0xAD);
        cmd(&mut r.dev, 0xD2);
        data(&mut r.dev, 0x5A);
        assert_eq!(status(&mut r.dev) & (STATUS_OBF | STATUS_AUX_OBF), STATUS_OBF);
        assert_eq!(drain(&mut r.dev), vec![0x5A]);
        // Bytes from the devices themselves are still held while their port is disabled.
        cmd(&mut r.dev, 0xD4);
        data(&mut r.dev, 0xF2);
        assert_eq!(status(&mut r.dev) & STATUS_OBF, 0);
        cmd(&mut r.dev, 0xA8);
        assert_eq!(drain(&mut r.dev), vec![ACK, 0]);
    }

    #[test]
    fn garbage_never_panics() {
        let mut r = rig();
        let mut x: u32 = 12345;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let b = (x >> 8) as u8;
            match x % 4 {
                0 => r.dev.write(0, &[b]),
                1 if b != 0xFE && b & 0xF0 != 0xF0 && b != 0xD1 => r.dev.write(4, &[b]),
                2 => {
                    let mut v = [0];
                    r.dev.read(u64::from(x % 8), &mut v);
                }
                _ => r.dev.write(u64::from(x % 8), &[b, b]),
            }
        }
    }
}
