//! The GStreamer pipeline of `capture`: screen pixels pushed in when they
//! change ([`super::grab`]), converted to I420 and encoded by x264 for the
//! lowest latency, one access unit out per frame in.
//!
//! ```text
//! appsrc(BGRx, on change) ─ videoconvert ─ caps(I420)
//!     ─ x264enc(zerolatency) ─ caps(constrained baseline, Annex-B, AU) ─ appsink
//! ```
//!
//! The capture loop pushes a frame and waits for its access unit before it
//! grabs the next, so nothing queues between the screen and the encoder: a
//! frame is encoded from the pixels of the moment it is sent, and when x264
//! is slower than the screen changes, frames are skipped at the grab (never
//! an encoded one, which would break the reference chain). Should a frame be
//! pushed while the previous is still queued, appsrc drops the older one.

use airlock_proto::stream::VideoFrame;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use std::time::Duration;

/// Every element the pipeline uses, with the Debian package that ships it (for
/// the message when one is missing).
pub const ELEMENTS: &[(&str, &str)] = &[
    ("appsrc", "gstreamer1.0-plugins-base"),
    ("capsfilter", "libgstreamer1.0-0"),
    ("videoconvert", "gstreamer1.0-plugins-base"),
    ("x264enc", "gstreamer1.0-plugins-ugly"),
    ("appsink", "gstreamer1.0-plugins-base"),
];

/// Seconds between keyframes when nobody asks for one; viewers that lose
/// packets ask (`Control::Keyframe`), so this is only a backstop.
const KEYFRAME_INTERVAL_S: u32 = 10;
/// Most threads a frame is split over: x264 cuts the frame into one slice
/// each, and slices past a few cost more bits than they save time.
const MAX_WORKERS: usize = 4;

/// What GStreamer's video encoders add to every timestamp
/// (`gst_video_encoder_set_min_pts`, 1000 hours in x264enc).
const ENCODER_PTS_OFFSET: gst::ClockTime = gst::ClockTime::from_seconds(1000 * 3600);

/// What one pipeline captures and how it encodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The area captured, from the top-left corner; even (4:2:0 needs it).
    pub width: u32,
    pub height: u32,
    /// The most frames per second; fewer when the screen changes less.
    pub fps: u32,
    pub bitrate_kbit: u32,
}

impl Settings {
    /// The capture area for a screen of `width`×`height`: x264 encodes 4:2:0
    /// only in even sizes, so an odd last column or row is left out.
    pub fn even(width: u32, height: u32) -> (u32, u32) {
        (width & !1, height & !1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("initialising GStreamer")]
    Init(#[source] gst::glib::Error),
    #[error("the GStreamer element {element} is missing (install the Debian package {package})")]
    Missing {
        element: &'static str,
        package: &'static str,
    },
    #[error("{element} has no property {property}")]
    NoProperty {
        element: &'static str,
        property: &'static str,
    },
    #[error("{element}'s property {property} does not take {value:?}")]
    BadValue {
        element: &'static str,
        property: &'static str,
        value: String,
    },
    #[error("assembling the pipeline")]
    Assemble(#[source] gst::glib::BoolError),
    #[error("starting the pipeline")]
    Start(#[source] gst::StateChangeError),
    #[error("the pipeline failed in {element}: {message}")]
    Failed { element: String, message: String },
    #[error("the pipeline ended")]
    Ended,
    #[error("a frame's buffer could not be read")]
    Map(#[source] gst::glib::BoolError),
}

/// Makes `factory` with `props` (name, value as gst-launch would write it),
/// refusing instead of panicking when a property or value does not exist in
/// this GStreamer version.
fn make(
    factory: &'static str,
    props: &[(&'static str, String)],
) -> Result<gst::Element, EncoderError> {
    let package = ELEMENTS
        .iter()
        .find(|(e, _)| *e == factory)
        .map(|(_, p)| *p)
        .unwrap_or("unknown");
    let el = gst::ElementFactory::make(factory)
        .build()
        .map_err(|_| EncoderError::Missing {
            element: factory,
            package,
        })?;
    for (property, value) in props {
        let pspec = el.find_property(property).ok_or(EncoderError::NoProperty {
            element: factory,
            property,
        })?;
        let v =
            <gst::glib::Value as gst::prelude::GstValueExt>::deserialize(value, pspec.value_type())
                .map_err(|_| EncoderError::BadValue {
                    element: factory,
                    property,
                    value: value.clone(),
                })?;
        el.set_property_from_value(property, &v);
    }
    Ok(el)
}

fn caps(description: &str) -> Result<gst::Element, EncoderError> {
    let caps = description
        .parse::<gst::Caps>()
        .map_err(EncoderError::Assemble)?;
    gst::ElementFactory::make("capsfilter")
        .property("caps", caps)
        .build()
        .map_err(|_| EncoderError::Missing {
            element: "capsfilter",
            package: "libgstreamer1.0-0",
        })
}

/// The elements in order, configured for `s`.
fn elements(s: &Settings) -> Result<Vec<gst::Element>, EncoderError> {
    let p = |k: &'static str, v: &str| (k, v.to_owned());
    let threads = workers().to_string();
    Ok(vec![
        make(
            "appsrc",
            &[
                // The most frames a second, not a fixed rate: frames come
                // when the screen changes. (With a variable rate declared,
                // framerate=0/1, x264 holds every frame back until the next
                // arrives, to learn its duration: a frame of latency, and on
                // a quiet screen a second.)
                p(
                    "caps",
                    &format!(
                        "video/x-raw,format=BGRx,width={},height={},framerate={}/1",
                        s.width, s.height, s.fps
                    ),
                ),
                p("format", "time"),
                p("is-live", "true"),
                p("do-timestamp", "true"),
                p("block", "false"),
                p("max-buffers", "1"),
                p("leaky-type", "downstream"),
            ],
        )?,
        make("videoconvert", &[p("n-threads", &threads)])?,
        caps("video/x-raw,format=I420")?,
        make(
            "x264enc",
            &[
                p("tune", "zerolatency"),
                p("speed-preset", "ultrafast"),
                p("bframes", "0"),
                p("rc-lookahead", "0"),
                p("sliced-threads", "true"),
                p("threads", &threads),
                p("key-int-max", &(s.fps * KEYFRAME_INTERVAL_S).to_string()),
                p("bitrate", &s.bitrate_kbit.to_string()),
                // In byte-stream form x264 repeats SPS and PPS before every
                // IDR frame, which a viewer joining late needs.
                p("byte-stream", "true"),
                p("aud", "false"),
            ],
        )?,
        caps("video/x-h264,profile=constrained-baseline,stream-format=byte-stream,alignment=au")?,
        make(
            "appsink",
            &[
                p("drop", "false"),
                p("max-buffers", "2"),
                p("sync", "false"),
                p("emit-signals", "false"),
            ],
        )?,
    ])
}

/// Threads for one frame's conversion and encoding: the cores there are, up
/// to [`MAX_WORKERS`].
fn workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(MAX_WORKERS)
}

fn init() -> Result<(), EncoderError> {
    gst::init().map_err(EncoderError::Init)
}

/// Makes every element with its properties, without opening the display:
/// what `airlock-agent capture --check` reports on.
pub fn check() -> Result<String, EncoderError> {
    init()?;
    elements(&Settings {
        width: 640,
        height: 480,
        fps: airlock_proto::stream::DEFAULT_FPS,
        bitrate_kbit: 1000,
    })?;
    let names: Vec<&str> = ELEMENTS.iter().map(|(e, _)| *e).collect();
    Ok(format!("{} ({})", gst::version_string(), names.join(", ")))
}

/// A running pipeline; stopped when dropped.
#[derive(Debug)]
pub struct Encoder {
    pipeline: gst::Pipeline,
    src: gst_app::AppSrc,
    sink: gst_app::AppSink,
    bus: gst::Bus,
    settings: Settings,
}

impl Encoder {
    pub fn start(settings: &Settings) -> Result<Self, EncoderError> {
        init()?;
        let els = elements(settings)?;
        let pipeline = gst::Pipeline::new();
        pipeline.add_many(&els).map_err(EncoderError::Assemble)?;
        gst::Element::link_many(&els).map_err(EncoderError::Assemble)?;
        let missing = |element, package| EncoderError::Missing { element, package };
        let src = els
            .first()
            .and_then(|e| e.clone().downcast::<gst_app::AppSrc>().ok())
            .ok_or(missing("appsrc", "gstreamer1.0-plugins-base"))?;
        let sink = els
            .last()
            .and_then(|e| e.clone().downcast::<gst_app::AppSink>().ok())
            .ok_or(missing("appsink", "gstreamer1.0-plugins-base"))?;
        let bus = pipeline.bus().ok_or(EncoderError::Ended)?;
        let enc = Encoder {
            pipeline,
            src,
            sink,
            bus,
            settings: settings.clone(),
        };
        enc.pipeline
            .set_state(gst::State::Playing)
            .map_err(EncoderError::Start)?;
        Ok(enc)
    }

    /// Sends one frame of BGRx pixels (`width * 4` bytes per row) to the
    /// encoder, stamped with the moment of the call.
    pub fn push(&self, pixels: &[u8]) -> Result<(), EncoderError> {
        self.src
            .push_buffer(gst::Buffer::from_slice(pixels.to_vec()))
            .map(|_| ())
            .map_err(|_| EncoderError::Ended)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Asks x264 for an IDR frame with SPS and PPS in front, as soon as it can.
    pub fn force_keyframe(&self) {
        let ev = gstreamer_video::UpstreamForceKeyUnitEvent::builder()
            .all_headers(true)
            .build();
        if !self.sink.send_event(ev) {
            tracing::warn!("the encoder did not take a keyframe request");
        }
    }

    /// The next access unit, waiting at most `timeout`; `None` if none came.
    pub fn next_frame(&self, timeout: Duration) -> Result<Option<VideoFrame>, EncoderError> {
        if let Some(msg) = self
            .bus
            .pop_filtered(&[gst::MessageType::Error, gst::MessageType::Eos])
        {
            return Err(match msg.view() {
                gst::MessageView::Error(e) => EncoderError::Failed {
                    element: msg.src().map(|s| s.name().to_string()).unwrap_or_default(),
                    message: e.error().to_string(),
                },
                _ => EncoderError::Ended,
            });
        }
        let wait = gst::ClockTime::from_nseconds(timeout.as_nanos() as u64);
        let Some(sample) = self.sink.try_pull_sample(wait) else {
            if self.sink.is_eos() {
                return Err(EncoderError::Ended);
            }
            return Ok(None);
        };
        let Some(buffer) = sample.buffer() else {
            return Ok(None);
        };
        let map = buffer.map_readable().map_err(EncoderError::Map)?;
        // Running time plus the base time is the pipeline clock's time (the
        // monotonic system clock) at capture: it keeps rising across
        // pipelines, which a resize replaces. x264enc adds a fixed offset to
        // every timestamp so that decode times never go negative; it is taken
        // off again.
        let at = match (buffer.pts(), self.pipeline.base_time()) {
            (Some(pts), Some(base)) => pts.checked_sub(ENCODER_PTS_OFFSET).unwrap_or(pts) + base,
            _ => self
                .pipeline
                .clock()
                .map(|c| c.time())
                .unwrap_or(gst::ClockTime::ZERO),
        };
        Ok(Some(VideoFrame {
            pts_us: at.useconds(),
            keyframe: !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT),
            data: map.as_slice().to_vec(),
        }))
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// The H.264 NAL unit types in an Annex-B access unit, in order.
pub fn nal_types(au: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut i = 0;
    while i + 3 < au.len() {
        if au[i] == 0 && au[i + 1] == 0 && au[i + 2] == 1 {
            types.push(au[i + 3] & 0x1f);
            i += 3;
        } else {
            i += 1;
        }
    }
    types
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_areas_are_even() {
        assert_eq!(Settings::even(1280, 800), (1280, 800));
        assert_eq!(Settings::even(1281, 801), (1280, 800));
        assert_eq!(Settings::even(33, 32), (32, 32));
    }

    #[test]
    fn nal_types_of_an_access_unit() {
        let au = [
            0, 0, 0, 1, 0x67, 0x42, 0, 0, 0, 1, 0x68, 0xce, 0, 0, 1, 0x65, 0x88, 0, 0, 1,
        ];
        assert_eq!(nal_types(&au), vec![7, 8, 5]);
        assert_eq!(nal_types(&[]), Vec::<u8>::new());
    }
}
