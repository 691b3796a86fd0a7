"""Built-in aligners, registered through the ``kdcore`` entry-point group.

One module per aligner; this file only registers them.
"""

from __future__ import annotations

from kdcore import hookimpl
from kdflow_algorithms.aligners.dskd import DSKDOptions, dskd
from kdflow_algorithms.aligners.mined import MinEDOptions, mined
from kdflow_algorithms.aligners.overlap import OverlapOptions, overlap
from kdflow_algorithms.aligners.same_vocab import same_vocab
from kdflow_algorithms.aligners.uld import ULDOptions, uld


@hookimpl
def register_aligners(register):
    register("same_vocab", same_vocab, options=None)
    register("overlap", overlap, options=OverlapOptions)
    register("dskd", dskd, options=DSKDOptions)
    register("uld", uld, options=ULDOptions)
    register("mined", mined, options=MinEDOptions)
