//! Checks run inside a built image: its layers are mounted as one overlay with
//! a throwaway upper layer, and each check is one `systemd-nspawn --pipe`
//! command as the sandbox user, without network.

use crate::host::{self, mkdirs, run, Output};
use crate::recipe::{meta_contents, unit_directives, UnitDirective};
use crate::{ImageError, Progress};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const CHECK_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    /// The version or what went wrong.
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub build_id: String,
    pub checks: Vec<CheckResult>,
    /// Program → version string, for the programs whose check passed.
    pub versions: BTreeMap<String, String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// One line naming every failed check.
    pub fn failures(&self) -> String {
        let failed: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        failed.join("; ")
    }
}

/// (check name, argv, a marker the version line must contain; "" takes the
/// first line of standard output)
const VERSION_CHECKS: &[(&str, &[&str], &str)] = &[
    ("node", &["node", "--version"], "v22."),
    ("npm", &["npm", "--version"], "10."),
    ("codex", &["codex", "--version"], ""),
    ("claude", &["claude", "--version"], ""),
    ("gemini", &["gemini", "--version"], ""),
    ("chromium", &["chromium", "--version"], "Chromium "),
        // `Xvnc -version` prints nothing when not on a terminal: ask dpkg.
    (
        "xvnc",
        &["sh", "-c", "test -x /usr/bin/Xvnc && dpkg-query -W -f 'TigerVNC ${Version}\\n' tigervnc-standalone-server"],
        "TigerVNC",
    ),
    (
        "agent",
        &["airlock-agent", "--help"],
        "usage: airlock-agent",
    ),
    // The WebRTC viewer's capture: every GStreamer element it needs can be
    // made (the display is not opened); a missing one is named with its package.
    (
        "capture",
        &["airlock-agent", "capture", "--check"],
        "capture: OK",
    ),
];

/// The overlay a verification runs in; unmounted and removed on drop.
pub(crate) struct Mounted {
    root: PathBuf,
    merged: PathBuf,
}

impl Mounted {
    pub(crate) fn new(layers_top_first: &[PathBuf], root: &Path) -> Result<Self, ImageError> {
        host::remove_tree(root)?;
        let (upper, work, merged) = (root.join("upper"), root.join("work"), root.join("merged"));
        for d in [&upper, &work, &merged] {
            mkdirs(d)?;
        }
        let lower: Vec<String> = layers_top_first
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            work.display()
        );
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&merged)
            .output()
            .map_err(|source| ImageError::Spawn {
                program: "mount".into(),
                doing: "mounting the image".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(ImageError::Command {
                program: "mount".into(),
                doing: "mounting the image as an overlay".into(),
                status: out.status.to_string(),
                tail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(Mounted {
            root: root.to_owned(),
            merged,
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = host::unmount(&self.merged);
        let _ = host::remove_tree(&self.root);
    }
}

fn nspawn(merged: &Path, argv: &[&str]) -> Command {
    let mut cmd = Command::new("systemd-nspawn");
    cmd.args([
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--private-network",
        "--pipe",
    ])
    .arg(format!("--machine=airlock-verify-{}", std::process::id()))
    .arg("-D")
    .arg(merged)
    .args([
        "--user=airlock",
        "--chdir=/tmp",
        "--setenv=HOME=/tmp/verify-home",
    ])
    .arg("--setenv=PATH=/usr/local/bin:/usr/bin:/bin")
    .args([
        "--",
        "/bin/sh",
        "-c",
        "mkdir -p \"$HOME\" && exec \"$@\"",
        "sh",
    ])
    .args(argv);
    cmd
}

/// Mounts the layers under `scratch` and checks the image from inside.
pub(crate) fn verify_layers(
    layers_top_first: &[PathBuf],
    build_id: &str,
    scratch: &Path,
    progress: &dyn Progress,
) -> Result<VerifyReport, ImageError> {
    if !host::is_root() {
        return Err(ImageError::NotRoot);
    }
    let mount = Mounted::new(
        layers_top_first,
        &scratch.join(format!("verify-{}", std::process::id())),
    )?;
    let mut report = VerifyReport {
        build_id: build_id.to_owned(),
        checks: Vec::new(),
        versions: BTreeMap::new(),
    };

    for (name, argv, prefix) in VERSION_CHECKS {
        progress.message(&format!("checking {}", argv.join(" ")));
        let out = run(
            nspawn(&mount.merged, argv),
            &format!("running {name} in the image"),
            &crate::NoProgress,
            CHECK_TIMEOUT,
        )?;
        let check = judge_version(name, prefix, &out);
        if check.ok && *name != "agent" {
            report
                .versions
                .insert((*name).to_owned(), check.detail.clone());
        }
        report.checks.push(check);
    }
    report.checks.push(check_units(&mount.merged)?);
    report.checks.push(check_build_id(&mount.merged, build_id));
    Ok(report)
}

fn judge_version(name: &str, marker: &str, out: &Output) -> CheckResult {
    // Some programs print their version on stderr (Xvnc), where nspawn's own
    // warnings also go: look for the marker in every line.
    let mut lines = out
        .stdout
        .lines()
        .chain(out.tail.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty());
    let first = if marker.is_empty() {
        lines.next()
    } else {
        lines.find(|l| l.contains(marker))
    };
    let first = first.unwrap_or("").to_owned();
    let ok = out.success && !first.is_empty();
    let detail = if ok {
        first
    } else if !out.success {
        format!(
            "{} ({})",
            out.status,
            out.tail.lines().last().unwrap_or("no output")
        )
    } else {
        format!("no output line containing {marker:?}")
    };
    CheckResult {
        name: name.to_owned(),
        ok,
        detail,
    }
}

/// The units the recipe enables and masks are linked as systemd would.
fn check_units(merged: &Path) -> Result<CheckResult, ImageError> {
    let units = merged.join("etc/systemd/system");
    let mut problems = Vec::new();
    let mut enabled = 0;
    for d in unit_directives()? {
        let (link, want_target) = match &d {
            UnitDirective::Default(t) => (units.join("default.target"), format!("/{t}")),
            UnitDirective::Enable { unit, target } => (
                units.join(format!("{target}.wants/{unit}")),
                format!("/{unit}"),
            ),
            UnitDirective::Mask(unit) => (units.join(unit), "/dev/null".to_owned()),
        };
        match std::fs::read_link(&link) {
            Ok(t) if t.to_string_lossy().ends_with(&want_target) => {
                if let UnitDirective::Enable { unit, .. } = &d {
                    // An enabled unit must itself exist in the image.
                    let here = units.join(unit).exists()
                        || merged.join("usr/lib/systemd/system").join(unit).exists();
                    if here {
                        enabled += 1;
                    } else {
                        problems.push(format!("{unit} is enabled but missing"));
                    }
                }
            }
            Ok(t) => problems.push(format!("{} points at {}", link.display(), t.display())),
            Err(_) => problems.push(format!(
                "{} is missing",
                link.strip_prefix(merged).unwrap_or(&link).display()
            )),
        }
    }
    Ok(CheckResult {
        name: "units".into(),
        ok: problems.is_empty(),
        detail: if problems.is_empty() {
            format!("{enabled} units enabled")
        } else {
            problems.join(", ")
        },
    })
}

fn check_build_id(merged: &Path, build_id: &str) -> CheckResult {
    let found = std::fs::read(merged.join("etc/airlock/image.json")).unwrap_or_default();
    let ok = found == meta_contents(build_id);
    CheckResult {
        name: "image.json".into(),
        ok,
        detail: if ok {
            build_id.to_owned()
        } else {
            "does not name this build".into()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(success: bool, stdout: &str, tail: &str) -> Output {
        Output {
            success,
            status: "exit status: 1".into(),
            stdout: stdout.into(),
            tail: tail.into(),
        }
    }

    #[test]
    fn versions_are_judged_by_exit_and_prefix() {
        assert!(judge_version("node", "v22.", &out(true, "v22.23.3\n", "")).ok);
        assert!(!judge_version("node", "v22.", &out(true, "v20.1.0\n", "")).ok);
        assert!(!judge_version("codex", "", &out(false, "", "boom")).ok);
        assert!(!judge_version("codex", "", &out(true, "", "")).ok);
        let x = judge_version(
            "xvnc",
            "TigerVNC",
            &out(true, "", "nspawn: a warning\nXvnc TigerVNC 1.15.0\n"),
        );
        assert!(x.ok);
        assert_eq!(x.detail, "Xvnc TigerVNC 1.15.0");
    }

    #[test]
    fn report_lists_failures() {
        let r = VerifyReport {
            build_id: "b".into(),
            checks: vec![
                CheckResult {
                    name: "a".into(),
                    ok: true,
                    detail: "1".into(),
                },
                CheckResult {
                    name: "c".into(),
                    ok: false,
                    detail: "gone".into(),
                },
            ],
            versions: BTreeMap::new(),
        };
        assert!(!r.ok());
        assert_eq!(r.failures(), "c: gone");
    }
}
