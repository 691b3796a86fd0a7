"""The ``hf`` teacher's child process: loads the model and serves the parent's requests.

Runs in the interpreter :class:`kdcore.engines.hf.teacher.HFTeacher` spawns (its docstring says
how the child is set up, and why); kept apart from the parent's side so that each file reads as
one side of the queue pair. Every exception here is sent up as a traceback and ends the child.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback

import torch

from kdcore.infra.channel import Channel, ChannelClosed
from kdcore.modeling import models
from kdcore.modeling.vision import backbone, is_vision_model, model_inputs




def _decoder_layers(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return list(layers)
    lists = [m for m in decoder.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def child_main(options: dict, channel: Channel, requests, responses, parent_pid: int) -> None:
    try:
        _serve(options, channel, requests, responses, parent_pid)
        code = 0
    except ChannelClosed:  # the parent closed the engine while we waited for a slot
        code = 0
    except BaseException:  # noqa: BLE001 - everything goes to the parent, then we exit
        responses.put(("fatal", traceback.format_exc()))
        code = 1
    responses.close()
    responses.join_thread()  # make sure the message left before the process does
    # Returning (not os._exit) lets multiprocessing run its finalizers, which unlink semaphores
    # that libraries created here (tqdm's lock) instead of leaving them to the resource tracker.
    if code:
        raise SystemExit(code)


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:  # re-parented: the trainer is gone
            os._exit(3)


def _serve(options: dict, channel: Channel, requests, responses, parent_pid: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()
    threads = int(options["threads"])
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)  # the forward is one op stream; inter-op workers only compete
    except RuntimeError:
        pass
    channel.attach_producer()

    device = options["device"]
    if device.startswith("cuda"):
        # the parent's index (cuda:LOCAL_RANK): kernels, the allocator and empty_cache() act there,
        # and no CUDA context is opened on GPU 0 by every rank's child
        torch.cuda.set_device(torch.device(device))
    spec = options["spec"]
    path, converted = models.loadable_path(spec, options["cache_dir"])
    folder = path if converted else None
    model = models.load_causal_lm(folder or spec, dtype=options["dtype"], device=device)
    if options.get("attn_implementation"):
        model.set_attn_implementation(options["attn_implementation"])

    vl = is_vision_model(model)
    decoder = backbone(model)  # a VL model's whole backbone: vision tower, projector, language model
    # Progress beats from every leaf module (each linear, norm, ...), not just each layer: one
    # layer of a large teacher on few CPU threads can outlast the hang timeout by itself.
    for module in decoder.modules():
        if next(module.children(), None) is None:
            module.register_forward_hook(lambda *_: channel.beat())
    hidden = int(model.config.get_text_config().hidden_size)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    responses.put(("ready", {"hidden_size": hidden, "vocab_size": vocab, "pid": os.getpid(), "folder": folder,
                             "threads": torch.get_num_threads(), "device": device,
                             "num_layers": len(_decoder_layers(decoder)), "vision": vl}))
    parent_alive = lambda: os.getppid() == parent_pid  # noqa: E731
    on_device = device if device != "cpu" else None

    while True:
        try:
            msg = requests.get(timeout=0.5)
        except queue.Empty:
            if channel.closed or not parent_alive():
                return
            continue
        kind = msg[0]
        if kind == "close":
            return
        if kind == "hidden":
            _, seq, ids, mask, flat, vision = msg
            ids, mask, flat = (torch.from_numpy(a) for a in (ids, mask, flat))
            if on_device:
                ids, mask, flat = ids.to(on_device), mask.to(on_device), flat.to(on_device)
            if vl:  # right-padded (checked at submit); the model makes its own (multimodal) positions
                extra = model_inputs({k: torch.from_numpy(v) for k, v in (vision or {}).items()},
                                     device, options["dtype"])
            else:
                extra = {"position_ids": (mask.cumsum(-1) - 1).clamp_(min=0)}
            with torch.inference_mode():
                h = decoder(input_ids=ids, attention_mask=mask, use_cache=False, **extra).last_hidden_state
                # compute first, then wait for a free slot: the forward overlaps the student's step
                buf = channel.acquire_write(seq, peer_alive=parent_alive)
                n = flat.numel()
                torch.index_select(h.reshape(-1, h.shape[-1]), 0, flat, out=buf[:n])
            del h
            channel.commit(seq, n)
        elif kind == "generate":
            _, rid, ids, mask, kw = msg
            responses.put(("done", rid, _generate(model, torch.from_numpy(ids), torch.from_numpy(mask), kw, on_device,
                                                       greedy_loop=not vl)))
        elif kind == "update":
            _, rid, flat, layout = msg
            responses.put(_update(model, rid, flat, layout))
        elif kind == "sleep":
            if on_device:
                model.to("cpu")
                torch.cuda.empty_cache()
            responses.put(("done", msg[1], None))
        elif kind == "wake":
            if on_device:
                model.to(on_device)
            responses.put(("done", msg[1], None))
        else:
            raise ValueError(f"teacher process: unknown request kind '{kind}'")


def _generate(model, ids: torch.Tensor, mask: torch.Tensor, kw: dict, device: Optional[str], *,
              greedy_loop: bool = True) -> list[list[int]]:
    # Batched generation needs left padding: re-pad each prompt's real tokens to the right edge.
    gen_cfg = model.generation_config
    eos = kw.get("eos_token_id")
    if eos is None:
        eos = gen_cfg.eos_token_id
    eos_set = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else (min(eos_set) if eos_set else 0)
    rows = [ids[b][mask[b].bool()] for b in range(ids.shape[0])]
    if greedy_loop and not kw["do_sample"]:
        # kdcore eval's teacher answers: the same tokens as generate, rows leaving as they stop
        # (kdcore.engines.greedy); a VL model makes its own multimodal positions, so it keeps generate
        from kdcore.engines.greedy import greedy_answers

        return greedy_answers(model, [r.tolist() for r in rows], max_new_tokens=kw["max_new_tokens"],
                              eos_ids=sorted(eos_set), rows=len(rows), pad_id=pad, device=device or "cpu")
    L = max(len(r) for r in rows)
    left = torch.full((len(rows), L), pad, dtype=torch.int64)
    lmask = torch.zeros((len(rows), L), dtype=torch.int64)
    for b, r in enumerate(rows):
        left[b, L - len(r):] = r
        lmask[b, L - len(r):] = 1
    if device:
        left, lmask = left.to(device), lmask.to(device)
    if kw.get("seed") is not None:
        torch.manual_seed(int(kw["seed"]))
    sample = kw["do_sample"]
    extra = {"temperature": kw["temperature"], "top_p": kw["top_p"], "top_k": kw["top_k"]} if sample else {}
    with torch.inference_mode():
        out = model.generate(input_ids=left, attention_mask=lmask, max_new_tokens=kw["max_new_tokens"],
                             do_sample=sample, pad_token_id=pad, eos_token_id=list(eos_set) or None, **extra)
    result = []
    for seq in out[:, L:].tolist():
        cut = next((i + 1 for i, t in enumerate(seq) if t in eos_set), len(seq))
        result.append(seq[:cut])
    return result


def _update(model, rid: int, flat: torch.Tensor, layout) -> tuple:
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    unknown = [n for n, _, _ in layout if n not in targets]
    if unknown:
        return ("failed", rid, f"update_weights: the teacher has no parameter or buffer named {', '.join(unknown[:5])}"
                               + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    bad = [f"{n} {tuple(shape)} vs {tuple(targets[n].shape)}" for n, shape, _ in layout if tuple(targets[n].shape) != tuple(shape)]
    if bad:
        return ("failed", rid, f"update_weights: shape mismatch for {', '.join(bad[:5])}")
    with torch.no_grad():
        for name, shape, off in layout:
            t = targets[name]
            t.copy_(flat[off:off + t.numel()].view(shape))
    return ("done", rid, len(layout))


__all__ = ["HFTeacher", "child_env"]
