// awx_ws browser client: one websocket, AWX's subscribe protocol, reconnect and recovery.
//
//   import { AwxWsClient } from "/static/awx_ws/client.js";
//   const client = new AwxWsClient({ onState: (state) => ... });
//   client.subscribe({ jobs: ["status_changed"], job_events: [42] });
//   client.on("jobs-status_changed", (data) => ...);
//   client.on("job_events-42", (data) => ..., {
//     onReset: (reason) => refetch(),
//     onHeldBack: (notice) => fetchCounters(notice.ranges), // events over the server's rate
//   });
//
// Authentication: the session cookie with the csrftoken cookie as xrftoken (a logged-in page), or
// a token (`new AwxWsClient({ token })`), set as AWX's `token` cookie for this site: browsers
// cannot set headers on a websocket, and a token in the URL would end up in logs and history. The client asks for ids, keeps each group's position, and after a reconnect
// re-subscribes with `recover`: the server replays what was missed, then live messages follow, so
// handlers see every message once. When the history cannot reach back the group's onReset is
// called: the page refetches over the API. Over its event rate the server stores a job's events
// but sends only some, then names the others in a notice (`"group_name": "events_held_back"`,
// docs/api.md): onHeldBack gets it, onMessage never does. Protocol: docs/channels.md.

// The group_name of the server's notice of events held back over its rate (awx_ws/main/held_back.py).
const HELD_BACK = "events_held_back";

function cookie(name) {
  const match = document.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
  return match ? decodeURIComponent(match[1]) : null;
}

function defaultUrl() {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${window.location.host}/websocket/`;
}

function groupNames(groups) {
  const names = [];
  for (const [kind, items] of Object.entries(groups)) {
    for (const item of items) names.push(`${kind}-${item}`);
  }
  return names;
}

export class AwxWsClient {
  constructor({ url = defaultUrl(), token = null, minDelay = 500, maxDelay = 10000, onState = () => {}, onError = () => {} } = {}) {
    if (token) {
      const secure = window.location.protocol === "https:" ? "; Secure" : "";
      document.cookie = `token=${encodeURIComponent(token)}; path=/; SameSite=Strict${secure}`;
    }
    this.url = url;
    this.minDelay = minDelay;
    this.maxDelay = maxDelay;
    this.onState = onState;
    this.onError = onError;
    this.groups = {};
    this.handlers = new Map(); // group -> [{ onMessage, onReset }]
    this.positions = new Map(); // group -> position to recover from
    // subscribe() promises waiting for the server's groups reply to their frame: subscribe frames
    // sent and groups replies received on the current socket, in order.
    this.waiters = [];
    this.sent = 0;
    this.acked = 0;
    this.attempt = 0;
    this.closed = false;
    this.state = "idle";
    this.connect();
  }

  // Replace the subscription with these groups ({kind: [items]}). The promise resolves with the
  // server's groups reply: from then on the groups' messages arrive, so a page that reads what
  // is already there over the API after it leaves no gap.
  subscribe(groups) {
    this.groups = groups;
    const wanted = new Set(groupNames(groups));
    for (const group of [...this.positions.keys()]) {
      if (!wanted.has(group)) this.positions.delete(group);
    }
    const waiter = { resolve: null, needs: null };
    const acknowledged = new Promise((resolve) => (waiter.resolve = resolve));
    this.waiters.push(waiter);
    if (this.state === "open") {
      this.send({ groups, ids: true });
      waiter.needs = this.sent; // the reply to this very frame
    } // else: the subscribe sent once the socket opens answers it (receive, accept)
    return acknowledged;
  }

  // Call onMessage(data, {group, id}) for each message of group; onReset(reason) when missed
  // messages cannot be replayed; onHeldBack(notice) when the server held events of the group
  // back (fetch notice.ranges from the API). Returns a function that removes the handler.
  on(group, onMessage, { onReset = () => {}, onHeldBack = () => {} } = {}) {
    const entry = { onMessage, onReset, onHeldBack };
    if (!this.handlers.has(group)) this.handlers.set(group, []);
    this.handlers.get(group).push(entry);
    return () => this.handlers.set(group, this.handlers.get(group).filter((e) => e !== entry));
  }

  close() {
    this.closed = true;
    if (this.socket) this.socket.close();
    this.setState("closed");
  }

  connect() {
    this.setState(this.attempt === 0 ? "connecting" : "reconnecting");
    const socket = new WebSocket(this.url);
    this.socket = socket;
    socket.onmessage = (event) => this.receive(JSON.parse(event.data));
    socket.onclose = () => {
      if (this.socket !== socket || this.closed) return;
      this.socket = null;
      this.setState("reconnecting");
      // Exponential backoff with jitter, so a restarted server is not hit by everyone at once.
      const delay = Math.min(this.maxDelay, this.minDelay * 2 ** this.attempt) * (0.5 + Math.random() / 2);
      this.attempt += 1;
      setTimeout(() => this.connect(), delay);
    };
  }

  send(frame) {
    this.socket.send(JSON.stringify({ ...frame, xrftoken: cookie("csrftoken") }));
    if ("groups" in frame) this.sent += 1;
  }

  setState(state) {
    this.state = state;
    this.onState(state);
  }

  receive(frame) {
    if (frame.accept) {
      this.attempt = 0;
      this.setState("open");
      const recover = {};
      for (const group of groupNames(this.groups)) {
        if (this.positions.has(group)) recover[group] = this.positions.get(group);
      }
      this.sent = this.acked = 0; // a new socket: replies to the old one's frames will not come
      this.send({ groups: this.groups, ids: true, ...(Object.keys(recover).length ? { recover } : {}) });
      for (const waiter of this.waiters) waiter.needs = this.sent; // this frame holds every group
    } else if ("groups_current" in frame) {
      for (const [group, position] of Object.entries(frame.positions || {})) {
        if (!this.positions.has(group)) this.positions.set(group, position);
      }
      this.acked += 1;
      const answered = this.waiters.filter((w) => w.needs !== null && w.needs <= this.acked);
      this.waiters = this.waiters.filter((w) => !answered.includes(w));
      for (const waiter of answered) waiter.resolve(frame);
    } else if ("recovered" in frame) {
      for (const [group, position] of Object.entries(frame.positions || {})) {
        this.positions.set(group, position);
      }
      for (const [group, reason] of Object.entries(frame.reset || {})) {
        for (const handler of this.handlers.get(group) || []) handler.onReset(reason);
      }
    } else if ("error" in frame) {
      this.onError(frame.error);
    } else if ("group" in frame) {
      if (frame.id) this.positions.set(frame.group, frame.id);
      const heldBack = frame.data?.group_name === HELD_BACK;
      for (const handler of this.handlers.get(frame.group) || []) {
        if (heldBack) handler.onHeldBack(frame.data);
        else handler.onMessage(frame.data, { group: frame.group, id: frame.id });
      }
    }
  }
}
