#!/usr/bin/env bash
# The GPU checks as one command, for a GPU machine whose device time is short. From the
# repository root:
#
#   bash benchmarks/gpu_check.sh PROBE_DIR OUT_DIR
#
# PROBE_DIR: a folder inside the checkout that holds the GPU probe (probe.py, summarize.py: an
# external tool, not part of this repository; benchmarks/README.md, "The GPU check", says how
# to copy it in so that it travels with the checkout). OUT_DIR: where the results go.
#
# What it runs, in order, each step under its own `timeout`:
#  1. the versions and the GPU's name (steps.txt);
#  2. the install: `pip install --no-build-isolation --no-deps -e .` (fastvae.kernels is kernels/,
#     setup.py's package_dir, which `setup.py build_ext --inplace` alone does not map);
#  3. the whole CUDA suite: every test module of tests/ and fastvae/ops/*/ on the triton-cuda
#     backend (FASTVAE_TEST_BACKENDS=triton-cuda: conftest.py drops the reference and cpp
#     parametrizations, which CI runs), the quick tier, on every core (pytest-xdist), no -k.
#     Left out: tests/test_triton_interpreter.py (the kernels under Triton's CPU interpreter,
#     which the GPU runs natively here), tests/test_aot.py (compiles for sm_90 on the CPU; its
#     tests are the full tier's), and the modules that never put a tensor on a GPU (they name no
#     CUDA device and take no backend): the source and docs checks (test_history_free, test_tiers,
#     test_registry, test_op_ownership, test_layers, test_docs), the docs' and examples' CPU code
#     (test_migrating, test_examples, test_integrations, which needs pyro, not on the GPU image),
#     the backend-independent front ends (test_hierarchical, test_importance) and the cpp
#     backend's own C++ operators and compiles (test_torch_ops, test_compile);
#  4. the probe's `train` section with the default compiled nodes: its four training steps (MLP and
#     conv, ELBO and IWAE), their `train_loop` rows (fastvae eager and compiled against the
#     hand-written step eager and compiled) and its reduce-overhead rows (fastvae and the
#     hand-written step, each compiled with mode="reduce-overhead");
#  5. the same with FASTVAE_COMPILED_NODES=triton_op (the compiled nodes as triton_op), without
#     the reduce-overhead rows (PROBE_NO_RO=1), so that the two compiled rows can be set side by side;
#  6. the host cost with real launches: benchmarks/bench_host_cost.py --device cuda --compiled
#     --profile, the planned ELBO and DReG calls and a Laplace posterior's, 3 rounds of 50 calls.
#
# The time budget: 9 minutes of device time (TOTAL_S=540) from this script's start, the install
# included; the whole run ends within it, whatever a step takes. Each step runs under `timeout`
# with a cap, and also stops in time to leave each later step its floor (seconds):
#
#   step               cap  floor  took before (16 host cores)
#   versions            20      -    5
#   install             90      -   42 (H200), 43-61 (H100)
#   CUDA suite         200     60  est. 170-190: 1572 tests here; 1578 took 170 s on an H100
#   probe, graph_ops   165    120  104 without the reduce-overhead rows (H200); they add 8 compiles
#   probe, triton_op   100     85  about 95: the same less the hand-written compiles, which hit
#                                  the first run's Inductor cache
#   host cost           40     20   32 (3 cases, 3 rounds of 50 calls, H200)
#   (each probe's summary: 10)
#
# The caps add up to 615 s, more than 540, so the floors decide where a slow step is cut:
# a step gets min(cap, 540 - elapsed - the later steps' floors and summaries - the graces).
# Expected, with the install done at 55 s: the suite may take 180 s (540 - 55 - 295 kept - 10)
# and ends by 245 s; the first probe then gets 120 s (540 - 245 - 165 kept - 10), enough for its
# four training loops, while the reduce-overhead rows, which follow each step's loop, may be cut
# after the third; the second probe 100 s, the host cost 40 s: the run ends near 510 s. The
# tests go first: cut, they would leave out the op folders' tests, collected last, where the
# comparisons of fused kernels with FMA contraction are.
# A step stopped at its budget gets SIGINT (pytest prints the failures it found, the probe keeps
# the rows it wrote) and GRACE (10) s later SIGKILL. A cap of 0 skips its step (INSTALL_S=0
# where fastvae is installed); every cap and floor is an environment variable of that name.
#
# The files (at most 8, for a device whose results come back as at most 8 files):
#   steps.txt                 versions, each step's budget, exit status and end time; the build's tail if it failed
#   tests-cuda.log            pytest's output
#   probe-graph_ops.log       the probe's output and summarize.py's table (default compiled nodes)
#   probe-graph_ops.jsonl     its records (train, train_loop)
#   probe-triton_op.log       the same, FASTVAE_COMPILED_NODES=triton_op
#   probe-triton_op.jsonl
#   host-cost.log             bench_host_cost's table and cProfile
#   host_cost-cuda.json       its records
set -u
[ $# -eq 2 ] || { echo "usage: bash benchmarks/gpu_check.sh PROBE_DIR OUT_DIR" >&2; exit 2; }
probe=$1 out=$2
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
work=$(mktemp -d)  # the build log and the probe's own output folder: not among the files
trap 'rm -rf "$work"' EXIT

TOTAL_S=${TOTAL_S:-540}
GRACE=${GRACE:-10}  # pytest-xdist needs a few seconds after SIGINT to stop its workers and print
VERSIONS_S=${VERSIONS_S:-20} INSTALL_S=${INSTALL_S:-90} TEST_S=${TEST_S:-200}
PROBE_S=${PROBE_S:-165} PROBE2_S=${PROBE2_S:-100} HOST_S=${HOST_S:-40} SUMMARY_S=${SUMMARY_S:-10}
# what a step leaves, at least, to each step after it: the tests a minute, the probes their four
# steps' training loops, the host cost a case
TEST_FLOOR=${TEST_FLOOR:-60} PROBE_FLOOR=${PROBE_FLOOR:-120} PROBE2_FLOOR=${PROBE2_FLOOR:-85}
HOST_FLOOR=${HOST_FLOOR:-20}
# so each step keeps for the steps after it (their floors and the probes' summaries, each with its grace)
R_HOST=0
R_PROBE2=$(( SUMMARY_S + GRACE + HOST_FLOOR + GRACE ))
R_PROBE=$(( SUMMARY_S + GRACE + PROBE2_FLOOR + GRACE + R_PROBE2 ))
R_TESTS=$(( PROBE_FLOOR + GRACE + R_PROBE ))
R_INSTALL=$(( TEST_FLOOR + GRACE + R_TESTS ))

t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
note() { echo "$*" | tee -a "$out/steps.txt"; }

# budget CAP RESERVE: CAP, or what is left before TOTAL_S once RESERVE (the later steps' floors)
# and this step's grace are kept; 0 (skip) when nothing is
budget() {
  local left=$(( TOTAL_S - $(elapsed) - $2 - GRACE ))
  if [ "$1" -le 0 ] || [ "$left" -le 0 ]; then echo 0
  elif [ "$left" -lt "$1" ]; then echo "$left"
  else echo "$1"
  fi
}

# step NAME CAP RESERVE LOG COMMAND...: COMMAND under its budget, its output to LOG, its status in steps.txt
step() {
  local name=$1 cap=$2 reserve=$3 log=$4 s rc
  shift 4
  s=$(budget "$cap" "$reserve")
  if [ "$s" -le 0 ]; then
    note "$name: skipped (cap $cap s, $(( TOTAL_S - $(elapsed) )) s left, $reserve s kept for the steps after it)"
    return 0
  fi
  note "$name: started at $(elapsed) s, budget $s s"
  timeout -s INT -k "$GRACE" "$s" "$@" > "$log" 2>&1
  rc=$?
  note "$name: rc $rc$( { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && echo ' (stopped at its budget)') at $(elapsed) s"
  return "$rc"
}

# 1. the versions (steps.txt's first lines)
timeout -k "$GRACE" "$VERSIONS_S" "$py" -c "import os, sys, torch, triton
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cores', os.cpu_count())
print('gpu', torch.cuda.get_device_name())" 2>&1 | tail -3 | tee "$out/steps.txt"
note "budget: $TOTAL_S s in all; caps: install $INSTALL_S, tests $TEST_S, probe $PROBE_S," \
  "probe triton_op $PROBE2_S, host cost $HOST_S"

# 2. the install
if ! step install "$INSTALL_S" "$R_INSTALL" "$work/build.log" \
    env FASTVAE_BUILD_JOBS="$(nproc)" "$py" -m pip install -q --no-build-isolation --no-deps -e .; then
  tail -20 "$work/build.log" >> "$out/steps.txt"
  note "the install failed: nothing else runs"
  exit 1
fi
if ! timeout -k "$GRACE" 60 "$py" -c "import fastvae.kernels, fastvae._C" >> "$out/steps.txt" 2>&1; then
  note "fastvae does not import: nothing else runs"
  exit 1
fi

# 3. the CUDA suite
step tests "$TEST_S" "$R_TESTS" "$out/tests-cuda.log" env FASTVAE_TEST_BACKENDS=triton-cuda \
  "$py" -m pytest -q -n "$(nproc)" -p no:cacheprovider -p no:benchmark -o addopts="" -rfE --tb=short --timeout 150 \
  --ignore=tests/test_triton_interpreter.py --ignore=tests/test_aot.py \
  --ignore=tests/test_history_free.py --ignore=tests/test_tiers.py --ignore=tests/test_registry.py \
  --ignore=tests/test_op_ownership.py --ignore=tests/test_layers.py --ignore=tests/test_docs.py \
  --ignore=tests/test_migrating.py --ignore=tests/test_examples.py --ignore=tests/test_integrations.py \
  --ignore=tests/test_hierarchical.py --ignore=tests/test_importance.py \
  --ignore=tests/test_torch_ops.py --ignore=tests/test_compile.py

# 4, 5. the probe's training steps with each setting of the compiled nodes
probe_step() {  # probe_step NODES CAP RESERVE [VAR=VALUE...]
  local nodes=$1 cap=$2 reserve=$3
  shift 3
  mkdir -p "$work/$nodes"
  step "probe $nodes" "$cap" "$reserve" "$out/probe-$nodes.log" env FASTVAE_COMPILED_NODES="$nodes" "$@" \
    "$py" "$probe/probe.py" train --out "$work/$nodes"
  if [ -f "$work/$nodes/probe.jsonl" ]; then
    cp "$work/$nodes/probe.jsonl" "$out/probe-$nodes.jsonl"
    timeout -k "$GRACE" "$SUMMARY_S" "$py" "$probe/summarize.py" "$work/$nodes/probe.jsonl" \
      >> "$out/probe-$nodes.log" 2>&1
  fi
}
if [ -f "$probe/probe.py" ]; then
  probe_step graph_ops "$PROBE_S" "$R_PROBE"
  probe_step triton_op "$PROBE2_S" "$R_PROBE2" PROBE_NO_RO=1
else
  note "no $probe/probe.py: the probe's steps are skipped"
fi

# 6. the host cost with real launches
step "host cost" "$HOST_S" "$R_HOST" "$out/host-cost.log" "$py" -m benchmarks.bench_host_cost --device cuda \
  --compiled --profile --rounds 3 --calls 50 \
  --cases '^elbo bernoulli$|^iwae k=5 dreg$|^elbo laplace, laplace prior$' --out "$out/host_cost-cuda.json"

note "done at $(elapsed) s; $(find "$out" -type f | wc -l) files in $out"
[ -f "$out/tests-cuda.log" ] && tail -3 "$out/tests-cuda.log"
grep -h "^loop" "$out"/probe-*.log 2>/dev/null
[ -f "$out/host-cost.log" ] && sed -n '/^| call/,/^$/p' "$out/host-cost.log"
exit 0
