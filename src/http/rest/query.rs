//! What a PostgREST request asks for, read from its query string and headers: `select`,
//! `order`, `limit`/`offset` and `Range`, filters and logic trees, `on_conflict`, `columns`,
//! `Prefer` and `Accept`. Pure parsing: the catalog is consulted by the handlers.

use warp::http::StatusCode;

use super::super::ApiError;
use super::error::{bad_range, parse_error};
use crate::filter::{self, RawFilter};

/// One item of `select`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selected {
    /// `*`: every column the caller sees.
    Star,
    /// `alias:column::type`.
    Column {
        /// The column.
        column: String,
        /// The key it is shown under (the column's name without an alias).
        alias: Option<String>,
        /// A type to cast to, as written (checked against the catalog before use).
        cast: Option<String>,
    },
}

/// Why `select` was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SelectError {
    /// Does not parse.
    Syntax(String),
    /// `other(*)`: resource embedding, named.
    Embedding(String),
    /// `count()`, `col.sum()`.
    Aggregate,
}

/// Parses `select` (PostgREST's syntax: `*`, `col`, `alias:col`, `col::type`, and the
/// embedding and aggregate forms, which are recognised to be refused clearly).
pub fn parse_select(value: &str) -> Result<Vec<Selected>, SelectError> {
    let mut out = Vec::new();
    for item in split_top_level(value).map_err(SelectError::Syntax)? {
        let item = item.trim();
        if item.is_empty() {
            if value.trim().is_empty() {
                continue;
            }
            return Err(SelectError::Syntax("an empty item".into()));
        }
        if let Some(open) = item.find('(') {
            let head = &item[..open];
            if head.ends_with("count")
                || head.ends_with(".sum")
                || head.ends_with(".avg")
                || head.ends_with(".min")
                || head.ends_with(".max")
                || head.ends_with(".count")
            {
                return Err(SelectError::Aggregate);
            }
            let name = head.trim_start_matches("...");
            let name = name.rsplit_once(':').map_or(name, |(_, n)| n);
            let name = name.split('!').next().unwrap_or(name);
            return Err(SelectError::Embedding(name.trim().to_owned()));
        }
        if item == "*" {
            out.push(Selected::Star);
            continue;
        }
        let (alias, rest) = split_alias(item);
        let (field, cast) = match rest.split_once("::") {
            Some((field, cast)) => (field, Some(cast.trim())),
            None => (rest, None),
        };
        if let Some(cast) = cast
            && (cast.is_empty()
                || !cast
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '_' | ' ' | '$')))
        {
            return Err(SelectError::Syntax(format!("{cast:?} is not a type name")));
        }
        let column = field_name(field.trim()).map_err(SelectError::Syntax)?;
        if let Some(alias) = alias
            && alias.is_empty()
        {
            return Err(SelectError::Syntax("an empty alias".into()));
        }
        out.push(Selected::Column {
            column,
            alias: alias.map(str::to_owned),
            cast: cast.map(str::to_owned),
        });
    }
    Ok(out)
}

/// `alias:rest` (a `::` cast is not an alias separator).
fn split_alias(item: &str) -> (Option<&str>, &str) {
    let bytes = item.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'"' {
            // Skip a quoted name.
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += 1;
            }
        } else if bytes[i] == b':' {
            if bytes.get(i + 1) == Some(&b':') {
                return (None, item);
            }
            return (Some(item[..i].trim().trim_matches('"')), &item[i + 1..]);
        }
        i += 1;
    }
    (None, item)
}

/// A field name: `name` or `"quoted name"`; JSON paths (`->`, `->>`) are refused.
fn field_name(field: &str) -> Result<String, String> {
    if let Some(inner) = field.strip_prefix('"').and_then(|f| f.strip_suffix('"')) {
        return Ok(inner.replace("\\\"", "\""));
    }
    if field.contains("->") {
        return Err("JSON paths (->, ->>) are not supported by pgrelay".into());
    }
    if field.is_empty() || field.contains(['"', '(', ')', ',']) {
        return Err(format!("{field:?} is not a column name"));
    }
    Ok(field.to_owned())
}

/// Splits on commas outside parentheses and double quotes.
fn split_top_level(value: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth = depth.checked_sub(1).ok_or("a ) without its (".to_owned())?;
            }
            ',' if !quoted && depth == 0 => {
                items.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 || quoted {
        return Err("unbalanced parentheses or quotes".into());
    }
    items.push(&value[start..]);
    Ok(items)
}

/// A comma list of column names (`columns=`, `on_conflict=`; names may be double-quoted,
/// as postgrest-js sends them).
pub fn parse_columns(what: &str, value: &str) -> Result<Vec<String>, ApiError> {
    let items = split_top_level(value).map_err(|e| parse_error(what, value, e))?;
    items
        .into_iter()
        .map(|item| {
            let item = item.trim();
            let name = match item.strip_prefix('"').and_then(|i| i.strip_suffix('"')) {
                Some(inner) => inner.to_owned(),
                None => item.to_owned(),
            };
            if name.is_empty() {
                Err(parse_error(what, value, "an empty column name"))
            } else {
                Ok(name)
            }
        })
        .collect()
}

/// One sort key of `order=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderBy {
    /// The column.
    pub column: String,
    /// `desc`.
    pub descending: bool,
    /// `Some(true)` for `nullsfirst`, `Some(false)` for `nullslast`.
    pub nulls_first: Option<bool>,
}

/// `col`, `col.asc`, `col.desc`, each optionally followed by `.nullsfirst`/`.nullslast`,
/// separated by commas.
pub fn parse_order(value: &str) -> Result<Vec<OrderBy>, ApiError> {
    let bad = |details: &str| parse_error("order", value, details);
    let mut out = Vec::new();
    for item in value.split(',') {
        let item = item.trim();
        if item.contains('(') {
            return Err(bad("ordering by an embedded resource is not supported"));
        }
        let (column, modifiers) = match item.strip_prefix('"') {
            Some(quoted) => {
                let (name, rest) = quoted
                    .split_once('"')
                    .ok_or_else(|| bad("an unterminated quote"))?;
                (name, rest)
            }
            None => item.split_at(item.find('.').unwrap_or(item.len())),
        };
        if column.is_empty() {
            return Err(bad(
                "expected col.asc or col.desc, e.g. order=price.desc,id",
            ));
        }
        if column.contains("->") {
            return Err(bad("JSON paths (->, ->>) are not supported by pgrelay"));
        }
        let mut order = OrderBy {
            column: column.to_owned(),
            descending: false,
            nulls_first: None,
        };
        let mut direction_seen = false;
        for modifier in modifiers.split('.').skip(1) {
            match modifier {
                "asc" | "desc" if !direction_seen && order.nulls_first.is_none() => {
                    order.descending = modifier == "desc";
                    direction_seen = true;
                }
                "nullsfirst" | "nullslast" if order.nulls_first.is_none() => {
                    order.nulls_first = Some(modifier == "nullsfirst");
                }
                _ => return Err(bad("expected asc, desc, nullsfirst or nullslast")),
            }
        }
        if !modifiers.is_empty() && !modifiers.starts_with('.') {
            return Err(bad("expected . after the column"));
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
        .ok_or_else(|| parse_error(key, value, "expected a non-negative integer"))
}

/// A request's query string.
#[derive(Debug, Default, Clone)]
pub struct Query {
    /// `select`, if given.
    pub select: Option<Vec<Selected>>,
    /// `order`.
    pub order: Vec<OrderBy>,
    /// `limit`.
    pub limit: Option<i64>,
    /// `offset`.
    pub offset: Option<i64>,
    /// Filters and logic trees, ANDed.
    pub filters: Vec<RawFilter>,
    /// `on_conflict` (upserts).
    pub on_conflict: Option<Vec<String>>,
    /// `columns` (inserts).
    pub columns: Option<Vec<String>>,
}

/// Why a query string was refused before the catalog was asked.
#[derive(Debug)]
pub enum QueryError {
    /// Rendered as is.
    Api(ApiError),
    /// `select` refused.
    Select(SelectError, String),
    /// `rel.col=…`, `rel.order=…`: a parameter for an embedded resource.
    NotEmbedded(String),
}

impl From<ApiError> for QueryError {
    fn from(err: ApiError) -> Self {
        QueryError::Api(err)
    }
}

impl Query {
    /// Reads the pairs of a query string.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<Query, QueryError> {
        let mut query = Query::default();
        for (key, value) in pairs {
            match key.as_str() {
                "select" => {
                    query.select = Some(
                        parse_select(value).map_err(|e| QueryError::Select(e, value.clone()))?,
                    );
                }
                "order" => query.order = parse_order(value)?,
                "limit" => query.limit = Some(parse_count(key, value)?),
                "offset" => query.offset = Some(parse_count(key, value)?),
                "on_conflict" => query.on_conflict = Some(parse_columns(key, value)?),
                "columns" => query.columns = Some(parse_columns(key, value)?),
                key if filter::is_logic_key(key) => query.filters.push(
                    filter::parse_pair(key, value)
                        .map_err(|e| parse_error("logic tree", value, e.to_string()))?,
                ),
                key if key.contains('.') => {
                    let resource = key.split('.').next().unwrap_or(key);
                    return Err(QueryError::NotEmbedded(resource.to_owned()));
                }
                column => {
                    if column.contains("->") {
                        return Err(parse_error(
                            "filter",
                            &format!("{column}={value}"),
                            "JSON paths (->, ->>) are not supported by pgrelay",
                        )
                        .into());
                    }
                    query.filters.push(
                        filter::parse_pair(column, value)
                            .map_err(|e| parse_error("filter", value, e.to_string()))?,
                    );
                }
            }
        }
        Ok(query)
    }

    /// Every column `select`, `order` and the filters name.
    pub fn read_columns(&self) -> Vec<&String> {
        let mut out: Vec<&String> = self
            .select
            .iter()
            .flatten()
            .filter_map(|s| match s {
                Selected::Column { column, .. } => Some(column),
                Selected::Star => None,
            })
            .collect();
        out.extend(self.order.iter().map(|o| &o.column));
        out.extend(filter::conditions(&self.filters).map(|c| &c.column));
        out
    }
}

/// `Prefer: return=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Return {
    /// No body (PostgREST's default for writes).
    Minimal,
    /// No body, `Location` for a single insert.
    HeadersOnly,
    /// The rows.
    Representation,
}

/// `Prefer: count=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// `count(*)`.
    Exact,
    /// The planner's estimate.
    Planned,
    /// Exact while the estimate is small, else the estimate.
    Estimated,
}

/// `Prefer: resolution=…` (upserts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// `on conflict do update`.
    MergeDuplicates,
    /// `on conflict do nothing`.
    IgnoreDuplicates,
}

/// The `Prefer` headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prefer {
    /// `return=`.
    pub ret: Option<Return>,
    /// `count=`.
    pub count: Option<Count>,
    /// `resolution=`.
    pub resolution: Option<Resolution>,
    /// `missing=default`: columns an object leaves out get their default.
    pub missing_default: bool,
    /// `max-affected=` (with `handling=strict`).
    pub max_affected: Option<i64>,
    /// `handling=strict`: unknown preferences are an error.
    pub strict: bool,
    /// What was understood, for `Preference-Applied`.
    pub applied: Vec<String>,
}

impl Prefer {
    /// Parses every `Prefer` header (comma-separated preferences; unknown ones are ignored
    /// unless `handling=strict`, as PostgREST does).
    pub fn parse<'a>(headers: impl IntoIterator<Item = &'a str>) -> Result<Prefer, ApiError> {
        let mut prefer = Prefer::default();
        let mut unknown = Vec::new();
        for header in headers {
            for token in header.split([',', ';']) {
                let token = token.trim();
                if token.is_empty() {
                    continue;
                }
                let mut applied = true;
                match token {
                    "return=minimal" => prefer.ret = Some(Return::Minimal),
                    "return=headers-only" => prefer.ret = Some(Return::HeadersOnly),
                    "return=representation" => prefer.ret = Some(Return::Representation),
                    "count=exact" => prefer.count = Some(Count::Exact),
                    "count=planned" => prefer.count = Some(Count::Planned),
                    "count=estimated" => prefer.count = Some(Count::Estimated),
                    "resolution=merge-duplicates" => {
                        prefer.resolution = Some(Resolution::MergeDuplicates);
                    }
                    "resolution=ignore-duplicates" => {
                        prefer.resolution = Some(Resolution::IgnoreDuplicates);
                    }
                    "missing=default" => prefer.missing_default = true,
                    "missing=null" => prefer.missing_default = false,
                    "handling=strict" => prefer.strict = true,
                    "handling=lenient" => prefer.strict = false,
                    other => {
                        applied = false;
                        match other.strip_prefix("max-affected=") {
                            Some(n) => match n.parse::<i64>() {
                                Ok(n) if n >= 0 => {
                                    prefer.max_affected = Some(n);
                                    applied = true;
                                }
                                _ => unknown.push(other.to_owned()),
                            },
                            // tx=, timezone=, params=: not honoured (as PostgREST without
                            // the settings that enable them).
                            None => unknown.push(other.to_owned()),
                        }
                    }
                }
                if applied && !prefer.applied.iter().any(|a| a == token) {
                    prefer.applied.push(token.to_owned());
                }
            }
        }
        if prefer.strict && !unknown.is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "PGRST122",
                "Invalid preferences given with handling=strict",
            )
            .with_details(format!("Invalid preferences: {}", unknown.join(", "))));
        }
        if !prefer.strict {
            prefer.max_affected = None;
            prefer.applied.retain(|a| !a.starts_with("max-affected="));
        }
        Ok(prefer)
    }
}

/// What the response body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    /// A JSON array.
    Json,
    /// `application/vnd.pgrst.object+json`: exactly one row, as an object.
    Object,
    /// `text/csv`.
    Csv,
}

impl Media {
    /// The first media type of `Accept` the relay serves (`application/json` without one).
    pub fn negotiate(accept: Option<&str>) -> Result<Media, ApiError> {
        let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
            return Ok(Media::Json);
        };
        for item in accept.split(',') {
            let essence = item
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            match essence.as_str() {
                "application/json"
                | "*/*"
                | "application/*"
                | "application/vnd.pgrst.array+json" => {
                    return Ok(Media::Json);
                }
                "application/vnd.pgrst.object+json" | "application/vnd.pgrst.object" => {
                    return Ok(Media::Object);
                }
                "text/csv" | "text/*" => return Ok(Media::Csv),
                _ => {}
            }
        }
        Err(super::error::not_acceptable(accept))
    }

    /// The `Content-Type` of a body of this type.
    pub fn content_type(self) -> &'static str {
        match self {
            Media::Json => "application/json; charset=utf-8",
            Media::Object => "application/vnd.pgrst.object+json; charset=utf-8",
            Media::Csv => "text/csv; charset=utf-8",
        }
    }
}

/// The rows a read serves: from `lower`, at most `upper - lower + 1` (none for `upper`
/// below `lower`, which only `limit=0` asks for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First row (offset).
    pub lower: i64,
    /// Last row, if bounded.
    pub upper: Option<i64>,
    /// `max_rows` lowered `upper`.
    pub capped: bool,
}

impl Range {
    /// The range of `offset`/`limit` and a `Range: 0-9` header, as PostgREST intersects
    /// them, then capped at `max_rows`; 416 for an empty one (other than `limit=0`).
    pub fn new(
        query: &Query,
        header: Option<&str>,
        max_rows: Option<i64>,
    ) -> Result<Range, ApiError> {
        let offset = query.offset.unwrap_or(0);
        let mut lower = offset;
        let mut upper = query.limit.map(|l| offset.saturating_add(l) - 1);
        if query.limit == Some(0) {
            return Ok(Range {
                lower: 0,
                upper: Some(-1),
                capped: false,
            });
        }
        if let Some((from, to)) = header.and_then(parse_range_header) {
            lower = lower.max(from);
            upper = match (upper, to) {
                (Some(u), Some(t)) => Some(u.min(t)),
                (u, t) => u.or(t),
            };
        }
        if upper.is_some_and(|u| u < lower) {
            return Err(bad_range(
                "The lower boundary must be lower than or equal to the upper boundary in the Range header.",
            ));
        }
        let mut capped = false;
        if let Some(max) = max_rows {
            let cap = lower.saturating_add(max) - 1;
            if upper.is_none_or(|u| u > cap) {
                upper = Some(cap);
                capped = true;
            }
        }
        Ok(Range {
            lower,
            upper,
            capped,
        })
    }

    /// SQL's `limit`: `None` for all rows.
    pub fn limit(&self) -> Option<i64> {
        self.upper
            .map(|u| u.saturating_sub(self.lower).saturating_add(1).max(0))
    }
}

/// `0-9` or `10-` (PostgREST's `^([0-9]+)-([0-9]*)$`; anything else is ignored).
fn parse_range_header(value: &str) -> Option<(i64, Option<i64>)> {
    let value = value.trim();
    let value = value.strip_prefix("items=").unwrap_or(value);
    let (from, to) = value.split_once('-')?;
    if from.is_empty() || !from.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !to.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let from = from.parse().ok()?;
    let to = if to.is_empty() {
        None
    } else {
        Some(to.parse().ok()?)
    };
    Some((from, to))
}

/// `Content-Range` as PostgREST writes it: `lower-upper/total`, `*` for an empty range or
/// an unknown total.
pub fn content_range(lower: i64, returned: usize, total: Option<i64>) -> String {
    let upper = lower + returned as i64 - 1;
    let range = if total != Some(0) && lower <= upper {
        format!("{lower}-{upper}")
    } else {
        "*".to_owned()
    };
    let total = total.map_or("*".to_owned(), |t| t.to_string());
    format!("{range}/{total}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn select_reads_aliases_casts_and_refuses_embedding() {
        let s = parse_select("*,label:name,price::text,p:price::numeric,\"odd name\"").unwrap();
        assert_eq!(s[0], Selected::Star);
        assert_eq!(
            s[1],
            Selected::Column {
                column: "name".into(),
                alias: Some("label".into()),
                cast: None
            }
        );
        assert_eq!(
            s[3],
            Selected::Column {
                column: "price".into(),
                alias: Some("p".into()),
                cast: Some("numeric".into())
            }
        );
        assert!(matches!(&s[4], Selected::Column { column, .. } if column == "odd name"));
        assert_eq!(
            parse_select("*,orders(*)"),
            Err(SelectError::Embedding("orders".into()))
        );
        assert_eq!(
            parse_select("id,o:orders!fk(id)"),
            Err(SelectError::Embedding("orders".into()))
        );
        assert_eq!(parse_select("count()"), Err(SelectError::Aggregate));
        assert_eq!(parse_select("price.sum()"), Err(SelectError::Aggregate));
        for bad in ["a,,b", "a::", "a::text;drop", "data->x", "a)"] {
            assert!(parse_select(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn order_accepts_directions_and_nulls() {
        let o = parse_order("price.desc,id,name.asc.nullsfirst").unwrap();
        assert_eq!(o.len(), 3);
        assert!(o[0].descending && o[0].column == "price");
        assert!(!o[1].descending && o[1].nulls_first.is_none());
        assert_eq!(o[2].nulls_first, Some(true));
        for bad in [
            "",
            "price.up",
            "price.desc.asc",
            ",id",
            "a.nullslast.desc",
            "rel(x).asc",
        ] {
            assert!(parse_order(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges_intersect_and_cap_as_postgrest() {
        let q = |p: &[(&str, &str)]| Query::from_pairs(&pairs(p)).unwrap();
        let r = Range::new(&q(&[]), None, None).unwrap();
        assert_eq!((r.lower, r.limit(), r.capped), (0, None, false));
        let r = Range::new(&q(&[("limit", "10"), ("offset", "5")]), None, None).unwrap();
        assert_eq!((r.lower, r.upper), (5, Some(14)));
        let r = Range::new(&q(&[]), Some("0-9"), None).unwrap();
        assert_eq!((r.lower, r.limit()), (0, Some(10)));
        let r = Range::new(&q(&[("limit", "5")]), Some("2-"), None).unwrap();
        assert_eq!((r.lower, r.upper), (2, Some(4)));
        let r = Range::new(&q(&[]), None, Some(100)).unwrap();
        assert_eq!((r.limit(), r.capped), (Some(100), true));
        let r = Range::new(&q(&[("limit", "0")]), None, None).unwrap();
        assert_eq!(r.limit(), Some(0));
        let err = Range::new(&q(&[]), Some("5-2"), None).unwrap_err();
        assert_eq!((err.status.as_u16(), &*err.code), (416, "PGRST103"));
        assert_eq!(content_range(0, 10, None), "0-9/*");
        assert_eq!(content_range(0, 10, Some(25)), "0-9/25");
        assert_eq!(content_range(30, 0, Some(25)), "*/25");
        assert_eq!(content_range(0, 0, Some(0)), "*/0");
    }

    #[test]
    fn prefer_and_accept_are_read_as_postgrest() {
        let p = Prefer::parse([
            "return=representation, count=exact",
            "resolution=merge-duplicates",
        ])
        .unwrap();
        assert_eq!(p.ret, Some(Return::Representation));
        assert_eq!(p.count, Some(Count::Exact));
        assert_eq!(p.resolution, Some(Resolution::MergeDuplicates));
        assert!(Prefer::parse(["tx=rollback"]).is_ok());
        let err = Prefer::parse(["handling=strict, tx=rollback"]).unwrap_err();
        assert_eq!(&*err.code, "PGRST122");
        let p = Prefer::parse(["handling=strict", "max-affected=2"]).unwrap();
        assert_eq!(p.max_affected, Some(2));
        assert_eq!(Media::negotiate(None).unwrap(), Media::Json);
        assert_eq!(
            Media::negotiate(Some("application/vnd.pgrst.object+json;nulls=stripped")).unwrap(),
            Media::Object
        );
        assert_eq!(
            Media::negotiate(Some("text/xml, text/csv")).unwrap(),
            Media::Csv
        );
        assert_eq!(
            &*Media::negotiate(Some("text/xml")).unwrap_err().code,
            "PGRST107"
        );
    }

    #[test]
    fn query_keys_are_sorted_into_their_parts() {
        let q = Query::from_pairs(&pairs(&[
            ("select", "id,name"),
            ("price", "gt.10"),
            ("or", "(a.eq.1,b.eq.2)"),
            ("columns", "\"name\",\"price\""),
            ("on_conflict", "name"),
        ]))
        .unwrap();
        assert_eq!(q.filters.len(), 2);
        assert_eq!(q.columns, Some(vec!["name".to_owned(), "price".to_owned()]));
        assert_eq!(q.read_columns().len(), 5);
        assert!(matches!(
            Query::from_pairs(&pairs(&[("orders.id", "eq.1")])),
            Err(QueryError::NotEmbedded(r)) if r == "orders"
        ));
        for bad in [
            ("limit", "-1"),
            ("offset", "x"),
            ("price", "gt"),
            ("select", "a,,b"),
        ] {
            assert!(Query::from_pairs(&pairs(&[bad])).is_err(), "{bad:?}");
        }
    }
}
