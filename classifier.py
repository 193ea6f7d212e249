"""
The fine-tuned model: a pretrained HyenaDNA backbone with a classification or regression head, or with a soft
prompt, and its folder format. finetune.py trains it, predicts and embeds with it; export.py exports it.

    model = load_classifier("ft")            # a folder from `finetune.py fit`, or a Hugging Face classifier
    probabilities = predict_outputs(model, [tinyhyena.tokenize("ACGT...")], rc="average")  # (1, n_classes)
"""

import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import tinyhyena as th
from base import atomic_write, write_text

CLASSIFIER_FILE = "classifier.json"  # marks a fine-tuned folder: the head and what it needs
HEAD_FILE = "head.pt"
TASKS = ("classify", "regression", "multilabel", "per_base", "per_base_values")
PER_BASE = ("per_base", "per_base_values")  # an output at every position, not one per sequence


# ---------------------------------------------------------------------------------------------------------
# The classifier.

class SequenceClassifier(nn.Module):
    """ids (B, L), padded on the left with [PAD] -> (B, n_outputs): class logits (task classify), values
    (regression) or one logit per binary target (multilabel); per base, (B, L, n_outputs): class logits at
    each position (per_base) or values (per_base_values), from the head on each position's hidden state.
    With `end_token`, that token id is appended to every sequence first (the Hugging Face port's tokenizer
    ends each sequence with [SEP], and its classifiers read the hidden state there)."""

    def __init__(self, backbone, n_outputs, pool="mean", soft_prompt=0, class_tokens=None, freeze=False,
                 task="classify", end_token=None):
        super().__init__()
        if pool not in ("mean", "last"):
            raise th.UserError(f"pool must be mean or last, got {pool!r}")
        if task not in TASKS:
            raise th.UserError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if soft_prompt and task != "classify":
            raise th.UserError(f"soft prompting reads a sequence's class as its next token; it does not do {task}")
        self.backbone, self.pool, self.n_outputs, self.task = backbone, pool, n_outputs, task
        self.end_token = end_token
        self.frozen = freeze or soft_prompt > 0
        if task in ("regression", "per_base_values"):  # the head predicts standardized targets; forward undoes it
            self.register_buffer("target_mean", torch.zeros(n_outputs))
            self.register_buffer("target_std", torch.ones(n_outputs))
        if soft_prompt:
            tokens = class_tokens or "ACGTN"[:n_outputs]
            if len(tokens) != n_outputs or not set(tokens) <= set(th.BASES) or len(set(tokens)) != n_outputs:
                raise th.UserError(f"soft prompting maps each of the {n_outputs} classes to its own nucleotide token "
                                 f"(at most 5: ACGTN), got class tokens {tokens!r}")
            self.class_tokens = tokens
            self.register_buffer("class_ids", torch.tensor([th.BASE_IDS[t] for t in tokens]))
            self.prompt = nn.Parameter(torch.randn(soft_prompt, backbone.cfg.d_model) * 0.02)  # (K, d)
            self.head = None
        else:
            self.class_tokens, self.prompt = None, None
            self.head = nn.Linear(backbone.cfg.d_model, n_outputs)
        if self.frozen:
            self.backbone.requires_grad_(False)

    @property
    def max_len(self):
        """The longest sequence the classifier takes: the prompt, or the end token, needs room within l_max."""
        room = len(self.prompt) if self.prompt is not None else int(self.end_token is not None)
        return self.backbone.cfg.l_max - room

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:  # a frozen backbone computes fixed features: no dropout
            self.backbone.eval()
        return self

    def forward(self, input_ids):
        if self.end_token is not None:  # left padding: every row ends in the last column
            input_ids = torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], 1), self.end_token)], 1)
        real = input_ids != th.PAD_ID  # (B, L); left padding: the real bases are the last ones of a row
        if self.prompt is None:
            hidden = self.backbone.hidden_states(input_ids)  # (B, L, d)
            if self.task == "per_base":
                return self.head(hidden)  # (B, L, n_outputs)
            if self.task == "per_base_values":
                return self.head(hidden) * self.target_std + self.target_mean
            if self.pool == "last":
                pooled = hidden[:, -1]
            else:
                weights = real.to(hidden.dtype)
                pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
            out = self.head(pooled)
            return out * self.target_std + self.target_mean if self.task == "regression" else out
        return self.prompted_logits(input_ids, real)

    def loss(self, outputs, targets):
        """The task's loss of forward's outputs (B, n_outputs) against targets: class indices (B,), or (B, n)
        floats; per base, outputs (B, L, n_outputs) against (B, L) targets (values: over the labelled bases only)."""
        if self.task == "classify":
            return F.cross_entropy(outputs, targets)
        if self.task == "per_base":
            return F.cross_entropy(outputs.flatten(0, 1), targets.flatten().long())
        if self.task == "per_base_values":
            labelled = targets.isfinite()
            return F.mse_loss(((outputs[..., 0] - self.target_mean) / self.target_std)[labelled],
                              ((targets - self.target_mean) / self.target_std)[labelled])
        if self.task == "regression":  # on the standardized scale, so every target weighs alike
            return F.mse_loss((outputs - self.target_mean) / self.target_std,
                              (targets - self.target_mean) / self.target_std)
        return F.binary_cross_entropy_with_logits(outputs, targets)

    def prompted_logits(self, input_ids, real):
        """The prompt goes between a row's padding and its bases, so no padding separates them: row i with n_i
        pads becomes [n_i pads, K prompt vectors, bases]. Then the next-token logits at the last position,
        restricted to the class tokens."""
        self.backbone.check_input_ids(input_ids)
        B, L = input_ids.shape
        K = len(self.prompt)
        emb = self.backbone.embedding
        padded = torch.cat([input_ids.new_full((B, K), th.PAD_ID), input_ids], 1)  # bases shifted right by K
        x = emb(padded)  # (B, K+L, d)
        slot = torch.arange(K + L, device=x.device) - (~real).sum(1, keepdim=True)  # (B, K+L): index in prompt
        in_prompt = (slot >= 0) & (slot < K)
        x = torch.where(in_prompt[..., None], self.prompt[slot.clamp(0, K - 1)].to(x.dtype), x)
        hidden = self.backbone.hidden_states_from_embeddings(x)[:, -1]  # (B, d)
        return F.linear(hidden, emb.weight[self.class_ids])  # (B, C): the LM head's rows of the class tokens

    def trained_state(self):
        """What fine-tuning changed besides the backbone: the head's or the prompt's weights."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.") and k != "class_ids"}


def with_backbone(model, backbone):
    """The classifier `model` (its head or prompt, task and names) on another backbone of the same shape:
    export.py's copy on the plain path."""
    soft_prompt = 0 if model.prompt is None else len(model.prompt)
    new = SequenceClassifier(backbone, model.n_outputs, model.pool, soft_prompt, model.class_tokens, task=model.task,
                             end_token=model.end_token)
    new.load_state_dict(model.state_dict())
    new.class_names, new.truncate = getattr(model, "class_names", None), getattr(model, "truncate", None)
    return new.eval()


# What users read from forward's outputs, and its name in an exported graph.
OUTPUT_NAME = {"classify": "probabilities", "multilabel": "probabilities", "regression": "values",
               "per_base": "probabilities", "per_base_values": "values"}


def readout(task, outputs):
    """forward's outputs (B, n), or (B, L, n) per base -> class probabilities (classify, per_base), each
    target's probability (multilabel), or the values themselves (regression, per_base_values)."""
    if task in ("classify", "per_base"):
        return torch.softmax(outputs, -1)
    return torch.sigmoid(outputs) if task == "multilabel" else outputs


def strands(seqs, rc):
    """The sequences as given, and with rc "average" also reverse-complemented: a causal model reads one strand
    in one direction, so the two readings differ, and their average is the same for a sequence and its reverse
    complement."""
    from data import reverse_complement  # here: importing classifier (export.py does) loads no data code
    if rc not in ("none", "average"):
        raise th.UserError(f"rc must be 'none' or 'average', got {rc!r}")
    return [seqs] + ([[reverse_complement(s).astype(np.int64) for s in seqs]] if rc == "average" else [])


@torch.no_grad()
def predict_logits(model, seqs, batch_size, device=None):
    """forward's float32 outputs in input order: (N, n_outputs), or per base a list of (length, n_outputs).
    Padding is an input like any other (it sits before the sequence of a causal model), so a batch here holds
    sequences of one length only: each prediction is the one the sequence gets alone, whatever else is being
    predicted."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    by_length = {}
    for i, s in enumerate(seqs):
        by_length.setdefault(len(s), []).append(i)
    batches = [rows[i:i + batch_size] for rows in by_length.values() for i in range(0, len(rows), batch_size)]
    out = [None] * len(seqs)
    for rows in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = model(pad_left([seqs[r] for r in rows]).to(device)).float().cpu()
        for r, o in zip(rows, outputs):
            out[r] = o
    model.train(was_training)
    if model.task in PER_BASE:
        return out
    return torch.stack(out) if out else torch.zeros(0, model.n_outputs)


def predict_outputs(model, seqs, batch_size=32, rc="none"):
    """What users read from a fine-tuned model (readout) for 1-D id arrays: (N, n_outputs), or per base a list
    of (length, n_outputs). rc "average": the mean over both strands, each per-base output at its own base
    (the reverse strand's read backwards)."""
    per_strand = []
    for reverse, s in enumerate(strands(seqs, rc)):
        outputs = predict_logits(model, s, batch_size)
        if model.task in PER_BASE:
            per_strand.append([readout(model.task, o.flip(0) if reverse else o) for o in outputs])
        else:
            per_strand.append(readout(model.task, outputs))
    if model.task in PER_BASE:
        return [torch.stack(v).mean(0) for v in zip(*per_strand)]
    return torch.stack(per_strand).mean(0)


def save_classifier(model, out, class_names, meta, layout="tinyhyena"):
    """layout "tinyhyena": config.json + model.pt (the backbone: from_pretrained and embed read it), head.pt,
    classifier.json, each written atomically; classifier.json last, so the folder is a classifier only once
    complete. layout "hf": the hub's sequence-classification folder (save_hf_classifier)."""
    if layout == "hf":
        return save_hf_classifier(model, out, class_names, meta)
    th.save_pretrained(model.backbone, out)
    atomic_write(os.path.join(out, HEAD_FILE), lambda tmp: torch.save(
        {k: v.detach().cpu() for k, v in model.trained_state().items()}, tmp))
    info = {"task": model.task, "class_names": class_names, "pool": model.pool, "class_tokens": model.class_tokens,
            "soft_prompt": 0 if model.prompt is None else len(model.prompt), **meta}
    write_text(os.path.join(out, CLASSIFIER_FILE), [json.dumps(info, indent=2)])


def fits_hf_layout(model):
    """Why the hub's HyenaDNAForSequenceClassification cannot hold this classifier, or None: its head is a
    linear map without bias (or target scale) on the hidden state at the [SEP] its tokenizer appends."""
    if model.prompt is not None:
        return "a soft prompt"
    if model.pool != "last" or model.end_token != th.SPECIAL_TOKENS["[SEP]"]:
        return "a pool other than the last token's, after an appended [SEP]"
    if bool(model.head.bias.detach().any()):
        return "a head with a bias"
    if model.task == "regression" and (model.target_mean.any() or (model.target_std != 1).any()):
        return "scaled regression targets"
    return None


def save_hf_classifier(model, out, class_names, meta):
    """The hub port's sequence-classification folder: config.json (architectures HyenaDNAForSequenceClassification,
    the labels, problem_type; `meta` under "tinyhyena"), model.safetensors (the backbone under the port's
    names and score.weight) and the tokenizer's files; config.json last. load_classifier reads it back."""
    why = fits_hf_layout(model)
    if why:
        raise th.UserError(f"the hub's sequence classifier cannot hold {why}; fine-tune with --layout hf, or save "
                           "in tinyhyena's layout")
    os.makedirs(out, exist_ok=True)
    tensors = checkpoints.hf_state_dict(model.backbone, lm_head=False)
    tensors["score.weight"] = model.head.weight.detach().cpu().clone()
    checkpoints.write_safetensors(os.path.join(out, "model.safetensors"), tensors, {"format": "pt"})
    checkpoints.write_hf_tokenizer(out, model.backbone.cfg, th.SPECIAL_TOKENS, th.BASES)
    problem = {task: problem for problem, task in HF_PROBLEM_TYPES.items()}[model.task]
    config = checkpoints.config_to_hf(model.backbone.cfg, architectures=["HyenaDNAForSequenceClassification"],
                                      num_labels=len(class_names), problem_type=problem,
                                      id2label={str(i): c for i, c in enumerate(class_names)},
                                      label2id={c: i for i, c in enumerate(class_names)}, tinyhyena=meta)
    write_text(os.path.join(out, "config.json"), [json.dumps(config, indent=2)])


def read_classifier_info(path):
    info_path = os.path.join(path, CLASSIFIER_FILE)
    if not os.path.isfile(info_path):
        kind = "a language model" if os.path.isfile(os.path.join(path, "config.json")) else "no checkpoint"
        raise th.UserError(f"{path}: not a fine-tuned classifier (no {CLASSIFIER_FILE}; it holds {kind}); "
                         "make one with `python finetune.py fit`")
    try:
        with open(info_path) as f:
            info = json.load(f)
        info["class_names"] = [str(c) for c in info["class_names"]]
        info.setdefault("task", "classify")
        return info
    except (ValueError, KeyError, TypeError) as e:
        raise th.UserError(f"{info_path}: malformed ({e})") from None


# The Hugging Face port's problem_type -> our task.
HF_PROBLEM_TYPES = {"single_label_classification": "classify", "multi_label_classification": "multilabel",
                    "regression": "regression"}


def hf_classifier(ckpt, path):
    """A HyenaDNAForSequenceClassification folder (config.json + weights with score.weight) as a
    SequenceClassifier: the port's head is a linear map without bias on the hidden state of the last token,
    which is the [SEP] its tokenizer appends to every sequence (so we append it too)."""
    score = ckpt.rest.get("score.weight")
    if score is None:
        raise th.UserError(f"{path}: not a fine-tuned classifier (no {CLASSIFIER_FILE}, and its weights hold no "
                         "score.weight of a Hugging Face sequence classifier); make one with `python finetune.py fit`")
    n = score.shape[0]
    problem = ckpt.config.get("problem_type") or ("regression" if n == 1 else "single_label_classification")
    if problem not in HF_PROBLEM_TYPES:
        raise th.UserError(f"{path}/config.json: config field problem_type is {problem!r}; expected one of "
                         f"{', '.join(HF_PROBLEM_TYPES)}")
    backbone = th.HyenaDNA(ckpt.cfg)
    checkpoints.load_state_dict(backbone, ckpt.state, ckpt.weights_path)
    model = SequenceClassifier(backbone, n, pool="last", task=HF_PROBLEM_TYPES[problem],
                               end_token=th.SPECIAL_TOKENS["[SEP]"])
    with torch.no_grad():
        model.head.weight.copy_(score)
        model.head.bias.zero_()
    labels = ckpt.config.get("id2label") or {}
    model.class_names = [str(labels.get(str(i), labels.get(i, i))) for i in range(n)]
    model.truncate = "right"  # the port's tokenizer keeps a sequence's start
    return model


def is_classifier_folder(path):
    """A folder `finetune.py fit` wrote, or a Hugging Face sequence classifier's."""
    if os.path.isfile(os.path.join(path, CLASSIFIER_FILE)):
        return True
    try:
        with open(os.path.join(path, "config.json")) as f:
            return "HyenaDNAForSequenceClassification" in json.load(f).get("architectures", [])
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def load_classifier(path, device="cpu"):
    """The fine-tuned model in folder `path`, in eval mode: a module that maps ids (B, L), left-padded, to
    (B, n_outputs) (see SequenceClassifier). Reads folders written by `finetune.py fit` and Hugging Face
    HyenaDNAForSequenceClassification folders. `class_names` names the outputs, `task` says what they are."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, CLASSIFIER_FILE)) and os.path.isfile(os.path.join(path, "config.json")):
        ckpt = checkpoints.read_checkpoint(path, th.HyenaConfig)
        if checkpoints.is_hf_config(ckpt.config):
            return hf_classifier(ckpt, path).to(device).eval()
    info = read_classifier_info(path)
    backbone = th.from_pretrained(path)
    model = SequenceClassifier(backbone, len(info["class_names"]), info["pool"], info["soft_prompt"],
                               info["class_tokens"], task=info["task"])
    head_path = os.path.join(path, HEAD_FILE)
    state = checkpoints.load_torch_file(head_path)
    try:
        model.load_state_dict({**model.state_dict(), **state})
    except RuntimeError as e:
        raise th.UserError(f"{head_path}: does not fit {CLASSIFIER_FILE} ({str(e).splitlines()[0]})") from None
    model.class_names = info["class_names"]
    model.truncate = info.get("truncate", "center")
    return model.to(device).eval()


def pad_left(seqs):
    """list of 1-D id arrays -> (B, max length) int64, padded on the left with [PAD], as published."""
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), th.PAD_ID, dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            ids[row, -len(s):] = torch.from_numpy(np.asarray(s, dtype=np.int64))
    return ids
