//! REST over the exposed tables, PostgREST-compatible: `/api/{table}` reads, inserts,
//! upserts, filtered updates and deletes as PostgREST serves `/{table}` (so postgrest-js and
//! postgrest-py work unchanged), plus `/api/{table}/{id}` for one row by its key.
//!
//! - [`query`] — the request: `select`, `order`, ranges, filters, `Prefer`, `Accept`.
//! - [`statement`] — its SQL; [`error`] — PostgREST's error shapes and statuses.
//!
//! Writes go through the pool like any other writer's, so the capture triggers stream them to
//! subscribers; nothing here is special-cased. Every value is bound as a parameter and
//! converted by PostgreSQL itself (`jsonb_populate_record` against the table's row type, or
//! `$n::text::<type>` for keys and filters); every identifier comes from the catalog and goes
//! through [`quote_ident`]; a cast in `select` is a type name the catalog resolved. Columns a
//! request names are checked against the catalog (and the caller's visible columns) before
//! any statement is built; a name the cached catalog does not know makes it re-read the
//! table's columns once (a column may have been added) before the request is rejected.
//!
//! The caller's policy (see [`crate::access`]) applies to every path: its row filter is ANDed
//! to every read, update and delete, an upsert updates only rows inside it (else the request
//! is refused), and every row a write stores must be inside it; hidden columns are unknown.
//!
//! A row is addressed by its primary key; a composite key is its values joined by commas in
//! key order (`/api/lines/7,2`; a comma inside a value is `%2C`).

mod body;
pub mod error;
mod plan;
pub mod query;
mod read;
pub mod statement;
mod write;

pub(crate) use plan::plan_request;
use read::{read_row, read_rows};
use write::{delete_row, insert_rows, update_row, write_rows};

use std::collections::HashMap;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use serde_json::Value;
use tokio_postgres::types::ToSql;
use warp::http::{HeaderMap, StatusCode};
use warp::{Filter, Rejection, Reply};

use super::{ApiError, AppState, caller, with_state};
use crate::access::{Access, Principal};
use crate::filter::{self, FilterError, RawFilter};
use crate::sql::{TableInfo, quote_ident, quote_table};
use body::body;
use error::{
    bad_body, bad_range, column_not_found, db_error, filter_error, no_embedding, permission_denied,
    singular, table_not_found, undefined_column, unfiltered,
};
use query::{
    Count, Media, Prefer, Query, QueryError, Range, Resolution, Return, SelectError, Selected,
    content_range,
};
use statement::{Row, Shown, Write};

/// Most single-value probes spent finding which column a rejected value belongs to.
const MAX_PROBES: usize = 1000;

/// Below this many rows by the planner's estimate, `count=estimated` counts exactly.
const ESTIMATE_EXACT_BELOW: i64 = 10_000;

/// Bound parameters, in `$n` order.
type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// All REST routes, at both of their mount points: `/api` and `/rest/v1` (where Supabase's
/// clients look for PostgREST: `createClient(url, key).from('items')` calls
/// `{url}/rest/v1/items`). The two serve exactly the same routes.
pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let mount = warp::path("api")
        .or(warp::path("rest").and(warp::path("v1")))
        .unify();
    mount.and(mounted(state))
}

/// The REST routes below their mount point (paths below are shown under `/api`).
fn mounted(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    index(Arc::clone(&state))
        .or(read(Arc::clone(&state)))
        .or(get_one(Arc::clone(&state)))
        .or(create(Arc::clone(&state)))
        .or(update_filtered(Arc::clone(&state)))
        .or(delete_filtered(Arc::clone(&state)))
        .or(update(Arc::clone(&state)))
        .or(replace(Arc::clone(&state)))
        .or(remove(state))
}

/// Runs a handler and turns its error into a rejection for `recover`.
///
/// `hides`: the caller's policy hides columns of the table. A database error's `details` can
/// quote a whole row ("Failing row contains (…)") or a key's values, hidden columns included
/// (PostgreSQL hides them only from roles that cannot read them, and the relay's role can):
/// such a caller gets the code, message and hint, not the details.
async fn respond(
    hides: bool,
    result: impl Future<Output = Result<warp::reply::Response, ApiError>>,
) -> Result<warp::reply::Response, Rejection> {
    result.await.map_err(|mut err| {
        if hides && !err.code.starts_with("PGRST") {
            err.details = None;
        }
        warp::reject::custom(err)
    })
}

/// Whether the caller's policy hides some of the table's columns (see [`respond`]).
// (Typed as the route closures hold them, which lets their argument types be inferred.)
#[allow(clippy::ptr_arg)]
fn hides(state: &Arc<AppState>, who: &Principal, resource: &String) -> bool {
    let decoded = percent_decode_str(resource).decode_utf8_lossy();
    state
        .table_for(&decoded, who)
        .is_some_and(|(_, access)| access.columns.is_some())
}

/// GET /api: the tables this caller may use, with their key, visible columns and rights
/// (a table it has no right on is not listed, as it would not be found).
fn index(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path::end()
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

/// GET|HEAD /api/{table}?select=id,name&price=gt.10&or=(…)&order=price.desc&limit=10&offset=20
/// (`Range`, `Prefer: count=…`, `Accept: application/vnd.pgrst.object+json | text/csv`)
fn read(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!(String)
        .and(
            warp::get()
                .map(|| false)
                .or(warp::head().map(|| true))
                .unify(),
        )
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and(warp::header::headers_cloned())
        .and_then(|resource, head, state, who, query, headers| {
            respond(
                hides(&state, &who, &resource),
                read_rows(state, who, resource, query, headers, head),
            )
        })
}

/// GET /api/{table}/{id}?select=id,name
fn get_one(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!(String / String)
        .and(warp::get())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and_then(|resource, id, state, who, query| {
            respond(
                hides(&state, &who, &resource),
                read_row(state, who, resource, id, query),
            )
        })
}

/// POST /api/{table}?columns=…&on_conflict=…&select=… with an object or an array of objects
/// (`Prefer: return=…, resolution=…, missing=default, count=…`)
fn create(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.limits.body_timeout;
    warp::path!(String)
        .and(warp::post())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and(warp::header::headers_cloned())
        .and(body(limit, timeout))
        .and_then(|resource, state, who, query, headers, body| {
            respond(
                hides(&state, &who, &resource),
                insert_rows(state, who, resource, query, headers, body),
            )
        })
}

/// PATCH /api/{table}?price=lt.5&select=… with an object: sets its columns on the rows the
/// filters match (a filter is required unless `--rest-allow-unfiltered-writes`)
fn update_filtered(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.limits.body_timeout;
    warp::path!(String)
        .and(warp::patch())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and(warp::header::headers_cloned())
        .and(body(limit, timeout))
        .and_then(|resource, state, who, query, headers, body| {
            respond(
                hides(&state, &who, &resource),
                write_rows(state, who, resource, query, headers, Some(body)),
            )
        })
}

/// DELETE /api/{table}?id=in.(1,2)&select=…: deletes the rows the filters match (a filter is
/// required unless `--rest-allow-unfiltered-writes`)
fn delete_filtered(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!(String)
        .and(warp::delete())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and(warp::header::headers_cloned())
        .and_then(|resource, state, who, query, headers| {
            respond(
                hides(&state, &who, &resource),
                write_rows(state, who, resource, query, headers, None),
            )
        })
}

/// PATCH /api/{table}/{id} with an object: sets the columns it names; 200 with the row
fn update(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.limits.body_timeout;
    warp::path!(String / String)
        .and(warp::patch())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(body(limit, timeout))
        .and_then(|resource, id, state, who, body| {
            respond(
                hides(&state, &who, &resource),
                update_row(state, who, resource, id, body, Write::Patch),
            )
        })
}

/// PUT /api/{table}/{id} with an object: replaces the row (columns left out get their
/// default, NULL where there is none; key columns left out keep their values); 200 with the row
fn replace(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.limits.body_timeout;
    warp::path!(String / String)
        .and(warp::put())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(body(limit, timeout))
        .and_then(|resource, id, state, who, body| {
            respond(
                hides(&state, &who, &resource),
                update_row(state, who, resource, id, body, Write::Put),
            )
        })
}

/// DELETE /api/{table}/{id}: 200 with the deleted row
fn remove(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!(String / String)
        .and(warp::delete())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and_then(|resource, id, state, who| {
            respond(
                hides(&state, &who, &resource),
                delete_row(state, who, resource, id),
            )
        })
}

// ---------------------------------------------------------------------------------------------
// The caller's view of a table

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
        let (table, access) = state
            .table_for(&decoded, &principal)
            .ok_or_else(|| table_not_found(&decoded))?;
        Ok(Scope {
            table,
            access,
            principal,
        })
    }

    fn anonymous(&self) -> bool {
        self.principal.anonymous
    }

    /// Refuses what the caller may not do (it may see that the table exists: it has a right).
    fn require(&self, right: bool, what: &str) -> Result<(), ApiError> {
        if right {
            Ok(())
        } else {
            Err(permission_denied(
                self.anonymous(),
                format!("Not allowed to {what} {}", self.table.resource),
            ))
        }
    }

    /// The query string, parsed (embedding and aggregates refused as PostgREST words it).
    fn query(&self, pairs: &[(String, String)]) -> Result<Query, ApiError> {
        Query::from_pairs(pairs).map_err(|err| match err {
            QueryError::Api(api) => api,
            QueryError::Select(SelectError::Embedding(other), _) => {
                no_embedding(&self.table, &other)
            }
            QueryError::Select(SelectError::Aggregate, _) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "PGRST123",
                "Use of aggregate functions is not allowed",
            ),
            QueryError::Select(SelectError::Syntax(details), value) => {
                error::parse_error("select parameter", &value, details)
            }
            QueryError::NotEmbedded(resource) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "PGRST108",
                format!("'{resource}' is not an embedded resource in this request"),
            )
            .with_hint("pgrelay does not embed related tables"),
        })
    }

    /// The caller's filter, typed.
    async fn policy(&self, client: &tokio_postgres::Client) -> Result<filter::Filter, ApiError> {
        if self.access.filter.is_empty() {
            return Ok(filter::Filter::default());
        }
        filter::compile(client, &self.table.columns, self.access.filters())
            .await
            .map_err(|err| match err {
                FilterError::Db(db) => db_error(&db, &self.table, self.anonymous()),
                other => {
                    // A claim that does not fit the column: this caller has no rows.
                    tracing::debug!(error = %other, table = %self.table.name, "a policy filter did not bind");
                    permission_denied(
                        self.anonymous(),
                        format!("Not allowed to use {}", self.table.resource),
                    )
                }
            })
    }

    /// Names in `select`, `order` and filters the caller may not see are unknown columns.
    fn check_visible_read(&self, query: &Query) -> Result<(), ApiError> {
        match query
            .read_columns()
            .into_iter()
            .find(|c| !self.access.sees(c))
        {
            Some(hidden) => Err(undefined_column(&self.table, hidden)),
            None => Ok(()),
        }
    }

    /// Names in a body, `columns` or `on_conflict` the caller may not see are unknown.
    fn check_visible_write<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), ApiError> {
        for name in names {
            if !self.access.sees(name) {
                return Err(column_not_found(&self.table, name));
            }
        }
        Ok(())
    }

    /// The columns a response shows: `None` for every column (`to_json(t.*)`), else the
    /// projection of `select` (`*` is every column the caller sees) with its casts resolved
    /// by the catalog. CSV always names its columns.
    async fn shown(
        &self,
        client: &tokio_postgres::Client,
        table: &TableInfo,
        select: Option<&[Selected]>,
        media: Media,
    ) -> Result<Option<Vec<Shown>>, ApiError> {
        let select = select.filter(|s| !s.is_empty());
        let visible = || -> Vec<Shown> {
            table
                .columns
                .iter()
                .filter(|c| self.access.sees(&c.name))
                .map(|c| Shown {
                    column: c.name.clone(),
                    key: c.name.clone(),
                    cast: None,
                })
                .collect()
        };
        let only_star = select.is_none_or(|s| s.iter().all(|i| *i == Selected::Star));
        if only_star {
            if self.access.columns.is_none() && media != Media::Csv {
                return Ok(None);
            }
            return Ok(Some(visible()));
        }
        let mut shown = Vec::new();
        let mut casts: HashMap<String, String> = HashMap::new();
        for item in select.into_iter().flatten() {
            match item {
                Selected::Star => shown.extend(visible()),
                Selected::Column {
                    column,
                    alias,
                    cast,
                } => {
                    let cast = match cast {
                        None => None,
                        Some(name) => Some(match casts.get(name) {
                            Some(resolved) => resolved.clone(),
                            None => {
                                let resolved = resolve_type(client, table, name).await?;
                                casts.insert(name.clone(), resolved.clone());
                                resolved
                            }
                        }),
                    };
                    shown.push(Shown {
                        column: column.clone(),
                        key: alias.clone().unwrap_or_else(|| column.clone()),
                        cast,
                    });
                }
            }
        }
        Ok(Some(shown))
    }
}

/// The catalog's name of the type `name` (`format_type(to_regtype(name))`), or `42704`.
async fn resolve_type(
    client: &tokio_postgres::Client,
    table: &TableInfo,
    name: &str,
) -> Result<String, ApiError> {
    let missing = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "42704",
            format!("type \"{name}\" does not exist"),
        )
    };
    match client
        .query_one("select format_type(to_regtype($1), null)", &[&name])
        .await
    {
        Ok(row) => row.get::<_, Option<String>>(0).ok_or_else(missing),
        Err(err) if err.as_db_error().is_some() => {
            tracing::debug!(error = %crate::error::chain(&err), table = %table.name, "a cast did not resolve");
            Err(missing())
        }
        Err(err) => Err(db_error(&err, table, false)),
    }
}

/// Runs a statement that addresses one row by key (`id`, as the path gave it) in the
/// request's transaction and commits: the row, or 404 when no row matched (or the caller's
/// policy hides it).
async fn one_row(
    state: &AppState,
    client: &mut deadpool_postgres::Object,
    scope: &Scope,
    table: &TableInfo,
    sql: &str,
    params: &Params,
    id: &str,
) -> Result<tokio_postgres::Row, ApiError> {
    let tx = begin(state, client, scope).await?;
    let db = |err: tokio_postgres::Error| db_error(&err, table, scope.anonymous());
    let row = tx
        .query_opt(sql, &refs(params))
        .await
        .map_err(db)?
        .ok_or_else(|| missing_row(table, id))?;
    tx.commit().await.map_err(db)?;
    Ok(row)
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
        .map_err(|err| db_error(&err, &scope.table, scope.anonymous()))?;
    if state.config.rest_set_role {
        let claims = Value::Object(scope.principal.claims.clone()).to_string();
        tx.execute(
            "select set_config('role', $1, true), set_config('request.jwt.claims', $2, true)",
            &[&scope.principal.role, &claims],
        )
        .await
        .map_err(|err| {
            tracing::debug!(error = %crate::error::chain(&err), role = %scope.principal.role, "cannot take the caller's role");
            permission_denied(
                scope.anonymous(),
                format!("Role {:?} cannot be used", scope.principal.role),
            )
        })?;
    }
    Ok(tx)
}

/// What the request's headers ask for.
struct Wants {
    media: Media,
    prefer: Prefer,
    range: Option<String>,
}

impl Wants {
    fn from_headers(headers: &HeaderMap) -> Result<Wants, ApiError> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let media = Media::negotiate(text("accept"))?;
        let prefer = Prefer::parse(
            headers
                .get_all("prefer")
                .iter()
                .filter_map(|v| v.to_str().ok()),
        )?;
        let range = text("range")
            .filter(|_| text("range-unit").is_none_or(|u| u.eq_ignore_ascii_case("items")))
            .map(str::to_owned);
        Ok(Wants {
            media,
            prefer,
            range,
        })
    }
}

/// A response with a body and headers.
struct Answer {
    status: StatusCode,
    body: String,
    content_type: Option<&'static str>,
    headers: Vec<(&'static str, String)>,
}

impl Answer {
    fn into_response(self) -> warp::reply::Response {
        let mut response = warp::reply::Response::new(self.body.into());
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        if let Some(content_type) = self.content_type {
            headers.insert(
                "content-type",
                warp::http::HeaderValue::from_static(content_type),
            );
        }
        for (name, value) in self.headers {
            if let Ok(value) = warp::http::HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        response
    }
}

/// The body of `rows` (JSON text each, or CSV lines) as `media` asks; 406 unless exactly one
/// row for a single object.
fn render(media: Media, rows: Vec<String>, shown: Option<&[Shown]>) -> Result<String, ApiError> {
    match media {
        Media::Json => Ok(json_array(&rows)),
        Media::Object => {
            if rows.len() != 1 {
                return Err(singular(rows.len()));
            }
            Ok(rows.into_iter().next().unwrap_or_default())
        }
        Media::Csv => {
            let header: Vec<String> = shown
                .unwrap_or_default()
                .iter()
                .map(|s| csv_field(&s.key))
                .collect();
            let mut out = header.join(",");
            for row in rows {
                out.push('\n');
                out.push_str(&row);
            }
            Ok(out)
        }
    }
}

/// A CSV header field, quoted as PostgreSQL's record output quotes values.
fn csv_field(name: &str) -> String {
    if name.is_empty()
        || name
            .chars()
            .any(|c| matches!(c, '"' | ',' | '(' | ')' | '\\') || c.is_whitespace())
    {
        format!("\"{}\"", name.replace('"', "\"\""))
    } else {
        name.to_owned()
    }
}

fn preference_applied(prefer: &Prefer) -> Option<(&'static str, String)> {
    (!prefer.applied.is_empty()).then(|| ("preference-applied", prefer.applied.join(", ")))
}

// ---------------------------------------------------------------------------------------------
// Requests

async fn connection(state: &AppState) -> Result<deadpool_postgres::Object, ApiError> {
    state.pool.get().await.map_err(|err| {
        tracing::warn!(error = %crate::error::chain(&err), "no database connection for a REST request");
        ApiError::unavailable()
    })
}

/// Why [`known_columns`] failed.
enum Unknown {
    /// This column is not in the table.
    Column(TableInfo, String),
    /// The catalog could not be read.
    Api(ApiError),
}

impl Unknown {
    /// The error, with an unknown column reported by `column_error`.
    fn into_api(self, column_error: fn(&TableInfo, &str) -> ApiError) -> ApiError {
        match self {
            Unknown::Column(table, name) => column_error(&table, &name),
            Unknown::Api(api) => api,
        }
    }
}

/// The table with every name in `names` among its columns: re-reads the columns once if one
/// is unknown (it may have been added since the relay started), then rejects what is left.
async fn known_columns<'a>(
    state: &AppState,
    client: &tokio_postgres::Client,
    table: TableInfo,
    names: impl IntoIterator<Item = &'a String>,
) -> Result<TableInfo, Unknown> {
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
            crate::sql::SqlError::Db(err) => Unknown::Api(db_error(&err, &table, false)),
            other => {
                tracing::warn!(error = %crate::error::chain(&other), table = %table.name, "re-reading columns failed");
                Unknown::Api(ApiError::internal())
            }
        })?;
    match unknown(&table) {
        None => Ok(table),
        Some(name) => Err(Unknown::Column(table, name)),
    }
}

fn missing_row(table: &TableInfo, id: &str) -> ApiError {
    let id = percent_decode_str(id).decode_utf8_lossy();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "PGRST116",
        "Cannot coerce the result to a single JSON object",
    )
    .with_details(format!("Table {} has no row {id:?}", table.resource))
}

/// The key values of `/api/{table}/{id}`, in key order (percent-decoded).
fn parse_key(table: &TableInfo, id: &str) -> Result<Vec<String>, ApiError> {
    let decode = |part: &str| {
        percent_decode_str(part)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "PGRST100",
                    "The row id is not valid UTF-8",
                )
            })
    };
    let parts: Vec<String> = if table.key_columns.len() == 1 {
        vec![decode(id)?]
    } else {
        id.split(',').map(decode).collect::<Result<_, _>>()?
    };
    if parts.len() != table.key_columns.len() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "PGRST100",
            format!(
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
            ),
        ));
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

/// The body's rows, and whether it was an array.
fn parse_body(body: &[u8]) -> Result<(Vec<Row>, bool), ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|err| {
        bad_body("Empty or invalid json").with_details(format!("The body is not valid JSON: {err}"))
    })?;
    match value {
        Value::Object(row) => Ok((vec![row], false)),
        Value::Array(items) => {
            let mut rows = Vec::with_capacity(items.len());
            for (index, item) in items.into_iter().enumerate() {
                match item {
                    Value::Object(row) => rows.push(row),
                    _ => {
                        return Err(bad_body(format!(
                            "Item {index} of the body is not a JSON object"
                        )));
                    }
                }
            }
            Ok((rows, true))
        }
        _ => Err(bad_body(
            "The body must be a JSON object or an array of objects",
        )),
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::config::TableName;
    use crate::filter::{Column, Kind};

    /// A table's catalog entry as the tests of this module and its children need it.
    pub(super) fn table(name: &str, keys: &[&str], columns: &[(&str, &str)]) -> TableInfo {
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
    fn bodies_must_be_objects_or_arrays_of_objects() {
        assert!(!parse_body(br#"{"a":1}"#).unwrap().1);
        assert_eq!(parse_body(br#"[{"a":1},{}]"#).unwrap().0.len(), 2);
        for bad in [&b"{"[..], b"1", b"[1]", b"\"x\"", b""] {
            let err = parse_body(bad).unwrap_err();
            assert_eq!(
                (err.status, &*err.code),
                (StatusCode::BAD_REQUEST, "PGRST102")
            );
        }
    }

    #[test]
    fn csv_headers_quote_like_record_output() {
        assert_eq!(csv_field("name"), "name");
        assert_eq!(csv_field("a b"), "\"a b\"");
        assert_eq!(csv_field("a\"b"), "\"a\"\"b\"");
        let shown = [
            Shown {
                column: "id".into(),
                key: "id".into(),
                cast: None,
            },
            Shown {
                column: "name".into(),
                key: "my name".into(),
                cast: None,
            },
        ];
        assert_eq!(
            render(Media::Csv, vec!["1,a".into()], Some(&shown)).unwrap(),
            "id,\"my name\"\n1,a"
        );
        assert_eq!(
            &*render(Media::Object, vec![], None).unwrap_err().code,
            "PGRST116"
        );
    }
}
