//! The actions on secrets (authorized already by `access`): each on the organization the
//! caller acts in, so another organization's secret is answered as a missing one.

use super::{Action, Caller, Reply, VmError, VmService};
use crate::secrets::Secrets;

impl VmService {
    /// The secrets of every organization, for the gateway's [`Secrets::resolve`].
    pub fn secrets(&self) -> &Secrets {
        &self.inner.secrets
    }

    pub(super) async fn secret_action(
        &self,
        caller: &Caller,
        action: Action,
    ) -> Result<Reply, VmError> {
        let secrets = self.secrets();
        match action {
            Action::SetSecret { name, value } => {
                let org = caller.owning_org()?;
                let by = caller.principal.to_string();
                let (info, created) = secrets.set(&org, &name, &value, &by).await?;
                Ok(Reply::Secret { info, created })
            }
            Action::ListSecrets => Ok(Reply::Secrets(secrets.list(&caller.owning_org()?).await?)),
            Action::DeleteSecret(name) => {
                secrets.delete(&caller.owning_org()?, &name).await?;
                Ok(Reply::Deleted)
            }
            Action::RotateMasterKey => Ok(Reply::MasterKeyRotated(secrets.rotate().await?)),
            other => Err(VmError::Task(format!(
                "action {} reached the secrets handler",
                other.name()
            ))),
        }
    }
}
