-- pgrelay capture schema: the change log, the event renderer and the capture trigger.
--
-- Idempotent: every statement can run again, and while writers run.
--
-- Payload contract (NOTIFY channel 'pgrelay', JSON text, always well under 8000 bytes):
--   inline event  {"k":"e", <the object pgrelay.event_json renders>}
--       sent when a statement changed exactly one row and the event fits in 7000 bytes;
--   pointer       {"k":"p","xid":"<xid8>","from":<seq>,"to":<seq>,"n":<rows>,
--                  "schema":…,"table":…}
--       everything else: the relay reads the rows with that xid and seq in [from, to]
--       from pgrelay.changes. Concurrent statements interleave their seqs, so the xid is
--       what picks out exactly this statement's rows.
-- Every payload carries a seq, so PostgreSQL never folds two of them into one.

create schema if not exists pgrelay;

-- The durable log. seq is assigned at insert, not at commit; xid is the writer's transaction.
create table if not exists pgrelay.changes (
    seq         bigserial   primary key,
    xid         xid8        not null default pg_current_xact_id(),
    ts          timestamptz not null default clock_timestamp(),
    schema_name text        not null,
    table_name  text        not null,
    op          text        not null check (op in ('create', 'update', 'delete')),
    id          jsonb       not null,
    data        jsonb,
    old         jsonb
);

-- Catch-up after a reconnect reads the rows at or above the relay's xid horizon.
-- (Created only when missing: CREATE INDEX IF NOT EXISTS would still lock the log table,
-- and a reinstall must not lock anything writers use.)
do $$
begin
    if to_regclass('pgrelay.changes_xid_idx') is null then
        create index changes_xid_idx on pgrelay.changes (xid);
    end if;
end
$$;

-- Each relay's progress, for `pgrelay status` (observability only: relays never read it).
create table if not exists pgrelay.relays (
    instance  text        primary key,
    horizon   xid8        not null,
    last_seq  bigint,
    last_ts   timestamptz,
    seen_at   timestamptz not null default now()
);

-- One log row as the JSON object the relay decodes (shared by the trigger and the relay).
create or replace function pgrelay.event_json(c pgrelay.changes) returns jsonb
language sql stable parallel safe as $$
    select jsonb_build_object(
        'seq', c.seq, 'xid', c.xid::text, 'ts', c.ts,
        'schema', c.schema_name, 'table', c.table_name, 'op', c.op,
        'id', c.id, 'data', c.data, 'old', c.old)
$$;

-- (Earlier versions computed keys in a SQL function, which PostgreSQL cannot inline and so
-- re-plans on every call; the trigger now computes them inline.)
drop function if exists pgrelay.key_of(jsonb, text[]);

-- Statement-level AFTER trigger for INSERT, UPDATE and DELETE. The trigger arguments are the
-- table's primary key columns, in key order. One INSERT ... SELECT writes the whole statement
-- to the log and one NOTIFY announces it.
--
-- The trigger never reads pgrelay.changes: under SERIALIZABLE, a read of the log would take
-- predicate locks that every other writer's insert conflicts with, and writes must never fail
-- because of pgrelay. The inline payload of a one-row statement comes from RETURNING instead
-- (computed only when the statement has one row; CASE does not evaluate it otherwise).
create or replace function pgrelay.capture() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    keys    text[] := tg_argv[0:tg_nargs - 1];  -- tg_argv is 0-based; this copy is 1-based
    k1      text := tg_argv[0];                  -- the key column of a one-column key
    single  boolean := tg_nargs = 1;
    v_rows  bigint;
    v_first bigint;
    v_last  bigint;
    payload text;
begin
    if tg_op = 'DELETE' then
        select count(*) into v_rows from pgrelay_old;
    else
        select count(*) into v_rows from pgrelay_new;
    end if;
    if v_rows = 0 then
        return null;
    end if;

    if tg_op = 'INSERT' then
        with ins as (
            insert into pgrelay.changes as c (schema_name, table_name, op, id, data)
            select tg_table_schema, tg_table_name, 'create', case when single then n.r -> k1
                   else (select jsonb_object_agg(k, n.r -> k) from unnest(keys) as k) end, n.r
            from (select to_jsonb(t.*) as r from pgrelay_new t) as n
            returning c.seq, case when v_rows = 1
                             then (jsonb_build_object('k', 'e') || pgrelay.event_json(c))::text end as p)
        select min(seq), max(seq), max(p) into v_first, v_last, payload from ins;
    elsif tg_op = 'UPDATE' then
        -- The old and new transition tables hold the rows in the same order: pair them by
        -- position, which stays right when an update changes the primary key.
        with ins as (
            insert into pgrelay.changes as c (schema_name, table_name, op, id, data, old)
            select tg_table_schema, tg_table_name, 'update', case when single then n.r -> k1
                   else (select jsonb_object_agg(k, n.r -> k) from unnest(keys) as k) end, n.r, o.r
            from (select row_number() over () as i, to_jsonb(t.*) as r from pgrelay_new t) as n
            join (select row_number() over () as i, to_jsonb(t.*) as r from pgrelay_old t) as o
              using (i)
            returning c.seq, case when v_rows = 1
                             then (jsonb_build_object('k', 'e') || pgrelay.event_json(c))::text end as p)
        select min(seq), max(seq), max(p) into v_first, v_last, payload from ins;
    else
        with ins as (
            insert into pgrelay.changes as c (schema_name, table_name, op, id, old)
            select tg_table_schema, tg_table_name, 'delete', case when single then o.r -> k1
                   else (select jsonb_object_agg(k, o.r -> k) from unnest(keys) as k) end, o.r
            from (select to_jsonb(t.*) as r from pgrelay_old t) as o
            returning c.seq, case when v_rows = 1
                             then (jsonb_build_object('k', 'e') || pgrelay.event_json(c))::text end as p)
        select min(seq), max(seq), max(p) into v_first, v_last, payload from ins;
    end if;

    if payload is not null and octet_length(payload) <= 7000 then
        perform pg_notify('pgrelay', payload);
    else
        perform pg_notify('pgrelay', json_build_object(
            'k', 'p', 'xid', pg_current_xact_id()::text,
            'from', v_first, 'to', v_last, 'n', v_rows,
            'schema', tg_table_schema, 'table', tg_table_name)::text);
    end if;
    return null;
end
$$;

-- Installs capture on one table: three statement-level triggers whose arguments are the
-- primary key columns. Raises a clear error for a missing table or one without a primary key.
create or replace function pgrelay.install(p_schema text, p_table text) returns void
language plpgsql as $$
declare
    rel  oid;
    keys text[];
    args text;
begin
    select c.oid into rel
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where n.nspname = p_schema and c.relname = p_table and c.relkind in ('r', 'p');
    if rel is null then
        raise exception 'table %.% does not exist', p_schema, p_table
            using errcode = 'undefined_table';
    end if;
    -- Statement-level triggers on a partitioned table do not fire for writes made directly
    -- to its partitions, so capture there would silently miss changes.
    if (select relkind from pg_class where oid = rel) = 'p' then
        raise exception 'table %.% is partitioned; pgrelay cannot capture it yet (expose its partitions)',
            p_schema, p_table using errcode = 'feature_not_supported';
    end if;

    select array_agg(a.attname::text order by k.ord) into keys
    from pg_index i
    cross join lateral unnest(i.indkey) with ordinality as k(attnum, ord)
    join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
    where i.indrelid = rel and i.indisprimary;
    if keys is null then
        raise exception 'table %.% has no primary key; pgrelay needs one to identify rows',
            p_schema, p_table using errcode = 'invalid_table_definition';
    end if;

    select string_agg(format('%L', k), ', ') into args from unnest(keys) as k;
    execute format('create or replace trigger pgrelay_capture_insert after insert on %I.%I '
                   'referencing new table as pgrelay_new '
                   'for each statement execute function pgrelay.capture(%s)', p_schema, p_table, args);
    execute format('create or replace trigger pgrelay_capture_update after update on %I.%I '
                   'referencing old table as pgrelay_old new table as pgrelay_new '
                   'for each statement execute function pgrelay.capture(%s)', p_schema, p_table, args);
    execute format('create or replace trigger pgrelay_capture_delete after delete on %I.%I '
                   'referencing old table as pgrelay_old '
                   'for each statement execute function pgrelay.capture(%s)', p_schema, p_table, args);
end
$$;

-- Removes capture from one table (the log and its rows stay).
create or replace function pgrelay.uninstall(p_schema text, p_table text) returns void
language plpgsql as $$
begin
    if to_regclass(format('%I.%I', p_schema, p_table)) is null then
        raise exception 'table %.% does not exist', p_schema, p_table
            using errcode = 'undefined_table';
    end if;
    execute format('drop trigger if exists pgrelay_capture_insert on %I.%I', p_schema, p_table);
    execute format('drop trigger if exists pgrelay_capture_update on %I.%I', p_schema, p_table);
    execute format('drop trigger if exists pgrelay_capture_delete on %I.%I', p_schema, p_table);
end
$$;
