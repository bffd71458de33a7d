//! Serial consoles of running domains, through libvirt's console streams (`virDomainOpenConsole`, what
//! `virsh console` uses): the first time a domain's serial output is asked for, a tap opens its console and a
//! thread of its own keeps the last lines the guest printed and sends what the user types. The stream is
//! non-blocking and used by that thread alone. A tap whose stream ended (the domain stopped) is opened again
//! on the next request.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use porthole_api::HostError;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::stream::Stream;
use virt::sys;

/// Lines kept per domain.
const KEPT_LINES: usize = 1000;
/// Longest line kept (a guest printing without newlines is cut into lines this long).
const LINE_LIMIT: usize = 2000;
/// Pause of the tap's thread when there is nothing to read or send.
const IDLE: Duration = Duration::from_millis(40);

/// The serial taps of one host, by domain UUID.
#[derive(Default)]
pub struct SerialTaps {
    taps: Mutex<HashMap<String, Arc<Tap>>>,
}

#[derive(Default)]
struct Tap {
    output: Mutex<Output>,
    input: Mutex<Option<Sender<Vec<u8>>>>,
    ended: AtomicBool,
}

#[derive(Default)]
struct Output {
    lines: VecDeque<String>,
    partial: String,
}

impl Output {
    fn push(&mut self, bytes: &[u8]) {
        for ch in String::from_utf8_lossy(bytes).chars() {
            match ch {
                '\n' => self.end_line(),
                '\r' => {}
                c => {
                    if self.partial.len() >= LINE_LIMIT {
                        self.end_line();
                    }
                    self.partial.push(c);
                }
            }
        }
    }

    fn end_line(&mut self) {
        self.lines.push_back(std::mem::take(&mut self.partial));
        while self.lines.len() > KEPT_LINES {
            self.lines.pop_front();
        }
    }

    /// The last `n` lines, the one being printed included.
    fn last(&self, n: usize) -> Vec<String> {
        let mut all: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            all.push(self.partial.clone());
        }
        let skip = all.len().saturating_sub(n);
        all.split_off(skip)
    }
}

impl SerialTaps {
    /// The tap of `dom` (UUID `uuid`), opened when there is none or its stream ended.
    fn tap(&self, conn: &Connect, dom: &Domain, uuid: &str) -> Result<Arc<Tap>, HostError> {
        let mut taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = taps.get(uuid).filter(|t| !t.ended.load(Ordering::Relaxed)) {
            return Ok(t.clone());
        }
        if !rpc!(dom.is_active()).unwrap_or(false) {
            return Err(HostError::Failed("the VM is not running: its serial console opens once it runs".into()));
        }
        let stream = rpc!(Stream::new(conn, sys::VIR_STREAM_NONBLOCK)).map_err(crate::failed("opening a stream"))?;
        rpc!(dom.open_console(None, &stream, 0)).map_err(crate::failed(
            "opening the serial console (the domain needs a serial port of type pty, and no other console on it)",
        ))?;
        let tap = Arc::new(Tap::default());
        let (tx, rx) = channel();
        *tap.input.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        // The output kept before (the stream ended when the domain stopped) stays until new lines push it out.
        if let Some(old) = taps.get(uuid) {
            let old = std::mem::take(&mut *old.output.lock().unwrap_or_else(|p| p.into_inner()));
            *tap.output.lock().unwrap_or_else(|p| p.into_inner()) = old;
        }
        let t = tap.clone();
        std::thread::Builder::new()
            .name("libvirt-serial".into())
            .spawn(move || pump(&t, stream, &rx))
            .map_err(|e| HostError::Failed(format!("starting the serial console's thread: {e}")))?;
        taps.insert(uuid.to_owned(), tap.clone());
        Ok(tap)
    }

    /// The last `n` lines of `dom`'s serial output.
    pub fn lines(&self, conn: &Connect, dom: &Domain, uuid: &str, n: usize) -> Result<Vec<String>, HostError> {
        let tap = self.tap(conn, dom, uuid)?;
        Ok(tap.output.lock().unwrap_or_else(|p| p.into_inner()).last(n))
    }

    /// Types `text` into `dom`'s serial port.
    pub fn send(&self, conn: &Connect, dom: &Domain, uuid: &str, text: &str) -> Result<(), HostError> {
        let tap = self.tap(conn, dom, uuid)?;
        let input = tap.input.lock().unwrap_or_else(|p| p.into_inner());
        match input.as_ref().map(|tx| tx.send(text.as_bytes().to_vec())) {
            Some(Ok(())) => Ok(()),
            _ => Err(HostError::Failed("the serial console closed (the VM stopped?)".into())),
        }
    }
}

/// The tap's thread: reads what the guest prints, sends what the user types, until the stream ends.
fn pump(tap: &Tap, stream: Stream, input: &Receiver<Vec<u8>>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending: VecDeque<u8> = VecDeque::new();
    loop {
        let mut busy = false;
        loop {
            match input.try_recv() {
                // Bounded: a user types far less than this; beyond it, older input is dropped.
                Ok(bytes) if pending.len() + bytes.len() <= 1 << 20 => pending.extend(bytes),
                Ok(_) => {}
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => break,
            }
        }
        if !pending.is_empty() {
            let chunk: Vec<u8> = pending.iter().take(4096).copied().collect();
            match stream.send(&chunk) {
                Ok(n) if n > 0 => {
                    pending.drain(..n as usize);
                    busy = true;
                }
                Ok(-2) => {}
                _ => break,
            }
        }
        match stream.recv(&mut buf) {
            Ok(n) if n > 0 => {
                tap.output.lock().unwrap_or_else(|p| p.into_inner()).push(&buf[..n as usize]);
                busy = true;
            }
            Ok(-2) => {}
            // 0: the end of the stream (the domain stopped); an error: the connection went.
            _ => break,
        }
        if !busy {
            std::thread::sleep(IDLE);
        }
    }
    tap.ended.store(true, Ordering::Relaxed);
    *tap.input.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let _ = stream.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_becomes_bounded_lines() {
        let mut o = Output::default();
        o.push(b"boot\r\nPORTHOLE-KEY 1e\r\npart");
        assert_eq!(o.last(10), ["boot", "PORTHOLE-KEY 1e", "part"]);
        assert_eq!(o.last(1), ["part"]);
        o.push(b"ial\n");
        assert_eq!(o.last(2), ["PORTHOLE-KEY 1e", "partial"]);
        // A guest printing without newlines is cut into lines; only the last lines are kept.
        o.push(&vec![b'x'; LINE_LIMIT * 3]);
        assert!(o.last(usize::MAX).iter().all(|l| l.len() <= LINE_LIMIT));
        for i in 0..KEPT_LINES + 10 {
            o.push(format!("{i}\n").as_bytes());
        }
        assert_eq!(o.lines.len(), KEPT_LINES);
        assert_eq!(o.last(1), [format!("{}", KEPT_LINES + 9)]);
        // Bytes that are not UTF-8 do not stop it.
        o.push(b"\xff\xfe ok\n");
        assert!(o.last(1)[0].ends_with(" ok"));
    }
}
