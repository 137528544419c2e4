-- The tables the postgrest-js suite uses; the runner (tests/integration/clients.rs) creates them
-- in a fresh database and installs capture on them.
create table items(
    id serial primary key,
    name text not null,
    price numeric check (price >= 0),
    category text,
    note text,
    tags text[],
    created_at timestamptz not null default now());
create table kv(
    key text primary key,
    value text,
    n int not null default 0);
