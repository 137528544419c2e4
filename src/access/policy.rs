//! What a principal may do with a table: read, insert, update, delete; which rows (a filter in
//! the subscription syntax, bound to the token's claims); which columns.
//!
//! Policies are checked in order and the first whose tables and roles match decides. With no
//! policy configured every caller may do everything (the relay without auth, as before);
//! with any policy configured what no policy grants is refused. The key columns are always
//! visible: events and REST address rows by them.
//!
//! A filter value may hold `{claims.path}` placeholders. Binding puts the claim's value in as
//! a value (never as filter syntax: a claim cannot add a condition or widen a pattern); an
//! `in` list item that is a placeholder for an array claim becomes its elements. A missing or
//! non-scalar claim refuses access.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::auth::{Principal, claim};
use crate::config::TableName;
use crate::filter::{self, Operator, RawCondition};

/// One `[[policy]]` of the configuration file.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicySetting {
    /// Tables it covers (`items`, `shop.orders`) or `["*"]`.
    pub tables: Vec<String>,
    /// Roles it covers, or `["*"]`.
    pub roles: Vec<String>,
    /// May subscribe, take initial data, resume, and read through REST.
    #[serde(default)]
    pub read: bool,
    /// May insert through REST.
    #[serde(default)]
    pub insert: bool,
    /// May update through REST.
    #[serde(default)]
    pub update: bool,
    /// May delete through REST.
    #[serde(default)]
    pub delete: bool,
    /// Rows: `tenant_id=eq.{claims.tenant_id}&archived=is.false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Visible columns (the key columns are always visible); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
}

/// A policy, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Tables, or `None` for every table.
    pub tables: Option<Vec<TableName>>,
    /// Roles, or `None` for every role.
    pub roles: Option<Vec<String>>,
    /// What it grants.
    pub read: bool,
    /// See [`PolicySetting::insert`].
    pub insert: bool,
    /// See [`PolicySetting::update`].
    pub update: bool,
    /// See [`PolicySetting::delete`].
    pub delete: bool,
    /// Row conditions with `{claims.…}` placeholders in their values.
    pub filter: Vec<RawCondition>,
    /// Visible columns (the key columns are added per table).
    pub columns: Option<Vec<String>>,
}

impl Policy {
    /// Checks a `[[policy]]` (`index` for error messages).
    pub fn from_setting(setting: &PolicySetting, index: usize) -> Result<Policy, String> {
        let at = |m: String| format!("policy {} ({:?}): {m}", index + 1, setting.tables);
        let tables = if setting.tables.iter().any(|t| t == "*") {
            None
        } else {
            if setting.tables.is_empty() {
                return Err(at("tables must name tables or \"*\"".into()));
            }
            Some(
                setting
                    .tables
                    .iter()
                    .map(|t| TableName::parse(t).map_err(|e| at(e.to_string())))
                    .collect::<Result<_, _>>()?,
            )
        };
        let roles = if setting.roles.iter().any(|r| r == "*") {
            None
        } else {
            if setting.roles.is_empty() {
                return Err(at("roles must name roles or \"*\"".into()));
            }
            Some(setting.roles.clone())
        };
        let mut filter = Vec::new();
        if let Some(text) = &setting.filter {
            for pair in text.split('&').filter(|p| !p.trim().is_empty()) {
                let (column, expr) = pair
                    .split_once('=')
                    .ok_or_else(|| at(format!("filter {pair:?} is not column=op.value")))?;
                let condition =
                    filter::parse(column.trim(), expr.trim()).map_err(|e| at(e.to_string()))?;
                if !condition.op.live_anywhere() {
                    // A policy applies to subscriptions too, which evaluate it in Rust.
                    return Err(at(format!(
                        "filter {pair:?}: operator {} cannot be evaluated on live events; \
                         a policy may use eq, neq, lt, lte, gt, gte, in, is, isdistinct, like, ilike",
                        condition.op.name()
                    )));
                }
                for value in &condition.values {
                    check_placeholders(value).map_err(&at)?;
                }
                filter.push(condition);
            }
        }
        Ok(Policy {
            tables,
            roles,
            read: setting.read,
            insert: setting.insert,
            update: setting.update,
            delete: setting.delete,
            filter,
            columns: setting.columns.clone(),
        })
    }

    fn covers(&self, table: &TableName, role: &str) -> bool {
        self.tables.as_ref().is_none_or(|t| t.contains(table))
            && self
                .roles
                .as_ref()
                .is_none_or(|r| r.iter().any(|r| r == role))
    }
}

/// Placeholders are `{claims.path}`; anything else in braces is refused (a typo would
/// otherwise compare against the literal text).
fn check_placeholders(value: &str) -> Result<(), String> {
    let mut rest = value;
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else {
            return Err(format!("unclosed {{ in {value:?}"));
        };
        let inner = &rest[start + 1..start + end];
        if !inner.starts_with("claims.") || inner.len() == "claims.".len() {
            return Err(format!(
                "placeholder {{{inner}}} in {value:?} must be {{claims.name}}"
            ));
        }
        rest = &rest[start + end + 1..];
    }
    Ok(())
}

/// What one principal may do with one table.
#[derive(Debug, Clone, PartialEq)]
pub struct Access {
    /// Subscribe, initial data, resume, REST reads.
    pub read: bool,
    /// REST inserts.
    pub insert: bool,
    /// REST updates.
    pub update: bool,
    /// REST deletes.
    pub delete: bool,
    /// Row conditions, bound (ANDed to everything).
    pub filter: Vec<RawCondition>,
    /// Visible columns (including the key columns), or all.
    pub columns: Option<Vec<String>>,
}

impl Access {
    /// Everything.
    pub fn all() -> Access {
        Access {
            read: true,
            insert: true,
            update: true,
            delete: true,
            filter: Vec::new(),
            columns: None,
        }
    }

    /// Whether any right is granted at all (a table with none is, to this caller, not there).
    pub fn any(&self) -> bool {
        self.read || self.insert || self.update || self.delete
    }

    /// The row conditions as a filter.
    pub fn filters(&self) -> Vec<filter::RawFilter> {
        self.filter.iter().cloned().map(Into::into).collect()
    }

    /// Whether `column` is visible.
    pub fn sees(&self, column: &str) -> bool {
        self.columns
            .as_ref()
            .is_none_or(|c| c.iter().any(|c| c == column))
    }
}

/// The configured policies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policies {
    /// In order; the first that covers a (table, role) decides.
    pub list: Vec<Policy>,
}

impl Policies {
    /// What `principal` may do with `table` (whose key columns are `keys`): `None` when
    /// nothing is granted.
    pub fn access(&self, table: &TableName, keys: &[String], principal: &Principal) -> Access {
        if self.list.is_empty() {
            return Access::all();
        }
        let denied = Access {
            read: false,
            insert: false,
            update: false,
            delete: false,
            filter: Vec::new(),
            columns: Some(Vec::new()),
        };
        let Some(policy) = self.list.iter().find(|p| p.covers(table, &principal.role)) else {
            return denied;
        };
        let mut filter = Vec::with_capacity(policy.filter.len());
        for condition in &policy.filter {
            match bind(condition, &principal.claims) {
                Some(bound) => filter.push(bound),
                None => {
                    tracing::debug!(table = %table, role = %principal.role, "a claim the policy filter needs is missing: access refused");
                    return denied;
                }
            }
        }
        let columns = policy.columns.as_ref().map(|columns| {
            let mut visible: Vec<String> = keys.to_vec();
            for c in columns {
                if !visible.contains(c) {
                    visible.push(c.clone());
                }
            }
            visible
        });
        Access {
            read: policy.read,
            insert: policy.insert,
            update: policy.update,
            delete: policy.delete,
            filter,
            columns,
        }
    }

    /// Every column a policy for `table` names (to check against the catalog at start).
    pub fn columns_named<'a>(&'a self, table: &'a TableName) -> impl Iterator<Item = &'a str> {
        self.list
            .iter()
            .filter(move |p| p.tables.as_ref().is_none_or(|t| t.contains(table)))
            .flat_map(|p| {
                p.filter
                    .iter()
                    .map(|c| c.column.as_str())
                    .chain(p.columns.iter().flatten().map(String::as_str))
            })
    }
}

/// The condition with its placeholders replaced by the claims' values.
fn bind(condition: &RawCondition, claims: &Map<String, Value>) -> Option<RawCondition> {
    let like = matches!(condition.op, Operator::Like | Operator::Ilike);
    let mut values = Vec::with_capacity(condition.values.len());
    for value in &condition.values {
        // An `in` item that is one placeholder for an array claim: its elements.
        if condition.op == Operator::In
            && let Some(path) = whole_placeholder(value)
            && let Some(Value::Array(items)) = claim(claims, path)
        {
            for item in items {
                values.push(scalar(item)?);
            }
            continue;
        }
        values.push(substitute(value, claims, like)?);
    }
    Some(RawCondition {
        values,
        ..condition.clone()
    })
}

fn whole_placeholder(value: &str) -> Option<&str> {
    value
        .strip_prefix("{claims.")
        .and_then(|v| v.strip_suffix('}'))
        .filter(|v| !v.contains(['{', '}']))
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn substitute(value: &str, claims: &Map<String, Value>, like: bool) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("{claims.") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}')? + start;
        let path = &rest[start + "{claims.".len()..end];
        let text = scalar(claim(claims, path)?)?;
        if like {
            // The claim is a value, not a pattern: its wildcards match themselves.
            for c in text.chars() {
                if matches!(c, '%' | '_' | '\\') {
                    out.push('\\');
                }
                out.push(c);
            }
        } else {
            out.push_str(&text);
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn principal(role: &str, claims: Value) -> Principal {
        Principal {
            role: role.into(),
            claims: claims.as_object().unwrap().clone(),
            expires_at: None,
            anonymous: false,
        }
    }

    fn policies(settings: Value) -> Policies {
        let settings: Vec<PolicySetting> = serde_json::from_value(settings).unwrap();
        Policies {
            list: settings
                .iter()
                .enumerate()
                .map(|(i, s)| Policy::from_setting(s, i).unwrap())
                .collect(),
        }
    }

    #[test]
    fn the_first_matching_policy_decides_and_binds_claims() {
        let p = policies(json!([
            {"tables": ["items"], "roles": ["admin"], "read": true, "insert": true, "update": true, "delete": true},
            {"tables": ["items"], "roles": ["*"], "read": true,
             "filter": "tenant_id=eq.{claims.tenant_id}&tag=in.({claims.tags},x)&name=like.{claims.prefix}*",
             "columns": ["name"]},
        ]));
        let items = TableName::parse("items").unwrap();
        let keys = vec!["id".to_owned()];
        let admin = p.access(&items, &keys, &principal("admin", json!({})));
        assert_eq!(
            admin,
            Access {
                columns: None,
                ..Access::all()
            }
        );
        let member = p.access(
            &items,
            &keys,
            &principal(
                "member",
                json!({"tenant_id": 7, "tags": ["a", "b,c"], "prefix": "50%_"}),
            ),
        );
        assert!(member.read && !member.insert);
        assert_eq!(
            member.columns,
            Some(vec!["id".to_owned(), "name".to_owned()])
        );
        assert_eq!(member.filter[0].values, vec!["7"]);
        assert_eq!(member.filter[1].values, vec!["a", "b,c", "x"]);
        assert_eq!(member.filter[2].values, vec!["50\\%\\_%"]);
        // A missing claim refuses; another table is not covered: refused.
        assert!(
            !p.access(&items, &keys, &principal("member", json!({})))
                .any()
        );
        let other = TableName::parse("other").unwrap();
        assert!(
            !p.access(&other, &keys, &principal("admin", json!({})))
                .any()
        );
        // No policy at all: everything.
        assert_eq!(
            Policies::default().access(&other, &keys, &principal("x", json!({}))),
            Access::all()
        );
    }

    #[test]
    fn bad_policies_are_refused_with_their_number() {
        for bad in [
            json!({"tables": [], "roles": ["*"]}),
            json!({"tables": ["*"], "roles": []}),
            json!({"tables": ["*"], "roles": ["*"], "filter": "tenant_id"}),
            json!({"tables": ["*"], "roles": ["*"], "filter": "a=eq.{claim.x}"}),
            json!({"tables": ["*"], "roles": ["*"], "filter": "a=eq.{claims.x"}),
        ] {
            let setting: PolicySetting = serde_json::from_value(bad.clone()).unwrap();
            let err = Policy::from_setting(&setting, 2).unwrap_err();
            assert!(err.starts_with("policy 3"), "{bad}: {err}");
        }
    }
}
