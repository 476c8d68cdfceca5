//! The sandbox user, looked up in the guest's `/etc/passwd` and `/etc/group`
//! (no NSS calls: they are not safe between fork and exec, and the image has
//! only local files anyway).

use std::path::{Path, PathBuf};

/// The user every command and desktop program runs as.
pub const SANDBOX_USER: &str = "airlock";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// Primary group first, then every group listing the user as a member.
    pub groups: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("user {0:?} is not in the passwd file")]
    NoSuchUser(String),
    #[error("malformed passwd entry for {0:?}")]
    Malformed(String),
}

/// Looks `name` up in the given passwd and group files.
pub fn lookup(name: &str, passwd: &Path, group: &Path) -> Result<Account, UserError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| UserError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let passwd_text = read(passwd)?;
    let group_text = read(group)?;
    parse(name, &passwd_text, &group_text)
}

fn parse(name: &str, passwd: &str, group: &str) -> Result<Account, UserError> {
    let line = passwd
        .lines()
        .find(|l| l.split(':').next() == Some(name))
        .ok_or_else(|| UserError::NoSuchUser(name.to_owned()))?;
    let fields: Vec<&str> = line.split(':').collect();
    if fields.len() < 7 {
        return Err(UserError::Malformed(name.to_owned()));
    }
    let uid = fields[2]
        .parse()
        .map_err(|_| UserError::Malformed(name.to_owned()))?;
    let gid: u32 = fields[3]
        .parse()
        .map_err(|_| UserError::Malformed(name.to_owned()))?;
    let mut groups = vec![gid];
    for l in group.lines() {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 {
            continue;
        }
        let Ok(g) = f[2].parse::<u32>() else { continue };
        if f[3].split(',').any(|m| m == name) && !groups.contains(&g) {
            groups.push(g);
        }
    }
    Ok(Account {
        name: name.to_owned(),
        uid,
        gid,
        home: PathBuf::from(fields[5]),
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/bash\nairlock:x:1000:1000:sandbox:/home/airlock:/bin/bash\n";
    const GROUP: &str =
        "root:x:0:\naudio:x:29:pulse,airlock\nvideo:x:44:airlock\nairlock:x:1000:\nbroken\n";

    #[test]
    fn finds_user_with_supplementary_groups() {
        let a = parse("airlock", PASSWD, GROUP).expect("found");
        assert_eq!(a.uid, 1000);
        assert_eq!(a.gid, 1000);
        assert_eq!(a.home, PathBuf::from("/home/airlock"));
        assert_eq!(a.groups, vec![1000, 29, 44]);
    }

    #[test]
    fn missing_and_malformed_users_are_errors() {
        assert!(matches!(
            parse("nobody", PASSWD, GROUP),
            Err(UserError::NoSuchUser(_))
        ));
        assert!(matches!(
            parse("x", "x:1:2\n", ""),
            Err(UserError::Malformed(_))
        ));
        assert!(matches!(
            parse("x", "x:x:a:1:::/bin/sh\n", ""),
            Err(UserError::Malformed(_))
        ));
    }
}
