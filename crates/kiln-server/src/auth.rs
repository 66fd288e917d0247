//! Bearer tokens: checked against the hashes in the database, which every server sharing
//! it sees (a revoked token is refused by all of them within `FRESH`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_store::Store;
use kiln_store::model::ApiToken;

use crate::Problem;

/// How long the token list is reused before it is read again.
const FRESH: Duration = Duration::from_secs(2);

pub(crate) struct Auth {
    store: Arc<dyn Store>,
    tokens: Mutex<Option<(Instant, Arc<Vec<ApiToken>>)>>,
}

impl Auth {
    pub(crate) fn new(store: Arc<dyn Store>) -> Auth {
        Auth {
            store,
            tokens: Mutex::new(None),
        }
    }

    pub(crate) async fn tokens(&self) -> Result<Arc<Vec<ApiToken>>, Problem> {
        if let Some((at, tokens)) = &*self.tokens.lock().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < FRESH
        {
            return Ok(tokens.clone());
        }
        let tokens = Arc::new(self.store.api_tokens().await?);
        *self.tokens.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), tokens.clone()));
        Ok(tokens)
    }
}

fn refuse(status: StatusCode, detail: &str) -> Response {
    let mut response = Problem::new(status, detail).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// Lets a request through when its token allows it (or no token exists yet).
pub(crate) async fn check(State(auth): State<Arc<Auth>>, request: Request, next: Next) -> Response {
    if request.uri().path() == "/api/health" {
        return next.run(request).await;
    }
    let tokens = match auth.tokens().await {
        Ok(tokens) => tokens,
        Err(problem) => return problem.into_response(),
    };
    if tokens.is_empty() {
        // No token was ever created: an open server, which `kiln server start` only
        // allows on a loopback address.
        return next.run(request).await;
    }
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // The web UI's session cookie stands for the token on reads only (its pictures and
    // downloads): a request that changes something must name its token itself, so that no
    // other site can make a logged-in browser send one.
    let reading = matches!(*request.method(), Method::GET | Method::HEAD);
    let presented = bearer.or_else(|| reading.then(|| crate::ui::session_secret(request.headers())).flatten());
    let Some(secret) = presented else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "this server requires a token: send `Authorization: Bearer <token>` (KILN_API_KEY); create one with \
             `kiln server token create NAME` on the server",
        );
    };
    let hash = ApiToken::hash_secret(secret);
    let Some(token) = tokens.iter().find(|t| t.hash == hash && t.revoked.is_none()) else {
        return refuse(StatusCode::UNAUTHORIZED, "this token is unknown or was revoked");
    };
    if token.read_only && !matches!(*request.method(), Method::GET | Method::HEAD) {
        return refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "token '{}' is read-only; this request would change something",
                token.name
            ),
        );
    }
    next.run(request).await
}
