"""
The ONNX graph of a tinyhyena or published HyenaDNA model, for ONNX Runtime without torch (`export`), and
the session apps should run it in (`ort_session`). export.py is its command line.

The graph takes `input_ids` int64 [batch, length] (both dynamic, length <= max_len) and gives `logits` float32
[batch, length, padded vocab] and/or `hidden` [batch, length, d_model].

A fine-tuned model's folder (finetune.py fit, or a Hugging Face sequence classifier) gives a graph whose output
is `probabilities` [batch, n_classes] (task classify, softmax; multilabel, one sigmoid per target) or `values`
[batch, n_targets] (regression), with the class or target names in metadata_props.

The graph holds about the parameters and its cost follows the input's length (what ONNX Runtime offers,
as of version 1.31; the measurements behind each choice are in BENCHMARKS.md):
- the implicit filters are computed in the graph, for the input's length, from positional features made
  from positions (the published checkpoints store them as l_max-long tables; export checks that the two
  agree). Freezing the filters instead would store l_max-long constants, past protobuf's 2 GB for large-1m;
- the FFT size is chosen in the graph from the input's L, from a table of fast sizes, so a 1,000-base input
  costs the same on a graph exported for max_len 2^20 as on one for 1,026;
- `--target cuda`: ONNX's DFT op has no CUDA kernel in ONNX Runtime (nodes would fall back to the CPU), so the
  FFT is written with the contrib ops com.microsoft.Rfft / Irfft, which run on cuFFT. Their Irfft infers an
  output length of 2m-1 from m frequency bins, so the sizes are odd (3^a 5^b 7^c);
- `--target cpu`: the FFT written as matrix products (a Cooley-Tukey split into small DFTs, see cpu_translation):
  ONNX Runtime's CPU DFT kernel is far slower than torch's FFT, while its MatMul runs near the machine's peak;
- each block is two ONNX Loops, over channel groups and over the MLP's hidden units (GroupedBlock): ONNX
  Runtime holds a whole-width graph's tensors past their last use.
Apps should make their session as ort_session does (memory pattern off).
"""

import json
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import base
import checkpoints
import classifier
import tinyhyena as th


# ---------------------------------------------------------------------------------------------------------
# The long convolution as a single graph node, which each target translates its own way.

@torch.library.custom_op("tinyhyena::causal_conv", mutates_args=())
def causal_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """tinyhyena.fft_conv as one node: causal convolution of u (B, C, L) with k (C, L)."""
    return th.fft_conv(u, k)


@causal_conv.register_fake
def _(u, k):
    return torch.empty_like(u)


def odd_fft_sizes(limit):
    """Every odd 3^a 5^b 7^c up to the first one >= limit, ascending: sizes cuFFT is fast at, and odd as
    ORT's Irfft needs (it infers 2m-1 outputs from m bins). A few hundred sizes reach 2^21."""
    sizes, p3 = [], 1
    while p3 < 3 * limit:
        p5 = p3
        while p5 < 3 * limit:
            p7 = p5
            while p7 < 7 * limit:
                sizes.append(p7)
                p7 *= 7
            p5 *= 5
        p3 *= 3
    sizes.sort()
    return sizes[:next(i for i, n in enumerate(sizes) if n >= limit) + 1]


def smallest_size_at_least(op, sizes, need):
    """In the graph: the smallest entry of the constant table `sizes` that is >= need (a [1] tensor), so the
    FFT size follows the input's length instead of being fixed at export."""
    table = op.Constant(value_ints=sizes)
    fits = op.GreaterOrEqual(table, need)
    return op.ReduceMin(op.Where(fits, table, op.Constant(value_ints=[sizes[-1]])), keepdims=1)  # [1]


def complex_product(op, a, b, axis=-1, out_axis=None, part_shape=None):
    """a·b as complex numbers, each holding its real and imaginary parts as the two halves of `axis`. The
    product's parts are stacked along out_axis (default: axis), after a reshape to part_shape if given: the FFT
    stages below use this to put the parts where the next MatMul reads them, instead of a Transpose."""
    ar, ai = op.Split(a, num_outputs=2, axis=axis)
    br, bi = op.Split(b, num_outputs=2, axis=axis)
    re, im = op.Sub(op.Mul(ar, br), op.Mul(ai, bi)), op.Add(op.Mul(ar, bi), op.Mul(ai, br))
    if part_shape is not None:
        re, im = op.Reshape(re, part_shape), op.Reshape(im, part_shape)
    return op.Concat(re, im, axis=axis if out_axis is None else out_axis)


def cuda_translation(l_max):
    """onnxscript function for causal_conv on the CUDA provider: zero-pad to an odd n >= 2L-1 chosen from the
    input's L, Rfft, complex product, Irfft (contrib ops on cuFFT: the graph has no DFT node)."""
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript import opset18 as op

    ms = onnxscript.values.Opset("com.microsoft", 1)

    def contrib(name):  # declare the contrib op's signature so onnxscript can emit it
        schema = OpSchema(name, "com.microsoft", 1, inputs=[OpSchema.FormalParameter("X", "T")],
                          outputs=[OpSchema.FormalParameter("Y", "T")], type_constraints=[("T", ["tensor(float)"], "")],
                          attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "")
                                      for a in ("normalized", "onesided", "signal_ndim")])
        return onnxscript.values.Op(ms, name, schema)
    rfft, irfft = contrib("Rfft"), contrib("Irfft")
    sizes = odd_fft_sizes(2 * l_max - 1)

    def translate(u, k):  # u (B, C, L), k (C, L)
        L = op.Shape(u, start=2, end=3)
        n = smallest_size_at_least(op, sizes, op.Sub(op.Add(L, L), op.Constant(value_ints=[1])))
        pad_u = op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0]), op.Sub(n, L), axis=0)
        pad_k = op.Concat(op.Constant(value_ints=[0, 0, 0]), op.Sub(n, L), axis=0)
        U = rfft(op.Pad(u, pad_u), normalized=0, onesided=1, signal_ndim=1)  # (B, C, m, 2)
        K = rfft(op.Pad(k, pad_k), normalized=0, onesided=1, signal_ndim=1)  # (C, m, 2)
        y = irfft(complex_product(op, U, K), normalized=0, onesided=1, signal_ndim=1)  # (B, C, n), scaled by 1/n
        return op.Slice(y, op.Constant(value_ints=[0]), L, op.Constant(value_ints=[2]))
    return translate


CPU_FFT_STAGES = 4  # S, the size-p stages of the cpu graph's FFT (see cpu_translation)


def fft_radix_lengths(l_max, stages=CPU_FFT_STAGES):
    """{p: the shortest L whose cpu-graph FFT uses radix p}, for the powers of two an input up to l_max reaches:
    p doubles where the multiply-adds n·(n1 + 4·S·p)/2, with n1 about 2L/p^S, drop by doubling it, at
    L = 2S/(1 - 2^-S)·(p/2)^(S+1)."""
    S, out, p = stages, {1: 1}, 2
    while (need := math.ceil(2 * S / (1 - 2 ** -S) * (p // 2) ** (S + 1))) <= max(l_max, 1):
        out[p], p = need, 2 * p
    return out


def cpu_translation(l_max, stages=CPU_FFT_STAGES):
    """onnxscript function for causal_conv on the CPU provider: the FFT written as matrix products.

    ONNX Runtime's CPU DFT kernel was most of the graph's time (BENCHMARKS.md), while its MatMul runs near the
    machine's peak. So the FFT of size n = n1·n2 is the Cooley-Tukey split into smaller dense DFTs, each a MatMul:

        X[k1 + n1·k2] = sum_j2 w_n2^(j2·k2) · w_n^(j2·k1) · sum_j1 w_n1^(j1·k1) · x[n2·j1 + j2]

    with w_m = e^(-2πi/m), that is: a DFT of size n1 over j1 (x viewed as (n1, n2·M) rows: a plain MatMul),
    the twiddle factors w_n^(j2·k1), and a DFT of size n2 = p^S over j2, itself split the same way into S
    DFTs of size p, one per base-p digit of j2, whose inner twiddles fold into the later stages' matrices
    (stage t has one 2p x 2p matrix per value of the earlier stages' outputs). Complex DFTs run as one real
    MatMul on stacked real and imaginary parts. Three facts make it cheap:
    - the spectrum is left in the order the stages produce it. The product with the filter's spectrum is
      elementwise and the inverse runs the stages backwards, so no reordering is ever needed;
    - the signal is real: bins k1 > n1/2 mirror those below (conjugate symmetry), so only n1/2 + 1 rows of k1
      are computed, and the inverse's last stage reads the mirrored half as a weight of 2 and takes the real
      part in the same MatMul;
    - the causal convolution pads to n >= 2L, and x[j] = 0 for j >= n/2: with n1 = 2h the first stage reads
      only h rows of j1, and the last computes only the L outputs' h rows.
    Any even n1 works, so n = 2h·p^S with h = ceil(L / p^S) exceeds 2L by less than 2·p^S: no rounding up to
    a power of two. Per signal the multiply-adds are about n·(n1 + 4·S·p)/2, and p is the power of two that
    makes that least for the input's L (fft_radix_lengths). More stages cost fewer multiply-adds at long L
    (at 2^20 S = 2 takes n·512, S = 4 n·144). The DFT matrices are computed in the graph for the
    input's L (cos and sin of exact integer phases, reduced mod their period before rounding): they cost
    O(h² + p^(S+1) + n), and the graph holds no length-sized constant."""
    from onnxscript import opset18 as op
    ints = lambda *values: op.Constant(value_ints=list(values))

    def shape(*dims):  # a shape from ints and [1] tensors
        return op.Concat(*[ints(d) if isinstance(d, int) else d for d in dims], axis=0)

    def count(n):  # 0 .. n-1 for a [1] tensor n
        return op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1))

    def phases(rows, cols, n):
        """(rows, cols) float: 2π·(r·c mod n)/n."""
        return phase(op.Unsqueeze(count(rows), ints(1)), op.Unsqueeze(count(cols), ints(0)), n)

    def phase(r, c, n):  # int64 tensors r and c, broadcast: 2π·(r·c mod n)/n
        turns = op.Cast(op.Mod(op.Mul(r, c), n), to=1)
        return op.Mul(turns, op.Div(op.Constant(value_float=2 * np.pi), op.Cast(n, to=1)))

    def translate(u, k):  # u (B, C, L), k (C, L)
        L = op.Shape(u, start=2, end=3)
        S, needs = stages, fft_radix_lengths(l_max, stages)
        p = op.ReduceMax(op.Where(op.GreaterOrEqual(L, ints(*needs.values())), ints(*needs), ints(1)), keepdims=1)
        powers = [ints(1)]  # p^0 .. p^S
        for _ in range(S):
            powers.append(op.Mul(powers[-1], p))
        n2 = powers[S]
        h = op.Div(op.Sub(op.Add(L, n2), ints(1)), n2)  # ceil(L / n2): rows j1 < h hold the signal
        n1, K1 = op.Add(h, h), op.Add(h, ints(1))  # K1 bins of k1: 0 .. n1/2
        n, two_p, two_K1 = op.Mul(n1, n2), op.Add(p, p), op.Add(K1, K1)
        rows = op.Mul(K1, powers[S - 1])  # the spectrum's rows: k1 and the first S-1 stages' output digits
        a = phases(K1, h, n1)
        first = op.Concat(op.Cos(a), op.Neg(op.Sin(a)), axis=0)  # (2K1, h): real rows, imaginary rows
        a = phases(h, K1, n1)
        k1 = count(K1)
        mirrored = op.Where(op.Or(op.Equal(k1, ints(0)), op.Equal(k1, op.Squeeze(h))),
                            op.Constant(value_float=1.0), op.Constant(value_float=2.0))  # (K1,)
        weight = op.Div(mirrored, op.Cast(n, to=1))  # with the inverse's 1/n
        last = op.Concat(op.Mul(op.Cos(a), weight), op.Neg(op.Mul(op.Sin(a), weight)), axis=1)  # (h, 2K1)
        a = phases(K1, n2, n)
        twiddle = op.Concat(op.Cos(a), op.Neg(op.Sin(a)), axis=0)  # (2K1, n2)
        twiddle_conj = op.Concat(op.Cos(a), op.Sin(a), axis=1)  # (K1, 2n2)
        # The DFT of size n2 = p^S over j2 = its S base-p digits x_1 (most significant) .. x_S: stage t maps x_t to
        # an output digit y_t, for each value of the earlier outputs' C = y_1 + p·y_2 + ... (as they are laid
        # out, y_1 outermost), with the inner twiddles folded in: w_(p^t)^(x_t·(p^(t-1)·y_t + C)). Stages before
        # the last put (y, real|imaginary) in rows, the last (real|imaginary, y); columns are (real|imaginary, x).
        matrices, C = [], ints(0)
        x_digit, y_digit = op.Unsqueeze(count(p), ints(0, 1)), op.Unsqueeze(count(p), ints(0, 2))  # (1, 1, p), (1, p, 1)
        for t in range(1, S + 1):
            a = phase(x_digit, op.Add(op.Mul(powers[t - 1], y_digit), op.Unsqueeze(C, ints(1, 2))), powers[t])  # (C, y, x)
            c, s = op.Cos(a), op.Sin(a)
            re, im = op.Concat(c, s, axis=2), op.Concat(op.Neg(s), c, axis=2)  # (C, p, 2p) each
            if t < S:
                m = op.Reshape(op.Concat(op.Unsqueeze(re, ints(2)), op.Unsqueeze(im, ints(2)), axis=2),
                               shape(powers[t - 1], two_p, two_p))
            else:
                m = op.Concat(re, im, axis=1)
            matrices.append(m)  # (p^(t-1), 2p, 2p)
            C = op.Reshape(op.Add(op.Unsqueeze(C, ints(1)), op.Unsqueeze(op.Mul(powers[t - 1], count(p)), ints(0))),
                           ints(-1))
        # their inverses are the transposes (the real forms of conjugate transposes)
        inverses = [op.Transpose(m, perm=[0, 2, 1]) for m in matrices]

        def spectrum(x):  # x (h·n2, M) -> (K1·p^(S-1), 2p, M): rows (k1, y_1 .. y_(S-1)), columns (real|imaginary, y_S)
            A = op.MatMul(first, op.Reshape(x, shape(h, -1)))  # (2K1, n2·M)
            A = complex_product(op, op.Reshape(A, shape(2, K1, 1, n2, -1)), op.Reshape(twiddle, shape(2, K1, 1, n2, 1)),
                                axis=0, out_axis=2)  # (1, K1, 2, n2, M)
            for t, m in enumerate(matrices, 1):  # (K1, y_1..y_(t-1), real|imaginary, x_t, x_(t+1).., M)
                A = op.MatMul(m, op.Reshape(A, shape(K1, powers[t - 1], two_p, -1)))
            return op.Reshape(A, shape(rows, two_p, -1))

        signal_length = op.Mul(h, n2)  # the zero-padded signal, n/2 long
        x = op.Pad(op.Transpose(u, perm=[2, 0, 1]), shape(0, 0, 0, op.Sub(signal_length, L), 0, 0))  # (h·n2, B, C)
        U = op.Reshape(spectrum(op.Reshape(x, shape(signal_length, -1))), shape(rows, 2, p, op.Shape(u, end=2)))
        x = op.Pad(op.Transpose(k, perm=[1, 0]), shape(0, 0, op.Sub(signal_length, L), 0))  # (h·n2, C)
        K = op.Reshape(spectrum(x), shape(rows, 2, p, 1, -1))  # the same for every batch row
        Y = complex_product(op, U, K, axis=1)  # (rows, 2, p, B, C)
        # the inverse, stages backwards, then the conjugate twiddles w_n^(-j2·k1), and k1 to j1 taking the real part
        for t in range(S, 0, -1):
            Y = op.MatMul(inverses[t - 1], op.Reshape(Y, shape(K1, powers[t - 1], two_p, -1)))
        Y = complex_product(op, op.Reshape(Y, shape(K1, 2, n2, -1)), op.Reshape(twiddle_conj, shape(K1, 2, n2, 1)),
                            axis=1, out_axis=0)  # (2K1, 1, n2, M)
        y = op.MatMul(last, op.Reshape(Y, shape(two_K1, -1)))  # (h, n2·M)
        y = op.Reshape(y, shape(signal_length, op.Shape(u, end=2)))  # (h·n2, B, C)
        return op.Transpose(op.Slice(y, ints(0), L, ints(0)), perm=[1, 2, 0])  # (B, C, L)
    return translate


# ---------------------------------------------------------------------------------------------------------
# Channel groups as ONNX Loops. ONNX Runtime plans a graph's memory itself, and on the whole-width graph it
# held (B, (N+1)d, L) tensors past their last readers (20 GB at 2^20 against torch's 3 GB, BENCHMARKS.md).
# As on tinyhyena's fast path, everything between in_proj and out_proj acts on each channel alone, so the graph
# runs it one group of channels per Loop iteration, and the MLP one slice of its hidden units per iteration:
# an iteration's tensors are gone before the next begins, and only (B, L, d) tensors live between them.

CHANNEL_GROUP = 32  # channels per Loop iteration of the operator (at most; a divisor of d_model)
HIDDEN_GROUP = 128  # hidden units per Loop iteration of the MLP (at most; a divisor of d_inner)


def largest_divisor(n, at_most):
    return max(g for g in range(1, min(n, at_most) + 1) if n % g == 0)


def sum_over_groups(n_groups, term, start):
    """start + term(0) + ... + term(n_groups - 1) as one ONNX Loop (torch.while_loop): the graph holds one
    group's temporaries at a time. term(g, total) returns total plus group g's term (g a 0-dim int64 tensor),
    so that a matrix product adds into the running total in the same pass (Gemm's C)."""
    _, total = torch.while_loop(lambda g, total: g < n_groups, lambda g, total: (g + 1, term(g, total)),
                                (torch.zeros((), dtype=torch.long), start))
    return total


def hyena_in_groups(op, u):
    """HyenaOperator.forward (tinyhyena.py) with its channels in groups: u (B, L, d) -> (B, L, d). Per group
    of G channels c: their rows of in_proj and the short convolution in each of the N+1 streams, their
    filters (the filter MLP's shared features times their rows of its last layer, and their windows), the
    recurrence, and their columns of out_proj, summed over groups."""
    B, L, d = u.shape
    N, G, filt = op.cfg.order, largest_divisor(op.cfg.d_model, CHANNEL_GROUP), op.filter
    z, t = th.positional_features(filt.l_max, filt.emb_dim, L)
    features = filt.mlp[:-1](z).t()  # (filter_order, L): all but the last layer, shared by every filter
    u_t = u.transpose(1, 2)  # (B, d, L): channels first, as the convolutions want, transposed once
    pick = lambda tensor, index, dim=0: tensor.index_select(dim, index)

    def group(g, total):
        c = g * G + torch.arange(G)  # this group's channels
        rows = (torch.arange(N + 1)[:, None] * d + c).flatten()  # their rows in the N+1 streams
        z = pick(op.in_proj.weight, rows) @ u_t + pick(op.in_proj.bias, rows)[:, None]  # (B, (N+1)G, L)
        z = F.conv1d(F.pad(z, (op.cfg.short_filter_order - 1, 0)), pick(op.short_conv.weight, rows),
                     pick(op.short_conv.bias, rows), groups=(N + 1) * G)
        *x, v = z.split(G, dim=1)  # x_0 .. x_{N-1}, v: each (B, G, L)
        f = rows[:(N - 1) * G]  # their filters, (N-1) per channel, ordered as the rows
        window = th.filter_window(t, pick(filt.deltas, f)).t()  # ((N-1)G, L)
        h = (pick(filt.mlp[-1].weight, f) @ features * window).view(N - 1, G, L)  # as ImplicitFilter.forward
        bias = pick(filt.bias, f).view(N - 1, G, 1)
        def gated_long_conv(o, v, x_i):
            v = v * x_i
            return causal_conv(v, h[o]) + bias[o] * v
        y = op.recurrence(x, v, gated_long_conv).transpose(1, 2).reshape(-1, G)  # (B·L, G)
        return torch.addmm(total, y, pick(op.out_proj.weight, c, 1).t())  # plus its part of out_proj

    start = op.out_proj.bias.expand(B * L, d).contiguous()  # (B·L, d): the sum starts from the bias
    return sum_over_groups(d // G, group, start).view(B, L, d)


def mlp_in_groups(mlp, x):
    """MLP.forward (tinyhyena.py) with its hidden units in groups: x (B, L, d) -> (B, L, d)."""
    G = largest_divisor(mlp.fc1.out_features, HIDDEN_GROUP)
    flat = x.reshape(-1, x.shape[-1])  # (B·L, d)

    def group(g, total):
        units = g * G + torch.arange(G)
        hidden = F.gelu(F.linear(flat, mlp.fc1.weight.index_select(0, units), mlp.fc1.bias.index_select(0, units)),
                        approximate="tanh")
        return torch.addmm(total, hidden, mlp.fc2.weight.index_select(1, units).t())

    return sum_over_groups(mlp.fc1.out_features // G, group, mlp.fc2.bias.expand_as(flat).contiguous()).view_as(x)


class GroupedBlock(nn.Module):
    """A tinyhyena Block (for inference) whose operator and MLP run in groups, each as an ONNX Loop."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):  # x: (B, L, d)
        b = self.block
        x = x + hyena_in_groups(b.mixer, b.norm1(x))
        return x + mlp_in_groups(b.mlp, b.norm2(x))


class UncheckedModel(th.HyenaDNA):
    """The model on the plain path, without the check of its input ids: a traced graph has no values to check
    (its metadata tells an app the token map and max_len)."""

    def check_input_ids(self, input_ids):
        pass


class ExportedModel(nn.Module):
    """The model on tinyhyena's plain path, with one target's long convolution (a causal_conv node), filters
    computed for the input's length, and each block in groups (GroupedBlock). Inputs are not checked here:
    the graph's metadata tells an app the token map and max_len. `model` is a HyenaDNA language model, or a
    fine-tuned model (classifier.SequenceClassifier) whose graph outputs what its task reads out
    (classifier.readout)."""

    def __init__(self, model, outputs):
        super().__init__()
        self.task = getattr(model, "task", None)
        lm = model.backbone if self.task else model
        plain = UncheckedModel(lm.cfg, fast=False)
        plain.load_state_dict(lm.state_dict())
        self.model = classifier.with_backbone(model, plain) if self.task else plain.eval()
        for block in plain.blocks:  # the graph computes the positional features: free the l_max-long tables
            block.mixer.filter.z, block.mixer.filter.t = torch.empty(0, lm.cfg.emb_dim), torch.empty(0, 1)
        plain.blocks = nn.ModuleList(GroupedBlock(block) for block in plain.blocks)  # after the weights' copies
        self.outputs = outputs

    def forward(self, input_ids):  # (B, L) int64
        if self.task:
            return classifier.readout(self.task, self.model(input_ids))  # (B, n_outputs)
        hidden = self.model.hidden_states(input_ids)  # (B, L, d)
        logits = F.linear(hidden, self.model.embedding.weight)  # (B, L, V)
        return {"logits": logits, "hidden": hidden, "both": (logits, hidden)}[self.outputs]


def all_nodes(graph):
    """Every node of an onnx GraphProto, those of its Loop bodies (and any other subgraph) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from all_nodes(sub)


def strip_node_metadata(graph):
    """Drop what the exporter notes on each node (the Python stack that made it, module names): megabytes of a
    large graph, and paths of the exporting machine."""
    for node in all_nodes(graph):
        del node.metadata_props[:]
        node.doc_string = ""


def graph_ops(graph):
    """(domain, op_type) of every node in an onnx GraphProto, Loop bodies included."""
    return {(node.domain, node.op_type) for node in all_nodes(graph)}


# Ops the CUDA graph may hold: each has a kernel in ONNX Runtime's CUDA provider (checked by the tests).
CUDA_OPS = {"Loop", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Tanh", "Sin", "Exp", "Neg", "Abs", "MatMul", "Gemm", "Gather",
            "Concat", "Split", "Slice", "Pad", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Shape",
            "Cast", "Constant", "ReduceMean", "LayerNormalization", "Gelu", "Erf", "Where", "Equal", "Identity",
            "Conv", "ConstantOfShape", "Range", "Flatten", "Softmax", "Rfft", "Irfft", "FastGelu",
            "SkipLayerNormalization", "BiasGelu", "Greater", "Less", "Min", "Max", "CumSum", "Einsum", "Not", "And", "ScatterND",
            "Cos", "GreaterOrEqual", "ReduceMin", "ReduceSum"}


def export(model, path, target="cuda", max_len=None, outputs="logits"):
    """Write the ONNX file (atomically) and return the onnx.ModelProto. A fine-tuned model's graph outputs
    "probabilities" or "values" (classifier.OUTPUT_NAME) whatever `outputs` says."""
    is_classifier = isinstance(model, classifier.SequenceClassifier)
    outputs = classifier.OUTPUT_NAME[model.task] if is_classifier else outputs
    cfg = model.backbone.cfg if is_classifier else model.cfg
    max_len = max_len or (model.max_len if is_classifier else cfg.l_max)
    lm = model.backbone if is_classifier else model
    z, t = th.positional_features(cfg.l_max, cfg.emb_dim)
    for i, block in enumerate(lm.blocks):  # the graph computes what the checkpoint stores: they must agree
        if not (torch.allclose(block.mixer.filter.z, z, atol=1e-5) and torch.allclose(block.mixer.filter.t, t, atol=1e-5)):
            raise th.UserError(f"block {i}'s positional features differ from the published formula for l_max "
                             f"{cfg.l_max}; this checkpoint cannot be exported with filters computed in the graph")
    wrapper = ExportedModel(model, outputs).eval()
    example = torch.full((2, min(max_len, 16)), th.BASE_IDS["A"], dtype=torch.long)
    batch, length = torch.export.Dim("batch", max=1 << 16), torch.export.Dim("length", max=max_len)
    translation = cuda_translation if target == "cuda" else cpu_translation
    table = {torch.ops.tinyhyena.causal_conv.default: translation(max_len)}
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["input_ids"],
                                    output_names={"logits": ["logits"], "hidden": ["hidden"],
                                                  "both": ["logits", "hidden"], "probabilities": ["probabilities"],
                                                  "values": ["values"]}[outputs],
                                    dynamic_shapes=({0: batch, 1: length},), custom_translation_table=table,
                                    optimize=True, verbose=False)
    proto = program.model_proto
    strip_node_metadata(proto.graph)
    meta = {"tokens": json.dumps({**th.SPECIAL_TOKENS, **th.BASE_IDS}), "pad_id": str(th.PAD_ID),
            "unknown_base_id": str(th.N_ID), "l_max": str(cfg.l_max), "max_len": str(max_len),
            "config": json.dumps(checkpoints.config_to_published(cfg)), "target": target, "outputs": outputs,
            "tinyhyena_version": th.__version__}
    if is_classifier:
        meta.update(class_names=json.dumps(model.class_names), task=model.task, pool=model.pool,
                    soft_prompt=str(0 if model.prompt is None else len(model.prompt)),
                    padding="left: [PAD] ids before the sequence, as in fine-tuning")
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    import onnx
    base.atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return proto


def check_against_torch(model, path, outputs, lengths, batches=(1, 2, 3), provider="CPUExecutionProvider"):
    """Relative error of ONNX Runtime against torch, ||ort - torch|| / ||torch||, each norm over all the given
    shapes (the worst of the graph's outputs). Not per shape: one regression value near zero would make its
    ratio measure float32 rounding alone (1 ulp of 1.0 against a value of 0.001 is 1e-4)."""
    session = ort_session(path, provider)
    if provider not in session.get_providers():
        raise RuntimeError(f"ONNX Runtime did not enable {provider}")
    diff, size = {}, {}  # squared norms, per output
    is_classifier = isinstance(model, classifier.SequenceClassifier)
    rng = np.random.default_rng(0)
    for B in batches:
        for L in lengths:
            ids = rng.integers(7, 12, size=(B, L), dtype=np.int64)
            if is_classifier and B > 1:  # left padding, as fine-tuning batches are padded
                ids[1:, :L // 2] = th.PAD_ID
            got = session.run(None, {"input_ids": ids})
            with torch.no_grad():
                t = torch.from_numpy(ids)
                if is_classifier:
                    ref = [classifier.readout(model.task, model(t))]
                else:
                    ref = {"logits": [model(t)], "hidden": [model.hidden_states(t)],
                           "both": [model(t), model.hidden_states(t)]}[outputs]
            for i, (g, r) in enumerate(zip(got, ref)):
                r = r.numpy().astype(np.float64)
                diff[i] = diff.get(i, 0.0) + float(np.sum((g - r) ** 2))
                size[i] = size.get(i, 0.0) + float(np.sum(r ** 2))
    return max(math.sqrt(diff[i] / size[i]) for i in diff)


def ort_session(path, provider="CPUExecutionProvider"):
    """An ONNX Runtime session as apps should make one for these graphs: the memory pattern off (it plans for
    repeated shapes, and holds more at long L), the arena on (off, long inputs run slower). BENCHMARKS.md has
    the figures."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.enable_mem_pattern = False
    return ort.InferenceSession(path, options, providers=[provider])


def cuda_provider_works():
    """onnxruntime-gpu lists the CUDA provider even on machines without a GPU: ask torch and ORT both."""
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
