//! `airlock-agent prepare`: turns the metadata document into the files the
//! image's units read at boot. Nothing secret goes into `session.env`: the VNC
//! password only reaches the user-owned, mode-0600 password file.

use crate::users::Account;
use airlock_proto::metadata::{Display, Metadata};
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where `prepare` writes; `/run/airlock` in a guest, a temp dir in tests.
#[derive(Debug, Clone)]
pub struct Paths {
    pub run_dir: PathBuf,
}

impl Paths {
    pub fn guest() -> Self {
        Paths {
            run_dir: PathBuf::from("/run/airlock"),
        }
    }
    pub fn vnc_passwd(&self) -> PathBuf {
        self.run_dir.join("vnc/passwd")
    }
    pub fn session_env(&self) -> PathBuf {
        self.run_dir.join("session.env")
    }
    pub fn profile(&self) -> PathBuf {
        self.run_dir.join("profile.sh")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("writing {path}")]
pub struct PrepareError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// A window's place on the desktop, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// Terminal on the left half, browser on the right half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub terminal: Rect,
    pub browser: Rect,
}

impl Layout {
    pub fn side_by_side(d: Display) -> Layout {
        let left = d.width / 2;
        Layout {
            terminal: Rect {
                x: 0,
                y: 0,
                width: left,
                height: d.height,
            },
            browser: Rect {
                x: left,
                y: 0,
                width: d.width - left,
                height: d.height,
            },
        }
    }
}

/// The proxy variables every guest process should see, in both spellings
/// (curl reads lower case, many other tools upper case). Empty without egress.
pub fn proxy_env(meta: &Metadata) -> Vec<(String, String)> {
    let Some(egress) = &meta.egress else {
        return Vec::new();
    };
    let mut env = Vec::new();
    for (name, value) in [
        ("HTTP_PROXY", &egress.proxy_url),
        ("HTTPS_PROXY", &egress.proxy_url),
        ("NO_PROXY", &egress.no_proxy),
    ] {
        env.push((name.to_owned(), value.clone()));
        env.push((name.to_ascii_lowercase(), value.clone()));
    }
    env
}

/// The systemd `EnvironmentFile` of the desktop units.
pub fn session_env(meta: &Metadata) -> String {
    let layout = Layout::side_by_side(meta.display);
    let mut vars: Vec<(String, String)> = vec![
        ("AIRLOCK_SANDBOX_ID".into(), meta.sandbox_id.clone()),
        (
            "AIRLOCK_GEOMETRY".into(),
            format!("{}x{}", meta.display.width, meta.display.height),
        ),
        ("AIRLOCK_GUEST_ADDRESS".into(), meta.network.address.clone()),
    ];
    for (prefix, r) in [
        ("AIRLOCK_TERMINAL", layout.terminal),
        ("AIRLOCK_BROWSER", layout.browser),
    ] {
        vars.push((format!("{prefix}_X"), r.x.to_string()));
        vars.push((format!("{prefix}_Y"), r.y.to_string()));
        vars.push((format!("{prefix}_WIDTH"), r.width.to_string()));
        vars.push((format!("{prefix}_HEIGHT"), r.height.to_string()));
    }
    vars.extend(proxy_env(meta));
    let mut out = String::from("# Written by airlock-agent prepare at boot; do not edit.\n");
    for (k, v) in vars {
        // Metadata validation rules out quotes, backslashes and control characters.
        let _ = writeln!(out, "{k}=\"{v}\"");
    }
    out
}

/// Sourced by login shells (through /etc/profile.d/airlock.sh in the image).
pub fn profile_sh(meta: &Metadata) -> String {
    let mut out = String::from("# Written by airlock-agent prepare at boot; do not edit.\n");
    for (k, v) in proxy_env(meta) {
        let _ = writeln!(out, "export {k}='{v}'");
    }
    out
}

/// Writes every boot-time file. `account` owns the VNC password file.
pub fn run(meta: &Metadata, paths: &Paths, account: &Account) -> Result<(), PrepareError> {
    let vnc_dir = paths
        .vnc_passwd()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    make_dir(&paths.run_dir, 0o755, None)?;
    make_dir(&vnc_dir, 0o700, Some(account))?;
    let passwd = airlock_proto::vncauth::obfuscated_password_file(&meta.vnc_password);
    write_file(&paths.vnc_passwd(), &passwd, 0o600, Some(account))?;
    write_file(
        &paths.session_env(),
        session_env(meta).as_bytes(),
        0o644,
        None,
    )?;
    write_file(&paths.profile(), profile_sh(meta).as_bytes(), 0o644, None)?;
    Ok(())
}

fn make_dir(path: &Path, mode: u32, owner: Option<&Account>) -> Result<(), PrepareError> {
    let err = |source| PrepareError {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    if let Some(a) = owner {
        chown_if_root(path, a).map_err(err)?;
    }
    Ok(())
}

/// Writes to a temporary name beside `path` and renames it into place, so a unit
/// never sees half a file, and the secret never exists with a looser mode.
fn write_file(
    path: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<&Account>,
) -> Result<(), PrepareError> {
    let err = |source| PrepareError {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    drop(f);
    if let Some(a) = owner {
        chown_if_root(&tmp, a).map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)
}

/// Only root can give a file away; tests run the same code unprivileged.
fn chown_if_root(path: &Path, a: &Account) -> std::io::Result<()> {
    let root =
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if root.unwrap_or(false) {
        std::os::unix::fs::chown(path, Some(a.uid), Some(a.gid))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::tests::sample;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn layout_splits_the_display_in_two() {
        let l = Layout::side_by_side(Display {
            width: 1281,
            height: 800,
        });
        assert_eq!(
            l.terminal,
            Rect {
                x: 0,
                y: 0,
                width: 640,
                height: 800
            }
        );
        assert_eq!(
            l.browser,
            Rect {
                x: 640,
                y: 0,
                width: 641,
                height: 800
            }
        );
    }

    #[test]
    fn session_env_has_geometry_layout_and_proxy_but_no_secret() {
        let m = sample();
        let env = session_env(&m);
        assert!(env.contains("AIRLOCK_GEOMETRY=\"1280x800\"\n"), "{env}");
        assert!(env.contains("AIRLOCK_GUEST_ADDRESS=\"10.231.0.2\"\n"));
        assert!(env.contains("AIRLOCK_BROWSER_X=\"640\"\n"));
        assert!(env.contains("AIRLOCK_TERMINAL_WIDTH=\"640\"\n"));
        assert!(env.contains("HTTPS_PROXY=\"http://10.231.0.1:3128\"\n"));
        assert!(env.contains("no_proxy=\"localhost,127.0.0.1\"\n"));
        assert!(!env.contains(&m.vnc_password));
        assert!(!env.contains(&m.agent_token));
    }

    #[test]
    fn no_egress_means_no_proxy_variables() {
        let mut m = sample();
        m.egress = None;
        assert!(!session_env(&m).contains("PROXY"));
        assert_eq!(profile_sh(&m).lines().count(), 1);
    }

    #[test]
    fn run_writes_every_file_with_its_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths {
            run_dir: dir.path().join("airlock"),
        };
        let me = std::fs::metadata(dir.path()).expect("stat");
        let account = Account {
            name: "t".into(),
            uid: me.uid(),
            gid: me.gid(),
            home: "/".into(),
            groups: vec![],
        };
        run(&sample(), &paths, &account).expect("prepare");
        let pw = std::fs::metadata(paths.vnc_passwd()).expect("passwd");
        assert_eq!(pw.mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(paths.vnc_passwd()).expect("read").len(), 8);
        assert!(std::fs::read_to_string(paths.profile())
            .expect("profile")
            .contains("export http_proxy="));
        // Running twice (a unit restart) replaces the files.
        run(&sample(), &paths, &account).expect("prepare again");
    }
}
