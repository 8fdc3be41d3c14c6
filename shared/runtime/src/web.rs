//! gRPC-Web for browsers, and the CORS rules in front of it.
//!
//! A browser cannot speak native gRPC (`fetch` has no HTTP/2 trailers), so the public facade
//! also speaks gRPC-Web on its own port: `tonic-web`'s layer turns each gRPC-Web call
//! (`application/grpc-web`, `application/grpc-web+proto`, `-text` for base64) into a gRPC call
//! before any of the mesh's layers see it, and its answer back, trailers as the last frame. The
//! request id, trace context, deadlines, size limits, permits and authentication apply exactly
//! as to a native call. HTTP/1.1 is accepted only on a server whose [`WebAccess`] is set (a
//! gRPC-Web client over HTTP/2 works on every mesh server, and meets the same rules).
//!
//! CORS is `tower-http`'s layer, strict by default: no origin is allowed unless named
//! (`--cors-origin`, exact `scheme://host[:port]`, no wildcard). The bearer token travels in
//! the `authorization` header, never in a cookie, so no credentials are allowed either.
//!
//! CORS alone only keeps a page from *reading* answers: a page of any site may still *send* a
//! simple `POST` (`fetch` with `mode: "no-cors"`, no preflight), and over plaintext HTTP/1.1 a
//! DNS-rebinding page even reads them. So [`GuardLayer`], in front of CORS, refuses every
//! request whose `Origin` is not named (403): browsers send `Origin` with every `POST`, native
//! gRPC clients send none. It also bounds a request's header block as HTTP/2's is bounded
//! (431 beyond [`crate::MAX_HEADER_LIST_BYTES`]), since hyper's HTTP/1.1 parser alone takes
//! about 400 KiB and tonic does not expose its limit.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::{Either, Ready, ready};
use http::{HeaderName, HeaderValue, Method, StatusCode};
use mesh_proto::headers::name;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may cache a preflight answer (Chromium caps it at two hours).
pub const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(2 * 60 * 60);

/// Request headers a browser's gRPC-Web call may carry.
const ALLOWED_HEADERS: [HeaderName; 9] = [
    http::header::CONTENT_TYPE,
    name::AUTHORIZATION,
    name::GRPC_TIMEOUT,
    name::REQUEST_ID,
    name::TRACEPARENT,
    name::TRACESTATE,
    HeaderName::from_static("x-grpc-web"),
    HeaderName::from_static("x-user-agent"),
    HeaderName::from_static("grpc-accept-encoding"),
];

/// Response headers a page's script may read: a trailers-only answer carries its status in the
/// headers, and a shed call its `retry-after`.
const EXPOSED_HEADERS: [HeaderName; 5] = [
    name::GRPC_STATUS,
    HeaderName::from_static("grpc-message"),
    HeaderName::from_static("grpc-status-details-bin"),
    name::REQUEST_ID,
    name::RETRY_AFTER,
];

/// Which browser pages may call a server over gRPC-Web.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebAccess {
    origins: Vec<HeaderValue>,
}

impl WebAccess {
    /// Pages from exactly these origins may call (none: gRPC-Web is served, but no browser page
    /// of another origin may use it).
    pub fn new(origins: impl IntoIterator<Item = Origin>) -> Self {
        Self {
            origins: origins.into_iter().map(|o| o.0).collect(),
        }
    }

    /// The origins allowed.
    pub fn origins(&self) -> impl Iterator<Item = &str> {
        self.origins.iter().filter_map(|o| o.to_str().ok())
    }

    /// The guard in front of CORS: requests from other origins refused, header blocks bounded
    /// to `max_header_bytes` (counted as HTTP/2 counts a header list: name, value and 32 bytes
    /// per entry).
    pub fn guard(&self, max_header_bytes: usize) -> GuardLayer {
        GuardLayer {
            allowed: self.origins.clone().into(),
            max_header_bytes,
        }
    }

    /// The CORS layer for these origins: preflights answered at once, `POST` only, the
    /// gRPC-Web headers allowed and the status headers exposed.
    pub fn cors(&self) -> CorsLayer {
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(self.origins.clone()))
            .allow_methods([Method::POST])
            .allow_headers(ALLOWED_HEADERS)
            .expose_headers(EXPOSED_HEADERS)
            .max_age(PREFLIGHT_MAX_AGE)
    }
}

/// Refuses requests from origins not named, and header blocks beyond the bound: see the
/// [module](self).
#[derive(Debug, Clone)]
pub struct GuardLayer {
    allowed: Arc<[HeaderValue]>,
    max_header_bytes: usize,
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard {
            inner,
            allowed: self.allowed.clone(),
            max_header_bytes: self.max_header_bytes,
        }
    }
}

/// The service of [`GuardLayer`].
#[derive(Debug, Clone)]
pub struct Guard<S> {
    inner: S,
    allowed: Arc<[HeaderValue]>,
    max_header_bytes: usize,
}

impl<S, B> tower::Service<http::Request<B>> for Guard<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let headers = request.headers();
        let header_bytes: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        if header_bytes > self.max_header_bytes {
            return Either::Right(ready(Ok(refusal(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ))));
        }
        if let Some(origin) = headers.get(http::header::ORIGIN)
            && !self.allowed.contains(origin)
        {
            return Either::Right(ready(Ok(refusal(StatusCode::FORBIDDEN))));
        }
        Either::Left(self.inner.call(request))
    }
}

/// An HTTP refusal with no body: the request never reaches gRPC.
fn refusal(status: StatusCode) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(tonic::body::Body::empty());
    *response.status_mut() = status;
    response
}

/// A web origin, `scheme://host[:port]`, as a browser sends it in `Origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin(HeaderValue);

impl Origin {
    /// The origin's text.
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses an origin for `--cors-origin`: `http` or `https`, a host, an optional port, and
/// nothing else (no path, no trailing slash, no wildcard), so it matches a browser's `Origin`
/// header byte for byte.
pub fn parse_origin(s: &str) -> Result<Origin, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("{s:?} is not an origin (scheme://host[:port]): {e}"))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    if !matches!(scheme, "http" | "https") {
        return Err(format!(
            "{s:?} is not an origin: it must start with http:// or https://"
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("{s:?} is not an origin: it names no host"));
    };
    if authority.as_str().contains('@') || authority.host().contains('*') {
        return Err(format!(
            "{s:?} is not an origin: no user name or wildcard may appear in it"
        ));
    }
    let default_port = if scheme == "https" { 443 } else { 80 };
    if authority.port_u16() == Some(default_port) {
        return Err(format!(
            "{s:?} is not an origin as browsers send it: leave out the default port {default_port}"
        ));
    }
    let canonical = format!("{scheme}://{}", authority.as_str().to_ascii_lowercase());
    if canonical != s {
        return Err(format!(
            "{s:?} is not an origin as browsers send it: write it as {canonical:?} (lower case, \
             no path, no trailing slash)"
        ));
    }
    HeaderValue::from_str(s)
        .map(Origin)
        .map_err(|e| format!("{s:?} is not an origin: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_exactly() {
        for good in [
            "http://127.0.0.1:8080",
            "https://console.example.com",
            "http://[::1]:8080",
        ] {
            assert_eq!(
                parse_origin(good).map(|o| o.to_string()),
                Ok(good.to_owned())
            );
        }
        for bad in [
            "",
            "*",
            "127.0.0.1:8080",
            "ftp://example.com",
            "https://example.com/",
            "https://example.com/page",
            "https://*.example.com",
            "https://user@example.com",
            "https://example.com?x=1",
            "https://Example.com",
            "https://example.com:443",
            "http://example.com:80",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn access_lists_its_origins() {
        let access = WebAccess::new([parse_origin("http://127.0.0.1:8080").expect("origin")]);
        assert_eq!(
            access.origins().collect::<Vec<_>>(),
            ["http://127.0.0.1:8080"]
        );
        assert_eq!(WebAccess::default().origins().count(), 0);
    }
}
