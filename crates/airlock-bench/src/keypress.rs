//! Key press → changed pixel. A full-screen page flips black ↔ white on every
//! keydown; the client sends a key event and times until a small incremental
//! update around one sample point shows the other colour. Through the relay
//! into a real sandbox, straight to that sandbox's Xvnc, and on a bare Xvnc +
//! Chromium on the host.

use crate::rfbc::{brightness, vnc_auth, Session};
use crate::sandbox::ControlPlane;
use crate::stats::{ms, percentile, Table};
use crate::wire::{greet_none, WsClient};
use airlock_server::relay::rfb::{IoWire, Wire};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

pub const PAGE: &str = include_str!("flip.html");

/// Chromium flags shared by the sandbox and the bare run (beyond the profile).
const CHROMIUM_FLAGS: &str = "--kiosk --no-first-run --no-default-browser-check \
--disable-background-networking --disable-component-update --disable-sync \
--password-store=basic --hide-crash-restore-bubble";

const KEYSYM_A: u32 = 0x61;
/// Sample square edge, in pixels: small, so transfer time stays out of the figure.
const EDGE: u16 = 8;

/// Times key presses over an initialised session.
#[derive(Debug)]
pub struct Flipper<W> {
    s: Session<W>,
    x: u16,
    y: u16,
    current: u32,
}

impl<W: Wire> Flipper<W> {
    pub async fn new(wire: W) -> Result<Self> {
        let s = Session::init(wire).await?;
        let (x, y) = (s.width / 3, s.height / 3);
        let mut f = Flipper {
            s,
            x,
            y,
            current: 0,
        };
        f.current = f.read_now().await?;
        Ok(f)
    }

    fn rect(&self, incremental: bool) -> Vec<u8> {
        Session::<W>::update_request(incremental, self.x, self.y, EDGE, EDGE)
    }

    /// The sample pixel as it is now (a non-incremental request).
    pub async fn read_now(&mut self) -> Result<u32> {
        let req = self.rect(false);
        self.s.send(&req).await?;
        loop {
            for r in self.s.read_update().await? {
                if let Some(px) = r.pixel(self.x, self.y) {
                    return Ok(px);
                }
            }
            self.s.send(&req).await?;
        }
    }

    /// Wait (up to `within`) until the sample pixel is near-black.
    pub async fn wait_black(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.current = self.read_now().await?;
            if brightness(self.current) < 60 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the flip page did not show (sample pixel {:06x})",
                    self.current
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Click the sample point (gives the page keyboard focus).
    pub async fn click(&mut self) -> Result<()> {
        let (x, y) = (self.x, self.y);
        self.s.send(&Session::<W>::pointer(1, x, y)).await?;
        self.s.send(&Session::<W>::pointer(0, x, y)).await?;
        Ok(())
    }

    /// One key press; the time until the sample pixel flipped.
    pub async fn press(&mut self, within: Duration) -> Result<Duration> {
        let mut msg = self.rect(true);
        msg.extend(Session::<W>::key(true, KEYSYM_A));
        msg.extend(Session::<W>::key(false, KEYSYM_A));
        let started = Instant::now();
        self.s.send(&msg).await?;
        let was = brightness(self.current);
        loop {
            let left = within.saturating_sub(started.elapsed());
            let rects = tokio::time::timeout(left, self.s.read_update())
                .await
                .map_err(|_| anyhow::anyhow!("no flip within {within:?}"))??;
            let took = started.elapsed();
            let seen = rects.iter().find_map(|r| r.pixel(self.x, self.y));
            if let Some(px) = seen {
                if brightness(px).abs_diff(was) > 300 {
                    self.current = px;
                    return Ok(took);
                }
            }
            let req = self.rect(true);
            self.s.send(&req).await?;
        }
    }

    /// Make sure presses flip the page (focus), then time `n` of them.
    pub async fn run(&mut self, n: usize, gap: Duration) -> Result<Vec<Duration>> {
        let mut ok = false;
        for attempt in 0..4 {
            if attempt > 0 {
                self.click().await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                self.current = self.read_now().await?;
            }
            if self.press(Duration::from_secs(3)).await.is_ok() {
                ok = true;
                break;
            }
            self.current = self.read_now().await?;
        }
        if !ok {
            bail!("key presses do not flip the page (no keyboard focus?)");
        }
        for _ in 0..5 {
            tokio::time::sleep(gap).await;
            self.press(Duration::from_secs(3)).await?;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            tokio::time::sleep(gap).await;
            out.push(self.press(Duration::from_secs(3)).await?);
        }
        Ok(out)
    }
}

/// Open a viewer through the relay, greeted as a browser would be.
pub async fn relay_viewer(cp: &ControlPlane, id: &str) -> Result<Flipper<WsClient>> {
    let mut ws = WsClient::connect(&cp.ws_url(id)).await?;
    greet_none(&mut ws).await?;
    Flipper::new(ws).await
}

pub async fn tcp_viewer(
    addr: SocketAddr,
    password: &str,
) -> Result<Flipper<IoWire<tokio::net::TcpStream>>> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let mut w = IoWire(tcp);
    vnc_auth(&mut w, password).await?;
    Flipper::new(w).await
}

/// Put the flip page on a sandbox's desktop: a kiosk Chromium with its own
/// profile, started in the background as the sandbox's user.
pub async fn show_page(cp: &ControlPlane, id: &str) -> Result<()> {
    cp.exec(
        id,
        &[
            "sh",
            "-c",
            "printf '%s' \"$1\" > /tmp/airlock-bench-flip.html",
            "sh",
            PAGE,
        ],
    )
    .await?;
    let start = format!(
        "DISPLAY=:0 setsid chromium --user-data-dir=/tmp/airlock-bench-profile {CHROMIUM_FLAGS} \
         file:///tmp/airlock-bench-flip.html </dev/null >/dev/null 2>&1 &"
    );
    let out = cp.exec(id, &["sh", "-c", &start]).await?;
    if out["exit_code"].as_i64() != Some(0) {
        bail!("starting the kiosk Chromium failed: {out}");
    }
    Ok(())
}

/// A bare Xvnc + kiosk Chromium on the host, both as `nobody`, outside any sandbox.
struct Bare {
    xvnc: std::process::Child,
    chromium: Option<std::process::Child>,
    _dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Drop for Bare {
    /// Each was started as the leader of its own process group; end the whole
    /// group (Chromium's zygotes, renderers and crash handlers with it).
    fn drop(&mut self) {
        let children = self
            .chromium
            .iter_mut()
            .chain(std::iter::once(&mut self.xvnc));
        for child in children {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
    }
}

/// Run as `nobody` (uid/gid 65534), as the leader of a new process group.
fn as_nobody(program: &str) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut c = std::process::Command::new(program);
    c.uid(65534)
        .gid(65534)
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

fn chown_nobody(p: &Path) -> Result<()> {
    let st = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(p)
        .status()?;
    anyhow::ensure!(st.success(), "chown {} failed", p.display());
    Ok(())
}

async fn start_bare(password: &str, display: u16, width: u16, height: u16) -> Result<Bare> {
    let dir = tempfile::Builder::new()
        .prefix("airlock-bench-bare-")
        .tempdir_in("/var/tmp")?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let pwfile = dir.path().join("passwd");
    std::fs::write(
        &pwfile,
        airlock_proto::vncauth::obfuscated_password_file(password),
    )?;
    std::fs::set_permissions(&pwfile, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let page = dir.path().join("flip.html");
    std::fs::write(&page, PAGE)?;
    std::fs::create_dir(dir.path().join("home"))?;
    chown_nobody(dir.path())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let xvnc = as_nobody("Xvnc")
        .arg(format!(":{display}"))
        .args(["-geometry", &format!("{width}x{height}"), "-depth", "24"])
        .args(["-rfbport", &port.to_string(), "-interface", "127.0.0.1"])
        .args(["-SecurityTypes", "VncAuth", "-PasswordFile"])
        .arg(&pwfile)
        .args([
            "-AlwaysShared",
            "-AcceptSetDesktopSize=1",
            "-nolisten",
            "tcp",
            "-desktop",
            "bare",
        ])
        .spawn()
        .context("starting Xvnc (TigerVNC)")?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut bare = Bare {
        xvnc,
        chromium: None,
        addr,
        _dir: dir,
    };
    let sock = format!("/tmp/.X11-unix/X{display}");
    for _ in 0..100 {
        if Path::new(&sock).exists() && tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let home = bare._dir.path().join("home");
    let chromium = as_nobody("chromium")
        .env("HOME", &home)
        .env("DISPLAY", format!(":{display}"))
        .arg(format!(
            "--user-data-dir={}",
            home.join("profile").display()
        ))
        .args(CHROMIUM_FLAGS.split_whitespace())
        .arg(format!("file://{}", page.display()))
        .spawn()
        .context("starting Chromium")?;
    bare.chromium = Some(chromium);
    Ok(bare)
}

fn row(t: &mut Table, name: &str, v: &[Duration], bare: Option<&[Duration]>) {
    let ratio = |p: f64| match bare {
        Some(b) => format!(
            "{:.2}×",
            percentile(v, p).as_secs_f64() / percentile(b, p).as_secs_f64()
        ),
        None => "-".to_owned(),
    };
    t.row(&[
        name.to_owned(),
        v.len().to_string(),
        ms(percentile(v, 50.0)),
        ms(percentile(v, 95.0)),
        ms(*v.iter().max().unwrap_or(&Duration::ZERO)),
        ratio(50.0),
        ratio(95.0),
    ]);
}

pub async fn run(presses: usize, gap: Duration) -> Result<()> {
    // Bare first: nothing of ours is running yet.
    eprintln!("keypress: bare Xvnc + Chromium on the host");
    let password = "benchpw1";
    // The first display number nobody on this host is using.
    let display = (87..200)
        .find(|d| {
            !Path::new(&format!("/tmp/.X11-unix/X{d}")).exists()
                && !Path::new(&format!("/tmp/.X{d}-lock")).exists()
        })
        .context("no free X display number")?;
    let bare = start_bare(password, display, 1280, 800).await?;
    let mut v = tcp_viewer(bare.addr, password).await?;
    v.wait_black(Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bare_times = v.run(presses, gap).await?;
    drop(v);
    drop(bare);

    eprintln!("keypress: a sandbox through the relay");
    let cp = ControlPlane::start().await?;
    let result = sandbox_runs(&cp, presses, gap).await;
    cp.shutdown().await;
    let (relay_times, direct_times) = result?;

    let mut t = Table::new(
        &format!(
            "Key press → changed pixel ({presses} presses, {} ms apart, {EDGE}×{EDGE} incremental raw updates)",
            gap.as_millis()
        ),
        &["stack", "n", "p50", "p95", "max", "p50 vs bare", "p95 vs bare"],
    );
    row(
        &mut t,
        "bare Xvnc + Chromium on the host (TCP)",
        &bare_times,
        None,
    );
    row(
        &mut t,
        "sandbox, straight to its Xvnc (TCP, no relay)",
        &direct_times,
        Some(&bare_times),
    );
    row(
        &mut t,
        "sandbox through the relay (WebSocket)",
        &relay_times,
        Some(&bare_times),
    );
    t.print();
    Ok(())
}

async fn sandbox_runs(
    cp: &ControlPlane,
    presses: usize,
    gap: Duration,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let id = cp.create("browser").await?;
    cp.wait_ready(&id, Duration::from_secs(120)).await?;
    show_page(cp, &id).await?;
    let mut v = relay_viewer(cp, &id).await?;
    v.wait_black(Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let relay_times = v.run(presses, gap).await?;
    drop(v);
    let (addr, pw) = cp.vnc_target(&id)?;
    let mut d = tcp_viewer(addr, &pw).await?;
    let direct_times = d.run(presses, gap).await?;
    drop(d);
    cp.delete(&id).await?;
    Ok((relay_times, direct_times))
}
