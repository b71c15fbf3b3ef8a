// The /ui pages' only script (an ES module, loaded from this server; no inline script).
//
// Everything that comes from a graph, a state or a log is put into the page
// with textContent or as an attribute value, never as markup. The HTML the
// runs list swaps in is rendered, escaped, by the server's templates.

const LIVE_POLL_MS = 2000; // the runs list's live part: at most every 2 s
const REFRESH_MS = 1000; // a followed run's header, state and picture: at most every 1 s
const STATE_CHARS = 100000;
const LOG_HOLD = 10000; // rows a run page holds at most once the reader loaded earlier ones
const RECONNECT_MS = [1000, 2000, 5000, 10000, 30000]; // after a stream the server refused
const DATA_CHARS = 500;

const body = document.body;

function when(ts) {
  if (ts === null || ts === undefined) return "";
  return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
}

function clock(ts) {
  return new Date(ts * 1000).toISOString().slice(11, 23);
}

function took(run) {
  if (run.started_at === null || run.started_at === undefined) return "";
  const end = run.finished_at ?? Date.now() / 1000;
  const span = Math.max(0, end - run.started_at);
  if (span < 1) return `${Math.round(span * 1000)} ms`;
  if (span < 120) return `${span.toFixed(1)} s`;
  return `${(span / 60).toFixed(1)} min`;
}

function cut(text, limit) {
  return text.length > limit ? `${text.slice(0, limit)}\n…` : text;
}

function show(element, text) {
  if (!element) return;
  element.textContent = text;
  element.hidden = !text;
}

function loginAgain() {
  const next = location.pathname + location.search;
  location.assign(`/ui/login?next=${encodeURIComponent(next)}`);
}

// fetch with the session cookie; a 401 sends the browser to the login page
// (unless `relogin` is false: the login page's own requests).
async function api(method, url, payload, relogin = true) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (payload !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(payload);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (error) {
    return { status: 0, ok: false, answer: null }; // the server could not be reached
  }
  let answer = null;
  const type = response.headers.get("content-type") || "";
  if (type.startsWith("application/json")) answer = await response.json();
  else if (response.status !== 204) answer = await response.text();
  if (response.status === 401 && relogin) loginAgain();
  return { status: response.status, ok: response.ok, answer };
}

function errorText(result) {
  const error = result.answer && result.answer.error;
  if (error) return `${result.status} ${error.code}: ${error.message}`;
  if (result.status === 0) return "The server could not be reached; try again.";
  return `${result.status}: the server did not accept this`;
}

function problemsOf(result) {
  const error = result.answer && result.answer.error;
  const problems = error && error.details && error.details.problems;
  return Array.isArray(problems) ? problems : [];
}

// -- the picture --------------------------------------------------------------------

let mermaidModule = null;
let pictureCount = 0;

async function mermaid() {
  if (mermaidModule === null) {
    mermaidModule = (await import(body.dataset.mermaid)).default;
    mermaidModule.initialize({
      startOnLoad: false,
      // Labels are escaped by the server (#lt; ...) and sanitised again by Mermaid.
      securityLevel: "strict",
      theme: "default",
    });
  }
  return mermaidModule;
}

const drawnSource = new WeakMap(); // box -> the Mermaid text it shows

async function draw(box, source) {
  drawnSource.set(box, source);
  const library = await mermaid();
  pictureCount += 1;
  try {
    const { svg } = await library.render(`picture-svg-${pictureCount}`, source);
    // Mermaid's own output, sanitised by it (securityLevel strict); labels escaped by the server.
    box.innerHTML = svg;
    box.dataset.rendered = String(pictureCount);
  } catch (error) {
    const problem = document.createElement("p");
    problem.className = "problem";
    problem.textContent = `The picture could not be drawn: ${error.message || error}`;
    box.replaceChildren(problem);
    console.error("mermaid:", error);
  }
}

async function drawPictures() {
  for (const box of document.querySelectorAll(".mermaid-box")) {
    const source = box.querySelector(".mermaid-source");
    if (source) await draw(box, source.textContent);
  }
}

// -- pages --------------------------------------------------------------------------

function logout() {
  const button = document.getElementById("logout");
  if (!button) return;
  button.addEventListener("click", async () => {
    await api("POST", "/auth/logout");
    location.assign("/ui/login");
  });
}

function loginPage() {
  const form = document.getElementById("login-form");
  if (!form) return;
  // A link from another site arrives without the (SameSite=Strict) cookie and
  // is sent here; this same-site request carries it: already logged in, go on.
  api("GET", "/auth/whoami", undefined, false).then((result) => {
    if (result.ok && result.answer.token_id) location.replace(form.dataset.next || "/ui");
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = form.querySelector("#token").value.trim();
    const result = await api("POST", "/auth/session", { token }, false);
    if (result.ok) location.assign(form.dataset.next || "/ui");
    else show(document.getElementById("login-problem"), errorText(result));
  });
}

function runsPage() {
  const live = document.getElementById("live");
  if (!live) return;
  let busy = false;
  let shown = live.innerHTML;
  setInterval(async () => {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const response = await fetch(live.dataset.refresh, { credentials: "same-origin" });
      if (response.status === 401 || response.redirected) loginAgain();
      else if (response.ok) {
        const text = await response.text();
        // Swapped only when something changed: focus and selection stay otherwise.
        if (text !== shown) live.innerHTML = shown = text; // server-rendered, escaped
      }
    } catch (error) {
      // The server is away for a moment: the next poll tries again.
    } finally {
      busy = false;
    }
  }, LIVE_POLL_MS);
}

function logRow(entry) {
  const row = document.createElement("tr");
  row.dataset.seq = String(entry.seq);
  row.className = `level-${entry.level}`;
  const data =
    entry.data && Object.keys(entry.data).length ? cut(JSON.stringify(entry.data), DATA_CHARS) : "";
  const cells = [String(entry.seq), clock(entry.ts), entry.level, entry.event, entry.node || "", entry.message];
  cells.forEach((text, i) => {
    const cell = document.createElement("td");
    if (i === 0) cell.className = "num";
    cell.textContent = text;
    row.append(cell);
  });
  const cell = document.createElement("td");
  const code = document.createElement("code");
  code.textContent = data;
  cell.append(code);
  row.append(cell);
  return row;
}

function statusChip(status) {
  const chip = document.createElement("span");
  chip.className = `chip status-${status}`;
  chip.textContent = status;
  return chip;
}

// The branches of the fan-out the run is in (GET /graph/state's "fanout"), if any.
function showFanout(fan) {
  const section = document.getElementById("fanout");
  if (!section) return;
  section.hidden = !fan;
  if (!fan) return;
  document.getElementById("fanout-node").textContent = fan.node;
  document.getElementById("fanout-summary").textContent =
    `${fan.kind}, ${fan.size} branches, ${fan.not_started} not started`;
  const rows = fan.branches.map((b) => {
    const row = document.createElement("tr");
    const cells = [b.branch, null, b.node || "", String(b.step ?? ""), b.error ? b.error.message : ""];
    cells.forEach((text, i) => {
      const cell = document.createElement("td");
      if (i === 1) cell.append(statusChip(b.status));
      else if (i === 0) {
        const code = document.createElement("code");
        code.textContent = text;
        cell.append(code);
      } else cell.textContent = text;
      if (i === 3) cell.className = "num";
      row.append(cell);
    });
    return row;
  });
  document.getElementById("fanout-rows").replaceChildren(...rows);
}

function runPage() {
  const section = document.getElementById("run");
  if (!section) return;
  const runId = section.dataset.runId;
  const quoted = encodeURIComponent(runId);
  const rows = document.getElementById("log-rows");
  const earlier = document.getElementById("load-earlier");
  const note = document.getElementById("live-note");
  const keep = Number(section.dataset.logKeep);
  const pageSize = Number(section.dataset.logPage);
  let lastSeq = Number(section.dataset.lastSeq);
  let firstSeq = Number(section.dataset.firstSeq);
  let status = section.dataset.status;
  const terminal = new Set(["completed", "failed", "cancelled"]);

  let refreshing = false;
  let again = false;
  let lastRefresh = 0;

  async function refresh() {
    if (refreshing) {
      again = true;
      return;
    }
    refreshing = true;
    const wait = lastRefresh + REFRESH_MS - Date.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    lastRefresh = Date.now();
    try {
      const result = await api("GET", `/graph/state/${quoted}?logs=0`);
      if (!result.ok) return; // the server is away for a moment: the next entry asks again
      const run = result.answer;
      const before = status;
      status = run.status;
      section.dataset.status = status;
      document.getElementById("run-status").replaceChildren(statusChip(status));
      document.getElementById("run-node").textContent = run.current_node || "";
      document.getElementById("run-step").textContent = String(run.step);
      document.getElementById("run-attempt").textContent = String(run.attempt);
      document.getElementById("run-started").textContent = when(run.started_at);
      document.getElementById("run-finished").textContent = when(run.finished_at);
      document.getElementById("run-took").textContent = took(run);
      document.getElementById("state").textContent = cut(JSON.stringify(run.state, null, 2), STATE_CHARS);
      showFanout(run.fanout);
      const cancel = document.getElementById("cancel");
      if (cancel) cancel.hidden = terminal.has(status);
      const waitingShown = document.getElementById("wait") !== null;
      const waitingNow = status === "waiting" && run.waiting && !run.waiting.answered;
      if (before !== status && (waitingShown || waitingNow)) {
        location.reload(); // the wait form is built by the server
        return;
      }
      if (before !== status && run.error) location.reload();
      const box = document.getElementById("picture");
      if (box && box.dataset.sourceUrl) {
        const picture = await api("GET", box.dataset.sourceUrl);
        // Drawn again only when the marks changed (a node completed, another is current).
        if (picture.ok && picture.answer !== drawnSource.get(box)) await draw(box, picture.answer);
      }
      if (terminal.has(status)) note.textContent = "The run has ended.";
    } finally {
      refreshing = false;
      if (again) {
        again = false;
        refresh();
      }
    }
  }

  // Following, the page keeps the last `keep` rows. Once the reader has loaded
  // earlier rows it keeps everything (they are what the reader is looking at),
  // up to LOG_HOLD rows; then it stops following and says so.
  let pinned = false;
  let stream = null;

  function trim() {
    if (pinned) {
      if (rows.children.length >= LOG_HOLD && stream !== null) {
        stopFollowing(`Stopped following at ${LOG_HOLD} rows on the page; reload it to follow the newest entries.`);
      }
      return;
    }
    while (rows.children.length > keep) {
      rows.firstElementChild.remove();
      firstSeq = Number(rows.firstElementChild.dataset.seq);
    }
    earlier.hidden = firstSeq <= 1;
  }

  function stopFollowing(text) {
    if (stream !== null) stream.close();
    stream = null;
    clearTimeout(retry);
    note.textContent = text;
  }

  let retry = 0;
  let failures = 0;

  function follow() {
    if (terminal.has(status)) return;
    stream = new EventSource(`/sse/logs/${quoted}?after=${lastSeq}`);
    const current = stream;
    current.addEventListener("open", () => {
      failures = 0;
      note.textContent = "Following the run live.";
    });
    current.addEventListener("log", (event) => {
      failures = 0;
      const entry = JSON.parse(event.data);
      if (entry.seq <= lastSeq) return; // already shown (a reconnect resumes after the last id)
      lastSeq = entry.seq;
      rows.append(logRow(entry));
      if (firstSeq > lastSeq) firstSeq = entry.seq;
      document.getElementById("log-count").textContent = `${lastSeq} entries`;
      trim();
      refresh();
    });
    current.addEventListener("status", () => {
      current.close();
      stream = null;
      refresh();
    });
    current.addEventListener("error", async (event) => {
      if (event.data) {
        // The server's own error event: the stream is over.
        const error = JSON.parse(event.data).error;
        stopFollowing(`The log stream ended: ${error.message}`);
        if (error.code === "unauthorized") loginAgain();
        return;
      }
      if (current.readyState !== EventSource.CLOSED) return; // the browser reconnects itself
      // Closed for good: 204 (the run ended), or refused (429, 5xx, a proxy).
      stream = null;
      await refresh();
      if (terminal.has(status)) return;
      const wait = RECONNECT_MS[Math.min(failures, RECONNECT_MS.length - 1)];
      failures += 1;
      note.textContent = `The log stream was refused; trying again in ${wait / 1000} s.`;
      retry = setTimeout(follow, wait);
    });
  }

  earlier.addEventListener("click", async () => {
    pinned = true; // from now on no row leaves the page (not even while this loads)
    const after = Math.max(0, firstSeq - 1 - pageSize);
    const limit = firstSeq - 1 - after;
    if (limit <= 0) return;
    const result = await api("GET", `/runs/${quoted}/logs?after=${after}&limit=${limit}`);
    if (!result.ok) return;
    const entries = result.answer.entries.filter((entry) => entry.seq < firstSeq);
    const top = rows.firstElementChild;
    for (const entry of entries) rows.insertBefore(logRow(entry), top);
    if (entries.length) firstSeq = entries[0].seq;
    earlier.hidden = firstSeq <= 1;
    trim();
  });

  const cancel = document.getElementById("cancel");
  if (cancel) {
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      const result = await api("POST", `/graph/cancel/${quoted}`);
      cancel.disabled = false;
      show(document.getElementById("cancel-problem"), result.ok ? "" : errorText(result));
      refresh();
    });
  }

  resumeForm(quoted);
  follow();
}

function fieldValue(field) {
  const kind = field.dataset.kind;
  const input = field.querySelector("input, select, textarea");
  if (kind === "boolean") return { value: input.checked };
  const text = input.value;
  if (kind === "enum") {
    if (text === "") return {};
    return { value: JSON.parse(input.dataset.options)[Number(text)] };
  }
  if (text.trim() === "") {
    // An empty required string is an answer; anything else empty is left out.
    return kind === "string" && input.dataset.required ? { value: text } : {};
  }
  if (kind === "integer" || kind === "number") {
    const number = Number(text);
    if (!Number.isFinite(number)) return { problem: "not a number" };
    return { value: number };
  }
  if (kind === "json" || kind === "raw") {
    let value;
    try {
      value = JSON.parse(text);
    } catch (error) {
      return { problem: `not JSON: ${error.message}` };
    }
    if (kind === "raw" && (value === null || typeof value !== "object" || Array.isArray(value))) {
      return { problem: "the answer must be a JSON object" };
    }
    return { value };
  }
  return { value: text };
}

// The field a problem's JSON path ($.name, $.name[0], $.name.inner) is about.
function fieldOf(fields, path) {
  let best = null;
  for (const field of fields) {
    const name = field.dataset.field;
    if (field.dataset.kind === "raw") continue;
    const prefix = `$.${name}`;
    const rest = path.slice(prefix.length);
    if (path.startsWith(prefix) && (rest === "" || rest[0] === "." || rest[0] === "[")) {
      if (best === null || name.length > best.dataset.field.length) best = field;
    }
  }
  return best;
}

function resumeForm(quoted) {
  const form = document.getElementById("resume-form");
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const fields = [...form.querySelectorAll(".field")];
    let input = {};
    const pairs = [];
    let bad = false;
    for (const field of fields) {
      const { value, problem } = fieldValue(field);
      show(field.querySelector(".problem"), problem || "");
      if (problem) bad = true;
      else if (field.dataset.kind === "raw") input = value ?? {};
      else if (value !== undefined) pairs.push([field.dataset.field, value]);
    }
    // Own properties whatever their names ("__proto__" included).
    if (pairs.length) input = Object.fromEntries(pairs);
    show(document.getElementById("resume-problem"), "");
    if (bad) return;
    const payload = { input, background: true };
    if (form.dataset.requestId) payload.request_id = form.dataset.requestId;
    const result = await api("POST", `/graph/resume/${quoted}`, payload);
    if (result.ok) {
      location.reload();
      return;
    }
    const problems = problemsOf(result);
    const general = [];
    for (const problem of problems) {
      const field = fieldOf(fields, String(problem.path || ""));
      const target = field || fields.find((f) => f.dataset.kind === "raw");
      if (target) show(target.querySelector(".problem"), `${problem.path}: ${problem.message}`);
      else general.push(`${problem.path}: ${problem.message}`);
    }
    show(document.getElementById("resume-problem"), problems.length ? general.join("; ") : errorText(result));
  });
}

function graphPage() {
  const form = document.getElementById("start-form");
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const problem = document.getElementById("start-problem");
    const list = document.getElementById("start-problems");
    list.replaceChildren();
    list.hidden = true;
    let state;
    try {
      state = JSON.parse(form.querySelector("#initial-state").value || "{}");
    } catch (error) {
      show(problem, `The initial state is not JSON: ${error.message}`);
      return;
    }
    const payload = { graph_id: form.dataset.graphId, initial_state: state, background: true };
    const result = await api("POST", "/graph/run", payload);
    if (result.ok) {
      location.assign(`/ui/runs/${encodeURIComponent(result.answer.run_id)}`);
      return;
    }
    show(problem, errorText(result));
    for (const item of problemsOf(result)) {
      const line = document.createElement("li");
      line.textContent = `${item.path}: ${item.message}`;
      list.append(line);
    }
    list.hidden = list.children.length === 0;
  });
}

logout();
loginPage();
runsPage();
runPage();
graphPage();
drawPictures();
