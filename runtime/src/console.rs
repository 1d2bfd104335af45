//! The web console at `/console`: one page over the admin API (topology and live lag, parked
//! parts and their resume, the conflict log side by side, repair check and fix, webhook
//! endpoints with attempts and replay, a live tail of a stream). Its three files are compiled
//! into the binary — nothing is downloaded at run time, nothing for a user to build.
//!
//! The files carry no data and are served without a token; the page asks for an admin token
//! and sends it on every API request (kept in the tab's `sessionStorage` only). A strict
//! Content-Security-Policy allows nothing but this origin's own script, style and API: no
//! inline script, no frames, no other host.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                      img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// `/console` and its script and style.
pub fn router() -> Router {
    Router::new()
        .route("/console", get(|| async { file("text/html; charset=utf-8", INDEX) }))
        .route("/console/", get(|| async { file("text/html; charset=utf-8", INDEX) }))
        .route("/console/console.js", get(|| async { file("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/console/console.css", get(|| async { file("text/css; charset=utf-8", STYLE) }))
}
