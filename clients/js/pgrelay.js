// pgrelay's JavaScript client: live copies of tables over one WebSocket.
//
// An ES module with no dependencies and no build step; the relay serves it at /client.js.
//
//   import { Relay } from "/client.js";
//   const relay = new Relay();                       // same origin; or new Relay({url, token})
//   const items = relay.subscribe("items", { filter: { price: "gt.10" } });
//   items.on("change", () => render([...items.rows.values()]));
//
// What it keeps exact: `rows` is a Map from primary key to row that always equals the rows the
// subscription selects, as of the last event received. It loads the initial rows, applies every
// event by key (a key change arrives as a delete and a create; `truncate` empties it), and after
// a lost connection reconnects with backoff and jitter and resumes from the last position; when
// the relay cannot prove the resume complete (`reset`), it loads the initial rows again. Keys
// are the key value for a one-column key and a JSON array of the key values, in key order, for
// a composite key.

/** Close codes after which reconnecting with the same settings cannot succeed. */
const FATAL_CLOSE = new Map([
  [4001, "unauthorized"],
  [4004, "not_found"],
  [4400, "bad_request"],
]);

/** How long a connection may stay silent while initial rows are awaited: the relay sends nothing
 * while it reads them (a large or locked table), and gives up on its own after its snapshot
 * deadline (120 s by default). */
const LOAD_SILENCE = 125_000;

/** Subscription error codes that retrying will not fix (the others are retried). */
const FATAL_ERRORS = new Set([
  "bad_request",
  "too_many_subscriptions",
  "subscription_ended",
  "forbidden",
]);

/** Keys of a subscribe message that are not filters (a column so named cannot be filtered on /ws). */
const MESSAGE_KEYS = new Set(["type", "resource", "select", "events", "since", "snapshot", "batch"]);

/** An error the relay reported, or a connection failure. */
export class RelayError extends Error {
  constructor(code, message, { resource = null, closeCode = null } = {}) {
    super(message);
    this.name = "RelayError";
    /** The relay's error code (`not_found`, `bad_request`, `unauthorized`, …). */
    this.code = code;
    /** The table the error is about, if it is about one. */
    this.resource = resource;
    /** The WebSocket close code that carried it, if any. */
    this.closeCode = closeCode;
  }
}

/** A tiny event emitter: `on(type, fn)` returns a function that removes the listener. */
class Emitter {
  #listeners = new Map();

  on(type, listener) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(listener);
    return () => this.#listeners.get(type)?.delete(listener);
  }

  emit(type, ...args) {
    for (const listener of this.#listeners.get(type) ?? []) {
      try {
        listener(...args);
      } catch (err) {
        // A listener's bug must not stop the stream for the others.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }
}

/** The WebSocket URL of a relay given as http(s)://, ws(s):// or nothing (this page's origin). */
function socketUrl(url) {
  let base = url;
  if (base === undefined) {
    if (typeof location === "undefined") throw new TypeError("pgrelay: pass { url } outside a browser");
    base = location.origin;
  }
  const parsed = new URL(base);
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (!/\/ws\/?$/.test(parsed.pathname)) parsed.pathname = parsed.pathname.replace(/\/?$/, "/ws");
  return parsed.toString();
}

/** A connection to a relay: one WebSocket, any number of table subscriptions. */
export class Relay extends Emitter {
  /**
   * @param {object} [options]
   * @param {string} [options.url] the relay (`http://host:8080`); default: this page's origin
   * @param {string | (() => string | Promise<string>)} [options.token] a JWT or API key, or a
   *   function returning a fresh one (called at every connect and before `exp`)
   * @param {number} [options.minBackoff] first reconnect delay, ms (250)
   * @param {number} [options.maxBackoff] longest reconnect delay, ms (10000)
   * @param {number} [options.heartbeat] ping interval, ms (15000); a connection silent for
   *   two intervals is dropped and reconnected
   * @param {typeof WebSocket} [options.WebSocket] a WebSocket class (Node.js before 22: `ws`)
   */
  constructor(options = {}) {
    super();
    this.url = socketUrl(options.url);
    this.options = {
      minBackoff: 250,
      maxBackoff: 10_000,
      heartbeat: 15_000,
      ...options,
    };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (!this.WebSocket) throw new TypeError("pgrelay: no WebSocket class; pass { WebSocket }");
    /** `connecting`, `open`, `waiting` (to reconnect) or `closed` (by `close()` or a fatal error). */
    this.status = "connecting";
    this.subscriptions = new Map();
    this.socket = null;
    this.attempt = 0;
    this.closed = false;
    this.timers = { reconnect: null, heartbeat: null, refresh: null };
    /** Pings sent and pongs received on this socket; resource → the pong that ends its fence. */
    this.pings = 0;
    this.pongs = 0;
    this.fences = new Map();
    this.#connect();
  }

  /**
   * Subscribes to a table. Its `rows` follow the table (or the filtered part of it).
   * @param {string} resource `items`, or `schema.table`
   * @param {object} [options]
   * @param {Record<string, string>} [options.filter] PostgREST filters: `{price: "gt.10", or: "(a.eq.1,b.is.null)"}`
   * @param {string | string[]} [options.select] columns to keep (the key is always kept)
   * @param {string | string[]} [options.events] event types to receive
   * @param {boolean} [options.snapshot] load the initial rows and keep `rows` (true); false:
   *   events only, from now on
   */
  subscribe(resource, options = {}) {
    if (this.closed) throw new RelayError("closed", "pgrelay: this relay connection was closed");
    if (this.subscriptions.has(resource)) {
      throw new RelayError("bad_request", `pgrelay: already subscribed to ${resource}`, { resource });
    }
    for (const column of Object.keys(options.filter ?? {})) {
      if (MESSAGE_KEYS.has(column)) {
        throw new RelayError("bad_request", `pgrelay: cannot filter on ${column}: a subscribe message uses that key`, { resource });
      }
    }
    const subscription = new Subscription(this, resource, options);
    this.subscriptions.set(resource, subscription);
    if (this.status === "open") subscription.start();
    return subscription;
  }

  /** Closes the connection for good. */
  close() {
    this.closed = true;
    for (const timer of Object.values(this.timers)) clearTimeout(timer);
    clearInterval(this.timers.heartbeat);
    if (this.socket) this.socket.close(1000, "client closed");
    this.#setStatus("closed");
  }

  /**
   * After an unsubscribe: what the relay still sends about `resource` belongs to the old
   * subscription, up to the answer to a ping sent now (the relay answers in order), and is
   * dropped, so that a new subscription to the same table never sees it.
   */
  fence(resource) {
    if (!this.socket || this.socket.readyState !== 1) return;
    this.send({ type: "ping" });
    this.pings += 1;
    this.fences.set(resource, this.pings);
  }

  send(message) {
    if (this.socket && this.socket.readyState === 1) this.socket.send(JSON.stringify(message));
  }

  #setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    this.emit("status", status);
  }

  async #token() {
    const { token } = this.options;
    return typeof token === "function" ? await token() : token;
  }

  async #connect() {
    if (this.closed) return;
    this.#setStatus("connecting");
    let token;
    try {
      token = await this.#token();
    } catch (err) {
      this.emit("error", new RelayError("token", `pgrelay: the token function failed: ${err}`));
      return this.#reconnectLater();
    }
    if (this.closed) return;
    // A token function that gives nothing cannot fix a refusal by being asked again.
    this.hasToken = Boolean(token);
    let socket;
    try {
      socket = new this.WebSocket(this.url);
    } catch (err) {
      this.emit("error", new RelayError("connect", `pgrelay: cannot open ${this.url}: ${err.message}`));
      return this.#reconnectLater();
    }
    this.socket = socket;
    const opened = { at: 0 };
    let heard = Date.now();
    socket.onopen = () => {
      opened.at = Date.now();
      heard = opened.at;
      this.pings = this.pongs = 0;
      this.fences.clear();
      if (token) this.send({ type: "auth", token });
      this.#setStatus("open");
      for (const subscription of this.subscriptions.values()) subscription.start();
      clearInterval(this.timers.heartbeat);
      this.timers.heartbeat = setInterval(() => {
        const loading = [...this.subscriptions.values()].some((s) => s.awaiting);
        const limit = 2 * this.options.heartbeat;
        if (Date.now() - heard > (loading ? Math.max(limit, LOAD_SILENCE) : limit)) {
          // Silent for two intervals: the connection is dead even if no close came.
          socket.close(4000, "heartbeat timeout");
          this.#onClose(socket, opened, 1006, "heartbeat timeout");
        } else {
          this.send({ type: "ping" });
          this.pings += 1;
        }
      }, this.options.heartbeat);
    };
    socket.onmessage = (message) => {
      heard = Date.now();
      let m;
      try {
        m = JSON.parse(message.data);
      } catch {
        this.emit("error", new RelayError("bad_message", "pgrelay: the relay sent a message that is not JSON"));
        return;
      }
      this.#dispatch(m);
    };
    socket.onclose = (event) => this.#onClose(socket, opened, event.code, event.reason);
    // Every error is followed by a close, which decides what happens next.
    socket.onerror = () => {};
  }

  #dispatch(m) {
    if (m.type === "pong") {
      this.pongs += 1;
      for (const [resource, pong] of this.fences) if (pong <= this.pongs) this.fences.delete(resource);
      return;
    }
    if (m.type === "authenticated") {
      this.#scheduleRefresh(m.expires_at);
      return;
    }
    if (m.type === "batch") {
      for (const event of m.events) this.#dispatch(event);
      return;
    }
    if (this.fences.has(m.resource)) return;
    const subscription = m.resource === undefined ? undefined : this.subscriptions.get(m.resource);
    if (subscription) {
      subscription.handle(m);
    } else if (m.type === "error") {
      this.emit("error", new RelayError(m.code, m.message, { resource: m.resource ?? null }));
    }
  }

  /** With a token function, sends a fresh token a minute (at most half the lifetime) before `exp`. */
  #scheduleRefresh(expiresAt) {
    clearTimeout(this.timers.refresh);
    if (typeof this.options.token !== "function" || !expiresAt) return;
    const left = expiresAt * 1000 - Date.now();
    const delay = Math.max(0, left - Math.min(60_000, left / 2));
    this.timers.refresh = setTimeout(async () => {
      try {
        this.send({ type: "auth", token: await this.#token() });
      } catch (err) {
        this.emit("error", new RelayError("token", `pgrelay: the token function failed: ${err}`));
      }
    }, delay);
  }

  #onClose(socket, opened, code, reason) {
    if (socket !== this.socket) return;
    this.socket = null;
    clearInterval(this.timers.heartbeat);
    clearTimeout(this.timers.refresh);
    socket.onopen = socket.onmessage = socket.onclose = null;
    for (const subscription of this.subscriptions.values()) subscription.disconnected();
    if (this.closed) return;
    // A connection that stayed up a while starts the backoff over.
    if (opened.at && Date.now() - opened.at > 10_000) this.attempt = 0;
    const fatal = FATAL_CLOSE.get(code);
    const refreshable = code === 4001 && typeof this.options.token === "function" && this.hasToken;
    if (fatal && !refreshable) {
      this.emit("error", new RelayError(fatal, `pgrelay: the relay closed the connection (${code}): ${reason || fatal}`, { closeCode: code }));
      this.closed = true;
      this.#setStatus("closed");
      return;
    }
    if (code !== 1000 && code !== 1001) {
      this.emit("error", new RelayError("disconnected", `pgrelay: connection lost (${code}${reason ? `: ${reason}` : ""}); reconnecting`, { closeCode: code }));
    }
    this.#reconnectLater();
  }

  #reconnectLater() {
    if (this.closed) return;
    this.#setStatus("waiting");
    const { minBackoff, maxBackoff } = this.options;
    const ceiling = Math.min(maxBackoff, minBackoff * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 30);
    // "Equal jitter": half the delay fixed, half random, so relays restarted under many
    // clients are not hit by all of them at once, and no client retries in a tight loop.
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    clearTimeout(this.timers.reconnect);
    this.timers.reconnect = setTimeout(() => this.#connect(), delay);
  }

  /** Backoff for one subscription's retries (unknown table, database unavailable). */
  retryDelay(attempt) {
    const { minBackoff, maxBackoff } = this.options;
    const ceiling = Math.min(maxBackoff, minBackoff * 2 ** attempt);
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }
}

function list(value) {
  return Array.isArray(value) ? value.join(",") : value;
}

/** One table's subscription on a [`Relay`]: a live `rows` Map and its events. */
export class Subscription extends Emitter {
  constructor(relay, resource, options) {
    super();
    this.relay = relay;
    this.resource = resource;
    this.options = { snapshot: true, ...options };
    /** Primary key → row; exact once `ready` (with `snapshot: false`, stays empty). */
    this.rows = new Map();
    /** The primary key's columns (from the relay). */
    this.key = null;
    /** The last position received (the `seq` to resume after), or null. */
    this.position = null;
    /** True once the initial rows are loaded (again false while they reload after a reset). */
    this.loaded = false;
    /** `pending`, `live`, `failed` or `closed`. */
    this.state = "pending";
    this.loading = null;
    /** True from a subscribe that will bring initial rows until they are in. */
    this.awaiting = false;
    this.queued = [];
    this.attempt = 0;
    this.retry = null;
    let resolve, reject;
    /** Resolves when the initial rows are first loaded (or, without snapshot, once subscribed). */
    this.ready = new Promise((ok, fail) => {
      resolve = ok;
      reject = fail;
    });
    this.ready.catch(() => {});
    this.settle = { resolve, reject };
  }

  /** The message that (re)starts this subscription: resume if there is a position. */
  #message({ resume }) {
    const { filter = {}, select, events, snapshot } = this.options;
    const message = { type: "subscribe", resource: this.resource, ...filter, batch: true };
    if (select !== undefined) message.select = list(select);
    if (events !== undefined) message.events = list(events);
    // A copy a reset declared stale is loaded again, never resumed (even if events came
    // after the reset, before the new initial rows).
    const current = this.loaded || !snapshot;
    if (resume && current && this.position !== null) message.since = this.position;
    // With `since`, `snapshot` asks for initial rows only if the resume is impossible.
    if (snapshot) message.snapshot = true;
    return message;
  }

  /** Sends the subscribe message (at connect, and on retries). */
  start({ resume = true } = {}) {
    if (this.state === "failed" || this.state === "closed") return;
    clearTimeout(this.retry);
    const message = this.#message({ resume });
    if (this.relay.socket?.readyState === 1) this.awaiting = message.snapshot === true && message.since === undefined;
    this.relay.send(message);
  }

  disconnected() {
    this.loading = null;
    this.awaiting = false;
    this.queued = [];
    if (this.state === "live") this.state = "pending";
  }

  /** Stops the subscription; `rows` keeps its last contents. */
  unsubscribe() {
    if (this.state === "closed") return;
    clearTimeout(this.retry);
    const failed = this.state === "failed";
    this.state = "closed";
    // A failed subscription is already gone from the relay (and its table may have a new one).
    if (failed) return;
    this.relay.subscriptions.delete(this.resource);
    this.relay.send({ type: "unsubscribe", resource: this.resource });
    this.relay.fence(this.resource);
  }

  /** The Map key of a row (`fromRow`) or of an event's `id`. */
  keyOf(value, fromRow = false) {
    const key = this.key;
    if (!key || key.length === 0) return JSON.stringify(value);
    if (key.length === 1) return fromRow ? value[key[0]] : value;
    return JSON.stringify(key.map((column) => value[column]));
  }

  handle(m) {
    switch (m.type) {
      case "subscribed":
        this.key = m.key ?? this.key;
        this.attempt = 0;
        if (!this.options.snapshot) {
          this.state = "live";
          this.settle.resolve(this);
        }
        return;
      case "initial":
        return this.#initial(m);
      case "create":
      case "update":
      case "delete":
      case "truncate":
        if (this.loading) {
          this.queued.push(m);
          return;
        }
        return this.#apply(m);
      case "reset":
        // The copy can no longer be trusted: load the initial rows again. A resume the relay
        // cannot vouch for (`history_unavailable`) is followed by them already, because the
        // resume asked for `snapshot` too; any other reset needs a new subscribe.
        this.position = null;
        this.loaded = false;
        // A refused resume is followed by initial rows (asked for with `snapshot`).
        this.awaiting = Boolean(this.options.snapshot);
        this.emit("reset", m.reason);
        if (this.options.snapshot && m.reason !== "history_unavailable") this.start({ resume: false });
        return;
      case "error":
        return this.#error(m);
      default:
        return;
    }
  }

  #initial(m) {
    if (!this.loading) this.loading = new Map();
    for (const row of m.data) this.loading.set(this.keyOf(row, true), row);
    if (!m.done) return;
    // The initial rows supersede everything received before them; events after them apply.
    this.rows.clear();
    for (const [key, row] of this.loading) this.rows.set(key, row);
    this.loading = null;
    this.awaiting = false;
    if (m.seq !== undefined && m.seq !== null) this.position = m.seq;
    this.loaded = true;
    this.state = "live";
    const queued = this.queued;
    this.queued = [];
    this.emit("change", { type: "initial", rows: this.rows });
    for (const event of queued) this.#apply(event);
    this.settle.resolve(this);
    this.emit("ready", this.rows);
  }

  #apply(m) {
    const keep = this.options.snapshot;
    let key;
    if (m.type === "create" || m.type === "update") {
      key = this.keyOf(m.id);
      if (keep) this.rows.set(key, m.data);
    } else if (m.type === "delete") {
      key = this.keyOf(m.id);
      if (keep) this.rows.delete(key);
    } else if (m.type === "truncate" && keep) {
      this.rows.clear();
    }
    if (m.seq !== undefined) this.position = m.seq;
    this.emit("change", { type: m.type, key, row: m.data, old: m.old, event: m });
  }

  #error(m) {
    this.awaiting = false;
    const error = new RelayError(m.code, m.message, { resource: this.resource });
    this.emit("error", error);
    if (FATAL_ERRORS.has(m.code)) {
      this.state = "failed";
      this.relay.subscriptions.delete(this.resource);
      this.settle.reject(error);
      return;
    }
    // Not exposed (yet), or the database is unavailable: ask again later.
    const delay = this.relay.retryDelay(this.attempt);
    this.attempt = Math.min(this.attempt + 1, 30);
    clearTimeout(this.retry);
    this.retry = setTimeout(() => this.start({ resume: this.loaded }), delay);
  }
}
