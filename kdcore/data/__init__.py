"""Data (transitional: the whole module still lives in :mod:`kdcore.data.batching`; the next commit splits it)."""

from kdcore.data.batching import *  # noqa: F401,F403
from kdcore.data.batching import (  # noqa: F401
    _finish, _render, _render_chat, _Rendered, _tok_name, _tokenize_rendered, _truncate, _truncate_at_char,
)
