"""Turning a model into what one method trains: PEFT LoRA on chosen matrices, or every weight (full FT).

Target presets are named per architecture family and resolved to the model's own module names,
so a preset means the same matrices on BERT, DeBERTa or a Llama-style decoder, and the record
can say exactly which matrices were adapted; a model type without presets is adapted at the modules
the user names (method.targets=[...]), its task head found by the usual names. LoRA is not limited
to linear layers: the `embeddings` preset adapts the word embeddings (PEFT's embedding LoRA), and
convolutions named by the user get PEFT's Conv1d/Conv2d LoRA. Per unit of rank an adapter adds
(d + k) parameters to a d x k linear layer, (vocab + hidden) to an embedding and (c_in * kernel + c_out)
to a convolution (`width`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from peft import AdaLoraConfig, EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
from peft.tuners.lora import LoraLayer
from torch import nn

from lora_sweep.errors import UserError
from lora_sweep.settings import CONF_DIR, MethodSettings

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside PEFT, not ours to fix

OTHER = "other"  # the family of every model type not in FAMILY_OF_MODEL_TYPE
# Module-name patterns (suffix after a '.', or a regex matched against the whole name) per family.
# Fused matrices (ModernBERT's attn.Wqkv and mlp.Wi, Phi-3's qkv_proj and gate_up_proj): LoRA adapts a fused matrix only
# as a whole, one A and one B over the concatenated outputs, so there is no adapter on q and v alone and `qv` is not
# defined there (the error says why and points to qkvo). `qkvo` and `mlp` adapt the same weights as on unfused models;
# a fused d x 3k matrix gets (d + 3k)·r parameters where three separate ones get 3(d + k)·r.
PRESETS: dict[str, dict[str, list[str]]] = {
    "bert": {
        "qv": ["attention.self.query", "attention.self.value"],
        "qkvo": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
        "mlp": ["intermediate.dense", r".*\.layer\.\d+\.output\.dense"],
        "embeddings": ["embeddings.word_embeddings"],
    },
    "deberta": {
        "qv": ["attention.self.query_proj", "attention.self.value_proj"],
        "qkvo": ["attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj", "attention.output.dense"],
        "mlp": ["intermediate.dense", r".*\.layer\.\d+\.output\.dense"],
        "embeddings": ["embeddings.word_embeddings"],
    },
    "distilbert": {
        "qv": ["attention.q_lin", "attention.v_lin"],
        "qkvo": ["attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"],
        "mlp": ["ffn.lin1", "ffn.lin2"],
        "embeddings": ["embeddings.word_embeddings"],
    },
    "modernbert": {  # attn.Wqkv: q, k, v fused; mlp.Wi: the GLU's input and gate fused
        "qkvo": ["attn.Wqkv", "attn.Wo"],
        "mlp": ["mlp.Wi", "mlp.Wo"],
        "embeddings": ["embeddings.tok_embeddings"],
    },
    "llama": {
        "qv": ["q_proj", "v_proj"],
        "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "mlp": ["gate_proj", "up_proj", "down_proj"],
        "embeddings": ["embed_tokens"],
    },
    "phi3": {  # qkv_proj: q, k, v fused; gate_up_proj: gate and up fused
        "qkvo": ["self_attn.qkv_proj", "self_attn.o_proj"],
        "mlp": ["mlp.gate_up_proj", "mlp.down_proj"],
        "embeddings": ["embed_tokens"],
    },
    "phi": {  # Phi-1/2: separate q, k, v; the attention output is `dense`, the MLP fc1 and fc2
        "qv": ["self_attn.q_proj", "self_attn.v_proj"],
        "qkvo": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"],
        "mlp": ["mlp.fc1", "mlp.fc2"],
        "embeddings": ["embed_tokens"],
    },
    "conv": {},  # convolutional networks: no presets, the user names the modules to adapt
    OTHER: {},  # any other model type: no presets (not even all_linear), the user names the modules to adapt
}
FUSED = {"modernbert": "its attention fuses q, k and v into one matrix, attn.Wqkv, which LoRA adapts only as a whole",
         "phi3": "its attention fuses q, k and v into one matrix, self_attn.qkv_proj, which LoRA adapts only as a whole"}
FAMILY_OF_MODEL_TYPE = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert",
    "deberta-v2": "deberta", "distilbert": "distilbert", "modernbert": "modernbert",
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama", "gemma2": "llama",
    "gemma3_text": "llama", "phi3": "phi3", "phi": "phi",
    "resnet": "conv",
}
DECODER_FAMILIES = ("llama", "phi3", "phi")  # decoder-only causal LMs: what instruction tasks fine-tune
# Modules trained in both methods as the task head (kept out of the adapter and out of `all_linear`). The pooler's
# linear layer rather than the whole pooler: PEFT routes a mixed batch (`adapter_names=`) through Linear heads only.
# A decoder's sequence-classification head is `score`; its LM head is never adapted (NEVER_ADAPTED) nor trained.
# Other model types: the usual head names, where the model has them.
HEADS: dict[str, list[str]] = {"bert": ["pooler.dense", "classifier"], "deberta": ["pooler.dense", "classifier"],
                               "distilbert": ["pre_classifier", "classifier"], "modernbert": ["head.dense", "classifier"],
                               "llama": ["score"], "phi3": ["score"], "phi": ["score"],
                               "conv": ["classifier"], OTHER: ["pooler.dense", "classifier", "score"]}
ADAPTABLE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)  # the layer types PEFT's LoRA adapts here
NEVER_ADAPTED = ("lm_head",)


@dataclass(frozen=True)
class ParamCounts:
    total: int  # parameters of the base model
    trainable: int
    adapter: int  # LoRA A/B matrices (and DoRA magnitudes; AdaLoRA's singular values): what is trained
    head: int  # task head parameters that are trained
    kept: int | None = None  # Σ rank × (d + k) over the final ranks (kept_parameters): what the adapter keeps after allocation


def architecture_of(model: nn.Module) -> str:
    """The model's architecture family (a key of PRESETS): which names its target presets and its task head have;
    OTHER for a model type without presets, which LoRA adapts at the modules the user names."""
    return FAMILY_OF_MODEL_TYPE.get(model.config.model_type, OTHER)


def is_causal_decoder(model_type: str) -> bool:
    """Whether a model type is a decoder-only causal LM: a decoder family here, or for another type one that
    transformers loads as a causal LM and not as a masked LM (which rules out encoders and encoder-decoders)."""
    if model_type in FAMILY_OF_MODEL_TYPE:
        return FAMILY_OF_MODEL_TYPE[model_type] in DECODER_FAMILIES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def _is_head(name: str, family: str) -> bool:
    return any(_matches(name, h) or any(part == h for part in name.split(".")) for h in HEADS[family])


def adaptable_modules(model: nn.Module, family: str) -> dict[str, nn.Module]:
    """Every layer LoRA can adapt (linear, embedding, convolution): outside the task head and never the LM head."""
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, ADAPTABLE) and not _is_head(name, family) and not name.endswith(NEVER_ADAPTED)
    }


def shape(module: nn.Module) -> tuple[int, int]:
    """(fan-in, fan-out) of the weight LoRA adapts: an adapter of rank r is a (fan-in x r) by (r x fan-out) product."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):  # A: a conv of the same kernel into r channels; B: a 1x1 conv out (groups=1)
        return module.in_channels * math.prod(module.kernel_size), module.out_channels
    return module.in_features, module.out_features


def width(module: nn.Module) -> int:
    """Adapter parameters per unit of rank: d + k, vocab + hidden, or c_in * kernel + c_out."""
    return sum(shape(module))


def _kinds(names) -> list[str]:
    """Module names with their layer numbers folded: model.layers.N.self_attn.q_proj."""
    return sorted({re.sub(r"\.\d+\.", ".N.", name) for name in names})


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Full names of the modules a preset or explicit list selects; a clear error if it selects none."""
    family = architecture_of(model)
    candidates = adaptable_modules(model, family)
    model_type = model.config.model_type
    if family == OTHER and isinstance(targets, str):
        linear = _kinds(name for name, module in candidates.items() if isinstance(module, nn.Linear)) or ["none"]
        raise UserError(f"method.targets={targets!r}: model type {model_type!r} has no target presets; pass the modules to "
                        f"adapt as method.targets=[...] (names or name suffixes); its linear modules outside the task head "
                        f"are: {', '.join(linear)}")
    if targets == "all_linear":
        chosen = [name for name, module in candidates.items() if isinstance(module, nn.Linear)]
    elif isinstance(targets, str) and targets not in PRESETS[family]:
        why = f" ({FUSED[family]})" if family in FUSED else ""
        raise UserError(f"method.targets={targets!r} is not defined for {model_type} models{why}; "
                        f"use {', '.join([*PRESETS[family], 'all_linear'])} or a list of module names")
    else:
        patterns = PRESETS[family][targets] if isinstance(targets, str) else list(targets)
        chosen = [name for name in candidates if any(_matches(name, p) for p in patterns)]
    if not chosen:
        raise UserError(f"method.targets={targets!r} matches no adaptable module of this model; its linear, embedding and "
                        f"convolution modules are: {', '.join(_kinds(candidates))}")
    return chosen


def check_lora(model: nn.Module, method: MethodSettings) -> list[str]:
    """The modules LoRA will adapt, after checking that the targets exist and r (AdaLoRA: its initial rank) fits every
    one of them.

    Works on a model built on the meta device, so a sweep can check every run before training any."""
    targets = resolve_targets(model, method.targets)
    smallest = min(min(shape(model.get_submodule(n))) for n in targets)
    key, rank = ("init_r" if method.name == "adalora" else "r"), method.built_r
    if rank > smallest:
        raise UserError(f"method.{key}={rank} is larger than the smallest adapted matrix allows; use {key} <= {smallest}")
    return targets


def budget_rank(model: nn.Module, method: MethodSettings) -> int:
    """The rank at which `method.targets` has as many adapter parameters as `method.match_budget` at rank `method.r`."""
    def total_width(targets) -> int:
        return sum(width(model.get_submodule(n)) for n in resolve_targets(model, targets))

    return max(1, round(method.r * total_width(method.match_budget) / total_width(method.targets)))


RANK_PATTERN_DIR = Path(CONF_DIR) / "rank_pattern"  # presets of method.rank_pattern


def _read_rank_pattern(source) -> dict:
    """A {module: rank} mapping from an inline mapping, a preset name, or a YAML/JSON file."""
    if isinstance(source, Mapping):
        return dict(source)
    preset = RANK_PATTERN_DIR / f"{source}.yaml"
    path = preset if preset.is_file() else Path(str(source)).expanduser()
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in RANK_PATTERN_DIR.glob("*.yaml"))) or "none"
        raise UserError(f"method.rank_pattern={source!r} is neither a preset (presets: {presets}) nor a file")
    try:
        pattern = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"method.rank_pattern file {path} is not YAML or JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(pattern, dict):
        raise UserError(f"method.rank_pattern file {path} must hold a mapping {{module name: rank}}")
    return pattern


def resolve_rank_pattern(model: nn.Module, method: MethodSettings, targets: list[str]) -> dict[str, int] | None:
    """Every adapted module's rank from `method.rank_pattern` (keys: module names or suffixes, as in `targets`;
    modules it does not name get `method.r`; rank 0 leaves a module unadapted, as an allocator may); None when there
    is no pattern or it gives every module `method.r`."""
    if not method.rank_pattern:
        return None
    ranks = dict.fromkeys(targets, method.r)
    for key, rank in _read_rank_pattern(method.rank_pattern).items():
        matched = [name for name in targets if _matches(name, str(key))]
        if not matched:
            raise UserError(f"method.rank_pattern names {key!r}, which is not an adapted module (targets {method.targets!r})")
        for name in matched:
            module = model.get_submodule(name)
            largest = min(shape(module))
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= largest:
                raise UserError(f"method.rank_pattern gives {name} rank {rank!r}; it must be an integer in 0..{largest}")
            ranks[name] = rank
    return ranks if any(rank != method.r for rank in ranks.values()) else None


def _init_value(init: str) -> bool | str:
    lowered = str(init).lower()
    return {"true": True, "false": False}.get(lowered, lowered)


@dataclass(frozen=True)
class LoraPlan:
    """What a LoRA run trains, resolved once against the model's modules (resolve_lora)."""

    method: MethodSettings  # as trained: `r` with match_budget folded in, `rank_pattern` the per-module ranks or None
    targets: list[str]  # full names of the adapted modules
    ranks: dict[str, int]  # every adapted module's rank (AdaLoRA: its initial rank)

    def alphas(self) -> dict[str, float]:
        """Each module's alpha, keeping the uniform run's scale per direction: alpha / r, or alpha / sqrt(r) under rsLoRA."""
        m = self.method
        return {name: m.effective_alpha * (math.sqrt(rank / m.r) if m.use_rslora else rank / m.r) for name, rank in self.ranks.items()}


def resolve_lora(model: nn.Module, method: MethodSettings) -> LoraPlan:
    """The one decision of what a LoRA run trains: its rank (method.match_budget resolved), its targets (checked), and
    every module's rank (method.rank_pattern resolved). Works on a meta-device model; resolving a resolved method
    gives it back unchanged, so the plan, the adapter, the estimate and the record all read the same answer."""
    if method.match_budget:
        method = dataclasses.replace(method, r=budget_rank(model, method), match_budget=None)
    targets = check_lora(model, method)
    pattern = resolve_rank_pattern(model, method, targets)
    method = dataclasses.replace(method, rank_pattern=pattern)
    if pattern:
        targets = [name for name in targets if pattern[name] > 0]
        if not targets:
            raise UserError("method.rank_pattern gives every adapted module rank 0: nothing would be trained")
        pattern = {name: pattern[name] for name in targets}
        method = dataclasses.replace(method, rank_pattern=pattern)
    return LoraPlan(method, targets, pattern or dict.fromkeys(targets, method.built_r))


def apply_method(model: nn.Module, method: MethodSettings, task_type: str, steps: int | None = None) -> tuple[nn.Module, list[str]]:
    """Wrap `model` for the method; returns it and the names of the adapted matrices (empty for full FT). AdaLoRA's
    schedule needs the run's optimizer `steps`. An EVA run's A matrices are drawn here and replaced by initialize_eva
    before training."""
    if method.name == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model, []
    plan = resolve_lora(model, method)
    m, patterned = plan.method, plan.method.rank_pattern or {}
    names = [name for name, _ in model.named_modules()]
    heads = [head for head in HEADS[architecture_of(model)] if any(_matches(name, head) for name in names)]
    common = dict(task_type=task_type, lora_dropout=m.dropout, target_modules=plan.targets,
                  modules_to_save=heads or None)  # the family's head modules this model has (none on a causal LM)
    if m.name == "adalora":
        if steps is None:
            raise ValueError("AdaLoRA's schedule needs the run's number of optimizer steps")
        tinit, tfinal = m.adalora_schedule(steps)
        # scale alpha / init_r per direction, as uniform LoRA's alpha / r (PEFT's AdaLoRA divides by the initial rank)
        config = AdaLoraConfig(**common, init_r=m.initial_r, target_r=m.r, lora_alpha=m.effective_alpha * m.initial_r / m.r,
                               tinit=tinit, tfinal=tfinal, deltaT=m.deltaT, beta1=m.beta1, beta2=m.beta2,
                               orth_reg_weight=m.orth_reg_weight, total_step=steps)
        return get_peft_model(model, config), plan.targets
    config = LoraConfig(
        **common,
        r=m.r,
        lora_alpha=m.effective_alpha,
        use_rslora=m.use_rslora,
        use_dora=m.use_dora,
        init_lora_weights=_init_value(m.init),
        # EVA: the mask PEFT takes the activations under; a label mask only where labels are per token (a causal LM)
        eva_config=EvaConfig(rho=m.eva_rho, tau=m.eva_tau, use_label_mask=task_type == "CAUSAL_LM") if m.eva else None,
        # full names, anchored by PEFT's matcher
        rank_pattern={re.escape(name): rank for name, rank in patterned.items()},
        alpha_pattern={re.escape(name): alpha for name, alpha in plan.alphas().items() if name in patterned},
    )
    with warnings.catch_warnings():  # PEFT's advice to skip drawing A, which EVA replaces: drawing it costs little here
        warnings.filterwarnings("ignore", message="lora with eva initialization used with low_cpu_mem_usage=False")
        return get_peft_model(model, config), plan.targets


def initialize_eva(model: nn.Module, batches: list[dict[str, torch.Tensor]],
                   around_forward: Callable[[int, dict[str, torch.Tensor]], ContextManager]) -> None:
    """EVA (PEFT's initialize_lora_eva_weights): A from the right singular vectors of each adapted module's inputs on
    `batches` (training batches only, cycled until the components converge), and the ranks redistributed across
    modules by explained variance. Each forward of the pass runs inside `around_forward(k, inputs)`, k counting from 0:
    PEFT's forward 0 only hashes the first batch's layer inputs; from forward 1 on, each updates the SVDs."""
    calls = itertools.count()

    def forward(module: nn.Module, inputs: dict[str, torch.Tensor]):
        with around_forward(next(calls), inputs):
            return module(**inputs)

    initialize_lora_eva_weights(model, dataloader=batches, forward_fn=forward, show_progress_bar=False)


def adalora_step(model: nn.Module, method: MethodSettings):
    """The call AdaLoRA's budget needs after every update (None for other methods): PEFT's update_and_allocate."""
    if method.name != "adalora":
        return None
    return model.base_model.update_and_allocate


def allocated_ranks(model: nn.Module, method: MethodSettings, targets: list[str]) -> dict[str, int] | None:
    """Each target module's rank as an allocator left it (0: dropped), None for a run whose ranks were fixed up front.

    AdaLoRA: the singular values its last allocation kept (PEFT's rank_pattern, a mask per module; before the first
    allocation, every module at init_r). EVA: the rank each module was given (a module EVA gave rank 0 is no longer
    a LoRA layer)."""
    if method.name == "adalora":
        masks = model.peft_config["default"].rank_pattern or {}
        kept = {re.sub(r"\.lora_E(\.default)?$", "", key): int(sum(mask)) for key, mask in masks.items()}
        return {name: kept.get(name, method.initial_r) for name in targets}
    if method.eva:
        base = model.get_base_model()
        return {name: base.get_submodule(name).r["default"] if isinstance(base.get_submodule(name), LoraLayer) else 0
                for name in targets}
    return None


def kept_parameters(model: nn.Module, ranks: dict[str, int]) -> int:
    """Adapter parameters of `ranks` as plain LoRA: Σ rank × (d + k). What an allocator's choice keeps, and exactly what its
    exported rank pattern trains (AdaLoRA's singular values fold into B)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    total = 0
    for name, rank in ranks.items():
        module = base.get_submodule(name)
        total += rank * width(module.get_base_layer() if hasattr(module, "get_base_layer") else module)
    return total


def count_parameters(model: nn.Module, base_total: int, method: str, ranks: dict[str, int] | None = None) -> ParamCounts:
    """Parameter counts by role. `base_total` is counted before PEFT adds adapters and head copies; `ranks` (each adapted
    module's final rank) gives what the adapter keeps."""
    named = list(model.named_parameters())
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    if method == "full":
        family = architecture_of(model)
        head = sum(p.numel() for n, p in named if _is_head(n.rsplit(".", 1)[0], family))
        return ParamCounts(total=base_total, trainable=trainable, adapter=0, head=head)
    adapter = sum(p.numel() for n, p in named if p.requires_grad and "lora_" in n)
    head = sum(p.numel() for n, p in named if p.requires_grad and "modules_to_save" in n)
    kept = kept_parameters(model, ranks) if ranks is not None else None
    return ParamCounts(total=base_total, trainable=trainable, adapter=adapter, head=head, kept=kept)
