// segnode dashboard: everything shown comes from the node's REST API; refreshed every 2 s.
"use strict";
const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "onclick") node.onclick = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options,
    headers: { "X-Segnode-Request": "1", ...(options.headers || {}) } });
  if (response.status === 401) { showSignIn(); throw new Error("sign in needed"); }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response.status === 204 ? null : response.json();
}

function showSignIn() { $("signin").hidden = false; $("main").hidden = true; $("signout").hidden = true; }

$("signout").addEventListener("click", async () => {
  await fetch("/api/session", { method: "DELETE", credentials: "same-origin", headers: { "X-Segnode-Request": "1" } });
  showSignIn();
});

function more(id, shown, total, what) {
  $(id).hidden = total <= shown;
  $(id).textContent = `${shown} of ${total} ${what} shown (the most recent); the CLI and /api list them all.`;
}

$("signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  const response = await fetch("/api/session", { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token: $("token").value }) });
  if (response.ok) { $("signin").hidden = true; $("signin-error").textContent = ""; refresh(); checkAudit(); }
  else $("signin-error").textContent = "wrong token";
});

function jobLabel(job) {
  return job.kind === "deliver" ? `deliver → ${job.destination}` : `${job.model} ${job.model_version}`;
}

function jobRow(job) {
  return el("tr", { "data-job": job.id },
    el("td", {}, `#${job.id}`), el("td", {}, jobLabel(job)),
    el("td", { class: `state state-${job.state}`, "data-state": job.state }, job.state),
    el("td", {}, `${job.attempts}/${job.max_attempts}`),
    el("td", { class: "muted" }, job.last_error || (job.output ? `→ ${job.output}` : "")));
}

function show(title, lines) {
  $("detail").hidden = false;
  $("detail-title").textContent = title;
  $("detail-body").textContent = lines.join("\n");
  $("detail").scrollIntoView({ block: "nearest" });
}

async function trace(study) {
  try { show(`Lineage of study ${study}`, (await api(`/api/studies/${study}/trace`)).lines); }
  catch (e) { show(`Lineage of study ${study}`, [String(e.message)]); }
}

async function explain(series) {
  try {
    const answer = await api(`/api/series/${series}/explain`);
    show(`Rules for series ${series}`, [`rules sha256 ${answer.ruleset_sha256.slice(0, 16)}… (routed with ` +
      `${(answer.decided_with_ruleset_sha256 || "none yet").slice(0, 16)}…)`, ...answer.lines]);
  } catch (e) { show(`Rules for series ${series}`, [String(e.message)]); }
}

async function retry(jobId, button) {
  button.disabled = true;
  try { await api(`/api/jobs/${jobId}/retry`, { method: "POST" }); await refresh(); }
  catch (e) { button.disabled = false; show(`Retry of job ${jobId}`, [String(e.message)]); }
}

function renderStudies(data) {
  const box = $("studies");
  box.replaceChildren();
  $("studies-empty").hidden = data.studies.length > 0;
  for (const study of data.studies) {
    const head = el("div", { class: "study-head" }, el("strong", {}, "Study"),
      el("span", { class: "uid" }, study.study_uid),
      el("button", { onclick: () => trace(study.study_uid) }, "Lineage"));
    if (data.viewer_url) {
      head.append(el("a", { href: data.viewer_url.replace("{study_uid}", encodeURIComponent(study.study_uid)),
        target: "_blank", rel: "noopener" }, "Open in viewer"));
    }
    const table = el("table", {}, el("thead", {}, el("tr", {}, ...["series", "modality", "instances", "state",
      "jobs", ""].map((h) => el("th", {}, h)))));
    const body = el("tbody");
    for (const series of study.series) {
      const jobs = el("table", { class: "jobs" }, el("tbody", {}, ...series.jobs.map(jobRow)));
      body.append(el("tr", { "data-series": series.series_uid },
        el("td", { class: "uid" }, series.series_uid), el("td", {}, series.modality || ""),
        el("td", {}, series.instances), el("td", { class: "state" }, series.state),
        el("td", {}, series.jobs.length ? jobs : el("span", { class: "muted" }, "none")),
        el("td", {}, el("button", { onclick: () => explain(series.series_uid) }, "Rules"))));
    }
    table.append(body);
    box.append(el("div", { class: "study", "data-study": study.study_uid }, head, table));
  }
}

function renderDead(dead) {
  $("dead-empty").hidden = dead.length > 0;
  $("dead").hidden = dead.length === 0;
  $("dead").tBodies[0].replaceChildren(...dead.map((job) => {
    const button = el("button", {}, "Retry");
    button.onclick = () => retry(job.id, button);
    return el("tr", { "data-job": job.id }, el("td", {}, `#${job.id}`), el("td", {}, jobLabel(job)),
      el("td", { class: "uid" }, job.series_uid), el("td", {}, `${job.attempts}/${job.max_attempts}`),
      el("td", { class: "error" }, job.last_error), el("td", {}, button));
  }));
}

async function refresh() {
  try {
    const data = await api("/api/overview");
    $("main").hidden = false;
    $("signout").hidden = !data.token_required;
    renderDead(data.dead);
    more("dead-more", data.dead.length, data.dead_total, "dead jobs");
    renderStudies(data);
    more("studies-more", data.studies.length, data.studies_total, "studies");
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    $("updated").textContent = `not updated: ${e.message}`;
  }
}

async function checkAudit() {
  try {
    const result = await api("/api/audit/verify");
    $("audit").textContent = result.ok ? `audit chain intact (${result.count} events)` :
      `audit chain BROKEN: ${result.problems.slice(0, 3).join("; ")}`;
    $("audit").className = result.ok ? "audit audit-ok" : "audit audit-broken";
  } catch (e) { $("audit").textContent = `audit: ${e.message}`; }
}

refresh();
checkAudit();
setInterval(refresh, REFRESH_MS);
setInterval(checkAudit, 30 * REFRESH_MS);
