"""Ray Data's LLM path: a stage that describes itself as a vLLM chat model is placed as a ``ray.data.llm``
processor (``vLLMEngineProcessorConfig`` + ``build_processor``) instead of an actor pool, one sample per row.

The stage keeps its model logic and this module only builds and places the processor. A stage offers the
path with three methods (the ``vllm:<model>`` captioner has them):

- ``llm_engine()``: ``model_source``, ``batch_size``, ``concurrency`` and ``engine_kwargs`` of the processor;
- ``chat_request(sample)``: that sample's ``messages`` and ``sampling_params``;
- ``take_reply(sample, text, error)``: records the generated text, or the error, on the sample.

vLLM batches continuously, so this path is not byte-comparable with the local engine. It needs vLLM and a
GPU and is not exercised by the tests here.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from vesl.pipeline.engines.distributed import SECONDS_KEY, ShardEnd, dumps, loads


def offers_llm_processor(stage: Any) -> bool:
    """Whether the stage describes itself as a chat model that ``ray.data.llm`` can serve."""
    return all(callable(getattr(stage, m, None)) for m in ("llm_engine", "chat_request", "take_reply"))


def _sample_of(row: dict[str, Any]) -> Any:
    """The one Sample of an exploded row."""
    (sample,) = loads(row["item"])
    return sample


def build_llm_processor(stage: Any):
    """The stage's ``ray.data.llm`` processor, rows in and out in the engine's ``{shard, item}`` format;
    None when ray.data.llm or vLLM is missing (the stage then runs in an actor pool)."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    except ImportError:
        return None
    config = vLLMEngineProcessorConfig(**stage.llm_engine(), prepare_multimodal_stage=True,
                                       should_continue_on_error=True)  # fmt: skip
    name = stage.name

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, **stage.chat_request(_sample_of(row))}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        sample = _sample_of(row)
        err = row.get("__inference_error__")
        stage.take_reply(sample, row.get("generated_text"), str(err) if err else None)
        sample.meta.setdefault(SECONDS_KEY, {}).setdefault(name, 0.0)
        return {"shard": row["shard"], "item": dumps([sample])}

    return build_processor(config, preprocess=preprocess, postprocess=postprocess)


def place_llm_processor(ds, stage: Any):
    """Place a stage that offers the LLM path (see the module docstring), one sample per row; None when its
    extras are missing: the stage then runs in an actor pool."""
    processor = build_llm_processor(stage)
    if processor is None:
        return None
    name = stage.name
    provenance = {str(k): v for k, v in stage.provenance().items()}

    def explode(row: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per sample (the processor works on rows), each a batch of one."""
        item = loads(row["item"])
        if isinstance(item, ShardEnd):
            return [row]
        return [{"shard": row["shard"], "item": dumps([s])} for s in item]

    def needs_stage(row: dict[str, Any]) -> bool:
        item = loads(row["item"])
        return isinstance(item, list) and bool(item) and item[0].ok

    def stamp(row: dict[str, Any]) -> dict[str, Any]:
        item = loads(row["item"])
        if isinstance(item, ShardEnd):
            item.provenance[name] = provenance
        return {"shard": row["shard"], "item": dumps(item)}

    ds = ds.flat_map(explode)
    processed = processor(ds.filter(needs_stage))
    rest = ds.filter(lambda row: not needs_stage(row)).map(stamp)
    return processed.union(rest)
