"""The demo trainer: checkpoints every N steps, loadable, improving, reproducible."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from models.trainer import COMPLETE, STATE_FILE, CheckpointInfo, train
from workers.engine import Engine, GenerationInput, SamplingParams

# Tiny enough to train in a second or two on the default (stdlib docstrings) corpus.
TINY: dict[str, Any] = dict(seq_len=32, batch_size=8, vocab_size=512, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[CheckpointInfo],
                                                         list[CheckpointInfo]]:
    out = tmp_path_factory.mktemp("trainer") / "run"
    seen: list[CheckpointInfo] = []
    infos = train(out, steps=30, every=10, progress=seen.append, **TINY)
    return out, infos, seen


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_checkpoints_at_every_step_complete_and_loadable(run) -> None:
    out, infos, seen = run
    assert [i.step for i in infos] == [10, 20, 30]
    assert seen == infos
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-10", "checkpoint-20",
                                                     "checkpoint-30"]
    for info in infos:
        assert info.path == out / f"checkpoint-{info.step}"
        assert (info.path / COMPLETE).is_file() and (info.path / COMPLETE).stat().st_size == 0
        state = json.loads((info.path / STATE_FILE).read_text())
        assert state == {"step": info.step, "train_loss": info.train_loss,
                         "val_loss": info.val_loss}
        engine = Engine.from_dir(info.path)
        [result] = engine.generate([GenerationInput(engine.encode("Return the"),
                                                    SamplingParams(max_new_tokens=8))])
        assert len(result.output_ids) == 8 and result.text


def test_validation_loss_falls(run) -> None:
    _, infos, _ = run
    assert infos[-1].val_loss < infos[0].val_loss


def test_same_seed_same_weights_and_no_marker(tmp_path: Path) -> None:
    a = train(tmp_path / "a", steps=5, every=2, complete_marker=False, **TINY)
    b = train(tmp_path / "b", steps=5, every=2, complete_marker=False, **TINY)
    c = train(tmp_path / "c", steps=5, every=5, complete_marker=False, seed=1, **TINY)
    assert [i.step for i in a] == [2, 4, 5]
    for x, y in zip(a, b):
        assert x.val_loss == y.val_loss
        wx, wy = weights(x.path), weights(y.path)
        assert wx.keys() == wy.keys() and all(torch.equal(wx[k], wy[k]) for k in wx)
    assert not torch.equal(weights(a[-1].path)["lm_head.weight"],
                           weights(c[-1].path)["lm_head.weight"])
    assert not list(tmp_path.glob(f"*/*/{COMPLETE}"))


def test_refuses_a_directory_with_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train(tmp_path, steps=10, every=10, **TINY)
