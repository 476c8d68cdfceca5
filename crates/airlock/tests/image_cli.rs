//! `airlock image …` against an image directory that no build has made yet:
//! what a new machine has. Nothing may fail for want of the directory, and
//! nothing may create it but a build.

use std::path::Path;
use std::process::{Command, Output};

fn airlock(image_dir: &Path, data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .env_remove("AIRLOCK_CONFIG")
        .env("AIRLOCK_IMAGE_DIR", image_dir)
        .env("AIRLOCK_DATA_DIR", data_dir)
        // verify checks the image against the agent binary; any file will do
        // to get as far as the missing image.
        .env("AIRLOCK_AGENT_BIN", env!("CARGO_BIN_EXE_airlock"))
        .output()
        .expect("run airlock")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn image_commands_treat_a_missing_directory_as_empty() {
    let root = tempfile::tempdir().expect("tempdir");
    let images = root.path().join("not/made/yet/images");
    let data = root.path().join("data-not-made-either");

    let prune = airlock(&images, &data, &["image", "prune"]);
    assert!(prune.status.success(), "prune: {}", text(&prune.stderr));
    assert!(
        text(&prune.stdout).contains("nothing to prune"),
        "{}",
        text(&prune.stdout)
    );

    let show = airlock(&images, &data, &["image", "show"]);
    assert!(show.status.success(), "show: {}", text(&show.stderr));
    assert!(
        text(&show.stdout).contains("there is no golden image in"),
        "{}",
        text(&show.stdout)
    );

    // Nothing to verify is a failure, said plainly rather than as an OS error.
    let verify = airlock(&images, &data, &["image", "verify"]);
    assert!(!verify.status.success(), "verify passed with no image");
    let err = text(&verify.stderr);
    assert!(err.contains("there is no golden image in"), "{err}");
    assert!(!err.contains("os error"), "{err}");

    assert!(
        !root.path().join("not").exists() && !data.exists(),
        "read-only image commands must not create directories"
    );
}
