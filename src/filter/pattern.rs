//! `like`/`ilike` patterns matched in Rust as PostgreSQL matches them under `COLLATE "C"`.

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
    pub(super) fn new(pattern: &str, fold: bool) -> Option<Pattern> {
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

    pub(super) fn matches(&self, text: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
