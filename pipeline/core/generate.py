"""Text generation with a local instruct model, for stages that write training data (augment; later draft_qa).

    gen = Generator("outputs/demo_generator_model", temperature=0.8, seed=0)
    texts = gen.generate(["次の文章を…\n\n文章: P-101の定格能力は880トンです。"])   # one reply per prompt
    gen.generated_tokens                                                            # running total

Each prompt is one user turn, rendered with the model's chat template (a model without one is refused: a base model
does not follow instructions). Two engines:

- `transformers`: batched `generate` with left padding (every prompt ends where its reply starts), on `device`.
  A batch's sampling is seeded from (seed, the batch's first prompt index), so a batch's replies depend only on the
  settings and the batch itself: a resumed run that regenerates the same batches gets the same text.
- `vllm`: vLLM's offline `LLM.generate` (optional extra `vllm`, a CUDA GPU), each request seeded from (seed, its
  index). Faster by far on a GPU; its sampling kernels differ from transformers', so the two engines give different
  (equally valid) text, and the engine is part of a stage's cache key.

Nothing here opens a connection: the model is a local directory, loaded with the offline environment the package
sets at import.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence

from pipeline.core.outputs import PipelineError

log = logging.getLogger(__name__)

ENGINES = ("transformers", "vllm")


def check_engine(engine: str, device: str = "auto", key: str = "augment.engine") -> None:
    """Refuse an engine that cannot run here with one line, before any model loads."""
    if engine not in ENGINES:
        raise PipelineError(f"{key}={engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise PipelineError(f"{key}=vllm: vLLM is not installed (pip install -e \".[vllm]\" on a CUDA machine); "
                                f"{key}=transformers runs anywhere")
        import torch

        if device == "cpu" or not torch.cuda.is_available():
            raise PipelineError(f"{key}=vllm needs a CUDA GPU (device={device}); use {key}=transformers")


def batch_seed(seed: int, index: int) -> int:
    """The sampling seed of the batch (or vLLM request) that starts at prompt `index`."""
    return (seed * 1_000_003 + index) % 2**31


class Generator:
    """A local causal LM with a chat template that answers prompts: `generate(prompts) -> list[str]`."""

    def __init__(self, path: str, *, engine: str = "transformers", device: str = "auto", dtype: str = "auto",
                 batch_size: int = 8, max_new_tokens: int = 256, temperature: float = 0.8, top_p: float = 0.95,
                 seed: int = 0, trust_remote_code: bool = False, key: str = "augment.generator_path",
                 json_schema: Optional[dict] = None):
        from pipeline.core.checkpoints import check_model_dir, load_tokenizer
        from pipeline.core.devices import resolve_device, resolve_dtype

        check_model_dir(path, key=key)
        check_engine(engine, device)
        self.path, self.engine, self.batch_size = str(path), engine, batch_size
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.generated_tokens = 0
        self.json_schema = json_schema  # vllm: every reply constrained to this JSON schema (draft_qa's candidates)
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        if not self.tokenizer.chat_template:
            raise PipelineError(f"{key}={path}: the tokenizer has no chat template; the generator must be an "
                                f"instruct (chat) model")
        self.tokenizer.padding_side = "left"  # every prompt ends where its reply starts
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if engine == "vllm":
            from vllm import LLM

            self.llm = LLM(model=str(path), tokenizer=str(path), dtype=str(self.dtype).replace("torch.", ""),
                           seed=seed, trust_remote_code=trust_remote_code)
        else:
            from pipeline.core.checkpoints import load_model

            self.model = load_model(path, self.dtype, self.device, trust_remote_code).eval()

    def render(self, prompt: str) -> str:
        """The prompt as the model sees it: one user turn and the start of the assistant's reply."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def count_tokens(self, texts: Sequence[str]) -> int:
        return sum(len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"])

    def generate(self, prompts: Sequence[str], first_index: int = 0) -> List[str]:
        """One sampled reply per prompt, special tokens removed. `first_index` is the position of prompts[0] in the
        caller's fixed list of work: with it, the same prompt at the same position always gets the same seed."""
        prompts = list(prompts)
        if self.engine == "vllm":
            return self._generate_vllm(prompts, first_index)
        out: List[str] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._generate_batch(prompts[start:start + self.batch_size], first_index + start)
        return out

    def _generate_batch(self, prompts: List[str], index: int) -> List[str]:
        import torch

        texts = [self.render(p) for p in prompts]
        # The chat template already wrote BOS where the model wants one.
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        torch.manual_seed(batch_seed(self.seed, index))
        sampling = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p) if self.temperature > 0 \
            else dict(do_sample=False)
        with torch.no_grad():
            ids = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id, **sampling)
        new = ids[:, enc["input_ids"].shape[1]:]
        replies = []
        for row in new:
            row = row.tolist()
            if self.tokenizer.eos_token_id in row:  # what follows EOS is padding
                row = row[:row.index(self.tokenizer.eos_token_id) + 1]
            self.generated_tokens += len(row)
            replies.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return replies

    def _generate_vllm(self, prompts: List[str], first_index: int) -> List[str]:
        from vllm import SamplingParams

        constraint = {}
        if self.json_schema is not None:  # vLLM >= 0.10 names it structured_outputs, older ones guided_decoding
            try:
                from vllm.sampling_params import StructuredOutputsParams

                constraint = {"structured_outputs": StructuredOutputsParams(json=self.json_schema)}
            except ImportError:
                from vllm.sampling_params import GuidedDecodingParams

                constraint = {"guided_decoding": GuidedDecodingParams(json=self.json_schema)}
        params = [SamplingParams(temperature=self.temperature, top_p=self.top_p if self.temperature > 0 else 1.0,
                                 max_tokens=self.max_new_tokens, seed=batch_seed(self.seed, first_index + i),
                                 **constraint)
                  for i in range(len(prompts))]
        # Token ids, not text: vLLM would add a BOS of its own in front of the one the chat template wrote.
        ids = self.tokenizer([self.render(p) for p in prompts], add_special_tokens=False)["input_ids"]
        results = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        replies = []
        for r in results:
            self.generated_tokens += len(r.outputs[0].token_ids)
            replies.append(r.outputs[0].text.strip())
        return replies


def release(generator: Optional[Generator]) -> None:
    """Free the generator's memory before a later stage of the same process loads its own model."""
    import gc

    import torch

    if generator is not None:
        generator.__dict__.pop("model", None)
        generator.__dict__.pop("llm", None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
