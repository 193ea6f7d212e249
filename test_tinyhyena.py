"""Tests for tinyhyena. `pytest -q` runs them on CPU in a few minutes; `pytest -m cuda` runs the GPU ones."""

import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinyhyena as th

ROOT = Path(__file__).resolve().parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "hyenadna_tiny"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"fixture not found at {FIXTURE}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
property_settings = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rel_err(out, ref):
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def random_model(cfg, seed):
    """A model whose every weight is drawn at a scale where no term of the forward pass is negligible
    (the published init makes the filter MLP nearly silent, which would hide mistakes in it)."""
    torch.manual_seed(seed)
    model = th.HyenaDNA(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("freq"):
                p.uniform_(0.5, 2.0)
            elif p.dim() >= 2:
                p.normal_(0, 1 / np.sqrt(p.shape[-1]))
            else:
                p.normal_(0, 0.5)
    return model


@st.composite
def configs_and_lengths(draw):
    cfg = th.HyenaConfig(
        d_model=draw(st.integers(1, 12)) * 2,
        n_layer=draw(st.integers(1, 2)),
        d_inner=draw(st.integers(4, 48)),
        order=draw(st.integers(2, 4)),
        filter_order=draw(st.integers(2, 16)),
        emb_dim=draw(st.sampled_from([3, 5, 7])),
        short_filter_order=draw(st.integers(1, 4)),
        l_max=draw(st.integers(2, 400)),
    )
    L = draw(st.sampled_from([1, 2, 7, 13, 64, 97, 128, 255, 256, 331, cfg.l_max, cfg.l_max - 1]))
    return cfg, max(1, min(L, cfg.l_max)), draw(st.integers(1, 3)), draw(st.integers(0, 2**31 - 1))


def check_twin(cfg, L, B, seed, device):
    model = random_model(cfg, seed).to(device)
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(ids.to(device)).cpu().numpy()
    assert out.shape == (B, L, cfg.padded_vocab_size)
    assert rel_err(out, th.reference_forward(model, ids)) <= 1e-4


# --- the fixture: the published implementation's outputs --------------------------------------------------

@needs_fixture
def test_fixture_matches_published_outputs():
    model = th.from_pretrained(FIXTURE)
    ref = np.load(FIXTURE / "reference.npz")
    ids = torch.from_numpy(ref["input_ids"])
    with torch.no_grad():
        assert rel_err(model.hidden_states(ids), ref["hidden"]) <= 1e-5
        assert rel_err(model(ids), ref["logits"]) <= 1e-5
    assert rel_err(th.reference_forward(model, ids), ref["logits"]) <= 1e-5
    assert rel_err(th.reference_forward(model, ids, return_hidden=True), ref["hidden"]) <= 1e-5


# --- properties ------------------------------------------------------------------------------------------

@property_settings
@given(configs_and_lengths())
def test_torch_matches_numpy_twin(case):
    check_twin(*case, device="cpu")


@pytest.mark.cuda
@needs_cuda
@property_settings
@given(configs_and_lengths())
def test_torch_matches_numpy_twin_cuda(case):
    check_twin(*case, device="cuda")


@property_settings
@given(configs_and_lengths(), st.data())
def test_causal(case, data):
    cfg, L, B, seed = case
    model = random_model(cfg, seed).double()
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(seed))
    t = data.draw(st.integers(0, L - 1))
    changed = ids.clone()
    changed[:, t + 1:] = torch.randint(0, cfg.vocab_size, changed[:, t + 1:].shape)
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-9)


def direct_causal_conv(u, k):
    """y[b, c, t] = sum_{s<=t} k[c, t-s] u[b, c, s], the O(L^2) way."""
    L = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(L):
        y[..., t] = (u[..., :t + 1] * k[:, :t + 1].flip(-1)).sum(-1)
    return y


@property_settings
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_fft_conv_equals_direct_conv(B, C, L, seed):
    g = torch.Generator().manual_seed(seed)
    u, k = torch.randn(B, C, L, generator=g, dtype=torch.float64), torch.randn(C, L, generator=g, dtype=torch.float64)
    torch.testing.assert_close(th.CausalFFTConv.apply(u, k), direct_causal_conv(u, k), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("L", [1, 2, 5, 16, 33])
def test_fft_conv_gradcheck(L):
    u = torch.randn(2, 3, L, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, L, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(th.CausalFFTConv.apply, (u, k))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ACGTN", max_size=300))
def test_tokenizer_round_trip(seq):
    ids = th.tokenize(seq)
    assert ids.dtype == np.int64 and len(ids) == len(seq)
    assert th.detokenize(ids) == seq
    assert np.array_equal(th.tokenize(seq.lower()), ids)  # soft-masked bases are ordinary bases


def test_tokenizer_ids_and_unknown_letters():
    assert th.tokenize("ACGTN").tolist() == [7, 8, 9, 10, 11]
    assert th.tokenize("RYKMSW-x").tolist() == [th.N_ID] * 8  # IUPAC and any other letter -> N
    assert th.detokenize([0, 7, 1, 4]) == "[CLS]A[SEP][PAD]"
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        th.detokenize([13])


def test_fft_size_is_smooth_and_large_enough():
    for n in range(1, 3000):
        m = th.fft_size(n)
        assert m >= n
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        assert r == 1
    assert th.fft_size(2 * 1000 - 1) == 2000
    assert th.fft_size(1000, radices=(2,)) == 1024


# --- bad input -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model():
    return th.HyenaDNA(th.HyenaConfig(d_model=8, n_layer=1, d_inner=16, filter_order=8, l_max=50)).eval()


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[7, 8, 12]]), r"token ids must be in \[0, 12\), got values in \[7, 12\]"),
    (torch.tensor([[-1, 8]]), r"token ids must be in \[0, 12\)"),
    (torch.full((1, 51), 7), r"length 51 is outside the allowed range \[1, 50\]"),
    (torch.zeros((1, 0), dtype=torch.long), r"length 0 is outside"),
    (torch.tensor([7, 8]), r"shape \(batch, length\), got 1 dims"),
    (torch.full((1, 2, 3), 7), r"got 3 dims"),
    (torch.tensor([[7.0, 8.0]]), r"integer tensor .* got dtype torch.float32"),
    (np.array([[7, 8]]), r"must be a torch.Tensor"),
])
def test_bad_input_ids(small_model, ids, message):
    with pytest.raises(ValueError, match=message):
        small_model(ids)


def test_bad_config():
    with pytest.raises(ValueError, match="order must be an integer >= 2"):
        th.HyenaDNA(th.HyenaConfig(order=1))
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        th.preset_config("huge")


# --- checkpoints -----------------------------------------------------------------------------------------

def test_presets_build():
    cfg = th.preset_config("large-1m")
    assert (cfg.d_model, cfg.n_layer, cfg.d_inner, cfg.l_max) == (256, 8, 1024, 1_000_002)
    assert 6.4e6 < th.HyenaDNA(cfg).num_params() < 6.8e6  # "about 6.6M parameters"


@needs_fixture
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
    with pytest.raises(Exception):  # what a user meets with torch.load's safe mode
        torch.load(tmp_path / "ckpt" / "weights.ckpt", weights_only=True)
    a, b = th.from_pretrained(FIXTURE), th.from_pretrained(tmp_path / "ckpt")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": exploit}, tmp_path / "evil.ckpt")
    blob = th.load_torch_file(tmp_path / "evil.ckpt")
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


@needs_fixture
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
