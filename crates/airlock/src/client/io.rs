//! A process's io socket on this terminal: its output to our stdout and
//! stderr, our stdin (and, for a shell, our terminal's size) to it.

use super::api::{fail, Api};
use super::exit;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Nothing goes in.
    None,
    /// Our stdin, then end-of-file.
    Stdin,
    /// Our terminal, raw, with its size.
    Terminal,
}

/// How the process ended, as an exit code (128 + N for signal N); `None`
/// when we only followed and stopped before it ended.
pub async fn attach(
    api: &Api,
    sandbox: &str,
    pid: u32,
    input: Input,
    follow: bool,
) -> anyhow::Result<Option<i32>> {
    let path = format!(
        "/api/v1/sandboxes/{}/processes/{pid}/io",
        super::api::seg(sandbox)
    );
    let mut req = api
        .ws_url(&path)
        .into_client_request()
        .map_err(|e| fail(exit::CONFIG, format!("the server URL: {e}")))?;
    if let Some(t) = &api.token {
        let value = format!("Bearer {t}")
            .parse()
            .map_err(|_| fail(exit::CONFIG, "the token is not a valid header"))?;
        req.headers_mut().insert("Authorization", value);
    }
    let (socket, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(s) => s,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let message = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| resp.status().to_string());
            return Err(fail(super::api::code_for(status), message));
        }
        Err(e) => return Err(fail(exit::UNAVAILABLE, format!("the io socket: {e}"))),
    };
    let (mut tx, mut rx) = socket.split();
    let _raw = match input {
        Input::Terminal => terminal::Raw::enter(),
        _ => None,
    };
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Message>(16);
    if input != Input::None {
        let in_tx = in_tx.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        if input == Input::Stdin {
                            let _ = in_tx.send(Message::Text(r#"{"type":"eof"}"#.into())).await;
                        }
                        return;
                    }
                    Ok(n) => {
                        if in_tx
                            .send(Message::Binary(buf[..n].to_vec().into()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
    }
    if input == Input::Terminal {
        let in_tx = in_tx.clone();
        tokio::spawn(async move {
            let mut winch =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
                {
                    Ok(s) => s,
                    Err(_) => return,
                };
            loop {
                if let Some((cols, rows)) = terminal::size() {
                    let msg = format!(r#"{{"type":"resize","cols":{cols},"rows":{rows}}}"#);
                    if in_tx.send(Message::Text(msg.into())).await.is_err() {
                        return;
                    }
                }
                if winch.recv().await.is_none() {
                    return;
                }
            }
        });
    }
    drop(in_tx);
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut input_open = input != Input::None;
    loop {
        tokio::select! {
            msg = rx.next() => {
                let msg = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Err(fail(exit::UNAVAILABLE, format!("the io socket: {e}"))),
                    None => return Err(fail(exit::UNAVAILABLE, "the io socket closed before the process ended")),
                };
                match msg {
                    Message::Binary(b) if !b.is_empty() => {
                        let out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send) =
                            if b[0] == 2 { &mut stderr } else { &mut stdout };
                        out.write_all(&b[1..]).await?;
                        out.flush().await?;
                    }
                    Message::Text(t) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                        match v["type"].as_str() {
                            Some("exit") => {
                                let code = match (v["exit_code"].as_i64(), v["signal"].as_i64()) {
                                    (Some(c), _) => c as i32,
                                    (None, Some(s)) => 128 + s as i32,
                                    _ => exit::FAILURE,
                                };
                                return Ok(Some(code));
                            }
                            Some("skipped") => {
                                eprintln!("[airlock: {} bytes of earlier output are no longer kept]", v["bytes"]);
                            }
                            _ => {}
                        }
                    }
                    Message::Close(frame) => {
                        let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                        return Err(fail(exit::UNAVAILABLE, format!("the io socket closed: {reason}")));
                    }
                    _ => {}
                }
            }
            msg = in_rx.recv(), if input_open => match msg {
                Some(m) => {
                    if tx.send(m).await.is_err() {
                        return Err(fail(exit::UNAVAILABLE, "the io socket closed"));
                    }
                }
                None => input_open = false,
            },
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)), if !follow => {
                // Not following: the backlog came, nothing more for a moment.
                return Ok(None);
            }
        }
    }
}

/// (cols, rows) of our terminal, if stdout is one.
pub fn terminal_size() -> Option<(u16, u16)> {
    terminal::size()
}

/// The local terminal: raw mode while attached, and its size.
mod terminal {
    /// Puts stdin's terminal in raw mode until dropped.
    pub struct Raw {
        saved: libc::termios,
    }

    impl Raw {
        #[allow(unsafe_code)]
        pub fn enter() -> Option<Raw> {
            // SAFETY: tcgetattr/tcsetattr fill and read a termios we own, on fd 0.
            unsafe {
                let mut t: libc::termios = std::mem::zeroed();
                if libc::isatty(0) != 1 || libc::tcgetattr(0, &mut t) != 0 {
                    return None;
                }
                let saved = t;
                libc::cfmakeraw(&mut t);
                if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                    return None;
                }
                Some(Raw { saved })
            }
        }
    }

    impl Drop for Raw {
        #[allow(unsafe_code)]
        fn drop(&mut self) {
            // SAFETY: restores the settings read in `enter`, on fd 0.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &self.saved);
            }
        }
    }

    /// (cols, rows) of stdout's terminal.
    #[allow(unsafe_code)]
    pub fn size() -> Option<(u16, u16)> {
        // SAFETY: TIOCGWINSZ writes one winsize into ours.
        unsafe {
            let mut ws: libc::winsize = std::mem::zeroed();
            if libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) != 0 || ws.ws_col == 0 {
                return None;
            }
            Some((ws.ws_col, ws.ws_row))
        }
    }
}
