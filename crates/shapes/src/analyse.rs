//! Reads a generated picture back into caption terms, to score prompt
//! adherence.
//!
//! A generative model's output is judged by asking what this deterministic
//! analyser sees (background, object colour, shape, size, position) and
//! comparing that with what the prompt asked for. Generated pictures are
//! imperfect (blurry, noisy, slightly off colour), so every step is chosen
//! to be robust rather than exact:
//!
//! 1. a first background estimate is the per-channel median of the border
//!    pixels, which the object can cover at most a third of;
//! 2. the object is the largest connected region of (lightly smoothed)
//!    pixels far from that background, after a morphological opening, so
//!    stray specks and threads of noise are ignored;
//! 3. the background colour is then the robust mean of the border pixels
//!    away from the object, and the object colour the robust mean of the
//!    region's most clearly coloured pixels; each is named by the nearest
//!    palette colour in CIELAB;
//! 4. every pixel near the object gets a coverage (0 = background,
//!    1 = object) by projecting its colour onto the background-to-object
//!    line, which undoes anti-aliasing and blur gracefully;
//! 5. each shape is placed so its area and centroid match the coverage
//!    map's (sums over many pixels, so noise averages out and symmetric blur
//!    changes nothing), and the shape whose rendering differs least from the
//!    coverage map (squared error) wins, giving shape, extent and centre.

use std::sync::OnceLock;

use image::RgbImage;
use thiserror::Error;

use crate::dataset::{Attribute, CANVAS_SIZE, Caption, Color, Position, Shape, Size, pixel_window};

/// How far, in pixels, an extent may be from a stated size's extent and
/// still count as that size: small is 20 ± 6 (14–26 px), large is 36 ± 6
/// (30–42 px); anything between 26 and 30 px, or outside, is neither.
pub const SIZE_TOLERANCE: f32 = 6.0;
/// RGB distance from the background beyond which a smoothed pixel counts as
/// part of some object when first looking for it. The two closest palette
/// colours (orange and yellow) are about 71 apart, and smoothing brings
/// noise of 20 per channel down to about 11 in distance, so 30 separates
/// both.
const OBJECT_DISTANCE_THRESHOLD: f32 = 30.0;
/// RGB distance from their median beyond which pixels are left out of a
/// robust mean: five standard deviations of heavy noise (20 per channel),
/// yet well short of the distance between palette colours.
const ROBUST_MEAN_RADIUS: f32 = 100.0;
/// Fewer object pixels than this means nothing was drawn.
const MINIMUM_OBJECT_PIXELS: usize = 6;
/// Pixels whose distance from the background reaches this fraction of the
/// region's 90th-percentile distance are trusted to show the pure object
/// colour (edges, blended with the background, fall below it).
const CONFIDENT_DISTANCE_FRACTION: f32 = 0.75;
/// Margin, in pixels, around the object's bounding box inside which coverage
/// is measured; outside it the picture is taken to be pure background.
const COVERAGE_MARGIN: u32 = 4;
/// Measured coverage is clamped to this range, so a stray pixel of some
/// third colour cannot outweigh many well-behaved ones.
const COVERAGE_LIMITS: (f32, f32) = (-0.5, 1.5);
/// Sub-pixel samples per axis when rendering a candidate shape for fitting.
const FIT_SAMPLES_PER_AXIS: u32 = 2;
/// Samples per axis of the grid on which each shape's area and centroid
/// are measured (once per run).
const MOMENT_SAMPLES_PER_AXIS: u32 = 400;

/// Why a picture could not be analysed.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum AnalysisError {
    #[error("expected a {CANVAS_SIZE}×{CANVAS_SIZE} image, got {width}×{height}")]
    WrongSize { width: u32, height: u32 },
    #[error("no object stands out from the background")]
    NoObject,
}

/// What the analyser sees in a picture.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Analysis {
    pub background: Color,
    pub color: Color,
    pub shape: Shape,
    /// Side of the fitted shape's box, in pixels.
    pub extent: f32,
    /// Centre of the fitted shape's box, in pixels.
    pub centre: (f32, f32),
    /// The grid cell whose centre is nearest to `centre`.
    pub position: Position,
    /// The size word `extent` matches, per `SIZE_TOLERANCE`, if any.
    pub size: Option<Size>,
}

/// How one attribute of a picture compares with its caption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The caption does not mention the attribute, so anything goes.
    Unstated,
    Correct,
    Wrong,
}

/// Per-attribute comparison of a caption with an analysed picture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub background: Verdict,
    pub color: Verdict,
    pub shape: Verdict,
    pub position: Verdict,
    pub size: Verdict,
}

impl Judgement {
    /// Whether nothing the caption states is contradicted by the picture.
    pub fn all_correct(&self) -> bool {
        self.verdicts()
            .iter()
            .all(|&(_, verdict)| verdict != Verdict::Wrong)
    }

    /// Each attribute with its verdict, in `Attribute::ALL` order, for
    /// per-attribute tallies.
    pub fn verdicts(&self) -> [(Attribute, Verdict); 5] {
        [
            (Attribute::Background, self.background),
            (Attribute::Color, self.color),
            (Attribute::Shape, self.shape),
            (Attribute::Position, self.position),
            (Attribute::Size, self.size),
        ]
    }
}

/// Compares what `caption` asks for with what `analysis` found. Colour and
/// shape are always judged; background, position and size only when the
/// caption states them.
pub fn judge(caption: &Caption, analysis: &Analysis) -> Judgement {
    Judgement {
        background: verdict(caption.background, Some(analysis.background)),
        color: verdict(Some(caption.color), Some(analysis.color)),
        shape: verdict(Some(caption.shape), Some(analysis.shape)),
        position: verdict(caption.position, Some(analysis.position)),
        size: verdict(caption.size, analysis.size),
    }
}

fn verdict<T: PartialEq>(stated: Option<T>, found: Option<T>) -> Verdict {
    match stated {
        None => Verdict::Unstated,
        Some(_) if stated == found => Verdict::Correct,
        Some(_) => Verdict::Wrong,
    }
}

/// The size word an object of this extent fits, if any (see `SIZE_TOLERANCE`).
pub fn size_for_extent(extent: f32) -> Option<Size> {
    Size::ALL
        .into_iter()
        .find(|size| (extent - size.extent()).abs() <= SIZE_TOLERANCE)
}

/// Analyses a `CANVAS_SIZE`² picture of one object on a plain background.
pub fn analyse(image: &RgbImage) -> Result<Analysis, AnalysisError> {
    let (width, height) = image.dimensions();
    if (width, height) != (CANVAS_SIZE, CANVAS_SIZE) {
        return Err(AnalysisError::WrongSize { width, height });
    }
    let raw: Vec<Rgb> = image.pixels().map(|pixel| pixel.0.map(f32::from)).collect();
    let smoothed = box_blur(&raw);

    let border: Vec<Rgb> = border_indices().map(|index| raw[index]).collect();
    let border_median = median_color(&border);
    let far_from_background: Vec<bool> = smoothed
        .iter()
        .map(|&pixel| distance(pixel, border_median) > OBJECT_DISTANCE_THRESHOLD)
        .collect();
    let object_region = largest_component(&opened(&far_from_background));
    if object_region.len() < MINIMUM_OBJECT_PIXELS {
        return Err(AnalysisError::NoObject);
    }
    let region = PixelRect::around(&object_region).grown_by(COVERAGE_MARGIN);
    let border_away_from_object: Vec<Rgb> = border_indices()
        .filter(|&index| !region.contains(index))
        .map(|index| raw[index])
        .collect();
    let background_rgb = robust_mean(&border_away_from_object).unwrap_or(border_median);
    let background = nearest_palette_color(background_rgb);
    let object_rgb = confident_object_color(&object_region, &raw, &smoothed, background_rgb);
    let color = nearest_palette_color(object_rgb);

    let contrast = subtract(object_rgb, background_rgb);
    let contrast_squared = dot(contrast, contrast);
    if contrast_squared.sqrt() <= OBJECT_DISTANCE_THRESHOLD {
        return Err(AnalysisError::NoObject);
    }
    let coverage_of =
        |pixel: Rgb| dot(subtract(pixel, background_rgb), contrast) / contrast_squared;
    let observed: Vec<f32> = raw
        .iter()
        .enumerate()
        .map(|(index, &pixel)| {
            if region.contains(index) {
                coverage_of(pixel).clamp(COVERAGE_LIMITS.0, COVERAGE_LIMITS.1)
            } else {
                0.0
            }
        })
        .collect();
    let coverage = CoverageMap::new(observed);
    if coverage.area < MINIMUM_OBJECT_PIXELS as f32 {
        return Err(AnalysisError::NoObject);
    }

    let best = fit_shape(&coverage);
    Ok(Analysis {
        background,
        color,
        shape: best.shape,
        extent: best.extent,
        centre: best.centre,
        position: Position::nearest_to(best.centre),
        size: size_for_extent(best.extent),
    })
}

type Rgb = [f32; 3];

fn subtract(a: Rgb, b: Rgb) -> Rgb {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn dot(a: Rgb, b: Rgb) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn distance(a: Rgb, b: Rgb) -> f32 {
    let difference = subtract(a, b);
    dot(difference, difference).sqrt()
}

fn pixel_index(column: u32, row: u32) -> usize {
    (row * CANVAS_SIZE + column) as usize
}

/// Indices of the outermost ring of pixels.
fn border_indices() -> impl Iterator<Item = usize> {
    let last = CANVAS_SIZE - 1;
    (0..CANVAS_SIZE)
        .flat_map(move |row| (0..CANVAS_SIZE).map(move |column| (column, row)))
        .filter(move |&(column, row)| column == 0 || row == 0 || column == last || row == last)
        .map(|(column, row)| pixel_index(column, row))
}

/// Mean over each pixel's 3×3 neighbourhood (edges repeat outward).
fn box_blur(pixels: &[Rgb]) -> Vec<Rgb> {
    let last = CANVAS_SIZE as i64 - 1;
    let mut blurred = Vec::with_capacity(pixels.len());
    for row in 0..CANVAS_SIZE as i64 {
        for column in 0..CANVAS_SIZE as i64 {
            let mut sum = [0.0; 3];
            for neighbour_row in row - 1..=row + 1 {
                for neighbour_column in column - 1..=column + 1 {
                    let index = pixel_index(
                        neighbour_column.clamp(0, last) as u32,
                        neighbour_row.clamp(0, last) as u32,
                    );
                    for channel in 0..3 {
                        sum[channel] += pixels[index][channel];
                    }
                }
            }
            blurred.push(sum.map(|total| total / 9.0));
        }
    }
    blurred
}

/// Per-channel median, robust to the minority of pixels that differ
/// (`pixels` must not be empty).
fn median_color(pixels: &[Rgb]) -> Rgb {
    let mut channels: [Vec<f32>; 3] = Default::default();
    for &pixel in pixels {
        for (values, value) in channels.iter_mut().zip(pixel) {
            values.push(value);
        }
    }
    channels.map(|mut values| {
        values.sort_by(f32::total_cmp);
        values[values.len() / 2]
    })
}

/// Mean of the pixels within `ROBUST_MEAN_RADIUS` of their median, or `None`
/// for no pixels. The median throws out specks of other colours; the mean
/// then follows noise that is not symmetric, such as noise clipped at white
/// or black, which a median would miss.
fn robust_mean(pixels: &[Rgb]) -> Option<Rgb> {
    if pixels.is_empty() {
        return None;
    }
    let median = median_color(pixels);
    let mut sum = [0.0; 3];
    let mut count = 0.0;
    for &pixel in pixels
        .iter()
        .filter(|&&pixel| distance(pixel, median) <= ROBUST_MEAN_RADIUS)
    {
        for channel in 0..3 {
            sum[channel] += pixel[channel];
        }
        count += 1.0;
    }
    Some(sum.map(|total| total / count))
}

/// Typical colour of the region's pixels that stand out most from the
/// background, i.e. those not blended with it at the edges.
fn confident_object_color(
    region: &[usize],
    raw: &[Rgb],
    smoothed: &[Rgb],
    background_rgb: Rgb,
) -> Rgb {
    let mut distances: Vec<f32> = region
        .iter()
        .map(|&index| distance(smoothed[index], background_rgb))
        .collect();
    distances.sort_by(f32::total_cmp);
    let typical_far = distances[distances.len() * 9 / 10];
    let threshold = CONFIDENT_DISTANCE_FRACTION * typical_far;
    let confident: Vec<Rgb> = region
        .iter()
        .filter(|&&index| distance(smoothed[index], background_rgb) >= threshold)
        .map(|&index| raw[index])
        .collect();
    robust_mean(&confident).expect("the region's farthest pixel passes the threshold")
}

/// The palette colour perceptually nearest to `rgb` (CIE76 distance in
/// CIELAB, where equal distances look roughly equally different).
fn nearest_palette_color(rgb: Rgb) -> Color {
    let target = srgb_to_lab(rgb);
    let lab_distance = |color: Color| distance(srgb_to_lab(color.rgb().map(f32::from)), target);
    Color::ALL
        .into_iter()
        .min_by(|&a, &b| lab_distance(a).total_cmp(&lab_distance(b)))
        .expect("palette is not empty")
}

/// sRGB (0–255) to CIELAB under the D65 white point.
fn srgb_to_lab(rgb: Rgb) -> Rgb {
    let linear = rgb.map(|value| {
        let encoded = (value / 255.0).clamp(0.0, 1.0);
        if encoded <= 0.040_45 {
            encoded / 12.92
        } else {
            ((encoded + 0.055) / 1.055).powf(2.4)
        }
    });
    let [red, green, blue] = linear;
    let x = (0.412_456_4 * red + 0.357_576_1 * green + 0.180_437_5 * blue) / 0.950_47;
    let y = 0.212_672_9 * red + 0.715_152_2 * green + 0.072_175 * blue;
    let z = (0.019_333_9 * red + 0.119_192 * green + 0.950_304_1 * blue) / 1.088_83;
    let epsilon = (6.0_f32 / 29.0).powi(3);
    let compress = |t: f32| {
        if t > epsilon {
            t.cbrt()
        } else {
            t / (3.0 * (6.0_f32 / 29.0).powi(2)) + 4.0 / 29.0
        }
    };
    let (fx, fy, fz) = (compress(x), compress(y), compress(z));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// Morphological opening with a 3×3 square: keeps only pixels of `mask`
/// that lie in some 3×3 block entirely inside it. Thin threads of noise
/// that would join specks to the object disappear; the object keeps its
/// body, losing at most the last pixel or two of sharp tips.
fn opened(mask: &[bool]) -> Vec<bool> {
    let neighbourhood = |mask: &[bool], index: usize, wanted: bool| {
        let size = CANVAS_SIZE as i64;
        let (column, row) = ((index as i64) % size, (index as i64) / size);
        (row - 1..=row + 1).all(|neighbour_row| {
            (column - 1..=column + 1).all(|neighbour_column| {
                let inside =
                    (0..size).contains(&neighbour_row) && (0..size).contains(&neighbour_column);
                let value =
                    inside && mask[pixel_index(neighbour_column as u32, neighbour_row as u32)];
                value == wanted
            })
        })
    };
    let eroded: Vec<bool> = (0..mask.len())
        .map(|index| neighbourhood(mask, index, true))
        .collect();
    (0..mask.len())
        .map(|index| !neighbourhood(&eroded, index, false))
        .collect()
}

/// Indices of the largest 8-connected group of `true` pixels.
fn largest_component(mask: &[bool]) -> Vec<usize> {
    let size = CANVAS_SIZE as i64;
    let mut visited = vec![false; mask.len()];
    let mut largest = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || visited[start] {
            continue;
        }
        visited[start] = true;
        let mut component = vec![start];
        let mut next = 0;
        while next < component.len() {
            let index = component[next];
            next += 1;
            let (column, row) = ((index as i64) % size, (index as i64) / size);
            for neighbour_row in row - 1..=row + 1 {
                for neighbour_column in column - 1..=column + 1 {
                    if !(0..size).contains(&neighbour_row) || !(0..size).contains(&neighbour_column)
                    {
                        continue;
                    }
                    let neighbour = pixel_index(neighbour_column as u32, neighbour_row as u32);
                    if mask[neighbour] && !visited[neighbour] {
                        visited[neighbour] = true;
                        component.push(neighbour);
                    }
                }
            }
        }
        if component.len() > largest.len() {
            largest = component;
        }
    }
    largest
}

/// An axis-aligned block of whole pixels, bounds inclusive.
#[derive(Clone, Copy, Debug)]
struct PixelRect {
    left: u32,
    right: u32,
    top: u32,
    bottom: u32,
}

impl PixelRect {
    /// The smallest block holding every pixel in `indices` (not empty).
    fn around(indices: &[usize]) -> PixelRect {
        let mut rect = PixelRect {
            left: u32::MAX,
            right: 0,
            top: u32::MAX,
            bottom: 0,
        };
        for &index in indices {
            let (column, row) = (index as u32 % CANVAS_SIZE, index as u32 / CANVAS_SIZE);
            rect.left = rect.left.min(column);
            rect.right = rect.right.max(column);
            rect.top = rect.top.min(row);
            rect.bottom = rect.bottom.max(row);
        }
        rect
    }

    fn grown_by(self, margin: u32) -> PixelRect {
        let last = CANVAS_SIZE - 1;
        PixelRect {
            left: self.left.saturating_sub(margin),
            right: (self.right + margin).min(last),
            top: self.top.saturating_sub(margin),
            bottom: (self.bottom + margin).min(last),
        }
    }

    fn contains(self, index: usize) -> bool {
        let (column, row) = (index as u32 % CANVAS_SIZE, index as u32 / CANVAS_SIZE);
        (self.left..=self.right).contains(&column) && (self.top..=self.bottom).contains(&row)
    }
}

/// Measured object coverage of every pixel, with its total energy, area
/// and centroid. The squared error of a candidate then only needs the pixels
/// the candidate covers: Σ(rendered − observed)² = Σ observed² + Σ over
/// covered pixels of (rendered² − 2·rendered·observed).
struct CoverageMap {
    observed: Vec<f32>,
    energy: f32,
    /// Covered area, in square pixels.
    area: f32,
    /// Coverage-weighted mean pixel centre.
    centroid: (f32, f32),
}

impl CoverageMap {
    fn new(observed: Vec<f32>) -> CoverageMap {
        let mut energy = 0.0;
        let mut area = 0.0;
        let mut weighted = (0.0, 0.0);
        for (index, &value) in observed.iter().enumerate() {
            let (column, row) = (index as u32 % CANVAS_SIZE, index as u32 / CANVAS_SIZE);
            energy += value * value;
            area += value;
            weighted.0 += value * (column as f32 + 0.5);
            weighted.1 += value * (row as f32 + 0.5);
        }
        let centroid = (weighted.0 / area, weighted.1 / area);
        CoverageMap {
            observed,
            energy,
            area,
            centroid,
        }
    }

    fn squared_error(&self, shape: Shape, centre: (f32, f32), extent: f32) -> f32 {
        let (columns, rows) = pixel_window(centre, extent);
        let mut error = self.energy;
        for row in rows {
            for column in columns.clone() {
                let rendered =
                    shape.pixel_coverage(centre, extent, (column, row), FIT_SAMPLES_PER_AXIS);
                if rendered > 0.0 {
                    let observed = self.observed[pixel_index(column, row)];
                    error += rendered * (rendered - 2.0 * observed);
                }
            }
        }
        error
    }
}

/// How much of its box a shape fills and where its centroid lies, in box
/// coordinates; these turn a measured area and centroid into a box.
#[derive(Clone, Copy, Debug)]
struct ShapeMoments {
    box_fraction: f32,
    centroid: (f32, f32),
}

impl ShapeMoments {
    /// The moments of `shape`, measured once per run on a fine grid.
    fn of(shape: Shape) -> ShapeMoments {
        static MEASURED: OnceLock<[(Shape, ShapeMoments); 8]> = OnceLock::new();
        let measured =
            MEASURED.get_or_init(|| Shape::ALL.map(|shape| (shape, ShapeMoments::measure(shape))));
        measured
            .iter()
            .find(|(measured_shape, _)| *measured_shape == shape)
            .map(|&(_, moments)| moments)
            .expect("every shape is measured")
    }

    fn measure(shape: Shape) -> ShapeMoments {
        let mut inside = 0_u32;
        let mut sum = (0.0, 0.0);
        for row in 0..MOMENT_SAMPLES_PER_AXIS {
            let y = -1.0 + (2 * row + 1) as f32 / MOMENT_SAMPLES_PER_AXIS as f32;
            for column in 0..MOMENT_SAMPLES_PER_AXIS {
                let x = -1.0 + (2 * column + 1) as f32 / MOMENT_SAMPLES_PER_AXIS as f32;
                if shape.contains(x, y) {
                    inside += 1;
                    sum.0 += x;
                    sum.1 += y;
                }
            }
        }
        let count = inside as f32;
        ShapeMoments {
            box_fraction: count / (MOMENT_SAMPLES_PER_AXIS * MOMENT_SAMPLES_PER_AXIS) as f32,
            centroid: (sum.0 / count, sum.1 / count),
        }
    }
}

/// A shape placed on the canvas, with how badly it explains the picture.
#[derive(Clone, Copy, Debug)]
struct ShapeFit {
    shape: Shape,
    centre: (f32, f32),
    extent: f32,
    error: f32,
}

impl ShapeFit {
    /// Places `shape` so that its area and centroid equal the observed
    /// ones. Both are sums over many pixels, so they shrug off noise and are
    /// unchanged by symmetric blur.
    fn by_moments(coverage: &CoverageMap, shape: Shape) -> ShapeFit {
        let moments = ShapeMoments::of(shape);
        let extent = (coverage.area / moments.box_fraction).sqrt();
        let centre = (
            coverage.centroid.0 - moments.centroid.0 * extent / 2.0,
            coverage.centroid.1 - moments.centroid.1 * extent / 2.0,
        );
        ShapeFit {
            shape,
            centre,
            extent,
            error: coverage.squared_error(shape, centre, extent),
        }
    }
}

/// The shape whose moment-matched placement best explains the coverage map.
fn fit_shape(coverage: &CoverageMap) -> ShapeFit {
    Shape::ALL
        .into_iter()
        .map(|shape| ShapeFit::by_moments(coverage, shape))
        .min_by(|a, b| a.error.total_cmp(&b.error))
        .expect("there is at least one shape")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{Sample, Scene, sample};
    use image::Rgb as RgbPixel;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const SAMPLES_CHECKED: u64 = 500;
    /// Largest centre error, in pixels, that counts as finding the centre.
    const CENTRE_TOLERANCE: f32 = 1.0;
    /// Largest extent error, in pixels, that counts as finding the extent.
    const EXTENT_TOLERANCE: f32 = 1.5;

    /// How often each measure was recovered, with the samples that missed.
    #[derive(Default)]
    struct Tally {
        /// (measure, recovered, checked) in first-seen order.
        rates: Vec<(&'static str, usize, usize)>,
        worst_centre_error: f32,
        worst_extent_error: f32,
        failures: Vec<String>,
    }

    impl Tally {
        /// Counts one check of `measure`; returns `recovered`.
        fn count(&mut self, measure: &'static str, recovered: bool) -> bool {
            let index = match self.rates.iter().position(|(name, ..)| *name == measure) {
                Some(index) => index,
                None => {
                    self.rates.push((measure, 0, 0));
                    self.rates.len() - 1
                }
            };
            self.rates[index].1 += usize::from(recovered);
            self.rates[index].2 += 1;
            recovered
        }

        fn record(&mut self, drawn: &Sample, found: Result<Analysis, AnalysisError>) {
            let Ok(found) = found else {
                for measure in ["background", "color", "shape", "centre", "extent", "judged"] {
                    self.count(measure, false);
                }
                self.failures
                    .push(format!("{}: {found:?}", drawn.caption.text()));
                return;
            };
            let truth = drawn.scene;
            let centre_error = ((found.centre.0 - truth.centre.0).powi(2)
                + (found.centre.1 - truth.centre.1).powi(2))
            .sqrt();
            let extent_error = (found.extent - truth.extent).abs();
            self.worst_centre_error = self.worst_centre_error.max(centre_error);
            self.worst_extent_error = self.worst_extent_error.max(extent_error);
            let mut all_recovered = [
                self.count("background", found.background == truth.background),
                self.count("color", found.color == truth.color),
                self.count("shape", found.shape == truth.shape),
                self.count("centre", centre_error <= CENTRE_TOLERANCE),
                self.count("extent", extent_error <= EXTENT_TOLERANCE),
                self.count(
                    "position of true centre",
                    found.position == Position::nearest_to(truth.centre),
                ),
                self.count("judged", judge(&drawn.caption, &found).all_correct()),
            ]
            .iter()
            .all(|&recovered| recovered);
            if let Some(size) = size_for_extent(truth.extent) {
                all_recovered &= self.count("size of true extent", found.size == Some(size));
            }
            if let Some(position) = drawn.caption.position {
                all_recovered &= self.count("stated position", found.position == position);
            }
            if let Some(size) = drawn.caption.size {
                all_recovered &= self.count("stated size", found.size == Some(size));
            }
            if !all_recovered {
                self.failures.push(format!(
                    "{} | truth {truth:?} | found {found:?}",
                    drawn.caption.text()
                ));
            }
        }

        /// Prints the figures and checks each measure reaches `minimum`.
        fn report_and_check(&self, label: &str, minimum: f64) {
            println!(
                "{label}: worst centre error {:.2} px, worst extent error {:.2} px",
                self.worst_centre_error, self.worst_extent_error
            );
            for &(measure, recovered, checked) in &self.rates {
                let share = recovered as f64 / checked as f64;
                println!("  {measure}: {recovered}/{checked} = {:.2}%", 100.0 * share);
            }
            for failure in &self.failures {
                println!("  missed: {failure}");
            }
            for &(measure, recovered, checked) in &self.rates {
                let share = recovered as f64 / checked as f64;
                assert!(
                    share >= minimum,
                    "{label}: {measure} recovered on only {share}"
                );
            }
        }
    }

    /// Approximately Gaussian noise by Box–Muller.
    fn gaussian<R: Rng>(rng: &mut R, standard_deviation: f32) -> f32 {
        let uniform: f32 = rng.random_range(f32::EPSILON..1.0);
        let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
        standard_deviation * (-2.0 * uniform.ln()).sqrt() * angle.cos()
    }

    /// A 3×3 box blur followed by Gaussian noise of 20/255 per channel: a
    /// stand-in for an imperfect generator.
    fn degrade(image: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
        let raw: Vec<Rgb> = image.pixels().map(|pixel| pixel.0.map(f32::from)).collect();
        let blurred = box_blur(&raw);
        RgbImage::from_fn(CANVAS_SIZE, CANVAS_SIZE, |column, row| {
            let pixel = blurred[pixel_index(column, row)];
            RgbPixel(
                pixel.map(|value| (value + gaussian(rng, 20.0)).round().clamp(0.0, 255.0) as u8),
            )
        })
    }

    #[test]
    fn recovers_every_attribute_of_clean_samples() {
        let mut tally = Tally::default();
        for index in 0..SAMPLES_CHECKED {
            let drawn = sample(2024, index);
            tally.record(&drawn, analyse(&drawn.image));
        }
        tally.report_and_check("clean", 0.99);
    }

    #[test]
    fn recovers_attributes_of_blurred_noisy_samples() {
        let mut tally = Tally::default();
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        for index in 0..SAMPLES_CHECKED {
            let drawn = sample(4048, index);
            tally.record(&drawn, analyse(&degrade(&drawn.image, &mut rng)));
        }
        tally.report_and_check("blurred and noisy", 0.95);
    }

    #[test]
    fn judging_checks_only_what_the_caption_states() {
        let caption = Caption::parse("a small red circle")
            .expect("parses")
            .caption;
        let scene = Scene {
            background: Color::White,
            color: Color::Red,
            shape: Shape::Circle,
            extent: Size::Small.extent(),
            centre: (50.0, 14.0),
        };
        let found = analyse(&scene.render()).expect("analysable");
        let judgement = judge(&caption, &found);
        assert!(judgement.all_correct());
        assert_eq!(judgement.background, Verdict::Unstated);
        assert_eq!(judgement.position, Verdict::Unstated);
        assert_eq!(judgement.size, Verdict::Correct);
        assert_eq!(found.position, Position::TopRight);

        let wrong = Caption::parse("a large blue circle in the center on a black background")
            .expect("parses")
            .caption;
        let judgement = judge(&wrong, &found);
        assert!(!judgement.all_correct());
        for (attribute, verdict) in judgement.verdicts() {
            let expected = if attribute == Attribute::Shape {
                Verdict::Correct
            } else {
                Verdict::Wrong
            };
            assert_eq!(verdict, expected, "{attribute}");
        }
    }

    #[test]
    fn rejects_wrong_sizes_and_blank_pictures() {
        assert_eq!(
            analyse(&RgbImage::new(32, 64)),
            Err(AnalysisError::WrongSize {
                width: 32,
                height: 64
            })
        );
        let blank = RgbImage::from_pixel(CANVAS_SIZE, CANVAS_SIZE, RgbPixel(Color::Pink.rgb()));
        assert_eq!(analyse(&blank), Err(AnalysisError::NoObject));
    }

    #[test]
    fn stray_specks_do_not_move_the_object() {
        let scene = Scene {
            background: Color::Black,
            color: Color::Yellow,
            shape: Shape::Star,
            extent: Size::Large.extent(),
            centre: (32.0, 32.0),
        };
        let mut image = scene.render();
        for (column, row) in [(3, 3), (60, 5), (2, 58), (61, 61)] {
            image.put_pixel(column, row, RgbPixel(Color::White.rgb()));
        }
        let found = analyse(&image).expect("analysable");
        assert_eq!(found.shape, Shape::Star);
        assert!((found.centre.0 - 32.0).abs() < 0.5 && (found.centre.1 - 32.0).abs() < 0.5);
        assert_eq!(found.size, Some(Size::Large));
    }

    #[test]
    fn palette_colours_are_their_own_nearest() {
        for color in Color::ALL {
            assert_eq!(nearest_palette_color(color.rgb().map(f32::from)), color);
        }
        assert_eq!(nearest_palette_color([235.0, 60.0, 50.0]), Color::Red);
    }
}
