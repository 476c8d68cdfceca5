//! Server-side recording of a sandbox's screen (docs/recording.md): the
//! recorder joins the sandbox's video hub like one more viewer and writes the
//! guest's H.264 frames as they are (no re-encode) into fragmented MP4.
//!
//! Files live in `<dir>/<sandbox id>/<recording id>.mp4`, each with a
//! `<recording id>.json` beside it (owner, start, duration, size, why it
//! ended). A retention sweep deletes recordings older than `retention_h`.

pub mod fmp4;
mod service;

use crate::webrtc::hub::{Hub, HubState};
use airlock_proto::stream::Control;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{broadcast, oneshot};

/// `[recording]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingConfig {
    /// Recording can be started at all (off by default).
    pub enabled: bool,
    /// Where recordings are written; `<data_dir>/recordings` when unset.
    pub dir: Option<PathBuf>,
    /// Recordings older than this many hours are deleted (0 keeps them).
    pub retention_h: u64,
    /// A recording stops by itself at this size, in MiB.
    pub max_mb_per_recording: u64,
    /// A login's browser sandbox may be recorded too. Off by default: the
    /// user types credentials into it.
    pub logins: bool,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        RecordingConfig {
            enabled: false,
            dir: None,
            retention_h: 7 * 24,
            max_mb_per_recording: 1024,
            logins: false,
        }
    }
}

impl RecordingConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_mb_per_recording == 0 {
            return Err("max_mb_per_recording must be at least 1".into());
        }
        Ok(())
    }
}

/// What is known of one recording (the `.json` beside its file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    pub id: String,
    pub sandbox_id: String,
    pub owner_id: String,
    /// Milliseconds since the epoch.
    pub started_at: i64,
    pub duration_ms: u64,
    pub bytes: u64,
    pub width: u32,
    pub height: u32,
    /// Set once it ended: why (stopped, size limit, the sandbox went away).
    pub ended: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("recording is off on this server ([recording] enabled = false)")]
    Off,
    #[error("a login's browser sandbox is not recorded: credentials are typed into it ([recording] logins = false)")]
    Login,
    #[error("sandbox {0} is being recorded already")]
    Busy(String),
    #[error("sandbox {0} is not being recorded")]
    NotRecording(String),
    #[error("no recording {0:?}")]
    NotFound(String),
    #[error("recording storage: {0}")]
    Io(#[from] std::io::Error),
}

/// Recordings under way and on disk.
#[derive(Debug)]
pub struct Recordings {
    pub cfg: RecordingConfig,
    dir: PathBuf,
    active: Mutex<HashMap<String, Active>>,
    active_gauge: Gauge,
    bytes_written: Counter,
}

#[derive(Debug)]
struct Active {
    id: String,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Recordings {
    pub fn new(cfg: RecordingConfig, data_dir: &Path, metrics: &crate::metrics::Metrics) -> Self {
        let dir = cfg
            .dir
            .clone()
            .unwrap_or_else(|| data_dir.join("recordings"));
        let r = Recordings {
            cfg,
            dir,
            active: Mutex::default(),
            active_gauge: Gauge::default(),
            bytes_written: Counter::default(),
        };
        metrics.register(
            "recordings_active",
            "Sandbox screen recordings under way",
            r.active_gauge.clone(),
        );
        metrics.register(
            "recording_bytes_written",
            "Bytes of MP4 written by screen recordings",
            r.bytes_written.clone(),
        );
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Active>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sandbox_dir(&self, sandbox_id: &str) -> Result<PathBuf, RecordingError> {
        if !valid_id(sandbox_id) {
            return Err(RecordingError::NotFound(sandbox_id.into()));
        }
        Ok(self.dir.join(sandbox_id))
    }

    /// The recording under way for a sandbox, if any.
    pub fn current(&self, sandbox_id: &str) -> Option<String> {
        let map = self.lock();
        map.get(sandbox_id)
            .filter(|a| !a.done.is_finished())
            .map(|a| a.id.clone())
    }

    /// Check that a sandbox may be recorded now; `login` says it is a
    /// login's browser sandbox.
    pub fn may_start(&self, sandbox_id: &str, login: bool) -> Result<(), RecordingError> {
        if !self.cfg.enabled {
            return Err(RecordingError::Off);
        }
        if login && !self.cfg.logins {
            return Err(RecordingError::Login);
        }
        if self.current(sandbox_id).is_some() {
            return Err(RecordingError::Busy(sandbox_id.into()));
        }
        Ok(())
    }

    /// Start recording `hub`'s frames; the recorder holds the hub (and so the
    /// guest's encoder) until it stops.
    pub async fn start(
        self: &Arc<Self>,
        hub: Arc<Hub>,
        owner_id: &str,
        login: bool,
    ) -> Result<Meta, RecordingError> {
        let sandbox_id = hub.sandbox_id.clone();
        self.may_start(&sandbox_id, login)?;
        let dir = self.sandbox_dir(&sandbox_id)?;
        tokio::fs::create_dir_all(&dir).await?;
        let id = format!("rec-{}", crate::app::sandboxes::new_id());
        let meta = Meta {
            id: id.clone(),
            sandbox_id: sandbox_id.clone(),
            owner_id: owner_id.to_owned(),
            started_at: crate::store::now_ms(),
            duration_ms: 0,
            bytes: 0,
            width: 0,
            height: 0,
            ended: None,
        };
        write_meta(&dir, &meta).await?;
        let file = tokio::fs::File::create(dir.join(format!("{id}.mp4"))).await?;
        let mut map = self.lock();
        if map.get(&sandbox_id).is_some_and(|a| !a.done.is_finished()) {
            return Err(RecordingError::Busy(sandbox_id));
        }
        let (stop, stop_rx) = oneshot::channel();
        let rec = Recorder {
            hub,
            dir,
            meta: meta.clone(),
            file,
            max_bytes: self.cfg.max_mb_per_recording << 20,
            bytes_written: self.bytes_written.clone(),
        };
        let me = Arc::downgrade(self);
        let gauge = self.active_gauge.clone();
        gauge.inc();
        let done = tokio::spawn(async move {
            let sandbox = rec.meta.sandbox_id.clone();
            let rid = rec.meta.id.clone();
            let end = rec.run(stop_rx).await;
            tracing::info!(sandbox = %sandbox, recording = %rid, reason = %end, "recording ended");
            gauge.dec();
            if let Some(me) = me.upgrade() {
                let mut map = me.lock();
                if map.get(&sandbox).is_some_and(|a| a.id == rid) {
                    map.remove(&sandbox);
                }
            }
        });
        map.insert(
            sandbox_id,
            Active {
                id,
                stop: Some(stop),
                done,
            },
        );
        Ok(meta)
    }

    /// Stop the sandbox's recording and wait until its file is complete.
    pub async fn stop(&self, sandbox_id: &str) -> Result<Meta, RecordingError> {
        let (id, done) = {
            let mut map = self.lock();
            let a = map
                .remove(sandbox_id)
                .ok_or_else(|| RecordingError::NotRecording(sandbox_id.into()))?;
            if let Some(stop) = a.stop {
                let _ = stop.send(());
            }
            (a.id, a.done)
        };
        let _ = done.await;
        self.get(sandbox_id, &id).await
    }

    /// One recording's description.
    pub async fn get(&self, sandbox_id: &str, id: &str) -> Result<Meta, RecordingError> {
        let dir = self.sandbox_dir(sandbox_id)?;
        if !valid_id(id) {
            return Err(RecordingError::NotFound(id.into()));
        }
        let text = match tokio::fs::read(dir.join(format!("{id}.json"))).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RecordingError::NotFound(id.into()))
            }
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&text).map_err(|_| RecordingError::NotFound(id.into()))
    }

    /// Where a recording's MP4 is.
    pub fn file(&self, meta: &Meta) -> Result<PathBuf, RecordingError> {
        Ok(self
            .sandbox_dir(&meta.sandbox_id)?
            .join(format!("{}.mp4", meta.id)))
    }

    /// A sandbox's recordings, oldest first.
    pub async fn list(&self, sandbox_id: &str) -> Result<Vec<Meta>, RecordingError> {
        let dir = self.sandbox_dir(sandbox_id)?;
        let mut out = read_metas(&dir).await?;
        out.sort_by_key(|m| m.started_at);
        Ok(out)
    }

    /// Delete recordings that ended before `now_ms - retention`; returns how
    /// many went. Recordings under way are kept.
    pub async fn sweep(&self, now_ms: i64) -> Result<usize, RecordingError> {
        if self.cfg.retention_h == 0 {
            return Ok(0);
        }
        let keep_from = now_ms - (self.cfg.retention_h as i64) * 3_600_000;
        let mut gone = 0;
        let mut sandboxes = match tokio::fs::read_dir(&self.dir).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        while let Some(entry) = sandboxes.next_entry().await? {
            let dir = entry.path();
            if !entry.file_type().await?.is_dir() {
                continue;
            }
            for meta in read_metas(&dir).await? {
                let end = meta.started_at + meta.duration_ms as i64;
                let live = self.current(&meta.sandbox_id).as_deref() == Some(meta.id.as_str());
                if end < keep_from && !live {
                    let _ = tokio::fs::remove_file(dir.join(format!("{}.mp4", meta.id))).await;
                    tokio::fs::remove_file(dir.join(format!("{}.json", meta.id))).await?;
                    gone += 1;
                }
            }
            // An emptied sandbox directory goes too (fails while not empty).
            let _ = tokio::fs::remove_dir(&dir).await;
        }
        Ok(gone)
    }

    /// Sweep every ten minutes, for as long as the app runs.
    pub async fn run_sweeper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tick.tick().await;
            match self.sweep(crate::store::now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "old recordings deleted"),
                Err(e) => tracing::warn!(error = %e, "recording retention sweep failed"),
            }
        }
    }
}

async fn read_metas(dir: &Path) -> Result<Vec<Meta>, RecordingError> {
    let mut out = Vec::new();
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    while let Some(entry) = entries.next_entry().await? {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            if let Ok(text) = tokio::fs::read(&path).await {
                if let Ok(meta) = serde_json::from_slice::<Meta>(&text) {
                    out.push(meta);
                }
            }
        }
    }
    Ok(out)
}

/// Write the description beside the file, replacing it whole.
async fn write_meta(dir: &Path, meta: &Meta) -> std::io::Result<()> {
    let tmp = dir.join(format!("{}.json.tmp", meta.id));
    let text = serde_json::to_vec(meta).map_err(std::io::Error::other)?;
    tokio::fs::write(&tmp, text).await?;
    tokio::fs::rename(&tmp, dir.join(format!("{}.json", meta.id))).await
}

/// How often a running recording updates its `.json` (duration, size).
const META_EVERY: Duration = Duration::from_secs(2);
/// How long a recorder waits for the guest's first keyframe.
const FIRST_KEYFRAME: Duration = Duration::from_secs(15);

struct Recorder {
    hub: Arc<Hub>,
    dir: PathBuf,
    meta: Meta,
    file: tokio::fs::File,
    max_bytes: u64,
    bytes_written: Counter,
}

impl Recorder {
    async fn run(mut self, stop: oneshot::Receiver<()>) -> String {
        let end = self.record(stop).await;
        let end = match end {
            Ok(e) => e,
            Err(e) => format!("writing failed: {e}"),
        };
        let _ = self.file.flush().await;
        let _ = self.file.sync_data().await;
        self.meta.ended = Some(end.clone());
        if let Err(e) = write_meta(&self.dir, &self.meta).await {
            tracing::warn!(recording = %self.meta.id, error = %e, "could not write a recording's description");
        }
        end
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes).await?;
        self.meta.bytes += bytes.len() as u64;
        self.bytes_written.inc_by(bytes.len() as u64);
        Ok(())
    }

    async fn record(&mut self, mut stop: oneshot::Receiver<()>) -> std::io::Result<String> {
        let mut frames = self.hub.subscribe();
        let mut state = self.hub.state();
        self.hub.control(Control::Keyframe);
        let mut mux = fmp4::Muxer::default();
        // Set by the first keyframe: its parameter sets make the init segment.
        let mut started = false;
        let mut last_arrival = Instant::now();
        let mut wants_keyframe = true;
        let first_deadline = tokio::time::Instant::now() + FIRST_KEYFRAME;
        let mut meta_tick = tokio::time::interval(META_EVERY);
        let end = loop {
            tokio::select! {
                _ = &mut stop => break "stopped".to_owned(),
                changed = state.changed() => {
                    let ended = match changed {
                        Err(_) => Some("the video link closed".to_owned()),
                        Ok(()) => match &*state.borrow() {
                            HubState::Ended(why) => Some(format!("the video link closed: {why}")),
                            _ => None,
                        },
                    };
                    if let Some(why) = ended {
                        break why;
                    }
                }
                _ = tokio::time::sleep_until(first_deadline), if !started => {
                    break "no keyframe came from the guest".to_owned();
                }
                _ = meta_tick.tick() => {
                    self.meta.duration_ms = (mux.duration_us() + last_arrival.elapsed().as_micros() as u64) / 1000;
                    if started {
                        write_meta(&self.dir, &self.meta).await?;
                    }
                }
                f = frames.recv() => match f {
                    Ok(frame) => {
                        if wants_keyframe && !frame.keyframe {
                            continue;
                        }
                        if !started {
                            let Some((sps, pps)) = fmp4::parameter_sets(&frame.data) else { continue };
                            let info = self.hub.info();
                            let (w, h) = info.map_or((0, 0), |i| (i.width, i.height));
                            self.meta.width = w;
                            self.meta.height = h;
                            let init = fmp4::init_segment(w, h, &sps, &pps);
                            self.write(&init).await?;
                            started = true;
                        } else if frame.keyframe {
                            // The viewer resized the display: the stream carries
                            // the new parameter sets; the description follows.
                            if let Some(i) = self.hub.info() {
                                self.meta.width = i.width;
                                self.meta.height = i.height;
                            }
                        }
                        wants_keyframe = false;
                        last_arrival = Instant::now();
                        if let Some(bytes) = mux.push(frame.pts_us, frame.keyframe, &frame.data) {
                            self.write(&bytes).await?;
                        }
                        if self.meta.bytes >= self.max_bytes {
                            break "the size limit was reached".to_owned();
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Frames were lost: go on from the next keyframe.
                        wants_keyframe = true;
                        self.hub.control(Control::Keyframe);
                    }
                    Err(broadcast::error::RecvError::Closed) => break "the video link closed".to_owned(),
                }
            }
        };
        if let Some(bytes) = mux.finish(last_arrival.elapsed().as_micros() as u64) {
            self.write(&bytes).await?;
        }
        self.meta.duration_ms = mux.duration_us() / 1000;
        Ok(end)
    }
}

#[cfg(test)]
mod api_tests;
#[cfg(test)]
mod tests;
