"""bench/uld_sort.py times ULD split in two parts (teacher's sort, student's rest): the split
must compute the same distance as the aligner's own function, or its timings describe other work."""

import torch

from bench import uld_sort
from kdflow_algorithms.aligners.uld import uld_distance


def test_the_split_computes_the_aligners_distance_and_gradient():
    g = torch.Generator().manual_seed(0)
    h_t, w_t = torch.randn(40, 8, generator=g), torch.randn(96, 8, generator=g)
    h_s, w_s = torch.randn(40, 6, generator=g, requires_grad=True), torch.randn(64, 6, generator=g)
    split = uld_sort._student_part(h_s, w_s, uld_sort._teacher_part(h_t, w_t, chunk=16), chunk=16)
    grad_split, h_s.grad = h_s.grad.clone(), None
    whole = uld_distance(h_s @ w_s.T, h_t @ w_t.T).sum()
    whole.backward()
    whole = whole.detach().item()
    assert abs(split - whole) < 1e-4 * whole
    torch.testing.assert_close(grad_split, h_s.grad)
