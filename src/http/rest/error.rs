//! REST errors as PostgREST shapes them: `PGRSTxxx` codes for request errors, the SQLSTATE
//! for database errors, and PostgREST's HTTP status for each (see its `Error.hs`).
//!
//! A database error's message, DETAIL and HINT are sent for client errors (constraint and
//! value errors name the column or constraint); a server-side failure is logged with its
//! source chain and answered without details, so SQL text and internals never leave.

use tokio_postgres::error::SqlState;
use warp::http::StatusCode;

use super::super::ApiError;
use crate::filter::FilterError;
use crate::sql::TableInfo;

/// `PGRST100`: a query parameter does not parse (`select`, `order`, a filter, …).
pub fn parse_error(what: &str, value: &str, details: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "PGRST100",
        format!("\"failed to parse {what} ({value})\""),
    )
    .with_details(details)
}

/// `PGRST102`: the body is not what the request needs.
pub fn bad_body(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "PGRST102", message)
}

/// `PGRST103`: a range that cannot be served.
pub fn bad_range(details: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "PGRST103",
        "Requested range not satisfiable",
    )
    .with_details(details)
}

/// `PGRST107`: no media type the relay can answer with.
pub fn not_acceptable(accept: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_ACCEPTABLE,
        "PGRST107",
        format!("None of these media types are available: {accept}"),
    )
    .with_hint("pgrelay answers application/json, application/vnd.pgrst.object+json and text/csv")
}

/// `PGRST116`: a single object was asked for and `rows` rows matched.
pub fn singular(rows: usize) -> ApiError {
    ApiError::new(
        StatusCode::NOT_ACCEPTABLE,
        "PGRST116",
        "Cannot coerce the result to a single JSON object",
    )
    .with_details(format!("The result contains {rows} rows"))
}

/// `PGRST200`: resource embedding, which the relay does not do.
pub fn no_embedding(table: &TableInfo, other: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "PGRST200",
        format!(
            "Could not find a relationship between '{}' and '{other}' in the schema cache",
            table.resource
        ),
    )
    .with_hint("pgrelay does not embed related tables: request each table on its own")
}

/// `PGRST204`: a column the body, `columns` or `on_conflict` names does not exist (or is
/// not visible to the caller).
pub fn column_not_found(table: &TableInfo, column: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "PGRST204",
        format!(
            "Could not find the '{column}' column of '{}' in the schema cache",
            table.resource
        ),
    )
}

/// `42703`: a column `select`, `order` or a filter names does not exist, as PostgreSQL says it.
pub fn undefined_column(table: &TableInfo, column: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "42703",
        format!("column {}.{column} does not exist", table.name.table),
    )
}

/// `PGRST205`: the table is not exposed (or the caller has no right on it: the same to it).
pub fn table_not_found(resource: &str) -> ApiError {
    let (schema, table) = resource.split_once('.').unwrap_or(("public", resource));
    ApiError::new(
        StatusCode::NOT_FOUND,
        "PGRST205",
        format!("Could not find the table '{schema}.{table}' in the schema cache"),
    )
    .with_hint("Only the tables the relay exposes (GET /api lists them) can be used")
}

/// `42501`: the caller's policy does not allow this; 401 for an anonymous caller, 403 for
/// one with a token, as PostgREST answers a permission error.
pub fn permission_denied(anonymous: bool, details: impl Into<String>) -> ApiError {
    let status = if anonymous {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::FORBIDDEN
    };
    ApiError::new(status, "42501", "permission denied").with_details(details)
}

/// `21000` (as pg-safeupdate answers): an UPDATE or DELETE without a filter.
pub fn unfiltered(verb: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "21000",
        format!("{verb} requires a WHERE clause"),
    )
    .with_details(format!(
        "A {verb} through /api/{{table}} must have at least one filter (e.g. ?id=eq.1), so that a missing filter does not touch every row"
    ))
    .with_hint("Add a filter, or start the relay with --rest-allow-unfiltered-writes")
}

/// A filter the catalog or the database refused.
pub fn filter_error(err: FilterError, table: &TableInfo, anonymous: bool) -> ApiError {
    match err {
        FilterError::Db(db) => db_error(&db, table, anonymous),
        FilterError::UnknownColumn(column) => undefined_column(table, &column),
        FilterError::BadValue {
            column,
            value,
            sql_type,
        } => ApiError::new(
            StatusCode::BAD_REQUEST,
            "22P02",
            format!("invalid input syntax for type {sql_type}: \"{value}\""),
        )
        .with_details(format!(
            "The filter on column {column:?} cannot be converted"
        )),
        FilterError::Syntax {
            column,
            expr,
            reason,
        } => parse_error("filter", &format!("{column}={expr}"), reason),
        other @ (FilterError::BadOperator { .. }
        | FilterError::NotLive { .. }
        | FilterError::TooLarge(_)) => {
            ApiError::new(StatusCode::BAD_REQUEST, "PGRST100", other.to_string())
        }
    }
}

/// PostgREST's HTTP status for a SQLSTATE (`mapSQLtoHTTP`); `anonymous` for 42501.
pub fn status_of(code: &str, anonymous: bool) -> StatusCode {
    let class = &code[..code.len().min(2)];
    match code {
        "23503" | "23505" => StatusCode::CONFLICT,
        "25006" => StatusCode::METHOD_NOT_ALLOWED,
        "21000" => StatusCode::INTERNAL_SERVER_ERROR,
        "53400" => StatusCode::INTERNAL_SERVER_ERROR,
        "57P01" => StatusCode::SERVICE_UNAVAILABLE,
        "P0001" => StatusCode::BAD_REQUEST,
        "42883" => StatusCode::NOT_FOUND,
        "42P01" => StatusCode::NOT_FOUND,
        "42P17" => StatusCode::INTERNAL_SERVER_ERROR,
        "42501" if anonymous => StatusCode::UNAUTHORIZED,
        "42501" => StatusCode::FORBIDDEN,
        _ => match class {
            "08" | "53" => StatusCode::SERVICE_UNAVAILABLE,
            "0L" | "0P" | "28" => StatusCode::FORBIDDEN,
            "09" | "25" | "2D" | "38" | "39" | "3B" | "40" | "54" | "55" | "57" | "58" | "F0"
            | "HV" | "P0" | "XX" => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        },
    }
}

/// A database error as the caller sees it: client errors with PostgreSQL's message, DETAIL
/// and HINT; server errors logged and answered with the code only.
pub fn db_error(err: &tokio_postgres::Error, table: &TableInfo, anonymous: bool) -> ApiError {
    let Some(db) = err.as_db_error() else {
        let io = std::error::Error::source(err).is_some_and(|s| s.is::<std::io::Error>());
        if err.is_closed() || io {
            // Not an error the server sent: the connection broke.
            tracing::warn!(error = %crate::error::chain(err), table = %table.name, "database connection failed during a REST request");
            return ApiError::unavailable();
        }
        // A statement the relay built wrong (a parameter that does not serialize, …).
        tracing::error!(error = %crate::error::chain(err), table = %table.name, "REST request failed in the client");
        return ApiError::internal();
    };
    let code = db.code().code();
    let status = status_of(code, anonymous);
    if status.is_server_error() {
        if status == StatusCode::SERVICE_UNAVAILABLE || code.starts_with("40") {
            tracing::warn!(error = %crate::error::chain(err), table = %table.name, "REST request failed; the caller may retry");
        } else {
            tracing::error!(error = %crate::error::chain(err), table = %table.name, "REST request failed");
        }
        let mut api = ApiError::new(
            status,
            code.to_owned(),
            if status == StatusCode::SERVICE_UNAVAILABLE || code.starts_with("40") {
                "The database could not serve the request; try again"
            } else {
                "Internal error; the relay's log has the details"
            },
        );
        if code.starts_with("40") {
            // Serialization failures and deadlocks: the request may simply be retried.
            api.status = StatusCode::SERVICE_UNAVAILABLE;
        }
        return api;
    }
    tracing::debug!(error = %crate::error::chain(err), table = %table.name, %status, "REST request rejected by the database");
    let mut api = ApiError::new(status, code.to_owned(), db.message());
    if *db.code() == SqlState::UNDEFINED_COLUMN {
        // The table changed under the cached catalog (the next request re-reads it); the
        // message would name the statement's alias.
        api.message = format!(
            "A column the request names does not exist in {} (it may have changed)",
            table.resource
        );
    }
    api.details = db.detail().map(str::to_owned);
    api.hint = db.hint().map(str::to_owned);
    api
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_postgrest() {
        for (code, status) in [
            ("23505", 409),
            ("23503", 409),
            ("23502", 400),
            ("23514", 400),
            ("22P02", 400),
            ("42501", 403),
            ("42P01", 404),
            ("42883", 404),
            ("08006", 503),
            ("53300", 503),
            ("XX000", 500),
            ("P0001", 400),
            ("25006", 405),
            ("42P10", 400),
        ] {
            assert_eq!(status_of(code, false).as_u16(), status, "{code}");
        }
        assert_eq!(status_of("42501", true).as_u16(), 401);
    }
}
