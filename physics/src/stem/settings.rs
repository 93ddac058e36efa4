//! The one scan-settings check of the three STEM simulators (full, dopant and lattice): every
//! frame request and every `[scan]` configuration goes through [`check_scan_settings`], so a
//! limit is stated once.
//!
//! The limits and why:
//! - **pixels**: 1 to 4096 per side. A one-pixel frame is a point exposure with a flyback
//!   (tasks scan windows of 5² pixels around a dopant); 4096² is the largest frame of common
//!   STEM scan generators (Gatan DigiScan, Nion Swift).
//! - **pixel_size**: 0.001 Å to 10 nm. Atomic-resolution simulators resolve the probe by
//!   binning a sub-pixel grid of pitch ≤ λ/(4α): at 10 nm pixels (60 kV, 30 mrad) that grid has
//!   4·10⁶ points per probe, growing as the pixel size squared (at 1 µm, the full simulator's
//!   former cap, 4·10¹⁰, more memory than a machine has), and 4096 pixels of 10 nm already span
//!   41 µm, far beyond any specimen these models hold.
//! - **dwell_time**: 1 ns to 1 s. Scan generators and HAADF amplifiers do not go below tens of
//!   ns per pixel; 1 ns leaves room for idealized studies.
//! - **flyback_time**: 0 to 1 s.
//! - **center**: finite and within the instrument's deflection range (±[`DEFLECTION_RANGE`]
//!   unless the instrument states its own).

use crate::error::{PhysicsError, Result};
use crate::instrument::ScanSettings;

/// Frame side limits, pixels (inclusive).
pub const PIXELS: [usize; 2] = [1, 4096];
/// Pixel size limits, m (inclusive).
pub const PIXEL_SIZE: [f64; 2] = [1e-13, 1e-8];
/// Dwell time limits per pixel, s (inclusive).
pub const DWELL_TIME: [f64; 2] = [1e-9, 1.0];
/// Flyback time limits per line, s (inclusive).
pub const FLYBACK_TIME: [f64; 2] = [0.0, 1.0];
/// Default beam deflection range: the frame centre and a parked probe stay within this distance
/// of the optic axis along each axis, m (1 µm, the high-magnification range of STEM scan coils).
pub const DEFLECTION_RANGE: f64 = 1e-6;

/// Checks scan settings against the limits of the module docs, with the frame centre allowed
/// within `±deflection_range` (m) along each axis. `prefix` is prepended to the field name in
/// the error (`"scan."` gives `scan.pixels`, `scan.pixel_size`, `scan.dwell_time`,
/// `scan.flyback_time`, `scan.center[0]`, `scan.center[1]`).
pub fn check_scan_settings(s: &ScanSettings, deflection_range: f64, prefix: &str) -> Result<()> {
    let [lo, hi] = PIXELS;
    if !(lo..=hi).contains(&s.rows) || !(lo..=hi).contains(&s.cols) {
        return Err(PhysicsError::param(
            format!("{prefix}pixels"),
            format!(
                "each side must be {lo}..={hi}, got [{}, {}]",
                s.rows, s.cols
            ),
        ));
    }
    for (name, v, [lo, hi]) in [
        ("pixel_size", s.pixel_size, PIXEL_SIZE),
        ("dwell_time", s.dwell_time, DWELL_TIME),
        ("flyback_time", s.flyback_time, FLYBACK_TIME),
    ] {
        if !(v.is_finite() && v >= lo && v <= hi) {
            return Err(PhysicsError::param(
                format!("{prefix}{name}"),
                format!("must lie in [{lo:e}, {hi:e}] (SI units), got {v:e}"),
            ));
        }
    }
    for (i, c) in s.center.iter().enumerate() {
        if !(c.is_finite() && c.abs() <= deflection_range) {
            return Err(PhysicsError::param(
                format!("{prefix}center[{i}]"),
                format!("must be finite and within ±{deflection_range:e} m, got {c:e}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> ScanSettings {
        ScanSettings {
            rows: 64,
            cols: 64,
            pixel_size: 0.2e-10,
            dwell_time: 4e-6,
            flyback_time: 0.0,
            center: [0.0, 0.0],
        }
    }

    fn field(s: ScanSettings) -> String {
        match check_scan_settings(&s, DEFLECTION_RANGE, "scan.") {
            Err(PhysicsError::InvalidParameter { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn limits_are_inclusive_and_errors_name_the_field() {
        check_scan_settings(&ok(), DEFLECTION_RANGE, "scan.").unwrap();
        let edges = ScanSettings {
            rows: 1,
            cols: 4096,
            pixel_size: 1e-8,
            dwell_time: 1e-9,
            flyback_time: 1.0,
            center: [1e-6, -1e-6],
        };
        check_scan_settings(&edges, DEFLECTION_RANGE, "scan.").unwrap();
        assert_eq!(field(ScanSettings { rows: 0, ..ok() }), "scan.pixels");
        assert_eq!(field(ScanSettings { cols: 4097, ..ok() }), "scan.pixels");
        let px = ScanSettings {
            pixel_size: 2e-8,
            ..ok()
        };
        assert_eq!(field(px), "scan.pixel_size");
        let dwell = ScanSettings {
            dwell_time: 0.5e-9,
            ..ok()
        };
        assert_eq!(field(dwell), "scan.dwell_time");
        let fly = ScanSettings {
            flyback_time: -1e-6,
            ..ok()
        };
        assert_eq!(field(fly), "scan.flyback_time");
        let c = ScanSettings {
            center: [0.0, f64::NAN],
            ..ok()
        };
        assert_eq!(field(c), "scan.center[1]");
        let far = ScanSettings {
            center: [1.1e-6, 0.0],
            ..ok()
        };
        assert_eq!(field(far), "scan.center[0]");
    }

    /// The three simulators refuse the same request with the same field and accept the same
    /// small window: a 10 nm pixel size is refused by the full simulator that used to accept up
    /// to 1 µm (and then planned a probe grid of 10¹⁰ points), a 5 × 5 window (the dopant
    /// task's smallest) is accepted by the full simulator that used to need 8 pixels a side.
    #[test]
    fn the_three_simulators_share_the_limits() {
        use crate::instrument::StemInstrument;
        use crate::param::Param;
        use crate::stem::StemSimulator;
        use crate::stem::dopant::{DopantSimConfig, DopantSimulator};
        use crate::stem::lattice::LatticeSimulator;
        use crate::stem::specimen::Crystal;
        let mut cfg = crate::stem::StemConfig::default().without_scan_distortions();
        cfg.specimen.crystal = Crystal::Mos2;
        cfg.scan.pixels = [16, 16];
        cfg.damage.sputtering = false;
        let mut full = StemSimulator::new(cfg.clone(), 1).unwrap();
        let mut lattice = LatticeSimulator::new(cfg.clone(), 1).unwrap();
        let mut dopant = DopantSimulator::new(DopantSimConfig::default(), 1).unwrap();
        let sims: [&mut dyn StemInstrument; 3] = [&mut full, &mut lattice, &mut dopant];
        for sim in sims {
            let big = ScanSettings {
                pixel_size: 2e-8,
                ..ok()
            };
            match sim.configure_scan(&big) {
                Err(PhysicsError::InvalidParameter { field, .. }) => {
                    assert_eq!(field, "scan.pixel_size")
                }
                other => panic!("{other:?}"),
            }
            let window = ScanSettings {
                rows: 5,
                cols: 5,
                pixel_size: 0.4e-10,
                dwell_time: 1e-5,
                ..ok()
            };
            sim.configure_scan(&window).unwrap();
            let f = sim.acquire_frame().unwrap();
            assert_eq!(f.image.dim(), (5, 5));
            assert!(f.image.iter().all(|v| v.is_finite() && *v >= 0.0));
        }
        // The configurations go through the same check.
        cfg.scan.pixels = [5, 5];
        StemSimulator::new(cfg.clone(), 1).unwrap();
        cfg.scan.pixel_size = Param::fixed(1e-7);
        let err = StemSimulator::new(cfg, 1).unwrap_err();
        assert!(err.to_string().contains("scan.pixel_size"), "{err}");
        let d = DopantSimConfig {
            dwell_time: Param::fixed(1e-10),
            ..DopantSimConfig::default()
        };
        let err = DopantSimulator::new(d, 1).unwrap_err();
        assert!(err.to_string().contains("dwell_time"), "{err}");
    }
}
