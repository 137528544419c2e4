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
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_postgres::types::ToSql;

use crate::row::{Fields, is_null};
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
    /// The column's collation is nondeterministic (equal strings may differ in bytes):
    /// equality is then compared in code point order (`COLLATE "C"`) in SQL, as in Rust.
    pub nondeterministic: bool,
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
    /// Past a configured limit.
    #[error("Filter too large: {0}")]
    TooLarge(String),
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
    if matches!(op, Operator::Like | Operator::Ilike) && dangling_escape(&values[0]) {
        // PostgreSQL refuses such a pattern when it runs; refused here, it is refused the
        // same way everywhere (subscribe, initial data, REST).
        return Err(syntax(
            "a like pattern must not end with the escape character \\ (write \\\\ for a backslash)",
        ));
    }
    Ok(RawCondition {
        column: column.to_owned(),
        op,
        values,
    })
}

/// Whether a pattern ends with an escape character that escapes nothing.
fn dangling_escape(pattern: &str) -> bool {
    let mut chars = pattern.chars();
    let mut dangling = false;
    while let Some(c) = chars.next() {
        dangling = c == '\\' && chars.next().is_none();
    }
    dangling
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

/// Dates and times, with PostgreSQL's infinities: an instant in microseconds from
/// 1970-01-01 (UTC for `timestamptz`), over the whole range PostgreSQL stores (4713 BC to
/// 5874897 AD), which is wider than chrono's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TimeKey {
    NegInfinity,
    At(i128),
    Infinity,
}

const MICROS_PER_DAY: i128 = 86_400_000_000;

/// Days from 1970-01-01 to a proleptic Gregorian date (astronomical year: 1 BC is 0).
fn days_from_civil(year: i64, month: u32, day: u32) -> i128 {
    let y = i128::from(year) - i128::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i128::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i128::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` (any number of year digits), days from 1970-01-01.
fn parse_date(text: &str, bc: bool) -> Option<i128> {
    let mut parts = text.splitn(3, '-');
    let year: i64 = parts.next()?.parse().ok()?;
    let month: u32 = parts.next()?.parse().ok()?;
    let day: u32 = parts.next()?.parse().ok()?;
    if year < 0 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let year = if bc { 1 - year } else { year };
    Some(days_from_civil(year, month, day))
}

/// `HH:MM:SS[.ffffff]` (24:00:00 included, as PostgreSQL allows), microseconds.
fn parse_clock(text: &str) -> Option<i128> {
    let (hms, fraction) = text.split_once('.').unwrap_or((text, ""));
    let mut parts = hms.splitn(3, ':');
    let h: i128 = parts.next()?.parse().ok()?;
    let m: i128 = parts.next()?.parse().ok()?;
    let s: i128 = parts.next()?.parse().ok()?;
    if fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros: i128 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<6}").parse().ok()?
    };
    // Checked: PostgreSQL renders small numbers here, but a value that is not its rendering
    // must not overflow (a panic in a debug build, a wrong order in a release one).
    h.checked_mul(60)?
        .checked_add(m)?
        .checked_mul(60)?
        .checked_add(s)?
        .checked_mul(1_000_000)?
        .checked_add(micros)
}

/// `+HH[:MM[:SS]]` / `-…`, seconds east of UTC.
fn parse_offset(text: &str) -> Option<i128> {
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let mut total = 0i128;
    let mut unit = 3600;
    for part in rest.split(':') {
        if unit == 0 {
            return None;
        }
        let n: i128 = part.parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        unit /= 60;
    }
    Some(sign * total)
}

/// A `to_json`-rendered date, timestamp or timestamptz (`…T…[+offset][ BC]`) as an instant.
fn parse_instant(text: &str, kind: Kind) -> Option<TimeKey> {
    match text {
        "infinity" => return Some(TimeKey::Infinity),
        "-infinity" => return Some(TimeKey::NegInfinity),
        _ => {}
    }
    let (text, bc) = match text.strip_suffix(" BC") {
        Some(t) => (t, true),
        None => (text, false),
    };
    if kind == Kind::Date {
        return parse_date(text, bc).map(|d| TimeKey::At(d * MICROS_PER_DAY));
    }
    let (date, time) = text.split_once('T')?;
    let days = parse_date(date, bc)?;
    let (clock, offset) = if kind == Kind::TimestampTz {
        let at = time.find(['+', '-'])?;
        (&time[..at], parse_offset(&time[at..])?)
    } else {
        (time, 0)
    };
    let micros = days
        .checked_mul(MICROS_PER_DAY)?
        .checked_add(parse_clock(clock)?)?
        .checked_sub(offset.checked_mul(1_000_000)?)?;
    Some(TimeKey::At(micros))
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
        (Kind::TimestampTz | Kind::Timestamp | Kind::Date, Value::String(s)) => {
            parse_instant(s, kind).map(Key::Time)
        }
        (Kind::Time, Value::String(s)) => parse_clock(s).map(|t| Key::Time(TimeKey::At(t))),
        _ => None,
    }
}

/// A compiled `like`/`ilike` pattern: `%` any run, `_` any one character, `\` escapes.
///
/// Matched by the `regex` crate's automata, in time linear in the text (a backtracking
/// matcher takes O(text × pattern) on `%a%a%a…b` against `aaaa…`). `ilike` folds ASCII
/// letters only, as `COLLATE "C"` does on the SQL side.
#[derive(Debug, Clone)]
pub struct Pattern {
    regex: regex::Regex,
    fold: bool,
}

impl Pattern {
    /// Compiles a pattern (`*` already turned into `%`).
    fn new(pattern: &str, fold: bool) -> Option<Pattern> {
        let mut expr = String::with_capacity(pattern.len() * 2 + 8);
        expr.push_str("(?s)\\A");
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            match c {
                '%' => expr.push_str(".*"),
                '_' => expr.push('.'),
                '\\' => {
                    let escaped = chars.next().unwrap_or('\\');
                    expr.push_str(&regex::escape(&fold_char(escaped, fold).to_string()));
                }
                c => expr.push_str(&regex::escape(&fold_char(c, fold).to_string())),
            }
        }
        expr.push_str("\\z");
        let regex = regex::RegexBuilder::new(&expr)
            .size_limit(1 << 20)
            .dfa_size_limit(1 << 20)
            .build()
            .ok()?;
        Some(Pattern { regex, fold })
    }

    fn matches(&self, text: &str) -> bool {
        if self.fold && text.bytes().any(|b| b.is_ascii_uppercase()) {
            self.regex.is_match(&text.to_ascii_lowercase())
        } else {
            self.regex.is_match(text)
        }
    }
}

fn fold_char(c: char, fold: bool) -> char {
    if fold { c.to_ascii_lowercase() } else { c }
}

/// How big a filter may be (see [`crate::config::Limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterLimits {
    /// Most conditions.
    pub max_conditions: usize,
    /// Most values in an `in` list.
    pub max_in_values: usize,
    /// Longest pattern, in characters.
    pub max_pattern_length: usize,
    /// Most wildcards in a pattern.
    pub max_pattern_wildcards: usize,
}

impl FilterLimits {
    /// Refuses a filter past a limit, naming the limit.
    pub fn check(&self, conditions: &[RawCondition]) -> Result<(), FilterError> {
        if conditions.len() > self.max_conditions {
            return Err(FilterError::TooLarge(format!(
                "a filter may have at most {} conditions",
                self.max_conditions
            )));
        }
        for c in conditions {
            match c.op {
                Operator::In if c.values.len() > self.max_in_values => {
                    return Err(FilterError::TooLarge(format!(
                        "an in list may have at most {} values (column {:?})",
                        self.max_in_values, c.column
                    )));
                }
                Operator::Like | Operator::Ilike => {
                    let pattern = c.values.first().map_or("", String::as_str);
                    if pattern.chars().count() > self.max_pattern_length {
                        return Err(FilterError::TooLarge(format!(
                            "a pattern may be at most {} characters long (column {:?})",
                            self.max_pattern_length, c.column
                        )));
                    }
                    if wildcards(pattern) > self.max_pattern_wildcards {
                        return Err(FilterError::TooLarge(format!(
                            "a pattern may have at most {} wildcards (column {:?})",
                            self.max_pattern_wildcards, c.column
                        )));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Unescaped `%` and `_` in a pattern.
fn wildcards(pattern: &str) -> usize {
    let mut count = 0;
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '%' | '_' => count += 1,
            _ => {}
        }
    }
    count
}

/// One typed condition.
#[derive(Debug, Clone)]
struct Condition {
    column: Column,
    op: Operator,
    /// Values as PostgreSQL rendered them (for SQL) and their comparable keys (for Rust).
    sql_values: Vec<String>,
    keys: Vec<Key>,
    pattern: Option<Pattern>,
}

impl Condition {
    fn matches(&self, row: &Value) -> bool {
        self.matches_value(row.get(&self.column.name).unwrap_or(&Value::Null))
    }

    /// Evaluates on a field of a row in JSON text (only scalars are parsed: other types take
    /// no operator but `is.null`).
    fn matches_raw(&self, raw: Option<&RawValue>) -> bool {
        let value = match raw {
            None => Value::Null,
            Some(raw) if is_null(raw) => Value::Null,
            // Any non-null stand-in: `is.null` is the only operator these columns take.
            Some(_) if self.column.kind == Kind::Other => Value::Bool(true),
            Some(raw) => match serde_json::from_str(raw.get()) {
                Ok(value) => value,
                Err(_) => return false,
            },
        };
        self.matches_value(&value)
    }

    fn matches_value(&self, value: &Value) -> bool {
        match self.op {
            Operator::IsNull => value.is_null(),
            Operator::IsTrue => value == &Value::Bool(true),
            Operator::IsFalse => value == &Value::Bool(false),
            Operator::Like | Operator::Ilike => match value {
                // `char(n)::text` drops the padding, as the SQL side does before matching.
                Value::String(s) if self.column.kind == Kind::PaddedText => self
                    .pattern
                    .as_ref()
                    .is_some_and(|p| p.matches(s.trim_end_matches(' '))),
                Value::String(s) => self.pattern.as_ref().is_some_and(|p| p.matches(s)),
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

    fn to_sql(
        &self,
        params: &mut Vec<Box<dyn ToSql + Sync + Send>>,
        alias: Option<&str>,
    ) -> String {
        let column = match alias {
            Some(alias) => format!("{}.{}", quote_ident(alias), quote_ident(&self.column.name)),
            None => quote_ident(&self.column.name),
        };
        let kind = self.column.kind;
        let sql_type = &self.column.sql_type;
        let mut bind = |value: Box<dyn ToSql + Sync + Send>| {
            params.push(value);
            format!("${}", params.len())
        };
        let code_points = if self.column.nondeterministic {
            " collate \"C\""
        } else {
            ""
        };
        let comparison = |op: &str, p: String| {
            let equality = matches!(op, "=" | "<>");
            match (kind, equality) {
                // Equality needs no collation (and can use the column's index), unless the
                // column's collation calls different strings equal.
                (Kind::Text, true) => format!("{column}{code_points} {op} {p}::text"),
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
                    Kind::Text => format!("{column}{code_points} = any({p}::text[])"),
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

    /// Whether a row (as `to_json` renders it, parsed) passes every condition.
    pub fn matches(&self, row: &Value) -> bool {
        self.conditions.iter().all(|c| c.matches(row))
    }

    /// Whether a row in JSON text, split into fields, passes every condition.
    pub fn matches_fields(&self, row: &Fields<'_>) -> bool {
        self.conditions
            .iter()
            .all(|c| c.matches_raw(row.get(&c.column.name)))
    }

    /// Whether a row in JSON text passes every condition (false if it is not an object).
    pub fn matches_text(&self, row: &str) -> bool {
        Fields::parse(row).is_ok_and(|fields| self.matches_fields(&fields))
    }

    /// The columns the filter names.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.conditions.iter().map(|c| c.column.name.as_str())
    }

    /// The conditions from `at` on, taken out of `self` (to compile two filters with one
    /// query and then part them).
    pub fn split_off(&mut self, at: usize) -> Filter {
        Filter {
            conditions: self.conditions.split_off(at.min(self.conditions.len())),
        }
    }

    /// Both filters at once.
    pub fn and(mut self, other: Filter) -> Filter {
        self.conditions.extend(other.conditions);
        self
    }

    /// A SQL boolean expression over the table's columns (unqualified), binding values by
    /// appending to `params` (`$n` numbering continues from what `params` holds).
    pub fn to_sql(&self, params: &mut Vec<Box<dyn ToSql + Sync + Send>>) -> String {
        self.sql(params, None)
    }

    /// [`Filter::to_sql`] with every column qualified by `alias` (for statements that join
    /// another row of the same type).
    pub fn to_sql_qualified(
        &self,
        alias: &str,
        params: &mut Vec<Box<dyn ToSql + Sync + Send>>,
    ) -> String {
        self.sql(params, Some(alias))
    }

    fn sql(&self, params: &mut Vec<Box<dyn ToSql + Sync + Send>>, alias: Option<&str>) -> String {
        if self.conditions.is_empty() {
            return "true".to_owned();
        }
        let parts: Vec<String> = self
            .conditions
            .iter()
            .map(|c| format!("({})", c.to_sql(params, alias)))
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
        let column = checked_column(columns, &cond)?;
        let rendered = if takes_values(cond.op) {
            render_values(client, &column, &cond.values).await?
        } else {
            Vec::new()
        };
        conditions.push(typed(column, cond, &rendered)?);
    }
    Ok(Filter { conditions })
}

/// [`compile`] with `render` standing in for PostgreSQL's `to_json(value::type)` (fuzzing:
/// everything but the database's conversion is the code [`compile`] runs).
pub(crate) fn compile_rendered(
    columns: &[Column],
    raw: Vec<RawCondition>,
    mut render: impl FnMut(&Column, &[String]) -> Result<Vec<Value>, FilterError>,
) -> Result<Filter, FilterError> {
    let mut conditions = Vec::with_capacity(raw.len());
    for cond in raw {
        let column = checked_column(columns, &cond)?;
        let rendered = if takes_values(cond.op) {
            render(&column, &cond.values)?
        } else {
            Vec::new()
        };
        conditions.push(typed(column, cond, &rendered)?);
    }
    Ok(Filter { conditions })
}

/// Whether an operator's values are converted to the column's type (patterns stay text).
fn takes_values(op: Operator) -> bool {
    !matches!(
        op,
        Operator::IsNull | Operator::IsTrue | Operator::IsFalse | Operator::Like | Operator::Ilike
    )
}

/// The condition's column, if the table has it and the operator applies to its type.
fn checked_column(columns: &[Column], cond: &RawCondition) -> Result<Column, FilterError> {
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
    Ok(column)
}

/// A condition typed with its values as PostgreSQL rendered them (`rendered`, one per value,
/// when [`takes_values`]).
fn typed(column: Column, cond: RawCondition, rendered: &[Value]) -> Result<Condition, FilterError> {
    let (sql_values, keys, pattern) = match cond.op {
        Operator::IsNull | Operator::IsTrue | Operator::IsFalse => (vec![], vec![], None),
        Operator::Like | Operator::Ilike => {
            let fold = cond.op == Operator::Ilike;
            let pattern = Pattern::new(&cond.values[0], fold).ok_or_else(|| {
                FilterError::TooLarge(format!(
                    "the pattern for column {:?} is too complex",
                    cond.column
                ))
            })?;
            (cond.values, vec![], Some(pattern))
        }
        _ => {
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
            (sql_values, keys, None)
        }
    };
    Ok(Condition {
        column,
        op: cond.op,
        sql_values,
        keys,
        pattern,
    })
}

/// `to_json(value::type)` for each value, in order, in one query; a value PostgreSQL rejects
/// is a [`FilterError::BadValue`] naming it (found by trying them one by one, only then).
async fn render_values(
    client: &tokio_postgres::Client,
    column: &Column,
    values: &[String],
) -> Result<Vec<Value>, FilterError> {
    let query = format!(
        "select to_json(v::{})::text from unnest($1::text[]) with ordinality as u(v, i) order by i",
        column.sql_type
    );
    let bad_value = |value: &String| FilterError::BadValue {
        column: column.name.clone(),
        value: value.clone(),
        sql_type: column.sql_type.clone(),
    };
    // Class 22 is "data exception": a value does not convert.
    let data_exception =
        |err: &tokio_postgres::Error| err.code().is_some_and(|c| c.code().starts_with("22"));
    match client.query(&query, &[&values]).await {
        Ok(rows) => rows
            .iter()
            .zip(values)
            .map(|(row, value)| {
                let text: Option<String> = row.get(0);
                text.and_then(|t| serde_json::from_str(&t).ok())
                    .ok_or_else(|| bad_value(value))
            })
            .collect(),
        Err(err) if data_exception(&err) => {
            let one = format!("select ($1::text)::{}", column.sql_type);
            let statement = client.prepare(&one).await.map_err(FilterError::Db)?;
            for value in values {
                match client.query_one(&statement, &[value]).await {
                    Ok(_) => {}
                    Err(err) if data_exception(&err) => return Err(bad_value(value)),
                    Err(err) => return Err(FilterError::Db(err)),
                }
            }
            Err(FilterError::Db(err))
        }
        Err(err) => Err(FilterError::Db(err)),
    }
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
        assert_eq!(p(r"like.ab\\").values, vec![r"ab\\"]);
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
            r"like.ab\",
            r"ilike.\",
            r"like.a\\\",
        ] {
            assert!(parse("c", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn like_patterns_match_as_postgres_does() {
        let m = |p: &str, t: &str| Pattern::new(p, false).unwrap().matches(t);
        assert!(m("%", ""));
        assert!(m("a%", "abc"));
        assert!(m("%b%", "abc"));
        assert!(!m("%d%", "abc"));
        assert!(m("a_c", "abc"));
        assert!(!m("a_c", "ac"));
        assert!(m("a\\%c", "a%c"));
        assert!(!m("a\\%c", "abc"));
        assert!(m("%日本%", "こんにちは日本"));
        let i = |p: &str, t: &str| Pattern::new(p, true).unwrap().matches(t);
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
        // Out of any range PostgreSQL renders: not a value, rather than an overflow.
        for (kind, text) in [
            (Kind::Time, "99999999999999999999999999999999999:00:00"),
            (
                Kind::Timestamp,
                "2026-01-01T99999999999999999999999999999999:00:00",
            ),
            (
                Kind::TimestampTz,
                "2026-01-01T00:00:00+99999999999999999999999999999999",
            ),
            (
                Kind::TimestampTz,
                "2026-01-01T00:00:00+00:99999999999999999999999999999999",
            ),
            (Kind::Date, "9223372036854775807-12-31"),
        ] {
            let key = key_of(kind, &json!(text));
            assert!(kind == Kind::Date || key.is_none(), "{text}");
        }
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
            nondeterministic: false,
        }
    }

    fn condition(name: &str, kind: Kind, op: Operator, value: Value) -> Condition {
        Condition {
            column: column(name, kind),
            op,
            sql_values: vec![value.to_string()],
            keys: vec![key_of(kind, &value).unwrap()],
            pattern: None,
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
            pattern: None,
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
