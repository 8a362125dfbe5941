//! GraphiQL at `/`, served entirely from the binary, so that it works with
//! no network beyond this server (offline, behind proxies that block CDNs).
//!
//! - `/` is our page (`graphiql/page.html`), made per request: `/?token=<jwt>`
//!   puts `Bearer <jwt>` into the root element's `data-authorization`, which
//!   `graphiql/init.js` hands to GraphiQL for the HTTP header and for the
//!   WebSocket's `connection_init` payload. Only base64url characters and
//!   dots get through, so nothing else from the query string reaches the
//!   page. The page is `no-store` (it may carry a token), sends no referrer,
//!   and its Content-Security-Policy allows this server only: scripts,
//!   styles and connections from `'self'`, fonts and images also as `data:`
//!   URLs (GraphiQL's CSS inlines its fonts), no inline script. The one
//!   inline style GraphiQL makes (the `<style>` element that locks scrolling
//!   while a dialog is open) carries the response's random nonce, which
//!   `init.js` hands to it as `window.__webpack_nonce__` (the global the
//!   bundled `get-nonce` reads); any other inline style is refused.
//! - `/graphiql/<version>/<file>` are the assets, compiled in with
//!   `include_bytes!`: GraphiQL 3's UMD build and CSS with React 18 (built
//!   by `scripts/graphiql-assets.sh` into `api/assets/graphiql/`, where
//!   `NOTICE.md` names each package, version and licence), our `init.js` and
//!   `page.css`. `<version>` is a hash of every asset, so a new binary with
//!   other assets has other URLs, and the assets are cached as immutable for
//!   a year; the version is also their `ETag`. Another version is a 404.

use std::sync::LazyLock;

use axum::extract::{Path, Query};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// A file served under `/graphiql/<version>/`.
struct Asset {
    /// Its name in the URL.
    name: &'static str,
    /// `Content-Type`.
    content_type: &'static str,
    /// Its bytes.
    bytes: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every asset the page loads.
static ASSETS: &[Asset] = &[
    Asset {
        name: "react.production.min.js",
        content_type: JS,
        bytes: include_bytes!("../../assets/graphiql/react.production.min.js"),
    },
    Asset {
        name: "react-dom.production.min.js",
        content_type: JS,
        bytes: include_bytes!("../../assets/graphiql/react-dom.production.min.js"),
    },
    Asset {
        name: "graphiql.min.js",
        content_type: JS,
        bytes: include_bytes!("../../assets/graphiql/graphiql.min.js"),
    },
    Asset {
        name: "graphiql.min.css",
        content_type: CSS,
        bytes: include_bytes!("../../assets/graphiql/graphiql.min.css"),
    },
    Asset {
        name: "init.js",
        content_type: JS,
        bytes: include_bytes!("graphiql/init.js"),
    },
    Asset {
        name: "page.css",
        content_type: CSS,
        bytes: include_bytes!("graphiql/page.css"),
    },
];

/// The page; `{{version}}` and `{{authorization}}` are filled in.
const PAGE: &str = include_str!("graphiql/page.html");

/// The Content-Security-Policy of a page whose inline styles carry
/// `style_nonce`.
pub fn content_security_policy(style_nonce: &str) -> String {
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self' 'nonce-{style_nonce}'; \
         img-src 'self' data:; font-src 'self' data:; connect-src 'self'; object-src 'none'; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

/// A fresh nonce: 128 random bits, base64.
fn nonce() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>())
}

/// The first 16 hex digits of the SHA-256 of every asset's name and bytes
/// (computed once, at the first request: a few milliseconds).
static VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut hash = Sha256::new();
    for asset in ASSETS {
        hash.update((asset.name.len() as u64).to_le_bytes());
        hash.update(asset.name.as_bytes());
        hash.update((asset.bytes.len() as u64).to_le_bytes());
        hash.update(asset.bytes);
    }
    hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
});

/// Query parameters of the page.
#[derive(Debug, serde::Deserialize)]
pub struct PageParams {
    token: Option<String>,
}

/// Whether `token` can be a JWT: base64url segments and dots, nothing that
/// could leave an HTML attribute or a script string.
fn plausible_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 4096
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The HTML of the page, with the bearer token of `token` when it is one.
fn render(token: Option<&str>, style_nonce: &str) -> String {
    let authorization = token
        .filter(|t| plausible_token(t))
        .map(|t| format!(" data-authorization=\"Bearer {t}\""))
        .unwrap_or_default();
    PAGE.replace("{{version}}", &VERSION)
        .replace("{{style_nonce}}", style_nonce)
        .replace("{{authorization}}", &authorization)
}

/// `GET /`: the GraphiQL page.
pub async fn page(Query(params): Query<PageParams>) -> Response {
    let style_nonce = nonce();
    let policy = HeaderValue::from_str(&content_security_policy(&style_nonce));
    let mut response = render(params.token.as_deref(), &style_nonce).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    match policy {
        Ok(policy) => headers.insert(header::CONTENT_SECURITY_POLICY, policy),
        // Base64 is always a valid header value; refuse rather than serve
        // the page without its policy.
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `GET /graphiql/{version}/{file}`: an asset of the current version.
pub async fn asset(Path((version, file)): Path<(String, String)>, request: HeaderMap) -> Response {
    let Some(asset) = ASSETS
        .iter()
        .find(|a| a.name == file)
        .filter(|_| version == *VERSION)
    else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let etag = format!("\"{}\"", *VERSION);
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.bytes.into_response()
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, etag);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_carries_a_token_and_nothing_else() {
        let page = render(Some("eyJh.eyJz.c2ln-_"), "n");
        assert!(page.contains(" data-authorization=\"Bearer eyJh.eyJz.c2ln-_\">"));
        for bad in ["x\"><script>alert(1)</script>", "a b", "", "é"] {
            let page = render(Some(bad), "n");
            assert!(!page.contains("data-authorization"), "{bad}: {page}");
        }
        assert!(!render(None, "n").contains("data-authorization"));
    }

    #[test]
    fn the_page_refers_only_to_this_server() {
        let page = render(Some("a.b.c"), "bm9uY2U=");
        assert!(!page.contains("{{"), "{page}");
        assert!(page.contains(" data-style-nonce=\"bm9uY2U=\""), "{page}");
        assert!(!page.contains("//"), "an absolute URL in {page}");
        for asset in ASSETS {
            let url = format!("graphiql/{}/{}", *VERSION, asset.name);
            assert!(page.contains(&url), "{url} is not on the page");
        }
        let init = std::str::from_utf8(include_bytes!("graphiql/init.js")).unwrap_or("");
        assert!(!init.contains("://"), "an absolute URL in init.js");
    }

    #[test]
    fn every_page_has_its_own_style_nonce() {
        let (a, b) = (nonce(), nonce());
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
        assert!(HeaderValue::from_str(&content_security_policy(&a)).is_ok());
    }

    #[test]
    fn the_version_names_the_assets() {
        assert_eq!(VERSION.len(), 16);
        assert!(VERSION.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
