//! The pipe between the agent and its `capture` child: on the child's standard
//! output, messages framed as a big-endian `u32` length and that many bytes,
//! either a [`StreamInfo`] as JSON (starts with `{`), a frame in
//! [`VideoFrame::encode`]'s layout (starts with `V`) or the pointer's picture in
//! [`CursorImage::encode`]'s (starts with `C`) or clipboard text (starts with `T`). The child's standard input
//! carries one [`Control`](airlock_proto::stream::Control) as JSON per line.

#[cfg(doc)]
use airlock_proto::stream::encode_clipboard;
use airlock_proto::stream::{
    decode_clipboard, CursorImage, StreamInfo, VideoFrame, MAX_FRAME_BYTES,
};
use std::io::Write;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest message on the pipe: a frame's header plus its largest payload.
pub const MAX_MESSAGE: usize = MAX_FRAME_BYTES + 64;

/// What the child says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Info(StreamInfo),
    /// A frame, still in [`VideoFrame::encode`]'s layout (the WebSocket carries
    /// exactly these bytes), and whether it is a keyframe.
    Frame {
        keyframe: bool,
        bytes: Vec<u8>,
    },
    /// The pointer's picture, in [`CursorImage::encode`]'s layout.
    Cursor(Vec<u8>),
    /// New clipboard text, in [`encode_clipboard`]'s layout.
    Clipboard(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("reading the capture program's output")]
    Read(#[source] std::io::Error),
    #[error("the capture program sent a message of {0} bytes, over the limit")]
    TooLarge(usize),
    #[error("the capture program sent a bad stream description")]
    Info(#[source] serde_json::Error),
    #[error("the capture program sent a bad frame")]
    Frame(#[source] airlock_proto::stream::FrameError),
    #[error("the capture program sent a bad cursor")]
    Cursor(#[source] airlock_proto::stream::CursorError),
    #[error("the capture program sent bad clipboard text")]
    Clipboard(#[source] airlock_proto::stream::ClipboardError),
    #[error(
        "the capture program sent a message that is neither a description, a frame nor a cursor"
    )]
    Unknown,
}

/// Writes one message; the caller flushes.
pub fn write(w: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "message too large"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(payload)
}

pub fn write_info(w: &mut impl Write, info: &StreamInfo) -> std::io::Result<()> {
    let json = serde_json::to_vec(info).map_err(std::io::Error::other)?;
    write(w, &json)
}

pub fn write_frame(w: &mut impl Write, frame: &VideoFrame) -> std::io::Result<()> {
    write(w, &frame.encode())
}

/// Reads the next message; `None` at a clean end between messages.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(WireError::Read(e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(WireError::Read)?;
    parse(payload).map(Some)
}

fn parse(payload: Vec<u8>) -> Result<Message, WireError> {
    match payload.first() {
        Some(b'{') => Ok(Message::Info(
            serde_json::from_slice(&payload).map_err(WireError::Info)?,
        )),
        Some(b'V') => {
            let frame = VideoFrame::decode(&payload).map_err(WireError::Frame)?;
            Ok(Message::Frame {
                keyframe: frame.keyframe,
                bytes: payload,
            })
        }
        Some(b'C') => {
            CursorImage::decode(&payload).map_err(WireError::Cursor)?;
            Ok(Message::Cursor(payload))
        }
        Some(b'T') => {
            decode_clipboard(&payload).map_err(WireError::Clipboard)?;
            Ok(Message::Clipboard(payload))
        }
        _ => Err(WireError::Unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> StreamInfo {
        StreamInfo {
            codec: "h264".into(),
            width: 640,
            height: 480,
            fps: 30,
        }
    }

    #[tokio::test]
    async fn messages_round_trip() {
        let frame = VideoFrame {
            pts_us: 7,
            keyframe: true,
            data: vec![0, 0, 0, 1, 0x65],
        };
        let mut buf = Vec::new();
        write_info(&mut buf, &info()).expect("write");
        write_frame(&mut buf, &frame).expect("write");
        let cursor = CursorImage {
            width: 1,
            height: 1,
            xhot: 0,
            yhot: 0,
            rgba: vec![1, 2, 3, 4],
        };
        write(&mut buf, &cursor.encode()).expect("write");
        let mut r = buf.as_slice();
        assert_eq!(
            read(&mut r).await.expect("read"),
            Some(Message::Info(info()))
        );
        assert_eq!(
            read(&mut r).await.expect("read"),
            Some(Message::Frame {
                keyframe: true,
                bytes: frame.encode()
            })
        );
        assert_eq!(
            read(&mut r).await.expect("read"),
            Some(Message::Cursor(cursor.encode()))
        );
        assert_eq!(read(&mut r).await.expect("read"), None);
    }

    #[tokio::test]
    async fn bad_messages_are_errors() {
        let mut r: &[u8] = &[0, 0, 0, 9, b'{'];
        assert!(matches!(read(&mut r).await, Err(WireError::Read(_))));
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(read(&mut r).await, Err(WireError::TooLarge(_))));
        let mut buf = Vec::new();
        write(&mut buf, b"hello").expect("write");
        assert!(matches!(
            read(&mut buf.as_slice()).await,
            Err(WireError::Unknown)
        ));
        let mut buf = Vec::new();
        write(&mut buf, b"V12").expect("write");
        assert!(matches!(
            read(&mut buf.as_slice()).await,
            Err(WireError::Frame(_))
        ));
        let mut buf = Vec::new();
        write(&mut buf, b"C\0\x01\0\x01\0\0\0\0").expect("write");
        assert!(matches!(
            read(&mut buf.as_slice()).await,
            Err(WireError::Cursor(_))
        ));
        let mut buf = Vec::new();
        write(&mut buf, b"{\"codec\":1}").expect("write");
        assert!(matches!(
            read(&mut buf.as_slice()).await,
            Err(WireError::Info(_))
        ));
        // A pipe that ends half-way through the length is a clean end too:
        // the child died, which the caller learns from its exit status.
        let mut r: &[u8] = &[0, 0];
        assert!(matches!(read(&mut r).await, Ok(None)));
    }
}
