//! VGA text mode drawn into the frame: 80×25 cells of (character, attribute) from guest RAM, code page 437
//! glyphs in 8×16 cells, the 16-colour CGA palette, and the hardware cursor.

use super::font::{GLYPH_HEIGHT, GLYPH_WIDTH, glyphs};
use super::{Frame, Rect};
use crate::devices::vga::TextCursor;

pub const COLUMNS: usize = 80;
pub const ROWS: usize = 25;
pub const CELLS: usize = COLUMNS * ROWS;
pub const WIDTH: u32 = (COLUMNS * GLYPH_WIDTH) as u32;
pub const HEIGHT: u32 = (ROWS * GLYPH_HEIGHT) as u32;
/// Guest physical address of the colour text buffer.
pub const TEXT_BUFFER: u64 = 0xB8000;

/// The 16 text colours (0x00RRGGBB).
pub const PALETTE: [u32; 16] = [
    0x000000, 0x0000AA, 0x00AA00, 0x00AAAA, 0xAA0000, 0xAA00AA, 0xAA5500, 0xAAAAAA, 0x555555, 0x5555FF, 0x55FF55,
    0x55FFFF, 0xFF5555, 0xFF55FF, 0xFFFF55, 0xFFFFFF,
];

/// Draws one cell: `cell` is character | attribute << 8; `cursor` the cursor's scan lines if it is here.
pub fn draw_cell(frame: &mut Frame, index: usize, cell: u16, cursor: Option<(u8, u8)>) {
    let (col, row) = (index % COLUMNS, index / COLUMNS);
    let [ch, attr] = cell.to_le_bytes();
    let fg = PALETTE[usize::from(attr & 0x0F)];
    let bg = PALETTE[usize::from(attr >> 4)]; // bit 7 as bright background (blinking disabled)
    let glyph = &glyphs()[usize::from(ch)];
    let width = frame.width as usize;
    for (line, bits) in glyph.iter().enumerate() {
        let in_cursor = cursor.is_some_and(|(first, last)| (first as usize..=last as usize).contains(&line));
        let y = row * GLYPH_HEIGHT + line;
        let start = y * width + col * GLYPH_WIDTH;
        for (x, px) in frame.pixels[start..start + GLYPH_WIDTH].iter_mut().enumerate() {
            let on = bits & (1 << x) != 0;
            *px = if on ^ in_cursor { fg } else { bg };
        }
    }
}

/// What the text screen showed last, to draw only what changed.
#[derive(Debug, Default)]
pub struct TextState {
    cells: Vec<u16>,
    cursor: Option<(usize, (u8, u8))>,
}

impl TextState {
    /// Forgets what was shown, so the next update redraws every cell.
    pub fn invalidate(&mut self) {
        self.cells.clear();
    }

    /// Draws the cells that differ from the last update (and the old and new cursor cells) into `frame`
    /// (which must be `WIDTH × HEIGHT`); returns the damaged rectangles, one per changed run in a row.
    pub fn update(&mut self, cells: &[u16], cursor: TextCursor, frame: &mut Frame) -> Vec<Rect> {
        let full = self.cells.len() != CELLS;
        let cursor_at = cursor.lines.and_then(|lines| {
            let at = usize::from(cursor.position.wrapping_sub(cursor.start));
            (at < CELLS).then_some((at, lines))
        });
        let mut changed = vec![full; CELLS];
        if !full {
            for (i, flag) in changed.iter_mut().enumerate() {
                *flag = self.cells[i] != cells[i];
            }
        }
        if self.cursor != cursor_at {
            for (at, _) in [self.cursor, cursor_at].into_iter().flatten() {
                changed[at] = true;
            }
        }
        let mut rects = Vec::new();
        for row in 0..ROWS {
            let mut col = 0;
            while col < COLUMNS {
                if !changed[row * COLUMNS + col] {
                    col += 1;
                    continue;
                }
                let first = col;
                while col < COLUMNS && changed[row * COLUMNS + col] {
                    let i = row * COLUMNS + col;
                    let here = cursor_at.filter(|(at, _)| *at == i).map(|(_, lines)| lines);
                    draw_cell(frame, i, cells[i], here);
                    col += 1;
                }
                rects.push(Rect::new(
                    (first * GLYPH_WIDTH) as u32,
                    (row * GLYPH_HEIGHT) as u32,
                    ((col - first) * GLYPH_WIDTH) as u32,
                    GLYPH_HEIGHT as u32,
                ));
            }
        }
        self.cells.clear();
        self.cells.extend_from_slice(cells);
        self.cursor = cursor_at;
        rects
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor_at(position: u16) -> TextCursor {
        TextCursor { position, lines: Some((14, 15)), start: 0 }
    }

    #[test]
    fn draws_glyph_pixels_in_attribute_colours() {
        let mut frame = Frame::new(WIDTH, HEIGHT);
        let mut cells = vec![0x0720u16; CELLS];
        cells[81] = u16::from(b'A') | 0x1F << 8; // row 1, column 1: white on blue
        let mut state = TextState::default();
        let rects = state.update(&cells, TextCursor { lines: None, ..cursor_at(0) }, &mut frame);
        assert_eq!(rects.len(), ROWS, "first update redraws every row");
        let glyph = glyphs()[b'A' as usize];
        for (line, bits) in glyph.iter().enumerate() {
            for x in 0..8 {
                let px = frame.pixels[(16 + line) * WIDTH as usize + 8 + x];
                let expected = if bits & (1 << x) != 0 { 0xFFFFFF } else { 0x0000AA };
                assert_eq!(px, expected, "line {line} x {x}");
            }
        }
    }

    #[test]
    fn only_changed_cells_and_the_cursor_are_redrawn() {
        let mut frame = Frame::new(WIDTH, HEIGHT);
        let mut cells = vec![0x0720u16; CELLS];
        let mut state = TextState::default();
        state.update(&cells, cursor_at(0), &mut frame);
        assert!(state.update(&cells, cursor_at(0), &mut frame).is_empty(), "nothing changed");
        cells[5] = 0x0741;
        cells[6] = 0x0742;
        assert_eq!(state.update(&cells, cursor_at(0), &mut frame), vec![Rect::new(40, 0, 16, 16)]);
        let moved = state.update(&cells, cursor_at(80 * 2 + 3), &mut frame);
        assert_eq!(moved, vec![Rect::new(0, 0, 8, 16), Rect::new(24, 32, 8, 16)]);
        // The cursor block inverts the cell's last two lines.
        assert_eq!(frame.pixels[(32 + 15) * WIDTH as usize + 24], PALETTE[7]);
    }
}
