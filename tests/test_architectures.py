"""Target presets on the architectures transformers ships, each a tiny model built from its own config class: every
preset selects the expected module kinds, LoRA trains (d+k)·r parameters per adapted matrix and the head beside it,
merging changes no output; a model type without presets names its linear modules and trains on an explicit list."""

import re

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from lora_sweep import adapters
from lora_sweep.errors import UserError
from lora_sweep.settings import MethodSettings

H, FF, LAYERS, VOCAB, R = 32, 48, 2, 100, 2
IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
DECODER = {"num_key_value_heads": 2, "head_dim": 8}  # grouped-query attention: k and v narrower than q
EXTRA = {"distilbert": {"hidden_dim": FF}, "modernbert": {"cls_token_id": 1, "sep_token_id": 2}}

# Module kinds (layer numbers folded) each preset adapts, written out by hand from the models' module trees.
BERT_LIKE = {"qv": ["attention.self.query", "attention.self.value"],
             "qkvo": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
             "mlp": ["intermediate.dense", "output.dense"]}
LLAMA_LIKE = {"qv": ["self_attn.q_proj", "self_attn.v_proj"],
              "qkvo": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
              "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
LAYOUT = {  # model type: (layer prefix, per-layer kinds by preset (None: refused), word embeddings, task head modules)
    "bert": ("bert.encoder.layer.N.", BERT_LIKE, "bert.embeddings.word_embeddings", ["bert.pooler.dense", "classifier"]),
    "roberta": ("roberta.encoder.layer.N.", BERT_LIKE, "roberta.embeddings.word_embeddings", ["classifier"]),
    "xlm-roberta": ("roberta.encoder.layer.N.", BERT_LIKE, "roberta.embeddings.word_embeddings", ["classifier"]),
    "electra": ("electra.encoder.layer.N.", BERT_LIKE, "electra.embeddings.word_embeddings", ["classifier"]),
    "deberta-v2": ("deberta.encoder.layer.N.",
                   {"qv": ["attention.self.query_proj", "attention.self.value_proj"],
                    "qkvo": ["attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                             "attention.output.dense"],
                    "mlp": ["intermediate.dense", "output.dense"]},
                   "deberta.embeddings.word_embeddings", ["pooler.dense", "classifier"]),
    "distilbert": ("distilbert.transformer.layer.N.",
                   {"qv": ["attention.q_lin", "attention.v_lin"],
                    "qkvo": ["attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"],
                    "mlp": ["ffn.lin1", "ffn.lin2"]},
                   "distilbert.embeddings.word_embeddings", ["pre_classifier", "classifier"]),
    "modernbert": ("model.layers.N.", {"qv": None, "qkvo": ["attn.Wqkv", "attn.Wo"], "mlp": ["mlp.Wi", "mlp.Wo"]},
                   "model.embeddings.tok_embeddings", ["head.dense", "classifier"]),
    **{t: ("model.layers.N.", LLAMA_LIKE, "model.embed_tokens", ["score"])
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "phi3": ("model.layers.N.", {"qv": None, "qkvo": ["self_attn.qkv_proj", "self_attn.o_proj"],
                                 "mlp": ["mlp.gate_up_proj", "mlp.down_proj"]}, "model.embed_tokens", ["score"]),
    "phi": ("model.layers.N.", {"qv": ["self_attn.q_proj", "self_attn.v_proj"],
                                "qkvo": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"],
                                "mlp": ["mlp.fc1", "mlp.fc2"]}, "model.embed_tokens", ["score"]),
}
OUTSIDE_LAYERS = {"electra": ["electra.embeddings_project"]}  # linear layers all_linear adapts besides the layers'
DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "phi"]


def config(model_type: str):
    kw = dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=FF, vocab_size=VOCAB,
              num_labels=2, **IDS, **EXTRA.get(model_type, {}))
    if model_type in DECODERS or model_type == "opt":
        kw.update(DECODER)
    if model_type == "opt":
        kw.update(ffn_dim=FF, word_embed_proj_dim=H)
    return AutoConfig.for_model(model_type, **kw)


def build(model_type: str, causal: bool = False) -> nn.Module:
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    return auto.from_config(config(model_type)).eval()


def lora(targets, r: int = R) -> MethodSettings:
    method = MethodSettings(name="lora", lr=1e-3, r=r, targets=targets)
    method.validate()
    return method


def fold(names) -> set[str]:
    return {re.sub(r"\.\d+\.", ".N.", name) for name in names}


def expected_kinds(model_type: str, preset: str) -> set[str] | None:
    prefix, kinds, embeddings, _ = LAYOUT[model_type]
    if preset == "embeddings":
        return {embeddings}
    if preset == "all_linear":
        return {prefix + k for k in kinds["qkvo"] + kinds["mlp"]} | set(OUTSIDE_LAYERS.get(model_type, []))
    return None if kinds[preset] is None else {prefix + k for k in kinds[preset]}


def d_plus_k(model: nn.Module, names) -> int:
    """Sum over the named matrices of (d + k): a linear layer's in + out features, an embedding's vocab + width."""
    return sum(sum(model.get_submodule(name).weight.shape) for name in names)


def head_size(model: nn.Module, model_type: str) -> int:
    return sum(p.numel() for name in LAYOUT[model_type][3] for p in model.get_submodule(name).parameters())


@pytest.mark.parametrize("model_type", sorted(LAYOUT))
def test_every_preset_adapts_the_expected_matrices_at_d_plus_k_times_r(model_type, one_thread):
    base = build(model_type)
    assert adapters.architecture_of(base) != adapters.OTHER
    for preset in ("qv", "qkvo", "mlp", "all_linear", "embeddings"):
        kinds = expected_kinds(model_type, preset)
        if kinds is None:  # a fused q, k, v matrix: no q-and-v-only adapter exists
            with pytest.raises(UserError, match=rf"'qv' is not defined for {model_type} models \(its attention fuses q, "
                                                r"k and v .*\); use qkvo, mlp"):
                adapters.resolve_targets(base, preset)
            continue
        targets = adapters.resolve_targets(base, preset)
        assert fold(targets) == kinds, preset
        assert len(targets) == sum(LAYERS if ".N." in k else 1 for k in kinds), preset
        model = build(model_type)
        total = sum(p.numel() for p in model.parameters())
        expected_adapter = d_plus_k(model, targets) * R
        wrapped, adapted = adapters.apply_method(model, lora(preset), "SEQ_CLS")
        counts = adapters.count_parameters(wrapped, total, "lora")
        assert adapted == targets
        assert counts.adapter == expected_adapter, preset
        assert counts.head == head_size(base, model_type) > 0, preset  # the head is trained, not adapted
        assert counts.trainable == expected_adapter + counts.head, preset
    full = build(model_type)
    total = sum(p.numel() for p in full.parameters())
    trained, _ = adapters.apply_method(full, MethodSettings(name="full", lr=1e-5), "SEQ_CLS")
    counts = adapters.count_parameters(trained, total, "full")
    assert counts.trainable == total and counts.head == head_size(base, model_type)


@pytest.mark.parametrize("model_type", DECODERS)
def test_a_causal_lm_adapts_every_linear_layer_but_never_its_lm_head(model_type, one_thread):
    model = build(model_type, causal=True)
    total = sum(p.numel() for p in model.parameters())
    expected = d_plus_k(model, adapters.resolve_targets(model, "all_linear")) * R
    wrapped, adapted = adapters.apply_method(model, lora("all_linear"), "CAUSAL_LM")
    assert fold(adapted) == expected_kinds(model_type, "all_linear")
    counts = adapters.count_parameters(wrapped, total, "lora")
    assert counts.adapter == counts.trainable == expected and counts.head == 0
    assert wrapped.peft_config["default"].modules_to_save is None  # no task head on a causal LM
    assert adapters.is_causal_decoder(model_type)


def _perturbed(model: nn.Module) -> nn.Module:
    """LoRA starts as the identity (B, or an embedding's A, at zero); random A and B change the outputs, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("model_type,causal,targets", [("phi3", True, "all_linear"), ("modernbert", False, "qkvo"),
                                                        ("qwen3", True, "embeddings")])
def test_merged_adapters_give_the_unmerged_outputs(model_type, causal, targets, one_thread):
    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    model, _ = adapters.apply_method(build(model_type, causal), lora(targets, r=4), "CAUSAL_LM" if causal else "SEQ_CLS")
    model = _perturbed(model).eval()
    with torch.no_grad():
        unmerged = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
        merged = model.merge_and_unload().eval()(**inputs).logits
    assert (unmerged - base).abs().max() > 1e-3  # the adapter changes the outputs
    assert (merged - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("preset", ["qv", "all_linear", "embeddings"])
def test_a_model_type_without_presets_lists_its_linear_modules(preset):
    model = build("opt")
    assert adapters.architecture_of(model) == adapters.OTHER
    with pytest.raises(UserError) as caught:
        adapters.resolve_targets(model, preset)
    message = str(caught.value)
    assert "\n" not in message
    assert (f"method.targets={preset!r}: model type 'opt' has no target presets; "
            "pass the modules to adapt as method.targets=[...]") in message
    listed = message.rsplit("are: ", 1)[1].split(", ")
    assert listed == sorted(f"model.decoder.layers.N.{k}" for k in
                            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"))


def test_an_explicit_target_list_trains_a_model_type_without_presets(one_thread):
    model = build("opt")
    total = sum(p.numel() for p in model.parameters())
    wrapped, adapted = adapters.apply_method(model, lora(["q_proj", "v_proj"]), "SEQ_CLS")
    assert sorted(adapted) == [f"model.decoder.layers.{i}.self_attn.{m}" for i in range(LAYERS) for m in ("q_proj", "v_proj")]
    counts = adapters.count_parameters(wrapped, total, "lora")
    assert counts.adapter == LAYERS * 2 * (H + H) * R
    assert counts.head == H * 2  # the score head (no bias), trained beside the adapter
    assert counts.trainable == counts.adapter + counts.head
    with pytest.raises(UserError, match=r"matches no adaptable module.*model\.decoder\.layers\.N\.fc1"):
        adapters.apply_method(build("opt"), lora(["score"]), "SEQ_CLS")  # the head is trained, never adapted

    inputs = {"input_ids": torch.randint(3, VOCAB, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    wrapped.train()
    trainable = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        wrapped(**inputs, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in wrapped.named_parameters() if n in trainable and not torch.equal(p, trainable[n])}
    assert changed == set(trainable)  # every LoRA matrix and the head moved
    assert any("score" in n for n in changed) and sum("lora_B" in n for n in changed) == LAYERS * 2

    full = build("opt")
    trained, _ = adapters.apply_method(full, MethodSettings(name="full", lr=1e-5), "SEQ_CLS")
    counts = adapters.count_parameters(trained, total, "full")
    assert counts.trainable == total and counts.head == H * 2


@pytest.mark.parametrize("model_type,decoder", [("opt", True), ("bloom", True), ("gpt2", True), ("bert", False),
                                                ("modernbert", False), ("bart", False), ("t5", False)])
def test_causal_decoders_are_told_from_encoders_and_encoder_decoders(model_type, decoder):
    assert adapters.is_causal_decoder(model_type) is decoder
