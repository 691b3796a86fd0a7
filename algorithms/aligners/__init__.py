"""Built-in aligners, registered through the ``kdcore`` entry-point group.

One module per aligner; this file only registers them.
"""

from __future__ import annotations

from kdcore import hookimpl
from kdflow_algorithms.aligners.same_vocab import same_vocab


@hookimpl
def register_aligners(register):
    register("same_vocab", same_vocab, options=None)
