//! Keys: X11 keysyms (RFB KeyEvent) and QEMU "XT" keycodes (QEMU extended key event) to PC keys, named
//! by their scan code set 1 code (`0xE0xx` for the extended keys).

/// A PC key: its set-1 make code, with 0xE000 added for keys sent with the 0xE0 prefix.
pub type Key = u16;

pub const EXTENDED: u16 = 0xE000;
pub const PRINT_SCREEN: Key = EXTENDED | 0x37;

/// The US-layout key that types a printable ASCII character (shifted or not).
fn ascii_key(c: u8) -> Option<Key> {
    const ROWS: [(&[u8], &[u8], u16); 4] = [
        (b"1234567890-=", b"!@#$%^&*()_+", 0x02),
        (b"qwertyuiop[]", b"QWERTYUIOP{}", 0x10),
        (b"asdfghjkl;'`", b"ASDFGHJKL:\"~", 0x1E),
        (b"\\zxcvbnm,./", b"|ZXCVBNM<>?", 0x2B),
    ];
    if c == b' ' {
        return Some(0x39);
    }
    for (plain, shifted, first) in ROWS {
        if let Some(i) = plain.iter().position(|&p| p == c).or_else(|| shifted.iter().position(|&p| p == c)) {
            return Some(first + i as u16);
        }
    }
    None
}

/// The key of an X11 keysym, for a US keyboard layout.
pub fn keysym_to_key(keysym: u32) -> Option<Key> {
    if (0x20..0x7F).contains(&keysym) {
        return ascii_key(keysym as u8);
    }
    let key = match keysym {
        0xFF08 => 0x0E,                                     // BackSpace
        0xFF09 | 0xFE20 => 0x0F,                            // Tab, ISO_Left_Tab
        0xFF0D => 0x1C,                                     // Return
        0xFF1B => 0x01,                                     // Escape
        0xFFE1 => 0x2A,                                     // Shift_L
        0xFFE2 => 0x36,                                     // Shift_R
        0xFFE3 => 0x1D,                                     // Control_L
        0xFFE4 => EXTENDED | 0x1D,                          // Control_R
        0xFFE9 | 0xFFE7 => 0x38,                            // Alt_L, Meta_L
        0xFFEA | 0xFFE8 | 0xFE03 => EXTENDED | 0x38,        // Alt_R, Meta_R, ISO_Level3_Shift (AltGr)
        0xFFEB => EXTENDED | 0x5B,                          // Super_L
        0xFFEC => EXTENDED | 0x5C,                          // Super_R
        0xFF67 => EXTENDED | 0x5D,                          // Menu
        0xFFE5 => 0x3A,                                     // Caps_Lock
        0xFF7F => 0x45,                                     // Num_Lock
        0xFF14 => 0x46,                                     // Scroll_Lock
        0xFF61 | 0xFF15 => PRINT_SCREEN,                    // Print, Sys_Req
        0xFFBE..=0xFFC7 => 0x3B + (keysym - 0xFFBE) as u16, // F1..F10
        0xFFC8 => 0x57,                                     // F11
        0xFFC9 => 0x58,                                     // F12
        0xFF50 => EXTENDED | 0x47,                          // Home
        0xFF51 => EXTENDED | 0x4B,                          // Left
        0xFF52 => EXTENDED | 0x48,                          // Up
        0xFF53 => EXTENDED | 0x4D,                          // Right
        0xFF54 => EXTENDED | 0x50,                          // Down
        0xFF55 => EXTENDED | 0x49,                          // Page_Up
        0xFF56 => EXTENDED | 0x51,                          // Page_Down
        0xFF57 => EXTENDED | 0x4F,                          // End
        0xFF63 => EXTENDED | 0x52,                          // Insert
        0xFFFF => EXTENDED | 0x53,                          // Delete
        0xFF8D => EXTENDED | 0x1C,                          // KP_Enter
        0xFFAF => EXTENDED | 0x35,                          // KP_Divide
        0xFFAA => 0x37,                                     // KP_Multiply
        0xFFAD => 0x4A,                                     // KP_Subtract
        0xFFAB => 0x4E,                                     // KP_Add
        0xFFAE | 0xFF9F => 0x53,                            // KP_Decimal, KP_Delete
        0xFFB7 | 0xFF95 => 0x47,                            // KP_7, KP_Home
        0xFFB8 | 0xFF97 => 0x48,                            // KP_8, KP_Up
        0xFFB9 | 0xFF9A => 0x49,                            // KP_9, KP_Prior
        0xFFB4 | 0xFF96 => 0x4B,                            // KP_4, KP_Left
        0xFFB5 | 0xFF9D => 0x4C,                            // KP_5, KP_Begin
        0xFFB6 | 0xFF98 => 0x4D,                            // KP_6, KP_Right
        0xFFB1 | 0xFF9C => 0x4F,                            // KP_1, KP_End
        0xFFB2 | 0xFF99 => 0x50,                            // KP_2, KP_Down
        0xFFB3 | 0xFF9B => 0x51,                            // KP_3, KP_Next
        0xFFB0 | 0xFF9E => 0x52,                            // KP_0, KP_Insert
        _ => return None,
    };
    Some(key)
}

/// The key of a QEMU extended key event keycode (XT numbering, 0x80 set for 0xE0-prefixed keys).
pub fn qemu_keycode_to_key(keycode: u32) -> Option<Key> {
    match keycode {
        0x01..=0x7F => Some(keycode as u16),
        0x81..=0xFF => Some(EXTENDED | (keycode as u16 & 0x7F)),
        _ => None,
    }
}

/// (set 1, set 2) make codes of every key we send; set-1 codes with 0xE000 for the E0 prefix.
const SET2: &[(u16, u8)] = &[
    (0x01, 0x76),
    (0x02, 0x16),
    (0x03, 0x1E),
    (0x04, 0x26),
    (0x05, 0x25),
    (0x06, 0x2E),
    (0x07, 0x36),
    (0x08, 0x3D),
    (0x09, 0x3E),
    (0x0A, 0x46),
    (0x0B, 0x45),
    (0x0C, 0x4E),
    (0x0D, 0x55),
    (0x0E, 0x66),
    (0x0F, 0x0D),
    (0x10, 0x15),
    (0x11, 0x1D),
    (0x12, 0x24),
    (0x13, 0x2D),
    (0x14, 0x2C),
    (0x15, 0x35),
    (0x16, 0x3C),
    (0x17, 0x43),
    (0x18, 0x44),
    (0x19, 0x4D),
    (0x1A, 0x54),
    (0x1B, 0x5B),
    (0x1C, 0x5A),
    (0x1D, 0x14),
    (0x1E, 0x1C),
    (0x1F, 0x1B),
    (0x20, 0x23),
    (0x21, 0x2B),
    (0x22, 0x34),
    (0x23, 0x33),
    (0x24, 0x3B),
    (0x25, 0x42),
    (0x26, 0x4B),
    (0x27, 0x4C),
    (0x28, 0x52),
    (0x29, 0x0E),
    (0x2A, 0x12),
    (0x2B, 0x5D),
    (0x2C, 0x1A),
    (0x2D, 0x22),
    (0x2E, 0x21),
    (0x2F, 0x2A),
    (0x30, 0x32),
    (0x31, 0x31),
    (0x32, 0x3A),
    (0x33, 0x41),
    (0x34, 0x49),
    (0x35, 0x4A),
    (0x36, 0x59),
    (0x37, 0x7C),
    (0x38, 0x11),
    (0x39, 0x29),
    (0x3A, 0x58),
    (0x3B, 0x05),
    (0x3C, 0x06),
    (0x3D, 0x04),
    (0x3E, 0x0C),
    (0x3F, 0x03),
    (0x40, 0x0B),
    (0x41, 0x83),
    (0x42, 0x0A),
    (0x43, 0x01),
    (0x44, 0x09),
    (0x45, 0x77),
    (0x46, 0x7E),
    (0x47, 0x6C),
    (0x48, 0x75),
    (0x49, 0x7D),
    (0x4A, 0x7B),
    (0x4B, 0x6B),
    (0x4C, 0x73),
    (0x4D, 0x74),
    (0x4E, 0x79),
    (0x4F, 0x69),
    (0x50, 0x72),
    (0x51, 0x7A),
    (0x52, 0x70),
    (0x53, 0x71),
    (0x56, 0x61),
    (0x57, 0x78),
    (0x58, 0x07),
    (EXTENDED | 0x1C, 0x5A),
    (EXTENDED | 0x1D, 0x14),
    (EXTENDED | 0x35, 0x4A),
    (EXTENDED | 0x38, 0x11),
    (EXTENDED | 0x47, 0x6C),
    (EXTENDED | 0x48, 0x75),
    (EXTENDED | 0x49, 0x7D),
    (EXTENDED | 0x4B, 0x6B),
    (EXTENDED | 0x4D, 0x74),
    (EXTENDED | 0x4F, 0x69),
    (EXTENDED | 0x50, 0x72),
    (EXTENDED | 0x51, 0x7A),
    (EXTENDED | 0x52, 0x70),
    (EXTENDED | 0x53, 0x71),
    (EXTENDED | 0x5B, 0x1F),
    (EXTENDED | 0x5C, 0x27),
    (EXTENDED | 0x5D, 0x2F),
];

/// The bytes a keyboard sends for `key` in scan code set 1.
pub fn set1_bytes(key: Key, down: bool) -> Vec<u8> {
    if key == PRINT_SCREEN {
        return if down { vec![0xE0, 0x2A, 0xE0, 0x37] } else { vec![0xE0, 0xB7, 0xE0, 0xAA] };
    }
    let code = (key & 0x7F) as u8 | if down { 0 } else { 0x80 };
    if key & EXTENDED != 0 { vec![0xE0, code] } else { vec![code] }
}

/// The bytes a keyboard sends for `key` in scan code set 2 (None for keys without a set-2 code here).
pub fn set2_bytes(key: Key, down: bool) -> Option<Vec<u8>> {
    if key == PRINT_SCREEN {
        return Some(if down { vec![0xE0, 0x12, 0xE0, 0x7C] } else { vec![0xE0, 0xF0, 0x7C, 0xE0, 0xF0, 0x12] });
    }
    let code = SET2.iter().find(|(k, _)| *k == key)?.1;
    let mut bytes = Vec::with_capacity(3);
    if key & EXTENDED != 0 {
        bytes.push(0xE0);
    }
    if !down {
        bytes.push(0xF0);
    }
    bytes.push(code);
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keysyms_of_a_us_keyboard() {
        assert_eq!(keysym_to_key(u32::from(b'a')), Some(0x1E));
        assert_eq!(keysym_to_key(u32::from(b'A')), Some(0x1E));
        assert_eq!(keysym_to_key(u32::from(b'!')), Some(0x02));
        assert_eq!(keysym_to_key(u32::from(b'/')), Some(0x35));
        assert_eq!(keysym_to_key(u32::from(b' ')), Some(0x39));
        assert_eq!(keysym_to_key(0xFF0D), Some(0x1C));
        assert_eq!(keysym_to_key(0xFFC9), Some(0x58));
        assert_eq!(keysym_to_key(0xFF52), Some(EXTENDED | 0x48));
        assert_eq!(keysym_to_key(0x20AC), None, "euro sign: no US key");
    }

    #[test]
    fn scan_code_sets() {
        assert_eq!(set1_bytes(0x1E, true), [0x1E]);
        assert_eq!(set1_bytes(0x1E, false), [0x9E]);
        assert_eq!(set1_bytes(EXTENDED | 0x48, false), [0xE0, 0xC8]);
        assert_eq!(set2_bytes(0x1E, true), Some(vec![0x1C]));
        assert_eq!(set2_bytes(0x1E, false), Some(vec![0xF0, 0x1C]));
        assert_eq!(set2_bytes(EXTENDED | 0x48, false), Some(vec![0xE0, 0xF0, 0x75]));
        assert_eq!(qemu_keycode_to_key(0x9C), Some(EXTENDED | 0x1C));
        assert_eq!(qemu_keycode_to_key(0x1E), Some(0x1E));
        assert_eq!(qemu_keycode_to_key(0x1234), None);
        // Every key we can produce from a keysym has a set-2 code.
        for keysym in (0x20..0x7F).chain(0xFF00..=0xFFFF) {
            if let Some(key) = keysym_to_key(keysym) {
                assert!(set2_bytes(key, true).is_some(), "keysym {keysym:#x} -> key {key:#x}");
            }
        }
    }
}
