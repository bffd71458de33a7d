//! VNC authentication (RFB security type 2): a 16-byte challenge DES-encrypted with the password, whose
//! first eight bytes are the key with each byte's bits reversed.

use des::Des;
use des::cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray};

/// The DES key VNC derives from a password (first 8 bytes, zero-padded, bits of each byte reversed).
pub fn key_from_password(password: &[u8]) -> [u8; 8] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    key
}

/// The response a client with `key` gives to `challenge`.
pub fn response(key: &[u8; 8], challenge: &[u8; 16]) -> [u8; 16] {
    let cipher = Des::new_from_slice(key).expect("DES keys are 8 bytes");
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(GenericArray::from_mut_slice(block));
    }
    out
}

/// A fresh random challenge.
pub fn challenge() -> [u8; 16] {
    let mut c = [0u8; 16];
    // SAFETY: getrandom writes at most `c.len()` bytes into `c`.
    let n = unsafe { libc::getrandom(c.as_mut_ptr().cast(), c.len(), 0) };
    if n != c.len() as isize {
        // Never hand out a predictable challenge: mix in the time as a last resort.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        c[..16].copy_from_slice(&t.as_nanos().to_le_bytes());
    }
    c
}

/// Constant-time comparison of two responses.
pub fn matches(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer() {
        // DES of an all-zero block under the all-zero key is 8CA64DE9C1B123A7 (a standard test vector).
        let r = response(&[0; 8], &[0; 16]);
        assert_eq!(&r[..8], &[0x8C, 0xA6, 0x4D, 0xE9, 0xC1, 0xB1, 0x23, 0xA7]);
        assert_eq!(key_from_password(b"\x01\x80"), [0x80, 0x01, 0, 0, 0, 0, 0, 0]);
        assert_ne!(challenge(), challenge());
        assert!(matches(&r, &r) && !matches(&r, &[1; 16]));
    }
}
