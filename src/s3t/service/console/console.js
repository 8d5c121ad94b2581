// The s3t operator console: a thin client of the service's JSON API (same origin, the token's roles).
// The token lives in this closure only (never in storage or cookies). Every value from the API is put
// into the page as text (textContent), never as HTML, so a record id or a note cannot inject markup.
"use strict";
(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const POLL_MS = 5000;
  let token = null;
  let roles = [];
  let timer = null;
  let slices = null;   // layer groups of a full-depth model, from the last detailed status

  const $ = (id) => document.getElementById(id);
  const can = (role) => roles.includes("admin") || roles.includes(role);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function fmt(x, digits = 0) {
    if (x === null || x === undefined) return "–";
    return Number(x).toLocaleString("en", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
  }

  function when(iso) {
    return iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", " UTC") : "–";
  }

  // -- messages and the API ----------------------------------------------------------------------
  function say(text, kind = "error") {
    const box = $("message");
    box.textContent = text;
    box.className = kind === "info" ? "info" : "";
    box.hidden = !text;
  }

  function describe(data, status) {
    if (data && typeof data.detail === "string") return `${data.error || "Error"}: ${data.detail}`;
    if (data && Array.isArray(data.detail)) return "Invalid input: " + data.detail.map((e) => e.msg).join("; ");
    return `HTTP ${status}`;
  }

  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + token, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, cache: "no-store", credentials: "omit",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await response.json(); } catch (_) { /* an empty or non-JSON body */ }
    if (!response.ok) {
      const error = new Error(describe(data, response.status));
      error.status = response.status;
      if (response.status === 401) signOut(error.message);
      throw error;
    }
    return data;
  }

  // -- sign in and out -----------------------------------------------------------------------------
  async function signIn(event) {
    event.preventDefault();
    const input = $("token");
    token = input.value.trim();
    input.value = "";   // not left in the form either
    try {
      const me = await api("GET", "/v1/whoami");
      roles = me.roles;
      $("who-name").textContent = `${me.name} (${roles.join(", ")})`;
    } catch (error) {
      token = null;
      say(error.message);
      return;
    }
    say("");
    $("login").hidden = true;
    $("who").hidden = false;
    $("tabs").hidden = false;
    for (const node of document.querySelectorAll("[data-needs]")) node.hidden = !can(node.dataset.needs);
    show("overview");
  }

  function signOut(reason) {
    token = null;
    roles = [];
    clearInterval(timer);
    timer = null;
    for (const id of ["overview", "review", "receipts", "audit", "tabs", "who"]) $(id).hidden = true;
    $("login").hidden = false;
    say(typeof reason === "string" ? reason : "");
  }

  function show(tab) {
    for (const button of document.querySelectorAll("#tabs button")) {
      button.classList.toggle("active", button.dataset.tab === tab);
    }
    for (const name of ["overview", "review", "receipts", "audit"]) $(name).hidden = name !== tab;
    clearInterval(timer);
    timer = null;
    if (tab === "overview") {
      loadOverview();
      timer = setInterval(loadOverview, POLL_MS);   // the state changes under deletions and restores
    } else if (tab === "review") {
      loadReview();
    } else if (tab === "receipts") {
      loadReceipts();
    }
  }

  // -- overview ------------------------------------------------------------------------------------
  function card(label, value, sub, kind) {
    return el("div", { class: "card" + (kind ? " " + kind : "") },
      el("div", { class: "label" }, label), el("div", { class: "value" }, value),
      sub ? el("div", { class: "sub" }, sub) : null);
  }

  async function loadOverview() {
    if (!token) return;
    let status, capacity = null;
    try {
      status = await api("GET", "/v1/status");
      if (can("metrics")) capacity = await api("GET", "/v1/capacity");
    } catch (error) {
      say(error.message);
      return;
    }
    renderSummary(status);
    renderShards(status, capacity);
    renderCapacity(status, capacity);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  function renderSummary(st) {
    const cards = [
      card("Served set", "v" + st.served_version, st.serving ? "serving" : "not serving", st.serving ? "" : "bad"),
      card("Live shards", `${st.live_shards} / ${st.shards_total}`, st.model_loaded ? "model loaded" : "model not loaded",
        st.live_shards < st.shards_total ? "warn" : ""),
    ];
    if (st.shards) {
      const restoration = st.restoration || {};
      const runs = restoration.runs || {};
      const latency = st.deletion_latency || {};
      cards.push(
        card("Live records", fmt(st.live_records), `${fmt(st.deleted_records)} deleted`),
        card("Truncated orders", fmt(st.truncated_orders), "what a restore retrains", st.truncated_orders ? "warn" : ""),
        card("Restoration", restoration.state || "–",
          `${fmt(runs.completed)} completed, ${fmt(runs.failed)} failed` + (restoration.requested ? ", requested" : "")),
        card("Held requests", fmt(st.held_requests), "waiting for an admin", st.held_requests ? "warn" : ""),
        card("Deletion latency", latency.count ? fmt(latency.median_ms, 1) + " ms" : "–",
          latency.count ? `median of the last ${latency.count}; last ${fmt(latency.last_ms, 1)} ms` : "none since start"),
        card("Worst case left", fmt(st.capacity_left), "aimed deletions to drop a shard", st.capacity_left <= 1 ? "bad" : ""),
      );
      $("held-badge").textContent = st.held_requests ? String(st.held_requests) : "";
    }
    $("summary").replaceChildren(...cards);
  }

  function segments(group, x, y, count, on, width, cls) {
    const gap = 2, w = Math.max(3, (width - gap * (count - 1)) / Math.max(count, 1));
    for (let i = 0; i < count; i++) {
      group.append(svg("rect", { x: x + i * (w + gap), y, width: w, height: 14, rx: 2,
        class: i < on ? cls : "seg-off" }));
    }
  }

  function renderShards(st, capacity) {
    const chart = $("shard-chart"), table = $("shard-table");
    if (!st.shards) {
      $("shards-note").textContent = "Per-shard depth and capacity need a metrics or admin token " +
        "(they tell an attacker where a deletion hurts most).";
      chart.replaceChildren();
      table.replaceChildren();
      return;
    }
    $("shards-note").textContent = "Served depth: layer groups in use by each shard's served model. Capacity: " +
      "fewest aimed deletions that take the shard out (one per live order's first slice); expected: random deletions.";
    slices = st.num_slices || slices;
    const L = slices || Math.max(1, ...st.shards.map((s) => s.served_depth));
    const B = Math.max(1, ...st.shards.map((s) => s.orders));
    const expected = new Map((capacity ? capacity.shards : []).map((s) => [s.shard, s.expected_to_drop]));
    const rowH = 24, top = 26, width = 760;
    const root = svg("svg", { width, height: top + rowH * st.shards.length + 6, role: "img",
      "aria-label": "served depth and capacity per shard" });
    root.append(svg("text", { x: 10, y: 17, class: "head" }, "shard"),
      svg("text", { x: 90, y: 17, class: "head" }, `served depth (of ${L})`),
      svg("text", { x: 360, y: 17, class: "head" }, `capacity left (of ${B} orders)`),
      svg("text", { x: 620, y: 17, class: "head" }, "expected"));
    st.shards.forEach((s, i) => {
      const y = top + i * rowH;
      const g = svg("g", { class: "shard" + (s.served_depth ? "" : " dead"), "data-shard": s.shard,
        "data-depth": s.served_depth });
      g.append(svg("title", {}, `shard ${s.shard}: depth ${s.served_depth}/${L}, ${s.live_orders} of ${s.orders} ` +
        `orders live, ${s.deletions_to_drop} aimed deletions to drop`));
      g.append(svg("text", { x: 10, y: y + 12, class: "name" }, `shard ${s.shard}` + (s.served_depth ? "" : " (out)")));
      segments(g, 90, y, L, s.served_depth, 200, "depth-on");
      g.append(svg("text", { x: 298, y: y + 12, class: "depth-label" }, `${s.served_depth}/${L}`));
      segments(g, 360, y, B, s.deletions_to_drop, 200, s.deletions_to_drop <= 1 ? "cap-low" : "cap-on");
      g.append(svg("text", { x: 568, y: y + 12 }, String(s.deletions_to_drop)));
      g.append(svg("text", { x: 620, y: y + 12 }, expected.has(s.shard) ? `≈ ${fmt(expected.get(s.shard))} deletions` : ""));
      root.append(g);
    });
    chart.replaceChildren(root);
    table.replaceChildren(
      el("tr", {}, el("th", {}, "shard"), el("th", { class: "num" }, "served depth"),
        el("th", { class: "num" }, "served order"), el("th", { class: "num" }, "live orders"),
        el("th", { class: "num" }, "worst case left"), el("th", { class: "num" }, "expected random deletions"),
        el("th", {}, "empty slices")),
      ...st.shards.map((s) => el("tr", { "data-shard": s.shard },
        el("td", {}, s.shard), el("td", { class: "num depth" }, s.served_depth),
        el("td", { class: "num" }, s.served_order === null ? "–" : s.served_order),
        el("td", { class: "num" }, `${s.live_orders} / ${s.orders}`),
        el("td", { class: "num" }, s.deletions_to_drop),
        el("td", { class: "num" }, expected.has(s.shard) ? fmt(expected.get(s.shard), 1) : "–"),
        el("td", {}, (s.empty_slices || []).join(", ") || "–"))));
  }

  function renderCapacity(st, capacity) {
    const box = $("capacity");
    if (!capacity) {
      box.replaceChildren(el("p", { class: "muted" }, "The capacity simulator needs a metrics or admin token."));
      return;
    }
    const range = (s) => s.mean === null ? "–" : `${fmt(s.mean)} (90% between ${fmt(s.p05)} and ${fmt(s.p95)})`;
    box.replaceChildren(el("div", { class: "cards" },
      card("Until the next shard drops out", fmt(capacity.next_drop.mean), range(capacity.next_drop)),
      card("Until no shard is left", fmt(capacity.all_out.mean), range(capacity.all_out),
        capacity.live_shards ? "" : "bad"),
      card("Aimed deletions (worst case)", fmt(st.capacity_left), "fewest that take some shard out")),
    el("p", { class: "hint" }, `Deletion requests of one random live record each, simulated from the current ` +
      `state (${fmt(capacity.live_records)} live records, ${capacity.trials} trials, the engine's own truncation ` +
      `rules; restoration not counted). After a shard drops out, “Restore now” retrains its truncated orders in ` +
      `the background.`));
  }

  async function restore() {
    try {
      const r = await api("POST", "/v1/restore");
      say(`Restoration ${r.restoration.state}: truncated orders retrain in the background.`, "info");
      loadOverview();
    } catch (error) {
      say(error.message);
    }
  }

  // -- review queue --------------------------------------------------------------------------------
  async function loadReview() {
    const status = $("review-status").value;
    let page;
    try {
      page = await api("GET", "/v1/review?limit=200" + (status ? "&status=" + encodeURIComponent(status) : ""));
    } catch (error) {
      say(error.message);
      return;
    }
    const table = $("review-table");
    if (!page.flags.length) {
      table.replaceChildren(el("tr", {}, el("td", { class: "muted" }, status === "pending"
        ? "No held requests: nothing waits for a decision." : "No flagged requests.")));
      return;
    }
    table.replaceChildren(
      el("tr", {}, el("th", {}, "held"), el("th", {}, "by token"), el("th", {}, "why flagged"),
        el("th", { class: "num" }, "ids"), el("th", { class: "num" }, "subjects"), el("th", {}, "status"),
        el("th", {}, "")),
      ...page.flags.map((f) => el("tr", { "data-flag": f.id },
        el("td", {}, when(f.created_at)), el("td", {}, f.token_id || "–"), el("td", {}, f.reason),
        el("td", { class: "num" }, fmt(f.id_count)), el("td", { class: "num" }, fmt(f.subject_count)),
        el("td", {}, f.action === "alert" ? "applied (alert)" : f.status),
        el("td", {}, el("button", { type: "button", class: "open", onclick: () => openFlag(f.id) },
          f.status === "pending" ? "Review" : "Show")))));
    if (page.next) table.append(el("tr", {}, el("td", { class: "muted" }, "More than 200: decide these first.")));
  }

  async function openFlag(id) {
    for (const row of document.querySelectorAll("#review-table tr")) {
      row.classList.toggle("selected", row.dataset.flag === id);
    }
    const box = $("review-detail");
    let flag, preview = null;
    try {
      flag = await api("GET", "/v1/review/" + encodeURIComponent(id));
      if (flag.status === "pending") preview = await api("GET", "/v1/review/" + encodeURIComponent(id) + "/preview");
    } catch (error) {
      say(error.message);
      return;
    }
    const parts = [
      el("h3", {}, `Flagged request ${flag.id}`),
      el("p", {}, el("strong", {}, "Why: "), flag.reason),
      el("p", {}, `Held ${when(flag.created_at)} from token ${flag.token_id || "–"}; ${flag.ids.length} ids` +
        (flag.subjects ? ` and ${flag.subjects} subjects (names are not shown)` : "") + "."),
    ];
    if (flag.ids.length) parts.push(el("p", { class: "ids" }, flag.ids.join(", ")));
    if (preview) {
      parts.push(el("h3", {}, `Applying it now would delete ${preview.records} live records:`));
      parts.push(previewTable(preview));
      const note = el("textarea", { id: "decision-note", maxlength: 1000,
        placeholder: "Note for the record (e.g. the ticket, who verified the request)" });
      parts.push(note, el("div", { class: "toolbar" },
        el("button", { type: "button", id: "apply", class: "primary", onclick: () => decide(flag.id, "apply", note) },
          "Apply deletion"),
        el("button", { type: "button", id: "reject", class: "danger", onclick: () => decide(flag.id, "reject", note) },
          "Reject")));
    } else {
      parts.push(el("p", {}, `Decided ${when(flag.decided_at)} by ${flag.decided_by || "–"}: ${flag.status}` +
        (flag.note ? ` (“${flag.note}”)` : "") + "."));
      if (flag.request_id) {
        parts.push(el("button", { type: "button", onclick: () => { show("receipts"); lookUp(flag.request_id); } },
          "Show its receipt"));
      }
    }
    box.replaceChildren(...parts);
    box.hidden = false;
  }

  function miniDepth(before, after, L) {
    const root = svg("svg", { width: 12 * L, height: 12 });
    for (let i = 0; i < L; i++) {
      root.append(svg("rect", { x: i * 12, y: 1, width: 10, height: 10, rx: 2,
        class: i < after ? "depth-on" : i < before ? "depth-lost" : "seg-off" }));
    }
    return el("span", { class: "mini" }, root);
  }

  function previewTable(preview) {
    const L = Math.max(slices || 1, ...preview.shards.map((s) => s.depth_before));
    return el("table", { id: "preview-table" },
      el("tr", {}, el("th", {}, "shard"), el("th", {}, "served depth"), el("th", { class: "num" }, "before → after"),
        el("th", { class: "num" }, "capacity before → after")),
      ...preview.shards.map((s) => el("tr", { "data-shard": s.shard },
        el("td", {}, s.shard + (s.depth_after === 0 && s.depth_before > 0 ? " (drops out)" : "")),
        el("td", {}, miniDepth(s.depth_before, s.depth_after, L)),
        el("td", { class: "num" }, `${s.depth_before} → ${s.depth_after}`),
        el("td", { class: "num" }, `${s.capacity_before} → ${s.capacity_after}`))));
  }

  async function decide(id, action, note) {
    const text = note.value.trim();
    for (const b of document.querySelectorAll("#review-detail button")) b.disabled = true;
    try {
      const result = await api("POST", `/v1/review/${encodeURIComponent(id)}/${action}`,
        text ? { note: text } : {});
      say(action === "apply"
        ? `Applied: ${result.deleted.length} records deleted (receipt ${result.request_id}, served set v${result.served_version}).`
        : `Rejected: nothing was deleted.`, "info");
    } catch (error) {
      say(error.message);
    }
    $("review-detail").hidden = true;
    loadReview();
    loadOverviewQuietly();
  }

  async function loadOverviewQuietly() {   // keeps the held-request badge right after a decision
    try {
      const st = await api("GET", "/v1/status");
      if (st.shards) $("held-badge").textContent = st.held_requests ? String(st.held_requests) : "";
    } catch (_) { /* the next overview poll reports it */ }
  }

  // -- receipts ------------------------------------------------------------------------------------
  async function loadReceipts() {
    let list;
    try {
      list = await api("GET", "/v1/deletions?limit=20");
    } catch (error) {
      say(error.message);
      return;
    }
    const table = $("receipt-table");
    if (!list.receipts.length) {
      table.replaceChildren(el("tr", {}, el("td", { class: "muted" }, "No deletions yet.")));
      return;
    }
    table.replaceChildren(
      el("tr", {}, el("th", {}, "when"), el("th", {}, "request id"), el("th", {}, "reference"),
        el("th", { class: "num" }, "deleted"), el("th", {}, "lineage check"), el("th", { class: "num" }, "ms")),
      ...list.receipts.map((r) => el("tr", { "data-request": r.request_id },
        el("td", {}, when(r.created_at)),
        el("td", {}, el("button", { type: "button", onclick: () => renderReceipt(r) }, r.request_id)),
        el("td", {}, r.reference || "–"), el("td", { class: "num" }, r.deleted.length),
        el("td", {}, r.lineage_check.split(":")[0]), el("td", { class: "num" }, fmt(r.duration_ms, 1)))));
  }

  async function lookUp(query) {
    const q = (query || "").trim();
    if (!q) return;
    $("receipt-query").value = q;
    try {
      // By reference first: that answers 200 with a list, possibly empty, so a lookup by request id only
      // follows when no reference matched (its 404 then means "no such receipt").
      let found = (await api("GET", "/v1/deletions?limit=20&reference=" + encodeURIComponent(q))).receipts;
      if (!found.length) {
        try {
          found = [await api("GET", "/v1/deletions/" + encodeURIComponent(q))];
        } catch (error) {
          if (error.status !== 404 && error.status !== 422) throw error;
        }
      }
      if (!found.length) {
        $("receipt-detail").hidden = true;
        say(`No receipt with request id or reference “${q}” visible to this token.`);
        return;
      }
      say(found.length > 1 ? `${found.length} receipts carry reference “${q}”; the newest is shown.` : "", "info");
      renderReceipt(found[0]);
    } catch (error) {
      say(error.message);
    }
  }

  function renderReceipt(r) {
    const box = $("receipt-detail");
    const passed = /^passed/i.test(r.lineage_check);
    const list = (items) => items.length ? el("div", { class: "ids" }, items.join(", ")) : el("span", { class: "muted" }, "none");
    box.replaceChildren(
      el("h3", {}, `Receipt ${r.request_id}`),
      el("table", { id: "receipt-fields" },
        el("tr", {}, el("th", {}, "created"), el("td", {}, when(r.created_at))),
        el("tr", {}, el("th", {}, "reference"), el("td", {}, r.reference || "–")),
        el("tr", {}, el("th", {}, "requested by"), el("td", {}, r.requested_by || "–")),
        el("tr", {}, el("th", {}, "lineage check"),
          el("td", { class: passed ? "pass" : "fail", id: "lineage-check" }, r.lineage_check)),
        el("tr", {}, el("th", {}, "deleted"), el("td", {}, list(r.deleted))),
        el("tr", {}, el("th", {}, "already deleted"), el("td", {}, list(r.already_deleted))),
        el("tr", {}, el("th", {}, "unknown ids"), el("td", {}, list(r.unknown))),
        el("tr", {}, el("th", {}, "subjects (keyed digests)"), el("td", {}, list(r.subjects))),
        el("tr", {}, el("th", {}, "shards"), el("td", {}, r.shards.length
          ? r.shards.map((s) => `shard ${s.shard}: depth ${s.depth_before} → ${s.depth_after}`).join("; ") : "none")),
        el("tr", {}, el("th", {}, "served set after"), el("td", {}, `v${r.served_version}: ` +
          `${r.served_artifacts.length} artifacts`)),
        el("tr", {}, el("th", {}, "retired stages"), el("td", { id: "retired" }, list(r.retired_artifacts || []))),
        el("tr", {}, el("th", {}, "time to apply"), el("td", {}, fmt(r.duration_ms, 1) + " ms"))),
      el("div", { class: "toolbar" },
        el("button", { type: "button", id: "export", onclick: () => exportReceipt(r.request_id) },
          "Export signed receipt"),
        el("span", { class: "muted", id: "export-note" }, "")));
    box.hidden = false;
  }

  // The signed receipt (ledger entry, hash, Ed25519 signature) as a JSON file the data subject can check with
  // `s3t verify-receipt FILE --public-key run.pub`, without the run. Offered as a download of the very bytes
  // the API answered (a Blob: nothing leaves the page but the file the admin saves).
  async function exportReceipt(id) {
    let doc;
    try {
      doc = await api("GET", "/v1/deletions/" + encodeURIComponent(id) + "/export");
    } catch (error) {
      say(error.message);
      return;
    }
    const blob = new Blob([JSON.stringify(doc, null, 2) + "\n"], { type: "application/json" });
    const link = el("a", { id: "export-link", href: URL.createObjectURL(blob), download: `receipt-${id}.json` },
      `receipt-${id}.json`);
    $("export-note").replaceChildren(`ledger entry #${doc.entry.seq}, signed by key ${doc.key_id}: `, link);
    link.click();
  }

  // -- audit ---------------------------------------------------------------------------------------
  async function runAudit(event) {
    event.preventDefault();
    const replay = Math.max(0, parseInt($("audit-replay").value, 10) || 0);
    const box = $("audit-result");
    $("audit-run").disabled = true;
    box.replaceChildren(el("p", { class: "muted" }, replay ? `Auditing, replaying ${replay} stages…` : "Auditing…"));
    let report;
    try {
      report = await api("GET", "/v1/audit?replay=" + replay);
    } catch (error) {
      box.replaceChildren();
      say(error.message);
      return;
    } finally {
      $("audit-run").disabled = false;
    }
    const value = (v) => Array.isArray(v) ? v.length : v !== null && typeof v === "object" ? JSON.stringify(v) : v;
    const looked = (o) => Object.entries(o || {}).map(([k, v]) => `${k}: ${value(v)}`).join(", ");
    box.replaceChildren(
      el("p", { id: "audit-verdict", class: report.passed ? "pass" : "fail" },
        report.passed ? "Passed" : `Failed: ${report.failures.length} failures`, el("span", { class: "muted" },
          ` (checked ${when(report.checked_at)})`)),
      el("table", { id: "audit-table" },
        el("tr", {}, el("th", {}, "check"), el("th", {}, "result"), el("th", {}, "what it looked at"),
          el("th", {}, "failures")),
        ...report.checks.map((c) => el("tr", { "data-check": c.name },
          el("td", {}, c.name),
          el("td", { class: c.status === "passed" ? "pass" : c.status === "failed" ? "fail" : "muted" }, c.status),
          el("td", {}, c.summary, el("div", { class: "muted" }, looked(c.looked_at))),
          el("td", {}, c.failures.length ? el("ul", {}, ...c.failures.map((f) => el("li", {}, f))) : "–")))));
  }

  // -- wiring --------------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", signIn);
    $("logout").addEventListener("click", () => signOut(""));
    for (const button of document.querySelectorAll("#tabs button")) {
      button.addEventListener("click", () => show(button.dataset.tab));
    }
    $("refresh").addEventListener("click", loadOverview);
    $("restore").addEventListener("click", restore);
    $("review-status").addEventListener("change", () => { $("review-detail").hidden = true; loadReview(); });
    $("review-refresh").addEventListener("click", loadReview);
    $("audit-form").addEventListener("submit", runAudit);
    $("receipt-form").addEventListener("submit", (event) => { event.preventDefault(); lookUp($("receipt-query").value); });
    $("token").focus();
  });
})();
