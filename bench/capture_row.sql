-- Benchmark-only: a ROW-level variant of pgrelay.capture, for comparing designs.
-- Run after sql/install.sql (it reuses pgrelay.changes and pgrelay.event_json).
--
-- Same log table and same payload contract as the statement-level trigger, but per row:
--   one INSERT into pgrelay.changes per row, and one pg_notify per row:
--   inline   {"k":"e", <pgrelay.event_json of the row>}      when it fits in 7000 bytes,
--   pointer  {"k":"p","xid":..,"from":seq,"to":seq,"n":1}    otherwise.
-- Not part of the product; bench/triggers.sh installs capture_row as variant (d) and
-- capture_row_naive as the optional variant (e).

create or replace function pgrelay.capture_row() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    c       pgrelay.changes;
    r       jsonb;
    r_old   jsonb;
    k       jsonb;
    payload text;
begin
    -- The key is computed here, not by a SQL function inside the INSERT: a SQL function that
    -- cannot be inlined is parsed and planned again on every row (see capture_row_naive).
    r := to_jsonb(case when tg_op = 'DELETE' then old else new end);
    if tg_nargs = 1 then
        k := r -> tg_argv[0];
    else
        k := (select jsonb_object_agg(x, r -> x) from unnest(tg_argv[0:tg_nargs - 1]) as x);
    end if;

    if tg_op = 'INSERT' then
        insert into pgrelay.changes (schema_name, table_name, op, id, data)
        values (tg_table_schema, tg_table_name, 'create', k, r)
        returning * into c;
    elsif tg_op = 'UPDATE' then
        r_old := to_jsonb(old);
        insert into pgrelay.changes (schema_name, table_name, op, id, data, old)
        values (tg_table_schema, tg_table_name, 'update', k, r, r_old)
        returning * into c;
    else
        insert into pgrelay.changes (schema_name, table_name, op, id, old)
        values (tg_table_schema, tg_table_name, 'delete', k, r)
        returning * into c;
    end if;

    payload := (jsonb_build_object('k', 'e') || pgrelay.event_json(c))::text;
    if octet_length(payload) > 7000 then
        payload := json_build_object('k', 'p', 'xid', c.xid::text,
                                     'from', c.seq, 'to', c.seq, 'n', 1)::text;
    end if;
    perform pg_notify('pgrelay', payload);
    return null;
end
$$;

-- The key function of earlier sql/install.sql versions (before 095b3f7 computed keys inline).
-- A SQL function with a sub-select cannot be inlined, so every execution of a statement that
-- calls it parses and plans its body again.
create or replace function pgrelay.bench_key_of(r jsonb, keys text[]) returns jsonb
language sql immutable parallel safe as $$
    select case when cardinality(keys) = 1 then r -> keys[1]
                else (select jsonb_object_agg(k, r -> k) from unnest(keys) as k) end
$$;

-- The same per row, but the straightforward port of the earlier pgrelay.capture: it keeps that
-- key function inside the per-row INSERT. Optional variant (e) of bench/triggers.sh, kept to
-- show what that costs per row.
create or replace function pgrelay.capture_row_naive() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    keys    text[] := tg_argv[0:tg_nargs - 1];  -- tg_argv is 0-based; this copy is 1-based
    c       pgrelay.changes;
    r_new   jsonb;
    r_old   jsonb;
    payload text;
begin
    if tg_op = 'INSERT' then
        r_new := to_jsonb(new);
        insert into pgrelay.changes (schema_name, table_name, op, id, data)
        values (tg_table_schema, tg_table_name, 'create', pgrelay.bench_key_of(r_new, keys), r_new)
        returning * into c;
    elsif tg_op = 'UPDATE' then
        r_new := to_jsonb(new);
        r_old := to_jsonb(old);
        insert into pgrelay.changes (schema_name, table_name, op, id, data, old)
        values (tg_table_schema, tg_table_name, 'update', pgrelay.bench_key_of(r_new, keys), r_new, r_old)
        returning * into c;
    else
        r_old := to_jsonb(old);
        insert into pgrelay.changes (schema_name, table_name, op, id, old)
        values (tg_table_schema, tg_table_name, 'delete', pgrelay.bench_key_of(r_old, keys), r_old)
        returning * into c;
    end if;

    payload := (jsonb_build_object('k', 'e') || pgrelay.event_json(c))::text;
    if octet_length(payload) > 7000 then
        payload := json_build_object('k', 'p', 'xid', c.xid::text,
                                     'from', c.seq, 'to', c.seq, 'n', 1)::text;
    end if;
    perform pg_notify('pgrelay', payload);
    return null;
end
$$;

-- Installs the row-level variant on one table (mirrors pgrelay.install).
-- p_function: 'capture_row' (variant d) or 'capture_row_naive' (variant e).
create or replace function pgrelay.install_row(p_schema text, p_table text,
                                               p_function text default 'capture_row') returns void
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

    select array_agg(a.attname::text order by k.ord) into keys
    from pg_index i
    cross join lateral unnest(i.indkey) with ordinality as k(attnum, ord)
    join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
    where i.indrelid = rel and i.indisprimary;
    if keys is null then
        raise exception 'table %.% has no primary key', p_schema, p_table
            using errcode = 'invalid_table_definition';
    end if;

    select string_agg(format('%L', k), ', ') into args from unnest(keys) as k;
    execute format('create or replace trigger pgrelay_capture_row after insert or update or delete '
                   'on %I.%I for each row execute function pgrelay.%I(%s)',
                   p_schema, p_table, p_function, args);
end
$$;
