/* anymc3d serve: the web viewer. Upload a volume to v1/predict, show each task's probabilities and
   decision, and the volume with the chosen task's heatmap (NiiVue, vendored) beside its slice-weight
   curve; a click on the curve moves the viewer to that slice. No network access beyond this service. */
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { nv: null, webgl: false, result: null, task: null, label: null, view: "all", authRequired: false };
  window.anymc3dViewer = state; // for tests and debugging

  function setStatus(text, kind) {
    $("status").textContent = text;
    $("status").dataset.kind = kind || "";
  }
  function headers() {
    const t = $("token").value.trim();
    return t ? { Authorization: "Bearer " + t } : {};
  }
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const k of kids) e.append(k);
    return e;
  }

  // ---- start-up ---------------------------------------------------------------------------------
  async function start() {
    const t = sessionStorage.getItem("anymc3d-token");
    if (t) $("token").value = t;
    $("token-box").addEventListener("submit", (e) => e.preventDefault()); // no inline handlers: the CSP forbids them
    $("token").addEventListener("change", () => { sessionStorage.setItem("anymc3d-token", $("token").value); loadPlugins(); });
    try {
      const h = await (await fetch("healthz")).json();
      state.authRequired = h.auth_required;
      $("service").textContent = "serve " + h.version + " · " + h.tasks + " task(s)";
      $("token-box").hidden = !h.auth_required;
    } catch (e) { setStatus("service not reachable: " + e, "error"); return; }
    await initViewer();
    await loadPlugins();
    wireInput();
    document.body.dataset.state = "ready";
  }

  async function loadPlugins() {
    const r = await fetch("v1/plugins", { headers: headers() });
    if (!r.ok) { setStatus((await r.json()).detail + (r.status === 401 ? " — enter the token above" : ""), "error"); return; }
    const d = await r.json();
    const picks = $("task-picks");
    picks.textContent = "tasks: ";
    for (const p of d.plugins) {
      picks.append(el("label", {}, el("input", { type: "checkbox", value: p.task, checked: "", class: "task-pick" }), " " + p.task + " "));
    }
    setStatus("backbone " + d.backbone + " · drop a volume");
  }

  async function initViewer() {
    try {
      const nv = new niivue.Niivue({ backColor: [0, 0, 0, 1], show3Dcrosshair: false, dragAndDropEnabled: false,
                                     isResizeCanvas: true, crosshairColor: [0.2, 0.8, 1, 1] });
      await nv.attachToCanvas($("nv"));
      nv.setSliceType(nv.sliceTypeMultiplanar);
      nv.onLocationChange = (loc) => { $("location").textContent = loc && loc.string ? loc.string : ""; };
      state.nv = nv;
      state.webgl = true;
    } catch (e) {
      state.webgl = false;
      $("nv").hidden = true;
      $("fallback").hidden = false;
      console.warn("NiiVue unavailable (" + e + "): showing the PNG figure instead");
    }
  }

  // ---- upload ----------------------------------------------------------------------------------
  function wireInput() {
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault(); drop.classList.remove("over");
      if (e.dataTransfer.files.length) predict(e.dataTransfer.files[0]);
    });
    $("file").addEventListener("change", () => { if ($("file").files.length) predict($("file").files[0]); });
    for (const b of document.querySelectorAll("#views button")) b.addEventListener("click", () => setView(b.dataset.view));
    $("opacity").addEventListener("input", applyOpacity);
    $("label").addEventListener("change", () => { state.label = $("label").value; showOverlay(); });
    $("curve").addEventListener("click", curveClick);
  }

  async function predict(file) {
    document.body.dataset.state = "predicting";
    setStatus("predicting " + file.name + " …");
    const form = new FormData();
    form.append("file", file, file.name);
    const params = new URLSearchParams();
    const picked = [...document.querySelectorAll(".task-pick")].filter((c) => c.checked).map((c) => c.value);
    const all = document.querySelectorAll(".task-pick").length;
    if (picked.length && picked.length < all) params.set("tasks", picked.join(","));
    if ($("heatmaps").checked) params.set("heatmaps", "true");
    const t0 = performance.now();
    let r;
    try { r = await fetch("v1/predict?" + params, { method: "POST", body: form, headers: headers() }); }
    catch (e) { setStatus("request failed: " + e, "error"); document.body.dataset.state = "error"; return; }
    const body = await r.json().catch(() => ({ detail: r.statusText }));
    if (!r.ok) {
      const retry = r.headers.get("Retry-After");
      setStatus("error " + r.status + ": " + body.detail + (retry ? " (retry in " + retry + " s)" : ""), "error");
      document.body.dataset.state = "error";
      return;
    }
    state.result = body;
    setStatus(file.name + ": " + Object.keys(body.tasks).length + " task(s) in " + ((performance.now() - t0) / 1000).toFixed(2) + " s");
    showTable();
    if (body.heatmaps) {
      const first = Object.keys(body.heatmaps)[0];
      if (first) await selectTask(first);
    } else {
      $("viewer-box").hidden = true;
    }
    document.body.dataset.state = "done";
  }

  // ---- results ---------------------------------------------------------------------------------
  function showTable() {
    const res = state.result, tb = document.querySelector("#results tbody");
    tb.textContent = "";
    $("case").textContent = res.id;
    for (const [name, t] of Object.entries(res.tasks)) {
      const probs = el("td", { class: "probs" });
      for (const [lab, p] of Object.entries(t.probabilities)) {
        const bar = el("span", { class: "bar" }); bar.style.width = Math.round(60 * p) + "px";
        probs.append(el("span", { class: "prob", "data-label": lab, text: lab + " " + p.toFixed(3) }, bar));
      }
      const positive = t.task_type === "binary" ? t.predicted[0] === Object.keys(t.probabilities)[1] : t.predicted.length > 0;
      const hm = res.heatmaps && res.heatmaps[name];
      const files = el("td", {});
      if (hm) for (const [lab, f] of Object.entries(hm.labels)) {
        files.append(el("a", { href: "#", "data-url": f.png, class: "dl", text: lab + ".png" }), " ",
                     el("a", { href: "#", "data-url": f.nifti, class: "dl", text: lab + ".nii.gz" }), " ");
      }
      const radio = el("input", { type: "radio", name: "show", value: name });
      if (!hm) radio.disabled = true;
      radio.addEventListener("change", () => selectTask(name));
      const missing = t.views_missing && t.views_missing.length ? " (missing: " + t.views_missing.join(", ") + ")" : "";
      // the conformal set at its coverage and the out-of-distribution flag, beside the (calibrated) probability
      const ps = t.prediction_set;
      const pset = el("td", { class: "pset", text: ps ? "{" + ps.labels.join(", ") + "} at " + Math.round(100 * ps.coverage) + "%" : "n/a" });
      const o = t.ood;
      const ood = el("td", { class: "ood" + (o && o.flag ? " flagged" : ""),
        text: o ? (o.flag ? "OUT OF DISTRIBUTION" : "ok") + " (score " + o.score.toPrecision(3) + ", " + Math.round(o.percentile) + "th pct)" : "n/a" });
      if (t.trust_note) { pset.title = t.trust_note; ood.title = t.trust_note; }
      tb.append(el("tr", { "data-task": name }, el("td", {}, radio), el("td", { text: name + missing }),
        el("td", { class: "decision" + (positive ? " pos" : ""), text: t.predicted.join(", ") || "–" }), probs,
        el("td", { class: "threshold", text: t.task_type === "multiclass" ? "arg-max" : String(+t.threshold.toFixed(4)) }), pset, ood, files));
    }
    for (const a of document.querySelectorAll("a.dl")) a.addEventListener("click", download);
    $("failed").textContent = (res.tasks_failed || []).map((f) => f.name + ": not run (" + f.reason + ")").join("; ");
    $("results-box").hidden = false;
  }

  async function download(e) {  // with the token header, so links work when the service needs one
    e.preventDefault();
    const url = e.target.dataset.url;
    const r = await fetch(url, { headers: headers() });
    if (!r.ok) { setStatus("download failed: " + (await r.json()).detail, "error"); return; }
    const a = el("a", { href: URL.createObjectURL(await r.blob()), download: url.split("/").pop() });
    document.body.append(a); a.click(); a.remove();
  }

  async function selectTask(name) {
    state.task = name;
    const radio = document.querySelector('input[name=show][value="' + name + '"]');
    if (radio) radio.checked = true;
    const labels = Object.keys(state.result.heatmaps[name].labels);
    const sel = $("label");
    sel.textContent = "";
    for (const l of labels) sel.append(el("option", { value: l, text: l }));
    state.label = labels[0];
    $("viewer-box").hidden = false;
    await showOverlay();
  }

  // ---- viewer ----------------------------------------------------------------------------------
  async function showOverlay() {
    const hm = state.result.heatmaps[state.task], f = hm.labels[state.label];
    document.body.dataset.overlay = "loading";
    if (state.webgl) {
      const nv = state.nv;
      while (nv.volumes.length) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
      await nv.loadVolumes([
        { url: state.result.result.image, name: "image.nii.gz", headers: headers() },
        { url: f.nifti, name: "heatmap.nii.gz", headers: headers(), colormap: "warm", cal_min: 0.05, cal_max: 1,
          opacity: $("opacity").value / 100 },
      ]);
      applyOpacity();
    } else {
      const r = await fetch(f.png, { headers: headers() });
      $("fallback").src = URL.createObjectURL(await r.blob());
    }
    drawCurve();
    document.body.dataset.overlay = "loaded";
  }

  function applyOpacity() {
    if (state.webgl && state.nv.volumes.length > 1) { state.nv.setOpacity(1, $("opacity").value / 100); state.nv.drawScene(); }
  }

  const SLICE_TYPES = { axial: 0, coronal: 1, sagittal: 2, all: 3 };
  function setView(view) {
    state.view = view;
    for (const b of document.querySelectorAll("#views button")) b.classList.toggle("on", b.dataset.view === view);
    if (state.webgl) state.nv.setSliceType(SLICE_TYPES[view]);
    drawCurve();
  }

  // ---- slice-weight curve ----------------------------------------------------------------------
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
  function curveStreams() {
    const hm = state.result.heatmaps[state.task];
    const weights = hm.labels[state.label].slice_weights;
    let streams = Object.keys(weights).filter((s) => hm.slice_positions_mm[s]);
    if (state.view !== "all") {
      const own = streams.filter((s) => s.endsWith(":" + state.view));
      if (own.length) streams = own;
    }
    return streams.map((s) => ({ stream: s, w: weights[s], pos: hm.slice_positions_mm[s] }));
  }
  const PAD = { l: 36, r: 8, t: 8, b: 24 };
  function drawCurve() {
    const c = $("curve"), g = c.getContext("2d"), W = c.width, H = c.height;
    g.clearRect(0, 0, W, H);
    if (!state.task) return;
    const rows = curveStreams();
    const n = Math.max(...rows.map((r) => r.w.length));
    const hi = Math.max(...rows.map((r) => Math.max(...r.w))), lo0 = Math.min(...rows.map((r) => Math.min(...r.w)));
    // y from just under the smallest weight to the largest: near-uniform weights still show their shape
    const bottom = Math.max(0, lo0 - 0.1 * (hi - lo0 || hi || 1)), top = hi > bottom ? hi : bottom + 1;
    const x = (i, len) => PAD.l + (len > 1 ? i / (len - 1) : 0.5) * (W - PAD.l - PAD.r);
    const y = (v) => H - PAD.b - ((v - bottom) / (top - bottom)) * (H - PAD.t - PAD.b);
    g.strokeStyle = "#999"; g.beginPath(); g.moveTo(PAD.l, PAD.t); g.lineTo(PAD.l, H - PAD.b); g.lineTo(W - PAD.r, H - PAD.b); g.stroke();
    g.fillStyle = "#555"; g.font = "10px sans-serif";
    g.fillText(top.toPrecision(4), 2, PAD.t + 8); g.fillText(bottom.toPrecision(4), 2, H - PAD.b);
    g.fillText("slice 0", PAD.l, H - 8); g.fillText(String(n - 1), W - PAD.r - 14, H - 8);
    rows.forEach((r, k) => {
      g.strokeStyle = COLORS[k % COLORS.length]; g.lineWidth = 1.5; g.beginPath();
      r.w.forEach((v, i) => (i ? g.lineTo(x(i, r.w.length), y(v)) : g.moveTo(x(i, r.w.length), y(v))));
      g.stroke();
      if (state.picked && state.picked.stream === r.stream) {
        g.strokeStyle = "#d00"; g.setLineDash([3, 3]); g.beginPath();
        g.moveTo(x(state.picked.index, r.w.length), PAD.t); g.lineTo(x(state.picked.index, r.w.length), H - PAD.b); g.stroke(); g.setLineDash([]);
      }
    });
    const legend = $("curve-legend");
    legend.textContent = "";
    rows.forEach((r, k) => { const s = el("span", { text: "■ " + r.stream + "  " }); s.style.color = COLORS[k % COLORS.length]; legend.append(s); });
  }

  function curveClick(e) {
    if (!state.task) return;
    const c = $("curve"), rect = c.getBoundingClientRect();
    const px = (e.clientX - rect.left) * (c.width / rect.width);
    const rows = curveStreams(), r = rows[0];
    const frac = Math.min(1, Math.max(0, (px - PAD.l) / (c.width - PAD.l - PAD.r)));
    const index = Math.round(frac * (r.w.length - 1));
    goToSlice(r.stream, index);
  }

  function goToSlice(stream, index) {
    const hm = state.result.heatmaps[state.task], mm = hm.slice_positions_mm[stream][index];
    const view = stream.split(":")[1];
    state.picked = { stream, index, mm };
    if (state.webgl) {
      const nv = state.nv;
      nv.scene.crosshairPos = nv.mm2frac(mm);
      if (state.view !== "all") setView(view);
      nv.updateGLVolume();
      nv.drawScene();
    }
    drawCurve();
    $("location").textContent = stream + " slice " + index + " at [" + mm.map((v) => v.toFixed(1)).join(", ") + "] mm";
  }
  state.goToSlice = goToSlice;

  start();
})();
