//! A minimal QMP client: JSON lines over QEMU's monitor socket. Events
//! arrive interleaved with answers and are skipped.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::DriverError;

/// Longest line QEMU may send (QEMU runs the guest and is not trusted).
const MAX_LINE: usize = 1 << 20;

pub(crate) struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects (retrying until QEMU created the socket), reads the
    /// greeting and leaves negotiation mode.
    pub(crate) async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, DriverError> {
        let stream = connect_retry(path, timeout).await?;
        let (r, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer,
        };
        let greeting = qmp.read_object().await?;
        if greeting.get("QMP").is_none() {
            return Err(DriverError::Vmm(format!(
                "unexpected QMP greeting {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub(crate) async fn execute(
        &mut self,
        command: &str,
        args: Value,
    ) -> Result<Value, DriverError> {
        let mut line = serde_json::to_vec(&json!({"execute": command, "arguments": args}))
            .map_err(|e| DriverError::Vmm(format!("encode {command}: {e}")))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .map_err(|e| DriverError::Vmm(format!("QMP {command}: {e}")))?;
        loop {
            let obj = self.read_object().await?;
            if obj.get("event").is_some() {
                continue;
            }
            if let Some(ret) = obj.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = obj.get("error") {
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("?");
                return Err(DriverError::Vmm(format!("QMP {command}: {desc}")));
            }
        }
    }

    async fn read_object(&mut self) -> Result<Value, DriverError> {
        let mut line = Vec::new();
        loop {
            let buf = self
                .reader
                .fill_buf()
                .await
                .map_err(|e| DriverError::Vmm(format!("QMP read: {e}")))?;
            if buf.is_empty() {
                return Err(DriverError::Vmm("QMP connection closed".into()));
            }
            let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (&buf[..=i], true),
                None => (buf, false),
            };
            line.extend_from_slice(chunk);
            let n = chunk.len();
            self.reader.consume(n);
            if line.len() > MAX_LINE {
                return Err(DriverError::Vmm("QMP line too long".into()));
            }
            if done {
                return serde_json::from_slice(&line)
                    .map_err(|e| DriverError::Vmm(format!("QMP sent invalid JSON: {e}")));
            }
        }
    }
}

/// Connects to a unix socket QEMU is about to create.
pub(crate) async fn connect_retry(
    path: &Path,
    timeout: Duration,
) -> Result<UnixStream, DriverError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(DriverError::io("connect", path)(e))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}
