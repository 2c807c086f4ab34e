//! Scenes: the complete, concrete picture behind a caption.
//!
//! A caption leaves things unsaid; a scene fixes every one of them (colours,
//! shape, exact size and centre) so that rendering is a pure function and an
//! analyser's findings can be checked against the truth.

use image::{Rgb, RgbImage};
use rand::Rng;

use super::caption::Caption;
use super::layout::{CANVAS_SIZE, Position};
use super::palette::Color;
use super::shape::{Shape, pixel_window};

/// Smallest and largest box side, in pixels, when the caption states no size.
pub const UNSTATED_EXTENT_RANGE: (f32, f32) = (18.0, 40.0);
/// Largest offset, in pixels along each axis, of the object's centre from
/// the centre of the grid cell its caption names.
pub const POSITION_JITTER: f32 = 3.0;
/// Sub-pixel samples per axis used to anti-alias the object's edges.
const RENDER_SAMPLES_PER_AXIS: u32 = 4;

/// Everything needed to draw one picture.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scene {
    pub background: Color,
    pub color: Color,
    pub shape: Shape,
    /// Side of the object's square box, in pixels.
    pub extent: f32,
    /// Centre of the object's box, in pixels from the top-left corner.
    pub centre: (f32, f32),
}

impl Scene {
    /// A scene that agrees with `caption`, drawing whatever it leaves out:
    /// a background different from the object's colour, an extent uniform
    /// in `UNSTATED_EXTENT_RANGE`, and a centre uniform over the places
    /// where the whole box fits. A stated position puts the centre within
    /// `POSITION_JITTER` of that cell's centre, pulled in if the box would
    /// otherwise leave the canvas.
    pub fn sample_for<R: Rng + ?Sized>(caption: &Caption, rng: &mut R) -> Scene {
        let background = caption
            .background
            .unwrap_or_else(|| caption.color.random_other_than(rng));
        let extent = match caption.size {
            Some(size) => size.extent(),
            None => rng.random_range(UNSTATED_EXTENT_RANGE.0..=UNSTATED_EXTENT_RANGE.1),
        };
        let lowest = extent / 2.0;
        let highest = CANVAS_SIZE as f32 - extent / 2.0;
        let mut coordinate = |cell_centre: Option<f32>| match cell_centre {
            Some(middle) => {
                let jitter = rng.random_range(-POSITION_JITTER..=POSITION_JITTER);
                (middle + jitter).clamp(lowest, highest)
            }
            None => rng.random_range(lowest..=highest),
        };
        let cell_centre = caption.position.map(Position::cell_centre);
        let centre_x = coordinate(cell_centre.map(|centre| centre.0));
        let centre_y = coordinate(cell_centre.map(|centre| centre.1));
        Scene {
            background,
            color: caption.color,
            shape: caption.shape,
            extent,
            centre: (centre_x, centre_y),
        }
    }

    /// Draws the scene as a `CANVAS_SIZE`² image, blending each edge pixel
    /// between object and background colour by the share of its sub-pixel
    /// samples inside the shape.
    pub fn render(&self) -> RgbImage {
        let background = self.background.rgb();
        let object = self.color.rgb();
        let mut image = RgbImage::from_pixel(CANVAS_SIZE, CANVAS_SIZE, Rgb(background));
        let (columns, rows) = pixel_window(self.centre, self.extent);
        for row in rows {
            for column in columns.clone() {
                let coverage = self.shape.pixel_coverage(
                    self.centre,
                    self.extent,
                    (column, row),
                    RENDER_SAMPLES_PER_AXIS,
                );
                if coverage > 0.0 {
                    let blend = |channel: usize| {
                        let mixed = background[channel] as f32
                            + coverage * (object[channel] as f32 - background[channel] as f32);
                        mixed.round() as u8
                    };
                    image.put_pixel(column, row, Rgb([blend(0), blend(1), blend(2)]));
                }
            }
        }
        image
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::layout::Size;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn scenes_honour_their_captions_and_stay_on_the_canvas() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2000 {
            let caption = Caption::sample(&mut rng);
            let scene = Scene::sample_for(&caption, &mut rng);
            assert_eq!(scene.color, caption.color);
            assert_eq!(scene.shape, caption.shape);
            assert_ne!(scene.background, scene.color);
            if let Some(background) = caption.background {
                assert_eq!(scene.background, background);
            }
            if let Some(size) = caption.size {
                assert_eq!(scene.extent, size.extent());
            }
            let half = scene.extent / 2.0;
            for coordinate in [scene.centre.0, scene.centre.1] {
                assert!(coordinate - half >= 0.0 && coordinate + half <= CANVAS_SIZE as f32);
            }
            if let Some(position) = caption.position {
                let cell = position.cell_centre();
                let limit = POSITION_JITTER + 1e-3;
                let pulled_in = |wanted: f32, got: f32| {
                    (wanted - got).abs() <= limit || got == half || got == CANVAS_SIZE as f32 - half
                };
                assert!(pulled_in(cell.0, scene.centre.0) && pulled_in(cell.1, scene.centre.1));
            }
        }
    }

    #[test]
    fn rendering_paints_the_object_over_the_background() {
        let scene = Scene {
            background: Color::White,
            color: Color::Blue,
            shape: Shape::Ring,
            extent: Size::Large.extent(),
            centre: (32.0, 32.0),
        };
        let image = scene.render();
        assert_eq!(image.dimensions(), (CANVAS_SIZE, CANVAS_SIZE));
        assert_eq!(image.get_pixel(0, 0).0, Color::White.rgb());
        assert_eq!(image.get_pixel(32, 32).0, Color::White.rgb(), "ring hole");
        assert_eq!(image.get_pixel(45, 32).0, Color::Blue.rgb(), "ring body");
        let edge = image.get_pixel(44, 44).0;
        assert!(
            edge != Color::White.rgb() && edge != Color::Blue.rgb(),
            "anti-aliased edge"
        );
    }
}
