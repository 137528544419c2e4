//! Row filters in PostgREST syntax (`price=gt.10`, `status=in.(open,held)`,
//! `or=(a.eq.1,and(b.gt.2,c.not.is.null))`), with one meaning in SQL (initial rows, REST) and
//! in Rust (live events).
//!
//! - [`parse`](mod@parse) — the grammar: conditions, `not.`, `(any)`/`(all)`, logic trees.
//! - `key` — values in comparable form; `pattern` — `like` in Rust.
//!
//! A filter is parsed once per subscription or request: [`parse()`](fn@parse) checks the syntax,
//! [`compile`] checks columns and operators against the catalog and has PostgreSQL itself
//! convert every value to the column's type (so `price=gt.abc` is rejected as PostgreSQL
//! would reject it), keeping the value as `to_jsonb` renders it. Live rows are rendered by the
//! same `to_jsonb`, so Rust compares like with like: numbers as exact decimals, timestamps as
//! instants, text in code point order (SQL uses `COLLATE "C"` for ordering and pattern matching
//! to agree), `ilike` folding ASCII letters only (as `COLLATE "C"` does).
//!
//! Logic is SQL's three-valued logic in Rust too: a comparison with NULL is unknown, `not` of
//! unknown is unknown, `or`/`and` combine as in SQL, and a row matches only when the whole
//! filter is true. Operators whose meaning Rust cannot reproduce exactly (regular expressions,
//! full-text search, array and range operators, comparisons on json, arrays and ranges) are
//! SQL-only: REST takes them, a subscription refuses them ([`Filter::check_live`]) rather than
//! approximating.
//!
//! Filters compose: [`Filter::and`] is how a caller-bound filter (e.g. from a token's claims)
//! is added to every subscription and REST query.

mod key;
pub mod parse;
mod pattern;

use std::cmp::Ordering;

use serde_json::Value;
use serde_json::value::RawValue;
use tokio_postgres::types::ToSql;

use crate::row::{Fields, is_null};
use crate::sql::quote_ident;
use key::{Key, key_of};
pub use parse::{is_logic_key, parse, parse_pair};
use pattern::Pattern;

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
    /// Arrays: `cs`, `cd`, `ov`, equality (SQL only).
    Array,
    /// Ranges and multiranges: `cs`, `cd`, `ov`, `sl`, `sr`, `nxr`, `nxl`, `adj`, equality
    /// (SQL only).
    Range,
    /// jsonb: `cs`, `cd`, equality (SQL only).
    Json,
    /// tsvector: full-text search (SQL only).
    TsVector,
    /// Anything else (json, bytea, …): only `is.null` and `is.not_null`.
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
            "jsonb" => Kind::Json,
            "tsvector" => Kind::TsVector,
            _ if enum_type => Kind::EqualityOnly,
            _ => Kind::Other,
        }
    }

    /// The kind of a base type from the catalog: `typname`, `typtype` and `typcategory`.
    pub fn from_catalog(typname: &str, typtype: &str, typcategory: &str) -> Kind {
        match (typtype, typcategory) {
            ("e", _) => Kind::EqualityOnly,
            ("r" | "m", _) => Kind::Range,
            (_, "A") => Kind::Array,
            _ => Kind::from_type_name(typname, false),
        }
    }

    /// Whether Rust compares values of this kind exactly as PostgreSQL does.
    fn compared_in_rust(self) -> bool {
        !matches!(
            self,
            Kind::Array | Kind::Range | Kind::Json | Kind::TsVector | Kind::Other
        )
    }
}

/// A column as the filter needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Name, exactly as in the catalog.
    pub name: String,
    /// The column's type as SQL text (`format_type(atttypid, -1)`), for casts.
    pub sql_type: String,
    /// How its values compare.
    pub kind: Kind,
    /// The column's collation is nondeterministic (equal strings may differ in bytes):
    /// equality is then compared in code point order (`COLLATE "C"`) in SQL, as in Rust.
    pub nondeterministic: bool,
}

/// A filter operator (PostgREST's horizontal filtering operators).
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
    /// `is.not_null`
    IsNotNull,
    /// `is.true`
    IsTrue,
    /// `is.false`
    IsFalse,
    /// `is.unknown`
    IsUnknown,
    /// `isdistinct` (`IS DISTINCT FROM`)
    IsDistinct,
    /// `like` (`*` is `%`)
    Like,
    /// `ilike` (`*` is `%`)
    Ilike,
    /// `match` (`~`, POSIX regular expression; SQL only)
    Match,
    /// `imatch` (`~*`; SQL only)
    Imatch,
    /// `fts` (`to_tsquery`; SQL only)
    Fts,
    /// `plfts` (`plainto_tsquery`; SQL only)
    Plfts,
    /// `phfts` (`phraseto_tsquery`; SQL only)
    Phfts,
    /// `wfts` (`websearch_to_tsquery`; SQL only)
    Wfts,
    /// `cs` (`@>`; SQL only)
    Cs,
    /// `cd` (`<@`; SQL only)
    Cd,
    /// `ov` (`&&`; SQL only)
    Ov,
    /// `sl` (`<<`; SQL only)
    Sl,
    /// `sr` (`>>`; SQL only)
    Sr,
    /// `nxr` (`&<`; SQL only)
    Nxr,
    /// `nxl` (`&>`; SQL only)
    Nxl,
    /// `adj` (`-|-`; SQL only)
    Adj,
}

impl Operator {
    /// The operator as written.
    pub fn name(self) -> &'static str {
        use Operator::*;
        match self {
            Eq => "eq",
            Neq => "neq",
            Lt => "lt",
            Lte => "lte",
            Gt => "gt",
            Gte => "gte",
            In => "in",
            IsNull => "is.null",
            IsNotNull => "is.not_null",
            IsTrue => "is.true",
            IsFalse => "is.false",
            IsUnknown => "is.unknown",
            IsDistinct => "isdistinct",
            Like => "like",
            Ilike => "ilike",
            Match => "match",
            Imatch => "imatch",
            Fts => "fts",
            Plfts => "plfts",
            Phfts => "phfts",
            Wfts => "wfts",
            Cs => "cs",
            Cd => "cd",
            Ov => "ov",
            Sl => "sl",
            Sr => "sr",
            Nxr => "nxr",
            Nxl => "nxl",
            Adj => "adj",
        }
    }

    /// `is.*`: no value.
    fn is_test(self) -> bool {
        use Operator::*;
        matches!(self, IsNull | IsNotNull | IsTrue | IsFalse | IsUnknown)
    }

    fn is_fts(self) -> bool {
        matches!(
            self,
            Operator::Fts | Operator::Plfts | Operator::Phfts | Operator::Wfts
        )
    }

    /// Takes `(any)`/`(all)` (PostgREST's quantifiable operators).
    fn takes_quantifier(self) -> bool {
        use Operator::*;
        matches!(
            self,
            Eq | Gt | Gte | Lt | Lte | Like | Ilike | Match | Imatch
        )
    }

    /// A comparison Rust evaluates on keys (for columns it compares).
    fn compares(self) -> bool {
        use Operator::*;
        matches!(self, Eq | Neq | Lt | Lte | Gt | Gte | In | IsDistinct)
    }

    /// The SQL operator of a binary comparison.
    fn symbol(self) -> &'static str {
        use Operator::*;
        match self {
            Eq | In => "=",
            Neq => "<>",
            Lt => "<",
            Lte => "<=",
            Gt => ">",
            Gte => ">=",
            Like => "like",
            Ilike => "ilike",
            Match => "~",
            Imatch => "~*",
            Cs => "@>",
            Cd => "<@",
            Ov => "&&",
            Sl => "<<",
            Sr => ">>",
            Nxr => "&<",
            Nxl => "&>",
            Adj => "-|-",
            Fts => "to_tsquery",
            Plfts => "plainto_tsquery",
            Phfts => "phraseto_tsquery",
            Wfts => "websearch_to_tsquery",
            IsNull | IsNotNull | IsTrue | IsFalse | IsUnknown | IsDistinct => "",
        }
    }

    fn allowed_on(self, kind: Kind) -> bool {
        use Operator::*;
        let text = matches!(kind, Kind::Text | Kind::PaddedText);
        match self {
            IsNull | IsNotNull => true,
            IsTrue | IsFalse | IsUnknown => kind == Kind::Bool,
            Like | Ilike | Match | Imatch => text,
            Fts | Plfts | Phfts | Wfts => text || kind == Kind::TsVector,
            Eq | Neq | In | IsDistinct => !matches!(kind, Kind::Other | Kind::TsVector),
            Lt | Lte | Gt | Gte => kind.compared_in_rust() && kind != Kind::EqualityOnly,
            Cs | Cd => matches!(kind, Kind::Array | Kind::Range | Kind::Json),
            Ov => matches!(kind, Kind::Array | Kind::Range),
            Sl | Sr | Nxr | Nxl | Adj => kind == Kind::Range,
        }
    }

    /// Whether Rust evaluates this operator exactly as SQL does on some column (on every
    /// column it applies to but json, arrays and ranges).
    pub fn live_anywhere(self) -> bool {
        self.live(Kind::Number) || self.live(Kind::Bool)
    }

    /// Whether Rust evaluates this operator on a column of `kind` exactly as SQL does.
    fn live(self, kind: Kind) -> bool {
        use Operator::*;
        match self {
            IsNull | IsNotNull | IsTrue | IsFalse | IsUnknown | Like | Ilike => true,
            op if op.compares() => kind.compared_in_rust(),
            _ => false,
        }
    }
}

/// `(any)` / `(all)` of a quantified operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantifier {
    /// True when the comparison holds for some value.
    Any,
    /// True when it holds for every value.
    All,
}

/// A condition as written, before the catalog and PostgreSQL have typed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCondition {
    /// Column name.
    pub column: String,
    /// Operator.
    pub op: Operator,
    /// `not.` before the operator.
    pub negated: bool,
    /// `(any)`/`(all)`: the values are a list.
    pub quantifier: Option<Quantifier>,
    /// The text search configuration of `fts(english)`.
    pub language: Option<String>,
    /// Values as text: one, several for `in` and quantifiers, none for `is.*`; a `like`
    /// pattern with `*` already turned into `%`.
    pub values: Vec<String>,
}

impl RawCondition {
    /// `column op values` without modifiers.
    pub fn new(column: impl Into<String>, op: Operator, values: Vec<String>) -> RawCondition {
        RawCondition {
            column: column.into(),
            op,
            negated: false,
            quantifier: None,
            language: None,
            values,
        }
    }
}

/// A filter as written: a condition, or a group of them (`or=(…)`, `and(…)`, `not.or(…)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawFilter {
    /// One condition.
    Condition(RawCondition),
    /// Conditions and groups combined with `or` (else `and`), negated with `not.`.
    Group {
        /// `or` rather than `and`.
        or: bool,
        /// `not.or` / `not.and`.
        negated: bool,
        /// At least one.
        items: Vec<RawFilter>,
    },
}

impl From<RawCondition> for RawFilter {
    fn from(condition: RawCondition) -> RawFilter {
        RawFilter::Condition(condition)
    }
}

impl RawFilter {
    /// Every condition, depth first in written order.
    pub fn conditions(&self) -> Box<dyn Iterator<Item = &RawCondition> + Send + '_> {
        match self {
            RawFilter::Condition(c) => Box::new(std::iter::once(c)),
            RawFilter::Group { items, .. } => Box::new(items.iter().flat_map(|i| i.conditions())),
        }
    }
}

/// Every condition of a list of filters.
pub fn conditions(filters: &[RawFilter]) -> impl Iterator<Item = &RawCondition> {
    filters.iter().flat_map(RawFilter::conditions)
}

/// Why a filter was rejected; the message names the column and value.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// Not `op.value`, or an unknown operator.
    #[error("Filter {column}={expr:?}: {reason}")]
    Syntax {
        /// Column (or logic key) as written.
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
    /// The operator cannot be evaluated on live events exactly as SQL evaluates it.
    #[error(
        "Operator {op} on column {column:?} ({sql_type}) cannot be evaluated on live events exactly as PostgreSQL does; use it with REST, not in a subscription"
    )]
    NotLive {
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

/// How big a filter may be (see [`crate::config::Limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterLimits {
    /// Most conditions, counted through logic trees.
    pub max_conditions: usize,
    /// Most values in an `in` list (or an `(any)`/`(all)` list).
    pub max_in_values: usize,
    /// Longest pattern, in characters.
    pub max_pattern_length: usize,
    /// Most wildcards in a pattern.
    pub max_pattern_wildcards: usize,
}

impl FilterLimits {
    /// Refuses a filter past a limit, naming the limit.
    pub fn check(&self, filters: &[RawFilter]) -> Result<(), FilterError> {
        if conditions(filters).count() > self.max_conditions {
            return Err(FilterError::TooLarge(format!(
                "a filter may have at most {} conditions",
                self.max_conditions
            )));
        }
        for c in conditions(filters) {
            if c.values.len() > self.max_in_values {
                return Err(FilterError::TooLarge(format!(
                    "an in list may have at most {} values (column {:?})",
                    self.max_in_values, c.column
                )));
            }
            if matches!(c.op, Operator::Like | Operator::Ilike) {
                for pattern in &c.values {
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

/// SQL's `any` over three-valued results: true if one is true, else unknown if one is
/// unknown, else false (so false for none). `all` is its dual.
fn quantify(all: bool, results: impl Iterator<Item = Option<bool>>) -> Option<bool> {
    let mut unknown = false;
    for r in results {
        match r {
            Some(b) if b != all => return Some(b),
            None => unknown = true,
            Some(_) => {}
        }
    }
    if unknown { None } else { Some(all) }
}

/// One typed condition.
#[derive(Debug, Clone)]
struct Condition {
    column: Column,
    op: Operator,
    negated: bool,
    quantifier: Option<Quantifier>,
    language: Option<String>,
    /// Values as SQL binds them: as PostgreSQL rendered them for comparisons on columns Rust
    /// compares (so both sides see the same value), as written otherwise.
    sql_values: Vec<String>,
    /// Comparable keys of the values (comparisons Rust evaluates).
    keys: Vec<Key>,
    /// Compiled patterns (`like`, `ilike`).
    patterns: Vec<Pattern>,
}

impl Condition {
    /// Whether Rust evaluates this condition as SQL does.
    fn live(&self) -> bool {
        self.op.live(self.column.kind)
    }

    /// Evaluates on a field of a row in JSON text (only scalars are parsed: other types are
    /// only tested for NULL).
    fn eval_raw(&self, raw: Option<&RawValue>) -> Option<bool> {
        let value = match raw {
            None => Value::Null,
            Some(raw) if is_null(raw) => Value::Null,
            // Any non-null stand-in: `is.null`/`is.not_null` are all Rust evaluates on these.
            Some(_) if !self.column.kind.compared_in_rust() => Value::Bool(true),
            Some(raw) => match serde_json::from_str(raw.get()) {
                Ok(value) => value,
                Err(_) => return None,
            },
        };
        self.eval(&value)
    }

    /// The condition's truth on a value: `None` is SQL's unknown (NULL).
    fn eval(&self, value: &Value) -> Option<bool> {
        let result = self.eval_plain(value);
        if self.negated {
            result.map(|b| !b)
        } else {
            result
        }
    }

    fn eval_plain(&self, value: &Value) -> Option<bool> {
        use Operator::*;
        let all = self.quantifier == Some(Quantifier::All);
        match self.op {
            IsNull | IsUnknown => Some(value.is_null()),
            IsNotNull => Some(!value.is_null()),
            IsTrue => Some(value == &Value::Bool(true)),
            IsFalse => Some(value == &Value::Bool(false)),
            Like | Ilike => {
                let text = match value {
                    // `char(n)::text` drops the padding, as the SQL side does before matching.
                    Value::String(s) if self.column.kind == Kind::PaddedText => {
                        Some(s.trim_end_matches(' '))
                    }
                    Value::String(s) => Some(s.as_str()),
                    _ => None,
                };
                quantify(
                    all,
                    self.patterns.iter().map(|p| text.map(|t| p.matches(t))),
                )
            }
            IsDistinct if self.live() => match key_of(self.column.kind, value) {
                None if value.is_null() => Some(true),
                None => None,
                Some(key) => Some(key.cmp(&self.keys[0]) != Ordering::Equal),
            },
            op if op.compares() && self.live() => {
                let key = key_of(self.column.kind, value);
                let holds = |k: &Key| {
                    let ordering = key.as_ref()?.cmp(k);
                    Some(match op {
                        Eq | In => ordering == Ordering::Equal,
                        Neq => ordering != Ordering::Equal,
                        Lt => ordering == Ordering::Less,
                        Lte => ordering != Ordering::Greater,
                        Gt => ordering == Ordering::Greater,
                        _ => ordering != Ordering::Less,
                    })
                };
                // `in` is `= any`; a plain comparison has one key.
                quantify(all, self.keys.iter().map(holds))
            }
            // SQL only: never reached for a live filter (see `Filter::check_live`); unknown
            // matches nothing either way.
            _ => None,
        }
    }

    fn to_sql(
        &self,
        params: &mut Vec<Box<dyn ToSql + Sync + Send>>,
        alias: Option<&str>,
    ) -> String {
        let sql = self.plain_sql(params, alias);
        if self.negated {
            format!("not ({sql})")
        } else {
            sql
        }
    }

    fn plain_sql(
        &self,
        params: &mut Vec<Box<dyn ToSql + Sync + Send>>,
        alias: Option<&str>,
    ) -> String {
        use Operator::*;
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
        let first = || self.sql_values.first().cloned().unwrap_or_default();
        match self.op {
            IsNull => format!("{column} is null"),
            IsNotNull => format!("{column} is not null"),
            IsTrue => format!("{column} is true"),
            IsFalse => format!("{column} is false"),
            IsUnknown => format!("{column} is unknown"),
            Like | Ilike | Match | Imatch => {
                let symbol = self.op.symbol();
                let target = format!("{column}::text collate \"C\"");
                match self.quantifier {
                    None => format!("{target} {symbol} {}::text", bind(Box::new(first()))),
                    Some(q) => format!(
                        "{target} {symbol} {}({}::text[])",
                        quantifier_sql(q),
                        bind(Box::new(self.sql_values.clone()))
                    ),
                }
            }
            Fts | Plfts | Phfts | Wfts => {
                let language = self
                    .language
                    .clone()
                    .map(|l| format!("{}::text::regconfig, ", bind(Box::new(l))));
                let language = language.unwrap_or_default();
                let document = if kind == Kind::TsVector {
                    column
                } else {
                    format!("to_tsvector({language}{column}::text)")
                };
                format!(
                    "{document} @@ {}({language}{}::text)",
                    self.op.symbol(),
                    bind(Box::new(first()))
                )
            }
            IsDistinct => {
                let p = bind(Box::new(first()));
                match kind {
                    Kind::Text => format!("{column}{code_points} is distinct from {p}::text"),
                    Kind::PaddedText => format!("{column} is distinct from ({p}::text)::bpchar"),
                    _ => format!("{column} is distinct from ({p}::text)::{sql_type}"),
                }
            }
            Cs | Cd | Ov | Sl | Sr | Nxr | Nxl | Adj => format!(
                "{column} {} ({}::text)::{sql_type}",
                self.op.symbol(),
                bind(Box::new(first()))
            ),
            op => {
                let symbol = op.symbol();
                let equality = matches!(op, Eq | Neq | In);
                let quantifier = match (op, self.quantifier) {
                    (In, _) => Some(Quantifier::Any),
                    (_, q) => q,
                };
                let Some(q) = quantifier else {
                    let p = bind(Box::new(first()));
                    return match (kind, equality) {
                        // Equality needs no collation (and can use the column's index),
                        // unless the column's collation calls different strings equal.
                        (Kind::Text, true) => format!("{column}{code_points} {symbol} {p}::text"),
                        // Ordering in code point order, as in Rust.
                        (Kind::Text, false) => format!("{column} collate \"C\" {symbol} {p}::text"),
                        (Kind::PaddedText, true) => {
                            format!("{column} {symbol} ({p}::text)::bpchar")
                        }
                        (Kind::PaddedText, false) => {
                            format!("rtrim({column}::text) collate \"C\" {symbol} rtrim({p}::text)")
                        }
                        _ => format!("{column} {symbol} ({p}::text)::{sql_type}"),
                    };
                };
                let q = quantifier_sql(q);
                match (kind, equality) {
                    (Kind::Text, true) => format!(
                        "{column}{code_points} {symbol} {q}({}::text[])",
                        bind(Box::new(self.sql_values.clone()))
                    ),
                    (Kind::Text, false) => format!(
                        "{column} collate \"C\" {symbol} {q}({}::text[])",
                        bind(Box::new(self.sql_values.clone()))
                    ),
                    (Kind::PaddedText, true) => format!(
                        "{column} {symbol} {q}(({}::text[])::bpchar[])",
                        bind(Box::new(self.sql_values.clone()))
                    ),
                    (Kind::PaddedText, false) => {
                        let trimmed: Vec<String> = self
                            .sql_values
                            .iter()
                            .map(|v| v.trim_end_matches(' ').to_owned())
                            .collect();
                        format!(
                            "rtrim({column}::text) collate \"C\" {symbol} {q}({}::text[])",
                            bind(Box::new(trimmed))
                        )
                    }
                    _ => format!(
                        "{column} {symbol} {q}(({}::text[])::{sql_type}[])",
                        bind(Box::new(self.sql_values.clone()))
                    ),
                }
            }
        }
    }
}

fn quantifier_sql(q: Quantifier) -> &'static str {
    match q {
        Quantifier::Any => "any",
        Quantifier::All => "all",
    }
}

/// A typed filter node.
#[derive(Debug, Clone)]
enum Node {
    Leaf(Condition),
    Group {
        or: bool,
        negated: bool,
        nodes: Vec<Node>,
    },
}

impl Node {
    fn eval(&self, leaf: &dyn Fn(&Condition) -> Option<bool>) -> Option<bool> {
        match self {
            Node::Leaf(c) => leaf(c),
            Node::Group { or, negated, nodes } => {
                let result = quantify(!*or, nodes.iter().map(|n| n.eval(leaf)));
                if *negated { result.map(|b| !b) } else { result }
            }
        }
    }

    fn to_sql(
        &self,
        params: &mut Vec<Box<dyn ToSql + Sync + Send>>,
        alias: Option<&str>,
    ) -> String {
        match self {
            Node::Leaf(c) => c.to_sql(params, alias),
            Node::Group { or, negated, nodes } => {
                let parts: Vec<String> = nodes
                    .iter()
                    .map(|n| format!("({})", n.to_sql(params, alias)))
                    .collect();
                let joined = parts.join(if *or { " or " } else { " and " });
                if *negated {
                    format!("not ({joined})")
                } else {
                    joined
                }
            }
        }
    }

    fn leaves<'a>(&'a self, out: &mut Vec<&'a Condition>) {
        match self {
            Node::Leaf(c) => out.push(c),
            Node::Group { nodes, .. } => nodes.iter().for_each(|n| n.leaves(out)),
        }
    }
}

/// Conditions and logic trees ANDed together; empty matches every row.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    nodes: Vec<Node>,
}

impl Filter {
    /// Whether the filter has no condition.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn leaves(&self) -> Vec<&Condition> {
        let mut out = Vec::new();
        self.nodes.iter().for_each(|n| n.leaves(&mut out));
        out
    }

    fn eval(&self, leaf: &dyn Fn(&Condition) -> Option<bool>) -> bool {
        self.nodes.iter().all(|n| n.eval(leaf) == Some(true))
    }

    /// Whether a row (as `to_json` renders it, parsed) passes the filter.
    pub fn matches(&self, row: &Value) -> bool {
        self.eval(&|c: &Condition| c.eval(row.get(&c.column.name).unwrap_or(&Value::Null)))
    }

    /// Whether a row in JSON text, split into fields, passes the filter.
    pub fn matches_fields(&self, row: &Fields<'_>) -> bool {
        self.eval(&|c: &Condition| c.eval_raw(row.get(&c.column.name)))
    }

    /// Whether a row in JSON text passes the filter (false if it is not an object).
    pub fn matches_text(&self, row: &str) -> bool {
        Fields::parse(row).is_ok_and(|fields| self.matches_fields(&fields))
    }

    /// The columns the filter names.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.leaves().into_iter().map(|c| c.column.name.as_str())
    }

    /// Refuses a filter that Rust cannot evaluate exactly as SQL does (for live events).
    pub fn check_live(&self) -> Result<(), FilterError> {
        match self.leaves().into_iter().find(|c| !c.live()) {
            None => Ok(()),
            Some(c) => Err(FilterError::NotLive {
                op: c.op.name(),
                column: c.column.name.clone(),
                sql_type: c.column.sql_type.clone(),
            }),
        }
    }

    /// The top-level parts from `at` on, taken out of `self` (to compile two filters with one
    /// query and then part them).
    pub fn split_off(&mut self, at: usize) -> Filter {
        Filter {
            nodes: self.nodes.split_off(at.min(self.nodes.len())),
        }
    }

    /// Both filters at once.
    pub fn and(mut self, other: Filter) -> Filter {
        self.nodes.extend(other.nodes);
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
        if self.nodes.is_empty() {
            return "true".to_owned();
        }
        let parts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("({})", n.to_sql(params, alias)))
            .collect();
        parts.join(" and ")
    }
}

/// Types the filters against the table's columns, letting PostgreSQL convert each value to
/// the column's type exactly as the SQL will.
pub async fn compile(
    client: &tokio_postgres::Client,
    columns: &[Column],
    raw: Vec<RawFilter>,
) -> Result<Filter, FilterError> {
    // The database renders every condition's values first (one query each), then the tree
    // is built without it.
    let mut rendered = Vec::new();
    let written: Vec<&RawCondition> = conditions(&raw).collect();
    for cond in written {
        let column = checked_column(columns, cond)?;
        if takes_values(cond.op) && !cond.values.is_empty() {
            rendered.push(render_values(client, &column, &cond.values).await?);
        } else {
            rendered.push(Vec::new());
        }
    }
    let mut rendered = rendered.into_iter();
    compile_rendered(columns, raw, |_, _| Ok(rendered.next().unwrap_or_default()))
}

/// [`compile`] with `render` standing in for PostgreSQL's `to_json(value::type)` (called for
/// every condition in written order; fuzzing uses it to run everything but the database's
/// conversion).
pub(crate) fn compile_rendered(
    columns: &[Column],
    raw: Vec<RawFilter>,
    mut render: impl FnMut(&Column, &[String]) -> Result<Vec<Value>, FilterError>,
) -> Result<Filter, FilterError> {
    type Render<'r> = dyn FnMut(&Column, &[String]) -> Result<Vec<Value>, FilterError> + 'r;
    fn build(
        columns: &[Column],
        raw: RawFilter,
        render: &mut Render<'_>,
    ) -> Result<Node, FilterError> {
        match raw {
            RawFilter::Condition(cond) => {
                let column = checked_column(columns, &cond)?;
                let rendered = if takes_values(cond.op) && !cond.values.is_empty() {
                    render(&column, &cond.values)?
                } else {
                    render(&column, &[])?;
                    Vec::new()
                };
                typed(column, cond, &rendered).map(Node::Leaf)
            }
            RawFilter::Group { or, negated, items } => Ok(Node::Group {
                or,
                negated,
                nodes: items
                    .into_iter()
                    .map(|i| build(columns, i, render))
                    .collect::<Result<_, _>>()?,
            }),
        }
    }
    let nodes = raw
        .into_iter()
        .map(|r| build(columns, r, &mut render))
        .collect::<Result<_, _>>()?;
    Ok(Filter { nodes })
}

/// Whether an operator's values are converted to the column's type (patterns, text search
/// queries stay text).
fn takes_values(op: Operator) -> bool {
    use Operator::*;
    !op.is_test() && !op.is_fts() && !matches!(op, Like | Ilike | Match | Imatch)
}

/// The condition's column, if the table has it and the operator applies to its type.
fn checked_column(columns: &[Column], cond: &RawCondition) -> Result<Column, FilterError> {
    let column = columns
        .iter()
        .find(|c| c.name == cond.column)
        .ok_or_else(|| FilterError::UnknownColumn(cond.column.clone()))?
        .clone();
    let quantified_on_list = (cond.quantifier.is_some() || cond.op == Operator::In)
        && !matches!(column.kind, Kind::Text | Kind::PaddedText)
        && !column.kind.compared_in_rust();
    if !cond.op.allowed_on(column.kind) || quantified_on_list {
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
    let mut condition = Condition {
        op: cond.op,
        negated: cond.negated,
        quantifier: cond.quantifier,
        language: cond.language,
        sql_values: Vec::new(),
        keys: Vec::new(),
        patterns: Vec::new(),
        column,
    };
    match cond.op {
        Operator::Like | Operator::Ilike => {
            let fold = cond.op == Operator::Ilike;
            for value in &cond.values {
                condition
                    .patterns
                    .push(Pattern::new(value, fold).ok_or_else(|| {
                        FilterError::TooLarge(format!(
                            "the pattern for column {:?} is too complex",
                            cond.column
                        ))
                    })?);
            }
            condition.sql_values = cond.values;
        }
        op if takes_values(op) && condition.live() => {
            if rendered.len() != cond.values.len() {
                return Err(FilterError::BadValue {
                    column: condition.column.name.clone(),
                    value: cond.values.join(","),
                    sql_type: condition.column.sql_type.clone(),
                });
            }
            for (value, raw_value) in rendered.iter().zip(&cond.values) {
                let bad = || FilterError::BadValue {
                    column: condition.column.name.clone(),
                    value: raw_value.clone(),
                    sql_type: condition.column.sql_type.clone(),
                };
                condition
                    .keys
                    .push(key_of(condition.column.kind, value).ok_or_else(bad)?);
                condition.sql_values.push(match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            }
        }
        _ => condition.sql_values = cond.values,
    }
    Ok(condition)
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

    fn column(name: &str, sql_type: &str, kind: Kind) -> Column {
        Column {
            name: name.into(),
            sql_type: sql_type.into(),
            kind,
            nondeterministic: false,
        }
    }

    fn columns() -> Vec<Column> {
        vec![
            column("price", "numeric", Kind::Number),
            column("tenant", "integer", Kind::Number),
            column("name", "text", Kind::Text),
            column("code", "character", Kind::PaddedText),
            column("ok", "boolean", Kind::Bool),
            column("tags", "text[]", Kind::Array),
            column("doc", "tsvector", Kind::TsVector),
        ]
    }

    /// Compiles `key=value` pairs, rendering values as `to_json` would for these columns.
    fn compile_pairs(pairs: &[(&str, &str)]) -> Filter {
        let raw = pairs
            .iter()
            .map(|(k, v)| parse_pair(k, v).unwrap_or_else(|e| panic!("{k}={v}: {e}")))
            .collect();
        compile_rendered(&columns(), raw, |column, values| {
            Ok(values
                .iter()
                .map(|v| match column.kind {
                    Kind::Number => serde_json::from_str(v).unwrap(),
                    _ => Value::String(v.clone()),
                })
                .collect())
        })
        .unwrap()
    }

    #[test]
    fn filters_compose_with_and_in_rust_and_in_sql() {
        // How a caller-bound filter (e.g. tenant_id from a token) joins a subscription's own.
        let own = compile_pairs(&[("price", "gt.10")]);
        let bound = compile_pairs(&[("tenant", "eq.42")]);
        let both = own.and(bound);
        assert!(both.matches(&json!({"price": 11, "tenant": 42})));
        assert!(!both.matches(&json!({"price": 11, "tenant": 7})));
        assert!(!both.matches(&json!({"price": 9, "tenant": 42})));
        let mut params = Vec::new();
        assert_eq!(
            both.to_sql(&mut params),
            r#"("price" > ($1::text)::numeric) and ("tenant" = ($2::text)::integer)"#
        );
        assert_eq!(params.len(), 2);
        assert_eq!(Filter::default().to_sql(&mut Vec::new()), "true");
    }

    #[test]
    fn char_columns_ignore_padding_like_postgres() {
        let f = compile_pairs(&[("code", "eq.US")]);
        assert!(f.matches(&json!({"code": "US  "})));
        assert!(!f.matches(&json!({"code": "U   "})));
    }

    #[test]
    fn null_matches_no_comparison_and_operators_respect_types() {
        let f = compile_pairs(&[("price", "neq.5")]);
        assert!(f.matches(&json!({"price": 6})));
        assert!(!f.matches(&json!({"price": 5})));
        assert!(
            !f.matches(&json!({"price": null})),
            "NULL <> 5 is not true in SQL"
        );
        assert!(Operator::Like.allowed_on(Kind::Text));
        assert!(!Operator::Like.allowed_on(Kind::Number));
        assert!(!Operator::Lt.allowed_on(Kind::EqualityOnly));
        assert!(Operator::IsNull.allowed_on(Kind::Other));
        assert!(Operator::Cs.allowed_on(Kind::Array) && !Operator::Cs.allowed_on(Kind::Text));
    }

    #[test]
    fn logic_is_three_valued_as_in_sql() {
        let not_gt = compile_pairs(&[("price", "not.gt.10")]);
        assert!(not_gt.matches(&json!({"price": 5})));
        assert!(!not_gt.matches(&json!({"price": 50})));
        assert!(
            !not_gt.matches(&json!({"price": null})),
            "not (NULL > 10) is unknown"
        );
        let or = compile_pairs(&[("or", "(price.gt.10,name.eq.a)")]);
        assert!(
            or.matches(&json!({"price": null, "name": "a"})),
            "unknown or true"
        );
        assert!(
            !or.matches(&json!({"price": null, "name": "b"})),
            "unknown or false"
        );
        let not_or = compile_pairs(&[("not.or", "(price.gt.10,name.eq.a)")]);
        assert!(!not_or.matches(&json!({"price": null, "name": "b"})));
        assert!(not_or.matches(&json!({"price": 1, "name": "b"})));
        let nested = compile_pairs(&[(
            "or",
            "(ok.is.true,and(price.gte.1,price.lte.2),name.in.(x,y))",
        )]);
        assert!(nested.matches(&json!({"ok": true})));
        assert!(nested.matches(&json!({"ok": false, "price": 1.5})));
        assert!(nested.matches(&json!({"ok": null, "name": "y"})));
        assert!(!nested.matches(&json!({"ok": false, "price": 3, "name": "z"})));
        let empty_in = compile_pairs(&[("price", "not.in.()")]);
        assert!(
            empty_in.matches(&json!({"price": null})),
            "not (x = any('{{}}')) is true"
        );
        let distinct = compile_pairs(&[("price", "isdistinct.5")]);
        assert!(distinct.matches(&json!({"price": null})));
        assert!(!distinct.matches(&json!({"price": 5})));
        let any = compile_pairs(&[("name", "like(any).{a*,*z}")]);
        assert!(any.matches(&json!({"name": "abc"})) && any.matches(&json!({"name": "xyz"})));
        assert!(!any.matches(&json!({"name": "m"})));
        let all = compile_pairs(&[("price", "gt(all).{1,2}")]);
        assert!(all.matches(&json!({"price": 3})) && !all.matches(&json!({"price": 2})));
        let mut params = Vec::new();
        assert_eq!(
            nested.to_sql(&mut params),
            r#"(("ok" is true) or (("price" >= ($1::text)::numeric) and ("price" <= ($2::text)::numeric)) or ("name" = any($3::text[])))"#
        );
        let mut params = Vec::new();
        assert_eq!(
            not_or.to_sql(&mut params),
            r#"(not (("price" > ($1::text)::numeric) or ("name" = $2::text)))"#
        );
    }

    #[test]
    fn sql_only_operators_are_refused_live() {
        for (key, value) in [
            ("name", "match.^a"),
            ("name", "fts(english).cat"),
            ("doc", "wfts.cat dog"),
            ("tags", "cs.{a}"),
            ("tags", "eq.{a}"),
            ("or", "(price.eq.1,name.imatch.x)"),
        ] {
            let f = compile_pairs(&[(key, value)]);
            assert!(
                matches!(f.check_live(), Err(FilterError::NotLive { .. })),
                "{key}={value}"
            );
            let mut params = Vec::new();
            let _ = f.to_sql(&mut params);
        }
        let f = compile_pairs(&[("name", "fts(english).cat")]);
        let mut params = Vec::new();
        assert_eq!(
            f.to_sql(&mut params),
            r#"(to_tsvector($1::text::regconfig, "name"::text) @@ to_tsquery($1::text::regconfig, $2::text))"#
        );
        for ok in [
            ("name", "ilike.*x*"),
            ("ok", "is.unknown"),
            ("tags", "is.not_null"),
        ] {
            assert!(compile_pairs(&[ok]).check_live().is_ok(), "{ok:?}");
        }
    }
}
