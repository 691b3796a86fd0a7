"""The ``sglang`` rollout engine: the student's copy served by SGLang for on-policy sampling.

**Status: never run.** No part that talks to a live SGLang server has executed (no GPU on the
development machines). Tested on CPU: the bucketed gather of an FSDP2-sharded student to one
rank (gloo, two ranks under torchrun), name/shape checks, request building and output parsing;
against sglang 0.5.23's own code (tests/integration/test_sglang_contracts.py): the launch
command, the request bodies, the payloads, and the sync's weight-update session order.
``checks/gpu/gpu_check_sglang.py`` is the first real run.

Design (same server plumbing as the teacher engine, :mod:`kdcore.engines.sglang.server`):

- One SGLang server per node, in its own process session, started by local rank 0 (or
  ``server_url``), with ``--load-format dummy``: it needs the student's config only (written
  to a temporary folder); the real weights arrive by the first sync before any sampling.
- **Weight sync** (:meth:`SGLangRolloutEngine.sync_model`, collective): the FSDP2 student's
  parameters go through in buckets of ``bucket_mb``: each bucket's shards are gathered **to
  the rank that talks to the server only** (``torch.distributed.gather`` of the dim-0 shards;
  the other ranks never hold a full tensor) when one server serves all ranks, otherwise
  all-gathered one bucket at a time; cast to the student's compute dtype on the GPU; handed
  to SGLang's ``/update_weights_from_tensor`` as CUDA IPC handles (no copy through the host,
  one payload per server TP rank), and freed before the next bucket. sglang 0.5.23 accepts
  updates only inside a weight-update session: one ``/begin_weight_update`` ...
  ``/end_weight_update`` around every bucket of a sync (closed even when a bucket fails),
  then ``/flush_cache``. Peak extra memory: one
  bucket. :meth:`update_weights` takes full tensors (the :class:`kdcore.engines.protocol.RolloutEngine`
  contract) and sends them the same way.
- **Sampling**: ``/generate`` with token ids, ``n`` copies of each prompt (prompt-major,
  ``sampling_seed`` = seed + copy index), ``stop_token_ids`` = the EOS ids, no top-k cut;
  replies are cut after the first EOS and at each prompt's own limit like the hf engine.
  Per-request seeds only take effect in SGLang's deterministic mode, so the server runs
  ``--enable-deterministic-inference`` by default (slower kernels; override with
  ``server_args: {enable_deterministic_inference: false}`` when reproducible samples do not
  matter).
- **Colocation**: ``sleep()`` releases weights and KV cache (nothing backed up: the copy is
  re-synced), ``wake()`` resumes them and marks the copy stale (``version = None``) so the
  sampler re-syncs before sampling.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from kdcore.engines.protocol import Generation, RolloutEngine, RolloutError, TeacherError, check_generate, finish_generations
from kdcore.engines.sglang.config import SGLangConfig, check_cuda, check_version, installed_version
from kdcore.engines.sglang.ipc import push_weights
from kdcore.engines.sglang.server import (START_TIMEOUT_S, SGLangServer, flush_cache, free_port,
                                          local_rank_and_world, sampling_params, server_kwargs,
                                          weight_update_session)

BUCKET_MB = 512  # bucket of full tensors in flight per sync step: bounds the sync's extra memory
ROLLOUT_DEFAULT_ARGS = {
    # per-request sampling seeds only take effect in deterministic mode (sglang 0.5.23 sampler)
    "enable_deterministic_inference": True,
}


# ============================================================================ FSDP2 gather


def _dim0_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    return (isinstance(t, DTensor) and t.device_mesh.ndim == 1 and len(t.placements) == 1
            and isinstance(t.placements[0], Shard) and t.placements[0].dim == 0)


def gather_full(t: torch.Tensor, *, dst: Optional[int], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """The full value of a (possibly DTensor-sharded) tensor, detached, in ``dtype``.

    ``dst`` a global rank: only that rank receives it (others get None and hold nothing but
    their shard): dim-0 shards (FSDP2's layout: ``torch.chunk`` sizes, possibly uneven or
    empty) are padded to one size, gathered with ``torch.distributed.gather`` and trimmed.
    ``dst`` None: every rank gets it (``full_tensor``). Collective for DTensors.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    cast = (lambda x: x.to(dtype) if dtype is not None and x.is_floating_point() else x)
    if not isinstance(t, DTensor):
        return cast(t.detach())
    if dst is None or not _dim0_sharded(t):
        full = cast(t.detach().full_tensor())
        return full if dst is None or dist.get_rank() == dst else None
    group = t.device_mesh.get_group()
    ws = dist.get_world_size(group)
    n = t.shape[0]
    c = max(1, math.ceil(n / ws))
    local = cast(t.detach().to_local())
    padded = local.new_zeros((c, *t.shape[1:]))
    padded[:local.shape[0]] = local
    me = dist.get_rank()
    parts = [torch.empty_like(padded) for _ in range(ws)] if me == dst else None
    dist.gather(padded, parts, dst=dst, group=group)
    if me != dst:
        return None
    sizes = [max(0, min(c, n - i * c)) for i in range(ws)]
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def iter_full_buckets(model: torch.nn.Module, *, dst: Optional[int], dtype: Optional[torch.dtype] = None,
                      bucket_bytes: int = BUCKET_MB << 20) -> Iterator[list[tuple[str, Optional[torch.Tensor]]]]:
    """Full weights of a possibly FSDP2-sharded model, a bucket at a time (collective).

    Yields lists of ``(name, tensor)``; the tensor is None on ranks other than ``dst`` (see
    :func:`gather_full`). A bucket closes once its tensors reach ``bucket_bytes`` (a tensor
    larger than that is a bucket of its own). Tied weights are gathered once and appear under
    each name. Persistent buffers are included, non-persistent ones (rotary) are not. Drop
    each bucket before asking for the next to keep the peak at one bucket.
    """
    items = list(model.state_dict(keep_vars=True).items())
    gathered: dict[int, Optional[torch.Tensor]] = {}
    bucket: list[tuple[str, Optional[torch.Tensor]]] = []
    size = 0
    with torch.no_grad():
        for name, t in items:
            key = id(t)
            if key not in gathered:
                gathered[key] = gather_full(t, dst=dst, dtype=dtype)
                size += t.numel() * _itemsize(dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
            bucket.append((name, gathered[key]))
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
                gathered.clear()  # tied names later in the order re-gather (rare) rather than pin memory
        if bucket:
            yield bucket


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a model built from ``config`` loads (meta device: free)."""
    from transformers import AutoModelForCausalLM

    cfg = type(config).from_dict(config.to_dict())
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def served_config(config):
    """A copy of the student's config for the server's folder: no quantization block, and
    ``architectures`` named (a student built ``from_config`` has None, and sglang's model config
    reads ``architectures[0]`` to pick its model class)."""
    from transformers import AutoModelForCausalLM

    cfg = type(config).from_dict(config.to_dict())
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    if not getattr(cfg, "architectures", None):
        model_class = AutoModelForCausalLM._model_mapping.get(type(cfg), None)
        if model_class is None:
            raise RolloutError(f"rollout engine: no causal-LM class for a {type(cfg).__name__}; set the student "
                               f"config's 'architectures'")
        cfg.architectures = [model_class.__name__]
    return cfg


def check_names(state: Mapping[str, Sequence[int]], expected: Mapping[str, tuple[int, ...]], *, complete: bool) -> None:
    """:class:`RolloutError` for unknown names, shape mismatches, or (``complete``) missing ones."""
    unknown = [k for k in state if k not in expected]
    if unknown:
        raise RolloutError(f"rollout engine: the student copy has no tensor named {', '.join(unknown[:5])}"
                           + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    bad = [f"{k} {tuple(s)} vs {expected[k]}" for k, s in state.items() if tuple(s) != expected[k]]
    if bad:
        raise RolloutError(f"rollout engine: shape mismatch for {', '.join(bad[:5])}")
    if complete:
        missing = [k for k in expected if k not in state]
        if missing:
            raise RolloutError(f"rollout engine: the weights lack {', '.join(missing[:5])}"
                               + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                               + " (a partial sync would sample from a mix of two models)")


def generate_body(prompt_ids: Sequence[Sequence[int]], limits: Sequence[int], *, n: int, temperature: float,
                  top_p: float, eos_ids: Sequence[int], seed: Optional[int]) -> dict:
    """``/generate`` body: each prompt ``n`` times, prompt-major, one seed per row."""
    rows = [list(map(int, p)) for p in prompt_ids for _ in range(n)]
    params = [sampling_params(max_new_tokens=limits[i], temperature=temperature, top_p=top_p, eos_ids=eos_ids,
                              seed=None if seed is None else int(seed) + i) for i in range(len(rows))]
    return {"input_ids": rows, "sampling_params": params}


def parse_generations(outputs: Any, limits: Sequence[int], eos_ids: Sequence[int]) -> list[Generation]:
    """Generations from SGLang's reply (``output_ids`` per row, EOS kept: ``no_stop_trim``)."""
    outs = outputs if isinstance(outputs, list) else [outputs]
    if len(outs) != len(limits):
        raise RolloutError(f"sglang returned {len(outs)} samples for {len(limits)} requested")
    return finish_generations([o["output_ids"] for o in outs], limits, {int(e) for e in eos_ids})


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ============================================================================ the engine


class SGLangRolloutEngine(RolloutEngine):
    """The student's sampling copy on an SGLang server (see the module docstring).

    Args:
        config: the student's transformers config (the served model is built from it).
        device: the student's device (CUDA): where buckets are cast before the IPC hand-off.
        dtype: served/compute dtype (bf16 recommended; fp32 works but samples slowly).
        sglang: the server settings (a :class:`kdcore.engines.sglang.config.SGLangConfig`: tp/dp size,
            memory fraction, colocate, port, server_url, base_gpu_id, server_args). Default:
            ``SGLangConfig()``.
        bucket_mb: size of a weight-sync bucket.
    """

    def __init__(self, config=None, *, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                 sglang: Any = None, bucket_mb: int = BUCKET_MB, seed: int = 0, threads: Optional[int] = None,
                 start_timeout: Optional[float] = None):
        if config is None:
            raise RolloutError("the sglang rollout engine needs the student's config")
        self.config = config
        self.scfg = sglang if sglang is not None else SGLangConfig()
        self.dtype = dtype
        self.bucket_bytes = int(bucket_mb) << 20
        self.version: Optional[int] = None
        self._asleep = False
        self._lock = threading.Lock()
        self._folder: Optional[str] = None
        self.server = None
        self.owns_server = False
        try:
            check_cuda()
        except TeacherError as exc:
            raise RolloutError(str(exc).replace("teacher.engine", "rollout.engine")) from exc
        dev = torch.device(device)
        self.device = dev if dev.type == "cuda" and dev.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.expected = expected_tensors(config)
        local_rank, local_world = local_rank_and_world()
        self.leader = local_rank == 0  # the one rank per node that pushes weights to its server
        self.owns_server = self.scfg.server_url is None and local_rank == 0
        timeout = start_timeout or START_TIMEOUT_S
        if self.scfg.server_url:
            self.server = SGLangServer.connect(self.scfg.server_url, timeout=timeout)
            return
        if local_world > 1 and not self.scfg.port:
            raise RolloutError(f"{local_world} ranks on this node share one sglang rollout server: set its port "
                               "(local rank 0 starts it there) or server_url")
        port = int(self.scfg.port) or free_port()
        if self.owns_server:
            check_version(installed_version())
            self._folder = tempfile.mkdtemp(prefix="kdflow-rollout-model-")
            served_config(config).save_pretrained(self._folder)
            name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
            kw = server_kwargs(self.scfg, model_path=self._folder, dtype=name, max_rows=0, port=port, seed=seed,
                                  role="rollout")
            kw = {**ROLLOUT_DEFAULT_ARGS, **kw}
            kw.update(dict(getattr(self.scfg, "server_args", None) or {}))
            self.server = SGLangServer.start(kw, timeout=timeout)
        else:
            self.server = SGLangServer.connect(f"http://127.0.0.1:{port}", timeout=timeout)

    # ------------------------------------------------------------------ weights

    def _push(self, named: Mapping[str, torch.Tensor]) -> None:
        """One bucket, inside the session :meth:`_session` opened (which holds the lock)."""
        try:
            push_weights(self.server, named, tp_size=int(self.scfg.tp_size), device=self.device, dtype=self.dtype,
                         flush_cache=False, session=False)
        except TeacherError as exc:
            raise RolloutError(f"sglang rollout weight update failed: {exc}") from exc

    @contextmanager
    def _session(self) -> Iterator[None]:
        """The leader's weight-update session around every bucket of one sync (sglang 0.5.23
        refuses updates outside one); other ranks only take part in the gathers."""
        if not self.leader:
            yield
            return
        try:
            with weight_update_session(self.server, self._lock):
                yield
            self._flush()
        except TeacherError as exc:
            raise RolloutError(f"sglang rollout weight update failed: {exc}") from exc

    def _flush(self) -> None:
        flush_cache(self.server, self._lock)  # cached prefixes were computed with the old weights

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        """Full tensors by name (every name of the model): sent in buckets by the leader rank;
        other ranks only check them. Returns the number of tensors."""
        check_names({k: tuple(v.shape) for k, v in state_dict.items()}, self.expected, complete=True)
        if self.leader:
            with self._session():
                bucket: dict[str, torch.Tensor] = {}
                size = 0
                for k, v in state_dict.items():
                    bucket[k] = v
                    size += v.numel() * (_itemsize(self.dtype) if v.is_floating_point() else v.element_size())
                    if size >= self.bucket_bytes:
                        self._push(bucket)
                        bucket, size = {}, 0
                if bucket:
                    self._push(bucket)
        _barrier()  # no rank of the node samples before its server holds the new weights
        return len(state_dict)

    def sync_model(self, model: torch.nn.Module) -> int:
        """Copy an FSDP2-sharded (or plain) student's weights in, bucket by bucket (collective:
        every rank calls it). When one server serves every rank, full tensors only ever exist
        on the leader (rank 0); with one server per node each rank all-gathers one bucket at a
        time and the node leaders push. Returns the number of tensors."""
        import torch.distributed as dist

        # names and global shapes first (DTensor.shape is global): refuse before sending anything
        check_names({k: tuple(v.shape) for k, v in model.state_dict().items()}, self.expected, complete=True)
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        one_server = multi and int(os.environ.get("LOCAL_WORLD_SIZE", 1)) == dist.get_world_size()
        count = 0
        with self._session():
            for bucket in iter_full_buckets(model, dst=0 if one_server else None, dtype=self.dtype,
                                            bucket_bytes=self.bucket_bytes):
                if self.leader:
                    self._push({k: v for k, v in bucket if v is not None})
                count += len(bucket)
                del bucket
        _barrier()
        return count

    # ------------------------------------------------------------------ sampling

    def generate(self, prompt_ids, *, max_new_tokens, temperature=1.0, top_p=1.0, n=1, eos_ids=(), seed=None):
        limits = check_generate(prompt_ids, max_new_tokens, temperature, top_p, n)
        if not limits:
            return []
        if self._asleep:
            raise RolloutError("the sglang rollout engine is asleep: wake() it (and re-sync) before sampling")
        body = generate_body(prompt_ids, limits, n=n, temperature=temperature, top_p=top_p, eos_ids=eos_ids, seed=seed)
        with self._lock:
            out = self.server.call("/generate", body)
        return parse_generations(out, limits, eos_ids)

    # ------------------------------------------------------------------ colocation

    def sleep(self) -> None:
        """Free the server's GPU memory (weights and KV cache; needs ``colocate``)."""
        if getattr(self.scfg, "colocate", False) and self.owns_server and not self._asleep:
            with self._lock:
                self.server.call("/release_memory_occupation", {"tags": None})
        self._asleep = True

    def wake(self) -> None:
        """Take the memory back; the weights are stale until the next sync (``version`` None)."""
        if getattr(self.scfg, "colocate", False) and self.owns_server and self._asleep:
            with self._lock:
                self.server.call("/resume_memory_occupation", {"tags": None})
            self.version = None
        self._asleep = False

    def close(self) -> None:
        if self.server is not None and self.owns_server:
            self.server.close()
        self.server = None
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


__all__ = ["SGLangRolloutEngine", "gather_full", "iter_full_buckets", "expected_tensors", "check_names",
           "generate_body", "parse_generations", "served_config", "BUCKET_MB"]
