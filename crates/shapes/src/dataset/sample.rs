//! Drawing the data set: sample number `index` of the data set named by `seed`, and which
//! captions are held out for evaluation.

use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::caption::Caption;
use super::scene::Scene;

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

/// One caption text in this many is held out: never trained on, kept for evaluation.
pub const HELD_OUT_ONE_IN: u64 = 20;

/// Whether `caption` belongs to the held-out prompts. The split is by the exact caption text
/// (FNV-1a hash), so "a red star on the left" can be held out while "a red star" is trained on:
/// evaluation asks for combinations the model never saw written down.
pub fn is_held_out(caption: &Caption) -> bool {
    let hash = caption
        .text()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
    hash % HELD_OUT_ONE_IN == 0
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

    #[test]
    fn about_one_caption_in_twenty_is_held_out_and_the_split_is_stable() {
        let held: Vec<bool> = (0..4000)
            .map(|i| is_held_out(&sample(3, i).caption))
            .collect();
        let share = held.iter().filter(|h| **h).count() as f64 / held.len() as f64;
        assert!((0.035..0.065).contains(&share), "held-out share {share}");
        let again: Vec<bool> = (0..4000)
            .map(|i| is_held_out(&sample(3, i).caption))
            .collect();
        assert_eq!(held, again);
    }
}
