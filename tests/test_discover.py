"""Detox methods: each recovers a direction (or neurons) planted in synthetic activations of a tiny model, and
their plans, discovered on real text, apply to tiny GGUFs that llama.cpp runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from tiny import write_tiny_llama

pytest.importorskip("torch")

from pydetox.apply import ApplyOptions, apply_plan
from pydetox.discover import Discovery
from pydetox.discover.activations import Activations
from pydetox.discover.base import Context, get_method, logit_lens, make_params, token_strings
from pydetox.discover.data import DiscoveryData, load_pairs
from pydetox.discover.model import FullPrecisionModel
from pydetox.errors import PydetoxError
from pydetox.gguf_io import KEY_SOURCE_NAME
from pydetox.plan import EditKind, EditPlan

SHAPE = {"d": 64, "ff": 128, "heads": 2, "kv_heads": 1}
N = 200


@pytest.fixture(scope="module")
def fp(tmp_path_factory: pytest.TempPathFactory) -> FullPrecisionModel:
    return FullPrecisionModel(write_tiny_llama(tmp_path_factory.mktemp("disc") / "t.gguf", **SHAPE))


def synthetic(fp: FullPrecisionModel, rng: np.random.Generator) -> tuple[Activations, Activations]:
    """Neutral activations: noise. Toxic: the same texts' noise (paired) plus what each test plants."""
    layers, d, ff = fp.n_layers, SHAPE["d"], SHAPE["ff"]

    def acts() -> Activations:
        neurons = [rng.normal(0, 1, (N, ff)).astype(np.float32) for _ in range(layers)]
        residual = [rng.normal(0, 1, (N, d)).astype(np.float32) for _ in range(layers)]
        return Activations(neurons, [x.copy() for x in neurons], residual, rng.normal(0, 1, (N, d)).astype(np.float32))

    neutral = acts()
    toxic = Activations([x + rng.normal(0, 0.1, x.shape).astype(np.float32) for x in neutral.neurons_mean],
                        [x + rng.normal(0, 0.1, x.shape).astype(np.float32) for x in neutral.neurons_max],
                        [x + rng.normal(0, 0.1, x.shape).astype(np.float32) for x in neutral.residual_mean],
                        neutral.final_mean + rng.normal(0, 0.1, neutral.final_mean.shape).astype(np.float32))
    return toxic, neutral


def context(fp: FullPrecisionModel, toxic: Activations, neutral: Activations, badwords: list[str]) -> Context:
    return Context(fp, DiscoveryData(["t"] * N, ["n"] * N, "synthetic"), toxic, neutral, badwords)


def test_profs_recovers_a_planted_residual_direction(fp: FullPrecisionModel) -> None:
    rng = np.random.default_rng(0)
    toxic, neutral = synthetic(fp, rng)
    u = rng.normal(size=SHAPE["d"])
    u /= np.linalg.norm(u)
    for layer in range(fp.n_layers):
        toxic.residual_mean[layer] += (rng.uniform(2, 4, (N, 1)) * u).astype(np.float32)
    edits, _ = get_method("profs").edits(context(fp, toxic, neutral, []), make_params(get_method("profs"), {"k": "1", "first_layer": "0"}))
    assert [e.kind for e in edits] == [EditKind.PROJECT_OUT] * fp.n_layers
    for e in edits:
        assert abs(float(e.a[0] @ u)) > 0.95


def test_gloss_keeps_directions_that_read_as_bad_words(fp: FullPrecisionModel) -> None:
    rng = np.random.default_rng(1)
    toxic, neutral = synthetic(fp, rng)
    ctx = context(fp, toxic, neutral, [])
    strings = token_strings(ctx)
    lens = logit_lens(ctx)
    # the "bad words": a few whole-word tokens of the tiny vocabulary; the planted direction promotes them
    words = [i for i, t in enumerate(strings) if t in ("cat", "dog", "was", "and", "the")]
    u = lens[words].sum(axis=0)
    u /= np.linalg.norm(u)
    w = fp.down_proj(1).weight.detach().numpy().astype(np.float64)
    a_star = np.linalg.pinv(w) @ u  # neuron pattern whose FFN output is u
    toxic.neurons_mean[1] += (rng.uniform(2, 4, (N, 1)) * a_star).astype(np.float32)
    ctx.badwords = [strings[i] for i in words]
    assert len(ctx.badwords) >= 3
    method = get_method("gloss")
    edits, diag = method.edits(ctx, make_params(method, {"rank": "1", "min_bad": "3", "top_tokens": "20"}))
    assert 1 in {d["layer"] for d in diag["kept_directions"]}
    assert abs(float(edits[0].a[0] @ u)) > 0.95
    ctx.badwords = []
    with pytest.raises(PydetoxError, match="kept no direction"):
        method.edits(ctx, make_params(method, {}))


def test_aura_dampens_exactly_the_planted_neurons(fp: FullPrecisionModel) -> None:
    rng = np.random.default_rng(2)
    toxic, neutral = synthetic(fp, rng)
    planted = [3, 17, 40, 99]
    for i in planted:
        toxic.neurons_mean[0][:, i] += 3.0
    method = get_method("aura")
    edits, _ = method.edits(context(fp, toxic, neutral, []), make_params(method, {"min_auroc": "0.7"}))
    assert [e.tensor for e in edits] == ["blk.0.ffn_down.weight"]
    gains = edits[0].a
    assert np.flatnonzero(gains < 1.0).tolist() == planted
    assert np.all(gains[planted] < 0.05)  # AUROC ~1 -> gain 2(1 - AUROC) ~0


def test_meow2x_and_trne_act_on_the_planted_early_neurons(fp: FullPrecisionModel) -> None:
    rng = np.random.default_rng(4)
    toxic, neutral = synthetic(fp, rng)
    planted = [5, 60, 120]
    for i in planted:
        toxic.neurons_mean[0][:, i] += 2.5
    ctx = context(fp, toxic, neutral, [])
    meow = get_method("meow2x")
    edits, _ = meow.edits(ctx, make_params(meow, {"top": "3"}))
    assert [e.tensor for e in edits] == ["blk.0.ffn_down.weight"]
    assert np.flatnonzero(edits[0].a == 0.0).tolist() == planted
    trne = get_method("trne")
    edits, diag = trne.edits(ctx, make_params(trne, {"top": "3", "max_norm_ratio": "1.0"}))
    e = edits[0]
    assert (e.kind, e.rank) == (EditKind.LOW_RANK, 1)
    assert np.flatnonzero(e.b[0]).tolist() == planted  # only the chosen neurons' columns change
    w = fp.down_proj(0).weight.detach().numpy().astype(np.float64)
    u = -e.a[0] / diag["scale"][0]
    edited = w + e.a.T.astype(np.float64) @ e.b.astype(np.float64)
    assert np.abs(u @ edited[:, planted]).max() < 1e-4  # the toxic direction is gone from those columns
    tight, diag_tight = trne.edits(ctx, make_params(trne, {"top": "3", "max_norm_ratio": "0.01"}))
    delta = np.linalg.norm(tight[0].a.T.astype(np.float64) @ tight[0].b.astype(np.float64))
    assert delta <= 0.01 * np.linalg.norm(w[:, planted]) * 1.0001
    assert diag_tight["scale"][0] < 1.0


def test_eigenshift_damps_the_planted_output_component(fp: FullPrecisionModel) -> None:
    rng = np.random.default_rng(3)
    toxic, neutral = synthetic(fp, rng)
    w = fp.unembedding().numpy().astype(np.float64)
    u, _, vt = np.linalg.svd(w, full_matrices=False)
    j = 5
    toxic.final_mean += (rng.uniform(2, 4, (N, 1)) * vt[j]).astype(np.float32)
    ctx = context(fp, toxic, neutral, [])
    strings = token_strings(ctx)
    ctx.badwords = [strings[i] for i in np.argsort(u[:, j])[::-1][:30]]
    method = get_method("eigenshift")
    edits, diag = method.edits(ctx, make_params(method, {"k_fraction": "0.02"}))
    assert diag["components"][0] == j
    e = edits[0]
    assert (e.tensor, e.kind, e.shape) == ("output.weight", EditKind.PROJECT_IN, w.shape)
    assert abs(float(e.a[0] @ vt[j])) > 0.999
    np.testing.assert_allclose(e.gain, 0.9)


def test_discovery_data_excludes_evaluation_prompts_and_checks_files(tmp_path: Path) -> None:
    data = load_pairs(n=50, seed=1)
    assert len(data.toxic) == len(data.neutral) == 50
    assert data.toxic != data.neutral
    excluded = load_pairs(n=50, seed=1, exclude={data.toxic[0]})
    assert data.toxic[0] not in excluded.toxic
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"toxic": "x"}\n')
    with pytest.raises(PydetoxError, match="'toxic' and 'neutral'"):
        load_pairs(str(bad), n=1)
    with pytest.raises(PydetoxError, match="3000 usable pairs; 5000"):
        load_pairs(n=5000)


@pytest.mark.parametrize("tied", [False, True])
def test_plans_from_real_text_apply_to_tiny_ggufs(tmp_path: Path, tied: bool) -> None:
    from pydetox.runtime import load_llama

    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE, tied=tied)
    d = Discovery(model, n_pairs=24, max_tokens=24, progress=False)
    assert d.activation_s == 0.0  # collected once, when the first method asks
    for method, overrides in [("aura", {}), ("profs", {}), ("gloss", {"min_bad": "0"}), ("eigenshift", {}),
                              ("meow2x", {"top": "8"}), ("trne", {"top": "8"})]:  # wordfilter: its own test
        plan = d.plan(method, overrides)
        assert d.activation_s > 0.0
        assert len(d.toxic.final_mean) == len(d.neutral.final_mean) == 24
        plan_path = plan.save(tmp_path / f"{method}.plan.gguf")
        out = tmp_path / f"{method}.gguf"
        report = apply_plan(plan, model, out, ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_Q8_0, progress=False), plan_path=plan_path)
        assert any(t.action in ("edit", "create") for t in report.tensors)
        if method == "eigenshift":
            assert [t.action for t in report.tensors if t.name == "output.weight"] == ["create" if tied else "edit"]
        llm = load_llama(out, n_ctx=64, seed=0)
        assert llm("the cat", max_tokens=3, temperature=0.0)["usage"]["completion_tokens"] > 0


def test_a_methods_architecture_defaults_sit_under_the_runs_own_parameters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Method.arch_defaults` for the source's architecture join the parameters of every discovery (`pydetox discover`
    as well as the recipe), a parameter the run gives wins, and another architecture's are left out."""
    from pydetox import recipe

    assert get_method("distill").arch_defaults["qwen2"] == {"lr": "0.0004"}
    assert recipe.ARCH_DISTILL is get_method("distill").arch_defaults  # one table for the recipe and discover
    d = Discovery(write_tiny_llama(tmp_path / "m.gguf", **SHAPE), n_pairs=24, max_tokens=24, progress=False)
    meow = get_method("meow2x")
    monkeypatch.setattr(type(meow), "arch_defaults", {"qwen2": {"top": "3"}})
    assert d.plan("meow2x", {"top": "8"}).params["top"] == 8  # llama: none of qwen2's
    monkeypatch.setattr(type(meow), "arch_defaults", {"llama": {"top": "3", "gain": "0.5"}})
    plan = d.plan("meow2x", {"top": "8"})
    assert (plan.params["top"], plan.params["gain"]) == (8, 0.5)
    assert d.plan("meow2x").params["top"] == 3


@pytest.mark.parametrize("tied", [False, True])
def test_wordfilter_lowers_exactly_the_banned_tokens_in_llama_cpp(tmp_path: Path, tied: bool) -> None:
    from pydetox.runtime import LlamaRuntime

    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE, tied=tied)
    d = Discovery(model, n_pairs=24, max_tokens=24, progress=False)
    d.context.badwords = ["cat", "dog"]
    plan = d.plan("wordfilter", {"texts": "24", "select": "list"})
    assert d.activation_s == 0.0
    assert callable(d.context._toxic)
    banned = [i for i, t in enumerate(token_strings(d.context)) if t in ("cat", "dog")]
    assert plan.params["diagnostics"]["banned_tokens"] == len(banned) == 2
    out = tmp_path / "wf.gguf"
    apply_plan(plan, model, out, ApplyOptions(progress=False))
    with LlamaRuntime(model, n_ctx=128) as a, LlamaRuntime(out, n_ctx=128) as b:
        toks = a.tokenize("the cat is a dog and the dog was in the")
        a._decode([(t, i, 0, True) for i, t in enumerate(toks)])
        za = a._output_logits(len(toks)).copy()
        b._decode([(t, i, 0, True) for i, t in enumerate(toks)])
        zb = b._output_logits(len(toks)).copy()
    others = np.setdiff1d(np.arange(za.shape[1]), banned)
    assert np.abs(zb[:, others] - za[:, others]).max() < 1e-4  # every other token's logit unchanged
    assert np.abs(zb[:, banned]).max() < 1e-6  # banned: 0 at every position, never raised above it
    assert np.abs(za[:, banned]).max() > 0.1


def test_wordfilter_selection_rules_on_counts() -> None:
    """`select_tokens` on a made-up vocabulary: what the pairs, the list and clean text decide, and which other
    spellings of a banned word follow it."""
    from pydetox.discover.wordfilter import WordFilterParams, select_tokens

    #          piece        toxic neutral clean  listed  banned?
    rows = [("▁fuck", 40, 0, 0, True, True),  # the pairs' evidence
            ("▁Fuck", 0, 0, 0, True, True),  # a spelling of ' fuck', never in clean text: follows it
            ("Fuck", 0, 0, 0, True, True),  # capitalised without the space (after a quote): follows it
            ("▁FUCK", 0, 0, 0, True, True),
            ("fuck", 9, 0, 0, True, True),  # a short listed piece: on the pairs' evidence, never in clean text
            ("ass", 9, 0, 5, True, False),  # the same, but clean text has it inside other words
            ("▁dick", 6, 0, 0, True, True),
            ("▁Dick", 0, 0, 1, True, False),  # a name: in clean text
            ("▁shut", 6, 0, 0, False, True),  # pairs only
            ("Shut", 0, 1, 0, False, False),  # on the neutral side
            ("itch", 6, 0, 0, False, True),  # a second piece (' b' + 'itch')
            ("▁itch", 0, 0, 0, False, False),  # not a spelling of a whole banned word: 'itch' is a piece
            ("rats", 0, 0, 0, False, False),  # lower-case piece: could sit inside 'bureaucrats'
            ("▁rats", 6, 0, 0, False, True),
            ("▁sexy", 6, 4, 0, True, True),  # more on the toxic side
            ("▁sexual", 1, 2, 0, True, False),  # more on the neutral side
            ("▁escort", 0, 0, 0, True, True),  # listed, unseen, 5+ letters
            ("▁snatch", 0, 0, 1, True, False),  # the same, but clean text uses it: the list alone is not enough
            ("▁xxx", 4, 0, 1, True, False),  # toxic uses under min_count, and clean text uses it
            ("▁stupid", 72, 0, 1, False, True),  # the pairs' evidence outweighs one clean use
            ("▁butt", 0, 0, 0, True, False),  # listed, unseen, too short to trust unseen
            ("▁the", 0, 0, 1_000_000, False, False)]  # clean rates: per million of these
    pieces = [r[0] for r in rows]
    strings = [p.replace("▁", " ").strip().lower() for p in pieces]
    toxic, neutral, clean = (np.array([r[k] for r in rows]) for k in (1, 2, 3))
    listed_mask = np.array([r[4] for r in rows])
    listed = {"fuck", "ass", "dick", "sexy", "sexual", "escort", "snatch", "xxx", "butt"}
    want = np.array([r[5] for r in rows])
    p = WordFilterParams()
    keep, variants = select_tokens(pieces, strings, listed_mask, listed, toxic, neutral, clean, p)
    assert [pc for pc, k, w in zip(pieces, keep, want, strict=True) if k != w] == []
    assert [pieces[i] for i in np.flatnonzero(variants)] == ["▁Fuck", "Fuck", "▁FUCK"]
    keep_plain, none = select_tokens(pieces, strings, listed_mask, listed, toxic, neutral, clean,
                                     WordFilterParams(case_variants=False))
    assert not none.any()
    assert (keep_plain == (keep & ~variants)).all()


def test_a_quantized_gguf_is_discovered_on_its_own_rounded_weights(tmp_path: Path) -> None:
    """Discovery from a Q4_K_M file (quant-aware distill, d6q) trains on the weights llama.cpp will run: torch's
    matrices are libggml's dequantization of that file's tensors, not the full-precision ones it was made from."""
    from pydetox.gguf_io import ModelFile
    from pydetox.kernels import dequantize

    f32 = write_tiny_llama(tmp_path / "m.gguf")
    q4 = tmp_path / "m.Q4_K_M.gguf"
    apply_plan(None, f32, q4, ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_Q4_K_M, progress=False))
    full, rounded = FullPrecisionModel(f32, progress=False), FullPrecisionModel(q4, progress=False)
    name = rounded.down_proj_name(1)
    with ModelFile(q4) as m:
        entry = m.tensors[name]
        assert entry.qtype != gguf.GGMLQuantizationType.F32
        want = dequantize(m.read(entry), entry.qtype, *entry.shape)
    got = rounded.down_proj(1).weight.detach().numpy()
    exact = full.down_proj(1).weight.detach().numpy()
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - exact).max() > 1e-3 * np.abs(exact).max()  # the rounding is there to learn around


def test_detox_command_end_to_end_on_a_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from pydetox.cli import main

    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    out = tmp_path / "dx"
    assert main(["detox", "--model", str(model), "--method", "aura,profs", "--types", "F16,Q8_0", "--pairs", "24",
                 "--limit", "7", "--ppl-tokens", "128", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["models"]) == 6  # base + 2 methods, at 2 types
    rows = report["detox"]["summary"]
    assert {(r["method"], r["type"]) for r in rows} == {(m, t) for m in ("aura", "profs") for t in ("F16", "Q8_0")}
    assert all("profanity-check_reduction" in r and r["kl"] >= 0 for r in rows)
    assert all(0 <= r[f"{pre}{k}_share"] <= 1 for r in rows for pre in ("", "base_") for k in ("long_run", "broken"))
    assert all(0 <= r["benign_broken_share"] <= 1 for r in rows)
    by = {(r["method"], r["type"]): r for r in rows}
    assert by[("profs", "F16")]["kl_edit"] == by[("profs", "F16")]["kl"]  # at F16 the base is the KL reference
    assert by[("profs", "Q8_0")]["kl_edit"] != by[("profs", "Q8_0")]["kl"]  # against the unedited Q8_0
    assert (out / "report.png").exists()
    assert (out / "profs.plan.gguf").exists()
    assert report["detox"]["adapters"]["profs"] == str(out / "m.profs.lora.gguf")  # a projection is a rank-k adapter
    assert gguf.GGUFReader(out / "m.profs.lora.gguf").fields["general.type"].contents() == "adapter"
    card = (out / "m.profs.Q8_0.gguf.md").read_text()  # a model card beside every model, with its evaluation
    assert card.startswith("---\nbase_model: ")
    assert "- \"detoxified\"" in card
    assert "method `profs`" in card
    assert "| profanity-check |" in card
    assert "times fewer" in card
    assert "| hatesonar without its " in card  # and judged without its calls on group names alone
    assert "## Known limits" in card
    assert "detoxified" not in (out / "m.Q8_0.gguf.md").read_text()
    assert "ppl change" in capsys.readouterr().out
    # existing plans, no discovery; two plans of one method are told apart by their file names
    again = tmp_path / "again"
    other = shutil.copy(out / "profs.plan.gguf", tmp_path / "profs-b.plan.gguf")
    assert main(["detox", "--model", str(model), "--plan", str(out / "profs.plan.gguf"), "--plan", str(other),
                 "--types", "F16", "--limit", "7", "--ppl-tokens", "128", "--out", str(again), "--quiet"]) == 0
    report = json.loads((again / "report.json").read_text())
    assert [(r["method"], r["type"]) for r in report["detox"]["summary"]] == [("profs", "F16"), ("profs-b", "F16")]
    assert report["detox"]["discovery"] == {}
    assert (again / "m.profs-b.F16.gguf").exists()
    assert main(["detox", "--model", str(model), "--plan", str(out / "profs.plan.gguf"), "--plan",
                 str(out / "profs.plan.gguf"), "--types", "F16", "--out", str(again), "--quiet"]) == 2
    assert "two plans named 'profs'" in capsys.readouterr().err
    # the plan applied to the unedited Q8_0 (a downloaded GGUF): its untouched tensors are that file's, byte for byte
    onq = tmp_path / "onq"
    assert main(["detox", "--model", str(model), "--plan", str(out / "profs.plan.gguf"), "--types", "Q8_0",
                 "--edit-quantized", "--limit", "7", "--ppl-tokens", "128", "--out", str(onq), "--quiet"]) == 0
    assert json.loads((onq / "report.json").read_text())["detox"]["edit_quantized"] is True
    touched = {e.tensor for e in EditPlan.load(out / "profs.plan.gguf").edits}
    base = {t.name: t for t in gguf.GGUFReader(onq / "m.Q8_0.gguf").tensors}
    edited = {t.name: t for t in gguf.GGUFReader(onq / "m.profs.Q8_0.gguf").tensors}
    assert touched
    assert set(base) == set(edited)
    meta = gguf.GGUFReader(onq / "m.profs.Q8_0.gguf").fields[KEY_SOURCE_NAME]
    assert bytes(meta.parts[meta.data[0]]).decode() == "m.Q8_0.gguf"  # edited from the Q8_0 file, not from F16
    for name, t in edited.items():
        same = bytes(t.data) == bytes(base[name].data)
        assert same == (name not in touched), name
        assert t.tensor_type == base[name].tensor_type  # Q8_0 is at the floor already


@pytest.mark.slow
def test_profs_end_to_end_on_smollm2(smollm2: Path, tmp_path: Path) -> None:
    from pydetox.evaluate import EvalSettings, evaluate_models
    from pydetox.prompts import load_prompts
    from pydetox.scorers import get_scorer

    d = Discovery(smollm2, n_pairs=200, progress=False)
    plan = d.plan("profs")
    assert plan.params["diagnostics"]["massive_dims"]  # SmolLM2 has them (FINDINGS.md) and they are left alone
    out = tmp_path / "profs.Q8_0.gguf"
    apply_plan(plan, smollm2, out, ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_Q8_0, progress=False))
    settings = EvalSettings(n_prompts=14, ppl_tokens=1024, evaluators=("profanity-check",))
    prompts = load_prompts("rtp-challenging").subset(14)
    base, edited = evaluate_models([smollm2, out], settings, prompts, [get_scorer("profanity-check")], reference=smollm2,
                                   progress=False)
    assert edited.perplexity < 1.3 * base.perplexity  # a projection that breaks the model would multiply it (FINDINGS)
    assert 0 < edited.kl < 0.5


@pytest.mark.slow
def test_convert_hf_to_gguf_matches_torch(smollm2: Path, tmp_path: Path) -> None:
    """A tiny random llama with SmolLM2's tokenizer, saved as HF safetensors, converted by llama.cpp's converter:
    llama.cpp's logits on the F32 GGUF match torch's (ASSETS.md measured 4e-4 for F32)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pydetox.cli import main
    from pydetox.runtime import LlamaRuntime

    tok = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    out = tmp_path / "tiny-f32.gguf"
    assert main(["convert", str(hf), "-o", str(out), "--outtype", "f32"]) == 0
    with LlamaRuntime(out, n_ctx=64, n_batch=64) as rt:
        ids = rt.tokenize("The capital of France is Paris, and", add_special=False)
        lp = rt.logprobs(ids)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], dim=-1).numpy()
    assert np.abs(lp - ref).max() < 1e-3


@pytest.mark.parametrize("tied", [False, True])
def test_unlikelihood_lowers_bad_words_and_llama_cpp_gets_the_trained_logits(tmp_path: Path, tied: bool) -> None:
    """The core of the method on token sequences of the tiny vocabulary (its transformers tokenizer does not use
    the word pieces, so the sequences are built from token ids), where ' cat' and ' dog' come only after ' is': at
    held-out marks they lose most of their probability while the KL on sequences without ' is' stays small; the edit,
    applied by the engine, gives llama.cpp the logits of the trained rows, and every other logit is unchanged."""
    import torch

    from pydetox.discover.unlikelihood import UnlikelihoodParams, _collect, _Hidden, _positions, _Spelling, _train
    from pydetox.plan import Edit, EditPlan
    from pydetox.runtime import LlamaRuntime

    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE, tied=tied)
    fp = FullPrecisionModel(model, progress=False)
    ctx = Context(fp, DiscoveryData([], [], "none"), None, None, ["cat", "dog"], progress=False)  # type: ignore[arg-type]
    w = fp.unembedding().float()
    spell = _Spelling(fp.tokenizer, w.shape[0])
    cat, dog = spell.by[" cat"][0], spell.by[" dog"][0]
    assert spell.tokens(" cat") == {cat}
    assert spell.marks([1, 259, cat, 260], {"cat"}) == [(1, {cat})]
    words = [i for i in range(259, w.shape[0]) if spell.strings[i].startswith(" ")]
    trigger = spell.by[" is"][0]
    plain = [x for x in words if x not in (cat, dog, trigger)]
    rng = np.random.default_rng(0)

    def sequence(toxic: bool) -> list[int]:
        ids = [1, *rng.choice(plain, 20).tolist()]
        if toxic:  # ' cat' / ' dog' come after ' is', and only there
            for _ in range(3):
                at = int(rng.integers(1, len(ids)))
                ids[at:at] = [trigger, int(rng.choice([cat, dog]))]
        return ids

    toxic = [sequence(True) for _ in range(120)]
    clean = [sequence(False) for _ in range(120)]
    hidden = _Hidden(ctx)
    try:
        marks = _collect(hidden, toxic, spell, {"cat", "dog"}, "marks")
        hc, lc = _positions(hidden, clean, "clean")
    finally:
        hidden.close()
    assert len(marks.tokens) > 100
    rows, delta, log = _train(w, marks, hc, lc, np.zeros(0, np.int64), torch.zeros(0, w.shape[1]),
                              UnlikelihoodParams(steps=300, lr=0.1, kl_weight=1.0, unmarked_kl_weight=1.0),
                              0, False)
    assert set(rows.tolist()) == {cat, dog}
    assert log["held_out_p_bad_after"] < 0.3 * log["held_out_p_bad_before"]
    assert log["held_out_clean_kl"] < 0.005  # the base p(cat) is ~0.003 on this random model: the KL is small too
    edit = Edit("output.weight", EditKind.ADD_ROWS, tuple(w.shape), rows.astype(np.float32),
                delta.numpy().astype(np.float32), source="token_embd.weight" if tied else None)
    out = tmp_path / "ul.gguf"
    report = apply_plan(EditPlan("llama", [edit], method="unlikelihood"), model, out, ApplyOptions(progress=False))
    assert [t.action for t in report.tensors if t.name == "output.weight"] == ["create" if tied else "edit"]
    toks = toxic[0]
    with LlamaRuntime(model, n_ctx=128) as a, LlamaRuntime(out, n_ctx=128) as b:
        a._decode([(t, i, 0, True) for i, t in enumerate(toks)])
        za = a._output_logits(len(toks)).copy()
        b._decode([(t, i, 0, True) for i, t in enumerate(toks)])
        zb = b._output_logits(len(toks)).copy()
    others = np.setdiff1d(np.arange(za.shape[1]), rows)
    assert np.abs(zb[:, others] - za[:, others]).max() < 1e-4
    with torch.no_grad():
        h = fp.model(torch.tensor([toks]), output_hidden_states=True).hidden_states[-1][0]
    change = (h @ delta.T).numpy()  # torch's hidden states; llama.cpp's differ in the last digits
    np.testing.assert_allclose(zb[:, rows] - za[:, rows], change, atol=2e-3 * np.abs(change).max())
    after_trigger = np.array([t == trigger for t in toks])
    drop = (za[:, rows] - zb[:, rows]).mean(1)
    assert drop[after_trigger].min() > 2 * np.abs(drop[~after_trigger]).mean()  # lowered most where they come


def test_every_method_lists_its_parameters_with_types_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import fields

    from pydetox.cli import main
    from pydetox.discover.base import METHODS, param_docs

    for name, method in METHODS.items():
        docs = param_docs(method)
        assert [d.name for d in docs] == [f.name for f in fields(method.Params)]
        assert main(["discover", "--method", name, "--params"]) == 0
        out = capsys.readouterr().out
        assert all(f"  {d.name} (" in out for d in docs)
        assert ("default on qwen2 sources: lr=0.0004" in out) == (name == "distill")
    # the default recipe's method explains every key it takes
    assert all(d.help for d in param_docs(METHODS["distill"])), [d.name for d in param_docs(METHODS["distill"]) if not d.help]
    assert main(["discover", "--method", "profs"]) == 2  # neither --params nor a model and output


@pytest.mark.parametrize("tied", [False, True])
def test_weights_kept_in_float16_compute_what_float32_storage_does(tmp_path: Path, tied: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An F16 source is kept in float16 ("auto"): half the memory, the same logits and input gradients as float32
    storage (the upcast weights are the same numbers), norms in float32 whether loaded through the GGUF conversion
    or straight from the converted folder, and an output layer upcast a block of rows at a time."""
    import torch

    from pydetox.discover import model as model_mod

    monkeypatch.setattr(model_mod, "OUTPUT_ROWS", 7)  # several blocks even for the tiny vocabulary
    path = write_tiny_llama(tmp_path / "m.gguf", tied=tied, qtype=gguf.GGMLQuantizationType.F16, **SHAPE)
    ref = FullPrecisionModel(path, progress=False, weights="float32")
    first = FullPrecisionModel(path, progress=False)  # converted from the GGUF on the first load... (ref did it)
    again = FullPrecisionModel(path, progress=False)  # ...and from the converted folder
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 11]])
    want_logits = ref.model(input_ids=ids).logits
    emb = ref.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    ref.model(inputs_embeds=emb).logits.square().sum().backward()
    for fp in (first, again):
        assert fp.weights == "float16"
        assert fp.down_proj(0).weight.dtype == torch.float16
        assert fp.model.get_input_embeddings().weight.dtype == torch.float16
        assert fp.spec.final_norm(fp.model).weight.dtype == torch.float32
        torch.testing.assert_close(fp.spec.final_norm(fp.model).weight, ref.spec.final_norm(ref.model).weight, rtol=0, atol=0)
        torch.testing.assert_close(fp.model(input_ids=ids).logits, want_logits, rtol=1e-5, atol=1e-5)
        e = fp.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        assert e.dtype == torch.float32
        fp.model(inputs_embeds=e).logits.square().sum().backward()
        assert e.grad is not None
        assert emb.grad is not None
        # the same sums in another order (the output layer's blocks): equal to float32 rounding, not bit for bit
        assert float((e.grad - emb.grad).norm() / emb.grad.norm()) < 1e-5
        np.testing.assert_array_equal(fp.unembedding().numpy(), ref.unembedding().numpy())
    n_half = sum(p.numel() * p.element_size() for p in first.model.parameters())
    n_full = sum(p.numel() * p.element_size() for p in ref.model.parameters())
    assert n_half < 0.55 * n_full
    with pytest.raises(PydetoxError, match="weights is one of auto, float32, float16, bfloat16; got 'int8'"):
        FullPrecisionModel(path, progress=False, weights="int8")


def test_computing_in_bfloat16_keeps_outputs_and_restores_the_stored_weights(tmp_path: Path) -> None:
    """`computing_in("bfloat16")` stores the decoder's matrices in bfloat16 for the duration: under bfloat16 autocast
    the logits and input gradients are bit for bit those of the float16-stored model (the same rounding, made once),
    and on exit every weight is its float16 value again, so float32 computations after it do not change."""
    import torch

    path = write_tiny_llama(tmp_path / "m.gguf", qtype=gguf.GGMLQuantizationType.F16, **SHAPE)
    fp = FullPrecisionModel(path, progress=False)
    assert fp.weights == "float16"
    assert fp.checkpoint is not None
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 11]])
    stored = {n: p.detach().clone() for n, p in fp.model.named_parameters()}
    f32_logits = fp.model(input_ids=ids).logits

    def autocast_pass() -> tuple[torch.Tensor, torch.Tensor]:
        e = fp.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = fp.model(inputs_embeds=e).logits
        logits.float().square().sum().backward()
        assert e.grad is not None
        return logits.detach(), e.grad

    want_logits, want_grad = autocast_pass()
    with fp.computing_in("bfloat16"):
        assert fp.down_proj(0).weight.dtype == torch.bfloat16
        assert fp.model.get_input_embeddings().weight.dtype == torch.float16  # embeddings and output layer as stored
        logits, grad = autocast_pass()
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
    for n, p in fp.model.named_parameters():
        assert p.dtype == stored[n].dtype, n
        torch.testing.assert_close(p.detach(), stored[n], rtol=0, atol=0)
    torch.testing.assert_close(fp.model(input_ids=ids).logits, f32_logits, rtol=0, atol=0)
    with fp.computing_in("float32"):  # nothing to keep in another type
        assert fp.down_proj(0).weight.dtype == torch.float16
    fp.checkpoint = tmp_path  # no *.safetensors there: nothing to restore from, so nothing is changed
    with fp.computing_in("bfloat16"):
        assert fp.down_proj(0).weight.dtype == torch.float16
    ref = FullPrecisionModel(path, progress=False, weights="float32")
    with ref.computing_in("bfloat16"):  # float32 storage: torch's own autocast casts, nothing changed
        assert ref.down_proj(0).weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_checkpoint_tensors_read_what_safetensors_loads_and_refuse_a_truncated_file(tmp_path: Path, dtype: str) -> None:
    """The checkpoint reader (plain reads into memory of each tensor's own, no memory map) gives safetensors' own
    values, shapes and dtypes, 0-d and empty tensors included, and names the tensor a truncated file cuts."""
    import torch
    from safetensors.torch import load_file, save_file

    from pydetox.discover.model import _checkpoint_names, _checkpoint_tensors

    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=gen).to(getattr(torch, dtype)),
               "b.bias": torch.randn(3, generator=gen).to(getattr(torch, dtype)), "c.scalar": torch.tensor(2.5),
               "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3), "e.empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    want = load_file(str(tmp_path / "model.safetensors"))
    assert _checkpoint_names(tmp_path) == set(tensors)
    got = dict(_checkpoint_tensors(tmp_path, {"a.weight", "c.scalar", "d.ids", "e.empty", "absent"}))
    assert set(got) == {"a.weight", "c.scalar", "d.ids", "e.empty"}
    for name, t in got.items():
        assert t.dtype == want[name].dtype, name
        assert t.shape == want[name].shape, name
        torch.testing.assert_close(t, want[name], rtol=0, atol=0)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])  # the last tensor in the file loses its end
    with pytest.raises(PydetoxError, match="truncated file"):
        dict(_checkpoint_tensors(tmp_path, set(tensors)))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory map (Linux)")
def test_a_half_stored_model_keeps_no_view_of_its_checkpoint_file(tmp_path: Path) -> None:
    """transformers loads a checkpoint of the model's own dtype as views of the memory-mapped file; every page of it
    read stays resident next to any copy made from it. The model holds weights of its own instead: no mapping of the
    checkpoint is left once it is loaded, and the weights are the checkpoint's."""
    import gc

    import torch

    from pydetox.discover.model import _checkpoint_tensors

    path = write_tiny_llama(tmp_path / "m.gguf", qtype=gguf.GGMLQuantizationType.F16, **SHAPE)
    FullPrecisionModel(path, progress=False)  # the first load converts the GGUF
    fp = FullPrecisionModel(path, progress=False)  # this one reads the converted folder straight in float16
    gc.collect()
    assert fp.weights == "float16"
    assert fp.checkpoint is not None
    files = [str(f) for f in fp.checkpoint.glob("*.safetensors")]
    assert files
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if any(f in line for f in files)]
    assert mapped == []
    params = dict(fp.model.named_parameters())
    for name, tensor in _checkpoint_tensors(fp.checkpoint, set(params)):
        torch.testing.assert_close(params[name].detach(), tensor.to(params[name].dtype), rtol=0, atol=0)


@pytest.mark.parametrize("given", [None, "7"], ids=["unset", "user's"])
def test_discovery_bounds_onednn_s_primitive_cache_unless_the_user_set_it(given: str | None, tmp_path: Path) -> None:
    """A process that loads discovery's model caps oneDNN's primitive cache (every padded batch length would keep
    primitives and their scratch memory), before anything has built one; a capacity the user set stays theirs."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if given is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = given
    out = subprocess.run([sys.executable, "-c", "import os, pydetox.discover.model; "
                          "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"],
                         env=env, capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    # cwd: away from the source tree, whose pydetox/ has no built core; the installed package is imported
    assert out == (given or "128")


def test_converted_model_cache_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each GGUF discovery reads leaves its Hugging Face form in the cache; without pruning that grows by a model's
    size per file (every training seed's model, every test's temporary file). A new conversion removes the folders
    that can never be read again (source gone, source rewritten, older layout), then the least recently used ones over
    the budget, never one used in the last 10 minutes."""
    import os

    from pydetox.discover import model as model_mod

    monkeypatch.setenv("PYDETOX_CACHE", str(tmp_path / "cache"))
    old = 1_000_000_000  # a timestamp long past: these folders were last used then
    gone = tmp_path / "gone.gguf"
    write_tiny_llama(gone, **SHAPE)
    FullPrecisionModel(gone, progress=False)
    orphan = model_mod._converted_folder(gone)
    gone.unlink()
    legacy = tmp_path / "cache" / "converted" / "m-0123456789abcdef"
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"x" * 10)
    other = tmp_path / "other.gguf"
    write_tiny_llama(other, **SHAPE)
    FullPrecisionModel(other, progress=False)
    kept_other = model_mod._converted_folder(other)
    path = tmp_path / "m.gguf"
    write_tiny_llama(path, **SHAPE)
    FullPrecisionModel(path, progress=False)
    first = model_mod._converted_folder(path)
    for folder in (orphan, kept_other, first):
        os.utime(folder / model_mod._DONE, (old, old))
    write_tiny_llama(path, **SHAPE)  # the same path rewritten: a new key
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert model_mod._converted_folder(path) != first
    FullPrecisionModel(path, progress=False)
    second = model_mod._converted_folder(path)
    assert (second / model_mod._DONE).is_file()
    assert not orphan.exists()
    assert not legacy.exists()
    assert not first.exists()
    assert kept_other.exists()  # its source exists and the cache is under budget
    # over budget, the least recently used folder goes, not one used in the last 10 minutes
    recent = tmp_path / "recent.gguf"
    write_tiny_llama(recent, **SHAPE)
    FullPrecisionModel(recent, progress=False)
    monkeypatch.setenv("PYDETOX_CONVERTED_CACHE_GB", "0")
    assert model_mod._prune_converted(second, path) == [kept_other]
    assert model_mod._converted_folder(recent).exists()
    assert second.exists()


@pytest.mark.parametrize(("qtype", "tied"), [(gguf.GGMLQuantizationType.F16, False),
                                           (gguf.GGMLQuantizationType.Q8_0, True)])
def test_a_gguf_converted_tensor_by_tensor_equals_transformers_own_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qtype: gguf.GGMLQuantizationType, tied: bool
) -> None:
    """Discovery reads a GGUF through a folder written one tensor at a time (`gguf_folder.write_folder`), not
    transformers' GGUF loader (the whole model in float32, twice). Every parameter must be what that loader gives
    (the llama q/k rows put back in transformers' order included), the matrices of an F16 file kept as F16 in the
    folder, and the model's logits equal."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from pydetox.discover import model as model_mod

    monkeypatch.setenv("PYDETOX_CACHE", str(tmp_path / "cache"))
    path = write_tiny_llama(tmp_path / "m.gguf", qtype=qtype, tied=tied, **SHAPE)
    ours = FullPrecisionModel(path, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    want = dict(ref.named_parameters())
    got = dict(ours.model.named_parameters())
    assert set(got) == set(want)
    for name, p in got.items():
        torch.testing.assert_close(p.detach().float(), want[name].detach(), rtol=0, atol=0, msg=name)
    ids = torch.tensor([[1, 260, 262, 263, 266, 259]])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    with safe_open(str(model_mod._converted_folder(path) / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118  (a safetensors file)
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == ("F16" if qtype == gguf.GGMLQuantizationType.F16 else "F32")
    assert dtypes["model.layers.0.input_layernorm.weight"] == "F32"
    assert ("lm_head.weight" in dtypes) != tied


def test_a_gguf_whose_tensors_do_not_fit_the_model_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor transformers' model has no room for is an error naming it, and no converted folder is left."""
    monkeypatch.setenv("PYDETOX_CACHE", str(tmp_path / "cache"))
    path = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    raw = bytearray(path.read_bytes())
    key = b"llama.feed_forward_length"  # its value follows the key and a u32 type id: the FFN width, a u32
    at = raw.index(key) + len(key) + 4
    assert raw[at : at + 4] == SHAPE["ff"].to_bytes(4, "little")
    raw[at : at + 4] = (SHAPE["ff"] * 2).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(PydetoxError, match=r"ffn_(gate|up|down)"):
        FullPrecisionModel(path, progress=False)
    assert not any((tmp_path / "cache" / "converted").iterdir())
