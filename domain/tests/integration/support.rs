//! What the property and schema tests share.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::strategy::{Strategy, ValueTree as _};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// Values of `strategy` drawn with a fixed seed: the same ones on every run,
/// for tests that check what a strategy reaches.
pub fn samples<S: Strategy>(strategy: S) -> impl Iterator<Item = S::Value> {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    std::iter::repeat_with(move || strategy.new_tree(&mut runner).unwrap().current())
}
