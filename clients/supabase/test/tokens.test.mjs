// Tokens and policies through supabase-js's Realtime client. The runner starts this relay with
// a JWT secret (PGRELAY_JWT_SECRET) and policies.toml: members read and write the items of
// their token's `category`; the service role, everything.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { createHmac, randomUUID } from 'node:crypto'
import { client } from './client.mjs'

const secret = process.env.PGRELAY_JWT_SECRET
if (!secret) {
  throw new Error('PGRELAY_JWT_SECRET is not set: run this suite through `cargo test --test integration clients::`')
}

const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url')
/** An HS256 JWT with `claims`, expiring in `seconds`. */
function jwt(claims, seconds = 3600) {
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ exp: Math.floor(Date.now() / 1000) + seconds, ...claims })}`
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`
}

const clients = []
after(async () => {
  for (const c of clients) {
    await c.removeAllChannels()
    c.realtime.disconnect()
  }
})
function open(token) {
  const c = client(token)
  clients.push(c)
  return c
}
const service = open(jwt({ role: 'service' }))

/** Subscribes a `*` channel on items; returns the payloads and the statuses it reports. */
async function watch(supabase) {
  const received = []
  const statuses = []
  const channel = supabase
    .channel(`test-${randomUUID()}`)
    .on('postgres_changes', { event: '*', schema: 'public', table: 'items' }, (p) => received.push(p))
  await new Promise((resolve, reject) => {
    channel.subscribe((status, err) => {
      statuses.push(status)
      if (status === 'SUBSCRIBED') resolve()
      else if (statuses.length === 1) reject(err ?? new Error(status))
    })
  })
  return { channel, received, statuses }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
async function until(check, what, timeout = 8000) {
  const start = Date.now()
  while (!check()) {
    if (Date.now() - start > timeout) assert.fail(`timed out waiting for ${what}`)
    await sleep(20)
  }
}

test('a member receives only the rows its policy lets it read; a row leaving them is a DELETE of its key', async () => {
  const mine = randomUUID()
  const member = open(jwt({ role: 'member', category: mine }))
  const { received } = await watch(member)
  const { data: rows, error } = await service
    .from('items')
    .insert([{ name: 'mine', price: 1, category: mine }, { name: 'theirs', price: 1, category: randomUUID() }])
    .select()
  assert.equal(error, null)
  const ours = rows.find((r) => r.name === 'mine')
  await service.from('items').update({ category: randomUUID() }).eq('id', ours.id)
  await until(() => received.length >= 2, 'two changes')
  await sleep(300)
  assert.deepEqual(received.map((p) => p.eventType), ['INSERT', 'DELETE'])
  assert.equal(received[0].new.name, 'mine')
  assert.deepEqual(received[1].old, { id: ours.id })
})

test('setAuth with a fresh token keeps a channel open past the old token\'s exp', async () => {
  const category = randomUUID()
  const member = open(jwt({ role: 'member', category }, 2))
  const { received, statuses } = await watch(member)
  await member.realtime.setAuth(jwt({ role: 'member', category }, 3600))
  await sleep(3000)
  await service.from('items').insert({ name: 'later', price: 1, category })
  await until(() => received.length === 1, 'the change')
  assert.equal(received[0].new.name, 'later')
  assert.deepEqual(statuses, ['SUBSCRIBED'])
})

test('a channel whose token expires is CLOSED and gets nothing more', async () => {
  const category = randomUUID()
  const member = open(jwt({ role: 'member', category }, 2))
  const { received, statuses } = await watch(member)
  await until(() => statuses.includes('CLOSED'), 'CLOSED', 8000)
  await service.from('items').insert({ name: 'unseen', price: 1, category })
  await sleep(500)
  assert.deepEqual(received, [])
})
