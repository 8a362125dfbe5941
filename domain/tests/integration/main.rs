//! The domain's tests beyond its unit tests, in one binary: property tests
//! of the aggregates over random command sequences ([`properties`]) and the
//! JSON Schemas in `event-schemas/` against the events the domain writes
//! ([`schemas`]); [`support`] holds what both use. Pure computation: nothing
//! is shared between tests but read-only data (the schemas, loaded once).

mod properties;
mod schemas;
mod support;
