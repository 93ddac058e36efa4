//! STEM HAADF frame benchmarks (DESIGN.md §11): a 256² frame of Si-doped graphene at 0.2 Å per
//! pixel under an aberrated probe (C10 = 2 nm, C12 = 1 nm, default C30/C50), Poisson counts and
//! the default scan distortions (drift, line jitter, 1/f scan noise, mains pickup).
//!
//! - `stem_frame_256/unchanged_probe`: `acquire_frame` with the probe cached.
//! - `stem_frame_256/after_aberration_change`: C10 alternates between two values before every
//!   frame, so each iteration recomputes the probe and its kernel spectrum.
//! - `stem_probe/recompute`: `set_aberrations` + `probe_kernel` (probe recomputation alone).
//!
//! `benches/python/stem_frame_numpy.py` times a NumPy implementation of the same model.
//!
//! With `SCOPEGYM_BENCH_DUMP=<dir>` set, the bench first writes `.npy` files that the Python
//! script's `--check` mode compares against: `probe_kernel.npy` (the binned probe of the bench
//! configuration, f64), `probe_kernel_coarse.npy` (the same probe binned onto 0.5 Å pixels,
//! two fine pixels each, f64), `atoms.npy` (x, y in m and Z of every atom, f64),
//! `noiseless_quiet.npy` (the noiseless frame, f32, with drift, jitter and scan noise off) and
//! `noiseless_drift.npy` (4 × rows × cols, f32: the first four noiseless frames with a constant
//! drift of 0.03 Å/s only; frame 0 renders the ideal image, frames 1-2 reuse it with the drift
//! applied in the resampling, frame 3 re-renders it after the drift passed one pixel).

use criterion::{Criterion, criterion_group, criterion_main};
use scopegym_physics::instrument::StemInstrument;
use scopegym_physics::param::Param;
use scopegym_physics::stem::optics::ProbeCalculator;
use scopegym_physics::stem::specimen::DopantConfig;
use scopegym_physics::stem::{StemConfig, StemSimulator};
use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

const SEED: u64 = 7;
/// The two defoci the aberration-change benchmark alternates between, m.
const C10_A: f64 = 2e-9;
const C10_B: f64 = 2.5e-9;

/// The benchmark configuration: 256 × 256 pixels of 0.2 Å, graphene with one Si dopant (the
/// auto-sized periodic cell is the field's diagonal plus 2 nm on a side), an aberrated probe, Poisson
/// noise and the default scan distortions. Sputtering is off so the specimen stays fixed.
fn bench_config() -> StemConfig {
    let mut cfg = StemConfig::default();
    cfg.scan.pixels = [256, 256];
    cfg.scan.pixel_size = Param::fixed(0.2e-10);
    cfg.specimen.dopants = vec![DopantConfig::default()];
    cfg.optics.c10 = Param::fixed(C10_A);
    cfg.optics.c12 = Param::fixed(1e-9);
    cfg.detector.shot_noise = true;
    cfg.damage.sputtering = false;
    cfg.damage.dopant_hops = false;
    cfg
}

/// The bench configuration with every random distortion off and no shot noise: the noiseless
/// frame is then the ideal image cropped from the padded grid.
fn quiet_config() -> StemConfig {
    let mut cfg = bench_config().without_scan_distortions();
    cfg.detector.shot_noise = false;
    cfg
}

/// [`quiet_config`] with a constant drift (no random walk) of `DRIFT_SPEED` along 0.5 rad.
fn drift_config() -> StemConfig {
    let mut cfg = quiet_config();
    cfg.drift.speed = Param::fixed(DRIFT_SPEED);
    cfg
}

/// Image pixel of the coarse reference probe kernel, m.
const COARSE_DX: f64 = 0.5e-10;

/// Drift speed of the drift-only reference frames, m/s (0.014 Å = 0.07 px per 0.275 s frame, so the
/// 0.1 px re-render rule alternates rendered and cached frames).
const DRIFT_SPEED: f64 = 0.05e-10;

fn simulator(cfg: StemConfig) -> StemSimulator {
    let sim = StemSimulator::new(cfg, SEED).expect("valid benchmark configuration");
    let n = sim.specimen().atoms.len();
    assert!(
        n >= 1000,
        "the benchmark needs at least 1000 atoms, the specimen has {n}"
    );
    sim
}

/// Writes a little-endian `.npy` (format 1.0) of `shape` with dtype `descr` (`<f4`/`<f8`).
fn write_npy(path: &Path, descr: &str, shape: &[usize], bytes: &[u8]) -> std::io::Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(
        &u16::try_from(header.len())
            .expect("short header")
            .to_le_bytes(),
    )?;
    f.write_all(header.as_bytes())?;
    f.write_all(bytes)?;
    f.flush()
}

/// Writes the reference arrays for `stem_frame_numpy.py --check` into `dir`.
fn dump_reference(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut sim = simulator(bench_config());
    let (side, kernel) = sim.probe_kernel();
    let bytes: Vec<u8> = kernel.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&dir.join("probe_kernel.npy"), "<f8", &[side, side], &bytes)?;
    // The same probe binned onto 0.5 Å pixels: two fine pixels per image pixel, so the sub-pixel
    // centring of `binned_probe` is exercised (at 0.2 Å the fine grid is the image grid).
    let mut coarse = Vec::new();
    let cside = ProbeCalculator::new().binned_probe(
        &sim.probe_spec(),
        COARSE_DX,
        256.0 * COARSE_DX,
        &mut coarse,
    );
    let bytes: Vec<u8> = coarse.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(
        &dir.join("probe_kernel_coarse.npy"),
        "<f8",
        &[cside, cside],
        &bytes,
    )?;
    let atoms = &sim.specimen().atoms;
    let bytes: Vec<u8> = atoms
        .iter()
        .flat_map(|a| [a.x, a.y, f64::from(a.z)])
        .flat_map(f64::to_le_bytes)
        .collect();
    write_npy(&dir.join("atoms.npy"), "<f8", &[atoms.len(), 3], &bytes)?;
    let mut quiet = simulator(quiet_config());
    quiet.acquire_frame().expect("frame");
    let img = quiet.last_noiseless();
    let (rows, cols) = img.dim();
    let bytes: Vec<u8> = img.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(
        &dir.join("noiseless_quiet.npy"),
        "<f4",
        &[rows, cols],
        &bytes,
    )?;
    let mut drifting = simulator(drift_config());
    let mut bytes: Vec<u8> = Vec::new();
    for _ in 0..4 {
        drifting.acquire_frame().expect("frame");
        bytes.extend(
            drifting
                .last_noiseless()
                .iter()
                .flat_map(|v| v.to_le_bytes()),
        );
    }
    write_npy(
        &dir.join("noiseless_drift.npy"),
        "<f4",
        &[4, rows, cols],
        &bytes,
    )?;
    eprintln!(
        "stem_frame: wrote probe_kernel.npy, probe_kernel_coarse.npy, atoms.npy, noiseless_quiet.npy, noiseless_drift.npy to {}",
        dir.display()
    );
    Ok(())
}

fn stem_benches(c: &mut Criterion) {
    if let Some(dir) = std::env::var_os("SCOPEGYM_BENCH_DUMP") {
        dump_reference(Path::new(&dir)).expect("writing the reference arrays");
    }

    let mut sim = simulator(bench_config());
    let (side, _) = sim.probe_kernel();
    eprintln!(
        "stem_frame: {} atoms in the specimen, probe kernel {side}×{side} px",
        sim.specimen().atoms.len()
    );

    let mut g = c.benchmark_group("stem_frame_256");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("unchanged_probe", |b| {
        b.iter(|| {
            let f = sim.acquire_frame().expect("frame");
            black_box(f.image[[128, 128]]);
        });
    });
    let mut flip = false;
    g.bench_function("after_aberration_change", |b| {
        b.iter(|| {
            flip = !flip;
            let mut ab = sim.aberrations();
            ab.c10 = if flip { C10_B } else { C10_A };
            sim.set_aberrations(&ab).expect("valid aberrations");
            let f = sim.acquire_frame().expect("frame");
            black_box(f.image[[128, 128]]);
        });
    });
    g.finish();

    let mut g = c.benchmark_group("stem_probe");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("recompute", |b| {
        b.iter(|| {
            flip = !flip;
            let mut ab = sim.aberrations();
            ab.c10 = if flip { C10_B } else { C10_A };
            sim.set_aberrations(&ab).expect("valid aberrations");
            let (s, k) = sim.probe_kernel();
            black_box((s, k[0]));
        });
    });
    g.finish();
}

criterion_group!(benches, stem_benches);
criterion_main!(benches);
