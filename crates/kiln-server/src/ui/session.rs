//! Who looks at the UI: nobody in particular on an open server, else the holder of an API
//! token, who logged in with it. The session cookie holds the token's secret (HttpOnly,
//! SameSite=Strict), so every server sharing the database accepts it and a revoked token
//! ends its sessions at once. Every request that changes something carries a CSRF token
//! derived from the session, and its Origin (when the browser sends one) must be this server.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use kiln_store::model::ApiToken;

use super::Ui;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "kiln_session";

/// The request's session secret (the value of its session cookie), if it has one.
pub(crate) fn session_secret(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty())
}

/// The person behind a request, as the pages need to know them.
#[derive(Debug, Clone)]
pub(crate) struct Viewer {
    /// The token's name; `None` on an open server (no token exists).
    pub(crate) name: Option<String>,
    /// Whether they may change things (not a read-only token).
    pub(crate) can_change: bool,
    /// The value every form that changes something must send back.
    pub(crate) csrf: String,
}

impl Viewer {
    fn open(ui: &Ui) -> Viewer {
        Viewer {
            name: None,
            can_change: true,
            csrf: blake3::keyed_hash(&ui.open_key, b"kiln ui csrf").to_hex().to_string(),
        }
    }

    fn of(token: &ApiToken) -> Viewer {
        Viewer {
            name: Some(token.name.clone()),
            can_change: !token.read_only,
            // Derived from the token's hash, which only the database holds: the same on
            // every server, different for every token, unknown to other sites.
            csrf: blake3::derive_key("kiln ui csrf v1", token.hash.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        }
    }

    /// Whether `sent` is this session's CSRF token (compared in constant time).
    pub(crate) fn csrf_ok(&self, sent: &str) -> bool {
        blake3::hash(sent.as_bytes()) == blake3::hash(self.csrf.as_bytes())
    }
}

/// The token a login form's secret names, if it is valid.
pub(crate) async fn token_for(ui: &Ui, secret: &str) -> Result<Option<ApiToken>, crate::Problem> {
    let hash = ApiToken::hash_secret(secret.trim());
    Ok(ui
        .auth
        .tokens()
        .await?
        .iter()
        .find(|t| t.hash == hash && t.revoked.is_none())
        .cloned())
}

/// Whether the server has tokens at all (else it is open).
pub(crate) async fn server_has_tokens(ui: &Ui) -> Result<bool, crate::Problem> {
    Ok(!ui.auth.tokens().await?.is_empty())
}

/// Lets a page request through with its [`Viewer`], or sends the browser to the login page.
pub(crate) async fn gate(State(ui): State<Arc<Ui>>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path == "/login" || path.starts_with("/ui/assets/") {
        return next.run(request).await;
    }
    let tokens = match ui.auth.tokens().await {
        Ok(tokens) => tokens,
        Err(problem) => return super::pages::error_page(&problem).into_response(),
    };
    let viewer = if tokens.is_empty() {
        Viewer::open(&ui)
    } else {
        let hash = session_secret(request.headers()).map(ApiToken::hash_secret);
        match tokens
            .iter()
            .find(|t| Some(&t.hash) == hash.as_ref() && t.revoked.is_none())
        {
            Some(token) => Viewer::of(token),
            None => {
                let next = request
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_else(|| "/".into());
                return Redirect::to(&format!("/login?next={}", encode(&next))).into_response();
            }
        }
    };
    if !request.method().is_safe() {
        if let Some(refused) = foreign_origin(request.headers()) {
            return refused;
        }
        if !viewer.can_change && request.uri().path() != "/logout" {
            return super::pages::refusal(
                StatusCode::FORBIDDEN,
                &format!(
                    "token '{}' is read-only: it may look, not change anything",
                    viewer.name.as_deref().unwrap_or("?")
                ),
            );
        }
    }
    request.extensions_mut().insert(viewer);
    next.run(request).await
}

/// A request that changes something must come from this server's own pages: its Origin
/// (which browsers send with every POST) must name the host it was sent to. The refusal,
/// when it does not.
pub(crate) fn foreign_origin(headers: &HeaderMap) -> Option<Response> {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())?;
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
    (origin_host != host).then(|| {
        super::pages::refusal(
            StatusCode::FORBIDDEN,
            &format!(
                "this request came from another site ({origin}); changes are accepted from this server's pages only"
            ),
        )
    })
}

/// The cookie that logs the browser in with `secret` (or out, with `None`); `Secure` when
/// the page came over HTTPS (a proxy in front says so with `X-Forwarded-Proto`), so that
/// the secret never travels in clear afterwards.
pub(crate) fn cookie(secret: Option<&str>, headers: &HeaderMap) -> HeaderValue {
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let flags = if secure {
        "Path=/; HttpOnly; SameSite=Strict; Secure"
    } else {
        "Path=/; HttpOnly; SameSite=Strict"
    };
    let value = match secret {
        Some(secret) => format!("{COOKIE}={secret}; {flags}"),
        None => format!("{COOKIE}=; {flags}; Max-Age=0"),
    };
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("kiln_session=; Max-Age=0"))
}

/// Where a login may send the browser next: a path of this server only. Browsers drop tabs
/// and line breaks from URLs and read `\` as `/`, so `/\t/x` or `/\\x` would lead to
/// another site: any control character, space or backslash is refused.
pub(crate) fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/') && !n.starts_with("//") && n.bytes().all(|b| b > b' ' && b != 0x7f && b != b'\\') =>
        {
            n.to_owned()
        }
        _ => "/runs".to_owned(),
    }
}

/// Percent-encodes a query value (`/` kept).
pub(crate) fn encode(text: &str) -> String {
    escape(text, b"-_.~/")
}

/// Percent-encodes one segment of a path (`/` encoded too).
pub(crate) fn segment(text: &str) -> String {
    escape(text, b"-_.~")
}

fn escape(text: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_sends_the_browser_to_this_server_only() {
        assert_eq!(
            safe_next(Some("/runs/abc?level=info#logs")),
            "/runs/abc?level=info#logs"
        );
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "/\t/evil.example",
            "/\n/evil.example",
            "https://evil.example",
            "evil.example",
            "/ /x",
        ] {
            assert_eq!(safe_next(Some(bad)), "/runs", "{bad:?}");
        }
        assert_eq!(safe_next(None), "/runs");
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn changes_from_another_site_are_refused() {
        assert!(foreign_origin(&headers(&[("host", "127.0.0.1:4200")])).is_none());
        let same = headers(&[("host", "127.0.0.1:4200"), ("origin", "http://127.0.0.1:4200")]);
        assert!(foreign_origin(&same).is_none());
        let other = headers(&[("host", "127.0.0.1:4200"), ("origin", "http://evil.example")]);
        assert_eq!(foreign_origin(&other).unwrap().status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn the_session_cookie_is_http_only_strict_and_secure_over_https() {
        let plain = cookie(Some("s3cret"), &HeaderMap::new());
        let plain = plain.to_str().unwrap();
        assert!(
            plain.starts_with("kiln_session=s3cret;")
                && plain.contains("HttpOnly")
                && plain.contains("SameSite=Strict")
        );
        assert!(!plain.contains("Secure"));
        let https = cookie(Some("s3cret"), &headers(&[("x-forwarded-proto", "https")]));
        assert!(https.to_str().unwrap().contains("Secure"));
        assert!(cookie(None, &HeaderMap::new()).to_str().unwrap().contains("Max-Age=0"));
        let read = headers(&[("cookie", "a=b; kiln_session=s3cret; c=d")]);
        assert_eq!(session_secret(&read), Some("s3cret"));
    }

    #[test]
    fn csrf_tokens_differ_per_token_and_are_checked() {
        let token = |hash: &str| ApiToken {
            name: "t".into(),
            hash: hash.into(),
            read_only: false,
            created: 0,
            revoked: None,
        };
        let (a, b) = (Viewer::of(&token("blake3:aa")), Viewer::of(&token("blake3:bb")));
        assert_ne!(a.csrf, b.csrf);
        assert!(a.csrf_ok(&a.csrf));
        assert!(!a.csrf_ok(&b.csrf) && !a.csrf_ok(""));
    }
}
