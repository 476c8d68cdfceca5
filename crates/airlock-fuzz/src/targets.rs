//! The targets: each feeds one parser that bytes from outside reach, and
//! asserts what must hold whatever they are.

use crate::Target;
use std::hash::{DefaultHasher, Hash, Hasher};

pub fn all() -> Vec<Target> {
    vec![
        Target {
            name: "upstream_url",
            about: "the upstream proxy URL parser (egress/upstream.rs)",
            seeds: upstream_seeds,
            dict: &[
                b"http://", b"https://", b"@", b":", b"[", b"]", b"%40", b"%", b"/", b"?", b"#",
                b"::1", b"127.0.0.1", b":80", b":65535", b":0", b"xn--", b"\\",
            ],
            exec: upstream_url,
        },
        Target {
            name: "rfb",
            about: "the RFB handshake and first frame the relay reads from a guest's VNC server, and the greeting it reads from a browser (relay/rfb.rs)",
            seeds: rfb_seeds,
            dict: &[
                b"RFB 003.008\n",
                b"RFB 003.003\n",
                b"RFB 003.007\n",
                b"\x00\x00\x00\x00",
                b"\xff\xff\xff\xff",
                b"\x01\x02",
                b"\x00\x00\x00\x01",
            ],
            exec: rfb,
        },
        Target {
            name: "stream_messages",
            about: "guest stream messages (video frames, cursors) and the viewer's input messages as the guest parses and applies them (airlock-proto stream.rs, agent stream/input.rs)",
            seeds: stream_seeds,
            dict: &[
                b"{\"type\":\"wheel\",\"dx\":",
                b"{\"type\":\"pointer\",\"x\":",
                b"{\"type\":\"key\",\"keysym\":",
                b"{\"type\":\"text\",\"text\":\"",
                b"-2147483648",
                b"4294967295",
                b",\"dy\":",
                b"}",
                b"V",
                b"C",
                b"\\u0000",
            ],
            exec: stream_messages,
        },
        Target {
            name: "agent_json",
            about: "the agent's JSON request bodies and their checks (exec, login start, delivery, input)",
            seeds: agent_seeds,
            dict: &[
                b"{\"argv\":[",
                b"\"env\":{",
                b"\"timeout_s\":",
                b"\"files\":[{\"path\":",
                b"\"contents_b64\":",
                b"\"..\"",
                b"\"/etc/passwd\"",
                b"\\u0000",
                b"[[[[[[[[",
                b"{\"a\":{\"a\":",
                b"1e999",
                b"null",
            ],
            exec: agent_json,
        },
        Target {
            name: "login_screen",
            about: "the terminal emulator screen and URL scanner of the login capture (agent login/screen.rs, login/urls.rs)",
            seeds: screen_seeds,
            dict: &[
                b"\x1b[",
                b"\x1b]8;;",
                b"\x1b\\",
                b"\x07",
                b"\x1bP",
                b"\x1b[12C",
                b"\x1b[3;4H",
                b"https://auth.example/authorize?",
                b"\r\n",
                b"\xc3\xa9",
                b"\xe2\x80\xa8",
                b"\xf0\x9f",
            ],
            exec: login_screen,
        },
    ]
}

pub fn by_name(name: &str) -> Option<Target> {
    all().into_iter().find(|t| t.name == name)
}

fn sig(v: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

// ---- upstream_url ----

fn upstream_seeds() -> Vec<Vec<u8>> {
    [
        "http://alice:s%40cret@gate.example:10001",
        "http://a:b@127.0.0.1:80",
        "http://a:b@[::1]:3128/",
        "http://user:pass@proxy.example.com:8080",
        "https://a:b@h:1",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn upstream_url(input: &[u8]) -> u64 {
    use airlock_server::egress::Upstream;
    let text = String::from_utf8_lossy(input);
    match Upstream::parse(&text) {
        Ok(up) => {
            assert!(!up.host.is_empty(), "an upstream without a host");
            assert!(up.port != 0, "an upstream on port 0");
            assert!(
                !text.chars().any(char::is_control),
                "control characters accepted"
            );
            // What the proxy connects to and shows must be usable as such.
            let authority = up.authority();
            assert!(
                authority.parse::<hyper::http::uri::Authority>().is_ok(),
                "the upstream's authority {authority:?} is not an authority"
            );
            assert!(up.masked().contains(":***@"), "masked shows no mask");
            let _ = up.authorization();
            sig((1u8, up.host.contains(':'), up.port == 80))
        }
        Err(e) => sig((2u8, std::mem::discriminant(&e))),
    }
}

// ---- rfb ----

fn rfb_seeds() -> Vec<Vec<u8>> {
    let mut handshake = b"\x00RFB 003.008\n\x01\x02".to_vec();
    handshake.extend_from_slice(&[7u8; 16]);
    handshake.extend_from_slice(&[0, 0, 0, 0]);
    let mut refused = b"\x00RFB 003.008\n\x00".to_vec();
    refused.extend_from_slice(&[0, 0, 0, 4]);
    refused.extend_from_slice(b"nope");
    let greeting = b"\x01RFB 003.008\n\x01".to_vec();
    let old = b"\x01RFB 003.003\n".to_vec();
    // ServerInit 2x1, a name, then a bell and one raw 2x1 rectangle.
    let mut frame = vec![2u8, 0, 2, 0, 1];
    frame.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
    frame.extend_from_slice(&[0, 0, 0, 2]);
    frame.extend_from_slice(b"pc");
    frame.push(2);
    frame.extend_from_slice(&[0, 0, 0, 1]);
    frame.extend_from_slice(&[0, 0, 0, 0, 0, 2, 0, 1, 0, 0, 0, 0]);
    frame.extend_from_slice(&[1, 2, 3, 0, 4, 5, 6, 0]);
    vec![handshake, refused, greeting, old, frame]
}

/// A guest (or browser) that says `input` and hears nothing we write.
fn scripted(input: &[u8]) -> tokio::io::Join<&[u8], tokio::io::Sink> {
    tokio::io::join(input, tokio::io::sink())
}

fn rfb(input: &[u8]) -> u64 {
    use airlock_server::relay::rfb;
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("a runtime: {e}"));
    }
    let Some((&which, rest)) = input.split_first() else {
        return 0;
    };
    RT.with(|rt| {
        rt.block_on(async {
            match which % 3 {
                0 => {
                    let mut s = scripted(rest);
                    let r = rfb::client_handshake(&mut s, "pw").await;
                    sig((0u8, r.map_err(|e| std::mem::discriminant(&e))))
                }
                1 => {
                    let mut w = rfb::IoWire(scripted(rest));
                    let r = rfb::serve_none_security(&mut w).await;
                    sig((1u8, r.map_err(|e| std::mem::discriminant(&e))))
                }
                _ => {
                    let mut w = rfb::IoWire(scripted(rest));
                    match rfb::read_frame(&mut w).await {
                        Ok(stats) => {
                            assert!(stats.dominant_per_mille <= 1000, "{stats:?}");
                            sig((2u8, stats.distinct_colours.min(4)))
                        }
                        Err(e) => sig((3u8, std::mem::discriminant(&e))),
                    }
                }
            }
        })
    })
}

// ---- stream_messages ----

fn stream_seeds() -> Vec<Vec<u8>> {
    use airlock_proto::stream::{CursorImage, VideoFrame};
    let frame = VideoFrame {
        pts_us: 33_000,
        keyframe: true,
        data: vec![0, 0, 0, 1, 0x67],
    };
    let cursor = CursorImage {
        width: 2,
        height: 1,
        xhot: 1,
        yhot: 0,
        rgba: vec![255; 8],
    };
    let mut out: Vec<Vec<u8>> = vec![
        [vec![0u8], frame.encode()].concat(),
        [vec![0u8], cursor.encode()].concat(),
    ];
    for text in [
        r#"{"type":"wheel","dx":0,"dy":3}"#,
        r#"{"type":"pointer","x":10,"y":20,"buttons":1}"#,
        r#"{"type":"key","keysym":65,"down":true}"#,
        r#"{"type":"text","text":"héllo\n"}"#,
        r#"{"type":"keyframe"}"#,
    ] {
        out.push([&[1u8][..], text.as_bytes()].concat());
    }
    out
}

fn stream_messages(input: &[u8]) -> u64 {
    use airlock_agent::stream::input::{keysym_of, wheel_clicks, MAX_WHEEL_NOTCHES};
    use airlock_proto::stream::{Control, CursorImage, VideoFrame};
    let Some((&which, rest)) = input.split_first() else {
        return 0;
    };
    if which % 2 == 0 {
        // Binary messages from the guest.
        if CursorImage::is_cursor(rest) {
            return match CursorImage::decode(rest) {
                Ok(c) => {
                    assert_eq!(c.encode(), rest, "a cursor does not round-trip");
                    assert!(c.rgba.is_empty() || (c.xhot < c.width && c.yhot < c.height));
                    sig((0u8, c.width == 0))
                }
                Err(e) => sig((1u8, std::mem::discriminant(&e))),
            };
        }
        return match VideoFrame::decode(rest) {
            Ok(f) => {
                let again = VideoFrame::decode(&f.encode()).map_err(|e| e.to_string());
                assert_eq!(again.as_ref(), Ok(&f), "a frame does not round-trip");
                sig((2u8, f.keyframe))
            }
            Err(e) => sig((3u8, std::mem::discriminant(&e))),
        };
    }
    // A viewer's input message, as the guest takes it.
    let text = String::from_utf8_lossy(rest);
    match Control::parse(&text) {
        Ok(c) => {
            let again = Control::parse(&c.to_json());
            assert_eq!(
                again.as_ref().ok(),
                Some(&c),
                "a control does not round-trip"
            );
            match &c {
                Control::Wheel { dx, dy } => {
                    assert!(
                        dx.unsigned_abs() <= 100 && dy.unsigned_abs() <= 100,
                        "the check let {c:?} through"
                    );
                    let clicks = wheel_clicks(*dx) + wheel_clicks(*dy);
                    assert!(clicks <= 2 * MAX_WHEEL_NOTCHES, "{clicks} clicks for {c:?}");
                }
                Control::Text { text } => {
                    let keys = text.chars().filter_map(keysym_of).count();
                    assert!(keys <= text.chars().count());
                }
                _ => {}
            }
            sig((4u8, std::mem::discriminant(&c)))
        }
        Err(e) => sig((5u8, std::mem::discriminant(&e))),
    }
}

// ---- agent_json ----

fn agent_seeds() -> Vec<Vec<u8>> {
    [
        (0u8, r#"{"argv":["echo","hi"],"env":{"A":"1"},"timeout_s":5}"#),
        (0, r#"{"argv":["true"]}"#),
        (1, r#"{"files":[{"path":".codex/auth.json","contents_b64":"e30="}]}"#),
        (2, r#"{"text":"1234-abcd"}"#),
        (
            3,
            r#"{"login_id":"l1","provider":{"name":"t","display_name":"T","command":["sh"],"url_prefixes":["https://auth.example/"],"credentials":[{"path":".t/c.json","json_keys":["a.b"]}]}}"#,
        ),
    ]
    .iter()
    .map(|(k, s)| [&[*k][..], s.as_bytes()].concat())
    .collect()
}

fn agent_json(input: &[u8]) -> u64 {
    use airlock_agent::exec;
    use airlock_proto::agent::ExecRequest;
    use airlock_proto::login::{safe_relative, FileSet, LoginInput, LoginStart};
    let Some((&which, body)) = input.split_first() else {
        return 0;
    };
    match which % 4 {
        0 => match serde_json::from_slice::<ExecRequest>(body) {
            Ok(req) => {
                let checked = exec::check(&req);
                if checked.is_ok() {
                    assert!(!req.argv.is_empty() && !req.argv[0].is_empty());
                    assert!(req.argv.iter().all(|a| !a.contains('\0')));
                    assert!(req.env.keys().all(|k| !k.is_empty() && !k.contains('=')));
                }
                sig((0u8, checked.is_ok()))
            }
            Err(e) => sig((1u8, e.classify() as u8)),
        },
        1 => match serde_json::from_slice::<FileSet>(body) {
            Ok(set) => {
                let safe = set
                    .files
                    .iter()
                    .map(|f| {
                        let ok = safe_relative(&f.path);
                        if ok {
                            assert!(!f.path.starts_with('/') && !f.path.contains('\0'));
                            assert!(f.path.split('/').all(|p| p != ".." && !p.is_empty()));
                        }
                        ok
                    })
                    .filter(|ok| *ok)
                    .count();
                sig((2u8, safe.min(3), set.files.len().min(3)))
            }
            Err(e) => sig((3u8, e.classify() as u8)),
        },
        2 => match serde_json::from_slice::<LoginInput>(body) {
            Ok(i) => sig((4u8, i.text.len().min(8))),
            Err(e) => sig((5u8, e.classify() as u8)),
        },
        _ => match serde_json::from_slice::<LoginStart>(body) {
            Ok(start) => sig((6u8, start.provider.validate().is_ok())),
            Err(e) => sig((7u8, e.classify() as u8)),
        },
    }
}

// ---- login_screen ----

fn screen_seeds() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = vec![
        b"\x1b[1mOpen\x1b[0m\x1b[2Chttps://auth.example/authorize?code=1&state=2 \r\n".to_vec(),
        b"\x1b]8;;https://auth.example/authorize?x=1\x1b\\link\x1b]8;;\x1b\\\n".to_vec(),
        "Paste code:\x1b[5G\u{2502} https://auth.example/authorize?a=é\n"
            .as_bytes()
            .to_vec(),
    ];
    for s in &mut v {
        // First byte: where the text is cut into two chunks.
        s.insert(0, 17);
    }
    v
}

fn login_screen(input: &[u8]) -> u64 {
    use airlock_agent::login::{from_screen, Screen};
    let Some((&cut, bytes)) = input.split_first() else {
        return 0;
    };
    let prefix = "https://auth.example/authorize?";
    let def = provider(prefix);
    let cut = usize::from(cut).min(bytes.len());
    let mut s = Screen::new(10, 40);
    s.feed(&bytes[..cut]);
    s.feed(&bytes[cut..]);
    let drawn = s.drawn();
    let text = &drawn.text;
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "an escape or control character got through: {text:?}"
    );
    assert!(drawn.visible_from <= text.len() && text.is_char_boundary(drawn.visible_from));
    if let Some(at) = drawn.cursor {
        assert!(at <= text.len() && text.is_char_boundary(at), "{drawn:?}");
    }
    let url = from_screen(&def, &drawn);
    if let Some(url) = &url {
        assert!(url.starts_with(prefix), "{url:?}");
        assert!(
            !url.chars().any(|c| c.is_whitespace() || c.is_control()),
            "{url:?}"
        );
    }
    sig((url.is_some(), text.len().min(64) / 8, text.contains(' ')))
}

fn provider(prefix: &str) -> airlock_proto::login::ProviderDef {
    airlock_proto::login::ProviderDef {
        name: "t".into(),
        display_name: "T".into(),
        command: vec!["sh".into()],
        env: Default::default(),
        url_prefixes: vec![prefix.into()],
        url: Default::default(),
        prompts: Vec::new(),
        code_prompt: None,
        credentials: Vec::new(),
        check: None,
        cols: 200,
    }
}
