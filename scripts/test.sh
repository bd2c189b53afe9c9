#!/usr/bin/env bash
# The project's test command, the same locally and in CI:
#   brokers (installed and started on loopback), formatting, clippy, the feature matrix,
#   packaging, the whole test suite against the real brokers, the docs with warnings denied,
#   and the quickstart.
# With BUS_REQUIRE_BROKERS=1 (set here) a test whose broker is missing fails instead of
# skipping.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || {
    echo "test.sh: cargo not found (install Rust with rustup)" >&2
    exit 1
}

export BUS_REQUIRE_BROKERS=1
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

started=$SECONDS
step() {
    printf '\n==> [%dm%02ds] %s\n' $(((SECONDS - started) / 60)) $(((SECONDS - started) % 60)) "$*"
}

step "brokers: install what is missing and start on loopback (scripts/brokers.sh start)"
broker_env=$(bash scripts/brokers.sh start)
eval "$broker_env"
printf '%s\n' "$broker_env"

step "test servers patched where they differ from the real broker (scripts/brokers.sh check)"
bash scripts/brokers.sh check

step "formatting (cargo fmt --all -- --check)"
cargo fmt --all -- --check

step "lints (cargo clippy --workspace --all-targets --all-features -- -D warnings)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "feature matrix: each cargo feature alone, none, all (scripts/features.sh, cargo check)"
bash scripts/features.sh

step "packaging: every library crate packages for crates.io (cargo package --no-verify)"
# --no-verify: verifying would build each crate again from its package (librdkafka and the
# AWS SDK included), minutes for what the builds here already check; the packages are made in
# one invocation so that each finds the workspace crates it depends on among them.
cargo package --no-verify --allow-dirty -q \
    -p bus-core -p adapter-memory -p adapter-nats -p adapter-rabbitmq -p adapter-kafka \
    -p adapter-sqs -p bus

step "tests (cargo test --workspace --all-features)"
test_log=$(mktemp)
# Tests that measure (fault cases, restart tests) append one line of figures here
# (bus_core::conformance::report), listed after the run.
BUS_TEST_REPORT=$(mktemp)
export BUS_TEST_REPORT
trap 'rm -f "$test_log" "$BUS_TEST_REPORT"' EXIT
cargo test --workspace --all-features 2>&1 | tee "$test_log"

step "figures measured by the fault, restart and reconnect tests"
sort "$BUS_TEST_REPORT"

step "property tests and their case counts (cargo test --workspace --all-features property_ -- --nocapture)"
# They ran above too; this lists what each one checked. Their inputs come from a fixed seed;
# BUS_PROPTEST_RANDOM=1 BUS_PROPTEST_SCALE=100 explores new inputs with 100 times the cases.
property_log=$(mktemp)
trap 'rm -f "$test_log" "$BUS_TEST_REPORT" "$property_log"' EXIT
cargo test -q --workspace --all-features property_ -- --nocapture >"$property_log" 2>&1 || {
    cat "$property_log"
    exit 1
}
# `-q` prints a dot per test on the same line as the output, hence -o.
grep -oE 'property .+: [0-9]+ cases passed \((fixed|random) seed\)' "$property_log"

step "cost gate: allocations and instructions per message against perf/cost-baseline.txt (scripts/cost.sh)"
bash scripts/cost.sh

step "docs (RUSTDOCFLAGS=\"-D warnings\" cargo doc --workspace --no-deps --all-features)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features

step "quickstart (cargo run -q -p examples --example quickstart)"
cargo run -q -p examples --example quickstart

step "quickstart on RabbitMQ (BUS_URL=\$BUS_TEST_RABBITMQ_URL cargo run -q -p examples --features rabbitmq --example quickstart)"
BUS_URL=$BUS_TEST_RABBITMQ_URL cargo run -q -p examples --features rabbitmq --example quickstart

step "quickstart on NATS (BUS_URL=\$BUS_TEST_NATS_URL cargo run -q -p examples --features nats --example quickstart)"
BUS_URL=$BUS_TEST_NATS_URL cargo run -q -p examples --features nats --example quickstart

step "quickstart on SQS (BUS_URL=\$BUS_TEST_SQS_URL cargo run -q -p examples --features sqs --example quickstart)"
BUS_URL=$BUS_TEST_SQS_URL cargo run -q -p examples --features sqs --example quickstart

step "quickstart on Kafka (BUS_URL=\$BUS_TEST_KAFKA_URL cargo run -q -p examples --features kafka --example quickstart)"
BUS_URL=$BUS_TEST_KAFKA_URL cargo run -q -p examples --features kafka --example quickstart

step "retry → dead-letter example (cargo run -q -p examples --example retry_dlq)"
cargo run -q -p examples --example retry_dlq

step "tracing across two services (cargo run -q -p examples --example tracing_two_services)"
cargo run -q -p examples --example tracing_two_services

step "a service's health over HTTP (cargo run -q -p examples --example health_http -- --once)"
cargo run -q -p examples --example health_http -- --once

step "AsyncAPI documents of the examples' services, validated by @asyncapi/parser (scripts/asyncapi.sh)"
asyncapi_started=$SECONDS
bash scripts/asyncapi.sh
echo "scripts/asyncapi.sh took $((SECONDS - asyncapi_started)) s"

step "all checks passed"
# One closing line with the totals of every `test result:` line cargo printed.
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed;?$/) passed += $(i - 1)
            if ($(i) ~ /^failed;?$/) failed += $(i - 1)
            if ($(i) ~ /^ignored;?$/) ignored += $(i - 1)
        }
    }
    END { printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$test_log"
