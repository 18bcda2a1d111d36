#!/usr/bin/env bash
# Zero-shot check through a real client: lm-eval's `local-completions` model
# against `d2moe serve` (vLLM's OpenAI server), on the d2moe_next_lines task,
# for the unquantized model and its MWQ conversion at each given width.
#
# Usage: benchmarks/accuracy/zero_shot.sh MODEL OUT_DIR [WIDTH ...]   (ascending; default 2 4 8)
# Needs the `eval` extra: pip install -e ".[eval]" (then scripts/install.sh's
# torchvision/torchaudio/torchcodec removal, if pip brought them back).
set -euo pipefail
model=$(realpath "$1"); out=$(realpath -m "$2"); shift 2
[ $# -gt 0 ] || set -- 2 4 8
widths=("$@")
port=${PORT:-8011}
read -r max_len dtype < <(python -c "import json, sys; c = json.load(open(sys.argv[1]))
print(c['max_position_embeddings'], c.get('dtype') or c.get('torch_dtype') or 'auto')" "$model/config.json")
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

mkdir -p "$out"
python -m vllm_d2moe.eval.zero_shot "$out/task"
d2moe convert "$model" "$out/mwq" --min-bits "${widths[0]}" --max-bits "${widths[-1]}" --group-size 128 --overwrite

run() {  # NAME SERVED_DIR [d2moe serve options...]
  local name=$1 served=$2; shift 2
  d2moe serve "$served" --host 127.0.0.1 --port "$port" --max-model-len "$max_len" --dtype "$dtype" \
    --gpu-memory-utilization 0.3 --enforce-eager "$@" > "$out/$name.server.log" 2>&1 &
  local server=$!
  trap "kill $server 2>/dev/null" EXIT
  until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
    kill -0 "$server" 2>/dev/null || { echo "server for $name exited; see $out/$name.server.log" >&2; exit 1; }
    sleep 2
  done
  lm_eval --model local-completions \
    --model_args "model=$served,base_url=http://127.0.0.1:$port/v1/completions,tokenizer_backend=huggingface,max_length=$max_len" \
    --batch_size 16 --tasks d2moe_next_lines --include_path "$out/task" --output_path "$out/$name" \
    | tee "$out/$name.txt"
  kill "$server"; wait "$server" 2>/dev/null || true
  trap - EXIT
}

run unquantized "$model"
for bits in "${widths[@]}"; do
  run "mwq-$bits" "$out/mwq" --quantization d2moe \
    --hf-overrides "{\"quantization_config\": {\"quant_method\": \"d2moe\", \"bits\": $bits}}"
done
