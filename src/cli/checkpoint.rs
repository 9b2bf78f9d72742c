//! `driftd checkpoint show|reset|set RESOURCE`: the way back when upstream's
//! change feed no longer serves the stored checkpoint (it answers 410, or
//! a status `incremental.expired_statuses` names), instead of every
//! incremental run failing forever.

use anyhow::Context;

use crate::config::Settings;
use crate::report;
use crate::store::Ledger;

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Print RESOURCE's stored checkpoint (none: the next run starts from
    /// incremental.initial).
    Show { resource: String },
    /// Forget RESOURCE's checkpoint: the next incremental run reads the
    /// feed from incremental.initial.
    Reset { resource: String },
    /// Store VALUE as RESOURCE's checkpoint: the feed's current revision,
    /// after a full pass brought the table up to it.
    Set { resource: String, value: String },
}

pub async fn run(settings: &Settings, action: Action) -> anyhow::Result<i32> {
    let resource = match &action {
        Action::Show { resource } | Action::Reset { resource } | Action::Set { resource, .. } => {
            resource
        }
    };
    let res = settings.resource(resource)?;
    let Some(inc) = &res.incremental else {
        anyhow::bail!(
            "resource `{resource}` has no [resources.{resource}.incremental]: it keeps no checkpoint"
        );
    };
    // The request is checked before the database is opened.
    let store = crate::daemon::open_store(settings).await?;
    match &action {
        Action::Show { .. } => {
            let stored = store.checkpoint(resource).await?;
            let line = match stored {
                Some(v) => serde_json::json!({"resource": resource, "checkpoint": v}),
                None => {
                    serde_json::json!({"resource": resource, "checkpoint": null, "next_run_from": inc.initial})
                }
            };
            super::emit(&format!("{line}\n"))?;
        }
        Action::Reset { .. } => {
            store
                .set_checkpoint(resource, None)
                .await
                .context("reset the checkpoint")?;
            let line = serde_json::json!({"resource": resource, "checkpoint": null, "next_run_from": inc.initial});
            super::emit(&format!("{line}\n"))?;
        }
        Action::Set { value, .. } => {
            if value.trim().is_empty() {
                anyhow::bail!("the checkpoint value is empty");
            }
            store
                .set_checkpoint(resource, Some(value))
                .await
                .context("store the checkpoint")?;
            let line = serde_json::json!({"resource": resource, "checkpoint": value});
            super::emit(&format!("{line}\n"))?;
        }
    }
    Ok(report::exit::OK)
}
