//! Starting and stopping a whole control plane: store, app, recovery, reaper,
//! HTTP. The caller chooses the driver and image, so tests can run the real
//! thing on port 0.

use crate::app::sandboxes::chain;
use crate::app::App;
use crate::config::DriverKind;
use crate::config::{Config, ConfigError};
use crate::store::{Store, StoreError};
use crate::vault::{Vault, VaultError};
use airlock_drivers::firecracker::api::UnixApi;
use airlock_drivers::firecracker::{FirecrackerConfig, FirecrackerDriver, JailerConfig};
use airlock_drivers::host::RealHost;
use airlock_drivers::nspawn::{NspawnConfig, NspawnDriver};
use airlock_drivers::qemu::{QemuConfig, QemuDriver};
use airlock_drivers::vm::VmImage;
use airlock_drivers::{Driver, ImageRef};
use airlock_image::Manifest;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    #[error("could not create the data directory {path}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not open the vault")]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Lock(#[from] crate::instance::LockError),
    #[error("could not open the store")]
    Store(#[from] StoreError),
    #[error("could not listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not open the WebRTC ports (UDP {udp}, TCP {tcp}); set webrtc_udp_port/webrtc_tcp_port or webrtc = false")]
    WebRtc {
        udp: u16,
        tcp: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("could not recover sandboxes from the last run: {0}")]
    Recover(String),
    #[error("golden image {0} has no VM artefacts; build them with `airlock image build --vm`")]
    NoVmArtefacts(String),
}

/// The driver the configuration names, over the given image build.
pub fn driver_for(cfg: &Config, manifest: &Manifest) -> Result<Arc<dyn Driver>, StartError> {
    let vm_image = || {
        VmImage::of(manifest)
            .map(Some)
            .ok_or_else(|| StartError::NoVmArtefacts(manifest.build_id.clone()))
    };
    Ok(match cfg.driver {
        DriverKind::Nspawn => {
            let mut nspawn = NspawnConfig::new(cfg.data_dir.join("sandboxes"));
            nspawn.private_users = cfg.user_namespaces;
            Arc::new(NspawnDriver::new(nspawn, Arc::new(RealHost)))
        }
        DriverKind::Qemu => Arc::new(QemuDriver::new(
            QemuConfig::new(cfg.data_dir.join("qemu"), vm_image()?),
            Arc::new(RealHost),
        )),
        DriverKind::Firecracker => {
            let mut fc = FirecrackerConfig::new(cfg.data_dir.join("firecracker"), vm_image()?);
            if let Some(bin) = std::env::var_os("AIRLOCK_FIRECRACKER_BIN") {
                fc.firecracker_bin = bin.into();
            } else if let Some(bin) = &cfg.firecracker_bin {
                fc.firecracker_bin = bin.clone();
            }
            fc.jailer = cfg.jailer_bin.as_ref().map(|bin| JailerConfig {
                jailer_bin: bin.clone(),
                uid: cfg.jailer_uid,
                gid: cfg.jailer_gid,
                chroot_base: cfg.jailer_chroot_base.clone(),
                cgroup_version: 2,
            });
            Arc::new(FirecrackerDriver::new(
                fc,
                Arc::new(RealHost),
                Arc::new(UnixApi::default()),
            ))
        }
    })
}

/// A running control plane.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    shutdown: watch::Sender<bool>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    reaper: tokio::task::JoinHandle<()>,
    /// One server per data dir: held while this one runs.
    _lock: Arc<crate::instance::DataDirLock>,
}

impl Running {
    /// Stop serving. Sandboxes keep running; the next start re-adopts them.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.http.await;
        let _ = self.reaper.await;
        self.app.stop_background();
    }

    /// Wait until the HTTP server ends (after a shutdown signal).
    pub async fn wait(self) -> std::io::Result<()> {
        let result = match self.http.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        };
        let _ = self.shutdown.send(true);
        let _ = self.reaper.await;
        self.app.stop_background();
        result
    }

    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// The data dir is root's alone (0700), and an SQLite database in it is
/// 0600 before the store first opens it: it holds agent tokens and VNC
/// passwords. SQLite gives its `-wal` and `-shm` files the database's mode.
fn private_data(cfg: &Config) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))?;
    let url = cfg.database_url();
    let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .map(|rest| rest.split('?').next().unwrap_or(rest))
        .filter(|p| !p.is_empty() && *p != ":memory:")
    else {
        return Ok(());
    };
    let path = std::path::Path::new(path);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Open files up to the hard limit: every sandbox holds connections and
/// files, and systemd's default soft limit (1024) is a few hundred viewers.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let raised = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::debug!(before = ?lim.current, now = ?lim.maximum, "raised the open-file limit")
            }
            Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
        }
    }
}

/// What every role opens first: the data dir (private, locked), the store
/// and the vault.
pub(crate) async fn open_data(
    cfg: &Config,
) -> Result<(Arc<crate::instance::DataDirLock>, Store, Vault), StartError> {
    raise_open_file_limit();
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| StartError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let lock = Arc::new(crate::instance::DataDirLock::acquire(&cfg.data_dir)?);
    private_data(cfg).map_err(|source| StartError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let store = Store::open(&cfg.database_url()).await?;
    let vault = Vault::load(&cfg.data_dir)?;
    Ok((lock, store, vault))
}

pub async fn start(
    cfg: &Config,
    image: ImageRef,
    driver: Arc<dyn Driver>,
) -> Result<Running, StartError> {
    cfg.validate()?;
    let opened = open_data(cfg).await?;
    serve(cfg, image, crate::app::Seams::real(driver), opened).await
}

/// Start an app over `seams` on what [`open_data`] opened, and serve it.
pub(crate) async fn serve(
    cfg: &Config,
    image: ImageRef,
    seams: crate::app::Seams,
    (lock, store, vault): (Arc<crate::instance::DataDirLock>, Store, Vault),
) -> Result<Running, StartError> {
    // Listen for SIGHUP before the pid is written: from then on `vault
    // rotate` may send it, and its default action would end this process.
    // tokio keeps a signal that arrives before the listener task runs.
    let hangups = listen_for_hangups();
    lock.record(&vault)?;
    let app = App::with_seams(cfg.app_config(), store, seams, image, cfg.pool()?, vault);
    app.ensure_local_user()
        .await
        .map_err(|e| StartError::Recover(chain(&e)))?;
    // Among replicas, a sandbox's boot runs in the replica that made it, and
    // the leader fails what a replica that went away left half-made
    // (`cluster::duties`); the nodes re-adopt and clean up their own.
    if !cfg.cluster.enabled {
        app.recover()
            .await
            .map_err(|e| StartError::Recover(chain(&e)))?;
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: cfg.listen,
        source,
    })?;
    if let Some(rtc) = cfg.webrtc_endpoint() {
        let endpoint = crate::webrtc::Endpoint::start(&rtc)
            .await
            .map_err(|source| StartError::WebRtc {
                udp: rtc.udp_port,
                tcp: rtc.tcp_port,
                source,
            })?;
        tracing::info!(udp = %endpoint.udp_addr(), tcp = %endpoint.tcp_addr(), "WebRTC media ports open");
        let _ = app.webrtc.set(endpoint);
    }
    let (shutdown, rx) = watch::channel(false);
    let reaper = tokio::spawn(app.clone().run_reaper(rx.clone()));
    app.spawn(app.clone().run_credential_checks(rx.clone()));
    app.spawn(app.recordings.clone().run_sweeper());
    app.start_pools();
    reload_on_hangup(hangups, &app, &lock, rx.clone());
    let mut http_rx = rx;
    let http = tokio::spawn(crate::http::serve(listener, app.clone(), async move {
        let _ = http_rx.wait_for(|stop| *stop).await;
    }));
    Ok(Running {
        addr,
        app,
        shutdown,
        http,
        reaper,
        _lock: lock,
    })
}

/// Take over SIGHUP (its default action ends the process).
fn listen_for_hangups() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; `airlock vault rotate` needs a restart to take effect");
            None
        }
    }
}

/// SIGHUP: load the keyring again (`airlock vault rotate` sends it) and say
/// in the lock file which keys are now held, so the sender knows.
fn reload_on_hangup(
    hangups: Option<tokio::signal::unix::Signal>,
    app: &Arc<App>,
    lock: &Arc<crate::instance::DataDirLock>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(mut hangups) = hangups else {
        return;
    };
    // Weak: a stopped server must let go of the lock at once, not when this
    // task next wakes.
    let (app, lock) = (Arc::downgrade(app), Arc::downgrade(lock));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                got = hangups.recv() => if got.is_none() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            let (Some(app), Some(lock)) = (app.upgrade(), lock.upgrade()) else {
                return;
            };
            match app.reload_vault().await {
                Ok(()) => {
                    if let Err(e) = lock.record(&*app.vault.read().await) {
                        tracing::error!(error = %chain(&e), "could not record the reloaded keyring");
                    }
                }
                Err(e) => tracing::error!(error = %chain(&e), "could not reload the vault keyring"),
            }
        }
    });
}

#[cfg(test)]
mod private_data_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    /// The data dir and the database (agent tokens, VNC passwords) are
    /// root's alone, even where they existed with looser modes.
    #[test]
    fn the_data_dir_and_database_are_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::write(data.join("airlock.db-wal"), "").expect("wal");
        std::fs::set_permissions(
            data.join("airlock.db-wal"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        let cfg = Config {
            data_dir: data.clone(),
            ..Config::default()
        };
        private_data(&cfg).expect("private");
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("airlock.db")), 0o600);
        assert_eq!(mode(&data.join("airlock.db-wal")), 0o600);
    }

    /// The store keeps the mode once it has written the database.
    #[tokio::test]
    async fn the_store_keeps_the_database_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = Config {
            data_dir: tmp.path().to_path_buf(),
            ..Config::default()
        };
        private_data(&cfg).expect("private");
        let store = Store::open(&cfg.database_url()).await.expect("store");
        drop(store);
        for name in ["airlock.db", "airlock.db-wal", "airlock.db-shm"] {
            let path = tmp.path().join(name);
            if path.exists() {
                assert_eq!(mode(&path), 0o600, "{name}");
            }
        }
        assert_eq!(mode(&tmp.path().join("airlock.db")), 0o600);
    }
}
