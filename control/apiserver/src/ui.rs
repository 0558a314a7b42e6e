//! The web dashboard, served at `/ui/`: a page of plain JavaScript (no build step) that
//! runs in the browser and talks to this same API with the signed-in user's credentials.
//!
//! The assets carry no cluster data, so they are public, like `/version`; everything
//! the page shows comes from API calls that authentication and RBAC check as any
//! kubectl call. There is no endpoint here for the dashboard alone.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The files under `/ui/`, compiled in so the binary is all there is to ship.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_str!("../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../ui/app.css"),
    ),
];

/// Scripts, styles and calls only from this origin: a value from the cluster that
/// slipped into markup could not load or send anything elsewhere.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// Whether `path` is the dashboard's.
pub fn is_ui(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// The response for a dashboard path: an asset, a redirect from `/ui` to `/ui/`, or 404.
pub fn serve(path: &str) -> Response {
    let Some(file) = path.strip_prefix("/ui/") else {
        return (StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, "/ui/")]).into_response();
    };
    // The page's own routes live after `#`, so any other path is a missing file.
    let Some((_, content_type, body)) = ASSETS.iter().find(|(name, _, _)| *name == file) else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let mut resp = (*body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // A new binary may bring new assets: the browser asks again each time.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_assets_with_a_same_origin_policy() {
        let resp = serve("/ui/");
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        assert!(resp.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("default-src 'self'"));
        assert_eq!(serve("/ui/app.js").status(), StatusCode::OK);
        assert_eq!(serve("/ui").status(), StatusCode::MOVED_PERMANENTLY);
        for missing in ["/ui/../etc/passwd", "/ui/app.js/", "/ui/nope.js"] {
            assert_eq!(serve(missing).status(), StatusCode::NOT_FOUND, "{missing}");
        }
        assert!(is_ui("/ui") && is_ui("/ui/app.css") && !is_ui("/uix"));
    }

    /// The first load stays small: the page, its script and its styles.
    #[test]
    fn the_first_load_is_small() {
        let total: usize = ASSETS.iter().map(|(_, _, b)| b.len()).sum();
        assert!(total < 200 * 1024, "{total} bytes");
    }
}
