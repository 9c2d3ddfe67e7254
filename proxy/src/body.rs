//! The response body type every handler returns: a boxed stream of bytes
//! that is either a whole buffer or an upstream body passed through as it
//! arrives.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};

/// Errors a body can end with (an upstream that breaks off mid-stream).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body that is one buffer.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}
