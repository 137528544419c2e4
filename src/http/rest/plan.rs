//! The statements a request builds, without a database: [`crate::fuzz`]'s view of REST.

use serde_json::Value;
use warp::http::StatusCode;

use super::write::InsertPlan;
use super::*;

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
