use super::*;
use proptest::prelude::*;

fn aad() -> Aad {
    Aad::new("u1", "claude", "login-1")
}

#[test]
fn round_trip_and_fresh_nonces() {
    let v = Vault::ephemeral();
    let a = v.seal(b"secret", &aad());
    let b = v.seal(b"secret", &aad());
    assert_ne!(a, b, "every seal uses a new nonce");
    assert_eq!(
        v.open(&a, &aad())
            .expect("opens")
            .expose_secret()
            .as_slice(),
        b"secret"
    );
    assert!(!a.contains("secret"));
}

#[test]
fn tampering_swapping_and_truncation_fail_clearly() {
    let v = Vault::ephemeral();
    let rec = v.seal(b"secret", &aad());
    // Swapped associated data: another user, provider or login.
    for other in [
        Aad::new("u2", "claude", "login-1"),
        Aad::new("u1", "codex", "login-1"),
        Aad::new("u1", "claude", "login-2"),
    ] {
        assert!(matches!(v.open(&rec, &other), Err(VaultError::Decrypt)));
    }
    // A flipped byte in the ciphertext.
    let (head, body) = rec.rsplit_once(':').expect("fields");
    let mut raw = B64.decode(body).expect("b64");
    raw[0] ^= 1;
    let tampered = format!("{head}:{}", B64.encode(&raw));
    assert!(matches!(
        v.open(&tampered, &aad()),
        Err(VaultError::Decrypt)
    ));
    // Truncated records.
    assert!(matches!(
        v.open(&rec[..rec.len() - 4], &aad()),
        Err(VaultError::Decrypt | VaultError::Malformed(_))
    ));
    assert!(matches!(
        v.open("v1:k1:abc", &aad()),
        Err(VaultError::Malformed(_))
    ));
    // A key this keyring does not hold.
    let other = Vault::ephemeral();
    assert!(matches!(other.open(&rec, &aad()), Err(VaultError::Decrypt)));
    let renamed = rec.replacen(":k1:", ":k9:", 1);
    assert!(matches!(
        v.open(&renamed, &aad()),
        Err(VaultError::UnknownKey(_))
    ));
}

#[test]
fn keyring_file_is_private_and_survives_reload() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut v = Vault::load(dir.path()).expect("create");
    let mode = std::fs::metadata(dir.path().join("vault.keys"))
        .expect("file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let old = v.seal(b"one", &aad());
    let new_id = v.rotate().expect("rotate");
    assert_eq!(v.current_key_id(), new_id);
    let reloaded = Vault::load(dir.path()).expect("reload");
    assert_eq!(reloaded.current_key_id(), new_id);
    assert_eq!(
        reloaded
            .open(&old, &aad())
            .expect("old key still opens")
            .expose_secret()
            .as_slice(),
        b"one"
    );
    // After re-sealing and retiring, the old record no longer opens.
    let resealed = v.seal(v.open(&old, &aad()).expect("open").expose_secret(), &aad());
    // A key some record still names is kept.
    let named: std::collections::BTreeSet<String> = ["k1".to_owned()].into();
    assert!(v.retire_unused(&named).expect("keep").is_empty());
    assert_eq!(v.key_ids(), vec!["k1".to_owned(), new_id.clone()]);
    assert_eq!(
        v.retire_unused(&Default::default()).expect("retire"),
        vec!["k1".to_owned()]
    );
    let text = std::fs::read_to_string(dir.path().join("vault.keys")).expect("file");
    assert!(
        !text.contains("\"k1\""),
        "the retired key left the file: {text}"
    );
    assert!(matches!(
        v.open(&old, &aad()),
        Err(VaultError::UnknownKey(_))
    ));
    assert_eq!(
        v.open(&resealed, &aad())
            .expect("opens")
            .expose_secret()
            .as_slice(),
        b"one"
    );
}

proptest! {
    #[test]
    fn rotation_keeps_everything_readable(secrets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..8), rotations in 1usize..4) {
        let mut v = Vault::ephemeral();
        let mut records: Vec<(String, Vec<u8>)> = secrets.iter().map(|s| (v.seal(s, &aad()), s.clone())).collect();
        for _ in 0..rotations {
            v.rotate().expect("rotate");
            for (rec, plain) in records.iter_mut() {
                let opened = v.open(rec, &aad()).expect("readable");
                prop_assert_eq!(opened.expose_secret(), &*plain);
                *rec = v.seal(plain, &aad());
                prop_assert_eq!(Vault::key_of(rec), Some(v.current_key_id()));
            }
        }
        v.retire_unused(&Default::default()).expect("retire");
        for (rec, plain) in &records {
            let opened = v.open(rec, &aad()).expect("readable after retire");
            prop_assert_eq!(opened.expose_secret(), plain);
        }
    }

    #[test]
    fn open_never_panics(s in ".{0,80}") {
        let _ = Vault::ephemeral().open(&s, &aad());
    }
}

#[test]
fn a_keyring_readable_by_others_is_narrowed_and_a_stale_temp_file_does_not_widen_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(KEYRING_FILE);
    Vault::load(dir.path()).expect("create");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut v = Vault::load(dir.path()).expect("load");
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    // A temporary file left world-readable by a crash must not become the keyring's mode.
    let tmp = path.with_extension("keys.tmp");
    std::fs::write(&tmp, "x").expect("tmp");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    v.rotate().expect("rotate");
    assert_eq!(mode(&path), 0o600);
}

#[test]
fn the_keyrings_directory_is_synced_after_the_rename() {
    // The data dir is opened and flushed; a vanished one is an error, not a
    // silent success (a rotate then stops before re-sealing anything).
    let dir = tempfile::tempdir().expect("tempdir");
    super::sync_parent(&dir.path().join(super::KEYRING_FILE)).expect("sync");
    let gone = dir.path().join("gone").join(super::KEYRING_FILE);
    assert!(super::sync_parent(&gone).is_err());
    let mut vault = Vault::load(dir.path()).expect("load");
    vault.rotate().expect("rotate");
    assert!(!dir.path().join("vault.keys.tmp").exists());
}

#[test]
fn the_keyring_lock_lets_sealers_share_and_makes_a_rotation_wait_for_them() {
    use std::sync::mpsc;
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let first = KeyringLock::shared(&path).expect("shared");
    let second = KeyringLock::shared(&path).expect("a second sealer is not held up");
    let (tx, rx) = mpsc::channel();
    let rotator = std::thread::spawn({
        let path = path.clone();
        move || {
            let held = KeyringLock::exclusive(&path).expect("exclusive");
            tx.send(()).expect("send");
            // While the rotation holds it, a sealer cannot start.
            let probe = std::fs::File::open(path.join(KEYRING_LOCK_FILE)).expect("open");
            assert!(probe.try_lock_shared().is_err());
            drop(held);
        }
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the rotation took the lock while sealers held it"
    );
    drop(first);
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    drop(second);
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the rotation goes on once the sealers are done");
    rotator.join().expect("rotator");
    KeyringLock::shared(&path).expect("free again");
}
