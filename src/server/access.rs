//! Who may do what on the client port. A client's identity is the common name
//! of its verified TLS certificate; `client_roles` maps identities to roles:
//!
//! | role | allows |
//! |---|---|
//! | `read` | get, scan, members, info, ping |
//! | `write` | read, plus set and delete |
//! | `admin` | write, plus add-node and remove-node |
//!
//! Without `client_roles` every client that reaches the port (and passes the
//! TLS checks in force) may do everything, as etcd does with auth off. With
//! it, an identity that is not listed is refused everything. A refusal
//! changes nothing: it happens before the request reaches the node.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::error::WireError;
use crate::proto::{request, ErrorCode};

/// A role; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads and cluster status.
    Read,
    /// Reads and writes.
    Write,
    /// Everything, membership changes included.
    Admin,
}

impl Role {
    /// The name used in `client_roles`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    fn parse(name: &str) -> Option<Role> {
        match name {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The role a command needs.
pub fn required_role(command: &request::Command) -> Role {
    use request::Command as C;
    match command {
        C::Get(_)
        | C::Scan(_)
        | C::Members(_)
        | C::Info(_)
        | C::Ping(_)
        | C::Watch(_)
        | C::WatchCancel(_)
        | C::LeaseTimeToLive(_)
        | C::LeaseList(_) => Role::Read,
        C::Set(_)
        | C::Delete(_)
        | C::RegisterSession(_)
        | C::LeaseGrant(_)
        | C::LeaseRevoke(_)
        | C::LeaseKeepAlive(_) => Role::Write,
        C::Txn(txn) if txn.writes() => Role::Write,
        C::Txn(_) => Role::Read,
        // A backup reads everything, members included.
        C::AddNode(_) | C::RemoveNode(_) | C::SnapshotSave(_) => Role::Admin,
    }
}

/// Parses `NAME=ROLE,...`.
pub fn parse_roles(spec: &str) -> Result<HashMap<String, Role>, String> {
    let mut roles = HashMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, role) = part
            .split_once('=')
            .ok_or_else(|| format!("entry {part:?} is not NAME=ROLE"))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(format!(
                "entry {part:?}: the identity (a certificate's common name) is empty"
            ));
        }
        let role =
            Role::parse(role.trim()).ok_or_else(|| format!("entry {part:?}: the role must be read, write or admin"))?;
        if roles.insert(name.to_string(), role).is_some() {
            return Err(format!("names {name:?} twice"));
        }
    }
    if roles.is_empty() {
        return Err("is empty; give NAME=ROLE for every client identity, or leave it unset".into());
    }
    Ok(roles)
}

/// The roles in force; replaced on SIGHUP. Cheap to clone.
#[derive(Clone, Default)]
pub struct AccessControl {
    roles: Arc<RwLock<Option<HashMap<String, Role>>>>,
}

impl AccessControl {
    /// From the `client_roles` setting (already validated).
    pub fn new(spec: Option<&str>) -> Result<Self, String> {
        let control = AccessControl::default();
        control.replace(spec)?;
        Ok(control)
    }

    /// Puts new roles in force.
    pub fn replace(&self, spec: Option<&str>) -> Result<(), String> {
        let roles = spec.map(parse_roles).transpose()?;
        *self.roles.write().expect("roles lock poisoned") = roles;
        Ok(())
    }

    /// Whether `identity` may run `command`.
    pub fn check(&self, identity: Option<&str>, command: &request::Command) -> Result<(), WireError> {
        let roles = self.roles.read().expect("roles lock poisoned");
        let Some(roles) = roles.as_ref() else {
            return Ok(());
        };
        let needed = required_role(command);
        let Some(identity) = identity else {
            return Err(denied(
                "this connection has no client certificate, and client_roles is set: connect with --cert and --key"
                    .into(),
            ));
        };
        match roles.get(identity) {
            None => Err(denied(format!(
                "identity {identity:?} is not listed in client_roles; ask an operator to give it a role"
            ))),
            Some(role) if *role < needed => Err(denied(format!(
                "identity {identity:?} has the role {}, and this request needs {}",
                role.as_str(),
                needed.as_str()
            ))),
            Some(_) => Ok(()),
        }
    }
}

fn denied(message: String) -> WireError {
    WireError::new(ErrorCode::PermissionDenied, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{GetRequest, RemoveNodeRequest, SetRequest};

    fn get() -> request::Command {
        request::Command::Get(GetRequest::default())
    }
    fn set() -> request::Command {
        request::Command::Set(SetRequest::default())
    }
    fn remove() -> request::Command {
        request::Command::RemoveNode(RemoveNodeRequest { node_id: 2 })
    }

    #[test]
    fn each_role_allows_its_own_and_lower_commands_only() {
        let access = AccessControl::new(Some("r=read, w=write,a=admin")).unwrap();
        let allowed = |who: &str, c: &request::Command| access.check(Some(who), c).is_ok();
        assert!(allowed("r", &get()) && !allowed("r", &set()) && !allowed("r", &remove()));
        assert!(allowed("w", &get()) && allowed("w", &set()) && !allowed("w", &remove()));
        assert!(allowed("a", &get()) && allowed("a", &set()) && allowed("a", &remove()));
        let refused = access.check(Some("r"), &set()).unwrap_err();
        assert_eq!(refused.code, ErrorCode::PermissionDenied);
        assert!(refused.message.contains("\"r\" has the role read") && refused.message.contains("needs write"));
        let stranger = access.check(Some("mallory"), &get()).unwrap_err();
        assert!(stranger.message.contains("not listed"), "{}", stranger.message);
        assert!(access.check(None, &get()).is_err());
    }

    #[test]
    fn without_roles_everyone_may_do_everything() {
        let access = AccessControl::new(None).unwrap();
        assert!(access.check(None, &remove()).is_ok());
        access.replace(Some("a=admin")).unwrap();
        assert!(access.check(None, &get()).is_err());
    }

    #[test]
    fn bad_role_specs_say_what_is_wrong() {
        assert!(parse_roles("a").unwrap_err().contains("NAME=ROLE"));
        assert!(parse_roles("a=root").unwrap_err().contains("read, write or admin"));
        assert!(parse_roles("a=read,a=write").unwrap_err().contains("twice"));
        assert!(parse_roles("=read").unwrap_err().contains("empty"));
        assert!(parse_roles(" , ").unwrap_err().contains("empty"));
    }
}
