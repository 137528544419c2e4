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

use super::{ApiError, AppState, caller, with_state};
use crate::access::{Access, Principal};
use crate::filter::{self, FilterError, RawCondition};
use crate::row::Fields;
use crate::sql::{TableInfo, quote_ident, quote_table};

/// Rows a list returns when the request sets no `limit`.
const DEFAULT_LIMIT: i64 = 100;

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
    index(Arc::clone(&state))
        .or(list(Arc::clone(&state)))
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

/// GET /api: the tables this caller may use, with their key, visible columns and rights
/// (a table it has no right on is not listed, as it would not be found).
fn index(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api")
        .and(warp::get())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .map(|state: Arc<AppState>, who: Principal| {
            let mut tables: Vec<serde_json::Value> = state
                .tables
                .all()
                .iter()
                .filter_map(|t| state.table_for(&t.resource, &who))
                .map(|(table, access)| {
                    let columns: Vec<&str> = table
                        .columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .filter(|c| access.sees(c))
                        .collect();
                    serde_json::json!({
                        "name": table.resource,
                        "key": table.key_columns,
                        "columns": columns,
                        "rights": {
                            "read": access.read,
                            "insert": access.insert,
                            "update": access.update,
                            "delete": access.delete,
                        },
                        "rest": format!("/api/{}", table.resource),
                        "websocket": format!("/ws/{}", table.resource),
                    })
                })
                .collect();
            tables.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            warp::reply::json(&serde_json::json!({ "tables": tables }))
        })
}

/// GET /api/{table}?price=gt.10&select=id,name&order=price.desc,id&limit=10&offset=20
fn list(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / String)
        .and(warp::get())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and_then(|resource: String, state: Arc<AppState>, who, query| {
            respond(list_rows(state, who, resource, query))
        })
}

/// GET /api/{table}/{id}?select=id,name
fn get_one(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / String / String)
        .and(warp::get())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and_then(|resource, id, state, who, query| {
            respond(read_row(state, who, resource, id, query))
        })
}

/// POST /api/{table} with an object or an array of objects: 201 with the stored row(s)
fn create(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.limits.body_timeout;
    warp::path!("api" / String)
        .and(warp::post())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(body(limit, timeout))
        .and_then(|resource, state, who, body| respond(insert_rows(state, who, resource, body)))
}

/// PATCH /api/{table}/{id} with an object: sets the columns it names; 200 with the row
fn update(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.limits.body_timeout;
    warp::path!("api" / String / String)
        .and(warp::patch())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(body(limit, timeout))
        .and_then(|resource, id, state, who, body| {
            respond(update_row(state, who, resource, id, body, Write::Patch))
        })
}

/// PUT /api/{table}/{id} with an object: replaces the row (columns left out get their
/// default, NULL where there is none; key columns left out keep their values); 200 with the row
fn replace(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.limits.body_timeout;
    warp::path!("api" / String / String)
        .and(warp::put())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(body(limit, timeout))
        .and_then(|resource, id, state, who, body| {
            respond(update_row(state, who, resource, id, body, Write::Put))
        })
}

/// DELETE /api/{table}/{id}: 200 with the deleted row
fn remove(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / String / String)
        .and(warp::delete())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and_then(|resource, id, state, who| respond(delete_row(state, who, resource, id)))
}

/// The request body: JSON (`Content-Type: application/json`, so that a web page cannot send
/// one without a CORS preflight), at most `limit` bytes (a larger `content-length` is refused
/// before anything is read, a chunked body as soon as it passes `limit`), sent within
/// `timeout` (a client that announces a body and stalls is answered 408).
fn body(
    limit: u64,
    timeout: std::time::Duration,
) -> impl Filter<Extract = (Vec<u8>,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::header::optional::<String>("content-type"))
        .and_then(
            move |length: Option<u64>, content_type: Option<String>| async move {
                let json = content_type.as_deref().is_some_and(|t| {
                    let essence = t.split(';').next().unwrap_or("").trim();
                    essence.eq_ignore_ascii_case("application/json")
                        || (essence.len() > 5
                            && essence[..essence.len() - 5].contains('/')
                            && essence.to_ascii_lowercase().ends_with("+json"))
                });
                if !json {
                    return Err(warp::reject::custom(ApiError::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "unsupported_media_type",
                        "Send the body as JSON with Content-Type: application/json",
                    )));
                }
                match length {
                    Some(length) if length > limit => Err(warp::reject::custom(too_large(limit))),
                    _ => Ok(()),
                }
            },
        )
        .untuple_one()
        .and(warp::body::stream())
        .and_then(move |stream| async move {
            match tokio::time::timeout(timeout, read_limited(stream, limit)).await {
                Ok(read) => read.map_err(warp::reject::custom),
                Err(_) => Err(warp::reject::custom(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "The request body did not arrive within {} s",
                        timeout.as_secs()
                    ),
                ))),
            }
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

/// A table as one caller may use it.
struct Scope {
    table: TableInfo,
    access: Access,
    principal: Principal,
}

impl Scope {
    /// The table and the caller's rights; a table the caller has no right on is as unknown as
    /// one that is not exposed.
    fn new(state: &AppState, principal: Principal, resource: &str) -> Result<Scope, ApiError> {
        // Path segments arrive percent-encoded.
        let decoded = percent_decode_str(resource).decode_utf8_lossy();
        let (table, access) = state.table_for(&decoded, &principal).ok_or_else(|| {
            ApiError::not_found(format!("Table {decoded:?} is not exposed by this relay"))
        })?;
        Ok(Scope {
            table,
            access,
            principal,
        })
    }

    /// Refuses what the caller may not do (it may see that the table exists: it has a right).
    fn require(&self, right: bool, what: &str) -> Result<(), ApiError> {
        if right {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "Not allowed to {what} {}",
                self.table.resource
            )))
        }
    }

    /// The columns a row shows this caller (`select` if given, else every visible one).
    fn columns_shown(&self, select: Option<Vec<String>>) -> Option<Vec<String>> {
        select.or_else(|| {
            self.access.columns.as_ref().map(|_| {
                self.table
                    .columns
                    .iter()
                    .map(|c| c.name.clone())
                    .filter(|c| self.access.sees(c))
                    .collect()
            })
        })
    }

    /// The caller's filter, typed.
    async fn policy(&self, client: &tokio_postgres::Client) -> Result<filter::Filter, ApiError> {
        if self.access.filter.is_empty() {
            return Ok(filter::Filter::default());
        }
        filter::compile(client, &self.table.columns, self.access.filter.clone())
            .await
            .map_err(|err| match err {
                FilterError::Db(db) => db_error(&db, &self.table),
                other => {
                    // A claim that does not fit the column: this caller has no rows.
                    tracing::debug!(error = %other, table = %self.table.name, "a policy filter did not bind");
                    ApiError::forbidden(format!("Not allowed to use {}", self.table.resource))
                }
            })
    }

    /// Names the caller may not see are unknown columns, as if they did not exist.
    fn check_visible<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), ApiError> {
        for name in names {
            if !self.access.sees(name) {
                return Err(unknown_column(&self.table, name));
            }
        }
        Ok(())
    }
}

/// Starts the request's transaction; with `rest_set_role`, as the caller's database role with
/// `request.jwt.claims` set (PostgREST's model: grants and row-level security apply).
async fn begin<'c>(
    state: &AppState,
    client: &'c mut deadpool_postgres::Object,
    scope: &Scope,
) -> Result<deadpool_postgres::Transaction<'c>, ApiError> {
    let tx = client
        .transaction()
        .await
        .map_err(|err| db_error(&err, &scope.table))?;
    if state.config.rest_set_role {
        let claims = Value::Object(scope.principal.claims.clone()).to_string();
        tx.execute(
            "select set_config('role', $1, true), set_config('request.jwt.claims', $2, true)",
            &[&scope.principal.role, &claims],
        )
        .await
        .map_err(|err| {
            tracing::debug!(error = %crate::error::chain(&err), role = %scope.principal.role, "cannot take the caller's role");
            ApiError::forbidden(format!("Role {:?} cannot be used", scope.principal.role))
        })?;
    }
    Ok(tx)
}

async fn list_rows(
    state: Arc<AppState>,
    principal: Principal,
    resource: String,
    query: Vec<(String, String)>,
) -> Result<warp::reply::Response, ApiError> {
    let scope = Scope::new(&state, principal, &resource)?;
    scope.require(scope.access.read, "read")?;
    let request = ListRequest::from_pairs(&query, state.config.limits.max_rows)?;
    scope.check_visible(request.columns())?;
    state
        .config
        .limits
        .filter()
        .check(&request.filters)
        .map_err(|e| filter_error(e, &scope.table))?;
    let mut client = connection(&state).await?;
    let table = known_columns(&state, &client, scope.table.clone(), request.columns()).await?;
    let filter = filter::compile(&client, &table.columns, request.filters.clone())
        .await
        .map_err(|err| filter_error(err, &table))?;
    let filter = filter.and(scope.policy(&client).await?);
    let mut params: Params = Vec::new();
    let sql = list_sql(&table, &request, &filter, &mut params);
    let shown = scope.columns_shown(request.select.clone());
    let tx = begin(&state, &mut client, &scope).await?;
    let rows = tx
        .query(&sql, &refs(&params))
        .await
        .map_err(|err| db_error(&err, &table))?;
    let rows: Vec<String> = rows
        .iter()
        .map(|r| project(r.get(0), shown.as_deref()))
        .collect();
    tx.commit().await.map_err(|err| db_error(&err, &table))?;
    Ok(raw_json(StatusCode::OK, json_array(&rows)))
}

async fn read_row(
    state: Arc<AppState>,
    principal: Principal,
    resource: String,
    id: String,
    query: Vec<(String, String)>,
) -> Result<warp::reply::Response, ApiError> {
    let scope = Scope::new(&state, principal, &resource)?;
    scope.require(scope.access.read, "read")?;
    let mut select = None;
    for (key, value) in &query {
        match key.as_str() {
            "select" => select = parse_select(value)?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "Unknown query key {other:?} (a single row takes only select)"
                )));
            }
        }
    }
    scope.check_visible(select.iter().flatten())?;
    let key = parse_key(&scope.table, &id)?;
    let mut client = connection(&state).await?;
    let table = known_columns(
        &state,
        &client,
        scope.table.clone(),
        select.iter().flatten(),
    )
    .await?;
    let policy = scope.policy(&client).await?;
    let mut params: Params = Vec::new();
    let sql = format!(
        "select to_json(t.*)::text from {} as t where {} and {}",
        quote_table(&table.name),
        key_condition(&table, &key, &mut params)?,
        policy.to_sql(&mut params),
    );
    let shown = scope.columns_shown(select);
    let tx = begin(&state, &mut client, &scope).await?;
    let row = tx
        .query_opt(&sql, &refs(&params))
        .await
        .map_err(|err| db_error(&err, &table))?
        .ok_or_else(|| missing_row(&table, &id))?;
    tx.commit().await.map_err(|err| db_error(&err, &table))?;
    Ok(raw_json(
        StatusCode::OK,
        project(row.get(0), shown.as_deref()),
    ))
}

/// `select … where <filter> order by … limit $n offset $m`, binding the values.
fn list_sql(
    table: &TableInfo,
    request: &ListRequest,
    filter: &filter::Filter,
    params: &mut Params,
) -> String {
    let condition = filter.to_sql(params);
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
    format!(
        "select to_json(t.*)::text from {} as t where {condition} order by {} limit ${limit} offset ${offset}",
        quote_table(&table.name),
        order.join(", "),
    )
}

/// Refuses a stored row outside the caller's rows (the transaction is rolled back).
fn check_in_policy(
    scope: &Scope,
    policy: &filter::Filter,
    stored: &[String],
) -> Result<(), ApiError> {
    if stored.iter().all(|row| policy.matches_text(row)) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "The row would be outside the rows of {} this caller may write",
            scope.table.resource
        )))
    }
}

async fn insert_rows(
    state: Arc<AppState>,
    principal: Principal,
    resource: String,
    body: Vec<u8>,
) -> Result<warp::reply::Response, ApiError> {
    let scope = Scope::new(&state, principal, &resource)?;
    scope.require(scope.access.insert, "insert into")?;
    let (rows, many) = parse_body(&body)?;
    scope.check_visible(rows.iter().flat_map(Map::keys))?;
    let mut client = connection(&state).await?;
    let table = known_columns(
        &state,
        &client,
        scope.table.clone(),
        rows.iter().flat_map(Map::keys),
    )
    .await?;
    let policy = scope.policy(&client).await?;
    let tx = begin(&state, &mut client, &scope).await?;
    let stored = match insert(&tx, &table, &rows).await {
        Ok(stored) => stored,
        Err(err) => {
            drop(tx);
            return Err(write_error(&client, &table, &err, &rows).await);
        }
    };
    check_in_policy(&scope, &policy, &stored)?;
    tx.commit().await.map_err(|err| db_error(&err, &table))?;
    if !scope.access.read {
        return Ok(raw_json(StatusCode::CREATED, String::new()));
    }
    let shown = scope.columns_shown(None);
    let stored: Vec<String> = stored
        .into_iter()
        .map(|r| project(r, shown.as_deref()))
        .collect();
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
    scope.check_visible(row.keys())?;
    if write == Write::Put && scope.access.columns.is_some() {
        // PUT resets every column the body leaves out, hidden ones included.
        return Err(ApiError::forbidden(format!(
            "Not allowed to replace whole rows of {}; use PATCH",
            scope.table.resource
        )));
    }
    let mut client = connection(&state).await?;
    let table = known_columns(&state, &client, scope.table.clone(), row.keys()).await?;
    let policy = scope.policy(&client).await?;
    let mut params: Params = vec![Box::new(Value::Object(row.clone()))];
    let sql = update_sql(&table, &row, write, &key, &policy, &mut params)?;
    let tx = begin(&state, &mut client, &scope).await?;
    let stored = match tx.query_opt(&sql, &refs(&params)).await {
        Ok(Some(stored)) => stored.get::<_, String>(0),
        Ok(None) => return Err(missing_row(&table, &id)),
        Err(err) => {
            drop(tx);
            return Err(write_error(&client, &table, &err, &[row]).await);
        }
    };
    check_in_policy(&scope, &policy, std::slice::from_ref(&stored))?;
    tx.commit().await.map_err(|err| db_error(&err, &table))?;
    let shown = if scope.access.read {
        scope.columns_shown(None)
    } else {
        Some(table.key_columns.clone())
    };
    Ok(raw_json(StatusCode::OK, project(stored, shown.as_deref())))
}

async fn delete_row(
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
    let sql = format!(
        "delete from {} as t where {} and {} returning to_json(t.*)::text",
        quote_table(&table.name),
        key_condition(&table, &key, &mut params)?,
        policy.to_sql(&mut params),
    );
    let tx = begin(&state, &mut client, &scope).await?;
    let row = tx
        .query_opt(&sql, &refs(&params))
        .await
        .map_err(|err| db_error(&err, &table))?
        .ok_or_else(|| missing_row(&table, &id))?;
    tx.commit().await.map_err(|err| db_error(&err, &table))?;
    let shown = if scope.access.read {
        scope.columns_shown(None)
    } else {
        Some(table.key_columns.clone())
    };
    Ok(raw_json(
        StatusCode::OK,
        project(row.get(0), shown.as_deref()),
    ))
}

// ---------------------------------------------------------------------------------------------
// Requests

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
    fn from_pairs(pairs: &[(String, String)], max_rows: i64) -> Result<Self, ApiError> {
        let mut request = ListRequest {
            limit: DEFAULT_LIMIT.min(max_rows),
            ..ListRequest::default()
        };
        for (key, value) in pairs {
            match key.as_str() {
                "select" => request.select = parse_select(value)?,
                "order" => request.order = parse_order(value)?,
                "limit" => {
                    request.limit = parse_count(key, value)?;
                    if request.limit > max_rows {
                        return Err(ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "limit_too_large",
                            format!("limit may be at most {max_rows} (page with offset)"),
                        ));
                    }
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

/// `select=col1,col2`; `select=*` (as PostgREST's clients send for "everything") is every
/// column the caller sees (`None`).
fn parse_select(value: &str) -> Result<Option<Vec<String>>, ApiError> {
    if value.trim() == "*" {
        return Ok(None);
    }
    let columns: Vec<String> = value.split(',').map(|c| c.trim().to_owned()).collect();
    if columns.iter().any(String::is_empty) {
        return Err(ApiError::bad_request(format!(
            "select must list columns, not {value:?}"
        )));
    }
    Ok(Some(columns))
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

/// Stores `rows` (in the request's transaction) and returns them as stored, in order.
async fn insert(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &TableInfo,
    rows: &[Row],
) -> Result<Vec<String>, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let first = named_columns(table, &rows[0]);
    let same = rows.iter().all(|r| named_columns(table, r) == first);
    if rows.len() > 1 && same && !first.is_empty() {
        let items = Value::Array(rows.iter().cloned().map(Value::Object).collect());
        let stored = tx.query(&insert_many_sql(table, &first), &[&items]).await?;
        return Ok(stored.iter().map(|r| r.get(0)).collect());
    }
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
    Ok(out)
}

/// `update … set … from jsonb_populate_record(…) as r where <key> returning to_json(t.*)::text`, with
/// the body bound as `$1`.
fn update_sql(
    table: &TableInfo,
    row: &Row,
    write: Write,
    key: &[String],
    policy: &filter::Filter,
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
    let key = key_condition(table, key, params)?;
    // The policy is on the row as it was: `t.` qualifies its columns against the target.
    let policy = policy.to_sql_qualified("t", params);
    Ok(format!(
        "update {target} as t set {} from jsonb_populate_record(null::{target}, $1::jsonb) as r where {key} and {policy} returning to_json(t.*)::text",
        sets.join(", "),
    ))
}

// ---------------------------------------------------------------------------------------------
// Fuzzing

/// The statements (SQL, number of bound values) a request to `table` runs, or the error it is
/// answered with before reaching the database: the handlers' own parsing and SQL helpers in
/// their order, with `compile` standing in for the database's typing of filter values and the
/// caller allowed everything (see [`crate::fuzz`]). `id` is the raw `{id}` path segment.
pub(crate) fn plan_request(
    table: &TableInfo,
    method: &str,
    id: Option<&str>,
    query: &[(String, String)],
    body: &[u8],
    max_rows: i64,
    compile: impl Fn(&[filter::Column], Vec<RawCondition>) -> Result<filter::Filter, FilterError>,
) -> Result<Vec<(String, usize)>, ApiError> {
    let known = |names: &mut dyn Iterator<Item = &String>| {
        for name in names {
            if !table.columns.iter().any(|c| &c.name == name) {
                return Err(unknown_column(table, name));
            }
        }
        Ok(())
    };
    let no_policy = filter::Filter::default();
    let mut params: Params = Vec::new();
    let sql = match (method, id) {
        ("GET", None) => {
            let request = ListRequest::from_pairs(query, max_rows)?;
            known(&mut request.columns())?;
            let filter = compile(&table.columns, request.filters.clone())
                .map_err(|err| filter_error(err, table))?;
            list_sql(table, &request, &filter, &mut params)
        }
        ("GET", Some(id)) => {
            for (key, value) in query {
                match key.as_str() {
                    "select" => known(&mut parse_select(value)?.iter().flatten())?,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "Unknown query key {other:?} (a single row takes only select)"
                        )));
                    }
                }
            }
            let key = parse_key(table, id)?;
            format!(
                "select to_json(t.*)::text from {} as t where {} and {}",
                quote_table(&table.name),
                key_condition(table, &key, &mut params)?,
                no_policy.to_sql(&mut params),
            )
        }
        ("POST", None) => {
            let (rows, _) = parse_body(body)?;
            known(&mut rows.iter().flat_map(Map::keys))?;
            let first = rows.first().map(|r| named_columns(table, r));
            if let Some(first) = first.filter(|f| {
                rows.len() > 1
                    && !f.is_empty()
                    && rows.iter().all(|r| &named_columns(table, r) == f)
            }) {
                return Ok(vec![(insert_many_sql(table, &first), 1)]);
            }
            return Ok(rows
                .iter()
                .map(|row| {
                    let columns = named_columns(table, row);
                    let bound = usize::from(!columns.is_empty());
                    (insert_one_sql(table, &columns), bound)
                })
                .collect());
        }
        ("PATCH" | "PUT", Some(id)) => {
            let write = if method == "PUT" {
                Write::Put
            } else {
                Write::Patch
            };
            let key = parse_key(table, id)?;
            let (rows, many) = parse_body(body)?;
            let row = match rows.into_iter().next() {
                Some(row) if !many => row,
                _ => return Err(ApiError::bad_request("The body must be one JSON object")),
            };
            if write == Write::Patch && row.is_empty() {
                return Err(ApiError::bad_request("The body names no column to update"));
            }
            known(&mut row.keys())?;
            params.push(Box::new(Value::Object(row.clone())));
            update_sql(table, &row, write, &key, &no_policy, &mut params)?
        }
        ("DELETE", Some(id)) => {
            let key = parse_key(table, id)?;
            format!(
                "delete from {} as t where {} and {} returning to_json(t.*)::text",
                quote_table(&table.name),
                key_condition(table, &key, &mut params)?,
                no_policy.to_sql(&mut params),
            )
        }
        _ => return Err(ApiError::not_found("No such route")),
    };
    Ok(vec![(sql, params.len())])
}

// ---------------------------------------------------------------------------------------------
// Errors

fn filter_error(err: FilterError, table: &TableInfo) -> ApiError {
    let code = match &err {
        FilterError::Db(db) => return db_error(db, table),
        FilterError::UnknownColumn(_) => "unknown_column",
        FilterError::BadValue { .. } => "bad_value",
        FilterError::Syntax { .. } | FilterError::BadOperator { .. } => "bad_filter",
        FilterError::TooLarge(_) => "filter_too_large",
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
        let r = ListRequest::from_pairs(&pairs(&[]), 1000).unwrap();
        assert_eq!((r.limit, r.offset), (DEFAULT_LIMIT, 0));
        let err = ListRequest::from_pairs(&pairs(&[("limit", "5000")]), 1000).unwrap_err();
        assert_eq!(err.code, "limit_too_large");
        let r = ListRequest::from_pairs(
            &pairs(&[
                ("limit", "1000"),
                ("offset", "3"),
                ("price", "gt.10"),
                ("select", "id,name"),
            ]),
            1000,
        )
        .unwrap();
        assert_eq!((r.limit, r.offset), (1000, 3));
        assert_eq!(r.filters.len(), 1);
        assert_eq!(r.columns().count(), 3);
        for bad in [
            ("limit", "-1"),
            ("offset", "x"),
            ("price", "gt"),
            ("select", "a,,b"),
        ] {
            let err = ListRequest::from_pairs(&pairs(&[bad]), 1000).unwrap_err();
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
        let sql = update_sql(
            &t,
            &body,
            Write::Put,
            &["1".into()],
            &filter::Filter::default(),
            &mut params,
        )
        .unwrap();
        assert_eq!(params.len(), 1);
        assert!(sql.contains("t.\"id\" = $1::text::integer"), "{sql}");
        assert!(
            !sql.contains("\"id\" = default"),
            "PUT keeps the key: {sql}"
        );
        let mut params = Vec::new();
        let sql = update_sql(
            &t,
            &body,
            Write::Patch,
            &["1".into()],
            &filter::Filter::default(),
            &mut params,
        )
        .unwrap();
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
