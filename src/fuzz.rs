//! Fuzzing entry points: one function per `cargo fuzz` target (`fuzz/fuzz_targets/`), each
//! taking raw bytes and running them through the parsing code the server runs, then asserting
//! what must hold whatever the input: no panic, SQL built only from quoted catalog identifiers
//! and `$n` placeholders, errors that echo the input at most a bounded number of times, frames
//! that read back as written.
//!
//! Not part of the API: the targets, and a unit test that replays `fuzz/corpus/*/*` through
//! these functions in `cargo test`, are its only callers.

use percent_encoding::percent_decode_str;
use serde_json::Value;
use warp::http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{Limits, TableName};
use crate::event::{ChangeParts, FrameParts, Op, change_frame, control};
use crate::filter::{self, Column, Filter, FilterError, Kind};
use crate::http::rest::plan_request;
use crate::http::ws::{ClientMessage, auth_token, check_upgrade, read_message, take_token};
use crate::row::{Fields, changed_columns, project};
use crate::sql::{TableInfo, TableKind};
use crate::subscription::{Params, Shape};

/// Inputs longer than this are skipped: every parser here is linear or bounded by the
/// server's own limits (64 KiB frames, 1 MiB bodies), and long inputs only slow fuzzing down.
const MAX_INPUT: usize = 64 * 1024;

/// A WebSocket text message from a client (`{"type":"subscribe",…}`, `auth`, `ping`, …): read
/// as the socket reads it, a subscribe's keys parsed, its filter typed and rendered to SQL.
pub fn client_message(data: &[u8]) {
    // A text frame that is not UTF-8 is refused by tungstenite (close 1007) before pgrelay.
    let Some(text) = input_text(data) else {
        return;
    };
    match read_message(text) {
        ClientMessage::Ping | ClientMessage::NotJson => {}
        ClientMessage::Bad(message) => check_error(&message, text.len()),
        ClientMessage::Auth(value) => {
            let _ = auth_token(&value);
        }
        ClientMessage::Unsubscribe(value) => {
            let _ = value.get("resource").and_then(Value::as_str);
        }
        ClientMessage::Subscribe(value) => match Params::from_message(&value) {
            Err(message) => check_error(&message, text.len()),
            Ok(params) => {
                // On /ws/{table} a subscribe message's keys replace the socket's own.
                let socket = Params::from_pairs(&[
                    ("price".to_owned(), "gt.1".to_owned()),
                    ("select".to_owned(), "name".to_owned()),
                ])
                .unwrap_or_default();
                let merged = socket.overridden_by(params.clone());
                assert!(params.filters.is_empty() || merged.filters == params.filters);
                assert_eq!(
                    (merged.since, merged.snapshot),
                    (params.since, params.snapshot)
                );
                subscription(&items(), &params, &[], text.len());
            }
        },
    }
}

/// Filters and `select`: `key=value` lines, as a query string's pairs after decoding
/// (`price=gt.10`, `name=in.("a,b",c)`, `select=id,name`, `events=…`); a line starting with
/// `{` is a row (JSON text as `to_json` renders it) every filter is evaluated on.
pub fn filter(data: &[u8]) {
    let Some(text) = input_text(data) else {
        return;
    };
    let mut pairs = Vec::new();
    let mut rows = Vec::new();
    for line in text.split('\n') {
        if line.starts_with('{') {
            rows.push(line);
        } else if let Some((key, value)) = line.split_once('=') {
            pairs.push((key.to_owned(), value.to_owned()));
        }
    }
    match Params::from_pairs(&pairs) {
        Err(message) => check_error(&message, text.len()),
        Ok(params) => {
            for table in [items(), lines()] {
                subscription(&table, &params, &rows, text.len());
            }
        }
    }
}

/// A log chunk body as capture reads it from `pgrelay.changes` (`[[seq, op, seq2, data, old],
/// …]`): the first line names the table's key columns (comma separated; `-` for none), the
/// rest is the body. Every change decoded must make a frame that is JSON and reads back as
/// written.
pub fn log_body(data: &[u8]) {
    let Some(text) = input_text(data) else {
        return;
    };
    let (keys, body) = text.split_once('\n').unwrap_or(("id", text));
    let keys = (keys != "-").then(|| keys.split(',').map(str::to_owned).collect::<Vec<_>>());
    let changes = match crate::capture::poll::decode_body(body, keys.clone()) {
        Ok(changes) => changes,
        Err(message) => return check_error(&message, body.len()),
    };
    for (seq, op, id, data, old) in changes.into_iter().flatten() {
        assert!(
            serde_json::from_str::<&serde_json::value::RawValue>(&id).is_ok(),
            "a key is JSON: {id}"
        );
        // As the hub encodes a change (`hub::encode_change`).
        let changed = match (op, old, data) {
            (Op::Update, Some(old), Some(new)) => {
                match (Fields::parse(old.get()), Fields::parse(new.get())) {
                    (Ok(old), Ok(new)) => Some(changed_columns(&old, &new)),
                    _ => Some(Vec::new()),
                }
            }
            (Op::Update, _, _) => Some(Vec::new()),
            _ => None,
        };
        let ts = "2026-01-01T00:00:00+00:00";
        let frame = change_frame(&ChangeParts {
            op,
            resource: r#""items""#,
            id: &id,
            data: data.map(|d| d.get()),
            old: old.map(|o| o.get()),
            changed: changed.as_deref(),
            seq,
            ts,
        });
        let parts = FrameParts::parse(&frame).unwrap_or_else(|| panic!("frame reads: {frame}"));
        assert_eq!(
            (parts.seq, parts.id.get(), parts.ts),
            (seq, id.as_str(), ts)
        );
        let text_of = |v: Option<&serde_json::value::RawValue>| v.map(|v| v.get().to_owned());
        if op != Op::Delete {
            assert_eq!(text_of(parts.data), text_of(data));
        }
        if op != Op::Create {
            assert_eq!(text_of(parts.old), text_of(old));
        }
        // A projection (`select`, key-only deletes) keeps only the columns asked for.
        if let (Some(keys), Some(row)) = (&keys, data.or(old))
            && let Ok(fields) = Fields::parse(row.get())
        {
            let projected = project(&fields, keys);
            let projected = Fields::parse(&projected)
                .unwrap_or_else(|err| panic!("projection reads: {err}: {projected}"));
            assert!(
                projected
                    .iter()
                    .all(|(name, _)| keys.iter().any(|k| k == name))
            );
        }
    }
}

/// A REST request: the first line is `METHOD /api/{table}[/{id}][?query]` (as on the wire:
/// path segments and query percent-encoded), the rest is the body. The tables are `items`
/// (key `id`) and `shop.lines` (key `order_id, line_no`).
pub fn rest_request(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (head, body) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let Ok(head) = std::str::from_utf8(head) else {
        return;
    };
    let Some((method, target)) = head.split_once(' ') else {
        return;
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let Some(path) = path.strip_prefix("/api/") else {
        return;
    };
    let (resource, id) = match path.split_once('/') {
        Some((_, id)) if id.contains('/') => return,
        Some((resource, id)) => (resource, Some(id)),
        None => (path, None),
    };
    // `Scope::new`: path segments arrive percent-encoded.
    let decoded = percent_decode_str(resource).decode_utf8_lossy();
    let Some(table) = [items(), lines()]
        .into_iter()
        .find(|t| t.resource == decoded)
    else {
        return;
    };
    // What `warp::query` does with the query string.
    let Ok(pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(query) else {
        return;
    };
    let max_rows = Limits::for_pool(16).max_rows;
    match plan_request(
        &table,
        method,
        id,
        &pairs,
        body,
        max_rows,
        |columns, raw| filter::compile_rendered(columns, raw, render),
    ) {
        Ok(statements) => {
            for (sql, bound) in statements {
                check_sql(&sql, bound, &table);
            }
        }
        Err(err) => {
            assert!(
                err.status.is_client_error(),
                "{}: {}",
                err.status,
                err.message
            );
            check_error(&err.message, data.len());
        }
    }
}

/// A WebSocket opening handshake: the first line is the request target (`/ws/items?…` or
/// `/ws?…`), the others `name: value` headers. The handshake is checked as RFC 6455 asks and
/// the query's subscription keys parsed as for `GET /ws/{table}`.
pub fn ws_handshake(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let mut lines = data.split(|b| *b == b'\n');
    let target = lines.next().unwrap_or_default();
    let mut headers = HeaderMap::new();
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    match check_upgrade(&headers) {
        Ok(key) => {
            let mut keys = headers.get_all("sec-websocket-key").iter();
            assert!(keys.next().is_some_and(|k| k == key) && keys.next().is_none());
            let nonce = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, key);
            assert_eq!(nonce.map(|n| n.len()).ok(), Some(16), "{key:?}");
            let mut versions = headers.get_all("sec-websocket-version").iter();
            assert!(versions.next().is_some_and(|v| v == "13") && versions.next().is_none());
            assert!(headers.contains_key("host"));
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            assert_eq!(accept.len(), 28);
        }
        Err(err) => assert!(
            matches!(err.status.as_u16(), 400 | 426),
            "{}: {}",
            err.status,
            err.message
        ),
    }
    // The query of `/ws/{table}?…`, as the route reads it before the upgrade.
    let Ok(target) = std::str::from_utf8(target) else {
        return;
    };
    let query = target.split_once('?').map_or("", |(_, q)| q);
    if let Ok(pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(query) {
        let (pairs, _token) = take_token(pairs);
        match Params::from_pairs(&pairs) {
            Ok(params) => subscription(&items(), &params, &[], target.len()),
            Err(message) => check_error(&message, target.len()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared checks

/// The input as text, unless it is not UTF-8 or longer than [`MAX_INPUT`].
fn input_text(data: &[u8]) -> Option<&str> {
    (data.len() <= MAX_INPUT)
        .then(|| std::str::from_utf8(data).ok())
        .flatten()
}

/// A subscription's keys checked against `table` as the socket does (limits, filter typing,
/// shape); its SQL must be bound and quoted, and rows must evaluate and project.
fn subscription(table: &TableInfo, params: &Params, rows: &[&str], input: usize) {
    if let Err(err) = Limits::for_pool(16).filter().check(&params.filters) {
        return check_error(&err.to_string(), input);
    }
    let compiled = filter::compile_rendered(&table.columns, params.filters.clone(), render);
    // A subscription refuses what Rust cannot evaluate exactly (as the socket does).
    let filter = match compiled.and_then(|f| f.check_live().map(|()| f)) {
        Ok(filter) => filter,
        Err(err) => return check_error(&err.to_string(), input),
    };
    let mut bound = Vec::new();
    let sql = filter.to_sql(&mut bound);
    check_sql(&sql, bound.len(), table);
    let mut bound = Vec::new();
    let sql = filter.to_sql_qualified("t", &mut bound);
    check_sql(&sql, bound.len(), table);
    let shape = match Shape::new(table, params, filter.clone(), Filter::default(), None) {
        Ok(shape) => shape,
        Err(err) => return check_error(&err.to_string(), input),
    };
    let mut bound = Vec::new();
    let sql = shape.to_sql(&mut bound);
    check_sql(&sql, bound.len(), table);
    for row in rows {
        let matched = filter.matches_text(row);
        // The tree evaluation agrees with the text one on a row PostgreSQL could render
        // (an object without repeated keys).
        if let Ok(Value::Object(object)) = serde_json::from_str::<Value>(row)
            && Fields::parse(row).is_ok_and(|f| f.iter().count() == object.len())
        {
            assert_eq!(filter.matches(&Value::Object(object)), matched, "row {row}");
        }
        let projected = shape.project_text(row);
        if Fields::parse(row).is_ok()
            && let Some(select) = &params.select
        {
            let fields = Fields::parse(&projected)
                .unwrap_or_else(|err| panic!("projection reads: {err}: {projected}"));
            for (name, _) in fields.iter() {
                assert!(
                    select.iter().any(|s| s == name) || table.key_columns.iter().any(|k| k == name),
                    "{name:?} is neither selected nor a key"
                );
            }
        }
    }
}

/// Stands in for PostgreSQL's `to_json(value::type)` of a filter value: accepts what the type's
/// input function accepts (near enough) and renders it as `to_json` would. Time values are
/// passed through as text, so that the relay's own parsing of them is what is fuzzed.
fn render(column: &Column, values: &[String]) -> Result<Vec<Value>, FilterError> {
    values
        .iter()
        .map(|value| {
            render_one(column.kind, value).ok_or_else(|| FilterError::BadValue {
                column: column.name.clone(),
                value: value.clone(),
                sql_type: column.sql_type.clone(),
            })
        })
        .collect()
}

fn render_one(kind: Kind, value: &str) -> Option<Value> {
    if value.contains('\0') {
        // No PostgreSQL text value holds NUL.
        return None;
    }
    Some(match kind {
        Kind::Number => match value.trim() {
            special @ ("NaN" | "Infinity" | "-Infinity") => Value::String(special.to_owned()),
            number => {
                // numeric's range: at most 1000 as an exponent, 131072 + 16383 digits.
                let exponent = number
                    .split_once(['e', 'E'])
                    .map_or(Some(0), |(_, e)| e.parse::<i64>().ok())?;
                if exponent.abs() > 1000 || number.len() > 1000 {
                    return None;
                }
                let parsed: Value = serde_json::from_str(number).ok()?;
                parsed.is_number().then_some(parsed)?
            }
        },
        Kind::Bool => match value.trim().to_ascii_lowercase().as_str() {
            "t" | "true" | "y" | "yes" | "on" | "1" => Value::Bool(true),
            "f" | "false" | "n" | "no" | "off" | "0" => Value::Bool(false),
            _ => return None,
        },
        _ => Value::String(value.to_owned()),
    })
}

/// Whether `sql` names only the table's identifiers (quoted) and binds values only as `$1` to
/// `$bound`: nothing of the input outside a quoted catalog name, no literal, no comment, no
/// second statement.
fn check_sql(sql: &str, bound: usize, table: &TableInfo) {
    let known = |name: &str| {
        // `"C"` is the collation, `"t"` the alias of qualified filters.
        name == "C"
            || name == "t"
            || name == table.name.schema
            || name == table.name.table
            || table.columns.iter().any(|c| c.name == name)
    };
    let mut chars = sql.chars().peekable();
    let mut outside = String::new();
    while let Some(c) = chars.next() {
        if c == '"' {
            let mut name = String::new();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        name.push('"');
                    }
                    Some('"') => break,
                    Some(c) => name.push(c),
                    None => panic!("unterminated identifier in {sql}"),
                }
            }
            assert!(known(&name), "unknown identifier {name:?} in {sql}");
            outside.push_str("\"\"");
        } else if c == '$' {
            let mut digits = String::new();
            while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                digits.push(*d);
                chars.next();
            }
            let n: usize = digits
                .parse()
                .unwrap_or_else(|_| panic!("$ without a number in {sql}"));
            assert!((1..=bound).contains(&n), "${n} of {bound} in {sql}");
        } else {
            outside.push(c);
        }
    }
    for bad in ["'", ";", "--", "/*", "\\"] {
        assert!(
            !outside.contains(bad),
            "{bad:?} outside identifiers in {sql}"
        );
    }
    assert!(
        outside
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " _.,()=<>:*[]\"@&|~-".contains(c)),
        "unexpected text outside identifiers in {sql}"
    );
}

/// An error message sent to the client: valid in a JSON `error` message, and echoing the
/// input at most about once (`{:?}` escapes a byte into at most 6).
fn check_error(message: &str, input: usize) {
    assert!(
        message.len() <= 6 * input + 512,
        "a {input}-byte input made a {}-byte error: {message}",
        message.len()
    );
    let frame = control::error("bad_request", message);
    assert!(serde_json::from_str::<Value>(&frame).is_ok());
}

/// `public.items`: one of each kind of column, and a name that needs quoting.
fn items() -> TableInfo {
    table(
        "items",
        &["id"],
        &[
            ("id", "integer", Kind::Number),
            ("name", "text", Kind::Text),
            ("price", "numeric", Kind::Number),
            ("active", "boolean", Kind::Bool),
            ("at", "timestamp with time zone", Kind::TimestampTz),
            ("local", "timestamp without time zone", Kind::Timestamp),
            ("day", "date", Kind::Date),
            ("clock", "time without time zone", Kind::Time),
            ("code", "character(3)", Kind::PaddedText),
            ("mood", "mood", Kind::EqualityOnly),
            ("uid", "uuid", Kind::Uuid),
            ("doc", "jsonb", Kind::Other),
            ("we\"ird name", "text", Kind::Text),
        ],
    )
}

/// `shop.lines`: a composite key.
fn lines() -> TableInfo {
    table(
        "shop.lines",
        &["order_id", "line_no"],
        &[
            ("order_id", "bigint", Kind::Number),
            ("line_no", "integer", Kind::Number),
            ("note", "text", Kind::Text),
        ],
    )
}

fn table(name: &str, keys: &[&str], columns: &[(&str, &str, Kind)]) -> TableInfo {
    let name = TableName::parse(name).unwrap_or_else(|err| panic!("a test table name: {err}"));
    TableInfo {
        relid: 1,
        kind: TableKind::Plain,
        resource: name.resource(),
        name,
        key_columns: keys.iter().map(|k| (*k).to_owned()).collect(),
        columns: columns
            .iter()
            .map(|(name, sql_type, kind)| Column {
                name: (*name).to_owned(),
                sql_type: (*sql_type).to_owned(),
                kind: *kind,
                nondeterministic: *kind == Kind::Text && name.contains(' '),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target's entry point.
    type Target = fn(&[u8]);

    /// Every target's entry point, by its `fuzz/fuzz_targets/` name.
    const TARGETS: &[(&str, Target)] = &[
        ("client_message", client_message),
        ("filter", filter),
        ("log_body", log_body),
        ("rest_request", rest_request),
        ("ws_handshake", ws_handshake),
    ];

    #[test]
    fn every_fuzz_corpus_input_passes_its_target() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let mut replayed = 0;
        for (name, target) in TARGETS {
            let dir = corpus.join(name);
            let entries =
                std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
            for entry in entries {
                let path = entry.unwrap().path();
                let input = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| target(&input));
                assert!(outcome.is_ok(), "{} fails {name}", path.display());
                replayed += 1;
            }
        }
        assert!(replayed >= TARGETS.len(), "the corpus has seeds");
        for entry in std::fs::read_dir(&corpus).unwrap() {
            let name = entry.unwrap().file_name();
            assert!(
                TARGETS.iter().any(|(t, _)| *t == name),
                "fuzz/corpus/{name:?} has no target here"
            );
        }
    }

    #[test]
    fn sql_checks_catch_what_they_are_for() {
        let t = items();
        check_sql(
            r#"("price" > ($1::text)::numeric) and "name" collate "C" = $2"#,
            2,
            &t,
        );
        for bad in [
            r#""nope" = $1"#,
            r#""price" = $3"#,
            r#""price" = '1'"#,
            r#""price" = 1; drop table x"#,
            r#""price"#,
        ] {
            let outcome = std::panic::catch_unwind(|| check_sql(bad, 2, &t));
            assert!(outcome.is_err(), "{bad}");
        }
    }
}
