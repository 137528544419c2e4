//! The filter grammar, PostgREST's: `column=[not.]op[(any|all)|(lang)].value` pairs, and
//! logic trees `or=(a.eq.1,and(b.gt.2,not.c.is.null))` (also `and=`, `not.or=`, `not.and=`).
//!
//! Values are taken as text here; the catalog and PostgreSQL type them in [`super::compile`].
//! A tree nests at most [`MAX_DEPTH`] levels, so a hostile query cannot exhaust the stack.

use super::{FilterError, Operator, Quantifier, RawCondition, RawFilter};

/// Deepest nesting of `and(…)`/`or(…)` groups.
pub const MAX_DEPTH: usize = 16;

/// Whether a query key is a logic tree (`or`, `and`, `not.or`, `not.and`) rather than a column.
pub fn is_logic_key(key: &str) -> bool {
    matches!(key, "or" | "and" | "not.or" | "not.and")
}

/// Parses one query pair: a logic tree for the keys of [`is_logic_key`], else a condition on
/// the column `key`.
pub fn parse_pair(key: &str, value: &str) -> Result<RawFilter, FilterError> {
    if is_logic_key(key) {
        parse_logic(key, value)
    } else {
        parse(key, value).map(RawFilter::Condition)
    }
}

/// Parses one `column=op.value` pair (the value is the rest of the text, as PostgREST reads a
/// top-level filter).
pub fn parse(column: &str, expr: &str) -> Result<RawCondition, FilterError> {
    let syntax = |reason: &str| FilterError::Syntax {
        column: column.to_owned(),
        expr: expr.to_owned(),
        reason: reason.to_owned(),
    };
    if column.is_empty() {
        return Err(syntax("a filter needs a column name"));
    }
    let (negated, rest) = match expr.strip_prefix("not.") {
        Some(rest) => (true, rest),
        None => (false, expr),
    };
    let (head, value) = rest
        .split_once('.')
        .ok_or_else(|| syntax("expected op.value, e.g. eq.10"))?;
    let (op, modifier) = split_modifier(head).ok_or_else(|| syntax("bad operator modifier"))?;
    condition(column, negated, op, modifier, value).map_err(|reason| syntax(&reason))
}

/// `op` or `op(modifier)`.
fn split_modifier(head: &str) -> Option<(&str, Option<&str>)> {
    match head.find('(') {
        None => Some((head, None)),
        Some(open) => {
            let inner = head[open + 1..].strip_suffix(')')?;
            Some((&head[..open], Some(inner)))
        }
    }
}

/// A condition from its parts; `value` is the value's text as delimited by the grammar
/// (`(a,b)` for `in`, `{a,b}` for a quantifier, unquoted in a logic tree).
fn condition(
    column: &str,
    negated: bool,
    op_name: &str,
    modifier: Option<&str>,
    value: &str,
) -> Result<RawCondition, String> {
    use Operator::*;
    let mut quantifier = None;
    let mut language = None;
    let op = match op_name {
        "eq" => Eq,
        "neq" => Neq,
        "lt" => Lt,
        "lte" => Lte,
        "gt" => Gt,
        "gte" => Gte,
        "like" => Like,
        "ilike" => Ilike,
        "match" => Match,
        "imatch" => Imatch,
        "in" => In,
        "is" => match value.to_ascii_lowercase().as_str() {
            "null" => IsNull,
            "not_null" => IsNotNull,
            "true" => IsTrue,
            "false" => IsFalse,
            "unknown" => IsUnknown,
            _ => return Err("is takes null, not_null, true, false or unknown".into()),
        },
        "isdistinct" => IsDistinct,
        "fts" => Fts,
        "plfts" => Plfts,
        "phfts" => Phfts,
        "wfts" => Wfts,
        "cs" => Cs,
        "cd" => Cd,
        "ov" => Ov,
        "sl" => Sl,
        "sr" => Sr,
        "nxr" => Nxr,
        "nxl" => Nxl,
        "adj" => Adj,
        _ => {
            return Err(
                "unknown operator (eq, neq, gt, gte, lt, lte, like, ilike, match, \
                 imatch, in, is, isdistinct, fts, plfts, phfts, wfts, cs, cd, ov, sl, sr, nxr, \
                 nxl, adj)"
                    .into(),
            );
        }
    };
    if let Some(modifier) = modifier {
        if op.is_fts() {
            if modifier.is_empty()
                || !modifier
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err("a text search configuration is a name, e.g. fts(english)".into());
            }
            language = Some(modifier.to_owned());
        } else if op.takes_quantifier() {
            quantifier = Some(match modifier {
                "any" => Quantifier::Any,
                "all" => Quantifier::All,
                _ => return Err("the modifier of an operator is (any) or (all)".into()),
            });
        } else {
            return Err(format!("{op_name} takes no modifier"));
        }
    }
    let star = |v: &str| {
        if matches!(op, Like | Ilike) {
            v.replace('*', "%")
        } else {
            v.to_owned()
        }
    };
    let values = if op.is_test() {
        Vec::new()
    } else if op == In {
        let inner = value
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or("in takes a list: in.(a,b)")?;
        if inner.is_empty() {
            Vec::new()
        } else {
            split_list(inner)?
        }
    } else if quantifier.is_some() {
        let inner = value
            .strip_prefix('{')
            .and_then(|v| v.strip_suffix('}'))
            .ok_or("(any) and (all) take a list: eq(any).{a,b}")?;
        if inner.is_empty() {
            Vec::new()
        } else {
            split_list(inner)?.iter().map(|v| star(v)).collect()
        }
    } else {
        vec![star(value)]
    };
    if matches!(op, Like | Ilike) && values.iter().any(|v| dangling_escape(v)) {
        // PostgreSQL refuses such a pattern when it runs; refused here, it is refused the
        // same way everywhere (subscribe, initial data, REST).
        return Err(
            "a like pattern must not end with the escape character \\ (write \\\\ for a backslash)"
                .into(),
        );
    }
    Ok(RawCondition {
        column: column.to_owned(),
        op,
        negated,
        quantifier,
        language,
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
pub(super) fn split_list(inner: &str) -> Result<Vec<String>, &'static str> {
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

/// Parses `or=(…)`, `and=(…)`, `not.or=(…)`, `not.and=(…)`.
fn parse_logic(key: &str, value: &str) -> Result<RawFilter, FilterError> {
    let mut parser = Tree {
        text: value,
        pos: 0,
    };
    let negated = key.starts_with("not.");
    let or = key.ends_with("or");
    let result = parser.group_items(1).and_then(|items| {
        parser.skip_spaces();
        if parser.pos < parser.text.len() {
            Err(parser.error("text after the closing parenthesis"))
        } else {
            Ok(RawFilter::Group { or, negated, items })
        }
    });
    result.map_err(|reason| FilterError::Syntax {
        column: key.to_owned(),
        expr: value.to_owned(),
        reason,
    })
}

/// A logic tree being read.
struct Tree<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Tree<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn error(&self, what: &str) -> String {
        format!("{what} at character {}", self.pos + 1)
    }

    fn skip_spaces(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, prefix: &str) -> bool {
        if self.rest().starts_with(prefix) {
            self.pos += prefix.len();
            true
        } else {
            false
        }
    }

    fn consume(&mut self, c: char) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            Ok(())
        } else {
            Err(self.error(&format!("expected {c:?}")))
        }
    }

    /// `(item,item,…)`.
    fn group_items(&mut self, depth: usize) -> Result<Vec<RawFilter>, String> {
        if depth > MAX_DEPTH {
            return Err(format!("logic trees nest at most {MAX_DEPTH} levels"));
        }
        self.skip_spaces();
        self.consume('(')?;
        let mut items = Vec::new();
        loop {
            self.skip_spaces();
            items.push(self.item(depth)?);
            self.skip_spaces();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(')') => {
                    self.pos += 1;
                    return Ok(items);
                }
                _ => return Err(self.error("expected , or )")),
            }
        }
    }

    /// `and(…)`, `or(…)`, `not.and(…)`, `not.or(…)`, or `column.[not.]op.value`.
    fn item(&mut self, depth: usize) -> Result<RawFilter, String> {
        for (prefix, or, negated) in [
            ("not.and(", false, true),
            ("not.or(", true, true),
            ("and(", false, false),
            ("or(", true, false),
        ] {
            if self.rest().starts_with(prefix) {
                // Leave the parenthesis for `group_items`.
                self.pos += prefix.len() - 1;
                let items = self.group_items(depth + 1)?;
                return Ok(RawFilter::Group { or, negated, items });
            }
        }
        let column = if self.peek() == Some('"') {
            self.quoted()?
        } else {
            self.until(|c| matches!(c, '.' | ',' | '(' | ')'))
                .trim()
                .to_owned()
        };
        if column.is_empty() {
            return Err(self.error("expected a column name, and( or or("));
        }
        self.consume('.')?;
        let negated = self.eat("not.");
        let op = self.until(|c| !c.is_ascii_alphabetic()).to_owned();
        let modifier = if self.peek() == Some('(') {
            self.pos += 1;
            let inner = self.until(|c| c == ')').to_owned();
            self.consume(')')?;
            Some(inner)
        } else {
            None
        };
        self.consume('.')?;
        let value = match op.as_str() {
            "in" => self.list()?,
            "is" => self.until(|c| matches!(c, ',' | ')')).to_owned(),
            _ => match self.peek() {
                Some('"') => {
                    let value = self.quoted()?;
                    if !matches!(self.peek(), Some(',' | ')')) {
                        return Err(self.error("expected , or ) after a quoted value"));
                    }
                    value
                }
                Some('{') => {
                    let inner = self.until(|c| c == '}').to_owned();
                    self.consume('}')?;
                    format!("{inner}}}")
                }
                _ => self.until(|c| matches!(c, ',' | ')')).to_owned(),
            },
        };
        condition(&column, negated, &op, modifier.as_deref(), &value)
            .map(RawFilter::Condition)
            .map_err(|reason| format!("{column}.{op}: {reason}"))
    }

    /// Text up to (not including) the first character for which `stop` holds.
    fn until(&mut self, stop: impl Fn(char) -> bool) -> &'a str {
        let rest = self.rest();
        let end = rest.find(stop).unwrap_or(rest.len());
        self.pos += end;
        &rest[..end]
    }

    /// `"…"` with `\` escaping the next character; returns the text inside.
    fn quoted(&mut self) -> Result<String, String> {
        self.consume('"')?;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, escaped)) => out.push(escaped),
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(self.error("unterminated quote"))
    }

    /// `(a,"b,c")` as written (quotes kept: [`split_list`] reads them).
    fn list(&mut self) -> Result<String, String> {
        let start = self.pos;
        self.consume('(')?;
        loop {
            if self.peek() == Some('"') {
                self.quoted()?;
            } else {
                self.until(|c| matches!(c, ',' | ')'));
            }
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(')') => {
                    self.pos += 1;
                    return Ok(self.text[start..self.pos].to_owned());
                }
                _ => return Err(self.error("unterminated list")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_operator() {
        let p = |e: &str| parse("c", e).unwrap();
        assert_eq!(p("eq.10").op, Operator::Eq);
        assert_eq!(p("eq.a.b").values, vec!["a.b"]);
        assert_eq!(p("like.*ab*").values, vec!["%ab%"]);
        assert_eq!(p(r"like.ab\\").values, vec![r"ab\\"]);
        assert_eq!(p("is.null").op, Operator::IsNull);
        assert_eq!(p("is.NOT_NULL").op, Operator::IsNotNull);
        assert_eq!(p("is.unknown").op, Operator::IsUnknown);
        assert_eq!(p("in.(1,2,3)").values, vec!["1", "2", "3"]);
        assert_eq!(p(r#"in.("a,b",c,"d\"e")"#).values, vec!["a,b", "c", "d\"e"]);
        assert!(p("in.()").values.is_empty(), "an empty list, as PostgREST");
        let n = p("not.in.(1)");
        assert!(n.negated && n.op == Operator::In);
        let q = p("like(any).{a*,b*}");
        assert_eq!(
            (q.quantifier, q.values),
            (Some(Quantifier::Any), vec!["a%".into(), "b%".into()])
        );
        assert_eq!(p("gt(all).{1,2}").quantifier, Some(Quantifier::All));
        let f = p("wfts(english).cat dog");
        assert_eq!(
            (f.op, f.language.as_deref(), f.values),
            (Operator::Wfts, Some("english"), vec!["cat dog".into()])
        );
        assert_eq!(p("isdistinct.5").op, Operator::IsDistinct);
        assert_eq!(p("cs.{1,2}").values, vec!["{1,2}"]);
        assert_eq!(p("adj.[1,2)").op, Operator::Adj);
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
            "eq(some).{1}",
            "eq(any).1",
            "neq(any).{1}",
            "fts(a b).x",
            "in(any).(1)",
        ] {
            assert!(parse("c", bad).is_err(), "{bad}");
        }
    }

    fn tree(key: &str, value: &str) -> RawFilter {
        parse_pair(key, value).unwrap_or_else(|e| panic!("{value}: {e}"))
    }

    #[test]
    fn logic_trees_nest_and_negate() {
        let t = tree(
            "or",
            "(a.eq.1,and(b.gt.2,c.lt.3),not.and(d.is.null,e.not.eq.x))",
        );
        let RawFilter::Group { or, negated, items } = &t else {
            panic!("a group")
        };
        assert!(*or && !*negated && items.len() == 3);
        let RawFilter::Group { items: inner, .. } = &items[2] else {
            panic!("nested")
        };
        let RawFilter::Condition(e) = &inner[1] else {
            panic!("condition")
        };
        assert!(e.negated && e.values == ["x"]);
        let t = tree(
            "not.and",
            r#"(name.in.("a,b",c),name.eq."x,)y",tags.cs.{a,b},n.gte(any).{1,2})"#,
        );
        let RawFilter::Group { negated, items, .. } = &t else {
            panic!("a group")
        };
        assert!(*negated);
        let values: Vec<Vec<String>> = items
            .iter()
            .map(|i| match i {
                RawFilter::Condition(c) => c.values.clone(),
                RawFilter::Group { .. } => panic!("flat"),
            })
            .collect();
        assert_eq!(
            values,
            vec![
                vec!["a,b".to_owned(), "c".to_owned()],
                vec!["x,)y".to_owned()],
                vec!["{a,b}".to_owned()],
                vec!["1".to_owned(), "2".to_owned()],
            ]
        );
        let t = tree("and", "( a.eq.1 , b.like.*x* )");
        assert_eq!(t.conditions().count(), 2);
        assert_eq!(tree("or", "(and.eq.1,or.eq.2)").conditions().count(), 2);
        for bad in [
            "",
            "()",
            "(a.eq.1",
            "(a.eq.1))",
            "a.eq.1",
            "(a.eq.1,)",
            "(a.zz.1)",
            "(xor(a.eq.1))",
            "(a.in.(1,2)",
            r#"(a.eq."x"y)"#,
        ] {
            assert!(parse_pair("or", bad).is_err(), "{bad:?}");
        }
        let deep = format!("({}a.eq.1{})", "and(".repeat(40), ")".repeat(40));
        assert!(parse_pair("or", &deep).is_err(), "depth is bounded");
        let ok = format!("({}a.eq.1{})", "and(".repeat(10), ")".repeat(10));
        assert!(parse_pair("or", &ok).is_ok());
    }
}
