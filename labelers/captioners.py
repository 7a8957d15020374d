"""Recaptioning stages: the VLM writes a detailed caption, with the alt-text only as a hint (VeCap style).

``make_captioner(cfg)`` picks the backend from ``cfg.spec``:

- ``alt_text``                   no model; the caption is the alt-text (the paper's "without VESL" ablation)
- ``hf:<hub id or path>``        transformers ``AutoModelForImageTextToText``, batched ``generate``
- ``openai:<base_url>#<model>``  any OpenAI-compatible chat-completions server (vLLM, SGLang, TGI, transformers)
- ``vllm:<hub id or path>``      in-process ``vllm.LLM`` (needs the ``vesl[vllm]`` extra and a GPU)

Every backend is a Stage: cheap to construct and pickle (engines ship it to workers), heavy work in
``setup()``, per-sample failures become error rows through ``fail()``.

Longer than 400 lines on purpose: the four backends share the prompt, the image handling, the
empty-caption rule and the provenance, so that every backend writes the same kind of caption.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import logging
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from vesl.errors import InfrastructureError, UserError, first_line
from vesl.labelers.devices import DTYPE_NAMES, resolve_device, resolve_dtype
from vesl.labelers.hub import is_local, pretrained_kwargs, unavailable_reason
from vesl.labelers.prompts import prompt_hash, render_prompt
from vesl.redact import redact
from vesl.schemas.config import CaptionerConfig
from vesl.schemas.stage import Sample, Stage, StageResources, fail

log = logging.getLogger(__name__)

STAGE_NAME = "caption"
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


def _resources(cfg: CaptionerConfig) -> StageResources:
    return StageResources(batch_size=cfg.batch_size, concurrency=cfg.concurrency, num_gpus=cfg.num_gpus)


def _sample_image(sample: Sample):
    """The decoded RGB image; decodes ``image_bytes`` itself when no decode stage ran before."""
    if sample.image is not None:
        return sample.image if sample.image.mode == "RGB" else sample.image.convert("RGB")
    if sample.image_bytes:
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(sample.image_bytes)) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    raise ValueError("sample has no decoded image and no image bytes")


def _images_or_fail(batch: list[Sample]) -> list[tuple[Sample, Any]]:
    """Pair each sample with its image; samples whose image can't be had become error rows."""
    out = []
    for s in batch:
        try:
            out.append((s, _sample_image(s)))
        except Exception as exc:  # a broken image costs only its own sample
            fail(s, STAGE_NAME, exc)
    return out


def _set_caption(sample: Sample, text: str | None) -> None:
    text = (text or "").strip()
    if not text:
        fail(sample, STAGE_NAME, "the model generated an empty caption", "EmptyCaption")
        return
    sample.caption = text
    sample.caption_source = "vlm"


class _Captioner:
    name = STAGE_NAME
    backend = ""

    def __init__(self, cfg: CaptionerConfig, model: str = ""):
        self.cfg = cfg
        self.model_id = model
        self.resources = _resources(cfg)
        self._revision: str | None = None

    def setup(self) -> None:
        """Nothing to load by default."""

    def teardown(self) -> None:
        """Nothing to release by default."""

    def provenance(self) -> dict[str, str]:
        return {
            "captioner.backend": self.backend,
            "captioner.model": self.model_id,
            "captioner.revision": self._revision or self.cfg.revision or self._default_revision(),
            "captioner.prompt_sha256": prompt_hash(self.cfg.prompt_template),
            "captioner.max_new_tokens": str(self.cfg.max_new_tokens),
        }

    def _default_revision(self) -> str:
        """A local directory has no revision; a hub id we could not pin is its default branch."""
        return "local" if os.path.isdir(self.model_id) else "main"

    def __getstate__(self) -> dict:
        # Engines pickle stages to ship them to workers; loaded models, clients and keys stay behind.
        return {k: (None if k in ("_model", "_processor", "_llm", "_client", "_secret") else v)
                for k, v in self.__dict__.items()}

    def _prompts(self, items: list[tuple[Sample, Any]], control_tokens: frozenset[str] = frozenset()) -> list[str]:
        return [render_prompt(self.cfg.prompt_template, s.alt_text, control_tokens) for s, _ in items]


class AltTextCaptioner(_Captioner):
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


class HFCaptioner(_Captioner):
    """transformers VLM (Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM, ...) with batched greedy ``generate``.

    Prompts are left-padded: a decoder-only model continues from the last position, so padding on the
    right would make it continue from pad tokens.
    """

    backend = "hf"

    def __init__(self, cfg: CaptionerConfig, model: str, trust_remote_code: bool = False):
        super().__init__(cfg, model)
        self.trust_remote_code = trust_remote_code
        self.device = cfg.device
        self._model = None
        self._processor = None
        self._control_tokens: frozenset[str] = frozenset()

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
        items = _images_or_fail(batch)
        step = max(1, self.cfg.batch_size)
        for i in range(0, len(items), step):
            chunk = items[i : i + step]
            for (s, _), text in zip(chunk, self.generate(chunk), strict=True):
                _set_caption(s, text)
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


class RequestFailed(Exception):
    """A caption request that still failed after its retries; ``error_type`` names the last cause.

    ``infrastructure``: the server was unreachable, timed out or answered 429/5xx to every attempt,
    so the failure says nothing about the sample (its shard is not committed; a rerun retries it).
    """

    def __init__(self, message: str, error_type: str, infrastructure: bool = False):
        super().__init__(message)
        self.error_type = error_type
        self.infrastructure = infrastructure


def _strip_userinfo(url: str) -> str:
    """Drop user:password from a URL: never sent (httpx would turn it into Basic auth) nor shown."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _redact_url(url: str) -> str:
    """A URL fit for provenance and logs: no userinfo, no secret query parameters."""
    return redact(_strip_userinfo(url))


def encode_image_data_url(image, quality: int = 95) -> str:
    """JPEG base64 data URL: the format every OpenAI-compatible server accepts for ``image_url``."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _message_text(data: Any) -> str:
    """``choices[0].message.content`` of a chat completion; raises on any other shape."""
    content = data["choices"][0]["message"]["content"]
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is not None and not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}, not text")
    return content or ""


class OpenAICaptioner(_Captioner):
    """Chat completions against an OpenAI-compatible server, a bounded number of requests in flight.

    Retries 429, 5xx, timeouts and connection errors with exponential backoff and seeded jitter
    (honouring Retry-After); other 4xx and malformed answers fail the sample at once. The API key is
    read from ``cfg.api_key_env`` in ``setup()`` on the worker and is scrubbed from every message.
    """

    backend = "openai"

    def __init__(
        self,
        cfg: CaptionerConfig,
        base_url: str,
        model: str,
        *,
        seed: int = 0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ):
        super().__init__(cfg, model)
        # only the key the user configured (cfg.api_key_env) authenticates: URL credentials are dropped
        self.base_url = _strip_userinfo(base_url.rstrip("/"))
        self.url = self.base_url + "/chat/completions"
        self.seed = seed
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._client = None
        self._secret: str | None = None
        self._breaker = _Breaker(cfg.breaker_failures, cfg.breaker_cooldown_s)

    def setup(self) -> None:
        if self._client is not None:
            return
        import httpx

        self._secret = os.environ.get(self.cfg.api_key_env) or None
        headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        n = max(1, self.cfg.max_concurrent_requests)
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.cfg.timeout_s),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        )

    def teardown(self) -> None:
        """Close the HTTP client (every engine calls this once per worker, last)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def provenance(self) -> dict[str, str]:
        prov = super().provenance()
        prov["captioner.base_url"] = _redact_url(self.base_url)
        prov["captioner.revision"] = self.cfg.revision or "served"
        return prov

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        self.setup()
        items = _images_or_fail(batch)
        if not items:
            return batch
        prompts = self._prompts(items)
        workers = min(max(1, self.cfg.max_concurrent_requests), len(items))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vesl-caption") as pool:
            results = list(pool.map(self._caption_or_error, items, prompts))
        down = next((e for _, e in results if getattr(e, "infrastructure", False)), None)
        if down is not None:  # the server, not the samples: the shard must not commit
            exc = InfrastructureError(f"captioner server {_redact_url(self.base_url)}: {down}")
            exc.error_type = down.error_type
            raise exc
        for (s, _), (text, err) in zip(items, results, strict=True):
            if err is not None:
                fail(s, STAGE_NAME, err, getattr(err, "error_type", None))
            else:
                _set_caption(s, text)
        return batch

    def _caption_or_error(self, item: tuple[Sample, Any], prompt: str) -> tuple[str | None, Exception | None]:
        try:
            return self.caption(item[0].key, item[1], prompt), None
        except Exception as exc:  # becomes this sample's error row
            return None, RequestFailed(
                self._scrub(str(exc)), getattr(exc, "error_type", type(exc).__name__), getattr(exc, "infrastructure", False)
            )

    def _scrub(self, text: str) -> str:
        """No credential of any form (the key, Basic/Bearer values a server echoes, URL secrets)."""
        return redact(text, self._secret)

    def payload(self, image, prompt: str) -> dict:
        return {
            "model": self.model_id,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": encode_image_data_url(image)}},
                        {"type": "text", "text": prompt},
                    ],
                }
            ],
            "max_tokens": self.cfg.max_new_tokens,
            "temperature": 0.0,
        }

    def backoff(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Exponential backoff with 'equal jitter'; a server's Retry-After wins when it asks for longer."""
        delay = min(self.backoff_max_s, self.backoff_base_s * (2**attempt))
        delay = delay / 2 + rng.uniform(0, delay / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    def caption(self, key: str, image, prompt: str) -> str:
        """One request with retries; returns the caption text or raises RequestFailed."""
        import httpx

        body = self.payload(image, prompt)
        rng = random.Random(f"{self.seed}:{key}")  # per-sample jitter: deterministic and thread-safe
        attempts = max(0, self.cfg.max_retries) + 1
        for attempt in range(attempts):
            open_because = self._breaker.open_because()
            if open_because is not None:  # every recent request failed: don't hammer a dead server
                raise RequestFailed(
                    f"circuit open: the last {self._breaker.threshold} requests failed ({open_because})",
                    "CircuitOpen", infrastructure=True,
                )
            retry_after = None
            try:
                resp = self._client.post(self.url, json=body)
            except httpx.TransportError as exc:  # refused, reset, timeouts
                error_type, message = type(exc).__name__, f"{type(exc).__name__}: {exc}"
            else:
                if resp.is_success:
                    self._breaker.success()
                    return self._parse(resp)
                error_type = f"HTTP{resp.status_code}"
                message = f"HTTP {resp.status_code} from {_redact_url(self.url)}: {resp.text[:300]}"
                if resp.status_code != 429 and resp.status_code < 500:
                    self._breaker.success()  # the server answered: it is up
                    raise RequestFailed(self._scrub(message), error_type)
                retry_after = _retry_after(resp.headers.get("retry-after"))
            message = self._scrub(message)
            if attempt + 1 >= attempts:
                self._breaker.failure(message[:200])
                raise RequestFailed(f"{message} (after {attempts} attempts)", error_type, infrastructure=True)
            delay = self.backoff(attempt, rng, retry_after)
            log.warning("caption request for %s failed (%s); retry %d/%d in %.2fs",
                        key, message[:200], attempt + 1, attempts - 1, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _parse(self, resp) -> str:
        try:
            return _message_text(resp.json())
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise RequestFailed(
                self._scrub(f"malformed chat completion ({type(exc).__name__}: {exc}): {resp.text[:200]}"),
                "BadResponse",
            ) from None


class _Breaker:
    """Circuit breaker: after ``threshold`` requests in a row failed for the infrastructure (each after
    its retries), further requests fail at once for ``cooldown_s``; then one is let through again."""

    def __init__(self, threshold: int, cooldown_s: float):
        import threading

        self.threshold = max(1, int(threshold))
        self.cooldown_s = cooldown_s
        self._failures = 0
        self._opened_at: float | None = None
        self._last = ""
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"threshold": self.threshold, "cooldown_s": self.cooldown_s}  # a worker starts closed

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["threshold"], state["cooldown_s"])

    def open_because(self) -> str | None:
        with self._lock:
            if self._opened_at is None:
                return None
            if time.monotonic() - self._opened_at >= self.cooldown_s:
                self._opened_at = None  # half-open: the next request probes the server
                self._failures = self.threshold - 1
                return None
            return self._last

    def failure(self, message: str) -> None:
        with self._lock:
            self._failures += 1
            self._last = message
            if self._failures >= self.threshold:
                self._opened_at = time.monotonic()

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None


# -------------------------------------------------------------------------------------------- vllm


class VLLMCaptioner(_Captioner):
    """In-process ``vllm.LLM``: prompts from the model's own chat template, images as multi-modal data."""

    backend = "vllm"

    def __init__(self, cfg: CaptionerConfig, model: str, trust_remote_code: bool = False, seed: int = 0):
        if importlib.util.find_spec("vllm") is None:
            raise UserError("the vllm: captioner needs vLLM: pip install 'vesl[vllm]' (Linux with a CUDA GPU)")
        super().__init__(cfg, model)
        self.trust_remote_code = trust_remote_code
        self.seed = seed
        self._llm = None
        self._processor = None
        self._control_tokens: frozenset[str] = frozenset()

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
        items = _images_or_fail(batch)
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
            _set_caption(s, out.outputs[0].text if out.outputs else "")
        return batch

    def ray_llm_processor(self, unpack: Callable[[dict], Sample], pack: Callable[[dict, Sample], dict]):
        """This captioner as a ``ray.data.llm`` processor (``vLLMEngineProcessorConfig`` + ``build_processor``),
        which the Ray engine places instead of an actor pool; None when ray.data.llm or vLLM is missing.

        One row per sample: ``unpack(row)`` gives the row's Sample, ``pack(row, sample)`` the row to emit (the
        engine's row format). vLLM batches continuously, so this path is not byte-comparable with the local
        engine. It needs vLLM and a GPU and is not exercised by the tests here.
        """
        try:
            import vllm  # noqa: F401
            from ray.data.llm import build_processor, vLLMEngineProcessorConfig
        except ImportError:
            return None
        c = self.cfg
        config = vLLMEngineProcessorConfig(
            model_source=self.model_id,
            batch_size=max(1, c.batch_size),
            concurrency=max(1, c.concurrency),
            engine_kwargs={"trust_remote_code": self.trust_remote_code, "revision": c.revision},
            prepare_multimodal_stage=True,
            should_continue_on_error=True,
        )
        template, max_tokens, seed = c.prompt_template, c.max_new_tokens, self.seed

        def preprocess(row: dict) -> dict:
            sample = unpack(row)
            buf = io.BytesIO()
            sample.image.save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            content = [{"type": "image_url", "image_url": {"url": url}},
                       {"type": "text", "text": render_prompt(template, sample.alt_text)}]
            return {**row, "messages": [{"role": "user", "content": content}],
                    "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens, "seed": seed}}  # fmt: skip

        def postprocess(row: dict) -> dict:
            sample = unpack(row)
            err = row.get("__inference_error__")
            if err:
                fail(sample, STAGE_NAME, str(err), "InferenceError")
            else:
                _set_caption(sample, row.get("generated_text"))
            return pack(row, sample)

        return build_processor(config, preprocess=preprocess, postprocess=postprocess)
