//! PPO training speed on StemDopantSteer-v1: env steps per second including learning (CleanRL
//! defaults: 8 envs × 128 steps, 4 epochs × 4 minibatches; libtorch on one thread).
//!
//! ```text
//! source scripts/env.sh
//! cargo run --release -p scopegym-agents --features torch --example ppo_speed -- 200000
//! ```
//!
//! Prints one line: `rust_ppo_steps_per_s <value>`.

use scopegym_agents::rl::{NetSpec, PpoAgent, PpoConfig};
use scopegym_agents::{Agent, TrainSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200_000);
    let id = "scopegym/StemDopantSteer-v1";
    let env = scopegym_envs::registry::make(id, None)?;
    let mut agent = PpoAgent::new(NetSpec::for_env(env.as_ref())?, PpoConfig::default(), 0)?;
    let spec = TrainSpec {
        env_id: id,
        env_config: None,
        steps,
        seed: 0,
    };
    let t0 = std::time::Instant::now();
    let mut done = 0;
    agent.train(&spec, &mut |s| done = s)?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "rust_ppo_steps_per_s {:.0} ({done} steps in {secs:.2} s)",
        done as f64 / secs
    );
    Ok(())
}
