//! `x-request-id` handling, as the contract states it: the caller's id is taken when it is
//! 1–128 visible ASCII characters, otherwise (absent or invalid) a new one is generated and the
//! call is served anyway. The id is echoed in the response metadata, kept in the request's
//! extensions (tonic hands them to the handler, which passes the id on downstream), and recorded
//! on the span the call runs in ([`crate::rpc`]).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

/// The metadata key of the request id.
pub use mesh_proto::headers::REQUEST_ID as REQUEST_ID_HEADER;

/// The longest request id taken from a caller.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A request id: 1–128 visible ASCII characters (`!` to `~`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// Takes `value` as a request id if it is 1–128 visible ASCII characters.
    pub fn parse(value: &[u8]) -> Option<Self> {
        let valid = !value.is_empty()
            && value.len() <= MAX_REQUEST_ID_LEN
            && value.iter().all(|b| b.is_ascii_graphic());
        // Visible ASCII is valid UTF-8, so the conversion cannot fail once the check passed.
        valid
            .then(|| std::str::from_utf8(value).ok().map(|s| Self(s.to_owned())))
            .flatten()
    }

    /// A new, unique id: a UUIDv7, so ids sort by the time they were made.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as a header value, for the response and for downstream calls.
    pub fn header_value(&self) -> HeaderValue {
        // Only visible ASCII gets in, and that is always a valid header value.
        HeaderValue::from_str(&self.0).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }

    /// The caller's valid id, or a new one.
    pub fn from_headers(headers: &http::HeaderMap) -> Self {
        headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| Self::parse(v.as_bytes()))
            .unwrap_or_else(Self::generate)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tower layer that gives every call a [`RequestId`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

/// The service made by [`RequestIdLayer`].
#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B, ResB> Service<Request<B>> for RequestIdService<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Future: Send + 'static,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let id = RequestId::from_headers(request.headers());
        let header = id.header_value();
        // The handler and every downstream call see the id actually used, not an invalid one.
        request
            .headers_mut()
            .insert(REQUEST_ID_HEADER, header.clone());
        // The call's span (made by the trace layer inside this one) records the id.
        request.extensions_mut().insert(id);
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            response.headers_mut().insert(REQUEST_ID_HEADER, header);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt as _;

    /// Valid ids are taken as they are; empty, long, spaced or non-ASCII ones are refused.
    #[test]
    fn parse_accepts_visible_ascii_only() {
        assert_eq!(
            RequestId::parse(b"abc-123").map(|r| r.0),
            Some("abc-123".into())
        );
        assert!(RequestId::parse(&[b'x'; 128]).is_some());
        assert!(RequestId::parse(&[b'x'; 129]).is_none());
        assert!(RequestId::parse(b"").is_none());
        assert!(RequestId::parse(b"has space").is_none());
        assert!(RequestId::parse("é".as_bytes()).is_none());
        assert!(RequestId::parse(b"tab\t").is_none());
    }

    /// Generated ids are unique, valid request ids.
    #[test]
    fn generated_ids_are_valid_and_unique() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert_ne!(a, b);
        assert!(RequestId::parse(a.as_str().as_bytes()).is_some());
    }

    async fn round_trip(header: Option<&'static str>) -> (String, String) {
        let svc = RequestIdLayer.layer(tower::service_fn(|req: Request<()>| async move {
            let seen = req.extensions().get::<RequestId>().map(|r| r.to_string());
            Ok::<_, Infallible>(Response::new(seen.unwrap_or_default()))
        }));
        let mut req = Request::builder().uri("/pkg.Svc/Method");
        if let Some(h) = header {
            req = req.header(REQUEST_ID_HEADER, h);
        }
        let resp = svc
            .oneshot(req.body(()).expect("request"))
            .await
            .expect("infallible");
        let echoed = resp.headers()[REQUEST_ID_HEADER]
            .to_str()
            .expect("ascii")
            .to_owned();
        (resp.into_body(), echoed)
    }

    /// The caller's valid id reaches the handler and is echoed back.
    #[tokio::test]
    async fn valid_id_is_kept_and_echoed() {
        let (seen, echoed) = round_trip(Some("req-42")).await;
        assert_eq!(seen, "req-42");
        assert_eq!(echoed, "req-42");
    }

    /// An absent or invalid id is replaced by a generated one, which is echoed.
    #[tokio::test]
    async fn missing_or_invalid_id_is_replaced() {
        for header in [None, Some("two words")] {
            let (seen, echoed) = round_trip(header).await;
            assert_eq!(seen, echoed);
            assert!(uuid::Uuid::parse_str(&seen).is_ok(), "{seen}");
        }
    }
}
