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
pub mod query;
pub mod statement;

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

/// All REST routes.
pub fn routes(
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

/// GET|HEAD /api/{table}?select=id,name&price=gt.10&or=(…)&order=price.desc&limit=10&offset=20
/// (`Range`, `Prefer: count=…`, `Accept: application/vnd.pgrst.object+json | text/csv`)
fn read(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / String)
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
            respond(read_rows(state, who, resource, query, headers, head))
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

/// POST /api/{table}?columns=…&on_conflict=…&select=… with an object or an array of objects
/// (`Prefer: return=…, resolution=…, missing=default, count=…`)
fn create(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.limits.body_timeout;
    warp::path!("api" / String)
        .and(warp::post())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and(warp::header::headers_cloned())
        .and(body(limit, timeout))
        .and_then(|resource, state, who, query, headers, body| {
            respond(insert_rows(state, who, resource, query, headers, body))
        })
}

/// PATCH /api/{table}?price=lt.5&select=… with an object: sets its columns on the rows the
/// filters match (a filter is required unless `--rest-allow-unfiltered-writes`)
fn update_filtered(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.limits.body_timeout;
    warp::path!("api" / String)
        .and(warp::patch())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and(warp::header::headers_cloned())
        .and(body(limit, timeout))
        .and_then(|resource, state, who, query, headers, body| {
            respond(write_rows(state, who, resource, query, headers, Some(body)))
        })
}

/// DELETE /api/{table}?id=in.(1,2)&select=…: deletes the rows the filters match (a filter is
/// required unless `--rest-allow-unfiltered-writes`)
fn delete_filtered(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("api" / String)
        .and(warp::delete())
        .and(with_state(Arc::clone(&state)))
        .and(caller(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and(warp::header::headers_cloned())
        .and_then(|resource, state, who, query, headers| {
            respond(write_rows(state, who, resource, query, headers, None))
        })
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
// Reads

async fn read_rows(
    state: Arc<AppState>,
    principal: Principal,
    resource: String,
    pairs: Vec<(String, String)>,
    headers: HeaderMap,
    head: bool,
) -> Result<warp::reply::Response, ApiError> {
    let scope = Scope::new(&state, principal, &resource)?;
    scope.require(scope.access.read, "read")?;
    let query = scope.query(&pairs)?;
    if query.on_conflict.is_some() || query.columns.is_some() {
        return Err(error::parse_error(
            "query",
            "on_conflict/columns",
            "on_conflict and columns apply to inserts only",
        ));
    }
    let wants = Wants::from_headers(&headers)?;
    let range = Range::new(&query, wants.range.as_deref(), state.config.limits.max_rows)?;
    scope.check_visible_read(&query)?;
    let anonymous = scope.anonymous();
    state
        .config
        .limits
        .filter()
        .check(&query.filters)
        .map_err(|e| filter_error(e, &scope.table, anonymous))?;
    let mut client = connection(&state).await?;
    let table = known_columns(&state, &client, scope.table.clone(), query.read_columns())
        .await
        .map_err(|e| e.into_api(undefined_column))?;
    let shown = scope
        .shown(&client, &table, query.select.as_deref(), wants.media)
        .await?;
    let filter = filter::compile(&client, &table.columns, query.filters.clone())
        .await
        .map_err(|err| filter_error(err, &table, anonymous))?
        .and(scope.policy(&client).await?);
    let mut params: Params = Vec::new();
    let condition = filter.to_sql(&mut params);
    let condition_params = params.len();
    let row = match (wants.media, &shown) {
        (Media::Csv, Some(shown)) => statement::row_csv(shown),
        _ => statement::row_json(shown.as_deref()),
    };
    // One row past a cap set by max_rows tells whether the cap cut the result.
    let fetch = range.limit().map(|l| if range.capped { l + 1 } else { l });
    params.push(Box::new(fetch));
    let limit = params.len();
    params.push(Box::new(range.lower));
    let offset = params.len();
    let sql = statement::select(&table, &row, &condition, &query.order, limit, offset);
    let tx = begin(&state, &mut client, &scope).await?;
    let db = |err: tokio_postgres::Error| db_error(&err, &table, anonymous);
    let mut rows: Vec<String> = tx
        .query(&sql, &refs(&params))
        .await
        .map_err(db)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let truncated = range
        .limit()
        .is_some_and(|l| range.capped && rows.len() as i64 > l);
    if truncated {
        rows.pop();
    }
    let condition_refs = &refs(&params)[..condition_params];
    let total = match wants.prefer.count {
        None => None,
        Some(count) => Some(
            count_rows(&tx, &table, &condition, condition_refs, count)
                .await
                .map_err(db)?,
        ),
    };
    tx.commit().await.map_err(db)?;
    let returned = rows.len();
    let status = match total {
        Some(total) if range.lower > total && range.limit() != Some(0) => {
            return Err(bad_range(format!(
                "An offset of {} was requested, but there are only {total} rows.",
                range.lower
            )));
        }
        Some(total) if (returned as i64) < total => StatusCode::PARTIAL_CONTENT,
        None if truncated => StatusCode::PARTIAL_CONTENT,
        _ => StatusCode::OK,
    };
    let body = render(wants.media, rows, shown.as_deref())?;
    let mut reply = Answer {
        status,
        body: if head { String::new() } else { body },
        content_type: Some(wants.media.content_type()),
        headers: vec![("content-range", content_range(range.lower, returned, total))],
    };
    reply.headers.extend(preference_applied(&wants.prefer));
    Ok(reply.into_response())
}

/// `Prefer: count=…`: exact, the planner's estimate, or exact below [`ESTIMATE_EXACT_BELOW`].
async fn count_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &TableInfo,
    condition: &str,
    params: &[&(dyn ToSql + Sync)],
    count: Count,
) -> Result<i64, tokio_postgres::Error> {
    let exact = || async {
        let row = tx
            .query_one(&statement::count(table, condition), params)
            .await?;
        Ok::<i64, tokio_postgres::Error>(row.get(0))
    };
    if count == Count::Exact {
        return exact().await;
    }
    let plan = tx
        .query_one(&statement::plan(table, condition), params)
        .await?;
    let estimate = plan_rows(&plan);
    match (count, estimate) {
        (Count::Estimated, Some(rows)) if rows < ESTIMATE_EXACT_BELOW => exact().await,
        (_, Some(rows)) => Ok(rows),
        (_, None) => exact().await,
    }
}

/// "Plan Rows" of an `explain (format json)` row.
fn plan_rows(row: &tokio_postgres::Row) -> Option<i64> {
    let plan: Value = row.try_get(0).ok()?;
    let rows = plan.get(0)?.get("Plan")?.get("Plan Rows")?;
    rows.as_f64().map(|r| r.round() as i64)
}

async fn read_row(
    state: Arc<AppState>,
    principal: Principal,
    resource: String,
    id: String,
    pairs: Vec<(String, String)>,
) -> Result<warp::reply::Response, ApiError> {
    let scope = Scope::new(&state, principal, &resource)?;
    scope.require(scope.access.read, "read")?;
    let query = scope.query(&pairs)?;
    if !query.filters.is_empty() || !query.order.is_empty() || query.limit.is_some() {
        return Err(error::parse_error(
            "query",
            "/api/{table}/{id}",
            "a single row takes only select",
        ));
    }
    scope.check_visible_read(&query)?;
    let key = parse_key(&scope.table, &id)?;
    let mut client = connection(&state).await?;
    let table = known_columns(&state, &client, scope.table.clone(), query.read_columns())
        .await
        .map_err(|e| e.into_api(undefined_column))?;
    let shown = scope
        .shown(&client, &table, query.select.as_deref(), Media::Json)
        .await?;
    let policy = scope.policy(&client).await?;
    let mut params: Params = Vec::new();
    let sql = format!(
        "select {} from {} as t where {} and {}",
        statement::row_json(shown.as_deref()),
        quote_table(&table.name),
        key_condition(&table, &key, &mut params)?,
        policy.to_sql_qualified("t", &mut params),
    );
    let tx = begin(&state, &mut client, &scope).await?;
    let db = |err: tokio_postgres::Error| db_error(&err, &table, scope.anonymous());
    let row = tx
        .query_opt(&sql, &refs(&params))
        .await
        .map_err(db)?
        .ok_or_else(|| missing_row(&table, &id))?;
    tx.commit().await.map_err(db)?;
    Ok(raw_json(StatusCode::OK, row.get(0)))
}

// ---------------------------------------------------------------------------------------------
// Writes

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

async fn insert_rows(
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
    let body = if representation {
        Some(render(
            wants.media,
            stored.into_iter().map(|s| s.shown).collect(),
            shown.as_deref(),
        )?)
    } else {
        None
    };
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
struct InsertPlan<'a> {
    table: &'a TableInfo,
    returning: String,
    resolution: Option<Resolution>,
    /// The conflict target, quoted.
    target: Vec<String>,
    /// Rows an upsert may update (the caller's policy, on the stored row).
    policy: &'a filter::Filter,
    /// Every row into these columns (quoted), else each row into the columns it names.
    columns: Option<Vec<String>>,
}

impl InsertPlan<'_> {
    /// A statement for rows into `columns` (`many`: an array bound as `$1`), and the values
    /// its `on conflict` clause binds after the rows.
    fn statement(&self, columns: &[String], many: bool) -> (String, Params) {
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
async fn write_rows(
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
    let body = if representation {
        Some(render(
            wants.media,
            stored.into_iter().map(|s| s.shown).collect(),
            shown.as_deref(),
        )?)
    } else {
        None
    };
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
    let tx = begin(&state, &mut client, &scope).await?;
    let db = |err: tokio_postgres::Error| db_error(&err, &table, scope.anonymous());
    let row = tx
        .query_opt(&sql, &refs(&params))
        .await
        .map_err(db)?
        .ok_or_else(|| missing_row(&table, &id))?;
    tx.commit().await.map_err(db)?;
    Ok(raw_json(StatusCode::OK, row.get(1)))
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

// ---------------------------------------------------------------------------------------------
// Fuzzing

/// The statements (SQL, number of bound values) a request to `table` runs, or the error it is
/// answered with before reaching the database: the handlers' own parsing and SQL helpers in
/// their order, with `compile` standing in for the database's typing of filter values, casts
/// resolved only to `text`, and the caller allowed everything (see [`crate::fuzz`]). `id` is
/// the raw `{id}` path segment.
pub(crate) fn plan_request(
    table: &TableInfo,
    method: &str,
    id: Option<&str>,
    pairs: &[(String, String)],
    body: &[u8],
    max_rows: Option<i64>,
    compile: impl Fn(&[filter::Column], Vec<RawFilter>) -> Result<filter::Filter, FilterError>,
) -> Result<Vec<(String, usize)>, ApiError> {
    let scope = Scope {
        table: table.clone(),
        access: Access::all(),
        principal: Principal {
            role: "fuzz".into(),
            claims: serde_json::Map::new(),
            expires_at: None,
            anonymous: true,
        },
    };
    let known = |names: &mut dyn Iterator<Item = &String>,
                 err: fn(&TableInfo, &str) -> ApiError| {
        for name in names {
            if !table.columns.iter().any(|c| &c.name == name) {
                return Err(err(table, name));
            }
        }
        Ok(())
    };
    let shown_of = |query: &Query| -> Result<Option<Vec<Shown>>, ApiError> {
        let Some(select) = query.select.as_deref().filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let mut shown = Vec::new();
        for item in select {
            match item {
                Selected::Star => shown.extend(table.columns.iter().map(|c| Shown {
                    column: c.name.clone(),
                    key: c.name.clone(),
                    cast: None,
                })),
                Selected::Column {
                    column,
                    alias,
                    cast,
                } => shown.push(Shown {
                    column: column.clone(),
                    key: alias.clone().unwrap_or_else(|| column.clone()),
                    cast: match cast.as_deref() {
                        None => None,
                        Some("text") => Some("text".to_owned()),
                        Some(other) => {
                            return Err(ApiError::new(
                                StatusCode::BAD_REQUEST,
                                "42704",
                                format!("type \"{other}\" does not exist"),
                            ));
                        }
                    },
                }),
            }
        }
        Ok(Some(shown))
    };
    let query = scope.query(pairs)?;
    known(&mut query.read_columns().into_iter(), undefined_column)?;
    let shown = shown_of(&query)?;
    let filter = compile(&table.columns, query.filters.clone())
        .map_err(|err| filter_error(err, table, true))?;
    let mut params: Params = Vec::new();
    let sql = match (method, id) {
        ("GET", None) => {
            let range = Range::new(&query, None, max_rows)?;
            let condition = filter.to_sql(&mut params);
            params.push(Box::new(range.limit()));
            params.push(Box::new(range.lower));
            let row = statement::row_json(shown.as_deref());
            let sql = statement::select(
                table,
                &row,
                &condition,
                &query.order,
                params.len() - 1,
                params.len(),
            );
            let mut count_params: Params = Vec::new();
            let condition = filter.to_sql(&mut count_params);
            return Ok(vec![
                (sql, params.len()),
                (statement::count(table, &condition), count_params.len()),
                (statement::plan(table, &condition), count_params.len()),
            ]);
        }
        ("GET", Some(id)) => {
            let key = parse_key(table, id)?;
            format!(
                "select {} from {} as t where {}",
                statement::row_json(shown.as_deref()),
                quote_table(&table.name),
                key_condition(table, &key, &mut params)?,
            )
        }
        ("POST", None) => {
            let (rows, _) = parse_body(body)?;
            known(&mut rows.iter().flat_map(|r| r.keys()), column_not_found)?;
            let policy = filter::Filter::default();
            let plan = InsertPlan {
                table,
                returning: statement::returning(&statement::row_json(shown.as_deref()), true),
                resolution: Some(Resolution::MergeDuplicates),
                target: table.key_columns.iter().map(|k| quote_ident(k)).collect(),
                policy: &policy,
                columns: None,
            };
            return Ok(rows
                .iter()
                .map(|row| {
                    let columns = statement::named_columns(table, row);
                    let (sql, params) = plan.statement(&columns, false);
                    (sql, params.len() + usize::from(!columns.is_empty()))
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
                _ => return Err(bad_body("The body must be one JSON object")),
            };
            if write == Write::Patch && row.is_empty() {
                return Err(bad_body("The body names no column to update"));
            }
            known(&mut row.keys(), column_not_found)?;
            params.push(Box::new(Value::Object(row.clone())));
            let condition = key_condition(table, &key, &mut params)?;
            statement::update(
                table,
                &row,
                write,
                &condition,
                &statement::returning(&statement::row_json(None), false),
            )
        }
        ("PATCH", None) => {
            let (rows, many) = parse_body(body)?;
            let row = match rows.into_iter().next() {
                Some(row) if !many => row,
                _ => return Err(bad_body("The body must be one JSON object")),
            };
            known(&mut row.keys(), column_not_found)?;
            params.push(Box::new(Value::Object(row.clone())));
            let condition = filter.to_sql_qualified("t", &mut params);
            statement::update(
                table,
                &row,
                Write::Patch,
                &condition,
                &statement::returning(&statement::row_json(shown.as_deref()), false),
            )
        }
        ("DELETE", None) => {
            let condition = filter.to_sql_qualified("t", &mut params);
            statement::delete(
                table,
                &condition,
                &statement::returning(&statement::row_json(shown.as_deref()), false),
            )
        }
        ("DELETE", Some(id)) => {
            let key = parse_key(table, id)?;
            let condition = key_condition(table, &key, &mut params)?;
            statement::delete(
                table,
                &condition,
                &statement::returning(&statement::row_json(None), false),
            )
        }
        _ => return Err(ApiError::not_found("No such route")),
    };
    Ok(vec![(sql, params.len())])
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
