//! What the VM integration tests share: why a test must skip, the image's VM
//! artefacts, a sandbox spec in the tests' address range, and a plain HTTP
//! GET to the guest's agent.

#![allow(dead_code)]

use airlock_drivers::host::{Cmd, Host, HostError, Process, RealHost};
use airlock_drivers::net::pool::AddressPool;
use airlock_drivers::vm::VmImage;
use airlock_drivers::{ImageRef, Limits, SandboxSpec};
use airlock_proto::metadata::{Display, Metadata, Network, SandboxKind};
use async_trait::async_trait;
use std::path::Path;
use std::time::Duration;

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")))
        .unwrap_or(false)
}

pub fn on_path(program: &str) -> Option<std::path::PathBuf> {
    let p = Path::new(program);
    if p.is_absolute() {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|c| c.is_file())
    })
}

/// The current image and its VM artefacts from `$AIRLOCK_IMAGE_DIR`, or why not.
pub fn vm_image() -> Result<(ImageRef, VmImage), String> {
    let dir = std::env::var_os("AIRLOCK_IMAGE_DIR")
        .ok_or("AIRLOCK_IMAGE_DIR is not set (scripts/test sets it)")?;
    let store = airlock_image::ImageStore::new(dir.into());
    let manifest = store
        .current()
        .map_err(|e| e.to_string())?
        .ok_or("there is no golden image (`airlock image build --vm`)")?;
    let vm = VmImage::of(&manifest).ok_or(format!(
        "golden image {} has no VM artefacts (`airlock image build --vm`)",
        manifest.build_id
    ))?;
    Ok((ImageRef::of(&manifest), vm))
}

/// A sandbox in the tests' range (10.235.0.0/16), its block picked by pid
/// so parallel runs on one host do not collide.
pub fn spec(id: &str, image: ImageRef, token: &str) -> SandboxSpec {
    let pool = AddressPool::parse("10.235.0.0/16").expect("pool");
    let lease = pool.lease(8192 + std::process::id() % 8000).expect("lease");
    SandboxSpec {
        id: id.to_owned(),
        kind: SandboxKind::Browser,
        image,
        lease,
        metadata: Metadata {
            sandbox_id: id.to_owned(),
            kind: SandboxKind::Browser,
            agent_token: token.to_owned(),
            vnc_password: "vmtestpw".into(),
            display: Display::default(),
            network: Network {
                address: lease.guest.to_string(),
                gateway: lease.host.to_string(),
                prefix_len: lease.prefix_len,
            },
            egress: None,
        },
        limits: Limits::default(),
        proxy_port: None,
        home_volume: None,
    }
}

/// `GET path` with a bearer token; the status and body, or why not.
pub async fn get(
    addr: std::net::SocketAddr,
    path: &str,
    token: &str,
) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or(format!("no status in {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "timed out".to_owned())?
}

// ---- network namespaces of the tests' own ----

/// The real host, with every command run in the test's network namespace
/// through `nsenter --net`: unlike `ip netns exec` it makes no mount namespace
/// of its own, so a namespace that `ip netns add` mounts under `/run/netns`
/// from inside it is seen by everyone (as it is when the driver runs).
#[derive(Debug)]
pub struct NetOnly {
    pub ns: String,
}

#[async_trait]
impl Host for NetOnly {
    async fn run(&self, cmd: &Cmd) -> Result<String, HostError> {
        let wrapped = Cmd::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(&cmd.program)
            .args(cmd.args.clone());
        RealHost.run(&wrapped).await
    }
    async fn spawn_detached(&self, cmd: &Cmd, log: &Path) -> Result<Process, HostError> {
        RealHost.spawn_detached(cmd, log).await
    }
    fn signal(&self, pid: u32, signal: i32) -> Result<(), HostError> {
        RealHost.signal(pid, signal)
    }
    fn cmdline(&self, pid: u32) -> Option<String> {
        RealHost.cmdline(pid)
    }
    fn children(&self, pid: u32) -> Vec<u32> {
        RealHost.children(pid)
    }
    fn hold(&self, pid: u32, started: Option<u64>) -> Option<Process> {
        RealHost.hold(pid, started)
    }
    fn has_exited(&self, process: &Process) -> bool {
        RealHost.has_exited(process)
    }
    fn signal_process(&self, process: &Process, signal: i32) -> Result<(), HostError> {
        RealHost.signal_process(process, signal)
    }
    fn pid_namespace(&self, pid: u32) -> Option<u64> {
        RealHost.pid_namespace(pid)
    }
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> Result<(), HostError> {
        RealHost.chown(path, uid, gid)
    }
}

/// A network namespace the test made; deleted when dropped.
pub struct Namespace(pub String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// Run `f` on a thread of its own that has joined network namespace `ns`:
/// sockets it makes stay in that namespace wherever they are used later.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns(2) takes a descriptor we own for the call's duration
        // and a flag; it changes only this thread's network namespace.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the namespace thread")
}
