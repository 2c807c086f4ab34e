//! A contact sheet of samples with their captions, for people to look at.
//!
//! Numbers cannot tell whether a heart looks like a heart; a person glancing
//! at a grid of pictures with their captions underneath can. Text is drawn
//! with the public-domain 8×8 bitmap font so no font files are needed.

use font8x8::legacy::BASIC_LEGACY;
use image::{Rgb, RgbImage, imageops};

use super::layout::CANVAS_SIZE;
use super::sample::sample;

/// Each sample is enlarged by this factor (nearest neighbour) to be seen.
const IMAGE_SCALE: u32 = 2;
/// Gap, in pixels, around each picture and its caption.
const PADDING: u32 = 4;
/// Side of one glyph of the bitmap font, in pixels.
const GLYPH_SIDE: u32 = 8;
/// Vertical distance between caption lines, in pixels.
const LINE_HEIGHT: u32 = 10;
const SHEET_COLOR: Rgb<u8> = Rgb([222, 222, 222]);
const TEXT_COLOR: Rgb<u8> = Rgb([24, 24, 24]);

/// A `columns` × `rows` grid of samples `0, 1, …` (row by row) of the data
/// set with the given seed, each picture enlarged 2× with its caption
/// written underneath, wrapped to the picture's width.
pub fn sample_grid(seed: u64, columns: u32, rows: u32) -> RgbImage {
    let picture_side = CANVAS_SIZE * IMAGE_SCALE;
    let characters_per_line = (picture_side / GLYPH_SIDE) as usize;
    let cells: Vec<(RgbImage, Vec<String>)> = (0..u64::from(columns) * u64::from(rows))
        .map(|index| {
            let drawn = sample(seed, index);
            let picture = imageops::resize(
                &drawn.image,
                picture_side,
                picture_side,
                imageops::FilterType::Nearest,
            );
            (picture, wrap(&drawn.caption.text(), characters_per_line))
        })
        .collect();
    let most_lines = cells
        .iter()
        .map(|(_, lines)| lines.len())
        .max()
        .unwrap_or(0) as u32;
    let cell_width = picture_side + 2 * PADDING;
    let cell_height = PADDING + picture_side + PADDING + most_lines * LINE_HEIGHT + PADDING;
    let mut sheet = RgbImage::from_pixel(columns * cell_width, rows * cell_height, SHEET_COLOR);
    for (index, (picture, lines)) in cells.iter().enumerate() {
        let left = (index as u32 % columns) * cell_width + PADDING;
        let top = (index as u32 / columns) * cell_height + PADDING;
        imageops::replace(&mut sheet, picture, i64::from(left), i64::from(top));
        for (line_number, line) in lines.iter().enumerate() {
            let baseline_top = top + picture_side + PADDING + line_number as u32 * LINE_HEIGHT;
            draw_text(&mut sheet, line, left, baseline_top);
        }
    }
    sheet
}

/// Splits `text` into lines of at most `width` characters, breaking between
/// words, and inside a word only when the word alone is too long.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for word in text.split_whitespace() {
        let needed = if current.is_empty() {
            word.len()
        } else {
            current.len() + 1 + word.len()
        };
        if needed > width && !current.is_empty() {
            lines.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(word);
        while current.len() > width {
            let rest = current.split_off(width);
            lines.push(std::mem::replace(&mut current, rest));
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

/// Writes ASCII `text` with its top-left corner at (`left`, `top`); other
/// characters are left blank. Bit i of each glyph row is column i.
fn draw_text(image: &mut RgbImage, text: &str, left: u32, top: u32) {
    for (position, character) in text.chars().enumerate() {
        let Some(glyph) = BASIC_LEGACY.get(character as usize) else {
            continue;
        };
        let glyph_left = left + position as u32 * GLYPH_SIDE;
        for (row, bits) in glyph.iter().enumerate() {
            for column in 0..GLYPH_SIDE {
                let (x, y) = (glyph_left + column, top + row as u32);
                if bits >> column & 1 == 1 && x < image.width() && y < image.height() {
                    image.put_pixel(x, y, TEXT_COLOR);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_breaks_between_words_and_keeps_every_word() {
        let text = "a small yellow triangle in the bottom right on a white background";
        let lines = wrap(text, 16);
        assert!(lines.iter().all(|line| line.len() <= 16));
        assert_eq!(lines.join(" "), text);
        assert_eq!(lines[0], "a small yellow");
        assert_eq!(wrap("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
    }

    #[test]
    fn grid_has_one_cell_per_sample_with_text_under_each_picture() {
        let sheet = sample_grid(1, 3, 2);
        let cell_width = CANVAS_SIZE * IMAGE_SCALE + 2 * PADDING;
        assert_eq!(sheet.width(), 3 * cell_width);
        assert_eq!(sheet.height() % 2, 0);
        let first_line_top = PADDING + CANVAS_SIZE * IMAGE_SCALE + PADDING;
        let text_pixels = (first_line_top..first_line_top + GLYPH_SIDE)
            .flat_map(|y| (PADDING..cell_width - PADDING).map(move |x| (x, y)))
            .filter(|&(x, y)| *sheet.get_pixel(x, y) == TEXT_COLOR)
            .count();
        assert!(text_pixels > 20);
    }
}
