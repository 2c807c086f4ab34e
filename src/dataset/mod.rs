//! The procedural training data: captioned 64×64 pictures of one object.
//!
//! A generated data set needs no downloads, is as large as training wants,
//! and, because every picture follows from a known caption and scene, lets
//! an evaluator check exactly what a model got right. Each sample is a pure
//! function of `(seed, index)`, so a data loader can draw any index on its
//! own thread and train and held-out splits are simply different seeds.

mod caption;
mod grid;
mod layout;
mod palette;
mod scene;
mod shape;

use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use caption::{Attribute, Caption, CaptionError, ParsedCaption, vocabulary};
pub use grid::sample_grid;
pub use layout::{Position, Size};
pub use palette::Color;
pub use scene::Scene;
pub use shape::{Shape, pixel_window};

/// Width and height of every picture, in pixels.
pub const CANVAS_SIZE: u32 = 64;

/// One training pair together with the scene it was drawn from.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub caption: Caption,
    pub scene: Scene,
    pub image: RgbImage,
}

/// Sample number `index` of the data set named by `seed`.
///
/// The random generator is `ChaCha8Rng` keyed by `seed` (through
/// `SeedableRng::seed_from_u64`) with `index` as its stream number: ChaCha
/// streams are independent, so every `(seed, index)` pair gets its own
/// sequence without any sample having to draw the ones before it.
pub fn sample(seed: u64, index: u64) -> Sample {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let caption = Caption::sample(&mut rng);
    let scene = Scene::sample_for(&caption, &mut rng);
    let image = scene.render();
    Sample {
        caption,
        scene,
        image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_and_index_give_the_same_sample() {
        for index in [0, 1, 17, 1_000_000] {
            assert_eq!(sample(5, index), sample(5, index));
        }
    }

    #[test]
    fn different_indices_and_seeds_give_different_samples() {
        assert_ne!(sample(5, 0).image, sample(5, 1).image);
        assert_ne!(sample(5, 0).image, sample(6, 0).image);
        let distinct_captions: std::collections::HashSet<String> = (0..100)
            .map(|index| sample(5, index).caption.text())
            .collect();
        assert!(distinct_captions.len() > 90);
    }

    #[test]
    fn every_sample_matches_its_caption() {
        for index in 0..200 {
            let drawn = sample(11, index);
            assert_eq!(drawn.scene.color, drawn.caption.color);
            assert_eq!(drawn.scene.shape, drawn.caption.shape);
            assert_eq!(drawn.image, drawn.scene.render());
        }
    }
}
