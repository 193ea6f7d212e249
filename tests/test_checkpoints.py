"""checkpoints.py: the published, Hugging Face hub and tinyhyena layouts, loaded exactly and safely."""

import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

import checkpoints
import tinyhyena as th
from helpers import FIXTURE, _Exploit, hf_folder, random_model, rel_err


def test_load_published_variants(tmp_path):
    """The `.mixer.layer.` layout, and a full Lightning file whose hyper-parameters are objects of a library
    this machine lacks (omegaconf): both load, and give the same model."""
    blob = torch.load(FIXTURE / "weights.ckpt", weights_only=True)
    wrapped = {k.replace(".mixer.", ".mixer.layer.").replace(".mlp.", ".mlp.layer."): v
               for k, v in blob["state_dict"].items()}
    parent, fake = types.ModuleType("omegaconf_missing"), types.ModuleType("omegaconf_missing.dictconfig")

    class DictConfig(dict):
        pass
    DictConfig.__module__ = fake.__name__
    DictConfig.__qualname__ = "DictConfig"
    fake.DictConfig = DictConfig
    sys.modules.update({parent.__name__: parent, fake.__name__: fake})
    try:
        hparams = DictConfig(model={"d_model": 128})
        hparams.extra = [1, 2]
        lightning = {"state_dict": wrapped, "hyper_parameters": hparams, "epoch": 3,
                     "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []}]}
        os.makedirs(tmp_path / "ckpt")
        torch.save(lightning, tmp_path / "ckpt" / "weights.ckpt")
    finally:
        del sys.modules[fake.__name__], sys.modules[parent.__name__]
    (tmp_path / "ckpt" / "config.json").write_text((FIXTURE / "config.json").read_text())
    with pytest.raises(pickle.UnpicklingError, match="omegaconf_missing.dictconfig.DictConfig"):
        torch.load(tmp_path / "ckpt" / "weights.ckpt", weights_only=True)  # what a user meets in safe mode
    a, b = th.from_pretrained(FIXTURE), th.from_pretrained(tmp_path / "ckpt")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_loading_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": exploit}, tmp_path / "evil.ckpt")
    blob = checkpoints.load_torch_file(tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert torch.equal(blob["state_dict"]["x"], torch.zeros(1))


def test_own_checkpoint_round_trip(tmp_path):
    model = random_model(th.HyenaConfig(d_model=8, n_layer=2, d_inner=16, order=3, filter_order=8, l_max=40), 0)
    th.save_pretrained(model, tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == ["config.json", "model.pt"]
    loaded = th.from_pretrained(tmp_path / "run")
    assert loaded.cfg == model.cfg
    ids = torch.randint(0, 12, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: checkpoint folder not found"):
        th.from_pretrained(tmp_path / "nowhere")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json: file not found"):
        th.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: malformed config"):
        th.from_pretrained(folder)
    (folder / "config.json").write_text((FIXTURE / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights file"):
        th.from_pretrained(folder)
    (folder / "weights.ckpt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="weights.ckpt: not a readable PyTorch checkpoint"):
        th.from_pretrained(folder)
    blob = torch.load(FIXTURE / "weights.ckpt", weights_only=True)
    del blob["state_dict"]["model.backbone.ln_f.bias"]
    torch.save(blob, folder / "weights.ckpt")
    with pytest.raises(ValueError, match=r"weights.ckpt: keys do not match the model: missing \['ln_f.bias'\]"):
        th.from_pretrained(folder)
    (folder / "config.json").write_text((FIXTURE / "config.json").read_text().replace('"d_model": 128', '"d_model": 64'))
    blob = torch.load(FIXTURE / "weights.ckpt", weights_only=True)
    torch.save(blob, folder / "weights.ckpt")
    with pytest.raises(ValueError, match="weights.ckpt: embedding.weight has shape"):
        th.from_pretrained(folder)


def test_hf_folder_round_trips_bitwise_and_computes_the_published_function(tmp_path):
    model = th.from_pretrained(FIXTURE)
    th.save_pretrained(model, tmp_path / "hf", layout="hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                                   "tokenizer_config.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_seq_len"] == 1026 and config["hyena_order"] == 2 and config["activation_freq"] == 10
    assert config["model_type"] == "hyenadna" and "AutoModelForCausalLM" in config["auto_map"]
    weights = checkpoints.read_safetensors(tmp_path / "hf" / "model.safetensors")
    assert weights["hyena.backbone.layers.0.mixer.filter_fn.pos_emb.z"].shape == (1, 1026, 5)
    assert weights["hyena.backbone.layers.1.mixer.filter_fn.modulation.deltas"].shape == (1, 1, 128)
    assert torch.equal(weights["lm_head.weight"], weights["hyena.backbone.embeddings.word_embeddings.weight"])
    loaded = th.from_pretrained(tmp_path / "hf")
    assert loaded.cfg == model.cfg
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    ref = np.load(FIXTURE / "reference.npz")
    with torch.no_grad():
        assert rel_err(loaded(torch.from_numpy(ref["input_ids"])), ref["logits"]) <= 1e-5


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_hf_folder_with_deduplicated_tensors_loads(tmp_path, weights):
    shared = [f"hyena.backbone.layers.{i}.mixer.filter_fn.implicit_filter.{j}.freq" for i in (0, 1) for j in (3, 5)]
    folder = hf_folder(tmp_path, drop=shared + ["lm_head.weight"], weights=weights)
    a, b = th.from_pretrained(FIXTURE), th.from_pretrained(folder)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_hf_without_trained_frequencies_uses_activation_freq(tmp_path):
    freqs = [f"hyena.backbone.layers.{i}.mixer.filter_fn.implicit_filter.{j}.freq" for i in (0, 1) for j in (1, 3, 5)]
    model = th.from_pretrained(hf_folder(tmp_path, drop=freqs, train_freq=False, activation_freq=7))
    assert torch.equal(model.blocks[1].mixer.filter.mlp[5].freq, torch.full((1, 64), 7.0))


def test_hf_pickle_that_would_run_code_runs_nothing(tmp_path):
    folder = hf_folder(tmp_path, weights="bin")
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "evil": exploit}, folder / "pytorch_model.bin")
    model = th.from_pretrained(folder)  # the exploit is an inert placeholder, not a tensor: ignored
    assert not marker.exists()
    ref = np.load(FIXTURE / "reference.npz")
    with torch.no_grad():
        assert rel_err(model(torch.from_numpy(ref["input_ids"])), ref["logits"]) <= 1e-5


@pytest.mark.parametrize("field, value", [("hyena_order", 3), ("num_inner_mlps", 1), ("use_bias", False),
                                          ("short_filter_order", 5), ("layer_norm_epsilon", 1e-6),
                                          ("d_model", 0), ("max_seq_len", "long")])
def test_hf_config_tinyhyena_cannot_represent_is_refused_by_field(tmp_path, field, value):
    folder = hf_folder(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=rf"config.json: malformed config \(config field {field if field != 'max_seq_len' else 'l_max'}"):
        th.from_pretrained(folder)


def test_safetensors_garbage_is_refused_by_name(tmp_path):
    folder = hf_folder(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\xff" * 12)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        th.from_pretrained(folder)
