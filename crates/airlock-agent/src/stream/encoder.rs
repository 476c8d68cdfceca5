//! The encoder of `capture`: screen pixels converted to I420 as they are
//! pushed, then a GStreamer pipeline that encodes them with x264 for the
//! lowest latency, one access unit out per frame in.
//!
//! ```text
//! BGRx (grabbed on change) ─ I420 (dcv-color-primitives, into a pooled buffer)
//!     ─ appsrc ─ x264enc(zerolatency) ─ caps(constrained baseline, Annex-B, AU) ─ appsink
//! ```
//!
//! The conversion reads the grabbed pixels where they are (the X server's
//! shared segment) and writes into a buffer of a small pool that GStreamer
//! hands back when x264 is done with it: the 4 MB screen is never copied as
//! it is, and no buffer is allocated per frame.
//!
//! The capture loop pushes a frame and waits for its access unit before it
//! grabs the next, so nothing queues between the screen and the encoder: a
//! frame is encoded from the pixels of the moment it is sent, and when x264
//! is slower than the screen changes, frames are skipped at the grab (never
//! an encoded one, which would break the reference chain). Should a frame be
//! pushed while the previous is still queued, appsrc drops the older one.

use airlock_proto::stream::VideoFrame;
use dcv_color_primitives as dcp;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use std::time::Duration;

/// Every element the pipeline uses, with the Debian package that ships it (for
/// the message when one is missing).
pub const ELEMENTS: &[(&str, &str)] = &[
    ("appsrc", "gstreamer1.0-plugins-base"),
    ("capsfilter", "libgstreamer1.0-0"),
    ("x264enc", "gstreamer1.0-plugins-ugly"),
    ("appsink", "gstreamer1.0-plugins-base"),
];

/// Seconds between keyframes when nobody asks for one; viewers that lose
/// packets ask (`Control::Keyframe`), so this is only a backstop.
const KEYFRAME_INTERVAL_S: u32 = 10;
/// Most threads a frame is split over: x264 cuts the frame into one slice
/// each, and slices past a few cost more bits than they save time.
const MAX_WORKERS: usize = 4;

/// The grabbed pixels: 32 bits each, blue first, the fourth byte unused.
const SCREEN: dcp::ImageFormat = dcp::ImageFormat {
    pixel_format: dcp::PixelFormat::Bgra,
    color_space: dcp::ColorSpace::Rgb,
    num_planes: 1,
};
/// What x264 is given: 4:2:0 in three planes, BT.709 in studio range, which
/// the caps say (`colorimetry=bt709`) and x264 writes into the stream for
/// the decoder.
const PLANES: dcp::ImageFormat = dcp::ImageFormat {
    pixel_format: dcp::PixelFormat::I420,
    color_space: dcp::ColorSpace::Bt709,
    num_planes: 3,
};
/// Pool buffers made up front: one being converted while x264 holds the other.
const POOLED: u32 = 2;

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
    #[error("converting the screen's pixels to I420: {0}")]
    Convert(dcp::ErrorKind),
    #[error("no buffer for the next frame")]
    NoBuffer(#[source] gst::FlowError),
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

/// What appsrc takes and the pool's buffers hold.
fn raw_caps(s: &Settings) -> String {
    format!(
        "video/x-raw,format=I420,width={},height={},framerate={}/1,colorimetry=bt709",
        s.width, s.height, s.fps
    )
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
                p("caps", &raw_caps(s)),
                p("format", "time"),
                p("is-live", "true"),
                // `push` stamps each frame when it is called, before the
                // conversion, not when the converted frame goes in.
                p("do-timestamp", "false"),
                p("block", "false"),
                p("max-buffers", "1"),
                p("leaky-type", "downstream"),
            ],
        )?,
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

/// Threads for one frame's encoding: the cores there are, up to
/// [`MAX_WORKERS`].
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
    /// x264enc, whose `bitrate` may change while it runs.
    x264: gst::Element,
    src: gst_app::AppSrc,
    sink: gst_app::AppSink,
    bus: gst::Bus,
    settings: Settings,
    /// Where each frame's I420 planes lie in a buffer.
    layout: gst_video::VideoInfo,
    /// Buffers for the converted frames, handed back by x264 when done.
    pool: gst::BufferPool,
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
        let x264 = els
            .get(1)
            .filter(|e| e.factory().is_some_and(|f| f.name() == "x264enc"))
            .cloned()
            .ok_or(missing("x264enc", "gstreamer1.0-plugins-ugly"))?;
        let bus = pipeline.bus().ok_or(EncoderError::Ended)?;
        let caps = raw_caps(settings)
            .parse::<gst::Caps>()
            .map_err(EncoderError::Assemble)?;
        let layout = gst_video::VideoInfo::from_caps(&caps).map_err(EncoderError::Assemble)?;
        let pool = gst::BufferPool::new();
        let mut config = pool.config();
        // Sizes are far below 4 GiB a frame.
        config.set_params(Some(&caps), layout.size() as u32, POOLED, 0);
        pool.set_config(config).map_err(EncoderError::Assemble)?;
        pool.set_active(true).map_err(EncoderError::Assemble)?;
        let enc = Encoder {
            pipeline,
            x264,
            src,
            sink,
            bus,
            settings: settings.clone(),
            layout,
            pool,
        };
        enc.pipeline
            .set_state(gst::State::Playing)
            .map_err(EncoderError::Start)?;
        Ok(enc)
    }

    /// Sends one frame of BGRx pixels (`width * 4` bytes per row) to the
    /// encoder, stamped with the moment of the call (the pipeline's running
    /// time). The pixels are read once, into I420, before it returns.
    pub fn push(&self, pixels: &[u8]) -> Result<(), EncoderError> {
        let at = self.pipeline.current_running_time();
        let mut buffer = self
            .pool
            .acquire_buffer(None)
            .map_err(EncoderError::NoBuffer)?;
        {
            let buffer = buffer
                .get_mut()
                .ok_or(EncoderError::NoBuffer(gst::FlowError::Error))?;
            buffer.set_pts(at);
            let mut planes = buffer.map_writable().map_err(EncoderError::Map)?;
            to_i420(&self.layout, pixels, planes.as_mut_slice())?;
        }
        self.src
            .push_buffer(buffer)
            .map(|_| ())
            .map_err(|_| EncoderError::Ended)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Encode at a new target bitrate from the next frame on (x264 takes
    /// `bitrate` while playing and reconfigures its rate control).
    pub fn set_bitrate(&mut self, kbit: u32) {
        self.x264.set_property("bitrate", kbit);
        self.settings.bitrate_kbit = kbit;
        tracing::debug!(kbit, "encoder bitrate changed");
    }

    /// The target bitrate x264 holds now, kbit/s.
    pub fn bitrate(&self) -> u32 {
        self.x264.property::<u32>("bitrate")
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
        let _ = self.pool.set_active(false);
    }
}

/// Converts `bgrx` (`width * 4` bytes a row) into the I420 planes of `out`,
/// laid out as `layout` says.
fn to_i420(layout: &gst_video::VideoInfo, bgrx: &[u8], out: &mut [u8]) -> Result<(), EncoderError> {
    let (width, height) = (layout.width(), layout.height());
    let (offsets, strides) = (layout.offset(), layout.stride());
    let [y_at, u_at, v_at] = [offsets[0], offsets[1], offsets[2]];
    if out.len() < layout.size() || !(y_at <= u_at && u_at <= v_at) {
        return Err(EncoderError::Convert(dcp::ErrorKind::NotEnoughData));
    }
    let (y, rest) = out.split_at_mut(u_at);
    let (u, v) = rest.split_at_mut(v_at - u_at);
    // Strides of a frame are positive (negative ones flip images upside down).
    let stride = |i: usize| strides[i].unsigned_abs() as usize;
    dcp::convert_image(
        width,
        height,
        &SCREEN,
        Some(&[width as usize * 4]),
        &[bgrx],
        &PLANES,
        Some(&[stride(0), stride(1), stride(2)]),
        &mut [&mut y[y_at..], u, v],
    )
    .map_err(EncoderError::Convert)
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

    /// The plane layout of a 64×32 frame.
    fn small_layout() -> gst_video::VideoInfo {
        init().expect("GStreamer starts");
        let caps = raw_caps(&Settings {
            width: 64,
            height: 32,
            fps: 30,
            bitrate_kbit: 1000,
        })
        .parse::<gst::Caps>()
        .expect("the caps parse");
        gst_video::VideoInfo::from_caps(&caps).expect("the caps describe a frame")
    }

    /// BT.709 in studio range, as in its tables: black, white and pure red.
    #[test]
    fn pixels_become_bt709_studio_range() {
        let layout = small_layout();
        let mut out = vec![0u8; layout.size()];
        let (u_at, v_at) = (layout.offset()[1], layout.offset()[2]);
        for (bgrx, yuv) in [
            ([0, 0, 0, 0], [16, 128, 128]),
            ([255, 255, 255, 0], [235, 128, 128]),
            ([0, 0, 255, 0], [63, 102, 240]),
        ] {
            let pixels: Vec<u8> = bgrx.iter().copied().cycle().take(64 * 32 * 4).collect();
            to_i420(&layout, &pixels, &mut out).expect("a whole frame converts");
            let got = [out[0], out[u_at], out[v_at]];
            let near = got.iter().zip(yuv).all(|(g, w)| g.abs_diff(w) <= 1);
            assert!(near, "{bgrx:?} became {got:?}, BT.709 says {yuv:?}");
            assert!(
                out[..u_at].iter().all(|&v| v == out[0]),
                "one colour, one luma"
            );
        }
    }

    #[test]
    fn too_few_pixels_are_an_error_not_a_panic() {
        let layout = small_layout();
        let mut out = vec![0u8; layout.size()];
        assert!(to_i420(&layout, &[0u8; 64 * 4], &mut out).is_err());
        assert!(to_i420(&layout, &vec![0u8; 64 * 32 * 4], &mut out[..10]).is_err());
    }

    /// Bytes per frame of `n` frames of noise at the encoder's bitrate.
    fn noise_bytes(enc: &Encoder, n: usize, seed: &mut u32) -> usize {
        let mut total = 0;
        for _ in 0..n {
            let pixels: Vec<u8> = (0..320 * 240 * 4)
                .map(|_| {
                    *seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (*seed >> 24) as u8
                })
                .collect();
            enc.push(&pixels).expect("push");
            let f = enc
                .next_frame(Duration::from_secs(5))
                .expect("encodes")
                .expect("a frame comes");
            total += f.data.len();
            // x264 stamps frames with the running time: space them out.
            std::thread::sleep(Duration::from_millis(33));
        }
        total / n
    }

    /// `Control::Bitrate` reaches x264 while it runs: noise, which takes
    /// every bit it is given, comes out far smaller at a lower target.
    #[test]
    fn the_bitrate_changes_while_encoding() {
        let mut enc = Encoder::start(&Settings {
            width: 320,
            height: 240,
            fps: 30,
            bitrate_kbit: 4000,
        })
        .expect("the encoder starts");
        let mut seed = 7;
        noise_bytes(&enc, 15, &mut seed);
        let high = noise_bytes(&enc, 15, &mut seed);
        enc.set_bitrate(300);
        assert_eq!(enc.bitrate(), 300);
        noise_bytes(&enc, 15, &mut seed);
        let low = noise_bytes(&enc, 15, &mut seed);
        println!("bytes per frame: {high} at 4000 kbit/s, {low} at 300 kbit/s");
        assert!(low * 3 < high, "{low} at 300 kbit/s vs {high} at 4000");
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
