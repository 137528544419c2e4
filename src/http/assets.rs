//! Static assets compiled into the binary: the dashboard at `/` and the JS client at `/client.js`.
//!
//! They live at the repository's root (`dashboard/`, `clients/js/`), need no build step, and
//! are served with a Content-Security-Policy that lets the page load only its own scripts and
//! talk only to its own origin.

use warp::http::HeaderValue;
use warp::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "client.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../clients/js/pgrelay.js"),
    },
    Asset {
        path: "client.d.ts",
        content_type: "application/typescript; charset=utf-8",
        body: include_str!("../../clients/js/pgrelay.d.ts"),
    },
    Asset {
        path: "dashboard/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../dashboard/app.js"),
    },
    Asset {
        path: "dashboard/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../dashboard/style.css"),
    },
];

/// The dashboard's page.
const DASHBOARD: &str = include_str!("../../dashboard/index.html");

/// The page may load its own scripts and styles and connect to its own origin (REST,
/// `/metrics`, and the WebSocket: `'self'` covers `ws:`/`wss:` to the same host), nothing else.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

fn respond(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Assets change with the binary: revalidate rather than serve a stale client.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("content-security-policy", HeaderValue::from_static(CSP));
    response
}

/// GET (and HEAD) /client.js, /client.d.ts, /dashboard/{app.js,style.css}.
pub fn files() -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::get()
        .or(warp::head())
        .unify()
        .and(warp::path::full())
        .and_then(|path: warp::path::FullPath| async move {
            let wanted = path.as_str().trim_start_matches('/');
            ASSETS
                .iter()
                .find(|asset| asset.path == wanted)
                .map(|asset| respond(asset.content_type, asset.body))
                .ok_or_else(warp::reject::not_found)
        })
}

/// The dashboard's HTML, for `GET /` from a browser.
pub fn dashboard() -> Response {
    respond("text/html; charset=utf-8", DASHBOARD)
}
