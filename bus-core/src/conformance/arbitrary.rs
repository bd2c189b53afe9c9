//! Property tests for adapters: arbitrary envelopes and hostile header values (proptest
//! strategies), and [`check`], which runs a property a fixed number of times and says so.
//!
//! An adapter's wire tests use them for "decoding never panics, whatever arrives" and
//! "encode → decode gives back the same envelope":
//!
//! ```
//! use bus_core::conformance::arbitrary;
//!
//! arbitrary::check("example: ids survive a clone", 16, arbitrary::envelope(), |envelope| {
//!     proptest::prop_assert_eq!(envelope.clone().id, envelope.id);
//!     Ok(())
//! });
//! ```

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

use crate::{headers, Envelope, Headers, MessageId};

/// The environment variable that multiplies every property's case count, for full-size runs
/// (`BUS_PROPTEST_SCALE=100 cargo test …`).
pub const SCALE_VAR: &str = "BUS_PROPTEST_SCALE";

/// The environment variable that makes every run draw new inputs (`BUS_PROPTEST_RANDOM=1`).
/// Without it the inputs come from a fixed seed, the same on every run, so that the test
/// command and CI give the same verdict on the same code; exploring is a separate, documented
/// run (`BUS_PROPTEST_RANDOM=1 BUS_PROPTEST_SCALE=100 cargo test --workspace --all-features
/// property_`).
pub const RANDOM_VAR: &str = "BUS_PROPTEST_RANDOM";

/// Runs `test` on `cases` values of `strategy` (times [`SCALE_VAR`] when set), drawn from a
/// fixed seed unless [`RANDOM_VAR`] is set, then prints `property <name>: <n> cases passed`.
///
/// # Panics
/// When the property fails: with the smallest failing input proptest found.
pub fn check<S, F>(name: &str, cases: u32, strategy: S, test: F)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
    F: Fn(S::Value) -> Result<(), TestCaseError>,
{
    let scale = std::env::var(SCALE_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    let cases = cases.saturating_mul(scale);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let random = std::env::var(RANDOM_VAR).is_ok_and(|v| matches!(v.trim(), "1" | "true"));
    let mut runner = if random {
        TestRunner::new(config)
    } else {
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
    };
    if let Err(failure) = runner.run(&strategy, test) {
        panic!("property {name} failed: {failure}");
    }
    let seed = if random { "random" } else { "fixed" };
    println!("property {name}: {cases} cases passed ({seed} seed)");
}

/// Text as other systems send it: empty, ASCII, any Unicode (control characters included),
/// and now and then long.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9._-]{1,24}",
        2 => any::<String>(),
        1 => Just(String::new()),
        1 => "[a-z]{200,600}",
    ]
}

/// Non-empty text, for ids.
pub fn non_empty_text() -> impl Strategy<Value = String> {
    text().prop_filter("non-empty", |s| !s.is_empty())
}

/// Bytes as they may arrive: empty, text, or anything.
pub fn payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        1 => Just(Bytes::new()),
        2 => any::<String>().prop_map(Bytes::from),
        3 => proptest::collection::vec(any::<u8>(), 0..512).prop_map(Bytes::from),
    ]
}

/// A time at millisecond precision anywhere from 1970 to the end of year 9999 (what the
/// CloudEvents `time` attribute carries).
pub fn timestamp() -> impl Strategy<Value = std::time::SystemTime> {
    prop_oneof![
        0..=headers::MAX_TIME_MILLIS,
        Just(0),
        Just(headers::MAX_TIME_MILLIS),
    ]
    .prop_map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
}

/// Application headers: up to 24, with edgy names and values.
pub fn headers() -> impl Strategy<Value = Headers> {
    proptest::collection::btree_map(non_empty_text(), text(), 0..24)
}

/// An arbitrary envelope: any non-empty id, correlation and causation ids, any kind, key and
/// content type, a millisecond-precision time between 1970 and 9999, edgy headers and any
/// payload. An adapter either publishes it and reads it back unchanged, or refuses it with a
/// typed error.
pub fn envelope() -> impl Strategy<Value = Envelope> {
    (
        (
            non_empty_text(),
            text(),
            non_empty_text(),
            proptest::option::of(non_empty_text()),
        ),
        (
            timestamp(),
            proptest::option::of(text()),
            proptest::option::of(non_empty_text()),
            headers(),
            payload(),
        ),
    )
        .prop_map(
            |(
                (id, kind, correlation, causation),
                (timestamp, key, content_type, headers, payload),
            )| {
                let mut envelope = Envelope::new(kind, payload)
                    .with_id(id)
                    .with_correlation_id(correlation)
                    .with_timestamp(timestamp);
                envelope.causation_id = causation.map(MessageId::from);
                envelope.key = key;
                envelope.content_type = content_type;
                envelope.headers = headers;
                envelope
            },
        )
}

/// Raw header pairs as a broker may deliver them: any bytes for names and values.
pub fn raw_headers() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    let bytes = prop_oneof![
        3 => "[a-zA-Z0-9_:.-]{0,16}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
    ];
    proptest::collection::vec((bytes.clone(), bytes), 0..16)
}
