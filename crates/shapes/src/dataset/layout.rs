//! Where an object sits on the canvas and how big it is.
//!
//! Captions only talk about two sizes and a 3×3 grid of positions; this
//! module turns those words into pixel measures (and back, for the analyser),
//! so the numbers live in one place.

/// Width and height of every picture, in pixels.
pub const CANVAS_SIZE: u32 = 64;

/// A size word a caption can state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Size {
    Small,
    Large,
}

impl Size {
    /// Both sizes, in a fixed order that sampling relies on for determinism.
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    /// The word captions use for this size.
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    /// The size named by `word` (already lower-case), if any.
    pub fn from_word(word: &str) -> Option<Size> {
        Size::ALL.into_iter().find(|size| size.name() == word)
    }

    /// Side of the object's box, in pixels, when the caption states this size.
    pub fn extent(self) -> f32 {
        match self {
            Size::Small => 20.0,
            Size::Large => 36.0,
        }
    }
}

/// A cell of the 3×3 grid a caption can place the object in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Position {
    TopLeft,
    Top,
    TopRight,
    Left,
    Center,
    Right,
    BottomLeft,
    Bottom,
    BottomRight,
}

impl Position {
    /// Every position in reading order (row by row, left to right).
    pub const ALL: [Position; 9] = [
        Position::TopLeft,
        Position::Top,
        Position::TopRight,
        Position::Left,
        Position::Center,
        Position::Right,
        Position::BottomLeft,
        Position::Bottom,
        Position::BottomRight,
    ];

    /// The phrase captions use for this position.
    pub fn phrase(self) -> &'static str {
        match self {
            Position::TopLeft => "in the top left",
            Position::Top => "at the top",
            Position::TopRight => "in the top right",
            Position::Left => "on the left",
            Position::Center => "in the center",
            Position::Right => "on the right",
            Position::BottomLeft => "in the bottom left",
            Position::Bottom => "at the bottom",
            Position::BottomRight => "in the bottom right",
        }
    }

    /// The grid cell as (column, row), each 0, 1 or 2.
    pub fn cell(self) -> (u32, u32) {
        let index = Position::ALL
            .iter()
            .position(|&position| position == self)
            .expect("every position is listed in ALL") as u32;
        (index % 3, index / 3)
    }

    /// Centre of the grid cell, in pixels.
    pub fn cell_centre(self) -> (f32, f32) {
        let cell_side = CANVAS_SIZE as f32 / 3.0;
        let (column, row) = self.cell();
        (
            (column as f32 + 0.5) * cell_side,
            (row as f32 + 0.5) * cell_side,
        )
    }

    /// The position whose cell centre is nearest to `point` (in pixels).
    pub fn nearest_to(point: (f32, f32)) -> Position {
        let distance_squared = |position: Position| {
            let centre = position.cell_centre();
            (centre.0 - point.0).powi(2) + (centre.1 - point.1).powi(2)
        };
        Position::ALL
            .into_iter()
            .min_by(|&a, &b| distance_squared(a).total_cmp(&distance_squared(b)))
            .expect("ALL is not empty")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_run_in_reading_order() {
        assert_eq!(Position::TopLeft.cell(), (0, 0));
        assert_eq!(Position::Right.cell(), (2, 1));
        assert_eq!(Position::Bottom.cell(), (1, 2));
        let (x, y) = Position::Center.cell_centre();
        assert!((x - 32.0).abs() < 1e-4 && (y - 32.0).abs() < 1e-4);
    }

    #[test]
    fn nearest_cell_of_each_cell_centre_is_itself() {
        for position in Position::ALL {
            assert_eq!(Position::nearest_to(position.cell_centre()), position);
        }
        assert_eq!(Position::nearest_to((20.0, 20.0)), Position::TopLeft);
        assert_eq!(Position::nearest_to((63.0, 30.0)), Position::Right);
    }
}
