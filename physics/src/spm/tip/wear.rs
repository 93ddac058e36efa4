//! Slow changes of the tip while it scans, crashes or picks things up (they never decrease `R`).
//!
//! - [`TipState::wear`]: `R += wear_rate · L · u`, `L` the tip travel in contact (m), `u ~ U(0.5,
//!   1.5)`. The default `wear_rate = 1e-7` grows `R` by ≈ 5 nm over 100 frames of 256 lines of
//!   1 µm, trace and retrace (`L = 100·256·2·1 µm = 5.1 cm`).
//! - [`TipState::wear_archard`] (opt-in, `wear_model = "archard"`): Archard's law, worn volume
//!   `V = k_w · F · s / H` for a load `F` over a sliding distance `s` (`k_w` the wear coefficient,
//!   `H` the hardness), taken off the apex as a flat: a paraboloid `z = ρ²/(2R)` truncated at
//!   height `δ` above its apex loses `V(δ) = ∫₀^δ π·2Rz dz = π R δ²` and leaves a flat of radius
//!   `a = √(2Rδ)`. The state's flat radius is its truncation so far (`δ₀ = a²/(2R)`, worn volume
//!   `π R δ₀² = π a⁴/(4R)`); a further volume `ΔV` truncates it to `δ₁ = √(δ₀² + ΔV/(πR))`, so
//!   volumes add. Deterministic: the load sets the rate, so a harder set point blunts faster.
//! - [`TipState::crash`] into the surface by `δ`: `R += crash_growth · δ · u`, the apex is
//!   flattened to `a ≥ crash_flattening · √(2Rδ)` (the contact radius of a paraboloid pressed
//!   `δ` deep), and with probability `double_probability` a second apex forms.
//! - [`TipState::spontaneous`] while scanning for `T`: `k ~ Poisson(adsorbate_rate · T)` pick-ups
//!   ([`TipState::pick_up`]); each makes a second apex with probability `double_probability`,
//!   else an adsorbate. A manipulated adatom the tip picks up is one more pick-up.
//! - Conditioning wear: every conditioning action, whatever its outcome, then grows `R` by
//!   `conditioning_wear · s · u` (`s` its strength, `u ~ U(0.5, 1.5)`; default 0, off), so a
//!   tip conditioned again and again blunts even when each action sharpens it.
//!
//! Growth is capped: neither `R` nor the flat radius grows past `max_radius`.

use super::state::draw_second;
use super::{Adsorbate, TipConfig, TipState, jitter};
use crate::error::{PhysicsError, Result};
use crate::rng::{SimRng, poisson, uniform};

/// Most pick-ups applied in one [`TipState::spontaneous`] call.
const MAX_PICKUPS: u32 = 16;

impl TipState {
    /// Sets `R` to `new` capped at `max_radius`, never decreasing it (NaN leaves it).
    pub(super) fn grow_radius(&mut self, new: f64, cfg: &TipConfig) {
        let capped = new.min(cfg.max_radius.get());
        if capped > self.radius {
            self.radius = capped;
        }
    }

    /// Sets the flat radius to `new` capped at `max_radius`, never decreasing it.
    pub(super) fn grow_flat(&mut self, new: f64, cfg: &TipConfig) {
        let capped = new.min(cfg.max_radius.get());
        if capped > self.flat_radius {
            self.flat_radius = capped;
        }
    }

    /// Wear from `contact_travel` (m, ≥ 0) of tip travel in contact:
    /// `R += wear_rate · L · u`, `u ~ U(0.5, 1.5)`, capped at `max_radius`.
    pub fn wear(&mut self, contact_travel: f64, cfg: &TipConfig, rng: &mut SimRng) -> Result<()> {
        if !(contact_travel >= 0.0 && contact_travel.is_finite()) {
            return Err(PhysicsError::arg(
                "contact_travel",
                format!("must be a finite length >= 0 m, got {contact_travel}"),
            ));
        }
        let u = jitter(rng);
        self.grow_radius(self.radius + cfg.wear_rate.get() * contact_travel * u, cfg);
        Ok(())
    }

    /// Archard wear from `contact_travel` (m, ≥ 0) of sliding at `load` (N, ≥ 0): the volume
    /// `k_w F s / H` (`wear_coefficient`, `hardness`) truncates the paraboloid apex (module
    /// docs), growing the flat radius to `√(2Rδ₁)`, `δ₁ = √(δ₀² + ΔV/(πR))`, capped at
    /// `max_radius`. Returns the volume worn, m³.
    pub fn wear_archard(&mut self, load: f64, contact_travel: f64, cfg: &TipConfig) -> Result<f64> {
        if !(contact_travel >= 0.0 && contact_travel.is_finite()) {
            return Err(PhysicsError::arg(
                "contact_travel",
                format!("must be a finite length >= 0 m, got {contact_travel}"),
            ));
        }
        if !(load >= 0.0 && load.is_finite()) {
            return Err(PhysicsError::arg(
                "load",
                format!("must be a finite force >= 0 N, got {load}"),
            ));
        }
        let dv = cfg.wear_coefficient.get() * load * contact_travel / cfg.hardness.get();
        if dv > 0.0 {
            let r = self.radius;
            let d0 = self.flat_radius * self.flat_radius / (2.0 * r);
            let d1 = (d0 * d0 + dv / (std::f64::consts::PI * r)).sqrt();
            self.grow_flat((2.0 * r * d1).sqrt(), cfg);
        }
        Ok(dv)
    }

    /// The volume truncated off the paraboloid apex so far, m³: `π R δ²` with `δ = a²/(2R)`
    /// the height of the flat of radius `a` above the apex (see [`TipState::wear_archard`]).
    pub fn truncated_volume(&self) -> f64 {
        let d = self.flat_radius * self.flat_radius / (2.0 * self.radius);
        std::f64::consts::PI * self.radius * d * d
    }

    /// A crash `depth` (m, ≥ 0) into the surface: `R += crash_growth · δ · u`, the apex flattened
    /// to `a ≥ crash_flattening · √(2Rδ)`, and a second apex with probability
    /// `double_probability` (if there is none). A zero depth changes nothing.
    pub fn crash(&mut self, depth: f64, cfg: &TipConfig, rng: &mut SimRng) -> Result<()> {
        if !(depth >= 0.0 && depth.is_finite()) {
            return Err(PhysicsError::arg(
                "depth",
                format!("must be a finite length >= 0 m, got {depth}"),
            ));
        }
        if depth == 0.0 {
            return Ok(());
        }
        let (u, u_double) = (jitter(rng), uniform(rng));
        let r_old = self.radius;
        self.grow_radius(r_old + cfg.crash_growth.get() * depth * u, cfg);
        self.grow_flat(
            cfg.crash_flattening.get() * (2.0 * r_old * depth).sqrt(),
            cfg,
        );
        if self.second.is_none() && u_double < cfg.double_probability.get() {
            self.second = Some(draw_second(cfg, rng));
        }
        Ok(())
    }

    /// Spontaneous changes while scanning for `scan_time` (s, ≥ 0): `k ~ Poisson(adsorbate_rate
    /// · T)` pick-ups (at most 16 applied), each forming a second apex with probability
    /// `double_probability` and otherwise an adsorbate (nothing if the tip already has that
    /// defect). The apex radius does not change.
    pub fn spontaneous(&mut self, scan_time: f64, cfg: &TipConfig, rng: &mut SimRng) -> Result<()> {
        if !(scan_time >= 0.0 && scan_time.is_finite()) {
            return Err(PhysicsError::arg(
                "scan_time",
                format!("must be a finite time >= 0 s, got {scan_time}"),
            ));
        }
        let k =
            poisson(rng, cfg.adsorbate_rate.get() * scan_time).min(f64::from(MAX_PICKUPS)) as u32;
        for _ in 0..k {
            self.pick_up(cfg, rng);
        }
        Ok(())
    }

    /// One pick-up of material by the apex (a contaminant while scanning, an adatom the tip
    /// takes during a manipulation): with probability `double_probability` it forms a second
    /// apex (a double tip), otherwise it sits on the apex as an adsorbate ([`Adsorbate`]: the
    /// kernel radius grows by `adsorbate_blur`, the images get `adsorbate_noise` times noisier
    /// and streaky). Nothing changes if the tip already has that defect.
    pub fn pick_up(&mut self, cfg: &TipConfig, rng: &mut SimRng) {
        if uniform(rng) < cfg.double_probability.get() {
            if self.second.is_none() {
                self.second = Some(draw_second(cfg, rng));
            }
        } else if self.adsorbate.is_none() {
            self.adsorbate = Some(Adsorbate::from_config(cfg));
        }
    }
}
