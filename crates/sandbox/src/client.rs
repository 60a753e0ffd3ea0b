//! The host's side of the guest channel, independent of the substrate: any
//! byte stream (a socketpair here, a virtio-serial port in a VM) works.
//!
//! Everything the guest sends is hostile input: the preamble is one bounded
//! line, HTTP/2 runs with explicit frame, header-list and window limits, and
//! guest-generated JSON bodies are read through a size limit.

use std::time::Duration;

use berth_guest::proto::{
    GuestStatus, SetupFailure, FAILED_PREFIX, MAX_PREAMBLE, READY_LINE, RESERVED_PREFIX,
    SHUTDOWN_PATH, STATUS_PATH,
};
use bytes::Bytes;
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::watch;

use crate::{BoxBody, DriverError};

/// Limits on what the guest may send on the channel.
#[derive(Debug, Clone)]
pub struct ChannelLimits {
    /// Largest header list of one response (default 64 KiB).
    pub max_header_list_size: u32,
    /// Largest HTTP/2 frame (default 16 KiB, the protocol minimum).
    pub max_frame_size: u32,
    /// Largest body of a guest-generated JSON answer (default 64 KiB).
    pub max_control_body: usize,
}

impl Default for ChannelLimits {
    fn default() -> Self {
        ChannelLimits {
            max_header_list_size: 64 * 1024,
            max_frame_size: 16 * 1024,
            max_control_body: 64 * 1024,
        }
    }
}

/// An HTTP/2 connection to one guest.
#[derive(Clone)]
pub struct GuestClient {
    sender: SendRequest<BoxBody>,
    closed: watch::Receiver<bool>,
    limits: ChannelLimits,
}

/// Reads the guest's one-line preamble: `ok`, or `err <json>` on failure.
/// Reads byte by byte so that nothing of the HTTP/2 stream is consumed.
pub async fn read_preamble<T: AsyncRead + Unpin>(io: &mut T) -> Result<(), DriverError> {
    let mut line = Vec::with_capacity(64);
    loop {
        let byte = match io.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(DriverError::GuestGone)
            }
            Err(e) => return Err(DriverError::io("read preamble", "<channel>")(e)),
        };
        if byte == b'\n' {
            break;
        }
        if line.len() >= MAX_PREAMBLE {
            return Err(DriverError::BadPreamble);
        }
        line.push(byte);
    }
    if line == READY_LINE.as_bytes() {
        return Ok(());
    }
    let rest = line
        .strip_prefix(FAILED_PREFIX.as_bytes())
        .ok_or(DriverError::BadPreamble)?;
    let failure: SetupFailure =
        serde_json::from_slice(rest).map_err(|_| DriverError::BadPreamble)?;
    Err(failure.into())
}

impl GuestClient {
    /// HTTP/2 handshake over `io` (after the preamble was read).
    pub async fn handshake<T>(io: T, limits: ChannelLimits) -> Result<Self, DriverError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .max_header_list_size(limits.max_header_list_size)
            .max_frame_size(limits.max_frame_size)
            .max_concurrent_reset_streams(64)
            .max_send_buf_size(1024 * 1024)
            .initial_stream_window_size(1024 * 1024)
            .initial_connection_window_size(4 * 1024 * 1024);
        let (sender, conn) = builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(DriverError::Channel)?;
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "guest channel ended");
            }
            let _ = closed_tx.send(true);
        });
        Ok(GuestClient {
            sender,
            closed,
            limits,
        })
    }

    /// True once the channel is gone.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow() || self.sender.is_closed()
    }

    /// Relays a request to the agent. Paths under `/_berth/` are refused.
    pub async fn request(&self, req: Request<BoxBody>) -> Result<Response<Incoming>, DriverError> {
        if req.uri().path().starts_with(RESERVED_PREFIX) {
            return Err(DriverError::ReservedPath(req.uri().path().to_string()));
        }
        self.send(req).await
    }

    async fn send(&self, mut req: Request<BoxBody>) -> Result<Response<Incoming>, DriverError> {
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        // HTTP/2 needs a scheme and an authority; the guest ignores both.
        *req.uri_mut() = Uri::builder()
            .scheme("http")
            .authority("sandbox")
            .path_and_query(pq)
            .build()
            .map_err(|_| DriverError::InvalidSpec {
                field: "request uri",
                reason: "is not a valid path",
            })?;
        *req.version_mut() = http::Version::HTTP_2;
        let mut sender = self.sender.clone();
        sender.ready().await.map_err(DriverError::Channel)?;
        sender.send_request(req).await.map_err(DriverError::Channel)
    }

    /// The guest's view of the agent.
    pub async fn status(&self) -> Result<GuestStatus, DriverError> {
        let body = self.control(Method::GET, STATUS_PATH, STATUS_PATH).await?;
        serde_json::from_slice(&body).map_err(|_| DriverError::GuestBody { path: STATUS_PATH })
    }

    /// Asks the guest to SIGTERM the agent and SIGKILL it after `grace`.
    pub async fn shutdown(&self, grace: Duration) -> Result<(), DriverError> {
        let target = format!("{SHUTDOWN_PATH}?grace_ms={}", grace.as_millis());
        self.control(Method::POST, SHUTDOWN_PATH, &target)
            .await
            .map(drop)
    }

    async fn control(
        &self,
        method: Method,
        path: &'static str,
        target: &str,
    ) -> Result<Bytes, DriverError> {
        let req = Request::builder()
            .method(method)
            .uri(target)
            .body(empty())
            .map_err(|_| DriverError::GuestBody { path })?;
        let resp = self.send(req).await?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), self.limits.max_control_body)
            .collect()
            .await
            .map_err(|_| DriverError::GuestBody { path })?
            .to_bytes();
        if !status.is_success() {
            return Err(DriverError::GuestStatusCode {
                path,
                status: status.as_u16(),
            });
        }
        Ok(body)
    }
}

fn empty() -> BoxBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}
