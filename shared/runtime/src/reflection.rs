//! Server reflection v1 and v1alpha that answer every request on the open stream.
//!
//! tonic-reflection 0.14 ends the whole stream with a `NOT_FOUND` status when a client asks for
//! a symbol or file it does not know (`server/v1.rs`), where the reflection protocol and
//! grpc-go answer with an `error_response` message and keep the stream open for the client's
//! next request. The mesh keeps tonic-reflection for what it does well — indexing the
//! descriptor sets, listing and describing — and puts this adapter in front: each request of
//! the client's stream is passed to tonic-reflection's service on its own one-request stream,
//! in-process (the service itself is the client's transport: no socket), and a failure comes
//! back as an `error_response` naming the failure's code, on the still-open stream.

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// A generated server used as a client's transport, in-process.
pub trait InProcess:
    tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> InProcess for T where
    T: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
            Future: Send,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// A boxed stream of reflection responses.
type ReplyStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

macro_rules! reflection_adapter {
    ($version:ident, $name:ident) => {
        #[doc = concat!(
            "Server reflection `", stringify!($version),
            "` whose unknown symbols and files are `error_response` messages."
        )]
        #[derive(Debug, Clone)]
        pub struct $name<T> {
            inner: tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient<T>,
        }

        impl<T> $name<T> {
            /// Answers through `service` (tonic-reflection's), called in-process.
            pub fn new(service: T) -> Self
            where
                T: InProcess,
            {
                Self {
                    inner: tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient::new(service),
                }
            }
        }

        #[tonic::async_trait]
        impl<T> tonic_reflection::pb::$version::server_reflection_server::ServerReflection
            for $name<T>
        where
            T: InProcess,
        {
            type ServerReflectionInfoStream =
                ReplyStream<tonic_reflection::pb::$version::ServerReflectionResponse>;

            async fn server_reflection_info(
                &self,
                request: Request<Streaming<tonic_reflection::pb::$version::ServerReflectionRequest>>,
            ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
                use tonic_reflection::pb::$version::{
                    ErrorResponse, ServerReflectionResponse,
                    server_reflection_response::MessageResponse,
                };
                let mut requests = request.into_inner();
                let inner = self.inner.clone();
                // One reply in flight: the client reads before it gets the next.
                let (tx, rx) = mpsc::channel(1);
                tokio::spawn(async move {
                    while let Some(Ok(asked)) = requests.next().await {
                        let mut inner = inner.clone();
                        let answered = async {
                            inner
                                .server_reflection_info(tokio_stream::once(asked.clone()))
                                .await?
                                .into_inner()
                                .message()
                                .await?
                                .ok_or_else(|| Status::internal("no reflection answer"))
                        }
                        .await;
                        let reply = answered.unwrap_or_else(|status| ServerReflectionResponse {
                            valid_host: asked.host.clone(),
                            original_request: Some(asked),
                            message_response: Some(MessageResponse::ErrorResponse(
                                ErrorResponse {
                                    error_code: status.code() as i32,
                                    error_message: status.message().to_owned(),
                                },
                            )),
                        });
                        if tx.send(Ok(reply)).await.is_err() {
                            return;
                        }
                    }
                });
                Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
            }
        }
    };
}

reflection_adapter!(v1, ReflectionV1);
reflection_adapter!(v1alpha, ReflectionV1Alpha);
