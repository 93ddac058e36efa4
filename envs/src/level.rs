//! Difficulty levels and held-out splits: the two options every task takes, so a benchmark can
//! report scores per level and measure generalization to parameters never seen in training
//! (Procgen's train/test practice, with disjoint parameter ranges instead of level seeds).
//!
//! - `difficulty` (`"easy" | "medium" | "hard"`, default `"medium"`) picks the task's defaults:
//!   the ranges its domain randomization draws from (drift, noise, tip shape, specimen
//!   rotation and defects, ...), written in each task's docs. Values the user sets explicitly
//!   win over the level's defaults.
//! - `split` (`"train" | "test"`, default `"train"`) restricts every randomized parameter to one
//!   of two complementary sets of quantile bands of its distribution
//!   ([`scopegym_physics::param::Region`]): `train` draws from 80 % of each range, `test` from
//!   the other 20 %, interleaved across the whole span, so the two splits never share a
//!   parameter value yet cover the same conditions. Task-level draws (initial aberrations,
//!   goals, samples) use the same bands ([`Split::uniform`]).
//!
//! Both are config keys (`config = { difficulty = "hard", split = "test" }`, a scenario's
//! `[task]` table, `gymnasium.make(id, difficulty=..., split=...)`).
//!
//! ```
//! use scopegym_envs::level::{Difficulty, Split};
//! use scopegym_envs::rng::seeded;
//! let d: Difficulty = serde_json::from_str("\"hard\"").unwrap();
//! assert_eq!(d, Difficulty::Hard);
//! assert_eq!(Difficulty::default(), Difficulty::Medium);
//! let (mut a, mut b) = (seeded(1), seeded(1));
//! let (x, y) = (Split::Train.uniform(&mut a, 0.0, 1.0), Split::Test.uniform(&mut b, 0.0, 1.0));
//! assert!((4.0 * x).fract() < 0.8 && (4.0 * y).fract() >= 0.8);
//! ```

use rand::Rng;
use scopegym_physics::param::Region;
use serde::{Deserialize, Serialize};

/// How hard the episodes are: the widths of the task's domain-randomization ranges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Difficulty {
    /// Narrow ranges near benign conditions.
    Easy,
    /// The ranges of a typical instrument and specimen (the default).
    #[default]
    Medium,
    /// Wide ranges reaching poor conditions (strong drift and noise, blunt or double tips, ...).
    Hard,
}

impl Difficulty {
    /// All levels, easiest first.
    pub const ALL: [Difficulty; 3] = [Difficulty::Easy, Difficulty::Medium, Difficulty::Hard];

    /// The level's name as written in configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Easy => "easy",
            Self::Medium => "medium",
            Self::Hard => "hard",
        }
    }

    /// Picks the value for this level.
    pub fn pick<T>(self, easy: T, medium: T, hard: T) -> T {
        match self {
            Self::Easy => easy,
            Self::Medium => medium,
            Self::Hard => hard,
        }
    }
}

/// Which of two disjoint parameter sets episodes are drawn from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// 80 % of each randomized range (the default).
    #[default]
    Train,
    /// The held-out 20 % of each randomized range.
    Test,
}

impl Split {
    /// The split's name as written in configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Test => "test",
        }
    }

    /// The quantile region of the physics parameters' distributions.
    pub fn region(self) -> Region {
        match self {
            Self::Train => Region::Main,
            Self::Test => Region::HeldOut,
        }
    }

    /// Draws uniformly from `[lo, hi]`, restricted to this split's bands.
    pub fn uniform<R: Rng + ?Sized>(self, rng: &mut R, lo: f64, hi: f64) -> f64 {
        self.region().uniform(rng, lo, hi)
    }
}
