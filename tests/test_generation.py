"""A causal LM run end to end: train on prompt/completion records, generate with the ensemble, delete, and
prove the exactness contract bit for bit against a fresh training on the reduced data (before and after
`restore()`), with the same plan."""

from __future__ import annotations

import pytest
import torch

import s3t
from s3t.errors import DataError
from s3t.inference import load_components, perplexity
from s3t.models.decoder import Shard
from s3t.models.decoder import generate as decode
from test_exactness import served_tensors
from tiny_models import bbc_texts, save_tiny, train_bpe

PROMPTS = ["topic label-0:", "topic label-2:", "an unseen prompt"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    bpe = train_bpe(bbc_texts(200), vocab_size=512)
    return str(save_tiny("llama", tmp_path_factory.mktemp("llama"), bpe, layers=4))


@pytest.fixture(scope="module")
def prompt_data():
    """Prompts naming a topic; completions are the synthetic texts of that topic."""
    base = s3t.datasets.synthetic(48, num_labels=3, num_subjects=12, seed=3)
    return s3t.Dataset.from_records([dict(id=r.id, prompt=f"topic {r.label}:", completion=" " + r.text,
                                          subject=r.subject) for r in base])


@pytest.fixture
def plan(llama):
    return s3t.Plan(num_shards=2, num_slices=2, budget=2, blocks_per_slice=1, epochs=1, max_length=24, batch_size=8,
                    learning_rate=5e-3, base_model=llama, seed=0, num_threads=1)


def test_generation_after_deletions_and_restore_equals_fresh_training(make_run, plan, prompt_data):
    trained = make_run(plan, prompt_data, name="trained").train(progress=False)
    assert trained.task == "generate" and trained.labels == ()
    before = trained.generate(PROMPTS, max_new_tokens=6)
    subject = prompt_data[0].subject
    deleted = [r.id for r in prompt_data if r.subject == subject] + [prompt_data[5].id]
    trained.delete(subjects=[subject])
    trained.delete(ids=[prompt_data[5].id])
    torch.manual_seed(4321)   # global RNG state must not matter
    fresh = make_run(trained.plan, prompt_data.without(deleted), name="fresh").train(progress=False)

    _, served = trained.served()
    assert any(c["depth"] < plan.num_slices for c in served), "the deletions should truncate something"
    for stage in (served, None):
        if stage is None:   # ... and again after restoring to full depth
            trained.restore(progress=False)
            _, served = trained.served()
            assert served == fresh.served()[1] and all(c["depth"] == plan.num_slices for c in served)
        mine, theirs = served_tensors(trained, served), served_tensors(fresh, served)
        assert mine and all(torch.equal(mine[a][k], theirs[a][k]) for a in mine for k in mine[a])
        assert set(next(iter(mine.values()))) and not any(k.startswith("head.") for t in mine.values() for k in t)
        # the same components from each run's own store: the same step logits, tokens and perplexity
        held_out = [r.model_input for r in prompt_data.subset(deleted)]
        outputs = []
        for run in (trained, fresh):
            model, load, steps = run.trainer.model, run.trainer.load, []
            slots = load_components(model, served, load)
            tokens = decode(model, model.prepare_prompts(PROMPTS), [Shard(k, c["depth"]) for k, c in zip(slots, served)],
                            max_new_tokens=6, logits=steps)
            outputs.append((tokens, steps, perplexity(model, served, held_out, load=load, batch_size=8)))
        (tokens_a, steps_a, ppl_a), (tokens_b, steps_b, ppl_b) = outputs
        assert torch.equal(tokens_a, tokens_b) and ppl_a == ppl_b
        assert len(steps_a) == len(steps_b) and all(torch.equal(x, y) for x, y in zip(steps_a, steps_b))
    assert trained.generate(PROMPTS, max_new_tokens=6) == fresh.generate(PROMPTS, max_new_tokens=6)   # restored
    assert trained.perplexity(prompt_data) == fresh.perplexity(prompt_data)
    assert len(before) == len(PROMPTS) and all(isinstance(t, str) for t in before)


def test_sampled_generation_is_reproducible_with_a_seed(make_run, plan, prompt_data):
    run = make_run(plan, prompt_data).train(progress=False)
    a = run.generate(PROMPTS, max_new_tokens=6, temperature=1.5, seed=11)
    assert a == run.generate(PROMPTS, max_new_tokens=6, temperature=1.5, seed=11)
    assert run.generate(PROMPTS, max_new_tokens=6, aggregation="mean_logprob") == \
        run.generate(PROMPTS, max_new_tokens=6, aggregation="mean_logprob")
    assert run.perplexity(prompt_data) > 1.0


def test_a_causal_lm_run_refuses_what_it_cannot_do(make_run, plan, prompt_data, tmp_path):
    with pytest.raises(DataError, match=r"trains on prompts and completions .* the data holds labelled texts"):
        s3t.S3T.create(tmp_path / "texts", plan, s3t.datasets.synthetic(12))
    with pytest.raises(s3t.PlanError, match=r"`labels` applies to classification"):
        s3t.S3T.create(tmp_path / "labels", plan.replace(labels=["a", "b"]), prompt_data)
    run = make_run(plan, prompt_data).train(progress=False)
    with pytest.raises(DataError, match=r"`classify` needs a run that classifies; this one generates text"):
        run.predict(["some text"])
    for bad, match in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                       (dict(aggregation="vote"), "aggregation")):
        with pytest.raises(DataError, match=match):
            run.generate(PROMPTS, **bad)
    with pytest.raises(DataError, match="`prompts` must be a list of strings"):
        run.generate("one prompt")
    assert run.generate([]) == []


def test_prompt_records_load_from_jsonl_and_csv(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "a", "prompt": "Q?", "completion": " A."}\n'
                                      '{"id": "b", "prompt": "", "completion": " no prompt", "subject": "u"}\n')
    data = s3t.Dataset.from_jsonl(tmp_path / "a.jsonl")
    assert data.kind == "prompt" and data.labels == () and data.get("b").subject == "u"
    (tmp_path / "a.csv").write_text("id,prompt,completion\na,Q?,\" A.\"\n")
    assert s3t.Dataset.from_csv(tmp_path / "a.csv").get("a").completion == " A."
    with pytest.raises(DataError, match=r"`completion` at line 1 of .* is blank"):
        (tmp_path / "b.jsonl").write_text('{"id": "a", "prompt": "Q?", "completion": " "}\n')
        s3t.Dataset.from_jsonl(tmp_path / "b.jsonl")
    with pytest.raises(DataError, match="a dataset holds one kind of record"):
        s3t.Dataset.from_records([{"id": "a", "prompt": "Q", "completion": "A"}, {"id": "b", "text": "t", "label": "x"}])


def test_generate_from_the_cli_and_over_http(make_run, plan, prompt_data):
    import json

    from typer.testing import CliRunner

    from s3t.cli import app
    from s3t.service.settings import ServiceSettings
    from servicekit import InProcessServer, make_token

    run = make_run(plan, prompt_data).train(progress=False)
    expected = run.complete(PROMPTS[:2], max_new_tokens=4)
    out = CliRunner().invoke(app, ["generate", str(run.run_dir), *PROMPTS[:2], "--max-new-tokens", "4", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"served_version": expected.served_version, "completions": list(expected.texts)}
    out = CliRunner().invoke(app, ["generate", str(run.run_dir), "x", "--aggregation", "vote"])
    assert out.exit_code == 2 and "vote" in out.output

    secret = make_token(run.run_dir, "predict")
    with InProcessServer(run.run_dir, ServiceSettings(worker=False, preload=False)) as server:
        client = server.client(secret)
        answer = client.post("/v1/generate", json={"prompts": PROMPTS[:2], "max_new_tokens": 4})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"served_version": expected.served_version, "completions": list(expected.texts)}
        assert client.post("/v1/generate", json={"prompts": ["x"], "max_new_tokens": 100_000}).status_code == 422
        assert client.post("/v1/generate", json={"prompts": [], "max_new_tokens": 4}).status_code == 422
        assert client.post("/v1/predict", json={"texts": ["x"]}).status_code == 422   # a generation run
        assert server.client().post("/v1/generate", json={"prompts": ["x"]}).status_code == 401
