"""Build small random-weight Llama checkpoints in Hugging Face layout, fully offline.

No transformers needed: a byte-level BPE tokenizer is trained with `tokenizers` on a
built-in corpus, and seeded random weights are written with safetensors. The result loads
both here (`workers.loader`) and in `transformers.LlamaForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from workers.checkpoint_files import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from workers.model import ModelConfig, Transformer

BOS, EOS = "<s>", "</s>"
# The tiny model's chat template (its tokenizer has no chat tokens): bos, one `role: text`
# line per message (tool calls as name(arguments)), then `assistant:` to generate from.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
    "{{ message['content'] }}{% for call in message['tool_calls'] or [] %}"
    "{{ call['function']['name'] }}({{ call['function']['arguments'] | tojson }})"
    "{% endfor %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")

CORPUS = """\
The ferry leaves the harbour at dawn, carrying cars, bicycles and sleepy passengers across
the grey water. Once upon a time there was a small ship that sailed between two islands,
and every morning the captain checked the engines, the ropes and the weather before she
cast off. A ferry is a queue that floats: people arrive, wait their turn, cross together
and leave in the order they came.
Kafka topics are partitioned by key, so every message with the same key lands on the same
partition and is read in order. Producers append records to the end of a log; consumers
read them at their own pace and commit offsets once the work is done. A consumer group
shares the partitions of a topic among its members, and a rebalance moves partitions when
a worker joins or leaves. Dead letters go to their own topic so that one bad message never
blocks the ones behind it.
A language model reads a prompt as a sequence of tokens and predicts the next token, one
step at a time. The attention layers look back over the keys and values of earlier tokens,
kept in a cache so that each new step costs little. Batching requests together keeps the
accelerator busy; padding on the left lines up the last tokens of every prompt. Greedy
decoding picks the most likely token, while sampling with a temperature and a top p
nucleus adds variety. Tensor parallel ranks talk through torch distributed, each holding
a slice of the attention heads and of the feed forward columns.
The checkpoint holds the configuration, the tokenizer and the weights in safetensors
files, sometimes split into shards listed by an index. Hello Ferry! Numbers like 0, 1, 2,
3, 42, 128 and 2048 appear too, as do questions: what time is it? Where does the boat go?
"""


def build_tiny_checkpoint(out_dir: str | Path, *, vocab_size: int = 512, hidden_size: int = 64,
                          intermediate_size: int = 128, num_hidden_layers: int = 2,
                          num_attention_heads: int = 4, num_key_value_heads: int = 2,
                          max_position_embeddings: int = 256, seed: int = 0, shards: int = 1,
                          tie_word_embeddings: bool = False,
                          corpus: str | None = None) -> Path:
    """Write tokenizer (with a chat template), config, generation config and seeded random
    weights to `out_dir`.

    The tokenizer is trained to at most `vocab_size` tokens (ids 0 and 1 are `<s>` and
    `</s>`); the model's vocabulary is `vocab_size` whatever the corpus yields. Weights
    depend only on the seed and the shapes, not on `shards`. Returns `out_dir`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(CORPUS + (corpus or ""), vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
        "head_dim": hidden_size // num_attention_heads,
        "max_position_embeddings": max_position_embeddings, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "tie_word_embeddings": tie_word_embeddings, "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    _write_json(out / CONFIG_FILE, config)
    _write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "model_max_length": max_position_embeddings, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE})
    write_weights(out, random_weights(ModelConfig.from_dict(config), seed), shards)
    return out


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE with `<s>`/`</s>`; encoding prepends `<s>` like Llama's tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def random_weights(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights, scaled so logits are far apart.

    Small-init weights would give near-uniform logits, and greedy argmax would then flip on
    float rounding differences between batch shapes; wide weights make the top token clear.
    """
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():  # fixed order: the same seed gives the same weights
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape)
        elif name == "model.embed_tokens.weight":
            weights[name] = torch.randn(shape, generator=gen)
        else:  # std 2/sqrt(fan_in): outputs of order 2, logits spread over several units
            weights[name] = torch.randn(shape, generator=gen) * (2.0 / math.sqrt(shape[-1]))
    return weights


def write_weights(out: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    """`model.safetensors`, or `shards` files plus `model.safetensors.index.json`."""
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(weights, str(out / SINGLE_FILE), metadata=meta)
        return
    names = list(weights)
    if shards > len(names):
        raise ValueError(f"shards={shards}: more shards than the {len(names)} tensors")
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[i * len(names) // shards:
                                             (i + 1) * len(names) // shards]}
        save_file(part, str(out / file), metadata=meta)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    _write_json(out / INDEX_FILE,
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n")
