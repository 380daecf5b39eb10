#!/usr/bin/env bash
# GPU-host session steps (H100, torch 2.11 + triton 3.6, Python 3.12, no network). The host keeps /tmp only while it
# stays warm (~30 s between calls), so the steps are run as back-to-back device calls:
#
#   chunk N   : copy .gpuN/chunk_* (one quarter of a tar of the slim vLLM 0.26.0 wheelhouse + the SmolLM2 GGUF +
#               the gguf wheel; made on the CPU machine, see benchmarks/gpu/README.md) to /tmp/chunks
#   install SHA256 : unpack .gpudata/data.tar.gz (calibration/eval text, tokenizer) to /tmp/gpudata, reassemble the
#               chunks, install vLLM 0.26.0 + gguf + this project into /tmp/site
#   kcheck    : GPU kernel tests + the kernel benchmark (bench_kernels.py, all shapes and M)
#   bench NAME [ARGS] : benchmarks/bench_kernels.py ARGS (kernels only) -> $OUT/NAME.json + NAME.log
#   ktests [EXTRA...] : GPU kernel tests + gluon_check (mma_v2, wgmma, and with each EXTRA launch-config JSON)
#   smollm    : benchmarks/gpu/smollm_check.py (default model: compress on the GPU, greedy + perplexity vLLM-GPU vs
#               the PyTorch path and transformers, `vllm serve` with CUDA graphs + torch.compile answering chat)
#   make8b    : random Llama-3-8B-shaped bf16 checkpoint + its data-free nm16 packing (benchmarks/pack_random_nm16.py)
#   serve8b   : `vllm serve /tmp/llama8b-nm16 --quantization nm16` (defaults) answers completions + chat (openai client)
#   e2e MODEL : benchmarks/bench_e2e.py --only MODEL (dense|nm16) on the 8B checkpoints, with a torch-profiler
#               record of 16 decode steps per batch size -> $OUT/e2e_MODEL.json
#   e2e_dummy : dense and nm16 Llama-3-8B shapes with vLLM's --load-format dummy --skip-tokenizer-init on config-only
#               folders made in /tmp (no make8b, no weight files: random bf16 dense weights vs valid random nm16 layers,
#               8:16 + outliers 4/256 + scale), batches 1/16/64 + throughput, --iters 3 --warmup 1, no profiler; both
#               models in this one call -> $OUT/e2e_dense.json, $OUT/e2e_nm16.json, merged $OUT/e2e_h200.json
#
#   fuzz [ARGS] : benchmarks/gpu/fuzz.py (kernel fuzz vs float64, issue 14 item 5; ARGS e.g. --commit COMMIT)
#               -> $OUT/fuzz_h200.json + .log
#   load8b COMMIT : benchmarks/load_test.py (issue 14 item 2), recorded as run on COMMIT, against `vllm serve` of a
#               config-only Llama-3-8B-shaped nm16 folder (--load-format dummy: valid random 8:16 layers + outliers
#               4/256 + scale; synthetic byte-level tokenizer), 1,000 requests at concurrency 128, bf16
#               -> $OUT/load_h200.json (+ server log)
#
# The three-part wheelhouse of ../shared/gpu-vllm/build.sh instead of the four chunks (session 9 on):
#   parts N   : copy .gpuN/* (part_aa / part_ab / part_ac + SHA256SUMS + install.sh) to /tmp/parts
#   install3  : install vLLM 0.26 from /tmp/parts, the gguf wheel and texts carried in .gpudata (gguf-*.whl,
#               data.tar.gz: sotu-calib-part.txt, sotu-eval.txt -> /tmp/gpudata) and this project into /tmp/site
#
# Background steps (a new process session outlives the device call while the host stays warm, so GPU work overlaps
# the seconds-long carry calls; each runs from its own copy of the tree, which later calls replace):
#   bg NAME STEP [ARGS] : run STEP in the background; its $OUT is /tmp/bg/NAME, its log /tmp/bg/NAME.log, its exit
#               code /tmp/bg/NAME.rc when done
#   bgstat    : state + log tail of every background step; /tmp/bg comes back as $OUT/bg
#   bgwait SECONDS NAME... : wait (at most SECONDS) for the named background steps to finish, then bgstat
# vLLM's start-up memory profiling fails when another process frees GPU memory meanwhile ("Error in memory
# profiling"), so engines started while other GPU work runs get a fixed KV-cache size (SMOLLM_KV_CACHE_BYTES,
# load_test --server-args --kv-cache-memory-bytes), which skips that profiling.
#
# Qwen2.5-Coder-1.5B-Instruct (issue 13 item 5), after `install` (vLLM + gguf + /tmp/gpudata); its 1.1 GB GGUF rides
# in ~53 MB slices, one ignored folder each (.gpuq/NN/qwen_NN, cut on the CPU machine from `make assets-large`'s
# GGUF, see README.md); every row of the quality file is its own call (a compressed row takes minutes):
#   qpart NN  : copy .gpuq/NN/qwen_* to /tmp/qparts
#   qprep     : join the slices into the GGUF (size + magic checked by offline.assets_large), dequantize it to a bf16
#               HF folder /tmp/nm16cache/models/qwen2.5-coder-1.5b
#   qrow COMMIT ROW : one benchmarks/ablation.py row (dense | default | "default pattern=2:4" | "default
#               pattern=unstructured") on the full sotu-eval, compressed and evaluated on the GPU, recorded as run on
#               COMMIT (the commit the tree was copied from), into its own file /tmp/qrows/ROW.json (rows run in
#               parallel as background steps)
#   qmerge    : the rows of /tmp/qrows merged into $OUT/quality_qwen1.5b.json (ablation.py --merge)
#   tp2greedy COMMIT : (2 GPUs, issue 12) Qwen compressed with outliers 2/128, greedy fp32 tokens TP=2 vs TP=1
#               (benchmarks/gpu/tp_greedy.py) -> $OUT/tp2/
#   qckpt     : the default 8:16 checkpoint of the model (nm16-compress --device cuda) at the path qvllm uses, so
#               qvllm does not compress it again
#   qvllm     : the default 8:16 checkpoint through vLLM: perplexity on the full sotu-eval vs transformers on the same
#               checkpoint, greedy prompts, `vllm serve` answering chat (smollm_check.py --model) -> $OUT/qwen/
#
# Scale (issue 12), one H200, Llama-3-70B shapes (hidden 8192, intermediate 28672, 80 layers, 64/8 heads, vocab
# 128256) on config-only folders made in /tmp with --load-format dummy (no weight files; nm16 = 8:16 + outliers 4/256
# + scale); one device call each, results under $OUT/scale_h200/ (merge them with benchmarks/scale_report.py):
#   scale70b  : nm16 70B through bench_e2e.py (--skip-tokenizer-init): startup s, weights GiB, KV tokens, latency
#               batch 1/16/64 (--output-len 128 --iters 2 --warmup 1) + throughput (--tp-prompts 200); the run stops
#               itself at 510 s keeping what it measured (~6 min expected)
#   serve70b  : `vllm serve` of the same nm16 folder (its synthetic tokenizer: byte-level, Llama-3 special ids and
#               chat template) queried with the openai client: a token-id completion and a chat request (~4-5 min)
#   dense70b [GPU_MEM] : dense bf16 70B, same settings, engine start only (default gpu_memory_utilization 0.85, the
#               nm16 run's; e.g. 0.98 for the most this host can give): started true/false and vLLM's error, stopped
#               at 420 s (~2-4 min)
#
# Results go to $OUT (the device tool brings them back).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
site=/tmp/site
# The live working tree (copied afresh on every call) goes first, so code fixed between calls needs no reinstall;
# /tmp/site holds vLLM and this project's installed metadata (the vllm.general_plugins entry point).
use_site() { export PYTHONPATH=$ROOT:$site PATH=$site/bin:$PATH; }
# Issue 12: config-only Llama-3-70B-shaped folders (no weights): dense (with a synthetic tokenizer for the serve check)
# and its nm16 twin (8:16, outliers, scale); the benchmark settings both 70B engines share
cfg70() {
  [ -f /tmp/llama70b-cfg/config.json ] || python3 benchmarks/make_random_llama.py /tmp/llama70b-cfg \
    --preset llama3-70b --config-only --synthetic-tokenizer
  [ -f /tmp/llama70b-nm16-cfg/config.json ] || python3 benchmarks/pack_random_nm16.py /tmp/llama70b-cfg \
    /tmp/llama70b-nm16-cfg --config-only --outliers "${NM16_OUTLIERS:-4/256}"
}
# After vLLM's wheelhouse is in $site: the gguf wheel found in $1, this project, and what got installed
install_rest() {
  python3 -m pip install -q --no-index --no-deps --no-compile --target $site "$1"/gguf-*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target $site "$ROOT"
  use_site
  python3 -c "import importlib.metadata as m; print([e.value for e in m.entry_points(group='vllm.general_plugins')])"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, vllm, transformers, gguf; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"
}
# nm16-compress SRC DST [ARGS] on the GPU with the carried calibration text (pip --target leaves an existing bin/
# alone, so the console script may be missing: call its function)
compress_cuda() {
  NM16_CACHE=/tmp/nm16cache python3 -c \
    "import sys; from offline.cli import compress_main; sys.exit(compress_main(sys.argv[1:]))" \
    "$@" --device cuda --calib /tmp/gpudata/sotu-calib-part.txt
}
# NM16_COMMIT=SHA (the commit the tree was copied from; vllm_nm16/envs.py) is what the result files record instead of
# git's answer: this host's copy of the tree answers git with the commit its session started from (12ef88c recorded
# for runs of e4509ba). Set it on every call: NM16_COMMIT=SHA bash benchmarks/gpu/session.sh STEP ...
dummy70=(--load-format dummy --skip-tokenizer-init --iters 2 --warmup 1 --output-len 128 --tp-prompts 200
         --label 70b --record-failure)

step=$1; shift
case "$step" in
parts)
  mkdir -p /tmp/parts && cp ".gpu$1"/* /tmp/parts/ && ls /tmp/parts ;;
install3)
  mkdir -p /tmp/gpudata && tar xzf .gpudata/data.tar.gz -C /tmp/gpudata && ls /tmp/gpudata
  bash /tmp/parts/install.sh /tmp/parts $site
  install_rest .gpudata ;;
bg)
  name=$1; shift
  mkdir -p "/tmp/bg/$name" "/tmp/bgtree/$name"
  rm -f "/tmp/bg/$name.rc"
  tar cf - --exclude='./.gpu*' . | tar xf - -C "/tmp/bgtree/$name"
  OUT="/tmp/bg/$name" setsid nohup bash -c 'bash "$0/benchmarks/gpu/session.sh" "$@"; echo $? > "$OUT.rc"' \
    "/tmp/bgtree/$name" "$@" > "/tmp/bg/$name.log" 2>&1 < /dev/null &
  echo "started $name: $*" ;;
bgstat)
  for log in /tmp/bg/*.log; do
    n=$(basename "$log" .log)
    if [ -f "/tmp/bg/$n.rc" ]; then echo "== $n: done, rc $(cat "/tmp/bg/$n.rc")"; else echo "== $n: running"; fi
    tail -c 600 "$log" | tr '\r' '\n' | tail -n 3
  done
  mkdir -p "$OUT/bg" && cp -r /tmp/bg/. "$OUT/bg/" ;;
bgwait)
  limit=$1; shift
  t0=$(date +%s)
  for n in "$@"; do
    while [ ! -f "/tmp/bg/$n.rc" ] && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do sleep 5; done
  done
  bash "$ROOT/benchmarks/gpu/session.sh" bgstat ;;
tp2greedy)
  # issue 12 item 3 on a 2-GPU host (after install3 + the Qwen qpart/qprep steps): SmolLM2-135M cannot run TP=2 (9
  # attention heads, 3 KV heads), so the check runs on Qwen2.5-Coder-1.5B (12 / 2), compressed with outliers 2/128
  # (the default 4/256 block would be cut by TP=2's 4480-column halves of down_proj: the plugin refuses that)
  use_site
  [ -f /tmp/qwen-tp2-nm16/config.json ] || compress_cuda /tmp/nm16cache/models/qwen2.5-coder-1.5b \
    /tmp/qwen-tp2-nm16 --outliers 2/128
  python3 benchmarks/gpu/tp_greedy.py /tmp/qwen-tp2-nm16 --tp 2 --dtype float32 --commit "$1" \
    --out "$OUT/tp2/tp_greedy.json" || true
  tail -n 20 "$OUT/tp2/tp_greedy.json" ;;
qmerge)
  use_site
  python3 benchmarks/ablation.py --merge /tmp/qrows/*.json --out "$OUT/quality_qwen1.5b.json" ;;
qckpt)
  use_site
  [ -f /tmp/qwen2.5-coder-1.5b-nm16/config.json ] || compress_cuda /tmp/nm16cache/models/qwen2.5-coder-1.5b \
    /tmp/qwen2.5-coder-1.5b-nm16
  ls -la /tmp/qwen2.5-coder-1.5b-nm16 ;;
load8b)
  use_site
  t0=$(date +%s)
  [ -f /tmp/llama8b-tok-cfg/config.json ] || python3 benchmarks/make_random_llama.py /tmp/llama8b-tok-cfg \
    --preset llama3-8b --config-only --synthetic-tokenizer
  [ -f /tmp/llama8b-tok-nm16-cfg/config.json ] || python3 benchmarks/pack_random_nm16.py /tmp/llama8b-tok-cfg \
    /tmp/llama8b-tok-nm16-cfg --config-only --outliers "${NM16_OUTLIERS:-4/256}"
  python3 benchmarks/load_test.py --model /tmp/llama8b-tok-nm16-cfg --requests 1000 --concurrency 128 \
    --dtype bfloat16 --text /tmp/gpudata/sotu-eval.txt --time-limit 420 \
    --server-args="--load-format dummy --gpu-memory-utilization 0.3 --kv-cache-memory-bytes 17179869184" \
    --out "$OUT/load_h200.json" --log "$OUT/load_h200_server.log" --commit "$1"
  echo "load8b took $(( $(date +%s) - t0 )) s" ;;
chunk)
  mkdir -p /tmp/chunks && cp ".gpu$1"/chunk_* /tmp/chunks/ && ls -la /tmp/chunks ;;
install)
  # .gpudata rides with this call: a 60 MiB chunk + the tree + the data exceed one call's 64 MiB carry limit
  mkdir -p /tmp/gpudata && tar xzf .gpudata/data.tar.gz -C /tmp/gpudata && ls /tmp/gpudata
  cat /tmp/chunks/chunk_0* > /tmp/all.tar
  echo "$1  /tmp/all.tar" | sha256sum -c -
  mkdir -p /tmp/bundle && tar xf /tmp/all.tar -C /tmp/bundle && rm /tmp/all.tar
  bash /tmp/bundle/install.sh /tmp/bundle $site
  install_rest /tmp/bundle ;;
bench)
  # kernels only (no vLLM): benchmarks/bench_kernels.py ARGS... -> $OUT/NAME.json + .log (e.g. --gluon-configs ...)
  name=$1; shift
  PYTHONPATH=$ROOT python3 benchmarks/bench_kernels.py "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || true
  tail -n 3 "$OUT/$name.log" ;;
ktests)
  # kernels only (no vLLM): the GPU kernel tests, gluon_check of the mma_v2 and wgmma kernels and of the launch
  # variant(s) given as JSON arguments (each `gluon_check.py --extra`); logs -> $OUT
  export PYTHONPATH=$ROOT
  python3 -m pytest -q tests/test_kernels.py -k gpu -p no:cacheprovider --durations=5 > "$OUT/pytest_gpu_h200.log" 2>&1 \
    || true
  python3 benchmarks/gpu/gluon_check.py > "$OUT/gluon_check_h200.log" 2>&1 || true
  python3 benchmarks/gpu/gluon_check.py --kernel wgmma > "$OUT/wgmma_check.log" 2>&1 || true
  for extra in "$@"; do
    echo "# --extra $extra" >> "$OUT/variant_checks.log"
    python3 benchmarks/gpu/gluon_check.py --extra "$extra" >> "$OUT/variant_checks.log" 2>&1 || true
  done
  tail -n 2 "$OUT"/*.log ;;
kcheck)
  use_site
  python3 -m pytest tests/test_kernels.py -q -k gpu -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/kernels_gpu_tests.log"
  python3 benchmarks/bench_kernels.py --out "$OUT/kernels_h100.json" > "$OUT/kernels_h100.log" 2>&1
  tail -3 "$OUT/kernels_h100.log" ;;
smollm)
  use_site
  NM16_CACHE=/tmp/nm16cache python3 benchmarks/gpu/smollm_check.py --gguf /tmp/bundle/SmolLM2-135M-Instruct.Q4_1.gguf \
    --calib /tmp/gpudata/sotu-calib-part.txt --eval /tmp/gpudata/sotu-eval.txt --out "$OUT/smollm" ;;
make8b)
  use_site
  t0=$(date +%s)
  [ -f /tmp/llama8b/config.json ] || python3 benchmarks/make_random_llama.py /tmp/llama8b --preset llama3-8b \
    --tokenizer-from /tmp/gpudata/tok --device cuda
  [ -f /tmp/llama8b-nm16/config.json ] || python3 benchmarks/pack_random_nm16.py /tmp/llama8b /tmp/llama8b-nm16 \
    --outliers "${NM16_OUTLIERS:-4/256}" --device cuda
  du -sh /tmp/llama8b /tmp/llama8b-nm16; echo "make8b took $(( $(date +%s) - t0 )) s" ;;
e2e)
  use_site
  python3 benchmarks/bench_e2e.py --only "$1" --dense /tmp/llama8b --nm16 /tmp/llama8b-nm16 --log-dir "$OUT" \
    --profile-tokens 32 --profile-steps 16 --profile-dir /tmp/nm16_profile
  tail -5 "$OUT/e2e_$1.log" ;;
e2e_dummy)
  use_site
  t0=$(date +%s)
  [ -f /tmp/llama8b-cfg/config.json ] || python3 benchmarks/make_random_llama.py /tmp/llama8b-cfg --preset llama3-8b \
    --config-only
  [ -f /tmp/llama8b-nm16-cfg/config.json ] || python3 benchmarks/pack_random_nm16.py /tmp/llama8b-cfg \
    /tmp/llama8b-nm16-cfg --config-only --outliers "${NM16_OUTLIERS:-4/256}"
  dummy=(--load-format dummy --skip-tokenizer-init --iters 3 --warmup 1 --log-dir "$OUT")
  python3 benchmarks/bench_e2e.py --only dense --dense /tmp/llama8b-cfg "${dummy[@]}"
  python3 benchmarks/bench_e2e.py --only nm16 --nm16 /tmp/llama8b-nm16-cfg "${dummy[@]}"
  # no --plot here (matplotlib may be absent on the host): re-run this merge with --plot on the CPU machine
  python3 benchmarks/bench_e2e.py --merge "$OUT/e2e_dense.json" "$OUT/e2e_nm16.json" --json "$OUT/e2e_h200.json"
  echo "e2e_dummy took $(( $(date +%s) - t0 )) s" ;;
serve8b)
  use_site
  python3 benchmarks/gpu/smollm_check.py --serve-only /tmp/llama8b-nm16 --out "$OUT/serve8b" ;;
scale70b)
  use_site
  t0=$(date +%s)
  cfg70
  python3 benchmarks/bench_e2e.py --only nm16 --nm16 /tmp/llama70b-nm16-cfg "${dummy70[@]}" --timeout 510 \
    --log-dir "$OUT/scale_h200/70b_nm16_tp1"
  grep -h "Model loading took\|GPU KV cache size\|init engine" "$OUT/scale_h200/70b_nm16_tp1/e2e_nm16.log" \
    | cut -c1-200 || true
  echo "scale70b took $(( $(date +%s) - t0 )) s" ;;
serve70b)
  use_site
  t0=$(date +%s)
  cfg70
  python3 benchmarks/gpu/serve_dummy.py /tmp/llama70b-nm16-cfg --quantization nm16 --label 70b \
    --out "$OUT/scale_h200/serve" --ready-timeout 450
  echo "serve70b took $(( $(date +%s) - t0 )) s" ;;
dense70b)
  use_site
  t0=$(date +%s)
  gm=${1:-0.85}
  cfg70
  python3 benchmarks/bench_e2e.py --only dense --dense /tmp/llama70b-cfg "${dummy70[@]}" --start-only \
    --gpu-mem "$gm" --timeout 420 --log-dir "$OUT/scale_h200/70b_dense_tp1_gm$gm"
  grep -h "Model loading took\|GPU KV cache size\|init engine" "$OUT/scale_h200/70b_dense_tp1_gm$gm/e2e_dense.log" \
    | cut -c1-200 || true
  echo "dense70b (gpu_mem $gm) took $(( $(date +%s) - t0 )) s" ;;
qpart)
  mkdir -p /tmp/qparts && cp ".gpuq/$1"/qwen_* /tmp/qparts/ && ls /tmp/qparts | wc -l ;;
qprep)
  use_site
  mkdir -p /tmp/nm16cache/models
  cat /tmp/qparts/qwen_* > /tmp/nm16cache/models/qwen2.5-coder-1.5b.gguf
  python3 -m offline.assets_large --root /tmp/nm16cache ;;
qrow)
  use_site
  mkdir -p /tmp/qrows
  row_file="/tmp/qrows/$(echo "$2" | tr -c 'a-zA-Z0-9\n' '_').json"
  python3 benchmarks/ablation.py "$2" --model /tmp/nm16cache/models/qwen2.5-coder-1.5b \
    --calib /tmp/gpudata/sotu-calib-part.txt --text /tmp/gpudata/sotu-eval.txt --eval-tokens all --device cuda \
    --commit "$1" --quiet --out "$row_file"
  cp "$row_file" "$OUT/" ;;
qvllm)
  use_site
  SMOLLM_SERVE=triton NM16_CACHE=/tmp/nm16cache python3 benchmarks/gpu/smollm_check.py \
    --model /tmp/nm16cache/models/qwen2.5-coder-1.5b --calib /tmp/gpudata/sotu-calib-part.txt \
    --eval /tmp/gpudata/sotu-eval.txt --ppl-tokens all --report qwen_gpu.json --out "$OUT/qwen" ;;
fuzz)
  # torch + Triton only (no vLLM needed); ~8 min: 500 random cases on 8 worker processes, stops new cases at 420 s
  use_site
  python3 benchmarks/gpu/fuzz.py --out "$OUT/fuzz_h200.json" "$@" > "$OUT/fuzz_h200.log" 2>&1 || true
  tail -5 "$OUT/fuzz_h200.log" ;;
*)
  echo "unknown step $step" >&2; exit 2 ;;
esac
