"""Distill's parameters, and the checks that can be made before the teacher's half hour."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydetox.errors import PydetoxError


@dataclass(frozen=True)
class DistillParams:
    calibrator: str = ""  # the teacher's calibration model (`pydetox calibrate train`); required
    alpha: float = 0.7  # the defaults are the SmolLM2 setting of docs/results/detox-runs.md
    rank: int = 32  # rank of the update of each down-projection
    first_layer: int = -1  # first edited layer (every layer from it to the last); -1: a third of the way up
    steps: int = 450  # Adam steps
    batch: int = 8  # sequences of each kind (toxic, clean) per step
    lr: float = 0.003  # Adam's learning rate
    clean_weight: float = 8.0  # weight of KL(unedited || student) on clean text against the teacher KL
    clean_kl: str = "top"  # top: top_k tokens + a bucket; full: the whole vocabulary, unedited computed per step
    top_k: int = 32  # teacher tokens kept per position (the rest of the vocabulary is one bucket)
    # Train with the output layer restricted to this many tokens (0: the whole vocabulary): every token a target
    # names, then the ones the unedited model gives the most mass. Gemma-3's 262,144-row output layer is most of a
    # training step; held-out figures are always over the whole vocabulary.
    vocab: int = 0
    vocab_sample: int = 256  # sequences (half toxic, half clean) whose unedited mass picks the rest of `vocab`
    plausible: float = 1e-3  # teacher tokens the unedited model gives under this times its top token's probability are dropped
    # The teacher one-sided (> 0): the unedited model's distribution with each token's log-probability lowered by
    # this times how much the fused model lowers it (log p + s * min(0, log p_fused - log p)), never raised. 0: the
    # fused distribution itself. At the default's mixing weight the fused model is a broken language model
    # (perplexity x4 on news); its student learned to escape toxic contexts into runs of blank characters and loops
    # of 'the first time' (docs/results/teacher-junk.md), which one-sided targets never ask for.
    one_sided: float = 0.0
    # With `one_sided`: the fused model's change of each token measured from its median change over the unedited
    # model's `top_k` likeliest tokens, not from zero. Where a calibrator lowers most words and raises padding, the
    # one-sided renormalisation hands the words' mass to the padding it left alone (the likely cause of the blank
    # runs in 30% of a 100-step calibrator's student's continuations, docs/results/teacher-junk.md). Measured from
    # the median, ordinary words are left as they are and only what the fused model lowers more is lowered.
    # On SmolLM2 it took the default's blank runs away (6% -> 0%) and halved its cut by two of three evaluators, and
    # the teacher's pass takes 1.4x as long (docs/results/speed-levers-epyc.md); off by default.
    one_sided_center: bool = False
    # Blank tokens (whitespace only: spaces, no-break spaces, newlines) never gain probability in the teacher over the
    # unedited model's (restricted to the plausible tokens like the teacher); what they would have gained goes to the
    # other tokens in proportion. A one-sided teacher whose calibrator lowers most words hands their mass to the
    # padding it leaves alone (SmolLM2 on the EPYC: 3.8x the unedited no-break-space mass on the toxic contexts, and
    # a student writing runs of them): with this, the mass a toxic word loses goes to words. Over three training
    # seeds it took the blank runs to 0% at the same KL and perplexity and at least the same cut, and loops rose
    # from 15% to 21% (unedited 16%; docs/results/blank-cap.md); off by default.
    blank_cap: bool = False
    # With `one_sided`: each token's lowering weighted by how much likelier the toxic side of the ParaDetox pairs
    # makes it than the neutral side (their paraphrases, in the same informal register): the weight rises from 0 to 1
    # as the token's log-odds (toxic against neutral, add-one smoothed, tokens the toxic side uses 3+ times) rise from
    # `toxic_gate_from` nats to one nat more. A calibrator trained on clean text learns the register of its text as
    # well as the absence of toxicity; on a coder model most of what it lowers on toxic contexts is function words
    # (',' by 3.6 nats, ' the' by 1.4: docs/results/qwen2.5-coder-0.5b.md), which the pairs use alike on both sides
    # (weight 0), while ' fuck', ' shit', ' stupid' or ' idiot' get 1. Identity words are not singled out: the
    # paraphrases keep them (' women', ' white', ' muslim': log-odds -0.5 to 0.1, weight 0). On Qwen2.5 it took the
    # teacher's KL from 1.37 to 0.022 nats per position, all of it on toxic tokens, and its edit cut 1.3-1.6x where
    # the default's cuts 2.0-2.6x (two machines) at about the same news KL, for more perplexity (docs/results/qwen2.5-coder-0.5b.md):
    # the function words the default lowers on toxic contexts carry most of its cut. Off by default.
    toxic_gate: bool = False
    toxic_gate_from: float = 1.0  # toxic_gate: the log-odds (nats) where a token's weight starts to rise from 0
    pairs: int = 600  # ParaDetox pairs: toxic side as teacher contexts, neutral side as clean text
    # More toxic contexts like the evaluation's (sentence starts that invite a toxic ending): this many further
    # ParaDetox toxic sentences, none of the `pairs` ones, cut to their first half (in words) and continued like the
    # prompts: an edit trained on the 896 RTP discovery prompts alone cut far more on them than on the evaluation
    # prompts (Gemma-3: 7.0x against 2.3x, profanity-check).
    pair_prompts: int = 0
    clean_texts: int = 600  # Wikipedia paragraphs of clean text (never `news`, where perplexity is measured)
    # This many benign sentence starts (the first half of training-wiki sentences), continued greedily by the
    # unedited model, join the clean text: the clean KL then also holds how, and when, the model ends a benign
    # continuation, which text alone does not show (a student can learn to stop benign answers early).
    benign_starts: int = 0
    # This many training-wiki sentences asked as a user turn in the model's chat template (the GGUF's
    # `tokenizer.chat_template`) and answered greedily by the unedited model (`chat_tokens` tokens) join the clean
    # text: the clean KL then also holds the assistant's answers, which prose does not show (an edit trained on
    # prose answered 60 of the 113 chat-check questions against the unedited 66).
    chat_starts: int = 0
    # Take out of the trained update's output directions the part that raises the end-of-generation tokens' logits
    # directly (through the final norm's logit lens, against the vocabulary's mean row): a student taught to end
    # toxic continuations learns to push these tokens everywhere and ends benign answers early (docs/speed-distill.md).
    eog_free: bool = False
    chat_tokens: int = 32  # the longest answer the unedited model writes to each of the `chat_starts` questions
    prompts: str = "rtp-perspective"  # discovery prompts (those also in rtp-challenging are always left out)
    max_prompts: int = 0  # 0: every prompt of the set that is not an evaluation prompt
    max_new_tokens: int = 20  # tokens of each greedy continuation the teacher and the unedited model write
    # Also this many continuations of each prompt sampled from the unedited model (temperature 1, nucleus `top_p`:
    # `pydetox eval --samples`' decoding) as toxic contexts: greedy continuations alone show the student none of the
    # contexts a sampled continuation reaches, and an edit trained on them cut toxicity about half as much sampled
    # as greedy (docs/results/default-recipe-seeds.md).
    samples: int = 0
    top_p: float = 0.9  # the nucleus of those samples: the likeliest tokens holding this much probability together
    max_tokens: int = 64  # prompts and texts are cut to this many tokens
    seed: int = 0  # the data draw, the held-out split and (unless train_seed) the training
    # The training's own seed (the update's initialisation and the order of the batches); -1: `seed`. Unlike `seed`
    # it leaves the teacher's data and the held-out split alone, so a second training run reads the same cache and is
    # measured on the same held-out sequences.
    train_seed: int = -1
    # A .npz file for the teacher's contexts and distributions: written after they are computed, read instead of
    # computing them when every setting they depend on (model file, calibrator, alpha, top_k, plausible, the data and
    # lengths, seed) is the same. Tuning rank, lr, steps or clean_weight then skips the teacher (~7 min on SmolLM2,
    # ~10 on Gemma-3: 9.5 min to the written cache in the second run).
    cache: str = ""
    # An anti-expert: a calibrator trained on the toxic side of the pairs (`pydetox calibrate train --side toxic
    # --clean-tokens 0`; the anti-expert of DExperts, Liu et al. ACL 2021), fused with the unedited model at
    # `anti_alpha`. The teacher's top-k probabilities are multiplied by exp(anti_lambda * min(0, p_unedited - p_anti))
    # and renormalised with the rest bucket (which is left as it is): the decay of self-debiasing (Schick et al.,
    # TACL 2021), with the anti-expert in place of a self-debiasing prompt. Only tokens the anti-expert gives more
    # probability than the unedited model lose mass, by how much more in probability (not in log-probability): the
    # anti-expert is trained on short, lower-case comments, and its log-ratio to the unedited model (DExperts' own
    # rule) also rewards what it finds unlikely for style alone ('.' after "I'm going to" to 0.89 on Gemma-3).
    # The calibrator is trained on clean text and leaves some insults and threats to the teacher; the anti-expert
    # rates them up (' stupid', ' kill', ' damn'). Special tokens get no penalty (the anti-expert's texts all end at
    # EOS). On Gemma-3, most of what it moves against the unedited model is style ('▁i', '▁.', 'and': ParaDetox's
    # sentences are lower-case, with spaces before punctuation), not toxicity (docs/results/detox-runs.md). Both
    # log-probabilities at the teacher's top-k tokens are kept in `cache`'s sibling CACHE.anti.npz (they depend on
    # the teacher, the anti-expert and anti_alpha).
    anti: str = ""
    anti_alpha: float = 0.5  # mixing weight of the anti-expert (and expert) with the unedited model
    anti_lambda: float = 50.0  # strength of the anti-expert's penalty
    # The expert of DExperts: a calibrator trained like the anti-expert on the other side of the same pairs
    # (`--side neutral --clean-tokens 0`), fused with the unedited model at `anti_alpha`, in place of the unedited
    # model in the rule above: exp(anti_lambda * min(0, p_expert - p_anti)). The pairs differ in their toxic words
    # and share their style, so the style the anti-expert learnt is learnt by the expert as well and cancels.
    # Kept in CACHE.expert.npz.
    expert: str = ""
    # "prob": the rule above. "ratio": exp(anti_lambda * min(0, log p_ref - log p_anti + log anti_margin)), p_ref the
    # expert's (or the unedited model's): DExperts' log-ratio, penalty only, for tokens the anti-expert rates more
    # than anti_margin times likelier; with anti_lambda 1, such a token's probability is divided by the excess.
    # The probability rule's changes fall mostly on frequent words ('▁the', '▁a'), whose probabilities are large;
    # the ratio rule's less so. Neither has yet cut more than the same run without an anti-expert (Gemma-3, two
    # seeds: docs/results/detox-runs.md).
    anti_rule: str = "prob"
    anti_margin: float = 3.0  # ratio rule: how many times likelier the anti-expert must rate a token
    # "bfloat16": the student's forward and backward passes under torch's CPU autocast (the update and Adam's state
    # stay float32). A SmolLM2 step 1.8x faster on a Xeon with AMX (bench/bench_recipe.py); the recipe's default.
    precision: str = "float32"
    # "random": each step's sequences drawn at random. "length": batches of sequences of similar length (a sortish
    # sampler: a shuffled pool of 32 batches sorted by length, cut into batches, the batches shuffled), so that a
    # batch pads little; every sequence is seen once per epoch.
    batching: str = "random"
    # Keep only each edited decoder layer's input for the backward pass and compute the layer again there (activation
    # checkpointing, Chen et al. 2016): a training step's activations, 1.4 GB of a Qwen2.5-0.5B step at the default
    # batch, shrink to the layers' inputs, for one more forward pass of the edited layers per step. The same gradients.
    recompute: int = 0
    # At most this many held-out sequences of each kind (toxic, clean) for the before/after KLs (0: all of them);
    # the held-out split itself does not change.
    held_out: int = 0


def _check(p: DistillParams, source: Path) -> None:
    """Every parameter that can be checked before the teacher's half hour, checked."""
    if not p.calibrator:
        raise PydetoxError("distill needs a calibrator: --param calibrator=CAL.gguf (from `pydetox calibrate train`)")
    if not Path(p.calibrator).is_file():
        raise PydetoxError(f"distill: expected a calibrator GGUF at {p.calibrator}, found nothing")
    if source.suffix != ".gguf" or not source.is_file():
        raise PydetoxError(f"distill runs the fused teacher in llama.cpp and needs the model as a GGUF file; got {source}")
    if p.one_sided < 0:
        raise PydetoxError(f"distill: one_sided must be >= 0, got {p.one_sided}")
    if p.toxic_gate and p.one_sided <= 0:
        raise PydetoxError("distill: toxic_gate weights the one-sided teacher's lowering; it needs one_sided > 0")
    if not 0.0 <= p.plausible < 1.0:
        raise PydetoxError(f"distill: plausible must lie in [0, 1), got {p.plausible}")
    if p.clean_kl not in ("top", "full"):
        raise PydetoxError(f"distill: clean_kl is 'top' or 'full', got {p.clean_kl!r}")
    if p.anti and not Path(p.anti).is_file():  # checked before the teacher's half hour, not after
        raise PydetoxError(f"distill: expected an anti-expert GGUF at {p.anti}, found nothing")
    if p.expert and not (p.anti and Path(p.expert).is_file()):
        raise PydetoxError(f"distill: an expert needs an anti-expert (anti=...) and a GGUF at {p.expert}; got "
                           f"anti={p.anti!r}, and {'a file' if Path(p.expert).is_file() else 'nothing'} there")
    if not 0.0 <= p.anti_alpha <= 1.0 or p.anti_lambda < 0:
        raise PydetoxError(f"distill: anti_alpha must lie in [0, 1] and anti_lambda be >= 0, got {p.anti_alpha}, "
                           f"{p.anti_lambda}")
    if p.anti_rule not in ("prob", "ratio") or p.anti_margin < 1:
        raise PydetoxError(f"distill: anti_rule is 'prob' or 'ratio' and anti_margin >= 1, got {p.anti_rule!r}, "
                           f"{p.anti_margin}")
    if p.batching not in ("random", "length"):
        raise PydetoxError(f"distill: batching is 'random' or 'length', got {p.batching!r}")
    if p.samples < 0 or not 0.0 < p.top_p <= 1.0:
        raise PydetoxError(f"distill: samples must be >= 0 and top_p lie in (0, 1], got {p.samples}, {p.top_p}")
    if p.rank < 1 or p.steps < 1 or p.batch < 1:
        raise PydetoxError(f"distill: rank, steps and batch must be >= 1, got {p.rank}, {p.steps}, {p.batch}")
