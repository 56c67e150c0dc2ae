//! The web console: `GET /console` (also `/console/`) and `GET /console/{asset}`. The page and
//! its assets (`server/console/`, the vendored uPlot among them) are compiled into the binary,
//! so the console needs no files at run time and no network beyond this server. The static
//! files need no key: the page asks for one and sends it to the `/v1` API itself.
//!
//! Assets are looked up by exact name in [`ASSETS`]; a request path is never joined to a
//! directory, so no path can reach a file that is not listed there.

use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// Where the console is mounted.
pub const MOUNT: &str = "/console";

/// Only this server's own scripts, styles, images and API: no inline script or style, no
/// other origin, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; font-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
#[derive(Debug)]
pub struct Asset {
    /// The name after `/console/`.
    pub name: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub bytes: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $content_type:expr) => {
        Asset {
            name: $name,
            content_type: $content_type,
            bytes: include_bytes!(concat!("../../console/", $name)),
        }
    };
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";
const TEXT: &str = "text/plain; charset=utf-8";

/// The page served at `/console`.
const INDEX: &str = "index.html";

/// Every file of `server/console/` (a test checks that none is missing).
pub const ASSETS: &[Asset] = &[
    asset!("index.html", HTML),
    asset!("console.css", CSS),
    asset!("favicon.svg", SVG),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("charts.js", JS),
    asset!("prometheus.js", JS),
    asset!("chat.js", JS),
    asset!("adapters.js", JS),
    asset!("training.js", JS),
    asset!("metrics.js", JS),
    asset!("vendor/uPlot.iife.min.js", JS),
    asset!("vendor/uPlot.min.css", CSS),
    asset!("vendor/uPlot.LICENSE", TEXT),
];

/// The embedded file called `name`, if there is one.
pub fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// The console's routes; they need no state and no key.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(MOUNT, get(index))
        .route(&format!("{MOUNT}/"), get(index))
        .route(&format!("{MOUNT}/{{*asset}}"), get(asset))
}

/// `GET /console`: the page.
pub async fn index() -> Response {
    serve(INDEX)
}

/// `GET /console/{asset}`.
pub async fn asset(Path(name): Path<String>) -> Response {
    serve(&name)
}

fn serve(name: &str) -> Response {
    let Some(asset) = find(name) else {
        return (
            StatusCode::NOT_FOUND,
            security_headers(TEXT),
            format!("no console asset `{name}`\n"),
        )
            .into_response();
    };
    (security_headers(asset.content_type), asset.bytes).into_response()
}

fn security_headers(content_type: &'static str) -> [(HeaderName, HeaderValue); 6] {
    [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        // A new binary brings new assets: the browser must ask again rather than reuse old ones.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// The console router on a real socket; returns its address.
    async fn serve_console() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, router::<()>()).await;
        });
        addr
    }

    /// Sends `GET <raw_path>` exactly as written (no client-side normalisation of `..`) and
    /// returns the status, the headers (lower-cased names) and the body.
    fn get_raw(
        addr: std::net::SocketAddr,
        raw_path: &str,
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "GET {raw_path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).expect("read");
        let split = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("end of headers");
        let head = String::from_utf8_lossy(&buf[..split]).into_owned();
        let body = buf[split + 4..].to_vec();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .expect("status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        (status, headers, body)
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[tokio::test]
    async fn console_serves_the_page_and_assets_with_their_content_types() {
        let addr = serve_console().await;
        let index = find(INDEX).expect("index").bytes;
        for path in ["/console", "/console/"] {
            let (status, headers, body) = tokio::task::spawn_blocking(move || get_raw(addr, path))
                .await
                .expect("join");
            assert_eq!(status, 200, "{path}");
            assert_eq!(header(&headers, "content-type"), Some(HTML), "{path}");
            assert_eq!(body, index, "{path}");
            assert_eq!(
                header(&headers, "content-security-policy"),
                Some(CONTENT_SECURITY_POLICY)
            );
            assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
        }
        for (path, content_type) in [
            ("/console/app.js", JS),
            ("/console/console.css", CSS),
            ("/console/favicon.svg", SVG),
            ("/console/vendor/uPlot.iife.min.js", JS),
            ("/console/vendor/uPlot.min.css", CSS),
            ("/console/vendor/uPlot.LICENSE", TEXT),
        ] {
            let (status, headers, body) = tokio::task::spawn_blocking(move || get_raw(addr, path))
                .await
                .expect("join");
            assert_eq!(status, 200, "{path}");
            assert_eq!(
                header(&headers, "content-type"),
                Some(content_type),
                "{path}"
            );
            let name = path.trim_start_matches("/console/");
            assert_eq!(body, find(name).expect("listed").bytes, "{path}");
        }
    }

    #[tokio::test]
    async fn console_answers_404_for_unknown_assets_and_path_traversal() {
        let addr = serve_console().await;
        for path in [
            "/console/nope.js",
            "/console/vendor/",
            "/console/vendor",
            "/console/../Cargo.toml",
            "/console/../../config.toml",
            "/console/%2e%2e/%2e%2e/config.toml",
            "/console/..%2f..%2fconfig.toml",
            "/console/vendor/../../src/lib.rs",
            "/console//etc/passwd",
            "/console/%2fetc%2fpasswd",
            "/console/./app.js",
        ] {
            let (status, headers, body) = tokio::task::spawn_blocking(move || get_raw(addr, path))
                .await
                .expect("join");
            assert_eq!(status, 404, "{path}");
            assert_eq!(header(&headers, "content-type"), Some(TEXT), "{path}");
            let body = String::from_utf8_lossy(&body);
            assert!(body.starts_with("no console asset"), "{path}: {body}");
        }
    }

    #[test]
    fn every_file_of_the_console_directory_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console");
        let mut on_disk = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("read console dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    let rel = path.strip_prefix(&root).expect("under root");
                    on_disk.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        on_disk.sort();
        let mut embedded: Vec<String> = ASSETS.iter().map(|a| a.name.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded);
    }
}
