//! Image statistics that reveal the tip: [`sharpness`] (mean gradient energy over contrast)
//! and [`feature_sharpness`] (the inverse feature width from the image's autocorrelation),
//! and the 3×3 median filter they share.

#[cfg(doc)]
use super::{MAX_KERNEL_SIDE, TipState};
use ndarray::ArrayView2;

/// 3×3 median filter of a row-major image `cols` wide (edges repeat the border pixels) into
/// `out` (the same size). Each median comes from a fixed network of 19 compare-exchanges, so
/// values must be ordered (finite floats). The interior of each row runs [`LANES`] pixels at a
/// time through the same network lane by lane (the same medians, vectorized).
pub fn median_filter_3x3<T: Copy + PartialOrd>(img: &[T], cols: usize, out: &mut [T]) {
    if cols == 0 {
        return;
    }
    let rows = img.len() / cols;
    for i in 0..rows {
        let rs = [i.saturating_sub(1), i, (i + 1).min(rows - 1)];
        let window = |j: usize| -> [T; 9] {
            let cs = [j.saturating_sub(1), j, (j + 1).min(cols - 1)];
            std::array::from_fn(|k| img[rs[k / 3] * cols + cs[k % 3]])
        };
        // Interior columns 1..cols − 1 in blocks of LANES: lane l of window entry k reads
        // column j + l + k % 3 − 1.
        let mut j = 1;
        while j + LANES < cols {
            let w: [[T; LANES]; 9] = std::array::from_fn(|k| {
                let at = rs[k / 3] * cols + j + k % 3 - 1;
                std::array::from_fn(|l| img[at + l])
            });
            out[i * cols + j..i * cols + j + LANES].copy_from_slice(&median9_lanes(w));
            j += LANES;
        }
        // The first column and those after the blocks, one at a time.
        for c in std::iter::once(0).chain(j..cols) {
            out[i * cols + c] = median9(window(c));
        }
    }
}

/// Pixels per block of [`median_filter_3x3`]'s vectorized interior.
const LANES: usize = 8;

/// The median of nine ordered values by a fixed network of 19 compare-exchanges (on locals, so
/// it compiles to branch-free min/max selects).
#[inline]
pub fn median9<T: Copy + PartialOrd>(p: [T; 9]) -> T {
    median9_lanes(p.map(|v| [v]))[0]
}

/// [`median9`]'s network on `L` independent lanes at once: lane `l` of the result is the
/// median of lane `l` of the nine inputs.
#[inline(always)]
fn median9_lanes<T: Copy + PartialOrd, const L: usize>(p: [[T; L]; 9]) -> [T; L] {
    #[inline(always)]
    fn cx<T: Copy + PartialOrd, const L: usize>(a: &mut [T; L], b: &mut [T; L]) {
        for (a, b) in a.iter_mut().zip(b.iter_mut()) {
            let (x, y) = (*a, *b);
            let swap = x > y;
            *a = if swap { y } else { x };
            *b = if swap { x } else { y };
        }
    }
    let [
        mut p0,
        mut p1,
        mut p2,
        mut p3,
        mut p4,
        mut p5,
        mut p6,
        mut p7,
        mut p8,
    ] = p;
    cx(&mut p1, &mut p2);
    cx(&mut p4, &mut p5);
    cx(&mut p7, &mut p8);
    cx(&mut p0, &mut p1);
    cx(&mut p3, &mut p4);
    cx(&mut p6, &mut p7);
    cx(&mut p1, &mut p2);
    cx(&mut p4, &mut p5);
    cx(&mut p7, &mut p8);
    cx(&mut p0, &mut p3);
    cx(&mut p5, &mut p8);
    cx(&mut p4, &mut p7);
    cx(&mut p3, &mut p6);
    cx(&mut p1, &mut p4);
    cx(&mut p2, &mut p5);
    cx(&mut p4, &mut p7);
    cx(&mut p4, &mut p2);
    cx(&mut p6, &mut p4);
    cx(&mut p4, &mut p2);
    let _ = (p0, p1, p3, p5, p6, p7, p8);
    p4
}

/// A noise-robust sharpness statistic: the inverse apparent feature width, in 1/pixel,
/// estimated from the image autocorrelation at lags 1 and 2 (never lag 0, where white noise
/// lives). Each row is first levelled by its median (standard SPM line flattening, which also
/// removes line offsets), then the image passes a 3×3 median filter (which removes
/// single-line glitches and most white noise). For features with a Gaussian autocorrelation `C(l) ∝ exp(-l²/4σ²)`,
/// `ln(C(1)/C(2)) = 3/(4σ²)`, so each axis gives `1/σ = sqrt(4 ln(C(1)/C(2)) / 3)`; the result
/// is the mean over the fast and slow axes (a double tip broadens the autocorrelation along its
/// offset). Blunter, doubled or blurred tips give smaller values; white noise and line offsets
/// do not raise it, and noise correlated along a line (glitches) lowers it. An axis whose
/// neighbour correlation `C(1)/C(0)` in the unfiltered levelled image is below 0.1 (nothing
/// resolved above the noise) contributes 0, and `C(2)` is floored at `C(1)/100`, so the value lies in `[0, 2.48]`.
/// Images smaller than 3×3 or with non-finite values give 0.
pub fn feature_sharpness(image: ArrayView2<'_, f32>) -> f64 {
    let (rows, cols) = image.dim();
    if rows < 3 || cols < 3 || image.iter().any(|v| !v.is_finite()) {
        return 0.0;
    }
    let mut lev = ndarray::Array2::<f64>::zeros((rows, cols));
    let mut buf: Vec<f64> = Vec::with_capacity(cols);
    for (i, row) in image.rows().into_iter().enumerate() {
        buf.clear();
        buf.extend(row.iter().map(|&v| f64::from(v)));
        let (_, &mut med, _) = buf.select_nth_unstable_by(cols / 2, f64::total_cmp);
        for (j, &v) in row.iter().enumerate() {
            lev[[i, j]] = f64::from(v) - med;
        }
    }
    // A 3×3 median removes single-line glitches and most white noise, keeps features wider
    // than a pixel.
    let mut med = ndarray::Array2::<f64>::zeros((rows, cols));
    median_filter_3x3(
        lev.as_slice().expect("standard layout"),
        cols,
        med.as_slice_mut().expect("standard layout"),
    );
    let centred = |mut a: ndarray::Array2<f64>| {
        let mean = a.mean().unwrap_or(0.0);
        a.mapv_inplace(|v| v - mean);
        a
    };
    let (raw, med) = (centred(lev), centred(med));
    let acf = |a: &ndarray::Array2<f64>, di: usize, dj: usize| -> f64 {
        let mut sum = 0.0;
        for i in 0..rows - di {
            for j in 0..cols - dj {
                sum += a[[i, j]] * a[[i + di, j + dj]];
            }
        }
        sum / ((rows - di) * (cols - dj)) as f64
    };
    // The gate uses the unfiltered image (the median filter itself correlates noise).
    let c0 = acf(&raw, 0, 0);
    let axis = |di: usize, dj: usize| -> f64 {
        if !(c0 > 0.0 && acf(&raw, di, dj) > 0.1 * c0) {
            return 0.0;
        }
        let (c1, c2) = (acf(&med, di, dj), acf(&med, 2 * di, 2 * dj));
        if !(c1 > 0.0) {
            return 0.0;
        }
        let ratio = c1 / c2.max(0.01 * c1);
        (4.0 * ratio.ln().max(0.0) / 3.0).sqrt()
    };
    0.5 * (axis(0, 1) + axis(1, 0))
}

/// An image sharpness statistic from the observation alone: the mean squared difference of
/// neighbouring pixels (along rows and along columns, summed) over the image variance,
/// `(⟨(∂ₓI)²⟩ + ⟨(∂ᵧI)²⟩) / var(I)`, in 1/pixel². It is invariant to the height scale and offset,
/// grows as features get narrower (for features of width `w` pixels it scales like `1/w²`), and
/// lies in `[0, 8]` up to edge effects (8 for a checkerboard). A flat image, an image with
/// fewer than two pixels, or one with non-finite values gives 0.
///
/// Limits: noise raises it (white noise alone gives ≈ 4), so compare images of similar noise;
/// and a very flat apex that images sparse features as plateaus covering most of the field, with
/// steep edges, can score as high as a sharper tip. A kernel truncated at [`MAX_KERNEL_SIDE`]
/// has the same effect (vertical sides), so choose the pixel so that [`TipState::kernel_side`]
/// stays below the cap.
pub fn sharpness(image: ArrayView2<'_, f32>) -> f64 {
    let (rows, cols) = image.dim();
    let n = rows * cols;
    if n < 2 || image.iter().any(|v| !v.is_finite()) {
        return 0.0;
    }
    let mean = image.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
    let var = image
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n as f64;
    if !(var > 0.0) {
        return 0.0;
    }
    let mut energy = 0.0;
    if cols > 1 {
        let mut sum = 0.0;
        for row in image.rows() {
            for w in 0..cols - 1 {
                sum += (f64::from(row[w + 1]) - f64::from(row[w])).powi(2);
            }
        }
        energy += sum / (rows * (cols - 1)) as f64;
    }
    if rows > 1 {
        let mut sum = 0.0;
        for i in 0..rows - 1 {
            for (a, b) in image.row(i).iter().zip(image.row(i + 1).iter()) {
                sum += (f64::from(*b) - f64::from(*a)).powi(2);
            }
        }
        energy += sum / ((rows - 1) * cols) as f64;
    }
    let out = energy / var;
    if out.is_finite() { out } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_network_equals_the_middle_of_the_sorted_values() {
        use rand::Rng;
        let mut rng = crate::rng::seeded(4);
        for _ in 0..20_000 {
            // Few distinct values, so ties are common too.
            let w: [f32; 9] = std::array::from_fn(|_| (rng.random::<u32>() % 7) as f32 - 3.0);
            let mut s = w;
            s.sort_by(f32::total_cmp);
            assert_eq!(super::median9(w), s[4], "{w:?}");
            let w: [f64; 9] = std::array::from_fn(|_| rng.random::<f64>());
            let mut s = w;
            s.sort_by(f64::total_cmp);
            assert_eq!(super::median9(w), s[4], "{w:?}");
        }
    }

    #[test]
    fn feature_sharpness_measures_width_and_ignores_white_noise() {
        use crate::rng::{normal, seeded};
        // Gaussian bumps of standard deviation w px, 24 px apart: C(l) ∝ exp(-l²/4w²), so the
        // statistic is 1/w.
        let bumps = |w: f64, noise: f64, seed: u64| {
            let mut rng = seeded(seed);
            let n = 128;
            ndarray::Array2::from_shape_fn((n, n), |(i, j)| {
                let mut h = 0.0;
                for ci in (8..n).step_by(24) {
                    for cj in (8..n).step_by(24) {
                        let d2 = ((i as f64 - ci as f64).powi(2) + (j as f64 - cj as f64).powi(2))
                            / (2.0 * w * w);
                        h += (-d2).exp();
                    }
                }
                (h + noise * normal(&mut rng)) as f32
            })
        };
        // (Row levelling and mean removal bias wide features up a little.)
        let mut last = f64::INFINITY;
        for w in [1.5, 2.5, 4.0] {
            let s = feature_sharpness(bumps(w, 0.0, 1).view());
            let expect = 1.0 / w;
            assert!((s / expect - 1.0).abs() < 0.25, "w {w}: {s} vs {expect}");
            assert!(s < last);
            last = s;
        }
        let (clean, noisy) = (
            feature_sharpness(bumps(2.5, 0.0, 1).view()),
            feature_sharpness(bumps(2.5, 0.1, 2).view()),
        );
        assert!((noisy / clean - 1.0).abs() < 0.15, "{clean} vs {noisy}");
        // Pure white noise has no features; a flat image gives 0.
        let mut rng = seeded(3);
        let white = ndarray::Array2::from_shape_fn((64, 64), |_| normal(&mut rng) as f32);
        assert!(feature_sharpness(white.view()) < 0.3 * clean);
        assert_eq!(
            feature_sharpness(ndarray::Array2::<f32>::zeros((8, 8)).view()),
            0.0
        );
    }

    /// The filter with its vectorized interior gives, bit for bit, the pixel-by-pixel median of
    /// each clamped 3×3 window: widths 1 to 20 (narrower and wider than a block) and heights 1
    /// to 5, with many ties and both signs of zero.
    #[test]
    fn the_median_filter_is_the_windowed_median_of_every_pixel() {
        use rand::Rng;
        let mut rng = crate::rng::seeded(6);
        for cols in 1..=20usize {
            for rows in 1..=5usize {
                let img: Vec<f32> = (0..rows * cols)
                    .map(|_| match rng.random_range(0..4) {
                        0 => 0.0,
                        1 => -0.0,
                        _ => rng.random_range(-3..3) as f32 * 0.5,
                    })
                    .collect();
                let mut out = vec![f32::NAN; rows * cols];
                median_filter_3x3(&img, cols, &mut out);
                for i in 0..rows {
                    for j in 0..cols {
                        let rs = [i.saturating_sub(1), i, (i + 1).min(rows - 1)];
                        let cs = [j.saturating_sub(1), j, (j + 1).min(cols - 1)];
                        let w: [f32; 9] =
                            std::array::from_fn(|k| img[rs[k / 3] * cols + cs[k % 3]]);
                        let (got, want) = (out[i * cols + j], median9(w));
                        assert_eq!(got.to_bits(), want.to_bits(), "{rows}x{cols} at ({i}, {j})");
                    }
                }
            }
        }
    }
}
