//! Just enough of QEMU's machine protocol (QMP, JSON lines over a Unix
//! socket) to ask a guest to shut down: a greeting, `qmp_capabilities`, one
//! command.

use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {socket}")]
    Io {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP did not answer within {0:?}")]
    Timeout(Duration),
    #[error("QMP refused {command}: {reply}")]
    Refused { command: String, reply: String },
}

/// Ctrl-Alt-Del on the guest's virtio keyboard: its systemd reboots, and
/// with `-no-reboot` QEMU exits instead.
pub fn ctrl_alt_del() -> serde_json::Value {
    let key = |k: &str| serde_json::json!({"type": "qcode", "data": k});
    serde_json::json!({
        "execute": "send-key",
        "arguments": {"keys": [key("ctrl"), key("alt"), key("delete")]}
    })
}

/// Run one command; `Ok` when QEMU answered `return`.
pub async fn execute(
    socket: &Path,
    command: &serde_json::Value,
    timeout: Duration,
) -> Result<(), QmpError> {
    let io = |source| QmpError::Io {
        socket: socket.display().to_string(),
        source,
    };
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(socket).await.map_err(io)?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut next_reply = async || -> Result<serde_json::Value, QmpError> {
            loop {
                let line =
                    lines.next_line().await.map_err(io)?.ok_or_else(|| {
                        io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
                    })?;
                let value: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or(serde_json::Value::Null);
                // Events arrive in between; only greetings and answers count.
                if value.get("event").is_none() {
                    return Ok(value);
                }
            }
        };
        next_reply().await?; // greeting
        for cmd in [
            serde_json::json!({"execute": "qmp_capabilities"}),
            command.clone(),
        ] {
            write
                .write_all(format!("{cmd}\n").as_bytes())
                .await
                .map_err(io)?;
            let reply = next_reply().await?;
            if reply.get("return").is_none() {
                return Err(QmpError::Refused {
                    command: cmd["execute"].as_str().unwrap_or("?").to_owned(),
                    reply: reply.to_string(),
                });
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| QmpError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn negotiates_then_sends_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            s.write_all(b"{\"QMP\": {\"version\": {}}}\n")
                .await
                .expect("w");
            let mut got = String::new();
            let mut buf = [0u8; 1024];
            while got.matches('\n').count() < 2 {
                let n = s.read(&mut buf).await.expect("read");
                got.push_str(&String::from_utf8_lossy(&buf[..n]));
                if got.matches('\n').count() == 1 && !got.contains("send-key") {
                    s.write_all(b"{\"return\": {}}\n{\"event\": \"X\"}\n")
                        .await
                        .expect("w");
                }
            }
            s.write_all(b"{\"return\": {}}\n").await.expect("w");
            got
        });
        execute(&sock, &ctrl_alt_del(), Duration::from_secs(5))
            .await
            .expect("executed");
        let got = server.await.expect("server");
        assert!(
            got.starts_with("{\"execute\":\"qmp_capabilities\"}\n"),
            "{got}"
        );
        assert!(got.contains("\"data\":\"delete\""), "{got}");
    }
}
