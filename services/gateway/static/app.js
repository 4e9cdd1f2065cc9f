/* Swift Trainer dashboard: plain JavaScript, no build step.
 *
 * The page signs in once (POST /auth/token sets a short-lived HttpOnly cookie, refreshed while
 * the page is open), then everything it shows comes from the REST API and stays current through
 * Server-Sent Events: every job event (/events/stream), the GPUs (/gpus/stream), and on a job's
 * page that job's events from its start (/jobs/{id}/stream) and its output (/jobs/{id}/logs/stream).
 * The pool's page shows GPU usage (/usage) and the quota table (/admin/quotas), which an admin edits.
 */
"use strict";

(() => {
  const PREFIX = document.querySelector('meta[name="api-prefix"]').content;
  const API = `${PREFIX}/training`;
  const AUTH = `${PREFIX}/auth`;
  const QUOTAS = `${PREFIX}/admin/quotas`;
  const USAGE = `${PREFIX}/usage`;
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const JOB_EVENTS = [
    "job.accepted", "job.rejected", "job.queued", "job.held", "job.waiting", "job.dependencies_met", "job.scheduled", "job.started",
    "job.progress", "job.checkpoint_saved", "job.serving", "job.succeeded", "job.failed",
    "job.lost", "job.requeued", "job.priority_changed", "job.deleted", "job.cancel_requested", "job.cancelled",
    "job.preempted", "job.suspended", "job.stopped", "job.resumed",
    "export.requested", "export.started", "export.completed", "export.failed",
  ];
  const POOL_EVENTS = ["quotas.changed", "usage.half_life_changed"];
  const MAX_LOG_LINES = 2000;
  const JOBS_SHOWN = 100;
  const COLLAPSE_OVER = 8; // more nodes shown than this: their GPUs are collapsed until asked for
  const GPU_STATUS = { free: "free", foreign: "used by another's processes", unavailable: "unavailable: its node is not up" };

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

  /** Set an element's text only when it differs: an unchanged update touches nothing. */
  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
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
    if (value >= 1024 * 1024) return `${(value / 1024 / 1024).toFixed(1)} TiB`;
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

  /** What a job's status alone does not say: its process is still on its way out after it gave
   * up its GPUs, or it holds GPUs over its owner's quota (the first to be preempted). */
  function flags(job) {
    return [
      job.stopping ? el("span", { class: "badge stopping", title: "its process is being stopped (a checkpoint is saved)", text: "stopping" }) : null,
      job.borrowing ? el("span", { class: "badge borrowing", title: "holds GPUs over its quota: preempted first when a job within quota needs them", text: "borrowing" }) : null,
    ].filter(Boolean);
  }

  /** Whether a job may be suspended or resumed now: the gateway's view says. */
  function maySuspend(job) {
    return job.suspendable === true;
  }

  function mayResume(job) {
    return job.resumable === true;
  }

  function setBar(bar, percent, done) {
    const value = Math.max(0, Math.min(100, percent));
    bar.setAttribute("aria-valuenow", String(Math.round(value * 10) / 10));
    bar.firstElementChild.style.width = `${value}%`;
    bar.classList.toggle("done", Boolean(done));
  }

  /** A meter's bar ({bar, percent}), changed only when its value is. */
  function fillMeter(meter, percent) {
    if (meter.percent !== percent) {
      meter.percent = percent;
      setBar(meter.bar, percent);
    }
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
    who: null, // {name, role}
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
      this.who = { name: who.name, role: who.role };
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
    gpus: null, // the GPUs view, as last sent
    streams: [],
    fetching: new Map(), // job id -> debounced refetch

    /** Follow every job event and the GPUs (while the overview shows). */
    follow() {
      if (this.streams.length) return;
      const handlers = Object.fromEntries(JOB_EVENTS.map((type) => [type, (data, id) => this.onEvent(type, data, id)]));
      for (const type of POOL_EVENTS) handlers[type] = () => poolPage.changed();
      // Follow first, then load: whatever happens in between arrives on the stream.
      const types = ["job.*", "export.*", "quotas.*", "usage.*"].map((t) => `type=${encodeURIComponent(t)}`).join("&");
      this.streams.push(
        follow(`${API}/events/stream?${types}`, handlers, { onOpen: indicator.up, onDown: indicator.down }),
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
      poolPage.changed();
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
      this.gpus = view;
      this.gpusReceived = Date.now(); // heartbeat ages count on from here
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

    // The GPUs, one group per node: a summary line each, its GPUs' cards only while expanded.
    // An update changes in place only what changed (a thousand GPUs arrive twice a second).
    groups: new Map(), // node name -> {root, head, parts of its summary line, body, cards}
    expanded: new Map(), // node name -> expanded or not, as the user chose (for the page's life)

    gpuFilter() {
      return $("#gpu-filter").value.trim().toLowerCase();
    },

    /** Whether a node's GPUs show: as the user chose, else only while few nodes are shown. */
    isExpanded(name, shown) {
      return this.expanded.has(name) ? this.expanded.get(name) : shown <= COLLAPSE_OVER;
    },

    toggleNode(name) {
      const shown = Number($("#gpus").dataset.shown || 0);
      this.expanded.set(name, !this.isExpanded(name, shown));
      this.renderGpus();
    },

    /** Expand or collapse every node the filter shows. */
    expandAll(expanded) {
      const filter = this.gpuFilter();
      for (const node of (live.gpus && live.gpus.nodes) || []) {
        if (node.node.toLowerCase().includes(filter)) this.expanded.set(node.node, expanded);
      }
      this.renderGpus();
    },

    renderGpus() {
      if ($("#view-overview").hidden) return; // drawn when the overview shows again
      const box = $("#gpus");
      const nodes = (live.gpus && live.gpus.nodes) || [];
      const placeholder = $(":scope > p", box);
      if (!nodes.length) {
        for (const group of this.groups.values()) group.root.remove();
        this.groups.clear();
        if (placeholder) placeholder.textContent = "No node has reported yet.";
        else box.append(el("p", { class: "muted", text: "No node has reported yet." }));
        $("#gpu-count").textContent = "";
        return;
      }
      if (placeholder) placeholder.remove();
      const filter = this.gpuFilter();
      const shown = filter ? nodes.filter((node) => node.node.toLowerCase().includes(filter)).length : nodes.length;
      const present = new Set();
      let anchor = box.firstElementChild;
      for (const node of nodes) {
        present.add(node.node);
        let group = this.groups.get(node.node);
        if (!group) {
          group = this.nodeGroup(node.node);
          this.groups.set(node.node, group);
        }
        if (group.root !== anchor) box.insertBefore(group.root, anchor);
        else anchor = anchor.nextElementSibling;
        const visible = !filter || node.node.toLowerCase().includes(filter);
        if (group.root.hidden === visible) group.root.hidden = !visible;
        if (visible) this.fillGroup(group, node, this.isExpanded(node.node, shown));
      }
      for (const [name, group] of this.groups) {
        if (!present.has(name)) {
          group.root.remove();
          this.groups.delete(name);
        }
      }
      if (box.dataset.shown !== String(shown)) box.dataset.shown = String(shown);
      this.renderGpuCount(live.gpus.summary, nodes.length, shown, filter);
    },

    nodeGroup(name) {
      const id = `gpus-of-${name}`; // (a node's name is letters, digits and . _ -)
      const part = (cls) => el("span", { class: cls });
      const group = {
        name: el("strong", { class: "node-name", text: name }),
        state: el("span", { class: "badge node-state" }),
        simulated: el("span", { class: "badge", text: "simulated", hidden: true }),
        pips: el("span", { class: "pips", "aria-hidden": "true" }),
        gpus: part("n-gpus"),
        free: part("n-free"),
        busy: part("n-busy"),
        foreign: part("n-foreign"),
        jobs: part("n-jobs"),
        memory: part("n-memory"),
        age: part("n-age muted"),
        body: el("div", { class: "node-gpus", id, hidden: true }),
        cards: new Map(), // GPU index -> its card
        expanded: false,
      };
      group.head = el(
        "button",
        { type: "button", class: "node-head", "aria-expanded": "false", "aria-controls": id, onclick: () => this.toggleNode(name) },
        el("span", { class: "chevron", "aria-hidden": "true" }),
        group.name,
        group.state,
        group.simulated,
        group.pips,
        el("span", { class: "node-line" }, group.gpus, group.free, group.busy, group.foreign, group.jobs, group.memory, group.age)
      );
      group.root = el("section", { class: "node-group", dataset: { node: name } }, group.head, group.body);
      return group;
    },

    fillGroup(group, node, expanded) {
      const s = node.summary;
      group.node = node;
      if (group.root.dataset.state !== s.state) {
        group.root.dataset.state = s.state;
        group.state.className = `badge node-state ${s.state}`;
        group.state.textContent = s.state;
      }
      if (group.simulated.hidden === node.simulated) group.simulated.hidden = !node.simulated;
      setText(group.gpus, `${s.gpus} GPU${s.gpus === 1 ? "" : "s"}`);
      setText(group.free, `${s.free} free`);
      setText(group.busy, `${s.busy} busy`);
      group.busy.classList.toggle("zero", !s.busy);
      setText(group.foreign, s.foreign ? `${s.foreign} used elsewhere` : "");
      if (group.foreign.hidden === Boolean(s.foreign)) group.foreign.hidden = !s.foreign;
      setText(group.jobs, `${s.jobs} job${s.jobs === 1 ? "" : "s"}`);
      group.jobs.classList.toggle("zero", !s.jobs);
      setText(group.memory, `memory ${mb(s.memory_used_mb)} / ${mb(s.memory_total_mb)}`);
      this.fillAge(group);
      this.fillPips(group.pips, node);
      if (expanded !== group.expanded) {
        group.expanded = expanded;
        group.root.classList.toggle("expanded", expanded);
        group.head.setAttribute("aria-expanded", String(expanded));
        group.body.hidden = !expanded;
        if (!expanded) {
          group.body.replaceChildren(); // a collapsed node keeps no cards: the page stays light
          group.cards.clear();
        }
      }
      if (expanded) this.fillCards(group, node);
    },

    /** Its heartbeat's age now: as of the view's making, plus the time since it arrived. */
    fillAge(group) {
      const age = group.node.summary.heartbeat_age_s;
      if (age === null || age === undefined) {
        setText(group.age, "no heartbeat");
        return;
      }
      const now = age + (Date.now() - live.gpusReceived) / 1000;
      setText(group.age, now < 2 ? "heartbeat just now" : `heartbeat ${duration(now)} ago`);
    },

    /** A square per GPU: free, busy (a job holds it), used by others' processes, or unavailable. */
    fillPips(pips, node) {
      const gpus = node.gpus;
      while (pips.childElementCount > gpus.length) pips.lastElementChild.remove();
      while (pips.childElementCount < gpus.length) pips.append(el("span", { class: "pip" }));
      let pip = pips.firstElementChild;
      for (const gpu of gpus) {
        const cls = `pip ${gpu.status}`;
        if (pip.className !== cls) pip.className = cls;
        pip = pip.nextElementSibling;
      }
    },

    fillCards(group, node) {
      const present = new Set();
      let anchor = group.body.firstElementChild;
      for (const gpu of node.gpus) {
        present.add(gpu.index);
        let card = group.cards.get(gpu.index);
        if (!card) {
          card = this.gpuCard(node.node, gpu.index);
          group.cards.set(gpu.index, card);
        }
        if (card.root !== anchor) group.body.insertBefore(card.root, anchor);
        else anchor = anchor.nextElementSibling;
        this.fillCard(card, gpu);
      }
      for (const [index, card] of group.cards) {
        if (!present.has(index)) {
          card.root.remove();
          group.cards.delete(index);
        }
      }
    },

    gpuCard(nodeName, index) {
      const meter = (label) => {
        const parts = { bar: bar(0), value: el("span", { class: "value" }) };
        parts.root = el("div", { class: "meter" }, el("span", { text: label }), parts.bar, parts.value);
        return parts;
      };
      const card = {
        temperature: el("span", { class: "muted" }),
        name: el("div", { class: "gpu-name" }),
        memory: meter("memory"),
        util: meter("util"),
        holder: el("div", { class: "gpu-holder" }),
        heldBy: undefined,
      };
      card.root = el(
        "div",
        { class: "gpu", dataset: { gpu: `${nodeName}/${index}` } },
        el("div", { class: "gpu-title" }, el("span", { text: `GPU ${index}` }), card.temperature),
        card.name,
        card.memory.root,
        card.util.root,
        card.holder
      );
      return card;
    },

    fillCard(card, gpu) {
      const used = gpu.memory_used_mb;
      const total = gpu.memory_total_mb;
      const util = gpu.utilization_pct;
      card.root.classList.toggle("busy", Boolean(gpu.held_by));
      if (card.root.dataset.status !== gpu.status) card.root.dataset.status = gpu.status;
      setText(card.temperature, gpu.temperature_c != null ? `${gpu.temperature_c} °C` : "");
      if (card.name.title !== gpu.name) {
        card.name.title = gpu.name;
        card.name.textContent = gpu.name;
      }
      fillMeter(card.memory, used !== undefined && total ? (100 * used) / total : 0);
      setText(card.memory.value, used !== undefined ? `${mb(used)} / ${mb(total)}` : mb(total));
      fillMeter(card.util, util || 0);
      setText(card.util.value, util === null || util === undefined ? "—" : `${util} %`);
      const label = gpu.held_by ? jobLabel(live.jobs.get(gpu.held_by)) || gpu.held_by.slice(0, 8) : "";
      if (card.heldBy !== gpu.held_by || card.label !== label || card.status !== gpu.status) {
        card.heldBy = gpu.held_by;
        card.status = gpu.status;
        card.label = label;
        card.holder.replaceChildren(...(gpu.held_by ? ["running ", this.jobLink(gpu.held_by)] : [el("span", { class: "muted", text: GPU_STATUS[gpu.status] || gpu.status })]));
      }
    },

    /** The cluster in one line, and how many nodes the filter shows. */
    renderGpuCount(summary, total, shown, filter) {
      const plural = (n, word) => `${n.toLocaleString()} ${word}${n === 1 ? "" : "s"}`;
      const parts = [
        `${plural(summary.nodes, "node")} (${summary.nodes_up.toLocaleString()} up)`,
        `${plural(summary.gpus, "GPU")}: ${summary.free.toLocaleString()} free, ${summary.busy.toLocaleString()} busy` +
          (summary.foreign ? `, ${summary.foreign.toLocaleString()} used elsewhere` : ""),
        plural(summary.jobs, "job"),
        `memory ${mb(summary.memory_used_mb)} / ${mb(summary.memory_total_mb)}`,
      ];
      if (filter) parts.push(`showing ${shown.toLocaleString()} of ${total.toLocaleString()} nodes`);
      setText($("#gpu-count"), parts.join(" · "));
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
      for (const flag of flags(job)) status.append(" ", flag);
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
            el(
              "td",
              {},
              this.jobLink(entry.job_id),
              el("div", { class: "job-id", text: `${entry.gpu_count} GPU · ${entry.submitted_by || ""}` }),
              entry.waiting_reason === "quota" ? el("div", { class: "reason waiting", text: entry.waiting_message || "over its quota" }) : null,
              entry.order_reason ? el("div", { class: "reason order", text: entry.order_reason }) : null
            ),
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
      if (!$("#view-overview").hidden) {
        for (const group of this.groups.values()) if (group.node && !group.root.hidden) this.fillAge(group);
      }
    },
  };

  $("#gpu-filter").addEventListener("input", () => overview.renderGpus());
  $("#gpu-expand-all").addEventListener("click", () => overview.expandAll(true));
  $("#gpu-collapse-all").addEventListener("click", () => overview.expandAll(false));

  // ------------------------------------------------------------------------------------------
  // A job's page: progress, loss curve, checkpoints, export, output; cancel, suspend, resume and
  // export buttons; who preempted it, and whom it preempted

  const jobPage = {
    jobId: null,
    job: null,
    waiting: null, // its entry in the queue while queued: why it waits, and its order
    waitingTimer: null, // while queued: its entry again now and then (others' jobs move it)
    asked: null, // {action, status}: a request sent, until the job's status moves on
    streams: [],
    logStream: null, // the output shown: of rank 0, or the rank chosen
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
      $("#job-sharing").hidden = true;
      $("#job-flags").replaceChildren();
      this.waiting = null;
      this.asked = null;
      for (const id of ["#job-cancel", "#job-export", "#job-suspend", "#job-resume"]) $(id).hidden = true;
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
      this.streams.push(follow(`${url}/stream`, handlers, { onOpen: indicator.up, onDown: indicator.down }));
      // A gang job's ranks each keep their output: one shown at a time, rank 0 first
      const ranks = (this.job && this.job.spec && this.job.spec.nodes) || 1;
      const select = $("#logs-rank");
      select.replaceChildren(...Array.from({ length: ranks }, (_, rank) => el("option", { value: String(rank), text: String(rank) })));
      $("#logs-rank-label").hidden = ranks < 2;
      select.onchange = () => this.followLogs(url, Number(select.value));
      this.followLogs(url, 0);
    },

    /** The output of one rank of the job (the only one, unless a gang job), live. */
    followLogs(url, rank) {
      if (this.logStream) this.logStream.close();
      $("#job-logs").replaceChildren();
      this.logLines = 0;
      const query = rank ? `tail=500&rank=${rank}` : "tail=500";
      this.logStream = follow(`${url}/logs/stream?${query}`, { log: (line) => this.appendLog(line) });
    },

    close() {
      for (const stream of this.streams) stream.close();
      this.streams = [];
      if (this.logStream) this.logStream.close();
      this.logStream = null;
      this.followWaiting(false);
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
      $("#job-flags").replaceChildren(...flags(job));
      this.followWaiting(job.status === "queued");
      this.renderMessage(job);
      this.renderSharing(job);
      this.renderChain(job);
      this.renderProgress(job);
      this.renderLossPanel();
      this.renderCheckpoints(job);
      this.renderExport(job);
      this.renderPlacement(job);
      const cancel = $("#job-cancel");
      cancel.hidden = TERMINAL.has(job.status);
      cancel.disabled = job.cancel_requested;
      cancel.textContent = job.cancel_requested ? "Cancelling…" : "Cancel";
      // A request sent keeps its button disabled until the job's status moves on.
      if (this.asked && this.asked.status !== job.status) this.asked = null;
      const asked = this.asked ? this.asked.action : null;
      const suspend = $("#job-suspend");
      suspend.hidden = !maySuspend(job);
      suspend.disabled = asked === "suspend";
      const resume = $("#job-resume");
      resume.hidden = !mayResume(job);
      resume.disabled = asked === "resume";
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
      else if (job.status === "queued" && job.stopping) text = "Queued again: it starts once its previous attempt has stopped (a checkpoint is saved), and resumes from that checkpoint.";
      else if (job.status === "queued" && this.waiting && this.waiting.waiting_reason === "quota") text = `Waiting for its quota: ${this.waiting.waiting_message.replace(/^quota:\s*/, "")}.`;
      else if (job.status === "queued") text = "Waiting for free GPUs; see the queue for its estimated start.";
      else if (job.status === "held") text = "Held: it joins the queue once released (POST /jobs/{id}/start).";
      else if (job.status === "waiting") text = "Waiting for the jobs it depends on: it joins the queue, in its submit order, once they have ended as it needs; it holds back no one meanwhile.";
      else if (job.status === "preempted") text = "Preempted: its GPUs went to a more urgent job. Its process is being stopped with a checkpoint; then it is queued again in its original place and resumes from there.";
      else if (job.status === "suspended" && job.stopping) text = "Suspended: its GPUs are free and its process is being stopped with a checkpoint. Resume queues it again in its original place.";
      else if (job.status === "suspended") text = `Suspended${job.checkpoint_step != null ? ` at step ${job.checkpoint_step}` : ""}: Resume queues it again in its original place, to go on from its last checkpoint.`;
      else if (job.cancel_requested && !TERMINAL.has(job.status)) text = "Cancel requested: the process is being stopped.";
      else if (job.status === "serving" && job.endpoint) text = `Serving an OpenAI-compatible API at ${job.endpoint}`;
      box.textContent = text;
      box.className = `message ${job.status}`;
      box.hidden = !text;
    },

    /** Why a queued job waits (its quota) and its order in the queue, from its queue entry: the
     * jobs of others change both without an event of this job's. */
    loadWaiting: null, // set below: debounced

    followWaiting(queued) {
      if (queued) {
        this.loadWaiting();
        if (this.waitingTimer === null) this.waitingTimer = setInterval(() => this.loadWaiting(), 5000);
      } else {
        clearInterval(this.waitingTimer);
        this.waitingTimer = null;
        this.waiting = null;
      }
    },

    async fetchWaiting() {
      const jobId = this.jobId;
      if (!jobId) return;
      try {
        const entry = await api(`${API}/queue/${encodeURIComponent(jobId)}/status`);
        if (this.jobId !== jobId || !this.job || this.waitingTimer === null) return;
        this.waiting = entry.queued ? entry : null;
        this.renderMessage(this.job);
        this.renderSharing(this.job);
      } catch {
        /* the next event asks again */
      }
    },

    /** Sharing the pool: who preempted this job, whom it preempted to start, its order in the queue. */
    /** The jobs this one waits for or depends on, with their status, and the jobs that depend on it. */
    async renderChain(job) {
      const spec = job.spec;
      const upstream = [...(spec.depends_on || [])];
      if (spec.source_job_id && !upstream.includes(spec.source_job_id)) upstream.push(spec.source_job_id);
      const key = `${job.job_id}:${job.status}:${(job.waiting_on || []).join(",")}`;
      if (this.chainKey === key) return;
      this.chainKey = key;
      const one = (id) => api(`${API}/jobs/${encodeURIComponent(id)}`).catch(() => ({ job_id: id, status: "unknown" }));
      const [known, downstream] = await Promise.all([
        Promise.all(upstream.map(one)),
        api(`${API}/jobs?depends_on=${encodeURIComponent(job.job_id)}&size=100`).then((page) => page.jobs, () => []),
      ]);
      if (this.chainKey !== key) return; // a newer record came meanwhile
      const linked = (jobs) =>
        jobs.flatMap((other, i) => [
          i ? ", " : "",
          other.spec ? el("a", { href: `#/jobs/${encodeURIComponent(other.job_id)}`, text: jobLabel(other) }) : overview.jobLink(other.job_id),
          el("span", { class: `badge small dep-status ${other.status}`, text: other.status }),
        ]);
      const lines = [];
      if (upstream.length) {
        const how = spec.depends_on && spec.depends_on.length ? ` (${spec.dependency})` : "";
        lines.push(el("div", { class: "depends-on" }, `Depends on${how}: `, linked(known)));
      }
      if (job.sweep_id) {
        lines.push(el("div", { class: "sweep" }, "A point of ", el("a", { href: `#/sweeps/${encodeURIComponent(job.sweep_id)}`, text: `sweep ${job.sweep_id.slice(0, 8)}` }), `: ${pointText(job.point || {})}.`));
      }
      if (spec.source_job_id) {
        lines.push(el("div", { class: "source" }, "Serves the exported model of ", overview.jobLink(spec.source_job_id), "."));
      }
      if (job.status === "waiting" && job.waiting_on && job.waiting_on.length) {
        const link = (id) => {
          const other = known.find((k) => k.job_id === id && k.spec);
          return other ? el("a", { href: `#/jobs/${encodeURIComponent(id)}`, text: jobLabel(other) }) : overview.jobLink(id);
        };
        lines.push(el("div", { class: "waiting-on" }, "Waiting for ", job.waiting_on.flatMap((id, i) => [i ? ", " : "", link(id)]), " to end."));
      }
      if (downstream.length) {
        lines.push(el("div", { class: "needed-by" }, "Needed by: ", linked(downstream)));
      }
      const box = $("#job-chain");
      box.replaceChildren(...lines);
      box.hidden = !lines.length;
    },

    renderSharing(job) {
      const box = $("#job-sharing");
      const lines = [];
      const preemptions = job.preemptions || 0;
      if (job.preempted_by || preemptions) {
        lines.push(
          el(
            "div",
            { class: "preempted-by" },
            `Preempted ${preemptions === 1 ? "once" : `${preemptions} times`}`,
            job.preempted_by ? [", last by ", overview.jobLink(job.preempted_by)] : null,
            "."
          )
        );
      }
      const victims = job.preempted_jobs || [];
      if (victims.length) {
        const links = victims.flatMap((id, i) => (i ? [", ", overview.jobLink(id)] : [overview.jobLink(id)]));
        lines.push(el("div", { class: "preempted-jobs" }, "Preempted to start: ", links, "."));
      }
      if (job.borrowing) {
        lines.push(el("div", { text: "Borrowing: it holds GPUs over its quota, and is the first preempted when a job within quota needs them." }));
      }
      if (job.status === "queued" && this.waiting && this.waiting.order_reason) {
        lines.push(el("div", { class: "order", text: `Order: ${this.waiting.order_reason}` }));
      }
      box.replaceChildren(...lines);
      box.hidden = !lines.length;
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
        ["preemptions", String(job.preemptions || 0)],
        ["started", localTime(job.started_at)],
        ["finished", localTime(job.finished_at)],
      ];
      if (job.team) rows.splice(2, 0, ["team", job.team]);
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
  jobPage.loadWaiting = debounce(() => jobPage.fetchWaiting(), 250);
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
      if (jobPage.job && jobPage.jobId === jobId) jobPage.asked = { action, status: jobPage.job.status };
      live.refetch(jobId);
    } catch (error) {
      button.disabled = false;
      if (error.status === 409) live.refetch(jobId); // it moved on meanwhile: show where it is
      if (error.status !== 401) window.alert(error.message);
    }
  }
  $("#job-cancel").addEventListener("click", (event) => jobAction("cancel", event.currentTarget));
  $("#job-export").addEventListener("click", (event) => jobAction("export", event.currentTarget));
  $("#job-suspend").addEventListener("click", (event) => jobAction("suspend", event.currentTarget));
  $("#job-resume").addEventListener("click", (event) => jobAction("resume", event.currentTarget));

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
        const items = this.resolve((kind.schema && kind.schema.items) || {}).type === "integer" ? "integer" : "string";
        input = el("input", { id, name: path, placeholder: items === "integer" ? "0, 1" : "id, id", dataset: { kind: "array", items } });
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
            if (input.dataset.items !== "integer") {
              value = raw.split(",").map((part) => part.trim()).filter(Boolean); // e.g. depends_on: job ids
              break;
            }
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
  // The pool: GPU usage per user and team, and the quota table (an admin edits it)

  const poolPage = {
    open: false,
    quotas: null, // the table as the gateway last gave it
    editing: false, // the form holds an admin's changes not saved yet
    loaded: null, // the GET /admin/quotas answer

    show() {
      this.open = true;
      this.editing = false; // changes not saved are dropped on leaving the page
      $("#quotas-saved").textContent = "";
      this.load();
    },

    close() {
      this.open = false;
    },

    /** A job or the table changed: usage and limits with it (at most once a second). */
    changed: null, // set below

    async load() {
      await Promise.all([this.loadUsage(), this.loadQuotas()]);
    },

    async loadUsage() {
      try {
        const data = await api(USAGE);
        if (this.open) this.renderUsage(data);
        $("#usage-error").textContent = "";
      } catch (error) {
        if (error.status !== 401) $("#usage-error").textContent = `Could not load the usage: ${error.message}`;
      }
    },

    async loadQuotas() {
      try {
        const data = await api(QUOTAS);
        this.loaded = data;
        this.quotas = data.quotas || { users: {}, teams: {} };
        if (this.open && !this.editing) this.renderQuotas();
        this.renderSettings(data);
      } catch (error) {
        if (error.status === 401) return;
        this.quotas = null;
        $("#quotas").replaceChildren();
        $("#quotas-table").hidden = true;
        $("#quotas-empty").hidden = true;
        $("#quotas-actions").hidden = true;
        $("#quotas-note").textContent = "";
        $("#quotas-error").textContent = error.status === 403 ? "Only an admin sees the whole quota table; your own limits are in the usage above." : `Could not load the quotas: ${error.message}`;
      }
    },

    renderUsage(data) {
      const hours = (value) => {
        if (value === undefined || value === null) return "—";
        return value === 0 ? "0" : value < 0.01 ? "< 0.01" : value.toFixed(2);
      };
      const rows = [
        ...(data.users || []).map((row) => ({ kind: "user", ...row })),
        ...(data.teams || []).map((row) => ({ kind: "team", ...row })),
      ];
      $("#usage").replaceChildren(
        ...rows.map((row) => {
          const borrowed = row.gpus_in_use - (row.gpus_within_quota ?? row.gpus_in_use);
          return el(
            "tr",
            { dataset: { kind: row.kind, name: row.name } },
            el("td", {}, el("span", { class: "badge", text: row.kind }), " ", el("strong", { text: row.name })),
            el("td", { class: "gpus", text: String(row.gpus_in_use) + (borrowed > 0 ? ` (${borrowed} borrowed)` : "") }),
            el("td", { class: "waiting", text: String(row.jobs_waiting) }),
            el("td", { class: "day", title: String(row.gpu_hours_day), text: hours(row.gpu_hours_day) }),
            el("td", { class: "week", title: String(row.gpu_hours_week), text: hours(row.gpu_hours_week) }),
            el("td", { class: "decayed", title: String(row.decayed_gpu_hours), text: hours(row.decayed_gpu_hours) }),
            el("td", { class: "limits", text: this.limitText(row.limit) })
          );
        })
      );
      $("#usage-table").hidden = rows.length === 0;
      $("#usage-empty").hidden = rows.length > 0;
      const whose = this.admin ? "everyone's" : "yours and your team's";
      const fair = data.fair_share ? `fair share on, usage halved every ${duration(data.half_life_s)}` : "fair share off";
      $("#usage-note").textContent = `(${whose}; ${fair})`;
    },

    limitText(limit) {
      if (!limit || typeof limit !== "object") return "none";
      const parts = [];
      if (limit.gpus !== null && limit.gpus !== undefined) parts.push(`${limit.gpus} GPU${limit.gpus === 1 ? "" : "s"}`);
      if (limit.queued !== null && limit.queued !== undefined) parts.push(`${limit.queued} waiting`);
      return parts.length ? parts.join(" · ") : "none";
    },

    /** Whether the QUOTAS setting gave the table, and the names a table may use. */
    renderSettings(data) {
      const names = (list, kind) => list.map((name) => el("option", { value: name, label: kind }));
      $("#quota-names").replaceChildren(
        el("option", { value: "*", label: "every user not listed" }),
        ...names(data.known_users || [], "user"),
        ...names(data.known_teams || [], "team")
      );
      $("#pool-settings").replaceChildren(
        el("div", {}, el("dt", { text: "source" }), el("dd", { text: data.from_config ? "the QUOTAS setting" : "set at run time" })),
        el("div", {}, el("dt", { text: "users with a key" }), el("dd", { text: (data.known_users || []).join(", ") || "—" })),
        el("div", {}, el("dt", { text: "teams" }), el("dd", { text: (data.known_teams || []).join(", ") || "—" }))
      );
    },

    get admin() {
      return Boolean(session.who && session.who.role === "admin");
    },

    renderQuotas() {
      const table = this.quotas || { users: {}, teams: {} };
      const entries = [
        ...Object.entries(table.users || {}).map(([name, limit]) => ["user", name, limit]),
        ...Object.entries(table.teams || {}).map(([name, limit]) => ["team", name, limit]),
      ];
      $("#quotas").replaceChildren(...entries.map(([kind, name, limit]) => this.quotaRow(kind, name, limit)));
      this.editing = false;
      this.refreshForm();
      $("#quotas-error").textContent = "";
    },

    refreshForm() {
      const count = $("#quotas").children.length;
      $("#quotas-table").hidden = count === 0;
      $("#quotas-empty").hidden = count > 0;
      $("#quotas-actions").hidden = !this.admin;
      $("#quotas-note").textContent = this.admin ? "" : "(read only: an admin edits them)";
    },

    quotaRow(kind, name, limit) {
      const readOnly = !this.admin;
      const edited = () => {
        this.editing = true;
        $("#quotas-saved").textContent = "";
      };
      const number = (field, value) =>
        el("input", {
          type: "number",
          min: "0",
          step: "1",
          class: `quota-${field}`,
          name: field,
          placeholder: "no limit",
          "aria-label": field === "gpus" ? "GPUs" : "jobs waiting",
          disabled: readOnly,
          value: value === null || value === undefined ? null : String(value),
          oninput: edited,
        });
      const kindSelect = el(
        "select",
        { class: "quota-kind", name: "kind", "aria-label": "kind", disabled: readOnly, onchange: edited },
        el("option", { value: "user", text: "user" }),
        el("option", { value: "team", text: "team" })
      );
      kindSelect.value = kind;
      return el(
        "tr",
        { dataset: { kind, name } },
        el("td", {}, kindSelect),
        el("td", {}, el("input", { class: "quota-name", name: "name", "aria-label": "name", list: "quota-names", value: name, placeholder: "name, or * for every user", disabled: readOnly, spellcheck: "false", autocomplete: "off", oninput: edited })),
        el("td", {}, number("gpus", limit && limit.gpus)),
        el("td", {}, number("queued", limit && limit.queued)),
        el(
          "td",
          {},
          readOnly
            ? null
            : el("button", {
                type: "button",
                class: "link quota-remove",
                text: "Remove",
                onclick: (event) => {
                  event.currentTarget.closest("tr").remove();
                  edited();
                  this.refreshForm();
                },
              })
        )
      );
    },

    addRow() {
      const row = this.quotaRow("user", "", {});
      $("#quotas").append(row);
      this.editing = true;
      this.refreshForm();
      row.querySelector(".quota-name").focus();
    },

    /** The table in the form, as the body of PUT /admin/quotas; what the gateway checks (names,
     * whole numbers) it checks: its answer names what is wrong. */
    body() {
      const body = { users: {}, teams: {} };
      const problems = [];
      for (const row of $("#quotas").children) {
        const kind = row.querySelector(".quota-kind").value;
        const name = row.querySelector(".quota-name").value.trim();
        const limit = {};
        for (const field of ["gpus", "queued"]) {
          const raw = row.querySelector(`.quota-${field}`).value.trim();
          limit[field] = raw === "" ? null : Number(raw);
        }
        const group = kind === "team" ? body.teams : body.users;
        if (Object.prototype.hasOwnProperty.call(group, name)) problems.push(`${kind} ${name || "(no name)"} is listed twice`);
        group[name] = limit;
      }
      return { body, problems };
    },

    async save() {
      const { body, problems } = this.body();
      $("#quotas-saved").textContent = "";
      if (problems.length) {
        $("#quotas-error").textContent = problems.join("\n");
        return;
      }
      $("#quotas-error").textContent = "";
      const button = $("#quotas-save");
      button.disabled = true;
      try {
        await api(QUOTAS, { method: "PUT", body });
        this.editing = false;
        $("#quotas-saved").textContent = "Saved.";
        await this.load();
      } catch (error) {
        if (error.status !== 401) {
          const details = error.details.map((d) => (d.field ? `${d.field}: ${d.message}` : d.message));
          $("#quotas-error").textContent = [`Not saved (${error.status}): ${error.message}`, ...details].join("\n");
        }
      } finally {
        button.disabled = false;
      }
    },
  };
  poolPage.changed = throttle(() => {
    if (poolPage.open) poolPage.load();
  }, 1000);

  $("#quotas-form").addEventListener("submit", (event) => {
    event.preventDefault();
    poolPage.save();
  });
  $("#quota-add").addEventListener("click", () => poolPage.addRow());
  $("#quotas-revert").addEventListener("click", () => {
    poolPage.renderQuotas();
    $("#quotas-saved").textContent = "";
  });

  // ------------------------------------------------------------------------------------------
  // Sweeps: the list, and a sweep's page (every point's loss curve on one chart, a sortable table)

  const PALETTE = ["#2557d6", "#d97706", "#15803d", "#b91c1c", "#7c3aed", "#0e7490", "#be185d", "#4d7c0f", "#a16207", "#475569"];
  const colourOf = (i) => (i < PALETTE.length ? PALETTE[i] : `hsl(${(i * 137.5) % 360}, 65%, 42%)`);
  const pointText = (point) => Object.entries(point).map(([name, value]) => `${name}=${value}`).join(" ");
  const lossText = (value) => (value == null ? "—" : Number(value).toPrecision(4));
  /** A colour square (set through the CSSOM: the page's policy allows no inline style). */
  const swatch = (colour) => {
    const square = el("span", { class: "swatch" });
    square.style.backgroundColor = colour;
    return square;
  };

  const sweepsPage = {
    async show() {
      try {
        const { sweeps } = await api(`${API}/sweeps`);
        $("#sweeps-empty").hidden = sweeps.length > 0;
        $("#sweeps").replaceChildren(
          ...sweeps.map((sweep) => {
            const status = Object.entries(sweep.counts).map(([name, n]) => `${n} ${name}`).join(", ");
            const best = sweep.best ? `${pointText(sweep.best.point)} (${sweep.best.metric} ${lossText(sweep.best.value)})` : "—";
            return el(
              "tr",
              { dataset: { sweepId: sweep.sweep_id } },
              el("td", {}, el("a", { href: `#/sweeps/${encodeURIComponent(sweep.sweep_id)}`, text: sweep.name || sweep.sweep_id.slice(0, 8) })),
              el("td", { text: localTime(sweep.created_at) }),
              el("td", { text: String(sweep.points) + (sweep.max_concurrent ? ` (${sweep.max_concurrent} at once)` : "") }),
              el("td", { text: status }),
              el("td", { text: best })
            );
          })
        );
        $("#sweeps-error").textContent = "";
      } catch (error) {
        if (error.status !== 401) $("#sweeps-error").textContent = `Could not load the sweeps: ${error.message}`;
      }
    },
  };

  const sweepPage = {
    sweepId: null,
    sweep: null,
    losses: new Map(), // job id -> Map(step -> loss)
    stream: null,
    chart: null,
    sort: { key: "index", asc: true },

    async open(sweepId) {
      if (this.sweepId === sweepId) return;
      this.close();
      this.sweepId = sweepId;
      this.losses = new Map();
      $("#sweep-title").textContent = sweepId;
      $("#sweep-subtitle").textContent = "";
      $("#sweep-chart").replaceChildren();
      $("#sweep-chart").dataset.series = "0";
      $("#sweep-chart-empty").hidden = false;
      $("#sweep-points").replaceChildren();
      $("#sweep-best").hidden = true;
      if (!(await this.load())) return;
      // Follow first, then read each point's history: whatever happens in between arrives on the stream.
      const handlers = Object.fromEntries(JOB_EVENTS.map((type) => [type, (data) => this.onEvent(type, data)]));
      this.stream = follow(`${API}/events/stream?type=${encodeURIComponent("job.*")}`, handlers, { onOpen: indicator.up, onDown: indicator.down });
      await Promise.all(this.sweep.points.map((point) => this.loadHistory(point.job_id)));
      this.drawChart();
    },

    close() {
      if (this.stream) this.stream.close();
      this.stream = null;
      if (this.chart) this.chart.destroy();
      this.chart = null;
      this.sweepId = null;
    },

    async load() {
      const sweepId = this.sweepId;
      try {
        const sweep = await api(`${API}/sweeps/${encodeURIComponent(sweepId)}`);
        if (this.sweepId !== sweepId) return false;
        this.sweep = sweep;
        this.render();
        return true;
      } catch (error) {
        if (this.sweepId !== sweepId) return false;
        $("#sweep-title").textContent = error.status === 404 ? "No such sweep" : "Could not load the sweep";
        $("#sweep-subtitle").textContent = `${sweepId}: ${error.message}`;
        return false;
      }
    },

    reload: null, // set below: a point's status changed (at most four times a second)

    async loadHistory(jobId) {
      try {
        const { events } = await api(`${API}/jobs/${encodeURIComponent(jobId)}/events`);
        for (const event of events) if (event.type === "job.progress") this.addLoss(jobId, event.payload);
      } catch {
        /* a deleted point has no history to show */
      }
    },

    addLoss(jobId, payload) {
      if (!payload || payload.loss == null) return;
      if (!this.losses.has(jobId)) this.losses.set(jobId, new Map());
      this.losses.get(jobId).set(payload.step, payload.loss);
    },

    onEvent(type, envelope) {
      if (!this.sweep || !this.sweep.points.some((point) => point.job_id === envelope.job_id)) return;
      if (type === "job.progress") {
        this.addLoss(envelope.job_id, envelope.payload);
        this.drawChart();
        return;
      }
      this.reload();
    },

    render() {
      const sweep = this.sweep;
      $("#sweep-title").textContent = sweep.name || `Sweep ${sweep.sweep_id.slice(0, 8)}`;
      const grid = Object.entries(sweep.grid).map(([name, values]) => `${name} ∈ {${values.join(", ")}}`).join(" × ");
      const cap = sweep.max_concurrent ? `, at most ${sweep.max_concurrent} at once` : "";
      $("#sweep-subtitle").textContent = `${sweep.sweep_id} · ${sweep.points.length} points: ${grid}${cap} · created ${localTime(sweep.created_at)} by ${sweep.created_by || "?"}`;
      const best = $("#sweep-best");
      best.hidden = !sweep.best;
      if (sweep.best) best.textContent = `Best so far: ${pointText(sweep.best.point)}, ${sweep.best.metric} ${lossText(sweep.best.value)}.`;
      const cancel = $("#sweep-cancel");
      cancel.hidden = sweep.ended;
      cancel.disabled = false;
      this.renderTable();
    },

    renderTable() {
      const sweep = this.sweep;
      const fields = Object.keys(sweep.grid);
      const columns = [...fields.map((name) => [name, name]), ["status", "status"], ["step", "step"], ["train_loss", "train loss"], ["eval_loss", "eval loss"]];
      $("#sweep-head").replaceChildren(
        el(
          "tr",
          {},
          el("th", { text: "#", dataset: { sort: "index" } }),
          ...columns.map(([key, label]) => el("th", { text: label, dataset: { sort: key } }))
        )
      );
      for (const th of document.querySelectorAll("#sweep-head th")) {
        th.classList.toggle("sorted-asc", th.dataset.sort === this.sort.key && this.sort.asc);
        th.classList.toggle("sorted-desc", th.dataset.sort === this.sort.key && !this.sort.asc);
        th.onclick = () => {
          this.sort = { key: th.dataset.sort, asc: this.sort.key === th.dataset.sort ? !this.sort.asc : true };
          this.renderTable();
        };
      }
      const value = (point, index, key) => (key === "index" ? index : key in point.point ? point.point[key] : point[key]);
      const rows = sweep.points.map((point, index) => ({ point, index }));
      const { key, asc } = this.sort;
      rows.sort((a, b) => {
        const x = value(a.point, a.index, key);
        const y = value(b.point, b.index, key);
        if (x == null && y == null) return a.index - b.index;
        if (x == null) return 1; // no value last, either way
        if (y == null) return -1;
        return (x < y ? -1 : x > y ? 1 : a.index - b.index) * (asc ? 1 : -1);
      });
      const bestId = sweep.best ? sweep.best.job_id : null;
      $("#sweep-points").replaceChildren(
        ...rows.map(({ point, index }) =>
          el(
            "tr",
            { class: point.job_id === bestId ? "best" : null, dataset: { jobId: point.job_id, status: point.status } },
            el("td", {}, swatch(colourOf(index)), el("a", { href: `#/jobs/${encodeURIComponent(point.job_id)}`, text: String(index + 1) })),
            ...fields.map((name) => el("td", { text: String(point.point[name]) })),
            el("td", {}, badge(point.status)),
            el("td", { text: point.step != null ? `${point.step}/${point.max_steps}` : "—" }),
            el("td", { class: "train-loss", text: lossText(point.train_loss) }),
            el("td", { class: "eval-loss", text: lossText(point.eval_loss) })
          )
        )
      );
    },

    drawChart: null, // set below: at most ten times a second

    draw() {
      if (!this.sweep) return;
      const points = this.sweep.points;
      const steps = [...new Set(points.flatMap((point) => [...(this.losses.get(point.job_id) || new Map()).keys()]))].sort((a, b) => a - b);
      const drawn = points.filter((point) => this.losses.has(point.job_id)).length;
      $("#sweep-chart").dataset.series = String(drawn);
      if (!steps.length) return;
      $("#sweep-chart-empty").hidden = true;
      const data = [steps, ...points.map((point) => steps.map((step) => (this.losses.get(point.job_id) || new Map()).get(step) ?? null))];
      if (this.chart && this.chart.series.length === points.length + 1) {
        this.chart.setData(data);
        return;
      }
      if (this.chart) this.chart.destroy();
      const box = $("#sweep-chart");
      this.chart = new uPlot(
        {
          width: Math.max(300, box.clientWidth),
          height: 320,
          scales: { x: { time: false } },
          axes: [{ label: "step" }, { label: "train loss" }],
          series: [
            { label: "step" },
            ...points.map((point, index) => ({ label: `${index + 1}: ${pointText(point.point)}`, stroke: colourOf(index), width: 2, spanGaps: true })),
          ],
        },
        data,
        box
      );
    },
  };
  sweepPage.drawChart = throttle(() => sweepPage.draw(), 100);
  sweepPage.reload = debounce(() => sweepPage.load(), 250);
  $("#sweep-cancel").addEventListener("click", async (event) => {
    const sweepId = sweepPage.sweepId;
    if (!sweepId || !window.confirm("Cancel every job of this sweep that has not ended?")) return;
    event.currentTarget.disabled = true;
    try {
      await api(`${API}/sweeps/${encodeURIComponent(sweepId)}/cancel`, { method: "POST" });
      sweepPage.reload();
    } catch (error) {
      event.currentTarget.disabled = false;
      if (error.status !== 401) window.alert(error.message);
    }
  });
  window.addEventListener("resize", debounce(() => sweepPage.chart && sweepPage.chart.setSize({ width: Math.max(300, $("#sweep-chart").clientWidth), height: 320 }), 150));

  // ------------------------------------------------------------------------------------------
  // Routing: #/ (overview), #/jobs/<id>, #/submit, #/pool

  function show(view) {
    for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
    for (const link of document.querySelectorAll("[data-nav]")) link.classList.toggle("active", link.dataset.nav === view);
  }

  /** Each view holds only the streams it needs (a browser allows a handful of connections to a
   * host, shared by all its tabs): the overview, the form and the pool's page every job event
   * and the GPUs (elsewhere than the overview, so that the top bar says whether the gateway is
   * there, the overview is current when one goes back, and usage follows the jobs), a job's page
   * that job's events and output. */
  function route() {
    if (!session.active || document.hidden) return;
    const hash = location.hash || "#/";
    const job = hash.match(/^#\/jobs\/([^/?#]+)$/);
    const form = hash === "#/submit";
    const pool = hash === "#/pool";
    const sweeps = hash === "#/sweeps";
    const sweep = hash.match(/^#\/sweeps\/([^/?#]+)$/);
    if (!job) jobPage.close();
    if (!pool) poolPage.close();
    if (!sweep) sweepPage.close();
    if (!job && !sweep) live.follow();
    else live.unfollow();
    if (sweep) {
      show("sweep");
      sweepPage.open(decodeURIComponent(sweep[1]));
    } else if (sweeps) {
      show("sweeps");
      sweepsPage.show();
    } else if (job) {
      show("job");
      jobPage.open(decodeURIComponent(job[1]));
    } else if (form) {
      show("submit");
      submitPage.open();
    } else if (pool) {
      show("pool");
      poolPage.show();
    } else {
      show("overview");
      overview.renderQueue();
      overview.renderGpus();
    }
  }

  /** Close every stream; route() opens those of the view again. */
  function pause() {
    live.unfollow();
    jobPage.close();
    poolPage.close();
    sweepPage.close();
    indicator.off();
  }

  // A tab in the background holds no connection; it catches up when shown again.
  document.addEventListener("visibilitychange", () => (document.hidden ? pause() : route()));
  window.addEventListener("hashchange", route);
  session.start();
})();
