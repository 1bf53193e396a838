//! Console sessions: what lets a browser's `EventSource` (which cannot send an
//! `Authorization` header) open the live stream without the API token in the URL.
//!
//! `POST /v1/session` with a bearer token answers who the token is (name and
//! scope, for the console to offer only the actions it may take) and sets a
//! cookie that is valid only on `/v1/stream` (`Path=/v1/stream`, `HttpOnly`,
//! `SameSite=Strict`), for [`SESSION_TTL`]. The cookie is `NAME.EXPIRY.MAC`,
//! the MAC an HMAC-SHA256 of name and expiry keyed by the token's own secret:
//! nothing is kept on the server, so a session survives a control-plane restart,
//! and removing or rotating the token ends its sessions. `DELETE /v1/session`
//! clears the cookie.

use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{auth::Token, ApiState, Scope, Tokens};

/// The cookie's name.
pub const COOKIE: &str = "trainyard_stream";
/// How long a session lasts.
pub const SESSION_TTL: chrono::Duration = chrono::Duration::hours(12);

/// The bearer token of a request, if it has one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
}

fn mac(token: &Token, name: &str, expires: i64) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(token.secret()).expect("HMAC takes a key of any length");
    m.update(format!("trainyard-session\n{name}\n{expires}").as_bytes());
    m
}

/// The cookie value of a session of `token` until `expires`.
pub fn sign(token: &Token, expires: DateTime<Utc>) -> String {
    let at = expires.timestamp();
    let tag = mac(token, &token.name, at).finalize().into_bytes();
    format!("{}.{at}.{}", URL_SAFE_NO_PAD.encode(&token.name), URL_SAFE_NO_PAD.encode(tag))
}

/// The token of a session cookie value still valid at `now`.
pub fn verify<'a>(tokens: &'a Tokens, value: &str, now: DateTime<Utc>) -> Option<&'a Token> {
    let mut parts = value.trim().split('.');
    let (name, at, tag) = (parts.next()?, parts.next()?, parts.next()?);
    let name = String::from_utf8(URL_SAFE_NO_PAD.decode(name).ok()?).ok()?;
    let at: i64 = at.parse().ok()?;
    let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
    if parts.next().is_some() || at < now.timestamp() {
        return None;
    }
    // Names need not be unique: any token of that name whose secret signed it.
    tokens.iter().find(|t| t.name == name && mac(t, &name, at).verify_slice(&tag).is_ok())
}

/// The session cookie of a request, if it has one.
pub fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

fn refused(msg: &str) -> Response {
    super::errors::unauthorized(msg)
}

/// `POST /v1/session`: who the bearer token is, and the stream cookie.
#[utoipa::path(post, path = "/v1/session", tag = "console", security(("bearer" = [])),
    responses((status = 200, description = "who the token is; sets the stream cookie", body = Whoami,
            headers(("Set-Cookie" = String, description = "`trainyard_stream=...; Path=/v1/stream; HttpOnly; SameSite=Strict`"))),
        super::errors::AuthResponses))]
pub async fn sign_in(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    let Some(presented) = bearer(&headers) else { return refused("missing bearer token") };
    let Some(token) = s.tokens.check(presented) else { return refused("invalid token") };
    let value = sign(token, Utc::now() + SESSION_TTL);
    let set = format!("{COOKIE}={value}; Path=/v1/stream; HttpOnly; SameSite=Strict; Max-Age={}", SESSION_TTL.num_seconds());
    ([(header::SET_COOKIE, set)], Json(Whoami { name: token.name.clone(), scope: token.scope })).into_response()
}

/// `DELETE /v1/session`: clears the stream cookie.
#[utoipa::path(delete, path = "/v1/session", tag = "console",
    responses((status = 204, description = "the cookie cleared", headers(("Set-Cookie" = String, description = "an expired `trainyard_stream` cookie")))))]
pub async fn sign_out() -> Response {
    let set = format!("{COOKIE}=; Path=/v1/stream; HttpOnly; SameSite=Strict; Max-Age=0");
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, set)]).into_response()
}

/// Who a token is.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Whoami {
    /// The token's name.
    pub name: String,
    /// Its scope.
    pub scope: Scope,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_valid_for_its_token_until_it_expires() {
        let tokens = Tokens::parse("alice:read:s3cret,bob:admin:other").unwrap();
        let now = Utc::now();
        let alice = tokens.check("s3cret").unwrap();
        let value = sign(alice, now + chrono::Duration::hours(1));
        assert_eq!(verify(&tokens, &value, now).unwrap().name, "alice");
        // Expired, forged for another name, tampered, or signed by a rotated token: refused.
        assert!(verify(&tokens, &value, now + chrono::Duration::hours(2)).is_none());
        let forged = value.replacen(&URL_SAFE_NO_PAD.encode("alice"), &URL_SAFE_NO_PAD.encode("bob"), 1);
        assert!(verify(&tokens, &forged, now).is_none());
        let parts: Vec<&str> = value.split('.').collect();
        let later = format!("{}.{}.{}", parts[0], parts[1].parse::<i64>().unwrap() + 3600, parts[2]);
        assert!(verify(&tokens, &later, now).is_none());
        let rotated = Tokens::parse("alice:read:new-secret").unwrap();
        assert!(verify(&rotated, &value, now).is_none());
        assert!(verify(&tokens, "garbage", now).is_none());
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, format!("a=1; {COOKIE}=x.1.y; b=2").parse().unwrap());
        assert_eq!(cookie(&h), Some("x.1.y"));
    }
}
