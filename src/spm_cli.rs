//! `scopegym simulate` and `scopegym perf` for SPM scenarios (AFM, STM, PFM).

use super::{attrs, median, progress, provenance};
use ndarray::{Array2, Array3, Axis};
use scopegym::error::CliError;
use scopegym::output::{AttrValue, Data, Dataset, montage_u8, write_hdf5, write_png};
use scopegym::scenario::{Scenario, physics_to_scenario};
use scopegym_physics::instrument::{PointSpectroscopy, SpmInstrument, SpmMode};
use scopegym_physics::spm::ferro::{loop_coercive, triangle_waveform};
use scopegym_physics::spm::sim::{SpmConfig, SpmSimulator};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn spm_sim(sc: &Scenario, cfg: &SpmConfig, seed: u64) -> Result<SpmSimulator, CliError> {
    SpmSimulator::new(cfg.clone(), seed).map_err(|e| physics_to_scenario(&sc.path, e))
}

/// Simulates `frames` SPM frames (and optionally a switching-spectroscopy loop at `point`,
/// metres from the first frame's top-left corner) and writes the PNG and HDF5 outputs.
#[allow(clippy::too_many_arguments)]
pub fn simulate_spm(
    sc: &Scenario,
    cfg: &SpmConfig,
    scenario: &Path,
    out: Option<PathBuf>,
    hdf5: Option<PathBuf>,
    seed: u64,
    frames: usize,
    point: Option<[f64; 2]>,
) -> Result<(), CliError> {
    let mut sim = spm_sim(sc, cfg, seed)?;
    if point.is_some() && sim.mode() != SpmMode::Pfm {
        return Err(CliError::Argument {
            argument: "--spectroscopy".into(),
            message: format!(
                "switching spectroscopy needs a PFM scenario; {} is {}",
                scenario.display(),
                sim.mode().name()
            ),
        });
    }
    let s = sim.scan_settings();
    // Ground truth before the first frame.
    let truth_surface = sim.truth_surface().to_owned();
    let tip0 = sim.tip_kernel().as_array().to_owned();
    let pol0 = sim.film().map(|f| f.polarization().to_owned());
    let adatoms0: Vec<[f64; 2]> = sim.adatoms().to_vec();
    let drift0 = sim.drift();
    let tip_state0 = format!("{:?}", sim.tip_state());
    let mut names = Vec::new();
    let mut stacks: Vec<Array3<f32>> = Vec::new();
    let mut noiseless = Array3::<f32>::zeros((frames, s.rows, s.cols));
    let mut times = Vec::with_capacity(frames);
    let bar = progress(frames);
    for k in 0..frames {
        let f = sim.acquire_frame()?;
        times.push(f.meta.t_start);
        if k == 0 {
            for c in f.channels {
                names.push((c.name.clone(), c.units.clone(), c.quantity.clone()));
                stacks.push(Array3::zeros((frames, s.rows, s.cols)));
            }
        }
        for (st, c) in stacks.iter_mut().zip(f.channels) {
            st.index_axis_mut(Axis(0), k).assign(&c.image);
        }
        noiseless
            .index_axis_mut(Axis(0), k)
            .assign(&sim.last_noiseless());
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut loop_data = None;
    if let Some(p) = point {
        // Frame coordinates → lab: the frame's top-left corner is centre - fov/2.
        let fov = s.field_of_view();
        let lab = [
            s.center[0] - 0.5 * fov[0] + p[0],
            s.center[1] - 0.5 * fov[1] + p[1],
        ];
        let pc = &sim.config().pfm;
        let one = triangle_waveform(pc.loop_amplitude.get(), pc.loop_points);
        let mut wave = Vec::with_capacity(one.len() * pc.loop_cycles);
        for _ in 0..pc.loop_cycles {
            wave.extend_from_slice(&one);
        }
        let resp = sim.point_spectroscopy(lab, &wave).map_err(|e| match e {
            scopegym_physics::PhysicsError::InvalidArgument { reason, .. } => CliError::Argument {
                argument: "--spectroscopy".into(),
                message: reason,
            },
            other => other.into(),
        })?;
        let n = one.len();
        let last = wave.len() - n;
        let (up, down) = loop_coercive(&wave[last..], &resp[last..]);
        eprintln!(
            "switching spectroscopy at ({:.3e}, {:.3e}) m: coercive {} / {} (last cycle)",
            p[0],
            p[1],
            up.map_or("none".into(), |v| format!("{v:+.2} V")),
            down.map_or("none".into(), |v| format!("{v:+.2} V")),
        );
        loop_data = Some((wave, resp));
    }
    let main = stacks[0].clone();
    let views: Vec<_> = main.outer_iter().collect();
    let png = montage_u8(&views);
    if let Some(h) = &hdf5 {
        let cfg = sim.config();
        let (main_name, main_units, main_quantity) = names[0].clone();
        let mut datasets = vec![
            Dataset {
                name: "frame".into(),
                data: Data::F32x3(main),
                attrs: attrs(&main_units, &format!("{main_name}: {main_quantity}")),
            },
            Dataset {
                name: "noiseless".into(),
                data: Data::F32x3(noiseless),
                attrs: attrs(
                    &main_units,
                    if cfg.mode == SpmMode::Pfm {
                        "phase of the noiseless piezoresponse at the scanned positions"
                    } else {
                        "tip-dilated true surface at the scanned positions (perfect feedback, no noise)"
                    },
                ),
            },
            Dataset {
                name: "frame_start_time".into(),
                data: Data::F64x1(times),
                attrs: attrs("s", "time of each frame's first pixel"),
            },
            Dataset {
                name: "truth/surface".into(),
                data: Data::F32x2(truth_surface),
                attrs: attrs(
                    "m",
                    "true surface height on the sample grid (row = y), before the first frame",
                ),
            },
            Dataset {
                name: "truth/tip".into(),
                data: Data::F32x2(tip0),
                attrs: attrs(
                    "m",
                    "tip height profile on the sample grid (apex 0, heights below it negative)",
                ),
            },
        ];
        for ((name, units, quantity), st) in names.iter().zip(stacks) {
            datasets.push(Dataset {
                name: format!("channels/{name}"),
                data: Data::F32x3(st),
                attrs: attrs(units, quantity),
            });
        }
        if let Some(p) = pol0 {
            datasets.push(Dataset {
                name: "truth/polarization".into(),
                data: Data::F32x2(p),
                attrs: attrs(
                    "1",
                    "out-of-plane polarization P/P_s in [-1, 1] on the sample grid, before the first frame",
                ),
            });
        }
        if cfg.mode == SpmMode::Stm {
            // Adatoms in metres from the first frame's top-left corner, like STEM atoms.
            let fov = s.field_of_view();
            let mut pos = Array2::<f64>::zeros((adatoms0.len(), 2));
            for (i, a) in adatoms0.iter().enumerate() {
                pos[[i, 0]] = a[0] + drift0[0] - s.center[0] + 0.5 * fov[0];
                pos[[i, 1]] = a[1] + drift0[1] - s.center[1] + 0.5 * fov[1];
            }
            datasets.push(Dataset {
                name: "truth/adatoms".into(),
                data: Data::F64x2(pos),
                attrs: attrs(
                    "m",
                    "adatom position (x, y) from the first frame's top-left corner",
                ),
            });
        }
        if let Some((bias, resp)) = loop_data {
            datasets.push(Dataset {
                name: "spectroscopy/bias".into(),
                data: Data::F64x1(bias),
                attrs: attrs("V", "tip bias waveform"),
            });
            datasets.push(Dataset {
                name: "spectroscopy/response".into(),
                data: Data::F64x1(resp),
                attrs: attrs(
                    "a.u.",
                    "piezoresponse (sign = polarization direction under the tip)",
                ),
            });
        }
        let resolved = toml::to_string(cfg).unwrap_or_default();
        let template = std::fs::read_to_string(scenario).unwrap_or_default();
        let f = AttrValue::F64;
        let (p_gain, i_gain) = sim.feedback_gains();
        let mut root = vec![
            ("instrument".into(), AttrValue::Str(cfg.mode.name().into())),
            ("pixel_size_m".into(), f(s.pixel_size)),
            ("dwell_time_s".into(), f(s.dwell_time)),
            ("line_rate_Hz".into(), f(cfg.scan.line_rate.get())),
            ("sample_size_m".into(), f(cfg.sample.size.get())),
            ("sample_cell_m".into(), f(sim.cell_size())),
            ("bias_V".into(), f(sim.bias())),
            ("feedback_p_gain".into(), f(p_gain)),
            ("feedback_i_gain_per_s".into(), f(i_gain)),
            ("tip_state".into(), AttrValue::Str(tip_state0)),
        ];
        root.extend(provenance(sc, seed, frames, template, resolved));
        write_hdf5(h, &datasets, &root)?;
    }
    if let Some(o) = &out {
        write_png(o, &png)?;
    }
    eprintln!(
        "wrote {} {} frame(s) of {}x{} ({:.1} s each) to {}",
        frames,
        sim.mode().name().to_uppercase(),
        s.rows,
        s.cols,
        s.frame_time() + s.rows as f64 * s.cols as f64 * s.dwell_time,
        out.iter()
            .chain(hdf5.iter())
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ")
    );
    Ok(())
}

/// `scopegym perf` for an SPM scenario: median wall time of a frame (trace and retrace of
/// every line through the PI loop; the tip dilation cached unless the tip changes).
pub fn perf_spm(sc: &Scenario, cfg: &SpmConfig, frames: usize, json: bool) -> Result<(), CliError> {
    let mut sim = spm_sim(sc, cfg, 0)?;
    sim.acquire_frame()?;
    let mut frame_ms = Vec::with_capacity(frames);
    for _ in 0..frames {
        let t = Instant::now();
        std::hint::black_box(sim.acquire_frame()?.main().image[[0, 0]]);
        frame_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let s = sim.scan_settings();
    let f = median(frame_ms);
    if json {
        println!(
            "{{\"scenario\": {:?}, \"pixels\": [{}, {}], \"frames\": {}, \"frame_ms\": {:.4}}}",
            sc.name, s.rows, s.cols, frames, f
        );
    } else {
        println!(
            "{}: {}x{} pixels, trace and retrace",
            sc.name, s.rows, s.cols
        );
        println!("frame: {f:.3} ms (median of {frames})");
    }
    Ok(())
}
