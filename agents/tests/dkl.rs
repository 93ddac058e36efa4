//! The DKL agent on the explore tasks (feature `torch`): the check of issue 13 on the real BEPS
//! data (measurements to the top-1 % loop, DKL against a plain GP on the grid coordinates and
//! random sampling), and a short run on the simulated StemEelsExplore.
//!
//! ```text
//! source scripts/env.sh
//! cargo nextest run -p scopegym-agents --features torch --test dkl --no-capture
//! ```

#[cfg(not(feature = "torch"))]
#[test]
fn without_torch_the_dkl_agent_names_the_feature() {
    let env = scopegym_envs::registry::make("scopegym/PfmSpectroscopyExplore-v1", None).unwrap();
    let Err(e) = scopegym_agents::registry::make("dkl", env.as_ref(), None, 0) else {
        panic!("the dkl agent was built without the torch feature")
    };
    assert!(
        matches!(e, scopegym_agents::AgentError::MissingFeature { .. }),
        "{e}"
    );
}

#[cfg(feature = "torch")]
mod torch {
    use rand::seq::SliceRandom;
    use scopegym_agents::agent::Agent;
    use scopegym_agents::dkl::{DklAgent, DklConfig, Inputs};
    use scopegym_agents::floors::RandomAgent;
    use scopegym_agents::run_episode;
    use scopegym_envs::InfoValue;
    use scopegym_envs::tasks::pfm_spectroscopy_explore::{RecordedLoops, despiked_loop_area};
    use std::path::PathBuf;
    use std::time::Instant;

    fn data_file() -> Option<PathBuf> {
        scopegym_envs::tasks::pfm_spectroscopy_explore::find_shared_data(
            "beps_pto_50x50.h5",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
        )
    }

    fn median(v: &[usize]) -> f64 {
        let mut s = v.to_vec();
        s.sort_unstable();
        let n = s.len();
        if n % 2 == 1 {
            s[n / 2] as f64
        } else {
            0.5 * (s[n / 2 - 1] + s[n / 2]) as f64
        }
    }

    /// Measurements until a top-1 % point is measured (capped at `cap`) for `agent` on `env`,
    /// checking on the way that the task serves the recorded loop of each chosen point.
    fn to_find(
        env: &mut dyn scopegym_envs::Env,
        agent: &mut dyn Agent,
        seed: u64,
        truth: &[f64],
        top: &[bool],
        cap: usize,
    ) -> usize {
        let (mut obs, _) = env.reset(Some(seed)).unwrap();
        agent.begin_episode(env, &obs, seed).unwrap();
        for t in 1..=cap {
            let a = agent.act(env, &obs).unwrap();
            let k = a.as_discrete().unwrap() as usize;
            let s = env.step(&a).unwrap();
            let Some(InfoValue::F64(area)) = s.info.get("area") else {
                panic!("no area in info")
            };
            assert!(
                (area - truth[k]).abs() <= 1e-12 * truth[k].abs().max(1e-12),
                "point {k}: the task served area {area}, the file says {}",
                truth[k]
            );
            if top[k] {
                return t;
            }
            agent.observe(&a, s.reward, &s.obs).unwrap();
            obs = s.obs;
        }
        cap
    }

    /// Issue 13: DKL finds the top-1 % loop of the real BEPS map (PfmSpectroscopyExplore in
    /// real-data mode, the full 50 × 50 grid, 4 × 4-pixel patches of the overview = the
    /// recorded response at the first bias point) in fewer measurements than random sampling,
    /// median over 60 seeds, each capped at 150 measurements, with the agent's defaults (UCB,
    /// β = 4). A plain GP on the grid coordinates (the same agent with `inputs =
    /// "coordinates"`: the MLP replaced by the identity on the two coordinates) runs on the same
    /// seeds and is reported beside it, not asserted against (below).
    ///
    /// "Measurements to find": the number of measurements until a point whose true loop area
    /// (read from the file here, with the task's own `despiked_loop_area` and `R_span`) is
    /// among the 25 largest of the 2500 has been measured. Random sampling is sampling without
    /// replacement: its exact median is the smallest `t` with `P(found by t) ≥ ½`, `P(not found
    /// by t) = C(2475, t) / C(2500, t)`, 69; the test also runs it on the same seeds.
    ///
    /// DKL against the plain GP is not asserted: it does not hold. Over seeds 0..100 (dev
    /// profile, one thread) the medians were DKL 33.5, plain GP 27.5 and random's exact 69. On
    /// the 60 seeds here DKL was sooner than the GP on 23 seeds and later on 28. DKL's
    /// trajectories also depend on the rounding of libtorch's MKL kernels, which differs between
    /// CPUs. With MKL's native, `MKL_CBWR=AVX2` and `MKL_CBWR=COMPATIBLE` code paths, the same
    /// 100 seeds gave DKL medians of 33.5, 32.5 and 37. On the first 20 seeds alone the DKL
    /// median was 19 on two machines and 32.5 on a third, against the GP's 23.5; this is why
    /// an earlier 20-seed version of this test passed on some machines and failed on others.
    /// DKL's margin over random (about 2×) holds on every path measured. About 3 min in the dev
    /// profile on one core.
    #[test]
    fn dkl_finds_the_top_loop_of_real_beps_data_sooner_than_random() {
        let Some(path) = data_file() else { return };
        let t0 = Instant::now();
        let rec = RecordedLoops::open(path.to_str().unwrap()).unwrap();
        let g = rec.shape[0];
        let n = g * g;
        let truth: Vec<f64> = (0..n)
            .map(|k| despiked_loop_area(&rec.bias, rec.loop_at(k % g, k / g), rec.span))
            .collect();
        let n_top = n / 100;
        let mut sorted = truth.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let threshold = sorted[n_top - 1];
        let top: Vec<bool> = truth.iter().map(|&v| v >= threshold).collect();
        assert_eq!(top.iter().filter(|&&t| t).count(), n_top);
        // Exact median of random sampling without replacement.
        let mut p_miss = 1.0;
        let mut random_exact = 0;
        for t in 1..=n {
            p_miss *= (n - n_top - (t - 1)) as f64 / (n - (t - 1)) as f64;
            if p_miss <= 0.5 {
                random_exact = t;
                break;
            }
        }
        let (cap, seeds) = (150usize, 0..60u64);
        let cfg: toml::Value = toml::from_str(&format!(
            "real_data = {:?}\nprior_mean = 0.01\nprior_sd = 0.03\nnoise_sd = 0.005\nbudget = {cap}",
            path.to_str().unwrap()
        ))
        .unwrap();
        let mut env =
            scopegym_envs::registry::make("scopegym/PfmSpectroscopyExplore-v1", Some(&cfg))
                .unwrap();
        let run = |env: &mut dyn scopegym_envs::Env, inputs: Inputs| -> Vec<usize> {
            seeds
                .clone()
                .map(|seed| {
                    let cfg = DklConfig {
                        inputs,
                        ..DklConfig::default()
                    };
                    let mut agent = DklAgent::new(cfg, 0).unwrap();
                    to_find(env, &mut agent, seed, &truth, &top, cap)
                })
                .collect()
        };
        let dkl = run(env.as_mut(), Inputs::Patches);
        let t_dkl = t0.elapsed().as_secs_f64();
        let gp = run(env.as_mut(), Inputs::Coordinates);
        let random: Vec<usize> = seeds
            .clone()
            .map(|seed| {
                let mut order: Vec<usize> = (0..n).collect();
                order.shuffle(&mut scopegym_envs::rng::seeded(seed));
                order.iter().position(|&k| top[k]).unwrap().min(cap - 1) + 1
            })
            .collect();
        let (m_dkl, m_gp, m_rand) = (median(&dkl), median(&gp), median(&random));
        println!("real BEPS 50×50, top 1 % = {n_top} points (area ≥ {threshold:.4}), cap {cap}");
        println!("DKL (patches):        {dkl:?} median {m_dkl}");
        println!("plain GP (coords):    {gp:?} median {m_gp}");
        println!("random (no repeats):  {random:?} median {m_rand}; exact median {random_exact}");
        println!(
            "time: DKL {t_dkl:.1} s, total {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        let dkl_sooner = dkl.iter().zip(&gp).filter(|(d, g)| d < g).count();
        let gp_sooner = dkl.iter().zip(&gp).filter(|(d, g)| g < d).count();
        println!("DKL sooner than the plain GP on {dkl_sooner} seeds, later on {gp_sooner}");
        assert!(m_dkl < m_rand, "DKL median {m_dkl} vs random {m_rand}");
        assert!(
            m_dkl < random_exact as f64,
            "DKL median {m_dkl} vs random's exact median {random_exact}"
        );
    }

    /// The DKL agent on the simulated StemEelsExplore (medium, test split, the default budget
    /// of 100 spectra): final regret over 6 seeds, reported beside random probing's. Asserted:
    /// the agent runs the episodes and reports finite regrets; not that it beats random, which
    /// six seeds cannot show with margin. Measured with the default UCB: mean 0.19 against
    /// random's 0.30; with LogEI 0.40 against 0.29 over 8 seeds (with one to three Si cells
    /// among 1024 the first random spectra rarely hit one, and a greedy acquisition has no large
    /// value to learn from). About 25 s.
    #[test]
    fn dkl_runs_on_stem_eels_explore() {
        let t0 = Instant::now();
        let cfg: toml::Value = toml::from_str("split = \"test\"\nbudget = 100").unwrap();
        let mut env =
            scopegym_envs::registry::make("scopegym/StemEelsExplore-v2", Some(&cfg)).unwrap();
        let (mut r_dkl, mut r_rand) = (Vec::new(), Vec::new());
        for seed in 0..6u64 {
            let mut agent = scopegym_agents::registry::make("dkl", env.as_ref(), None, 0).unwrap();
            let rec = run_episode(env.as_mut(), agent.as_mut(), seed).unwrap();
            r_dkl.push(*rec.regret.last().unwrap());
            let rec = run_episode(env.as_mut(), &mut RandomAgent::default(), seed).unwrap();
            r_rand.push(*rec.regret.last().unwrap());
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        println!(
            "StemEelsExplore-v2 final regret: DKL {r_dkl:.3?} mean {:.3}; random {r_rand:.3?} mean {:.3}; {:.1} s",
            mean(&r_dkl),
            mean(&r_rand),
            t0.elapsed().as_secs_f64()
        );
        assert_eq!(r_dkl.len(), 6);
        assert!(
            r_dkl.iter().all(|r| r.is_finite() && *r >= 0.0),
            "{r_dkl:?}"
        );
    }
}
