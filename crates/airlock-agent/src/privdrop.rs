//! The one place a child of the agent (root) leaves the agent's session and
//! takes the sandbox user's identity, between fork and exec.
//!
//! std applies `Command::uid`/`gid` *before* `pre_exec` hooks and then drops
//! every supplementary group, so a session step that needs root
//! (`TIOCSCTTY`) could not come after it, and the user's groups would be lost.
//! Here it is all one hook, in order: the session first, then `setgroups`,
//! `setgid`, `setuid` (the groups while still root, the uid last). Any step
//! failing fails the spawn, so a command never runs as root by mistake.

use crate::exec::RunAs;

/// What happens to the child's session before it drops privileges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// Stays in the agent's session (its process group is the caller's to set).
    Inherit,
    /// A new session with no controlling terminal: nothing the agent gets
    /// from its terminal (a hang-up) reaches it.
    New,
    /// A new session whose controlling terminal is the child's stdin, which
    /// must be a terminal (the slave side of a PTY).
    NewWithTerminal,
}

/// Arranges for `cmd`'s child to enter `session` and then run as `run_as`.
/// Call it once per command: hooks run in the order they were added.
#[allow(unsafe_code)]
pub fn drop_to(cmd: &mut std::process::Command, run_as: &RunAs, session: Session) {
    use std::os::unix::process::CommandExt;
    let ids = match run_as {
        RunAs::User { uid, gid, groups } => Some((*uid, *gid, groups.clone())),
        RunAs::Current => None,
    };
    if ids.is_none() && session == Session::Inherit {
        return;
    }
    // SAFETY: the hook runs in the forked child before exec. It only makes
    // async-signal-safe system calls (setsid, ioctl, setgroups, setgid,
    // setuid) on data moved into it before the fork, allocates nothing and
    // takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            match session {
                Session::Inherit => {}
                Session::New => {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Session::NewWithTerminal => {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// Tests that need root skip without it, except in CI, where they fail.
    fn need_root() -> bool {
        if is_root() {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "this test needs root"
        );
        eprintln!("skipped: needs root");
        false
    }

    fn run(run_as: &RunAs, session: Session, script: &str) -> std::io::Result<String> {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", script]).stdin(std::process::Stdio::null());
        drop_to(&mut cmd, run_as, session);
        let out = cmd.output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Field 6 of /proc/PID/stat (the session id) and the pid, as `sid pid`.
    const SESSION_AND_PID: &str = "echo $(cut -d' ' -f6 /proc/$$/stat) $$";

    #[test]
    fn drops_to_the_user_with_its_groups() {
        if !need_root() {
            return;
        }
        let user = RunAs::User {
            uid: 65534,
            gid: 65534,
            groups: vec![65534, 29],
        };
        let out = run(&user, Session::Inherit, "id -u; id -g; id -G").expect("spawn");
        assert_eq!(out, "65534\n65534\n65534 29\n");
        // Dropped for good: real, effective, saved and file-system ids all
        // the user's, so it cannot take root back.
        let out = run(
            &user,
            Session::Inherit,
            "grep -E '^(Uid|Gid):' /proc/self/status",
        )
        .expect("spawn");
        assert_eq!(
            out,
            "Uid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n"
        );
    }

    #[test]
    fn a_new_session_leads_itself() {
        let out = run(&RunAs::Current, Session::New, SESSION_AND_PID).expect("spawn");
        let ids: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(ids.len(), 2, "{out}");
        assert_eq!(ids[0], ids[1], "the child leads its session: {out}");
        let out = run(&RunAs::Current, Session::Inherit, SESSION_AND_PID).expect("spawn");
        let ids: Vec<&str> = out.split_whitespace().collect();
        assert_ne!(ids[0], ids[1], "the child stays in ours: {out}");
    }

    /// A session step that cannot be taken fails the spawn: the command
    /// never runs (here: a controlling terminal asked for, stdin no terminal).
    #[test]
    fn a_failed_step_fails_the_spawn() {
        let err = run(&RunAs::Current, Session::NewWithTerminal, "echo ran")
            .expect_err("stdin is no terminal");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY), "{err}");
    }
}
