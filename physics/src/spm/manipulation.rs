//! STM lateral atom manipulation: an Ag adatom on Ag(111) hollow sites, dragged by the tip.
//!
//! The adatom sits on the hollow sites of Ag(111) (lattice constant a = 0.288 nm): fcc and hcp
//! hollows form a honeycomb net whose nearest neighbours are a/√3 ≈ 0.166 nm apart. During a
//! lateral manipulation the tip moves in small steps from a start to an end point at a given
//! bias V and tunnel conductance G (current over bias). At each tip step, if the tip is within
//! the interaction range of the adatom and a neighbouring site lies closer to the tip, the adatom
//! hops there with probability
//! `p = p_max · σ((log₁₀G − log₁₀G½)/w) · exp(−|V|/V₀)`:
//! it follows a close, strongly coupled tip (high conductance) and is pushed away from the tip's
//! grip by a higher bias. With probability `q = q₀ (G/G_max)(|V|/V_max)` per manipulation the
//! adatom is picked up by the tip (lost). Success: the adatom ends within a/√3 of the goal.
//! Limits (DESIGN.md §5): bias ≤ 15 mV, conductance ≤ 6 nA/mV.

use crate::error::{PhysicsError, Result};
use crate::param::Param;
use crate::param::dims::{Length, Unitless, Voltage};
use crate::rng::SimRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Ag(111) lattice constant, m.
pub const AG111_A: f64 = 0.288e-9;

/// Manipulation model settings (`[manipulation]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManipulationConfig {
    /// Surface lattice constant, m. Default 0.288 nm (Ag(111)).
    pub lattice_constant: Param<Length>,
    /// Tip-adatom interaction range, m. Default 0.3 nm.
    pub interaction_range: Param<Length>,
    /// Tip step along the path, m. Default 0.02 nm.
    pub tip_step: Param<Length>,
    /// Largest hop probability per tip step. Default 0.9.
    pub p_max: Param<Unitless>,
    /// Conductance at which the coupling is half its maximum, nA/mV. Default 1.5.
    pub conductance_half: Param<Unitless>,
    /// Width of the coupling sigmoid in decades of conductance. Default 0.25.
    pub conductance_width: Param<Unitless>,
    /// Bias scale V₀ of the decoupling, V. Default 8 mV.
    pub bias_scale: Param<Voltage>,
    /// Pick-up probability per manipulation at the largest conductance and bias. Default 0.05.
    pub pickup_max: Param<Unitless>,
}

impl Default for ManipulationConfig {
    fn default() -> Self {
        Self {
            lattice_constant: Param::fixed(AG111_A),
            interaction_range: Param::fixed(0.3e-9),
            tip_step: Param::fixed(0.02e-9),
            p_max: Param::fixed(0.9),
            conductance_half: Param::fixed(1.5),
            conductance_width: Param::fixed(0.25),
            bias_scale: Param::fixed(8e-3),
            pickup_max: Param::fixed(0.05),
        }
    }
}

/// Largest bias of a lateral manipulation, V.
pub const MAX_BIAS: f64 = 15e-3;
/// Largest conductance of a lateral manipulation, nA/mV.
pub const MAX_CONDUCTANCE: f64 = 6.0;

impl ManipulationConfig {
    /// Checks ranges; `prefix` names the section.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let chk = |n: &str, v: f64, lo: f64, hi: f64| {
            if v > lo && v <= hi {
                Ok(())
            } else {
                Err(PhysicsError::param(
                    format!("{prefix}{n}"),
                    format!("must be in ({lo}, {hi}], got {v}"),
                ))
            }
        };
        chk("lattice_constant", self.lattice_constant.get(), 1e-10, 1e-9)?;
        chk("interaction_range", self.interaction_range.get(), 0.0, 2e-9)?;
        chk("tip_step", self.tip_step.get(), 0.0, 0.2e-9)?;
        chk("p_max", self.p_max.get(), 0.0, 1.0)?;
        chk("conductance_half", self.conductance_half.get(), 0.0, 100.0)?;
        chk("conductance_width", self.conductance_width.get(), 0.0, 10.0)?;
        chk("bias_scale", self.bias_scale.get(), 0.0, 1.0)?;
        let q = self.pickup_max.get();
        if !(0.0..=1.0).contains(&q) {
            return Err(PhysicsError::param(
                format!("{prefix}pickup_max"),
                "must be in [0, 1]",
            ));
        }
        Ok(())
    }

    /// Hop probability per tip step for bias `v` (V) and conductance `g` (nA/mV).
    pub fn hop_probability(&self, v: f64, g: f64) -> f64 {
        let x = (g.log10() - self.conductance_half.get().log10()) / self.conductance_width.get();
        self.p_max.get() / (1.0 + (-x).exp()) * (-v.abs() / self.bias_scale.get()).exp()
    }
}

/// Outcome of one lateral manipulation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The adatom ended on a site (position in m).
    Moved([f64; 2]),
    /// The tip picked the adatom up.
    Lost,
}

/// The nearest hollow site to `p` (m) on the honeycomb net of hollows of a (111) surface with
/// lattice constant `a`: fcc hollows at lattice points + (a1 + a2)/3, hcp at + 2(a1 + a2)/3.
pub fn nearest_hollow(p: [f64; 2], a: f64) -> [f64; 2] {
    let s3 = 3f64.sqrt();
    let (a1, a2) = ([a, 0.0], [0.5 * a, 0.5 * s3 * a]);
    // Fractional coordinates.
    let det = a1[0] * a2[1] - a1[1] * a2[0];
    let u = (p[0] * a2[1] - p[1] * a2[0]) / det;
    let v = (a1[0] * p[1] - a1[1] * p[0]) / det;
    let mut best = [0.0, 0.0];
    let mut best_d = f64::INFINITY;
    for di in -1..=1 {
        for dj in -1..=1 {
            for off in [1.0 / 3.0, 2.0 / 3.0] {
                let (fu, fv) = (
                    u.floor() + f64::from(di) + off,
                    v.floor() + f64::from(dj) + off,
                );
                let q = [fu * a1[0] + fv * a2[0], fu * a1[1] + fv * a2[1]];
                let d = (q[0] - p[0]).hypot(q[1] - p[1]);
                if d < best_d {
                    best_d = d;
                    best = q;
                }
            }
        }
    }
    best
}

/// Drags the adatom at `atom` (on a hollow site, m) with the tip moving from `start` to `end`
/// (m) at bias `bias` (V, |bias| ≤ 15 mV) and conductance `conductance` (nA/mV, ≤ 6).
pub fn lateral_manipulation(
    cfg: &ManipulationConfig,
    atom: [f64; 2],
    start: [f64; 2],
    end: [f64; 2],
    bias: f64,
    conductance: f64,
    rng: &mut SimRng,
) -> Result<Outcome> {
    if !(bias.is_finite() && bias.abs() <= MAX_BIAS) {
        return Err(PhysicsError::arg(
            "bias",
            format!("must be within ±15 mV, got {bias} V"),
        ));
    }
    if !(conductance.is_finite() && conductance > 0.0 && conductance <= MAX_CONDUCTANCE) {
        return Err(PhysicsError::arg(
            "conductance",
            format!("must be in (0, 6] nA/mV, got {conductance}"),
        ));
    }
    if !(start.iter().chain(&end).chain(&atom).all(|v| v.is_finite())) {
        return Err(PhysicsError::arg("path", "positions must be finite"));
    }
    let a = cfg.lattice_constant.get();
    let nn = a / 3f64.sqrt();
    if rng.random::<f64>()
        < cfg.pickup_max.get() * (conductance / MAX_CONDUCTANCE) * (bias.abs() / MAX_BIAS)
    {
        return Ok(Outcome::Lost);
    }
    let p = cfg.hop_probability(bias, conductance);
    let range = cfg.interaction_range.get();
    let len = (end[0] - start[0]).hypot(end[1] - start[1]);
    let steps = (len / cfg.tip_step.get()).ceil().max(1.0) as usize;
    let mut pos = nearest_hollow(atom, a);
    for k in 1..=steps {
        let t = k as f64 / steps as f64;
        let tip = [
            start[0] + t * (end[0] - start[0]),
            start[1] + t * (end[1] - start[1]),
        ];
        let d = (tip[0] - pos[0]).hypot(tip[1] - pos[1]);
        if d > range || d < 0.5 * nn {
            continue;
        }
        // The neighbouring hollow toward the tip.
        let target = nearest_hollow(
            [
                pos[0] + nn * (tip[0] - pos[0]) / d,
                pos[1] + nn * (tip[1] - pos[1]) / d,
            ],
            a,
        );
        if target != pos && rng.random::<f64>() < p {
            pos = target;
        }
    }
    Ok(Outcome::Moved(pos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;

    fn success_rate(bias: f64, g: f64) -> f64 {
        let cfg = ManipulationConfig::default();
        let mut rng = seeded(9);
        let atom = nearest_hollow([0.0, 0.0], AG111_A);
        let goal = nearest_hollow([1.0e-9, 0.0], AG111_A);
        let n = 400;
        let ok = (0..n)
            .filter(|_| {
                match lateral_manipulation(&cfg, atom, atom, goal, bias, g, &mut rng).unwrap() {
                    Outcome::Moved(p) => {
                        (p[0] - goal[0]).hypot(p[1] - goal[1]) <= AG111_A / 3f64.sqrt() + 1e-15
                    }
                    Outcome::Lost => false,
                }
            })
            .count();
        ok as f64 / n as f64
    }

    #[test]
    fn success_rises_with_conductance_and_falls_with_bias() {
        let by_g: Vec<f64> = [0.5, 1.5, 6.0]
            .iter()
            .map(|&g| success_rate(5e-3, g))
            .collect();
        let by_v: Vec<f64> = [2e-3, 8e-3, 15e-3]
            .iter()
            .map(|&v| success_rate(v, 3.0))
            .collect();
        println!("success by conductance 0.5/1.5/6 nA/mV: {by_g:?}; by bias 2/8/15 mV: {by_v:?}");
        assert!(by_g[0] < by_g[1] && by_g[1] < by_g[2], "{by_g:?}");
        assert!(by_v[0] > by_v[1] && by_v[1] > by_v[2], "{by_v:?}");
        assert!(by_g[2] > 0.5 && by_g[0] < 0.2, "{by_g:?}");
    }

    #[test]
    fn hollow_sites_form_a_honeycomb_with_a_over_root3_spacing() {
        let a = AG111_A;
        let h = nearest_hollow([0.01e-9, 0.02e-9], a);
        let nn = a / 3f64.sqrt();
        // Neighbours at a/√3 in three directions; the site itself is stable under rounding.
        assert_eq!(nearest_hollow(h, a), h);
        let count = (0..12)
            .map(|k| {
                let ang = k as f64 * std::f64::consts::PI / 6.0;
                nearest_hollow([h[0] + nn * ang.cos(), h[1] + nn * ang.sin()], a)
            })
            .filter(|q| ((q[0] - h[0]).hypot(q[1] - h[1]) - nn).abs() < 1e-15)
            .collect::<Vec<_>>();
        let mut uniq: Vec<[f64; 2]> = Vec::new();
        for q in count {
            if !uniq
                .iter()
                .any(|u| (u[0] - q[0]).hypot(u[1] - q[1]) < 1e-15)
            {
                uniq.push(q);
            }
        }
        assert_eq!(uniq.len(), 3, "{uniq:?}");
    }

    #[test]
    fn out_of_range_inputs_are_errors() {
        let cfg = ManipulationConfig::default();
        let mut rng = seeded(0);
        let z = [0.0, 0.0];
        assert!(lateral_manipulation(&cfg, z, z, [1e-9, 0.0], 20e-3, 1.0, &mut rng).is_err());
        assert!(lateral_manipulation(&cfg, z, z, [1e-9, 0.0], 5e-3, 7.0, &mut rng).is_err());
        assert!(lateral_manipulation(&cfg, z, z, [f64::NAN, 0.0], 5e-3, 1.0, &mut rng).is_err());
        assert!(
            ManipulationConfig {
                p_max: Param::fixed(2.0),
                ..Default::default()
            }
            .validate("m.")
            .unwrap_err()
            .to_string()
            .contains("m.p_max")
        );
    }
}
