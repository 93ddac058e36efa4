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
//! adatom is lost (DESIGN.md §5: it "can be lost or picked up"), at a tip step drawn uniformly
//! along the path: with probability `pickup_share` the tip picks it up ([`Outcome::PickedUp`]:
//! it leaves the surface and sits on the tip apex, see
//! [`TipState::pick_up`](super::tip::TipState::pick_up)), otherwise it jumps out of the tip's
//! control to a random hollow site between `2a/√3` and `scatter_range` from where it was
//! ([`Outcome::Scattered`], uniform over that annulus before snapping to the nearest hollow).
//! Success: the adatom ends within a/√3 of the goal. Limits (DESIGN.md §5): bias ≤ 15 mV,
//! conductance ≤ 6 nA/mV.
//!
//! [`drag`] also reports where along the path each change happens ([`DragEvent`]), so a
//! simulator can record the tip height while dragging: hops show as steps in that trace where
//! they happen, as in measured manipulation signals.

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
    /// Probability per manipulation, at the largest conductance and bias, that the adatom is
    /// lost (picked up by the tip or scattered to a random site). Default 0.05.
    pub pickup_max: Param<Unitless>,
    /// Fraction of the losses in which the tip picks the adatom up; in the others it jumps to a
    /// random site. Default 0.5.
    pub pickup_share: Param<Unitless>,
    /// Largest distance of the random site a scattered adatom jumps to, m (at least `2a/√3`).
    /// Default 2 nm.
    pub scatter_range: Param<Length>,
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
            pickup_share: Param::fixed(0.5),
            scatter_range: Param::fixed(2e-9),
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
        for (n, v) in [
            ("pickup_max", self.pickup_max.get()),
            ("pickup_share", self.pickup_share.get()),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(PhysicsError::param(
                    format!("{prefix}{n}"),
                    format!("must be in [0, 1], got {v}"),
                ));
            }
        }
        let lo = 2.0 * self.lattice_constant.get() / 3f64.sqrt();
        let r = self.scatter_range.get();
        if !(r >= lo && r <= 1e-6) {
            return Err(PhysicsError::param(
                format!("{prefix}scatter_range"),
                format!("must be in [2a/√3 = {lo:e}, 1e-6] m, got {r}"),
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
    /// The adatom ended on a site under the tip's control (position in m).
    Moved([f64; 2]),
    /// The tip picked the adatom up: it is gone from the surface and sits on the tip.
    PickedUp,
    /// The adatom was lost to a random site (position in m).
    Scattered([f64; 2]),
}

/// A change of the adatom during a drag.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DragEvent {
    /// Where along the tip path it happens: the fraction of the path travelled, in `(0, 1]`.
    pub at: f64,
    /// Where the adatom is from then on, m; `None` once the tip has picked it up.
    pub to: Option<[f64; 2]>,
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
/// (m) at bias `bias` (V, |bias| ≤ 15 mV) and conductance `conductance` (nA/mV, ≤ 6), in tip
/// steps of `tip_step` (the module docs). `events` is cleared, then receives every change of
/// the adatom in path order: each hop (at the fraction of the path where the tip was), and the
/// loss if there is one (the last event).
#[allow(clippy::too_many_arguments)]
pub fn drag(
    cfg: &ManipulationConfig,
    atom: [f64; 2],
    start: [f64; 2],
    end: [f64; 2],
    bias: f64,
    conductance: f64,
    rng: &mut SimRng,
    events: &mut Vec<DragEvent>,
) -> Result<Outcome> {
    events.clear();
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
    let len = (end[0] - start[0]).hypot(end[1] - start[1]);
    let steps = (len / cfg.tip_step.get()).ceil().max(1.0) as usize;
    // The loss, if any, and the tip step where it happens.
    let lost_at = (rng.random::<f64>()
        < cfg.pickup_max.get() * (conductance / MAX_CONDUCTANCE) * (bias.abs() / MAX_BIAS))
        .then(|| rng.random_range(1..=steps));
    let p = cfg.hop_probability(bias, conductance);
    let range = cfg.interaction_range.get();
    let mut pos = nearest_hollow(atom, a);
    for k in 1..=steps {
        let t = k as f64 / steps as f64;
        if lost_at == Some(k) {
            if rng.random::<f64>() < cfg.pickup_share.get() {
                events.push(DragEvent { at: t, to: None });
                return Ok(Outcome::PickedUp);
            }
            // Uniform over the annulus 2a/√3 ≤ r ≤ scatter_range, then the nearest hollow
            // (at least a/√3 from `pos`, so a different site).
            let (r0, r1) = (2.0 * nn, cfg.scatter_range.get());
            let r = (r0 * r0 + rng.random::<f64>() * (r1 * r1 - r0 * r0)).sqrt();
            let phi = std::f64::consts::TAU * rng.random::<f64>();
            let site = nearest_hollow([pos[0] + r * phi.cos(), pos[1] + r * phi.sin()], a);
            events.push(DragEvent {
                at: t,
                to: Some(site),
            });
            return Ok(Outcome::Scattered(site));
        }
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
            events.push(DragEvent {
                at: t,
                to: Some(pos),
            });
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
                match drag(&cfg, atom, atom, goal, bias, g, &mut rng, &mut Vec::new()).unwrap() {
                    Outcome::Moved(p) => {
                        (p[0] - goal[0]).hypot(p[1] - goal[1]) <= AG111_A / 3f64.sqrt() + 1e-15
                    }
                    Outcome::PickedUp | Outcome::Scattered(_) => false,
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
        // Bias over 15 mV, conductance over 6 nA/mV, a NaN end.
        for (end, bias, g) in [
            ([1e-9, 0.0], 20e-3, 1.0),
            ([1e-9, 0.0], 5e-3, 7.0),
            ([f64::NAN, 0.0], 5e-3, 1.0),
        ] {
            assert!(drag(&cfg, z, z, end, bias, g, &mut rng, &mut Vec::new()).is_err());
        }
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

    /// DESIGN.md §5: a lost adatom is picked up (share `pickup_share`) or scattered to a
    /// different hollow site within `scatter_range`; the events chain hop by hop (each hop to a
    /// neighbouring site, at increasing fractions of the path) and end where the outcome says.
    #[test]
    fn drags_record_hops_and_losses_split_between_tip_and_sites() {
        let cfg = ManipulationConfig {
            pickup_max: Param::fixed(1.0),
            pickup_share: Param::fixed(0.3),
            ..Default::default()
        };
        let nn = AG111_A / 3f64.sqrt();
        let atom = nearest_hollow([0.0, 0.0], AG111_A);
        let mut rng = seeded(4);
        let mut events = Vec::new();
        let (mut picked, mut scattered, mut hops) = (0usize, 0usize, 0usize);
        let n = 2000;
        for _ in 0..n {
            // 15 mV, 6 nA/mV: q = pickup_max = 1, every drag loses the atom somewhere on the way.
            let out = drag(
                &cfg,
                atom,
                atom,
                [1.5e-9, 0.0],
                0.015,
                6.0,
                &mut rng,
                &mut events,
            )
            .unwrap();
            let mut pos = atom;
            let mut last_at = 0.0;
            for (k, e) in events.iter().enumerate() {
                assert!(e.at > last_at && e.at <= 1.0);
                last_at = e.at;
                if k + 1 < events.len() {
                    let q = e.to.unwrap();
                    assert!(((q[0] - pos[0]).hypot(q[1] - pos[1]) - nn).abs() < 1e-15);
                    pos = q;
                    hops += 1;
                }
            }
            match (out, events.last()) {
                (Outcome::PickedUp, Some(e)) => {
                    assert_eq!(e.to, None);
                    picked += 1;
                }
                (Outcome::Scattered(p), Some(e)) => {
                    assert_eq!(e.to, Some(p));
                    let d = (p[0] - pos[0]).hypot(p[1] - pos[1]);
                    assert!(d >= nn - 1e-15 && d <= 2e-9 + nn, "{d:e}");
                    scattered += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        let share = picked as f64 / n as f64;
        println!("{picked} picked up, {scattered} scattered, {hops} hops before the loss");
        // Binomial(2000, 0.3): standard deviation 0.010.
        assert!((share - 0.3).abs() < 0.04, "{share}");
        assert!(hops > 0);
        assert!(
            ManipulationConfig {
                scatter_range: Param::fixed(0.1e-9),
                ..Default::default()
            }
            .validate("m.")
            .unwrap_err()
            .to_string()
            .contains("m.scatter_range")
        );
    }
}
