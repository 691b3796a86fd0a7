"""Peer trainers run with the same models, data, batch, steps, precision and threads as kdflow."""


def step_clock():
    """A ``transformers`` TrainerCallback recording the train start, every step end (``ends``) and
    every logged loss (``losses``): one definition of step time for all peers (end to end)."""
    import time

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.losses, self.start = [], [], 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def result(self, side: str, total: int, warmup: int, setup_s: float) -> dict:
            """The keys every peer returns: per-step seconds (train start → first step end, then
            end to end; the first ``warmup`` apart), losses, setup time, threads, max RSS. A run
            that did not take exactly ``total`` steps is an error."""
            import resource

            import torch

            if len(self.ends) != total:
                raise RuntimeError(f"{side} ran {len(self.ends)} steps, expected {total}")
            marks = [self.start] + self.ends
            times = [b - a for a, b in zip(marks, marks[1:])]
            return {
                "side": side,
                "step_times": times[warmup:],
                "warmup_times": times[:warmup],
                "losses": self.losses,
                "final_loss": self.losses[-1] if self.losses else None,
                "setup_s": setup_s,
                "torch_threads": torch.get_num_threads(),
                "child_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }

    return Clock()
