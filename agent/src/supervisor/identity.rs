//! Who a shard runs as. A job's command is whatever its submitter wrote, so an agent running as
//! root (it must, to set GPU power limits) runs shards as an unprivileged user: `--run-as
//! USER[:GROUP]`, by default `nobody`. Root shards need `--run-as root` and
//! `--allow-root-shards` both. The switch drops root's supplementary groups, and the agent sets
//! no-new-privileges on itself at start, which every shard inherits: no setuid program gives a
//! shard root back.

use nix::unistd::{Group, Uid, User};

/// The user and group a shard's processes run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunAsError {
    #[error("no user named {0:?} on this node")]
    UnknownUser(String),
    #[error("no group named {0:?} on this node")]
    UnknownGroup(String),
    #[error("is root: running jobs' commands as root needs --allow-root-shards too")]
    RootNotAllowed,
    #[error("needs the agent to run as root (it runs as uid {0}); without --run-as shards run as the agent's user")]
    NotRoot(u32),
}

/// The user shards run as, or `None` to run them as the agent's own user (an agent that is not
/// root, or root shards explicitly allowed).
pub fn resolve(run_as: Option<&str>, allow_root: bool) -> Result<Option<ShardUser>, RunAsError> {
    let agent_is_root = Uid::effective().is_root();
    let wanted = match run_as {
        Some(spec) => spec,
        None if agent_is_root => "nobody",
        None => return Ok(None),
    };
    let user = lookup(wanted)?;
    if user.uid == 0 {
        return if allow_root { Ok(None) } else { Err(RunAsError::RootNotAllowed) };
    }
    if !agent_is_root {
        let own = Uid::effective().as_raw();
        return if user.uid == own { Ok(None) } else { Err(RunAsError::NotRoot(own)) };
    }
    Ok(Some(user))
}

/// `USER[:GROUP]`, by name or number; the group defaults to the user's own. `nobody` is
/// 65534:65534 where the node has no such entry (minimal container images).
fn lookup(spec: &str) -> Result<ShardUser, RunAsError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (name, uid, own_gid) = match user.parse::<u32>() {
        Ok(uid) => {
            let entry = User::from_uid(Uid::from_raw(uid)).ok().flatten();
            (
                entry.as_ref().map_or_else(|| uid.to_string(), |u| u.name.clone()),
                uid,
                entry.map_or(uid, |u| u.gid.as_raw()),
            )
        }
        Err(_) => match User::from_name(user).ok().flatten() {
            Some(u) => (u.name, u.uid.as_raw(), u.gid.as_raw()),
            None if user == "nobody" => ("nobody".to_string(), 65534, 65534),
            None => return Err(RunAsError::UnknownUser(user.to_string())),
        },
    };
    let gid = match group {
        None => own_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(g)
                .ok()
                .flatten()
                .map(|grp| grp.gid.as_raw())
                .ok_or_else(|| RunAsError::UnknownGroup(g.to_string()))?,
        },
    };
    Ok(ShardUser { name, uid, gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_groups_resolve_and_unknown_ones_are_named() {
        assert_eq!(lookup("0").unwrap().uid, 0);
        assert_eq!(lookup("root").unwrap(), ShardUser { name: "root".into(), uid: 0, gid: 0 });
        assert_eq!(lookup("nobody").unwrap().uid, 65534);
        assert_eq!(lookup("1234:5678").unwrap(), ShardUser { name: "1234".into(), uid: 1234, gid: 5678 });
        assert_eq!(lookup("no-such-user-x").unwrap_err(), RunAsError::UnknownUser("no-such-user-x".into()));
        assert_eq!(lookup("nobody:no-such-group").unwrap_err(), RunAsError::UnknownGroup("no-such-group".into()));
    }

    #[test]
    fn root_shards_need_the_explicit_flag() {
        assert_eq!(resolve(Some("root"), false), Err(RunAsError::RootNotAllowed));
        if Uid::effective().is_root() {
            assert_eq!(resolve(None, false).unwrap().map(|u| u.uid), Some(65534), "root agents run shards as nobody");
            assert_eq!(resolve(Some("root"), true), Ok(None));
            assert_eq!(resolve(Some("1000:1000"), false).unwrap().map(|u| (u.uid, u.gid)), Some((1000, 1000)));
        } else {
            assert_eq!(resolve(None, false), Ok(None), "a non-root agent runs shards as itself");
            assert!(matches!(resolve(Some("nobody"), false), Err(RunAsError::NotRoot(_))));
        }
    }
}
