-- The tables the supabase-js suite uses; the runner (tests/integration/clients.rs) creates them
-- in a fresh database and installs capture on them.
create table items(
    id serial primary key,
    name text not null,
    price numeric,
    category text,
    tags text[],
    created_at timestamptz not null default now());
