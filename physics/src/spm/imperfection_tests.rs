//! The scanner's height errors and detector noise seen through the simulator: plane tilt,
//! scanner bow and z drift enter before the feedback loop (the loop tracks them), detector
//! noise is shaped by the loop's transfer function. Each against its closed form.

use crate::instrument::SpmInstrument;
use crate::param::Param;
use crate::spm::sim::{SpmConfig, SpmSimulator};
use crate::spm::surface::SurfaceKind;
use ndarray::Array2;

/// Controller period of the default feedback, s.
const T: f64 = 0.5e-3;

/// A flat, noiseless AFM session: `cols` pixels per line of `samples` controller samples each,
/// `rows` lines, scan field `fov` on a sample of side `sample` (m), no tip changes.
fn flat(rows: usize, cols: usize, samples: usize, fov: f64, sample: f64) -> SpmConfig {
    let mut c = SpmConfig::default().without_scanner_imperfections();
    c.sample.pixels = 32;
    c.sample.size = Param::fixed(sample);
    c.sample.crash_threshold = Param::fixed(1e-7);
    c.scan.pixels = [rows, cols];
    c.scan.size = Param::fixed(fov);
    // dwell = 1/(2 · line_rate · cols) = samples · T
    c.scan.line_rate = Param::fixed(1.0 / (2.0 * cols as f64 * samples as f64 * T));
    c.surface.kind = SurfaceKind::Flat;
    c.surface.roughness = Param::fixed(0.0);
    c.tip.adsorbate_rate = Param::fixed(0.0);
    c.tip.wear_rate = Param::fixed(0.0);
    c
}

fn frame(c: SpmConfig, seed: u64) -> (Array2<f32>, Array2<f32>) {
    let mut sim = SpmSimulator::new(c, seed).unwrap();
    let f = sim.acquire_frame().unwrap();
    (f.channels[0].image.clone(), f.channels[1].image.clone())
}

/// Least-squares polynomial fit of degree `deg` (≤ 2) of `y` on `x`: coefficients from the
/// constant up.
#[allow(clippy::needless_range_loop)]
fn polyfit(x: &[f64], y: &[f64], deg: usize) -> Vec<f64> {
    let n = deg + 1;
    let mut a = vec![vec![0.0; n + 1]; n];
    for (&xi, &yi) in x.iter().zip(y) {
        for r in 0..n {
            for c in 0..n {
                a[r][c] += xi.powi((r + c) as i32);
            }
            a[r][n] += yi * xi.powi(r as i32);
        }
    }
    // Gauss-Jordan elimination with partial pivoting.
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap();
        a.swap(col, piv);
        for r in 0..n {
            if r != col {
                let f = a[r][col] / a[col][col];
                for c in col..=n {
                    a[r][c] -= f * a[col][c];
                }
            }
        }
    }
    (0..n).map(|r| a[r][n] / a[r][r]).collect()
}

fn rel(measured: f64, expected: f64) -> f64 {
    ((measured - expected) / expected).abs()
}

/// Commanded x of column `j` of a `cols`-pixel line of width `fov` centred on 0, m.
fn x_cmd(j: usize, cols: usize, fov: f64) -> f64 {
    (j as f64 - 0.5 * (cols as f64 - 1.0)) * fov / cols as f64
}

/// Plane tilt: on a flat sample the height channel is the plane. Along the fast axis the trace
/// and retrace slopes equal `tan θx` (the PI loop follows a ramp with a constant lag), and
/// trace and retrace are offset by the loop lag `∓ tan θx · v / K_i` each, `2 tan θx v/K_i`
/// apart; the row means rise by `tan θy` per metre along the slow axis.
#[test]
fn tilted_flat_sample_images_as_the_plane_with_the_loop_lag() {
    let (rows, cols, fov) = (24, 64, 0.5e-6);
    let mut c = flat(rows, cols, 4, fov, 1e-6);
    let (tx, ty) = (0.01f64, -0.02f64);
    c.scanner.tilt = [Param::fixed(tx), Param::fixed(ty)];
    let (trace, retrace) = frame(c, 3);
    let interior = 16..cols - 16;
    let (mut row_y, mut row_mean, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
    for r in 2..rows {
        for (img, interior) in [(&trace, 16..cols - 4), (&retrace, 4..cols - 16)] {
            let x: Vec<f64> = interior.clone().map(|j| x_cmd(j, cols, fov)).collect();
            let z: Vec<f64> = interior.map(|j| f64::from(img[[r, j]])).collect();
            let slope = polyfit(&x, &z, 1)[1];
            assert!(
                rel(slope, tx.tan()) < 1e-3,
                "row {r}: fast-axis slope {slope:e}, expected {:e}",
                tx.tan()
            );
        }
        let z: Vec<f64> = interior.clone().map(|j| f64::from(trace[[r, j]])).collect();
        let zr: Vec<f64> = interior
            .clone()
            .map(|j| f64::from(retrace[[r, j]]))
            .collect();
        offsets.push(z.iter().zip(&zr).map(|(a, b)| a - b).sum::<f64>() / z.len() as f64);
        row_y.push((r as f64 - 0.5 * (rows as f64 - 1.0)) * fov / cols as f64);
        row_mean.push(z.iter().sum::<f64>() / z.len() as f64);
    }
    let slope_y = polyfit(&row_y, &row_mean, 1)[1];
    println!("slow-axis slope {slope_y:e} (tan θy {:e})", ty.tan());
    assert!(
        rel(slope_y, ty.tan()) < 1e-3,
        "slow-axis slope {slope_y:e}, expected {:e}",
        ty.tan()
    );
    // Lag: v = pixel / dwell, K_i = 300 1/s.
    let v = fov / cols as f64 / (4.0 * T);
    let expected = -2.0 * tx.tan() * v / 300.0;
    let offset = offsets.iter().sum::<f64>() / offsets.len() as f64;
    println!("trace - retrace {offset:e} m, lag {expected:e} m");
    assert!(
        rel(offset, expected) < 1e-3,
        "trace - retrace {offset:e} m, expected {expected:e} m"
    );
}

/// Scanner bow: a flat line images as the parabola `κ x²/2` of the piezo's excursion (the
/// loop adds only a linear lag and a constant), for a 40 µm scan with `κ = 1/(4 cm)`.
#[test]
fn scanner_bow_images_a_flat_line_as_the_parabola() {
    let (rows, cols, fov) = (4, 64, 40e-6);
    let mut c = flat(rows, cols, 4, fov, 50e-6);
    let kappa = 25.0;
    c.scanner.bow_curvature = Param::fixed(kappa);
    let (trace, retrace) = frame(c, 4);
    for r in 1..rows {
        for (img, interior) in [(&trace, 16..cols - 2), (&retrace, 2..cols - 16)] {
            // Fit in units of 10 µm for a well-conditioned system.
            let x: Vec<f64> = interior
                .clone()
                .map(|j| x_cmd(j, cols, fov) / 1e-5)
                .collect();
            let z: Vec<f64> = interior.map(|j| f64::from(img[[r, j]])).collect();
            let c2 = polyfit(&x, &z, 2)[2] / 1e-10;
            assert!(
                rel(c2, 0.5 * kappa) < 1e-3,
                "row {r}: x² coefficient {c2} 1/m, expected {}",
                0.5 * kappa
            );
        }
    }
}

/// z drift: consecutive line means rise by `v_z` times the line time.
#[test]
fn z_drift_raises_each_line_by_rate_times_line_time() {
    let (rows, cols) = (16, 64);
    let mut c = flat(rows, cols, 4, 0.5e-6, 1e-6);
    let vz = 1e-10;
    c.scanner.z_drift = Param::fixed(vz);
    let line_time = 1.0 / c.scan.line_rate.get();
    let (trace, retrace) = frame(c, 5);
    for img in [&trace, &retrace] {
        let idx: Vec<f64> = (2..rows).map(|r| r as f64).collect();
        let means: Vec<f64> = (2..rows)
            .map(|r| img.row(r).iter().map(|&v| f64::from(v)).sum::<f64>() / cols as f64)
            .collect();
        let per_line = polyfit(&idx, &means, 1)[1];
        println!(
            "per line {per_line:e} m (v_z t_line {:e} m)",
            vz * line_time
        );
        assert!(
            rel(per_line, vz * line_time) < 1e-3,
            "line means rise {per_line:e} m per line, expected {:e}",
            vz * line_time
        );
    }
}

/// The closed-loop impulse response `g_n` (n ≥ 0) from the true height to `z` of the
/// velocity-form PI loop `z_{k+1} = z_k + K_p (e_k − e_{k−1}) + K_i T e_k`, `e = h − z`, from
/// its poles: `G(q) = (a q − K_p)/((q − λ₁)(q − λ₂))`, `a = K_p + K_i T`, `λ` the roots of
/// `q² − (1 − a) q − K_p`; `g_0 = 0`, `g_n = Σ_i (a λ_i − K_p) λ_i^{n−1} / Π_{j≠i}(λ_i − λ_j)`.
fn impulse_response(kp: f64, ki_t: f64, len: usize) -> Vec<f64> {
    let a = kp + ki_t;
    let b = 1.0 - a;
    let disc = (b * b + 4.0 * kp).sqrt();
    let (l1, l2) = (0.5 * (b + disc), 0.5 * (b - disc));
    assert!(l1.abs() < 1.0 && l2.abs() < 1.0, "unstable loop");
    (0..len)
        .map(|n| {
            if n == 0 {
                0.0
            } else {
                let p = (n - 1) as i32;
                ((a * l1 - kp) * l1.powi(p) - (a * l2 - kp) * l2.powi(p)) / (l1 - l2)
            }
        })
        .collect()
}

/// Variance gain from white per-pixel noise (variance 1) on the loop's input to an interior
/// pixel of its output (the mean of its `m` samples), with `m` samples per pixel and the
/// input interpolated linearly between pixel centres (the controller samples pixel `j` at
/// fractional positions `(k + ½)/m − ½`): `Σ_j c_j²`, `c_j` the pixel output's weight on
/// pixel noise `j`. Computed on a long line without calling the simulator.
fn pixel_noise_gain(kp: f64, ki_t: f64, m: usize) -> f64 {
    let (n_pix, target) = (400usize, 300usize);
    let g = impulse_response(kp, ki_t, n_pix * m);
    // Input weights per sample: (pixel, weight) pairs.
    let weights = |k: usize| -> [(usize, f64); 2] {
        let x = (k as f64 + 0.5) / m as f64 - 0.5;
        let j0 = x.floor().max(0.0) as usize;
        let f = (x - j0 as f64).clamp(0.0, 1.0);
        [(j0, 1.0 - f), ((j0 + 1).min(n_pix - 1), f)]
    };
    let mut c = vec![0.0; n_pix];
    for k in target * m..(target + 1) * m {
        for i in 0..k {
            for (j, w) in weights(i) {
                c[j] += g[k - i] * w / m as f64;
            }
        }
    }
    c.iter().map(|v| v * v).sum()
}

/// Detector noise enters before the loop: for white per-pixel noise of r.m.s. `σ` on the
/// loop's input, the height channel's r.m.s. on a flat sample is `σ·√(Σ c_j²)`, the closed-loop
/// gain from the loop's poles ([`pixel_noise_gain`]), for one and for four samples per pixel and
/// two sets of gains; 256 × 256 pixels, 5 % tolerance (the estimate's own scatter is ≈ 1 %).
#[test]
fn detector_noise_is_shaped_by_the_closed_loop() {
    let sigma = 1e-10;
    for (m, kp, ki) in [(1usize, 0.1, 300.0), (4, 0.1, 1000.0), (4, 0.3, 300.0)] {
        let (rows, cols) = (256, 256);
        let mut c = flat(rows, cols, m, 0.5e-6, 1e-6);
        c.feedback.p_gain = Param::fixed(kp);
        c.feedback.i_gain = Param::fixed(ki);
        let dwell = m as f64 * T;
        // ρ = σ √(2 t_p): per pixel N(0, σ²).
        c.scanner.detector_noise = Param::fixed(sigma * (2.0 * dwell).sqrt());
        let (trace, _) = frame(c, 11);
        let vals: Vec<f64> = (0..rows)
            .flat_map(|r| (16..cols - 16).map(move |j| (r, j)))
            .map(|(r, j)| f64::from(trace[[r, j]]))
            .collect();
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
        let expected = sigma * pixel_noise_gain(kp, ki * T, m).sqrt();
        let measured = var.sqrt();
        println!("m {m} Kp {kp} Ki {ki}: rms {measured:e} m, closed loop {expected:e} m");
        assert!(
            rel(measured, expected) < 0.05,
            "m = {m}, K_p = {kp}, K_i = {ki}: height r.m.s. {measured:e} m, closed loop {expected:e} m"
        );
        // The loop filters: the output is quieter than the input.
        assert!(measured < sigma);
    }
}
