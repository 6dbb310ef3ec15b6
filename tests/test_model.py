"""The model, loader, tokenizer and engine on tiny random checkpoints (no Kafka)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.factory import build_tiny_checkpoint
from workers.engine import Engine, GenerationInput, GenerationOutput, SamplingParams
from workers.loader import load_model
from workers.model import ModelConfig, Transformer
from workers.tokenizer import load_tokenizer

PROMPTS = ["The ship", "Kafka topics are partitioned by key", "Once upon a time there was a",
           "A", "Tensor parallel ranks talk through torch distributed", "The checkpoint",
           "Hello Ferry", "Where does the boat go? Numbers like 42"]
SEED = 0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", seed=SEED)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Engine:
    return Engine.from_dir(tiny_dir)


def run(engine: Engine, prompts: list[str], **params: object) -> list[GenerationOutput]:
    return engine.generate([GenerationInput(engine.encode(p), SamplingParams(**params))
                            for p in prompts])


def alone(engine: Engine, prompt: str, **params: object) -> GenerationOutput:
    [out] = run(engine, [prompt], **params)
    return out


def hf_greedy(model_dir: Path, engine: Engine, prompts: list[str], n: int) -> list[list[int]]:
    """transformers' greedy tokens, cut at the first eos (ours exclude eos and stop there)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = engine.config.eos_token_id
    outs = []
    for prompt in prompts:
        x = torch.tensor([engine.encode(prompt)])
        new = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                          max_new_tokens=n, pad_token_id=eos)[0, x.shape[1]:].tolist()
        outs.append(new[:new.index(eos)] if eos in new else new)
    return outs


# ---- agreement with transformers ------------------------------------------------------


def test_greedy_matches_transformers(tiny_dir: Path, tiny: Engine) -> None:
    ours = [alone(tiny, p, max_new_tokens=24).output_ids for p in PROMPTS]
    assert ours == hf_greedy(tiny_dir, tiny, PROMPTS, 24)
    assert any(len(o) == 24 for o in ours)


def test_tied_embeddings_match_transformers(tmp_path: Path) -> None:
    model_dir = build_tiny_checkpoint(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    engine = Engine.from_dir(model_dir)
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    ours = [alone(engine, p, max_new_tokens=12).output_ids for p in PROMPTS[:4]]
    assert ours == hf_greedy(model_dir, engine, PROMPTS[:4], 12)


def test_names_and_math_match_transformers_with_biases_gqa_and_head_dim() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, attention_bias=True,
        mlp_bias=True, tie_word_embeddings=True, max_position_embeddings=64, rope_theta=5000.0)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = Transformer(ModelConfig.from_dict(hf_config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, torch.arange(11).expand(3, 11)), hf(x).logits)


def test_sharded_checkpoint_gives_the_same_tokens(tmp_path: Path, tiny: Engine) -> None:
    model_dir = build_tiny_checkpoint(tmp_path / "sharded", seed=SEED, shards=2)
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert len(list(model_dir.glob("model-0000?-of-00002.safetensors"))) == 2
    sharded = Engine.from_dir(model_dir)
    for a, b in zip(sharded.model.state_dict().values(), tiny.model.state_dict().values()):
        assert torch.equal(a, b)
    assert ([o.output_ids for o in run(sharded, PROMPTS, max_new_tokens=10)]
            == [o.output_ids for o in run(tiny, PROMPTS, max_new_tokens=10)])


def test_unsupported_rope_scaling_is_named() -> None:
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dict({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


# ---- batching ---------------------------------------------------------------------------


def test_batch_gives_the_same_greedy_tokens_as_single_runs(tiny: Engine) -> None:
    batched = run(tiny, PROMPTS, max_new_tokens=20)
    for prompt, out in zip(PROMPTS, batched):
        single = alone(tiny, prompt, max_new_tokens=20)
        assert out == single
        assert out.prompt_tokens == len(tiny.encode(prompt))


def test_seeded_sampling_is_batch_independent(tiny: Engine) -> None:
    params = {"max_new_tokens": 16, "temperature": 0.8, "top_p": 0.9}
    batch = tiny.generate([GenerationInput(tiny.encode(p), SamplingParams(seed=7 + i, **params))
                           for i, p in enumerate(PROMPTS)])
    for i, (prompt, out) in enumerate(zip(PROMPTS, batch)):
        assert out.output_ids == alone(tiny, prompt, seed=7 + i, **params).output_ids
    # A greedy row in the batch does not disturb the sampled ones either.
    mixed = tiny.generate([
        GenerationInput(tiny.encode(PROMPTS[0]), SamplingParams(seed=7, **params)),
        GenerationInput(tiny.encode(PROMPTS[1]), SamplingParams())])
    assert mixed[0].output_ids == batch[0].output_ids
    others = {tuple(alone(tiny, PROMPTS[2], seed=s, **params).output_ids) for s in range(5)}
    assert len(others) > 1


def test_max_new_tokens_is_per_row(tiny: Engine) -> None:
    limits = [0, 1, 3, 7, 12]
    outs = tiny.generate([GenerationInput(tiny.encode(PROMPTS[i]), SamplingParams(max_new_tokens=n))
                          for i, n in enumerate(limits)])
    assert [len(o.output_ids) for o in outs] == limits
    assert all(o.finish_reason == "length" for o in outs)
    full = alone(tiny, PROMPTS[4], max_new_tokens=12).output_ids
    assert outs[4].output_ids == full


def test_eos_ends_a_row_and_is_excluded(tiny: Engine) -> None:
    outs = run(tiny, PROMPTS, max_new_tokens=40)
    eos = tiny.config.eos_token_id
    assert all(eos not in o.output_ids for o in outs)
    assert all((o.finish_reason == "stop") == (len(o.output_ids) < 40) for o in outs)
    assert any(o.finish_reason == "stop" for o in outs), "no prompt reached eos: pick others"


def test_stop_string_truncates_text_and_tokens(tiny: Engine) -> None:
    assert tiny.tokenizer is not None
    full = alone(tiny, PROMPTS[1], max_new_tokens=24)
    # A stop string that starts on a token boundary and first occurs there: the cut is exact.
    for cut in range(2, len(full.output_ids)):
        head = tiny.tokenizer.decode(full.output_ids[:cut])
        stop = full.text[len(head):len(head) + 3]
        if (full.text.startswith(head) and stop.isascii() and len(stop.strip()) == 3
                and full.text.find(stop) == len(head)):
            break
    else:
        pytest.fail(f"no usable stop string in {full.text!r}")
    out = alone(tiny, PROMPTS[1], max_new_tokens=24, stop=("never-seen", stop))
    assert out.finish_reason == "stop"
    assert out.text == head and stop not in out.text
    assert out.output_ids == full.output_ids[:cut]
    # Starting inside a token: the text is cut exactly, the straddling token is dropped.
    mid = full.text[len(head) + 1:len(head) + 4]
    out = alone(tiny, PROMPTS[1], max_new_tokens=24, stop=(mid,))
    assert out.text == full.text[:full.text.find(mid)] and out.finish_reason == "stop"
    assert out.output_ids == full.output_ids[:len(out.output_ids)]
    assert out.text.startswith(tiny.tokenizer.decode(out.output_ids))


# ---- validation and loading errors -----------------------------------------------------


def test_generate_rejects_bad_rows(tiny: Engine) -> None:
    with pytest.raises(ValueError, match="empty"):
        tiny.generate([GenerationInput([], SamplingParams())])
    with pytest.raises(ValueError, match="context"):
        tiny.generate([GenerationInput([5] * 250, SamplingParams(max_new_tokens=7))])
    with pytest.raises(ValueError, match="vocabulary"):
        tiny.generate([GenerationInput([tiny.config.vocab_size], SamplingParams())])
    assert tiny.generate([]) == []


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_config_or_weights_are_named(tiny_dir: Path, tmp_path: Path) -> None:
    d = copy_checkpoint(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(d)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    d = build_tiny_checkpoint(tmp_path / "sharded", seed=SEED, shards=2, num_hidden_layers=1)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(d)


@pytest.mark.parametrize("change, error", [
    ("shape", "model.layers.0.mlp.up_proj.weight"),
    ("extra", "model.layers.9.self_attn.q_proj.weight"),
    ("missing", "model.norm.weight"),
])
def test_bad_tensors_are_named(tiny_dir: Path, tmp_path: Path, change: str, error: str) -> None:
    d = copy_checkpoint(tiny_dir, tmp_path / "m")
    weights = load_file(d / "model.safetensors")
    if change == "shape":
        weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    elif change == "extra":
        weights["model.layers.9.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    else:
        del weights["model.norm.weight"]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(ValueError, match=error.replace(".", r"\.")):
        load_model(d)


# ---- tokenizer --------------------------------------------------------------------------


def test_tokenizer_round_trip(tiny_dir: Path, tiny: Engine) -> None:
    tok = load_tokenizer(tiny_dir)
    assert tok is not None
    assert (tok.bos_id, tok.eos_id) == (tiny.config.bos_token_id, tiny.config.eos_token_id)
    text = "Kafka topics are partitioned by key; the ferry leaves at 6, café ☕!"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]


def test_without_tokenizer_ids_in_and_empty_text_out(tiny_dir: Path, tmp_path: Path,
                                                      tiny: Engine) -> None:
    d = copy_checkpoint(tiny_dir, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    assert load_tokenizer(d) is None
    engine = Engine.from_dir(d)
    with pytest.raises(ValueError, match="input_ids"):
        engine.encode("hi")
    ids = tiny.encode(PROMPTS[0])
    [out] = engine.generate([GenerationInput(ids, SamplingParams(max_new_tokens=5))])
    assert out.text == "" and out.output_ids == alone(tiny, PROMPTS[0], max_new_tokens=5).output_ids
