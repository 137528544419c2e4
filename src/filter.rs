//! Row filters in PostgREST syntax (`price=gt.10`, `status=in.(open,held)`), with one meaning
//! in SQL (initial rows, REST) and in Rust (live events).
//!
//! A filter is parsed once per subscription: [`parse`] checks the syntax, [`compile`] checks
//! columns and operators against the catalog and has PostgreSQL itself convert every value to
//! the column's type (so `price=gt.abc` is rejected as PostgreSQL would reject it), keeping the
//! value as `to_jsonb` renders it. Live rows are rendered by the same `to_jsonb`, so Rust
//! compares like with like: numbers as exact decimals, timestamps as instants, text in code
//! point order (SQL uses `COLLATE "C"` for ordering and pattern matching to agree), `ilike`
//! folding ASCII letters only (as `COLLATE "C"` does). NULL matches no comparison, as in SQL.
//!
//! Filters compose: [`Filter::and`] is how a caller-bound filter (e.g. from a token's claims)
//! will be added to every subscription and REST query.

use std::cmp::Ordering;
use std::str::FromStr;

use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime};
use serde_json::Value;
use tokio_postgres::types::ToSql;

use crate::sql::quote_ident;

/// How values of a column compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Integers, floats, numeric: exact decimal order; NaN above +Infinity, as in PostgreSQL.
    Number,
    /// text, varchar, name: code point order.
    Text,
    /// char(n): like text, but trailing spaces do not count (PostgreSQL's bpchar semantics;
    /// `to_jsonb` renders the padding).
    PaddedText,
    /// boolean.
    Bool,
    /// timestamptz: compared as instants, whatever offset a writer's session rendered.
    TimestampTz,
    /// timestamp without time zone.
    Timestamp,
    /// date.
    Date,
    /// time without time zone.
    Time,
    /// uuid: canonical lowercase text, whose order is the uuid order.
    Uuid,
    /// Enums: equality only (their order is declaration order, not text order).
    EqualityOnly,
    /// Anything else (json, arrays, …): only `is.null`.
    Other,
}

impl Kind {
    /// The kind of a base type, by its `pg_type.typname`; `enum_type` for `typtype = 'e'`.
    pub fn from_type_name(typname: &str, enum_type: bool) -> Kind {
        match typname {
            "int2" | "int4" | "int8" | "float4" | "float8" | "numeric" | "oid" => Kind::Number,
            "text" | "varchar" | "name" => Kind::Text,
            "bpchar" => Kind::PaddedText,
            "bool" => Kind::Bool,
            "timestamptz" => Kind::TimestampTz,
            "timestamp" => Kind::Timestamp,
            "date" => Kind::Date,
            "time" => Kind::Time,
            "uuid" => Kind::Uuid,
            _ if enum_type => Kind::EqualityOnly,
            _ => Kind::Other,
        }
    }
}

/// A column as the filter needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Name, exactly as in the catalog.
    pub name: String,
    /// The column's type as SQL text (`atttypid::regtype`), for casts.
    pub sql_type: String,
    /// How its values compare.
    pub kind: Kind,
}

/// A filter operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    /// `eq`
    Eq,
    /// `neq`
    Neq,
    /// `lt`
    Lt,
    /// `lte`
    Lte,
    /// `gt`
    Gt,
    /// `gte`
    Gte,
    /// `in.(a,b)`
    In,
    /// `is.null`
    IsNull,
    /// `is.true`
    IsTrue,
    /// `is.false`
    IsFalse,
    /// `like` (`*` is `%`)
    Like,
    /// `ilike` (`*` is `%`)
    Ilike,
}

impl Operator {
    fn name(self) -> &'static str {
        match self {
            Operator::Eq => "eq",
            Operator::Neq => "neq",
            Operator::Lt => "lt",
            Operator::Lte => "lte",
            Operator::Gt => "gt",
            Operator::Gte => "gte",
            Operator::In => "in",
            Operator::IsNull => "is.null",
            Operator::IsTrue => "is.true",
            Operator::IsFalse => "is.false",
            Operator::Like => "like",
            Operator::Ilike => "ilike",
        }
    }

    fn allowed_on(self, kind: Kind) -> bool {
        use Operator::*;
        match self {
            IsNull => true,
            IsTrue | IsFalse => kind == Kind::Bool,
            Like | Ilike => matches!(kind, Kind::Text | Kind::PaddedText),
            Eq | Neq | In => kind != Kind::Other,
            Lt | Lte | Gt | Gte => !matches!(kind, Kind::Other | Kind::EqualityOnly | Kind::Bool),
        }
    }
}

/// A condition as written, before the catalog and PostgreSQL have typed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCondition {
    /// Column name.
    pub column: String,
    /// Operator.
    pub op: Operator,
    /// Values as text: one, several for `in`, none for `is.*`; a `like` pattern with `*`
    /// already turned into `%`.
    pub values: Vec<String>,
}

/// Why a filter was rejected; the message names the column and value.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// Not `op.value`, or an unknown operator.
    #[error("Filter {column}={expr:?}: {reason}")]
    Syntax {
        /// Column as written.
        column: String,
        /// Expression as written.
        expr: String,
        /// What is wrong.
        reason: String,
    },
    /// No such column in the table.
    #[error("Unknown column {0:?}")]
    UnknownColumn(String),
    /// The operator does not apply to the column's type.
    #[error("Operator {op} does not apply to column {column:?} of type {sql_type}")]
    BadOperator {
        /// Operator name.
        op: &'static str,
        /// Column.
        column: String,
        /// Its type.
        sql_type: String,
    },
    /// PostgreSQL rejected the value for the column's type.
    #[error("Value {value:?} is not a valid {sql_type} for column {column:?}")]
    BadValue {
        /// Column.
        column: String,
        /// Value as written.
        value: String,
        /// The column's type.
        sql_type: String,
    },
    /// The database failed while typing the values.
    #[error("Database error while checking the filter")]
    Db(#[source] tokio_postgres::Error),
}

/// Parses one `column=op.value` pair.
pub fn parse(column: &str, expr: &str) -> Result<RawCondition, FilterError> {
    let syntax = |reason: &str| FilterError::Syntax {
        column: column.to_owned(),
        expr: expr.to_owned(),
        reason: reason.to_owned(),
    };
    let (op_text, value) = expr
        .split_once('.')
        .ok_or_else(|| syntax("expected op.value, e.g. eq.10"))?;
    let (op, values) = match op_text {
        "eq" => (Operator::Eq, vec![value.to_owned()]),
        "neq" => (Operator::Neq, vec![value.to_owned()]),
        "lt" => (Operator::Lt, vec![value.to_owned()]),
        "lte" => (Operator::Lte, vec![value.to_owned()]),
        "gt" => (Operator::Gt, vec![value.to_owned()]),
        "gte" => (Operator::Gte, vec![value.to_owned()]),
        "like" => (Operator::Like, vec![value.replace('*', "%")]),
        "ilike" => (Operator::Ilike, vec![value.replace('*', "%")]),
        "is" => match value {
            "null" => (Operator::IsNull, vec![]),
            "true" => (Operator::IsTrue, vec![]),
            "false" => (Operator::IsFalse, vec![]),
            _ => return Err(syntax("is takes null, true or false")),
        },
        "in" => {
            let inner = value
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or_else(|| syntax("in takes a list: in.(a,b)"))?;
            (Operator::In, split_list(inner).map_err(&syntax)?)
        }
        _ => {
            return Err(syntax(
                "unknown operator (eq, neq, lt, lte, gt, gte, in, is, like, ilike)",
            ));
        }
    };
    Ok(RawCondition {
        column: column.to_owned(),
        op,
        values,
    })
}

/// Splits `a,"b,c",d` (PostgREST list syntax: double quotes protect commas, `\` escapes).
fn split_list(inner: &str) -> Result<Vec<String>, &'static str> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = inner.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if current.is_empty() && !quoted && !was_quoted => {
                quoted = true;
                was_quoted = true;
            }
            '"' if quoted => quoted = false,
            '\\' if quoted => current.push(chars.next().ok_or("dangling escape in list")?),
            ',' if !quoted => {
                items.push(std::mem::take(&mut current));
                was_quoted = false;
            }
            _ if was_quoted && !quoted => return Err("text after a closing quote in list"),
            _ => current.push(c),
        }
    }
    if quoted {
        return Err("unterminated quote in list");
    }
    items.push(current);
    Ok(items)
}

/// A comparable value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Number(NumberKey),
    Text(String),
    Bool(bool),
    Time(TimeKey),
}

/// PostgreSQL's numeric order: -Infinity < numbers < Infinity < NaN (and NaN = NaN).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum NumberKey {
    NegInfinity,
    Finite(BigDecimal),
    Infinity,
    NaN,
}

/// Dates and times, with PostgreSQL's infinities.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TimeKey {
    NegInfinity,
    At(NaiveDateTime),
    Infinity,
}

fn time_key(text: &str, parse: impl Fn(&str) -> Option<NaiveDateTime>) -> Option<TimeKey> {
    match text {
        "infinity" => Some(TimeKey::Infinity),
        "-infinity" => Some(TimeKey::NegInfinity),
        _ => parse(text).map(TimeKey::At),
    }
}

/// The comparable form of a `to_jsonb`-rendered value of a column of `kind`.
fn key_of(kind: Kind, value: &Value) -> Option<Key> {
    match (kind, value) {
        (Kind::Number, Value::Number(n)) => BigDecimal::from_str(&n.to_string())
            .ok()
            .map(|d| Key::Number(NumberKey::Finite(d))),
        (Kind::Number, Value::String(s)) => match s.as_str() {
            "NaN" => Some(Key::Number(NumberKey::NaN)),
            "Infinity" => Some(Key::Number(NumberKey::Infinity)),
            "-Infinity" => Some(Key::Number(NumberKey::NegInfinity)),
            _ => BigDecimal::from_str(s)
                .ok()
                .map(|d| Key::Number(NumberKey::Finite(d))),
        },
        (Kind::Bool, Value::Bool(b)) => Some(Key::Bool(*b)),
        (Kind::PaddedText, Value::String(s)) => Some(Key::Text(s.trim_end_matches(' ').to_owned())),
        (Kind::Text | Kind::Uuid | Kind::EqualityOnly, Value::String(s)) => {
            Some(Key::Text(s.clone()))
        }
        (Kind::TimestampTz, Value::String(s)) => time_key(s, |t| {
            DateTime::parse_from_rfc3339(t).ok().map(|d| d.naive_utc())
        })
        .map(Key::Time),
        (Kind::Timestamp, Value::String(s)) => time_key(s, |t| {
            NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f").ok()
        })
        .map(Key::Time),
        (Kind::Date, Value::String(s)) => time_key(s, |t| {
            NaiveDate::parse_from_str(t, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })
        .map(Key::Time),
        (Kind::Time, Value::String(s)) => NaiveTime::parse_from_str(s, "%H:%M:%S%.f")
            .ok()
            .map(|t| Key::Time(TimeKey::At(NaiveDate::MIN.and_time(t)))),
        _ => None,
    }
}

/// A `like`/`ilike` pattern: `%` any run, `_` any one character, `\` escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Any,
    One,
    Char(char),
}

fn compile_pattern(pattern: &str, fold: bool) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        tokens.push(match c {
            '%' => Token::Any,
            '_' => Token::One,
            '\\' => match chars.next() {
                Some(escaped) => Token::Char(fold_char(escaped, fold)),
                None => Token::Char('\\'),
            },
            c => Token::Char(fold_char(c, fold)),
        });
    }
    tokens
}

fn fold_char(c: char, fold: bool) -> char {
    if fold { c.to_ascii_lowercase() } else { c }
}

/// Iterative wildcard match with backtracking to the last `%`.
fn pattern_matches(tokens: &[Token], text: &str, fold: bool) -> bool {
    let text: Vec<char> = text.chars().map(|c| fold_char(c, fold)).collect();
    let (mut t, mut p) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match tokens.get(p) {
            Some(Token::Any) => {
                star = Some((p, t));
                p += 1;
            }
            Some(Token::One) => {
                p += 1;
                t += 1;
            }
            Some(Token::Char(c)) if *c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    tokens[p..].iter().all(|tok| *tok == Token::Any)
}

/// One typed condition.
#[derive(Debug, Clone)]
struct Condition {
    column: Column,
    op: Operator,
    /// Values as PostgreSQL rendered them (for SQL) and their comparable keys (for Rust).
    sql_values: Vec<String>,
    keys: Vec<Key>,
    pattern: Vec<Token>,
}

impl Condition {
    fn matches(&self, row: &Value) -> bool {
        let value = row.get(&self.column.name).unwrap_or(&Value::Null);
        match self.op {
            Operator::IsNull => value.is_null(),
            Operator::IsTrue => value == &Value::Bool(true),
            Operator::IsFalse => value == &Value::Bool(false),
            Operator::Like | Operator::Ilike => match value {
                // `char(n)::text` drops the padding, as the SQL side does before matching.
                Value::String(s) if self.column.kind == Kind::PaddedText => pattern_matches(
                    &self.pattern,
                    s.trim_end_matches(' '),
                    self.op == Operator::Ilike,
                ),
                Value::String(s) => pattern_matches(&self.pattern, s, self.op == Operator::Ilike),
                _ => false,
            },
            op => {
                let Some(key) = key_of(self.column.kind, value) else {
                    return false;
                };
                let ordering = |k: &Key| key.cmp(k);
                match op {
                    Operator::Eq => ordering(&self.keys[0]) == Ordering::Equal,
                    Operator::Neq => ordering(&self.keys[0]) != Ordering::Equal,
                    Operator::Lt => ordering(&self.keys[0]) == Ordering::Less,
                    Operator::Lte => ordering(&self.keys[0]) != Ordering::Greater,
                    Operator::Gt => ordering(&self.keys[0]) == Ordering::Greater,
                    Operator::Gte => ordering(&self.keys[0]) != Ordering::Less,
                    Operator::In => self.keys.iter().any(|k| ordering(k) == Ordering::Equal),
                    _ => false,
                }
            }
        }
    }

    fn to_sql(&self, params: &mut Vec<Box<dyn ToSql + Sync + Send>>) -> String {
        let column = quote_ident(&self.column.name);
        let kind = self.column.kind;
        let sql_type = &self.column.sql_type;
        let mut bind = |value: Box<dyn ToSql + Sync + Send>| {
            params.push(value);
            format!("${}", params.len())
        };
        let comparison = |op: &str, p: String| {
            let equality = matches!(op, "=" | "<>");
            match (kind, equality) {
                // Equality needs no collation (and can use the column's index).
                (Kind::Text, true) => format!("{column} {op} {p}::text"),
                // Ordering in code point order, as in Rust.
                (Kind::Text, false) => format!("{column} collate \"C\" {op} {p}::text"),
                (Kind::PaddedText, true) => format!("{column} {op} ({p}::text)::bpchar"),
                (Kind::PaddedText, false) => {
                    format!("rtrim({column}::text) collate \"C\" {op} rtrim({p}::text)")
                }
                _ => format!("{column} {op} ({p}::text)::{sql_type}"),
            }
        };
        match self.op {
            Operator::IsNull => format!("{column} is null"),
            Operator::IsTrue => format!("{column} is true"),
            Operator::IsFalse => format!("{column} is false"),
            Operator::Like => format!(
                "{column}::text collate \"C\" like {}::text",
                bind(Box::new(self.sql_values[0].clone()))
            ),
            Operator::Ilike => format!(
                "{column}::text collate \"C\" ilike {}::text",
                bind(Box::new(self.sql_values[0].clone()))
            ),
            Operator::In => {
                let p = bind(Box::new(self.sql_values.clone()));
                match kind {
                    Kind::Text => format!("{column} = any({p}::text[])"),
                    Kind::PaddedText => format!("{column} = any(({p}::text[])::bpchar[])"),
                    _ => format!("{column} = any(({p}::text[])::{sql_type}[])"),
                }
            }
            op => {
                let p = bind(Box::new(self.sql_values[0].clone()));
                let symbol = match op {
                    Operator::Eq => "=",
                    Operator::Neq => "<>",
                    Operator::Lt => "<",
                    Operator::Lte => "<=",
                    Operator::Gt => ">",
                    _ => ">=",
                };
                comparison(symbol, p)
            }
        }
    }
}

/// Conditions ANDed together; empty matches every row.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    conditions: Vec<Condition>,
}

impl Filter {
    /// Whether the filter has no condition.
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// Whether a row (as `to_jsonb` renders it) passes every condition.
    pub fn matches(&self, row: &Value) -> bool {
        self.conditions.iter().all(|c| c.matches(row))
    }

    /// Both filters at once.
    pub fn and(mut self, other: Filter) -> Filter {
        self.conditions.extend(other.conditions);
        self
    }

    /// A SQL boolean expression over the table's columns (unqualified), binding values by
    /// appending to `params` (`$n` numbering continues from what `params` holds).
    pub fn to_sql(&self, params: &mut Vec<Box<dyn ToSql + Sync + Send>>) -> String {
        if self.conditions.is_empty() {
            return "true".to_owned();
        }
        let parts: Vec<String> = self
            .conditions
            .iter()
            .map(|c| format!("({})", c.to_sql(params)))
            .collect();
        parts.join(" and ")
    }
}

/// Types the conditions against the table's columns, letting PostgreSQL convert each value to
/// the column's type exactly as the SQL will.
pub async fn compile(
    client: &tokio_postgres::Client,
    columns: &[Column],
    raw: Vec<RawCondition>,
) -> Result<Filter, FilterError> {
    let mut conditions = Vec::with_capacity(raw.len());
    for cond in raw {
        let column = columns
            .iter()
            .find(|c| c.name == cond.column)
            .ok_or_else(|| FilterError::UnknownColumn(cond.column.clone()))?
            .clone();
        if !cond.op.allowed_on(column.kind) {
            return Err(FilterError::BadOperator {
                op: cond.op.name(),
                column: column.name,
                sql_type: column.sql_type,
            });
        }
        let (sql_values, keys, pattern) = match cond.op {
            Operator::IsNull | Operator::IsTrue | Operator::IsFalse => (vec![], vec![], vec![]),
            Operator::Like | Operator::Ilike => {
                let fold = cond.op == Operator::Ilike;
                let pattern = compile_pattern(&cond.values[0], fold);
                (cond.values, vec![], pattern)
            }
            _ => {
                let rendered = render_values(client, &column, &cond.values).await?;
                let mut sql_values = Vec::with_capacity(rendered.len());
                let mut keys = Vec::with_capacity(rendered.len());
                for (value, raw_value) in rendered.iter().zip(&cond.values) {
                    let bad = || FilterError::BadValue {
                        column: column.name.clone(),
                        value: raw_value.clone(),
                        sql_type: column.sql_type.clone(),
                    };
                    keys.push(key_of(column.kind, value).ok_or_else(bad)?);
                    sql_values.push(match value {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    });
                }
                (sql_values, keys, vec![])
            }
        };
        conditions.push(Condition {
            column,
            op: cond.op,
            sql_values,
            keys,
            pattern,
        });
    }
    Ok(Filter { conditions })
}

/// `to_jsonb(value::type)` for each value, in order; a value PostgreSQL rejects is a
/// [`FilterError::BadValue`] naming it.
async fn render_values(
    client: &tokio_postgres::Client,
    column: &Column,
    values: &[String],
) -> Result<Vec<Value>, FilterError> {
    let query = format!("select to_jsonb(($1::text)::{})", column.sql_type);
    let statement = client.prepare(&query).await.map_err(FilterError::Db)?;
    let mut out = Vec::with_capacity(values.len());
    for value in values {
        match client.query_one(&statement, &[value]).await {
            Ok(row) => out.push(row.get::<_, Value>(0)),
            // Class 22 is "data exception": the value does not convert.
            Err(err) if err.code().is_some_and(|c| c.code().starts_with("22")) => {
                return Err(FilterError::BadValue {
                    column: column.name.clone(),
                    value: value.clone(),
                    sql_type: column.sql_type.clone(),
                });
            }
            Err(err) => return Err(FilterError::Db(err)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_operator() {
        let p = |e: &str| parse("c", e).unwrap();
        assert_eq!(p("eq.10").op, Operator::Eq);
        assert_eq!(p("eq.a.b").values, vec!["a.b"]);
        assert_eq!(p("like.*ab*").values, vec!["%ab%"]);
        assert_eq!(p("is.null").op, Operator::IsNull);
        assert_eq!(p("in.(1,2,3)").values, vec!["1", "2", "3"]);
        assert_eq!(p(r#"in.("a,b",c,"d\"e")"#).values, vec!["a,b", "c", "d\"e"]);
        assert_eq!(p("in.()").values, vec![""]);
        for bad in [
            "10",
            "foo.1",
            "is.maybe",
            "in.1,2",
            r#"in.("a)"#,
            r#"in.("a"b)"#,
        ] {
            assert!(parse("c", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn like_patterns_match_as_postgres_does() {
        let m = |p: &str, t: &str| pattern_matches(&compile_pattern(p, false), t, false);
        assert!(m("%", ""));
        assert!(m("a%", "abc"));
        assert!(m("%b%", "abc"));
        assert!(!m("%d%", "abc"));
        assert!(m("a_c", "abc"));
        assert!(!m("a_c", "ac"));
        assert!(m("a\\%c", "a%c"));
        assert!(!m("a\\%c", "abc"));
        assert!(m("%日本%", "こんにちは日本"));
        let i = |p: &str, t: &str| pattern_matches(&compile_pattern(p, true), t, true);
        assert!(i("ABC%", "abcdef"));
        assert!(
            !i("É", "é"),
            "only ASCII letters fold, as with COLLATE \"C\""
        );
    }

    #[test]
    fn keys_order_like_postgres() {
        let n = |v: Value| key_of(Kind::Number, &v).unwrap();
        assert!(n(json!(2)) < n(json!(10)));
        assert_eq!(n(json!(1.0)), n(json!(1)));
        assert!(n(json!("Infinity")) < n(json!("NaN")));
        assert!(n(json!("-Infinity")) < n(json!(-1e300)));
        let t = |v: &str| key_of(Kind::TimestampTz, &json!(v)).unwrap();
        assert_eq!(
            t("2026-01-01T05:00:00+05:00"),
            t("2026-01-01T00:00:00+00:00")
        );
        assert!(t("-infinity") < t("2026-01-01T00:00:00+00:00"));
        assert!(key_of(Kind::Text, &json!("B")) < key_of(Kind::Text, &json!("a")));
        assert!(key_of(Kind::Number, &Value::Null).is_none());
    }

    fn column(name: &str, kind: Kind) -> Column {
        Column {
            name: name.into(),
            sql_type: "x".into(),
            kind,
        }
    }

    fn condition(name: &str, kind: Kind, op: Operator, value: Value) -> Condition {
        Condition {
            column: column(name, kind),
            op,
            sql_values: vec![value.to_string()],
            keys: vec![key_of(kind, &value).unwrap()],
            pattern: vec![],
        }
    }

    #[test]
    fn filters_compose_with_and_in_rust_and_in_sql() {
        // How a caller-bound filter (e.g. tenant_id from a token) joins a subscription's own.
        let own = Filter {
            conditions: vec![condition("price", Kind::Number, Operator::Gt, json!(10))],
        };
        let bound = Filter {
            conditions: vec![condition("tenant", Kind::Number, Operator::Eq, json!(42))],
        };
        let both = own.and(bound);
        assert!(both.matches(&json!({"price": 11, "tenant": 42})));
        assert!(!both.matches(&json!({"price": 11, "tenant": 7})));
        assert!(!both.matches(&json!({"price": 9, "tenant": 42})));
        let mut params = Vec::new();
        assert_eq!(
            both.to_sql(&mut params),
            r#"("price" > ($1::text)::x) and ("tenant" = ($2::text)::x)"#
        );
        assert_eq!(params.len(), 2);
        assert_eq!(Filter::default().to_sql(&mut Vec::new()), "true");
    }

    #[test]
    fn char_columns_ignore_padding_like_postgres() {
        let c = condition("code", Kind::PaddedText, Operator::Eq, json!("US"));
        assert!(c.matches(&json!({"code": "US  "})));
        assert!(!c.matches(&json!({"code": "U   "})));
    }

    #[test]
    fn null_matches_no_comparison_and_operators_respect_types() {
        let c = Condition {
            column: column("price", Kind::Number),
            op: Operator::Neq,
            sql_values: vec!["5".into()],
            keys: vec![key_of(Kind::Number, &json!(5)).unwrap()],
            pattern: vec![],
        };
        assert!(c.matches(&json!({"price": 6})));
        assert!(!c.matches(&json!({"price": 5})));
        assert!(
            !c.matches(&json!({"price": null})),
            "NULL <> 5 is not true in SQL"
        );
        assert!(Operator::Like.allowed_on(Kind::Text));
        assert!(!Operator::Like.allowed_on(Kind::Number));
        assert!(!Operator::Lt.allowed_on(Kind::EqualityOnly));
        assert!(Operator::IsNull.allowed_on(Kind::Other));
    }
}
