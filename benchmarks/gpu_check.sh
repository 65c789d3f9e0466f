#!/usr/bin/env bash
# The GPU checks as one command on a GPU machine (device time is short: one
# start, then everything). From the repository root:
#
#   bash benchmarks/gpu_check.sh PROBE_DIR OUT_DIR [probe sections, default: eval train]
#
# PROBE_DIR: a directory inside the checkout that holds the GPU probe
# (probe.py, summarize.py; not part of this repository, benchmarks/README.md),
# so that it travels with the checkout to the GPU machine. OUT_DIR: where the
# logs go. Budgets in seconds: HOST_S (benchmarks/bench_host_cost.py --device
# cuda --compiled, default 200; HOST_ARGS adds its options, e.g. "--rounds 5
# --calls 100"), FAMILIES_S (benchmarks/bench_families.py, eager, default 90),
# GUMBEL_S (the Gumbel-softmax VAE's training step and the Concrete sampler at
# its size, eager and compiled, default 120; 0 skips it),
# PROBE_S (each probe section, default 170) and TEST_S (the CUDA tests,
# default 190; TEST_K, pytest's -k, default "cuda or plan or compile", and
# TEST_PATHS, default the whole suite, narrow them). A budget ends its step with SIGINT, so pytest still prints
# the failures it found; a budget of 0 skips its step. Why the steps are as they are:
# - install editable: fastvae.kernels is kernels/ (setup.py's package_dir), which
#   `setup.py build_ext --inplace` alone does not map (every CUDA test would fail);
# - the probe and the tests need the GPU alone: they run one after the other;
# - the tests run on every core (pytest-xdist is on the machine's image).
set -u
probe=$1 out=$2
shift 2
sections=${*:-eval train}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
t0=$(date +%s)
stamp() { echo "$1 at $(( $(date +%s) - t0 )) s" | tee -a "$out/steps.txt"; }

python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, \
torch.cuda.get_device_name())" | tee "$out/steps.txt"
FASTVAE_BUILD_JOBS=$(nproc) python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
  || { tail -20 "$out/build.log"; exit 1; }
python3 -c "import fastvae.kernels, fastvae._C" || exit 1
stamp "installed"
# the loss's own host time per call with real launches, eager and compiled, whether
# every planned launch went to the compiled kernel directly, and where the time goes (cProfile)
if [ "${HOST_S:-200}" -gt 0 ]; then
  timeout -s INT "${HOST_S:-200}" python3 -m benchmarks.bench_host_cost --device cuda --compiled --profile ${HOST_ARGS:-} \
    --out "$out/host_cost-cuda.json" > "$out/host-cost.log" 2>&1
  stamp "host cost rc $?"
fi
# the latent families' whole objective, eager (the compiled rows compile 16 graphs: too long here)
if [ "${FAMILIES_S:-90}" -gt 0 ]; then
  timeout -s INT "${FAMILIES_S:-90}" python3 -m benchmarks.bench_families --device cuda --eager --rounds 3 --calls 5 \
    --families laplace uniform gumbel cauchy --out "$out/families-cuda.json" > "$out/families.log" 2>&1
  stamp "families rc $?"
fi
# a Gumbel-softmax VAE's step (batch 100, 30 latents of 10 categories) against its own hand-written
# loss, relaxed and hard, and the Concrete sampler alone at that size against a hand-written
# Gumbel-softmax: eager and compiled (no CUDA-graph replay: capturing the hand-written step, which
# draws from the default generator, failed on an H100 and broke the calls after it)
if [ "${GUMBEL_S:-120}" -gt 0 ]; then
  timeout -s INT "${GUMBEL_S:-120}" python3 -m benchmarks.bench_train_step --device cuda --models gumbel concrete \
    --repeats 20 --no-graphs --out "$out/train_step-gumbel-cuda.json" > "$out/gumbel.log" 2>&1
  stamp "gumbel rc $?"
fi
for section in $sections; do
  [ "${PROBE_S:-170}" -gt 0 ] || break
  timeout -s INT "${PROBE_S:-170}" python3 "$probe/probe.py" "$section" --out "$out" > "$out/probe-$section.log" 2>&1
  stamp "probe $section rc $?"
done
[ -f "$out/probe.jsonl" ] && python3 "$probe/summarize.py" "$out/probe.jsonl" > "$out/summary.txt" 2>&1
# the triton-cuda cases (and the CUDA-only tests); the CPU backends are CI's
[ "${TEST_S:-190}" -gt 0 ] && timeout -s INT "${TEST_S:-190}" python3 -m pytest -q -n "$(nproc)" -p no:cacheprovider -p no:benchmark -o addopts="" \
  -rfE --tb=short --timeout 150 -k "${TEST_K:-cuda or plan or compile}" --ignore=tests/test_triton_interpreter.py \
  --ignore=tests/test_aot.py ${TEST_PATHS:-} > "$out/tests-cuda.log" 2>&1
stamp "tests rc $?"
[ -f "$out/host-cost.log" ] && sed -n '/^| call/,/^$/p' "$out/host-cost.log"
[ -f "$out/summary.txt" ] && cat "$out/summary.txt"
[ -f "$out/tests-cuda.log" ] && tail -3 "$out/tests-cuda.log"
