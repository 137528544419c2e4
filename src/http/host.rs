//! DNS rebinding: which `Host` names a relay on a loopback address answers to.
//!
//! A page on `evil.example` whose name is re-pointed (rebound) to `127.0.0.1` talks to a relay
//! on loopback as its own origin: the browser sends `Origin: http://evil.example:8080` and
//! `Host: evil.example:8080`, which the same-origin rule ([`super::origin`]) accepts. What
//! gives it away is the `Host`: a relay listening on loopback is reached, by anyone entitled
//! to, as `localhost` (or a name under `.localhost`), `127.x.x.x` or `[::1]`. Other names get
//! 421 Misdirected Request unless they are listed in `allowed_hosts` (`*` turns the check off).
//!
//! A relay listening on any other address (`0.0.0.0` in a container, a LAN address) is reached
//! under names it cannot know (its container name, a load balancer's), so there the check
//! applies only once `allowed_hosts` names them (a container published on the host's
//! `127.0.0.1` is as exposed to rebinding as a relay on loopback); otherwise authentication is
//! what protects it. Requests without any `Host` (HTTP/1.0 tools) pass: browsers always send
//! one. `/healthz` and `/readyz` are never checked, so health checkers may use any name.

use std::net::IpAddr;
use std::sync::Arc;

use warp::host::Authority;
use warp::http::StatusCode;
use warp::{Filter, Rejection};

use super::ApiError;

/// An `allowed_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    /// `*`: any host.
    Any,
    /// A host name or address (lowercase, no trailing dot, IPv6 without brackets), on any
    /// port, or only on the one given.
    Host(String, Option<u16>),
}

/// The `Host` rule of one listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hosts {
    /// Whether the rule applies (the relay listens on a loopback address, or names were
    /// configured).
    enforce: bool,
    /// Names accepted besides the loopback ones.
    allowed: Vec<Allowed>,
}

/// Lowercase, without a trailing dot, and an IPv6 literal without its brackets.
fn normalize(host: &str) -> String {
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(inner) => inner.to_owned(),
        None => host,
    }
}

/// Whether `host` (normalized) names this machine's loopback interface.
fn is_loopback_name(host: &str) -> bool {
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    host.parse::<IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Parses one `allowed_hosts` entry: `*`, `name`, `name:port`, `10.0.0.5`, `[fd00::1]:8080`.
fn parse_entry(entry: &str) -> Result<Allowed, String> {
    let entry = entry.trim();
    if entry == "*" {
        return Ok(Allowed::Any);
    }
    let bad = || {
        format!(
            "{entry:?} is not a host name or address with an optional port (e.g. relay.internal, relay.internal:8080, [::1])"
        )
    };
    if entry.is_empty() || entry.contains(['@', '/', '?', '#']) {
        return Err(bad());
    }
    let authority: Authority = entry.parse().map_err(|_| bad())?;
    // (No user info was allowed, so anything after the host is the port.)
    let has_port = authority.as_str().len() > authority.host().len();
    if has_port && authority.port_u16().is_none() {
        return Err(bad());
    }
    let host = normalize(authority.host());
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Allowed::Host(host, authority.port_u16()))
}

impl Hosts {
    /// The rule for a listener on a loopback address or not, with the configured extra names
    /// (which turn the rule on for any listener); an entry that is not a host (with an
    /// optional port) is an error naming it.
    pub fn new(loopback_listener: bool, allowed_hosts: &[String]) -> Result<Hosts, String> {
        let allowed = allowed_hosts
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| parse_entry(e))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Hosts {
            enforce: loopback_listener || !allowed.is_empty(),
            allowed,
        })
    }

    /// Whether a request sent to `authority` may go on.
    pub fn allows(&self, authority: Option<&Authority>) -> bool {
        if !self.enforce {
            return true;
        }
        let Some(authority) = authority else {
            // No Host at all: not a browser.
            return true;
        };
        let host = normalize(authority.host());
        if is_loopback_name(&host) {
            return true;
        }
        let port = authority.port_u16();
        self.allowed.iter().any(|a| match a {
            Allowed::Any => true,
            Allowed::Host(name, want) => *name == host && (want.is_none() || *want == port),
        })
    }
}

/// Refuses (421) a request whose `Host` the relay does not answer to.
pub fn guard(hosts: Arc<Hosts>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::host::optional()
        .and_then(move |authority: Option<Authority>| {
            let hosts = Arc::clone(&hosts);
            async move {
                if hosts.allows(authority.as_ref()) {
                    return Ok(());
                }
                let host = authority.map_or_else(String::new, |a| a.to_string());
                tracing::debug!(%host, "request for a host name the relay does not answer to");
                Err(warp::reject::custom(ApiError::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "host_not_allowed",
                    format!(
                        "This relay answers to localhost, 127.0.0.1, [::1] and the names in \
                         allowed_hosts, not to {host:?}: add the name to allowed_hosts if it is \
                         the relay's"
                    ),
                )))
            }
        })
        .untuple_one()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(hosts: &Hosts, host: &str) -> bool {
        hosts.allows(Some(&host.parse().unwrap()))
    }

    #[test]
    fn a_loopback_listener_answers_to_loopback_names_and_the_listed_ones() {
        let hosts = Hosts::new(true, &["relay.internal".into(), "[fd00::1]:8080".into()]).unwrap();
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "localhost.",
            "app.localhost:3000",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.8.9.10:1",
            "[::1]",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:8080",
            "relay.internal",
            "Relay.Internal:9999",
            "[fd00::1]:8080",
        ] {
            assert!(allows(&hosts, ok), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "notlocalhost",
            "128.0.0.1",
            "0.0.0.0:8080",
            "[fd00::1]:8081",
            "relay.internal.evil",
        ] {
            assert!(!allows(&hosts, refused), "{refused}");
        }
        assert!(hosts.allows(None));
    }

    #[test]
    fn other_listeners_check_only_once_names_are_given_and_a_star_allows_any() {
        let open = Hosts::new(false, &[]).unwrap();
        assert!(allows(&open, "evil.example"));
        let named = Hosts::new(false, &["pgrelay".into()]).unwrap();
        assert!(allows(&named, "pgrelay:8080") && allows(&named, "127.0.0.1:8080"));
        assert!(!allows(&named, "evil.example:8080"));
        let star = Hosts::new(true, &["*".into()]).unwrap();
        assert!(allows(&star, "evil.example:1"));
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in ["http://x", "a b", "x:port", "user@x", "x:99999"] {
            let err = Hosts::new(true, &[bad.into()]).unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }
}
