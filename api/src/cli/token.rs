//! `neurectomy token`: mint a JWT for local use.

use anyhow::Context as _;

use super::TokenArgs;
use crate::settings::Settings;
use crate::startup::connect;

/// Prints a token for local use.
pub fn run(settings: &Settings, args: &TokenArgs) -> anyhow::Result<()> {
    let auth = connect::authenticator(&settings.api)
        .context("minting needs the key the API verifies with")?;
    let token = auth
        .mint(&args.subject, &args.tenant, &args.roles, args.ttl)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{token}");
    Ok(())
}
