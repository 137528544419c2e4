// supabase-js, unchanged, against pgrelay's PostgREST surface (/rest/v1, the same routes as
// /api). The runner starts a relay on a fresh database (schema.sql) and passes its URL in
// PGRELAY_URL; every test works on rows of its own category.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { client } from './client.mjs'

// The relay runs without authentication here: any key is the anonymous caller.
const supabase = client()

test('from().insert().select() stores rows and returns them', async () => {
  const category = randomUUID()
  const { data, error, status } = await supabase
    .from('items')
    .insert([{ name: 'apple', price: 3, category }, { name: 'pear', price: 4, category }])
    .select()
  assert.equal(error, null)
  assert.equal(status, 201)
  assert.deepEqual(data.map((r) => r.name).sort(), ['apple', 'pear'])
  assert.equal(typeof data[0].id, 'number')
})

test('from().select() with filters and order reads what was written', async () => {
  const category = randomUUID()
  await supabase.from('items').insert([
    { name: 'a', price: 1, category },
    { name: 'b', price: 2, category },
    { name: 'c', price: 3, category },
  ])
  const { data, error } = await supabase
    .from('items')
    .select('name, price')
    .eq('category', category)
    .gte('price', 2)
    .order('price', { ascending: false })
  assert.equal(error, null)
  assert.deepEqual(data, [{ name: 'c', price: 3 }, { name: 'b', price: 2 }])
})

test('from().update().eq() and from().delete().eq() change only the matching rows', async () => {
  const category = randomUUID()
  const { data: rows } = await supabase
    .from('items')
    .insert([{ name: 'x', price: 1, category }, { name: 'y', price: 1, category }])
    .select()
  const x = rows.find((r) => r.name === 'x')
  const updated = await supabase.from('items').update({ price: 9 }).eq('id', x.id).select()
  assert.equal(updated.error, null)
  assert.deepEqual(updated.data.map((r) => [r.name, r.price]), [['x', 9]])
  const deleted = await supabase.from('items').delete().eq('id', x.id).select()
  assert.equal(deleted.error, null)
  assert.deepEqual(deleted.data.map((r) => r.id), [x.id])
  const { data: left } = await supabase.from('items').select('name, price').eq('category', category)
  assert.deepEqual(left, [{ name: 'y', price: 1 }])
})

test('single() and an unknown table answer as PostgREST does', async () => {
  const category = randomUUID()
  await supabase.from('items').insert({ name: 'only', price: 5, category })
  const one = await supabase.from('items').select('name').eq('category', category).single()
  assert.equal(one.error, null)
  assert.deepEqual(one.data, { name: 'only' })
  const missing = await supabase.from('no_such_table').select()
  assert.equal(missing.status, 404)
  assert.notEqual(missing.error, null)
})
