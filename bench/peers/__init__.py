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

        def step_times(self, total: int, who: str) -> list[float]:
            """Seconds of each of the ``total`` steps (train start → first step end, then end
            to end); a run that did not take exactly ``total`` steps is an error."""
            if len(self.ends) != total:
                raise RuntimeError(f"{who} ran {len(self.ends)} steps, expected {total}")
            marks = [self.start] + self.ends
            return [b - a for a, b in zip(marks, marks[1:])]

    return Clock()
