//! Criterion benchmark: environment steps per second (DESIGN.md §11, issue Step 3).
//!
//! - `env_steps/<Task>/vector16_1thread`: a vector env of 16 envs stepped with seeded random
//!   actions (sampled inside the timed loop, as an agent would hand them over), NEXT_STEP
//!   autoreset included, on one thread. Criterion's throughput is in env steps.
//! - `env_steps/<Task>/vector16_2threads`: the same on two threads (the 2-thread scaling).
//!
//! StemDopantSteer runs in every mode; the image tasks (each step scans or simulates a 64² frame)
//! run too, with fewer samples. `scopegym bench <id>` prints the same figure from the CLI.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use scopegym_envs::registry::{TASKS, make};
use scopegym_envs::rng::seeded;
use scopegym_envs::vector::{AutoReset, VectorEnv};
use std::time::Duration;

const NUM_ENVS: usize = 16;

fn vector(id: &str, threads: usize) -> VectorEnv {
    let envs = (0..NUM_ENVS)
        .map(|_| make(id, None).expect("registered"))
        .collect();
    let mut v = VectorEnv::new(envs, AutoReset::NextStep, threads).expect("vector env");
    v.reset(Some(0)).expect("reset");
    v
}

fn steps(c: &mut Criterion) {
    let mut g = c.benchmark_group("env_steps");
    g.throughput(Throughput::Elements(NUM_ENVS as u64));
    for spec in TASKS {
        let name = spec
            .id
            .trim_start_matches("scopegym/")
            .trim_end_matches("-v1");
        let light = name == "StemDopantSteer";
        g.sample_size(if light { 50 } else { 10 });
        g.measurement_time(Duration::from_secs(if light { 3 } else { 2 }));
        g.warm_up_time(Duration::from_millis(if light { 500 } else { 200 }));
        for threads in [1, 2] {
            let mut v = vector(spec.id, threads);
            let space = v.env(0).action_space().clone();
            let mut rngs: Vec<_> = (0..NUM_ENVS).map(|i| seeded(1_000 + i as u64)).collect();
            let mut actions: Vec<_> = rngs.iter_mut().map(|r| space.sample(r)).collect();
            let label = format!(
                "vector16_{threads}thread{}",
                if threads > 1 { "s" } else { "" }
            );
            g.bench_function(BenchmarkId::new(name, label), |b| {
                b.iter(|| {
                    for (a, r) in actions.iter_mut().zip(&mut rngs) {
                        *a = space.sample(r);
                    }
                    v.step(&actions).expect("step");
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, steps);
criterion_main!(benches);
