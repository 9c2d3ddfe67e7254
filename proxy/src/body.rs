//! Body types: the boxed response body every handler returns, the
//! wrapper that passes an upstream body through while watching it for
//! stalls and breaks, and the one that holds a guard until a body ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use tokio::time::{Instant, Sleep};

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

/// Wraps `body` so that `guard` is dropped only with it, when the body
/// ends or its client goes away: a streamed answer keeps what the guard
/// stands for (a queue slot, a request counted in flight) while it
/// streams.
pub fn with_guard<G: Send + Sync + Unpin + 'static>(body: Body, guard: G) -> Body {
    Guarded {
        inner: body,
        _guard: guard,
    }
    .boxed()
}

struct Guarded<G> {
    inner: Body,
    _guard: G,
}

impl<G: Unpin> HttpBody for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream sent nothing for longer than its pool allows.
#[derive(Debug, thiserror::Error)]
#[error("pool {pool:?}: upstream sent nothing for {idle_ms} ms mid-body")]
pub struct BodyStalled {
    pub pool: String,
    pub idle_ms: u128,
}

pin_project_lite::pin_project! {
    /// An upstream body passed through frame by frame. It fails when no
    /// frame arrives within `idle` of the last one, and logs, once, how
    /// the body ended if it did not end cleanly.
    pub struct UpstreamBody<B> {
        #[pin]
        inner: B,
        #[pin]
        stall: Sleep,
        idle: Duration,
        pool: String,
        done: bool,
    }
}

impl<B> UpstreamBody<B> {
    pub fn new(inner: B, pool: &str, idle: Duration) -> Self {
        Self {
            inner,
            stall: tokio::time::sleep(idle),
            idle,
            pool: pool.to_string(),
            done: false,
        }
    }
}

impl<B> HttpBody for UpstreamBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }

        if let Poll::Ready(frame) = this.inner.as_mut().poll_frame(cx) {
            return Poll::Ready(match frame {
                Some(Ok(frame)) => {
                    let next = Instant::now() + *this.idle;
                    this.stall.as_mut().reset(next);
                    Some(Ok(frame))
                }
                Some(Err(e)) => {
                    *this.done = true;
                    let e: BoxError = e.into();
                    tracing::warn!(
                        pool = %this.pool,
                        error = %e,
                        "upstream broke off its response body"
                    );
                    Some(Err(e))
                }
                None => {
                    *this.done = true;
                    None
                }
            });
        }

        ready!(this.stall.poll(cx));
        *this.done = true;
        let stalled = BodyStalled {
            pool: this.pool.clone(),
            idle_ms: this.idle.as_millis(),
        };
        tracing::warn!(
            pool = %this.pool,
            idle_ms = stalled.idle_ms,
            "upstream stalled mid-body; cutting the response off"
        );
        Poll::Ready(Some(Err(Box::new(stalled))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// A body whose frames come from a channel; it ends when the sender
    /// is dropped.
    struct ChannelBody(mpsc::Receiver<Bytes>);

    impl HttpBody for ChannelBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|d| Ok(Frame::data(d))))
        }
    }

    fn watched(idle_s: u64) -> (mpsc::Sender<Bytes>, UpstreamBody<ChannelBody>) {
        let (tx, rx) = mpsc::channel(4);
        let idle = Duration::from_secs(idle_s);
        (tx, UpstreamBody::new(ChannelBody(rx), "small", idle))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_fails_after_the_idle_time() {
        let (tx, body) = watched(5);
        tx.send(Bytes::from("a")).await.unwrap();

        let mut body = std::pin::pin!(body);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");

        // Nothing more arrives; the paused clock jumps to the deadline.
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("5000 ms"), "{err}");
        assert!(body.frame().await.is_none());
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn frames_within_the_idle_time_pass_through() {
        let (tx, body) = watched(5);
        tokio::spawn(async move {
            for chunk in ["a", "b", "c"] {
                tokio::time::sleep(Duration::from_secs(4)).await;
                tx.send(Bytes::from(chunk)).await.unwrap();
            }
        });
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected, "abc");
    }
}

/// A body whose chunks another task produces, ending when that task drops
/// its sender. Dropping the body (the client left) closes the channel, which
/// the producer sees at its next send.
#[derive(Debug)]
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    /// A body and the sender that feeds it, buffering up to `depth` chunks.
    pub fn channel(depth: usize) -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel(depth);
        (tx, ChannelBody { rx }.boxed())
    }
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}
