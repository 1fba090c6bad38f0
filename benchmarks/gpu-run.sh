#!/usr/bin/env bash
# Everything that needs a GPU, as one prepared run that fits a short lease on a lent machine
# (CuPy, PyTorch, torchvision, pytest, hypothesis, ml_dtypes, matplotlib and compute-sanitizer
# already there, no network): the whole test suite on the GPU, compute-sanitizer over the CUDA
# kernel tests, and the benchmark against torchvision. Run from the repository root:
#
#     bash benchmarks/gpu-run.sh [OUT_DIR]      (default: $OUT, else ./gpu-results)
#     STEPS="pytest bench" bash benchmarks/gpu-run.sh     (some steps only; default: all)
#
# Nothing is installed: the package is imported from this checkout (its kernels from cuda/).
# Each step has its own time limit (together under 9 minutes; split a run with STEPS where a
# single command may run less) and the script goes on after a failure. OUT_DIR gets at most 8
# files: summary.txt (the versions and GPU, then every step with its exit status and seconds),
# one log per step, and the benchmark's JSON, markdown and plot.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ROI_CUPY_EMULATOR_CACHE="${TMPDIR:-/tmp}/roi_cupy-emulator"
py=${PYTHON:-python3}
summary="$out/summary.txt"
: >"$summary"

steps=${STEPS:-env pytest memcheck racecheck bench}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log
    local name=$1 limit=$2 start status log
    shift 2
    case " $steps " in *" $name "*) ;; *) return 0 ;; esac
    start=$(date +%s)
    log="$out/$name.log"
    [ "$name" = env ] && log="$summary"  # the versions head the summary: one file fewer
    { printf '$'; printf ' %q' "$@"; echo; } >>"$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    status=$?
    printf '%-10s exit %3d  %4ds (limit %ds)\n' "$name" "$status" "$(($(date +%s) - start))" \
        "$limit" | tee -a "$summary"
}

step env 30 bash -c "nvidia-smi; $py - <<'PY'
import platform, numpy, roi_cupy
print('python', platform.python_version(), 'numpy', numpy.__version__, 'roi_cupy', roi_cupy.__version__)
for name in ('cupy', 'torch', 'torchvision', 'jax', 'ml_dtypes'):
    try:
        module = __import__(name)
        print(name, module.__version__)
    except Exception as exc:
        print(name, 'missing:', exc)
import cupy
print('device', cupy.cuda.runtime.getDeviceProperties(0)['name'].decode(),
      'cuda runtime', cupy.cuda.runtime.runtimeGetVersion())
PY"

# The whole suite: on a GPU the cuda backend joins every parametrised test.
step pytest 200 "$py" -m pytest tests -q -p no:cacheprovider

# compute-sanitizer over the GPU cases of the tests that aim at the kernels' edges: invalid and
# huge RoIs, both index widths, non-finite values, validation, torch CUDA tensors (the emulator
# and NumPy cases run no device code and are left out). memcheck: out-of-bounds and misaligned
# accesses, with CuPy's and torch's memory pools off so that every array ends where its
# allocation ends; racecheck: shared-memory hazards (RoI Align's mean kernels build their
# per-RoI sample tables in shared memory).
edge_tests="tests/test_cuda.py tests/test_nonfinite.py tests/test_validation.py tests/test_torch.py
    tests/test_roi_align_max.py tests/test_ps_roi_align.py tests/test_ps_roi_pool.py
    tests/test_roi_align_rotated.py tests/test_multi_scale_roi_align.py
    tests/test_roi_pool.py::test_channels_last_features_give_the_same_bits"
step memcheck 120 env ROI_CUPY_TEST_NO_POOL=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 99 \
    "$py" -m pytest $edge_tests -q -p no:cacheprovider -k "cuda and not emulator"
step racecheck 30 compute-sanitizer --tool racecheck --error-exitcode 99 \
    "$py" -m pytest tests/test_cuda.py tests/test_roi_align.py -q -p no:cacheprovider \
    -k "cuda and not emulator and (test_cuda or sampling_128 or wider or channels_last)"

# The benchmark: every GPU workload at full size on the GPU backends, and of the CPU family only
# cpu-core/cpu-pool on the CPU ones (the CPU run is committed on its own); writes
# <date>-<gpu>.{json,md,png} into OUT_DIR.
step bench 150 "$py" -m roi_cupy bench --workloads W1,W2,W3,W4,W5,W6,W7,sweep,cpu-core,cpu-pool \
    --out "$out"

echo "summary: $summary"
