//! The web console at `/ui/`: plain JavaScript modules, a stylesheet and one HTML page, built
//! into the binary, so the server needs no Node.js, no CDN and no network to show it.
//!
//! The pages call the same HTTP API as any client, with the API key the user signs in with
//! (kept in the tab's `sessionStorage`, sent as a header). The assets themselves are public:
//! they hold no data. Every answer carries a strict Content-Security-Policy (scripts and styles
//! from this origin only, nothing inline, no frames), and the scripts put run data on the page
//! as text only (`ui/dom.js`).
//!
//! Why not a crate such as rust-embed: nine files are a `const` table of `include_bytes!`, and
//! the gzip copy of each is made once, on first use, with the `flate2` the archive already uses.

use std::io::Write;
use std::sync::OnceLock;

use axum::Router;
use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::Shared;

/// The console's Content-Security-Policy: nothing but this origin's own scripts, styles and
/// API; no inline script or style attribute, no plugin, no frame, no form posted elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! assets {
    ($(($name:literal, $type:expr)),* $(,)?) => {
        [$(Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../ui/", $name)),
        }),*]
    };
}

const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: [Asset; 10] = assets![
    ("index.html", "text/html; charset=utf-8"),
    ("app.css", "text/css; charset=utf-8"),
    ("app.js", JS),
    ("api.js", JS),
    ("dom.js", JS),
    ("dag.js", JS),
    ("diff.js", JS),
    ("flows.js", JS),
    ("runs.js", JS),
    ("usage.js", JS),
];

/// An asset's gzip copy and the ETags of both copies (a representation's ETag is its own),
/// made once.
struct Prepared {
    gzip: Bytes,
    etag: HeaderValue,
    gzip_etag: HeaderValue,
}

fn prepared(index: usize) -> &'static Prepared {
    static PREPARED: [OnceLock<Prepared>; 10] = [const { OnceLock::new() }; 10];
    PREPARED[index].get_or_init(|| {
        let body = ASSETS[index].body;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        // Writing to a Vec cannot fail.
        let gzip = gz
            .write_all(body)
            .and_then(|()| gz.finish())
            .unwrap_or_default();
        let hash = hex::encode(&Sha256::digest(body)[..12]);
        let tag = |suffix: &str| {
            HeaderValue::from_str(&format!("\"{hash}{suffix}\""))
                .unwrap_or_else(|_| HeaderValue::from_static("\"\""))
        };
        Prepared {
            gzip: Bytes::from(gzip),
            etag: tag(""),
            gzip_etag: tag("-gz"),
        }
    })
}

/// The console's routes: `/` and `/ui` redirect to `/ui/`, which serves the page and its files.
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(|headers: HeaderMap| async move { serve("index.html", &headers) }))
        .route(
            "/ui/{file}",
            get(|Path(file): Path<String>, headers: HeaderMap| async move {
                serve(&file, &headers)
            }),
        )
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|a| a.name == name) else {
        return ApiError::not_found("no such file in the console").into_response();
    };
    let asset = &ASSETS[index];
    let ready = prepared(index);
    let gzip = accepts_gzip(headers) && !ready.gzip.is_empty();
    let etag = if gzip { &ready.gzip_etag } else { &ready.etag };
    let mut response = if matches(headers, etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else if gzip {
        let mut r = ready.gzip.clone().into_response();
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        asset.body.into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(header::ETAG, etag.clone());
    // Revalidated on every load (a 304 when unchanged): a new binary's console shows at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Whether `If-None-Match` names `etag` (a list, weak tags compared weakly, or `*`).
fn matches(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let Ok(etag) = etag.to_str() else {
        return false;
    };
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|part| {
            let mut it = part.split(';');
            let coding = it.next().unwrap_or_default().trim();
            let refused = it.any(|p| {
                let p = p.trim();
                p.get(..2)
                    .filter(|k| k.eq_ignore_ascii_case("q="))
                    .and_then(|_| p[2..].trim().parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            coding.eq_ignore_ascii_case("gzip") && !refused
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The console's size: every asset, and all of them gzipped.
    fn sizes() -> (usize, usize) {
        let raw = ASSETS.iter().map(|a| a.body.len()).sum();
        let gz = (0..ASSETS.len()).map(|i| prepared(i).gzip.len()).sum();
        (raw, gz)
    }

    #[test]
    fn every_module_the_page_imports_is_served() {
        for asset in &ASSETS {
            let text = std::str::from_utf8(asset.body).expect("text");
            for line in text.lines() {
                let Some(from) = line.split(" from './").nth(1) else {
                    continue;
                };
                let file = from.split('\'').next().unwrap_or_default();
                assert!(
                    ASSETS.iter().any(|a| a.name == file),
                    "{} imports {file}, which is not served",
                    asset.name
                );
            }
        }
    }

    /// Every module is announced by `index.html` (`modulepreload`), so that the browser fetches
    /// them all at once, not one level of imports after another.
    #[test]
    fn the_page_preloads_every_module() {
        let page = std::str::from_utf8(ASSETS[0].body).expect("text");
        for asset in ASSETS
            .iter()
            .filter(|a| a.name.ends_with(".js") && a.name != "app.js")
        {
            assert!(
                page.contains(&format!(
                    "<link rel=\"modulepreload\" href=\"{}\">",
                    asset.name
                )),
                "index.html does not preload {}",
                asset.name
            );
        }
    }

    #[test]
    fn the_console_is_small() {
        let (raw, gz) = sizes();
        assert!(gz < 200 * 1024, "{gz} bytes gzipped ({raw} raw)");
    }

    #[test]
    fn an_etag_matches_in_a_list_and_weakly() {
        let tag = HeaderValue::from_static("\"abc\"");
        let mut h = HeaderMap::new();
        assert!(!matches(&h, &tag));
        for v in ["\"abc\"", "\"x\", \"abc\"", "W/\"abc\"", "*"] {
            h.insert(header::IF_NONE_MATCH, HeaderValue::from_static(v));
            assert!(matches(&h, &tag), "{v}");
        }
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"abc-gz\""),
        );
        assert!(!matches(&h, &tag));
    }

    #[test]
    fn nothing_puts_markup_or_code_on_the_page_from_a_string() {
        let sinks = [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            "javascript:",
        ];
        for asset in &ASSETS {
            let text = std::str::from_utf8(asset.body).expect("text");
            for sink in sinks {
                assert!(!text.contains(sink), "{} uses {sink}", asset.name);
            }
        }
        let page = std::str::from_utf8(ASSETS[0].body).expect("text");
        assert!(
            !page.contains("<script>") && !page.contains("style="),
            "no inline script or style"
        );
    }

    #[test]
    fn gzip_is_taken_unless_refused() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("br, gzip"),
        );
        assert!(accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip;q=0"),
        );
        assert!(!accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip; Q=0"),
        );
        assert!(!accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        assert!(!accepts_gzip(&h));
    }
}
