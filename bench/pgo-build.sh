#!/usr/bin/env bash
# A profile-guided release build of sluice: target/pgo/sluice.
#
#   bench/pgo-build.sh [--seconds N] [--no-bolt]
#
# 1. builds sluice instrumented (-Cprofile-generate) in target/pgo/gen;
# 2. runs examples/pgo_train.rs: the instrumented proxy in front of two
#    backends, under HTTP/1.1, HTTP/2 and TCP loads for a few seconds each;
# 3. merges the profile with llvm-profdata;
# 4. builds sluice again with -Cprofile-use in target/pgo/use, and copies
#    the binary to target/pgo/sluice;
# 5. when LLVM's post-link optimiser llvm-bolt is installed (Debian:
#    `apt-get install bolt-15`; any version works, it reads the finished
#    binary), lays the binary's code out again by where the time goes:
#    instruments it, runs the same training load, and rewrites it with hot
#    code packed together and cold blocks split off. --no-bolt skips this.
#
# llvm-profdata must come from the LLVM that rustc uses (`rustc -vV`):
# rustup's llvm-tools component (`rustup component add llvm-tools`), or a
# distribution's llvm-N package with the same major version (Debian
# bookworm: `apt-get install llvm-22` for rustc 1.95). Takes about three
# release builds' time. docs/performance.md says what it gains.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=2
bolt=1
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --no-bolt) bolt=0; shift ;;
        *) echo "usage: $0 [--seconds N] [--no-bolt]" >&2; exit 2 ;;
    esac
done

llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
profdata=""
for candidate in "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata \
    "llvm-profdata-$llvm_major" llvm-profdata; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" --version 2>/dev/null | grep -q "LLVM version $llvm_major\."; then
        profdata=$candidate
        break
    fi
done
if [ -z "$profdata" ]; then
    echo "$0: no llvm-profdata for LLVM $llvm_major (rustc's); install rustup's" \
        "llvm-tools component or your distribution's llvm-$llvm_major" >&2
    exit 1
fi

llvm_bolt=""
relocs=""
if [ "$bolt" = 1 ]; then
    for candidate in llvm-bolt /usr/lib/llvm-*/bin/llvm-bolt; do
        if command -v "$candidate" >/dev/null 2>&1; then
            llvm_bolt=$candidate
            # llvm-bolt needs the linker's relocations to move functions;
            # they do not change the code.
            relocs="-Clink-arg=-Wl,--emit-relocs"
            break
        fi
    done
    if [ -z "$llvm_bolt" ]; then
        echo "$0: no llvm-bolt: building with profile guidance only" >&2
    fi
fi

out="$PWD/target/pgo"
rm -rf "$out/profiles" "$out/sluice.profdata" "$out/bolt"
mkdir -p "$out/profiles"

cargo build --release --locked --example pgo_train
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$out/profiles" \
    cargo build --release --locked --bin sluice --target-dir "$out/gen"
LLVM_PROFILE_FILE="$out/profiles/sluice-%p-%m.profraw" \
    target/release/examples/pgo_train --bin "$out/gen/release/sluice" --seconds "$seconds"
"$profdata" merge -o "$out/sluice.profdata" "$out/profiles"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$out/sluice.profdata $relocs" \
    cargo build --release --locked --bin sluice --target-dir "$out/use"
if [ -n "$llvm_bolt" ]; then
    mkdir -p "$out/bolt"
    "$llvm_bolt" "$out/use/release/sluice" -o "$out/bolt/sluice-instrumented" \
        -instrument --instrumentation-file="$out/bolt/sluice.fdata"
    target/release/examples/pgo_train --bin "$out/bolt/sluice-instrumented" --seconds "$seconds"
    "$llvm_bolt" "$out/use/release/sluice" -o "$out/sluice" -data="$out/bolt/sluice.fdata" \
        -reorder-blocks=ext-tsp -reorder-functions=hfsort+ -split-functions -split-all-cold \
        -split-eh -icf=1 -use-gnu-stack
else
    cp "$out/use/release/sluice" "$out/sluice"
fi
echo "built $out/sluice"
