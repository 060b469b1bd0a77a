//! Authorization, decided here for every action of every front end, on its [`Caller`]: host
//! admins (and the operator, and hearthd itself) see everything; a user sees and acts on the
//! things of the organization it acts in, and nothing else. A VM, network or volume of another
//! organization is answered exactly as one that does not exist. Also the actions on users,
//! organizations, keys and the audit log.

use hearth_api::{
    ApiKey, CreateApiKeyRequest, CreateUserRequest, CreatedApiKey, ErrorCode, Org, OrgMember,
    OrgMembership, Role, SshKey, User, Whoami,
};

use super::{Action, Caller, Principal, Reply, VmError, VmService};
use crate::access::{self, Access};
use crate::store::StoreError;
use crate::store::access::{ApiKeyRecord, UserRecord};

fn denied(what: &str) -> VmError {
    VmError::access(
        ErrorCode::PermissionDenied,
        format!("{what} needs a host admin (auth.admin_users, or a user made with --admin)"),
    )
}

fn no_user(name: &str) -> VmError {
    VmError::access(ErrorCode::UserNotFound, format!("no user {name:?}"))
}

fn no_org(name: &str) -> VmError {
    VmError::access(
        ErrorCode::OrgNotFound,
        format!("no organization {name:?} that you belong to"),
    )
}

/// What an action needs of its caller beyond seeing the VM it names, if any.
#[derive(Debug)]
pub(super) struct Needs {
    pub vm: Option<String>,
    pub check: Check,
}

#[derive(Debug)]
pub(super) enum Check {
    /// A host admin; the text names what needs one.
    Admin(&'static str),
    /// An organization to make it in, and to see the networks and volumes it names.
    Create {
        networks: Vec<String>,
        volumes: Vec<String>,
    },
    Network(String),
    Volume(String),
    /// The user itself or a host admin.
    SelfOrAdmin(String),
    /// A user (the operator is none).
    User,
    /// An owner of the organization, or a host admin.
    OrgOwner(String),
    /// An owner of the organization the caller acts in, or a host admin; the text names what
    /// needs one.
    OwnerHere(&'static str),
    /// A member of some organization, to act in it.
    Member,
    /// Only what every caller may (lists show what it may see; keys check their owner).
    Nothing,
}

impl Needs {
    /// What `action` needs, read before it runs (an action is not `Sync`, so it is not held
    /// across the checks' awaits).
    pub(super) fn of(action: &Action) -> Needs {
        let check = match action {
            Action::Health => Check::Admin("status"),
            Action::Metrics { .. } => Check::Admin("the metrics"),
            Action::Audit(_) => Check::Admin("the audit log"),
            Action::ListUsers | Action::CreateUser(_) | Action::DeleteUser(_) => {
                Check::Admin("managing users")
            }
            Action::CreateVm(req) => Check::Create {
                networks: req.networks.clone(),
                volumes: req.volumes.iter().map(|v| v.name.clone()).collect(),
            },
            Action::Import(_) | Action::CreateNetwork(_) | Action::CreateVolume(_) => {
                Check::Create {
                    networks: Vec::new(),
                    volumes: Vec::new(),
                }
            }
            Action::DeleteNetwork(name) => Check::Network(name.clone()),
            Action::SetMembership { network, .. } => Check::Network(network.clone()),
            Action::DeleteVolume(volume)
            | Action::AttachVolume { volume, .. }
            | Action::DetachVolume { volume, .. } => Check::Volume(volume.clone()),
            Action::ListSshKeys(user)
            | Action::AddSshKey { user, .. }
            | Action::RemoveSshKey { user, .. } => Check::SelfOrAdmin(user.clone()),
            Action::CreateApiKey(CreateApiKeyRequest {
                user: Some(user), ..
            }) => Check::SelfOrAdmin(user.clone()),
            Action::CreateApiKey(_) | Action::SwitchOrg(_) => Check::User,
            Action::SetMember { org, .. } | Action::RemoveMember { org, .. } => {
                Check::OrgOwner(org.clone())
            }
            Action::SetSecret { .. } | Action::DeleteSecret(_) => {
                Check::OwnerHere("setting and deleting secrets")
            }
            Action::ListSecrets => Check::Member,
            Action::RotateMasterKey => Check::Admin("rotating the master key of secrets"),
            _ => Check::Nothing,
        };
        Needs {
            vm: action.vm().map(str::to_owned),
            check,
        }
    }
}

impl VmService {
    pub fn access(&self) -> &Access {
        &self.inner.access
    }

    /// The user behind `caller`, if it is one.
    fn user_of(caller: &Caller) -> Option<&str> {
        match &caller.principal {
            Principal::User(identity) => Some(&identity.user),
            Principal::Operator | Principal::System => None,
        }
    }

    /// Whether `caller` may see things of organization `org`.
    fn sees(caller: &Caller, org: &str) -> bool {
        caller.is_admin() || caller.org() == Some(org)
    }

    /// Fails as a missing VM would unless `caller` may see VM `name`.
    async fn vm_visible(&self, caller: &Caller, name: &str) -> Result<(), VmError> {
        if caller.is_admin() {
            return Ok(());
        }
        match self.inner.store.get_vm(name).await {
            Ok(vm) if Self::sees(caller, &vm.org) => Ok(()),
            // The same error as for a VM that does not exist.
            Ok(_) => Err(StoreError::NotFound(name.to_owned()).into()),
            Err(e) => Err(e.into()),
        }
    }

    async fn network_visible(&self, caller: &Caller, name: &str) -> Result<(), VmError> {
        if caller.is_admin() {
            return Ok(());
        }
        match self.inner.store.network_org(name).await? {
            Some(org) if Self::sees(caller, &org) => Ok(()),
            _ => Err(StoreError::NoNetwork(name.to_owned()).into()),
        }
    }

    async fn volume_visible(&self, caller: &Caller, name: &str) -> Result<(), VmError> {
        if caller.is_admin() {
            return Ok(());
        }
        match self.inner.store.volume_org(name).await? {
            Some(org) if Self::sees(caller, &org) => Ok(()),
            _ => Err(StoreError::NoVolume(name.to_owned()).into()),
        }
    }

    /// Whether `caller` may ask for user `user`'s keys: itself, or a host admin.
    fn self_or_admin(caller: &Caller, user: &str) -> Result<(), VmError> {
        if caller.is_admin() || Self::user_of(caller) == Some(user) {
            Ok(())
        } else {
            Err(no_user(user))
        }
    }

    /// Decides whether `caller` may do what `needs` says (made of the action before it runs).
    /// What lists show is narrowed afterwards by [`VmService::visible`].
    pub(super) async fn authorize(&self, caller: &Caller, needs: Needs) -> Result<(), VmError> {
        if let Some(vm) = &needs.vm {
            self.vm_visible(caller, vm).await?;
        }
        match needs.check {
            Check::Admin(what) => caller.is_admin().then_some(()).ok_or_else(|| denied(what)),
            Check::Create { networks, volumes } => {
                caller.owning_org()?;
                for net in &networks {
                    self.network_visible(caller, net).await?;
                }
                for volume in &volumes {
                    self.volume_visible(caller, volume).await?;
                }
                Ok(())
            }
            Check::Network(name) => self.network_visible(caller, &name).await,
            Check::Volume(name) => self.volume_visible(caller, &name).await,
            Check::SelfOrAdmin(user) => Self::self_or_admin(caller, &user),
            Check::User => match caller.principal {
                Principal::User(_) => Ok(()),
                Principal::Operator | Principal::System => Err(VmError::access(
                    ErrorCode::InvalidRequest,
                    "the local operator is no user: name one (--user) or use a user's key",
                )),
            },
            Check::OrgOwner(org) => self.owner_or_admin(caller, &org).await,
            Check::OwnerHere(what) => {
                let org = caller.owning_org()?;
                let owner = matches!(&caller.principal,
                    Principal::User(identity) if identity.role == Some(Role::Owner));
                if caller.is_admin() || owner {
                    Ok(())
                } else {
                    Err(VmError::access(
                        ErrorCode::PermissionDenied,
                        format!(
                            "{what} of organization {org:?} needs one of its owners or a host admin"
                        ),
                    ))
                }
            }
            Check::Member => caller.owning_org().map(drop),
            Check::Nothing => Ok(()),
        }
    }

    /// Fails unless `caller` owns organization `org` or is a host admin.
    async fn owner_or_admin(&self, caller: &Caller, org: &str) -> Result<(), VmError> {
        if caller.is_admin() {
            return match self.inner.store.org_created_at(org).await? {
                Some(_) => Ok(()),
                None => Err(no_org(org)),
            };
        }
        let user = Self::user_of(caller).unwrap_or_default();
        match self
            .inner
            .store
            .memberships(user)
            .await?
            .into_iter()
            .find(|(o, _)| o == org)
        {
            Some((_, Role::Owner)) => Ok(()),
            Some((_, Role::Member)) => Err(VmError::access(
                ErrorCode::PermissionDenied,
                format!("managing the members of {org:?} needs one of its owners"),
            )),
            None => Err(no_org(org)),
        }
    }

    /// What of a list `caller` may see.
    pub(super) async fn visible(&self, caller: &Caller, reply: Reply) -> Result<Reply, VmError> {
        if caller.is_admin() {
            return Ok(reply);
        }
        let sees = |org: &str| Self::sees(caller, org);
        Ok(match reply {
            Reply::Vms(mut vms) => {
                vms.retain(|v| sees(&v.org));
                Reply::Vms(vms)
            }
            Reply::Networks(mut nets) => {
                nets.retain(|n| sees(&n.org));
                Reply::Networks(nets)
            }
            Reply::Volumes(mut volumes) => {
                volumes.retain(|v| sees(&v.org));
                Reply::Volumes(volumes)
            }
            Reply::Stats(mut stats) => {
                let mine: Vec<String> = self
                    .inner
                    .store
                    .list_vms()
                    .await?
                    .vms
                    .into_iter()
                    .filter(|v| sees(&v.org))
                    .map(|v| v.name)
                    .collect();
                stats.retain(|s| mine.contains(&s.name));
                Reply::Stats(stats)
            }
            other => other,
        })
    }

    /// The actions on identities and the audit log (authorized already).
    pub(super) async fn access_action(
        &self,
        caller: &Caller,
        action: Action,
    ) -> Result<Reply, VmError> {
        let store = &self.inner.store;
        match action {
            Action::Whoami => Ok(Reply::Whoami(self.whoami(caller).await?)),
            Action::SwitchOrg(org) => {
                let user = Self::user_of(caller).unwrap_or_default().to_owned();
                if !store
                    .memberships(&user)
                    .await?
                    .iter()
                    .any(|(o, _)| *o == org)
                {
                    return Err(no_org(&org));
                }
                if let Principal::User(identity) = &caller.principal
                    && let access::Via::ApiKey(id) = &identity.via
                    && identity.org.as_deref() != Some(org.as_str())
                {
                    return Err(VmError::access(
                        ErrorCode::InvalidRequest,
                        format!(
                            "API key {id} acts in organization {:?} only: make a key for {org:?} with `hearth key create --org {org}` and log in with it",
                            identity.org.as_deref().unwrap_or_default()
                        ),
                    ));
                }
                store.set_active_org(&user, &org).await?;
                let identity = self
                    .access()
                    .resolve(&user, None, access::Via::SshSession)
                    .await?;
                let who = Caller::user(identity, caller.source.clone(), caller.request_id.clone());
                Ok(Reply::Whoami(self.whoami(&who).await?))
            }
            Action::ListUsers => {
                let mut users = Vec::new();
                for u in store.list_users().await? {
                    users.push(self.user_api(u).await?);
                }
                Ok(Reply::Users(users))
            }
            Action::CreateUser(req) => Ok(Reply::User(self.create_user(req).await?)),
            Action::DeleteUser(name) => {
                if Self::user_of(caller) == Some(name.as_str()) {
                    return Err(VmError::access(
                        ErrorCode::InvalidRequest,
                        "you cannot delete yourself; another admin can",
                    ));
                }
                if store.delete_user(&name).await? {
                    Ok(Reply::Deleted)
                } else {
                    Err(no_user(&name))
                }
            }
            Action::ListSshKeys(user) => {
                store.get_user(&user).await?.ok_or_else(|| no_user(&user))?;
                let keys = store.list_ssh_keys(Some(&user)).await?;
                Ok(Reply::SshKeys(keys.into_iter().map(ssh_key_api).collect()))
            }
            Action::AddSshKey { user, public_key } => {
                store.get_user(&user).await?.ok_or_else(|| no_user(&user))?;
                let key = access::parse_public_key(&public_key)?;
                let record = Access::ssh_key_record(&user, &key);
                store.add_ssh_key(&record).await.map_err(|e| match e {
                    StoreError::Taken(..) => VmError::access(
                        ErrorCode::NameTaken,
                        format!("SSH key {} is already added (to a user)", key.fingerprint),
                    ),
                    other => other.into(),
                })?;
                Ok(Reply::SshKey(ssh_key_api(record)))
            }
            Action::RemoveSshKey { user, fingerprint } => {
                if store.remove_ssh_key(&user, &fingerprint).await? {
                    Ok(Reply::Deleted)
                } else {
                    Err(VmError::access(
                        ErrorCode::KeyNotFound,
                        format!("user {user:?} has no SSH key {fingerprint:?}"),
                    ))
                }
            }
            Action::ListApiKeys => {
                let user = Self::user_of(caller);
                let keys = if caller.is_admin() {
                    store.list_api_keys(None).await?
                } else {
                    store.list_api_keys(user).await?
                };
                Ok(Reply::ApiKeys(keys.into_iter().map(api_key_api).collect()))
            }
            Action::CreateApiKey(req) => Ok(Reply::CreatedApiKey(
                self.create_api_key(caller, req).await?,
            )),
            Action::RevokeApiKey(id) => {
                let mine = store.api_key(&id).await?.filter(|k| {
                    caller.is_admin() || Self::user_of(caller) == Some(k.user.as_str())
                });
                match mine {
                    Some(_) if store.delete_api_key(&id).await? => Ok(Reply::Deleted),
                    _ => Err(VmError::access(
                        ErrorCode::KeyNotFound,
                        format!("no API key {id:?} of yours"),
                    )),
                }
            }
            Action::ListOrgs => {
                let mine: Option<Vec<String>> = match Self::user_of(caller) {
                    Some(user) if !caller.is_admin() => Some(
                        store
                            .memberships(user)
                            .await?
                            .into_iter()
                            .map(|(o, _)| o)
                            .collect(),
                    ),
                    _ => None,
                };
                let mut orgs = Vec::new();
                for (name, created_at) in store.list_orgs().await? {
                    if mine.as_ref().is_none_or(|m| m.contains(&name)) {
                        orgs.push(self.org_api(name, created_at).await?);
                    }
                }
                Ok(Reply::Orgs(orgs))
            }
            Action::CreateOrg(name) => {
                access::check_name("name", &name)?;
                let Some(user) = Self::user_of(caller) else {
                    return Err(VmError::access(
                        ErrorCode::InvalidRequest,
                        "an organization needs a user as its owner: create it with a user's key",
                    ));
                };
                store.create_org(&name, user).await?;
                let created_at = store.org_created_at(&name).await?.unwrap_or_default();
                Ok(Reply::Org(self.org_api(name, created_at).await?))
            }
            Action::SetMember { org, user, role } => {
                store.get_user(&user).await?.ok_or_else(|| no_user(&user))?;
                store
                    .set_member(&org, &user, role.unwrap_or(Role::Member))
                    .await?;
                let created_at = store.org_created_at(&org).await?.unwrap_or_default();
                Ok(Reply::Org(self.org_api(org, created_at).await?))
            }
            Action::RemoveMember { org, user } => {
                if store.remove_member(&org, &user).await? {
                    let created_at = store.org_created_at(&org).await?.unwrap_or_default();
                    Ok(Reply::Org(self.org_api(org, created_at).await?))
                } else {
                    Err(VmError::access(
                        ErrorCode::UserNotFound,
                        format!("user {user:?} is not a member of {org:?}"),
                    ))
                }
            }
            Action::Audit(filter) => Ok(Reply::Audit(store.audit(&filter).await?)),
            other => Err(VmError::Task(format!(
                "action {} reached the access handler",
                other.name()
            ))),
        }
    }

    async fn whoami(&self, caller: &Caller) -> Result<Whoami, VmError> {
        Ok(match &caller.principal {
            Principal::User(identity) => Whoami {
                user: identity.user.clone(),
                admin: identity.admin,
                org: identity.org.clone(),
                role: identity.role,
                via: identity.via.as_str().into(),
                orgs: memberships(self.inner.store.memberships(&identity.user).await?),
            },
            other => Whoami {
                user: other.to_string(),
                admin: true,
                org: Some(access::DEFAULT_ORG.into()),
                role: None,
                via: "local".into(),
                orgs: Vec::new(),
            },
        })
    }

    async fn user_api(&self, u: UserRecord) -> Result<User, VmError> {
        let store = &self.inner.store;
        let keys = store.list_ssh_keys(Some(&u.name)).await?.len();
        Ok(User {
            admin: self.access().is_admin(&u),
            orgs: memberships(store.memberships(&u.name).await?),
            ssh_keys: u32::try_from(keys).unwrap_or(u32::MAX),
            name: u.name,
            active_org: u.active_org,
            created_at: u.created_at,
        })
    }

    async fn org_api(&self, name: String, created_at: String) -> Result<Org, VmError> {
        let members = self.inner.store.org_members(&name).await?;
        Ok(Org {
            name,
            created_at,
            members: members
                .into_iter()
                .map(|(user, role)| OrgMember { user, role })
                .collect(),
        })
    }

    async fn create_user(&self, req: CreateUserRequest) -> Result<User, VmError> {
        access::check_user_name(&req.name)?;
        let key = req
            .ssh_key
            .as_deref()
            .map(access::parse_public_key)
            .transpose()?;
        let (org, new_org, role) = match &req.org {
            Some(org) => (org.clone(), false, req.role.unwrap_or(Role::Member)),
            None => (req.name.clone(), true, req.role.unwrap_or(Role::Owner)),
        };
        let user = UserRecord {
            name: req.name.clone(),
            admin: req.admin,
            active_org: Some(org.clone()),
            created_at: crate::store::now(),
        };
        let key = key.map(|k| Access::ssh_key_record(&req.name, &k));
        self.inner
            .store
            .create_user(&user, &org, new_org, role, key.as_ref())
            .await?;
        self.user_api(user).await
    }

    async fn create_api_key(
        &self,
        caller: &Caller,
        req: CreateApiKeyRequest,
    ) -> Result<CreatedApiKey, VmError> {
        let store = &self.inner.store;
        let user = match (&req.user, Self::user_of(caller)) {
            (Some(user), _) => user.clone(),
            (None, Some(me)) => me.to_owned(),
            (None, None) => {
                return Err(VmError::access(
                    ErrorCode::InvalidRequest,
                    "the local operator is no user: name one (--user)",
                ));
            }
        };
        store.get_user(&user).await?.ok_or_else(|| no_user(&user))?;
        let name = req.name.unwrap_or_else(|| "default".into());
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(VmError::access(
                ErrorCode::InvalidRequest,
                "name must be 1-64 printable characters",
            ));
        }
        let orgs = store.memberships(&user).await?;
        let org = match req.org {
            Some(org) => org,
            None if req.user.is_none() => caller.owning_org()?,
            None => store
                .get_user(&user)
                .await?
                .and_then(|u| u.active_org)
                .or_else(|| orgs.first().map(|(o, _)| o.clone()))
                .ok_or_else(|| {
                    VmError::access(
                        ErrorCode::InvalidRequest,
                        format!("user {user:?} belongs to no organization: add it to one first"),
                    )
                })?,
        };
        if !orgs.iter().any(|(o, _)| *o == org) {
            return Err(VmError::access(
                ErrorCode::OrgNotFound,
                format!("user {user:?} is not a member of organization {org:?}"),
            ));
        }
        let (id, key) = access::new_api_key();
        let record = ApiKeyRecord {
            id,
            user,
            org,
            name,
            hash: access::key_hash(&key),
            created_at: crate::store::now(),
        };
        store.insert_api_key(&record).await?;
        Ok(CreatedApiKey {
            key,
            api_key: api_key_api(record),
        })
    }
}

fn memberships(list: Vec<(String, Role)>) -> Vec<OrgMembership> {
    list.into_iter()
        .map(|(org, role)| OrgMembership { org, role })
        .collect()
}

fn ssh_key_api(k: crate::store::access::SshKeyRecord) -> SshKey {
    SshKey {
        kind: k
            .public_key
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .into(),
        fingerprint: k.fingerprint,
        comment: k.comment,
        user: k.user,
        created_at: k.created_at,
    }
}

fn api_key_api(k: ApiKeyRecord) -> ApiKey {
    ApiKey {
        id: k.id,
        name: k.name,
        user: k.user,
        org: k.org,
        created_at: k.created_at,
    }
}
