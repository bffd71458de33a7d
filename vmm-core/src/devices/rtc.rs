//! The CMOS real-time clock and NVRAM (MC146818) at ports 0x70 (index) and 0x71 (data).
//!
//! The clock runs on the host's UTC clock plus an offset the guest may change by setting the time. BCD
//! and binary, 12 and 24 hour modes follow status register B. The NVRAM keeps what the guest writes across
//! machine resets (the device outlives a reboot), as on a PC. It also reports the memory size the way
//! firmware reads it (the registers QEMU fills).

use std::time::{SystemTime, UNIX_EPOCH};

use super::BusDevice;

pub const RTC_PORT: u16 = 0x70;
/// The CMOS register holding the century, named in the FADT.
pub const CENTURY_REGISTER: u8 = 0x32;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const STATUS_A: usize = 0x0A;
const STATUS_B: usize = 0x0B;
const STATUS_C: usize = 0x0C;
const STATUS_D: usize = 0x0D;
const CENTURY: usize = CENTURY_REGISTER as usize;

const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl DateTime {
    /// The time `secs` seconds after the Unix epoch.
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
        }
    }

    /// Seconds since the Unix epoch.
    pub fn to_unix(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    /// Day of the week, 1 = Sunday, as the RTC counts.
    pub fn weekday(&self) -> u32 {
        // 1970-01-01 was a Thursday.
        ((days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) + 1) as u32
    }
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0x0F)
}

/// The CMOS device.
pub struct Rtc {
    index: usize,
    nvram: [u8; 128],
    /// Guest time minus host time, in seconds.
    offset: i64,
    /// The host clock; replaceable in tests.
    now: fn() -> i64,
}

fn host_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl Rtc {
    /// A clock set to the host's UTC time, with memory-size registers for a guest of `mem_bytes` bytes and
    /// `vcpus` CPUs.
    pub fn new(mem_bytes: u64, vcpus: u32) -> Self {
        Self::with_clock(mem_bytes, vcpus, host_now)
    }

    /// Records the machine's CPU count in CMOS (0x5F, as QEMU keeps it for SeaBIOS), after vCPUs are added.
    pub fn set_cpus(&mut self, vcpus: u32) {
        self.nvram[0x5F] = vcpus.saturating_sub(1).min(255) as u8;
    }

    fn with_clock(mem_bytes: u64, vcpus: u32, now: fn() -> i64) -> Self {
        let mut nvram = [0u8; 128];
        nvram[STATUS_A] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        nvram[STATUS_B] = B_24H;
        nvram[STATUS_D] = 0x80; // valid RAM and time
        // Base memory: 640 KiB.
        nvram[0x15] = 0x80;
        nvram[0x16] = 0x02;
        // Extended memory above 1 MiB in KiB (at most 0xFFFF), in both the legacy and the POST copy.
        let ext_kib = ((mem_bytes.min(0xC000_0000).saturating_sub(1 << 20)) >> 10).min(0xFFFF) as u16;
        nvram[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        nvram[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        // Memory above 16 MiB (below 4 GiB) in 64 KiB units.
        let above_16m = ((mem_bytes.min(0xC000_0000).saturating_sub(16 << 20)) >> 16).min(0xFFFF) as u16;
        nvram[0x34..0x36].copy_from_slice(&above_16m.to_le_bytes());
        // Memory above 4 GiB in 64 KiB units (24 bits).
        let above_4g = (mem_bytes.saturating_sub(0xC000_0000) >> 16).min(0xFF_FFFF) as u32;
        nvram[0x5B..0x5E].copy_from_slice(&above_4g.to_le_bytes()[..3]);
        nvram[0x5F] = vcpus.saturating_sub(1).min(255) as u8;
        Rtc { index: 0, nvram, offset: 0, now }
    }

    /// Sets a CMOS byte (what firmware set-up stores there, e.g. the boot order).
    pub fn set_nvram(&mut self, index: u8, value: u8) {
        if let Some(b) = self.nvram.get_mut(usize::from(index)) {
            *b = value;
        }
    }

    /// Reads a CMOS byte as stored.
    pub fn nvram(&self, index: u8) -> u8 {
        self.nvram.get(usize::from(index)).copied().unwrap_or(0)
    }

    fn binary(&self) -> bool {
        self.nvram[STATUS_B] & B_BINARY != 0
    }

    fn encode(&self, v: u32) -> u8 {
        if self.binary() { v as u8 } else { to_bcd(v) }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.binary() { u32::from(v) } else { from_bcd(v) }
    }

    /// The guest's current time.
    pub fn guest_time(&self) -> DateTime {
        DateTime::from_unix((self.now)() + self.offset)
    }

    fn read_register(&mut self, index: usize) -> u8 {
        let t = self.guest_time();
        match index {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => {
                if self.nvram[STATUS_B] & B_24H != 0 {
                    self.encode(t.hour)
                } else {
                    let h12 = if t.hour.is_multiple_of(12) { 12 } else { t.hour % 12 };
                    self.encode(h12) | if t.hour >= 12 { 0x80 } else { 0 }
                }
            }
            WEEKDAY => self.encode(t.weekday()),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode(t.year.rem_euclid(100) as u32),
            CENTURY => self.encode(t.year.div_euclid(100).clamp(0, 99) as u32),
            STATUS_A => self.nvram[STATUS_A] & 0x7F, // update-in-progress never set
            STATUS_C => std::mem::take(&mut self.nvram[STATUS_C]),
            _ => self.nvram[index],
        }
    }

    fn write_register(&mut self, index: usize, value: u8) {
        let mut t = self.guest_time();
        let field = |rtc: &Self| rtc.decode(value & 0x7F);
        match index {
            SECONDS => t.second = field(self).min(59),
            MINUTES => t.minute = field(self).min(59),
            HOURS => {
                let h = field(self) % 24;
                t.hour = if self.nvram[STATUS_B] & B_24H != 0 {
                    h
                } else {
                    (h % 12) + if value & 0x80 != 0 { 12 } else { 0 }
                };
            }
            DAY => t.day = self.decode(value).clamp(1, 31),
            MONTH => t.month = self.decode(value).clamp(1, 12),
            YEAR => t.year = t.year.div_euclid(100) * 100 + i64::from(self.decode(value) % 100),
            CENTURY => t.year = i64::from(self.decode(value) % 100) * 100 + t.year.rem_euclid(100),
            WEEKDAY => return, // derived from the date
            STATUS_C | STATUS_D => return,
            STATUS_B => {
                self.nvram[STATUS_B] = value & !0x78 | (value & B_SET); // no periodic/alarm/update IRQs
                return;
            }
            _ => {
                self.nvram[index] = value;
                return;
            }
        }
        self.offset = t.to_unix() - (self.now)();
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
        if data.len() == 1 && offset == 1 {
            data[0] = self.read_register(self.index);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            0 => self.index = usize::from(data[0] & 0x7F), // bit 7 masks NMIs
            1 => self.write_register(self.index, data[0]),
            _ => {}
        }
    }
}

impl crate::snapshot::DeviceState for Rtc {
    fn save(&self, w: &mut crate::snapshot::Writer) {
        w.u8(self.index as u8);
        w.bytes(&self.nvram);
        w.i64(self.offset);
    }

    fn restore(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let index = usize::from(r.u8()?) % 128;
        let nvram = r.fixed::<128>()?;
        let offset = r.i64()?;
        (self.index, self.nvram, self.offset) = (index, nvram, offset);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-27 06:41:19 UTC, a Friday.
    const NOW: i64 = 1_795_761_679;

    fn rtc() -> Rtc {
        Rtc::with_clock(256 << 20, 2, || NOW)
    }

    fn get(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(0, &[index]);
        let mut v = [0];
        rtc.read(1, &mut v);
        v[0]
    }

    fn set(rtc: &mut Rtc, index: u8, value: u8) {
        rtc.write(0, &[index]);
        rtc.write(1, &[value]);
    }

    #[test]
    fn civil_conversions_round_trip() {
        let t = DateTime::from_unix(NOW);
        assert_eq!(t, DateTime { year: 2026, month: 11, day: 27, hour: 6, minute: 41, second: 19 });
        assert_eq!(t.to_unix(), NOW);
        assert_eq!(t.weekday(), 6, "Friday");
        for secs in [0, 951_782_400 /* 2000-02-29 */, 4_102_444_800 /* 2100-01-01 */, -86_400] {
            assert_eq!(DateTime::from_unix(secs).to_unix(), secs);
        }
        assert_eq!(DateTime::from_unix(951_782_400).day, 29);
    }

    #[test]
    fn reads_bcd_by_default_and_binary_on_request() {
        let mut r = rtc();
        assert_eq!(get(&mut r, 0x09), 0x26);
        assert_eq!(get(&mut r, 0x32), 0x20);
        assert_eq!(get(&mut r, 0x08), 0x11);
        assert_eq!(get(&mut r, 0x07), 0x27);
        assert_eq!(get(&mut r, 0x04), 0x06);
        assert_eq!(get(&mut r, 0x02), 0x41);
        assert_eq!(get(&mut r, 0x00), 0x19);
        assert_eq!(get(&mut r, 0x0D), 0x80);
        assert_eq!(get(&mut r, 0x0A) & 0x80, 0, "never updating");
        set(&mut r, 0x0B, B_24H | B_BINARY);
        assert_eq!(get(&mut r, 0x09), 26);
        assert_eq!(get(&mut r, 0x02), 41);
    }

    #[test]
    fn twelve_hour_mode_marks_pm() {
        let mut r = Rtc::with_clock(64 << 20, 1, || NOW + 8 * 3600); // 14:41
        set(&mut r, 0x0B, 0);
        assert_eq!(get(&mut r, 0x04), 0x80 | 0x02);
    }

    #[test]
    fn setting_the_time_moves_the_guest_clock_only() {
        let mut r = rtc();
        set(&mut r, 0x09, 0x30); // year 2030
        assert_eq!(get(&mut r, 0x09), 0x30);
        assert_eq!(r.guest_time().year, 2030);
        assert_eq!(get(&mut r, 0x02), 0x41, "other fields kept");
    }

    #[test]
    fn nvram_keeps_values_and_reports_memory() {
        let mut r = rtc();
        set(&mut r, 0x40, 0xAB);
        assert_eq!(get(&mut r, 0x40), 0xAB);
        assert_eq!(get(&mut r, 0x80 | 0x40), 0xAB, "bit 7 of the index masks NMIs");
        let above_16m = u16::from_le_bytes([get(&mut r, 0x34), get(&mut r, 0x35)]);
        assert_eq!(above_16m, ((256 - 16) << 20 >> 16) as u16);
        assert_eq!(get(&mut r, 0x5F), 1);
    }
}
