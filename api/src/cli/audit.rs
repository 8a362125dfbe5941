//! `neurectomy audit`: the sealed log (README, "Sealed audit log").
//!
//! - `audit verify [--tenant T] [--from P] [--to P]`: re-derives every
//!   leaf, root, chain link and signature from the store and compares the
//!   seals with their JetStream copies; exit 0 when clean, 1 with the first
//!   position (or seal) that does not match and what differs.
//! - `audit erase --tenant T (--stream S | --event E [--field F]… |
//!   --actor A)`: replaces personal values by their digests, keeping every
//!   seal valid (README, "Erasure").
//! - `audit keygen`: a new sealing key (secret and public).
//! - `audit key`: the public keys seals are checked against.

use anyhow::Context as _;
use clap::{Args, Subcommand};
use commands::seal::key::SealKey;
use commands::seal::verify::{verify, VerifyOptions};

use crate::settings::Settings;
use crate::startup::connect;

/// Options of `audit`.
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// `audit` sub-commands.
#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// Check the sealed log against the store: every event, seal, chain
    /// link and signature, and the seals' JetStream copies.
    Verify(VerifyArgs),
    /// Erase personal data: replace the values by their digests (every seal
    /// stays valid), as an audited `PersonalDataErased` event.
    Erase(EraseArgs),
    /// Print a new sealing key: the secret (for NEURECTOMY_SEAL_KEY) and
    /// its public key.
    Keygen,
    /// Print the public keys seals are checked against (the sealing key's
    /// and NEURECTOMY_SEAL_TRUSTED_KEYS).
    Key,
}

/// Options of `audit verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// Only this tenant's events (seals' signatures and chain still all).
    #[arg(long)]
    pub tenant: Option<String>,
    /// From the seal holding this position.
    #[arg(long)]
    pub from: Option<i64>,
    /// Up to the seal holding this position.
    #[arg(long)]
    pub to: Option<i64>,
    /// Do not compare with the seal stream's copies (NATS not needed).
    #[arg(long)]
    pub no_copies: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Options of `audit erase`: a tenant and exactly one of `--stream`,
/// `--event`, `--actor`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("scope").required(true).args(["stream", "event", "actor"])))]
pub struct EraseArgs {
    /// Whose events.
    #[arg(long)]
    pub tenant: String,
    /// Every personal field of every event of this stream
    /// (agent-<uuid>, task-<uuid>, workflow-<uuid>).
    #[arg(long)]
    pub stream: Option<String>,
    /// The personal fields (data and actor) of this event.
    #[arg(long)]
    pub event: Option<uuid::Uuid>,
    /// With --event: only these fields (repeat; `actor` for the actor).
    #[arg(long = "field", requires = "event")]
    pub fields: Vec<String>,
    /// The actor of every event of the tenant by this actor.
    #[arg(long)]
    pub actor: Option<String>,
    /// Who erases (recorded as the erasure's actor).
    #[arg(long, default_value = "neurectomy-cli")]
    pub by: String,
    /// The request's id: running again with the same id answers the same
    /// erasure (default: a new one).
    #[arg(long)]
    pub command_id: Option<uuid::Uuid>,
}

/// Runs `audit <command>`.
pub async fn run(settings: &Settings, args: AuditArgs) -> anyhow::Result<()> {
    match args.command {
        AuditCommand::Keygen => {
            let key = SealKey::generate();
            println!(
                "secret key (NEURECTOMY_SEAL_KEY; keep it secret): {}",
                key.secret_text()
            );
            println!("public key: {}", key.public().text());
            println!("key id: {}", key.id());
            Ok(())
        }
        AuditCommand::Key => {
            let keys = settings.seal_trusted()?;
            if keys.is_empty() {
                anyhow::bail!(
                    "no seal key is configured: set NEURECTOMY_SEAL_KEY (`neurectomy audit keygen` makes one) or NEURECTOMY_SEAL_TRUSTED_KEYS"
                );
            }
            for key in keys {
                println!("{} {}", key.id(), key.text());
            }
            Ok(())
        }
        AuditCommand::Verify(args) => run_verify(settings, args).await,
        AuditCommand::Erase(args) => run_erase(settings, args).await,
    }
}

async fn run_erase(settings: &Settings, args: EraseArgs) -> anyhow::Result<()> {
    use commands::erasure::{erase, Request, Scope};
    let scope = match (args.stream, args.event, args.actor) {
        (Some(stream), None, None) => Scope::Stream(stream),
        (None, Some(event_id), None) => Scope::Event {
            event_id,
            fields: args.fields,
        },
        (None, None, Some(actor)) => Scope::Actor(actor),
        _ => anyhow::bail!("name exactly one of --stream, --event and --actor"),
    };
    let pool = connect::connect_database(settings).await?;
    let store = commands::EventStore::new(pool);
    let request = Request {
        tenant: args.tenant.clone(),
        scope,
        actor: args.by,
        command_id: args.command_id.unwrap_or_else(uuid::Uuid::new_v4),
        causation_id: None,
        correlation_id: None,
    };
    let erased = erase(&store, &request).await?;
    match &erased.event {
        None => println!(
            "nothing to erase: the events in scope hold no personal value any more (tenant `{}`)",
            args.tenant
        ),
        Some(event) => println!(
            "{}erased {} value(s) of {} event(s) of tenant `{}`; {} aggregate(s) show digests now; erasure event {} at position {} ({})",
            if erased.replayed { "already " } else { "" },
            erased.values,
            erased.events,
            args.tenant,
            erased.aggregates,
            event.event_id,
            event.position,
            event.stream_id
        ),
    }
    Ok(())
}

async fn run_verify(settings: &Settings, args: VerifyArgs) -> anyhow::Result<()> {
    let trusted = settings.seal_trusted()?;
    if trusted.is_empty() {
        anyhow::bail!(
            "no key to check seals with: set NEURECTOMY_SEAL_KEY or NEURECTOMY_SEAL_TRUSTED_KEYS (the public keys the log was sealed with)"
        );
    }
    let pool = connect::connect_database(settings).await?;
    let sealing = settings.sealer_config();
    let nats = if args.no_copies {
        None
    } else {
        Some(
            connect::connect_nats(settings)
                .await
                .context("connecting to NATS to read the seals' copies (--no-copies skips them)")?,
        )
    };
    let jetstream = nats.map(async_nats::jetstream::new);
    let options = VerifyOptions {
        log: sealing.log.clone(),
        tenant: args.tenant.clone(),
        from: args.from,
        to: args.to,
        trusted,
        copies: jetstream.as_ref().map(|_| sealing.stream.clone()),
        most_seals: None,
    };
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} seals, {msg} events [{elapsed_precise}, {eta} left]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    };
    let report = verify(&pool, jetstream.as_ref(), &options, |p| {
        bar.set_length(p.of);
        bar.set_position(p.seals);
        bar.set_message(p.events.to_string());
    })
    .await?;
    bar.finish_and_clear();
    let scope = args
        .tenant
        .as_deref()
        .map_or(String::new(), |t| format!(" of tenant `{t}`"));
    match &report.problem {
        None => {
            println!(
                "clean: {} seal(s), {} event(s){scope} verified through position {}",
                report.seals, report.events, report.sealed_to
            );
            if report.unsealed > 0 {
                println!(
                    "unsealed: {} event(s){scope} after position {} are in the open block, not yet sealed (not verified)",
                    report.unsealed, report.sealed_to
                );
            }
            if report.copies_missing > 0 {
                println!(
                    "note: {} seal(s) have no copy on the seal stream yet (the sealer copies them when JetStream is reachable)",
                    report.copies_missing
                );
            }
            Ok(())
        }
        Some(problem) => {
            println!("{problem}");
            println!(
                "checked before it: {} seal(s), {} event(s){scope}",
                report.seals, report.events
            );
            anyhow::bail!("the sealed log does not verify ({})", problem.kind())
        }
    }
}
