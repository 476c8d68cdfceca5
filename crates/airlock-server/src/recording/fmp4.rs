//! A minimal fragmented-MP4 (ISO/IEC 14496-12 and -15) writer for one H.264
//! video track, fed the guest's already-encoded access units (Annex B).
//!
//! The file is an init segment (`ftyp` + `moov` with an empty sample table
//! and `mvex`) followed by one `moof`+`mdat` fragment per frame. Every
//! fragment is whole on its own, so a recording cut off by a crash plays up
//! to its last written frame: nothing is patched at the end.
//!
//! Why our own: the crates that write MP4 either keep the whole sample table
//! (or the whole file) in memory and write `moov` when the recording ends
//! (lost on a crash, and unbounded for a long session), or are young and
//! shaped for HLS/DASH segments. One track, no B-frames and one sample per
//! fragment is a few dozen lines of boxes.

/// Media time units per second (the MPEG convention for video).
pub const TIMESCALE: u32 = 90_000;

const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;
const NAL_AUD: u8 = 9;
// (SPS and PPS are read for `avcC`; they also stay in the samples.)

/// The NAL units of an Annex B access unit, start codes removed.
pub fn nal_units(data: &[u8]) -> Vec<&[u8]> {
    let mut units = Vec::new();
    let mut i = 0;
    let mut start: Option<usize> = None;
    while i + 2 < data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            if let Some(s) = start {
                let mut end = i;
                // A four-byte start code leaves one zero behind.
                while end > s && data[end - 1] == 0 {
                    end -= 1;
                }
                units.push(&data[s..end]);
            }
            i += 3;
            start = Some(i);
        } else {
            i += 1;
        }
    }
    if let Some(s) = start {
        if s < data.len() {
            units.push(&data[s..]);
        }
    }
    units.retain(|u| !u.is_empty());
    units
}

fn nal_type(unit: &[u8]) -> u8 {
    unit[0] & 0x1f
}

/// The sequence and picture parameter sets a keyframe carries, if both.
pub fn parameter_sets(data: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let units = nal_units(data);
    let sps = units.iter().find(|u| nal_type(u) == NAL_SPS)?;
    let pps = units.iter().find(|u| nal_type(u) == NAL_PPS)?;
    (sps.len() >= 4).then(|| (sps.to_vec(), pps.to_vec()))
}

/// One sample: the access unit with four-byte lengths instead of start
/// codes, delimiters left out. Parameter sets stay in the stream (`avc3`):
/// when the viewer resizes the display, the next keyframe brings the new
/// size and the recording goes on.
pub fn sample(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    for unit in nal_units(data) {
        if nal_type(unit) == NAL_AUD {
            continue;
        }
        out.extend_from_slice(&(unit.len() as u32).to_be_bytes());
        out.extend_from_slice(unit);
    }
    out
}

fn mp4_box(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(body);
    out
}

fn full_box(kind: &[u8; 4], version: u8, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(body.len() + 4);
    b.push(version);
    b.extend_from_slice(&flags.to_be_bytes()[1..]);
    b.extend_from_slice(body);
    mp4_box(kind, &b)
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The unity transform every header carries.
fn matrix() -> Vec<u8> {
    let m: [u32; 9] = [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000];
    m.iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// `ftyp` and `moov`: what a player needs before the first fragment.
pub fn init_segment(width: u32, height: u32, sps: &[u8], pps: &[u8]) -> Vec<u8> {
    let ftyp = mp4_box(b"ftyp", b"isom\0\0\x02\0isomiso6avc3mp41");
    let mut mvhd = Vec::new();
    mvhd.extend_from_slice(&[0; 8]); // creation, modification
    mvhd.extend_from_slice(&TIMESCALE.to_be_bytes());
    mvhd.extend_from_slice(&0u32.to_be_bytes()); // duration: in the fragments
    mvhd.extend_from_slice(&0x0001_0000u32.to_be_bytes()); // rate 1.0
    mvhd.extend_from_slice(&0x0100u16.to_be_bytes()); // volume 1.0
    mvhd.extend_from_slice(&[0; 10]);
    mvhd.extend_from_slice(&matrix());
    mvhd.extend_from_slice(&[0; 24]);
    mvhd.extend_from_slice(&2u32.to_be_bytes()); // next track id
    let mvhd = full_box(b"mvhd", 0, 0, &mvhd);

    let mut tkhd = Vec::new();
    tkhd.extend_from_slice(&[0; 8]);
    tkhd.extend_from_slice(&1u32.to_be_bytes()); // track id
    tkhd.extend_from_slice(&[0; 4]);
    tkhd.extend_from_slice(&0u32.to_be_bytes()); // duration
    tkhd.extend_from_slice(&[0; 8]);
    tkhd.extend_from_slice(&[0; 8]); // layer, group, volume, reserved
    tkhd.extend_from_slice(&matrix());
    tkhd.extend_from_slice(&(width << 16).to_be_bytes());
    tkhd.extend_from_slice(&(height << 16).to_be_bytes());
    let tkhd = full_box(b"tkhd", 0, 3, &tkhd); // enabled, in movie

    let mut mdhd = Vec::new();
    mdhd.extend_from_slice(&[0; 8]);
    mdhd.extend_from_slice(&TIMESCALE.to_be_bytes());
    mdhd.extend_from_slice(&0u32.to_be_bytes());
    mdhd.extend_from_slice(&0x55c4u16.to_be_bytes()); // "und"
    mdhd.extend_from_slice(&[0; 2]);
    let mdhd = full_box(b"mdhd", 0, 0, &mdhd);
    let hdlr = full_box(
        b"hdlr",
        0,
        0,
        b"\0\0\0\0vide\0\0\0\0\0\0\0\0\0\0\0\0Screen\0",
    );

    let mut avcc = vec![1, sps[1], sps[2], sps[3], 0xff, 0xe1];
    avcc.extend_from_slice(&(sps.len() as u16).to_be_bytes());
    avcc.extend_from_slice(sps);
    avcc.push(1);
    avcc.extend_from_slice(&(pps.len() as u16).to_be_bytes());
    avcc.extend_from_slice(pps);
    let avcc = mp4_box(b"avcC", &avcc);
    let mut avc1 = vec![0; 6];
    avc1.extend_from_slice(&1u16.to_be_bytes()); // data reference index
    avc1.extend_from_slice(&[0; 16]);
    avc1.extend_from_slice(&(width as u16).to_be_bytes());
    avc1.extend_from_slice(&(height as u16).to_be_bytes());
    avc1.extend_from_slice(&0x0048_0000u32.to_be_bytes()); // 72 dpi
    avc1.extend_from_slice(&0x0048_0000u32.to_be_bytes());
    avc1.extend_from_slice(&[0; 4]);
    avc1.extend_from_slice(&1u16.to_be_bytes()); // frames per sample
    avc1.extend_from_slice(&[0; 32]); // compressor name
    avc1.extend_from_slice(&0x0018u16.to_be_bytes()); // depth
    avc1.extend_from_slice(&0xffffu16.to_be_bytes());
    avc1.extend_from_slice(&avcc);
    // avc3: parameter sets may also come in the samples, and change.
    let avc1 = mp4_box(b"avc3", &avc1);
    let stsd = full_box(b"stsd", 0, 0, &concat(&[&1u32.to_be_bytes(), &avc1]));
    let empty = 0u32.to_be_bytes();
    let stbl = mp4_box(
        b"stbl",
        &concat(&[
            &stsd,
            &full_box(b"stts", 0, 0, &empty),
            &full_box(b"stsc", 0, 0, &empty),
            &full_box(b"stsz", 0, 0, &[0; 8]),
            &full_box(b"stco", 0, 0, &empty),
        ]),
    );
    let vmhd = full_box(b"vmhd", 0, 1, &[0; 8]);
    let url = full_box(b"url ", 0, 1, &[]);
    let dref = full_box(b"dref", 0, 0, &concat(&[&1u32.to_be_bytes(), &url]));
    let dinf = mp4_box(b"dinf", &dref);
    let minf = mp4_box(b"minf", &concat(&[&vmhd, &dinf, &stbl]));
    let mdia = mp4_box(b"mdia", &concat(&[&mdhd, &hdlr, &minf]));
    let trak = mp4_box(b"trak", &concat(&[&tkhd, &mdia]));
    let mut trex = Vec::new();
    trex.extend_from_slice(&1u32.to_be_bytes()); // track id
    trex.extend_from_slice(&1u32.to_be_bytes()); // sample description
    trex.extend_from_slice(&[0; 12]);
    let mvex = mp4_box(b"mvex", &full_box(b"trex", 0, 0, &trex));
    let moov = mp4_box(b"moov", &concat(&[&mvhd, &trak, &mvex]));
    concat(&[&ftyp, &moov])
}

/// One `moof` + `mdat` holding one sample.
pub fn fragment(
    sequence: u32,
    decode_time: u64,
    duration: u32,
    keyframe: bool,
    sample: &[u8],
) -> Vec<u8> {
    let mfhd = full_box(b"mfhd", 0, 0, &sequence.to_be_bytes());
    // default-base-is-moof: the data offset counts from this fragment's moof.
    let tfhd = full_box(b"tfhd", 0, 0x02_0000, &1u32.to_be_bytes());
    let tfdt = full_box(b"tfdt", 1, 0, &decode_time.to_be_bytes());
    // A sync sample depends on nothing; any other depends on earlier ones.
    let flags: u32 = if keyframe { 0x0200_0000 } else { 0x0101_0000 };
    let trun_len = 8 + 4 + 4 + 4 * 3 + 4;
    let moof_len = 8 + mfhd.len() + 8 + tfhd.len() + tfdt.len() + trun_len;
    let mut trun = Vec::new();
    trun.extend_from_slice(&1u32.to_be_bytes()); // sample count
    trun.extend_from_slice(&((moof_len + 8) as u32).to_be_bytes()); // data offset
    trun.extend_from_slice(&duration.to_be_bytes());
    trun.extend_from_slice(&(sample.len() as u32).to_be_bytes());
    trun.extend_from_slice(&flags.to_be_bytes());
    // data offset, duration, size, flags present
    let trun = full_box(b"trun", 0, 0x0701, &trun);
    let traf = mp4_box(b"traf", &concat(&[&tfhd, &tfdt, &trun]));
    let moof = mp4_box(b"moof", &concat(&[&mfhd, &traf]));
    debug_assert_eq!(moof.len(), moof_len);
    let mut out = moof;
    out.extend_from_slice(&((sample.len() + 8) as u32).to_be_bytes());
    out.extend_from_slice(b"mdat");
    out.extend_from_slice(sample);
    out
}

/// Microseconds between two captures in media time units, at least one.
pub fn ticks(us: u64) -> u32 {
    let t = us.saturating_mul(u64::from(TIMESCALE)) / 1_000_000;
    t.clamp(1, u64::from(u32::MAX)) as u32
}

/// Turns frames into fragments. A frame's duration is only known when the
/// next one comes (the guest sends frames when the screen changes), so the
/// last frame waits; [`Muxer::finish`] writes it with the time it was shown.
#[derive(Debug, Default)]
pub struct Muxer {
    sequence: u32,
    decode_time: u64,
    pending: Option<Pending>,
    /// Samples written so far.
    pub samples: u64,
}

#[derive(Debug)]
struct Pending {
    pts_us: u64,
    keyframe: bool,
    sample: Vec<u8>,
}

impl Muxer {
    /// Take one frame; returns the fragment of the frame before it, if any.
    pub fn push(&mut self, pts_us: u64, keyframe: bool, annex_b: &[u8]) -> Option<Vec<u8>> {
        let next = Pending {
            pts_us,
            keyframe,
            sample: sample(annex_b),
        };
        let prev = self.pending.replace(next)?;
        let shown = pts_us.saturating_sub(prev.pts_us);
        Some(self.write(prev, shown))
    }

    /// The last frame's fragment, shown for `shown_us`.
    pub fn finish(&mut self, shown_us: u64) -> Option<Vec<u8>> {
        let last = self.pending.take()?;
        Some(self.write(last, shown_us))
    }

    /// Media time written so far, in microseconds.
    pub fn duration_us(&self) -> u64 {
        self.decode_time * 1_000_000 / u64::from(TIMESCALE)
    }

    fn write(&mut self, p: Pending, shown_us: u64) -> Vec<u8> {
        self.sequence += 1;
        let d = ticks(shown_us);
        let out = fragment(self.sequence, self.decode_time, d, p.keyframe, &p.sample);
        self.decode_time += u64::from(d);
        self.samples += 1;
        out
    }
}
