#!/usr/bin/env bash
# The feature matrix: every library crate with cargo features type-checks with each feature
# alone, with none, and with all (cargo-hack's `--each-feature`, spelled out: cargo-hack is
# not installed in CI). The test run builds `--all-features` only, where a misplaced
# `#[cfg(feature = …)]` never shows.
#
# `cargo check` of the libraries only: a combination costs a type-check of the crates whose
# features differ (and of dependencies whose unified features differ), not a build. Left out
# on purpose, to keep it fast:
# - bus's `opentelemetry`, `redis` and `postgres` alone: bus only forwards them to bus-core
#   (no code of its own behind them), whose checks below cover them.
# - adapter-kafka without `zstd`: the feature only asks librdkafka for zstd (no Rust code
#   behind it), and a librdkafka without it is another C build of about two minutes; so bus's
#   `kafka` check keeps zstd on, as the --all-features build has it.
#
# Run by scripts/test.sh; alone: `bash scripts/features.sh`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=$SECONDS
check() {
    local package=$1 at=$SECONDS
    shift
    cargo check -q -p "$package" --lib "$@"
    printf 'features: %3ds cargo check -p %s %s\n' $((SECONDS - at)) "$package" "$*"
}

# The facade: no adapter at all, each adapter alone, all.
check bus --no-default-features
check bus --no-default-features --features memory
check bus --no-default-features --features nats
check bus --no-default-features --features rabbitmq
check bus --no-default-features --features kafka,adapter-kafka/zstd
check bus --no-default-features --features sqs
check bus --all-features

# The vocabulary: none of its optional parts, each alone, all.
check bus-core --no-default-features
for feature in conformance opentelemetry redis postgres; do
    check bus-core --no-default-features --features "$feature"
done
check bus-core --all-features

printf 'features: every combination checked in %ds\n' $((SECONDS - started))
