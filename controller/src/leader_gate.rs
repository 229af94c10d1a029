//! The gate in front of Watt's gRPC services: a follower answers every call itself with
//! `Unavailable`, naming the leader's address in the `watt-leader` header when it knows it, so
//! agents and `wattctl` go there. The leader's services change with each term (they hold that
//! term's controller), so the gate looks up the current one at every call. Health and reflection
//! stay outside the gate: a follower answers them, and its health says NOT_SERVING for Watt's
//! services, which is how clients probe for the leader. A caretaker (invariant 11) answers the
//! power service, which takes cuts only then, and says so in a `watt-caretaker` header.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tonic::server::NamedService;
use tower::{Service, ServiceExt};

use crate::leadership::Role;

/// A service that exists only while this controller leads.
#[derive(Debug)]
pub struct Gated<S> {
    current: watch::Receiver<Option<S>>,
    role: watch::Receiver<Role>,
    /// Whether a caretaker serves it too.
    caretaker_serves: bool,
}

impl<S> Clone for Gated<S> {
    fn clone(&self) -> Self {
        Gated { current: self.current.clone(), role: self.role.clone(), caretaker_serves: self.caretaker_serves }
    }
}

/// A gated service and the handle that opens it (with a term's service) and closes it.
pub fn gate<S>(role: watch::Receiver<Role>) -> (Gated<S>, watch::Sender<Option<S>>) {
    let (open, current) = watch::channel(None);
    (Gated { current, role, caretaker_serves: false }, open)
}

/// [`gate`], for a service a caretaker answers too (the power service: it takes cuts).
pub fn gate_with_caretaker<S>(role: watch::Receiver<Role>) -> (Gated<S>, watch::Sender<Option<S>>) {
    let (open, current) = watch::channel(None);
    (Gated { current, role, caretaker_serves: true }, open)
}

impl<S: NamedService> NamedService for Gated<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for Gated<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let serves = match &*self.role.borrow() {
            Role::Leader { .. } => true,
            Role::Caretaker { .. } => self.caretaker_serves,
            Role::Follower { .. } => false,
        };
        match self.current.borrow().clone() {
            Some(service) if serves => Box::pin(service.oneshot(request)),
            _ => {
                let response = not_leader(&self.role.borrow()).into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// Names the leader in a `watt-leader` header on every answer a follower gives, health checks
/// included: a client that asked a follower whether it serves learns where to go instead.
#[derive(Debug, Clone)]
pub struct LeaderHintLayer {
    role: watch::Receiver<Role>,
}

impl LeaderHintLayer {
    pub fn new(role: watch::Receiver<Role>) -> Self {
        LeaderHintLayer { role }
    }
}

impl<S> tower::Layer<S> for LeaderHintLayer {
    type Service = LeaderHint<S>;

    fn layer(&self, inner: S) -> LeaderHint<S> {
        LeaderHint { inner, role: self.role.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct LeaderHint<S> {
    inner: S,
    role: watch::Receiver<Role>,
}

impl<S, B, R> Service<http::Request<B>> for LeaderHint<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let hint = match &*self.role.borrow() {
            Role::Follower { leader: Some(at) } => {
                http::HeaderValue::from_str(at).ok().map(|at| (watt_common::client::LEADER_HEADER, at))
            }
            Role::Caretaker { term } => Some((watt_common::client::CARETAKER_HEADER, http::HeaderValue::from(*term))),
            _ => None,
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            if let Some((name, value)) = hint {
                response.headers_mut().insert(name, value);
            }
            Ok(response)
        })
    }
}

/// A follower's answer: `Unavailable`, with the leader's address when one is known.
pub fn not_leader(role: &Role) -> tonic::Status {
    let leader = match role {
        Role::Follower { leader } => leader.clone(),
        Role::Leader { .. } | Role::Caretaker { .. } => None,
    };
    let mut status = tonic::Status::unavailable(match (&leader, role) {
        (Some(at), _) => format!("this controller does not lead; the leader is at {at}"),
        (None, Role::Caretaker { term }) => format!(
            "this controller lost touch with the store and only cares for term {term} (power cuts only); no leader is elected; retry"
        ),
        (None, _) => "this controller does not lead, and no leader is elected yet; retry".to_string(),
    });
    if let Some(value) = leader.and_then(|at| at.parse().ok()) {
        status.metadata_mut().insert(watt_common::client::LEADER_HEADER, value);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_names_the_leader_in_a_header() {
        let status = not_leader(&Role::Follower { leader: Some("https://c-1:7070".into()) });
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(watt_common::client::leader_hint(&status).as_deref(), Some("https://c-1:7070"));
        let none = not_leader(&Role::Follower { leader: None });
        assert_eq!(watt_common::client::leader_hint(&none), None);
        assert!(none.message().contains("no leader"), "{}", none.message());
    }
}
