//! The request size limit of streamed requests, answered with `RESOURCE_EXHAUSTED`.
//!
//! tonic refuses an oversized message with `OUT_OF_RANGE`; the contract says
//! `RESOURCE_EXHAUSTED`, and `OUT_OF_RANGE` already means something else in the mesh (a resume
//! position beyond the log). So the limit is enforced before tonic decodes anything. One-message
//! requests are read whole by [`crate::admission`]; the bodies of client-streaming calls are read
//! through [`LimitedBody`], which follows the gRPC framing (a 1-byte flag and a 4-byte big-endian
//! length before each message) and fails the body with a `RESOURCE_EXHAUSTED` status as soon as
//! a frame announces more than the limit. tonic passes a body error that is a `Status` on as that
//! status, and the connection goes on serving.
//!
//! Generated servers must still be given the largest limit as their own
//! `max_decoding_message_size`, or tonic's 4 MiB default would cap a larger configured limit.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf as _, Bytes};
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

/// The size of a gRPC message's frame header.
pub(crate) const HEADER_LEN: usize = 5;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pin_project_lite::pin_project! {
    /// A request body that fails with `RESOURCE_EXHAUSTED` when a gRPC frame announces a message
    /// larger than the limit.
    #[derive(Debug)]
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        max_bytes: usize,
        framing: Framing,
    }
}

impl<B> LimitedBody<B> {
    /// Reads `inner`, refusing messages over `max_bytes`.
    pub fn new(inner: B, max_bytes: usize) -> Self {
        Self {
            inner,
            max_bytes,
            framing: Framing::default(),
        }
    }
}

/// Where the reader is in the stream of length-prefixed messages.
#[derive(Debug, Default)]
struct Framing {
    /// Header bytes collected so far.
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current message still to pass.
    remaining: u64,
}

impl Framing {
    /// Follows `data` through the framing; returns the announced length of the first message
    /// over `max_bytes`, if any.
    fn scan(&mut self, mut data: &[u8], max_bytes: usize) -> Option<u64> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                data = &data[skip..];
                self.remaining -= skip as u64;
                continue;
            }
            let take = (HEADER_LEN - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            data = &data[take..];
            if self.header_len == HEADER_LEN {
                let len = u64::from((&self.header[1..]).get_u32());
                if len > max_bytes as u64 {
                    return Some(len);
                }
                self.header_len = 0;
                self.remaining = len;
            }
        }
        None
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Some(len) = this.framing.scan(data, *this.max_bytes)
                {
                    let status = Status::resource_exhausted(format!(
                        "request message of {len} bytes is larger than this method's limit of \
                         {} bytes",
                        this.max_bytes
                    ));
                    return Poll::Ready(Some(Err(Box::new(status))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
            other => other.map(|_| None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut f = vec![0u8];
        f.extend_from_slice(&len.to_be_bytes());
        f.extend(std::iter::repeat_n(7u8, len as usize));
        f
    }

    /// Messages at the limit pass, one byte over is caught, across any chunking.
    #[test]
    fn scan_follows_frames_across_chunks() {
        let mut stream = frame(10);
        stream.extend(frame(16));
        stream.extend(frame(17));
        for chunk in [1, 2, 3, 5, 7, 64] {
            let mut framing = Framing::default();
            let found = stream.chunks(chunk).find_map(|c| framing.scan(c, 16));
            assert_eq!(found, Some(17), "chunk size {chunk}");
        }
    }

    /// A stream of small messages never trips the limit.
    #[test]
    fn small_messages_pass() {
        let mut framing = Framing::default();
        let stream: Vec<u8> = (0..100).flat_map(|_| frame(3)).collect();
        assert_eq!(framing.scan(&stream, 16), None);
        assert_eq!(framing.header_len, 0);
        assert_eq!(framing.remaining, 0);
    }
}
