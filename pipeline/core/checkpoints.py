"""Checkpoints on disk: where a model named by its Hub id sits in the local Hugging Face cache, what a model
directory must hold (read as JSON before anything loads), and loading a tokenizer and a model (16-bit or 4-bit)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from pipeline.core.devices import check_4bit_support
from pipeline.core.outputs import PipelineError

# .../models--<org>--<name>/snapshots/<commit>: a checkpoint in the Hub's cache layout (huggingface_hub)
SNAPSHOT = re.compile(r"models--(?P<repo>.+)/snapshots/(?P<commit>[0-9a-f]{40})$")


def hub_snapshot(path: str | os.PathLike) -> Optional[tuple[str, str]]:
    """(repo id, commit) when `path` is a snapshot directory of the Hugging Face cache, else None."""
    m = SNAPSHOT.search(Path(path).absolute().as_posix())
    return (m["repo"].replace("--", "/"), m["commit"]) if m else None


def resolve_model_path(spec: str, key: str = "model.path") -> str:
    """A model given as a local directory, or as a Hub id (`org/name`, optionally `@revision`: a branch, tag or
    commit) found in the local Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub): the directory to read it from.

    Nothing is ever downloaded (local_files_only, and HF_HUB_OFFLINE is set on import): a model that is not in the
    cache is refused with the directory that was searched. A local directory always wins over a Hub id of the same
    spelling; anything that is neither is returned as it is, for check_model_dir to refuse."""
    if not spec or Path(spec).exists():
        return spec
    repo, _, revision = str(spec).partition("@")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        return spec  # a path, not an id
    cache = Path(constants.HF_HUB_CACHE)
    try:
        return snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        where = cache / f"models--{repo.replace('/', '--')}"
        what = f"revision {revision!r} of {repo}" if revision and where.is_dir() else repo
        raise PipelineError(f"{key}={spec}: no such directory, and {what} is not in the local Hugging Face cache "
                            f"(searched {where}); nothing is downloaded: copy the model there or give its "
                            f"directory") from None

def check_model_dir(path: str | os.PathLike, key: str = "model.path") -> dict:
    """A local causal-LM checkpoint with safetensors weights; returns its config.json. Read as JSON, without loading
    transformers, so a wrong directory fails in a second with one line instead of a traceback from deep inside."""
    p = Path(path)
    if not p.is_dir():
        raise PipelineError(f"{key}={path}: no such directory (expected a local Hugging Face checkpoint)")
    if not (p / "config.json").is_file():
        raise PipelineError(f"{key}={path}: no config.json in this directory; not a Hugging Face checkpoint")
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{key}={path}: config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise PipelineError(f"{key}={path}: config.json has no model_type; not a transformers model checkpoint")
    archs = config.get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise PipelineError(f"{key}={path}: a {', '.join(archs)} checkpoint, not a causal language model "
                            f"(architectures in config.json)")
    if not any(p.glob("*.safetensors")):
        other = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".gguf"))
        raise PipelineError(f"{key}={path}: no .safetensors weights"
                            + (f" (found {', '.join(other[:3])}: weights are only ever read as safetensors, which "
                               f"cannot run code on load; convert them)" if other else ""))
    return config


def load_tokenizer(path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise PipelineError(f"{path}: the tokenizer has no eos_token; CPT needs one to separate documents")
    if tok.pad_token_id is None:
        # Padding positions are masked out of the loss and attention, so reusing EOS as pad is harmless.
        tok.pad_token = tok.eos_token
    return tok


def count_4bit_linears(model) -> int:
    """bitsandbytes 4-bit linear layers in `model` (also under a LoRA wrapper): what was really trained in 4-bit."""
    return sum(1 for m in model.modules()
               if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes"))


def load_model(path, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
               load_in_4bit: bool = False, attn_implementation: Optional[str] = None):
    """A causal LM from a local checkpoint; with `load_in_4bit` its linear layers are quantized to nf4 on load.

    The 4-bit settings are QLoRA's (nf4, double quantization, compute in `dtype`). A quantized model is placed on
    `device` while loading: it cannot be moved afterwards. `attn_implementation` (eager, sdpa, flash_attention_2)
    is passed to transformers as is; None leaves its default.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        check_4bit_support(device)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
    )
    return model if load_in_4bit else model.to(device)


def _config_json(path) -> dict:
    """A checkpoint's config.json as plain JSON ({} if there is none or it is unreadable: check_model_dir reports
    that with one line): readable before transformers is imported."""
    file = Path(path) / "config.json"
    try:
        cfg = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def is_prequantized(path) -> bool:
    """A checkpoint saved already quantized (config.json has a quantization_config): its 16-bit weights are gone."""
    return "quantization_config" in _config_json(path)


def declared_tied(path) -> "bool | None":
    """`tie_word_embeddings` as config.json states it (or its text_config, for multimodal wrappers); None if it
    does not say. Read as JSON, without transformers: the backend is chosen before any Hugging Face import."""
    cfg = _config_json(path)
    for section in (cfg, cfg.get("text_config") or {}):
        if isinstance(section.get("tie_word_embeddings"), bool):
            return section["tie_word_embeddings"]
    return None


# --- a checkpoint read as far as it can be without loading its weights (run.validate) ----------------------------

# Bytes per element of each safetensors dtype, to check that a tensor's byte range holds its shape.
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_header(file: Path, key: str) -> dict:
    """The tensor table of a .safetensors file ({name: {dtype, shape, data_offsets}}), checked against the file's size.

    The format is an 8-byte little-endian header length, a JSON header, then the tensor data; the last tensor's end
    offset is the data's size, so a file cut short by an interrupted copy is one whose size is below 8 + header +
    data. Only the header is read, however large the file."""
    size = file.stat().st_size
    where = f"{key}: {file.name}"
    with open(file, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise PipelineError(f"{where} is truncated or not a safetensors file ({size} bytes, no complete header); "
                                f"copy the checkpoint again")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PipelineError(f"{where}: unreadable safetensors header ({e}); copy the checkpoint again") from None
    header.pop("__metadata__", None)
    end = 0
    for name, t in header.items():
        try:
            start, stop = t["data_offsets"]
            count = 1
            for d in t["shape"]:
                count *= d
            if stop - start != count * _DTYPE_BYTES.get(t["dtype"], (stop - start) // max(count, 1)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise PipelineError(f"{where}: the header's entry for tensor {name} is malformed") from None
        end = max(end, stop)
    if size != 8 + n + end:
        raise PipelineError(f"{where} is {size} bytes but its header describes {8 + n + end}: the file is "
                            f"{'truncated (an interrupted copy?)' if size < 8 + n + end else 'padded or corrupt'}; "
                            f"copy the checkpoint again")
    return header


def weight_headers(path, key: str = "model.path") -> Dict[str, dict]:
    """Every weight file's checked header, by file name; the shards an index names must all be there."""
    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PipelineError(f"{key}={path}: model.safetensors.index.json is not a weight index") from None
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise PipelineError(f"{key}={path}: shard(s) {', '.join(missing[:3])} named in "
                                f"model.safetensors.index.json are missing; copy the checkpoint again")
    return {f.name: safetensors_header(f, f"{key}={path}") for f in sorted(p.glob("*.safetensors"))}


def model_identity(path) -> str:
    """Which weights a checkpoint holds, read in milliseconds: a hash of its tensor tables and of the first and last
    64 KiB of each weight file's data. A copy of a model elsewhere has the same identity; another model (another base,
    a retrained one, another dtype) has another. Stage outputs record their base's (lineage.json)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(n))
            h.update(fh.read(1 << 16))
            fh.seek(max(8 + n, size - (1 << 16)))
            h.update(fh.read())
    return h.hexdigest()[:16]


@dataclass
class Checkpoint:
    """What inspect_checkpoint learnt: config.json, the model without weights (meta device) and its tokenizer."""

    config: dict
    meta: object
    tokenizer: object


def inspect_checkpoint(path, key: str = "model.path", trust_remote_code: bool = False,
                       add_special_tokens: List[str] = ()) -> Checkpoint:
    """Everything about a checkpoint that can fail later, checked without loading its weights: config.json
    (check_model_dir), custom code and model_type, the weight files' headers against their sizes, the tensors'
    shapes against config.json, and the tokenizer (loads; its ids fit the embedding rows, except the tokens
    model.add_special_tokens adds rows for)."""
    config = check_model_dir(path, key)
    if config.get("auto_map") and not trust_remote_code:
        raise PipelineError(f"{key}={path}: config.json's auto_map asks to run code shipped with the checkpoint; "
                            f"set model.trust_remote_code=true only if you trust that code")
    from transformers import CONFIG_MAPPING

    if not config.get("auto_map") and config["model_type"] not in CONFIG_MAPPING:
        import transformers

        raise PipelineError(f"{key}={path}: model_type '{config['model_type']}' is unknown to the installed "
                            f"transformers {transformers.__version__}; upgrade transformers or check config.json")
    headers = weight_headers(path, key)
    from pipeline.core.modules import meta_model

    try:
        meta = meta_model(str(path), trust_remote_code)
    except PipelineError:
        raise
    except Exception as e:  # a config.json transformers cannot build a model from
        raise PipelineError(f"{key}={path}: config.json does not describe a model transformers can build "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None
    if "quantization_config" not in config:  # packed 4-bit tensors have other shapes than the model's parameters
        expected = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
        for file, header in headers.items():
            for name, t in header.items():
                if name in expected and tuple(t["shape"]) != expected[name]:
                    raise PipelineError(f"{key}={path}: tensor {name} in {file} has shape {tuple(t['shape'])} but "
                                        f"config.json describes {expected[name]}; config.json is not this "
                                        f"checkpoint's (vocab_size, hidden_size, ...)")
    try:
        tokenizer = load_tokenizer(path, trust_remote_code)
    except PipelineError as e:  # "<path>: the tokenizer has no eos_token ..."
        raise PipelineError(f"{key}={e}") from None
    except Exception as e:  # missing or corrupt tokenizer files end in many different exceptions
        raise PipelineError(f"{key}={path}: the tokenizer does not load from its files (tokenizer.json, "
                            f"tokenizer_config.json, ...): {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'no message'}") from None
    rows = meta.get_input_embeddings().weight.shape[0]
    extra = set(tokenizer.convert_tokens_to_ids(list(add_special_tokens))) if add_special_tokens else set()
    beyond = [i for i in range(rows, len(tokenizer)) if i not in extra]
    if beyond:
        names = tokenizer.convert_ids_to_tokens(beyond[:5])
        raise PipelineError(f"{key}={path}: the tokenizer has {len(tokenizer)} tokens but the model has only {rows} "
                            f"embedding rows; token(s) {names}{' ...' if len(beyond) > 5 else ''} have no embedding. "
                            f"List them in model.add_special_tokens or use the model's own tokenizer")
    return Checkpoint(config, meta, tokenizer)
