//! The admin listener: `/healthz` (the process runs), `/readyz` (every credential holds a
//! valid token) and `/metrics` (Prometheus). None ever shows a token.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::Arc;

use arc_swap::ArcSwap;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::proxy::json_response;
use crate::token::slot::{SlotState, TokenSlot};

/// Serves the admin endpoints over the credentials' slots.
#[derive(Debug, Clone)]
pub struct AdminService {
    slots: Arc<ArcSwap<Vec<Arc<TokenSlot>>>>,
    metrics: Arc<Metrics>,
}

impl AdminService {
    /// An admin service reporting on the credentials in `slots` (swapped on reload) and on
    /// `metrics`.
    pub fn new(slots: Arc<ArcSwap<Vec<Arc<TokenSlot>>>>, metrics: Arc<Metrics>) -> Self {
        AdminService { slots, metrics }
    }

    /// `/readyz`: status and JSON per credential.
    pub fn readiness(&self) -> (StatusCode, Value) {
        let now = Instant::now();
        let mut ready = true;
        let mut creds = Map::new();
        for slot in self.slots.load().iter() {
            let (state, left, error) = slot.status(now);
            ready &= state == SlotState::Valid;
            creds.insert(
                slot.name().to_string(),
                json!({
                    "state": state.as_str(),
                    "expires_in_secs": left.map(|d| d.as_secs()),
                    "last_error": error,
                }),
            );
        }
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, json!({ "ready": ready, "credentials": creds }))
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed", "message": "admin endpoints answer GET only"}),
            );
        }
        match req.uri().path() {
            "/healthz" => json_response(StatusCode::OK, &json!({"status": "ok"})),
            "/readyz" => {
                let (status, body) = self.readiness();
                json_response(status, &body)
            }
            "/metrics" => {
                let mut response = Response::new(Full::new(Bytes::from(self.metrics.render())));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            _ => json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found", "message": "admin endpoints: /healthz, /readyz, /metrics"}),
            ),
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for AdminService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        ready(Ok(self.respond(&req)))
    }
}
