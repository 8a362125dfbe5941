//! W3C trace context: the `traceparent` that links the spans of one change
//! across tasks and processes.
//!
//! A command's span context is stored in its events' metadata (and so in
//! the relay's NATS `traceparent` header, and in the Redis change feed), and
//! every later stage (relay publish, projector apply, change-feed fan-out,
//! subscription delivery) opens its span as a child of the context it
//! received: one trace shows a mutation from the API to the subscriber that
//! saw its effect.
//!
//! The helpers read and set the OpenTelemetry context of `tracing` spans
//! (via `tracing-opentelemetry`). Without that layer installed (tests,
//! embedding programs) spans have no context: [`current`] is `None` and
//! nothing breaks. Stages that fan out per event open a span only for
//! contexts marked *sampled*, and only in a process that exports spans
//! ([`follow`], [`set_recording`]): other spans would be recorded nowhere
//! and only cost. Where no span is opened, a stage passes the sampled
//! context it received on, so the trace continues in later processes.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Whether this process exports sampled spans (see [`set_recording`]).
static RECORDING: AtomicBool = AtomicBool::new(false);

/// Declares whether this process exports sampled spans; set once by the
/// telemetry set-up. Until then (and without export) [`follow`] opens no
/// spans.
pub fn set_recording(recording: bool) {
    RECORDING.store(recording, Ordering::Relaxed);
}

/// Whether this process exports sampled spans.
pub fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

/// A span for a step of a command (loading, deciding, appending), made by
/// `make` only in a process that exports spans; elsewhere a disabled span.
/// A command's own span is always opened (its fields give its logs their
/// context); the steps' spans would be recorded nowhere and cost as much
/// again — creating, entering and closing a span, and the log layer
/// formatting its fields, is a fifth of a command's CPU.
pub fn step(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if recording() {
        make()
    } else {
        tracing::Span::none()
    }
}

/// Parses a W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`);
/// `None` unless it is valid (known layout, non-zero ids).
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    // Version 00 has exactly four fields; later versions may append more.
    let later = parts.next().is_some();
    if version.len() != 2
        || version.eq_ignore_ascii_case("ff")
        || (version == "00" && later)
        || trace_id.len() != 32
        || span_id.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    u8::from_str_radix(version, 16).ok()?;
    let context = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

/// Formats a span context as a `traceparent`; `None` if it is invalid.
pub fn format(context: &SpanContext) -> Option<String> {
    context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        )
    })
}

/// Whether `traceparent` is valid and marked sampled.
pub fn sampled(traceparent: Option<&str>) -> bool {
    traceparent
        .and_then(parse)
        .is_some_and(|context| context.is_sampled())
}

/// The `traceparent` of `span`, if it has an OpenTelemetry context.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    format(span.context().span().span_context())
}

/// The `traceparent` of the OpenTelemetry context current on this thread
/// (the innermost entered span that has one): what a span created now
/// takes as its parent.
pub fn current() -> Option<String> {
    format(opentelemetry::Context::current().span().span_context())
}

/// Makes `span` a child of `traceparent`; false (and nothing changed) if
/// it is not a valid context. Call it before the span is first entered.
pub fn continue_from(span: &tracing::Span, traceparent: &str) -> bool {
    let Some(context) = parse(traceparent) else {
        return false;
    };
    let parent = opentelemetry::Context::new().with_remote_span_context(context);
    span.set_parent(parent).is_ok()
}

/// A span made by `make` as a child of `traceparent`, when that is a
/// sampled context and this process exports spans; `None` otherwise
/// (nothing is created).
pub fn follow(
    traceparent: Option<&str>,
    make: impl FnOnce() -> tracing::Span,
) -> Option<tracing::Span> {
    if !recording() {
        return None;
    }
    let context = parse(traceparent?)?;
    if !context.is_sampled() {
        return None;
    }
    let span = make();
    let parent = opentelemetry::Context::new().with_remote_span_context(context);
    let _ = span.set_parent(parent);
    Some(span)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparents_round_trip() {
        let context = parse(SAMPLED);
        assert!(context.as_ref().is_some_and(SpanContext::is_sampled));
        assert_eq!(context.and_then(|c| format(&c)).as_deref(), Some(SAMPLED));
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(parse(unsampled).is_some());
        assert!(!sampled(Some(unsampled)));
        assert!(sampled(Some(SAMPLED)));
        assert!(!sampled(None));
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_some());
    }

    #[test]
    fn without_the_layer_spans_have_no_context() {
        let span = tracing::info_span!("untraced");
        assert_eq!(traceparent_of(&span), None);
        assert!(follow(Some("bad"), || tracing::info_span!("never")).is_none());
    }
}
