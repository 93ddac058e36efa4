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
    let up = true; // a missing value breaks the line
    s.forEach((v, i) => {
      if (v === null || v === undefined || !isFinite(v)) { up = true; return; }
      if (up) ctx.moveTo(X(i), Y(v)); else ctx.lineTo(X(i), Y(v));
      up = false;
    });
    ctx.stroke();
  });
  ctx.fillStyle = "#000";
  ctx.font = "11px sans-serif";
  ctx.fillText(hi.toPrecision(3), 2, 12);
  ctx.fillText(lo.toPrecision(3), 2, H - 16);
}

function range(v) {
  let lo = Math.min(...v), hi = Math.max(...v);
  if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
  const m = 0.05 * (hi - lo);
  return [lo - m, hi + m];
}

// The embedding scatter: [e0, e1, measured value] rows, coloured by value, with a colour bar.
function drawScatter(canvas, pts, axes) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, W, H);
  if (!pts.length) return;
  const L = 40, R = W - 62, T = 10, B = H - 32;
  const [x0, x1] = range(pts.map((p) => p[0])), [y0, y1] = range(pts.map((p) => p[1]));
  const vals = pts.map((p) => p[2]);
  const vlo = Math.min(...vals), vhi = Math.max(...vals);
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (R - L);
  const Y = (y) => B - ((y - y0) / (y1 - y0)) * (B - T);
  ctx.strokeStyle = "#999";
  ctx.strokeRect(L, T, R - L, B - T);
  for (const p of pts) {
    const [r, g, b] = colour(vhi > vlo ? (p[2] - vlo) / (vhi - vlo) : 0.5);
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.beginPath();
    ctx.arc(X(p[0]), Y(p[1]), 4, 0, 2 * Math.PI);
    ctx.fill();
    ctx.strokeStyle = "rgba(0,0,0,0.5)";
    ctx.stroke();
  }
  // Colour bar: measured value, low (bottom) to high (top), labelled at both ends.
  const cx = R + 6;
  for (let i = 0; i < B - T; i++) {
    const [r, g, b] = colour(1 - i / (B - T));
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(cx, T + i, 10, 1);
  }
  ctx.fillStyle = "#000";
  ctx.font = "11px sans-serif";
  ctx.fillText(vhi.toPrecision(3), cx + 13, T + 9);
  ctx.fillText(vlo.toPrecision(3), cx + 13, B);
  ctx.fillText(x0.toPrecision(3), L, B + 12);
  ctx.textAlign = "right";
  ctx.fillText(x1.toPrecision(3), R, B + 12);
  ctx.fillText(y1.toPrecision(3), L - 2, T + 10);
  ctx.fillText(y0.toPrecision(3), L - 2, B);
  ctx.textAlign = "center";
  ctx.fillText(axes[0] || "e0", (L + R) / 2, H - 6);
  ctx.save();
  ctx.translate(12, (T + B) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.fillText(axes[1] || "e1", 0, 0);
  ctx.restore();
  ctx.textAlign = "left";
}

// The policy: a bar per action (Discrete probabilities), or per component the Gaussian's mean
// ± sd inside the action bounds (Box).
function drawActions(canvas, ins) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, W, H);
  ctx.font = "11px sans-serif";
  const p = ins.action_probs || [], mean = ins.action_mean || [];
  if (p.length) {
    const L = 34, R = W - 6, T = 8, B = H - 20, n = p.length;
    const top = Math.max(...p), best = p.indexOf(top);
    const w = (R - L) / n;
    p.forEach((v, i) => {
      ctx.fillStyle = i === best ? "#e70" : "#27c";
      const h = (v / top) * (B - T);
      ctx.fillRect(L + i * w + (w > 4 ? 1 : 0), B - h, Math.max(1, w - (w > 4 ? 2 : 0)), h);
      if (n <= 24) {
        ctx.fillStyle = "#000";
        ctx.textAlign = "center";
        ctx.fillText(String(i), L + (i + 0.5) * w, H - 6);
      }
    });
    ctx.textAlign = "right";
    ctx.fillStyle = "#000";
    ctx.fillText(top.toPrecision(3), L - 2, T + 8);
    ctx.fillText("0", L - 2, B);
    ctx.textAlign = "left";
    return;
  }
  if (!mean.length) return;
  const sd = ins.action_sd || [], bounds = ins.action_bounds || [];
  const L = 34, R = W - 8, d = mean.length, rowH = Math.min(40, (H - 10) / d);
  mean.forEach((m, i) => {
    const s = sd[i] ?? 0;
    const [blo, bhi] = bounds[i] || [m - 2 * s - 1, m + 2 * s + 1];
    const lo = Math.min(blo, m - s), hi = Math.max(bhi, m + s);
    const X = (x) => L + ((x - lo) / (hi - lo || 1)) * (R - L);
    const y = 6 + i * rowH, h = rowH - 14;
    ctx.fillStyle = "#e4e4e4";
    ctx.fillRect(X(blo), y, X(bhi) - X(blo), h);
    ctx.fillStyle = "rgba(34,119,204,0.5)";
    ctx.fillRect(X(m - s), y + 2, X(m + s) - X(m - s), h - 4);
    ctx.fillStyle = "#000";
    ctx.fillRect(X(Math.min(bhi, Math.max(blo, m))) - 1, y - 1, 3, h + 2);
    ctx.fillText(`a${i}`, 4, y + h - 2);
    ctx.fillText(`${m.toPrecision(3)} ± ${s.toPrecision(2)}  [${blo}, ${bhi}]`, L, y + h + 11);
  });
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
  for (const f of ["fig-mean", "fig-sd", "fig-acq"]) $(f).hidden = !ins.maps;
  drawMap($("map-mean"), ins.maps, "mean", ins.point);
  drawMap($("map-sd"), ins.maps, "sd", ins.point);
  drawMap($("map-acq"), ins.maps, "acquisition", ins.point);
  const c = s.curve || [];
  drawLines($("curves"), [c.map((p) => p.reward), c.map((p) => p.return)], ["#27c", "#000"], c.map((p) => p.success));
  const keys = [...new Set(c.flatMap((p) => Object.keys(p.budget || {})))];
  $("budget-keys").textContent = keys.length ? keys.join(", ") : "none reported";
  const pal = ["#c50", "#07a", "#a0a", "#080"];
  drawLines($("budget"), keys.map((k) => c.map((p) => (p.budget || {})[k] ?? null)), keys.map((_, i) => pal[i % 4]));
  const scatter = ins.scatter || [];
  $("fig-scatter").hidden = !scatter.length;
  $("scatter-axes").textContent = (ins.scatter_axes || []).join(", ") || "-";
  drawScatter($("scatter"), scatter, ins.scatter_axes || []);
  const probs = ins.action_probs || [], means = ins.action_mean || [];
  $("fig-actions").hidden = !(probs.length || means.length);
  $("actions-kind").textContent = probs.length
    ? `action probabilities (orange: the most probable of ${probs.length})`
    : "Gaussian mean ± sd per action component, in the bounds (grey)";
  drawActions($("actions"), ins);
  const values = c.map((p) => p.value ?? null);
  const hasValue = values.some((v) => v !== null) || (ins.value !== undefined && ins.value !== null);
  $("fig-value").hidden = !hasValue;
  $("value-now").textContent = ins.value === undefined || ins.value === null ? "-" : Number(ins.value).toPrecision(4);
  if (hasValue) drawLines($("value-curve"), [values], ["#a0a"]);
  const extra = { controls: ins.controls };
  if (ins.value !== undefined && ins.value !== null) extra.value = ins.value;
  if (scatter.length) extra.embedding_points = scatter.length;
  extra.episode_returns = s.returns;
  $("agent-extra").textContent = JSON.stringify(extra, null, 1);
  const ctl = ins.controls || {};
  // Only agents with acquisition settings (BO, DKL) show and take them.
  $("acq-controls").hidden = ctl.acquisition === undefined;
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
