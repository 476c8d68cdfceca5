//! The clients end to end against a real `airlock up` and one real
//! workspace: the `airlock sandbox …` commands with their exit codes, then
//! the TypeScript SDK's tests (`node --test`) and the Python SDK's
//! (`python3 -m unittest`) against the same sandbox, and the web terminal
//! in a headless Chromium (tests/e2e/terminal.mjs).

#[path = "common/child.rs"]
#[allow(dead_code)] // the crash helpers are for the chaos tests
mod child;
mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

const POOL: &str = "10.252.1.0/24";

struct Cli<'a> {
    url: &'a str,
    token: &'a str,
}

impl Cli<'_> {
    fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut child = Command::new(child::binary())
            .args(args)
            .env("AIRLOCK_URL", self.url)
            .env("AIRLOCK_TOKEN", self.token)
            .env("AIRLOCK_CLIENT_CONFIG", "/dev/null/none")
            .env_remove("AIRLOCK_CONFIG")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("airlock");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(input).expect("write stdin");
        }
        child.wait_with_output().expect("airlock ran")
    }

    /// Runs and checks the exit code; answers stdout.
    fn ok(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args, None);
        assert_eq!(
            out.status.code(),
            Some(code),
            "airlock {args:?}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Whether `program` runs here (in CI it must).
fn have(program: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var_os("CI").is_none(),
        "CI must run the SDK tests, but {program} is missing"
    );
    ok
}

#[test]
fn the_cli_and_both_sdks_against_a_real_airlock() {
    if common::unmet().is_some() || child::unmet().is_some() {
        return;
    }
    let plane = child::ChildPlane::start(POOL);
    let token = plane.admin_token("cli-user");
    let cli = Cli {
        url: &plane.base,
        token: &token,
    };
    // The config file the env names does not exist: a config error, 78.
    let out = cli.run(&["sandbox", "ls"], None);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let cli_config = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(cli_config.path(), "{}").expect("write");
    let cfg = cli_config.path().to_str().expect("utf-8").to_owned();
    let c = |args: &[&str]| -> Vec<String> {
        // Right after the command group: a trailing argv takes all after it.
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.splice(1..1, ["--client-config".to_owned(), cfg.clone()]);
        v
    };
    let run = |args: &[&str], code: i32| -> String {
        let args = c(args);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        cli.ok(&refs, code)
    };

    let id = run(&["sandbox", "create", "--kind", "workspace"], 0)
        .trim()
        .to_owned();
    assert!(!id.is_empty());
    assert!(run(&["sandbox", "ls"], 0).contains(&id));

    // exec: output on the right streams, the process's exit code.
    let args = c(&[
        "sandbox",
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cli.run(&refs, None);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    // exec -i: our stdin reaches the command, end-of-file included.
    let args = c(&[
        "sandbox",
        "exec",
        "-i",
        &id,
        "--",
        "sh",
        "-c",
        "cat; echo done",
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cli.run(&refs, Some(b"piped in\n"));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "piped in\ndone\n");
    // shell without a terminal: a PTY of 80×24, and its exit code.
    let out = run(&["sandbox", "shell", &id, "sh", "-c", "stty size"], 0);
    assert!(out.contains("24 80"), "{out:?}");
    // A signal's death is 128 + N.
    run(
        &["sandbox", "exec", &id, "--", "sh", "-c", "kill -TERM $$"],
        143,
    );

    // cp up and down, equal; a directory comes down as tar.
    let dir = tempfile::tempdir().expect("tmp");
    let up = dir.path().join("up.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&up, &data).expect("write");
    let down = dir.path().join("down.bin");
    run(
        &[
            "sandbox",
            "cp",
            up.to_str().expect("p"),
            &format!("{id}:up.bin"),
        ],
        0,
    );
    run(
        &[
            "sandbox",
            "cp",
            &format!("{id}:up.bin"),
            down.to_str().expect("p"),
        ],
        0,
    );
    assert!(
        std::fs::read(&down).expect("read") == data,
        "the copy differs"
    );
    run(&["sandbox", "exec", &id, "--", "mkdir", "-p", "dir/sub"], 0);
    let tar = dir.path().join("dir.tar");
    run(
        &[
            "sandbox",
            "cp",
            &format!("{id}:dir"),
            tar.to_str().expect("p"),
        ],
        0,
    );
    let listed = Command::new("tar")
        .arg("-tf")
        .arg(&tar)
        .output()
        .expect("tar");
    assert_eq!(String::from_utf8_lossy(&listed.stdout), "dir/\ndir/sub/\n");
    run(
        &["sandbox", "cp", &format!("{id}:../../etc/passwd"), "-"],
        77,
    );

    // ps and logs: the backlog of the newest process.
    run(
        &[
            "sandbox",
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo logged; echo line2",
        ],
        0,
    );
    let ps = run(&["sandbox", "ps", &id], 0);
    assert!(ps.contains("echo logged"), "{ps}");
    assert_eq!(run(&["sandbox", "logs", &id], 0), "logged\nline2\n");

    // Exit codes scripts rely on.
    run(&["sandbox", "exec", "no-such-sandbox", "--", "true"], 66);
    run(&["sandbox", "logs", &id, "4000000000"], 66);
    let bad = Cli {
        url: &plane.base,
        token: "wrong",
    };
    let args = c(&["sandbox", "ls"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(bad.ok(&refs, 77), "");
    let gone = Cli {
        url: "http://127.0.0.1:9",
        token: &token,
    };
    assert_eq!(gone.ok(&refs, 69), "");
    // The credentials list works (no logins here: empty).
    let creds = run(&["credentials", "ls", "--json"], 0);
    assert!(creds.contains("credentials"), "{creds}");

    // The SDKs' own tests, against this sandbox.
    let sdk = common::repo_root().join("sdk");
    let env = [
        ("AIRLOCK_URL", plane.base.as_str()),
        ("AIRLOCK_TOKEN", token.as_str()),
        ("AIRLOCK_SANDBOX", id.as_str()),
    ];
    if have("node") {
        assert!(
            sdk.join("typescript/node_modules/ws").exists() || std::env::var_os("CI").is_none(),
            "CI must install the SDK's packages (scripts/setup)"
        );
        let out = Command::new("node")
            .args(["--test", "test/"])
            .current_dir(sdk.join("typescript"))
            .envs(env)
            .output()
            .expect("node");
        assert!(
            out.status.success(),
            "the TypeScript SDK's tests: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("# pass 4"),
            "{out:?}"
        );
    }
    if have("python3") {
        let out = Command::new("python3")
            .args(["-m", "unittest", "discover", "-s", "tests", "-v"])
            .current_dir(sdk.join("python"))
            .envs(env)
            .output()
            .expect("python3");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the Python SDK's tests: {text}");
        assert!(
            text.contains("Ran 4 tests") && !text.contains("skipped"),
            "{text}"
        );
    }

    // The web terminal, in a real headless Chromium, on the same sandbox.
    if common::browser_unmet().is_none() {
        let root = common::repo_root();
        let artifacts = root.join("target/e2e-terminal");
        let status = Command::new("node")
            .arg(root.join("tests/e2e/terminal.mjs"))
            .args([
                "--url",
                &plane.base,
                "--sandbox",
                &id,
                "--token",
                &token,
                "--artifacts",
            ])
            .arg(&artifacts)
            .status()
            .expect("node runs");
        assert!(
            status.success(),
            "the terminal page failed ({status}); screenshots are in {}",
            artifacts.display()
        );
    }

    run(&["sandbox", "rm", &id], 0);
}
