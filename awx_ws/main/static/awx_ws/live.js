// The live page: jobs with their status as it changes, and a job's event lines as they arrive.
import { AwxWsClient } from "./client.js";

// Job kind -> the kind of its event group (awx_ws/main/notifications.py).
const EVENT_KINDS = {
  job: "job_events",
  workflow_job: "workflow_events",
  ad_hoc_command: "ad_hoc_command_events",
  project_update: "project_update_events",
  inventory_update: "inventory_update_events",
  system_job: "system_job_events",
};
const STATE_LABELS = { connecting: "connecting…", open: "live", reconnecting: "reconnecting…", closed: "closed" };

const connection = document.getElementById("connection");
const jobsBody = document.querySelector("#jobs tbody");
const jobPane = document.getElementById("job-pane");
const jobTitle = document.getElementById("job-title");
const eventsBox = document.getElementById("events");

// What tests and curious operators can read: how the page got its lines.
// refetches: the stream could not be resumed; gapFills: events the server held back over its
// event rate (AWX_WS_MAX_WEBSOCKET_EVENT_RATE), read from the API instead; eventReads: pages of
// events read from the API.
const live = (window.awxLive = { reconnects: 0, refetches: 0, gapFills: 0, eventReads: 0, errors: [] });

const client = new AwxWsClient({
  onState: (state) => {
    if (state === "reconnecting" && connection.dataset.state !== "reconnecting") live.reconnects += 1;
    connection.dataset.state = state;
    connection.textContent = STATE_LABELS[state] || state;
  },
  onError: (error) => live.errors.push(error),
});

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

// --- jobs ---------------------------------------------------------------------------------

const rows = new Map(); // job id -> <tr>

function showJob(job) {
  let row = rows.get(job.id);
  if (!row) {
    row = document.createElement("tr");
    row.dataset.jobId = job.id;
    row.innerHTML = '<td class="id"></td><td class="name"></td><td class="kind"></td><td class="status"></td>';
    row.addEventListener("click", () => openJob(job));
    rows.set(job.id, row);
    jobsBody.prepend(row);
  }
  row.querySelector(".id").textContent = job.id;
  row.querySelector(".name").textContent = job.name;
  row.querySelector(".kind").textContent = job.kind;
  setStatus(job.id, job.status);
}

function setStatus(jobId, status) {
  const cell = rows.get(jobId)?.querySelector(".status");
  if (!cell) return;
  cell.textContent = status;
  cell.dataset.status = status;
}

client.on("jobs-status_changed", async (data) => {
  if (rows.has(data.unified_job_id)) setStatus(data.unified_job_id, data.status);
  else showJob(await api(`/api/v2/jobs/${data.unified_job_id}/`));
});

async function loadJobs() {
  let url = "/api/v2/jobs/?page_size=200";
  const jobs = [];
  while (url) {
    const page = await api(url);
    jobs.push(...page.results);
    url = page.next;
  }
  jobs.sort((a, b) => a.id - b.id).forEach(showJob);
}

// --- one job's event lines ----------------------------------------------------------------

let current = null; // { job, group, lines: Map(counter -> element), off }

// Lines in counter order, whatever order they come in; the API and the stream may overlap.
function addLines(events) {
  if (!current) return;
  // Follow the output while the reader is at its end; leave the scroll alone otherwise.
  const following = eventsBox.scrollTop + eventsBox.clientHeight >= eventsBox.scrollHeight - 4;
  for (const event of events) {
    if (current.lines.has(event.counter)) continue;
    const line = document.createElement("div");
    line.className = "line";
    line.dataset.counter = event.counter;
    line.textContent = event.stdout || event.event;
    current.lines.set(event.counter, line);
    current.last = Math.max(current.last, event.counter);
    // From the end back: a line read from the API lands just before the few live ones after it.
    let after = null;
    for (let el = eventsBox.lastElementChild; el && Number(el.dataset.counter) > event.counter; el = el.previousElementSibling) {
      after = el;
    }
    eventsBox.insertBefore(line, after);
  }
  if (following) eventsBox.scrollTop = eventsBox.scrollHeight;
}

// The API's largest page: a burst of thousands costs a few requests, not one per hundred events.
const PAGE_SIZE = 1000;

async function fetchEvents(after, before) {
  const job = current.job;
  let url = `/api/v2/jobs/${job.id}/job_events/?counter__gt=${after}&page_size=${PAGE_SIZE}`;
  if (before !== undefined) url += `&counter__lt=${before}`;
  const read = (next) => {
    live.eventReads += 1;
    return api(next);
  };
  // The next page is on its way while this one's lines go in.
  let reading = read(url);
  while (reading) {
    const page = await reading;
    reading = page.next && current?.job === job ? read(page.next) : null;
    if (current?.job === job) addLines(page.results);
  }
}

// Over its event rate the server stores a job's events but does not send them all (AWX's flood
// policy); within a second it names the counters it held back (onHeldBack, docs/api.md). It never
// sends events with nothing to show: a counter that jumps shows those. The job's summary
// (final_counter) shows a missing tail. The API has them all. Gaps are merged and read a moment
// after the first shows, one read at a time, once the first read of the API is done (it covers
// what came before): a flood costs the API a few requests a second per viewer, not one per event.
const GAP_DELAY_MS = 250;

function want(view, after, before, delay = GAP_DELAY_MS) {
  view.gap.after = Math.min(view.gap.after, after);
  view.gap.before = Math.max(view.gap.before, before);
  if (view.gap.timer === null) view.gap.timer = setTimeout(() => fillGap(view), delay);
}

function onEvent(event) {
  if (current?.loaded && event.counter > current.last + 1) want(current, current.last, event.counter);
  addLines([event]);
}

function onHeldBack(notice) {
  const first = Math.min(...notice.ranges.map(([start]) => start));
  const last = Math.max(...notice.ranges.map(([, end]) => end));
  // The server sends at most one notice a second per job: read at once, nothing to merge.
  want(current, first - 1, last + 1, 0);
}

async function fillGap(view) {
  if (view !== current) return;
  const gap = view.gap;
  if (!view.loaded) {
    gap.timer = setTimeout(() => fillGap(view), GAP_DELAY_MS);
    return;
  }
  const [after, before] = [gap.after, gap.before];
  gap.after = Infinity;
  gap.before = 0;
  live.gapFills += 1;
  try {
    await fetchEvents(after, before);
    gap.failures = 0;
  } catch (error) {
    // The notice came once: a failed read is wanted again (backing off), not dropped.
    live.errors.push(String(error));
    gap.failures += 1;
    gap.after = Math.min(gap.after, after);
    gap.before = Math.max(gap.before, before);
  } finally {
    const delay = gap.failures ? Math.min(10000, GAP_DELAY_MS * 2 ** gap.failures) : GAP_DELAY_MS;
    gap.timer = gap.before ? setTimeout(() => fillGap(view), delay) : null;
  }
}

client.on("jobs-summary", (data) => {
  // Counters run from 1 to final_counter: fewer lines than that, and some are missing.
  if (current?.loaded && current.job.id === data.unified_job_id && current.lines.size < data.final_counter) {
    want(current, 0, data.final_counter + 1);
  }
});

async function openJob(job) {
  if (current) current.off();
  const kind = EVENT_KINDS[job.kind];
  const group = `${kind}-${job.id}`;
  current = {
    job,
    group,
    lines: new Map(),
    last: 0, // the highest counter shown
    gap: { after: Infinity, before: 0, timer: null, failures: 0 }, // counters strictly between: to read
    loaded: false,
    off: () => {},
  };
  eventsBox.replaceChildren();
  jobTitle.textContent = `${job.name} (#${job.id})`;
  jobPane.hidden = false;
  window.location.hash = `job-${job.id}`;
  // Subscribe first and wait until the server has it, then read what is already there: nothing
  // falls in between (an event emitted before the subscription took effect is in the API's list).
  current.off = client.on(group, onEvent, {
    onHeldBack,
    onReset: () => {
      live.refetches += 1;
      fetchEvents(current.last); // the history could not reach back: ask the API
    },
  });
  await client.subscribe({ jobs: ["status_changed", "summary"], [kind]: [job.id] });
  const opened = current;
  await fetchEvents(0);
  opened.loaded = true;
}

client.subscribe({ jobs: ["status_changed", "summary"] });
await loadJobs();
const wanted = window.location.hash.match(/^#job-(\d+)$/);
if (wanted) openJob(await api(`/api/v2/jobs/${wanted[1]}/`));
document.body.dataset.ready = "true";
