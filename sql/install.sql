-- pgrelay capture schema: the change log and the capture triggers.
--
-- Idempotent: every statement can run again, and while writers run.
--
-- The log is the only source of events. Each row of pgrelay.changes is one chunk of one
-- statement's events (at most 1000 events or about 1 MiB of JSON), written by the statement's
-- capture trigger in the writer's transaction:
--   xid       the writer's transaction (xid8)
--   seq       seq of the chunk's first event; last_seq of its last
--   stmt      the statement's own seq, drawn when it started (BEFORE STATEMENT): a
--             transaction's events are ordered by (stmt, seq), so the changes a nested
--             statement makes (a user trigger updating the same table) come after those of
--             the statement that fired it, as they happened
--   relid     the exposed table (the partitioned root for a partition's rows)
--   keys      the table's primary key columns when the trigger fired (a renamed key column
--             is picked up by the next statement)
--   n         events in the chunk
--   body      a JSON array of events, each [seq, op, seq2, data, old]:
--               op 'c' create, 'u' update, 'd' delete, 't' truncate,
--               'p' a partition of relid was truncated (its rows are gone, unlisted);
--             data / old are the new / old row (to_json, columns in table order), null where
--             they do not apply; seq2 (updates only) is a second seq: an update that changes
--             the key is sent as a delete of the old key (seq) and a create of the new (seq2).
-- The trigger never parses the rows it renders (a json value holding \u0000 could not be
-- parsed back): the relay reads keys out of the rows, as text.
--
-- Row-by-row order is the order the statement changed the rows in; with a primary key that
-- is not DEFERRABLE every step of that order is a valid table, so applying events by key is
-- exact. Tables with a DEFERRABLE primary key are refused.
--
-- Notifications carry nothing: a capture trigger in 'notify' mode calls
-- pg_notify('pgrelay', ''), which PostgreSQL folds to one notification per transaction,
-- delivered after commit. It only tells relays to read the log now; what they read, and in
-- which order, comes from the log alone, so a forged or lost notification changes nothing.
-- In 'poll' mode the triggers never NOTIFY (no commit-time lock) and relays poll.
--
-- Waking relays (notify mode): a trigger notifies only when a relay sleeps. A relay that
-- waits for notifications holds the advisory lock 8099568234784717057 ('pgrelay' 01) in
-- exclusive mode for its session (and 8099568234784717058, 'pgrelay' 02, which other relays
-- try in share mode to tell that it does); while writes keep coming it lets go and polls.
-- The trigger tries the first lock in share mode for its transaction: it gets it when no
-- relay sleeps, and then holds it until it commits or aborts, so no relay can fall asleep
-- before this transaction's rows are visible to the poll that follows its falling asleep;
-- it fails while a relay sleeps, and the transaction notifies. Either way the transaction
-- is read soon after it commits, and under load writers skip NOTIFY's commit-time lock.
-- The lock functions are PostgreSQL's own: a role that plays with these keys can make
-- writers notify when they need not, or relays poll when they could sleep (at most
-- poll_max apart), never lose or reorder an event.
--
-- Locks: a capture function waits for the log's own locks (extending pgrelay.changes or its
-- index while other writers do) however short the writer's lock_timeout is: its functions run
-- with lock_timeout = 0, so a writer is never cancelled inside pgrelay's trigger. (NOTIFY's
-- commit-time lock is taken at COMMIT, outside any function: in 'notify' mode a short
-- lock_timeout can still cancel a commit; 'poll' mode takes no such lock.)
--
-- Rendering: the capture functions pin the settings that shape to_json's text (TimeZone UTC,
-- extra_float_digits, bytea_output, IntervalStyle), so events look the same whatever the
-- writer's session settings, and the same as the relay's own reads.
--
-- Triggers on a plain table: statement-level AFTER triggers with transition tables (fast for
-- bulk statements), enabled for ordinary sessions; a row-level AFTER trigger enabled only
-- under session_replication_role = replica, where logical-replication apply workers fire
-- row triggers and nothing else; BEFORE STATEMENT and TRUNCATE triggers always.

create schema if not exists pgrelay;

-- An earlier layout (one row per event, keyed by table name) cannot be read by this version:
-- its rows are dropped (relays answer resumes into that history with a reset).
do $$
begin
    if to_regclass('pgrelay.changes') is not null and not exists (
        select 1 from pg_attribute
         where attrelid = to_regclass('pgrelay.changes') and attname = 'stmt' and not attisdropped)
    then
        raise notice 'pgrelay: replacing the change log of an earlier version (its rows are dropped)';
        drop table pgrelay.changes cascade;
    end if;
end
$$;

create sequence if not exists pgrelay.changes_seq as bigint;

create table if not exists pgrelay.changes (
    xid      xid8        not null default pg_current_xact_id(),
    seq      bigint      not null,
    last_seq bigint      not null,
    stmt     bigint      not null,
    relid    oid         not null,
    keys     text[],
    ts       timestamptz not null default clock_timestamp(),
    n        integer     not null,
    body     json        not null
);

-- Chunks of a bulk statement are large: lz4 compresses them several times faster than the
-- default pglz. Only where the server has lz4, and never at the cost of writers: the change
-- takes the log's ACCESS EXCLUSIVE lock, so it waits at most 100 ms for it (an open writer
-- holds it off; every writer would queue behind the wait, and the capture functions run with
-- lock_timeout = 0) and is left to the next install when it cannot have it at once.
do $$
declare
    previous text := current_setting('lock_timeout');
begin
    if exists (select from pg_settings
                where name = 'default_toast_compression' and 'lz4' = any(enumvals))
       and (select attcompression from pg_attribute
             where attrelid = 'pgrelay.changes'::regclass and attname = 'body') is distinct from 'l'
    then
        perform set_config('lock_timeout', '100ms', true);
        begin
            alter table pgrelay.changes alter column body set compression lz4;
        exception when lock_not_available then
            raise notice 'pgrelay: the log is busy; its compression is left as it is (the next install tries again)';
        end;
        perform set_config('lock_timeout', previous, true);
    end if;
end
$$;

-- Relays read the log by transaction: the rows of transactions that committed since their
-- last read, in (stmt, seq) order. (Created only when missing: CREATE INDEX IF NOT EXISTS would still
-- lock the log, and a reinstall must not lock anything writers use.)
do $$
begin
    if to_regclass('pgrelay.changes_xid_stmt_seq_idx') is null then
        create index changes_xid_stmt_seq_idx on pgrelay.changes (xid, stmt, seq);
    end if;
end
$$;

-- Each relay's progress, for `pgrelay status` and retention (observability: relays never
-- read each other's rows).
create table if not exists pgrelay.relays (
    instance  text        primary key,
    horizon   xid8        not null,
    last_seq  bigint,
    last_ts   timestamptz,
    seen_at   timestamptz not null default now()
);
alter table pgrelay.relays add column if not exists pid integer;
alter table pgrelay.relays add column if not exists held_by integer;
-- Every transaction visible in it has been read by the relay: retention may prune its rows.
alter table pgrelay.relays add column if not exists snapshot pg_snapshot;

-- The highest xid whose log rows retention deleted: a relay whose horizon is at or below it
-- may have lost rows it had not read (it was away longer than retention waits for a relay),
-- and tells its subscribers so (`reset`, events_missing) instead of skipping silently.
create table if not exists pgrelay.pruned (
    one boolean primary key default true check (one),
    xid xid8    not null
);

-- Functions of earlier versions.
drop function if exists pgrelay.key_of(jsonb, text[]);
drop function if exists pgrelay.event_json(pgrelay.changes);

-- The primary key columns of a table, in key order, as they are now (a renamed key column is
-- picked up by the next statement). Called by every capture trigger: plpgsql, so that its
-- two lookups are planned once per session (a SQL function with a FROM clause is planned
-- again on every call, which cost more than the rest of a single-row write's capture).
create or replace function pgrelay.key_columns(rel oid) returns text[]
language plpgsql stable as $$
declare
    nums  int2[];
    names text[] := '{}';
    n     int2;
begin
    select i.indkey::int2[] into nums
      from pg_catalog.pg_index as i
     where i.indrelid = rel and i.indisprimary;
    if nums is null then
        return null;
    end if;
    foreach n in array nums loop
        names := names || (select a.attname::text from pg_catalog.pg_attribute as a
                            where a.attrelid = rel and a.attnum = n);
    end loop;
    return names;
end
$$;

drop function if exists pgrelay.key_of(json, text[]);

-- The seq of the statement now running on `root` at this trigger depth (drawn by its BEFORE
-- STATEMENT trigger), or `fallback` when it has none (a logical-replication apply worker
-- fires row triggers only). The setting is the session's: a writer can set it to anything,
-- so anything that is not a seq counts as none (a write must never fail on it).
create or replace function pgrelay.statement_seq(root oid, fallback bigint) returns bigint
language plpgsql stable as $$
declare
    s text := current_setting(format('pgrelay.s_%s_%s', root, pg_trigger_depth()), true);
begin
    return coalesce(case when s ~ '^[0-9]{1,18}$' then s::bigint end, fallback);
end
$$;

-- BEFORE STATEMENT (and BEFORE TRUNCATE): draws the statement's seq. Argument: the oid of the
-- exposed table (the root for a partition).
create or replace function pgrelay.capture_statement() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform set_config(format('pgrelay.s_%s_%s', tg_argv[0], pg_trigger_depth()),
                       nextval('pgrelay.changes_seq')::text, true);
    return null;
end
$$;

-- Statement-level AFTER trigger for INSERT, UPDATE, DELETE and TRUNCATE on a plain table.
-- Arguments: the capture mode ('notify' or 'poll').
--
-- The trigger never reads pgrelay.changes: under SERIALIZABLE, a read of the log would take
-- predicate locks that every other writer's insert conflicts with, and writes must never fail
-- because of pgrelay.
create or replace function pgrelay.capture() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set extra_float_digits = 1 set bytea_output = 'hex' set intervalstyle = 'postgres'
set lock_timeout = 0
as $$
#variable_conflict use_column
declare
    keys   text[] := pgrelay.key_columns(tg_relid);
    stmt   bigint;
    single boolean;
    logged bigint := 0;
begin
    if tg_op = 'TRUNCATE' then
        stmt := pgrelay.statement_seq(tg_relid, null);
        insert into pgrelay.changes (seq, last_seq, stmt, relid, keys, n, body)
        select s, s, coalesce(stmt, s), tg_relid, keys, 1, json_build_array(json_build_array(s, 't', null, null, null))
          from (select nextval('pgrelay.changes_seq') as s) as x;
        if tg_argv[0] = 'notify' then
            if not pg_try_advisory_xact_lock_shared(8099568234784717057) then
                perform pg_notify('pgrelay', '');
            end if;
        end if;
        return null;
    end if;

    stmt := pgrelay.statement_seq(tg_relid, null);
    -- A statement that changed one row (most writes) is logged by a plain INSERT: starting
    -- the chunking plan of the bulk path below costs more than the rest of such a capture.
    if tg_op = 'DELETE' then
        single := (select count(*) from (select from pgrelay_old limit 2) as x) = 1;
    else
        single := (select count(*) from (select from pgrelay_new limit 2) as x) = 1;
    end if;
    if single and tg_op = 'INSERT' then
        insert into pgrelay.changes (seq, last_seq, stmt, relid, keys, n, body)
        select s, s, coalesce(stmt, s), tg_relid, keys, 1,
               json_build_array(json_build_array(s, 'c', null, r, null))
          from (select nextval('pgrelay.changes_seq') as s, to_json(t.*) as r
                  from pgrelay_new as t) as x;
    elsif single and tg_op = 'UPDATE' then
        insert into pgrelay.changes (seq, last_seq, stmt, relid, keys, n, body)
        select s, s2, coalesce(stmt, s), tg_relid, keys, 1,
               json_build_array(json_build_array(s, 'u', s2, n.r,
                   case when pg_column_size(n.r)::bigint + pg_column_size(o.r) > 536870912
                        then null else o.r end))
          from (select nextval('pgrelay.changes_seq') as s) as a,
               (select nextval('pgrelay.changes_seq') as s2) as b,
               (select to_json(t.*) as r from pgrelay_new as t) as n,
               (select to_json(t.*) as r from pgrelay_old as t) as o;
    elsif single then
        insert into pgrelay.changes (seq, last_seq, stmt, relid, keys, n, body)
        select s, s, coalesce(stmt, s), tg_relid, keys, 1,
               json_build_array(json_build_array(s, 'd', null, null, r))
          from (select nextval('pgrelay.changes_seq') as s, to_json(t.*) as r
                  from pgrelay_old as t) as x;
    elsif tg_op = 'INSERT' then
        with ev as (
            select nextval('pgrelay.changes_seq') as s, 'c' as op, null::bigint as s2,
                   r as data, null::json as old
              from (select to_json(t.*) as r from pgrelay_new as t) as x
        )
        insert into pgrelay.changes (seq, last_seq, stmt, relid, keys, n, body)
        select min(s), max(s), coalesce(stmt, min(s)), tg_relid, keys, count(*),
               json_agg(json_build_array(s, op, s2, data, old))
          from (select *, (rn - 1) / 1000 + bytes / 1048576 as chunk
                  from (select ev.*, row_number() over w as rn,
                               sum(pg_column_size(data)) over w as bytes
                          from ev window w as (rows between unbounded preceding and current row)) as e
                 order by chunk, s) as e
         group by chunk;
    elsif tg_op = 'UPDATE' then
        -- The old and new transition tables hold the rows in the same order: pair them by
        -- position, which stays right when an update changes the primary key. (When old and
        -- new together would pass PostgreSQL's 1 GB value limit, old is left out.)
        with ev as (
            select nextval('pgrelay.changes_seq') as s, 'u' as op,
                   nextval('pgrelay.changes_seq') as s2, n.r as data,
                   case when pg_column_size(n.r)::bigint + pg_column_size(o.r) > 536870912
                        then null else o.r end as old
              from (select row_number() over () as i, to_json(t.*) as r from pgrelay_new as t) as n
              join (select row_number() over () as i, to_json(t.*) as r from pgrelay_old as t) as o
             using (i)
             order by n.i
        )
        insert into pgrelay.changes (seq, last_seq, stmt, relid, keys, n, body)
        select min(s), max(s2), coalesce(stmt, min(s)), tg_relid, keys, count(*),
               json_agg(json_build_array(s, op, s2, data, old))
          from (select *, (rn - 1) / 1000 + bytes / 1048576 as chunk
                  from (select ev.*, row_number() over w as rn,
                               (sum(pg_column_size(data)::bigint + coalesce(pg_column_size(old), 0)) over w)::bigint as bytes
                          from ev window w as (rows between unbounded preceding and current row)) as e
                 order by chunk, s) as e
         group by chunk;
    else
        with ev as (
            select nextval('pgrelay.changes_seq') as s, 'd' as op, null::bigint as s2,
                   null::json as data, r as old
              from (select to_json(t.*) as r from pgrelay_old as t) as x
        )
        insert into pgrelay.changes (seq, last_seq, stmt, relid, keys, n, body)
        select min(s), max(s), coalesce(stmt, min(s)), tg_relid, keys, count(*),
               json_agg(json_build_array(s, op, s2, data, old))
          from (select *, (rn - 1) / 1000 + bytes / 1048576 as chunk
                  from (select ev.*, row_number() over w as rn,
                               sum(pg_column_size(old)) over w as bytes
                          from ev window w as (rows between unbounded preceding and current row)) as e
                 order by chunk, s) as e
         group by chunk;
    end if;
    get diagnostics logged = row_count;
    if logged > 0 and tg_argv[0] = 'notify' then
        if not pg_try_advisory_xact_lock_shared(8099568234784717057) then
            perform pg_notify('pgrelay', '');
        end if;
    end if;
    return null;
end
$$;

-- Row-level AFTER trigger: a partitioned table's (defined on the root, cloned by PostgreSQL to
-- every partition, present and future), an inheritance child's, and a plain table's under
-- session_replication_role = replica. Statement-level triggers cannot serve them: a
-- partition's own statement triggers do not fire for writes made through the root, the
-- root's do not fire for writes made straight into a partition, and logical-replication
-- apply fires no statement triggers. Arguments: the capture mode, and the oid of the exposed
-- table.
create or replace function pgrelay.capture_row() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set timezone = 'UTC' set extra_float_digits = 1 set bytea_output = 'hex' set intervalstyle = 'postgres'
set lock_timeout = 0
as $$
declare
    root   oid := tg_argv[1]::oid;
    keys   text[] := pgrelay.key_columns(tg_relid);
    r_new  json;
    r_old  json;
    s1     bigint := nextval('pgrelay.changes_seq');
    s2     bigint;
begin
    if tg_op = 'INSERT' then
        r_new := to_json(new);
        insert into pgrelay.changes (seq, last_seq, stmt, relid, keys, n, body)
        values (s1, s1, pgrelay.statement_seq(root, s1), root, keys, 1,
                json_build_array(json_build_array(s1, 'c', null, r_new, null)));
    elsif tg_op = 'UPDATE' then
        r_new := to_json(new);
        r_old := to_json(old);
        if pg_column_size(r_new)::bigint + pg_column_size(r_old) > 536870912 then
            r_old := null;
        end if;
        s2 := nextval('pgrelay.changes_seq');
        insert into pgrelay.changes (seq, last_seq, stmt, relid, keys, n, body)
        values (s1, s2, pgrelay.statement_seq(root, s1), root, keys, 1,
                json_build_array(json_build_array(s1, 'u', s2, r_new, r_old)));
    else
        r_old := to_json(old);
        insert into pgrelay.changes (seq, last_seq, stmt, relid, keys, n, body)
        values (s1, s1, pgrelay.statement_seq(root, s1), root, keys, 1,
                json_build_array(json_build_array(s1, 'd', null, null, r_old)));
    end if;
    if tg_argv[0] = 'notify' then
        if not pg_try_advisory_xact_lock_shared(8099568234784717057) then
            perform pg_notify('pgrelay', '');
        end if;
    end if;
    return null;
end
$$;

-- Statement-level AFTER TRUNCATE trigger on each partition of an exposed partitioned table:
-- the partition's rows are gone without a trace in the root's events, so subscribers are
-- told to start over ('p'). Arguments: the capture mode, and the oid of the root. (Truncating
-- the root fires the root's trigger, logged as a truncate, and then these, which relays skip.)
create or replace function pgrelay.capture_partition_truncate() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp
set lock_timeout = 0
as $$
declare
    root oid := tg_argv[1]::oid;
begin
    insert into pgrelay.changes (seq, last_seq, stmt, relid, keys, n, body)
    select s, s, pgrelay.statement_seq(root, s), root, null, 1,
           json_build_array(json_build_array(s, 'p', null, null, null))
      from (select nextval('pgrelay.changes_seq') as s) as x;
    if tg_argv[0] = 'notify' then
        if not pg_try_advisory_xact_lock_shared(8099568234784717057) then
            perform pg_notify('pgrelay', '');
        end if;
    end if;
    return null;
end
$$;

-- How pgrelay can capture a table: 'plain', 'partitioned', 'child' (inheritance child: row
-- triggers, since statements on its parent reach its rows without firing its statement
-- triggers), or an error naming the table and why not.
create or replace function pgrelay.classify(rel oid, label text) returns text
language plpgsql stable as $$
declare
    kind char;
begin
    select relkind into kind from pg_catalog.pg_class where oid = rel;
    if kind is null or kind not in ('r', 'p') then
        raise exception 'table % does not exist', label using errcode = 'undefined_table';
    end if;
    if pgrelay.key_columns(rel) is null then
        raise exception 'table % has no primary key; pgrelay needs one to identify rows', label
            using errcode = 'invalid_table_definition';
    end if;
    if exists (select 1 from pg_catalog.pg_constraint
                where conrelid = rel and contype = 'p' and condeferrable) then
        raise exception 'table % has a DEFERRABLE primary key; pgrelay needs keys that are unique after every statement to keep copies exact', label
            using errcode = 'feature_not_supported';
    end if;
    if exists (select 1 from pg_catalog.pg_class where oid = rel and relispartition) then
        raise exception 'table % is a partition; expose its partitioned table (%) instead', label,
            (select pg_catalog.pg_partition_root(rel)::regclass::text)
            using errcode = 'feature_not_supported';
    end if;
    if kind = 'p' then
        return 'partitioned';
    end if;
    if exists (select 1 from pg_catalog.pg_inherits where inhparent = rel) then
        raise exception 'table % has inheritance children; pgrelay cannot capture writes to them through it (expose the children)', label
            using errcode = 'feature_not_supported';
    end if;
    if exists (select 1 from pg_catalog.pg_inherits where inhrelid = rel) then
        return 'child';
    end if;
    return 'plain';
end
$$;

-- Installs capture on one table (mode 'notify' or 'poll'): its triggers, ENABLE ALWAYS so they
-- also fire under session_replication_role = replica (logical-replication apply, restores).
-- Raises a clear error for a table pgrelay cannot capture.
create or replace function pgrelay.install(p_schema text, p_table text, p_mode text default 'notify')
returns void language plpgsql as $$
declare
    rel   oid;
    label text := format('%s.%s', p_schema, p_table);
    kind  text;
    part  oid;
begin
    if p_mode not in ('notify', 'poll') then
        raise exception 'capture mode must be notify or poll, not %', p_mode;
    end if;
    select c.oid into rel
      from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
     where n.nspname = p_schema and c.relname = p_table;
    if rel is null then
        raise exception 'table % does not exist', label using errcode = 'undefined_table';
    end if;
    kind := pgrelay.classify(rel, label);
    perform pgrelay.uninstall(p_schema, p_table);
    execute format('create trigger pgrelay_capture_before before insert or update or delete or truncate on %I.%I '
                   'for each statement execute function pgrelay.capture_statement(%L)', p_schema, p_table, rel);
    execute format('alter table %I.%I enable always trigger pgrelay_capture_before', p_schema, p_table);
    if kind = 'plain' then
        execute format('create trigger pgrelay_capture_insert after insert on %I.%I '
                       'referencing new table as pgrelay_new '
                       'for each statement execute function pgrelay.capture(%L)', p_schema, p_table, p_mode);
        execute format('create trigger pgrelay_capture_update after update on %I.%I '
                       'referencing old table as pgrelay_old new table as pgrelay_new '
                       'for each statement execute function pgrelay.capture(%L)', p_schema, p_table, p_mode);
        execute format('create trigger pgrelay_capture_delete after delete on %I.%I '
                       'referencing old table as pgrelay_old '
                       'for each statement execute function pgrelay.capture(%L)', p_schema, p_table, p_mode);
        -- Logical-replication apply (and other session_replication_role = replica writers)
        -- fire row triggers only: this one, then, and not the statement triggers above.
        execute format('create trigger pgrelay_capture_replica after insert or update or delete on %I.%I '
                       'for each row execute function pgrelay.capture_row(%L, %L)',
                       p_schema, p_table, p_mode, rel);
        execute format('alter table %I.%I enable replica trigger pgrelay_capture_replica', p_schema, p_table);
    else
        execute format('create trigger pgrelay_capture_row after insert or update or delete on %I.%I '
                       'for each row execute function pgrelay.capture_row(%L, %L)',
                       p_schema, p_table, p_mode, rel);
        execute format('alter table %I.%I enable always trigger pgrelay_capture_row', p_schema, p_table);
    end if;
    execute format('create trigger pgrelay_capture_truncate after truncate on %I.%I '
                   'for each statement execute function pgrelay.capture(%L)', p_schema, p_table, p_mode);
    execute format('alter table %I.%I enable always trigger pgrelay_capture_truncate', p_schema, p_table);
    if kind = 'partitioned' then
        for part in select relid from pg_catalog.pg_partition_tree(rel) where relid <> rel loop
            perform pgrelay.install_partition(part, rel, p_mode);
        end loop;
    end if;
end
$$;

-- The statement triggers of one partition (or sub-partitioned table) of an exposed root: its
-- TRUNCATE, and the BEFORE STATEMENT trigger that orders nested statements for statements
-- made straight into it.
create or replace function pgrelay.install_partition(part oid, root oid, p_mode text)
returns void language plpgsql as $$
begin
    execute format('create or replace trigger pgrelay_capture_partition_truncate after truncate on %s '
                   'for each statement execute function pgrelay.capture_partition_truncate(%L, %L)',
                   part::regclass, p_mode, root);
    execute format('alter table %s enable always trigger pgrelay_capture_partition_truncate',
                   part::regclass);
    execute format('create or replace trigger pgrelay_capture_before before insert or update or delete or truncate on %s '
                   'for each statement execute function pgrelay.capture_statement(%L)',
                   part::regclass, root);
    execute format('alter table %s enable always trigger pgrelay_capture_before', part::regclass);
end
$$;

-- Removes the statement triggers of a table that is no longer a partition of an exposed root.
create or replace function pgrelay.uninstall_partition(part oid) returns void
language plpgsql as $$
begin
    if to_regclass(part::regclass::text) is not null then
        execute format('drop trigger if exists pgrelay_capture_partition_truncate on %s', part::regclass);
        execute format('drop trigger if exists pgrelay_capture_before on %s', part::regclass);
    end if;
end
$$;

-- Removes capture from one table and its partitions (the log and its rows stay).
create or replace function pgrelay.uninstall(p_schema text, p_table text) returns void
language plpgsql as $$
declare
    rel  oid;
    part oid;
    trg  text;
begin
    select c.oid into rel
      from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
     where n.nspname = p_schema and c.relname = p_table;
    if rel is null then
        raise exception 'table %.% does not exist', p_schema, p_table using errcode = 'undefined_table';
    end if;
    foreach trg in array array['pgrelay_capture_insert', 'pgrelay_capture_update',
                               'pgrelay_capture_delete', 'pgrelay_capture_truncate',
                               'pgrelay_capture_row', 'pgrelay_capture_replica',
                               'pgrelay_capture_before'] loop
        execute format('drop trigger if exists %I on %I.%I', trg, p_schema, p_table);
    end loop;
    -- Partitions: those in the tree now, and any table still carrying a trigger for this root
    -- (detached since).
    for part in select relid from pg_catalog.pg_partition_tree(rel) where relid <> rel
                union
                select tgrelid from pg_catalog.pg_trigger
                 where tgname = 'pgrelay_capture_partition_truncate'
                   and encode(tgargs, 'escape') like '%' || rel::text || E'\\000' loop
        perform pgrelay.uninstall_partition(part);
    end loop;
end
$$;

-- Nothing here is for other roles to call: capture functions run as triggers (firing does not
-- check EXECUTE; creating a trigger does), the rest is for the installing role.
revoke all on all functions in schema pgrelay from public;
revoke all on all tables in schema pgrelay from public;
revoke all on all sequences in schema pgrelay from public;
revoke all on schema pgrelay from public;

-- The capture functions are SECURITY DEFINER (writers must not be able to write the log
-- themselves), and rendering a row runs code the table's owner chose: a user-defined cast to
-- json of a column's type runs inside to_json. So they are owned by pgrelay_capture, a
-- NOLOGIN role that may do nothing but append to the log: no table to read, no role to alter,
-- nothing to create. (Owned by the installing role, a superuser's install would hand
-- superuser to anyone who owns an exposed table.) The role is created here when missing; an
-- installing role that may not create roles needs a superuser to run, once per cluster:
--     create role pgrelay_capture nologin; grant pgrelay_capture to <installing role>;
do $$
begin
    if not exists (select 1 from pg_catalog.pg_roles where rolname = 'pgrelay_capture') then
        begin
            create role pgrelay_capture nologin noinherit;
        exception
            when duplicate_object or unique_violation then null;  -- created concurrently
            when insufficient_privilege then
                raise exception 'pgrelay needs a role pgrelay_capture to own its capture functions, and % may not create roles', current_user
                    using hint = format('As a superuser, run once: create role pgrelay_capture nologin; grant pgrelay_capture to %I;', current_user);
        end;
    end if;
    if exists (select 1 from pg_catalog.pg_roles
                where rolname = 'pgrelay_capture'
                  and (rolsuper or rolcreaterole or rolcreatedb or rolcanlogin or rolreplication or rolbypassrls)) then
        raise exception 'role pgrelay_capture must be a plain NOLOGIN role: it runs code table owners choose';
    end if;
    -- The installing role hands the functions over (ALTER ... OWNER needs membership).
    if not pg_catalog.pg_has_role(current_user, 'pgrelay_capture', 'USAGE') then
        begin
            execute format('grant pgrelay_capture to %I', current_user);
        exception when insufficient_privilege then
            raise exception 'pgrelay hands its capture functions to role pgrelay_capture, and % is not a member of it', current_user
                using hint = format('As a superuser, run once: grant pgrelay_capture to %I;', current_user);
        end;
    end if;
end
$$;
grant usage on schema pgrelay to pgrelay_capture;
grant insert on pgrelay.changes to pgrelay_capture;
grant usage on sequence pgrelay.changes_seq to pgrelay_capture;
grant execute on function pgrelay.key_columns(oid), pgrelay.statement_seq(oid, bigint) to pgrelay_capture;
-- A new owner needs CREATE on the schema at the moment of the change, not afterwards.
grant create on schema pgrelay to pgrelay_capture;
alter function pgrelay.capture_statement() owner to pgrelay_capture;
alter function pgrelay.capture() owner to pgrelay_capture;
alter function pgrelay.capture_row() owner to pgrelay_capture;
alter function pgrelay.capture_partition_truncate() owner to pgrelay_capture;
revoke create on schema pgrelay from pgrelay_capture;
