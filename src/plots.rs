//! The figures of `scopegym run` and `scopegym suite` (plotters, PNG, text in the embedded
//! DejaVu Sans so no system font is needed).
//!
//! Curves of a run (`curves.png`), one panel each where the data exist:
//!
//! - *learning curve* (learning agents): return against training env steps;
//! - *return so far* (every agent): the cumulative reward at each step of an evaluation episode,
//!   averaged over the seed's episodes (an episode that ended early holds its final value). On
//!   the explore tasks (PfmSpectroscopyExplore, StemEelsExplore) the reward telescopes to the
//!   estimated value of the recommended point, so this is the *best-found* curve;
//! - *regret* (tasks reporting `info["regret"]`): the regret at each step, averaged over the
//!   seed's episodes, held after an episode ends.
//!
//! Every seed is a thin line; the mean over seeds is a thick line inside a band of its 95 %
//! interval (`mean ± 1.96 · sd / √n` over the seeds).

use plotters::prelude::*;
use scopegym::error::CliError;
use scopegym_agents::bench::RunResults;
use scopegym_agents::bench::suite::SuiteResults;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TTF; a failure would only lose the text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> CliError {
    CliError::Io {
        path: path.into(),
        source: std::io::Error::other(format!("plot: {e}")),
    }
}

/// A curve: (x, y) points.
pub type Curve = Vec<(f64, f64)>;

/// One curve per seed on a common x grid.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Title.
    pub title: String,
    /// x-axis label.
    pub x_label: String,
    /// y-axis label.
    pub y_label: String,
    /// Series: a label and the per-seed curves (x, y), all on the same x.
    pub series: Vec<(String, Vec<Curve>)>,
    /// Draw every seed's thin line.
    pub seeds: bool,
}

/// The per-step mean over episodes of `f(episode)` (a per-step series), held after each
/// episode's end, for steps 1..=max.
fn per_step(episodes: &[Vec<f64>]) -> Vec<(f64, f64)> {
    let len = episodes.iter().map(Vec::len).max().unwrap_or(0);
    (0..len)
        .map(|t| {
            let v: f64 = episodes
                .iter()
                .map(|e| e.get(t).or(e.last()).copied().unwrap_or(0.0))
                .sum::<f64>()
                / episodes.len().max(1) as f64;
            ((t + 1) as f64, v)
        })
        .collect()
}

fn cumsum(v: &[f64]) -> Vec<f64> {
    let mut s = 0.0;
    v.iter()
        .map(|x| {
            s += x;
            s
        })
        .collect()
}

/// Interpolates every curve onto 100 points spanning all of them (held flat outside each).
fn common_grid(curves: &[Vec<(f64, f64)>]) -> Vec<Vec<(f64, f64)>> {
    let lo = curves
        .iter()
        .filter_map(|c| c.first())
        .map(|p| p.0)
        .fold(f64::INFINITY, f64::min);
    let hi = curves
        .iter()
        .filter_map(|c| c.last())
        .map(|p| p.0)
        .fold(f64::NEG_INFINITY, f64::max);
    if !(lo.is_finite() && hi.is_finite()) {
        return Vec::new();
    }
    let xs = scopegym_agents::bench::stats::linspace(lo, hi, if hi > lo { 100 } else { 1 });
    curves
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| {
            xs.iter()
                .map(|&x| {
                    let i = c.partition_point(|p| p.0 < x);
                    let y = if i == 0 {
                        c[0].1
                    } else if i >= c.len() {
                        c[c.len() - 1].1
                    } else {
                        let (a, b) = (c[i - 1], c[i]);
                        a.1 + (x - a.0) / (b.0 - a.0) * (b.1 - a.1)
                    };
                    (x, y)
                })
                .collect()
        })
        .collect()
}

/// The panels of a run's `curves.png`.
pub fn run_panels(r: &RunResults) -> Vec<Panel> {
    let label = format!(
        "{} on {}",
        r.agent,
        r.env_id.trim_start_matches("scopegym/")
    );
    let mut panels = Vec::new();
    if r.has_curve() {
        let curves: Vec<Vec<(f64, f64)>> = r
            .per_seed
            .iter()
            .map(|s| s.curve.iter().map(|p| (p.step as f64, p.value)).collect())
            .collect();
        panels.push(Panel {
            title: "learning curve".into(),
            x_label: "training env steps".into(),
            y_label: "episode return".into(),
            series: vec![(label.clone(), common_grid(&curves))],
            seeds: true,
        });
    }
    let ret: Vec<Vec<(f64, f64)>> = r
        .per_seed
        .iter()
        .map(|s| {
            let eps: Vec<Vec<f64>> = s.episodes.iter().map(|e| cumsum(&e.rewards)).collect();
            per_step(&eps)
        })
        .collect();
    if ret.iter().any(|c| !c.is_empty()) {
        let regret = r.has_regret();
        panels.push(Panel {
            title: if regret {
                "best found (return so far)".into()
            } else {
                "return so far".into()
            },
            x_label: "step of the evaluation episode".into(),
            y_label: "cumulative reward".into(),
            series: vec![(label.clone(), ret)],
            seeds: true,
        });
        if regret {
            let reg: Vec<Vec<(f64, f64)>> = r
                .per_seed
                .iter()
                .map(|s| {
                    let eps: Vec<Vec<f64>> = s.episodes.iter().map(|e| e.regret.clone()).collect();
                    per_step(&eps)
                })
                .collect();
            panels.push(Panel {
                title: "regret of the recommended point".into(),
                x_label: "step of the evaluation episode".into(),
                y_label: "regret (ground truth)".into(),
                series: vec![(label, reg)],
                seeds: true,
            });
        }
    }
    panels
}

/// Mean and 95 % half-width over curves on the same x.
fn band(curves: &[Vec<(f64, f64)>]) -> Vec<(f64, f64, f64)> {
    let len = curves.iter().map(Vec::len).min().unwrap_or(0);
    (0..len)
        .map(|t| {
            let ys: Vec<f64> = curves.iter().map(|c| c[t].1).collect();
            let (m, h) = scopegym_agents::bench::stats::mean_ci95(&ys);
            (curves[0][t].0, m, h)
        })
        .collect()
}

/// A tick label: integers without decimals, others with at most 3 (trailing zeros dropped).
fn tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 * v.abs().max(1.0) {
        return format!("{:.0}", v.round() + 0.0);
    }
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    p: &Panel,
) -> Result<(), String> {
    let bands: Vec<Vec<(f64, f64, f64)>> = p.series.iter().map(|(_, c)| band(c)).collect();
    let all = p.series.iter().flat_map(|(_, c)| c.iter().flatten());
    let (x0, x1) = range(all.clone().map(|q| q.0));
    let (y0, y1) = range(
        all.map(|q| q.1)
            .chain(bands.iter().flatten().flat_map(|b| [b.1 - b.2, b.1 + b.2])),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(&p.x_label)
        .y_desc(&p.y_label)
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, ((label, curves), b)) in p.series.iter().zip(&bands).enumerate() {
        if b.is_empty() {
            continue;
        }
        let c = color(i);
        if p.seeds {
            for s in curves {
                chart
                    .draw_series(LineSeries::new(
                        s.iter().copied(),
                        c.mix(0.3).stroke_width(1),
                    ))
                    .map_err(|e| e.to_string())?;
            }
        }
        let upper: Vec<(f64, f64)> = b.iter().map(|q| (q.0, q.1 + q.2)).collect();
        let lower: Vec<(f64, f64)> = b.iter().rev().map(|q| (q.0, q.1 - q.2)).collect();
        chart
            .draw_series(std::iter::once(Polygon::new(
                upper.into_iter().chain(lower).collect::<Vec<_>>(),
                c.mix(0.2).filled(),
            )))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(
                b.iter().map(|q| (q.0, q.1)),
                c.stroke_width(3),
            ))
            .map_err(|e| e.to_string())?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Writes `panels` side by side to `path` (a PNG).
pub fn write_panels(path: &Path, panels: &[Panel], title: &str) -> Result<(), CliError> {
    register_font();
    let n = panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (520 * n, 460)).into_drawing_area();
    let go = || -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, body) = root.split_vertically(32);
        top.titled(title, ("sans-serif", 18))
            .map_err(|e| e.to_string())?;
        if panels.is_empty() {
            return Ok(());
        }
        for (area, p) in body.split_evenly((1, panels.len())).iter().zip(panels) {
            draw_panel(area, p)?;
        }
        root.present().map_err(|e| e.to_string())
    };
    go().map_err(|e| plot_err(path, e))
}

/// `compare.png`: the mean and 95 % interval of every run (interval bars), and their curves
/// overlaid (mean and band per run).
pub fn write_compare(path: &Path, runs: &[RunResults]) -> Result<(), CliError> {
    register_font();
    let label = |r: &RunResults| {
        format!(
            "{} on {}",
            r.agent,
            r.env_id.trim_start_matches("scopegym/")
        )
    };
    // Overlay the first panel kind the first run has (learning curves or return so far).
    let mut overlay = Panel {
        title: String::new(),
        x_label: String::new(),
        y_label: String::new(),
        series: Vec::new(),
        seeds: false,
    };
    for r in runs {
        if let Some(p) = run_panels(r).into_iter().next() {
            if overlay.series.is_empty() {
                overlay.title = p.title.clone();
                overlay.x_label = p.x_label.clone();
                overlay.y_label = p.y_label.clone();
            }
            if p.x_label == overlay.x_label {
                if p.title != overlay.title {
                    overlay.title = "return so far".into();
                }
                overlay.series.push((label(r), p.series[0].1.clone()));
                continue;
            }
        }
        // Keeps the colours of the two panels matched.
        overlay.series.push((label(r), Vec::new()));
    }
    let root = BitMapBackend::new(path, (1100, 480)).into_drawing_area();
    let go = || -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (left, right) = root.split_horizontally(500);
        let items: Vec<(String, f64, f64)> = runs
            .iter()
            .map(|r| (label(r), r.summary.return_mean, r.summary.return_ci95))
            .collect();
        draw_intervals(
            &left,
            "mean return (95 % interval over seeds)",
            "mean evaluation return",
            &items
                .iter()
                .map(|(l, m, h)| (l.clone(), *m, m - h, m + h))
                .collect::<Vec<_>>(),
        )?;
        if !overlay.series.is_empty() {
            draw_panel(&right, &overlay)?;
        }
        root.present().map_err(|e| e.to_string())
    };
    go().map_err(|e| plot_err(path, e))
}

/// Horizontal interval bars: one row per (label, point, low, high).
fn draw_intervals<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    items: &[(String, f64, f64, f64)],
) -> Result<(), String> {
    let (x0, x1) = range(items.iter().flat_map(|i| [i.1, i.2, i.3]));
    let n = items.len().max(1);
    let longest = items.iter().map(|i| i.0.len()).max().unwrap_or(4);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size((7 * longest as u32).clamp(60, 260))
        .build_cartesian_2d(x0..x1, -0.5f64..(n as f64 - 0.5))
        .map_err(|e| e.to_string())?;
    let labels: Vec<String> = items.iter().map(|i| i.0.clone()).collect();
    chart
        .configure_mesh()
        .x_desc(x_label)
        .x_label_formatter(&|v| tick(*v))
        .y_labels(n)
        .y_label_formatter(&|y| {
            let k = y.round();
            if (y - k).abs() < 1e-6 && k >= 0.0 && (k as usize) < labels.len() {
                labels[labels.len() - 1 - k as usize].clone()
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 12))
        .disable_y_mesh()
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (_, m, lo, hi)) in items.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        let c = color(i);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(*lo, y - 0.25), (*hi, y + 0.25)],
                c.mix(0.5).filled(),
            )))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(*m, y - 0.35), (*m, y + 0.35)],
                BLACK.stroke_width(2),
            )))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `suite.png`: the IQM of every agent's normalized scores with its bootstrap 95 % interval,
/// and the performance profiles.
pub fn write_suite(path: &Path, s: &SuiteResults) -> Result<(), CliError> {
    register_font();
    let root = BitMapBackend::new(path, (1150, 480)).into_drawing_area();
    let go = || -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (left, right) = root.split_horizontally(520);
        let items: Vec<(String, f64, f64, f64)> = s
            .aggregate
            .iter()
            .map(|a| {
                (
                    format!("{} ({} tasks)", a.agent, a.tasks.len()),
                    a.iqm,
                    a.iqm_ci[0],
                    a.iqm_ci[1],
                )
            })
            .collect();
        draw_intervals(
            &left,
            "IQM of normalized scores (95 % CI)",
            "normalized score (random 0, heuristic 1)",
            &items,
        )?;
        let profiles = Panel {
            title: "performance profiles".into(),
            x_label: "normalized score τ".into(),
            y_label: "fraction of runs with score > τ".into(),
            series: s
                .aggregate
                .iter()
                .map(|a| {
                    (
                        a.agent.clone(),
                        vec![
                            s.taus
                                .iter()
                                .copied()
                                .zip(a.profile.iter().copied())
                                .collect(),
                        ],
                    )
                })
                .collect(),
            seeds: false,
        };
        draw_panel(&right, &profiles)?;
        root.present().map_err(|e| e.to_string())
    };
    go().map_err(|e| plot_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_step_holds_ended_episodes() {
        let v = per_step(&[vec![1.0, 3.0], vec![2.0]]);
        assert_eq!(v, vec![(1.0, 1.5), (2.0, 2.5)]);
        assert_eq!(cumsum(&[1.0, 2.0, -1.0]), vec![1.0, 3.0, 2.0]);
        assert_eq!(tick(10.0), "10");
        assert_eq!(tick(-0.0), "0");
        assert_eq!(tick(0.25), "0.25");
    }

    #[test]
    fn common_grid_interpolates() {
        let g = common_grid(&[vec![(0.0, 0.0), (10.0, 10.0)], vec![(0.0, 1.0), (5.0, 1.0)]]);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].len(), 100);
        assert!((g[0][50].1 - g[0][50].0).abs() < 1e-12);
        assert_eq!(g[1][99], (10.0, 1.0));
    }
}
