//! The tower layer that authorizes every gRPC call before a service sees it: it reads the
//! method from the path, the bearer token from the `authorization` header and the client
//! certificate from the TLS connection, answers a refusal itself, and puts the [`Principal`]
//! of an allowed call in the request's extensions for the service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus::IntCounterVec;
use tower::{Layer, Service};

use super::{Authenticator, Principal};

#[derive(Debug, Clone)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
    refused: IntCounterVec,
}

impl AuthLayer {
    /// `refused` counts refusals by gRPC code.
    pub fn new(authenticator: Arc<Authenticator>, refused: IntCounterVec) -> Self {
        AuthLayer { authenticator, refused }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authorized<S>;

    fn layer(&self, inner: S) -> Authorized<S> {
        Authorized { inner, authenticator: self.authenticator.clone(), refused: self.refused.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct Authorized<S> {
    inner: S,
    authenticator: Arc<Authenticator>,
    refused: IntCounterVec,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> Service<http::Request<B>> for Authorized<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let authorization = request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        let certs = request.extensions().get::<crate::tls::PeerInfo>().and_then(|info| info.certs.clone());
        match self.authenticator.authorize(request.uri().path(), authorization, certs.as_deref().map(Vec::as_slice)) {
            Ok(principal) => {
                if let Some(principal) = principal {
                    request.extensions_mut().insert::<Principal>(principal);
                }
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                let code = match status.code() {
                    tonic::Code::Unauthenticated => "unauthenticated",
                    _ => "permission_denied",
                };
                self.refused.with_label_values(&[code]).inc();
                tracing::debug!(path = request.uri().path(), code, "{}", status.message());
                let response = status.into_http::<R>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}
