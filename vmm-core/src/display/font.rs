//! The console font: code page 437 in 8×16 cells, built from the public-domain font8x8 glyphs (each 8×8
//! glyph drawn with doubled scan lines). Characters font8x8 lacks are drawn as a hollow box.

use std::sync::OnceLock;

use font8x8::UnicodeFonts;

/// Code page 437, as the VGA text mode shows it.
const CP437: &str = "\u{0}☺☻♥♦♣♠•◘○◙♂♀♪♫☼►◄↕‼¶§▬↨↑↓→←∟↔▲▼ !\"#$%&'()*+,-./0123456789:;<=>?\
@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~⌂\
ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐\
└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u{a0}";

pub const GLYPH_WIDTH: usize = 8;
pub const GLYPH_HEIGHT: usize = 16;

/// One glyph: 16 rows, bit 0 is the leftmost pixel.
pub type Glyph = [u8; GLYPH_HEIGHT];

fn lookup(c: char) -> Option<[u8; 8]> {
    font8x8::BASIC_FONTS
        .get(c)
        .or_else(|| font8x8::LATIN_FONTS.get(c))
        .or_else(|| font8x8::BOX_FONTS.get(c))
        .or_else(|| font8x8::BLOCK_FONTS.get(c))
        .or_else(|| font8x8::GREEK_FONTS.get(c))
        .or_else(|| font8x8::MISC_FONTS.get(c))
}

const MISSING: [u8; 8] = [0x00, 0x7E, 0x42, 0x42, 0x42, 0x42, 0x7E, 0x00];

/// The 256 glyphs of code page 437.
pub fn glyphs() -> &'static [Glyph; 256] {
    static GLYPHS: OnceLock<[Glyph; 256]> = OnceLock::new();
    GLYPHS.get_or_init(|| {
        let mut out = [[0u8; GLYPH_HEIGHT]; 256];
        for (code, c) in CP437.chars().enumerate().take(256) {
            let small = match c {
                '\u{0}' | ' ' | '\u{a0}' => [0; 8],
                _ => lookup(c).unwrap_or(MISSING),
            };
            for (row, bits) in small.iter().enumerate() {
                out[code][row * 2] = *bits;
                out[code][row * 2 + 1] = *bits;
            }
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_page_437_has_256_characters_and_real_glyphs() {
        assert_eq!(CP437.chars().count(), 256);
        let g = glyphs();
        assert_eq!(g[0], [0; 16]);
        assert_eq!(g[b' ' as usize], [0; 16]);
        for code in [b'A', b'z', b'0', 0xC9 /* ╔ */, 0xDB /* █ */, 0xE1 /* ß */] {
            assert!(g[code as usize].iter().any(|r| *r != 0), "glyph {code:#x} is empty");
        }
        assert_eq!(g[0xDB], [0xFF; 16], "full block");
        assert_ne!(g[b'A' as usize], g[b'B' as usize]);
    }
}
