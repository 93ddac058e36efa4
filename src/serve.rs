//! `scopegym serve`: an agent runs a task (simulator, replay or real driver, through the guard)
//! in a worker thread while a page on localhost shows the run live (server-sent events) and
//! takes the operator's interventions: pause and resume, veto the proposed point, mark a
//! region off-limits, change the agent's controls (acquisition, β, ξ).
//!
//! The worker proposes an action, publishes it, then takes the queued interventions before it
//! steps: an intervention belongs to the step index it was applied at. Every one is appended to
//! `<out>/interventions.jsonl` (wall time, step index, value) and written into
//! `<out>/results.json`; `--replay FILE` applies a record's vetoes, regions and controls at the
//! same step indices (pauses only take time), which gives the same run. `<out>/steps.jsonl`
//! holds every step's action and reward.
//!
//! The state (`GET /api/state`, each event) carries the agent's [`Insight`] about its current
//! proposal (asked once per proposal): maps, embedding scatter, action distribution, value.
//! Each `curve` entry has the step's reward, return and `value`, the agent's value estimate of
//! the state the step started from (`null` for agents without a critic).

use crate::bench_cli::read_toml;
use crate::mcp_cli::{observation_png, value_json};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use scopegym::error::CliError;
use scopegym_agents::agent::{Agent, Insight, Region};
use scopegym_agents::bench::run::{
    Budget, EPISODE_STRIDE, EpisodeResult, Provenance, RunResults, SeedResult, episode_seed,
    summarize,
};
use scopegym_drivers::connect::{DeployOptions, DriverUrl, limits_for, make_env};
use scopegym_envs::env::{Env, InfoValue};
use scopegym_envs::space::{Space, Value};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use tokio::sync::{oneshot, watch};

const INDEX_HTML: &str = include_str!("serve/static/index.html");
const APP_JS: &str = include_str!("serve/static/app.js");
const STYLE_CSS: &str = include_str!("serve/static/style.css");

/// What `scopegym serve` runs.
#[derive(Debug)]
pub(crate) struct ServeArgs<'a> {
    pub env_id: &'a str,
    pub agent: &'a str,
    pub driver: &'a str,
    pub checkpoint: Option<&'a Path>,
    pub config: Option<&'a Path>,
    pub env_config: Option<&'a Path>,
    pub difficulty: &'a str,
    pub split: &'a str,
    pub limits: Option<&'a Path>,
    pub seed: u64,
    pub episodes: usize,
    pub port: u16,
    pub out: &'a Path,
    pub log: Option<&'a Path>,
    pub replay: Option<&'a Path>,
    pub start_paused: bool,
    pub exit: bool,
    pub pace: f64,
}

fn arg(argument: &str, message: impl Into<String>) -> CliError {
    CliError::Argument {
        argument: argument.into(),
        message: message.into(),
    }
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One operator intervention, as `interventions.jsonl` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Intervention {
    /// Wall time, s since the Unix epoch.
    pub t: f64,
    /// The run's step index (steps taken so far, all episodes) it was applied before.
    pub step: usize,
    /// The episode (0-based) and its step index.
    pub episode: usize,
    pub episode_step: usize,
    /// `pause`, `resume`, `veto`, `off_limits` or `set_control`.
    pub kind: String,
    /// veto: `{"action": …}`; off_limits: `{"rows": [a, b], "cols": [c, d]}`; set_control:
    /// `{"name": …, "value": …}`; pause and resume: `null`.
    pub value: Json,
    /// Applied from `--replay`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

/// An operator's request to the worker.
#[derive(Debug)]
enum Cmd {
    Pause,
    Resume,
    Veto,
    OffLimits(Json),
    Control(Json),
    Stop,
}

type Reply = oneshot::Sender<Result<Json, String>>;

/// The run: environment, agent and record, stepped by the worker thread.
struct Run {
    env: scopegym_drivers::connect::Deployment,
    agent: Box<dyn Agent>,
    a: RunMeta,
    paused: bool,
    stopped: bool,
    step: usize,
    episode: usize,
    episode_step: usize,
    obs: Option<Value>,
    proposal: Option<Value>,
    /// What the agent showed about its last proposal (asked once per proposal).
    insight: Option<Insight>,
    /// The observation's images as PNG data URLs, named by their key.
    frames: Vec<(String, String)>,
    finished: Vec<EpisodeResult>,
    current: EpisodeResult,
    curve: Vec<Json>,
    info: Json,
    interventions: Vec<Intervention>,
    replay: Vec<Intervention>,
    record: std::fs::File,
    /// `<out>/steps.jsonl`: every step's action and reward.
    steps_file: std::fs::File,
    state: watch::Sender<Arc<String>>,
    /// The least wall time between steps (to watch a fast simulator), and the last step's.
    pace: std::time::Duration,
    stepped: std::time::Instant,
    error: Option<String>,
    done: bool,
}

/// What the record needs of the arguments.
#[derive(Debug, Clone)]
struct RunMeta {
    env_id: String,
    agent: String,
    driver: String,
    seed: u64,
    episodes: usize,
    out: PathBuf,
    log: PathBuf,
    env_config: toml::Value,
}

fn audit_tail(path: &Path, lines: usize) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(16_384)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    let all: Vec<&str> = s.lines().filter(|l| !l.is_empty()).collect();
    let skip = all.len().saturating_sub(lines);
    all[skip..].iter().map(|l| (*l).to_owned()).collect()
}

fn info_json(info: &scopegym_envs::env::Info) -> Json {
    Json::Object(
        info.iter()
            .map(|(k, v)| {
                let j = match v {
                    InfoValue::F64(x) => json!(x),
                    InfoValue::I64(x) => json!(x),
                    InfoValue::Bool(x) => json!(x),
                    InfoValue::Str(x) => json!(x),
                    InfoValue::F64s(x) => json!(x),
                };
                (k.to_string(), j)
            })
            .collect(),
    )
}

fn empty_episode(seed: u64) -> EpisodeResult {
    EpisodeResult {
        seed,
        ret: 0.0,
        success: false,
        steps: 0,
        rewards: Vec::new(),
        regret: Vec::new(),
    }
}

impl Run {
    fn where_(&self, kind: &str, value: Json, replayed: bool) -> Intervention {
        Intervention {
            t: now_s(),
            step: self.step,
            episode: self.episode,
            episode_step: self.episode_step,
            kind: kind.into(),
            value,
            replayed,
        }
    }

    fn log_intervention(&mut self, i: Intervention) -> Json {
        let j = serde_json::to_value(&i).unwrap_or(Json::Null);
        let _ = writeln!(self.record, "{j}");
        let _ = self.record.flush();
        self.interventions.push(i);
        j
    }

    fn publish(&self) {
        let insight = &self.insight;
        let s = json!({
            "env_id": self.a.env_id,
            "agent": self.a.agent,
            "driver": self.a.driver,
            "episode": self.episode,
            "episodes": self.a.episodes,
            "episode_step": self.episode_step,
            "step": self.step,
            "max_episode_steps": self.env.max_episode_steps(),
            "paused": self.paused,
            "done": self.done,
            "error": self.error,
            "frames": self.frames.iter().map(|(k, p)| json!({"key": k, "png": p})).collect::<Vec<_>>(),
            "proposed": self.proposal.as_ref().map(value_json),
            "insight": insight,
            "curve": self.curve,
            "returns": self.finished.iter().map(|e| e.ret).collect::<Vec<_>>(),
            "return": self.current.ret,
            "info": self.info,
            "audit_tail": audit_tail(&self.a.log, 12),
            "interventions": self.interventions,
        });
        self.state.send_replace(Arc::new(s.to_string()));
    }

    fn results(&self) -> RunResults {
        let mut eps = self.finished.clone();
        if self.current.steps > 0 && !self.done {
            eps.push(self.current.clone());
        }
        let n = eps.len().max(1) as f64;
        let steps: u64 = eps.iter().map(|e| e.steps as u64).sum();
        let per_seed = vec![SeedResult {
            seed: self.a.seed,
            return_mean: eps.iter().map(|e| e.ret).sum::<f64>() / n,
            success_rate: eps.iter().filter(|e| e.success).count() as f64 / n,
            steps,
            train_steps: 0,
            eval_steps: steps,
            curve: Vec::new(),
            episodes: eps.clone(),
        }];
        let get = |k: &str| {
            self.a
                .env_config
                .get(k)
                .and_then(toml::Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        RunResults {
            env_id: self.a.env_id.clone(),
            agent: self.a.agent.clone(),
            seeds: vec![self.a.seed],
            summary: summarize(&per_seed),
            per_seed,
            provenance: Provenance {
                version: scopegym::VERSION.into(),
                commit: scopegym::GIT_COMMIT.into(),
                env_config: serde_json::to_value(&self.a.env_config).unwrap_or(Json::Null),
                train_env_config: Json::Null,
                agent_config: json!({
                    "config": self.agent.config(),
                    "served_by": "scopegym serve",
                    "driver": self.a.driver,
                    "interventions": self.interventions,
                }),
                difficulty: get("difficulty"),
                split: get("split"),
                learns: false,
                budget: Budget {
                    train_steps: 0,
                    episodes: eps.len(),
                },
                max_episode_steps: self.env.max_episode_steps(),
                episode_seeds: format!(
                    "episode i of run seed s resets with s * {EPISODE_STRIDE} + i"
                ),
            },
        }
    }

    fn write_results(&self) {
        let mut j = serde_json::to_value(self.results()).unwrap_or(Json::Null);
        j["interventions"] = serde_json::to_value(&self.interventions).unwrap_or(Json::Null);
        let p = self.a.out.join("results.json");
        let text = serde_json::to_string_pretty(&j).unwrap_or_default();
        if let Err(e) = std::fs::write(&p, text) {
            eprintln!("scopegym serve: writing {}: {e}", p.display());
        }
    }

    /// Asks the agent for the action (again, after an intervention) and publishes it.
    fn propose(&mut self) -> Result<(), String> {
        let obs = self.obs.as_ref().ok_or("no observation")?;
        let a = self
            .agent
            .act(&mut self.env, obs)
            .map_err(|e| e.to_string())?;
        self.proposal = Some(a);
        self.insight = self.agent.insight();
        Ok(())
    }

    /// Applies one intervention; errors are the operator's (the run goes on).
    fn apply(&mut self, kind: &str, value: &Json, replayed: bool) -> Result<Json, String> {
        let value = match kind {
            "pause" => {
                self.paused = true;
                Json::Null
            }
            "resume" => {
                self.paused = false;
                Json::Null
            }
            "veto" => {
                let p = self.proposal.clone().ok_or("no proposed action to veto")?;
                let action = value_json(&p);
                if replayed && value.get("action") != Some(&action) {
                    return Err(format!(
                        "replay diverged at step {}: the record vetoed {}, the agent proposes \
                         {action}",
                        self.step,
                        value.get("action").unwrap_or(&Json::Null)
                    ));
                }
                self.agent.veto(&p).map_err(|e| e.to_string())?;
                // Never step the vetoed action: without a new proposal the run stops.
                self.proposal = None;
                self.propose()?;
                json!({"action": action})
            }
            "off_limits" => {
                let r: Region = serde_json::from_value(value.clone())
                    .map_err(|e| format!("off_limits: {e} (expected {{\"rows\": [first, last], \"cols\": [first, last]}})"))?;
                self.agent.forbid(&r).map_err(|e| e.to_string())?;
                self.propose()?;
                serde_json::to_value(r).unwrap_or(Json::Null)
            }
            "set_control" => {
                let name = value
                    .get("name")
                    .and_then(Json::as_str)
                    .ok_or("set_control: give {\"name\": ..., \"value\": ...}")?;
                let v = value
                    .get("value")
                    .ok_or_else(|| format!("set_control: {name}: give a \"value\""))?;
                self.agent.set_control(name, v).map_err(|e| e.to_string())?;
                self.propose()?;
                json!({"name": name, "value": v})
            }
            other => return Err(format!("unknown intervention {other:?}")),
        };
        let i = self.where_(kind, value, replayed);
        Ok(self.log_intervention(i))
    }

    fn handle(&mut self, cmd: Cmd, reply: Reply) {
        let r = match cmd {
            Cmd::Pause => self.apply("pause", &Json::Null, false),
            Cmd::Resume => self.apply("resume", &Json::Null, false),
            Cmd::Veto => self.apply("veto", &Json::Null, false),
            Cmd::OffLimits(v) => self.apply("off_limits", &v, false),
            Cmd::Control(v) => self.apply("set_control", &v, false),
            Cmd::Stop => {
                self.stopped = true;
                Ok(Json::Null)
            }
        };
        // Publish first: a client that reads the state after the reply sees the change.
        self.publish();
        let _ = reply.send(r);
    }

    /// Applies the replayed interventions of this step, then the operator's (waiting while
    /// paused).
    fn interventions_before_step(
        &mut self,
        rx: &mpsc::Receiver<(Cmd, Reply)>,
    ) -> Result<(), String> {
        while let Some(i) = self.replay.first().filter(|i| i.step == self.step).cloned() {
            self.replay.remove(0);
            if matches!(i.kind.as_str(), "veto" | "off_limits" | "set_control") {
                self.apply(&i.kind, &i.value, true)?;
            }
        }
        self.publish();
        loop {
            if self.stopped {
                return Ok(());
            }
            let wait =
                (self.stepped + self.pace).saturating_duration_since(std::time::Instant::now());
            let next = if self.paused {
                rx.recv().ok()
            } else if !wait.is_zero() {
                match rx.recv_timeout(wait) {
                    Ok(c) => Some(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => None,
                }
            } else {
                rx.try_recv().ok()
            };
            match next {
                Some((cmd, reply)) => self.handle(cmd, reply),
                None if self.paused => {
                    // Every sender is gone: the server has stopped.
                    self.stopped = true;
                }
                None => return Ok(()),
            }
        }
    }

    fn run(&mut self, rx: &mpsc::Receiver<(Cmd, Reply)>) -> Result<(), String> {
        // Every image of the observation (a Dict's 2-D keys; the first is the frame the
        // proposed point is drawn on), from the observation, never from `render()`.
        let png = |env: &dyn Env, v: &Value| -> Vec<(String, String)> {
            let url = |p: Vec<u8>| {
                format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(p)
                )
            };
            match (v, env.observation_space()) {
                (Value::Dict(items), Space::Dict(spaces)) => items
                    .iter()
                    .zip(spaces)
                    // Images only: no stacks drawn as a tall strip (e.g. patches).
                    .filter(|(_, (_, s))| match s {
                        Space::Box { shape, .. } => match shape.as_slice() {
                            [k, r, c] if *k <= 4 => *r <= 8 * c && *c <= 8 * r,
                            [r, c] | [r, c, _] => *r <= 8 * c && *c <= 8 * r,
                            _ => false,
                        },
                        _ => false,
                    })
                    .filter_map(|((k, v), (_, s))| {
                        observation_png(v, s).map(|p| (k.to_string(), url(p)))
                    })
                    .collect(),
                (v, s) => observation_png(v, s)
                    .map(|p| ("observation".to_owned(), url(p)))
                    .into_iter()
                    .collect(),
            }
        };
        for i in 0..self.a.episodes {
            let seed = episode_seed(self.a.seed, i);
            self.episode = i;
            self.episode_step = 0;
            self.current = empty_episode(seed);
            let (obs, _) = self.env.reset(Some(seed)).map_err(|e| e.to_string())?;
            self.agent
                .begin_episode(&self.env, &obs, seed)
                .map_err(|e| e.to_string())?;
            self.frames = png(&self.env, &obs);
            self.obs = Some(obs);
            loop {
                self.propose()?;
                self.interventions_before_step(rx)?;
                if self.stopped {
                    return Ok(());
                }
                let action = self.proposal.take().ok_or("no action")?;
                // The value estimate of the state this step starts from (RL agents).
                let value = self.insight.as_ref().and_then(|i| i.value);
                self.stepped = std::time::Instant::now();
                let s = self.env.step(&action).map_err(|e| e.to_string())?;
                self.agent
                    .observe(&action, s.reward, &s.obs)
                    .map_err(|e| e.to_string())?;
                let success = s.info.get("is_success") == Some(&InfoValue::Bool(true));
                let e = &mut self.current;
                e.ret += s.reward;
                e.steps += 1;
                e.rewards.push(s.reward);
                e.success = success;
                if let Some(InfoValue::F64(r)) = s.info.get("regret") {
                    e.regret.push(*r);
                }
                self.info = info_json(&s.info);
                let budget: serde_json::Map<String, Json> = self
                    .info
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, v)| {
                        (k.contains("dose") || k.contains("wear") || k.contains("budget"))
                            && v.is_number()
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let line = json!({"step": self.step, "episode": i,
                    "episode_step": self.episode_step, "action": value_json(&action),
                    "reward": s.reward, "success": success});
                let _ = writeln!(self.steps_file, "{line}");
                self.curve.push(json!({
                    "step": self.step, "episode": i, "reward": s.reward,
                    "return": self.current.ret, "success": success, "budget": budget,
                    "action": value_json(&action), "value": value,
                }));
                self.step += 1;
                self.episode_step += 1;
                self.frames = png(&self.env, &s.obs);
                self.obs = Some(s.obs);
                if s.terminated || s.truncated {
                    break;
                }
            }
            self.finished.push(self.current.clone());
            self.current = empty_episode(0);
            self.write_results();
        }
        Ok(())
    }
}

fn env_table(a: &ServeArgs<'_>) -> Result<toml::Value, CliError> {
    let mut t = match a
        .env_config
        .map(|p| read_toml(p, "--env-config"))
        .transpose()?
    {
        Some(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    t.insert(
        "difficulty".into(),
        toml::Value::String(a.difficulty.into()),
    );
    t.insert("split".into(), toml::Value::String(a.split.into()));
    Ok(toml::Value::Table(t))
}

/// Reads an `interventions.jsonl` for `--replay`, in step order.
pub(crate) fn read_interventions(path: &Path) -> Result<Vec<Intervention>, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut v = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let i: Intervention = serde_json::from_str(line)
            .map_err(|e| arg("--replay", format!("{}:{}: {e}", path.display(), n + 1)))?;
        v.push(i);
    }
    // Stable: interventions of one step keep their order.
    v.sort_by_key(|i| i.step);
    Ok(v)
}

#[derive(Clone)]
struct AppState {
    tx: mpsc::Sender<(Cmd, Reply)>,
    state: watch::Receiver<Arc<String>>,
}

fn json_response(code: StatusCode, body: Json) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn send(st: &AppState, cmd: Cmd) -> Response {
    let (reply, rx) = oneshot::channel();
    if st.tx.send((cmd, reply)).is_err() {
        return json_response(
            StatusCode::CONFLICT,
            json!({"error": "the run has finished"}),
        );
    }
    match rx.await {
        Ok(Ok(j)) => json_response(StatusCode::OK, json!({"ok": true, "intervention": j})),
        Ok(Err(e)) => json_response(StatusCode::BAD_REQUEST, json!({"error": e})),
        Err(_) => json_response(
            StatusCode::CONFLICT,
            json!({"error": "the run has finished"}),
        ),
    }
}

fn body_json(body: &Bytes) -> Result<Json, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Json::Null);
    }
    serde_json::from_slice(body).map_err(|e| {
        json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("the body is not JSON: {e}")}),
        )
    })
}

fn router(st: AppState) -> axum::Router {
    let page = |ct: &'static str, body: &'static str| {
        move || async move { ([(header::CONTENT_TYPE, ct)], body) }
    };
    axum::Router::new()
        .route("/", get(page("text/html; charset=utf-8", INDEX_HTML)))
        .route("/app.js", get(page("text/javascript", APP_JS)))
        .route("/style.css", get(page("text/css", STYLE_CSS)))
        .route(
            "/api/state",
            get(|State(st): State<AppState>| async move {
                let s = st.state.borrow().clone();
                ([(header::CONTENT_TYPE, "application/json")], (*s).clone())
            }),
        )
        .route(
            "/api/events",
            get(|State(st): State<AppState>| async move {
                let stream = futures_util::stream::unfold(
                    (st.state.clone(), true),
                    |(mut rx, first)| async move {
                        if !first && rx.changed().await.is_err() {
                            return None;
                        }
                        let s = rx.borrow_and_update().clone();
                        Some((
                            Ok::<_, std::convert::Infallible>(Event::default().data(s.as_str())),
                            (rx, false),
                        ))
                    },
                );
                Sse::new(stream)
            }),
        )
        .route(
            "/api/pause",
            post(|State(st): State<AppState>| async move { send(&st, Cmd::Pause).await }),
        )
        .route(
            "/api/resume",
            post(|State(st): State<AppState>| async move { send(&st, Cmd::Resume).await }),
        )
        .route(
            "/api/veto",
            post(|State(st): State<AppState>| async move { send(&st, Cmd::Veto).await }),
        )
        .route(
            "/api/off_limits",
            post(|State(st): State<AppState>, body: Bytes| async move {
                match body_json(&body) {
                    Ok(v) => send(&st, Cmd::OffLimits(v)).await,
                    Err(r) => r,
                }
            }),
        )
        .route(
            "/api/control",
            post(|State(st): State<AppState>, body: Bytes| async move {
                match body_json(&body) {
                    Ok(v) => send(&st, Cmd::Control(v)).await,
                    Err(r) => r,
                }
            }),
        )
        .with_state(st)
}

/// Runs `scopegym serve`.
pub(crate) fn serve(a: &ServeArgs<'_>) -> Result<(), CliError> {
    if a.episodes == 0 {
        return Err(arg("--episodes", "must be at least 1"));
    }
    if !(a.pace.is_finite() && (0.0..=3600.0).contains(&a.pace)) {
        return Err(arg("--pace", "must be in [0, 3600] s"));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| CliError::Io { path, source: e }
    };
    std::fs::create_dir_all(a.out).map_err(io(a.out))?;
    let replay = a.replay.map(read_interventions).transpose()?;
    let url: DriverUrl = a.driver.parse()?;
    let limits = limits_for(&url, a.limits)?;
    let log = a
        .log
        .map_or_else(|| a.out.join("audit.jsonl"), Path::to_path_buf);
    let env_config = env_table(a)?;
    let opts = DeployOptions {
        config: Some(env_config.clone()),
        limits,
        dry_run: false,
        audit: Some(log.clone()),
        watchdog: None,
    };
    let env = make_env(a.env_id, &url, opts)?;
    let id = scopegym_envs::registry::spec(a.env_id)?.id;
    use scopegym_agents::registry;
    let agent = match a.checkpoint {
        Some(ck) => registry::load(a.agent, ck, &env)?,
        None => {
            if registry::spec(a.agent)?.learns {
                return Err(arg(
                    "--checkpoint",
                    format!(
                        "{} learns before it acts: give the checkpoint it saved",
                        a.agent
                    ),
                ));
            }
            let cfg = a.config.map(|p| read_toml(p, "--config")).transpose()?;
            registry::make(a.agent, &env, cfg.as_ref(), a.seed)?
        }
    };
    let ipath = a.out.join("interventions.jsonl");
    let record = std::fs::File::create(&ipath).map_err(io(&ipath))?;
    let spath = a.out.join("steps.jsonl");
    let steps_file = std::fs::File::create(&spath).map_err(io(&spath))?;
    let (state_tx, state_rx) = watch::channel(Arc::new(String::from("{}")));
    let (tx, rx) = mpsc::channel::<(Cmd, Reply)>();
    let mut run = Run {
        env,
        agent,
        a: RunMeta {
            env_id: id.into(),
            agent: a.agent.into(),
            driver: url.to_string(),
            seed: a.seed,
            episodes: a.episodes,
            out: a.out.to_path_buf(),
            log,
            env_config,
        },
        paused: a.start_paused,
        stopped: false,
        step: 0,
        episode: 0,
        episode_step: 0,
        obs: None,
        proposal: None,
        insight: None,
        frames: Vec::new(),
        finished: Vec::new(),
        current: empty_episode(0),
        curve: Vec::new(),
        info: json!({}),
        interventions: Vec::new(),
        replay: replay.unwrap_or_default(),
        record,
        steps_file,
        state: state_tx,
        pace: std::time::Duration::from_secs_f64(a.pace),
        stepped: std::time::Instant::now(),
        error: None,
        done: false,
    };
    run.publish();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io(Path::new("tokio runtime")))?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", a.port)))
        .map_err(|e| {
            arg(
                "--port",
                format!("cannot listen on 127.0.0.1:{}: {e}", a.port),
            )
        })?;
    let local = listener.local_addr().map_err(io(Path::new("--port")))?;
    println!("http://{local}/");
    let _ = std::io::stdout().flush();
    eprintln!(
        "scopegym serve: {} on {id} via {url}; open http://{local}/ (Ctrl-C stops)",
        a.agent
    );

    let worker = std::thread::spawn(move || {
        let r = run.run(&rx);
        if let Err(e) = &r {
            eprintln!("scopegym serve: the run stopped: {e}");
            run.error = Some(e.clone());
        }
        run.done = true;
        run.proposal = None;
        run.write_results();
        run.publish();
        let _ = run.env.close();
        // Dropping `run` drops the state sender: the event streams end.
        r
    });

    let app = router(AppState {
        tx: tx.clone(),
        state: state_rx.clone(),
    });
    let exit = a.exit;
    let mut done_rx = state_rx;
    let stop_tx = tx.clone();
    let served = rt.block_on(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let finished = async {
                    while done_rx.changed().await.is_ok() {}
                    if !exit {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {
                        // Stop the worker, which ends the event streams.
                        let (reply, _) = oneshot::channel();
                        let _ = stop_tx.send((Cmd::Stop, reply));
                    }
                    _ = finished => {}
                }
            })
            .await
    });
    // Ctrl-C (or the end of the run): stop the worker after its current step.
    let (reply, _) = oneshot::channel();
    let _ = tx.send((Cmd::Stop, reply));
    drop(tx);
    let r = worker
        .join()
        .map_err(|_| arg("serve", "the worker thread panicked"))?;
    served.map_err(io(Path::new("http")))?;
    eprintln!("scopegym serve: record in {}", a.out.display());
    r.map_err(|e| arg("serve", e))
}
