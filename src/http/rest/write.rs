//! Writes: inserts and upserts (`POST`), filtered updates and deletes (`PATCH`/`DELETE
//! /api/{table}`), and the by-key `PATCH`, `PUT`, `DELETE /api/{table}/{id}`; every one inside
//! its transaction with the caller's policy checked on the rows it touches.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use tokio_postgres::types::ToSql;
use warp::http::{HeaderMap, StatusCode};

use super::*;

/// Refuses stored rows outside the caller's rows (the transaction is rolled back).
fn check_in_policy(
    scope: &Scope,
    policy: &filter::Filter,
    stored: &[Stored],
) -> Result<(), ApiError> {
    if stored.iter().all(|row| policy.matches_text(&row.full)) {
        Ok(())
    } else {
        Err(permission_denied(
            scope.anonymous(),
            format!(
                "The row would be outside the rows of {} this caller may write",
                scope.table.resource
            ),
        ))
    }
}

/// A row a write returned.
struct Stored {
    /// The whole row as stored (`to_json(t.*)`).
    full: String,
    /// The row as the response shows it.
    shown: String,
    /// Inserted rather than updated (upserts).
    inserted: bool,
}

impl Stored {
    fn from_row(row: &tokio_postgres::Row) -> Stored {
        Stored {
            full: row.get(0),
            shown: row.get(1),
            inserted: row.try_get::<_, bool>(2).unwrap_or(false),
        }
    }
}

pub(super) async fn insert_rows(
    state: Arc<AppState>,
    principal: Principal,
    resource: String,
    pairs: Vec<(String, String)>,
    headers: HeaderMap,
    body: Vec<u8>,
) -> Result<warp::reply::Response, ApiError> {
    let scope = Scope::new(&state, principal, &resource)?;
    scope.require(scope.access.insert, "insert into")?;
    let query = scope.query(&pairs)?;
    if !query.filters.is_empty()
        || !query.order.is_empty()
        || query.limit.is_some()
        || query.offset.is_some()
    {
        return Err(error::parse_error(
            "query",
            "POST",
            "filters, order, limit and offset do not apply to inserts",
        ));
    }
    let wants = Wants::from_headers(&headers)?;
    let prefer = &wants.prefer;
    let representation = prefer.ret == Some(Return::Representation);
    if representation {
        scope.require(scope.access.read, "read")?;
    }
    if prefer.resolution == Some(Resolution::MergeDuplicates) {
        // An upsert may update a stored row: it needs the update right as well.
        scope.require(scope.access.update, "update")?;
    }
    let (mut rows, _) = parse_body(&body)?;
    if let Some(columns) = &query.columns {
        // Keys outside `columns` are ignored, as PostgREST does.
        for row in &mut rows {
            row.retain(|k, _| columns.contains(k));
        }
    }
    let written: Vec<String> = match &query.columns {
        Some(columns) => columns.clone(),
        None => {
            let mut keys: Vec<String> = Vec::new();
            for key in rows.iter().flat_map(|r| r.keys()) {
                if !keys.contains(key) {
                    keys.push(key.clone());
                }
            }
            keys
        }
    };
    scope.check_visible_write(written.iter().chain(query.on_conflict.iter().flatten()))?;
    scope.check_visible_read(&query)?;
    let anonymous = scope.anonymous();
    let mut client = connection(&state).await?;
    let table = known_columns(
        &state,
        &client,
        scope.table.clone(),
        written.iter().chain(query.on_conflict.iter().flatten()),
    )
    .await
    .map_err(|e| e.into_api(column_not_found))?;
    let table = known_columns(&state, &client, table, query.read_columns())
        .await
        .map_err(|e| e.into_api(undefined_column))?;
    let shown = scope
        .shown(&client, &table, query.select.as_deref(), wants.media)
        .await?;
    let policy = scope.policy(&client).await?;
    let shown_row = match (wants.media, &shown) {
        (Media::Csv, Some(shown)) => statement::row_csv(shown),
        _ => statement::row_json(shown.as_deref()),
    };
    let plan = InsertPlan {
        table: &table,
        returning: statement::returning(&shown_row, true),
        resolution: prefer.resolution,
        target: match &query.on_conflict {
            Some(columns) => statement::listed_columns(&table, columns),
            None => table.key_columns.iter().map(|k| quote_ident(k)).collect(),
        },
        policy: &policy,
        // With `columns` and without `missing=default`, every row names every listed column
        // (an object leaving one out stores NULL).
        columns: match &query.columns {
            Some(columns) if !prefer.missing_default => {
                Some(statement::listed_columns(&table, columns))
            }
            _ => None,
        },
    };
    let tx = begin(&state, &mut client, &scope).await?;
    let stored = match plan.run(&tx, &rows).await {
        Ok(stored) => stored,
        Err(err) => {
            drop(tx);
            return Err(write_error(&client, &table, &err, &rows, anonymous).await);
        }
    };
    if prefer.resolution == Some(Resolution::MergeDuplicates) && stored.len() < rows.len() {
        // A conflicting row outside the caller's rows was left alone: refused, as row-level
        // security refuses an upsert onto a row the caller may not update.
        return Err(permission_denied(
            anonymous,
            format!(
                "An upsert would update a row of {} this caller may not update",
                table.resource
            ),
        ));
    }
    check_in_policy(&scope, &policy, &stored)?;
    let inserted = stored.iter().filter(|s| s.inserted).count();
    let count = stored.len();
    let location = (prefer.ret == Some(Return::HeadersOnly) && count == 1)
        .then(|| location(&table, &stored[0].full))
        .flatten();
    let body = written_body(representation, wants.media, stored, shown.as_deref())?;
    tx.commit()
        .await
        .map_err(|err| db_error(&err, &table, anonymous))?;
    let status =
        if inserted == 0 && count > 0 && prefer.resolution == Some(Resolution::MergeDuplicates) {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
    let total = prefer.count.map(|_| count as i64);
    let mut reply = Answer {
        status,
        content_type: body.as_ref().map(|_| wants.media.content_type()),
        body: body.unwrap_or_default(),
        headers: vec![("content-range", content_range(1, 0, total))],
    };
    reply.headers.extend(preference_applied(prefer));
    if let Some(location) = location {
        reply.headers.push(("location", location));
    }
    Ok(reply.into_response())
}

/// `/api/{table}?k=eq.v` for a stored row (PostgREST's `Location` of `return=headers-only`).
fn location(table: &TableInfo, row: &str) -> Option<String> {
    let fields: serde_json::Map<String, Value> = serde_json::from_str(row).ok()?;
    let mut out = format!("/api/{}", table.resource);
    for (i, key) in table.key_columns.iter().enumerate() {
        let value = match fields.get(key)? {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let encode = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        out.push(if i == 0 { '?' } else { '&' });
        out.push_str(&format!("{}=eq.{}", encode(key), encode(&value)));
    }
    Some(out)
}

/// How an insert runs: its table, conflict handling, what it returns.
pub(super) struct InsertPlan<'a> {
    pub(super) table: &'a TableInfo,
    pub(super) returning: String,
    pub(super) resolution: Option<Resolution>,
    /// The conflict target, quoted.
    pub(super) target: Vec<String>,
    /// Rows an upsert may update (the caller's policy, on the stored row).
    pub(super) policy: &'a filter::Filter,
    /// Every row into these columns (quoted), else each row into the columns it names.
    pub(super) columns: Option<Vec<String>>,
}

impl InsertPlan<'_> {
    /// A statement for rows into `columns` (`many`: an array bound as `$1`), and the values
    /// its `on conflict` clause binds after the rows.
    pub(super) fn statement(&self, columns: &[String], many: bool) -> (String, Params) {
        // $1 is the rows (unless a row names no column: `default values`).
        let mut params: Params = Vec::new();
        if !columns.is_empty() {
            params.push(Box::new(Value::Null));
        }
        let conflict = match self.resolution {
            None => String::new(),
            Some(resolution) => {
                let policy = if resolution == Resolution::MergeDuplicates && !columns.is_empty() {
                    self.policy.to_sql_qualified("t", &mut params)
                } else {
                    "true".to_owned()
                };
                statement::on_conflict(&self.target, columns, resolution, &policy)
            }
        };
        let sql = if many {
            statement::insert_many(self.table, columns, &conflict, &self.returning)
        } else {
            statement::insert_one(self.table, columns, &conflict, &self.returning)
        };
        // The placeholder for $1 is replaced by the rows when the statement runs.
        if !columns.is_empty() {
            params.remove(0);
        }
        (sql, params)
    }

    /// Stores `rows` (in the request's transaction) and returns them as stored, in order.
    async fn run(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        rows: &[Row],
    ) -> Result<Vec<Stored>, tokio_postgres::Error> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let per_row = |row: &Row| statement::named_columns(self.table, row);
        let shared = match &self.columns {
            Some(columns) => Some(columns.clone()),
            None => {
                let first = per_row(&rows[0]);
                (rows.len() > 1 && !first.is_empty() && rows.iter().all(|r| per_row(r) == first))
                    .then_some(first)
            }
        };
        if let Some(columns) = shared.filter(|c| !c.is_empty()) {
            let items = Value::Array(rows.iter().cloned().map(Value::Object).collect());
            let (sql, params) = self.statement(&columns, true);
            let stored = tx.query(&sql, &with_rows(&items, &params, true)).await?;
            return Ok(stored.iter().map(Stored::from_row).collect());
        }
        let mut statements = HashMap::new();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let columns = per_row(row);
            if !statements.contains_key(&columns) {
                let (sql, params) = self.statement(&columns, false);
                let prepared = tx.prepare(&sql).await?;
                statements.insert(columns.clone(), (prepared, params));
            }
            let (prepared, params) = &statements[&columns];
            let value = Value::Object(row.clone());
            let stored = tx
                .query_opt(prepared, &with_rows(&value, params, !columns.is_empty()))
                .await?;
            // `on conflict do nothing`/a skipped update returns no row.
            out.extend(stored.as_ref().map(Stored::from_row));
        }
        Ok(out)
    }
}

/// PATCH (`body` given) or DELETE of the rows the filters match.
pub(super) async fn write_rows(
    state: Arc<AppState>,
    principal: Principal,
    resource: String,
    pairs: Vec<(String, String)>,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
) -> Result<warp::reply::Response, ApiError> {
    let scope = Scope::new(&state, principal, &resource)?;
    let verb = if body.is_some() { "UPDATE" } else { "DELETE" };
    if body.is_some() {
        scope.require(scope.access.update, "update")?;
    } else {
        scope.require(scope.access.delete, "delete from")?;
    }
    let query = scope.query(&pairs)?;
    if query.limit.is_some()
        || query.offset.is_some()
        || query.on_conflict.is_some()
        || query.columns.is_some()
    {
        return Err(error::parse_error(
            "query",
            verb,
            "limit, offset, on_conflict and columns do not apply to updates and deletes \
             (order orders the rows returned)",
        ));
    }
    if query.filters.is_empty() && !state.config.rest_allow_unfiltered_writes {
        return Err(unfiltered(verb));
    }
    let wants = Wants::from_headers(&headers)?;
    let prefer = &wants.prefer;
    let representation = prefer.ret == Some(Return::Representation);
    if representation {
        scope.require(scope.access.read, "read")?;
    }
    let row = match body {
        None => None,
        Some(body) => {
            let (rows, many) = parse_body(&body)?;
            match rows.into_iter().next() {
                Some(row) if !many => Some(row),
                _ => return Err(bad_body("The body of an update must be one JSON object")),
            }
        }
    };
    let anonymous = scope.anonymous();
    scope.check_visible_write(row.iter().flat_map(|r| r.keys()))?;
    scope.check_visible_read(&query)?;
    state
        .config
        .limits
        .filter()
        .check(&query.filters)
        .map_err(|e| filter_error(e, &scope.table, anonymous))?;
    let mut client = connection(&state).await?;
    let table = known_columns(
        &state,
        &client,
        scope.table.clone(),
        row.iter().flat_map(|r| r.keys()),
    )
    .await
    .map_err(|e| e.into_api(column_not_found))?;
    let table = known_columns(&state, &client, table, query.read_columns())
        .await
        .map_err(|e| e.into_api(undefined_column))?;
    let shown = scope
        .shown(&client, &table, query.select.as_deref(), wants.media)
        .await?;
    let filter = filter::compile(&client, &table.columns, query.filters.clone())
        .await
        .map_err(|err| filter_error(err, &table, anonymous))?;
    let policy = scope.policy(&client).await?;
    let shown_row = match (wants.media, &shown) {
        (Media::Csv, Some(shown)) => statement::row_csv(shown),
        _ => statement::row_json(shown.as_deref()),
    };
    // With `order`, the rows come back ordered (PostgREST orders a representation).
    let returning = if query.order.is_empty() {
        statement::returning(&shown_row, false)
    } else {
        "returning t.*".to_owned()
    };
    let ordered = |sql: String| {
        if query.order.is_empty() {
            sql
        } else {
            statement::ordered(&table, &sql, &shown_row, &query.order)
        }
    };
    let mut params: Params = Vec::new();
    let sql = match &row {
        // An update that sets nothing changes nothing (PostgREST answers it with no rows).
        Some(row) if row.is_empty() => None,
        Some(row) => {
            params.push(Box::new(Value::Object(row.clone())));
            // Filters and policy are on the row as it was.
            let condition = format!(
                "({}) and ({})",
                filter.to_sql_qualified("t", &mut params),
                policy.to_sql_qualified("t", &mut params)
            );
            Some(ordered(statement::update(
                &table,
                row,
                Write::Patch,
                &condition,
                &returning,
            )))
        }
        None => {
            let condition = format!(
                "({}) and ({})",
                filter.to_sql_qualified("t", &mut params),
                policy.to_sql_qualified("t", &mut params)
            );
            Some(ordered(statement::delete(&table, &condition, &returning)))
        }
    };
    let tx = begin(&state, &mut client, &scope).await?;
    let stored: Vec<Stored> = match &sql {
        None => Vec::new(),
        Some(sql) => match tx.query(sql, &refs(&params)).await {
            Ok(rows) => rows.iter().map(Stored::from_row).collect(),
            Err(err) => {
                drop(tx);
                let rows: Vec<Row> = row.into_iter().collect();
                return Err(write_error(&client, &table, &err, &rows, anonymous).await);
            }
        },
    };
    if row.is_some() {
        check_in_policy(&scope, &policy, &stored)?;
    }
    let count = stored.len();
    if let Some(max) = prefer.max_affected
        && count as i64 > max
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "PGRST124",
            "Query result exceeds max-affected preference constraint",
        )
        .with_details(format!("The query affects {count} rows")));
    }
    let body = written_body(representation, wants.media, stored, shown.as_deref())?;
    tx.commit()
        .await
        .map_err(|err| db_error(&err, &table, anonymous))?;
    let total = prefer.count.map(|_| count as i64);
    // PostgREST: an update's range is the rows it touched, a delete's is empty.
    let range = if verb == "UPDATE" {
        content_range(0, count, total)
    } else {
        content_range(1, 0, total)
    };
    let mut reply = Answer {
        status: if body.is_some() {
            StatusCode::OK
        } else {
            StatusCode::NO_CONTENT
        },
        content_type: body.as_ref().map(|_| wants.media.content_type()),
        body: body.unwrap_or_default(),
        headers: vec![("content-range", range)],
    };
    reply.headers.extend(preference_applied(prefer));
    Ok(reply.into_response())
}

pub(super) async fn update_row(
    state: Arc<AppState>,
    principal: Principal,
    resource: String,
    id: String,
    body: Vec<u8>,
    write: Write,
) -> Result<warp::reply::Response, ApiError> {
    let scope = Scope::new(&state, principal, &resource)?;
    scope.require(scope.access.update, "update")?;
    let key = parse_key(&scope.table, &id)?;
    let (rows, many) = parse_body(&body)?;
    let row = match rows.into_iter().next() {
        Some(row) if !many => row,
        _ => return Err(bad_body("The body must be one JSON object")),
    };
    if write == Write::Patch && row.is_empty() {
        return Err(bad_body("The body names no column to update"));
    }
    scope.check_visible_write(row.keys())?;
    if write == Write::Put && scope.access.columns.is_some() {
        // PUT resets every column the body leaves out, hidden ones included.
        return Err(permission_denied(
            scope.anonymous(),
            format!(
                "Not allowed to replace whole rows of {}; use PATCH",
                scope.table.resource
            ),
        ));
    }
    let anonymous = scope.anonymous();
    let mut client = connection(&state).await?;
    let table = known_columns(&state, &client, scope.table.clone(), row.keys())
        .await
        .map_err(|e| e.into_api(column_not_found))?;
    let policy = scope.policy(&client).await?;
    let mut params: Params = vec![Box::new(Value::Object(row.clone()))];
    let condition = format!(
        "{} and {}",
        key_condition(&table, &key, &mut params)?,
        policy.to_sql_qualified("t", &mut params)
    );
    let shown = by_id_shown(&scope, &table);
    let sql = statement::update(
        &table,
        &row,
        write,
        &condition,
        &statement::returning(&statement::row_json(shown.as_deref()), false),
    );
    let tx = begin(&state, &mut client, &scope).await?;
    let stored = match tx.query_opt(&sql, &refs(&params)).await {
        Ok(Some(stored)) => Stored::from_row(&stored),
        Ok(None) => return Err(missing_row(&table, &id)),
        Err(err) => {
            drop(tx);
            return Err(write_error(&client, &table, &err, &[row], anonymous).await);
        }
    };
    let stored = [stored];
    check_in_policy(&scope, &policy, &stored)?;
    tx.commit()
        .await
        .map_err(|err| db_error(&err, &table, anonymous))?;
    let [stored] = stored;
    Ok(raw_json(StatusCode::OK, stored.shown))
}

/// What a by-id write returns: the visible row, or only its key without the read right.
fn by_id_shown(scope: &Scope, table: &TableInfo) -> Option<Vec<Shown>> {
    let columns: Option<Vec<String>> = if scope.access.read {
        scope.access.columns.as_ref().map(|_| {
            table
                .columns
                .iter()
                .map(|c| c.name.clone())
                .filter(|c| scope.access.sees(c))
                .collect()
        })
    } else {
        Some(table.key_columns.clone())
    };
    columns.map(|columns| {
        columns
            .into_iter()
            .map(|c| Shown {
                key: c.clone(),
                column: c,
                cast: None,
            })
            .collect()
    })
}

pub(super) async fn delete_row(
    state: Arc<AppState>,
    principal: Principal,
    resource: String,
    id: String,
) -> Result<warp::reply::Response, ApiError> {
    let scope = Scope::new(&state, principal, &resource)?;
    scope.require(scope.access.delete, "delete from")?;
    let key = parse_key(&scope.table, &id)?;
    let mut client = connection(&state).await?;
    let table = scope.table.clone();
    let policy = scope.policy(&client).await?;
    let mut params: Params = Vec::new();
    let condition = format!(
        "{} and {}",
        key_condition(&table, &key, &mut params)?,
        policy.to_sql_qualified("t", &mut params),
    );
    let shown = by_id_shown(&scope, &table);
    let sql = statement::delete(
        &table,
        &condition,
        &statement::returning(&statement::row_json(shown.as_deref()), false),
    );
    let row = one_row(&state, &mut client, &scope, &table, &sql, &params, &id).await?;
    Ok(raw_json(StatusCode::OK, row.get(1)))
}

/// `value` (unless the statement binds no rows) followed by `params`.
fn with_rows<'a>(value: &'a Value, params: &'a Params, bound: bool) -> Vec<&'a (dyn ToSql + Sync)> {
    let mut all: Vec<&(dyn ToSql + Sync)> = Vec::new();
    if bound {
        all.push(value as &(dyn ToSql + Sync));
    }
    all.extend(refs(params));
    all
}

// ---------------------------------------------------------------------------------------------
// Errors of writes

/// A write's error; for a rejected value (`invalid input syntax for type numeric: "abc"`),
/// finds which row and column it came from, since PostgreSQL does not say, and says so in
/// `details`.
async fn write_error(
    client: &tokio_postgres::Client,
    table: &TableInfo,
    err: &tokio_postgres::Error,
    rows: &[Row],
    anonymous: bool,
) -> ApiError {
    let mut api = db_error(err, table, anonymous);
    if !api.code.starts_with("22") {
        return api;
    }
    if let Some((index, column)) = find_bad_value(client, table, rows).await {
        api.details = Some(if rows.len() > 1 {
            format!("Row {index}, column {column:?}")
        } else {
            format!("Column {column:?}")
        });
    }
    api
}

/// Converts the body's values one at a time until PostgreSQL rejects one.
async fn find_bad_value(
    client: &tokio_postgres::Client,
    table: &TableInfo,
    rows: &[Row],
) -> Option<(usize, String)> {
    let sql = format!(
        "select jsonb_populate_record(null::{}, $1::jsonb) is null",
        quote_table(&table.name)
    );
    let statement = client.prepare(&sql).await.ok()?;
    let mut probes = 0;
    for (index, row) in rows.iter().enumerate() {
        for (column, value) in row {
            probes += 1;
            if probes > MAX_PROBES {
                return None;
            }
            let mut one = serde_json::Map::new();
            one.insert(column.clone(), value.clone());
            if let Err(err) = client.query_one(&statement, &[&Value::Object(one)]).await {
                if err.code().is_some_and(|c| c.code().starts_with("22")) {
                    return Some((index, column.clone()));
                }
                return None;
            }
        }
    }
    None
}

/// The written rows as the response body, when the caller asked for them
/// (`Prefer: return=representation`).
fn written_body(
    representation: bool,
    media: Media,
    stored: Vec<Stored>,
    shown: Option<&[Shown]>,
) -> Result<Option<String>, ApiError> {
    if !representation {
        return Ok(None);
    }
    render(media, stored.into_iter().map(|s| s.shown).collect(), shown).map(Some)
}
