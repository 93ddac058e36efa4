//! `scopegym/StemDopantSteer-v1`: move a Si dopant in graphene to a goal lattice site by parking
//! the electron beam beside it (anchor: putting-dune).
//!
//! Each step moves the parked probe to the chosen offset from the dopant and dwells there
//! (`move_probe` + `acquire_point`); no frame is scanned. While the beam dwells the dopant may
//! hop to a neighbouring carbon site (the continuous-time Markov chain of DESIGN.md §4: the rate
//! toward neighbour j peaks when the beam sits 0.85 Å from the Si toward j).
//!
//! The registered task runs on [`DopantSimulator`], the light dopant-lattice model (the same
//! hop chain and knock-on cross-section on an unbounded graphene sheet, a fraction of a
//! microsecond per step); the task is generic over the instrument, and runs unchanged on the
//! full [`StemSimulator`] ([`StemDopantSteer::new`]) or a real driver that can locate the
//! dopant ([`DopantFinder`]).
//!
//! - **Observation** (Box, 10, nm): `[Si − goal (2), n₁ − Si, n₂ − Si, n₃ − Si (6), goal (2)]`:
//!   the dopant relative to the goal site, its (up to) three host neighbours relative to it
//!   (sorted by angle; a missing neighbour reads 0), and the goal in lab coordinates. These are
//!   *detected* positions: a real instrument gets them from a quick scan around the dopant and
//!   atom finding ([`DopantFinder`]); the simulator implements the finder by reading its
//!   specimen, which gives the same numbers a perfect detector would.
//! - **Action** (Box, 3): `[beam offset x, beam offset y (nm, relative to the dopant, each in
//!   ±max_offset), dwell time (s, in dwell_range)]`.
//! - **Reward**: `−step_cost` every step, plus `gamma^elapsed` when the dopant reaches the goal
//!   (elapsed = instrument time since reset, s, so slow steering earns less), minus
//!   `lost_penalty` if the dopant is gone (sputtered), plus the potential-based shaping term
//!   `shaping · (d_before − d_after) / 1.42 Å` (d = dopant–goal distance: `shaping` per C-C
//!   bond of progress; a potential difference, so it leaves the optimal policies unchanged,
//!   Ng et al. 1999, and telescopes to `shaping · d₀ / 1.42 Å` over a successful episode).
//!   `shaping = 0` gives the sparse reward of putting-dune.
//! - **Success** (terminates): the dopant within `success_radius` of the goal site. Losing the
//!   dopant also terminates.
//! - **Info** (never in the observation): `dopant_specimen` (true dopant position in specimen
//!   coordinates, m), `hops` (hops in this step), `elapsed` (s), `goal_distance` (m),
//!   `success`, `lost`, and the randomized scenario values (`param.*`).
//! - **Heuristic** (DESIGN.md §9): park the beam 0.85 Å from the Si toward the neighbour that
//!   points most nearly at the goal, dwell `heuristic_dwell` s.

use crate::env::{Info, InfoValue, RgbImage, Task, TaskStep};
use crate::error::{EnvError, Result};
use crate::level::{Difficulty, Split};
use crate::space::{Space, Value};
use crate::tasks::{NewEpisode, TaskConfig, check_nonnegative, config_from_toml};
use rand::Rng;
use scopegym_physics::instrument::StemInstrument;
use scopegym_physics::rng::{derive_seed, seeded};
use scopegym_physics::stem::StemSimulator;
use scopegym_physics::stem::dopant::{DopantSimConfig, DopantSimulator};
use serde::{Deserialize, Serialize};

/// The graphene C-C bond, m: the unit of the shaping reward.
const BOND_LENGTH: f64 = 1.42e-10;

/// Bond length used to find a dopant's host neighbours, m (graphene C-C 1.42 Å plus tolerance).
const BOND: f64 = 1.7e-10;

/// Locating the dopant. On a real instrument: a quick small scan around the last known position
/// and atom detection; in the simulator: reading the specimen (a perfect detector).
pub trait DopantFinder {
    /// Lab position (m) of the dopant nearest `near` (lab, m), with the lab positions of its
    /// bonded host neighbours written to `neighbours`; `None` when no dopant is left.
    fn find_dopant(&self, near: [f64; 2], neighbours: &mut Vec<[f64; 2]>) -> Option<[f64; 2]>;
    /// Lab positions (m) of the host lattice sites within `radius` (m) of `center` (lab, m),
    /// written to `out` (for choosing a goal site).
    fn host_sites(&self, center: [f64; 2], radius: f64, out: &mut Vec<[f64; 2]>);
}

impl DopantFinder for DopantSimulator {
    fn find_dopant(&self, _near: [f64; 2], neighbours: &mut Vec<[f64; 2]>) -> Option<[f64; 2]> {
        neighbours.clear();
        let d = self.dopant()?;
        neighbours.extend_from_slice(&self.dopant_neighbours());
        Some(d)
    }

    fn host_sites(&self, center: [f64; 2], radius: f64, out: &mut Vec<[f64; 2]>) {
        DopantSimulator::host_sites(self, center, radius, out);
    }
}

impl DopantFinder for StemSimulator {
    fn find_dopant(&self, near: [f64; 2], neighbours: &mut Vec<[f64; 2]>) -> Option<[f64; 2]> {
        neighbours.clear();
        let (dz, hz) = (
            self.config().damage.hop_dopant_z,
            self.config().damage.hop_host_z,
        );
        let d = self.drift_offset();
        let atoms = &self.specimen().atoms;
        let best = atoms
            .iter()
            .filter(|a| a.z == dz)
            .map(|a| (a, (a.x + d[0] - near[0]).hypot(a.y + d[1] - near[1])))
            .min_by(|a, b| a.1.total_cmp(&b.1))?
            .0;
        for a in atoms {
            let r = (a.x - best.x).hypot(a.y - best.y);
            if a.z == hz && r > 0.0 && r <= BOND && (a.height - best.height).abs() < 1e-10 {
                neighbours.push([a.x + d[0], a.y + d[1]]);
            }
        }
        Some([best.x + d[0], best.y + d[1]])
    }

    fn host_sites(&self, center: [f64; 2], radius: f64, out: &mut Vec<[f64; 2]>) {
        out.clear();
        let hz = self.config().damage.hop_host_z;
        let d = self.drift_offset();
        for a in &self.specimen().atoms {
            let p = [a.x + d[0], a.y + d[1]];
            if a.z == hz && (p[0] - center[0]).hypot(p[1] - center[1]) <= radius {
                out.push(p);
            }
        }
    }
}

/// Task settings (`config = {...}` or a scenario's `[task]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Difficulty level (`"easy"`, `"medium"`, `"hard"`): picks the defaults of the
    /// domain-randomization ranges (module docs). Default `"medium"`.
    pub difficulty: Difficulty,
    /// Parameter split (`"train"`, or the held-out `"test"`): which bands of every randomized
    /// range episodes draw from ([`crate::level`]). Default `"train"`.
    pub split: Split,
    /// The simulated instrument ([`DopantSimConfig`]). Default: 60 kV, 100 pA, graphene at a
    /// random rotation with one Si at the origin, no drift, 64² scan of 0.2 Å pixels (the probe
    /// is kept within ± the field of view, 1.28 nm, of the scan centre).
    pub instrument: DopantSimConfig,
    /// Steps per episode. Default 100.
    pub max_steps: usize,
    /// Largest beam offset from the dopant along each axis, m. Default 1.2 Å: the hop rate
    /// peaks 0.85 Å from the dopant and has fallen to half 0.35 Å beyond, so farther offsets
    /// only waste dose.
    pub max_offset: f64,
    /// Shortest and longest dwell per step, s. Default 0.1 and 5.
    pub dwell_range: [f64; 2],
    /// Distance range of the goal site from the dopant at reset, m. Default 2.5 to 5 Å.
    pub goal_distance: [f64; 2],
    /// Discount per second of instrument time of the success reward. Default 0.99.
    pub gamma: f64,
    /// Cost per step. Default 0.01.
    pub step_cost: f64,
    /// Success: the dopant within this distance of the goal site, m. Default 0.5 Å.
    pub success_radius: f64,
    /// Penalty when the dopant is lost (sputtered). Default 1.
    pub lost_penalty: f64,
    /// Potential-based shaping: reward per C-C bond length (1.42 Å) the dopant moved toward
    /// the goal. Default 0.1 (0: the sparse reward).
    pub shaping: f64,
    /// The heuristic's dwell per step, s. Default 2.
    pub heuristic_dwell: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            difficulty: Difficulty::Medium,
            split: Split::Train,
            instrument: DopantSimConfig::default(),
            max_steps: 100,
            max_offset: 1.2e-10,
            dwell_range: [0.1, 5.0],
            goal_distance: [2.5e-10, 5e-10],
            gamma: 0.99,
            step_cost: 0.01,
            success_radius: 0.5e-10,
            lost_penalty: 1.0,
            shaping: 0.1,
            heuristic_dwell: 2.0,
        }
    }
}

impl TaskConfig for Config {
    fn at_level(difficulty: Difficulty) -> Self {
        Self {
            difficulty,
            ..Self::default()
        }
    }
}

impl Config {
    /// Checks ranges, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.instrument
            .validate()
            .map_err(|e| EnvError::config("instrument", e.to_string()))?;
        let bad = |f: &str, r: String| Err(EnvError::config(f, r));
        if self.max_steps == 0 {
            return bad("max_steps", "must be at least 1".into());
        }
        if !(self.max_offset > 0.0 && self.max_offset <= 2e-9) {
            return bad(
                "max_offset",
                format!("must be in (0, 2 nm], got {} m", self.max_offset),
            );
        }
        let [a, b] = self.dwell_range;
        if !(a > 0.0 && a < b && b <= 1000.0) {
            return bad(
                "dwell_range",
                format!("must be increasing within (0, 1000] s, got {:?}", [a, b]),
            );
        }
        let [a, b] = self.goal_distance;
        if !(a >= 0.0 && a < b && b <= 5e-9) {
            return bad(
                "goal_distance",
                format!("must be increasing within [0, 5 nm], got {:?} m", [a, b]),
            );
        }
        if !(self.gamma > 0.0 && self.gamma <= 1.0) {
            return bad("gamma", format!("must be in (0, 1], got {}", self.gamma));
        }
        if !(self.success_radius > 0.0 && self.success_radius < 1.42e-10) {
            return bad(
                "success_radius",
                format!(
                    "must be in (0, 1.42 Å) (below a bond), got {} m",
                    self.success_radius
                ),
            );
        }
        if !(self.heuristic_dwell >= self.dwell_range[0]
            && self.heuristic_dwell <= self.dwell_range[1])
        {
            return bad(
                "heuristic_dwell",
                format!("must lie in dwell_range, got {} s", self.heuristic_dwell),
            );
        }
        check_nonnegative(&[
            ("step_cost", self.step_cost),
            ("lost_penalty", self.lost_penalty),
            ("shaping", self.shaping),
        ])?;
        Ok(())
    }
}

/// The task over any STEM instrument `I` that can locate the dopant.
#[derive(Debug)]
pub struct StemDopantSteer<I> {
    cfg: Config,
    inst: I,
    goal: [f64; 2],
    dopant: Option<[f64; 2]>,
    neighbours: Vec<[f64; 2]>,
    sites: Vec<[f64; 2]>,
    beam: [f64; 2],
    t0: f64,
}

impl StemDopantSteer<DopantSimulator> {
    /// The task on the dopant-lattice model, from an optional TOML config.
    pub fn from_config(config: Option<&toml::Value>) -> Result<Self> {
        let cfg: Config = config_from_toml(config)?;
        cfg.validate()?;
        let inst = DopantSimulator::new(cfg.instrument.clone(), 0)?;
        Ok(Self::new(cfg, inst))
    }
}

/// Observation length.
const OBS: usize = 10;
/// Bound of every observation element, nm.
const OBS_BOUND: f32 = 100.0;

impl<I: StemInstrument + DopantFinder + NewEpisode + Send> StemDopantSteer<I> {
    /// The task on `inst` with `cfg` (`cfg.instrument` configures only [`DopantSimulator`];
    /// another instrument comes configured).
    pub fn new(cfg: Config, mut inst: I) -> Self {
        inst.set_region(cfg.split.region());
        Self {
            cfg,
            inst,
            goal: [0.0; 2],
            dopant: None,
            neighbours: Vec::with_capacity(4),
            sites: Vec::new(),
            beam: [0.0; 2],
            t0: 0.0,
        }
    }

    /// Re-detects the dopant near its last known position.
    fn locate(&mut self) {
        let near = self.dopant.unwrap_or(self.goal);
        self.dopant = self.inst.find_dopant(near, &mut self.neighbours);
        if let Some(d) = self.dopant {
            // By angle, counter-clockwise from -x (a pseudo-angle: monotone in atan2).
            let key = |p: &[f64; 2]| {
                let (x, y) = (p[0] - d[0], p[1] - d[1]);
                let t = 1.0 - x / (x.abs() + y.abs()).max(f64::MIN_POSITIVE);
                if y < 0.0 { -t } else { t }
            };
            self.neighbours.sort_by(|a, b| key(a).total_cmp(&key(b)));
        }
    }

    fn observe(&self) -> Value {
        let nm = |v: f64| ((v * 1e9) as f32).clamp(-OBS_BOUND, OBS_BOUND);
        let mut o = vec![0.0f32; OBS];
        let d = self.dopant.unwrap_or(self.goal);
        o[0] = nm(d[0] - self.goal[0]);
        o[1] = nm(d[1] - self.goal[1]);
        for (k, n) in self.neighbours.iter().take(3).enumerate() {
            o[2 + 2 * k] = nm(n[0] - d[0]);
            o[3 + 2 * k] = nm(n[1] - d[1]);
        }
        o[8] = nm(self.goal[0]);
        o[9] = nm(self.goal[1]);
        Value::Box(o)
    }

    fn goal_distance(&self) -> f64 {
        self.dopant.map_or(f64::INFINITY, |d| {
            (d[0] - self.goal[0]).hypot(d[1] - self.goal[1])
        })
    }
}

impl<I: StemInstrument + DopantFinder + NewEpisode + Send> Task for StemDopantSteer<I> {
    fn observation_space(&self) -> Space {
        Space::uniform_box(&[OBS], -OBS_BOUND, OBS_BOUND)
    }

    fn action_space(&self) -> Space {
        let c = &self.cfg;
        let m = (c.max_offset * 1e9) as f32;
        Space::bounded_box(
            vec![-m, -m, c.dwell_range[0] as f32],
            vec![m, m, c.dwell_range[1] as f32],
        )
    }

    fn max_episode_steps(&self) -> usize {
        self.cfg.max_steps
    }

    fn reset(&mut self, seed: u64, info: &mut Info) -> Result<Value> {
        self.inst.new_episode(seed, info)?;
        self.inst.set_blanked(false)?;
        self.t0 = self.inst.clock();
        self.dopant = None;
        self.goal = self.inst.scan_settings().center;
        self.locate();
        let d = self.dopant.ok_or_else(|| {
            EnvError::config("instrument.specimen.dopants", "the specimen has no dopant")
        })?;
        // Goal: a host site at a distance within `goal_distance`, drawn from the seed.
        let [lo, hi] = self.cfg.goal_distance;
        self.inst.host_sites(d, hi, &mut self.sites);
        self.sites
            .retain(|p| (p[0] - d[0]).hypot(p[1] - d[1]) >= lo);
        if self.sites.is_empty() {
            return Err(EnvError::config(
                "goal_distance",
                "no host site at this distance from the dopant",
            ));
        }
        let k = seeded(derive_seed(seed, "goal")).random_range(0..self.sites.len());
        self.goal = self.sites[k];
        self.beam = d;
        info.insert("goal_distance".into(), InfoValue::F64(self.goal_distance()));
        Ok(self.observe())
    }

    fn step(&mut self, action: &Value, info: &mut Info) -> Result<TaskStep> {
        let a = action
            .as_box()
            .ok_or_else(|| EnvError::action("action", "expected a Box value"))?;
        let c = &self.cfg;
        let d = self.dopant.unwrap_or(self.goal);
        let s = self.inst.scan_settings();
        let [w, h] = s.field_of_view();
        // Keep the probe inside the deflection range (± field of view around the centre).
        let beam = [
            (d[0] + f64::from(a[0]) * 1e-9).clamp(s.center[0] - 0.999 * w, s.center[0] + 0.999 * w),
            (d[1] + f64::from(a[1]) * 1e-9).clamp(s.center[1] - 0.999 * h, s.center[1] + 0.999 * h),
        ];
        let dwell = f64::from(a[2]).clamp(c.dwell_range[0], c.dwell_range[1]);
        self.inst.move_probe(beam)?;
        self.inst.acquire_point(dwell)?;
        self.beam = beam;
        let before = self.dopant;
        self.locate();
        let c = &self.cfg;
        let elapsed = self.inst.clock() - self.t0;
        let lost = self.dopant.is_none();
        let dist = self.goal_distance();
        let success = !lost && dist < c.success_radius;
        let mut reward = -c.step_cost;
        if success {
            reward += c.gamma.powf(elapsed);
        }
        if lost {
            reward -= c.lost_penalty;
        }
        if let (Some(p), false) = (before, lost) {
            let d_before = (p[0] - self.goal[0]).hypot(p[1] - self.goal[1]);
            reward += c.shaping * (d_before - dist) / BOND_LENGTH;
        }
        let moved = match (before, self.dopant) {
            (Some(p), Some(q)) => (p[0] - q[0]).hypot(p[1] - q[1]) > 0.5e-10,
            _ => false,
        };
        info.insert("moved".into(), InfoValue::Bool(moved));
        info.insert("elapsed".into(), InfoValue::F64(elapsed));
        info.insert(
            "goal_distance".into(),
            InfoValue::F64(if lost { -1.0 } else { dist }),
        );
        info.insert("success".into(), InfoValue::Bool(success));
        info.insert("lost".into(), InfoValue::Bool(lost));
        Ok(TaskStep {
            obs: self.observe(),
            reward,
            terminated: success || lost,
            success,
        })
    }

    fn render(&self) -> RgbImage {
        // A map of the detected sites around the goal: host sites grey, dopant red, goal green,
        // beam blue; 0.25 Å per pixel over ±1.2 nm.
        const N: usize = 96;
        const PX: f64 = 0.25e-10;
        let mut data = vec![0u8; N * N * 3];
        let c = self.dopant.unwrap_or(self.goal);
        let mut dot = |p: [f64; 2], rgb: [u8; 3], r: i64| {
            let u = ((p[0] - c[0]) / PX + N as f64 / 2.0).round() as i64;
            let v = ((p[1] - c[1]) / PX + N as f64 / 2.0).round() as i64;
            for y in v - r..=v + r {
                for x in u - r..=u + r {
                    if (0..N as i64).contains(&x) && (0..N as i64).contains(&y) {
                        let i = (y as usize * N + x as usize) * 3;
                        data[i..i + 3].copy_from_slice(&rgb);
                    }
                }
            }
        };
        for &p in &self.sites {
            dot(p, [110, 110, 110], 1);
        }
        for &p in &self.neighbours {
            dot(p, [200, 200, 200], 1);
        }
        dot(self.goal, [0, 200, 0], 2);
        if let Some(d) = self.dopant {
            dot(d, [230, 30, 30], 2);
        }
        dot(self.beam, [60, 120, 255], 0);
        RgbImage {
            width: N,
            height: N,
            data,
        }
    }

    fn heuristic_action(&mut self, obs: &Value) -> Value {
        let o = obs.as_box().unwrap_or(&[0.0; OBS]);
        let o = |k: usize| f64::from(o.get(k).copied().unwrap_or(0.0));
        let to_goal = [-o(0), -o(1)];
        let mut best = None;
        for k in 0..3 {
            let n = [o(2 + 2 * k), o(3 + 2 * k)];
            let len = n[0].hypot(n[1]);
            if len <= 0.0 {
                continue;
            }
            let score = (n[0] * to_goal[0] + n[1] * to_goal[1]) / len;
            if best.is_none_or(|(s, _): (f64, [f64; 2])| score > s) {
                best = Some((score, [n[0] / len, n[1] / len]));
            }
        }
        let u = best.map_or([0.0, 0.0], |b| b.1);
        let off = 0.085; // nm: the hop-rate maximum, 0.85 Å toward the neighbour
        Value::Box(vec![
            (u[0] * off) as f32,
            (u[1] * off) as f32,
            self.cfg.heuristic_dwell as f32,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{Env, TaskEnv};

    #[test]
    fn heuristic_moves_the_dopant_to_the_goal_and_steps_are_fast() {
        let mut env = TaskEnv::new("t", StemDopantSteer::from_config(None).unwrap());
        let mut successes = 0;
        let mut steps = 0usize;
        let t = std::time::Instant::now();
        for seed in 0..10 {
            let (mut obs, info) = env.reset(Some(seed)).unwrap();
            assert!(matches!(info.get("goal_distance"), Some(InfoValue::F64(d)) if *d >= 2.4e-10));
            loop {
                let a = env.heuristic_action(&obs);
                let s = env.step(&a).unwrap();
                steps += 1;
                obs = s.obs;
                if s.terminated || s.truncated {
                    if s.info.get("success") == Some(&InfoValue::Bool(true)) {
                        successes += 1;
                        assert!(s.reward > 0.0);
                    }
                    break;
                }
            }
        }
        let rate = steps as f64 / t.elapsed().as_secs_f64();
        println!("heuristic: {successes}/10 successes, {steps} steps, {rate:.0} steps/s");
        assert!(successes >= 7, "{successes}");
        assert!(rate > 200.0, "{rate} steps/s");
    }

    #[test]
    fn the_same_task_runs_on_the_full_stem_simulator() {
        // The previous default: a 2.4 nm graphene square with one Si at the centre, no scan
        // distortions, 64² scan of 0.2 Å pixels. Same hop chain, so the heuristic succeeds too.
        use scopegym_physics::param::Param;
        use scopegym_physics::stem::StemConfig;
        use scopegym_physics::stem::specimen::DopantConfig;
        let mut sc = StemConfig::default().without_scan_distortions();
        sc.specimen.rotation = Param::uniform(0.0, std::f64::consts::FRAC_PI_3);
        sc.specimen.size = [Param::fixed(2.4e-9), Param::fixed(2.4e-9)];
        sc.specimen.dopants = vec![DopantConfig::default()];
        sc.scan.pixels = [64, 64];
        sc.scan.pixel_size = Param::fixed(0.2e-10);
        let task = StemDopantSteer::new(Config::default(), StemSimulator::new(sc, 0).unwrap());
        let mut env = TaskEnv::new("t", task);
        let successes = crate::tasks::testing::heuristic_successes(&mut env, 0..6);
        assert!(successes >= 4, "{successes}/6");
    }

    #[test]
    fn bad_config_names_the_field() {
        let c: toml::Value = toml::from_str("dwell_range = [2.0, 1.0]").unwrap();
        let e = StemDopantSteer::from_config(Some(&c))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dwell_range"), "{e}");
        let c: toml::Value = toml::from_str("goal_distance = [40e-9, 41e-9]").unwrap();
        let e = StemDopantSteer::from_config(Some(&c))
            .unwrap_err()
            .to_string();
        assert!(e.contains("goal_distance"), "{e}");
    }
}
