set -ex
export PYTHONPATH=/work/main
cd /tmp/w/g9
LAM=$1
date
pydetox discover --method distill --model ../base.Q4_K_M.gguf --param calibrator=../calgemma.gguf --param lr=0.001 --param clean_weight=24 --param clean_kl=full --param steps=300 --param pair_prompts=1200 --param cache=../g7q/teacher.npz --param anti=../anti/antigemma.gguf --param expert=../expert/expgemma.gguf --param anti_lambda=$LAM --param anti_rule=ratio --param anti_margin=3 -o g9.plan.gguf
date
pydetox plan merge ../g6/wf3.plan.gguf g9.plan.gguf -o g9wf3.plan.gguf
pydetox apply g9wf3.plan.gguf ../gemma.F16.gguf --type F16 -o g9wf3.F16.gguf --quiet
pydetox eval g9wf3.F16.gguf --reference ../gemma.F16.gguf --limit 700 --ppl-tokens 4096 --json g9wf3-f16.json --texts
date
pydetox apply g9wf3.plan.gguf ../gemma.F16.gguf --type Q4_K_M --edited-type Q8_0 -o g9wf3.Q4_K_M.gguf --quiet
pydetox eval g9wf3.Q4_K_M.gguf --reference ../base.Q4_K_M.gguf --limit 700 --ppl-tokens 4096 --json g9wf3-q4.json --texts
date
