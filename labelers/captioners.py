"""Recaptioning stages: the VLM writes a detailed caption, with the alt-text only as a hint (VeCap style).

``make_captioner(cfg)`` picks the backend from ``cfg.spec``:

- ``alt_text``                   no model; the caption is the alt-text (the paper's "without VESL" ablation)
- ``hf:<hub id or path>``        transformers ``AutoModelForImageTextToText``, batched ``generate``
- ``openai:<base_url>#<model>``  any OpenAI-compatible chat-completions server (vLLM, SGLang, TGI, transformers),
                                 through ``openai_client.ChatClient``
- ``vllm:<hub id or path>``      in-process ``vllm.LLM`` (needs the ``vesl[vllm]`` extra and a GPU)

The rules every backend shares (image handling, empty captions, prompt, provenance) are in ``captioning.py``.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vesl.errors import InfrastructureError, UserError, first_line
from vesl.labelers.captioning import STAGE_NAME, CaptionerBase, images_or_fail, set_caption
from vesl.labelers.devices import DTYPE_NAMES, resolve_device, resolve_dtype
from vesl.labelers.hub import is_local, pretrained_kwargs, unavailable_reason
from vesl.labelers.openai_client import (
    Breaker,
    ChatClient,
    RequestFailed,
    image_data_url,
    redact_url,
    user_message,
)
from vesl.labelers.prompts import render_prompt
from vesl.redact import redact
from vesl.schemas.config import CaptionerConfig
from vesl.schemas.stage import Sample, Stage, fail

SPEC_HELP = "use alt_text, hf:<hub id or path>, openai:<base_url>#<model> or vllm:<hub id or path>"


def make_captioner(cfg: CaptionerConfig, trust_remote_code: bool = False, *, seed: int = 0) -> Stage:
    """Build the captioner stage named by ``cfg.spec``; raises UserError for a spec that can't work."""
    spec = cfg.spec.strip()
    trust = bool(trust_remote_code or cfg.trust_remote_code)
    if spec == "alt_text":
        return AltTextCaptioner(cfg)
    backend, sep, target = spec.partition(":")
    if not sep or not target.strip():
        raise UserError(f"unknown captioner spec {redact(spec)!r}: {SPEC_HELP}")
    target = target.strip()
    if backend == "hf":
        return HFCaptioner(cfg, target, trust_remote_code=trust)
    if backend == "openai":
        base_url, _, model = target.partition("#")
        if not model.strip() or not base_url.startswith(("http://", "https://")):
            raise UserError(
                f"bad openai captioner spec {redact(spec)!r}: write openai:<base_url>#<model>, "
                "e.g. openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-VL-3B-Instruct"
            )
        return OpenAICaptioner(cfg, base_url, model.strip(), seed=seed)
    if backend == "vllm":
        return VLLMCaptioner(cfg, target, trust_remote_code=trust, seed=seed)
    raise UserError(f"unknown captioner backend {backend!r} in {redact(spec)!r}: {SPEC_HELP}")


class AltTextCaptioner(CaptionerBase):
    """The caption is the alt-text itself: no model, the cheap mode and the paper's ablation."""

    backend = "alt_text"

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        for s in batch:
            text = (s.alt_text or "").strip()
            if not text:
                fail(s, STAGE_NAME, "alt_text captioner: the sample has no alt-text", "EmptyCaption")
                continue
            s.caption = text
            s.caption_source = "alt_text"
        return batch

    def provenance(self) -> dict[str, str]:
        return {"captioner.backend": self.backend}


# ---------------------------------------------------------------------------------------------- hf


def control_tokens(processor) -> frozenset[str]:
    """Every special / added token of the processor's tokenizer, plus its image placeholders."""
    tok = getattr(processor, "tokenizer", processor)
    found = set(getattr(tok, "all_special_tokens", []) or [])
    found |= {t.content for t in (getattr(tok, "added_tokens_decoder", {}) or {}).values()}
    for attr in ("image_token", "video_token", "fake_image_token", "global_image_tag", "boi_token", "eoi_token"):
        value = getattr(processor, attr, None)
        if isinstance(value, str):
            found.add(value)
    return frozenset(t for t in found if t)


def _load_error(model_id: str, exc: BaseException) -> UserError:
    """Turn a loading failure into one line that says what to do next."""
    first = first_line(exc, 300)
    if "trust_remote_code" in str(exc):
        return UserError(
            f"captioner model {model_id!r} needs its own code from the hub; "
            "pass --trust-remote-code only if you trust that repository"
        )
    if is_local(model_id):
        return UserError(f"cannot load captioner model from local path {model_id!r}: {first}")
    why = unavailable_reason() or first
    return UserError(
        f"captioner model {model_id!r} is not a local directory and can't be fetched from the Hugging Face "
        f"hub ({why}); use --profile demo for the bundled offline models, or a local path: hf:/path/to/model"
    )


class _LocalWeightsCaptioner(CaptionerBase):
    """A backend that loads the VLM's weights and processor into this process (hf:, vllm:)."""

    def __init__(self, cfg: CaptionerConfig, model: str, trust_remote_code: bool = False):
        super().__init__(cfg, model)
        self.trust_remote_code = trust_remote_code
        self._processor = None
        self._control_tokens: frozenset[str] = frozenset()  # the processor's special tokens, kept out of prompts


class HFCaptioner(_LocalWeightsCaptioner):
    """transformers VLM (Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM, ...) with batched greedy ``generate``.

    Prompts are left-padded: a decoder-only model continues from the last position, so padding on the
    right would make it continue from pad tokens.
    """

    backend = "hf"

    def __init__(self, cfg: CaptionerConfig, model: str, trust_remote_code: bool = False):
        super().__init__(cfg, model, trust_remote_code)
        self.device = cfg.device
        self._model = None

    def setup(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = resolve_device(self.cfg.device)
        dtype = resolve_dtype(self.cfg.dtype, self.device)
        try:
            kw, self._revision = pretrained_kwargs(self.model_id, self.cfg.revision)
            kw["trust_remote_code"] = self.trust_remote_code
            processor = AutoProcessor.from_pretrained(self.model_id, **kw)
            model = AutoModelForImageTextToText.from_pretrained(self.model_id, dtype=dtype, **kw)
        except (OSError, ValueError) as exc:
            raise _load_error(self.model_id, exc) from exc
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._processor = processor
        self._control_tokens = control_tokens(processor)
        self._model = model.to(self.device).eval()

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        self.setup()
        items = images_or_fail(batch)
        step = max(1, self.cfg.batch_size)
        for i in range(0, len(items), step):
            chunk = items[i : i + step]
            for (s, _), text in zip(chunk, self.generate(chunk), strict=True):
                set_caption(s, text)
        return batch

    def generate(self, items: list[tuple[Sample, Any]]) -> list[str]:
        """Greedy captions for (sample, image) pairs, decoded from the new tokens only."""
        import torch

        conversations = [
            [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": p}]}]
            for (_, img), p in zip(items, self._prompts(items, self._control_tokens), strict=True)
        ]
        inputs = self._processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        ).to(self.device, dtype=self._model.dtype)
        tokenizer = getattr(self._processor, "tokenizer", self._processor)
        with torch.inference_mode():
            out = self._model.generate(
                **inputs,
                max_new_tokens=self.cfg.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return self._processor.batch_decode(new_tokens, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------ openai


class OpenAICaptioner(CaptionerBase):
    """Chat completions against an OpenAI-compatible server, a bounded number of requests in flight.

    The transport (retries, Retry-After, the circuit breaker, the API key and its scrubbing) is
    ``self.client``; this stage turns samples into requests and answers into captions or error rows.
    """

    backend = "openai"

    def __init__(self, cfg: CaptionerConfig, base_url: str, model: str, *, seed: int = 0):
        super().__init__(cfg, model)
        # only the key the user configured (cfg.api_key_env) authenticates: URL credentials are dropped
        self.client = ChatClient(
            base_url, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s,
            max_connections=cfg.max_concurrent_requests, max_retries=cfg.max_retries, seed=seed,
            breaker=Breaker(cfg.breaker_failures, cfg.breaker_cooldown_s),
        )  # fmt: skip

    def setup(self) -> None:
        self.client.open()

    def teardown(self) -> None:
        """Close the HTTP client (every engine calls this once per worker, last)."""
        self.client.close()

    def provenance(self) -> dict[str, str]:
        prov = super().provenance()
        prov["captioner.base_url"] = redact_url(self.client.base_url)
        prov["captioner.revision"] = self.cfg.revision or "served"
        return prov

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        self.setup()
        items = images_or_fail(batch)
        if not items:
            return batch
        prompts = self._prompts(items)
        workers = min(max(1, self.cfg.max_concurrent_requests), len(items))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vesl-caption") as pool:
            results = list(pool.map(self._caption_or_error, items, prompts))
        down = next((e for _, e in results if getattr(e, "infrastructure", False)), None)
        if down is not None:  # the server, not the samples: the shard must not commit
            exc = InfrastructureError(f"captioner server {redact_url(self.client.base_url)}: {down}")
            exc.error_type = down.error_type
            raise exc
        for (s, _), (text, err) in zip(items, results, strict=True):
            if err is not None:
                fail(s, STAGE_NAME, err, getattr(err, "error_type", None))
            else:
                set_caption(s, text)
        return batch

    def _caption_or_error(self, item: tuple[Sample, Any], prompt: str) -> tuple[str | None, Exception | None]:
        try:
            return self.client.complete(item[0].key, self.payload(item[1], prompt)), None
        except Exception as exc:  # becomes this sample's error row
            return None, RequestFailed(self.client.scrub(str(exc)), getattr(exc, "error_type", type(exc).__name__),
                                       getattr(exc, "infrastructure", False))  # fmt: skip

    def payload(self, image, prompt: str) -> dict:
        """The chat request: JPEG (every OpenAI-compatible server takes it), greedy decoding."""
        return {"model": self.model_id, "messages": user_message(image_data_url(image, quality=95), prompt),
                "max_tokens": self.cfg.max_new_tokens, "temperature": 0.0}  # fmt: skip


# -------------------------------------------------------------------------------------------- vllm


class VLLMCaptioner(_LocalWeightsCaptioner):
    """In-process ``vllm.LLM``: prompts from the model's own chat template, images as multi-modal data.

    Under the Ray engine it can run as a ``ray.data.llm`` processor instead (``pipeline/engines/ray_llm.py``
    builds it): ``llm_engine()`` says which model to serve, ``chat_request(sample)`` what to ask for a
    sample, and ``take_reply(sample, text, error)`` what an answer means.
    """

    backend = "vllm"

    def __init__(self, cfg: CaptionerConfig, model: str, trust_remote_code: bool = False, seed: int = 0):
        if importlib.util.find_spec("vllm") is None:
            raise UserError("the vllm: captioner needs vLLM: pip install 'vesl[vllm]' (Linux with a CUDA GPU)")
        super().__init__(cfg, model, trust_remote_code)
        self.seed = seed
        self._llm = None

    def setup(self) -> None:
        if self._llm is not None:
            return
        from transformers import AutoProcessor
        from vllm import LLM

        try:
            kw, self._revision = pretrained_kwargs(self.model_id, self.cfg.revision)
            self._processor = AutoProcessor.from_pretrained(
                self.model_id, trust_remote_code=self.trust_remote_code, **kw
            )
        except (OSError, ValueError) as exc:
            raise _load_error(self.model_id, exc) from exc
        self._control_tokens = control_tokens(self._processor)
        dtype = self.cfg.dtype if self.cfg.dtype == "auto" else DTYPE_NAMES.get(self.cfg.dtype, self.cfg.dtype)
        self._llm = LLM(
            model=self.model_id,
            revision=self._revision or self.cfg.revision,
            trust_remote_code=self.trust_remote_code,
            dtype=dtype,
            seed=self.seed,
            tensor_parallel_size=max(1, int(self.cfg.num_gpus)),
            limit_mm_per_prompt={"image": 1},
        )

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        from vllm import SamplingParams

        self.setup()
        items = images_or_fail(batch)
        if not items:
            return batch
        requests = []
        for (_, img), p in zip(items, self._prompts(items, self._control_tokens), strict=True):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
            prompt = self._processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            requests.append({"prompt": prompt, "multi_modal_data": {"image": img}})
        params = SamplingParams(temperature=0.0, max_tokens=self.cfg.max_new_tokens, seed=self.seed)
        outputs = self._llm.generate(requests, params, use_tqdm=False)
        for (s, _), out in zip(items, outputs, strict=True):
            set_caption(s, out.outputs[0].text if out.outputs else "")
        return batch

    def llm_engine(self) -> dict[str, Any]:
        """The model a ``ray.data.llm`` vLLM processor serves for this stage, and its batching."""
        c = self.cfg
        return {"model_source": self.model_id, "batch_size": max(1, c.batch_size),
                "concurrency": max(1, c.concurrency),
                "engine_kwargs": {"trust_remote_code": self.trust_remote_code, "revision": c.revision}}  # fmt: skip

    def chat_request(self, sample: Sample) -> dict[str, Any]:
        """One sample as a chat request (messages and sampling parameters); PNG keeps the pixels exact."""
        prompt = render_prompt(self.cfg.prompt_template, sample.alt_text)
        return {"messages": user_message(image_data_url(sample.image, "PNG"), prompt),
                "sampling_params": {"temperature": 0.0, "max_tokens": self.cfg.max_new_tokens, "seed": self.seed}}

    def take_reply(self, sample: Sample, text: str | None, error: str | None) -> None:
        """The processor's answer for ``sample``: its caption, or its error row."""
        if error:
            fail(sample, STAGE_NAME, error, "InferenceError")
        else:
            set_caption(sample, text)
