#!/usr/bin/env bash
# Fill gpu_kit/ (git-ignored) for bench/gpu_check.py on a GPU machine that cannot reach a package registry and
# whose Python has torch (2.10+), transformers, tiktoken, safetensors and numpy, but not DeepSpeed. Run it here,
# where pip reaches PyPI; then carry gpu_kit/ with the repository and run `python3 bench/gpu_check.py` there,
# which installs from gpu_kit/wheels with `pip install --no-index --find-links` and reads gpu_kit/data.
#
#   gpu_kit/wheels  DeepSpeed (it ships no wheel: built here from its sdist, pure Python; its ops are JIT-built
#                   at run time and the shipped GPU configs need none) and its run-time requirements that a
#                   torch + transformers machine may lack: hjson, py-cpuinfo, pydantic (+ pydantic-core,
#                   annotated-types, typing-inspection, typing-extensions), msgpack, psutil, ninja, einops, and
#                   packaging and tqdm (transformers brings those two; carried in case). Versions: the ones
#                   installed in this .venv, so the GPU runs what the tests ran.
#   gpu_kit/data    a copy of ../shared/data/tinystories (train.txt, valid.txt; 7 MB)
#
# Not carried: `datasets` (with pyarrow, dill, xxhash, multiprocess, fsspec, pandas, ...: over 60 MB) is only
# for launch/prepare_data.py; the check tokenizes the .txt itself with gptoss.tokenizer (tiktoken).
#
# Environment: PY (a Python with torch and pip; default .venv/bin/python), TARGET_PY (the GPU machine's Python
# version, default 3.12), SHARED_DATA (default ../shared/data/tinystories), KIT (default gpu_kit).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
TARGET_PY=${TARGET_PY:-3.12}
KIT=${KIT:-gpu_kit}
SHARED_DATA=${SHARED_DATA:-../shared/data/tinystories}
LIMIT_MIB=64  # what may travel to the GPU machine: the repository, the wheels and the data together

version() {  # the version installed in $PY, or nothing
    "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}
pinned() {  # NAME==VERSION as installed here, else NAME
    local v
    v=$(version "$1")
    if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi
}

rm -rf "$KIT/wheels"
mkdir -p "$KIT/wheels" "$KIT/data"

ds=$(pinned deepspeed)
echo "== building a wheel of $ds (DeepSpeed ships only an sdist; no ops are prebuilt)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$KIT/wheels" "$ds"

reqs=()
for name in hjson py-cpuinfo pydantic msgpack psutil ninja einops packaging tqdm; do
    reqs+=("$(pinned "$name")")
done
echo "== downloading ${reqs[*]} (+ their requirements) for CPython $TARGET_PY, x86_64 Linux"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 \
           manylinux_2_5 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
    "${platforms[@]}" -d "$KIT/wheels" "${reqs[@]}"

if [ -f "$SHARED_DATA/train.txt" ] && [ -f "$SHARED_DATA/valid.txt" ]; then
    cp "$SHARED_DATA/train.txt" "$SHARED_DATA/valid.txt" "$KIT/data/"
else
    echo "warning: no $SHARED_DATA/{train,valid}.txt; gpu_kit/data stays empty" >&2
fi

repo_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
kit_bytes=$(du -sb "$KIT" | cut -f1)
total_mib=$(( (repo_bytes + kit_bytes) / 1048576 ))
ls -l "$KIT/wheels"
echo "== repository $(( repo_bytes / 1048576 )) MiB + $KIT $(( kit_bytes / 1048576 )) MiB = $total_mib MiB" \
     "(limit $LIMIT_MIB MiB)"
if [ "$total_mib" -ge "$LIMIT_MIB" ]; then
    echo "error: over $LIMIT_MIB MiB" >&2
    exit 1
fi
echo "next: carry $KIT, then run: python3 bench/gpu_check.py --out gpu_check.md"
