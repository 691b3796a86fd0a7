"""The ``hf`` teacher's child process: loads the model and serves the parent's requests.

Runs in the interpreter :class:`kdcore.engines.hf.teacher.HFTeacher` spawns (its docstring says
how the child is set up, and why); kept apart from the parent's side so that each file reads as
one side of the queue pair. Every exception here is sent up as a traceback and ends the child.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
import traceback

import torch

from kdcore.engines.hf.model import TeacherModel, decoder_layers
from kdcore.infra.channel import Channel, ChannelClosed


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
    teacher = TeacherModel(options["spec"], dtype=options["dtype"], device=device, cache_dir=options["cache_dir"],
                           attn_implementation=options.get("attn_implementation"))
    # Progress beats from every leaf module (each linear, norm, ...), not just each layer: one
    # layer of a large teacher on few CPU threads can outlast the hang timeout by itself.
    for module in teacher.decoder.modules():
        if next(module.children(), None) is None:
            module.register_forward_hook(lambda *_: channel.beat())
    responses.put(("ready", {"hidden_size": teacher.hidden_size, "vocab_size": teacher.vocab_size,
                             "pid": os.getpid(), "folder": teacher.folder, "threads": torch.get_num_threads(),
                             "device": device, "num_layers": len(decoder_layers(teacher.decoder)),
                             "vision": teacher.vision}))
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
            vision = {k: torch.from_numpy(v) for k, v in vision.items()} if vision else None
            with torch.inference_mode():
                h = teacher.last_hidden(ids, mask, vision)
                # compute first, then wait for a free slot: the forward overlaps the student's step
                buf = channel.acquire_write(seq, peer_alive=parent_alive)
                n = flat.numel()
                torch.index_select(h.reshape(-1, h.shape[-1]), 0, flat, out=buf[:n])
            del h
            channel.commit(seq, n)
        elif kind == "generate":
            _, rid, ids, mask, kw = msg
            responses.put(("done", rid, teacher.generate(torch.from_numpy(ids), torch.from_numpy(mask), kw)))
        elif kind == "update":
            _, rid, flat, layout = msg
            error, count = teacher.update((name, flat[off:off + math.prod(shape)].view(shape)) for name, shape, off in layout)
            responses.put(("failed", rid, error) if error else ("done", rid, count))
        elif kind == "sleep":
            if on_device:
                teacher.model.to("cpu")
                torch.cuda.empty_cache()
            responses.put(("done", msg[1], None))
        elif kind == "wake":
            if on_device:
                teacher.model.to(on_device)
            responses.put(("done", msg[1], None))
        else:
            raise ValueError(f"teacher process: unknown request kind '{kind}'")


__all__ = ["child_main"]
