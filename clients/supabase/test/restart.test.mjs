// What a supabase-js application gets across a relay restart. The runner's relay
// (PGRELAY_URL) stays up as the writer; this test starts a relay of its own (PGRELAY_BIN on
// PGRELAY_DATABASE_URL) for the subscriber, stops it and starts it again on the same port.
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

const relays = []
const subscribers = []
after(async () => {
  for (const c of subscribers) {
    await c.removeAllChannels()
    c.realtime.disconnect()
  }
  for (const r of relays) await stopRelay(r)
})

test('across a relay restart the channel reports CHANNEL_ERROR, then SUBSCRIBED again, and streams on', async () => {
  const port = await freePort()
  relays.push(await startRelay(port))
  const writer = client()
  const subscriber = createClient(`http://127.0.0.1:${port}`, 'anon-key', {
    auth: { persistSession: false, autoRefreshToken: false },
    realtime: { transport: WebSocket },
  })
  subscribers.push(subscriber)
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
