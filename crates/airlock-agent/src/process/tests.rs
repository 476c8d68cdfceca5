//! The process table, root-free: processes run as the test's own user.

use super::*;
use crate::exec::RunAs;
use airlock_proto::process::{MAX_PROCESS_TIMEOUT_S, TAG_STDERR, TAG_STDOUT};
use std::time::Instant;

fn table() -> Arc<Processes> {
    Arc::new(Processes::new(ExecConfig {
        run_as: RunAs::Current,
        home: std::env::temp_dir(),
        base_env: vec![("PATH".into(), "/usr/bin:/bin".into())],
    }))
}

fn req(argv: &[&str]) -> StartProcess {
    StartProcess {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Default::default(),
        cwd: None,
        pty: None,
        stdin: false,
        timeout_s: None,
    }
}

/// Reads output until `want` shows up in it (or the process ends), at most 10 s.
async fn read_until(proc: &Proc, offset: &mut u64, out: &mut Vec<u8>, want: &str) -> bool {
    let mut rx = proc.subscribe();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let since = proc.read_since(*offset);
        *offset = since.next;
        for (_, d) in since.chunks {
            out.extend_from_slice(&d);
        }
        if String::from_utf8_lossy(out).contains(want) {
            return true;
        }
        if since.ended.is_some() || tokio::time::timeout_at(until, rx.changed()).await.is_err() {
            return false;
        }
    }
}

#[tokio::test]
async fn output_streams_by_tag_and_the_exit_is_kept() {
    let t = table();
    let info = t
        .start(req(&["sh", "-c", "echo out; echo err >&2; exit 3"]))
        .expect("start");
    let proc = t.get(info.pid).expect("in the table");
    let ended = proc
        .wait_ended(Duration::from_secs(10))
        .await
        .expect("ends");
    assert_eq!(ended.exit_code, Some(3));
    let since = proc.read_since(0);
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    for (tag, d) in since.chunks {
        match tag {
            TAG_STDOUT => stdout.extend_from_slice(&d),
            TAG_STDERR => stderr.extend_from_slice(&d),
            _ => panic!("tag {tag}"),
        }
    }
    assert_eq!(stdout, b"out\n");
    assert_eq!(stderr, b"err\n");
    assert_eq!(since.skipped, 0);
    let listed = t.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, ProcessState::Exited);
    assert_eq!(listed[0].exit_code, Some(3));
    assert_eq!(listed[0].output_bytes, 8);
}

/// A line every 100 ms reaches a reader well before the next one is printed:
/// nothing between the pipe and the reader holds output back.
#[tokio::test]
async fn lines_arrive_as_they_are_printed() {
    let t = table();
    let info = t
        .start(req(&[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10; do echo line$i; sleep 0.1; done",
        ]))
        .expect("start");
    let proc = t.get(info.pid).expect("proc");
    let (mut offset, mut out) = (0, Vec::new());
    let started = Instant::now();
    let mut at = Vec::new();
    for i in 1..=10 {
        assert!(read_until(&proc, &mut offset, &mut out, &format!("line{i}\n")).await);
        at.push(started.elapsed());
    }
    // Line i is printed about (i-1)·100 ms after the start; with buffering all
    // ten would come together at the end (~1 s).
    for (i, t) in at.iter().enumerate() {
        let printed = Duration::from_millis(100 * i as u64);
        assert!(
            *t < printed + Duration::from_millis(400),
            "line {} came at {t:?}, printed at about {printed:?}: {at:?}",
            i + 1
        );
    }
}

#[tokio::test]
async fn stdin_round_trip_and_eof() {
    let t = table();
    let mut r = req(&["cat"]);
    r.stdin = true;
    let info = t.start(r).expect("start");
    let proc = t.get(info.pid).expect("proc");
    proc.write_stdin(b"hello through stdin\n")
        .await
        .expect("write");
    let (mut offset, mut out) = (0, Vec::new());
    assert!(read_until(&proc, &mut offset, &mut out, "hello through stdin\n").await);
    proc.close_stdin().await.expect("eof");
    let ended = proc
        .wait_ended(Duration::from_secs(10))
        .await
        .expect("cat ends");
    assert_eq!(ended.exit_code, Some(0));

    // Without stdin: input is refused, by name.
    let info = t.start(req(&["sleep", "5"])).expect("start");
    let proc = t.get(info.pid).expect("proc");
    let err = proc.write_stdin(b"x").await.expect_err("no stdin");
    assert!(err.to_string().contains("takes no input"), "{err}");
    assert!(proc.signal(libc::SIGKILL));
    let ended = proc
        .wait_ended(Duration::from_secs(10))
        .await
        .expect("killed");
    assert_eq!(ended.signal, Some(libc::SIGKILL));
    assert!(
        !proc.signal(libc::SIGKILL),
        "an ended process is not signalled"
    );
}

#[tokio::test]
async fn a_pty_resizes_and_ctrl_c_interrupts() {
    let t = table();
    let mut r = req(&["sh", "-c", "stty size; read x; stty size; sleep 30"]);
    r.pty = Some(PtySize { cols: 80, rows: 24 });
    let info = t.start(r).expect("start");
    assert_eq!(info.pty, Some(PtySize { cols: 80, rows: 24 }));
    let proc = t.get(info.pid).expect("proc");
    let (mut offset, mut out) = (0, Vec::new());
    assert!(
        read_until(&proc, &mut offset, &mut out, "24 80").await,
        "{out:?}"
    );
    proc.resize(132, 43).expect("resize");
    assert_eq!(
        proc.info().pty,
        Some(PtySize {
            cols: 132,
            rows: 43
        })
    );
    proc.write_stdin(b"\n").await.expect("enter");
    assert!(
        read_until(&proc, &mut offset, &mut out, "43 132").await,
        "{}",
        String::from_utf8_lossy(&out)
    );
    // Ctrl-C on the terminal: the line discipline interrupts the foreground group.
    proc.write_stdin(b"\x03").await.expect("ctrl-c");
    let ended = proc
        .wait_ended(Duration::from_secs(10))
        .await
        .expect("ends");
    assert_eq!(ended.signal, Some(libc::SIGINT), "{ended:?}");
    assert!(proc.resize(0, 10).is_err());

    let plain = t.start(req(&["true"])).expect("start");
    let err = t.get(plain.pid).expect("proc").resize(80, 24);
    assert!(matches!(err, Err(ProcessError::Conflict(_))), "{err:?}");
}

#[tokio::test]
async fn the_backlog_keeps_the_last_mebibyte_and_says_what_was_lost() {
    let t = table();
    let total = 3 * BACKLOG_BYTES;
    let info = t
        .start(req(&[
            "sh",
            "-c",
            &format!("head -c {total} /dev/zero; echo tail"),
        ]))
        .expect("start");
    let proc = t.get(info.pid).expect("proc");
    proc.wait_ended(Duration::from_secs(20))
        .await
        .expect("ends");
    let since = proc.read_since(0);
    let held: usize = since.chunks.iter().map(|(_, d)| d.len()).sum();
    assert!(held <= BACKLOG_BYTES, "{held}");
    assert_eq!(since.skipped as usize + held, total + 5);
    assert_eq!(since.next as usize, total + 5);
    assert!(since.chunks.last().expect("chunk").1.ends_with(b"tail\n"));
    // A client that saw everything gets nothing new, and the exit.
    let again = proc.read_since(since.next);
    assert!(again.chunks.is_empty() && again.skipped == 0 && again.ended.is_some());
    // A client that comes back part-way catches up from where it was.
    let back = proc.read_since(since.next - 3);
    assert_eq!(back.chunks.concat_bytes(), b"il\n");
}

trait Concat {
    fn concat_bytes(&self) -> Vec<u8>;
}

impl Concat for Vec<(u8, Bytes)> {
    fn concat_bytes(&self) -> Vec<u8> {
        self.iter().flat_map(|(_, d)| d.iter().copied()).collect()
    }
}

#[tokio::test]
async fn timeouts_limits_and_bad_requests() {
    let t = table();
    let mut r = req(&["sleep", "30"]);
    r.timeout_s = Some(1);
    let info = t.start(r).expect("start");
    let ended = t
        .get(info.pid)
        .expect("proc")
        .wait_ended(Duration::from_secs(10))
        .await
        .expect("killed by the timeout");
    assert!(ended.timed_out);
    assert_eq!(ended.signal, Some(libc::SIGKILL));

    let mut running = Vec::new();
    for _ in 0..MAX_RUNNING {
        running.push(t.start(req(&["sleep", "30"])).expect("start").pid);
    }
    let err = t.start(req(&["sleep", "30"])).expect_err("too many");
    assert!(matches!(err, ProcessError::TooMany(_)), "{err}");
    for pid in running {
        let p = t.get(pid).expect("proc");
        p.signal(libc::SIGKILL);
        p.wait_ended(Duration::from_secs(10)).await.expect("ends");
    }
    t.start(req(&["true"])).expect("room again");

    let mut bad = vec![req(&[]), req(&["", "x"]), req(&["echo", "a\0b"])];
    let mut r = req(&["true"]);
    r.env.insert("A=B".into(), "x".into());
    bad.push(r);
    let mut r = req(&["true"]);
    r.pty = Some(PtySize { cols: 0, rows: 24 });
    bad.push(r);
    let mut r = req(&["true"]);
    r.timeout_s = Some(0);
    bad.push(r);
    let mut r = req(&["true"]);
    r.timeout_s = Some(MAX_PROCESS_TIMEOUT_S + 1);
    bad.push(r);
    for r in bad {
        let err = t.start(r.clone()).expect_err("refused");
        assert!(matches!(err, ProcessError::BadRequest(_)), "{r:?}: {err}");
    }
    let err = t
        .start(req(&["/no/such/program"]))
        .expect_err("cannot start");
    assert!(crate::chain(&err).contains("/no/such/program"), "{err}");
    assert!(matches!(t.get(999_999_999), Err(ProcessError::NotFound(_))));
}

#[tokio::test]
async fn finished_processes_are_forgotten_oldest_first() {
    let t = table();
    let mut pids = Vec::new();
    for _ in 0..MAX_FINISHED + 5 {
        let info = t.start(req(&["true"])).expect("start");
        t.get(info.pid)
            .expect("proc")
            .wait_ended(Duration::from_secs(10))
            .await
            .expect("ends");
        pids.push(info.pid);
        // Distinct end times, so "oldest" is well defined.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The pruning runs just after the end is recorded.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(t.list().len() <= MAX_FINISHED, "{}", t.list().len());
    assert!(t.get(*pids.last().expect("pid")).is_ok());
}

/// An attached client that reads slowly holds the process back (as a full
/// pipe would) instead of losing output; one that leaves lets it go on.
#[tokio::test]
async fn an_attached_client_gets_every_byte_however_slow() {
    let t = table();
    let total = 4 * BACKLOG_BYTES;
    let info = t
        .start(req(&[
            "sh",
            "-c",
            &format!("head -c {total} /dev/zero; echo end"),
        ]))
        .expect("start");
    let proc = t.get(info.pid).expect("proc");
    let client = proc.join(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = proc.info().output_bytes as usize;
    assert!(
        held <= BACKLOG_BYTES + 64 * 1024,
        "read {held} with a client stuck at 0"
    );
    assert!(proc.ended().is_none(), "the writer waits for the client");
    let (mut offset, mut got) = (0u64, 0usize);
    let mut rx = proc.subscribe();
    loop {
        let since = proc.read_since(offset);
        assert_eq!(since.skipped, 0, "nothing lost");
        got += since.chunks.iter().map(|(_, d)| d.len()).sum::<usize>();
        offset = since.next;
        proc.progress(client, offset);
        if since.ended.is_some() {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.changed()).await;
    }
    assert_eq!(got, total + 4);
    proc.leave(client);

    // A client that leaves mid-way releases the process.
    let info = t
        .start(req(&["sh", "-c", &format!("head -c {total} /dev/zero")]))
        .expect("start");
    let proc = t.get(info.pid).expect("proc");
    let client = proc.join(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(proc.ended().is_none());
    proc.leave(client);
    let ended = proc
        .wait_ended(Duration::from_secs(10))
        .await
        .expect("runs to its end");
    assert_eq!(ended.exit_code, Some(0));
}
