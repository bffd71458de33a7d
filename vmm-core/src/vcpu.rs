//! vCPU threads: the KVM_RUN loop, exit dispatch to the buses, and the pause/kick machinery.
//!
//! A vCPU is stopped by setting a flag and sending its thread a real-time signal whose handler sets
//! `kvm_run.immediate_exit`, so KVM_RUN returns (or never enters) even if the signal lands between the
//! flag check and the ioctl.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_EXIT_IO_IN, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::counters::{Counters, bump};
use crate::devices::bus::lock;
use crate::devices::{Bus, MachineControl, MachineRequest};

thread_local! {
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer is this thread's kvm_run.immediate_exit, valid while the vCPU lives
            // (it is cleared before the VcpuFd is dropped).
            unsafe { p.write_volatile(1) };
        }
    });
}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> c_int {
    libc::SIGRTMIN()
}

/// Installs the kick signal's handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

#[derive(Debug, Default)]
struct RunState {
    paused: bool,
    exiting: bool,
    parked: usize,
    /// vCPU threads of the current boot that have not left their loop (started or not).
    live: usize,
    /// The threads of those that have started (only they can be in KVM_RUN, so only they are kicked).
    threads: Vec<libc::pthread_t>,
    /// Work every parked vCPU thread does on its own vCPU (reading its state for a machine-state file).
    job: Option<Arc<VcpuJob>>,
}

/// What a [`VcpuJob`] does on one vCPU: its index and file descriptor in, bytes or an error out.
pub type VcpuWork = dyn Fn(u32, &VcpuFd) -> Result<Vec<u8>, String> + Send + Sync;

/// Work for every vCPU of a paused boot, done by each vCPU thread on its own vCPU.
pub struct VcpuJob {
    work: Box<VcpuWork>,
    results: Mutex<std::collections::BTreeMap<u32, Result<Vec<u8>, String>>>,
}

impl std::fmt::Debug for VcpuJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VcpuJob")
    }
}

impl VcpuJob {
    pub fn new(work: Box<VcpuWork>) -> Arc<Self> {
        Arc::new(VcpuJob { work, results: Mutex::default() })
    }
}

/// A vCPU thread's own vCPU, for jobs.
type Own<'a> = Option<(u32, &'a VcpuFd)>;

/// Pauses, resumes and stops the vCPU threads of the current boot. Outlives reboots.
#[derive(Debug, Default)]
pub struct RunControl {
    state: Mutex<RunState>,
    changed: Condvar,
    /// Set whenever the vCPUs must look at `state` (paused or exiting), so the hot loop checks an atomic.
    attention: AtomicBool,
    /// Devices that keep time of their own (a sound card's streams), told of every pause and resume.
    pause_listeners: PauseListeners,
}

/// Told `true` when the VM pauses and `false` when it goes on (more than once alike: it must not mind);
/// returns whether it still wants to be told (a device of an earlier boot no longer does).
pub type PauseListener = Box<dyn Fn(bool) -> bool + Send + Sync>;

/// A device that keeps time of its own (a sound card's streams) and stands still while the VM is paused.
pub trait HoldsWhilePaused: Send + Sync + 'static {
    /// The VM paused (`true`) or went on; told the same more than once alike.
    fn hold(&self, paused: bool);
}

#[derive(Default)]
struct PauseListeners(Mutex<Vec<PauseListener>>);

impl std::fmt::Debug for PauseListeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} pause listeners", lock(&self.0).len())
    }
}

/// Why a pause did not complete.
#[derive(Debug, thiserror::Error)]
#[error("{parked} of {total} vCPUs stopped within {waited:?}")]
pub struct PauseTimeout {
    pub parked: usize,
    pub total: usize,
    pub waited: Duration,
}

impl RunControl {
    fn kick_all(state: &RunState) {
        for &t in &state.threads {
            // SAFETY: every id belongs to a live vCPU thread: each thread adds its own id (`enter`) and
            // removes it (`thread_done`) under this lock before it ends, and threads are joined only after.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Opens a new boot of `vcpus` vCPU threads. Called before any of them is spawned: a thread that starts
    /// must never see the previous boot's `exiting` (it would leave at once and the new boot would have no
    /// vCPU), and a pause must wait for threads that have not started yet.
    pub fn begin_boot(&self, vcpus: usize) {
        let mut s = lock(&self.state);
        s.exiting = false;
        s.parked = 0;
        s.live = vcpus;
        s.threads.clear();
        self.attention.store(s.paused, Ordering::Release);
    }

    /// Counts one more vCPU thread into the running boot (a vCPU added while the VM runs). Called before the
    /// thread is spawned, like [`begin_boot`](Self::begin_boot): a pause meanwhile waits for it, and it parks on
    /// its way in.
    pub fn add_vcpu(&self) {
        lock(&self.state).live += 1;
    }

    /// Takes back [`add_vcpu`](Self::add_vcpu) when its thread could not be spawned.
    pub fn thread_done_unstarted(&self) {
        let mut s = lock(&self.state);
        s.live = s.live.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread before its first KVM_RUN: registers it for kicks, then parks while paused.
    /// Returns whether to exit at once (the boot is already being stopped).
    #[cfg(test)]
    fn enter(&self) -> bool {
        self.enter_with(None)
    }

    fn enter_with(&self, own: Own) -> bool {
        {
            let mut s = lock(&self.state);
            // SAFETY: pthread_self has no preconditions.
            s.threads.push(unsafe { libc::pthread_self() });
        }
        self.attention.load(Ordering::Acquire) && self.checkpoint_with(own)
    }

    /// Whether the current job still waits for this vCPU.
    fn job_for(s: &RunState, own: Own) -> bool {
        match (&s.job, own) {
            (Some(job), Some((index, _))) => !lock(&job.results).contains_key(&index),
            _ => false,
        }
    }

    /// Does the current job on this vCPU if it waits for it (the state lock is released meanwhile).
    fn serve_job<'a>(
        &'a self,
        s: std::sync::MutexGuard<'a, RunState>,
        own: Own,
    ) -> std::sync::MutexGuard<'a, RunState> {
        if !Self::job_for(&s, own) {
            return s;
        }
        let (Some(job), Some((index, fd))) = (s.job.clone(), own) else { return s };
        drop(s);
        let result = (job.work)(index, fd);
        lock(&job.results).insert(index, result);
        let s = lock(&self.state);
        self.changed.notify_all();
        s
    }

    /// Runs `job` on every vCPU of the paused boot (each on its own thread) and returns the results by vCPU
    /// index. Fails if the boot is not paused, ends meanwhile, or a vCPU does not answer within `timeout`.
    pub fn run_job(
        &self,
        job: Arc<VcpuJob>,
        timeout: Duration,
    ) -> Result<std::collections::BTreeMap<u32, Result<Vec<u8>, String>>, String> {
        let start = Instant::now();
        let mut s = lock(&self.state);
        // A pause that came before the boot opened (a restored VM asked to save at once) held with no vCPU
        // yet: the boot's threads park on their way in. Wait for them.
        while s.paused && !s.exiting && (s.live == 0 || s.parked < s.live) && start.elapsed() < timeout {
            s = self.changed.wait_timeout(s, Duration::from_millis(5)).unwrap_or_else(|p| p.into_inner()).0;
        }
        if !s.paused || s.live == 0 || s.parked < s.live || s.exiting {
            return Err(format!("{} of {} vCPUs are stopped", s.parked, s.live));
        }
        s.job = Some(job.clone());
        self.changed.notify_all();
        loop {
            let done = lock(&job.results).len();
            if done >= s.live {
                break;
            }
            if s.exiting || start.elapsed() >= timeout {
                s.job = None;
                return Err(format!("{done} of {} vCPUs answered within {timeout:?}", s.live));
            }
            s = self.changed.wait_timeout(s, Duration::from_millis(5)).unwrap_or_else(|p| p.into_inner()).0;
        }
        s.job = None;
        drop(s);
        Ok(std::mem::take(&mut *lock(&job.results)))
    }

    /// Tells `listener` whether the VM is paused now, then of every pause and resume from now on.
    pub fn on_pause_change(&self, listener: PauseListener) {
        if listener(self.is_paused()) {
            lock(&self.pause_listeners.0).push(listener);
        }
    }

    /// Holds `device` while the VM is paused, for as long as the device exists (the VM keeps a weak
    /// reference: a device of an earlier boot leaves the listeners).
    pub fn hold_while_paused<D: HoldsWhilePaused>(&self, device: &Arc<D>) {
        let device = Arc::downgrade(device);
        self.on_pause_change(Box::new(move |paused| {
            let Some(device) = device.upgrade() else { return false };
            device.hold(paused);
            true
        }));
    }

    fn tell_listeners(&self, paused: bool) {
        lock(&self.pause_listeners.0).retain(|listener| listener(paused));
    }

    /// Stops every vCPU and waits until all are parked; returns how long that took.
    pub fn pause(&self, timeout: Duration) -> Result<Duration, PauseTimeout> {
        self.tell_listeners(true);
        let start = Instant::now();
        let mut s = lock(&self.state);
        s.paused = true;
        self.attention.store(true, Ordering::Release);
        while s.parked < s.live && !s.exiting {
            Self::kick_all(&s);
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(PauseTimeout { parked: s.parked, total: s.live, waited });
            }
            s = self.changed.wait_timeout(s, Duration::from_millis(2)).unwrap_or_else(|p| p.into_inner()).0;
        }
        Ok(start.elapsed())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        {
            let mut s = lock(&self.state);
            s.paused = false;
            self.attention.store(s.exiting, Ordering::Release);
        }
        // Before the vCPUs run: the devices keep time again by then.
        self.tell_listeners(false);
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        lock(&self.state).paused
    }

    /// Makes every vCPU thread of this boot leave its loop.
    pub fn stop_boot(&self) {
        let mut s = lock(&self.state);
        s.exiting = true;
        self.attention.store(true, Ordering::Release);
        Self::kick_all(&s);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread when `attention` is set: parks while paused; returns whether to exit.
    #[cfg(test)]
    fn checkpoint(&self) -> bool {
        self.checkpoint_with(None)
    }

    /// [`checkpoint`](Self::checkpoint) for a vCPU thread that serves jobs on its vCPU while parked.
    fn checkpoint_with(&self, own: Own) -> bool {
        let mut s = lock(&self.state);
        while s.paused && !s.exiting {
            s.parked += 1;
            self.changed.notify_all();
            s = self.serve_job(s, own);
            if s.paused && !s.exiting && !Self::job_for(&s, own) {
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.parked -= 1;
        }
        s.exiting
    }

    /// Called by a vCPU thread as it exits (also one that never entered its loop), so kicks stop targeting
    /// it and a pause stops waiting for it.
    pub fn thread_done(&self) {
        let mut s = lock(&self.state);
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        s.threads.retain(|&t| t != me);
        s.live = s.live.saturating_sub(1);
        self.changed.notify_all();
    }
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    pub index: u32,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    pub machine: MachineControl,
    pub counters: Arc<Counters>,
    pub run: Arc<RunControl>,
    pub crash: Arc<Mutex<Option<String>>>,
}

impl Vcpu {
    fn crash(&self, reason: String) {
        log::debug!("vCPU {}: {reason}", self.index);
        lock(&self.crash).get_or_insert(reason);
        self.machine.request(MachineRequest::Crash);
    }

    /// Describes where the vCPU is: RIP, mode and the instruction bytes there.
    fn where_am_i(&self) -> String {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return "registers unreadable".into();
        };
        let linear = sregs.cs.base.wrapping_add(regs.rip);
        let mut text =
            format!("rip={:#x} cs.base={:#x} cr0={:#x} efer={:#x}", regs.rip, sregs.cs.base, sregs.cr0, sregs.efer);
        let physical = if sregs.cr0 & (1 << 31) != 0 {
            self.fd.translate_gva(linear).ok().filter(|t| t.valid != 0).map(|t| t.physical_address)
        } else {
            Some(linear)
        };
        let mut bytes = [0u8; 15];
        match physical.map(|pa| self.mem.read_slice(&mut bytes, GuestAddress(pa))) {
            Some(Ok(())) => {
                let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                text.push_str(&format!(" instruction bytes: {}", hex.join(" ")));
            }
            _ => text.push_str(" instruction bytes: unreadable"),
        }
        text
    }

    /// Handles port I/O from the raw kvm_run area: `count` items of `size` bytes (string I/O has count > 1).
    fn port_io(&mut self) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_IO, so `io` is the active union field.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        let count = io.count as usize;
        if !matches!(size, 1 | 2 | 4) || count == 0 || count * size > 4096 {
            return;
        }
        let base = (run as *mut kvm_bindings::kvm_run).cast::<u8>();
        // SAFETY: the kernel places the data inside the mmap'd kvm_run area (at most one page after it).
        let data = unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), count * size) };
        let port = u64::from(io.port);
        if u32::from(io.direction) == KVM_EXIT_IO_IN {
            bump(&self.counters.exits_io_in);
            for item in data.chunks_exact_mut(size) {
                self.pio.read(port, item);
            }
        } else {
            bump(&self.counters.exits_io_out);
            for item in data.chunks_exact(size) {
                self.pio.write(port, item);
            }
        }
    }

    /// Runs the vCPU until the machine stops, resets or crashes.
    pub fn run_loop(mut self) {
        IMMEDIATE_EXIT.with(|p| p.set(&mut self.fd.get_kvm_run().immediate_exit));
        if !self.run.enter_with(Some((self.index, &self.fd))) {
            self.guest_loop();
        }
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        self.run.thread_done();
    }

    /// Finishes the port or MMIO access of the last exit before the vCPU parks: KVM completes it (an IN's
    /// data into the register, the instruction pointer past the instruction) only on the next KVM_RUN, and
    /// the registers read meanwhile would still point at the instruction (a saved state would repeat it).
    /// KVM_RUN with `immediate_exit` set completes it and returns at once, running no guest instruction.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        // Completing a string I/O instruction may need more of its accesses served first (bounded).
        for _ in 0..64 {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::IoOut(..)) => self.port_io(),
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.mmio.read(addr, data);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break,
                Err(e) => {
                    log::debug!("vCPU {}: completing its last exit before parking: {e}", self.index);
                    break;
                }
                Ok(other) => {
                    log::debug!("vCPU {}: completing its last exit before parking: {other:?}", self.index);
                    break;
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Enters the guest again and again until the boot is stopped.
    fn guest_loop(&mut self) {
        loop {
            if self.run.attention.load(Ordering::Acquire) {
                self.complete_pending_io();
                if self.run.checkpoint_with(Some((self.index, &self.fd))) {
                    break;
                }
            }
            if self.machine.is_pending() {
                // A reset, power-off or crash is being handled: wait to be told to exit.
                if self.run.checkpoint_until_exit(Some((self.index, &self.fd))) {
                    break;
                }
            }
            let start = Instant::now();
            let result = self.fd.run();
            let elapsed = start.elapsed().as_nanos() as u64;
            self.counters.vcpu_run_ns.fetch_add(elapsed, Ordering::Relaxed);
            match result {
                Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::IoOut(..)) => self.port_io(),
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    bump(&self.counters.exits_mmio_read);
                    self.mmio.read(addr, data);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    bump(&self.counters.exits_mmio_write);
                    self.mmio.write(addr, data);
                }
                Ok(VcpuExit::Hlt) => bump(&self.counters.exits_hlt),
                Ok(VcpuExit::Shutdown) => {
                    bump(&self.counters.exits_shutdown);
                    let at = self.where_am_i();
                    self.crash(format!("triple fault (the guest shut the CPU down) at {at}"));
                }
                Ok(VcpuExit::InternalError) => {
                    bump(&self.counters.exits_internal_error);
                    let run = self.fd.get_kvm_run();
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is active.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    let kind = match internal.suberror {
                        1 => "emulation failure: KVM cannot emulate an instruction",
                        2 => "simultaneous exceptions",
                        3 => "delivery event failure",
                        _ => "internal error",
                    };
                    let ndata = (internal.ndata as usize).min(internal.data.len());
                    let data: Vec<String> = internal.data[..ndata].iter().map(|d| format!("{d:#x}")).collect();
                    let at = self.where_am_i();
                    self.crash(format!(
                        "KVM {kind} (suberror {}, data [{}]) at {at}",
                        internal.suberror,
                        data.join(", ")
                    ));
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    bump(&self.counters.exits_system_event);
                    match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => self.machine.request(MachineRequest::PowerOff),
                        KVM_SYSTEM_EVENT_RESET => self.machine.request(MachineRequest::Reset),
                        KVM_SYSTEM_EVENT_CRASH => self.crash("the guest reported a crash (system event)".into()),
                        other => log::warn!("vCPU {}: ignoring system event {other}", self.index),
                    }
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    bump(&self.counters.exits_other);
                    self.crash(format!("KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"));
                }
                Ok(VcpuExit::Intr) => bump(&self.counters.exits_interrupted),
                Ok(_) => bump(&self.counters.exits_other),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    bump(&self.counters.exits_interrupted);
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    self.crash(format!("KVM_RUN failed: {e}"));
                }
            }
        }
    }
}

impl RunControl {
    /// Waits (parked) until the boot is stopped; returns true then.
    fn checkpoint_until_exit(&self, own: Own) -> bool {
        let mut s = lock(&self.state);
        while !s.exiting {
            s.parked += 1;
            self.changed.notify_all();
            s = self.serve_job(s, own);
            if !s.exiting && !Self::job_for(&s, own) {
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.parked -= 1;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a vCPU thread does with its RunControl, without KVM: waits for `go`, enters (reporting on
    /// `entered` whether it was told to exit at once), then "runs the guest" (spins) until told to exit.
    fn vcpu_thread(
        run: Arc<RunControl>,
        go: std::sync::mpsc::Receiver<()>,
        entered: std::sync::mpsc::Sender<bool>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            go.recv().unwrap();
            let at_once = run.enter();
            entered.send(at_once).unwrap();
            if !at_once {
                while !(run.attention.load(Ordering::Acquire) && run.checkpoint()) {
                    std::thread::yield_now();
                }
            }
            run.thread_done();
        })
    }

    #[test]
    fn a_job_asked_before_the_boot_opens_waits_for_its_vcpus_to_park() {
        // A restored VM: the pause holds before the boot opens (no vCPU yet), then its thread parks on its
        // way in; the job waits for it instead of finding "0 of 1 vCPUs stopped". The parked thread is
        // kicked as a vCPU is: without the handler the kick signal would end the test process.
        install_kick_handler().unwrap();
        let run = Arc::new(RunControl::default());
        run.pause(Duration::from_secs(1)).unwrap();
        run.begin_boot(1);
        let r = run.clone();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            r.enter()
        });
        let job = VcpuJob::new(Box::new(|_, _| Ok(Vec::new())));
        // The test's vCPU thread has no vCPU to do the job on: it parks, and the job times out waiting for
        // its answer — past the "stopped" check.
        let e = run.run_job(job, Duration::from_millis(500)).unwrap_err();
        assert!(e.contains("answered within"), "{e}");
        run.stop_boot();
        assert!(late.join().unwrap(), "the parked thread leaves when the boot stops");
    }

    /// Regression: after a reset the previous boot's stop stayed in force until the new boot's threads were
    /// registered, which happened after they were spawned; a new vCPU thread that got to its first check
    /// first (a loaded host) left at once, and the rebooted guest never ran (boots counted, no output).
    #[test]
    fn a_new_boots_vcpus_run_although_the_previous_boot_was_stopped() {
        install_kick_handler().unwrap();
        let run = Arc::new(RunControl::default());
        for boot in 1..=3 {
            run.begin_boot(1);
            let (go, wait) = std::sync::mpsc::channel();
            let (entered_tx, entered) = std::sync::mpsc::channel();
            let vcpu = vcpu_thread(run.clone(), wait, entered_tx);
            go.send(()).unwrap(); // the thread starts before anything else happens to this boot
            assert!(!entered.recv().unwrap(), "boot {boot}: the new vCPU was told to exit before it ran");
            // And it is still there: a pause finds it and it parks.
            run.pause(Duration::from_secs(60)).unwrap();
            assert_eq!(lock(&run.state).parked, 1, "boot {boot}: the vCPU is parked, not gone");
            run.resume();
            run.stop_boot();
            vcpu.join().unwrap();
        }
    }

    /// A pause that begins before a vCPU thread has started waits for it to park, rather than reporting every
    /// vCPU stopped while one is about to run the guest.
    #[test]
    fn a_pause_waits_for_vcpus_that_have_not_started() {
        install_kick_handler().unwrap();
        let run = Arc::new(RunControl::default());
        run.begin_boot(1);
        let (go, wait) = std::sync::mpsc::channel();
        let (entered_tx, _entered) = std::sync::mpsc::channel();
        let vcpu = vcpu_thread(run.clone(), wait, entered_tx);
        let pauser = {
            let run = run.clone();
            std::thread::spawn(move || run.pause(Duration::from_secs(60)))
        };
        while !run.is_paused() {
            std::thread::yield_now();
        }
        go.send(()).unwrap();
        pauser.join().unwrap().unwrap();
        assert_eq!(lock(&run.state).parked, 1, "the late vCPU parked before the pause returned");
        run.resume();
        run.stop_boot();
        vcpu.join().unwrap();
    }

    /// A pause that lands before the boot is opened (a VM paused right after it was started) holds the boot's
    /// vCPUs before their first run, and the counts stay right: once resumed, they run and can be paused
    /// again. (The parked count used to be zeroed under a vCPU already parked, which then underflowed it
    /// on resume: a panic that ended the vCPU thread in debug builds.)
    #[test]
    fn a_pause_before_the_boot_opens_holds_its_vcpus_until_resumed() {
        install_kick_handler().unwrap();
        let run = Arc::new(RunControl::default());
        run.pause(Duration::from_secs(60)).unwrap();
        run.begin_boot(1);
        let (go, wait) = std::sync::mpsc::channel();
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let vcpu = vcpu_thread(run.clone(), wait, entered_tx);
        go.send(()).unwrap();
        run.pause(Duration::from_secs(60)).unwrap();
        assert_eq!(lock(&run.state).parked, 1, "the vCPU parked before its first run");
        assert!(entered.try_recv().is_err(), "the vCPU did not get past its entry while paused");
        run.resume();
        assert!(!entered.recv().unwrap(), "once resumed, the vCPU runs");
        run.pause(Duration::from_secs(60)).unwrap();
        assert_eq!(lock(&run.state).parked, 1);
        run.resume();
        run.stop_boot();
        vcpu.join().unwrap();
    }
}
