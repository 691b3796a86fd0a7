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

    return Clock()
