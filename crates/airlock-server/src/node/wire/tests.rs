//! The node API served for real on loopback over [`FakeNode`], driven by a
//! [`RemoteNode`]: every call and every error variant crosses the wire and
//! comes back as itself; tokens, ids, bodies and dial targets are checked
//! before anything reaches the node; tunnels carry bytes to a real server.

use super::super::fake::tests_support::create_request;
use super::super::fake::{FakeNode, Step};
use super::super::remote::RemoteNode;
use super::super::tunnel::Dialer;
use super::super::{
    BlockedPackets, EgressBinding, GuestEndpoints, Instance, Liveness, Node, NodeEgress, NodeError,
};
use super::*;
use std::net::IpAddr;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "node-token-canary-7f3a";

/// Egress forwarders as calls written down, and a failure to hand out.
#[derive(Debug, Default)]
struct FakeEgress {
    calls: Mutex<Vec<(&'static str, String, String)>>,
    fail: Mutex<Option<NodeError>>,
}

impl FakeEgress {
    fn record(&self, what: &'static str, id: &str, owner: &str) -> Result<(), NodeError> {
        self.calls
            .lock()
            .expect("calls")
            .push((what, id.to_owned(), owner.to_owned()));
        match self.fail.lock().expect("fail").take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn calls(&self) -> Vec<(&'static str, String, String)> {
        self.calls.lock().expect("calls").clone()
    }
}

#[async_trait::async_trait]
impl NodeEgress for FakeEgress {
    async fn attach(&self, b: &EgressBinding) -> Result<(), NodeError> {
        self.record("attach", &b.sandbox_id, &b.owner_id)
    }
    async fn rebind(&self, b: &EgressBinding) -> Result<(), NodeError> {
        self.record("rebind", &b.sandbox_id, &b.owner_id)
    }
    async fn detach(&self, id: &str) -> Result<(), NodeError> {
        self.record("detach", id, "")
    }
}

struct Served {
    addr: SocketAddr,
    node: Arc<FakeNode>,
    egress: Arc<FakeEgress>,
    remote: RemoteNode,
}

impl Served {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn dialer(&self, token: &str) -> Dialer {
        Dialer {
            name: "n1".into(),
            addr: self.addr,
            token: SecretString::from(token),
        }
    }
}

/// The node API on 127.0.0.1:0 over a fresh fake node; guests in `guest_net`.
async fn serve_node(guest_net: (Ipv4Addr, u8)) -> Served {
    let node = Arc::new(FakeNode::new());
    let egress = Arc::new(FakeEgress::default());
    let app = router(WireState {
        node: node.clone(),
        egress: egress.clone(),
        token: SecretString::from(TOKEN),
        guest_net,
        name: "n1".into(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(listener, app, std::future::pending()));
    let remote = RemoteNode::new("n1".into(), addr, SecretString::from(TOKEN));
    Served {
        addr,
        node,
        egress,
        remote,
    }
}

fn pool() -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(10, 247, 0, 0), 16)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

#[tokio::test]
async fn every_call_round_trips() {
    let s = serve_node(pool()).await;
    let req = create_request("rt1", 1);
    let health = s.remote.health().await.expect("health");
    assert_eq!(
        health,
        NodeHealth {
            name: "n1".into(),
            backend: "fake".into()
        }
    );
    assert_eq!(s.remote.name(), "fake on node n1");

    s.remote.create(&req).await.expect("create");
    s.remote.create(&req).await.expect("create again");
    assert_eq!(s.node.instance("rt1").expect("made").req, req);
    s.remote.start("rt1").await.expect("start");
    let ends = s
        .remote
        .wait_ready("rt1", Duration::from_secs(2))
        .await
        .expect("ready");
    assert_eq!(
        ends,
        GuestEndpoints::at(req.lease.guest),
        "the guest's real ports"
    );
    assert_eq!(
        s.remote.inspect("rt1").await.expect("inspect"),
        Instance {
            id: "rt1".into(),
            running: true
        }
    );
    assert_eq!(
        s.remote.list().await.expect("list"),
        vec![Instance {
            id: "rt1".into(),
            running: true
        }]
    );
    assert_eq!(
        s.remote.liveness("rt1").await.expect("live"),
        Liveness::Alive
    );
    let counters = BlockedPackets {
        tcp: 3,
        inbound: 1,
        ..BlockedPackets::default()
    };
    s.node.set_blocked("rt1", counters);
    assert_eq!(
        s.remote.blocked_packets("rt1").await.expect("blocked"),
        Some(counters)
    );
    assert_eq!(
        s.remote.blocked_packets("nobody").await.expect("none"),
        None,
        "no rules installed is None, not an error"
    );
    s.node.kill("rt1", "systemd-nspawn (pid 1) exited");
    assert_eq!(
        s.remote.liveness("rt1").await.expect("live"),
        Liveness::Dead("systemd-nspawn (pid 1) exited".into())
    );
    s.remote
        .stop("rt1", Duration::from_millis(1500))
        .await
        .expect("stop");
    s.remote.destroy("rt1").await.expect("destroy");
    s.remote.destroy("rt1").await.expect("destroy again");
    assert!(s.node.ids().is_empty());
    let steps: Vec<Step> = s.node.calls().into_iter().map(|(st, _)| st).collect();
    assert_eq!(
        steps,
        vec![
            Step::Create,
            Step::Create,
            Step::Start,
            Step::WaitReady,
            Step::Inspect,
            Step::List,
            Step::Liveness,
            Step::Liveness,
            Step::Stop,
            Step::Destroy,
            Step::Destroy,
        ]
    );
}

#[tokio::test]
async fn each_node_error_comes_back_as_itself() {
    let s = serve_node(pool()).await;
    let req = create_request("err1", 2);
    let cases = [
        (Step::Create, NodeError::Transient("netns busy".into())),
        (Step::Start, NodeError::GuestExited("exit status 1".into())),
        (Step::WaitReady, NodeError::Timeout(90)),
        (Step::Inspect, NodeError::NotFound("err1".into())),
        (
            Step::Destroy,
            NodeError::Failed("umount: target is busy".into()),
        ),
        (Step::List, NodeError::Transient("driver restarting".into())),
        (
            Step::Stop,
            NodeError::Failed("kill: no such process".into()),
        ),
        (Step::Liveness, NodeError::NotFound("err1".into())),
    ];
    for (step, err) in cases {
        s.node.fail_once(step, err.clone());
        let got = match step {
            Step::Create => s.remote.create(&req).await,
            Step::Start => s.remote.start("err1").await,
            Step::WaitReady => s
                .remote
                .wait_ready("err1", Duration::from_secs(1))
                .await
                .map(drop),
            Step::Inspect => s.remote.inspect("err1").await.map(drop),
            Step::Destroy => s.remote.destroy("err1").await,
            Step::List => s.remote.list().await.map(drop),
            Step::Stop => s.remote.stop("err1", Duration::ZERO).await,
            Step::Liveness => s.remote.liveness("err1").await.map(drop),
        };
        assert_eq!(got, Err(err), "{step:?}");
    }
    // Not injected: the fake's own answer for a sandbox it never made.
    assert_eq!(
        s.remote.inspect("never").await,
        Err(NodeError::NotFound("never".into()))
    );
    // And the egress side's.
    *s.egress.fail.lock().expect("fail") = Some(NodeError::Transient("port busy".into()));
    assert_eq!(
        s.remote.detach("err1").await,
        Err(NodeError::Transient("port busy".into()))
    );
}

#[tokio::test]
async fn the_status_names_the_variant_too() {
    let s = serve_node(pool()).await;
    s.node.fail_once(Step::Start, NodeError::Timeout(7));
    let resp = client()
        .post(s.url("/node/v1/sandboxes/st1/start"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "timeout");
    assert_eq!(body["node_error"], serde_json::json!({"Timeout": 7}));
}

#[tokio::test]
async fn a_node_that_is_not_there_is_transient() {
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let remote = RemoteNode::new("gone".into(), addr, SecretString::from(TOKEN));
    let err = remote.inspect("x1").await.expect_err("nobody listens");
    let NodeError::Transient(why) = err else {
        panic!("{err:?}");
    };
    assert!(why.starts_with(&format!("node gone at {addr}: ")), "{why}");
    assert!(!why.contains(TOKEN));
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused_before_the_node_sees_anything() {
    let s = serve_node(pool()).await;
    let req = create_request("tok1", 3);
    let http = client();
    for auth in [None, Some("wrong"), Some(""), Some("node-token-canary-7f3")] {
        let mut rb = http.put(s.url("/node/v1/sandboxes/tok1")).json(&req);
        if let Some(t) = auth {
            rb = rb.header("authorization", format!("Bearer {t}"));
        }
        let resp = rb.send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(
            resp.headers().get("www-authenticate").map(|v| v.as_bytes()),
            Some(&b"Bearer"[..])
        );
        let body: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["code"], "unauthorized");
        assert!(!body.to_string().contains(TOKEN));
    }
    // The same through the client, with another cluster's token.
    let stranger = RemoteNode::new("n1".into(), s.addr, SecretString::from("another-token"));
    let err = stranger.create(&req).await.expect_err("refused");
    let NodeError::Failed(why) = &err else {
        panic!("{err:?}");
    };
    assert!(why.contains("401"), "{why}");
    assert!(
        !why.contains(TOKEN) && !why.contains("another-token"),
        "{why}"
    );
    assert!(stranger.attach(&binding("tok1", "u1")).await.is_err());
    // Even a dial, and even to a route that does not exist.
    let refused = s
        .dialer("wrong")
        .dial(SocketAddr::from((Ipv4Addr::new(10, 247, 0, 2), 7000)))
        .await
        .expect_err("refused");
    assert!(refused.contains("401"), "{refused}");
    let resp = http
        .get(s.url("/node/v1/nothing"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(
        s.node.calls().is_empty(),
        "the node saw {:?}",
        s.node.calls()
    );
    assert!(s.egress.calls().is_empty());
    assert!(s.node.ids().is_empty());
}

#[tokio::test]
async fn bad_ids_and_bodies_are_400_and_change_nothing() {
    let s = serve_node(pool()).await;
    let http = client();
    let req = create_request("good1", 4);
    let send = |rb: reqwest::RequestBuilder| async move {
        let resp = rb.bearer_auth(TOKEN).send().await.expect("send");
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.expect("json error body");
        (status, body)
    };
    let bad_paths = [
        "/node/v1/sandboxes/bad.id",
        "/node/v1/sandboxes/%2e%2e%2fetc",
        "/node/v1/sandboxes/a%2Fb",
        "/node/v1/sandboxes/sp%20ace",
        "/node/v1/sandboxes/%C3%A9t%C3%A9",
    ];
    for p in bad_paths {
        let (status, body) = send(http.put(s.url(p)).json(&req)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{p}: {body}");
        assert_eq!(body["error"]["code"], "bad_request");
        let (status, _) = send(http.delete(s.url(p))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{p}");
    }
    let long = format!("/node/v1/sandboxes/{}/start", "a".repeat(65));
    assert_eq!(
        send(http.post(s.url(&long))).await.0,
        StatusCode::BAD_REQUEST
    );
    // The body's id is not the path's.
    let (status, body) = send(http.put(s.url("/node/v1/sandboxes/other1")).json(&req)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"]
        .as_str()
        .expect("message")
        .contains("differs"));
    let (status, _) = send(
        http.put(s.url("/node/v1/sandboxes/other1/egress"))
            .json(&binding("good1", "u1")),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Bodies that are not what the route takes.
    let bodies = [
        ("/node/v1/sandboxes/good1", "{not json"),
        ("/node/v1/sandboxes/good1", "{}"),
        (
            "/node/v1/sandboxes/good1/wait_ready",
            r#"{"timeout_ms":600001}"#,
        ),
        (
            "/node/v1/sandboxes/good1/wait_ready",
            r#"{"timeout_ms":1,"x":2}"#,
        ),
        ("/node/v1/sandboxes/good1/stop", r#"{"grace_ms":-1}"#),
        (
            "/node/v1/sandboxes/good1/stop",
            r#"{"grace_ms":18446744073709551615}"#,
        ),
    ];
    for (p, b) in bodies {
        let rb = if p.ends_with("good1") {
            http.put(s.url(p))
        } else {
            http.post(s.url(p))
        };
        let (status, body) = send(rb.body(b)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{p} {b}: {body}");
    }
    // Too large.
    let huge = vec![b' '; MAX_BODY_BYTES + 1];
    let (status, body) = send(http.put(s.url("/node/v1/sandboxes/good1")).body(huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    // A route or method that does not exist.
    let (status, body) = send(http.get(s.url("/node/v1/sandboxes/good1/nothing"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "no_route");
    let (status, _) = send(http.patch(s.url("/node/v1/sandboxes/good1"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The client refuses such ids itself.
    assert!(matches!(
        s.remote.start("../etc").await,
        Err(NodeError::Failed(_))
    ));
    assert!(
        s.node.calls().is_empty(),
        "the node saw {:?}",
        s.node.calls()
    );
    assert!(s.egress.calls().is_empty());
}

fn binding(id: &str, owner: &str) -> EgressBinding {
    EgressBinding {
        sandbox_id: id.into(),
        owner_id: owner.into(),
        lease: create_request(id, 5).lease,
    }
}

#[tokio::test]
async fn egress_calls_round_trip() {
    let s = serve_node(pool()).await;
    s.remote
        .attach(&binding("eg1", "alice"))
        .await
        .expect("attach");
    s.remote
        .rebind(&binding("eg1", "bob"))
        .await
        .expect("rebind");
    s.remote.detach("eg1").await.expect("detach");
    assert_eq!(
        s.egress.calls(),
        vec![
            ("attach", "eg1".to_owned(), "alice".to_owned()),
            ("rebind", "eg1".to_owned(), "bob".to_owned()),
            ("detach", "eg1".to_owned(), String::new()),
        ]
    );
}

#[test]
fn dial_is_confined_to_guest_ends_and_guest_ports() {
    let net = (Ipv4Addr::new(10, 247, 0, 0), 16);
    let at = |a: [u8; 4], port: u16| SocketAddr::from((Ipv4Addr::from(a), port));
    assert!(dial_allowed(net, at([10, 247, 0, 2], 7000)).is_ok());
    assert!(dial_allowed(net, at([10, 247, 3, 6], 5900)).is_ok());
    assert!(dial_allowed(net, at([10, 247, 255, 254], 7000)).is_ok());
    for (a, port) in [
        ([10, 247, 0, 1], 7000), // the node's own end of the link
        ([10, 247, 0, 3], 7000), // broadcast of the block
        ([10, 247, 0, 2], 22),   // another port
        ([10, 247, 0, 2], 7001), // another port
        ([10, 248, 0, 2], 7000), // outside the pool
        ([127, 0, 0, 2], 7000),  // the node's loopback
        ([169, 254, 169, 254], 5900),
    ] {
        assert!(dial_allowed(net, at(a, port)).is_err(), "{a:?}:{port}");
    }
    let v6: SocketAddr = "[::1]:7000".parse().expect("v6");
    assert!(dial_allowed(net, v6).is_err());
}

/// A free guest address in 127.0.0.0/8 (the `.2` of a /30 block) with an
/// echo server bound on its agent port: random, so parallel tests and other
/// processes do not collide.
async fn echo_guest() -> (Ipv4Addr, tokio::task::JoinHandle<()>) {
    for _ in 0..50 {
        let [a, b, c] = rand::random::<[u8; 3]>();
        let ip = Ipv4Addr::new(127, a, b, (c & 0xfc) | 2);
        if ip.octets()[1] == 0 && ip.octets()[2] == 0 {
            continue;
        }
        let Ok(listener) = TcpListener::bind((ip, airlock_proto::AGENT_PORT)).await else {
            continue;
        };
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        return (ip, task);
    }
    panic!("no free 127.x.y.z:7000 to bind the echo guest on");
}

/// The server on a port `dial` must never connect to; it counts arrivals.
async fn forbidden_target(ip: Ipv4Addr, port: u16) -> (SocketAddr, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind((ip, port)).await.expect("bind forbidden");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(0));
    let counted = seen.clone();
    tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            *counted.lock().expect("count") += 1;
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn dial_refuses_anything_but_a_guest_port() {
    let s = serve_node((Ipv4Addr::new(127, 0, 0, 0), 8)).await;
    let (guest, _echo) = echo_guest().await;
    let d = s.dialer(TOKEN);
    // A guest address on another port, with something listening there.
    let (other_port, seen) = forbidden_target(guest, 0).await;
    let err = d.dial(other_port).await.expect_err("other port");
    assert!(err.contains("403"), "{err}");
    // The node's own end of the link, on the agent's port.
    let host_end = SocketAddr::from((Ipv4Addr::from(u32::from(guest) - 1), 7000));
    let err = d.dial(host_end).await.expect_err("host end");
    assert!(err.contains("403"), "{err}");
    // Outside the guest network.
    let s10 = serve_node(pool()).await;
    let err = s10
        .dialer(TOKEN)
        .dial(SocketAddr::from((guest, 7000)))
        .await
        .expect_err("outside the pool");
    assert!(err.contains("403"), "{err}");
    // Raw: the answer is JSON, and a missing Upgrade is refused too.
    let http = client();
    let resp = http
        .get(s.url(&format!("/node/v1/dial?to={other_port}")))
        .bearer_auth(TOKEN)
        .header("connection", "upgrade")
        .header("upgrade", DIAL_PROTOCOL)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "forbidden");
    let resp = http
        .get(s.url(&format!("/node/v1/dial?to={guest}:7000")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    for q in ["", "?to=", "?to=nonsense", "?to=127.0.0.2"] {
        let resp = http
            .get(s.url(&format!("/node/v1/dial{q}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{q}");
    }
    // An allowed target where nothing listens: 502.
    let err = d
        .dial(SocketAddr::from((guest, airlock_proto::VNC_PORT)))
        .await
        .expect_err("nothing there");
    assert!(err.contains("502"), "{err}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        *seen.lock().expect("count"),
        0,
        "the node dialed a refused target"
    );
}

#[tokio::test]
async fn a_tunnel_carries_bytes_both_ways_and_closes_with_its_sandbox() {
    let s = serve_node((Ipv4Addr::new(127, 0, 0, 0), 8)).await;
    let (guest, _echo) = echo_guest().await;
    let ends = s.remote.endpoints("tun1", guest).await.expect("endpoints");
    for a in [ends.agent, ends.display, ends.stream] {
        assert!(a.ip().is_loopback() && a.ip() != IpAddr::from(guest), "{a}");
    }
    assert_eq!(ends.stream, ends.agent, "the stream is asked of the agent");
    assert_ne!(ends.display, ends.agent);
    assert_eq!(
        s.remote.endpoints("tun1", guest).await.expect("again"),
        ends,
        "listeners are reused"
    );
    assert_eq!(s.remote.tunnels().len(), 2);

    // Bytes both ways, several connections, through the same listener.
    let mut conns = Vec::new();
    for n in 0..3u8 {
        let mut c = TcpStream::connect(ends.agent).await.expect("connect");
        let msg: Vec<u8> = (0..200u8).map(|b| b.wrapping_mul(n + 1)).collect();
        for _ in 0..5 {
            c.write_all(&msg).await.expect("write");
            let mut back = vec![0u8; msg.len()];
            c.read_exact(&mut back).await.expect("read");
            assert_eq!(back, msg);
        }
        conns.push(c);
    }
    // A larger transfer, written while it is read back.
    let big: Vec<u8> = (0..512 * 1024u32).map(|i| (i % 251) as u8).collect();
    let c = TcpStream::connect(ends.agent).await.expect("connect");
    let (mut r, mut w) = c.into_split();
    let sent = big.clone();
    let writer = tokio::spawn(async move { w.write_all(&sent).await });
    let mut back = vec![0u8; big.len()];
    r.read_exact(&mut back).await.expect("read big");
    writer.await.expect("join").expect("write big");
    assert_eq!(back, big);

    // The display port has nothing behind it: the connection ends.
    let mut d = TcpStream::connect(ends.display).await.expect("connect");
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(15), d.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // A destroy closes the listeners and the pipes through them.
    s.node.plant(create_request("tun1", 6), true);
    s.remote.destroy("tun1").await.expect("destroy");
    assert!(s.remote.tunnels().is_empty());
    let mut open = conns.pop().expect("conn");
    let n = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the pipe ended with its sandbox");
    assert!(
        TcpStream::connect(ends.agent).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn a_listener_shared_by_two_sandboxes_stays_until_both_are_gone() {
    let s = serve_node((Ipv4Addr::new(127, 0, 0, 0), 8)).await;
    let (guest, _echo) = echo_guest().await;
    let a = s.remote.endpoints("sh1", guest).await.expect("a");
    let b = s.remote.endpoints("sh2", guest).await.expect("b");
    assert_eq!(a, b);
    s.remote.forget("sh1");
    let mut c = TcpStream::connect(a.agent).await.expect("still open");
    c.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    c.read_exact(&mut back).await.expect("read");
    assert_eq!(&back, b"ping");
    s.remote.forget("sh2");
    assert!(s.remote.tunnels().is_empty());
}

#[tokio::test]
async fn a_sweep_closes_idle_listeners_and_spares_busy_ones() {
    let s = serve_node((Ipv4Addr::new(127, 0, 0, 0), 8)).await;
    let (guest, _echo) = echo_guest().await;
    let ends = s.remote.endpoints("sw1", guest).await.expect("endpoints");
    let mut busy = TcpStream::connect(ends.agent).await.expect("connect");
    busy.write_all(b"hi").await.expect("write");
    let mut back = [0u8; 2];
    busy.read_exact(&mut back).await.expect("read");
    assert_eq!(
        s.remote.tunnels().sweep(Duration::from_secs(60)),
        0,
        "all fresh"
    );
    // The display's listener has no pipe: it goes; the agent's has one: it stays.
    assert_eq!(s.remote.tunnels().sweep(Duration::ZERO), 1);
    assert!(TcpStream::connect(ends.display).await.is_err());
    busy.write_all(b"yo").await.expect("write");
    busy.read_exact(&mut back).await.expect("still piped");
    assert_eq!(&back, b"yo");
    drop(busy);
    let swept = async {
        while s.remote.tunnels().sweep(Duration::ZERO) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), swept)
        .await
        .expect("the closed pipe lets its listener go");
    assert!(s.remote.tunnels().is_empty());
    // Asked again: a new listener that works.
    let again = s.remote.endpoints("sw1", guest).await.expect("again");
    let mut c = TcpStream::connect(again.agent).await.expect("connect");
    c.write_all(b"ok").await.expect("write");
    c.read_exact(&mut back).await.expect("read");
    assert_eq!(&back, b"ok");
}

/// Something else answering at the node's address (a proxy, another
/// program, an older node): its answers still become `NodeError`s, chosen by
/// whether a retry could help.
#[tokio::test]
async fn answers_that_are_not_the_node_api_still_map_to_node_errors() {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/node/v1/sandboxes/x1", get(|| async { "not json" }))
        .route(
            "/node/v1/sandboxes/x1/liveness",
            get(|| async { (StatusCode::BAD_GATEWAY, "upstream down") }),
        )
        .route(
            "/node/v1/sandboxes/x1/blocked",
            get(|| async {
                (
                    StatusCode::IM_A_TEAPOT,
                    "{\"error\":{\"code\":\"x\",\"message\":\"teapot\"}}",
                )
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let remote = RemoteNode::new("odd".into(), addr, SecretString::from(TOKEN));
    let err = remote.inspect("x1").await.expect_err("not json");
    assert!(
        matches!(&err, NodeError::Failed(m) if m.contains("could not be read")),
        "{err:?}"
    );
    let err = remote.liveness("x1").await.expect_err("502");
    assert!(
        matches!(&err, NodeError::Transient(m) if m.contains("502") && m.contains("upstream down")),
        "{err:?}"
    );
    let err = remote.blocked_packets("x1").await.expect_err("418");
    assert!(
        matches!(&err, NodeError::Failed(m) if m.contains("418") && m.contains("teapot")),
        "{err:?}"
    );
    let err = remote.list().await.expect_err("404 of axum");
    assert!(
        matches!(&err, NodeError::Failed(m) if m.contains("404")),
        "{err:?}"
    );
}

/// A guest that reads everything until the peer closes its writing side,
/// then answers with how much it read: a half-close must pass the tunnel
/// both ways (as EOF to the guest, with the way back still open).
#[tokio::test]
async fn a_half_close_crosses_the_tunnel() {
    let s = serve_node((Ipv4Addr::new(127, 0, 0, 0), 8)).await;
    let (guest, _echo) = echo_guest().await;
    let listener = TcpListener::bind((guest, airlock_proto::VNC_PORT))
        .await
        .expect("bind the guest's display port");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if conn.read_to_end(&mut all).await.is_ok() {
                    let _ = conn
                        .write_all(format!("read {}", all.len()).as_bytes())
                        .await;
                }
            });
        }
    });
    let ends = s.remote.endpoints("hc1", guest).await.expect("endpoints");
    let mut c = TcpStream::connect(ends.display).await.expect("connect");
    c.write_all(&[7u8; 100_000]).await.expect("write");
    c.shutdown().await.expect("half-close");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    assert_eq!(answer, "read 100000");
}

/// Everything both sides log, at every level, while tokens are refused,
/// calls fail and tunnels fail to open: never the token.
#[tokio::test]
async fn the_token_is_never_logged() {
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    // The test runtime has one thread: the server's and the tunnels' tasks
    // log through this subscriber too.
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let s = serve_node((Ipv4Addr::new(127, 0, 0, 0), 8)).await;
    let stranger = RemoteNode::new("n1".into(), s.addr, SecretString::from("stranger-token-99"));
    assert!(stranger.inspect("lg1").await.is_err());
    s.node
        .fail_once(Step::Create, NodeError::Failed("disk full".into()));
    assert!(s.remote.create(&create_request("lg1", 7)).await.is_err());
    // A tunnel whose dial is refused (nothing on the display port) and one
    // made with the wrong token.
    let (guest, _echo) = echo_guest().await;
    let ends = s.remote.endpoints("lg1", guest).await.expect("endpoints");
    let mut c = TcpStream::connect(ends.display).await.expect("connect");
    let mut buf = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await;
    let wrong = stranger.endpoints("lg2", guest).await.expect("endpoints");
    let mut c = TcpStream::connect(wrong.agent).await.expect("connect");
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await;
    let logged = String::from_utf8_lossy(&sink.0.lock().expect("sink")).into_owned();
    assert!(logged.contains("node call failed"), "{logged}");
    assert!(logged.contains("without a valid node token"), "{logged}");
    assert!(logged.contains("could not be opened"), "{logged}");
    assert!(!logged.contains(TOKEN), "{logged}");
    assert!(!logged.contains("stranger-token-99"), "{logged}");
}
