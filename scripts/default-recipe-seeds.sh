#!/usr/bin/env bash
# Reproduces docs/results/default-recipe-seeds.md: the default recipe on SmolLM2-135M-Instruct over three training
# seeds (greedy, F16 and Q4_K_M), the same models under sampling, and the edited tensors' type at Q4_K_M.
# That record fit on held-out wiki at F16 (recipe:fit_text=wiki, kl_budget=0.03, fit_tokens=2048, fit_type=F16); run
# as is, the script measures the current default (held-out news, at the least precise type; kl-budget-text.md).
#
#   scripts/default-recipe-seeds.sh OUT      # OUT: a folder to create; ~2 h on 2 cores with a cached calibrator
#
# Seeds share OUT/run, so the calibrator, the f16 stage and the teacher are computed once; each seed's report,
# plan and edited F16 are then moved to OUT/seedN. Run it with nothing else on the machine: two heavy jobs on the same
# cores slow both several times.
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUT" >&2
  exit 2
fi
out=$1
mkdir -p "$out"
cd "$out"
for seed in -1 1 2; do
  extra=()
  [ "$seed" != -1 ] && extra=(--param "distill:train_seed=$seed")
  pydetox detox --out run --types F16,Q4_K_M --limit 700 --ppl-tokens 4096 --force "${extra[@]}"
  mkdir -p "seed$seed"
  mv run/report.* run/distill.plan.gguf "seed$seed/"
  cp run/*.distill.F16.gguf "seed$seed/edited.F16.gguf"
done
base=$(ls run/*.F16.gguf | grep -v distill)
# Under sampling: the unedited model once (it is the same file for every seed), then each seed's edited model.
sampled=(--samples 5 --temperature 1 --top-p 0.9 --ppl-tokens 0 --limit 700 --force)
pydetox eval "$base" seed-1/edited.F16.gguf --reference "$base" "${sampled[@]}" --json seed-1/sampled.json --markdown seed-1/sampled.md
for seed in 1 2; do
  pydetox eval "seed$seed/edited.F16.gguf" "${sampled[@]}" --json "seed$seed/sampled.json" --markdown "seed$seed/sampled.md"
done
# The edited tensors' type at Q4_K_M, seed -1's plan: llama.cpp's mix, at least Q6_K (the default is at least Q8_0).
mkdir -p q4km
pydetox apply seed-1/distill.plan.gguf "$base" -o q4km/none.Q4_K_M.gguf --type Q4_K_M --force --quiet
pydetox apply seed-1/distill.plan.gguf "$base" -o q4km/q6k.Q4_K_M.gguf --type Q4_K_M --edited-type Q6_K --force --quiet
pydetox eval q4km/none.Q4_K_M.gguf q4km/q6k.Q4_K_M.gguf --reference "$(ls run/*.Q4_K_M.gguf | grep -v distill)" \
  --limit 700 --ppl-tokens 4096 --force --json q4km/eval.json --markdown q4km/eval.md
echo "done: $out/seed*/report.md, $out/seed*/sampled.md, $out/q4km/eval.md"
