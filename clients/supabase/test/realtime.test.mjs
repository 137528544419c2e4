// supabase-js's Realtime client, unchanged, against pgrelay's /realtime/v1/websocket:
// `.channel().on('postgres_changes', …).subscribe()` over both Phoenix serializers. Writes go
// through supabase-js's own REST calls (/rest/v1); every test works on rows of its own category.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { client } from './client.mjs'

const clients = []
after(async () => {
  for (const c of clients) {
    await c.removeAllChannels()
    c.realtime.disconnect()
  }
})

function open(vsn) {
  const c = client('anon-key', { vsn })
  clients.push(c)
  return c
}

/** Subscribes `channel`; resolves on SUBSCRIBED, rejects on anything else. */
function subscribe(channel, onSubscribed = () => {}) {
  return new Promise((resolve, reject) => {
    channel.subscribe((status, err) => {
      if (status === 'SUBSCRIBED') {
        onSubscribed()
        resolve(channel)
      } else {
        reject(err ?? new Error(status))
      }
    })
  })
}

/** A channel listening to `bindings`; returns it and the payloads its callbacks receive. */
function listen(supabase, bindings) {
  const received = []
  let channel = supabase.channel(`test-${randomUUID()}`)
  bindings.forEach((binding, i) => {
    channel = channel.on('postgres_changes', binding, (payload) => received.push({ binding: i, ...payload }))
  })
  return { channel, received }
}

/** Waits until `received` holds `n` payloads (and a little longer, to catch extra ones). */
async function collect(received, n, timeout = 10000) {
  const start = Date.now()
  while (received.length < n) {
    if (Date.now() - start > timeout) {
      assert.fail(`expected ${n} changes, got ${received.length}: ${JSON.stringify(received)}`)
    }
    await new Promise((r) => setTimeout(r, 20))
  }
  await new Promise((r) => setTimeout(r, 300))
  return received
}

for (const vsn of ['1.0.0', '2.0.0']) {
  test(`vsn ${vsn}: INSERT, UPDATE and DELETE arrive as realtime-js parses them`, async () => {
    const supabase = open(vsn)
    const { channel, received } = listen(supabase, [{ event: '*', schema: 'public', table: 'items' }])
    await subscribe(channel)
    const category = randomUUID()
    const { data: [row] } = await supabase.from('items').insert({ name: 'apple', price: 3, category, tags: ['a'] }).select()
    await supabase.from('items').update({ price: 4 }).eq('id', row.id)
    await supabase.from('items').delete().eq('id', row.id)
    const mine = (await collect(received, 3)).filter((p) => (p.new.category ?? p.old.category) === category)
    assert.deepEqual(mine.map((p) => p.eventType), ['INSERT', 'UPDATE', 'DELETE'])
    const [insert, update, del] = mine
    for (const p of mine) {
      assert.equal(p.schema, 'public')
      assert.equal(p.table, 'items')
      assert.equal(p.errors, null)
      assert.ok(!Number.isNaN(Date.parse(p.commit_timestamp)), p.commit_timestamp)
    }
    assert.deepEqual(insert.new, row)
    assert.deepEqual(insert.old, {})
    assert.equal(update.new.price, 4)
    assert.equal(update.old.price, 3)
    assert.deepEqual(del.new, {})
    assert.equal(del.old.id, row.id)
    assert.deepEqual(del.old.tags, ['a'])
  })

  test(`vsn ${vsn}: a filter sends only its rows, and updates that move rows in or out`, async () => {
    const supabase = open(vsn)
    const category = randomUUID()
    const { channel, received } = listen(supabase, [
      { event: '*', schema: 'public', table: 'items', filter: `category=eq.${category}` },
    ])
    await subscribe(channel)
    const other = randomUUID()
    const { data: [inside] } = await supabase.from('items').insert({ name: 'in', price: 1, category }).select()
    const { data: [outside] } = await supabase.from('items').insert({ name: 'out', price: 1, category: other }).select()
    await supabase.from('items').update({ price: 2 }).eq('id', outside.id) // not ours: nothing
    await supabase.from('items').update({ category }).eq('id', outside.id) // moves in: INSERT
    await supabase.from('items').update({ category: other }).eq('id', inside.id) // moves out: DELETE
    await supabase.from('items').delete().eq('id', outside.id) // ours: DELETE
    const got = await collect(received, 4)
    assert.deepEqual(
      got.map((p) => [p.eventType, p.new.name ?? p.old.name]),
      [['INSERT', 'in'], ['INSERT', 'out'], ['DELETE', 'in'], ['DELETE', 'out']],
    )
  })

  test(`vsn ${vsn}: event INSERT gets inserts only, beside a binding that gets everything`, async () => {
    const supabase = open(vsn)
    const category = randomUUID()
    const filter = `category=eq.${category}`
    const { channel, received } = listen(supabase, [
      { event: 'INSERT', schema: 'public', table: 'items', filter },
      { event: '*', schema: 'public', table: 'items', filter },
    ])
    await subscribe(channel)
    const { data: [row] } = await supabase.from('items').insert({ name: 'x', price: 1, category }).select()
    await supabase.from('items').update({ price: 2 }).eq('id', row.id)
    await supabase.from('items').delete().eq('id', row.id)
    const got = await collect(received, 4)
    assert.deepEqual(got.filter((p) => p.binding === 0).map((p) => p.eventType), ['INSERT'])
    assert.deepEqual(got.filter((p) => p.binding === 1).map((p) => p.eventType), ['INSERT', 'UPDATE', 'DELETE'])
  })

  test(`vsn ${vsn}: a write made as soon as SUBSCRIBED arrives is received`, async () => {
    // Many filtered bindings make arming take a while: a join reply sent before every
    // binding's cursor is placed would let the write slip past the later ones.
    const supabase = open(vsn)
    const category = randomUUID()
    const bindings = Array.from({ length: 8 }, (_, i) => ({
      event: 'INSERT', schema: 'public', table: 'items', filter: `name=eq.n${i}`,
    }))
    const { channel, received } = listen(supabase, bindings)
    let writes
    await subscribe(channel, () => {
      writes = supabase.from('items').insert(bindings.map((_, i) => ({ name: `n${i}`, price: 1, category })))
    })
    assert.equal((await writes).error, null)
    const got = await collect(received, bindings.length)
    assert.deepEqual(got.map((p) => p.binding).sort(), bindings.map((_, i) => i))
  })

  test(`vsn ${vsn}: an unknown table or a bad filter is a CHANNEL_ERROR with the reason`, async () => {
    const supabase = open(vsn)
    const unknown = listen(supabase, [{ event: '*', schema: 'public', table: 'no_such_table' }]).channel
    await assert.rejects(subscribe(unknown), /not exposed/)
    await supabase.removeChannel(unknown)
    const bad = listen(supabase, [{ event: '*', schema: 'public', table: 'items', filter: 'price=zz.1' }]).channel
    await assert.rejects(subscribe(bad), /zz/)
    await supabase.removeChannel(bad)
  })
}
