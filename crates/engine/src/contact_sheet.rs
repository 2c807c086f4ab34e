//! Contact sheets: labelled grids of pictures, such as the Step Sweep node draws (step counts
//! across, models down). The labels are drawn with a font compiled into the binary, so a
//! headless run on a bare server writes the same sheet as the app.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};
use image::{Rgb, RgbImage, imageops};

/// Text height in pixels.
const TEXT_PX: f32 = 14.0;
/// Space around and between cells, in pixels.
const MARGIN: u32 = 10;
/// Pictures smaller than this on a side are enlarged (pixels repeated) to at least it.
const MIN_CELL_SIDE: u32 = 128;
const BACKGROUND: Rgb<u8> = Rgb([32, 33, 36]);
const TITLE_COLOUR: Rgb<u8> = Rgb([235, 235, 235]);
const CAPTION_COLOUR: Rgb<u8> = Rgb([170, 170, 170]);

/// One picture with the lines written under it.
pub struct SheetCell {
    pub image: RgbImage,
    pub caption: Vec<String>,
}

/// A row of cells with its title, written at its left.
pub struct SheetRow {
    pub title: String,
    pub cells: Vec<SheetCell>,
}

/// A grid of captioned pictures with a title over each column and at the left of each row.
pub struct ContactSheet {
    pub column_titles: Vec<String>,
    pub rows: Vec<SheetRow>,
}

impl ContactSheet {
    /// Draws the sheet. Every picture takes a cell as large as the largest one; small pictures
    /// are enlarged by a whole factor so their pixels stay sharp.
    pub fn render(&self) -> RgbImage {
        let font = FontRef::try_from_slice(epaint_default_fonts::HACK_REGULAR)
            .expect("the embedded Hack font parses");
        let text = Text {
            font: &font,
            scale: PxScale::from(TEXT_PX),
        };
        let cells = || self.rows.iter().flat_map(|row| &row.cells);
        let largest = cells()
            .map(|cell| cell.image.width().max(cell.image.height()))
            .max()
            .unwrap_or(1)
            .max(1);
        let zoom = MIN_CELL_SIDE.div_ceil(largest).max(1);
        let cell_side = largest * zoom;
        let caption_lines = cells().map(|cell| cell.caption.len()).max().unwrap_or(0) as u32;
        let line = text.line_height();
        let column_width = cell_side.max(
            cells()
                .flat_map(|cell| &cell.caption)
                .chain(&self.column_titles)
                .map(|s| text.width(s))
                .max()
                .unwrap_or(0),
        );
        let title_width = self
            .rows
            .iter()
            .map(|row| text.width(&row.title))
            .max()
            .unwrap_or(0);
        let row_height = cell_side + caption_lines * line + MARGIN;
        let columns = self.column_titles.len().max(
            self.rows
                .iter()
                .map(|row| row.cells.len())
                .max()
                .unwrap_or(0),
        ) as u32;
        let width = MARGIN + title_width + MARGIN + columns * (column_width + MARGIN);
        let height = MARGIN + line + MARGIN / 2 + self.rows.len() as u32 * row_height;
        let mut sheet = RgbImage::from_pixel(width, height, BACKGROUND);
        let column_x =
            |column: u32| MARGIN + title_width + MARGIN + column * (column_width + MARGIN);
        for (column, title) in self.column_titles.iter().enumerate() {
            let x = column_x(column as u32) + (column_width - text.width(title)) / 2;
            text.draw(&mut sheet, x, MARGIN, title, TITLE_COLOUR);
        }
        for (index, row) in self.rows.iter().enumerate() {
            let top = MARGIN + line + MARGIN / 2 + index as u32 * row_height;
            text.draw(
                &mut sheet,
                MARGIN,
                top + (cell_side.saturating_sub(line)) / 2,
                &row.title,
                TITLE_COLOUR,
            );
            for (column, cell) in row.cells.iter().enumerate() {
                let left = column_x(column as u32);
                let picture = imageops::resize(
                    &cell.image,
                    cell.image.width() * zoom,
                    cell.image.height() * zoom,
                    imageops::FilterType::Nearest,
                );
                let x = left + (column_width - picture.width()) / 2;
                imageops::replace(&mut sheet, &picture, x.into(), top.into());
                for (n, caption) in cell.caption.iter().enumerate() {
                    let x = left + (column_width - text.width(caption)) / 2;
                    let y = top + cell_side + n as u32 * line;
                    text.draw(&mut sheet, x, y, caption, CAPTION_COLOUR);
                }
            }
        }
        sheet
    }
}

/// Text in one font at one size.
struct Text<'a> {
    font: &'a FontRef<'a>,
    scale: PxScale,
}

impl Text<'_> {
    fn line_height(&self) -> u32 {
        let scaled = self.font.as_scaled(self.scale);
        (scaled.height() + scaled.line_gap()).ceil() as u32
    }

    fn width(&self, text: &str) -> u32 {
        let scaled = self.font.as_scaled(self.scale);
        text.chars()
            .map(|c| scaled.h_advance(self.font.glyph_id(c)))
            .sum::<f32>()
            .ceil() as u32
    }

    /// Writes `text` with its line's top at `top`, blending by each pixel's coverage.
    fn draw(&self, image: &mut RgbImage, left: u32, top: u32, text: &str, colour: Rgb<u8>) {
        let scaled = self.font.as_scaled(self.scale);
        let baseline = top as f32 + scaled.ascent();
        let mut caret = left as f32;
        for c in text.chars() {
            let id = self.font.glyph_id(c);
            let glyph = id.with_scale_and_position(self.scale, point(caret, baseline));
            caret += scaled.h_advance(id);
            let Some(outline) = self.font.outline_glyph(glyph) else {
                continue;
            };
            let bounds = outline.px_bounds();
            outline.draw(|gx, gy, coverage| {
                let x = bounds.min.x as i64 + gx as i64;
                let y = bounds.min.y as i64 + gy as i64;
                if x < 0 || y < 0 || x >= image.width() as i64 || y >= image.height() as i64 {
                    return;
                }
                let pixel = image.get_pixel_mut(x as u32, y as u32);
                let coverage = coverage.clamp(0.0, 1.0);
                for (channel, ink) in pixel.0.iter_mut().zip(colour.0) {
                    let blended = *channel as f32 * (1.0 - coverage) + ink as f32 * coverage;
                    *channel = blended.round() as u8;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(colour: [u8; 3]) -> SheetCell {
        SheetCell {
            image: RgbImage::from_pixel(64, 64, Rgb(colour)),
            caption: vec!["straightness 0.99".into(), "0.12 s".into()],
        }
    }

    #[test]
    fn cells_are_enlarged_into_their_grid_places_with_labels_around_them() {
        let sheet = ContactSheet {
            column_titles: vec!["1 step".into(), "2 steps".into()],
            rows: vec![
                SheetRow {
                    title: "teacher".into(),
                    cells: vec![cell([255, 0, 0]), cell([0, 255, 0])],
                },
                SheetRow {
                    title: "fast".into(),
                    cells: vec![cell([0, 0, 255]), cell([255, 255, 0])],
                },
            ],
        }
        .render();
        let count = |colour: [u8; 3]| sheet.pixels().filter(|p| p.0 == colour).count();
        // Each 64² picture is drawn at 128², whole, once.
        for colour in [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]] {
            assert_eq!(count(colour), 128 * 128, "colour {colour:?}");
        }
        // Red is left of green in the first row, and blue under red.
        let first = |colour: [u8; 3]| {
            sheet
                .enumerate_pixels()
                .find(|(_, _, p)| p.0 == colour)
                .map(|(x, y, _)| (x, y))
                .expect("the colour is drawn")
        };
        let (red, green, blue) = (first([255, 0, 0]), first([0, 255, 0]), first([0, 0, 255]));
        assert!(green.0 > red.0 + 128 && green.1 == red.1);
        assert!(blue.1 > red.1 + 128 && blue.0 == red.0);
        // The labels are drawn: light text pixels lie left of the pictures and above them.
        let is_text = |p: &Rgb<u8>| p.0.iter().all(|&c| c > 150) && p.0[0] == p.0[2];
        let text_left = sheet
            .enumerate_pixels()
            .filter(|(x, _, p)| *x < red.0 && is_text(p))
            .count();
        let text_above = sheet
            .enumerate_pixels()
            .filter(|(_, y, p)| *y < red.1 && is_text(p))
            .count();
        assert!(text_left > 30, "row titles drew {text_left} pixels");
        assert!(text_above > 30, "column titles drew {text_above} pixels");
    }
}
