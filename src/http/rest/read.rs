//! Reads: `GET`/`HEAD /api/{table}` (filters, ranges, counts, media types) and
//! `GET /api/{table}/{id}`.

use std::sync::Arc;

use serde_json::Value;
use tokio_postgres::types::ToSql;
use warp::http::{HeaderMap, StatusCode};

use super::*;

pub(super) async fn read_rows(
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

pub(super) async fn read_row(
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
    let row = one_row(&state, &mut client, &scope, &table, &sql, &params, &id).await?;
    Ok(raw_json(StatusCode::OK, row.get(0)))
}
