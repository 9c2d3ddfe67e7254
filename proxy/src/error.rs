//! Errors that reach a client, and the one place that decides their HTTP
//! status, OpenAI error `type` and `code`.
//!
//! Everything on the request path returns [`ApiError`]; it becomes the
//! OpenAI error JSON (`{"error": {"message", "type", "code", "param"}}`) only
//! at the edge, in [`ApiError::into_response`].

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::body::{full, Body};

/// What went wrong, which fixes the status, type and code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The body is not JSON, or not the shape the endpoint needs.
    InvalidRequest,
    /// The body is larger than `server.max_body_bytes`.
    BodyTooLarge,
    /// The body did not arrive within `server.body_read_timeout_ms`.
    BodyTimeout,
    /// No pool serves the requested model.
    ModelNotFound,
    /// No such path.
    NotFound,
    /// The path exists but not with this method.
    MethodNotAllowed,
    /// The routing policy refused the request with this status.
    PolicyRejected(u16),
    /// The routing policy failed and `policy.on_error` is `reject`.
    PolicyFailed,
    /// The prompt and answer cannot fit the model's context.
    ContextLengthExceeded,
    /// The pool's queue is full; the response says when to retry.
    Overloaded,
    /// The pool's queue is full and its upstream is failing; the response
    /// says when to retry.
    PoolUnavailable,
    /// The pool's server is scaled to zero or starting, and the request
    /// cannot wait for it (held too many, deadline, failed start); the
    /// response says when to retry.
    PoolCold,
    /// The request's `x-switchyard-deadline-ms` cannot be met.
    DeadlineExceeded,
    /// The upstream could not be reached (refused, reset, unreachable).
    UpstreamUnavailable,
    /// The upstream did not answer within the pool's timeout.
    UpstreamTimeout,
    /// The pool's circuit breaker is open after repeated upstream
    /// failures; the response says when to retry.
    CircuitOpen,
    /// The upstream answered with something that could not be used.
    UpstreamInvalid,
    /// A captured connection's original destination is in no pool's
    /// `capture` list.
    UnknownDestination,
    /// A connection reached the transparent listener without being
    /// redirected there.
    NotRedirected,
    /// The request carries this process's own hop id: it was sent
    /// upstream by this process and came back.
    LoopDetected,
    /// Switchyard is shutting down.
    ShuttingDown,
    /// A bug or an exhausted resource inside Switchyard.
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidRequest => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::ModelNotFound | Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            // A plugin may only reject with a client or server error.
            Self::PolicyRejected(status @ 400..=599) => {
                StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN)
            }
            Self::PolicyRejected(_) => StatusCode::FORBIDDEN,
            Self::PolicyFailed => StatusCode::SERVICE_UNAVAILABLE,
            Self::ContextLengthExceeded => StatusCode::BAD_REQUEST,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::PoolUnavailable | Self::PoolCold => StatusCode::SERVICE_UNAVAILABLE,
            Self::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamUnavailable | Self::UpstreamInvalid => StatusCode::BAD_GATEWAY,
            Self::UnknownDestination => StatusCode::BAD_GATEWAY,
            Self::NotRedirected => StatusCode::MISDIRECTED_REQUEST,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::CircuitOpen => StatusCode::SERVICE_UNAVAILABLE,
            Self::LoopDetected => StatusCode::LOOP_DETECTED,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the error says the pool's upstream cannot be reached now
    /// (its connection failed, or its circuit breaker is open), which is
    /// what marks a coalescing pool unavailable.
    pub fn is_unreachable(self) -> bool {
        matches!(self, Self::UpstreamUnavailable | Self::CircuitOpen)
    }

    /// The OpenAI error `type`.
    pub fn error_type(self) -> &'static str {
        match self {
            Self::InvalidRequest
            | Self::BodyTooLarge
            | Self::BodyTimeout
            | Self::ModelNotFound
            | Self::NotFound
            | Self::MethodNotAllowed
            | Self::ContextLengthExceeded
            | Self::NotRedirected => "invalid_request_error",
            Self::Overloaded => "rate_limit_error",
            Self::PolicyRejected(status) if status < 500 => "invalid_request_error",
            Self::PolicyRejected(_)
            | Self::PolicyFailed
            | Self::ShuttingDown
            | Self::Internal
            | Self::PoolUnavailable
            | Self::PoolCold
            | Self::LoopDetected => "server_error",
            Self::DeadlineExceeded => "timeout_error",
            Self::UpstreamUnavailable
            | Self::UpstreamTimeout
            | Self::UpstreamInvalid
            | Self::CircuitOpen
            | Self::UnknownDestination => "upstream_error",
        }
    }

    /// The OpenAI error `code`: short, stable, for programs to match on.
    pub fn code(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::BodyTooLarge => "body_too_large",
            Self::BodyTimeout => "body_timeout",
            Self::ModelNotFound => "model_not_found",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PolicyRejected(_) => "policy_rejected",
            Self::PolicyFailed => "policy_failed",
            Self::ContextLengthExceeded => "context_length_exceeded",
            Self::Overloaded => "overloaded",
            Self::PoolUnavailable => "pool_unavailable",
            Self::PoolCold => "pool_cold",
            Self::DeadlineExceeded => "deadline_exceeded",
            // A client handles both as "no upstream now"; the status (502
            // or 503 with Retry-After) says whether to wait.
            Self::UpstreamUnavailable | Self::CircuitOpen => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamInvalid => "upstream_invalid_response",
            Self::UnknownDestination => "unknown_destination",
            Self::NotRedirected => "not_redirected",
            Self::LoopDetected => "loop_detected",
            Self::ShuttingDown => "shutting_down",
            Self::Internal => "internal_error",
        }
    }
}

/// An error on its way to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, where there is one.
    pub param: Option<&'static str>,
    /// When the client may try again; sent as `Retry-After` (seconds) and
    /// `retry-after-ms`, which OpenAI's client libraries honour.
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    /// A required field is absent.
    pub fn missing(field: &'static str) -> Self {
        let message = format!("missing required field `{field}`");
        Self {
            param: Some(field),
            ..Self::invalid(message)
        }
    }

    /// A field has the wrong type or value.
    pub fn bad_field(field: &'static str, expected: &str) -> Self {
        let message = format!("field `{field}` must be {expected}");
        Self {
            param: Some(field),
            ..Self::invalid(message)
        }
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// The OpenAI error JSON.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind.error_type(),
                "code": self.kind.code(),
                "param": self.param,
            }
        })
    }

    pub fn into_response(self) -> Response<Body> {
        let body = Bytes::from(self.to_json().to_string());
        let mut response = Response::new(full(body));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(wait) = self.retry_after {
            let seconds = wait.as_millis().div_ceil(1000).max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds as u64));
            headers.insert("retry-after-ms", HeaderValue::from(wait.as_millis() as u64));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_field_is_a_400_naming_the_field() {
        let err = ApiError::missing("messages");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        let json = err.to_json();
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert_eq!(json["error"]["param"], "messages");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains("messages"));
    }

    #[test]
    fn policy_rejection_keeps_the_plugins_status() {
        let kind = ErrorKind::PolicyRejected(429);
        assert_eq!(kind.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(kind.error_type(), "invalid_request_error");
        let bogus = ErrorKind::PolicyRejected(200);
        assert_eq!(bogus.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn upstream_kinds_map_to_gateway_statuses() {
        assert_eq!(ErrorKind::UpstreamUnavailable.status().as_u16(), 502);
        assert_eq!(ErrorKind::UpstreamTimeout.status().as_u16(), 504);
        assert_eq!(ErrorKind::CircuitOpen.status().as_u16(), 503);
        assert_eq!(ErrorKind::CircuitOpen.code(), "upstream_unavailable");
    }

    #[test]
    fn capture_refusals_are_a_502_and_a_421() {
        let unknown = ErrorKind::UnknownDestination;
        assert_eq!(unknown.status().as_u16(), 502);
        assert_eq!(unknown.code(), "unknown_destination");
        let direct = ErrorKind::NotRedirected;
        assert_eq!(direct.status().as_u16(), 421);
        assert_eq!(direct.error_type(), "invalid_request_error");
    }
}
