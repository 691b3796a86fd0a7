"""transformers' GGUF "Converting and de-quantizing" bar (plain tqdm, which its
disable_progress_bar does not reach) stays off while kdcore shows its own phase line (issue 28)."""

from transformers import modeling_gguf_pytorch_utils as gguf_utils

from kdcore.modeling.models import _no_gguf_tqdm


def test_the_gguf_bar_is_silent_inside_and_restored_after(capsys):
    before = gguf_utils.tqdm
    with _no_gguf_tqdm():
        # the very call transformers makes while converting (modeling_gguf_pytorch_utils)
        items = list(gguf_utils.tqdm([1, 2, 3], desc="Converting and de-quantizing GGUF tensors..."))
    assert items == [1, 2, 3]
    assert "Converting" not in capsys.readouterr().err
    assert gguf_utils.tqdm is before
