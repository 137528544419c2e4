//! Browsers: which web pages may use the relay (WebSocket upgrades and REST), and CORS.
//!
//! A browser sends `Origin` with every WebSocket upgrade and every cross-origin request. A
//! request whose origin is not allowed is refused (403) before it reaches a route, so a page
//! the user happens to open cannot read or write through a relay it can reach (one on
//! localhost, say). Requests without `Origin` (servers, command-line clients) pass. Allowed:
//! the relay's own origin (the `Host` the request was sent to), and the configured
//! `allowed_origins` (`"*"` for any). Preflights (`OPTIONS` with
//! `Access-Control-Request-Method`) from allowed origins are answered; responses to allowed
//! cross-origin requests carry `Access-Control-Allow-Origin` and `Vary: Origin`.

use std::sync::Arc;

use warp::http::{HeaderValue, StatusCode};
use warp::{Filter, Rejection, Reply};

use super::ApiError;

/// Methods REST answers.
const METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Request headers clients send (PostgREST's and Supabase's included).
const HEADERS: &str = "authorization, apikey, content-type, accept, prefer, range, range-unit, \
                       accept-profile, content-profile, x-client-info, last-event-id";

/// Response headers scripts may read.
const EXPOSED: &str = "content-range, content-location, location, preference-applied";

/// The configured origins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins {
    /// Allowed origins (`scheme://host[:port]`, compared without case), or `*` among them
    /// for any; the relay's own origin is always allowed.
    pub allowed: Vec<String>,
}

impl Origins {
    /// Whether a request from `origin`, sent to `host`, may go on.
    pub fn allows(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim();
        if self
            .allowed
            .iter()
            .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
        {
            return true;
        }
        // Same origin: the page was served by the host it talks to.
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h.trim()))
    }
}

/// Refuses requests from origins that are not allowed, answers preflights, and marks
/// responses to allowed cross-origin requests.
pub fn guard<F, R>(
    origins: Arc<Origins>,
    routes: F,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone
where
    F: Filter<Extract = (R,), Error = Rejection> + Clone + Send + Sync + 'static,
    R: Reply,
{
    let checked = warp::header::optional::<String>("origin")
        .and(warp::header::optional::<String>("host"))
        .and_then(move |origin: Option<String>, host: Option<String>| {
            let origins = Arc::clone(&origins);
            async move {
                match origin {
                    None => Ok(None),
                    Some(origin) if origins.allows(&origin, host.as_deref()) => Ok(Some(origin)),
                    Some(origin) => {
                        tracing::debug!(%origin, "request from an origin that is not allowed");
                        Err(warp::reject::custom(ApiError::new(
                            StatusCode::FORBIDDEN,
                            "origin_not_allowed",
                            format!(
                                "Requests from {origin} are not allowed; add it to allowed_origins"
                            ),
                        )))
                    }
                }
            }
        });
    // (Matched by hand: `warp::options()` would turn every other request's 404 into a 405.)
    let preflight = warp::method()
        .and(warp::header::optional::<String>(
            "access-control-request-method",
        ))
        .and_then(
            |method: warp::http::Method, requested: Option<String>| async move {
                if method != warp::http::Method::OPTIONS || requested.is_none() {
                    return Err(warp::reject::not_found());
                }
                let mut response = StatusCode::NO_CONTENT.into_response();
                let headers = response.headers_mut();
                headers.insert(
                    "access-control-allow-methods",
                    HeaderValue::from_static(METHODS),
                );
                headers.insert(
                    "access-control-allow-headers",
                    HeaderValue::from_static(HEADERS),
                );
                headers.insert("access-control-max-age", HeaderValue::from_static("600"));
                Ok::<_, Rejection>(response)
            },
        );
    let routes = routes.map(|reply: R| reply.into_response());
    checked.and(preflight.or(routes).unify()).map(
        |origin: Option<String>, reply: warp::reply::Response| {
            let mut response = reply;
            if let Some(origin) = origin.and_then(|o| HeaderValue::from_str(&o).ok()) {
                let headers = response.headers_mut();
                headers.insert("access-control-allow-origin", origin);
                headers.insert(
                    "access-control-expose-headers",
                    HeaderValue::from_static(EXPOSED),
                );
                headers.append("vary", HeaderValue::from_static("origin"));
            }
            response
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_origin_and_the_configured_ones_are_allowed() {
        let none = Origins::default();
        assert!(none.allows("http://relay:8080", Some("relay:8080")));
        assert!(none.allows("https://Relay:8080", Some("relay:8080")));
        assert!(!none.allows("http://evil.example", Some("relay:8080")));
        assert!(!none.allows("http://relay:8080", None));
        assert!(!none.allows("null", Some("relay:8080")));
        let some = Origins {
            allowed: vec!["https://app.example/".into()],
        };
        assert!(some.allows("https://app.example", Some("relay:8080")));
        assert!(!some.allows("https://app.example.evil", Some("relay:8080")));
        let any = Origins {
            allowed: vec!["*".into()],
        };
        assert!(any.allows("http://anything", None));
    }
}
