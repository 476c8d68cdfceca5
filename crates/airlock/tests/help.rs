//! `--help` shows which environment variable sets a flag, never a secret's value.

use std::process::Command;

#[test]
fn up_help_does_not_print_the_database_url() {
    let canary = "postgres://airlock:help-canary-5f3a@db.internal/airlock";
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["up", "--help"])
        .env("AIRLOCK_DATABASE_URL", canary)
        .output()
        .expect("airlock runs");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("AIRLOCK_DATABASE_URL"), "{text}");
    assert!(!text.contains("help-canary"), "the value is shown: {text}");
}
