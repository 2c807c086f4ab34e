//! The eight shapes and their exact geometry.
//!
//! Every shape is defined once, as a point-in-shape test in "box
//! coordinates" (x and y in [-1, 1], y pointing down, the box being the
//! square of side `extent` the object occupies). The renderer anti-aliases by
//! averaging that test over sub-pixel samples, and the analyser renders the
//! same test to recognise shapes, so the two can never drift apart.

use std::f32::consts::TAU;
use std::ops::Range;

use super::layout::CANVAS_SIZE;

/// Half-width of each arm of the cross, as a fraction of the box half-side.
const CROSS_ARM_HALF_WIDTH: f32 = 0.36;
/// Squared inner radius of the ring (inner radius 0.5 of the outer radius).
const RING_INNER_RADIUS_SQUARED: f32 = 0.25;
/// Distance of the star's five inner corners from its centre.
const STAR_INNER_RADIUS: f32 = 0.45;
/// Number of points of the star.
const STAR_POINTS: f32 = 5.0;
/// y of the triangle's base: an equilateral triangle of side 2 (the box
/// width) with its apex at the top of the box is √3 tall, so its base sits
/// at √3 − 1.
const TRIANGLE_BASE_Y: f32 = 0.732_050_8;
/// Half-width of the classic heart curve `(x² + y² − 1)³ − x²y³ = 0`
/// (measured numerically, at y ≈ 0.545).
const HEART_CURVE_HALF_WIDTH: f32 = 1.139_028;
/// Top of the heart curve's lobes (its bottom point is at y = −1).
const HEART_CURVE_TOP: f32 = 1.236_659;

/// One of the object shapes that captions can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    Circle,
    Ring,
    Square,
    Diamond,
    Cross,
    Triangle,
    Star,
    Heart,
}

impl Shape {
    /// Every shape, in a fixed order that sampling relies on for determinism.
    pub const ALL: [Shape; 8] = [
        Shape::Circle,
        Shape::Ring,
        Shape::Square,
        Shape::Diamond,
        Shape::Cross,
        Shape::Triangle,
        Shape::Star,
        Shape::Heart,
    ];

    /// The word captions use for this shape.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Ring => "ring",
            Shape::Square => "square",
            Shape::Diamond => "diamond",
            Shape::Cross => "cross",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Heart => "heart",
        }
    }

    /// The shape named by `word` (already lower-case), if any.
    pub fn from_word(word: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|shape| shape.name() == word)
    }

    /// Whether the point (x, y), in box coordinates (y down), is inside.
    ///
    /// - circle: x² + y² ≤ 1; ring: 0.25 ≤ x² + y² ≤ 1;
    /// - square: the whole box; diamond: |x| + |y| ≤ 1;
    /// - cross: a plus sign whose arms are 0.36 half-wide;
    /// - triangle: equilateral with side 2, so it spans the full box width:
    ///   apex up at (0, −1), base corners at (±1, √3 − 1 ≈ 0.732);
    /// - star: five points, one straight up, outer radius 1, inner radius 0.45;
    /// - heart: the classic curve `(x² + y² − 1)³ ≤ x²y³`, point down,
    ///   stretched (by at most 2%) to touch all four sides of the box.
    pub fn contains(self, x: f32, y: f32) -> bool {
        if x.abs() > 1.0 || y.abs() > 1.0 {
            return false;
        }
        let radius_squared = x * x + y * y;
        match self {
            Shape::Circle => radius_squared <= 1.0,
            Shape::Ring => (RING_INNER_RADIUS_SQUARED..=1.0).contains(&radius_squared),
            Shape::Square => true,
            Shape::Diamond => x.abs() + y.abs() <= 1.0,
            Shape::Cross => x.abs() <= CROSS_ARM_HALF_WIDTH || y.abs() <= CROSS_ARM_HALF_WIDTH,
            Shape::Triangle => y <= TRIANGLE_BASE_Y && x.abs() * 3.0_f32.sqrt() <= y + 1.0,
            Shape::Star => star_contains(x, y),
            Shape::Heart => heart_contains(x, y),
        }
    }

    /// Fraction of the canvas pixel `pixel` covered by this shape when its
    /// box has side `extent` and centre `centre` (in pixels, where pixel
    /// (i, j) spans [i, i + 1) × [j, j + 1)), estimated from a regular grid
    /// of `samples_per_axis`² sub-pixel samples.
    pub fn pixel_coverage(
        self,
        centre: (f32, f32),
        extent: f32,
        pixel: (u32, u32),
        samples_per_axis: u32,
    ) -> f32 {
        let half_extent = extent / 2.0;
        let step = 1.0 / samples_per_axis as f32;
        let mut inside = 0_u32;
        for sub_row in 0..samples_per_axis {
            let y = (pixel.1 as f32 + (sub_row as f32 + 0.5) * step - centre.1) / half_extent;
            for sub_column in 0..samples_per_axis {
                let x =
                    (pixel.0 as f32 + (sub_column as f32 + 0.5) * step - centre.0) / half_extent;
                if self.contains(x, y) {
                    inside += 1;
                }
            }
        }
        inside as f32 / (samples_per_axis * samples_per_axis) as f32
    }
}

/// The canvas pixels (columns, rows) that a box of side `extent` centred at
/// `centre` can touch; pixels outside them are certainly uncovered.
pub fn pixel_window(centre: (f32, f32), extent: f32) -> (Range<u32>, Range<u32>) {
    let span = |middle: f32| {
        let first = (middle - extent / 2.0).floor().max(0.0) as u32;
        let end = ((middle + extent / 2.0).ceil().max(0.0) as u32).min(CANVAS_SIZE);
        first..end.max(first)
    };
    (span(centre.0), span(centre.1))
}

/// Star test by symmetry: fold the point's angle into the half-sector
/// between a tip (angle 0) and the neighbouring inner corner (angle 36°),
/// then check which side of that edge it lies on.
fn star_contains(x: f32, y: f32) -> bool {
    let radius = (x * x + y * y).sqrt();
    if radius > 1.0 {
        return false;
    }
    if radius <= STAR_INNER_RADIUS {
        return true;
    }
    let sector = TAU / STAR_POINTS;
    let angle_from_up = x.atan2(-y);
    let mut angle_from_tip = angle_from_up.rem_euclid(sector);
    if angle_from_tip > sector / 2.0 {
        angle_from_tip = sector - angle_from_tip;
    }
    let point = (radius * angle_from_tip.cos(), radius * angle_from_tip.sin());
    let tip = (1.0, 0.0);
    let inner_corner = (
        STAR_INNER_RADIUS * (sector / 2.0).cos(),
        STAR_INNER_RADIUS * (sector / 2.0).sin(),
    );
    let edge = (inner_corner.0 - tip.0, inner_corner.1 - tip.1);
    let to_point = (point.0 - tip.0, point.1 - tip.1);
    edge.0 * to_point.1 - edge.1 * to_point.0 >= 0.0
}

/// Heart test: map box coordinates onto the heart curve's own frame (y up,
/// x in ±half-width, y from −1 to the lobes' top) and evaluate the curve.
fn heart_contains(x: f32, y: f32) -> bool {
    let half_height = (HEART_CURVE_TOP + 1.0) / 2.0;
    let curve_x = x * HEART_CURVE_HALF_WIDTH;
    let curve_y = (HEART_CURVE_TOP - half_height) - y * half_height;
    let base = curve_x * curve_x + curve_y * curve_y - 1.0;
    base * base * base <= curve_x * curve_x * curve_y * curve_y * curve_y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (left, right, top, bottom) extremes of the inside region, found by
    /// sampling a fine grid.
    fn sampled_reach(shape: Shape) -> [f32; 4] {
        let steps = 800;
        let mut reach = [f32::MAX, f32::MIN, f32::MAX, f32::MIN];
        for row in 0..=steps {
            let y = -1.0 + 2.0 * row as f32 / steps as f32;
            for column in 0..=steps {
                let x = -1.0 + 2.0 * column as f32 / steps as f32;
                if shape.contains(x, y) {
                    reach = [
                        reach[0].min(x),
                        reach[1].max(x),
                        reach[2].min(y),
                        reach[3].max(y),
                    ];
                }
            }
        }
        reach
    }

    #[test]
    fn shapes_reach_the_sides_of_their_box_as_documented() {
        let star_half_width = (TAU / 20.0).cos();
        let star_bottom = (TAU * 3.0 / 20.0).sin();
        for shape in Shape::ALL {
            let expected = match shape {
                Shape::Triangle => [-1.0, 1.0, -1.0, TRIANGLE_BASE_Y],
                Shape::Star => [-star_half_width, star_half_width, -1.0, star_bottom],
                _ => [-1.0, 1.0, -1.0, 1.0],
            };
            for (expected, sampled) in expected.into_iter().zip(sampled_reach(shape)) {
                assert!(
                    (expected - sampled).abs() < 0.01,
                    "{shape:?}: expected {expected}, sampled {sampled}"
                );
            }
        }
    }

    #[test]
    fn ring_has_a_hole_and_circle_does_not() {
        assert!(!Shape::Ring.contains(0.0, 0.0));
        assert!(!Shape::Ring.contains(0.3, 0.3));
        assert!(Shape::Ring.contains(0.75, 0.0));
        assert!(Shape::Circle.contains(0.0, 0.0));
        assert!(!Shape::Circle.contains(0.8, 0.8));
    }

    #[test]
    fn triangle_points_up_with_a_flat_base() {
        assert!(Shape::Triangle.contains(0.0, -0.95));
        assert!(!Shape::Triangle.contains(0.3, -0.95));
        assert!(Shape::Triangle.contains(0.95, 0.72));
        assert!(Shape::Triangle.contains(-0.95, 0.72));
        assert!(!Shape::Triangle.contains(0.0, 0.76));
    }

    #[test]
    fn star_has_five_tips_one_straight_up() {
        let samples = 3600;
        let inside_at = |index: usize| {
            let angle = TAU * index as f32 / samples as f32;
            Shape::Star.contains(0.9 * angle.sin(), -0.9 * angle.cos())
        };
        let tips = (0..samples)
            .filter(|&index| inside_at(index) && !inside_at((index + samples - 1) % samples))
            .count();
        assert_eq!(tips, 5);
        assert!(Shape::Star.contains(0.0, -0.95));
        assert!(!Shape::Star.contains(0.0, 0.9));
        assert!(Shape::Star.contains(0.0, 0.0));
    }

    #[test]
    fn heart_points_down_with_two_lobes_on_top() {
        assert!(Shape::Heart.contains(0.0, 0.97));
        assert!(!Shape::Heart.contains(0.4, 0.95));
        assert!(!Shape::Heart.contains(0.0, -0.9));
        assert!(Shape::Heart.contains(0.5, -0.9));
        assert!(Shape::Heart.contains(-0.5, -0.9));
    }

    #[test]
    fn cross_has_four_arms_and_empty_corners() {
        for (x, y) in [(0.0, 0.98), (0.0, -0.98), (0.98, 0.0), (-0.98, 0.0)] {
            assert!(Shape::Cross.contains(x, y));
        }
        assert!(!Shape::Cross.contains(0.5, 0.5));
        assert!(!Shape::Cross.contains(-0.4, 0.9));
    }

    #[test]
    fn diamond_and_square_differ_in_the_corners() {
        assert!(Shape::Square.contains(0.95, 0.95));
        assert!(!Shape::Diamond.contains(0.6, 0.6));
        assert!(Shape::Diamond.contains(0.45, 0.45));
    }

    #[test]
    fn coverage_is_full_inside_and_empty_outside() {
        assert_eq!(
            Shape::Square.pixel_coverage((32.0, 32.0), 20.0, (32, 32), 4),
            1.0
        );
        assert_eq!(
            Shape::Square.pixel_coverage((32.0, 32.0), 20.0, (50, 32), 4),
            0.0
        );
        let edge = Shape::Square.pixel_coverage((32.5, 32.0), 20.0, (42, 32), 4);
        assert_eq!(edge, 0.5);
    }
}
