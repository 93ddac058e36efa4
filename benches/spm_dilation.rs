//! SPM tip-dilation benchmarks (DESIGN.md §5, §11): a 256 × 256 surface at 1 nm per pixel
//! imaged with a 25 × 25-pixel tip.
//!
//! - `spm_dilation_256/general_double_tip_25`: the general (non-separable) path with a double tip
//!   (R = 10 nm, second apex at (6, -4) nm, 1 nm higher).
//! - `spm_dilation_256/paraboloid_25_separable`: a paraboloid tip (R = 10 nm) through the exact
//!   separable fast path.
//! - `spm_dilation_256/paraboloid_25_general`: the same paraboloid through the general path.
//! - `spm_dilation_256/double_tip_25_parts`: the double tip through the separable path (it is the
//!   maximum of two separable paraboloids, which is what `Dilator::dilate` uses for it).
//!
//! The surface (particles up to 30 nm tall on a terraced, slightly noisy base) has more relief
//! than either tip is deep over its window, so every tip entry can matter and none is skipped:
//! these are worst-case timings (on flatter surfaces the kernel skips entries that cannot win).
//!
//! Before criterion runs, the bench prints one JSON line (`{"bench":"spm_dilation",...}`) with
//! the median of 50 timed calls of each case in milliseconds (`std::time::Instant`), which
//! `benches/python/spm_dilation_scipy.py` reads; `cargo bench --bench spm_dilation -- json-only`
//! prints it and runs no criterion benchmark (the filter matches none).
//!
//! With `SCOPEGYM_BENCH_DUMP=<dir>` set, it writes `surface.npy`, `tip_general.npy`,
//! `tip_paraboloid.npy` and the Rust images `rust_general.npy`, `rust_paraboloid.npy` (all `f32`)
//! for the Python script to compare with scipy.

use criterion::{Criterion, criterion_group, criterion_main};
use ndarray::Array2;
use scopegym_physics::rng::{seeded, uniform};
use scopegym_physics::spm::dilation::{Dilator, Tip};
use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

const SIDE: usize = 256;
const PIXEL: f64 = 1e-9;
const TIP_SIDE: usize = 25;
const RADIUS: f64 = 10e-9;
const SEED: u64 = 7;
const TIMED_CALLS: usize = 50;

/// Terraces (0.39 nm steps), 40 Gaussian particles 2-30 nm tall and 2-8 px wide, 0.1 nm noise, m.
fn bench_surface() -> Array2<f32> {
    let mut rng = seeded(SEED);
    let particles: Vec<[f64; 4]> = (0..40)
        .map(|_| {
            [
                uniform(&mut rng) * SIDE as f64,
                uniform(&mut rng) * SIDE as f64,
                2e-9 + 28e-9 * uniform(&mut rng),
                2.0 + 6.0 * uniform(&mut rng),
            ]
        })
        .collect();
    Array2::from_shape_fn((SIDE, SIDE), |(y, x)| {
        let (xf, yf) = (x as f64, y as f64);
        let terrace = ((xf + 0.3 * yf) / 40.0).floor() * 0.39e-9;
        let bumps: f64 = particles
            .iter()
            .map(|&[px, py, h, w]| {
                let d2 = (xf - px).powi(2) + (yf - py).powi(2);
                h * (-d2 / (2.0 * w * w)).exp()
            })
            .sum();
        (terrace + bumps + 0.1e-9 * (uniform(&mut rng) - 0.5)) as f32
    })
}

fn tips() -> (Tip, Tip) {
    let general =
        Tip::double(RADIUS, PIXEL, TIP_SIDE, [6e-9, -4e-9], 1e-9).expect("valid double tip");
    let paraboloid = Tip::paraboloid(RADIUS, PIXEL, TIP_SIDE).expect("valid paraboloid");
    (general, paraboloid)
}

/// Median and minimum wall time of `n` calls after 5 warm-up calls, ms.
fn median_ms(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..5 {
        f();
    }
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (0.5 * (t[(n - 1) / 2] + t[n / 2]), t[0])
}

/// Writes a little-endian `f32` `.npy` (format 1.0) of shape `rows × cols`.
fn write_npy(path: &Path, rows: usize, cols: usize, data: &[f32]) -> std::io::Result<()> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&u16::try_from(header.len()).expect("short").to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    for v in data {
        f.write_all(&v.to_le_bytes())?;
    }
    f.flush()
}

fn dump(dir: &Path, surface: &Array2<f32>, general: &Tip, paraboloid: &Tip) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut d = Dilator::new();
    let mut img = Array2::<f32>::zeros(surface.dim());
    let s = surface.as_standard_layout();
    write_npy(
        &dir.join("surface.npy"),
        SIDE,
        SIDE,
        s.as_slice().expect("contiguous"),
    )?;
    for (name, tip) in [("general", general), ("paraboloid", paraboloid)] {
        let n = tip.side();
        write_npy(&dir.join(format!("tip_{name}.npy")), n, n, tip.heights())?;
        if name == "general" {
            d.dilate_general(surface.view(), tip, img.view_mut())
        } else {
            d.dilate_separable(surface.view(), tip, img.view_mut())
        }
        .expect("shapes match");
        write_npy(
            &dir.join(format!("rust_{name}.npy")),
            SIDE,
            SIDE,
            img.as_slice().expect("contiguous"),
        )?;
    }
    eprintln!("spm_dilation: wrote the bench arrays to {}", dir.display());
    Ok(())
}

fn spm_benches(c: &mut Criterion) {
    let surface = bench_surface();
    let (general, paraboloid) = tips();
    if let Some(dir) = std::env::var_os("SCOPEGYM_BENCH_DUMP") {
        dump(Path::new(&dir), &surface, &general, &paraboloid).expect("writing the arrays");
    }
    let relief = {
        let lo = surface.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = surface.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        f64::from(hi - lo)
    };
    let deepest = |t: &Tip| {
        t.heights()
            .iter()
            .map(|&h| -f64::from(h))
            .fold(0.0, f64::max)
    };
    assert!(
        deepest(&general) < relief && deepest(&paraboloid) < relief,
        "the bench surface must have more relief than the tips are deep"
    );

    let mut d = Dilator::new();
    let mut out = Array2::<f32>::zeros((SIDE, SIDE));
    let general_ms = median_ms(TIMED_CALLS, || {
        d.dilate_general(surface.view(), &general, out.view_mut())
            .expect("shapes match");
        black_box(out[[128, 128]]);
    });
    let paraboloid_ms = median_ms(TIMED_CALLS, || {
        d.dilate_separable(surface.view(), &paraboloid, out.view_mut())
            .expect("shapes match");
        black_box(out[[128, 128]]);
    });
    let paraboloid_general_ms = median_ms(TIMED_CALLS, || {
        d.dilate_general(surface.view(), &paraboloid, out.view_mut())
            .expect("shapes match");
        black_box(out[[128, 128]]);
    });
    let double_parts_ms = median_ms(TIMED_CALLS, || {
        d.dilate_separable(surface.view(), &general, out.view_mut())
            .expect("shapes match");
        black_box(out[[128, 128]]);
    });
    let (general_ms, general_min_ms) = general_ms;
    let (paraboloid_ms, paraboloid_min_ms) = paraboloid_ms;
    let (paraboloid_general_ms, paraboloid_general_min_ms) = paraboloid_general_ms;
    let (double_parts_ms, double_parts_min_ms) = double_parts_ms;
    println!(
        "{{\"bench\":\"spm_dilation\",\"rows\":{SIDE},\"cols\":{SIDE},\"tip_side\":{TIP_SIDE},\
         \"pixel_m\":{PIXEL:e},\"radius_m\":{RADIUS:e},\"relief_m\":{relief:e},\"calls\":{TIMED_CALLS},\
         \"general_ms\":{general_ms:.4},\"paraboloid_ms\":{paraboloid_ms:.4},\
         \"paraboloid_general_ms\":{paraboloid_general_ms:.4},\"double_parts_ms\":{double_parts_ms:.4},\
         \"general_min_ms\":{general_min_ms:.4},\"paraboloid_min_ms\":{paraboloid_min_ms:.4},\
         \"paraboloid_general_min_ms\":{paraboloid_general_min_ms:.4},\"double_parts_min_ms\":{double_parts_min_ms:.4}}}"
    );

    let mut g = c.benchmark_group("spm_dilation_256");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("general_double_tip_25", |b| {
        b.iter(|| {
            d.dilate_general(surface.view(), &general, out.view_mut())
                .expect("shapes match");
            black_box(out[[128, 128]]);
        });
    });
    g.bench_function("paraboloid_25_separable", |b| {
        b.iter(|| {
            d.dilate_separable(surface.view(), &paraboloid, out.view_mut())
                .expect("shapes match");
            black_box(out[[128, 128]]);
        });
    });
    g.bench_function("paraboloid_25_general", |b| {
        b.iter(|| {
            d.dilate_general(surface.view(), &paraboloid, out.view_mut())
                .expect("shapes match");
            black_box(out[[128, 128]]);
        });
    });
    g.bench_function("double_tip_25_parts", |b| {
        b.iter(|| {
            d.dilate_separable(surface.view(), &general, out.view_mut())
                .expect("shapes match");
            black_box(out[[128, 128]]);
        });
    });
    g.finish();
}

criterion_group!(benches, spm_benches);
criterion_main!(benches);
