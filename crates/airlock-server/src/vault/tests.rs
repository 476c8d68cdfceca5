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
    v.retire_old_keys().expect("retire");
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
        v.retire_old_keys().expect("retire");
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
