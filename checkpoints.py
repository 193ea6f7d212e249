"""
Checkpoint formats: reading and writing the folders a HyenaDNA model comes in, and the published models'
sizes. tinyhyena.from_pretrained and tinyhyena.save_pretrained are the public calls. This file sits below the
model: it reads a folder into a config and tensors in the model's names, and writes a model's back, but it
imports nothing of tinyhyena (the caller hands it the config class and the token map).

A checkpoint is a folder holding config.json and weights, in one of three layouts:
  - published HyenaDNA (PyTorch Lightning): config.json with the operator's fields nested under "layer",
    weights.ckpt with keys model.backbone.*;
  - Hugging Face hub (the "-hf" repositories, loaded there with trust_remote_code): a flat config.json
    (max_seq_len, hyena_order, activation_freq, ...), model.safetensors or pytorch_model.bin with keys
    hyena.backbone.*; a sequence classifier adds score.weight;
  - this project's: config.json in the published layout, model.pt with tinyhyena's own keys.
Both foreign layouts name the modules alike below "backbone.", so one table translates both. Pickled files are
read by a restricted unpickler that never runs code from the file, and safetensors with torch alone.
"""

import json
import math
import os
import pickle
from dataclasses import dataclass

import torch

from base import MissingFileError, UserError, atomic_write, write_text


# The published checkpoints (LongSafari/hyenadna-*) by size; l_max is the trained length + 2, d_inner 4 d_model.
PRESETS = {
    "tiny-1k": dict(d_model=128, n_layer=2, l_max=1024 + 2),
    "tiny-1k-d256": dict(d_model=256, n_layer=2, l_max=1024 + 2),
    "tiny-16k-d128": dict(d_model=128, n_layer=2, l_max=16384 + 2),
    "small-32k": dict(d_model=256, n_layer=4, l_max=32768 + 2),
    "medium-160k": dict(d_model=256, n_layer=8, l_max=160000 + 2),
    "medium-450k": dict(d_model=256, n_layer=8, l_max=450000 + 2),
    "large-1m": dict(d_model=256, n_layer=8, l_max=1_000_000 + 2),
}


class _Opaque:
    """Stands in for any class a checkpoint names outside the allow-list below (omegaconf's DictConfig,
    Lightning's AttributeDict, ...). It records what the pickle hands it and runs nothing, so loading
    needs neither those libraries nor trust in the file."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("list", []).extend(values)


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "complex"), ("torch", "Size"), ("torch", "device"), ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                               torch.dtype)):
            return super().find_class(module, name)
        return type(name, (_Opaque,), {"__module__": "opaque." + module})


class _RestrictedPickleModule:  # what torch.load expects of a `pickle_module`
    Unpickler = _RestrictedUnpickler
    __name__ = "tinyhyena_restricted_pickle"

    @staticmethod
    def load(f, **kwargs):
        return _RestrictedUnpickler(f, **kwargs).load()


def load_torch_file(path):
    """torch.load that never executes code from the file: tensors and plain containers come back as they
    are, objects of any other class as inert placeholders. Errors name the file."""
    try:
        return torch.load(path, map_location="cpu", pickle_module=_RestrictedPickleModule, weights_only=False)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: file not found") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


# safetensors, the hub's weight format, is simple enough to read and write with torch alone: an 8-byte
# little-endian header size, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}} (plus an optional
# "__metadata__" of strings), then the tensors' raw little-endian bytes, offsets counted from the header's end.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file. ValueError naming the file if it is not one."""
    blob = bytearray(os.path.getsize(path))  # writable, so the tensors can view it without a copy
    with open(path, "rb") as f:
        f.readinto(blob)
    try:
        size = int.from_bytes(blob[:8], "little")
        if len(blob) < 8 or size > len(blob) - 8:
            raise UserError(f"header size {size} exceeds the file's {len(blob)} bytes")
        header = json.loads(blob[8:8 + size])
        data = memoryview(blob)[8 + size:]
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise UserError(f"tensor {name!r} has unsupported dtype {info['dtype']!r}")
            begin, end = info["data_offsets"]
            shape = [int(n) for n in info["shape"]]
            if not 0 <= begin <= end <= len(data) or end - begin != math.prod(shape) * dtype.itemsize:
                raise UserError(f"tensor {name!r}: byte range {begin}..{end} does not fit shape {shape}")
            flat = torch.frombuffer(data[begin:end], dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(shape)
        return tensors
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as safetensors, atomically. metadata: {str: str} (the hub's loader wants
    {"format": "pt"})."""
    dtype_names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    header, offset, chunks = {}, 0, []
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": dtype_names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        chunks.append(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for raw in chunks:
                f.write(raw)
    atomic_write(path, write)


# This module's names <-> the published ones (after "backbone."), one substitution per key at most. Reading
# applies them right to left, writing left to right; the filter MLP comes first, so that its ".bias" keys are
# not taken for the filter's own bias.
_PUBLISHED_NAMES = [
    ("embedding.", "embeddings.word_embeddings."),
    ("blocks.", "layers."),
    (".short_conv.", ".short_filter."),
    (".filter.mlp.", ".filter_fn.implicit_filter."),
    (".filter.z", ".filter_fn.pos_emb.z"),
    (".filter.t", ".filter_fn.pos_emb.t"),
    (".filter.deltas", ".filter_fn.modulation.deltas"),
    (".filter.bias", ".filter_fn.bias"),
]
# runs trained with checkpoint_mixer / checkpoint_mlp wrap the modules in one more layer
_PUBLISHED_WRAPPERS = [(".mixer.layer.", ".mixer."), (".mlp.layer.", ".mlp.")]
# the published filter tables carry leading dimensions of size 1, which this module drops: z (1, L, emb_dim),
# t (1, L, 1), deltas (1, 1, n_filters)
_PUBLISHED_LEADING_ONES = {".filter.z": 1, ".filter.t": 1, ".filter.deltas": 2}


def _published_name(key):
    """This module's key -> its name below "backbone." in the published and hub layouts."""
    for ours, theirs in _PUBLISHED_NAMES:
        key = key.replace(ours, theirs, 1)
    return key


def _our_name(key):
    for theirs, ours in _PUBLISHED_WRAPPERS:
        key = key.replace(theirs, ours)
    for ours, theirs in _PUBLISHED_NAMES:
        key = key.replace(theirs, ours, 1)
    return key.replace(".filter_fn.", ".filter.")  # filter tables some versions keep on the filter itself


def convert_published_state_dict(state_dict, source="checkpoint"):
    """Split a published or hub state dict into (backbone state in this module's keys, other tensors by their
    own names: `score.weight` of a hub classifier, say). Keys are read after "backbone." (model.backbone.*,
    hyena.backbone.*). The LM head is the tied embedding, so `lm_head.weight` is checked, not loaded."""
    out, rest, head = {}, {}, None
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key.endswith("lm_head.weight"):
            head = value
        elif "backbone." in key:
            out[_our_name(key.split("backbone.", 1)[1])] = value
        else:
            rest[key] = value
    if head is not None and "embedding.weight" in out and not torch.equal(head, out["embedding.weight"]):
        raise UserError(f"{source}: lm_head.weight differs from the token embedding; tinyhyena ties them")
    return out, rest


def load_state_dict(model, state_dict, source):
    """load_state_dict with errors that name the file, shapes of published buffers reconciled
    ((1, L, 5) vs (L, 5)), and the shared sine frequency checked."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise UserError(f"{source}: keys do not match the model: missing {missing[:4]}{'...' if len(missing) > 4 else ''}"
                         f", unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    fixed = {}
    for key, value in state_dict.items():
        if value.numel() != own[key].numel():
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)}, the config implies "
                             f"{tuple(own[key].shape)}")
        fixed[key] = value.reshape(own[key].shape).to(own[key].dtype)
    for i in range(len(model.blocks)):
        freqs = [fixed[f"blocks.{i}.mixer.filter.mlp.{j}.freq"] for j in (1, 3, 5)]
        if not all(torch.equal(freqs[0], f) for f in freqs[1:]):
            raise UserError(f"{source}: block {i}'s three sine frequencies differ; the published model shares one")
    model.load_state_dict(fixed)


# The published config.json: tinyhyena.HyenaConfig's fields, the operator's nested under "layer" (where
# short_filter_order is "local_order"). Other fields are kept aside in cfg.extra and written back.
_PUBLISHED_FIELDS = ["d_model", "n_layer", "d_inner", "vocab_size", "pad_vocab_size_multiple", "embed_dropout",
                     "resid_dropout", "layer_norm_epsilon"]
_PUBLISHED_LAYER_FIELDS = {"l_max": "l_max", "order": "order", "filter_order": "filter_order",
                           "emb_dim": "emb_dim", "w": "w", "local_order": "short_filter_order"}


def config_from_published(d, config_class):
    """config_class (tinyhyena.HyenaConfig) from a published config.json dict, validated. A field is read at
    either level (ours flattened, the published nested), the rest kept in cfg.extra."""
    d, layer = dict(d), dict(d.get("layer", {}))
    d.pop("layer", None)
    names = {**{k: k for k in _PUBLISHED_FIELDS}, **_PUBLISHED_LAYER_FIELDS, "short_filter_order": "short_filter_order"}
    fields = {ours: source.pop(theirs) for source in (d, layer) for theirs, ours in names.items() if theirs in source}
    return config_class(**fields, extra={**d, "layer": layer}).validate()


def config_to_published(cfg):
    """The published config.json dict of cfg (a tinyhyena.HyenaConfig)."""
    extra = dict(cfg.extra)
    layer = dict(extra.pop("layer", {}))
    layer.update({"_name_": "hyena", **{theirs: getattr(cfg, ours) for theirs, ours in _PUBLISHED_LAYER_FIELDS.items()}})
    return {**extra, **{k: getattr(cfg, k) for k in _PUBLISHED_FIELDS}, "residual_in_fp32": True, "layer": layer}


# The hub port's config.json: its field -> ours. Fields it has that change nothing here (dropouts of the
# operator, initializer_range, ...) are kept aside and written back.
_HF_FIELDS = {"d_model": "d_model", "n_layer": "n_layer", "d_inner": "d_inner", "vocab_size": "vocab_size",
              "pad_vocab_size_multiple": "pad_vocab_size_multiple", "embed_dropout": "embed_dropout",
              "layer_norm_epsilon": "layer_norm_epsilon", "max_seq_len": "l_max", "hyena_order": "order",
              "filter_order": "filter_order", "emb_dim": "emb_dim", "short_filter_order": "short_filter_order",
              "activation_freq": "w"}
# What the port computes that tinyhyena does not represent: field -> (the one value both share, why).
_HF_REQUIRED = {
    "hyena_order": (2, "the port's window has d_model decay rates, one filter set's worth"),
    "num_inner_mlps": (2, "tinyhyena's filter MLP has three sine layers"),
    "use_bias": (True, "tinyhyena always adds the filter's skip bias, as the port's fftconv does"),
    "short_filter_order": (3, "the port pads its short convolution by 2, which is causal only for 3 taps"),
    "layer_norm_epsilon": (1e-5, "the port's block norms use 1e-5 whatever the config says"),
}
HF_CODE_REPO = "LongSafari/hyenadna-tiny-1k-seqlen-hf"  # where the port's configuration and modeling code live


def is_hf_config(d):
    return isinstance(d, dict) and "max_seq_len" in d and "layer" not in d


def config_from_hf(d, config_class):
    """config_class (tinyhyena.HyenaConfig) from a hub config.json dict. UserError naming the field for what
    tinyhyena cannot represent."""
    for name, (value, why) in _HF_REQUIRED.items():
        if name in d and d[name] != value and not (isinstance(value, float) and isinstance(d[name], (int, float))
                                                   and math.isclose(d[name], value)):
            raise UserError(f"config field {name} is {d[name]!r}; tinyhyena reads only {value!r} ({why})")
    fields = {ours: d[theirs] for theirs, ours in _HF_FIELDS.items() if d.get(theirs) is not None}
    fields.setdefault("d_inner", 4 * fields.get("d_model", config_class.d_model))
    fields["resid_dropout"] = 0.0  # the port's blocks have no residual dropout
    if not isinstance(fields.get("w", 1), (int, float)):
        raise UserError(f"config field activation_freq must be a number, got {fields['w']!r}")
    extra = {k: v for k, v in d.items() if k not in _HF_FIELDS}
    return config_class(**fields, extra={"hf": extra}).validate()


def config_to_hf(cfg, **fields):
    """The hub config.json dict of cfg; `fields` (architectures, num_labels, ...) are added last."""
    out = {k: v for k, v in cfg.extra.get("hf", {}).items() if k not in ("architectures", "auto_map")}
    out.update({theirs: getattr(cfg, ours) for theirs, ours in _HF_FIELDS.items()})
    out.update(model_type="hyenadna", num_inner_mlps=2, use_bias=True, train_freq=True,
               tie_word_embeddings=True, torch_dtype="float32",
               auto_map={"AutoConfig": f"{HF_CODE_REPO}--configuration_hyena.HyenaConfig",
                         "AutoModel": f"{HF_CODE_REPO}--modeling_hyena.HyenaDNAModel",
                         "AutoModelForCausalLM": f"{HF_CODE_REPO}--modeling_hyena.HyenaDNAForCausalLM",
                         "AutoModelForSequenceClassification":
                             f"{HF_CODE_REPO}--modeling_hyena.HyenaDNAForSequenceClassification"},
               architectures=["HyenaDNAForCausalLM"])
    out.update(fields)
    return out


def _restore_shared_freqs(state, cfg):
    """The port's three sine layers share one `freq` tensor, which safetensors saves once (or, with
    train_freq false, not at all: the port then uses activation_freq). Fill in the missing copies."""
    for i in range(cfg.n_layer):
        keys = [f"blocks.{i}.mixer.filter.mlp.{j}.freq" for j in (1, 3, 5)]
        present = [state[k] for k in keys if k in state]
        fill = present[0] if present else torch.full((1, cfg.filter_order), float(cfg.w))
        for k in keys:
            state.setdefault(k, fill)


WEIGHT_FILES = ("model.pt", "weights.ckpt", "model.safetensors", "pytorch_model.bin")


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, read but not yet built into a model."""
    cfg: object  # a tinyhyena.HyenaConfig
    state: dict  # the backbone's tensors in this module's names
    rest: dict  # tensors outside the backbone, by their own names (a hub classifier's score.weight)
    config: dict  # config.json as written
    weights_path: str


def read_checkpoint(path, config_class):
    """Read a checkpoint folder in any of the three layouts (see above); its config as a config_class
    (tinyhyena.HyenaConfig). Errors name the file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingFileError(f"{path}: checkpoint folder not found")
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise TypeError(f"a JSON object was expected, not {type(config).__name__}")
        cfg = config_from_hf(config, config_class) if is_hf_config(config) else config_from_published(config, config_class)
    except FileNotFoundError:
        raise MissingFileError(f"{config_path}: file not found (a checkpoint folder holds config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{config_path}: malformed config ({e})") from None
    name = next((n for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))), None)
    if name is None:
        raise MissingFileError(f"{path}: no weights file ({', '.join(WEIGHT_FILES)})")
    weights_path = os.path.join(path, name)
    blob = read_safetensors(weights_path) if name.endswith(".safetensors") else load_torch_file(weights_path)
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]  # a Lightning file: the rest is optimizer state and hyper-parameters
    if not isinstance(blob, dict) or not blob:
        raise UserError(f"{weights_path}: holds no state dict")
    if name == "model.pt":
        return Checkpoint(cfg, blob, {}, config, weights_path)
    state, rest = convert_published_state_dict(blob, source=weights_path)
    if is_hf_config(config):
        _restore_shared_freqs(state, cfg)
    return Checkpoint(cfg, state, rest, config, weights_path)


def hf_state_dict(model, prefix="hyena.backbone.", lm_head=True):
    """The model's tensors under the hub port's names and shapes, with the tied LM head unless lm_head is
    False (a sequence classifier has none)."""
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        ones = next((n for suffix, n in _PUBLISHED_LEADING_ONES.items() if key.endswith(suffix)), 0)
        out[prefix + _published_name(key)] = value.reshape((1,) * ones + value.shape).clone()
    if lm_head:
        out["lm_head.weight"] = model.embedding.weight.detach().cpu().clone()
    return out


HF_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def write_hf_tokenizer(path, cfg, special_tokens, bases):
    """The port's tokenizer files, so that AutoTokenizer.from_pretrained(path, trust_remote_code=True) loads
    its HyenaDNATokenizer from the port's code, as config.json's auto_map does for the model: one id per
    character (tinyhyena's token map), [SEP] ending each sequence, padding on the left."""
    special = {"bos_token": "[BOS]", "eos_token": "[SEP]", "sep_token": "[SEP]", "cls_token": "[CLS]",
               "pad_token": "[PAD]", "mask_token": "[MASK]", "unk_token": "[UNK]"}
    added = {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for token, i in special_tokens.items()}
    config = {"auto_map": {"AutoTokenizer": [f"{HF_CODE_REPO}--tokenization_hyena.HyenaDNATokenizer", None]},
              "tokenizer_class": "HyenaDNATokenizer", "characters": list(bases), "model_max_length": cfg.l_max,
              "padding_side": "left", "added_tokens_decoder": added, "clean_up_tokenization_spaces": True, **special}
    write_text(os.path.join(path, "tokenizer_config.json"), [json.dumps(config, indent=2)])
    write_text(os.path.join(path, "special_tokens_map.json"), [json.dumps(special, indent=2)])


def save_model(model, path, layout, special_tokens, bases):
    """tinyhyena.save_pretrained: write the model into the folder `path`, each file atomically (see there);
    special_tokens and bases are its token map, for the hub layout's tokenizer files."""
    if layout not in ("tinyhyena", "hf"):
        raise UserError(f"layout must be 'tinyhyena' or 'hf', got {layout!r}")
    os.makedirs(path, exist_ok=True)
    if layout == "hf":
        write_safetensors(os.path.join(path, "model.safetensors"), hf_state_dict(model), {"format": "pt"})
        write_hf_tokenizer(path, model.cfg, special_tokens, bases)
        config = config_to_hf(model.cfg)
    else:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        atomic_write(os.path.join(path, "model.pt"), lambda tmp: torch.save(state, tmp))
        config = config_to_published(model.cfg)
    write_text(os.path.join(path, "config.json"), [json.dumps(config, indent=2)])
