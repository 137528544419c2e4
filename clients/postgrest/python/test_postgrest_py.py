"""postgrest-py, unchanged, against pgrelay's REST API (a few of the postgrest-js checks).

The runner starts a relay on a fresh database (../schema.sql) and passes its URL in
PGRELAY_URL; every test works on rows of its own category.
"""

import os
import unittest
import uuid

from postgrest import APIError, CountMethod, SyncPostgrestClient

BASE = os.environ.get("PGRELAY_URL")
if not BASE:
    raise SystemExit("PGRELAY_URL is not set: run through `cargo test --test integration clients::`")


def client():
    return SyncPostgrestClient(f"{BASE}/api")


def seed(db, rows):
    category = str(uuid.uuid4())
    res = db.from_("items").insert([{**r, "category": category} for r in rows]).execute()
    assert len(res.data) == len(rows), res
    return category


FRUIT = [
    {"name": "apple", "price": 3, "note": "red"},
    {"name": "banana", "price": 1, "note": None},
    {"name": "cherry", "price": 10, "note": "Sour"},
]


class PostgrestPy(unittest.TestCase):
    def setUp(self):
        self.db = client()

    def tearDown(self):
        self.db.session.close()

    def test_select_filters_order_and_count(self):
        category = seed(self.db, FRUIT)
        res = (
            self.db.from_("items")
            .select("name, cost:price::text", count=CountMethod.exact)
            .eq("category", category)
            .or_("price.gt.5,note.is.null")
            .order("name", desc=True)
            .execute()
        )
        self.assertEqual(res.data, [{"name": "cherry", "cost": "10"}, {"name": "banana", "cost": "1"}])
        self.assertEqual(res.count, 2)
        res = self.db.from_("items").select("name").eq("category", category).in_("name", ["apple", "x"]).execute()
        self.assertEqual(res.data, [{"name": "apple"}])
        res = self.db.from_("items").select("name").eq("category", category).ilike("note", "s%").execute()
        self.assertEqual(res.data, [{"name": "cherry"}])

    def test_single_and_maybe_single(self):
        category = seed(self.db, FRUIT)
        one = self.db.from_("items").select("name").eq("category", category).eq("name", "apple").single().execute()
        self.assertEqual(one.data, {"name": "apple"})
        with self.assertRaises(APIError) as raised:
            self.db.from_("items").select("name").eq("category", category).eq("name", "nope").single().execute()
        self.assertEqual(raised.exception.code, "PGRST116")
        none = self.db.from_("items").select("name").eq("category", category).eq("name", "nope").maybe_single().execute()
        self.assertIsNone(none)

    def test_upsert_update_delete(self):
        key = str(uuid.uuid4())
        res = self.db.from_("kv").upsert({"key": key, "value": "one"}).execute()
        self.assertEqual(res.data, [{"key": key, "value": "one", "n": 0}])
        res = self.db.from_("kv").upsert({"key": key, "value": "two"}, on_conflict="key").execute()
        self.assertEqual(res.data[0]["value"], "two")
        res = self.db.from_("kv").upsert({"key": key, "value": "three"}, ignore_duplicates=True).execute()
        self.assertEqual(res.data, [])
        res = self.db.from_("kv").update({"n": 5}).eq("key", key).execute()
        self.assertEqual(res.data, [{"key": key, "value": "two", "n": 5}])
        res = self.db.from_("kv").delete().eq("key", key).execute()
        self.assertEqual(len(res.data), 1)

    def test_errors_have_postgrest_fields(self):
        with self.assertRaises(APIError) as raised:
            self.db.from_("items").insert({"name": "x", "price": -1}).execute()
        error = raised.exception
        self.assertEqual(error.code, "23514")
        self.assertIn("items_price_check", error.message)
        with self.assertRaises(APIError) as raised:
            self.db.from_("items").delete().execute()
        self.assertEqual(raised.exception.code, "21000")


if __name__ == "__main__":
    unittest.main()
