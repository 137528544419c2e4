// PostGraphile v4 with @graphile/pg-pubsub, as a peer for `pgrelay bench --peer`: one
// subscription field, `row(topic)`, streams every NOTIFY payload of channel `topic` (parsed
// as JSON by pg-pubsub; the bench's trigger sends `row_to_json(new)`) over graphql-ws
// (subprotocol `graphql-transport-ws`) at ws://127.0.0.1:$PORT/graphql:
//
//   {"type":"connection_init"}, then, once {"type":"connection_ack"} came,
//   {"id":"1","type":"subscribe","payload":{"query":"subscription { row(topic: \"pgrelay_bench_baseline\") { id payload } }"}}
//   -> {"id":"1","type":"next","payload":{"data":{"row":{"id":1,"payload":"…"}}}} per NOTIFY
//
// Environment: DATABASE_URL (required), PORT (default 5050), PEER_SCHEMA (the schema
// PostGraphile introspects at start, default public; nothing of it is used).
"use strict";

const http = require("http");
const {
  postgraphile,
  makePluginHook,
  enhanceHttpServerWithSubscriptions,
} = require("postgraphile");
const { makeExtendSchemaPlugin, gql, embed } = require("graphile-utils");
const { default: PgPubsub } = require("@graphile/pg-pubsub");

// The channel is the subscription's `topic` argument, LISTENed to as it is.
const topicFromArgs = (args) => args.topic;

const RowSubscriptionPlugin = makeExtendSchemaPlugin(() => ({
  typeDefs: gql`
    type PeerRow {
      id: Int
      payload: String
    }
    extend type Subscription {
      row(topic: String!): PeerRow @pgSubscription(topic: ${embed(topicFromArgs)})
    }
  `,
  resolvers: {
    Subscription: {
      // The event is the notification's payload, parsed.
      row: { resolve: (event) => event },
    },
  },
}));

const databaseUrl = process.env.DATABASE_URL;
if (!databaseUrl) {
  console.error("DATABASE_URL is required");
  process.exit(2);
}
const port = Number(process.env.PORT || 5050);

const middleware = postgraphile(databaseUrl, process.env.PEER_SCHEMA || "public", {
  pluginHook: makePluginHook([PgPubsub]),
  appendPlugins: [RowSubscriptionPlugin],
  subscriptions: true,
  // graphql-ws only (v0 would be subscriptions-transport-ws).
  websockets: ["v1"],
  graphiql: false,
  disableQueryLog: true,
  retryOnInitFail: false,
});

const server = http.createServer(middleware);
enhanceHttpServerWithSubscriptions(server, middleware);
server.listen(port, "127.0.0.1", () => {
  console.error(`postgraphile peer on ws://127.0.0.1:${port}/graphql`);
});

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => {
    server.close();
    process.exit(0);
  });
}
