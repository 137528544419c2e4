// What a supabase-js application gets across a dropped connection and a relay restart. The
// runner's relay (PGRELAY_URL) stays up as the writer; these tests reach a relay of their own
// (PGRELAY_BIN on PGRELAY_DATABASE_URL) through a TCP proxy that can cut the connection, and
// stop that relay and start it again on the same port.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { randomUUID } from 'node:crypto'
import net from 'node:net'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'
import { client } from './client.mjs'

const bin = process.env.PGRELAY_BIN
const databaseUrl = process.env.PGRELAY_DATABASE_URL
if (!bin || !databaseUrl) {
  throw new Error('PGRELAY_BIN and PGRELAY_DATABASE_URL are not set: run this suite through `cargo test --test integration clients::`')
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
async function until(check, what, timeout = 15000) {
  const start = Date.now()
  while (!check()) {
    if (Date.now() - start > timeout) assert.fail(`timed out waiting for ${what}`)
    await sleep(20)
  }
}

async function freePort() {
  const server = net.createServer().listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address()
  server.close()
  await once(server, 'close')
  return port
}

/** `pgrelay serve` on `port`, once it is ready. */
async function startRelay(port) {
  const child = spawn(bin, ['serve', '--tables', 'items', '--listen', `127.0.0.1:${port}`], {
    env: { ...process.env, DATABASE_URL: databaseUrl },
    stdio: 'ignore',
  })
  await until(() => child.exitCode === null, 'the relay to start')
  for (;;) {
    try {
      if ((await fetch(`http://127.0.0.1:${port}/readyz`)).status === 200) return child
    } catch {}
    if (child.exitCode !== null) assert.fail(`the relay exited with ${child.exitCode}`)
    await sleep(50)
  }
}

async function stopRelay(child) {
  if (child.exitCode !== null) return
  child.kill('SIGTERM')
  await once(child, 'exit')
}

/**
 * A TCP proxy to 127.0.0.1:`port`; `cut()` drops every connection through it at once, as a
 * network that goes away would (the proxy keeps listening).
 */
async function proxy(port) {
  const sockets = new Set()
  const server = net.createServer((downstream) => {
    const upstream = net.connect(port, '127.0.0.1')
    for (const s of [downstream, upstream]) {
      sockets.add(s)
      s.on('error', () => {})
      s.on('close', () => {
        sockets.delete(s)
        downstream.destroy()
        upstream.destroy()
      })
    }
    downstream.pipe(upstream)
    upstream.pipe(downstream)
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  proxies.push(server)
  return {
    port: server.address().port,
    cut() {
      for (const s of sockets) s.resetAndDestroy()
    },
  }
}

/**
 * A channel as an application that keeps its position writes it: each binding carries
 * `since`, which the `system` Position messages advance (realtime-js sends the bindings
 * as they are when it joins again). `log` gets every change and system message in order.
 */
function keepPosition(supabase, category, log, statuses) {
  const binding = { event: '*', schema: 'public', table: 'items', filter: `category=eq.${category}`, since: null }
  supabase
    .channel(`test-${randomUUID()}`)
    .on('postgres_changes', binding, (p) => log.push(`${p.eventType} ${(p.eventType === 'DELETE' ? p.old : p.new).name}`))
    .on('system', {}, (m) => {
      if (m.position) binding.since = m.position
      log.push(m.message === 'Position' ? 'position' : `${m.message} resumed=${m.resumed}`)
    })
    .subscribe((status) => statuses.push(status))
  return binding
}

/** A supabase-js client of the relay (or proxy) on `port`, closed after the tests. */
function subscriberAt(port) {
  const subscriber = createClient(`http://127.0.0.1:${port}`, 'anon-key', {
    auth: { persistSession: false, autoRefreshToken: false },
    realtime: { transport: WebSocket },
  })
  subscribers.push(subscriber)
  return subscriber
}

const proxies = []
const relays = []
const subscribers = []
after(async () => {
  for (const c of subscribers) {
    await c.removeAllChannels()
    c.realtime.disconnect()
  }
  for (const r of relays) await stopRelay(r)
  for (const p of proxies) p.close()
})

test('a channel that keeps its position resumes after a dropped connection: what was written meanwhile arrives once', async () => {
  const port = await freePort()
  relays.push(await startRelay(port))
  const through = await proxy(port)
  const writer = client()
  const subscriber = subscriberAt(through.port)
  const category = randomUUID()
  const log = []
  const statuses = []
  const binding = keepPosition(subscriber, category, log, statuses)
  await until(() => statuses.includes('SUBSCRIBED'), 'SUBSCRIBED')
  await until(() => log.includes('Subscribed to PostgreSQL resumed=false'), 'the system message')
  const { data: [row] } = await writer.from('items').insert({ name: 'before', price: 1, category }).select()
  await until(() => log.includes('INSERT before') && log.at(-1) === 'position', 'the change and a position after it')

  through.cut()
  await until(() => statuses.includes('CHANNEL_ERROR') || statuses.includes('CLOSED'), 'the channel to notice')
  await writer.from('items').insert({ name: 'while away', price: 1, category })
  await writer.from('items').update({ name: 'renamed' }).eq('id', row.id)
  await until(() => statuses.filter((s) => s === 'SUBSCRIBED').length === 2, 'SUBSCRIBED again')
  await until(() => log.includes('UPDATE renamed'), 'the changes made while away')
  assert.ok(/\//.test(binding.since), binding.since)
  const rejoin = log.lastIndexOf('Subscribed to PostgreSQL resumed=true')
  assert.ok(rejoin > 0, JSON.stringify(log))
  // Exactly what was missed, once, in order: no read of the rows is needed.
  assert.deepEqual(log.slice(rejoin).filter((m) => !m.startsWith('position')), [
    'Subscribed to PostgreSQL resumed=true', 'INSERT while away', 'UPDATE renamed',
  ])
  assert.deepEqual(log.filter((m) => m === 'INSERT before'), ['INSERT before'])
})

test('across a relay restart a channel that keeps its position is told it did not resume, and reads its rows again', async () => {
  const port = await freePort()
  relays.push(await startRelay(port))
  const writer = client()
  const subscriber = subscriberAt(port)
  const category = randomUUID()
  const log = []
  const statuses = []
  keepPosition(subscriber, category, log, statuses)
  await until(() => statuses.includes('SUBSCRIBED'), 'SUBSCRIBED')
  await writer.from('items').insert({ name: 'before', price: 1, category })
  await until(() => log.includes('INSERT before') && log.at(-1) === 'position', 'the change and a position')

  await stopRelay(relays.pop())
  await until(() => statuses.includes('CHANNEL_ERROR'), 'CHANNEL_ERROR')
  await writer.from('items').insert({ name: 'while down', price: 1, category })
  relays.push(await startRelay(port))
  // The new relay cannot vouch for what came before it started: resumed=false, which is the
  // application's cue to read its rows again (they hold what was written while it was down).
  await until(() => log.includes('Subscribed to PostgreSQL resumed=false') &&
    log.lastIndexOf('Subscribed to PostgreSQL resumed=false') > log.indexOf('INSERT before'), 'resumed=false')
  const { data } = await subscriber.from('items').select('name').eq('category', category).order('id')
  assert.deepEqual(data.map((r) => r.name), ['before', 'while down'])
  await writer.from('items').insert({ name: 'after', price: 1, category })
  await until(() => log.includes('INSERT after'), 'a change after the restart')
})

test('across a relay restart the channel reports CHANNEL_ERROR, then SUBSCRIBED again, and streams on', async () => {
  const port = await freePort()
  relays.push(await startRelay(port))
  const writer = client()
  const subscriber = subscriberAt(port)
  const category = randomUUID()
  const statuses = []
  const received = []
  subscriber
    .channel(`test-${randomUUID()}`)
    .on('postgres_changes', { event: '*', schema: 'public', table: 'items', filter: `category=eq.${category}` },
      (p) => received.push(p.new.name))
    .subscribe((status) => statuses.push(status))
  await until(() => statuses.includes('SUBSCRIBED'), 'SUBSCRIBED')
  await writer.from('items').insert({ name: 'before', price: 1, category })
  await until(() => received.includes('before'), 'the first change')

  await stopRelay(relays.pop())
  await until(() => statuses.includes('CHANNEL_ERROR'), 'CHANNEL_ERROR')
  await writer.from('items').insert({ name: 'while down', price: 1, category })
  relays.push(await startRelay(port))
  await until(() => statuses.filter((s) => s === 'SUBSCRIBED').length === 2, 'SUBSCRIBED again')

  await writer.from('items').insert({ name: 'after', price: 1, category })
  await until(() => received.includes('after'), 'a change after the restart')
  assert.equal(statuses[0], 'SUBSCRIBED')
  assert.equal(statuses.at(-1), 'SUBSCRIBED')
  // What the application does on every SUBSCRIBED after the first: read the rows again. That
  // read holds what was written while the relay was down.
  const { data } = await subscriber.from('items').select('name').eq('category', category).order('id')
  assert.deepEqual(data.map((r) => r.name), ['before', 'while down', 'after'])
})
