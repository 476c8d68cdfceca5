//! The muxer read back box by box, and the retention sweep on real files.

use super::fmp4::{self, Muxer, TIMESCALE};
use super::*;

const SPS: &[u8] = &[0x67, 0x42, 0xc0, 0x1f, 0xda, 0x01, 0x40, 0x16, 0xe8];
const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];

/// An Annex B access unit: SPS and PPS before an IDR slice on a keyframe.
fn access_unit(keyframe: bool, n: u8) -> Vec<u8> {
    let mut au = vec![0, 0, 0, 1, 0x09, 0xf0];
    if keyframe {
        au.extend_from_slice(&[0, 0, 0, 1]);
        au.extend_from_slice(SPS);
        au.extend_from_slice(&[0, 0, 1]);
        au.extend_from_slice(PPS);
        au.extend_from_slice(&[0, 0, 0, 1, 0x65, 0x88, n, n, n]);
    } else {
        au.extend_from_slice(&[0, 0, 0, 1, 0x41, 0x9a, n, n]);
    }
    au
}

/// Top-level (or child) boxes: (type, body).
fn boxes(mut data: &[u8]) -> Vec<([u8; 4], &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 8 {
        let size = u32::from_be_bytes(data[0..4].try_into().expect("test data")) as usize;
        assert!(
            size >= 8 && size <= data.len(),
            "box size {size} of {}",
            data.len()
        );
        out.push((data[4..8].try_into().expect("test data"), &data[8..size]));
        data = &data[size..];
    }
    assert!(data.is_empty(), "trailing bytes");
    out
}

fn child<'a>(body: &'a [u8], kind: &[u8; 4]) -> &'a [u8] {
    boxes(body)
        .into_iter()
        .find(|(k, _)| k == kind)
        .map(|(_, b)| b)
        .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(kind)))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("test data"))
}

#[test]
fn annex_b_becomes_length_prefixed_samples_with_parameter_sets_in_band() {
    let au = access_unit(true, 7);
    assert_eq!(
        fmp4::parameter_sets(&au),
        Some((SPS.to_vec(), PPS.to_vec()))
    );
    let s = fmp4::sample(&au);
    let want = [
        &(SPS.len() as u32).to_be_bytes()[..],
        SPS,
        &(PPS.len() as u32).to_be_bytes(),
        PPS,
        &[0, 0, 0, 5],
        &[0x65, 0x88, 7, 7, 7],
    ]
    .concat();
    assert_eq!(s, want, "no delimiter, lengths for start codes");
    assert_eq!(fmp4::parameter_sets(&access_unit(false, 1)), None);
}

/// N frames at 30 fps: one init segment, N fragments whose durations add up,
/// sync flags only on keyframes, and each trun's offset lands on its mdat.
#[test]
fn frames_make_a_fragmented_mp4_of_the_right_length() {
    const N: u64 = 90;
    let mut file = fmp4::init_segment(1280, 800, SPS, PPS);
    let mut mux = Muxer::default();
    for i in 0..N {
        let key = i % 30 == 0;
        if let Some(f) = mux.push(i * 33_333, key, &access_unit(key, i as u8)) {
            file.extend_from_slice(&f);
        }
    }
    file.extend_from_slice(&mux.finish(33_333).expect("the last frame"));
    assert_eq!(mux.samples, N);

    let top = boxes(&file);
    assert_eq!(&top[0].0, b"ftyp");
    assert_eq!(&top[1].0, b"moov");
    let moov = top[1].1;
    let trak = child(moov, b"trak");
    let tkhd = child(trak, b"tkhd");
    assert_eq!(u32_at(tkhd, 4 + 72) >> 16, 1280);
    assert_eq!(u32_at(tkhd, 4 + 76) >> 16, 800);
    let stsd = child(
        child(child(child(trak, b"mdia"), b"minf"), b"stbl"),
        b"stsd",
    );
    let avc1 = child(&stsd[8..], b"avc3");
    let avcc = child(&avc1[78..], b"avcC");
    assert_eq!(&avcc[8..8 + SPS.len()], SPS);
    assert_eq!(u32_at(child(child(moov, b"mvex"), b"trex"), 4), 1);

    let mut total = 0u64;
    let mut samples = 0;
    let mut expected_time = 0u64;
    let mut at = top[0].1.len() + 8 + top[1].1.len() + 8;
    let frags = &top[2..];
    assert_eq!(frags.len() as u64, 2 * N);
    for (i, pair) in frags.chunks(2).enumerate() {
        assert_eq!(&pair[0].0, b"moof");
        assert_eq!(&pair[1].0, b"mdat");
        let traf = child(pair[0].1, b"traf");
        let tfdt = child(traf, b"tfdt");
        assert_eq!(
            u64::from_be_bytes(tfdt[4..12].try_into().expect("test data")),
            expected_time
        );
        let trun = child(traf, b"trun");
        assert_eq!(u32_at(trun, 4), 1, "one sample per fragment");
        let offset = u32_at(trun, 8) as usize;
        let duration = u32_at(trun, 12);
        let size = u32_at(trun, 16) as usize;
        let flags = u32_at(trun, 20);
        assert_eq!(
            offset,
            pair[0].1.len() + 8 + 8,
            "data offset points past mdat's header"
        );
        assert_eq!(size, pair[1].1.len());
        let key = i % 30 == 0;
        assert_eq!(flags & 0x0001_0000 == 0, key, "sample {i} sync flag");
        // Length-prefixed NAL units that fill the sample exactly; the last
        // is the slice, a keyframe's led by its SPS and PPS.
        let (mut pos, mut types) = (0, Vec::new());
        while pos < size {
            let len = u32_at(pair[1].1, pos) as usize;
            types.push(pair[1].1[pos + 4] & 0x1f);
            pos += 4 + len;
        }
        assert_eq!(pos, size, "sample {i} is whole NAL units");
        assert_eq!(
            types,
            if key { vec![7, 8, 5] } else { vec![1] },
            "sample {i}"
        );
        total += u64::from(duration);
        expected_time += u64::from(duration);
        samples += 1;
        at += pair[0].1.len() + pair[1].1.len() + 16;
    }
    assert_eq!(at, file.len());
    assert_eq!(samples, N);
    // 90 frames of 1/30 s: 3 s, within a tick per frame of rounding.
    let want = 3 * u64::from(TIMESCALE);
    assert!(total.abs_diff(want) <= N, "{total} ticks, want {want}");
    assert!(mux.duration_us().abs_diff(3_000_000) < 2_000);
}

fn meta(id: &str, sandbox: &str, started_at: i64, duration_ms: u64) -> Meta {
    Meta {
        id: id.into(),
        sandbox_id: sandbox.into(),
        owner_id: "u1".into(),
        started_at,
        duration_ms,
        bytes: 3,
        width: 1280,
        height: 800,
        ended: Some("stopped".into()),
    }
}

#[tokio::test]
async fn the_sweep_deletes_only_recordings_past_retention() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = RecordingConfig {
        enabled: true,
        dir: Some(tmp.path().join("rec")),
        retention_h: 24,
        ..RecordingConfig::default()
    };
    let r = Recordings::new(cfg, tmp.path(), &crate::metrics::Metrics::new());
    let now = 1_000 * 3_600_000i64;
    let hour = 3_600_000i64;
    for (m, dir) in [
        (meta("rec-old", "sb1", now - 30 * hour, 60_000), "sb1"),
        (meta("rec-new", "sb1", now - 2 * hour, 60_000), "sb1"),
        (meta("rec-gone", "sb2", now - 25 * hour - 1, 0), "sb2"),
    ] {
        let d = tmp.path().join("rec").join(dir);
        std::fs::create_dir_all(&d).expect("test data");
        write_meta(&d, &m).await.expect("test data");
        std::fs::write(d.join(format!("{}.mp4", m.id)), b"mp4").expect("test data");
    }
    assert_eq!(r.sweep(now).await.expect("sweep"), 2);
    let left = r.list("sb1").await.expect("list");
    assert_eq!(
        left.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["rec-new"]
    );
    assert!(tmp.path().join("rec/sb1/rec-new.mp4").exists());
    assert!(!tmp.path().join("rec/sb1/rec-old.mp4").exists());
    assert!(
        !tmp.path().join("rec/sb2").exists(),
        "an emptied directory goes"
    );
    assert!(r.list("sb2").await.expect("list").is_empty());

    // Retention 0 keeps everything.
    let keep = Recordings::new(
        RecordingConfig {
            retention_h: 0,
            dir: Some(tmp.path().join("rec")),
            ..RecordingConfig::default()
        },
        tmp.path(),
        &crate::metrics::Metrics::new(),
    );
    assert_eq!(keep.sweep(now + 1000 * hour).await.expect("sweep"), 0);
}

#[tokio::test]
async fn ids_that_could_leave_the_directory_are_not_found() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = Recordings::new(
        RecordingConfig {
            enabled: true,
            ..RecordingConfig::default()
        },
        tmp.path(),
        &crate::metrics::Metrics::new(),
    );
    for bad in ["../x", "a/b", "", "rec.json"] {
        assert!(
            matches!(r.get("sb1", bad).await, Err(RecordingError::NotFound(_))),
            "{bad}"
        );
        assert!(
            matches!(r.get(bad, "rec-1").await, Err(RecordingError::NotFound(_))),
            "{bad}"
        );
    }
}

#[test]
fn recording_is_off_by_default_and_logins_need_their_own_switch() {
    let tmp = tempfile::tempdir().expect("tmp");
    let metrics = crate::metrics::Metrics::new();
    let off = Recordings::new(RecordingConfig::default(), tmp.path(), &metrics);
    assert!(matches!(
        off.may_start("sb1", false),
        Err(RecordingError::Off)
    ));
    let on = RecordingConfig {
        enabled: true,
        ..RecordingConfig::default()
    };
    let r = Recordings::new(on.clone(), tmp.path(), &crate::metrics::Metrics::new());
    assert!(r.may_start("sb1", false).is_ok());
    assert!(matches!(
        r.may_start("sb1", true),
        Err(RecordingError::Login)
    ));
    let logins = Recordings::new(
        RecordingConfig { logins: true, ..on },
        tmp.path(),
        &crate::metrics::Metrics::new(),
    );
    assert!(logins.may_start("sb1", true).is_ok());
}
