// postgrest-js, unchanged, against pgrelay's REST API. The runner starts a relay on a fresh
// database (schema.sql) and passes its URL in PGRELAY_URL; every test works on rows of its own
// category, so tests do not see each other's rows.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { PostgrestClient } from '@supabase/postgrest-js'

const base = process.env.PGRELAY_URL
if (!base) {
  throw new Error('PGRELAY_URL is not set: run this suite through `cargo test --test integration clients::` or scripts/test.sh')
}
const db = new PostgrestClient(`${base}/api`)

/** Rows of a fresh category: [{name, price, note, tags}] in, stored rows (by name) out. */
async function seed(rows) {
  const category = randomUUID()
  const { data, error, status } = await db
    .from('items')
    .insert(rows.map((r) => ({ note: null, tags: null, ...r, category })))
    .select()
  assert.equal(error, null)
  assert.equal(status, 201)
  return { category, rows: data }
}

const fruit = [
  { name: 'apple', price: 3, note: 'red', tags: ['a', 'fruit'] },
  { name: 'banana', price: 1, note: null, tags: ['fruit'] },
  { name: 'cherry', price: 10, note: 'Sour', tags: ['b'] },
  { name: 'date', price: null, note: 'sweet', tags: [] },
]

test('select * and column lists, with aliases and casts', async () => {
  const { category } = await seed(fruit)
  const all = await db.from('items').select('*').eq('category', category).order('name')
  assert.equal(all.error, null)
  assert.equal(all.status, 200)
  assert.equal(all.data.length, 4)
  assert.deepEqual(Object.keys(all.data[0]).sort(), ['category', 'created_at', 'id', 'name', 'note', 'price', 'tags'])
  const some = await db.from('items').select('name, label:note, cost:price::text').eq('category', category).eq('name', 'cherry')
  assert.equal(some.error, null)
  assert.deepEqual(some.data, [{ name: 'cherry', label: 'Sour', cost: '10' }])
})

test('eq, neq, gt, gte, lt, lte, in, is, like, ilike', async () => {
  const { category } = await seed(fruit)
  const names = async (query) => {
    const { data, error } = await query.eq('category', category).order('name')
    assert.equal(error, null)
    return data.map((r) => r.name)
  }
  const q = () => db.from('items').select('name')
  assert.deepEqual(await names(q().eq('name', 'apple')), ['apple'])
  assert.deepEqual(await names(q().neq('name', 'apple')), ['banana', 'cherry', 'date'])
  assert.deepEqual(await names(q().gt('price', 1)), ['apple', 'cherry'])
  assert.deepEqual(await names(q().gte('price', 3)), ['apple', 'cherry'])
  assert.deepEqual(await names(q().lt('price', 3)), ['banana'])
  assert.deepEqual(await names(q().lte('price', 3)), ['apple', 'banana'])
  assert.deepEqual(await names(q().in('name', ['apple', 'date', 'zzz'])), ['apple', 'date'])
  assert.deepEqual(await names(q().is('price', null)), ['date'])
  assert.deepEqual(await names(q().not('price', 'is', null)), ['apple', 'banana', 'cherry'])
  assert.deepEqual(await names(q().like('name', '%an%')), ['banana'])
  assert.deepEqual(await names(q().like('name', '*e*')), ['apple', 'cherry', 'date'])
  assert.deepEqual(await names(q().ilike('note', 'sour')), ['cherry'])
  assert.deepEqual(await names(q().ilike('note', 'S%')), ['cherry', 'date'])
  assert.deepEqual(await names(q().likeAnyOf('name', ['a%', 'c%'])), ['apple', 'cherry'])
  assert.deepEqual(await names(q().contains('tags', ['fruit'])), ['apple', 'banana'])
  assert.deepEqual(await names(q().overlaps('tags', ['a', 'b'])), ['apple', 'cherry'])
  assert.deepEqual(await names(q().match({ name: 'banana', price: 1 })), ['banana'])
  assert.deepEqual(await names(q().filter('name', 'in', '(apple,banana)')), ['apple', 'banana'])
})

test('not, or and and, nested', async () => {
  const { category } = await seed(fruit)
  const names = async (query) => {
    const { data, error } = await query.eq('category', category).order('name')
    assert.equal(error, null)
    return data.map((r) => r.name)
  }
  const q = () => db.from('items').select('name')
  assert.deepEqual(await names(q().not('name', 'in', '(apple,banana)')), ['cherry', 'date'])
  assert.deepEqual(await names(q().or('price.gt.5,name.eq.banana')), ['banana', 'cherry'])
  assert.deepEqual(await names(q().or('name.eq.date,and(price.gte.1,price.lte.3)')), ['apple', 'banana', 'date'])
  // date: price.lt.5 is unknown (NULL) and note.eq.red false, so the and is false, its not true.
  assert.deepEqual(await names(q().or('note.is.null,not.and(price.lt.5,note.eq.red)')), ['banana', 'cherry', 'date'])
  // NULL is unknown in SQL, so `not price > 5` leaves out the row without a price.
  assert.deepEqual(await names(q().not('price', 'gt', 5)), ['apple', 'banana'])
  assert.deepEqual(await names(q().or('name.eq.apple,name.eq."date"', {})), ['apple', 'date'])
})

test('order with nulls first and last, on several columns', async () => {
  const { category } = await seed(fruit)
  const order = async (options) => {
    const { data, error } = await db.from('items').select('name').eq('category', category).order('price', options).order('name')
    assert.equal(error, null)
    return data.map((r) => r.name)
  }
  assert.deepEqual(await order({ ascending: true }), ['banana', 'apple', 'cherry', 'date'])
  assert.deepEqual(await order({ ascending: true, nullsFirst: true }), ['date', 'banana', 'apple', 'cherry'])
  assert.deepEqual(await order({ ascending: false }), ['date', 'cherry', 'apple', 'banana'])
  assert.deepEqual(await order({ ascending: false, nullsFirst: false }), ['cherry', 'apple', 'banana', 'date'])
})

test('range and limit', async () => {
  const { category } = await seed(fruit)
  const page = await db.from('items').select('name').eq('category', category).order('name').range(1, 2)
  assert.equal(page.error, null)
  assert.deepEqual(page.data.map((r) => r.name), ['banana', 'cherry'])
  const limited = await db.from('items').select('name').eq('category', category).order('name').limit(3)
  assert.deepEqual(limited.data.map((r) => r.name), ['apple', 'banana', 'cherry'])
})

test('count exact, with and without rows (head)', async () => {
  const { category } = await seed(fruit)
  const counted = await db.from('items').select('name', { count: 'exact' }).eq('category', category).range(0, 1)
  assert.equal(counted.error, null)
  assert.equal(counted.count, 4)
  assert.equal(counted.data.length, 2)
  assert.equal(counted.status, 206)
  const head = await db.from('items').select('*', { count: 'exact', head: true }).eq('category', category)
  assert.equal(head.error, null)
  assert.equal(head.count, 4)
  assert.equal(head.data, null)
  const planned = await db.from('items').select('*', { count: 'planned', head: true }).eq('category', category)
  assert.equal(planned.error, null)
  assert.equal(typeof planned.count, 'number')
  const none = await db.from('items').select('*', { count: 'exact' }).eq('category', randomUUID())
  assert.equal(none.count, 0)
  assert.deepEqual(none.data, [])
})

test('single and maybeSingle', async () => {
  const { category } = await seed(fruit)
  const one = await db.from('items').select('name, price').eq('category', category).eq('name', 'apple').single()
  assert.equal(one.error, null)
  assert.deepEqual(one.data, { name: 'apple', price: 3 })
  const zero = await db.from('items').select().eq('category', category).eq('name', 'nope').single()
  assert.equal(zero.data, null)
  assert.equal(zero.error.code, 'PGRST116')
  assert.equal(zero.status, 406)
  const many = await db.from('items').select().eq('category', category).single()
  assert.equal(many.error.code, 'PGRST116')
  const maybeNone = await db.from('items').select().eq('category', category).eq('name', 'nope').maybeSingle()
  assert.equal(maybeNone.error, null)
  assert.equal(maybeNone.data, null)
  const maybeOne = await db.from('items').select('name').eq('category', category).eq('name', 'date').maybeSingle()
  assert.deepEqual(maybeOne.data, { name: 'date' })
  const maybeMany = await db.from('items').select('name').eq('category', category).maybeSingle()
  assert.equal(maybeMany.error.code, 'PGRST116')
})

test('insert one and many, with and without select', async () => {
  const category = randomUUID()
  const plain = await db.from('items').insert({ name: 'plain', category })
  assert.equal(plain.error, null)
  assert.equal(plain.status, 201)
  assert.equal(plain.data, null)
  const one = await db.from('items').insert({ name: 'one', price: 2, category }).select().single()
  assert.equal(one.error, null)
  assert.equal(one.data.name, 'one')
  assert.equal(typeof one.data.id, 'number')
  assert.equal(typeof one.data.created_at, 'string')
  const many = await db
    .from('items')
    .insert([{ name: 'm1', category }, { name: 'm2', price: 5, category }])
    .select('id, name, price')
  assert.equal(many.error, null)
  assert.deepEqual(many.data.map((r) => [r.name, r.price]), [['m1', null], ['m2', 5]])
  const all = await db.from('items').select('name', { count: 'exact', head: true }).eq('category', category)
  assert.equal(all.count, 4)
  // Objects naming different columns: missing ones are NULL (postgrest-js sends ?columns=).
  const mixed = await db.from('items').insert([{ name: 'x1', category }, { name: 'x2', note: 'n', category }]).select('name, note')
  assert.equal(mixed.error, null)
  assert.deepEqual(mixed.data, [{ name: 'x1', note: null }, { name: 'x2', note: 'n' }])
})

test('upsert with onConflict and ignoreDuplicates', async () => {
  const key = randomUUID()
  const first = await db.from('kv').upsert({ key, value: 'one', n: 1 }).select().single()
  assert.equal(first.error, null)
  assert.deepEqual(first.data, { key, value: 'one', n: 1 })
  const merged = await db.from('kv').upsert({ key, value: 'two', n: 2 }, { onConflict: 'key' }).select()
  assert.equal(merged.error, null)
  assert.deepEqual(merged.data, [{ key, value: 'two', n: 2 }])
  const ignored = await db.from('kv').upsert({ key, value: 'three', n: 3 }, { onConflict: 'key', ignoreDuplicates: true }).select()
  assert.equal(ignored.error, null)
  assert.deepEqual(ignored.data, [])
  const other = randomUUID()
  const batch = await db
    .from('kv')
    .upsert([{ key, value: 'four', n: 4 }, { key: other, value: 'new', n: 0 }], { onConflict: 'key' })
    .select('key, value')
  assert.equal(batch.error, null)
  assert.deepEqual(batch.data, [{ key, value: 'four' }, { key: other, value: 'new' }])
  const stored = await db.from('kv').select('value').eq('key', key).single()
  assert.equal(stored.data.value, 'four')
  const duplicate = await db.from('kv').insert({ key, value: 'again' })
  assert.equal(duplicate.error.code, '23505')
  assert.equal(duplicate.status, 409)
})

test('update and delete with filters, returning rows', async () => {
  const { category } = await seed(fruit)
  const updated = await db.from('items').update({ note: 'cheap' }).eq('category', category).lt('price', 5).select('name, note').order('name')
  assert.equal(updated.error, null)
  assert.deepEqual(updated.data, [{ name: 'apple', note: 'cheap' }, { name: 'banana', note: 'cheap' }])
  const quiet = await db.from('items').update({ note: 'x' }).eq('category', category).eq('name', 'date')
  assert.equal(quiet.error, null)
  assert.equal(quiet.status, 204)
  const deleted = await db.from('items').delete().eq('category', category).eq('name', 'cherry').select()
  assert.equal(deleted.error, null)
  assert.equal(deleted.data.length, 1)
  assert.equal(deleted.data[0].name, 'cherry')
  const counted = await db.from('items').delete({ count: 'exact' }).eq('category', category).in('name', ['apple', 'banana'])
  assert.equal(counted.error, null)
  assert.equal(counted.count, 2)
  const left = await db.from('items').select('name').eq('category', category)
  assert.deepEqual(left.data, [{ name: 'date' }])
})

test('errors carry code, message, details and hint', async () => {
  const checked = await db.from('items').insert({ name: 'x', price: -1 })
  assert.equal(checked.status, 400)
  assert.equal(checked.error.code, '23514')
  for (const field of ['code', 'message', 'details', 'hint']) {
    assert.ok(field in checked.error, `${field} is present`)
  }
  assert.match(checked.error.message, /items_price_check/)
  const unknown = await db.from('items').select('nope')
  assert.equal(unknown.error.code, '42703')
  const table = await db.from('nosuch').select()
  assert.equal(table.error.code, 'PGRST205')
  assert.equal(table.status, 404)
  const embedded = await db.from('items').select('*, kv(*)')
  assert.equal(embedded.error.code, 'PGRST200')
  const everything = await db.from('items').delete()
  assert.equal(everything.error.code, '21000')
  assert.match(everything.error.hint, /rest-allow-unfiltered-writes/)
  const badValue = await db.from('items').select().eq('price', 'abc')
  assert.equal(badValue.error.code, '22P02')
  const thrown = await db.from('items').select('nope').throwOnError().then(() => null, (e) => e)
  assert.ok(thrown instanceof Error)
  assert.equal(thrown.code, '42703')
})

test('csv', async () => {
  const { category } = await seed([
    { name: 'plain', price: 1 },
    { name: 'with, comma', price: null, note: 'say "hi"' },
  ])
  const { data, error } = await db.from('items').select('name, price, note').eq('category', category).order('name').csv()
  assert.equal(error, null)
  assert.equal(data, 'name,price,note\nplain,1,\n"with, comma",,"say ""hi"""')
})
