"""What several test modules share (paths, tiny models, run and recipe helpers), so no test
module imports another. Test modules import it as ``helpers`` (pyproject's pytest
``pythonpath = ["tests"]``)."""
