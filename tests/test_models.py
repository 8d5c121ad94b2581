"""Model families (s3t.models): structure found in the loaded modules, block ranges that equal the model's own
forward bit for bit, and, for causal LMs, ensemble decoding over a shared frozen trunk that equals transformers'
`generate` (one shard) and each shard run alone (many). Tiny random models of every supported decoder type."""

from __future__ import annotations

import pytest
import torch

from s3t.errors import PlanError
from s3t.models import SUPPORTED, family, load_model
from s3t.models.decoder import IGNORE_INDEX, CausalLM, Shard, generate, position_ids_from_mask
from tiny_models import DECODERS, save_tiny, train_bpe, bbc_texts

PROMPTS = ["The government said", "Shares in the company rose", "A"]
RECORDS = [
    ("Q: who won the final?", " The home team won the cup."),
    ("Shares in the company", " rose by 5% on Monday after strong results."),
    ("", " A record with no prompt."),
    ("The minister said that the new law would be debated next week", " and passed."),
]
STEPS = 8
SHARDS = [Shard(1, 2), Shard(2, 1), Shard(3, 2), Shard(2, 0)]
EXPECTED_TARGETS = {"gpt2": ("c_attn",), "gpt_neox": ("query_key_value",), "phi3": ("qkv_proj",),
                    **{t: ("q_proj", "v_proj") for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "opt")}}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices gain nothing from threads, and OpenMP waits on a busy 2-core machine slow each call ~100x.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bpe():
    return train_bpe(bbc_texts(200), vocab_size=512)


@pytest.fixture(scope="session")
def decoder_folders(tmp_path_factory, bpe):
    root = tmp_path_factory.mktemp("decoders")
    return {t: save_tiny(t, root / t, bpe, layers=4) for t in DECODERS}


def randomize_lora(lm, seed: int) -> None:
    """LoRA B starts at zero (no effect): give every adapter a random, visible effect."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


_LOADED: dict = {}


def causal_lm(folder, **settings) -> CausalLM:
    base = dict(num_groups=2, blocks_per_group=1, max_length=24, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                lora_targets=None, slots=4)
    return load_model(folder, **{**base, **settings})


@pytest.fixture(params=DECODERS)
def lm(request, decoder_folders):
    """Per model type: 4 blocks, 2 groups of 1 block, 4 adapter slots with random LoRA weights."""
    t = request.param
    if t not in _LOADED:
        _LOADED[t] = causal_lm(decoder_folders[t])
        randomize_lora(_LOADED[t], seed=1)
    _LOADED[t].set_active(0)
    return _LOADED[t]


def full_logits(lm, batch):
    with torch.no_grad():
        return lm.output(lm.run_blocks(lm.embed(batch), batch, 0, lm.num_blocks), batch)


# -- detection -------------------------------------------------------------------------------------
def test_every_supported_type_names_its_family():
    assert {family(t).task for t in SUPPORTED} == {"classify", "generate"}
    assert set(DECODERS) <= set(SUPPORTED)
    with pytest.raises(PlanError, match=r"model_type 'vit_mae', which s3t cannot cut.*supported: bert"):
        family("vit_mae")


def test_structure_and_lora_targets(lm):
    t = lm.model.config.model_type
    assert lm.lora_targets == EXPECTED_TARGETS[t]
    assert lm.num_blocks == 4 and lm.group_blocks == {1: [3], 2: [2]}
    adapted = {}   # adapters sit exactly in blocks 2 and 3 (selected by index), one per (slot, group)
    for name, module in lm.model.named_modules():
        if hasattr(module, "lora_A") and len(module.lora_A):
            block = int(name[len(lm.blocks_path) + 1:].split(".")[0])
            adapted.setdefault(block, set()).update(module.lora_A.keys())
    assert adapted == {2: {"g2", "s1g2", "s2g2", "s3g2"}, 3: {"g1", "s1g1", "s2g1", "s3g1"}}
    assert (lm.parts.learned_positions is not None) == (t in ("gpt2", "opt"))
    assert (lm.parts.rotary is None) == (t in ("gpt2", "opt"))
    assert not any(n.startswith("parts") for n, _ in lm.named_parameters())


# -- block ranges ----------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_pieces_equal_the_model_forward(lm, side):
    batch = lm.prepare_prompts(PROMPTS) if side == "left" else lm.prepare(RECORDS)
    pos = position_ids_from_mask(batch["attention_mask"])
    outputs = {}
    for depth in (0, 1, 2):
        lm.set_active(depth)
        mine = full_logits(lm, batch)
        with torch.no_grad():
            ref = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos).logits
            cut = lm.run_blocks(lm.embed(batch), batch, 0, 2)   # the trunk cut: two ranges give the same bits
            assert torch.equal(lm.output(lm.run_blocks(cut, batch, 2, 4), batch), mine)
        assert torch.equal(mine, ref)
        outputs[depth] = mine
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


def test_an_artifact_gives_the_same_bits_in_any_slot(lm):
    batch = lm.prepare_prompts(PROMPTS)
    lm.set_active(2, slot=1)
    a = full_logits(lm, batch)
    state = {**lm.group_state(1, slot=1), **lm.group_state(2, slot=1)}
    assert all(".g1." in n or ".g2." in n for n in state)   # named as slot 0 names them
    lm.load_state(state, slot=3)
    lm.set_active(2, slot=3)
    assert torch.equal(full_logits(lm, batch), a)
    randomize_lora(lm, seed=1)   # put back the fixture's weights


# -- generation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("aggregation,depth", [("mean_proba", 0), ("mean_logprob", 0), ("mean_proba", 2)])
def test_one_shard_decodes_as_transformers_generate(lm, aggregation, depth):
    """m = 1: cached decoding is transformers' own greedy `generate`, token for token and logit for logit."""
    batch = lm.prepare_prompts(PROMPTS)
    steps = []
    ours = generate(lm, batch, [Shard(1, depth)], max_new_tokens=STEPS, aggregation=aggregation, logits=steps)
    lm.set_active(depth, slot=1)
    ref = lm.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                            max_new_tokens=STEPS, pad_token_id=lm.pad_token_id, eos_token_id=lm.eos_token_id,
                            output_logits=True, return_dict_in_generate=True)
    width = batch["input_ids"].shape[1]
    assert torch.equal(ours, ref.sequences[:, width:])
    assert len(steps) == len(ref.logits)
    for step, (mine, theirs) in enumerate(zip(steps, ref.logits)):
        assert torch.equal(mine[0], theirs), f"step {step}"


def test_the_shared_trunk_equals_each_shard_run_alone(lm):
    batch = lm.prepare_prompts(PROMPTS)
    shared, alone = [], []
    tokens = generate(lm, batch, SHARDS, max_new_tokens=STEPS, logits=shared)
    assert torch.equal(generate(lm, batch, SHARDS, max_new_tokens=STEPS, logits=alone, share_trunk=False), tokens)
    assert all(torch.equal(a, b) for a, b in zip(shared, alone))


def test_sampling_is_seeded(decoder_folders):
    lm = _LOADED.get("llama") or causal_lm(decoder_folders["llama"])
    batch = lm.prepare_prompts(PROMPTS)
    runs = [generate(lm, batch, SHARDS, max_new_tokens=STEPS, temperature=0.8, aggregation=a,
                     generator=torch.Generator().manual_seed(seed)) for a in ("mean_proba", "mean_logprob")
            for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[3], runs[4])
    assert not (torch.equal(runs[0], runs[2]) and torch.equal(runs[3], runs[5]))


@pytest.mark.parametrize("model_type,extra", [
    ("mistral", {"sliding_window": 4}),   # a window shorter than the sequences
    # qwen2's full/sliding mix: the shared trunk is full attention, the adapted blocks sliding
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2, "layer_types": None}),
    ("opt", {"word_embed_proj_dim": 16, "do_layer_norm_before": False}),   # opt-350m: project_in/out
    ("gpt_neox", {"use_parallel_residual": False}),
], ids=["mistral-window", "qwen2-mixed", "opt-350m", "neox-serial"])
def test_config_variants(tmp_path, bpe, model_type, extra):
    lm = causal_lm(save_tiny(model_type, tmp_path, bpe, layers=4, **extra))
    randomize_lora(lm, seed=2)
    batch = lm.prepare_prompts(PROMPTS)
    lm.set_active(2)
    pos = position_ids_from_mask(batch["attention_mask"])
    with torch.no_grad():
        ref = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos).logits
    assert torch.equal(full_logits(lm, batch), ref)
    shared, alone = [], []
    tokens = generate(lm, batch, SHARDS, max_new_tokens=STEPS, logits=shared)
    assert torch.equal(generate(lm, batch, SHARDS, max_new_tokens=STEPS, logits=alone, share_trunk=False), tokens)
    assert all(torch.equal(a, b) for a, b in zip(shared, alone))


# -- training batches and loss ---------------------------------------------------------------------
def test_training_rows_label_the_completion_only(lm):
    batch = lm.prepare(RECORDS)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == (4, 24)
    for k, (_prompt, completion) in enumerate(RECORDS):
        n = int(mask[k].sum())
        assert mask[k, :n].all() and not mask[k, n:].any()   # right padded
        labelled = labels[k] != IGNORE_INDEX
        tokens = (lm.tokenizer(completion, add_special_tokens=False)["input_ids"] + [lm.eos_token_id])[:24]
        assert labels[k, labelled].tolist() == tokens
        assert labelled.nonzero().max() == n - 1 and torch.equal(ids[k, labelled], labels[k, labelled])


def test_loss_equals_transformers_and_a_record_never_depends_on_its_batch(lm):
    lm.set_active(2)
    batch = lm.prepare(RECORDS)
    logits = full_logits(lm, batch)
    with torch.no_grad():
        hf = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=position_ids_from_mask(batch["attention_mask"]), labels=batch["labels"])
    assert torch.equal(lm.loss(logits, batch), hf.loss)
    for k in range(len(RECORDS)):
        for rows in ([k], [k, k, k], [3 - k, k, 0]):   # alone, with copies, with other records
            sub = full_logits(lm, lm.prepare([RECORDS[r] for r in rows]))
            n = int(batch["attention_mask"][k].sum())
            assert torch.equal(sub[rows.index(k), :n], logits[k, :n])


def test_a_stage_from_cached_trunk_states_is_exact_and_isolated(lm):
    """A stage's loss and gradients from frozen hidden states equal the full forward's; only its group moves."""
    batch = lm.prepare(RECORDS)
    start = lm.group_start(2)
    lm.set_active(2, train_group=2)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    assert params and all(".g2." in n for n, p in lm.model.named_parameters() if p.requires_grad)
    full = lm.loss(lm.output(lm.run_blocks(lm.embed(batch), batch, 0, 4), batch), batch)
    full_grads = torch.autograd.grad(full, params)
    with torch.no_grad():
        trunk = lm.run_blocks(lm.embed(batch), batch, 0, start)
    cached = lm.loss(lm.top(trunk, batch, start), batch)
    assert torch.equal(full, cached)
    assert all(torch.equal(a, b) for a, b in zip(full_grads, torch.autograd.grad(cached, params)))
    lm.set_active(0)
