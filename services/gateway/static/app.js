/* Swift Trainer dashboard: plain JavaScript, no build step.
 *
 * The page signs in once (POST /auth/token sets a short-lived HttpOnly cookie, refreshed while
 * the page is open), then everything it shows comes from the REST API and stays current through
 * Server-Sent Events: every job event (/events/stream), the GPUs (/gpus/stream), and on a job's
 * page that job's events from its start (/jobs/{id}/stream) and its output (/jobs/{id}/logs/stream).
 */
"use strict";

(() => {
  const PREFIX = document.querySelector('meta[name="api-prefix"]').content;
  const API = `${PREFIX}/training`;
  const AUTH = `${PREFIX}/auth`;
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const JOB_EVENTS = [
    "job.accepted", "job.rejected", "job.queued", "job.held", "job.scheduled", "job.started",
    "job.progress", "job.checkpoint_saved", "job.serving", "job.succeeded", "job.failed",
    "job.lost", "job.requeued", "job.priority_changed", "job.deleted", "job.cancel_requested", "job.cancelled",
    "export.requested", "export.started", "export.completed", "export.failed",
  ];
  const MAX_LOG_LINES = 2000;
  const JOBS_SHOWN = 100;

  // ------------------------------------------------------------------------------------------
  // Small helpers

  const $ = (selector, root = document) => root.querySelector(selector);

  /** An element: el("td", {class: "x", text: "y", dataset: {jobId: 1}}, child, …). */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function debounce(fn, ms) {
    let timer = null;
    return (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), ms);
    };
  }

  /** Calls fn at most every ms, however often it is asked for, and always after the last ask.
   * (A timer, not an animation frame: a tab in a window's background still draws its chart.) */
  function throttle(fn, ms) {
    let timer = null;
    return () => {
      if (timer === null) {
        timer = setTimeout(() => {
          timer = null;
          fn();
        }, ms);
      }
    };
  }

  /** Stream entry ids ("<ms>-<seq>") in log order. */
  function entryOrder(a, b) {
    const [am, as] = (a || "0-0").split("-").map(Number);
    const [bm, bs] = (b || "0-0").split("-").map(Number);
    return am - bm || as - bs;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
    return `${Math.floor(h / 24)}d ${h % 24}h`;
  }

  function ago(iso) {
    if (!iso) return "—";
    const seconds = (Date.now() - Date.parse(iso)) / 1000;
    return seconds < 5 ? "just now" : `${duration(seconds)} ago`;
  }

  function localTime(iso) {
    return iso ? new Date(iso).toLocaleString() : "—";
  }

  function num(value, digits = 4) {
    if (value === null || value === undefined) return "—";
    if (Math.abs(value) >= 1000 || (Math.abs(value) < 1e-3 && value !== 0)) return value.toExponential(2);
    return String(Number(value.toFixed(digits)));
  }

  function mb(value) {
    if (value === null || value === undefined) return "—";
    return value >= 1024 ? `${(value / 1024).toFixed(1)} GiB` : `${value} MiB`;
  }

  function jobLabel(job) {
    return (job && job.spec && job.spec.name) || (job ? job.job_id.slice(0, 8) : "");
  }

  function percentOf(job) {
    if (job.progress) return job.status === "completed" ? 100 : job.progress.percent || 0;
    return job.status === "completed" ? 100 : 0;
  }

  function badge(status) {
    return el("span", { class: `badge ${status}`, text: status });
  }

  function setBar(bar, percent, done) {
    const value = Math.max(0, Math.min(100, percent));
    bar.setAttribute("aria-valuenow", String(Math.round(value * 10) / 10));
    bar.firstElementChild.style.width = `${value}%`;
    bar.classList.toggle("done", Boolean(done));
  }

  function bar(percent, done) {
    const node = el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" }, el("span"));
    setBar(node, percent, done);
    return node;
  }

  /** The top bar's word for the main stream of the view: live, reconnecting, or offline. */
  const indicator = {
    up() {
      $("#live").hidden = false;
      $("#live").textContent = "live";
      $("#live").classList.add("on");
    },
    down() {
      $("#live").hidden = false;
      $("#live").textContent = "reconnecting";
      $("#live").classList.remove("on");
    },
    off() {
      $("#live").hidden = false;
      $("#live").textContent = "offline";
      $("#live").classList.remove("on");
    },
  };

  function notice(text) {
    const box = $("#notice");
    box.textContent = text || "";
    box.hidden = !text;
  }

  // ------------------------------------------------------------------------------------------
  // The API: JSON over fetch with the session cookie, and live streams

  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.code = error.code;
      this.details = error.details || [];
    }
  }

  async function api(path, { method = "GET", body, headers = {}, signIn = false } = {}) {
    const init = { method, headers: { Accept: "application/json", ...headers }, credentials: "same-origin" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    const data = await response.json().catch(() => null);
    if (!response.ok) {
      if (response.status === 401 && !signIn) session.lost("Your session has ended: sign in again.");
      throw new ApiError(response.status, data);
    }
    return data;
  }

  /**
   * Follow an SSE stream; handlers by event name get the parsed data and the entry id. The
   * browser reconnects by itself (with Last-Event-ID) when a stream ends; when it gives up (a
   * refused reconnect, e.g. once the session expired) we check the session and resume after
   * the last entry seen.
   */
  function follow(url, handlers, { onOpen, onDown } = {}) {
    let source = null;
    let last = null;
    let closed = false;
    let retry = null;
    const open = () => {
      const sep = url.includes("?") ? "&" : "?";
      source = new EventSource(last ? `${url}${sep}since=${encodeURIComponent(last)}` : url);
      source.onopen = () => onOpen && onOpen();
      for (const [type, handle] of Object.entries(handlers)) {
        source.addEventListener(type, (event) => {
          if (event.lastEventId) last = event.lastEventId;
          handle(event.data ? JSON.parse(event.data) : null, event.lastEventId);
        });
      }
      source.onerror = () => {
        if (onDown) onDown();
        if (source.readyState === EventSource.CLOSED && !closed) {
          source = null;
          retry = setTimeout(resume, 2000);
        }
      };
    };
    const resume = async () => {
      if (closed) return;
      const signedIn = await session.check();
      if (signedIn === true) open();
      else if (signedIn === null) retry = setTimeout(resume, 5000); // the gateway is away: again later
    };
    open();
    return {
      close() {
        closed = true;
        clearTimeout(retry);
        if (source) source.close();
      },
    };
  }

  // ------------------------------------------------------------------------------------------
  // Session: access control off, or a key exchanged for a short-lived cookie

  const session = {
    active: false,
    refreshTimer: null,

    async start() {
      try {
        const me = await api(`${AUTH}/me`, { signIn: true });
        if (!me.access_control) {
          notice(
            "Access control is off: no API keys are configured, so the gateway serves this machine only " +
              "(loopback) and every caller acts as “anonymous”, an admin. Set API_KEYS to require keys."
          );
          this.enter(me, false);
        } else {
          this.enter(await this.refresh(), true);
        }
      } catch (error) {
        if (error.status === 401) {
          this.showSignIn("");
        } else {
          notice(`The gateway did not answer (${error.message}); trying again…`);
          setTimeout(() => this.start(), 5000);
        }
      }
    },

    async signIn(key) {
      const token = await api(`${AUTH}/token`, { method: "POST", headers: { Authorization: `Bearer ${key}` }, signIn: true });
      this.schedule(token.expires_in);
      this.enter(token, true);
    },

    /** A fresh token (and cookie) from the current one, before it expires. */
    async refresh() {
      const token = await api(`${AUTH}/token`, { method: "POST", signIn: true });
      this.schedule(token.expires_in);
      return token;
    },

    /** Renew the token halfway through its life; if the gateway is away, try again soon. */
    schedule(ttlSeconds, inSeconds = Math.max(5, ttlSeconds * 0.5)) {
      clearTimeout(this.refreshTimer);
      this.refreshTimer = setTimeout(async () => {
        try {
          await this.refresh();
        } catch (error) {
          if (error.status === 401) this.lost("Your session has ended: sign in again.");
          else this.schedule(ttlSeconds, 5);
        }
      }, inSeconds * 1000);
    },

    /** Whether we are still signed in (after a stream was refused): true, false (and the sign-in
     * box shows), or null when the gateway did not answer. */
    async check() {
      try {
        await api(`${AUTH}/me`, { signIn: true });
        return true;
      } catch (error) {
        if (error.status !== 401) return null;
        this.lost("Your session has ended: sign in again.");
        return false;
      }
    },

    enter(who, controlled) {
      this.active = true;
      $("#sign-in").hidden = true;
      $("#who").textContent = `${who.name} (${who.role})`;
      $("#sign-out").hidden = !controlled;
      route();
    },

    lost(message) {
      if (!this.active) return;
      this.active = false;
      clearTimeout(this.refreshTimer);
      pause();
      this.showSignIn(message);
    },

    async signOut() {
      await api(`${AUTH}/token`, { method: "DELETE" }).catch(() => null);
      this.lost("");
    },

    showSignIn(message) {
      for (const view of document.querySelectorAll(".view")) view.hidden = true;
      $("#who").textContent = "";
      $("#sign-out").hidden = true;
      $("#sign-in").hidden = false;
      $("#sign-in-error").textContent = message || "";
      $("#api-key").focus();
    },
  };

  $("#sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("#api-key");
    $("#sign-in-error").textContent = "";
    try {
      await session.signIn(input.value.trim());
      input.value = "";
    } catch (error) {
      $("#sign-in-error").textContent = error.status === 401 ? "That key is not valid." : error.message;
    }
  });
  $("#sign-out").addEventListener("click", () => session.signOut());

  // ------------------------------------------------------------------------------------------
  // Live data shared by every view: the jobs, the queue, the GPUs

  const live = {
    jobs: new Map(),
    queue: [],
    nodes: [],
    streams: [],
    fetching: new Map(), // job id -> debounced refetch

    /** Follow every job event and the GPUs (while the overview shows). */
    follow() {
      if (this.streams.length) return;
      const handlers = Object.fromEntries(JOB_EVENTS.map((type) => [type, (data, id) => this.onEvent(type, data, id)]));
      // Follow first, then load: whatever happens in between arrives on the stream.
      this.streams.push(
        follow(`${API}/events/stream?type=job.*&type=export.*`, handlers, { onOpen: indicator.up, onDown: indicator.down }),
        follow(`${API}/gpus/stream`, { gpus: (data) => this.onGpus(data) })
      );
      this.load();
      this.ticker = setInterval(() => overview.tick(), 5000);
    },

    unfollow() {
      for (const stream of this.streams) stream.close();
      this.streams = [];
      clearInterval(this.ticker);
    },

    async load() {
      try {
        const listing = await api(`${API}/jobs?size=${JOBS_SHOWN}`);
        for (const job of listing.jobs) this.merge(job);
        $("#jobs-count").textContent = listing.total > JOBS_SHOWN ? `(newest ${JOBS_SHOWN} of ${listing.total})` : "";
        overview.renderJobs();
        this.loadQueue();
      } catch (error) {
        if (error.status !== 401) notice(`Could not load the jobs: ${error.message}`);
      }
    },

    /** Keep whichever record of a job is further along the log. */
    merge(job) {
      const known = this.jobs.get(job.job_id);
      if (known && entryOrder(known.last_entry_id, job.last_entry_id) > 0) return known;
      this.jobs.set(job.job_id, job);
      return job;
    },

    refetch(jobId) {
      if (!this.fetching.has(jobId)) {
        this.fetching.set(
          jobId,
          debounce(async () => {
            try {
              const job = this.merge(await api(`${API}/jobs/${encodeURIComponent(jobId)}`));
              overview.renderJob(job.job_id);
              jobPage.update(job);
            } catch (error) {
              if (error.status === 404) this.forget(jobId);
            }
          }, 120)
        );
      }
      this.fetching.get(jobId)();
    },

    forget(jobId) {
      this.jobs.delete(jobId);
      overview.renderJob(jobId);
    },

    loadQueue: debounce(async function loadQueue() {
      try {
        live.queue = (await api(`${API}/queue`)).queue;
        overview.renderQueue();
      } catch {
        /* the next event asks again */
      }
    }, 250),

    onEvent(type, envelope, entryId) {
      const jobId = envelope.job_id;
      const job = this.jobs.get(jobId);
      if (type === "job.deleted") {
        this.forget(jobId);
        this.loadQueue();
        return;
      }
      if (type === "job.progress" && job) {
        if (envelope.payload.attempt !== job.attempt) return; // a report of an attempt since replaced
        job.progress = { ...envelope.payload, at: envelope.at };
        job.last_entry_id = entryId;
        overview.renderJob(jobId);
        if (this.queue.length) this.throttledQueue();
        return;
      }
      this.refetch(jobId);
      this.loadQueue();
    },

    throttledQueue: (() => {
      let last = 0;
      return () => {
        if (Date.now() - last > 5000) {
          last = Date.now();
          live.loadQueue();
        }
      };
    })(),

    onGpus(view) {
      this.nodes = view.nodes;
      overview.renderGpus();
    },
  };

  // ------------------------------------------------------------------------------------------
  // Overview: GPUs, jobs, queue

  const overview = {
    rows: new Map(), // job id -> <tr>

    jobLink(jobId) {
      const job = live.jobs.get(jobId);
      return el("a", { href: `#/jobs/${encodeURIComponent(jobId)}`, text: job ? jobLabel(job) : jobId.slice(0, 8) });
    },

    renderGpus() {
      const box = $("#gpus");
      box.replaceChildren();
      if (!live.nodes.length) {
        box.append(el("p", { class: "muted", text: "No node has reported yet." }));
        return;
      }
      for (const node of live.nodes) {
        box.append(
          el(
            "div",
            { class: "node" },
            el("strong", { text: node.node }),
            el("span", { class: `badge ${node.up ? "completed" : "failed"}`, text: node.up ? "up" : "lost" }),
            node.simulated ? el("span", { class: "badge", text: "simulated" }) : null,
            el("span", { class: "muted small", text: `heartbeat ${ago(node.last_heartbeat_at)}` })
          )
        );
        for (const gpu of node.gpus) box.append(this.gpuCard(node, gpu));
      }
    },

    gpuCard(node, gpu) {
      const used = gpu.memory_used_mb;
      const total = gpu.memory_total_mb;
      const memoryPct = used !== undefined && total ? (100 * used) / total : 0;
      const util = gpu.utilization_pct;
      const meter = (label, percent, text) =>
        el("div", { class: "meter" }, el("span", { text: label }), bar(percent || 0), el("span", { class: "value", text }));
      return el(
        "div",
        { class: `gpu${gpu.held_by ? " busy" : ""}`, dataset: { gpu: `${node.node}/${gpu.index}` } },
        el("div", { class: "gpu-title" }, el("span", { text: `GPU ${gpu.index}` }), gpu.temperature_c != null ? el("span", { class: "muted", text: `${gpu.temperature_c} °C` }) : null),
        el("div", { class: "gpu-name", title: gpu.name, text: gpu.name }),
        meter("memory", memoryPct, used !== undefined ? `${mb(used)} / ${mb(total)}` : mb(total)),
        meter("util", util, util === null || util === undefined ? "—" : `${util} %`),
        el("div", { class: "gpu-holder" }, gpu.held_by ? ["running ", this.jobLink(gpu.held_by)] : el("span", { class: "muted", text: "free" }))
      );
    },

    renderJobs() {
      const body = $("#jobs");
      const ids = [...live.jobs.values()]
        .sort((a, b) => (a.submitted_at < b.submitted_at ? 1 : a.submitted_at > b.submitted_at ? -1 : 0))
        .map((job) => job.job_id);
      for (const [id, row] of this.rows) {
        if (!live.jobs.has(id)) {
          row.remove();
          this.rows.delete(id);
        }
      }
      const rows = ids.map((id) => this.row(live.jobs.get(id)));
      body.replaceChildren(...rows);
      $("#jobs-empty").hidden = rows.length > 0;
    },

    renderJob(jobId) {
      const job = live.jobs.get(jobId);
      if (!job || !this.rows.has(jobId)) {
        this.renderJobs(); // a new job, or one gone: rows change place
        return;
      }
      this.fill(this.rows.get(jobId), job);
    },

    row(job) {
      let row = this.rows.get(job.job_id);
      if (!row) {
        row = el(
          "tr",
          { dataset: { jobId: job.job_id } },
          el("td", {}, el("div", { class: "job-name" }), el("div", { class: "job-id", text: job.job_id })),
          el("td", { text: job.task_type }),
          el("td", { class: "status" }),
          el("td", {}, el("div", { class: "bar-cell" }, bar(0), el("span", { class: "pct" }))),
          el("td", { class: "loss" }),
          el("td", { class: "submitted" })
        );
        this.rows.set(job.job_id, row);
      }
      this.fill(row, job);
      return row;
    },

    fill(row, job) {
      row.dataset.status = job.status;
      const name = row.querySelector(".job-name");
      name.replaceChildren(this.jobLink(job.job_id));
      const status = row.querySelector(".status");
      status.replaceChildren(badge(job.status));
      if (job.queue_position) status.append(el("span", { class: "muted small", text: ` #${job.queue_position}` }));
      const progress = job.progress;
      setBar(row.querySelector("[role=progressbar]"), percentOf(job), job.status === "completed");
      row.querySelector(".pct").textContent = progress && progress.max_steps ? `${progress.step}/${progress.max_steps}` : "";
      row.querySelector(".loss").textContent = progress && progress.loss != null ? num(progress.loss) : "—";
      const submitted = row.querySelector(".submitted");
      submitted.textContent = ago(job.submitted_at);
      submitted.title = `${localTime(job.submitted_at)} by ${job.submitted_by || "?"}`;
    },

    renderQueue() {
      const body = $("#queue");
      body.replaceChildren(
        ...live.queue.map((entry) =>
          el(
            "tr",
            { dataset: { jobId: entry.job_id } },
            el("td", { class: "position", text: String(entry.position) }),
            el("td", {}, this.jobLink(entry.job_id), el("div", { class: "job-id", text: `${entry.gpu_count} GPU · ${entry.submitted_by || ""}` })),
            el("td", { text: String(entry.priority) }),
            el("td", { class: "estimate" }, this.estimate(entry))
          )
        )
      );
      $("#queue-empty").hidden = live.queue.length > 0;
      $("#queue-table").hidden = live.queue.length === 0;
    },

    estimate(entry) {
      if (!entry.estimated_start_at) {
        // The basis says why, naming the job it waits on: "unknown: job … has no ETA, …".
        return el("span", { class: "basis", text: entry.estimate_basis || "unknown" });
      }
      const inSeconds = (Date.parse(entry.estimated_start_at) - Date.now()) / 1000;
      return el("span", { title: `${localTime(entry.estimated_start_at)} (${entry.estimate_basis || ""})`, text: inSeconds > 1 ? `in ${duration(inSeconds)}` : "any moment" });
    },

    tick() {
      // Relative times age between events.
      for (const [id, row] of this.rows) {
        const job = live.jobs.get(id);
        if (job) row.querySelector(".submitted").textContent = ago(job.submitted_at);
      }
      if (live.queue.length) this.renderQueue();
      if (live.nodes.length) this.renderGpus();
    },
  };

  // ------------------------------------------------------------------------------------------
  // A job's page: progress, loss curve, checkpoints, export, output, cancel and export buttons

  const jobPage = {
    jobId: null,
    job: null,
    streams: [],
    chart: null,
    losses: new Map(), // step -> {loss, eval}
    logLines: 0,

    async open(jobId) {
      if (this.jobId === jobId) return;
      this.close();
      this.jobId = jobId;
      this.job = null;
      this.losses = new Map();
      this.logLines = 0;
      $("#job-title").textContent = jobId;
      $("#job-subtitle").textContent = "";
      $("#job-status").replaceChildren();
      $("#job-logs").replaceChildren();
      $("#job-message").hidden = true;
      $("#job-cancel").hidden = true;
      $("#job-export").hidden = true;
      $("#loss-empty").hidden = false;
      $("#loss-panel").hidden = false;
      $("#job-export-section").hidden = false;
      $("#loss-chart").replaceChildren();
      this.setPoints(0, 0);
      try {
        const job = live.merge(await api(`${API}/jobs/${encodeURIComponent(jobId)}`));
        if (this.jobId !== jobId) return;
        this.update(job);
      } catch (error) {
        if (this.jobId !== jobId) return;
        $("#job-title").textContent = error.status === 404 ? "No such job" : "Could not load the job";
        $("#job-subtitle").textContent = `${jobId}: ${error.message}`;
        return;
      }
      const url = `${API}/jobs/${encodeURIComponent(jobId)}`;
      const handlers = Object.fromEntries(JOB_EVENTS.map((type) => [type, (data, id) => this.onEvent(type, data, id)]));
      this.streams.push(
        follow(`${url}/stream`, handlers, { onOpen: indicator.up, onDown: indicator.down }),
        follow(`${url}/logs/stream?tail=500`, { log: (line) => this.appendLog(line) })
      );
    },

    close() {
      for (const stream of this.streams) stream.close();
      this.streams = [];
      if (this.chart) this.chart.destroy();
      this.chart = null;
      this.jobId = null;
    },

    onEvent(type, envelope, entryId) {
      const payload = envelope.payload || {};
      if (type === "job.progress") {
        if (payload.loss != null || Object.keys(payload.eval || {}).length) {
          const point = this.losses.get(payload.step) || {};
          if (payload.loss != null) point.loss = payload.loss;
          const evalLoss = (payload.eval || {}).eval_loss;
          if (evalLoss != null) point.eval = evalLoss;
          this.losses.set(payload.step, point);
          this.drawChart();
        }
        const job = live.jobs.get(this.jobId);
        if (job && payload.attempt === job.attempt && entryOrder(job.last_entry_id, entryId) < 0) {
          job.progress = { ...payload, at: envelope.at };
          job.last_entry_id = entryId;
          this.renderProgress(job);
        }
        return;
      }
      live.refetch(this.jobId);
    },

    /** A newer record of a job: shown if it is this page's. */
    update(job) {
      if (!job || job.job_id !== this.jobId) return;
      this.job = job;
      $("#job-title").textContent = jobLabel(job);
      $("#job-subtitle").textContent = `${job.job_id} · ${job.task_type} · submitted ${localTime(job.submitted_at)} by ${job.submitted_by || "?"}`;
      const status = $("#job-status");
      status.className = `badge ${job.status}`;
      status.textContent = job.status + (job.queue_position ? ` #${job.queue_position}` : "");
      this.renderMessage(job);
      this.renderProgress(job);
      this.renderLossPanel();
      this.renderCheckpoints(job);
      this.renderExport(job);
      this.renderPlacement(job);
      const cancel = $("#job-cancel");
      cancel.hidden = TERMINAL.has(job.status);
      cancel.disabled = job.cancel_requested;
      cancel.textContent = job.cancel_requested ? "Cancelling…" : "Cancel";
      const params = job.spec.train_params;
      const exportButton = $("#job-export");
      exportButton.textContent = job.export.status === "none" ? "Export" : "Export again";
      exportButton.disabled = false;
      exportButton.hidden = !(
        job.status === "completed" &&
        params &&
        params.train_type === "lora" &&
        job.last_checkpoint &&
        !["pending", "running"].includes(job.export.status)
      );
    },

    renderMessage(job) {
      const box = $("#job-message");
      let text = "";
      if (job.status === "failed") text = `Failed${job.reason ? ` (${job.reason})` : ""}: ${job.message || ""}`;
      else if (job.status === "queued") text = "Waiting for free GPUs; see the queue for its estimated start.";
      else if (job.status === "held") text = "Held: it joins the queue once released (POST /jobs/{id}/start).";
      else if (job.cancel_requested && !TERMINAL.has(job.status)) text = "Cancel requested: the process is being stopped.";
      else if (job.status === "serving" && job.endpoint) text = `Serving an OpenAI-compatible API at ${job.endpoint}`;
      box.textContent = text;
      box.className = `message ${job.status}`;
      box.hidden = !text;
    },

    renderProgress(job) {
      const progress = job.progress;
      const percent = percentOf(job);
      setBar($("#job-progress"), percent, job.status === "completed");
      $("#job-percent").textContent = progress ? `${num(percent, 1)} %` : "";
      const metrics = [];
      if (progress) {
        metrics.push(
          ["step", progress.max_steps ? `${progress.step} / ${progress.max_steps}` : String(progress.step)],
          ["loss", num(progress.loss)],
          ["learning rate", num(progress.learning_rate)],
          ["grad norm", num(progress.grad_norm)],
          ["token accuracy", num(progress.token_acc)],
          ["epoch", num(progress.epoch, 2)],
          ["elapsed", duration(progress.elapsed_s)],
          ["remaining", TERMINAL.has(job.status) ? "—" : duration(progress.remaining_s)],
          ["speed", progress.train_speed_s_per_it != null ? `${num(progress.train_speed_s_per_it, 3)} s/it` : "—"]
        );
        for (const [name, value] of Object.entries(progress.eval || {})) metrics.push([name, num(value)]);
      }
      $("#job-metrics").replaceChildren(...metrics.map(([name, value]) => el("div", {}, el("dt", { text: name }), el("dd", { text: value }))));
    },

    /** A job that ended before any loss was reported (or a deploy job) will never have a curve. */
    renderLossPanel() {
      const job = this.job;
      const never = job && (["failed", "cancelled"].includes(job.status) || job.task_type === "deploy");
      $("#loss-panel").hidden = Boolean(never) && this.losses.size === 0;
    },

    renderCheckpoints(job) {
      const list = $("#job-checkpoints");
      const items = job.checkpoints.length ? job.checkpoints : [];
      list.replaceChildren(...items.map((path) => el("li", { text: path, title: path })));
      if (!items.length) list.append(el("li", { class: "muted", text: TERMINAL.has(job.status) ? "none" : "none yet" }));
    },

    renderExport(job) {
      const exp = job.export;
      const box = $("#job-export-status");
      box.dataset.status = exp.status;
      const words = {
        none: job.spec.auto_export && job.status !== "completed" ? "not yet: the adapters are merged when training completes" : "not exported",
        pending: "waiting for the exporter",
        running: "merging the adapters…",
        completed: "merged model ready",
        failed: `failed: ${exp.error || ""}`,
      };
      box.replaceChildren(badge(exp.status), " ", words[exp.status] || "");
      if (exp.path) box.append(el("div", { class: "path", text: exp.path }));
      // Nothing to export from a job that failed or was cancelled, nor from a deploy job.
      const never = ["failed", "cancelled"].includes(job.status) || job.task_type === "deploy";
      $("#job-export-section").hidden = exp.status === "none" && never;
    },

    renderPlacement(job) {
      const rows = [
        ["node", job.node || "—"],
        ["GPUs", job.gpu_ids.length ? job.gpu_ids.join(", ") : "—"],
        ["priority", String(job.priority)],
        ["attempt", String(job.attempt)],
        ["started", localTime(job.started_at)],
        ["finished", localTime(job.finished_at)],
      ];
      if (job.endpoint) rows.push(["endpoint", job.endpoint]);
      if (job.exit_code !== null && job.exit_code !== undefined) rows.push(["exit code", String(job.exit_code)]);
      $("#job-placement").replaceChildren(...rows.map(([name, value]) => el("div", {}, el("dt", { text: name }), el("dd", { text: value }))));
    },

    setPoints(train, evaluated) {
      const chart = $("#loss-chart");
      chart.dataset.trainPoints = String(train);
      chart.dataset.evalPoints = String(evaluated);
    },

    drawChart: null, // set below: at most ten times a second

    draw() {
      const steps = [...this.losses.keys()].sort((a, b) => a - b);
      const train = steps.map((step) => this.losses.get(step).loss ?? null);
      const evaluated = steps.map((step) => this.losses.get(step).eval ?? null);
      const trainCount = train.filter((v) => v !== null).length;
      const evalCount = evaluated.filter((v) => v !== null).length;
      this.setPoints(trainCount, evalCount);
      if (!steps.length) return;
      $("#loss-empty").hidden = true;
      this.renderLossPanel(); // before the chart is made: it takes the width of its box
      const data = [steps, train, evaluated];
      if (this.chart) {
        this.chart.setData(data);
        return;
      }
      const box = $("#loss-chart");
      this.chart = new uPlot(
        {
          width: Math.max(300, box.clientWidth),
          height: 300,
          scales: { x: { time: false } },
          axes: [{ label: "step" }, { label: "loss" }],
          series: [
            { label: "step" },
            { label: "train loss", stroke: "#2557d6", width: 2, spanGaps: true },
            { label: "eval loss", stroke: "#d97706", width: 2, spanGaps: true, points: { show: true, size: 6 } },
          ],
        },
        data,
        box
      );
    },

    appendLog(entry) {
      const pre = $("#job-logs");
      pre.append(el("span", { class: entry.fd === "stderr" ? "stderr" : null, text: `${entry.line}\n` }));
      this.logLines += 1;
      if (this.logLines > MAX_LOG_LINES) {
        pre.firstChild.remove();
        this.logLines -= 1;
      }
      if ($("#logs-follow").checked) this.scrollLogs();
    },

    scrollLogs: null, // set below: at most ten times a second

    resize() {
      if (this.chart) this.chart.setSize({ width: Math.max(300, $("#loss-chart").clientWidth), height: 300 });
    },
  };
  jobPage.drawChart = throttle(() => jobPage.draw(), 100);
  jobPage.scrollLogs = throttle(() => {
    const pre = $("#job-logs");
    pre.scrollTop = pre.scrollHeight;
  }, 100);
  window.addEventListener("resize", debounce(() => jobPage.resize(), 150));

  async function jobAction(action, button) {
    const jobId = jobPage.jobId;
    if (!jobId) return;
    if (action === "cancel" && !window.confirm("Cancel this job? A running job is stopped (a checkpoint is saved).")) return;
    button.disabled = true;
    try {
      await api(`${API}/jobs/${encodeURIComponent(jobId)}/${action}`, { method: "POST" });
      live.refetch(jobId);
    } catch (error) {
      button.disabled = false;
      if (error.status !== 401) window.alert(error.message);
    }
  }
  $("#job-cancel").addEventListener("click", (event) => jobAction("cancel", event.currentTarget));
  $("#job-export").addEventListener("click", (event) => jobAction("export", event.currentTarget));

  // ------------------------------------------------------------------------------------------
  // Submitting a job: one form per task type, with the gateway's defaults filled in

  const JOB_FIELD_ORDER = [
    "name", "model_path", "data_path", "source_job_id", "output_dir", "priority", "gpu_count", "time_limit_s",
    "auto_export", "hold", "max_retries", "gpu_model", "min_gpu_memory_mb", "node", "gpu_ids",
  ];
  const WIDE = new Set(["model_path", "data_path", "output_dir", "extra_args"]);

  const submitPage = {
    types: null, // from /supported-types
    schemas: {}, // from /openapi.json
    defaults: {}, // task type -> /params/default
    taskType: null,

    async open() {
      if (!this.types) {
        try {
          const [types, document] = await Promise.all([api(`${API}/supported-types`), api("/openapi.json")]);
          this.types = types;
          this.schemas = document.components.schemas;
        } catch (error) {
          $("#submit-error").textContent = `Could not load the task types: ${error.message}`;
          return;
        }
        this.taskType = this.types.default;
        this.renderTabs();
        await this.select(this.taskType);
      }
    },

    renderTabs() {
      $("#task-tabs").replaceChildren(
        ...this.types.task_types.map((type) =>
          el("button", {
            type: "button",
            role: "tab",
            dataset: { taskType: type.task_type },
            "aria-selected": String(type.task_type === this.taskType),
            text: type.task_type,
            onclick: () => this.select(type.task_type),
          })
        )
      );
    },

    async select(taskType) {
      this.taskType = taskType;
      for (const tab of document.querySelectorAll("#task-tabs button")) {
        tab.setAttribute("aria-selected", String(tab.dataset.taskType === taskType));
      }
      if (!this.defaults[taskType]) {
        this.defaults[taskType] = await api(`${API}/params/default?task_type=${encodeURIComponent(taskType)}`);
      }
      if (this.taskType === taskType) this.render();
    },

    get type() {
      return this.types.task_types.find((t) => t.task_type === this.taskType);
    },

    /** The job schema of a task type: the one whose task_type is that type. */
    jobSchema() {
      return Object.values(this.schemas).find((schema) => {
        const tag = schema.properties && schema.properties.task_type;
        return tag && (tag.const === this.taskType || (tag.enum && tag.enum.includes(this.taskType)));
      });
    },

    resolve(schema) {
      while (schema && schema.$ref) schema = this.schemas[schema.$ref.split("/").pop()];
      if (schema && schema.allOf && schema.allOf.length === 1) return this.resolve(schema.allOf[0]);
      return schema || {};
    },

    /** What input a field needs: integer, number, boolean, choice, string, object or array. */
    kind(schema) {
      schema = this.resolve(schema);
      if (schema.anyOf) {
        const options = schema.anyOf.map((s) => this.resolve(s)).filter((s) => s.type !== "null");
        if (options.length === 1) return this.kind(options[0]);
        return { type: "string" };
      }
      if (schema.enum) return { type: "choice", options: schema.enum };
      if (schema.const !== undefined) return { type: "choice", options: [schema.const] };
      return { type: schema.type || "string", schema };
    },

    render() {
      const job = this.jobSchema() || { properties: {}, required: [] };
      const defaults = this.defaults[this.taskType] || {};
      const paramsField = this.type.params_field;
      $("#task-runs").textContent = `Runs ${this.type.runs}.`;
      $("#params-legend").textContent = paramsField;
      const names = Object.keys(job.properties).filter((name) => name !== "task_type" && name !== paramsField);
      names.sort((a, b) => {
        const rank = (name) => (JOB_FIELD_ORDER.includes(name) ? JOB_FIELD_ORDER.indexOf(name) : JOB_FIELD_ORDER.length);
        return rank(a) - rank(b);
      });
      const required = new Set(job.required || []);
      $("#job-fields").replaceChildren(
        ...names.map((name) => {
          const schema = job.properties[name];
          const value = name in defaults ? defaults[name] : schema.default ?? this.resolve(schema).default;
          return this.field(name, schema, value, required.has(name));
        })
      );
      const params = this.resolve(job.properties[paramsField]);
      const paramDefaults = defaults[paramsField] || {};
      $("#param-fields").replaceChildren(
        ...Object.entries(params.properties || {}).map(([name, schema]) => this.field(`${paramsField}.${name}`, schema, paramDefaults[name], false))
      );
      $("#submit-error").textContent = "";
      $("#dry-run").hidden = true;
    },

    field(path, schema, value, required) {
      const name = path.split(".").pop();
      const kind = this.kind(schema);
      const description = this.resolve(schema).description || (schema && schema.description) || "";
      const id = `field-${path.replace(/\./g, "-")}`;
      let input;
      if (kind.type === "boolean") {
        input = el("input", { id, name: path, type: "checkbox", dataset: { kind: "boolean" } });
        input.checked = Boolean(value);
        return el("div", { class: "field check" }, input, el("label", { for: id, text: name, title: description }));
      }
      if (kind.type === "choice") {
        input = el("select", { id, name: path, dataset: { kind: "choice" } }, required ? null : el("option", { value: "", text: "(default)" }), kind.options.map((option) => el("option", { value: option, text: option })));
        input.value = value ?? "";
      } else if (kind.type === "object") {
        input = el("textarea", { id, name: path, rows: "2", placeholder: '{"flag": "value"}', dataset: { kind: "object" } });
        input.value = value && Object.keys(value).length ? JSON.stringify(value) : "";
      } else if (kind.type === "array") {
        input = el("input", { id, name: path, placeholder: "0, 1", dataset: { kind: "array" } });
        input.value = Array.isArray(value) ? value.join(", ") : "";
      } else {
        const numeric = kind.type === "integer" || kind.type === "number";
        input = el("input", {
          id,
          name: path,
          type: numeric ? "number" : "text",
          step: kind.type === "integer" ? "1" : numeric ? "any" : null,
          dataset: { kind: kind.type },
          spellcheck: "false",
          autocomplete: "off",
        });
        input.value = value ?? "";
      }
      return el(
        "div",
        { class: `field${WIDE.has(name) ? " wide" : ""}` },
        el("label", { for: id, title: description }, name, required ? el("span", { class: "req", text: " *" }) : null),
        input,
        description ? el("span", { class: "hint", text: description }) : null,
        el("span", { class: "field-error" })
      );
    },

    /** The request body from the form; empty inputs are left out (the gateway's default applies). */
    body() {
      const body = { task_type: this.taskType };
      const problems = [];
      for (const input of document.querySelectorAll("#submit-form [name]")) {
        const path = input.name.split(".");
        const raw = input.type === "checkbox" ? null : input.value.trim();
        let value;
        switch (input.dataset.kind) {
          case "boolean":
            value = input.checked;
            break;
          case "integer":
          case "number":
            if (raw === "") continue;
            value = Number(raw);
            if (!Number.isFinite(value) || (input.dataset.kind === "integer" && !Number.isInteger(value))) {
              problems.push([input.name, input.dataset.kind === "integer" ? "a whole number" : "a number"]);
              continue;
            }
            break;
          case "object":
            if (raw === "") continue;
            try {
              value = JSON.parse(raw);
            } catch {
              problems.push([input.name, "a JSON object"]);
              continue;
            }
            break;
          case "array":
            if (raw === "") continue;
            value = raw.split(",").map((part) => Number(part.trim()));
            if (!value.every(Number.isInteger)) {
              problems.push([input.name, "whole numbers, separated by commas"]);
              continue;
            }
            break;
          default:
            if (raw === "") continue;
            value = raw;
        }
        let target = body;
        for (const part of path.slice(0, -1)) target = target[part] ??= {};
        target[path[path.length - 1]] = value;
      }
      return { body, problems };
    },

    showProblems(problems, message) {
      for (const field of document.querySelectorAll("#submit-form .field")) {
        field.classList.remove("invalid");
        const error = field.querySelector(".field-error");
        if (error) error.textContent = "";
      }
      const unplaced = [];
      for (const [name, text] of problems) {
        const input = document.querySelector(`#submit-form [name="${CSS.escape(name)}"]`);
        const field = input && input.closest(".field");
        if (field && field.querySelector(".field-error")) {
          field.classList.add("invalid");
          field.querySelector(".field-error").textContent = text;
        } else {
          unplaced.push(`${name}: ${text}`);
        }
      }
      $("#submit-error").textContent = [message, ...unplaced].filter(Boolean).join("\n");
    },

    async submit(dryRun) {
      const { body, problems } = this.body();
      if (problems.length) {
        this.showProblems(problems.map(([name, what]) => [name, `must be ${what}`]), "Some fields need fixing.");
        return;
      }
      this.showProblems([], "");
      $("#dry-run").hidden = true;
      const buttons = [$("#submit-button"), $("#dry-run-button")];
      for (const button of buttons) button.disabled = true;
      try {
        const answer = await api(`${API}/jobs`, { method: "POST", body: dryRun ? { ...body, dry_run: true } : body });
        if (dryRun) {
          $("#dry-run").textContent = answer.shell;
          $("#dry-run").hidden = false;
        } else {
          location.hash = `#/jobs/${encodeURIComponent(answer.job_id)}`;
        }
      } catch (error) {
        if (error.status !== 401) {
          this.showProblems(error.details.map((d) => [d.field, d.message]), error.message);
        }
      } finally {
        for (const button of buttons) button.disabled = false;
      }
    },
  };

  $("#submit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitPage.submit(false);
  });
  $("#dry-run-button").addEventListener("click", () => submitPage.submit(true));
  $("#reset-button").addEventListener("click", () => submitPage.render());

  // ------------------------------------------------------------------------------------------
  // Routing: #/ (overview), #/jobs/<id>, #/submit

  function show(view) {
    for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
    for (const link of document.querySelectorAll("[data-nav]")) link.classList.toggle("active", link.dataset.nav === view);
  }

  /** Each view holds only the streams it needs (a browser allows a handful of connections to a
   * host, shared by all its tabs): the overview and the form every job event and the GPUs (on
   * the form, so that the top bar says whether the gateway is there, and the overview is
   * current when one goes back), a job's page that job's events and output. */
  function route() {
    if (!session.active || document.hidden) return;
    const hash = location.hash || "#/";
    const job = hash.match(/^#\/jobs\/([^/?#]+)$/);
    const form = hash === "#/submit";
    if (!job) jobPage.close();
    if (!job) live.follow();
    else live.unfollow();
    if (job) {
      show("job");
      jobPage.open(decodeURIComponent(job[1]));
    } else if (form) {
      show("submit");
      submitPage.open();
    } else {
      show("overview");
      overview.renderQueue();
    }
  }

  /** Close every stream; route() opens those of the view again. */
  function pause() {
    live.unfollow();
    jobPage.close();
    indicator.off();
  }

  // A tab in the background holds no connection; it catches up when shown again.
  document.addEventListener("visibilitychange", () => (document.hidden ? pause() : route()));
  window.addEventListener("hashchange", route);
  session.start();
})();
