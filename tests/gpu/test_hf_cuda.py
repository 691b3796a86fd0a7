"""The hf teacher engine on CUDA (needs a GPU; skipped without one; run by checks/gpu/gpu_check.sh there)."""

from __future__ import annotations

import pytest
import torch
from helpers.teacher_hf import make_batch, model_dir, ref_hidden, reference  # noqa: F401  (fixtures)

from kdcore.engines import HiddenRequest
from kdcore.engines.hf import HFTeacher


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_teacher_writes_through_cuda_ipc(model_dir, reference):  # pragma: no cover - GPU only
    ids, mask, seqs = make_batch([6, 4], 6, seed=21)
    with HFTeacher(str(model_dir), device="cuda", threads=1, max_rows=64) as eng:
        assert eng.channel.data.is_cuda
        with eng.hidden_states(HiddenRequest(ids, mask, [[5, 0], [3]])) as h:
            assert h.is_cuda and h.data_ptr() == eng.channel.slot_tensor(0).data_ptr()
            expected = torch.cat([ref_hidden(reference, seqs[0])[[5, 0]], ref_hidden(reference, seqs[1])[[3]]])
            torch.testing.assert_close(h.cpu(), expected, rtol=1e-4, atol=1e-4)  # TF32/cuBLAS rounding
        eng.sleep()
        eng.wake()
        norm = reference.model.norm.weight.detach()
        assert eng.update_weights({"model.norm.weight": (2 * norm).cuda()}) == 1
        with eng.hidden_states(HiddenRequest(ids, mask, [[5, 0], [3]])) as h:
            torch.testing.assert_close(h.cpu(), 2 * expected, rtol=1e-4, atol=2e-4)
