#!/usr/bin/env bash
# The cost gate (issue 14): allocations and instructions per message, counted deterministically,
# against the checked-in baseline perf/cost-baseline.txt. Times are never compared.
#
#   scripts/cost.sh                 build the `cost` benches in the test profile (the one
#                                   scripts/test.sh builds), count, compare with the baseline
#   scripts/cost.sh --bless         count and rewrite the baseline (after a deliberate change)
#   scripts/cost.sh --release       count in the release (bench) profile and print, no compare
#   scripts/cost.sh [...] ITEM...   only the items whose name contains one of ITEM
#
# What is counted (see bus_core::cost): per item, (cost of 2N operations - cost of N) / N;
# allocations in process by a counting global allocator on the measuring thread, instructions
# with `valgrind --tool=callgrind` collecting only inside bus_core::cost::measured.
#
# A run fails when an item allocates more than the baseline (by BUS_COST_ALLOCATIONS_TOLERANCE,
# default 0.5 per message, so a new allocation per message fails and the memory store's
# fractional bookkeeping does not) or executes more instructions than the baseline by more
# than BUS_COST_INSTRUCTIONS_TOLERANCE percent (default 5), or when an item is missing from
# either side. Instruction counts depend on the compiler: when rustc is not the version that
# wrote the baseline, instruction regressions are reported but do not fail (allocations still
# do); rewrite the baseline with --bless on the new toolchain.
#
# valgrind comes from Debian's packages. When it is missing the script installs it if it can
# (root or sudo); if it still cannot, under BUS_REQUIRE_BROKERS=1 or CI=true it fails, and
# elsewhere it says so and gates allocations only.
#
# Adding a crate: give it a `#[doc(hidden)] pub mod cost` with `items()` and a
# `benches/cost.rs` (harness = false) that calls bus_core::cost::main; this script finds every
# bench named `cost` in the workspace. Then run --bless and commit the baseline.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

BASELINE=perf/cost-baseline.txt
ALLOC_TOLERANCE=${BUS_COST_ALLOCATIONS_TOLERANCE:-0.5}
INSTR_TOLERANCE=${BUS_COST_INSTRUCTIONS_TOLERANCE:-5}

say() { printf 'cost: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

bless=0
release=0
filters=()
for arg in "$@"; do
    case $arg in
    --bless) bless=1 ;;
    --release) release=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    -*) die "unknown option $arg (see --help)" ;;
    *) filters+=("$arg") ;;
    esac
done
[ "$bless" -eq 1 ] && [ "$release" -eq 1 ] && die "--bless writes the test-profile baseline; drop --release"

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust with rustup)"

required=0
if [ "${BUS_REQUIRE_BROKERS:-}" = 1 ] || [ "${CI:-}" = true ]; then
    required=1
fi

valgrind=${BUS_VALGRIND:-valgrind}
if ! command -v "$valgrind" >/dev/null 2>&1 && [ -z "${BUS_VALGRIND:-}" ]; then
    if [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; then
        say "valgrind not found: installing it (apt-get install valgrind)"
        as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
        { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
                --no-install-recommends valgrind </dev/null; } >&2 ||
            say "installing valgrind failed"
    fi
fi
instructions=1
if ! command -v "$valgrind" >/dev/null 2>&1; then
    if [ "$required" -eq 1 ]; then
        die "valgrind not found ('$valgrind'), and BUS_REQUIRE_BROKERS=1 or CI=true requires \
the instruction counts: install it (Debian: apt-get install valgrind) or set BUS_VALGRIND"
    fi
    [ "$bless" -eq 1 ] && die "valgrind not found ('$valgrind'): cannot count instructions for the baseline"
    say "valgrind not found ('$valgrind'): SKIPPING the instruction counts, gating allocations only"
    instructions=0
fi

# The test profile shares every dependency with `cargo test --workspace --all-features`, so
# after scripts/test.sh's test step this builds only the three small bench binaries.
if [ "$release" -eq 1 ]; then
    build=(cargo bench --workspace --all-features --bench cost --no-run)
    profile=release
else
    build=(cargo test --workspace --all-features --bench cost --no-run)
    profile=test
fi
say "building: ${build[*]}"
built=$(mktemp)
work=$(mktemp -d)
trap 'rm -rf "$built" "$work"' EXIT
"${build[@]}" --message-format=json-render-diagnostics >"$built"
# The executables of the bench targets named `cost`, from cargo's JSON lines (no jq needed).
mapfile -t benches < <(grep '"reason":"compiler-artifact"' "$built" |
    grep '"kind":\["bench"\]' | grep '"name":"cost"' |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | sort -u)
[ "${#benches[@]}" -gt 0 ] || die "no bench named cost was built"

args=()
[ "$instructions" -eq 0 ] && args+=(--no-instructions)
args+=("${filters[@]}")
export BUS_VALGRIND="$valgrind"

# The benches run side by side (each is one process on one thread, plus its valgrind runs).
started=$SECONDS
pids=()
for i in "${!benches[@]}"; do
    "${benches[$i]}" "${args[@]}" >"$work/$i.out" 2>"$work/$i.err" &
    pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        say "${benches[$i]} failed:"
        cat "$work/$i.err" >&2
        failed=1
    fi
done
[ "$failed" -eq 0 ] || die "a cost bench failed"
measured=$work/measured.txt
cat "$work"/*.out | sed -n 's/^cost //p' | sort >"$measured"
say "counted $(wc -l <"$measured") items in $((SECONDS - started))s ($profile profile)"

rustc_version=$(rustc --version)
if [ "$release" -eq 1 ]; then
    printf '%-26s %12s %14s\n' item allocations instructions
    awk '{ split($2, a, "="); split($3, i, "="); printf "%-26s %12s %14s\n", $1, a[2], i[2] }' "$measured"
    exit 0
fi

if [ "$bless" -eq 1 ]; then
    mkdir -p "$(dirname "$BASELINE")"
    {
        echo "# Allocations and instructions per message, test profile (scripts/test.sh's build),"
        echo "# counted by scripts/cost.sh; rewrite with scripts/cost.sh --bless (see docs/PERFORMANCE.md)."
        echo "# rustc: $rustc_version"
        cat "$measured"
    } >"$BASELINE"
    say "wrote $BASELINE:"
    cat "$BASELINE" >&2
    exit 0
fi

[ -f "$BASELINE" ] || die "no baseline $BASELINE: write one with scripts/cost.sh --bless"
baseline_rustc=$(sed -n 's/^# rustc: //p' "$BASELINE")
same_rustc=1
if [ "$baseline_rustc" != "$rustc_version" ]; then
    same_rustc=0
    say "the baseline was counted with '$baseline_rustc', this is '$rustc_version':" \
        "instruction regressions are reported but do not fail"
fi

# item allocations=A instructions=I, baseline first.
awk -v at="$ALLOC_TOLERANCE" -v it="$INSTR_TOLERANCE" -v same_rustc="$same_rustc" \
    -v instructions="$instructions" -v filtered="${#filters[@]}" '
    # A number, so that comparisons are numeric (a string from sub() compares as text:
    # "6.00" > "12.50"); "-" (not counted) stays as it is.
    function field(s) { sub(/^[a-z]+=/, "", s); return s == "-" ? s : s + 0 }
    FNR == NR {
        if ($0 ~ /^#/ || NF == 0) next
        base_a[$1] = field($2); base_i[$1] = field($3); next
    }
    {
        seen[$1] = 1
        a = field($2); i = field($3)
        if (!($1 in base_a)) {
            printf "FAIL %-24s not in the baseline: new item? rewrite it with scripts/cost.sh --bless\n", $1
            fail = 1; next
        }
        verdict = "ok"
        note = ""
        if (a > base_a[$1] + at) {
            verdict = "FAIL"; fail = 1
            note = note sprintf(" allocations %s -> %s per message", base_a[$1], a)
        } else if (a < base_a[$1] - at) {
            note = note sprintf(" fewer allocations (%s -> %s): keep the gain with --bless", base_a[$1], a)
        }
        di = "-"
        if (instructions && i != "-" && base_i[$1] != "-" && base_i[$1] > 0) {
            pct = (i - base_i[$1]) * 100 / base_i[$1]
            di = sprintf("%+.1f%%", pct)
            if (pct > it) {
                if (same_rustc) { verdict = "FAIL"; fail = 1 }
                else if (verdict == "ok") verdict = "warn"
                note = note sprintf(" instructions %s -> %s (%+.1f%%, tolerance %s%%)", base_i[$1], i, pct, it)
            } else if (pct < -it) {
                note = note sprintf(" fewer instructions (%+.1f%%): keep the gain with --bless", pct)
            }
        }
        printf "%-4s %-24s allocations %8s (baseline %8s)  instructions %9s (baseline %9s, %7s)%s\n",
            verdict, $1, a, base_a[$1], i, base_i[$1], di, note
    }
    END {
        if (!filtered) for (item in base_a) if (!(item in seen)) {
            printf "FAIL %-24s in the baseline but not counted: removed? rewrite it with scripts/cost.sh --bless\n", item
            fail = 1
        }
        exit fail
    }' "$BASELINE" "$measured" && status=0 || status=$?

if [ "$status" -ne 0 ]; then
    say "REGRESSION against $BASELINE (allocations +$ALLOC_TOLERANCE per message, instructions" \
        "+$INSTR_TOLERANCE% allowed; test profile). If the cost is deliberate, rewrite the baseline" \
        "with scripts/cost.sh --bless and say why in the commit; docs/PERFORMANCE.md has the details."
    exit 1
fi
say "no regression against $BASELINE"
