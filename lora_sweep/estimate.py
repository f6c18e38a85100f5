"""What a training step needs in memory and time, by component, from the architecture's arithmetic (`lora-estimate`).

The model is built on the meta device (shapes only: no weight is read or allocated) with the method applied as a
run applies it (PEFT LoRA or every weight trained), so weights, gradients and optimizer state are exact byte counts of
its parameters. Activations are counted per token from the tensors autograd keeps for backward in each layer of the
architecture family (Llama-style decoders, BERT-style encoders); a frozen linear layer keeps no input (its backward
needs only its weight), which is why LoRA's activations are smaller than full FT's. Two instants can hold the peak:
the start of backward (every activation kept, plus the loss's gradients) and the optimizer step (every gradient,
the state and AdamW's scratch). The probe of lora_sweep.memory measures the same categories;
benchmarks/memory_model.py compares the two. No constant here is fitted: each term is named by the tensor it counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lora_sweep import adapters
from lora_sweep.errors import UserError
from lora_sweep.flops import LAYERS, FlopModel, flop_model
from lora_sweep.hub import resolve_model
from lora_sweep.settings import CONF_DIR, EstimateSettings, MethodSettings, Settings
from lora_sweep.task_family import family_for

GIB = 2**30
F32 = 4  # bytes: normalisation statistics, attention's logsumexp and the loss are kept in fp32 whatever the precision
INDEX = 8  # bytes of an int64 token id or label


@dataclass(frozen=True)
class Precision:
    name: str
    weight_dtype: torch.dtype  # stored weights (LoRA adapters stay fp32: PEFT upcasts them)
    act_bytes: int  # bytes of an activation element
    weight_copies: bool  # autocast's bf16 copies of linear weights, kept by backward


PRECISIONS = {"fp32": Precision("fp32", torch.float32, 4, False), "bf16_autocast": Precision("bf16_autocast", torch.float32, 2, True),
              "bf16": Precision("bf16", torch.bfloat16, 2, False)}


@dataclass(frozen=True)
class Shape:
    """What the activation arithmetic needs from an architecture, and how a step is run."""

    family: str  # llama | bert (lora_sweep.adapters' families)
    causal_lm: bool  # logits over the vocabulary for every token (instruction tuning), else a classification head
    layers: int
    hidden: int
    heads: int
    kv: int  # width of K (and of V): key-value heads x head size
    intermediate: int
    vocab: int
    attention_dropout: float
    hidden_dropout: float
    batch: int
    seq: int
    device: str

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def fused_attention(self) -> bool:
        """SDPA's fused kernels keep q, k, v, the output and a logsumexp; CPU falls back to the unfused path (which keeps
        the seq x seq probabilities) when training with attention dropout."""
        return self.device == "cuda" or self.attention_dropout == 0


@dataclass(frozen=True)
class Estimate:
    """One configuration's peak and its split (bytes) at the peak, the step's FLOPs and time."""

    label: str
    params: int
    trainable: int
    weights: int
    gradients: int  # live at the peak
    optimizer: int
    activations: int  # at the peak: kept for backward, plus the transient gradients of the moment
    other: int  # optimizer-step scratch (when the peak is the step)
    peak: int
    peak_at: str  # "backward" or "optimizer step"
    all_gradients: int  # every trained parameter's gradient (held at the end of backward)
    flops: float  # training FLOPs of one optimizer step
    seconds: float  # at the device's rate and the assumed utilization

    def fits(self, device_bytes: int) -> bool:
        return self.peak <= device_bytes

    def components(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "other": self.other}


def architecture_source(settings: Settings) -> str:
    """Where the architecture is read from: model.architecture (relative to conf/), a config.json given as
    model.name_or_path, a local folder's config.json (weights need not be there), or the resolved model."""
    if settings.model.architecture:
        path = Path(CONF_DIR) / settings.model.architecture
        if not path.is_file():
            raise UserError(f"model.architecture={settings.model.architecture}: no such file under conf/")
        return str(path)
    name = settings.model.name_or_path
    local = Path(name).expanduser()
    if local.suffix == ".json" or (local / "config.json").is_file():
        if not (local.is_file() or (local / "config.json").is_file()):
            raise UserError(f"model.name_or_path={name}: no such config file")
        return str(local)
    return resolve_model(name, settings.cache_dir)


def build(settings: Settings, method: MethodSettings, precision: Precision) -> nn.Module:
    """The model a run of `method` trains, on the meta device (no weights read), in the precision's weight dtype.
    AdaLoRA's peak is that of LoRA at its initial rank (it prunes by masking, never shrinking a matrix)."""
    if method.name == "adalora":
        method = replace(method, name="lora", r=method.initial_r, alpha_policy="fixed")
    model, _ = adapters.apply_method(base(settings, precision), method, family_for(settings).TASK_TYPE)
    return model


def base(settings: Settings, precision: Precision) -> nn.Module:
    """The model before any method is applied, on the meta device, in the precision's weight dtype."""
    model = family_for(settings).load_model(architecture_source(settings), settings, meta=True).to(precision.weight_dtype)
    if model.config.pad_token_id is None:  # a decoder's classification head finds each example's end by it; published configs name none
        model.config.pad_token_id = 0
    return model


def _kind(name: str) -> str:
    """A linear module's name within its layer: 'self_attn.q_proj', 'attention.output.dense', ..."""
    return re.sub(r"^.*?\.layers?\.\d+\.", "", name)


def trained_kinds(model: nn.Module) -> tuple[set[str], set[str]]:
    """(kinds of layer linears whose weight is trained, kinds adapted by LoRA)."""
    trained, adapted = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and re.search(r"\.layers?\.\d+\.", name) and "lora_" not in name:
            kind = _kind(name).removesuffix(".base_layer")
            if module.weight.requires_grad:
                trained.add(kind)
            if hasattr(model.get_submodule(name.removesuffix(".base_layer")), "lora_A"):
                adapted.add(kind)
    return trained, adapted


MODELLED = ("bert", "llama")  # the layer layouts whose activations are counted term by term (_bert_layer, _llama_layer)


def shape_of(model: nn.Module, settings: Settings, batch: int, seq: int) -> Shape:
    c = model.config
    family = adapters.architecture_of(model)
    if family not in MODELLED:
        raise UserError(f"lora-estimate models the activations of {' and '.join(MODELLED)}-style layers; "
                        f"{settings.model.name} is {c.model_type} ({family}), which it does not count")
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    if heads * head_dim != c.hidden_size:
        raise UserError(f"lora-estimate assumes attention heads x head size = hidden size; {settings.model.name} has "
                        f"{heads} x {head_dim} != {c.hidden_size}")
    return Shape(family=family, causal_lm=settings.task.family == "instruct", layers=c.num_hidden_layers,
                 hidden=c.hidden_size, heads=heads, kv=getattr(c, "num_key_value_heads", heads) * head_dim,
                 intermediate=c.intermediate_size, vocab=c.vocab_size,
                 attention_dropout=float(getattr(c, "attention_probs_dropout_prob", getattr(c, "attention_dropout", 0.0)) or 0.0),
                 hidden_dropout=float(getattr(c, "hidden_dropout_prob", 0.0) or 0.0), batch=batch, seq=seq, device=settings.estimate.device)


def _any(kinds: set[str], *suffixes: str) -> bool:
    return any(k.endswith(s) for k in kinds for s in suffixes)


def _inputs(width: int, kinds: tuple[str, ...], trained: set[str], adapted: set[str], p: Precision, from_stream: bool) -> float:
    """Bytes per token that the linear layers `kinds`, which read one input, keep of it for their gradients. In fp32
    they share it. LoRA under bf16 weights casts it to its fp32 adapter: a copy per adapter. Under autocast each layer
    casts an fp32 input (`from_stream`: a normalised residual stream) to a bf16 copy of its own, and LoRA's fp32 cast
    is cast back: a copy per adapter."""
    base, lora = sum(k in trained for k in kinds), sum(k in adapted for k in kinds)
    if p.name == "fp32":
        return 4 * width if base or lora else 0
    if p.name == "bf16":
        return (2 * width if base else 0) + 4 * width * lora
    return 2 * width * (base + lora) if from_stream else (2 * width if base else 0) + 2 * width * lora


def _lora_out(p: Precision) -> int:
    """Bytes of LoRA A's output: adapters stay fp32 (PEFT upcasts them) unless autocast computes them in bf16."""
    return 2 if p.name == "bf16_autocast" else 4


def _llama_layer(s: Shape, trained: set[str], adapted: set[str], full: bool, first: bool, r: int, p: Precision) -> float:
    """Bytes per token a decoder layer keeps for backward (RMSNorm, GQA attention through SDPA, SwiGLU MLP)."""
    h, kv, i, a = s.hidden, s.kv, s.intermediate, p.act_bytes
    norm = F32 * h + F32  # RMSNorm keeps its input (upcast to fp32) and 1/rms
    norms = norm * (1 if first and not full else 2)  # LoRA: the first norm's input (frozen embeddings) needs no gradient
    norm_weights = 2 * a * h if full else 0  # the normalised input, for the norm weight's gradient
    attn_in = _inputs(h, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), trained, adapted, p, True)
    sdpa = a * (2 * h + 2 * kv) + F32 * s.heads  # q, output, k, v and the logsumexp (o_proj's input is the output)
    o_lora = _inputs(h, ("self_attn.o_proj",), set(), adapted, p, False) if p.name != "fp32" else 0  # LoRA's own copy
    mlp_in = _inputs(h, ("mlp.gate_proj", "mlp.up_proj"), trained, adapted, p, True)
    mlp = 3 * a * i  # gate output (SiLU's input), SiLU output and up output (the product's operands)
    down_in = _inputs(i, ("mlp.down_proj",), trained, adapted, p, False)
    lora = _lora_out(p) * r * len(adapted)  # A's output, kept for B's gradient
    return norms + norm_weights + attn_in + sdpa + o_lora + mlp_in + mlp + down_in + lora


def _bert_layer(s: Shape, trained: set[str], adapted: set[str], full: bool, first: bool, r: int, p: Precision) -> float:
    """Bytes per token an encoder layer keeps for backward (post-LayerNorm, attention, GELU MLP, dropout)."""
    h, i, hs, a = s.hidden, s.intermediate, s.heads * s.seq, p.act_bytes
    mask = a if s.device == "cpu" else 1  # dropout keeps its mask: a float tensor on CPU, bytes on CUDA
    grad = trained | adapted
    q, k, v = (_any(grad, name) or not first or full for name in ("query", "key", "value"))  # needs a gradient
    attn_in = _inputs(h, ("attention.self.query", "attention.self.key", "attention.self.value"), trained, adapted, p, True)
    if s.fused_attention:
        attention = a * 4 * h + F32 * s.heads
    else:  # q k^T keeps each operand for the other's gradient; probs @ v likewise; softmax keeps its output
        attention = a * h * (int(k) + int(q) + int(q or k)) + a * hs + (mask + a * int(v)) * hs * (s.attention_dropout > 0)
    ctx = _inputs(h, ("attention.output.dense",), trained, adapted, p, False)
    dropouts = 2 * mask * h if s.hidden_dropout > 0 else 0
    norms = 2 * (a * h + 2 * F32)  # LayerNorm keeps its input, mean and 1/std
    inter_in = _inputs(h, ("intermediate.dense",), trained, adapted, p, True)
    gelu = a * i
    out_in = _inputs(i, ("output.dense",), trained, adapted, p, False)
    lora = _lora_out(p) * r * len(adapted)
    return attn_in + attention + ctx + dropouts + norms + inter_in + gelu + out_in + lora


def activation_bytes(s: Shape, trained: set[str], adapted: set[str], full: bool, r: int, p: Precision, checkpointing: bool) -> tuple[int, int]:
    """(kept for backward, transient at the start of backward) in bytes, for one micro-batch."""
    layer = _llama_layer if s.family == "llama" else _bert_layer
    a = p.act_bytes
    first, rest = (layer(s, trained, adapted, full, f, r, p) for f in (True, False))
    # Checkpointing keeps each layer's input (the residual stream, in the weights' dtype) and rebuilds one layer's
    # activations during its backward, after the loss's gradients are gone: the larger of the two is the transient.
    layers = s.layers * p.weight_dtype.itemsize * s.hidden if checkpointing else first + (s.layers - 1) * rest
    if s.family == "llama":
        outside = F32 * s.hidden + F32 + (2 * a * s.hidden if full else 0)  # final norm (+ its output, lm_head's input)
        if s.causal_lm:  # the loss upcasts the logits to fp32; log-softmax keeps its output; labels and shifted labels
            outside += F32 * s.vocab + 2 * INDEX
            transient = 2 * F32 * s.vocab  # log-softmax's backward: the incoming gradient and the one it makes
        else:
            transient = 0
    else:  # token ids and token types; the pooler's [CLS] slice keeps the last layer's output alive
        outside = 2 * INDEX + a * s.hidden + ((a * s.hidden + 2 * F32 + (a if s.device == "cpu" else 1) * s.hidden) if full else 0)
        transient = 2 * a * s.intermediate  # the last layer's MLP backward: the gradients into and out of GELU
    if checkpointing:
        transient = max(transient, rest)
    return int(s.tokens * (layers + outside)), int(s.tokens * transient)


def estimate(settings: Settings, method: MethodSettings) -> Estimate:
    """Peak memory by component and step time of one optimizer step of `method` under `settings`."""
    est: EstimateSettings = settings.estimate
    precision = PRECISIONS[est.resolved_precision]
    batch, seq = est.tokens(settings.train)
    model = build(settings, method, precision)
    full = method.name == "full"
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size() for b in model.buffers())
    # autocast's bf16 copies of the linear weights: saved for backward, freed with the graph before the optimizer step
    copies = sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) if precision.weight_copies else 0
    grads = sum(p.numel() * p.element_size() for p in trainable)
    state = {"adamw": 2 * grads, "adamw_8bit": sum(2 * p.numel() for p in trainable), "sgd": 0}[est.optimizer]  # two moments:
    # AdamW's in the parameter's dtype, 8-bit AdamW's one byte each
    if method.name == "adalora":  # its allocator's sensitivity, its EMA and the EMA of its uncertainty, per adapter weight
        state += 3 * grads
    scratch = adamw_scratch(trainable, est.device) if est.optimizer == "adamw" else 0
    shape = shape_of(model, settings, batch, seq)
    trained, adapted = trained_kinds(model)
    r = 0 if full else method.built_r
    kept, transient = activation_bytes(shape, trained, adapted, full, r, precision, est.gradient_checkpointing)
    accumulated = grads if settings.train.grad_accum > 1 else 0  # earlier micro-batches' gradients are live in the last backward
    head = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if p.requires_grad and re.search(r"(pooler|classifier|score|lm_head)", n))  # made first in backward
    at_backward = weights + state + max(accumulated, head) + kept + transient + copies
    at_step = weights + state + grads + scratch
    flops = step_flops(model, shape, est.gradient_checkpointing) * settings.train.grad_accum
    label = "full FT" if full else f"{'AdaLoRA' if method.name == 'adalora' else 'LoRA'} r={method.r} {method.targets}"
    common = dict(label=label, params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in trainable),
                  weights=weights, optimizer=state, all_gradients=grads, flops=flops,
                  seconds=flops / (est.device_tflops * 1e12 * est.utilization))
    if at_backward >= at_step:
        return Estimate(**common, gradients=max(accumulated, head), activations=kept + transient + copies, other=0, peak=at_backward, peak_at="backward")
    return Estimate(**common, gradients=grads, activations=0, other=scratch, peak=at_step, peak_at="optimizer step")


def adamw_scratch(trainable: list[nn.Parameter], device: str) -> int:
    """AdamW's temporaries in its update: on CUDA the foreach implementation makes sqrt(v) for every trained parameter
    at once; on CPU torch updates one parameter at a time, and sqrt(v) and its quotient by the bias correction are two
    temporaries the size of the largest parameter."""
    sizes = [p.numel() * p.element_size() for p in trainable]
    return sum(sizes) if device == "cuda" else 2 * max(sizes, default=0)


def step_flops(model: nn.Module, s: Shape, checkpointing: bool) -> float:
    """Training FLOPs of one micro-batch (lora_sweep.flops, read off a forward pass on the meta device); gradient
    checkpointing adds one more forward of the layers (not of the LM head, which runs after the last checkpoint)."""
    ids = torch.zeros(s.batch, s.seq, dtype=torch.long, device="meta")
    batch = {"input_ids": ids, "labels": ids if s.causal_lm else torch.zeros(s.batch, dtype=torch.long, device="meta")}
    counted: FlopModel = flop_model(model, batch)
    flops = counted.batch([s.seq] * s.batch, padded=True)
    if checkpointing:
        per_token = sum(fwd for kind, (_, fwd, _) in counted.groups.items() if kind in LAYERS)
        flops += s.tokens * (per_token + counted.attention_fwd * s.seq)
    return flops


def both(settings: Settings) -> list[Estimate]:
    """The configured method and, for a LoRA method, the full FT it would be paired with."""
    method = settings.method
    if method.name != "full":
        method = adapters.resolve_lora(base(settings, PRECISIONS["fp32"]), method).method  # the rank a run would train
    out = [estimate(settings, method)]
    if method.name != "full":
        out.append(estimate(settings, settings.baseline))
    return out
