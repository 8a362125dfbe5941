//! `neurectomy migrate`: create the database if missing, run the migrations.

use crate::settings::Settings;
use crate::startup::connect;

/// Creates the database if it is missing, then runs the migrations.
pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let pool = connect::migrated_pool(settings).await?;
    pool.close().await;
    Ok(())
}
