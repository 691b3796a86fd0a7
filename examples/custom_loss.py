# %% [markdown]
# # A loss of your own, trained from Python
#
# Notebook-style (each `# %%` is a cell; Jupyter, VS Code and PyCharm run them as such), or:
#
#     python examples/custom_loss.py                      # the quickstart recipe, 10 steps on CPU
#     python examples/custom_loss.py RECIPE [overrides]   # any recipe, e.g. train.max_steps=30
#
# It defines a divergence, registers it in this process with `kdcore.register_plugin` (no
# package to install), trains the quickstart with it through `kdcore.train`, and scores the
# result with `kdcore.evaluate`. tests/integration/test_api.py runs this very file.
#
# Why every working cell starts with `if __name__ == "__main__":` — the teacher runs in a
# spawned process, which re-imports the script it was started from; unguarded, that import
# would train again. In a notebook the condition is always true: the cells run as written.

# %%
import sys
import types

import torch

import kdcore

recipe = sys.argv[1] if len(sys.argv) > 1 else "quickstart"
overrides = sys.argv[2:] or ["train.max_steps=10", "train.eval_every=5", "train.output_dir=outputs/custom_loss"]


# %% [markdown]
# The loss contract (CONTRIBUTING.md, `register_losses`): per-token divergence between the
# teacher's and the student's next-token distributions at temperature T, rows independent,
# float32, finite where the teacher's logits are -inf. The core does chunking, masking, the
# token mean and the CE mix (`distill.kd_ratio`).

# %%
def hellinger(student_logits, teacher_logits, *, temperature):
    """Squared Hellinger distance, 1 - sum(sqrt(p * q)): bounded in [0, 1], symmetric."""
    log_p = torch.log_softmax(teacher_logits.float() / temperature, -1)
    log_q = torch.log_softmax(student_logits.float() / temperature, -1)
    return 1.0 - torch.exp(0.5 * (log_p + log_q)).sum(-1)


if __name__ == "__main__":
    plugin = types.SimpleNamespace(register_losses=kdcore.hookimpl(lambda register: register("hellinger", hellinger)))
    kdcore.register_plugin(plugin, "my-notebook")

# %% [markdown]
# Train with it: the recipe's own settings, the loss swapped as on the command line.
# `kdcore.train` returns the run folder and its last held-out figures (step 0 is `run.evals[0]`).

# %%
if __name__ == "__main__":
    run = kdcore.train(recipe, overrides + ["distill.loss=hellinger"], overwrite=True)  # overwrite: rerunnable
    before, after = run.evals[0], run.figures
    print(f"{run.run_dir}: {run.steps} steps; teacher-KL {before['eval_teacher_kl']:.3f} -> "
          f"{after['eval_teacher_kl']:.3f}")

# %% [markdown]
# Score it as `kdcore eval` does: token figures plus greedy answers of student and teacher
# (ROUGE-L, answer lengths); the JSON report lands in `<run>/eval.json`.

# %%
if __name__ == "__main__":
    report = kdcore.evaluate(run.run_dir, max_new_tokens=32)
    for name, value in sorted(report.figures.items()):
        print(f"{name:32s} {value:.4f}")
    kdcore.unregister_plugin("my-notebook")
