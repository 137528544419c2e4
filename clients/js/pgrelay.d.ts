// Type declarations for pgrelay's JavaScript client (clients/js/pgrelay.js, served at /client.js).

/** A row as the relay sends it: the table's columns as PostgreSQL's `to_json` renders them. */
export type Row = Record<string, unknown>;

/** A row's key in `rows`: the key value for a one-column key, a JSON array text for a composite key. */
export type Key = string | number | boolean;

/** An error the relay reported, or a lost connection. */
export declare class RelayError extends Error {
  /** `not_found`, `bad_request`, `unauthorized`, `token_expired`, `disconnected`, `subscription_ended`, … */
  readonly code: string;
  /** The table the error is about, if any. */
  readonly resource: string | null;
  /** The WebSocket close code that carried it, if any. */
  readonly closeCode: number | null;
}

export interface RelayOptions {
  /** The relay, `http(s)://host:port` or `ws(s)://host:port`; default: this page's origin. */
  url?: string;
  /** A JWT or API key, or a function returning a fresh one (called at each connect and before `exp`). */
  token?: string | (() => string | Promise<string>);
  /** First reconnect delay in ms (default 250); doubles up to `maxBackoff`, with jitter. */
  minBackoff?: number;
  /** Longest reconnect delay in ms (default 10000). */
  maxBackoff?: number;
  /** Ping interval in ms (default 15000); a connection silent for two intervals is reconnected. */
  heartbeat?: number;
  /** A WebSocket class, where there is no global one (Node.js before 22: the `ws` package). */
  WebSocket?: unknown;
}

export type RelayStatus = "connecting" | "open" | "waiting" | "closed";

export interface SubscribeOptions {
  /** PostgREST filters, ANDed: `{ price: "gt.10", status: "in.(open,held)", or: "(a.eq.1,b.is.null)" }`. */
  filter?: Record<string, string>;
  /** Columns to keep in rows and events (the key columns are always kept). */
  select?: string | string[];
  /** Event types to receive: `create`, `update`, `delete`, `truncate`. With only some of
   * them, `rows` no longer follows the table (a row whose delete is not sent stays). */
  events?: string | string[];
  /** Load the initial rows and keep `rows` exact (default true); false: events only, from now on. */
  snapshot?: boolean;
}

export interface Change {
  /** `initial` (the rows were (re)loaded), `create`, `update`, `delete` or `truncate`. */
  type: "initial" | "create" | "update" | "delete" | "truncate";
  /** The key of the row that changed (not for `initial` and `truncate`). */
  key?: Key;
  /** The new row (`create`, `update`). */
  row?: Row;
  /** The old row (`update`, `delete`). */
  old?: Row;
  /** The relay's message, as received (`seq`, `ts`, `changed`, …). */
  event?: Record<string, unknown>;
  /** All rows (`initial`). */
  rows?: Map<Key, Row>;
}

/** A connection to a relay: one WebSocket, any number of table subscriptions. */
export declare class Relay {
  constructor(options?: RelayOptions);
  readonly url: string;
  readonly status: RelayStatus;
  readonly subscriptions: Map<string, Subscription>;
  /** Subscribes to a table (`items`, `schema.table`); one subscription per table per Relay. */
  subscribe(resource: string, options?: SubscribeOptions): Subscription;
  /** Closes the connection for good. */
  close(): void;
  on(type: "status", listener: (status: RelayStatus) => void): () => void;
  on(type: "error", listener: (error: RelayError) => void): () => void;
}

/** One table's subscription: a live Map of its rows. */
export declare class Subscription {
  readonly resource: string;
  /** Primary key → row; equals the subscribed rows once `ready`, kept exact by every event. */
  readonly rows: Map<Key, Row>;
  /** The primary key's columns. */
  readonly key: string[] | null;
  /** The last position received (the `seq` a reconnect resumes after), or null. */
  readonly position: number | null;
  /** True while `rows` holds loaded initial rows (false while they reload after a reset). */
  readonly loaded: boolean;
  readonly state: "pending" | "live" | "failed" | "closed";
  /** Resolves when the initial rows are first loaded; rejects on an error retrying cannot fix. */
  readonly ready: Promise<Subscription>;
  /** The key `rows` uses for a row (`fromRow`) or for an event's `id`. */
  keyOf(value: unknown, fromRow?: boolean): Key;
  /** Stops the subscription; `rows` keeps its last contents. */
  unsubscribe(): void;
  on(type: "change", listener: (change: Change) => void): () => void;
  on(type: "ready", listener: (rows: Map<Key, Row>) => void): () => void;
  on(type: "reset", listener: (reason: string) => void): () => void;
  on(type: "error", listener: (error: RelayError) => void): () => void;
}
