//! Who may connect: users (each with a salted credential, never a password),
//! and which virtual hosts each may use. Kept in the quorum so every node
//! checks a login the same way and a change holds on all of them at once.
//!
//! Pure data: a credential is derived by [`sluice_auth`] before it is
//! proposed, so applying a command is cheap and deterministic.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sluice_auth::Credential;

use crate::image::{CommandError, CommandOutput, CommandResult, MetadataImage};

/// Users and their permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessModel {
    /// Whether the default user and virtual host were created. Once per
    /// cluster, as RabbitMQ does on a fresh node: deleting them afterwards
    /// sticks.
    #[serde(default)]
    pub initialized: bool,
    /// Users by name.
    #[serde(default)]
    pub users: BTreeMap<String, UserState>,
}

/// One user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserState {
    /// The log index that created it: a user deleted and created again is
    /// another user (0: created before this was recorded).
    #[serde(default)]
    pub since: u64,
    pub credential: Credential,
    /// Free-form tags, as RabbitMQ's (`administrator`, `monitoring`, ...).
    #[serde(default)]
    pub tags: BTreeSet<String>,
    /// What the user may do in each virtual host it may use.
    #[serde(default)]
    pub permissions: BTreeMap<String, Permission>,
}

/// A user's permissions in one virtual host: RabbitMQ's configure, write and
/// read patterns (regular expressions over resource names). Only `.*`, all
/// resources, is granted today; holding one grants use of the virtual host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    pub configure: String,
    pub write: String,
    pub read: String,
}

impl Permission {
    /// Every resource of the virtual host.
    pub fn full() -> Permission {
        Permission {
            configure: ".*".to_owned(),
            write: ".*".to_owned(),
            read: ".*".to_owned(),
        }
    }
}

/// The longest user or virtual host name (an AMQP short string).
pub const MAX_NAME_BYTES: usize = 255;

/// A change to users and permissions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessCommand {
    /// Once per image: creates `vhost` and `user` with full permissions on it.
    /// A later `Initialize` changes nothing.
    Initialize {
        user: String,
        credential: Credential,
        vhost: String,
    },
    /// Creates a user, or replaces an existing user's credential and tags
    /// (its permissions are kept).
    PutUser {
        name: String,
        credential: Credential,
        tags: BTreeSet<String>,
    },
    /// Removes a user; RESOURCE_NOT_FOUND when there is none.
    DeleteUser { name: String },
    /// Grants a user a virtual host; RESOURCE_NOT_FOUND when either is missing.
    SetPermission {
        user: String,
        vhost: String,
        permission: Permission,
    },
    /// Withdraws a user's virtual host (missing is fine).
    ClearPermission { user: String, vhost: String },
}

/// A user or virtual host name the quorum accepts.
pub fn validate_name(what: &str, name: &str) -> Result<(), CommandError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(CommandError::InvalidRequest(format!(
            "{what} name must be 1 to {MAX_NAME_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

impl MetadataImage {
    /// May `user` use `vhost`? (The vhost must exist too.)
    pub fn may_use_vhost(&self, user: &str, vhost: &str) -> bool {
        self.amqp.vhosts.contains_key(vhost)
            && self
                .access
                .users
                .get(user)
                .is_some_and(|u| u.permissions.contains_key(vhost))
    }

    /// A virtual host is gone: nobody holds permissions on it any more.
    pub(crate) fn forget_permissions_on(&mut self, vhost: &str) {
        for u in self.access.users.values_mut() {
            u.permissions.remove(vhost);
        }
    }

    pub(crate) fn apply_access(&mut self, index: u64, cmd: &AccessCommand) -> CommandResult {
        match cmd {
            AccessCommand::Initialize {
                user,
                credential,
                vhost,
            } => {
                if self.access.initialized {
                    return Ok(CommandOutput::Done);
                }
                validate_name("user", user)?;
                validate_name("vhost", vhost)?;
                self.access.initialized = true;
                self.amqp.vhosts.entry(vhost.clone()).or_default();
                let u = self
                    .access
                    .users
                    .entry(user.clone())
                    .or_insert_with(|| UserState {
                        since: index,
                        credential: credential.clone(),
                        tags: BTreeSet::from(["administrator".to_owned()]),
                        permissions: BTreeMap::new(),
                    });
                u.permissions.insert(vhost.clone(), Permission::full());
                Ok(CommandOutput::Done)
            }
            AccessCommand::PutUser {
                name,
                credential,
                tags,
            } => {
                validate_name("user", name)?;
                match self.access.users.get_mut(name) {
                    Some(u) => {
                        u.credential = credential.clone();
                        u.tags = tags.clone();
                    }
                    None => {
                        self.access.users.insert(
                            name.clone(),
                            UserState {
                                since: index,
                                credential: credential.clone(),
                                tags: tags.clone(),
                                permissions: BTreeMap::new(),
                            },
                        );
                    }
                }
                Ok(CommandOutput::Done)
            }
            AccessCommand::DeleteUser { name } => {
                self.access
                    .users
                    .remove(name)
                    .ok_or_else(|| CommandError::NotFound(format!("no user '{name}'")))?;
                Ok(CommandOutput::Done)
            }
            AccessCommand::SetPermission {
                user,
                vhost,
                permission,
            } => {
                if !self.amqp.vhosts.contains_key(vhost) {
                    return Err(CommandError::NotFound(format!("no vhost '{vhost}'")));
                }
                let u = self
                    .access
                    .users
                    .get_mut(user)
                    .ok_or_else(|| CommandError::NotFound(format!("no user '{user}'")))?;
                u.permissions.insert(vhost.clone(), permission.clone());
                Ok(CommandOutput::Done)
            }
            AccessCommand::ClearPermission { user, vhost } => {
                if let Some(u) = self.access.users.get_mut(user) {
                    u.permissions.remove(vhost);
                }
                Ok(CommandOutput::Done)
            }
        }
    }
}
