//! The full simulator configured as a light one: the [`StemConfig`] whose [`StemSimulator`]
//! (finite atoms, the aberration-limited probe, splatting and convolution, knock-on of every
//! atom) images the same scene as a [`DopantSimulator`](crate::stem::dopant::DopantSimulator)
//! with a given [`DopantSimConfig`], so a task can run at either fidelity.
//!
//! ```
//! use scopegym_physics::stem::dopant::DopantSimConfig;
//! use scopegym_physics::stem::equivalent::stem_config_for_dopant;
//! let c = stem_config_for_dopant(&DopantSimConfig::default());
//! assert_eq!(c.specimen.dopants[0].element, "Si");
//! c.validate().unwrap();
//! ```
//!
//! [`StemSimulator`]: crate::stem::StemSimulator

use crate::constants::SYMBOLS;
use crate::param::{Dim, Param};
use crate::stem::StemConfig;
use crate::stem::dopant::DopantSimConfig;
use crate::stem::specimen::{Crystal, DopantConfig};
use std::marker::PhantomData;

pub use crate::constants::AIRY_FWHM;
pub use crate::stem::probe::source_sigma_for_fwhm;

/// Maps a parameter through a monotone function `f`: fixed values and the ends of uniform and
/// log-uniform ranges exactly (a log-uniform whose image is not positive becomes uniform), a
/// normal by its mean and the local slope (`sd · |f'(mean)|`). Between the ends the mapped
/// draws follow `f` of a uniform only approximately when `f` is not linear.
pub fn map_param<A: Dim, B: Dim>(p: &Param<A>, f: impl Fn(f64) -> f64) -> Param<B> {
    let sorted = |a: f64, b: f64| if a <= b { (a, b) } else { (b, a) };
    match *p {
        Param::Fixed(v, _) => Param::fixed(f(v)),
        Param::Uniform(a, b, _) => {
            let (lo, hi) = sorted(f(a), f(b));
            Param::between(lo, hi)
        }
        Param::LogUniform(a, b, _) => {
            let (lo, hi) = sorted(f(a), f(b));
            if lo > 0.0 {
                Param::log_uniform(lo, hi)
            } else {
                Param::between(lo, hi)
            }
        }
        Param::Normal(m, sd, _) => {
            let h = 1e-6 * m.abs().max(sd).max(f64::MIN_POSITIVE);
            let slope = (f(m + h) - f(m - h)) / (2.0 * h);
            Param::Normal(f(m), sd * slope.abs(), PhantomData)
        }
    }
}

/// The [`StemConfig`] equivalent to the light dopant model's `c`:
///
/// - beam energy, current, convergence angle, detector (HAADF exponent, carbon cross-section,
///   gain, offset, read noise, shot noise), hop model, knock-on (the dopant's displacement
///   energy, temperature), frame pixels, pixel size, dwell and flyback map one to one;
/// - the probe is aberration-free (C10 … C50 = 0, no chromatic spread) with the source blur
///   that gives the light model's `probe_fwhm` at the centre values of energy and angle
///   ([`source_sigma_for_fwhm`], mapped by [`map_param`]);
/// - the specimen is graphene of the light model's lattice constant and rotation with one
///   dopant of `dopant_z` at the origin, a square of `2 · deflection_range + 2 nm` a side;
/// - drift: fixed velocity components map to the same speed and direction exactly; randomized
///   components to a speed uniform up to their largest magnitude and a uniform direction (the
///   light model's per-axis draws have the same support, not the same distribution); no random
///   walk, no line jitter, scan noise or mains pickup (the light model has none).
pub fn stem_config_for_dopant(c: &DopantSimConfig) -> StemConfig {
    let mut s = StemConfig::default().without_scan_distortions();
    let o = &mut s.optics;
    o.energy = c.energy;
    o.convergence_angle = c.convergence_angle;
    for p in [
        &mut o.c10, &mut o.c12, &mut o.c21, &mut o.c23, &mut o.c30, &mut o.c50,
    ] {
        *p = Param::fixed(0.0);
    }
    o.cc = Param::fixed(0.0);
    o.energy_spread = Param::fixed(0.0);
    let (e, a) = (c.energy.get(), c.convergence_angle.get());
    o.source_size = map_param(&c.probe_fwhm, |f| source_sigma_for_fwhm(f, e, a));
    s.beam.current = c.current;
    let d = &mut s.detector;
    d.haadf_exponent = c.haadf_exponent;
    d.carbon_cross_section = c.carbon_cross_section;
    d.gain = c.detector_gain;
    d.offset = c.detector_offset;
    d.read_noise = c.read_noise;
    d.shot_noise = c.shot_noise;
    let sp = &mut s.specimen;
    sp.crystal = Crystal::Graphene;
    sp.lattice_constant = c.lattice_constant;
    sp.rotation = c.rotation;
    let side = 2.0 * c.deflection_range + 2e-9;
    sp.size = [Param::fixed(side), Param::fixed(side)];
    let element = SYMBOLS
        .get(usize::from(c.dopant_z))
        .copied()
        .unwrap_or("Si");
    sp.dopants = vec![DopantConfig {
        element: element.to_string(),
        ..DopantConfig::default()
    }];
    let dm = &mut s.damage;
    dm.sputtering = c.sputtering;
    dm.displacement_energy
        .insert(element.to_string(), c.displacement_energy);
    dm.temperature = c.temperature;
    dm.dopant_hops = true;
    dm.hop_peak_rate = c.hop_peak_rate;
    dm.hop_reference_current = c.hop_reference_current;
    dm.hop_offset = c.hop_offset;
    dm.hop_variance = c.hop_variance;
    dm.hop_dopant_z = c.dopant_z;
    dm.hop_host_z = 6;
    let sc = &mut s.scan;
    sc.pixels = c.pixels;
    sc.pixel_size = c.pixel_size;
    sc.dwell_time = c.dwell_time;
    sc.flyback_time = c.flyback_time;
    sc.dose = None;
    let [vx, vy] = &c.drift_velocity;
    match (vx, vy) {
        (Param::Fixed(x, _), Param::Fixed(y, _)) => {
            s.drift.speed = Param::fixed(x.hypot(*y));
            s.drift.direction = Param::fixed(y.atan2(*x));
        }
        _ => {
            let reach = |p: &Param<_>| match *p {
                Param::Fixed(v, _) => v.abs(),
                Param::Uniform(a, b, _) | Param::LogUniform(a, b, _) => a.abs().max(b.abs()),
                Param::Normal(m, sd, _) => m.abs() + 2.0 * sd,
            };
            s.drift.speed = Param::uniform(0.0, reach(vx).max(reach(vy)));
            s.drift.direction = Param::uniform(0.0, std::f64::consts::TAU);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::FWHM_PER_SIGMA;
    use crate::param::dims::{Length, Unitless};
    use crate::stem::optics::electron_wavelength;

    #[test]
    fn airy_fwhm_plus_source_blur_gives_the_asked_width() {
        // 60 kV, 30 mrad: λ = 0.0487 Å, Airy FWHM = 0.514 · 0.0487 / 0.03 = 0.834 Å.
        let airy = AIRY_FWHM * electron_wavelength(60e3) / 30e-3;
        assert!((airy - 0.834e-10).abs() < 0.005e-10, "{airy}");
        let s = source_sigma_for_fwhm(1.1e-10, 60e3, 30e-3);
        let total = (airy * airy + (FWHM_PER_SIGMA * s).powi(2)).sqrt();
        assert!((total - 1.1e-10).abs() < 1e-16);
        assert_eq!(source_sigma_for_fwhm(0.5e-10, 60e3, 30e-3), 0.0);
    }

    #[test]
    fn params_map_by_their_ends_and_slope() {
        let double = |x: f64| 2.0 * x;
        let u: Param<Length> = map_param::<Unitless, Length>(&Param::uniform(1.0, 3.0), |x| -x);
        assert_eq!(u, Param::uniform(-3.0, -1.0));
        let n: Param<Length> =
            map_param::<Unitless, Length>(&Param::Normal(2.0, 0.5, PhantomData), double);
        let Param::Normal(m, sd, _) = n else {
            panic!("{n:?}")
        };
        assert_eq!(m, 4.0);
        assert!((sd - 1.0).abs() < 1e-9, "{sd}");
        let l: Param<Length> = map_param::<Unitless, Length>(&Param::log_uniform(1.0, 4.0), double);
        assert_eq!(l, Param::log_uniform(2.0, 8.0));
    }

    #[test]
    fn the_equivalent_config_is_valid_and_carries_the_fields() {
        let c = DopantSimConfig {
            drift_velocity: [Param::fixed(3e-12), Param::fixed(4e-12)],
            ..DopantSimConfig::default()
        };
        let s = stem_config_for_dopant(&c);
        s.validate().unwrap();
        assert!((s.drift.speed.get() - 5e-12).abs() < 1e-24);
        assert_eq!(s.damage.hop_peak_rate, c.hop_peak_rate);
        assert_eq!(s.specimen.size[0].get(), 12e-9);
    }
}
