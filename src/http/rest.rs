//! REST CRUD over the exposed tables: `/api/{table}` and `/api/{table}/{id}`.
//!
//! Writes go through the pool like any other writer's, so the capture triggers stream them to
//! subscribers; nothing here is special-cased. Every value is bound as a parameter and
//! converted by PostgreSQL itself (`jsonb_populate_record` against the table's row type, or
//! `$n::text::<type>` for keys); every identifier comes from the catalog and goes through
//! [`quote_ident`]. Body keys, `select`, `order` and filter columns are checked against the
//! catalog before any statement is built; a name the cached catalog does not know makes it
//! re-read the table's columns once (a column may have been added) before the request is
//! rejected.
//!
//! A row is addressed by its primary key; a composite key is its values joined by commas in
//! key order (`/api/lines/7,2`; a comma inside a value is `%2C`).

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use percent_encoding::percent_decode_str;
use serde_json::{Map, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use warp::http::StatusCode;
use warp::{Buf, Filter, Rejection, Reply};

use super::{ApiError, AppState, with_state};
use crate::filter::{self, FilterError, RawCondition};
use crate::row::Fields;
use crate::sql::{TableInfo, quote_ident, quote_table};

/// Rows a list returns when the request sets no `limit`.
const DEFAULT_LIMIT: i64 = 100;

/// Most rows a list returns, whatever `limit` says.
const MAX_LIMIT: i64 = 1000;

/// Most single-value probes spent finding which column a rejected value belongs to.
const MAX_PROBES: usize = 1000;

/// Bound parameters, in `$n` order.
type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// A JSON object from a request body.
type Row = Map<String, Value>;

/// All REST routes.
pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    list(Arc::clone(&state))
        .or(get_one(Arc::clone(&state)))
        .or(create(Arc::clone(&state)))
        .or(update(Arc::clone(&state)))
        .or(replace(Arc::clone(&state)))
        .or(remove(state))
}

/// Runs a handler and turns its error into a rejection for `recover`.
async fn respond(
    result: impl Future<Output = Result<warp::reply::Response, ApiError>>,
) -> Result<warp::reply::Response, Rejection> {
    result.await.map_err(warp::reject::custom)
}

/// GET /api/{table}?price=gt.10&select=id,name&order=price.desc,id&limit=10&offset=20
fn list(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and_then(|resource: String, state: Arc<AppState>, query| {
            respond(list_rows(state, resource, query))
        })
}

/// GET /api/{table}/{id}?select=id,name
fn get_one(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / String / String)
        .and(warp::get())
        .and(with_state(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and_then(|resource, id, state, query| respond(read_row(state, resource, id, query)))
}

/// POST /api/{table} with an object or an array of objects: 201 with the stored row(s)
fn create(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let limit = state.config.max_body_bytes;
    warp::path!("api" / String)
        .and(warp::post())
        .and(with_state(state))
        .and(body(limit))
        .and_then(|resource, state, body| respond(insert_rows(state, resource, body)))
}

/// PATCH /api/{table}/{id} with an object: sets the columns it names; 200 with the row
fn update(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let limit = state.config.max_body_bytes;
    warp::path!("api" / String / String)
        .and(warp::patch())
        .and(with_state(state))
        .and(body(limit))
        .and_then(|resource, id, state, body| {
            respond(update_row(state, resource, id, body, Write::Patch))
        })
}

/// PUT /api/{table}/{id} with an object: replaces the row (columns left out get their
/// default, NULL where there is none; key columns left out keep their values); 200 with the row
fn replace(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let limit = state.config.max_body_bytes;
    warp::path!("api" / String / String)
        .and(warp::put())
        .and(with_state(state))
        .and(body(limit))
        .and_then(|resource, id, state, body| {
            respond(update_row(state, resource, id, body, Write::Put))
        })
}

/// DELETE /api/{table}/{id}: 200 with the deleted row
fn remove(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / String / String)
        .and(warp::delete())
        .and(with_state(state))
        .and_then(|resource, id, state| respond(delete_row(state, resource, id)))
}

/// The request body, at most `limit` bytes: a larger `content-length` is refused before
/// anything is read, and a body without one (chunked) is refused as soon as it passes `limit`.
fn body(limit: u64) -> impl Filter<Extract = (Vec<u8>,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and_then(move |length: Option<u64>| async move {
            match length {
                Some(length) if length > limit => Err(warp::reject::custom(too_large(limit))),
                _ => Ok(()),
            }
        })
        .untuple_one()
        .and(warp::body::stream())
        .and_then(move |stream| async move {
            read_limited(stream, limit)
                .await
                .map_err(warp::reject::custom)
        })
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("The request body is larger than the limit of {limit} bytes"),
    )
}

async fn read_limited<S, B>(stream: S, limit: u64) -> Result<Vec<u8>, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut stream = std::pin::pin!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(|err| {
            tracing::debug!(error = %err, "reading a request body failed");
            ApiError::bad_request("The request body could not be read")
        })?;
        if (out.len() + chunk.remaining()) as u64 > limit {
            return Err(too_large(limit));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            out.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Handlers

async fn list_rows(
    state: Arc<AppState>,
    resource: String,
    query: Vec<(String, String)>,
) -> Result<warp::reply::Response, ApiError> {
    let table = lookup(&state, &resource)?;
    let request = ListRequest::from_pairs(&query)?;
    let client = connection(&state).await?;
    let table = known_columns(&state, &client, table, request.columns()).await?;
    let filter = filter::compile(&client, &table.columns, request.filters.clone())
        .await
        .map_err(|err| filter_error(err, &table))?;
    let mut params: Params = Vec::new();
    let condition = filter.to_sql(&mut params);
    let mut order: Vec<String> = request
        .order
        .iter()
        .map(|o| {
            format!(
                "t.{} {}{}",
                quote_ident(&o.column),
                if o.descending { "desc" } else { "asc" },
                match o.nulls_first {
                    Some(true) => " nulls first",
                    Some(false) => " nulls last",
                    None => "",
                }
            )
        })
        .collect();
    // The key breaks ties, so pages by offset neither repeat nor skip rows.
    order.extend(
        table
            .key_columns
            .iter()
            .map(|k| format!("t.{}", quote_ident(k))),
    );
    params.push(Box::new(request.limit));
    let limit = params.len();
    params.push(Box::new(request.offset));
    let offset = params.len();
    let sql = format!(
        "select to_json(t.*)::text from {} as t where {condition} order by {} limit ${limit} offset ${offset}",
        quote_table(&table.name),
        order.join(", "),
    );
    let rows = client
        .query(&sql, &refs(&params))
        .await
        .map_err(|err| db_error(&err, &table))?;
    let rows: Vec<String> = rows
        .iter()
        .map(|r| project(r.get(0), request.select.as_deref()))
        .collect();
    Ok(raw_json(StatusCode::OK, json_array(&rows)))
}

async fn read_row(
    state: Arc<AppState>,
    resource: String,
    id: String,
    query: Vec<(String, String)>,
) -> Result<warp::reply::Response, ApiError> {
    let table = lookup(&state, &resource)?;
    let mut select = None;
    for (key, value) in &query {
        match key.as_str() {
            "select" => select = Some(parse_select(value)?),
            other => {
                return Err(ApiError::bad_request(format!(
                    "Unknown query key {other:?} (a single row takes only select)"
                )));
            }
        }
    }
    let key = parse_key(&table, &id)?;
    let client = connection(&state).await?;
    let table = known_columns(&state, &client, table, select.iter().flatten()).await?;
    let mut params: Params = Vec::new();
    let sql = format!(
        "select to_json(t.*)::text from {} as t where {}",
        quote_table(&table.name),
        key_condition(&table, &key, &mut params)?
    );
    let row = client
        .query_opt(&sql, &refs(&params))
        .await
        .map_err(|err| db_error(&err, &table))?
        .ok_or_else(|| missing_row(&table, &id))?;
    Ok(raw_json(
        StatusCode::OK,
        project(row.get(0), select.as_deref()),
    ))
}

async fn insert_rows(
    state: Arc<AppState>,
    resource: String,
    body: Vec<u8>,
) -> Result<warp::reply::Response, ApiError> {
    let table = lookup(&state, &resource)?;
    let (rows, many) = parse_body(&body)?;
    let mut client = connection(&state).await?;
    let table = known_columns(&state, &client, table, rows.iter().flat_map(Map::keys)).await?;
    let stored = match insert(&mut client, &table, &rows).await {
        Ok(stored) => stored,
        Err(err) => return Err(write_error(&client, &table, &err, &rows).await),
    };
    let body = if many {
        json_array(&stored)
    } else {
        stored
            .into_iter()
            .next()
            .unwrap_or_else(|| "null".to_owned())
    };
    Ok(raw_json(StatusCode::CREATED, body))
}

/// Which update a PATCH or PUT makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// Only the columns the body names.
    Patch,
    /// Every column: the body's value, else the default (key columns keep theirs).
    Put,
}

async fn update_row(
    state: Arc<AppState>,
    resource: String,
    id: String,
    body: Vec<u8>,
    write: Write,
) -> Result<warp::reply::Response, ApiError> {
    let table = lookup(&state, &resource)?;
    let key = parse_key(&table, &id)?;
    let (rows, many) = parse_body(&body)?;
    let row = match rows.into_iter().next() {
        Some(row) if !many => row,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                "The body must be one JSON object",
            ));
        }
    };
    if write == Write::Patch && row.is_empty() {
        return Err(ApiError::bad_request("The body names no column to update"));
    }
    let client = connection(&state).await?;
    let table = known_columns(&state, &client, table, row.keys()).await?;
    let mut params: Params = vec![Box::new(Value::Object(row.clone()))];
    let sql = update_sql(&table, &row, write, &key, &mut params)?;
    let result = client.query_opt(&sql, &refs(&params)).await;
    match result {
        Ok(Some(stored)) => Ok(raw_json(StatusCode::OK, stored.get(0))),
        Ok(None) => Err(missing_row(&table, &id)),
        Err(err) => Err(write_error(&client, &table, &err, &[row]).await),
    }
}

async fn delete_row(
    state: Arc<AppState>,
    resource: String,
    id: String,
) -> Result<warp::reply::Response, ApiError> {
    let table = lookup(&state, &resource)?;
    let key = parse_key(&table, &id)?;
    let client = connection(&state).await?;
    let mut params: Params = Vec::new();
    let sql = format!(
        "delete from {} as t where {} returning to_json(t.*)::text",
        quote_table(&table.name),
        key_condition(&table, &key, &mut params)?
    );
    let row = client
        .query_opt(&sql, &refs(&params))
        .await
        .map_err(|err| db_error(&err, &table))?
        .ok_or_else(|| missing_row(&table, &id))?;
    Ok(raw_json(StatusCode::OK, row.get(0)))
}

// ---------------------------------------------------------------------------------------------
// Requests

fn lookup(state: &AppState, resource: &str) -> Result<TableInfo, ApiError> {
    // Path segments arrive percent-encoded.
    let decoded = percent_decode_str(resource).decode_utf8_lossy();
    state.table(&decoded).ok_or_else(|| {
        ApiError::not_found(format!("Table {decoded:?} is not exposed by this relay"))
    })
}

async fn connection(state: &AppState) -> Result<deadpool_postgres::Object, ApiError> {
    state.pool.get().await.map_err(|err| {
        tracing::warn!(error = %crate::error::chain(&err), "no database connection for a REST request");
        ApiError::unavailable()
    })
}

/// The table with every name in `names` among its columns: re-reads the columns once if one
/// is unknown (it may have been added since the relay started), then rejects what is left.
async fn known_columns<'a>(
    state: &AppState,
    client: &tokio_postgres::Client,
    table: TableInfo,
    names: impl IntoIterator<Item = &'a String>,
) -> Result<TableInfo, ApiError> {
    let names: Vec<&String> = names.into_iter().collect();
    let unknown = |t: &TableInfo| {
        names
            .iter()
            .find(|n| !t.columns.iter().any(|c| &c.name == **n))
            .map(|n| (*n).clone())
    };
    if unknown(&table).is_none() {
        return Ok(table);
    }
    let table = state
        .refresh_columns(client, &table)
        .await
        .map_err(|err| match err {
            crate::sql::SqlError::Db(err) => db_error(&err, &table),
            other => {
                tracing::warn!(error = %crate::error::chain(&other), table = %table.name, "re-reading columns failed");
                ApiError::internal()
            }
        })?;
    match unknown(&table) {
        None => Ok(table),
        Some(name) => Err(unknown_column(&table, &name)),
    }
}

fn unknown_column(table: &TableInfo, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "unknown_column",
        format!("Table {} has no column {name:?}", table.resource),
    )
}

fn missing_row(table: &TableInfo, id: &str) -> ApiError {
    let id = percent_decode_str(id).decode_utf8_lossy();
    ApiError::not_found(format!("Table {} has no row {id:?}", table.resource))
}

/// The key values of `/api/{table}/{id}`, in key order (percent-decoded).
fn parse_key(table: &TableInfo, id: &str) -> Result<Vec<String>, ApiError> {
    let decode = |part: &str| {
        percent_decode_str(part)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| ApiError::bad_request("The row id is not valid UTF-8"))
    };
    let parts: Vec<String> = if table.key_columns.len() == 1 {
        vec![decode(id)?]
    } else {
        id.split(',').map(decode).collect::<Result<_, _>>()?
    };
    if parts.len() != table.key_columns.len() {
        return Err(ApiError::bad_request(format!(
            "Table {} is keyed by ({}): address a row as /api/{}/{}",
            table.resource,
            table.key_columns.join(", "),
            table.resource,
            table
                .key_columns
                .iter()
                .map(|k| format!("{{{k}}}"))
                .collect::<Vec<_>>()
                .join(",")
        )));
    }
    Ok(parts)
}

/// `t."k1" = $n::text::type1 and …`, binding the key values.
fn key_condition(
    table: &TableInfo,
    key: &[String],
    params: &mut Params,
) -> Result<String, ApiError> {
    let mut parts = Vec::with_capacity(key.len());
    for (name, value) in table.key_columns.iter().zip(key) {
        let column = table
            .columns
            .iter()
            .find(|c| &c.name == name)
            .ok_or_else(|| {
                tracing::error!(table = %table.name, column = %name, "a key column is missing from the catalog cache");
                ApiError::internal()
            })?;
        params.push(Box::new(value.clone()));
        parts.push(format!(
            "t.{} = ${}::text::{}",
            quote_ident(name),
            params.len(),
            column.sql_type
        ));
    }
    Ok(parts.join(" and "))
}

/// One sort key of `order=`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OrderBy {
    column: String,
    descending: bool,
    /// `Some(true)` for `nullsfirst`, `Some(false)` for `nullslast`.
    nulls_first: Option<bool>,
}

/// A list request's query string.
#[derive(Debug, Default)]
struct ListRequest {
    select: Option<Vec<String>>,
    order: Vec<OrderBy>,
    limit: i64,
    offset: i64,
    filters: Vec<RawCondition>,
}

impl ListRequest {
    fn from_pairs(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        let mut request = ListRequest {
            limit: DEFAULT_LIMIT,
            ..ListRequest::default()
        };
        for (key, value) in pairs {
            match key.as_str() {
                "select" => request.select = Some(parse_select(value)?),
                "order" => request.order = parse_order(value)?,
                "limit" => {
                    request.limit = parse_count(key, value)?.min(MAX_LIMIT);
                }
                "offset" => request.offset = parse_count(key, value)?,
                column => request
                    .filters
                    .push(filter::parse(column, value).map_err(|e| {
                        ApiError::new(StatusCode::BAD_REQUEST, "bad_filter", e.to_string())
                    })?),
            }
        }
        Ok(request)
    }

    /// Every column the request names.
    fn columns(&self) -> impl Iterator<Item = &String> {
        self.select
            .iter()
            .flatten()
            .chain(self.order.iter().map(|o| &o.column))
            .chain(self.filters.iter().map(|f| &f.column))
    }
}

fn parse_select(value: &str) -> Result<Vec<String>, ApiError> {
    let columns: Vec<String> = value.split(',').map(|c| c.trim().to_owned()).collect();
    if columns.iter().any(String::is_empty) {
        return Err(ApiError::bad_request(format!(
            "select must list columns, not {value:?}"
        )));
    }
    Ok(columns)
}

/// `col`, `col.asc`, `col.desc`, each optionally followed by `.nullsfirst`/`.nullslast`,
/// separated by commas.
fn parse_order(value: &str) -> Result<Vec<OrderBy>, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "order takes col.asc or col.desc, comma separated (e.g. order=price.desc,id), not {value:?}"
        ))
    };
    let mut out = Vec::new();
    for item in value.split(',') {
        let mut parts = item.trim().split('.');
        let column = parts.next().filter(|c| !c.is_empty()).ok_or_else(bad)?;
        let mut order = OrderBy {
            column: column.to_owned(),
            descending: false,
            nulls_first: None,
        };
        let mut direction_seen = false;
        for modifier in parts {
            match modifier {
                "asc" | "desc" if !direction_seen && order.nulls_first.is_none() => {
                    order.descending = modifier == "desc";
                    direction_seen = true;
                }
                "nullsfirst" | "nullslast" if order.nulls_first.is_none() => {
                    order.nulls_first = Some(modifier == "nullsfirst");
                }
                _ => return Err(bad()),
            }
        }
        out.push(order);
    }
    Ok(out)
}

fn parse_count(key: &str, value: &str) -> Result<i64, ApiError> {
    value
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{key} must be a non-negative integer, not {value:?}"
            ))
        })
}

/// The body's rows, and whether it was an array.
fn parse_body(body: &[u8]) -> Result<(Vec<Row>, bool), ApiError> {
    let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", message);
    let value: Value = serde_json::from_slice(body)
        .map_err(|err| bad(format!("The body is not valid JSON: {err}")))?;
    match value {
        Value::Object(row) => Ok((vec![row], false)),
        Value::Array(items) => {
            let mut rows = Vec::with_capacity(items.len());
            for (index, item) in items.into_iter().enumerate() {
                match item {
                    Value::Object(row) => rows.push(row),
                    _ => {
                        return Err(bad(format!(
                            "Item {index} of the body is not a JSON object"
                        )));
                    }
                }
            }
            Ok((rows, true))
        }
        _ => Err(bad(
            "The body must be a JSON object or an array of objects".into()
        )),
    }
}

/// Keeps the selected columns, in the order asked for.
/// A row (JSON text from `to_json`) with only the selected columns, in `select` order.
fn project(row: String, select: Option<&[String]>) -> String {
    match select {
        None => row,
        Some(select) => match Fields::parse(&row) {
            Ok(fields) => crate::row::project(&fields, select),
            Err(_) => row,
        },
    }
}

/// `[a,b,…]` from rows already encoded as JSON.
fn json_array(rows: &[String]) -> String {
    let mut out = String::with_capacity(rows.iter().map(|r| r.len() + 1).sum::<usize>() + 2);
    out.push('[');
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(row);
    }
    out.push(']');
    out
}

/// A response whose body is JSON text already encoded (rows stay text end to end, so any
/// stored value, however deeply nested, is returned whole).
fn raw_json(status: StatusCode, body: String) -> warp::reply::Response {
    let reply = warp::reply::with_header(body, "content-type", "application/json");
    warp::reply::with_status(reply, status).into_response()
}

fn refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// SQL

/// The table's columns that `row` names, in table order, quoted.
fn named_columns(table: &TableInfo, row: &Row) -> Vec<String> {
    table
        .columns
        .iter()
        .filter(|c| row.contains_key(&c.name))
        .map(|c| quote_ident(&c.name))
        .collect()
}

/// Inserting one row: the columns it names, converted by `jsonb_populate_record`; the others
/// get their defaults.
fn insert_one_sql(table: &TableInfo, columns: &[String]) -> String {
    let target = quote_table(&table.name);
    if columns.is_empty() {
        return format!("insert into {target} as t default values returning to_json(t.*)::text");
    }
    let from_r: Vec<String> = columns.iter().map(|c| format!("r.{c}")).collect();
    format!(
        "insert into {target} as t ({}) select {} from jsonb_populate_record(null::{target}, $1::jsonb) as r returning to_json(t.*)::text",
        columns.join(", "),
        from_r.join(", "),
    )
}

/// Inserting an array of rows that all name the same columns, in array order.
fn insert_many_sql(table: &TableInfo, columns: &[String]) -> String {
    let target = quote_table(&table.name);
    let from_r: Vec<String> = columns.iter().map(|c| format!("r.{c}")).collect();
    format!(
        "insert into {target} as t ({}) select {} from jsonb_array_elements($1::jsonb) with ordinality as e(item, n) \
         cross join lateral jsonb_populate_record(null::{target}, e.item) as r order by e.n returning to_json(t.*)::text",
        columns.join(", "),
        from_r.join(", "),
    )
}

/// Stores `rows` in one transaction and returns them as stored, in order.
async fn insert(
    client: &mut deadpool_postgres::Object,
    table: &TableInfo,
    rows: &[Row],
) -> Result<Vec<String>, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let first = named_columns(table, &rows[0]);
    let same = rows.iter().all(|r| named_columns(table, r) == first);
    if rows.len() > 1 && same && !first.is_empty() {
        // One statement: already atomic.
        let items = Value::Array(rows.iter().cloned().map(Value::Object).collect());
        let stored = client
            .query(&insert_many_sql(table, &first), &[&items])
            .await?;
        return Ok(stored.iter().map(|r| r.get(0)).collect());
    }
    let tx = client.transaction().await?;
    let mut statements = HashMap::new();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let columns = named_columns(table, row);
        if !statements.contains_key(&columns) {
            let statement = tx.prepare(&insert_one_sql(table, &columns)).await?;
            statements.insert(columns.clone(), statement);
        }
        let statement = &statements[&columns];
        let value = Value::Object(row.clone());
        let stored = if columns.is_empty() {
            tx.query_one(statement, &[]).await?
        } else {
            tx.query_one(statement, &[&value]).await?
        };
        out.push(stored.get(0));
    }
    tx.commit().await?;
    Ok(out)
}

/// `update … set … from jsonb_populate_record(…) as r where <key> returning to_json(t.*)::text`, with
/// the body bound as `$1`.
fn update_sql(
    table: &TableInfo,
    row: &Row,
    write: Write,
    key: &[String],
    params: &mut Params,
) -> Result<String, ApiError> {
    let target = quote_table(&table.name);
    let mut sets = Vec::new();
    for column in &table.columns {
        let name = quote_ident(&column.name);
        if row.contains_key(&column.name) {
            sets.push(format!("{name} = r.{name}"));
        } else if write == Write::Put && !table.key_columns.contains(&column.name) {
            sets.push(format!("{name} = default"));
        }
    }
    if sets.is_empty() {
        // PUT of `{}` on a table of key columns only: nothing changes, the row is returned.
        let name = quote_ident(&table.key_columns[0]);
        sets.push(format!("{name} = t.{name}"));
    }
    Ok(format!(
        "update {target} as t set {} from jsonb_populate_record(null::{target}, $1::jsonb) as r where {} returning to_json(t.*)::text",
        sets.join(", "),
        key_condition(table, key, params)?
    ))
}

// ---------------------------------------------------------------------------------------------
// Errors

fn filter_error(err: FilterError, table: &TableInfo) -> ApiError {
    let code = match &err {
        FilterError::Db(db) => return db_error(db, table),
        FilterError::UnknownColumn(_) => "unknown_column",
        FilterError::BadValue { .. } => "bad_value",
        FilterError::Syntax { .. } | FilterError::BadOperator { .. } => "bad_filter",
    };
    ApiError::new(StatusCode::BAD_REQUEST, code, err.to_string())
}

/// A database error as the caller should see it: constraint and value errors with
/// PostgreSQL's own message (it names the column or constraint), everything else logged and
/// reported without details.
fn db_error(err: &tokio_postgres::Error, table: &TableInfo) -> ApiError {
    let Some(db) = err.as_db_error() else {
        // Not an error the server sent: the connection broke.
        tracing::warn!(error = %crate::error::chain(err), table = %table.name, "database connection failed during a REST request");
        return ApiError::unavailable();
    };
    let code = db.code();
    let class = &code.code()[..2];
    let with_detail = || match db.detail() {
        Some(detail) => format!("{}: {detail}", db.message()),
        None => db.message().to_owned(),
    };
    let api = if *code == SqlState::UNIQUE_VIOLATION {
        ApiError::new(StatusCode::CONFLICT, "unique_violation", with_detail())
    } else if *code == SqlState::FOREIGN_KEY_VIOLATION {
        ApiError::new(StatusCode::CONFLICT, "foreign_key_violation", with_detail())
    } else if *code == SqlState::NOT_NULL_VIOLATION {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_null_violation",
            db.message(),
        )
    } else if *code == SqlState::CHECK_VIOLATION {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "check_violation",
            db.message(),
        )
    } else if *code == SqlState::EXCLUSION_VIOLATION {
        ApiError::new(StatusCode::CONFLICT, "exclusion_violation", with_detail())
    } else if class == "22" || *code == SqlState::DATATYPE_MISMATCH {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_value", db.message())
    } else if *code == SqlState::UNDEFINED_COLUMN {
        // The table changed under the cached catalog; the next request re-reads it.
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_column",
            format!(
                "Table {} does not have a column the request names (it may have changed)",
                table.resource
            ),
        )
    } else if *code == SqlState::GENERATED_ALWAYS || *code == SqlState::UNDEFINED_FUNCTION {
        // "cannot insert a non-DEFAULT value into column …", "could not identify an ordering
        // operator for type json": the caller asked for something the column does not allow.
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", db.message())
    } else if *code == SqlState::UNDEFINED_TABLE {
        ApiError::not_found(format!("Table {} no longer exists", table.resource))
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", db.message())
    } else if matches!(class, "08" | "40" | "53" | "57")
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
    {
        // Connection, serialization/deadlock, resources, shutdown, standby: try again.
        tracing::warn!(error = %crate::error::chain(err), table = %table.name, "REST request failed; the caller may retry");
        return ApiError::unavailable();
    } else {
        tracing::error!(error = %crate::error::chain(err), table = %table.name, "REST request failed");
        return ApiError::internal();
    };
    tracing::debug!(error = %crate::error::chain(err), table = %table.name, status = %api.status, "REST request rejected by the database");
    api
}

/// A write's error; for a rejected value (`invalid input syntax for type numeric: "abc"`),
/// finds which row and column it came from, since PostgreSQL does not say.
async fn write_error(
    client: &tokio_postgres::Client,
    table: &TableInfo,
    err: &tokio_postgres::Error,
    rows: &[Row],
) -> ApiError {
    let mut api = db_error(err, table);
    if api.code != "bad_value" {
        return api;
    }
    if let Some((index, column)) = find_bad_value(client, table, rows).await {
        api.message = if rows.len() > 1 {
            format!("Row {index}, column {column:?}: {}", api.message)
        } else {
            format!("Column {column:?}: {}", api.message)
        };
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
            let mut one = Map::new();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TableName;
    use crate::filter::{Column, Kind};

    fn table(name: &str, keys: &[&str], columns: &[(&str, &str)]) -> TableInfo {
        TableInfo {
            relid: 1,
            kind: crate::sql::TableKind::Plain,
            name: TableName::parse(name).unwrap(),
            resource: name.to_owned(),
            key_columns: keys.iter().map(|k| (*k).to_owned()).collect(),
            columns: columns
                .iter()
                .map(|(n, t)| Column {
                    name: (*n).to_owned(),
                    sql_type: (*t).to_owned(),
                    kind: Kind::Other,
                    nondeterministic: false,
                })
                .collect(),
        }
    }

    fn row(value: Value) -> Row {
        match value {
            Value::Object(map) => map,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn order_accepts_directions_and_nulls() {
        let o = parse_order("price.desc,id,name.asc.nullsfirst").unwrap();
        assert_eq!(o.len(), 3);
        assert!(o[0].descending && o[0].column == "price");
        assert!(!o[1].descending && o[1].nulls_first.is_none());
        assert_eq!(o[2].nulls_first, Some(true));
        for bad in ["", "price.up", "price.desc.asc", ",id", "a.nullslast.desc"] {
            assert!(parse_order(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn list_keys_are_parsed_and_limit_capped() {
        let pairs = |p: &[(&str, &str)]| {
            p.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>()
        };
        let r = ListRequest::from_pairs(&pairs(&[])).unwrap();
        assert_eq!((r.limit, r.offset), (DEFAULT_LIMIT, 0));
        let r = ListRequest::from_pairs(&pairs(&[
            ("limit", "5000"),
            ("offset", "3"),
            ("price", "gt.10"),
            ("select", "id,name"),
        ]))
        .unwrap();
        assert_eq!((r.limit, r.offset), (MAX_LIMIT, 3));
        assert_eq!(r.filters.len(), 1);
        assert_eq!(r.columns().count(), 3);
        for bad in [
            ("limit", "-1"),
            ("offset", "x"),
            ("price", "gt"),
            ("select", "a,,b"),
        ] {
            let err = ListRequest::from_pairs(&pairs(&[bad])).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn composite_keys_split_on_commas_and_decode() {
        let lines = table(
            "lines",
            &["order_id", "n"],
            &[("order_id", "integer"), ("n", "integer")],
        );
        assert_eq!(parse_key(&lines, "7,2").unwrap(), vec!["7", "2"]);
        assert!(parse_key(&lines, "7").is_err());
        assert!(parse_key(&lines, "7,2,1").is_err());
        let tags = table("tags", &["name"], &[("name", "text")]);
        assert_eq!(parse_key(&tags, "a,b%20c").unwrap(), vec!["a,b c"]);
        let pairs = table("p", &["a", "b"], &[("a", "text"), ("b", "text")]);
        assert_eq!(parse_key(&pairs, "x%2Cy,z").unwrap(), vec!["x,y", "z"]);
    }

    #[test]
    fn names_are_quoted_and_values_bound() {
        let evil = r#"name"; drop table items; --"#;
        let t = table(
            r#"we"ird"#,
            &["id"],
            &[("id", "integer"), (evil, "text"), ("price", "numeric")],
        );
        let body = row(serde_json::json!({ evil: "x'; drop table items; --", "price": 1 }));
        let columns = named_columns(&t, &body);
        let sql = insert_one_sql(&t, &columns);
        assert!(sql.contains(r#""name""; drop table items; --""#), "{sql}");
        assert!(sql.contains(r#""public"."we""ird""#), "{sql}");
        assert!(!sql.contains("x'"), "values are never in the text: {sql}");
        let mut params = Vec::new();
        let sql = update_sql(&t, &body, Write::Put, &["1".into()], &mut params).unwrap();
        assert_eq!(params.len(), 1);
        assert!(sql.contains("t.\"id\" = $1::text::integer"), "{sql}");
        assert!(
            !sql.contains("\"id\" = default"),
            "PUT keeps the key: {sql}"
        );
        let mut params = Vec::new();
        let sql = update_sql(&t, &body, Write::Patch, &["1".into()], &mut params).unwrap();
        assert!(
            !sql.contains("default"),
            "PATCH sets only what the body names: {sql}"
        );
    }

    #[test]
    fn bodies_must_be_objects_or_arrays_of_objects() {
        assert!(!parse_body(br#"{"a":1}"#).unwrap().1);
        assert_eq!(parse_body(br#"[{"a":1},{}]"#).unwrap().0.len(), 2);
        for bad in [&b"{"[..], b"1", b"[1]", b"\"x\"", b""] {
            let err = parse_body(bad).unwrap_err();
            assert_eq!(
                (err.status, err.code),
                (StatusCode::BAD_REQUEST, "bad_json")
            );
        }
    }

    #[test]
    fn projection_keeps_the_selected_columns_in_order() {
        let row = r#"{"id":1,"name":"a","price":2}"#.to_owned();
        let selected = ["price".to_owned(), "id".to_owned()];
        let out = project(row.clone(), Some(&selected));
        assert_eq!(out, r#"{"price":2,"id":1}"#);
        assert_eq!(project(row.clone(), None), row);
    }
}
