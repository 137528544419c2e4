//! The SQL of REST requests. Every identifier comes from the catalog through [`quote_ident`]
//! / [`quote_table`], every cast target is a type name the catalog resolved
//! ([`Shown::cast`]), and every value is a `$n` parameter: request text never reaches SQL.
//! The table is always aliased `t`; rows are rendered by `to_json` (as events are), a
//! projection (`select` with aliases and casts) through a sub-select on `t`.

use serde_json::{Map, Value};

use super::query::{OrderBy, Resolution};
use crate::sql::{TableInfo, quote_ident, quote_table};

/// A JSON object from a request body.
pub type Row = Map<String, Value>;

/// One column of a projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    /// The column (from the catalog).
    pub column: String,
    /// The key it is shown under.
    pub key: String,
    /// A type to cast to, as the catalog names it (`format_type`), never as the request
    /// wrote it.
    pub cast: Option<String>,
}

/// The row of `t` as a sub-select of the shown columns: `(select t."a" as "a", … ) as r`.
fn projection(shown: &[Shown]) -> String {
    let items: Vec<String> = shown
        .iter()
        .map(|s| {
            let cast = s
                .cast
                .as_ref()
                .map(|c| format!("::{c}"))
                .unwrap_or_default();
            format!(
                "t.{}{cast} as {}",
                quote_ident(&s.column),
                quote_ident(&s.key)
            )
        })
        .collect();
    format!("(select {}) as r", items.join(", "))
}

/// JSON text of a row of `t`: all columns (`None`), or the projection.
pub fn row_json(shown: Option<&[Shown]>) -> String {
    match shown {
        None => "to_json(t.*)::text".to_owned(),
        Some([]) => "json_build_object()::text".to_owned(),
        Some(shown) => format!("(select to_json(r) from {})::text", projection(shown)),
    }
}

/// CSV text of a row of `t` (the record's text form without its parentheses, as PostgREST
/// renders CSV): quoted where needed, NULL empty.
pub fn row_csv(shown: &[Shown]) -> String {
    format!(
        "(select substring(r::text, 2, length(r::text) - 2) from {})",
        projection(shown)
    )
}

/// `order by` terms: the request's, then the key (so pages by offset neither repeat nor skip
/// rows).
fn order_by(table: &TableInfo, order: &[OrderBy]) -> String {
    let mut terms: Vec<String> = order
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
    terms.extend(
        table
            .key_columns
            .iter()
            .map(|k| format!("t.{}", quote_ident(k))),
    );
    terms.join(", ")
}

/// `select <row> from <table> as t where <condition> order by … limit $limit offset $offset`
/// (`limit` and `offset` are parameter numbers).
pub fn select(
    table: &TableInfo,
    row: &str,
    condition: &str,
    order: &[OrderBy],
    limit: usize,
    offset: usize,
) -> String {
    format!(
        "select {row} from {} as t where {condition} order by {} limit ${limit} offset ${offset}",
        quote_table(&table.name),
        order_by(table, order),
    )
}

/// `select count(*) …` of the rows `condition` matches.
pub fn count(table: &TableInfo, condition: &str) -> String {
    format!(
        "select count(*) from {} as t where {condition}",
        quote_table(&table.name)
    )
}

/// The planner's estimate of the rows `condition` matches (`explain (format json)`).
pub fn plan(table: &TableInfo, condition: &str) -> String {
    format!(
        "explain (format json) select 1 from {} as t where {condition}",
        quote_table(&table.name)
    )
}

/// What a write returns: the whole stored row (policy checks, events), the row as the
/// request shows it, and for inserts whether the row was inserted (not updated by an upsert).
pub fn returning(shown_row: &str, insert: bool) -> String {
    let inserted = if insert { ", t.xmax = 0" } else { "" };
    format!("returning to_json(t.*)::text, {shown_row}{inserted}")
}

/// The table's columns that `row` names, in table order, quoted.
pub fn named_columns(table: &TableInfo, row: &Row) -> Vec<String> {
    table
        .columns
        .iter()
        .filter(|c| row.contains_key(&c.name))
        .map(|c| quote_ident(&c.name))
        .collect()
}

/// The columns of `names`, in table order, quoted.
pub fn listed_columns(table: &TableInfo, names: &[String]) -> Vec<String> {
    table
        .columns
        .iter()
        .filter(|c| names.contains(&c.name))
        .map(|c| quote_ident(&c.name))
        .collect()
}

/// An upsert's `on conflict` clause: on `target` (quoted columns), update the inserted
/// `columns` where the existing row passes `policy` (a condition on `t`), or do nothing.
pub fn on_conflict(
    target: &[String],
    columns: &[String],
    resolution: Resolution,
    policy: &str,
) -> String {
    let target = target.join(", ");
    match resolution {
        Resolution::MergeDuplicates if !columns.is_empty() => {
            let sets: Vec<String> = columns
                .iter()
                .map(|c| format!("{c} = excluded.{c}"))
                .collect();
            format!(
                " on conflict ({target}) do update set {} where {policy}",
                sets.join(", ")
            )
        }
        _ => format!(" on conflict ({target}) do nothing"),
    }
}

/// Inserting one row (bound as `$1`): the columns it names, converted by
/// `jsonb_populate_record`; the others get their defaults.
pub fn insert_one(
    table: &TableInfo,
    columns: &[String],
    conflict: &str,
    returning: &str,
) -> String {
    let target = quote_table(&table.name);
    if columns.is_empty() {
        return format!("insert into {target} as t default values{conflict} {returning}");
    }
    let from_r: Vec<String> = columns.iter().map(|c| format!("r.{c}")).collect();
    format!(
        "insert into {target} as t ({}) select {} from jsonb_populate_record(null::{target}, $1::jsonb) as r{conflict} {returning}",
        columns.join(", "),
        from_r.join(", "),
    )
}

/// Inserting an array of rows (bound as `$1`) into the same columns, in array order (a key
/// an object leaves out is NULL).
pub fn insert_many(
    table: &TableInfo,
    columns: &[String],
    conflict: &str,
    returning: &str,
) -> String {
    let target = quote_table(&table.name);
    let from_r: Vec<String> = columns.iter().map(|c| format!("r.{c}")).collect();
    format!(
        "insert into {target} as t ({}) select {} from jsonb_array_elements($1::jsonb) with ordinality as e(item, n) \
         cross join lateral jsonb_populate_record(null::{target}, e.item) as r order by e.n{conflict} {returning}",
        columns.join(", "),
        from_r.join(", "),
    )
}

/// Which update a PATCH or PUT makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Only the columns the body names.
    Patch,
    /// Every column: the body's value, else the default (key columns keep theirs).
    Put,
}

/// `update … set … from jsonb_populate_record($1) as r where <condition> <returning>`, with
/// the body bound as `$1` and `condition` on `t` (the row as it was).
pub fn update(
    table: &TableInfo,
    row: &Row,
    write: Write,
    condition: &str,
    returning: &str,
) -> String {
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
    format!(
        "update {target} as t set {} from jsonb_populate_record(null::{target}, $1::jsonb) as r where {condition} {returning}",
        sets.join(", "),
    )
}

/// A write (`update`/`delete` … `returning t.*`) whose rows come back in `order`, as
/// [`returning`] would return them.
pub fn ordered(table: &TableInfo, write: &str, shown_row: &str, order: &[OrderBy]) -> String {
    format!(
        "with written as ({write}) select to_json(t.*)::text, {shown_row} from written as t order by {}",
        order_by(table, order)
    )
}

/// `delete from … where <condition> <returning>`.
pub fn delete(table: &TableInfo, condition: &str, returning: &str) -> String {
    format!(
        "delete from {} as t where {condition} {returning}",
        quote_table(&table.name)
    )
}

#[cfg(test)]
mod tests {
    use super::super::tests::table;
    use super::*;

    #[test]
    fn names_are_quoted_and_values_bound() {
        let evil = r#"name"; drop table items; --"#;
        let t = table(
            r#"we"ird"#,
            &["id"],
            &[("id", "integer"), (evil, "text"), ("price", "numeric")],
        );
        let body: Row = serde_json::from_value(
            serde_json::json!({ evil: "x'; drop table items; --", "price": 1 }),
        )
        .unwrap();
        let columns = named_columns(&t, &body);
        let sql = insert_one(&t, &columns, "", &returning(&row_json(None), true));
        assert!(sql.contains(r#""name""; drop table items; --""#), "{sql}");
        assert!(sql.contains(r#""public"."we""ird""#), "{sql}");
        assert!(!sql.contains("x'"), "values are never in the text: {sql}");
        let sql = update(&t, &body, Write::Put, "true", "");
        assert!(
            !sql.contains("\"id\" = default"),
            "PUT keeps the key: {sql}"
        );
        let sql = update(&t, &body, Write::Patch, "true", "");
        assert!(
            !sql.contains("default"),
            "PATCH sets only what the body names: {sql}"
        );
        let shown = [Shown {
            column: evil.to_owned(),
            key: "a\"b".to_owned(),
            cast: Some("text".to_owned()),
        }];
        assert_eq!(
            row_json(Some(&shown)),
            r#"(select to_json(r) from (select t."name""; drop table items; --"::text as "a""b") as r)::text"#
        );
        let upsert = on_conflict(
            &["\"id\"".to_owned()],
            &["\"price\"".to_owned()],
            Resolution::MergeDuplicates,
            "true",
        );
        assert_eq!(
            upsert,
            r#" on conflict ("id") do update set "price" = excluded."price" where true"#
        );
    }
}
