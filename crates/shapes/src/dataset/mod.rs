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
mod sample;
mod scene;
mod shape;

pub use caption::{Attribute, Caption, CaptionError, GRAMMAR, ParsedCaption, vocabulary};
pub use grid::sample_grid;
pub use layout::{CANVAS_SIZE, Position, Size};
pub use palette::Color;
pub use sample::{HELD_OUT_ONE_IN, Sample, is_held_out, sample};
pub use scene::Scene;
pub use shape::{Shape, pixel_window};
