//! Captions: the English side of each training pair.
//!
//! The grammar is deliberately tiny and fixed,
//! `a [small|large] <color> <shape> [<position>] [on a <color> background]`,
//! so a word-level tokenizer covers it exactly and an evaluator can tell
//! which attributes a prompt asked for. Size, position and background are
//! each left out at random so a model also learns to fill in what is unsaid.
//! Parsing is forgiving (case, punctuation and unknown words are tolerated)
//! because prompts also come from people typing.

use std::fmt;

use rand::Rng;
use rand::seq::IndexedRandom;
use thiserror::Error;

use super::layout::{Position, Size};
use super::palette::Color;
use super::shape::Shape;

/// Probability that `Caption::sample` states each optional part (size,
/// position, background); independently for each part.
pub const OPTIONAL_PART_PROBABILITY: f64 = 0.5;

/// The caption grammar as people read it; every training caption follows it.
pub const GRAMMAR: &str = "a [small|large] <color> <shape> [<position>] [on a <color> background]";

/// The article every caption starts with.
const ARTICLE: &str = "a";
/// Words that close a caption's background part: "on a <color> background".
const BACKGROUND_INTRODUCER: &str = "on";
const BACKGROUND_WORD: &str = "background";
/// Words the parser accepts without meaning anything by them.
const FILLER_WORDS: [&str; 7] = ["a", "an", "the", "in", "at", "on", "background"];

/// An attribute of the picture a caption can talk about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Attribute {
    Background,
    Color,
    Shape,
    Position,
    Size,
}

impl Attribute {
    /// Every attribute, in the order reports list them.
    pub const ALL: [Attribute; 5] = [
        Attribute::Background,
        Attribute::Color,
        Attribute::Shape,
        Attribute::Position,
        Attribute::Size,
    ];

    /// The attribute's name as shown to people.
    pub fn name(self) -> &'static str {
        match self {
            Attribute::Background => "background",
            Attribute::Color => "color",
            Attribute::Shape => "shape",
            Attribute::Position => "position",
            Attribute::Size => "size",
        }
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// Why a piece of text could not be read as a caption.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum CaptionError {
    #[error("the caption names no {0}")]
    Missing(Attribute),
    #[error("the caption names more than one {0}")]
    Contradictory(Attribute),
}

/// What a caption says about the picture; `None` means "not stated".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Caption {
    pub size: Option<Size>,
    pub color: Color,
    pub shape: Shape,
    pub position: Option<Position>,
    pub background: Option<Color>,
}

/// A caption read from text, with the words the parser did not know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCaption {
    pub caption: Caption,
    pub unknown_words: Vec<String>,
}

impl Caption {
    /// A random caption: colour and shape uniform, each optional part stated
    /// with probability `OPTIONAL_PART_PROBABILITY`, and a stated background
    /// always different from the object's colour.
    pub fn sample<R: Rng + ?Sized>(rng: &mut R) -> Caption {
        let color = *Color::ALL.choose(rng).expect("palette is not empty");
        let shape = *Shape::ALL.choose(rng).expect("shape list is not empty");
        let size = rng
            .random_bool(OPTIONAL_PART_PROBABILITY)
            .then(|| *Size::ALL.choose(rng).expect("size list is not empty"));
        let position = rng.random_bool(OPTIONAL_PART_PROBABILITY).then(|| {
            *Position::ALL
                .choose(rng)
                .expect("position list is not empty")
        });
        let background = rng
            .random_bool(OPTIONAL_PART_PROBABILITY)
            .then(|| color.random_other_than(rng));
        Caption {
            size,
            color,
            shape,
            position,
            background,
        }
    }

    /// The caption as English text, exactly in the [`GRAMMAR`].
    pub fn text(&self) -> String {
        let mut words = vec![ARTICLE];
        if let Some(size) = self.size {
            words.push(size.name());
        }
        words.push(self.color.name());
        words.push(self.shape.name());
        if let Some(position) = self.position {
            words.push(position.phrase());
        }
        if let Some(background) = self.background {
            words.extend([
                BACKGROUND_INTRODUCER,
                ARTICLE,
                background.name(),
                BACKGROUND_WORD,
            ]);
        }
        words.join(" ")
    }

    /// Reads a caption word by word, ignoring case and punctuation.
    ///
    /// A colour word directly followed by "background" names the background;
    /// any other colour word names the object. Position words combine
    /// ("top" + "left" is the top-left cell; "center" alone is the centre).
    /// Words outside the grammar are skipped and reported in
    /// `unknown_words`. Fails if the colour or shape is missing, or if an
    /// attribute is given two different values (say "top" and "bottom").
    pub fn parse(text: &str) -> Result<ParsedCaption, CaptionError> {
        let words: Vec<String> = text
            .split(|character: char| !character.is_alphanumeric())
            .filter(|word| !word.is_empty())
            .map(str::to_lowercase)
            .collect();
        let mut size = None;
        let mut color = None;
        let mut shape = None;
        let mut background = None;
        let mut position_words = PositionWords::default();
        let mut unknown_words = Vec::new();
        for (index, word) in words.iter().enumerate() {
            if let Some(named) = Color::from_word(word) {
                let names_background = words
                    .get(index + 1)
                    .is_some_and(|next| next == BACKGROUND_WORD);
                if names_background {
                    state_once(&mut background, named, Attribute::Background)?;
                } else {
                    state_once(&mut color, named, Attribute::Color)?;
                }
            } else if let Some(named) = Shape::from_word(word) {
                state_once(&mut shape, named, Attribute::Shape)?;
            } else if let Some(named) = Size::from_word(word) {
                state_once(&mut size, named, Attribute::Size)?;
            } else if !position_words.take(word)? && !FILLER_WORDS.contains(&word.as_str()) {
                unknown_words.push(word.clone());
            }
        }
        Ok(ParsedCaption {
            caption: Caption {
                size,
                color: color.ok_or(CaptionError::Missing(Attribute::Color))?,
                shape: shape.ok_or(CaptionError::Missing(Attribute::Shape))?,
                position: position_words.position(),
                background,
            },
            unknown_words,
        })
    }
}

/// Sets `slot` to `value`, unless it already holds a different value.
fn state_once<T: PartialEq>(
    slot: &mut Option<T>,
    value: T,
    attribute: Attribute,
) -> Result<(), CaptionError> {
    match slot {
        Some(existing) if *existing != value => Err(CaptionError::Contradictory(attribute)),
        _ => {
            *slot = Some(value);
            Ok(())
        }
    }
}

/// The position words seen so far: a row (top/bottom), a column
/// (left/right) and whether "center" was said.
#[derive(Default)]
struct PositionWords {
    row: Option<u32>,
    column: Option<u32>,
    center_named: bool,
}

impl PositionWords {
    /// Records `word` if it is a position word; says whether it was one.
    fn take(&mut self, word: &str) -> Result<bool, CaptionError> {
        match word {
            "top" => state_once(&mut self.row, 0, Attribute::Position)?,
            "bottom" => state_once(&mut self.row, 2, Attribute::Position)?,
            "left" => state_once(&mut self.column, 0, Attribute::Position)?,
            "right" => state_once(&mut self.column, 2, Attribute::Position)?,
            "center" | "centre" => self.center_named = true,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The grid cell the words describe; a missing row or column means the
    /// middle one, and no position words at all mean "not stated".
    fn position(&self) -> Option<Position> {
        if self.row.is_none() && self.column.is_none() && !self.center_named {
            return None;
        }
        let cell = (self.column.unwrap_or(1), self.row.unwrap_or(1));
        Position::ALL
            .into_iter()
            .find(|position| position.cell() == cell)
    }
}

/// Every word the caption grammar can produce, sorted and without repeats;
/// the basis of a word-level tokenizer.
pub fn vocabulary() -> Vec<&'static str> {
    let mut words = vec![ARTICLE, BACKGROUND_INTRODUCER, BACKGROUND_WORD];
    words.extend(Size::ALL.map(Size::name));
    words.extend(Color::ALL.map(Color::name));
    words.extend(Shape::ALL.map(Shape::name));
    words.extend(
        Position::ALL
            .iter()
            .flat_map(|position| position.phrase().split(' ')),
    );
    words.sort_unstable();
    words.dedup();
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn text_follows_the_grammar() {
        let full = Caption {
            size: Some(Size::Small),
            color: Color::Red,
            shape: Shape::Heart,
            position: Some(Position::TopLeft),
            background: Some(Color::Blue),
        };
        assert_eq!(
            full.text(),
            "a small red heart in the top left on a blue background"
        );
        let bare = Caption {
            size: None,
            position: None,
            background: None,
            ..full
        };
        assert_eq!(bare.text(), "a red heart");
    }

    #[test]
    fn parsing_the_text_of_a_caption_gives_it_back() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..2000 {
            let caption = Caption::sample(&mut rng);
            let parsed = Caption::parse(&caption.text()).expect("generated text parses");
            assert_eq!(parsed.caption, caption, "{}", caption.text());
            assert!(parsed.unknown_words.is_empty());
        }
    }

    #[test]
    fn sampled_captions_state_optional_parts_about_half_the_time() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let captions: Vec<Caption> = (0..4000).map(|_| Caption::sample(&mut rng)).collect();
        let share = |stated: fn(&Caption) -> bool| {
            captions.iter().filter(|caption| stated(caption)).count() as f64 / 4000.0
        };
        for observed in [
            share(|caption| caption.size.is_some()),
            share(|caption| caption.position.is_some()),
            share(|caption| caption.background.is_some()),
        ] {
            assert!((observed - OPTIONAL_PART_PROBABILITY).abs() < 0.04);
        }
        assert!(
            captions
                .iter()
                .all(|caption| caption.background != Some(caption.color))
        );
    }

    #[test]
    fn parsing_ignores_case_and_punctuation_and_reports_unknown_words() {
        let parsed = Caption::parse("A LARGE, shiny Green star -- at the Top!").expect("parses");
        assert_eq!(
            parsed.caption,
            Caption {
                size: Some(Size::Large),
                color: Color::Green,
                shape: Shape::Star,
                position: Some(Position::Top),
                background: None,
            }
        );
        assert_eq!(parsed.unknown_words, vec!["shiny".to_string()]);
    }

    #[test]
    fn a_colour_before_background_names_the_background_wherever_it_stands() {
        let parsed = Caption::parse("white background, black ring in the center").expect("parses");
        assert_eq!(parsed.caption.background, Some(Color::White));
        assert_eq!(parsed.caption.color, Color::Black);
        assert_eq!(parsed.caption.position, Some(Position::Center));
    }

    #[test]
    fn missing_shape_or_colour_is_an_error_naming_it() {
        let missing_shape = Caption::parse("a small red thing").unwrap_err();
        assert_eq!(missing_shape, CaptionError::Missing(Attribute::Shape));
        assert!(missing_shape.to_string().contains("shape"));
        let missing_color = Caption::parse("a circle").unwrap_err();
        assert_eq!(missing_color, CaptionError::Missing(Attribute::Color));
        assert!(missing_color.to_string().contains("color"));
    }

    #[test]
    fn contradictions_are_errors() {
        assert_eq!(
            Caption::parse("a red blue circle"),
            Err(CaptionError::Contradictory(Attribute::Color))
        );
        assert_eq!(
            Caption::parse("a red circle at the top bottom"),
            Err(CaptionError::Contradictory(Attribute::Position))
        );
    }

    #[test]
    fn vocabulary_is_sorted_and_covers_every_generated_word() {
        let words = vocabulary();
        assert!(words.windows(2).all(|pair| pair[0] < pair[1]));
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..500 {
            let text = Caption::sample(&mut rng).text();
            for word in text.split(' ') {
                assert!(words.contains(&word), "{word} missing from vocabulary");
            }
        }
        for word in &words {
            let parsed = Caption::parse(&format!("a red circle {word}"));
            let unknown = parsed
                .map(|parsed| parsed.unknown_words)
                .unwrap_or_default();
            assert!(unknown.is_empty(), "{word} is not understood");
        }
    }
}
