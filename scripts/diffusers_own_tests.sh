#!/usr/bin/env bash
# diffusers' own tests of the five video transformers, stock and with a sparse_vdit plan applied to
# every model they build (the pytest plugin sparse_vdit.testing.diffusers_tests), at one diffusers
# version: its tests come from a diffusers git checkout at the tag v<version>, and a virtual
# environment gets that version installed, so the tests and the library match.
#
#   bash scripts/diffusers_own_tests.sh DIFFUSERS_GIT_DIR [VERSION] [PYTEST_ARGS...]
#
# DIFFUSERS_GIT_DIR: a clone (or bare mirror) of github.com/huggingface/diffusers with its tags.
# VERSION: default the diffusers of this project's .venv. PYTEST_ARGS: default the compile tests
# whole-model compile would break (fullgraph without recompiles, repeated blocks, dynamic shapes);
# their "requires a hardware accelerator" marks are lifted so they run (inductor) on the CPU. (The
# other compile tests: group offloading with CUDA streams fails on a CPU stock too; AOT packaging is
# slow there.) Writes stock.txt, sparse.txt and a per-test comparison to .diffusers-tests/<version>/.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
git_dir="${1:?usage: bash scripts/diffusers_own_tests.sh DIFFUSERS_GIT_DIR [VERSION] [PYTEST_ARGS...]}"
shift
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then version="$1"; shift; else
    version="$("$here/.venv/bin/python" -c 'import diffusers; print(diffusers.__version__)')"
fi
pytest_args=("$@")
[ ${#pytest_args[@]} -gt 0 ] || pytest_args=(-m compile -k "recompilation or repeated_blocks or different_shapes")
if [ -d "$git_dir/.git" ]; then git_dir="$git_dir/.git"; fi
git --git-dir="$git_dir" rev-parse -q --verify "refs/tags/v$version" >/dev/null || {
    echo "no tag v$version in $git_dir: fetch its tags, or pass a VERSION it has" >&2; exit 2; }

work="$here/.diffusers-tests/$version"
mkdir -p "$work"
venv="$work/venv"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] a virtual environment with diffusers==$version in $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}"
    "$venv/bin/pip" install -q "diffusers==$version" transformers accelerate peft safetensors pytest
    "$venv/bin/pip" install -q --no-deps -e "$here"
fi
rm -rf "$work/src" && mkdir -p "$work/src"
git --git-dir="$git_dir" archive "v$version" tests | tar -x -C "$work/src"
# diffusers' tests run with their own root, not under this project's pytest configuration.
printf '[pytest]\n' > "$work/src/pytest.ini"
files=()
for f in wan hunyuan_video cogvideox ltx mochi; do files+=("tests/models/transformers/test_models_transformer_$f.py"); done

cd "$work/src"
for mode in off sparse; do
    name=$([ "$mode" = off ] && echo stock || echo sparse)
    echo "[run] $name: pytest ${pytest_args[*]} (five transformer test files)"
    RUN_COMPILE=yes "$venv/bin/python" -m pytest -p sparse_vdit.testing.diffusers_tests --sparse-vdit "$mode" \
        --sparse-vdit-on-cpu "${pytest_args[@]}" "${files[@]}" -q -rA -p no:warnings -p no:cacheprovider \
        > "$work/$name.txt" 2>&1 || true
    grep "^sparse_vdit:" "$work/$name.txt" || true  # the sparse run's block-sparse calls, per test
    tail -n 1 "$work/$name.txt"
done
"$venv/bin/python" - "$work" <<'EOF'
import re, sys, pathlib
work = pathlib.Path(sys.argv[1])
def outcomes(name):
    got = {}
    for line in (work / f"{name}.txt").read_text().splitlines():
        m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", line)
        if m:
            got[m.group(2)] = m.group(1)
    return got
stock, sparse = outcomes("stock"), outcomes("sparse")
changed = sorted(t for t in set(stock) | set(sparse) if stock.get(t) != sparse.get(t))
lines = [f"{t}: stock {stock.get(t)}, sparse {sparse.get(t)}" for t in changed]
(work / "comparison.txt").write_text("\n".join(lines) + "\n")
print(f"[compare] {len(stock)} tests; outcome changed by the sparse plan: {len(changed)}")
for line in lines:
    print("  " + line)
EOF
