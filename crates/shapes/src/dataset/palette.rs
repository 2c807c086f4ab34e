//! The ten named colours of the data set.
//!
//! A small, fixed palette keeps every colour word in a caption tied to one
//! exact sRGB value, so the renderer and the analyser agree on what "orange"
//! means, and the colours are far enough apart that a blurry or noisy image
//! still says which one was meant.

use rand::Rng;
use rand::seq::IndexedRandom;

/// One of the palette colours that captions can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Color {
    Red,
    Orange,
    Yellow,
    Green,
    Cyan,
    Blue,
    Purple,
    Pink,
    White,
    Black,
}

impl Color {
    /// Every colour, in a fixed order that sampling relies on for determinism.
    pub const ALL: [Color; 10] = [
        Color::Red,
        Color::Orange,
        Color::Yellow,
        Color::Green,
        Color::Cyan,
        Color::Blue,
        Color::Purple,
        Color::Pink,
        Color::White,
        Color::Black,
    ];

    /// The word captions use for this colour.
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Orange => "orange",
            Color::Yellow => "yellow",
            Color::Green => "green",
            Color::Cyan => "cyan",
            Color::Blue => "blue",
            Color::Purple => "purple",
            Color::Pink => "pink",
            Color::White => "white",
            Color::Black => "black",
        }
    }

    /// The exact sRGB value the renderer paints for this colour.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 40, 40],
            Color::Orange => [245, 140, 30],
            Color::Yellow => [240, 210, 40],
            Color::Green => [40, 170, 60],
            Color::Cyan => [40, 200, 210],
            Color::Blue => [40, 80, 220],
            Color::Purple => [140, 60, 190],
            Color::Pink => [240, 120, 180],
            Color::White => [245, 245, 245],
            Color::Black => [20, 20, 20],
        }
    }

    /// The colour named by `word` (already lower-case), if any.
    pub fn from_word(word: &str) -> Option<Color> {
        Color::ALL.into_iter().find(|color| color.name() == word)
    }

    /// A uniformly random colour other than `self`, so that an object never
    /// vanishes into its background.
    pub fn random_other_than<R: Rng + ?Sized>(self, rng: &mut R) -> Color {
        let others: Vec<Color> = Color::ALL
            .into_iter()
            .filter(|&color| color != self)
            .collect();
        *others
            .choose(rng)
            .expect("the palette has more than one colour")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_reads_back_as_its_colour() {
        for color in Color::ALL {
            assert_eq!(Color::from_word(color.name()), Some(color));
        }
        assert_eq!(Color::from_word("mauve"), None);
    }
}
