//! Users and groups through the C library's NSS (`nix`'s `User` and `getgrouplist`), so
//! LDAP and systemd's dynamic users resolve as they do for `id`.
use std::ffi::CString;

use nix::unistd::{Gid, Uid, User, getgrouplist};

/// A user a confined command runs as (`run --user`) or whose home `~` means.
#[derive(Clone, Debug)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, the primary one included.
    pub groups: Vec<u32>,
    pub home: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("no such user: {0}")]
    Unknown(String),
    #[error("looking up user {name}")]
    Lookup {
        name: String,
        #[source]
        source: nix::Error,
    },
}

/// Looks a user up by name, with its groups.
pub fn lookup(name: &str) -> Result<Account, UserError> {
    let lookup_err = |source| UserError::Lookup { name: name.into(), source };
    let user = User::from_name(name).map_err(lookup_err)?.ok_or_else(|| UserError::Unknown(name.into()))?;
    let c_name = CString::new(name).map_err(|_| UserError::Unknown(name.into()))?;
    let groups = getgrouplist(&c_name, user.gid).map_err(lookup_err)?;
    Ok(Account {
        name: name.into(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups: groups.into_iter().map(Gid::as_raw).collect(),
        home: user.dir.display().to_string(),
    })
}

/// The name of `uid`, if it has one.
pub fn name_of(uid: u32) -> Option<String> {
    User::from_uid(Uid::from_raw(uid)).ok().flatten().map(|u| u.name)
}

/// This process's real uid.
pub fn current_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_root_by_name_and_uid() {
        let root = lookup("root").expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0), "{root:?}");
        assert_eq!(name_of(0).as_deref(), Some("root"));
        assert!(matches!(lookup("no-such-user-enforcer"), Err(UserError::Unknown(_))));
    }
}
