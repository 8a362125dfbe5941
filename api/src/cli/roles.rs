//! The sub-commands that run until stopped: each is an
//! [`Application`] with its roles.

use super::{AllArgs, ProjectArgs};
use crate::settings::Settings;
use crate::simulate::SimulateArgs;
use crate::startup::{Application, Roles};

/// `neurectomy serve`: the GraphQL API alone.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    Application::build(settings, Roles::api())
        .await?
        .run_until_stopped()
        .await
}

/// `neurectomy relay`: the outbox relay alone; standbys wait for the lock.
pub async fn relay(settings: Settings) -> anyhow::Result<()> {
    let roles = Roles {
        relay: true,
        ..Roles::default()
    };
    Application::build(settings, roles)
        .await?
        .run_until_stopped()
        .await
}

/// `neurectomy project`: the projectors, until a signal or until one stops
/// on an event it cannot apply.
pub async fn project(settings: Settings, args: ProjectArgs) -> anyhow::Result<()> {
    let roles = Roles {
        projectors: Some(args.only),
        ..Roles::default()
    };
    Application::build(settings, roles)
        .await?
        .run_until_stopped()
        .await
}

/// `neurectomy all`: migrations, the relay, the projectors, the API and,
/// with `--simulate`, the simulator, in one process.
pub async fn all(settings: Settings, args: AllArgs) -> anyhow::Result<()> {
    let roles = Roles::all(args.simulate.then_some(args.simulation));
    Application::build(settings, roles)
        .await?
        .run_until_stopped()
        .await
}

/// `neurectomy simulate`: the workload simulator as its own process, until
/// its duration ends or a signal.
pub async fn simulate(settings: Settings, args: SimulateArgs) -> anyhow::Result<()> {
    let roles = Roles {
        simulation: Some(args),
        ..Roles::default()
    };
    Application::build(settings, roles)
        .await?
        .run_until_stopped()
        .await
}
