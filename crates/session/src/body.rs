//! The response body of one turn: relays the agent's bytes unbuffered,
//! counts them, and tells the session actor when the turn is over.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::oneshot;

/// What the actor learns when a turn's body is finished.
#[derive(Debug, Clone, Copy)]
pub struct TurnStats {
    pub bytes_out: u64,
    /// False when the body failed or the caller went away mid-stream.
    pub complete: bool,
}

/// Wraps the agent's response body. Dropping it ends the turn too, so a
/// caller that disconnects never blocks the session's queue.
pub struct TurnBody {
    inner: Incoming,
    bytes: u64,
    done: Option<oneshot::Sender<TurnStats>>,
}

impl TurnBody {
    pub(crate) fn new(inner: Incoming, done: oneshot::Sender<TurnStats>) -> Self {
        Self {
            inner,
            bytes: 0,
            done: Some(done),
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(tx) = self.done.take() {
            // The actor may already be gone (terminated); nothing to tell then.
            let _ = tx.send(TurnStats {
                bytes_out: self.bytes,
                complete,
            });
        }
    }
}

impl Body for TurnBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Ready(None) => this.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TurnBody {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}
