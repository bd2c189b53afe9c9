#!/usr/bin/env bash
# Validates the AsyncAPI 3.0 documents of the examples' services with the official AsyncAPI
# parser (@asyncapi/parser, from the npm registry):
#   1. installs the parser once into target/asyncapi-node (git-ignored; needs node >= 18 and npm),
#   2. writes the documents of the quickstart's and tracing_two_services' services
#      (`--asyncapi <dir>`: the same functions build the services the examples run), and those
#      of bus/tests/service_asyncapi.rs (BUS_ASYNCAPI_OUT),
#   3. parses each one (scripts/asyncapi/validate.mjs): every diagnostic is printed, and an
#      error-severity one fails the script.
# BUS_URL picks the quickstart's broker and so its server and bindings (memory:// when unset:
# no server); the documents land in target/asyncapi (ASYNCAPI_OUT to change it).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# 3.6.6 is the newest release (2026-12); it runs on node 18 and 20.
PARSER_VERSION=3.6.6
node_dir=target/asyncapi-node
out=${ASYNCAPI_OUT:-target/asyncapi}

command -v node >/dev/null 2>&1 || { echo "asyncapi.sh: node not found" >&2; exit 1; }
command -v npm >/dev/null 2>&1 || { echo "asyncapi.sh: npm not found" >&2; exit 1; }

installed=$(node -p "try { require('./$node_dir/node_modules/@asyncapi/parser/package.json').version } catch { '' }")
if [ "$installed" != "$PARSER_VERSION" ]; then
    echo "installing @asyncapi/parser@$PARSER_VERSION into $node_dir"
    mkdir -p "$node_dir"
    [ -f "$node_dir/package.json" ] || echo '{ "private": true, "name": "bus-asyncapi-check" }' >"$node_dir/package.json"
    # --ignore-scripts: the parser needs no install script (one dependency's is telemetry).
    npm install --prefix "$node_dir" --no-audit --no-fund --ignore-scripts --loglevel=error \
        "@asyncapi/parser@$PARSER_VERSION"
fi

rm -rf "$out"
cargo build -q -p examples --example quickstart --example tracing_two_services
cargo run -q -p examples --example tracing_two_services -- --asyncapi "$out/memory"
cargo run -q -p examples --example quickstart -- --asyncapi "$out/memory"
# The quickstart's services as deployed on each broker (`--server`: written into the document,
# not connected to; the credentials in these URLs must not reach it), for the servers and the
# bindings.
for url in kafka://app:s3cret@kafka.internal:9092 amqp://app:s3cret@rabbit.internal:5672/shop \
    nats://app:s3cret@nats.internal:4222 'sqs://sqs.eu-west-1.amazonaws.com?access_key_id=AKIA&secret_access_key=s3cret'; do
    scheme=${url%%://*}
    cargo run -q -p examples --example quickstart -- --asyncapi "$out/$scheme" --server "$url"
done
# A service with what the examples lack (a work queue, a handler in a group of its own, a
# declared publish), on every broker: written by its shape test.
BUS_ASYNCAPI_OUT="$PWD/$out/service-test" cargo test -q -p bus --features asyncapi \
    --test service_asyncapi >/dev/null
if grep -rl 's3cret\|hunter2' "$out"; then
    echo "asyncapi.sh: a document above holds a credential of its server URL" >&2
    exit 1
fi

ASYNCAPI_NODE_MODULES="$PWD/$node_dir" node scripts/asyncapi/validate.mjs "$out"/*/*.json
