// scopegym serve: the live dashboard. Plain DOM and canvas, no libraries (works offline).
"use strict";

const $ = (id) => document.getElementById(id);
let last = null;

function msg(text, ok) {
  const m = $("msg");
  m.textContent = text;
  m.className = ok ? "ok" : "";
}

async function post(path, body) {
  try {
    const r = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: body === undefined ? "" : JSON.stringify(body),
    });
    const j = await r.json();
    if (!r.ok) msg(j.error || r.statusText, false);
    else msg(path.replace("/api/", "") + ": " + JSON.stringify(j.intervention.value), true);
    return j;
  } catch (e) {
    msg(String(e), false);
  }
}

// Colour map: dark blue → teal → yellow.
function colour(t) {
  const c = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  t = Math.min(1, Math.max(0, t)) * (c.length - 1);
  const i = Math.min(c.length - 2, Math.floor(t)), f = t - i;
  return c[i].map((v, k) => Math.round(v + f * (c[i + 1][k] - v)));
}

function drawMap(canvas, maps, key, point) {
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#ddd";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!maps) return;
  const v = maps[key], n = maps.rows, m = maps.cols;
  const finite = v.filter((x) => x !== null && isFinite(x));
  const lo = Math.min(...finite), hi = Math.max(...finite);
  const w = canvas.width / m, h = canvas.height / n;
  for (let r = 0; r < n; r++) {
    for (let c = 0; c < m; c++) {
      const x = v[r * m + c];
      if (x === null || !isFinite(x)) continue;
      const [R, G, B] = colour(hi > lo ? (x - lo) / (hi - lo) : 0.5);
      ctx.fillStyle = `rgb(${R},${G},${B})`;
      ctx.fillRect(c * w, r * h, Math.ceil(w), Math.ceil(h));
    }
  }
  ctx.strokeStyle = "rgba(200,0,0,0.8)";
  for (let k = 0; k < maps.forbidden.length; k++) {
    if (!maps.forbidden[k]) continue;
    const r = Math.floor(k / m), c = k % m;
    ctx.beginPath();
    ctx.moveTo(c * w, r * h); ctx.lineTo((c + 1) * w, (r + 1) * h);
    ctx.moveTo((c + 1) * w, r * h); ctx.lineTo(c * w, (r + 1) * h);
    ctx.stroke();
  }
  ctx.fillStyle = "#000";
  ctx.font = "11px sans-serif";
  if (finite.length) ctx.fillText(`${lo.toPrecision(3)} … ${hi.toPrecision(3)}`, 4, canvas.height - 4);
  marker(ctx, point, canvas.width, canvas.height);
}

function marker(ctx, point, W, H) {
  if (!point) return;
  const x = point[1] * W, y = point[0] * H;
  ctx.strokeStyle = "#f0f";
  ctx.lineWidth = 2;
  ctx.beginPath();
  ctx.arc(x, y, 7, 0, 2 * Math.PI);
  ctx.moveTo(x - 12, y); ctx.lineTo(x + 12, y);
  ctx.moveTo(x, y - 12); ctx.lineTo(x, y + 12);
  ctx.stroke();
  ctx.lineWidth = 1;
}

function drawLines(canvas, series, colours, band) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = 30;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, W, H);
  const n = Math.max(1, ...series.map((s) => s.length));
  const all = series.flat().filter((x) => x !== null && isFinite(x));
  if (!all.length) return;
  let lo = Math.min(...all), hi = Math.max(...all);
  if (hi === lo) { hi += 1; lo -= 1; }
  const X = (i) => pad + (i / Math.max(1, n - 1)) * (W - pad - 5);
  const Y = (v) => H - 15 - ((v - lo) / (hi - lo)) * (H - 25);
  if (band) {
    ctx.fillStyle = "rgba(0,160,0,0.25)";
    band.forEach((ok, i) => { if (ok) ctx.fillRect(X(i) - 1, H - 12, Math.max(2, (W - pad) / n), 10); });
  }
  ctx.strokeStyle = "#aaa";
  ctx.beginPath(); ctx.moveTo(pad, Y(0 < lo ? lo : 0 > hi ? hi : 0)); ctx.lineTo(W - 5, Y(0 < lo ? lo : 0 > hi ? hi : 0)); ctx.stroke();
  series.forEach((s, k) => {
    ctx.strokeStyle = colours[k];
    ctx.beginPath();
    s.forEach((v, i) => (i ? ctx.lineTo(X(i), Y(v)) : ctx.moveTo(X(i), Y(v))));
    ctx.stroke();
  });
  ctx.fillStyle = "#000";
  ctx.font = "11px sans-serif";
  ctx.fillText(hi.toPrecision(3), 2, 12);
  ctx.fillText(lo.toPrecision(3), 2, H - 16);
}

function render(s) {
  last = s;
  $("title").textContent = `${s.agent} on ${s.env_id} via ${s.driver}`;
  $("episode").textContent = `${s.episode + 1}/${s.episodes}`;
  $("step").textContent = s.episode_step;
  $("runstep").textContent = s.step;
  $("return").textContent = Number(s.return).toFixed(4);
  const st = $("status");
  st.textContent = s.error ? "error: " + s.error : s.done ? "finished" : s.paused ? "paused" : "running";
  st.className = "status " + (s.error ? "error" : s.done ? "done" : s.paused ? "paused" : "");
  $("proposed").textContent = s.proposed === null ? "-" : JSON.stringify(s.proposed);
  const frames = s.frames || [];
  if (frames.length) {
    $("frame-key").textContent = frames[0].key;
    if ($("frame").src !== frames[0].png) $("frame").src = frames[0].png;
  }
  const extra_ = $("frames-extra");
  frames.slice(1).forEach((f, i) => {
    let box = extra_.children[i];
    if (!box) {
      box = document.createElement("div");
      box.append(document.createElement("img"), document.createElement("div"));
      extra_.append(box);
    }
    box.children[1].textContent = f.key;
    if (box.children[0].src !== f.png) box.children[0].src = f.png;
  });
  const ins = s.insight || {};
  const ov = $("overlay"), octx = ov.getContext("2d");
  octx.clearRect(0, 0, ov.width, ov.height);
  marker(octx, s.done ? null : ins.point, ov.width, ov.height);
  drawMap($("map-mean"), ins.maps, "mean", ins.point);
  drawMap($("map-sd"), ins.maps, "sd", ins.point);
  drawMap($("map-acq"), ins.maps, "acquisition", ins.point);
  const c = s.curve || [];
  drawLines($("curves"), [c.map((p) => p.reward), c.map((p) => p.return)], ["#27c", "#000"], c.map((p) => p.success));
  const keys = [...new Set(c.flatMap((p) => Object.keys(p.budget || {})))];
  $("budget-keys").textContent = keys.length ? keys.join(", ") : "none reported";
  const pal = ["#c50", "#07a", "#a0a", "#080"];
  drawLines($("budget"), keys.map((k) => c.map((p) => (p.budget || {})[k] ?? null)), keys.map((_, i) => pal[i % 4]));
  const extra = { controls: ins.controls };
  if (ins.value !== undefined && ins.value !== null) extra.value = ins.value;
  if (ins.action_probs && ins.action_probs.length) extra.action_probs = ins.action_probs;
  if (ins.scatter && ins.scatter.length) extra.embedding_points = ins.scatter.length;
  extra.episode_returns = s.returns;
  $("agent-extra").textContent = JSON.stringify(extra, null, 1);
  const ctl = ins.controls || {};
  if (document.activeElement !== $("acq") && ctl.acquisition) $("acq").value = ctl.acquisition;
  $("audit").textContent = (s.audit_tail || []).join("\n");
  $("interventions").textContent = (s.interventions || []).map((i) => `step ${i.step}: ${i.kind} ${JSON.stringify(i.value)}`).join("\n");
  $("info").textContent = JSON.stringify(s.info);
}

function connect() {
  const es = new EventSource("/api/events");
  es.onmessage = (e) => render(JSON.parse(e.data));
  es.onerror = () => {
    es.close();
    // The stream ends with the run; fetch the final state, then look again later.
    fetch("/api/state").then((r) => r.json()).then(render).catch(() => {});
    if (!last || !last.done) setTimeout(connect, 1000);
  };
}

$("pause").onclick = () => post("/api/pause");
$("resume").onclick = () => post("/api/resume");
$("veto").onclick = () => post("/api/veto");
$("set-acq").onclick = () => post("/api/control", { name: "acquisition", value: $("acq").value });
$("set-beta").onclick = () => post("/api/control", { name: "beta", value: Number($("beta").value) });
$("set-xi").onclick = () => post("/api/control", { name: "xi", value: Number($("xi").value) });
$("off-limits").onclick = () =>
  post("/api/off_limits", {
    rows: [Number($("r0").value), Number($("r1").value)],
    cols: [Number($("c0").value), Number($("c1").value)],
  });
connect();
