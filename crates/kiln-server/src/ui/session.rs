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

/// The cookie that logs the browser in with `secret` (or out, with `None`).
pub(crate) fn cookie(secret: Option<&str>) -> HeaderValue {
    let value = match secret {
        Some(secret) => format!("{COOKIE}={secret}; Path=/; HttpOnly; SameSite=Strict"),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    };
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("kiln_session=; Max-Age=0"))
}

/// Where a login may send the browser next: a path of this server only.
pub(crate) fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_owned(),
        _ => "/runs".to_owned(),
    }
}

/// Percent-encodes a query value.
pub(crate) fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
